"""The stages of a study: sample, extract, filter, select, generate, measure, judge.

Each stage is a public function that takes and returns typed values; studies compose them.
"""
