"""Cross-lingual refusal directions: extract one per source language, cross-apply, compare geometry.

This is the experiment of Wang et al. (NeurIPS 2025, docs/method.md §7): a refusal direction r_X is
extracted from prompts in source language X (§3, §4) and ablated while the model answers harmful
prompts in target language Y. If refusal is mediated by one shared direction, ablating r_X
removes refusal in every Y. The stages:

1. **Refusal tokens for any language** (:func:`derive_refusal_tokens`). The paper hard-codes the
   first tokens of refusals for 8 languages (§4.1). Here they are measured instead: generate a few
   greedy tokens for harmful train prompts, keep the responses a refusal detector flags, count
   their first generated token. The paper's table for the model's family
   (:data:`pyrefusal.method.selection.PAPER_REFUSAL_OPENINGS`, else :data:`pyrefusal.method.selection.REFUSAL_OPENINGS`)
   is the fallback, and explicit openings override both.
2. **One direction per source language** (:func:`extract_language_directions`): the pipeline's
   stages 2-3 (capture at the post-instruction positions, filter by refusal score, difference
   in means, lazy selection) with that language's prompts and refusal tokens. Everything is
   saved per language under ``directions/<lang>/``, so an interrupted run resumes.
3. **Transfer matrix** (:func:`transfer_matrix`): refusal rate on each target's harmful test
   prompts (the same rows in every language) with each source's direction ablated, plus the
   unmodified baseline. Completions go to a JSONL file as they are made; a re-run skips finished
   (source, target, prompt) triples.
4. **Geometry** (docs/method.md §7.4, *our design*, an extension rather than a replicated number):
   cosine of r_X and r_Y layer by layer (:func:`cosine_by_layer`), cosine of the selected
   directions (:func:`selected_cosines`), a 2-D PCA of per-prompt activations
   (:func:`pca_activations`), and projections onto the English direction (:func:`projection_on`).
5. :func:`write_transfer_report` and :func:`run_transfer`, which chains everything and writes
   ``transfer.json``.

Output layout of :func:`run_transfer` (``out/``)::

    config.json                      the TransferConfig (a resumed run must match it)
    directions/<lang>/               refusal_tokens.json, prompts.json, candidates.npz,
                                     activations.npz, selection.json, direction.npy
    completions.jsonl                every transfer completion (condition "baseline" or
                                     "<condition>:<source>")
    transfer.json, report.md, *.png
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pyrefusal.common import Log, Progress
from pyrefusal.data.embedded import resolve_data_source
from pyrefusal.data.polyrefuse import PolyRefuse
from pyrefusal.errors import DataError
from pyrefusal.method.refusal import RefusalDetector, SubstringDetector
from pyrefusal.method.selection import SelectionRule
from pyrefusal.reporting.transfer_report import write_transfer_report
from pyrefusal.rundir import RunLock, previous_timings, write_atomic, write_config
from pyrefusal.runtime import ModelRunner
from pyrefusal.settings import TransferConfig
from pyrefusal.stages.crossapply import CONTROL_ROW, TransferResult, condition_name, quiet, transfer_matrix
from pyrefusal.stages.direction import LanguageDirection, extract_direction, load_language_directions
from pyrefusal.stages.generate import substring_detector
from pyrefusal.stages.geometry import (
    PCAResult,
    compare_directions,
    cosine_by_layer,
    pca_activations,
    projection_on,
    selected_cosines,
    train_activations_at,
)
from pyrefusal.stages.layout import DirectionFiles
from pyrefusal.stages.results import recorded_versions, runtime_timings, strict_json
from pyrefusal.stages.sample import sample_test_prompts, sample_train_val
from pyrefusal.stages.shards import Shards
from pyrefusal.stages.tokens import (
    RefusalTokens,
    count_first_tokens,
    derive_refusal_tokens,
    language_refusal_tokens,
    pick_refusal_tokens,
    table_refusal_tokens,
)

if TYPE_CHECKING:  # the cluster layer (and Ray) load only with --ray
    from pyrefusal.cluster.pool import ClusterSpec

__all__ = [
    "CONTROL_ROW",
    "LanguageDirection",
    "PCAResult",
    "RefusalTokens",
    "TransferResult",
    "condition_name",
    "cosine_by_layer",
    "count_first_tokens",
    "derive_refusal_tokens",
    "extract_language_directions",
    "load_language_directions",
    "pca_activations",
    "pick_refusal_tokens",
    "projection_on",
    "run_transfer",
    "sample_test_prompts",
    "selected_cosines",
    "table_refusal_tokens",
    "train_activations_at",
    "transfer_matrix",
    "write_transfer_report",
]


"""Interventions :func:`transfer_matrix` can apply with a source direction."""


# =========================================================================================
# 1. One direction per source language (refusal tokens, extract, select)
# =========================================================================================


def extract_language_directions(
    runtime: ModelRunner,
    data: PolyRefuse,
    langs: Sequence[str],
    *,
    n_train: int,
    n_val: int,
    seed: int = 1,
    filter: bool = True,
    system: str | None = None,
    selection_rule: SelectionRule | None = None,
    progress: Progress | None = None,
    out_dir: Path | None = None,
    refusal_tokens: Mapping[str, RefusalTokens] | None = None,
    token_method: Literal["derive", "table"] = "derive",
    openings: Mapping[str, Sequence[str]] | None = None,
    detector: RefusalDetector | None = None,
    n_token_probe: int = 32,
    token_max_new_tokens: int = 8,
    keep_activations: bool = True,
    log: Log = quiet,
    shards: Shards | None = None,
) -> dict[str, LanguageDirection]:
    """Extract and select a refusal direction for every language in ``langs``.

    Per language X: paper sampling (:func:`pyrefusal.data.polyrefuse.paper_sample`, seed ``seed``); refusal
    tokens of X (``refusal_tokens[X]`` if given, else ``openings[X]``, else derived or the table per
    ``token_method``); capture of the block inputs ``0..L-1`` at the post-instruction positions;
    filtering (harmful s > 0, harmless s < 0 under X's tokens, train and val; unfiltered below
    :data:`~pyrefusal.stages.extract.MIN_FILTERED`); :func:`~pyrefusal.method.directions.mean_difference`;
    :func:`~pyrefusal.stages.select.select_direction` (lazy, exact paper top-1).

    With ``out_dir``, each language is saved to ``out_dir/<lang>/`` stage by stage, and files already
    there are reused (resume). The caller must make sure they came from the same settings
    (:func:`run_transfer` checks its ``config.json``).

    Args:
        runtime: a :class:`pyrefusal.runtime.runtime.Runtime`.
        data: PolyRefuse.
        langs: source languages.
        n_train / n_val / seed: paper sampling sizes and seed.
        filter: filter train and val prompts by refusal score.
        system: system prompt (``None`` = template default).
        selection_rule: filters (default: the paper's).
        progress: ``progress(stage, done, total)``; stages are prefixed with the language.
        out_dir: where to save / resume per-language results.
        refusal_tokens: precomputed tokens per language (take precedence).
        token_method: ``"derive"`` (measure; table fallback) or ``"table"`` (the paper-style table).
        openings: explicit refusal openings per language (override).
        detector: judges refusals when deriving tokens (default multilingual substrings).
        n_token_probe / token_max_new_tokens: prompts and tokens generated to derive tokens.
        keep_activations: keep per-prompt train activations (float16) for PCA and projections.
        log: message sink.
        shards: spread capture and selection over model replicas (``--ray``); None: this process.

    Returns:
        ``{lang: LanguageDirection}`` in ``langs`` order.

    Raises:
        PyrefusalError: unknown language, or selection found no candidate.
    """
    rule = selection_rule or SelectionRule()
    detector = detector or SubstringDetector()
    out: dict[str, LanguageDirection] = {}
    for lang in langs:
        if lang not in data.languages():
            raise DataError(f"source language {lang!r} has no files in {data.root}; available: {data.languages()}")
        files = DirectionFiles.language(out_dir / lang) if out_dir is not None else None
        if files is not None:
            files.root.mkdir(parents=True, exist_ok=True)
        prog = (lambda s, i, n, _l=lang: progress(f"{_l}: {s}", i, n)) if progress else None
        toks = language_refusal_tokens(
            runtime,
            data,
            lang,
            files.refusal_tokens if files is not None else None,
            given=(refusal_tokens or {}).get(lang),
            openings=(openings or {}).get(lang),
            token_method=token_method,
            detector=detector,
            n_token_probe=n_token_probe,
            token_max_new_tokens=token_max_new_tokens,
            seed=seed,
            system=system,
            log=log,
        )
        tv = sample_train_val(data, lang, n_train=n_train, n_val=n_val, seed=seed)
        out[lang] = extract_direction(
            runtime,
            lang,
            tv,
            toks,
            files,
            system=system,
            filter=filter,
            rule=rule,
            keep_activations=keep_activations,
            progress=prog,
            log=log,
            shards=shards,
        )
    return out


# =========================================================================================
# 2. The whole experiment
# =========================================================================================


def _check_config(out: Path, config: TransferConfig, force: bool) -> None:
    """Refuse an ``out`` that holds a transfer run of other settings (the resumable ones, declared by
    :class:`pyrefusal.settings.TransferSettings`, may differ); with ``force`` clear its results."""
    new = config.check_directory(out, what="transfer run", force=force)
    if force:
        for name in ("completions.jsonl", "transfer.json", "report.md"):
            (out / name).unlink(missing_ok=True)
        ddir = out / "directions"
        if ddir.exists():
            for f in sorted(ddir.glob("*/*")):
                f.unlink()
    write_config(out, new)


def run_transfer(
    config: TransferConfig,
    out: Path,
    log: Log = print,
    progress: Progress | None = None,
    *,
    force: bool = False,
    plots: bool = True,
    cluster: ClusterSpec | None = None,
) -> dict[str, Any]:
    """Run (or resume) the cross-lingual experiment; returns the dict written to ``transfer.json``.

    Chains: refusal tokens and a direction per source language (:func:`extract_language_directions`,
    saved under ``out/directions/``), the transfer matrix (:func:`transfer_matrix`, completions in
    ``out/completions.jsonl``), geometry (cosines, PCA, projections on the English direction, or on
    the first source's when English is not a source), figures (:mod:`pyrefusal.reporting.plots`) and
    ``report.md``.

    Args:
        config: the settings.
        out: output directory (created; resumed when it holds a run with the same settings, where
            sources/targets may differ: finished languages and completions are reused).
        log: message sink.
        progress: ``progress(stage, done, total)``.
        force: delete previous results in ``out`` first.
        plots: write the PNG figures.
        cluster: run extraction, selection and the transfer generations on model replicas in a Ray cluster
            (``--ray``); the same files, written by this process only.

    Raises:
        PyrefusalError: settings clash with ``out``, unknown languages/condition, or selection fails.
    """
    from pyrefusal.reporting.plots import plot_transfer_figures
    from pyrefusal.runtime import Runtime

    config.validate()  # choices, and at least one source and one target language
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        data_dir = resolve_data_source(config.data_dir).path  # --data-dir, $PYREFUSAL_DATA_DIR, fetched, embedded
        data = PolyRefuse(data_dir)
        available = data.languages()  # raises a DataError with a fix when the directory is empty
        unknown = [x for x in (*config.sources, *config.targets) if x not in available]
        if unknown:
            raise DataError(f"language(s) {unknown} have no files in {data_dir}; available: {available}")
        _check_config(out, config, force)

        timings: dict[str, float] = {}
        t_all = time.perf_counter()
        t = time.perf_counter()
        rt = Runtime.for_study(config, log=log)  # fails on an unknown graph before any extraction
        timings["load_model"] = time.perf_counter() - t
        detector = substring_detector(config.detector)
        shards = None
        try:
            if cluster is not None:
                from pyrefusal.cluster.pool import RayShards  # imports Ray: only with --ray

                shards = RayShards(config, cluster, sha256=rt.sha256, log=log)
            t = time.perf_counter()
            directions = extract_language_directions(
                rt,
                data,
                config.sources,
                n_train=config.n_train,
                n_val=config.n_val,
                seed=config.seed,
                filter=config.filter,
                system=config.system_prompt,
                selection_rule=SelectionRule(config.prune_fraction, config.kl_threshold, config.steering_filter),
                progress=progress,
                out_dir=out / "directions",
                token_method=config.token_method,
                openings=config.refusal_openings,
                detector=detector,
                n_token_probe=config.n_token_probe,
                token_max_new_tokens=config.token_max_new_tokens,
                keep_activations=config.keep_activations,
                log=log,
                shards=shards,
            )
            timings["directions"] = time.perf_counter() - t
            t = time.perf_counter()
            transfer = transfer_matrix(
                rt,
                directions,
                data,
                config.targets,
                n_test=config.n_test,
                max_new_tokens=config.max_new_tokens,
                detector=detector,
                condition=config.condition,
                completions_path=out / "completions.jsonl",
                seed=config.seed,
                system=config.system_prompt,
                batch_size=config.n_seq_max,
                progress=progress,
                log=log,
                control=config.random_control,
                shards=shards,
            )
            timings["transfer"] = time.perf_counter() - t
            info = rt.info().to_dict()
            runner_timings = runtime_timings(rt)
        finally:
            if shards is not None:
                shards.close()
            rt.close()

        geometry = compare_directions(directions, "en" if "en" in directions else next(iter(directions)))
        result: dict[str, Any] = {
            "model": info,
            "config": config.to_dict(),
            "transfer": transfer.to_dict(),
            "directions": {s: ld.summary() for s, ld in directions.items()},
            "geometry": geometry.to_dict(),
            "figures": {},
            "versions": recorded_versions(),
        }
        if plots:
            t = time.perf_counter()
            result["figures"] = plot_transfer_figures(out, directions, transfer, geometry)
            timings["plots"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_all
        result["timings"] = {**timings, **runner_timings}
        # a resumed run keeps the timings of the invocations that did the earlier work
        result["timings_previous"] = previous_timings(out / "transfer.json")
        result = strict_json(result)
        write_atomic(out / "transfer.json", json.dumps(result, indent=1, ensure_ascii=False))
        report = write_transfer_report(result, out)
        log(f"wrote {out / 'transfer.json'} and {report}")
        return result
