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
5. results (:func:`pyrefusal.stages.results.assemble_results` -> :class:`~pyrefusal.results.RunResults`) ->
   ``results.json``, ``report.md`` and figures (:func:`pyrefusal.reporting.report.write_run_outputs`)

Only this module and the CLI know the whole flow; stage modules stay independent.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyrefusal.common import Log, Progress
from pyrefusal.data.embedded import DataSource, resolve_data_source
from pyrefusal.data.polyrefuse import PolyRefuse
from pyrefusal.errors import DataError, PyrefusalError
from pyrefusal.method import intervention as iv
from pyrefusal.method.selection import Selection, SelectionRule, refusal_token_ids
from pyrefusal.reporting.report import write_run_outputs
from pyrefusal.results import RunResults
from pyrefusal.rundir import RunLock, write_atomic, write_config
from pyrefusal.runtime import Runtime
from pyrefusal.settings import CONDITIONS, RunConfig  # noqa: F401  (CONDITIONS: importable from here as before)
from pyrefusal.stages.extract import extract_stage
from pyrefusal.stages.generate import configured, generate_stage, read_jsonl, substring_detector, wanted_pairs
from pyrefusal.stages.judge import judge_completions
from pyrefusal.stages.layout import RunPaths
from pyrefusal.stages.measure import Metrics, measure_capability, measure_fallback_refusal, measure_first_token_refusal
from pyrefusal.stages.results import assemble_results, evaluation_table
from pyrefusal.stages.sample import sample_prompts
from pyrefusal.stages.select import select_stage
from pyrefusal.stages.shards import ReplicaModel, Replicas, Shards

if TYPE_CHECKING:  # the cluster layer (and Ray) load only with --ray
    from pyrefusal.cluster.pool import ClusterSpec


def _prepare_dir(paths: RunPaths, config: RunConfig, force: bool) -> None:
    """Refuse a directory that holds a run of another configuration; with ``force`` clear it."""
    config.check_directory(paths.root, what="run", force=force)
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


def run_pipeline(
    config: RunConfig,
    out: Path,
    *,
    force: bool = False,
    log: Log = print,
    progress: Progress | None = None,
    cluster: ClusterSpec | None = None,
) -> dict[str, Any]:
    """Run (or resume) the whole job; returns the results dict written to ``results.json``.

    With ``cluster`` (``--ray``), extraction, selection, generation, metrics, back-translation and judging run on
    model replicas in a Ray cluster (:mod:`pyrefusal.cluster`): the study model's, then, for judging, the guard's and
    a translation model's (the study's replicas are stopped first, to free their CPUs or GPUs). The run directory
    gets the same files, written by this process only, and either executor resumes it.
    """

    config.validate()
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    paths = RunPaths(Path(out))
    with RunLock(paths.root):
        _prepare_dir(paths, config, force)

        source = resolve_data_source(config.data_dir)  # --data-dir, $PYREFUSAL_DATA_DIR, fetched, embedded
        log(f"data: {source.describe()}")
        data_dir = source.path
        data = PolyRefuse(data_dir)
        available = data.languages()  # raises a DataError with a fix when the directory is empty
        for lang in (config.source_lang, *config.target_langs):
            if lang not in available:
                raise DataError(f"language {lang!r} has no files in {data_dir}; available: {available}")

        t = time.perf_counter()
        rt = Runtime.for_study(config, log=log)  # fails on an unknown graph before hours of extraction
        timings["load_model"] = time.perf_counter() - t
        shards = None
        replicas: Replicas | None = None
        try:
            _check_model(paths, rt.sha256)
            if cluster is not None:
                from pyrefusal.cluster.pool import RayShards  # imports Ray: only with --ray

                study = shards = RayShards(config, cluster, sha256=rt.sha256, log=log)

                def replicas(model: ReplicaModel) -> RayShards:
                    study.close()  # the guard's or translator's replicas take the study replicas' CPUs or GPUs
                    return RayShards(model, cluster, log=log)

            return _run(rt, data, config, paths, timings, t_all, log, progress, source, shards, replicas)
        finally:
            if shards is not None:
                shards.close()
            rt.close()


