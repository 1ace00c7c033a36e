"""The last stage of a run: the evaluation table and ``results.json`` (:class:`~pyrefusal.results.RunResults`).

:func:`evaluation_table` turns the completions and the metrics measured beside them into
``results["evaluation"]``; :func:`assemble_results` gathers every stage's typed output into the run's
:class:`~pyrefusal.results.RunResults`. ``pyrefusal run`` uses both; ``pyrefusal report`` (``rerender``) recomputes
the evaluation table from stored completions. :func:`recorded_versions` and :func:`runtime_timings` are the build
facts and runtime counters every study records in its results file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from pyrefusal.method.refusal import greedy_first_token_refused
from pyrefusal.method.selection import Selection
from pyrefusal.results import Evaluation, EvaluationCell, RunResults
from pyrefusal.rundir import previous_timings
from pyrefusal.runtime import ModelRunner
from pyrefusal.settings import RunSettings
from pyrefusal.stages.generate import Completion, budget_grid, summarize, wilson_interval
from pyrefusal.stages.layout import PromptRecord, RunPaths
from pyrefusal.stages.measure import Metrics
from pyrefusal.stages.sample import PromptSample

__all__ = [
    "assemble_results",
    "evaluation_table",
    "fallback_cells",
    "recorded_versions",
    "runtime_timings",
    "strict_json",
]


def recorded_versions() -> dict[str, Any]:
    """The build facts a results file records (:func:`pyrefusal.runtime.runtime.build_info` without the machine's
    ``system_info``)."""
    from pyrefusal.runtime import build_info

    return {k: v for k, v in build_info().items() if k != "system_info"}


def strict_json(x: object) -> Any:
    """``x`` as strict JSON values (what ``transfer.json`` holds): NaN and infinities as ``None``, tuples as lists,
    NumPy scalars as Python numbers, mapping keys as strings."""
    if isinstance(x, dict):
        return {str(k): strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def runtime_timings(runner: ModelRunner) -> dict[str, float]:
    """The runner's token counts and seconds as ``{"runtime_<counter>": value}`` (without ``extra``)."""
    return {"runtime_" + k: v for k, v in asdict(runner.timings).items() if k != "extra"}


