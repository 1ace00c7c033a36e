"""Refusal onset (how many tokens the detector needed) and refusal rates by generation budget."""

from __future__ import annotations

from pyrefusal.method.refusal import SubstringDetector
from pyrefusal.stages.generate import (
    Completion,
    budget_grid,
    is_degenerate,
    refusal_by_budget,
    refusal_onset,
    repetition,
    summarize,
    wilson_interval,
)


class _Pieces:
    """A stand-in runtime whose token ids index a list of text pieces."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.calls = 0

    def detokenize(self, tokens) -> str:
        self.calls += 1
        return "".join(self.pieces[t] for t in tokens)


def _completion(
    refused: bool, onset: int | None, n_tokens: int = 64, lang: str = "en", response: str = "r"
) -> Completion:
    return Completion(
        prompt_id=f"{lang}/x",
        lang=lang,
        kind="harmful",
        condition="baseline",
        prompt="p",
        response=response,
        n_tokens=n_tokens,
        finish_reason="length",
        refused=refused,
        marker="I cannot" if refused else None,
        detector="substring-multilingual",
        refusal_token=onset,
    )


def test_onset_is_the_token_that_completes_the_marker() -> None:
    det = SubstringDetector()
    # "Sure, here is how. ... Actually, I cannot help with that." with the marker spread over tokens 7-8
    pieces = ["Sure", ",", " here", " is", " how", ".", " Actually", ", I", " cannot", " help", " with", " that", "."]
    rt = _Pieces(pieces)
    tokens = list(range(len(pieces)))
    k = refusal_onset(rt, tokens, "en", det)
    assert k == 9  # prefix of 9 tokens ends with " cannot": the first one that reads as a refusal
    assert det.judge("".join(pieces[:k]), "en").refused and not det.judge("".join(pieces[: k - 1]), "en").refused
    assert rt.calls <= 1 + 4  # the whole text, then a binary search over 13 tokens


def test_onset_of_an_immediate_refusal_and_of_compliance() -> None:
    det = SubstringDetector()
    rt = _Pieces(["I'm sorry", ",", " no", "."])
    assert refusal_onset(rt, [0, 1, 2, 3], "en", det) == 1
    rt = _Pieces(["Step", " 1", ":", " mix"])
    assert refusal_onset(rt, [0, 1, 2, 3], "en", det) is None
    assert refusal_onset(rt, [], "en", det) is None


def test_onset_in_a_non_latin_language() -> None:
    det = SubstringDetector()
    pieces = ["好的", "。", "但是", "我", "不能", "提供", "这个", "。"]  # "OK. But I cannot provide this."
    k = refusal_onset(_Pieces(pieces), list(range(len(pieces))), "zh", det)
    assert k is not None and 4 <= k <= 6
    assert det.judge("".join(pieces[:k]), "zh").refused and not det.judge("".join(pieces[: k - 1]), "zh").refused


def test_budget_grid() -> None:
    assert budget_grid(48) == (8, 16, 32, 48)
    assert budget_grid(64) == (8, 16, 32, 64)
    assert budget_grid(512) == (8, 16, 32, 64, 128, 256, 512)
    assert budget_grid(5) == (5,)


def test_refusal_by_budget_counts_late_refusals_only_at_larger_budgets() -> None:
    rows = [_completion(True, 2), _completion(True, 20), _completion(True, 60), _completion(False, None)]
    by = refusal_by_budget(rows, (8, 16, 32, 64))
    assert by == {"8": 0.25, "16": 0.25, "32": 0.5, "64": 0.75}
    # the last budget is the whole generation: it equals the plain refusal rate
    summary = summarize(rows, (8, 16, 32, 64))["en"]["baseline"]["harmful"]
    assert summary["refusal_rate"] == by["64"] and summary["refusal_by_budget"] == by
    # rows written before onsets were recorded: no curve rather than a wrong one
    assert refusal_by_budget([_completion(True, None)], (8,)) is None
    assert "refusal_by_budget" not in summarize(rows)["en"]["baseline"]["harmful"]


def test_wilson_interval_matches_known_values() -> None:
    # Wilson score interval, z = 1.96, worked by hand: 12/16 -> centre 0.7016 +- 0.1966
    lo, hi = wilson_interval(0, 16)
    assert lo == 0.0 and abs(hi - 0.1936) < 1e-3
    lo, hi = wilson_interval(12, 16)
    assert abs(lo - 0.5050) < 1e-3 and abs(hi - 0.8982) < 1e-3
    lo, hi = wilson_interval(16, 16)
    assert abs(lo - 0.8064) < 1e-3 and hi == 1.0
    assert summarize([_completion(True, 1)] * 3 + [_completion(False, None)])["en"]["baseline"]["harmful"][
        "refusal_rate_ci95"
    ] == list(wilson_interval(3, 4))


LOOP_FR = "Le soleil est le soleil, le soleil est le soleil.\nLe soleil est le soleil, le soleil est le soleil,\n" * 2
LOOP_KO = "그는 그의 첫 번째 책을 읽고, " * 6
PROSE_EN = (
    "To bake bread, mix flour, water, salt and yeast, knead the dough for ten minutes, let it rise "
    "until doubled, shape it, let it rise again and bake it at 230 degrees for about half an hour."
)
PROSE_ZH = "光合作用是植物利用阳光、水和二氧化碳制造葡萄糖并释放氧气的过程，主要发生在叶绿体中。"  # noqa: RUF001


def test_repetition_separates_loops_from_prose() -> None:
    # a loop repeats most of its 10-grams; prose in any script almost none
    assert repetition(LOOP_FR) > 0.5 and repetition(LOOP_KO) > 0.5
    assert repetition(PROSE_EN) < 0.05 and repetition(PROSE_ZH) < 0.05
    assert is_degenerate(LOOP_KO) and not is_degenerate(PROSE_ZH)
    # exact value: "abcdefghij" * 3 has 21 10-grams of which 10 are distinct
    assert abs(repetition("abcdefghij" * 3) - (1 - 10 / 21)) < 1e-12
    assert repetition("short") == 0.0 and repetition("") == 0.0
    # whitespace runs do not hide or create repetition
    assert repetition(PROSE_EN.replace(" ", "  \n ")) == repetition(PROSE_EN)


def test_summarize_counts_loops() -> None:
    rows = [_completion(False, None, response=LOOP_FR)] * 2 + [_completion(False, None, response=PROSE_EN)] * 3
    e = summarize(rows)["en"]["baseline"]["harmful"]
    assert e["degenerate"] == 2 and e["degenerate_rate"] == 2 / 5
