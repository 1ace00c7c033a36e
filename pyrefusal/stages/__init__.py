"""The stages of a study: sample, extract, filter, select, generate, measure, judge.

Each stage is a public function that takes and returns typed values and owns its files in the run directory
(:mod:`pyrefusal.stages.layout`); studies (:mod:`pyrefusal.studies`) compose them:

* :mod:`~pyrefusal.stages.sample`: ``sample_prompts`` -> ``PromptSample``; ``sample_test_prompts``, ``probe_prompts``
* :mod:`~pyrefusal.stages.tokens`: refusal tokens of a language (``language_refusal_tokens`` -> ``RefusalTokens``)
* :mod:`~pyrefusal.stages.extract`: ``extract_stage`` -> ``Extracted`` (candidates + kept prompt ids)
* :mod:`~pyrefusal.stages.select`: ``filter_val``, ``select_direction``, ``select_stage`` -> ``Selection``
* :mod:`~pyrefusal.stages.direction`: extract + select of one language -> ``LanguageDirection``
* :mod:`~pyrefusal.stages.generate`: ``generate_stage`` -> ``completions.jsonl``
* :mod:`~pyrefusal.stages.measure`: first-token refusal, capability -> ``Metrics`` (``metrics.json``)
* :mod:`~pyrefusal.stages.judge`: guard judge and back-translation
* :mod:`~pyrefusal.stages.crossapply`: every direction applied in every target (``TransferResult``)
* :mod:`~pyrefusal.stages.geometry`: cosines, PCA, projections of directions (``compare_directions`` ->
  ``DirectionGeometry``)
* :mod:`~pyrefusal.stages.variants`: quantized variants of a model and their directions (``Variant``)
* :mod:`~pyrefusal.stages.results`: ``evaluation_table`` and ``assemble_results`` -> ``RunResults``
  (``results.json``)
"""
