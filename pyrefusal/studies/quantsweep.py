"""`pyrefusal quant-sweep`: does the refusal direction survive quantization?

One model is turned into variants at several llama.cpp file types (``llama_model_quantize``). For every
variant the refusal direction is extracted and selected with the pipeline's stages (capture at the
post-instruction positions, filter by refusal score, difference in means, lazy paper-rule selection), and
then every variant's direction is ablated in every variant (cross-application) while it answers harmful
English test prompts. The questions: is the direction the same one (cosine at the same position and layer,
cosine of the selected directions), is the same candidate selected, and does a direction found in one
precision remove refusal in another?

Requantization. Most GGUF models are distributed already quantized (the default model is Q4_K_M). Making a
Q8_0 from it is not the Q8_0 of the original weights: it re-encodes the Q4_K_M values (an upcast adds no
information back), and a lower type compounds two roundings. llama.cpp refuses this unless asked; so does
this module: ``allow_requantize=True`` (``--allow-requantize``) is required, and every such variant is
labelled "requantized from <base type>, not from original weights" in the outputs.

Layout. ``out/`` (small, meant to be kept)::

    config.json                     the QuantSweepConfig (a resumed sweep must match it)
    variants/<TYPE>.json            file facts + selection summary of one variant (written when it finishes)
    variants/<TYPE>.direction.npy   its selected raw direction, float32 (n_embd,)
    variants/<TYPE>.selection.json  every candidate's scores
    completions/<TYPE>.jsonl        greedy completions of that variant (baseline and "ablation:<SOURCE>")
    quant_sweep.json, report.md, quant_sweep.png, cosine_by_layer.png

``work_dir`` (large, default ``<cache>/quant-sweep/<model sha256[:12]>``): the variant GGUF files
(``<TYPE>.gguf``, shared by every sweep of the model) and, under ``extract-<settings hash>/<TYPE>/``, the
extraction files (candidates.npz, prompts.json, refusal_tokens.json, selection.json). Both directories are
reused on a re-run: finished variants, extractions and completions are skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pyrefusal.common import Log, Progress
from pyrefusal.data.embedded import resolve_data_source
from pyrefusal.data.polyrefuse import PolyRefuse
from pyrefusal.errors import DataError, PyrefusalError
from pyrefusal.reporting.quant_report import write_quant_report
from pyrefusal.rundir import RunLock, write_atomic, write_config
from pyrefusal.settings import DEFAULT_TYPES, QuantSweepConfig
from pyrefusal.stages.crossapply import quiet, transfer_matrix
from pyrefusal.stages.direction import LanguageDirection
from pyrefusal.stages.generate import substring_detector
from pyrefusal.stages.results import recorded_versions
from pyrefusal.stages.variants import (
    Variant,
    extract_variant_direction,
    load_variant_direction,
    make_variant,
    sweep_results,
)
from pyrefusal.steering.merge import FLOAT_FTYPES, ftype_name, parse_ftype

if TYPE_CHECKING:  # the cluster layer (and Ray) load only with --ray
    from pyrefusal.cluster.pool import ClusterSpec

__all__ = ["DEFAULT_TYPES", "QuantSweepConfig", "run_quant_sweep", "write_quant_report"]


def _settings_key(config: QuantSweepConfig) -> str:
    """Short hash of the settings that determine an extraction (names its directory in the work dir)."""
    d = {k: v for k, v in config.to_dict().items() if k not in config.resumable_keys()}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def _check_config(out: Path, config: QuantSweepConfig, force: bool) -> None:
    new = config.check_directory(out, what="sweep", force=force)
    if force:
        for sub in ("variants", "completions"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for name in ("quant_sweep.json", "report.md", "quant_sweep.png", "cosine_by_layer.png"):
            (out / name).unlink(missing_ok=True)
    write_config(out, new)


# --- the sweep ------------------------------------------------------------------------------


def run_quant_sweep(
    config: QuantSweepConfig,
    out: Path,
    log: Log = print,
    progress: Progress | None = None,
    *,
    force: bool = False,
    cluster: ClusterSpec | None = None,
) -> dict[str, Any]:
    """Make the variants, extract a direction in each, cross-apply them and write the report.

    With ``cluster`` (``--ray``) the variants are parallel jobs on a Ray cluster: each job makes its variant
    (from the model resolved on its own node), extracts its direction, and later answers the test prompts under
    every direction; this process writes every file of ``out``.

    Args:
        config: the sweep.
        out: output directory (small files: JSON, Markdown, PNG, completions); resumed when it exists.
        log: message sink.
        progress: ``progress(stage, done, total)``.
        force: start over in ``out`` (variant GGUFs in the work directory are kept).
        cluster: run the variants as parallel jobs on a Ray cluster.

    Returns:
        The dict written to ``quant_sweep.json``.

    Raises:
        PyrefusalError: unknown file types, requantization without ``allow_requantize``, missing data, or
            ``out`` holding a sweep with other settings.
    """
    from pyrefusal.data.registry import cache_dir, cached_sha256, resolve_model
    from pyrefusal.runtime.validate import validate_model_file

    config.validate()  # choices, before any file is made
    t_all = time.perf_counter()
    out = Path(out)
    names = [ftype_name(parse_ftype(t)) for t in config.types]  # validates every type up front
    if len(set(names)) != len(names):
        raise PyrefusalError(f"file types repeat in {list(config.types)}; list each once")
    resolved = resolve_model(config.model)
    base = Path(resolved.path)
    validate_model_file(base)  # hardening: llama.cpp aborts on impossible hyper-parameters when quantizing
    base_ftype = _file_type(base)
    requant = [n for n in names if parse_ftype(n) != base_ftype] if base_ftype not in FLOAT_FTYPES else []
    if requant and not config.allow_requantize:
        raise PyrefusalError(
            f"{base.name} is already quantized ({ftype_name(base_ftype)}); making {requant} from it requantizes "
            "the quantized weights (not the original ones), so those variants measure quantizing twice. Pass "
            "allow_requantize=True (--allow-requantize) to do it anyway (the report says so), or start from an "
            "F16/BF16/F32 GGUF of the model."
        )
    sha = resolved.sha256 or cached_sha256(base)
    work = Path(config.work_dir) if config.work_dir else cache_dir() / "quant-sweep" / sha[:12]
    extractions = work / f"extract-{_settings_key(config)}"  # per-variant extraction files of these settings
    with RunLock(out):
        _check_config(out, config, force)
        if force:
            shutil.rmtree(extractions, ignore_errors=True)
        extractions.mkdir(parents=True, exist_ok=True)
        (out / "variants").mkdir(exist_ok=True)
        (out / "completions").mkdir(exist_ok=True)
        data = PolyRefuse(resolve_data_source(config.data_dir).path)  # --data-dir, env, fetched, embedded
        if config.source_lang not in data.languages():
            raise DataError(
                f"language {config.source_lang!r} has no PolyRefuse files in {data.root}; run `pyrefusal data fetch` "
                "or pass --data-dir"
            )
        log(f"model {base.name} ({ftype_name(base_ftype)}); variants {names}; work files in {work}")

        # -- 1. variants and their directions (each saved as soon as it finishes) -------------------
        variants: dict[str, Variant] = {}
        directions: dict[str, LanguageDirection] = {}
        todo = [n for n in names if not (out / "variants" / f"{n}.json").exists()]
        if cluster is not None and todo:  # the variants' extractions as parallel jobs
            from pyrefusal.cluster.pool import run_jobs  # imports Ray: only with --ray

            jconfig = _job_config(config, cluster)
            jobs = [(config.model, n, jconfig, work, extractions) for n in todo]
            for i, (v, ld) in run_jobs(variant_job, jobs, cluster, threads=jconfig.n_threads, log=log, label="variant"):
                _record_variant(out, extractions, todo[i], v, ld)
        for name in names:
            vpath = out / "variants" / f"{name}.json"
            if vpath.exists():
                variants[name] = Variant(**json.loads(vpath.read_text()))
                log(f"{name}: reusing {vpath.name} ({variants[name].status})")
            else:
                v = make_variant(base, base_ftype, name, work, config, log)
                ld = (
                    extract_variant_direction(v, data, config, extractions, log, progress) if v.status == "ok" else None
                )
                variants[name] = _record_variant(out, extractions, name, v, ld)
            if variants[name].status == "ok":
                ld = load_variant_direction(extractions, name)
                if ld is None:
                    raise PyrefusalError(
                        f"{out / 'variants' / (name + '.json')} says {name} has a direction but {extractions / name} "
                        "lacks its files (another work_dir?). Pass the same work_dir, or force=True to redo the sweep."
                    )
                directions[name] = ld

        # -- 2. cross-application: every direction ablated in every variant ------------------------
        cross: dict[str, dict[str, Any]] = {}
        runnable = [n for n in names if variants[n].status != "failed"]
        if cluster is not None:
            from pyrefusal.cluster.pool import run_jobs  # imports Ray: only with --ray

            jconfig = _job_config(config, cluster)
            jobs = [(jconfig, variants[n], directions, _completions_text(out, n)) for n in runnable]
            for i, (res, text) in run_jobs(
                cross_job, jobs, cluster, threads=jconfig.n_threads, log=log, label="cross-application"
            ):
                name = runnable[i]
                write_atomic(out / "completions" / f"{name}.jsonl", text)
                cross[name] = res
                variants[name].seconds["cross_application"] = res.pop("seconds")
        for i, name in enumerate(n for n in runnable if n not in cross):
            t = time.perf_counter()
            log(f"{name}: answering {config.n_test} harmful test prompts, baseline + {len(directions)} directions")
            cross[name] = _cross_apply(
                config,
                variants[name],
                data,
                directions,
                out / "completions" / f"{name}.jsonl",
                (lambda s, k, n, _m=name: progress(f"{_m}: {s}", k, n)) if progress else None,
            )
            variants[name].seconds["cross_application"] = time.perf_counter() - t
            if progress:
                progress("variants cross-applied", i + 1, len(runnable))
        cross = {n: cross[n] for n in runnable}  # the variants' order, whichever finished first

        # -- 3. geometry, results, report ------------------------------------------------------------
        results = sweep_results(config, resolved, base, base_ftype, variants, directions, cross, work)
        results["versions"] = recorded_versions()
        results["seconds_total"] = time.perf_counter() - t_all
        (out / "quant_sweep.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
        write_quant_report(results, out)
        log(f"wrote {out / 'quant_sweep.json'} and {out / 'report.md'} in {results['seconds_total']:.0f}s")
        return results


def _record_variant(out: Path, extractions: Path, name: str, v: Variant, ld: LanguageDirection | None) -> Variant:
    """Write what a variant's extraction produced: ``variants/<TYPE>.json`` (+ direction and selection), and its
    extraction files under ``extractions/<TYPE>/`` when a job on another node made them there."""
    if ld is not None:
        v.selection = ld.summary()
        np.save(out / "variants" / f"{name}.direction.npy", ld.direction.astype(np.float32))
        ld.selection.save(out / "variants" / f"{name}.selection.json")
        if load_variant_direction(extractions, name) is None:
            ld.save(extractions / name)
    (out / "variants" / f"{name}.json").write_text(json.dumps(v.to_dict(), indent=1))
    return v


def _cross_apply(
    config: QuantSweepConfig,
    variant: Variant,
    data: PolyRefuse,
    directions: dict[str, LanguageDirection],
    completions: Path,
    progress: Progress | None,
) -> dict[str, Any]:
    """Every direction ablated in ``variant`` on the source language's harmful test prompts (the transfer matrix)."""
    from pyrefusal.runtime import Runtime

    with Runtime(variant.path, n_ctx=config.n_ctx, n_seq_max=config.n_seq_max, n_threads=config.n_threads) as rt:
        res = transfer_matrix(
            rt,
            directions,
            data,
            [config.source_lang],
            n_test=config.n_test,
            max_new_tokens=config.max_new_tokens,
            detector=substring_detector(config.detector),
            completions_path=completions,
            seed=config.seed,
            batch_size=config.n_seq_max,
            progress=progress,
        )
    return res.to_dict()