def _run(
    rt: Runtime,
    data: PolyRefuse,
    config: RunConfig,
    paths: RunPaths,
    timings: dict[str, float],
    t_all: float,
    log: Log,
    progress: Progress | None,
    source: DataSource | None = None,
    shards: Shards | None = None,
    replicas: Replicas | None = None,
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
        shards=shards,
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
        shards=shards,
    )
    if seconds is not None:
        timings["selection"] = seconds
    direction = extracted.candidates.get(selection.position, selection.layer)  # (n_embd,) float64, unnormalised

    # -- 4. generate --------------------------------------------------------------------------
    detector = substring_detector(config.detector)
    blind = [lang for lang in config.target_langs if not detector.covers(lang)]
    if blind:
        log(
            f"warning: the {detector.name} refusal detector has no phrases for {', '.join(blind)}: it only sees "
            "refusals worded in the languages it knows, so its refusal rates there can read ~0% while the model "
            "refuses. Their refusal rates come from the first-token detector instead (first token among those "
            "the model's own refusals start with; the blind substring rates stay under 'substring', "
            "first_token_refusal_prob beside them); add --judge for a judge. results.json lists them under "
            "detector_blind_languages"
        )
    interventions = iv.paper_conditions(direction, selection.layer, seed=config.seed)
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
        shards=shards,
    )
    timings["generation"] = time.perf_counter() - t
    completions = configured(read_jsonl(paths.completions), wanted_pairs(record.test, config.conditions))

    # -- 5. measure: judge-free first-token refusal, capability side effects; optional judge -----
    t = time.perf_counter()
    log(
        "metrics: first-token refusal probability per language and condition"
        + (", perplexity and first-token KL per condition (--no-capability skips them)" if config.capability else "")
    )
    metrics = Metrics(paths.metrics)
    metrics.note_test_prompts(sample.test)
    metrics.note_routes(routes)
    metrics.save()
    measure_first_token_refusal(
        rt, sample.test, interventions, config.conditions, system, metrics.first_token, metrics.save, shards
    )
    if blind:  # issue 15: where the substring detector is blind, the first-token detector makes the refusal rates
        measure_fallback_refusal(rt, data, sample.test, blind, interventions, config, detector, metrics, log)
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
            shards,
        )
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
            shards=shards,
            replicas=replicas,
        )
        timings["judge"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    # -- 6. results -------------------------------------------------------------------------
    results = assemble_results(
        rt,
        config,
        paths,
        sample=sample,
        prompts=record,
        selection=selection,
        direction=direction,
        eoi=eoi,
        completions=completions,
        detector_name=detector.name,
        metrics=metrics,
        judged=judged,
        timings=timings,
    )
    if source is not None:
        results.data["data_source"] = source.to_dict()  # which PolyRefuse copy was read (DataSource)
    if blind:  # only when there are some, so runs on covered languages keep their results.json as before
        results.data["detector_blind_languages"] = blind
    write_run_outputs(results, selection, completions, paths, log)
    return results.data


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
        results = RunResults.load(paths.results)
        settings = results.settings
        wanted = wanted_pairs(results.test_ids, results.conditions)
        completions = configured(read_jsonl(paths.completions), wanted)
        if wanted and not completions:
            raise PyrefusalError(f"{paths.completions} has none of this run's completions; re-run `pyrefusal run`")
        old = results.evaluation
        first_token = {lang: {c: e.get("first_token_refusal_prob") for c, e in by.items()} for lang, by in old.items()}
        judged = {lang: {c: e["judge"] for c, e in by.items() if e.get("judge")} for lang, by in old.items()}
        stored = [e.get("substring", e)["detector"] for by in old.values() for e in by.values() if e.get("detector")]
        detector = stored[0] if stored else settings.detector
        # the first-token detector's cells of languages the substring detector is blind to (issue 15), as stored
        fallback = {
            lang: {c: e["first_token_detector"] for c, e in by.items() if "first_token_detector" in e}
            for lang, by in old.items()
        }
        results.evaluation = evaluation_table(
            completions, settings.max_new_tokens, settings.target_langs, detector, first_token, judged, paths, fallback
        )
        write_run_outputs(results, Selection.load(paths.selection), completions, paths, log)
        return results.data
