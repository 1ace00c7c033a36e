"""`pyrefusal run`: extract, select and evaluate a refusal direction, end to end.

Stages (each writes its typed output into the run directory before the next starts, so an
interrupted run keeps its work and a re-run continues from the last finished stage):

1. sample prompts (paper order, seed) -> ``prompts.json``
2. capture block-input activations of the train prompts at the post-instruction positions,
   filter by refusal score (harmful s > 0, harmless s < 0), difference in means ->
   ``candidates.npy`` (float32 ``(n_positions, n_layers, n_embd)``) + ``candidates.npz``
3. select (paper rule, exact lazy top-1) -> ``selection.json``, ``direction.npy`` (float32,
   unnormalised)
4. greedy generation on test prompts per language x condition -> ``completions.jsonl``
   (appended batch by batch; finished prompts are skipped on resume)
   then, with a judge: back-translate harmful responses to English (``--judge-translator``) ->
   ``back_translations.jsonl``, and judge them -> ``judge_cache.jsonl`` (both append-only caches)
5. ``results.json`` and ``report.md``

Only this module and the CLI know the whole flow; stage modules stay independent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pyrefusal.data.polyrefuse import PolyRefuse, default_data_dir
from pyrefusal.errors import DataError, PyrefusalError
from pyrefusal.method import intervention as iv
from pyrefusal.method.directions import random_like
from pyrefusal.method.refusal import SubstringDetector
from pyrefusal.method.selection import Selection, SelectionRule, refusal_token_ids
from pyrefusal.results import RunResults
from pyrefusal.rundir import RunLock, check_config, previous_timings, write_atomic, write_config
from pyrefusal.runtime.runtime import Runtime, build_info
from pyrefusal.settings import CONDITIONS, RunConfig  # noqa: F401  (CONDITIONS: importable from here as before)
from pyrefusal.stages.extract import extract_stage
from pyrefusal.stages.generate import (
    Completion,
    budget_grid,
    configured,
    generate_stage,
    read_jsonl,
    summarize,
    wanted_pairs,
)
from pyrefusal.stages.judge import judge_completions
from pyrefusal.stages.layout import RunPaths
from pyrefusal.stages.measure import Metrics, measure_capability, measure_first_token_refusal
from pyrefusal.stages.sample import sample_prompts
from pyrefusal.stages.select import select_stage

Log = Callable[[str], None]


def _prepare_dir(paths: RunPaths, config: RunConfig, force: bool) -> None:
    """Refuse a directory that holds a run of another configuration; with ``force`` clear it."""
    check_config(
        paths.root,
        config.to_dict(),
        what="run",
        force=force,
        resumable=config.resumable_keys(),  # declared by the settings' fields (RunSettings)
        defaults=config.defaults(),
        options=config.option_names(),
    )
    if force:
        for p in (
            paths.prompts,
            paths.candidates,
            paths.candidates_full,
            paths.selection,
            paths.direction,
            paths.completions,
            paths.results,
            paths.report,
            paths.metrics,
            paths.root / "model.json",
        ):
            p.unlink(missing_ok=True)
    write_config(paths.root, config.to_dict())


def _check_model(paths: RunPaths, sha256: str) -> None:
    """Refuse to resume a run directory with another model file than the one it was started with
    (``--model`` names a path or registry entry; the file behind it may have changed)."""
    ident = paths.root / "model.json"
    if ident.exists():
        old = json.loads(ident.read_text()).get("sha256")
        if old and old != sha256:
            raise PyrefusalError(
                f"{paths.root} was started with a model file of sha256 {old[:12]}…, and --model now gives "
                f"{sha256[:12]}…: its results would mix two models. Use the original file, another output "
                "directory, or --force to start over."
            )
    else:
        write_atomic(ident, json.dumps({"sha256": sha256}, indent=1))


def _evaluation_table(
    completions: Sequence[Completion],
    max_new_tokens: int,
    target_langs: Sequence[str],
    detector_name: str,
    first_token: Mapping[str, Mapping[str, float]],
    judged: Mapping[str, Mapping[str, Any]],
    paths: RunPaths,
) -> dict[str, Any]:
    """``results["evaluation"]``: ``{lang: {condition: {harmful rates..., "harmless": {...}, ...}}}`` in
    ``target_langs`` order, from the completions plus the model-dependent metrics computed beside them."""
    summary = summarize(completions, budget_grid(max_new_tokens))
    evaluation: dict[str, Any] = {}
    for lang, conds in summary.items():
        evaluation[lang] = {}
        for cond, kinds in conds.items():
            harmful = kinds.get("harmful", {"n": 0, "refusal_rate": None, "detector": detector_name})
            evaluation[lang][cond] = {
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
                evaluation[lang][cond]["judge"] = judged[lang][cond]
    return {lang: evaluation[lang] for lang in target_langs if lang in evaluation}  # config order


def run_pipeline(
    config: RunConfig,
    out: Path,
    *,
    force: bool = False,
    log: Log = print,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the whole job; returns the results dict written to ``results.json``."""

    config.validate()
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    paths = RunPaths(Path(out))
    with RunLock(paths.root):
        _prepare_dir(paths, config, force)

        data_dir = Path(config.data_dir) if config.data_dir else default_data_dir()
        data = PolyRefuse(data_dir)
        available = data.languages()  # raises a DataError with a fix when the directory is empty
        for lang in (config.source_lang, *config.target_langs):
            if lang not in available:
                raise DataError(f"language {lang!r} has no files in {data_dir}; available: {available}")

        t = time.perf_counter()
        rt = Runtime.for_study(config, log=log)  # fails on an unknown graph before hours of extraction
        timings["load_model"] = time.perf_counter() - t
        try:
            _check_model(paths, rt.sha256)
            return _run(rt, data, config, paths, timings, t_all, log, progress)
        finally:
            rt.close()