def _job_config(config: QuantSweepConfig, cluster: ClusterSpec) -> QuantSweepConfig:
    """The settings a Ray job runs with: as many llama.cpp threads as CPUs it reserves (1 unless --threads)."""
    return dataclasses.replace(config, n_threads=cluster.threads or config.n_threads or 1)


def _completions_text(out: Path, name: str) -> str:
    path = out / "completions" / f"{name}.jsonl"
    return path.read_text(encoding="utf-8") if path.exists() else ""


def _variant_on_node(model: str, name: str, config: QuantSweepConfig, work: Path) -> Variant:
    """The variant GGUF on this node: made from the model resolved here (registry, cache or path) if missing."""
    from pyrefusal.data.registry import resolve_model

    base = Path(resolve_model(model).path)
    return make_variant(base, _file_type(base), name, work, config, quiet)


def _file_type(path: Path) -> int | None:
    """``general.file_type`` of a GGUF (None when it does not say)."""
    from pyrefusal.steering.export import read_gguf_header

    raw = read_gguf_header(path).kv.get("general.file_type")
    return int(raw) if raw is not None else None


def variant_job(
    model: str, name: str, config: QuantSweepConfig, work: Path, extractions: Path
) -> tuple[Variant, LanguageDirection | None]:
    """Ray job (``--ray``): make one variant on the worker's node and extract its direction; returns both for the
    driver to record (:func:`_record_variant`)."""
    v = _variant_on_node(model, name, config, work)
    if v.status != "ok":
        return v, None
    data = PolyRefuse(resolve_data_source(config.data_dir).path)
    return v, extract_variant_direction(v, data, config, extractions, quiet, None)


def cross_job(
    config: QuantSweepConfig, variant: Variant, directions: dict[str, LanguageDirection], done: str
) -> tuple[dict[str, Any], str]:
    """Ray job (``--ray``): the cross-application of one variant on the worker's node, resuming from the driver's
    completions file text ``done``; returns the transfer matrix (with ``seconds``) and the whole file's new text."""
    import tempfile

    t = time.perf_counter()
    if not Path(variant.path).exists():  # another node made it: make it here too (deterministic quantization)
        variant = _variant_on_node(config.model, variant.type, config, Path(variant.path).parent)
    data = PolyRefuse(resolve_data_source(config.data_dir).path)
    with tempfile.TemporaryDirectory(prefix="pyrefusal-cross-") as tmp:
        path = Path(tmp) / "completions.jsonl"
        path.write_text(done, encoding="utf-8")
        res = _cross_apply(config, variant, data, directions, path, None)
        text = path.read_text(encoding="utf-8")
    return {**res, "seconds": time.perf_counter() - t}, text
