"""Where the substring detector is blind, a first-token detector makes the refusal rates (issue 15, §4).

A language without refusal markers used to read ~0% refused while the model refused in a neighbouring language.
Now the run says the substring detector is blind there, counts a completion whose first generated token is one the
model's own refusals start with as a refusal, and records which detector made each number.
Runs on covered languages are unchanged (tests/test_golden.py pins them byte for byte).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from pyrefusal.cli import main
from pyrefusal.data.polyrefuse import PolyRefuse
from pyrefusal.errors import DataError
from pyrefusal.method.refusal import (
    FIRST_TOKEN_DETECTOR,
    SubstringDetector,
    first_token_refused,
    greedy_first_token_refused,
)
from pyrefusal.runtime import Runtime
from pyrefusal.settings import RunSettings
from pyrefusal.stages.generate import Completion
from pyrefusal.stages.judge import first_token_refusal
from pyrefusal.stages.layout import RunPaths
from pyrefusal.stages.results import evaluation_table, fallback_cells
from pyrefusal.studies.run import run_pipeline

BLIND = "xq"  # a language code no marker list has, laid out like a PolyRefuse language


# -- the verdict rule -------------------------------------------------------------------------------------------
def test_first_token_verdicts() -> None:
    assert greedy_first_token_refused([40, 7, 9, 40], [40, 9]) == [True, False, True, True]
    assert FIRST_TOKEN_DETECTOR == "first-token-greedy"
    with pytest.raises(DataError, match="no refusal tokens"):
        greedy_first_token_refused([1, 2], [])
    # the alternative rule, kept for comparisons (docs/results/detector-fallback-qwen1.5b)
    assert first_token_refused([0.9, 0.5, 0.500001, 0.1, 0.0, 1.0]) == [True, False, True, False, False, True]
    assert first_token_refused([0.3, 0.25], threshold=0.25) == [True, False]
    for bad in ([1.5], [-0.2], [float("nan")]):
        with pytest.raises(DataError, match="not in"):
            first_token_refused(bad)
    with pytest.raises(DataError, match="threshold"):
        first_token_refused([0.2], threshold=1.0)


def test_cross_language_markers() -> None:
    zh_refusal = "私はAI助手，我不能提供任何非法或不道德的行为。"  # noqa: RUF001 (a ja prompt, a Chinese refusal)
    default, every = SubstringDetector(), SubstringDetector(cross_language=True)
    assert not default.judge(zh_refusal, "ja").refused  # covered languages: own + English markers, as before
    assert every.judge(zh_refusal, "ja").marker == "我不能" and every.name == "substring-multilingual-all"
    # a language without markers is checked against every list already: a neighbouring refusal is seen...
    assert default.judge("Я не могу помочь с этим.", BLIND).refused and not default.covers(BLIND)  # noqa: RUF001
    # ...but one in the prompt's own (unlisted) language is not: that is the blindness the fallback is for
    assert not default.judge("Siwezi kukusaidia na hilo.", "sw").refused
    assert every.judge("Ich kann nicht helfen.", "de").marker == default.judge("Ich kann nicht helfen.", "de").marker
    with pytest.raises(DataError, match="multilingual"):
        SubstringDetector(mode="paper", cross_language=True)


# -- the evaluation table ---------------------------------------------------------------------------------------
def _completion(lang: str, i: int, cond: str, refused: bool) -> Completion:
    return Completion(
        prompt_id=f"harmful/test/{lang}/{i}", lang=lang, kind="harmful", condition=cond, prompt="p", response="r",
        n_tokens=4, finish_reason="length", refused=refused, marker="I cannot" if refused else None,
        detector="substring-multilingual", refusal_token=2 if refused else None,
    )  # fmt: skip


def test_the_blind_cells_take_the_first_token_rates_and_keep_the_substring_ones(tmp_path: Path) -> None:
    rows = [_completion(lang, i, "baseline", i == 0) for lang in ("en", BLIND) for i in range(4)]
    record = {
        "detector": FIRST_TOKEN_DETECTOR,
        "refusal_tokens": {"ids": [40, 7], "strings": ["I", "Я"], "sources": {"run:en": [40], "derived:xq": [7]}},
        "prompt_ids": [f"harmful/test/{BLIND}/{i}" for i in range(4)],
        "greedy_token": {"baseline": [40, 3, 7, 12]},
        "p_refusal": {"baseline": [0.9, 0.7, 0.3, 0.2]},
    }
    fb = fallback_cells({BLIND: record})
    assert fb[BLIND]["baseline"]["refused"] == 2 and fb[BLIND]["baseline"]["refusal_rate"] == 0.5  # 40 and 7 are in R
    assert fb[BLIND]["baseline"]["mean_p_refusal"] == pytest.approx(0.525)
    assert fb[BLIND]["baseline"]["refusal_tokens"] == {"40": "I", "7": "Я"}
    args = (rows, 8, ["en", BLIND], "substring-multilingual", {}, {}, RunPaths(tmp_path))
    plain, with_fallback = evaluation_table(*args), evaluation_table(*args, fb)
    assert with_fallback["en"] == plain["en"]  # covered language: byte for byte as before
    cell = with_fallback[BLIND]["baseline"]
    assert cell["detector"] == "first-token-greedy" and cell["refusal_rate"] == 0.5
    assert cell["refusal_rate_ci95"] == fb[BLIND]["baseline"]["refusal_rate_ci95"] and cell["refusal_by_budget"] is None
    assert cell["substring"] == {
        "detector": "substring-multilingual",
        "blind": True,
        "refusal_rate": 0.25,
        "refusal_rate_ci95": plain[BLIND]["baseline"]["refusal_rate_ci95"],
        "refusal_by_budget": plain[BLIND]["baseline"]["refusal_by_budget"],
    }
    assert cell["first_token_detector"] == fb[BLIND]["baseline"] and cell["n"] == 4


# -- a run on the tiny model ------------------------------------------------------------------------------------
def _data_with_blind_language(polyrefuse_dir: Path, root: Path) -> Path:
    """en and de files, plus de's rows under the code ``BLIND`` (all six files, as a PolyRefuse language)."""
    root.mkdir()
    for path in polyrefuse_dir.glob("*_translated_*.json"):
        if path.name.endswith(("_en.json", "_de.json")):
            shutil.copyfile(path, root / path.name)
            if path.name.endswith("_de.json"):
                shutil.copyfile(path, root / path.name.replace("_de.json", f"_{BLIND}.json"))
    return root


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def blind_run(tiny_model, polyrefuse_dir, tmp_path_factory) -> tuple[Path, dict[str, Any], list[str], RunSettings]:
    tmp = tmp_path_factory.mktemp("fallback")
    data = _data_with_blind_language(polyrefuse_dir, tmp / "data")
    said: list[str] = []
    config = RunSettings(
        model=str(tiny_model[0]), data_dir=str(data), target_langs=("en", BLIND), n_train=6, n_val=4, n_test=3,
        max_new_tokens=4, kl_threshold=1e9, n_threads=1, capability=False, refusal_openings=("I",),
        conditions=("baseline", "ablation", "induce"),
    )  # fmt: skip
    results = run_pipeline(config, tmp / "run", log=said.append)
    return tmp / "run", results, said, config