def fallback_cells(fallback: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The first-token detector's rates per language and condition, from ``metrics.json``'s ``"fallback"``
    (:func:`pyrefusal.stages.measure.measure_fallback_refusal`): a completion is a refusal when its first generated
    token is in R (:func:`pyrefusal.method.refusal.greedy_first_token_refused`).

    Returns:
        ``{lang: {condition: {"detector", "n", "refused", "refusal_rate", "refusal_rate_ci95", "mean_p_refusal",
        "refusal_tokens": {id: text}, "token_sources": {source: [ids]}}}}``: what
        ``results["evaluation"][lang][condition]["first_token_detector"]`` holds.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for lang, rec in fallback.items():
        toks = rec["refusal_tokens"]
        for cond, first in rec.get("greedy_token", {}).items():
            ps = rec.get("p_refusal", {}).get(cond) or []
            if not first:
                continue
            k = sum(greedy_first_token_refused(first, toks["ids"]))
            out.setdefault(lang, {})[cond] = {
                "detector": rec["detector"],
                "n": len(first),
                "refused": k,
                "refusal_rate": k / len(first),
                "refusal_rate_ci95": list(wilson_interval(k, len(first))),
                "mean_p_refusal": sum(ps) / len(ps) if ps else None,
                "refusal_tokens": {str(i): t for i, t in zip(toks["ids"], toks["strings"], strict=True)},
                "token_sources": toks["sources"],
            }
    return out


def evaluation_table(
    completions: Sequence[Completion],
    max_new_tokens: int,
    target_langs: Sequence[str],
    detector_name: str,
    first_token: Mapping[str, Mapping[str, float | None]],
    judged: Mapping[str, Mapping[str, Any]],
    paths: RunPaths,
    fallback: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> Evaluation:
    """``results["evaluation"]``: ``{lang: {condition: EvaluationCell}}`` in ``target_langs`` order.

    Where ``fallback`` has a cell (a language the substring detector is blind to), that cell's ``refusal_rate``,
    ``refusal_rate_ci95`` and ``detector`` are the first-token detector's, ``refusal_by_budget`` is ``None`` (it
    reads one position), the substring detector's numbers move to ``"substring"`` with ``"blind": true``, the
    first-token detector's record is under ``"first_token_detector"``, and ``harmless`` gets ``"blind": true``
    (its rates stay the substring detector's). Other cells are as before, byte for byte.

    Args:
        completions: the run's completions (configured languages and conditions only).
        max_new_tokens: the generation budget (sets the by-budget grid).
        target_langs: the configured order of the languages.
        detector_name: the substring detector's name, for cells without harmful completions.
        first_token: ``{lang: {condition: first-token refusal probability}}`` (measured with the model).
        judged: ``{lang: {condition: judge rates}}`` (empty without a judge).
        paths: the run directory (names the completions file in each cell).
        fallback: ``{lang: {condition: first-token detector cell}}`` (:func:`fallback_cells`) for the languages
            the substring detector is blind to.
    """
    summary = summarize(completions, budget_grid(max_new_tokens))
    evaluation: Evaluation = {}
    for lang, conds in summary.items():
        evaluation[lang] = {}
        for cond, kinds in conds.items():
            harmful = kinds.get("harmful", {"n": 0, "refusal_rate": None, "detector": detector_name})
            cell: EvaluationCell = {
                "n": harmful["n"],
                "refusal_rate": harmful["refusal_rate"],
                "refusal_rate_ci95": harmful.get("refusal_rate_ci95"),
                "degenerate_rate": harmful.get("degenerate_rate"),
                "detector": harmful["detector"],
                "completions": f"{paths.completions.name} (lang={lang}, condition={cond}, kind=harmful)",
                "refusal_by_budget": harmful.get("refusal_by_budget"),
                "harmless": kinds.get("harmless"),
                "first_token_refusal_prob": first_token.get(lang, {}).get(cond),
            }
            if judged.get(lang, {}).get(cond):
                cell["judge"] = judged[lang][cond]
            fb = (fallback or {}).get(lang, {}).get(cond)
            if fb is not None:  # the substring detector is blind in lang: the first-token detector's rates
                cell["substring"] = {
                    "detector": cell["detector"],
                    "blind": True,
                    "refusal_rate": cell["refusal_rate"],
                    "refusal_rate_ci95": cell["refusal_rate_ci95"],
                    "refusal_by_budget": cell["refusal_by_budget"],
                }
                cell["refusal_rate"] = fb["refusal_rate"]
                cell["refusal_rate_ci95"] = fb["refusal_rate_ci95"]
                cell["detector"] = fb["detector"]
                cell["refusal_by_budget"] = None
                cell["first_token_detector"] = dict(fb)
                if cell["harmless"] is not None:
                    cell["harmless"] = {**cell["harmless"], "blind": True}
            evaluation[lang][cond] = cell
    return {lang: evaluation[lang] for lang in target_langs if lang in evaluation}  # config order


def assemble_results(
    runner: ModelRunner,
    config: RunSettings,
    paths: RunPaths,
    *,
    sample: PromptSample,
    prompts: PromptRecord,
    selection: Selection,
    direction: np.ndarray,
    eoi: Sequence[int],
    completions: Sequence[Completion],
    detector_name: str,
    metrics: Metrics,
    judged: Mapping[str, Mapping[str, Any]],
    timings: Mapping[str, float],
) -> RunResults:
    """Every stage's output as the run's :class:`~pyrefusal.results.RunResults` (not yet written).

    Args:
        runner: the run's model (its facts, token texts and runtime counters are recorded).
        config: the run's settings.
        paths: the run directory (file names; the previous ``results.json``'s timings are kept).
        sample: the sampled prompts (missing and short test files).
        prompts: ``prompts.json``'s record (ids of every stage's prompts).
        selection: the selected candidate.
        direction: the selected direction ``(n_embd,)`` (its norm is recorded).
        eoi: the post-instruction tokens.
        completions / detector_name / judged: as :func:`evaluation_table`.
        metrics: first-token refusal, capability and steering paths measured beside generation.
        timings: seconds per stage of this invocation (``total`` included).
    """
    first_token = {lang: metrics.first_token.get(lang, {}) for lang in sample.test}
    fallback = fallback_cells(metrics.data.get("fallback", {}))  # languages the substring detector is blind to
    evaluation = evaluation_table(
        completions, config.max_new_tokens, config.target_langs, detector_name, first_token, judged, paths, fallback
    )
    results: dict[str, Any] = {
        "model": runner.info().to_dict(),
        "direction": {
            "source_lang": config.source_lang,
            "layer": selection.layer,
            "position": selection.position,
            "kl": selection.kl,
            "refusal_score": selection.refusal_score,
            "baseline_refusal_score": selection.baseline_refusal_score,
            "steering_score": selection.steering_score,
            "norm": float(np.linalg.norm(direction)),
            "refusal_tokens": {str(i): runner.detokenize([i]) for i in selection.refusal_tokens},
            "rule": asdict(selection.rule),
            "selection_mode": selection.mode,
            "file": paths.direction.name,
            "candidates_file": paths.candidates.name,
            "eoi_tokens": list(eoi),
        },
        "prompts": prompts.to_dict(),
        "evaluation": evaluation,
        "steering": {
            "requested": config.steering,
            "used": {c: metrics.steering[c] for c in config.conditions if c in metrics.steering},
        },
        "missing_test_files": sample.missing,
        "short_test_files": sample.short,
        "capability": {c: metrics.capability[c] for c in config.conditions if c in metrics.capability},
        "config": config.to_dict(),
        "versions": recorded_versions(),
        "timings": {**timings, **runtime_timings(runner)},
        # a resumed run keeps the timings of the invocations that did the earlier stages
        "timings_previous": previous_timings(paths.results),
    }
    return RunResults(results)