def _interventions(direction: np.ndarray, layer: int, seed: int) -> dict[str, iv.Intervention]:
    """The intervention of every condition of :data:`CONDITIONS`, from the selected direction ``(n_embd,)``."""
    return {
        "baseline": iv.baseline(),
        "ablation": iv.ablation(direction),
        "actadd": iv.actadd(direction, layer, coeff=-1.0),
        "induce": iv.induce(direction, layer, coeff=1.0),
        "harm_ablation": iv.harm_ablation(direction, layer),
        "random_ablation": iv.Intervention("random_ablation", ablate=random_like(direction, seed=seed)),
    }


def _run(
    rt: Runtime,
    data: PolyRefuse,
    config: RunConfig,
    paths: RunPaths,
    timings: dict[str, float],
    t_all: float,
    log: Log,
    progress: Callable[[str, int, int], None] | None,
) -> dict[str, Any]:
    """The stage sequence: sample -> extract -> select -> generate -> measure -> judge -> results.

    Every stage reuses its files in ``paths`` when they are there (resume).
    """
    system = config.system_prompt
    eoi = rt.eoi_tokens(system)
    refusal_ids = refusal_token_ids(
        lambda w: rt.tokenize(w), config.source_lang, config.refusal_openings or None, rt.family
    )
    log(
        f"post-instruction tokens {eoi} -> positions {tuple(range(-len(eoi), 0))}; refusal tokens {refusal_ids} "
        f"({[rt.detokenize([i]) for i in refusal_ids]})"
    )

    # -- 1. sample; 2. extract; 3. select ---------------------------------------------------
    sample = sample_prompts(
        data,
        config.source_lang,
        config.target_langs,
        n_train=config.n_train,
        n_val=config.n_val,
        n_test=config.n_test,
        seed=config.seed,
        log=log,
    )
    files = paths.direction_files()
    extracted = extract_stage(
        rt,
        sample.train_val,
        files,
        refusal_ids,
        system=system,
        filter=config.filter_train,
        log=log,
        projection=config.direction_projection,
    )
    if extracted.seconds is not None:
        timings["capture_train"] = extracted.seconds
    selection, seconds = select_stage(
        rt,
        sample.train_val,
        extracted,
        files,
        refusal_ids,
        lang=config.source_lang,
        system=system,
        filter=config.filter_val,
        rule=SelectionRule(config.prune_fraction, config.kl_threshold, config.steering_filter),
        mode=config.selection_mode,
        progress=progress,
        log=log,
    )
    if seconds is not None:
        timings["selection"] = seconds
    direction = extracted.candidates.get(selection.position, selection.layer)  # (n_embd,) float64, unnormalised

    # -- 4. generate --------------------------------------------------------------------------
    detector = SubstringDetector(mode="paper" if config.detector == "paper" else "multilingual")
    interventions = _interventions(direction, selection.layer, config.seed)
    # The fastest exact path: on a GPU the hook costs a device sync per hooked node, so llama.cpp's
    # in-graph adapters (LoRA ablation, control vector) win; on CPU the hook costs ~nothing.
    path = config.steering
    if path == "auto":
        path = "auto" if rt.n_gpu_layers > 0 else "hook"
    routes: dict[str, str] = {}
    t = time.perf_counter()
    record = extracted.prompts
    record.set_test(sample.test)
    record.save(paths.prompts)
    jobs = [
        (interventions[cond], [p for kind in ("harmful", "harmless") for p in kinds.get(kind, [])])
        for cond in config.conditions
        for kinds in sample.test.values()
    ]
    generate_stage(
        rt,
        jobs,
        paths.completions,
        detector,
        max_new_tokens=config.max_new_tokens,
        system=system,
        batch_size=config.n_seq_max,
        progress=progress,
        path=path,
        routes=routes,
    )
    timings["generation"] = time.perf_counter() - t
    completions = configured(read_jsonl(paths.completions), wanted_pairs(record.test, config.conditions))

    # -- 5. measure: judge-free first-token refusal, capability side effects; optional judge -----
    t = time.perf_counter()
    metrics = Metrics(paths.metrics)
    metrics.note_test_prompts(sample.test)
    metrics.note_routes(routes)
    metrics.save()
    measure_first_token_refusal(
        rt, sample.test, interventions, config.conditions, system, metrics.first_token, metrics.save
    )
    if config.capability:
        measure_capability(
            rt,
            data,
            interventions,
            config.conditions,
            config.capability_texts,
            system,
            metrics.capability,
            metrics.save,
        )
    first_token = {lang: metrics.first_token.get(lang, {}) for lang in sample.test}
    capability = {c: metrics.capability[c] for c in config.conditions if c in metrics.capability}
    timings["metrics"] = time.perf_counter() - t
    judged: dict[str, Any] = {}
    if config.judge != "none":
        t = time.perf_counter()
        judged = judge_completions(
            rt,
            completions,
            sample.test,
            judge=config.judge,
            judge_model=config.judge_model,
            translator=config.judge_translator,
            cache_dir=paths.root,
            max_new_tokens=config.max_new_tokens,
            n_seq_max=config.n_seq_max,
            n_gpu_layers=config.n_gpu_layers,
            n_threads=config.n_threads,
            log=log,
        )
        timings["judge"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    # -- 6. results ---------------------------------------------------------------------------
    evaluation = _evaluation_table(
        completions, config.max_new_tokens, config.target_langs, detector.name, first_token, judged, paths
    )
    info = rt.info().to_dict()
    results: dict[str, Any] = {
        "model": info,
        "direction": {
            "source_lang": config.source_lang,
            "layer": selection.layer,
            "position": selection.position,
            "kl": selection.kl,
            "refusal_score": selection.refusal_score,
            "baseline_refusal_score": selection.baseline_refusal_score,
            "steering_score": selection.steering_score,
            "norm": float(np.linalg.norm(direction)),
            "refusal_tokens": {str(i): rt.detokenize([i]) for i in selection.refusal_tokens},
            "rule": asdict(selection.rule),
            "selection_mode": selection.mode,
            "file": paths.direction.name,
            "candidates_file": paths.candidates.name,
            "eoi_tokens": eoi,
        },
        "prompts": record.to_dict(),
        "evaluation": evaluation,
        "steering": {
            "requested": config.steering,
            "used": {c: metrics.steering[c] for c in config.conditions if c in metrics.steering},
        },
        "missing_test_files": sample.missing,
        "short_test_files": sample.short,
        "capability": capability,
        "config": config.to_dict(),
        "versions": {k: v for k, v in build_info().items() if k != "system_info"},
        "timings": {**timings, **{"runtime_" + k: v for k, v in asdict(rt.timings).items() if k != "extra"}},
        # a resumed run keeps the timings of the invocations that did the earlier stages
        "timings_previous": previous_timings(paths.results),
    }
    _write_outputs(results, selection, completions, paths, log)
    return results


def _write_outputs(
    results: dict[str, Any], selection: Selection, completions: Sequence[Completion], paths: RunPaths, log: Log
) -> None:
    """Figures, ``results.json`` and ``report.md`` of a run."""
    from pyrefusal.reporting.plots import plot_run_refusal, plot_selection_heatmaps
    from pyrefusal.reporting.report import write_report

    name = results["model"]["name"]
    heatmap = plot_selection_heatmaps(selection, paths.root / "selection.png", title=f"{name}: candidates")
    results["direction"]["heatmap"] = heatmap.name
    if results["evaluation"]:
        conds = results["config"]["conditions"]
        figure = plot_run_refusal(results["evaluation"], conds, paths.root / "refusal.png", title=name)
        results["figure"] = figure.name
    RunResults(results).save(paths.results)
    write_report(results, completions, paths.report)
    log(f"wrote {paths.results} and {paths.report}")


def rerender(out: Path, *, log: Log = print) -> dict[str, Any]:
    """Rewrite a finished run's ``results.json``, ``report.md`` and figures from its stored files.

    The numbers that come from the completions (refusal rates, intervals, by-budget rates, repetition
    loops) are recomputed with this version of pyrefusal; those that needed the model (first-token
    refusal probability, capability, judge verdicts, the selection) are kept as stored. No model is
    loaded, so it takes seconds: use it after upgrading pyrefusal to get the newer report of an older run.
    """
    paths = RunPaths(Path(out))
    if not paths.results.exists() or not paths.selection.exists():
        raise PyrefusalError(
            f"{paths.root} holds no finished run (results.json and selection.json are written at the end of "
            f"`pyrefusal run`); finish it first with `pyrefusal run --out {paths.root}` (an interrupted run resumes)"
        )
    with RunLock(paths.root):
        stored_results = RunResults.load(paths.results)
        results, cfg = stored_results.data, stored_results.config
        wanted = wanted_pairs(stored_results.test_ids, stored_results.conditions)
        completions = configured(read_jsonl(paths.completions), wanted)
        if wanted and not completions:
            raise PyrefusalError(f"{paths.completions} has none of this run's completions; re-run `pyrefusal run`")
        old = stored_results.evaluation
        first_token = {lang: {c: e.get("first_token_refusal_prob") for c, e in by.items()} for lang, by in old.items()}
        judged = {lang: {c: e["judge"] for c, e in by.items() if e.get("judge")} for lang, by in old.items()}
        stored = [e["detector"] for by in old.values() for e in by.values() if e.get("detector")]
        detector = stored[0] if stored else cfg["detector"]
        results["evaluation"] = _evaluation_table(
            completions, int(cfg["max_new_tokens"]), cfg["target_langs"], detector, first_token, judged, paths
        )
        _write_outputs(results, Selection.load(paths.selection), completions, paths, log)
        return results