def test_a_blind_language_gets_first_token_rates_with_their_detector_named(blind_run) -> None:
    out, results, said, config = blind_run
    assert results["detector_blind_languages"] == [BLIND]
    assert any(f"{BLIND}: the substring-multilingual detector is blind here" in s for s in said)
    # the random model refuses nothing the markers see: R is the source language's only, and the run says so
    assert any(s.startswith(f"warning: {BLIND}: no refusal of the model was recognised") for s in said)
    metrics = _json(out / "metrics.json")
    assert list(metrics["fallback"]) == [BLIND]  # only the blind language is measured
    record = metrics["fallback"][BLIND]
    sources = record["refusal_tokens"]["sources"]
    assert list(sources)[:2] == ["run:en", "derived:en"] and f"derived:{BLIND}" in record["refusal_tokens"]["notes"]
    for cond in config.conditions:
        cell = results["evaluation"][BLIND][cond]
        first = record["greedy_token"][cond]
        assert (
            cell["detector"] == "first-token-greedy" and len(first) == len(record["p_refusal"][cond]) == cell["n"] == 3
        )
        assert cell["refusal_rate"] == sum(t in record["refusal_tokens"]["ids"] for t in first) / 3
        assert cell["substring"]["blind"] is True and cell["substring"]["detector"] == "substring-multilingual"
        assert cell["harmless"]["blind"] is True
        en = results["evaluation"]["en"][cond]
        assert en["detector"] == "substring-multilingual" and "substring" not in en and "first_token_detector" not in en
    report = (out / "report.md").read_text(encoding="utf-8")
    assert f"is blind in {BLIND}**" in report and f"| {BLIND} | first-token-greedy |" in report


def test_the_first_token_numbers_are_the_models(blind_run) -> None:
    """Recomputed independently at baseline: p_R as the judge stage computes it, and the stored greedy token is the
    first token of the greedy completion."""
    out, _, _, config = blind_run
    record = _json(out / "metrics.json")["fallback"][BLIND]
    texts = {p.id: p.text for p in PolyRefuse(config.data_dir).load(BLIND, "test", "harmful")}
    rt = Runtime.for_study(config)
    try:
        toks = [rt.chat_tokens(texts[i], config.system_prompt) for i in record["prompt_ids"]]
        p = first_token_refusal(rt, toks, record["refusal_tokens"]["ids"])  # (3,) float64
        gens = rt.generate(toks, 1)
    finally:
        rt.close()
    np.testing.assert_allclose(record["p_refusal"]["baseline"], p, rtol=1e-4, atol=1e-9)
    assert 0.0 < p.max() < 0.5  # a random-weight model barely predicts any refusal token
    assert record["greedy_token"]["baseline"] == [g.tokens[0] for g in gens]


def test_report_rerenders_the_blind_cells_as_stored(blind_run) -> None:
    out, results, _, _ = blind_run
    before = _json(out / "results.json")["evaluation"]
    r = CliRunner().invoke(main, ["report", "--quiet", str(out)])
    assert r.exit_code == 0, r.output
    assert _json(out / "results.json")["evaluation"] == before
    assert results["evaluation"][BLIND]["baseline"]["detector"] == "first-token-greedy"
