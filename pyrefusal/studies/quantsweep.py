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

import hashlib
import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyrefusal.data.polyrefuse import PolyRefuse, default_data_dir
from pyrefusal.errors import DataError, PyrefusalError
from pyrefusal.method.refusal import SubstringDetector
from pyrefusal.method.selection import SelectionError, SelectionRule
from pyrefusal.reporting.quant_report import write_quant_report
from pyrefusal.rundir import RunLock, check_config, write_config
from pyrefusal.settings import DEFAULT_TYPES, QuantSweepConfig
from pyrefusal.stages.crossapply import transfer_matrix
from pyrefusal.stages.direction import LanguageDirection, extract_direction
from pyrefusal.stages.extract import post_instruction_positions
from pyrefusal.stages.geometry import cosine_by_layer, selected_cosines
from pyrefusal.stages.layout import DirectionFiles
from pyrefusal.stages.sample import sample_train_val
from pyrefusal.stages.tokens import table_refusal_tokens
from pyrefusal.steering.merge import FLOAT_FTYPES, MergeError, ftype_name, parse_ftype, quantize_gguf

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]

__all__ = ["DEFAULT_TYPES", "QuantSweepConfig", "run_quant_sweep", "write_quant_report"]


def _settings_key(config: QuantSweepConfig) -> str:
    """Short hash of the settings that determine an extraction (names its directory in the work dir)."""
    d = {k: v for k, v in config.to_dict().items() if k not in config.resumable_keys()}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def _check_config(out: Path, config: QuantSweepConfig, force: bool) -> None:
    # resumable: declared by the fields of pyrefusal.settings.QuantSweepSettings. As before, no defaults: a key
    # missing from an older sweep's config.json counts as a changed setting.
    new = check_config(
        out,
        config.to_dict(),
        what="sweep",
        force=force,
        resumable=config.resumable_keys(),
        options=config.option_names(),
    )
    if force:
        for sub in ("variants", "completions"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for name in ("quant_sweep.json", "report.md", "quant_sweep.png", "cosine_by_layer.png"):
            (out / name).unlink(missing_ok=True)
    write_config(out, new)


# --- variants -------------------------------------------------------------------------------


@dataclass
class Variant:
    """One quantized variant and, once extracted, its selected direction.

    Attributes:
        type: file type name, upper case (``"Q8_0"``).
        source: how the file was made (``"base file"``, ``"requantized from Q4_K_M, not from original
            weights"``, ``"quantized from F16"``).
        path: the GGUF file.
        status: ``"ok"``, ``"failed"`` (no file: ``error`` says why) or ``"no direction"`` (the file works
            but selection found no candidate).
        error: why it failed, if it did.
        size_bytes / bits_per_weight / tensor_types: file facts (``tensor_types`` counts tensors per
            storage type).
        seconds: wall time per step.
        selection: :meth:`pyrefusal.studies.transfer.LanguageDirection.summary` of its direction.
    """

    type: str
    source: str
    path: str
    status: str = "ok"
    error: str | None = None
    size_bytes: int = 0
    bits_per_weight: float = 0.0
    tensor_types: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    selection: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _file_facts(path: Path) -> tuple[int, float, dict[str, int]]:
    """(size, bits per weight of the tensors, tensors per storage type) of a GGUF file."""
    from pyrefusal.steering.export import read_gguf_header

    h = read_gguf_header(path)
    n_weights = sum(int(np.prod(t.ne)) for t in h.tensors.values())
    counts = Counter(t.qtype.name for t in h.tensors.values())
    size = path.stat().st_size
    return size, 8.0 * size / max(n_weights, 1), dict(sorted(counts.items()))


def _make_variant(
    base: Path, base_ftype: int | None, name: str, work: Path, config: QuantSweepConfig, log: Log
) -> Variant:
    """The GGUF of one file type: the base file itself, or a quantization written to ``work``."""
    ftype = parse_ftype(name)
    label = ftype_name(ftype)
    if ftype == base_ftype:
        v = Variant(label, f"base file ({base.name})", str(base))
    else:
        target = work / f"{label}.gguf"
        from_float = base_ftype in FLOAT_FTYPES
        source = (
            f"quantized from {ftype_name(base_ftype)}"
            if from_float
            else (f"requantized from {ftype_name(base_ftype)}, not from original weights")
        )
        v = Variant(label, source, str(target))
        if not target.exists():
            log(f"{label}: quantizing {base.name} ({source})")
            t = time.perf_counter()
            try:
                quantize_gguf(base, target, ftype, allow_requantize=not from_float, n_threads=config.n_threads)
            except MergeError as e:
                v.status, v.error = "failed", str(e)
                log(f"{label}: skipped: {e}")
                return v
            v.seconds["quantize"] = time.perf_counter() - t
    v.size_bytes, v.bits_per_weight, v.tensor_types = _file_facts(Path(v.path))
    return v


def _extract(
    variant: Variant, data: PolyRefuse, config: QuantSweepConfig, work: Path, log: Log, progress: Progress | None
) -> LanguageDirection | None:
    """Extract and select the variant's direction (reusing ``work/<TYPE>/`` files); None if nothing passes."""
    from pyrefusal.runtime.runtime import Runtime

    files = DirectionFiles.language(work / variant.type, activations=False, direction=False)
    files.root.mkdir(parents=True, exist_ok=True)
    with Runtime(
        variant.path, n_ctx=config.n_ctx, n_seq_max=config.n_seq_max, n_threads=config.n_threads, hook=True
    ) as rt:
        every = post_instruction_positions(rt, None)
        positions = None
        if config.positions:
            bad = [p for p in config.positions if p not in every]
            if bad:
                raise PyrefusalError(
                    f"positions {bad} are not post-instruction positions of this chat template {every}; "
                    "pass negative offsets within them, e.g. -1"
                )
            positions = tuple(sorted(config.positions))
        tokens = table_refusal_tokens(rt.tokenize, rt.detokenize, config.source_lang, family=rt.family)
        assert files.refusal_tokens is not None
        tokens.save(files.refusal_tokens)
        tv = sample_train_val(data, config.source_lang, n_train=config.n_train, n_val=config.n_val, seed=config.seed)
        try:
            return extract_direction(
                rt,
                config.source_lang,
                tv,
                tokens,
                files,
                system=None,
                filter=config.filter,
                rule=SelectionRule(config.prune_fraction, config.kl_threshold, False),
                positions=positions,
                progress=(lambda s, i, n: progress(f"{variant.type}: {s}", i, n)) if progress else None,
                log=log,
                label=variant.type,
                seconds=variant.seconds,
            )
        except SelectionError as e:
            variant.status, variant.error = "no direction", str(e)
            log(f"{variant.type}: no direction: {e}")
            return None


def _load_direction(work: Path, name: str) -> LanguageDirection | None:
    d = work / name
    return LanguageDirection.load(d, name) if (d / "selection.json").exists() else None


# --- the sweep ------------------------------------------------------------------------------


def run_quant_sweep(
    config: QuantSweepConfig,
    out: Path,
    log: Log = print,
    progress: Progress | None = None,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Make the variants, extract a direction in each, cross-apply them and write the report.

    Args:
        config: the sweep.
        out: output directory (small files: JSON, Markdown, PNG, completions); resumed when it exists.
        log: message sink.
        progress: ``progress(stage, done, total)``.
        force: start over in ``out`` (variant GGUFs in the work directory are kept).

    Returns:
        The dict written to ``quant_sweep.json``.

    Raises:
        PyrefusalError: unknown file types, requantization without ``allow_requantize``, missing data, or
            ``out`` holding a sweep with other settings.
    """
    from pyrefusal.data.registry import cache_dir, cached_sha256, resolve_model
    from pyrefusal.runtime.runtime import Runtime, build_info
    from pyrefusal.steering.export import read_gguf_header

    t_all = time.perf_counter()
    out = Path(out)
    names = [ftype_name(parse_ftype(t)) for t in config.types]  # validates every type up front
    if len(set(names)) != len(names):
        raise PyrefusalError(f"file types repeat in {list(config.types)}; list each once")
    resolved = resolve_model(config.model)
    base = Path(resolved.path)
    raw_ftype = read_gguf_header(base).kv.get("general.file_type")
    base_ftype = int(raw_ftype) if raw_ftype is not None else None
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
        data = PolyRefuse(Path(config.data_dir) if config.data_dir else default_data_dir())
        if config.source_lang not in data.languages():
            raise DataError(
                f"language {config.source_lang!r} has no PolyRefuse files in {data.root}; run `pyrefusal data fetch` "
                "or pass --data-dir"
            )
        log(f"model {base.name} ({ftype_name(base_ftype)}); variants {names}; work files in {work}")

        # -- 1. variants and their directions (each saved as soon as it finishes) -------------------
        variants: dict[str, Variant] = {}
        directions: dict[str, LanguageDirection] = {}
        for name in names:
            vpath = out / "variants" / f"{name}.json"
            if vpath.exists():
                variants[name] = Variant(**json.loads(vpath.read_text()))
                log(f"{name}: reusing {vpath.name} ({variants[name].status})")
            else:
                v = _make_variant(base, base_ftype, name, work, config, log)
                if v.status == "ok":
                    ld = _extract(v, data, config, extractions, log, progress)
                    if ld is not None:
                        v.selection = ld.summary()
                        np.save(out / "variants" / f"{name}.direction.npy", ld.direction.astype(np.float32))
                        ld.selection.save(out / "variants" / f"{name}.selection.json")
                vpath.write_text(json.dumps(v.to_dict(), indent=1))
                variants[name] = v
            if variants[name].status == "ok":
                ld = _load_direction(extractions, name)
                if ld is None:
                    raise PyrefusalError(
                        f"{out / 'variants' / (name + '.json')} says {name} has a direction but {extractions / name} "
                        "lacks its files (another work_dir?). Pass the same work_dir, or force=True to redo the sweep."
                    )
                directions[name] = ld

        # -- 2. cross-application: every direction ablated in every variant ------------------------
        detector = SubstringDetector(mode="paper" if config.detector == "paper" else "multilingual")
        cross: dict[str, dict[str, Any]] = {}
        runnable = [n for n in names if variants[n].status != "failed"]
        for i, name in enumerate(runnable):
            t = time.perf_counter()
            log(f"{name}: answering {config.n_test} harmful test prompts, baseline + {len(directions)} directions")
            with Runtime(
                variants[name].path, n_ctx=config.n_ctx, n_seq_max=config.n_seq_max, n_threads=config.n_threads
            ) as rt:
                res = transfer_matrix(
                    rt,
                    directions,
                    data,
                    [config.source_lang],
                    n_test=config.n_test,
                    max_new_tokens=config.max_new_tokens,
                    detector=detector,
                    completions_path=out / "completions" / f"{name}.jsonl",
                    seed=config.seed,
                    batch_size=config.n_seq_max,
                    progress=(lambda s, k, n, _m=name: progress(f"{_m}: {s}", k, n)) if progress else None,
                )
            cross[name] = res.to_dict()
            variants[name].seconds["cross_application"] = time.perf_counter() - t
            if progress:
                progress("variants cross-applied", i + 1, len(runnable))

        # -- 3. geometry, results, report ------------------------------------------------------------
        results = _results(config, resolved, base, base_ftype, variants, directions, cross, work)
        results["versions"] = {k: v for k, v in build_info().items() if k != "system_info"}
        results["seconds_total"] = time.perf_counter() - t_all
        (out / "quant_sweep.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
        write_quant_report(results, out)
        log(f"wrote {out / 'quant_sweep.json'} and {out / 'report.md'} in {results['seconds_total']:.0f}s")
        return results


def _rate(cross: Mapping[str, Any], model: str, row: str, lang: str) -> float | None:
    """Refusal rate of variant ``model`` with ``row`` (``"baseline"`` or a direction's variant) ablated."""
    res = cross.get(model)
    if res is None:
        return None
    value = res["baseline"].get(lang) if row == "baseline" else res["rates"].get(row, {}).get(lang)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _results(
    config: QuantSweepConfig,
    resolved: Any,
    base: Path,
    base_ftype: int | None,
    variants: Mapping[str, Variant],
    directions: Mapping[str, LanguageDirection],
    cross: Mapping[str, Any],
    work: Path,
) -> dict[str, Any]:
    lang = config.source_lang
    names = list(variants)
    base_name = ftype_name(base_ftype)
    ref = base_name if base_name in directions else next(iter(directions), None)
    geometry: dict[str, Any] = {"reference": ref}
    if ref is not None:
        dnames, pos, by_layer = cosine_by_layer(directions, directions[ref].selection.position)
        layer = directions[ref].selection.layer
        _, sel = selected_cosines(directions)
        geometry.update(
            names=dnames,
            position=pos,
            layer=layer,
            cosine_at_reference=by_layer[:, :, layer].tolist(),
            cosine_selected=sel.tolist(),
            cosine_by_layer=by_layer.tolist(),
        )
    matrix = {row: {m: _rate(cross, m, row, lang) for m in names if m in cross} for row in ["baseline", *directions]}
    return {
        "model": {
            "spec": config.model,
            "path": str(base),
            "sha256": resolved.sha256,
            "file_type": base_name,
        },
        "note": (
            f"variants other than {base_name} were made from the {base_name} file, not from original weights"
            if base_ftype not in FLOAT_FTYPES
            else f"variants quantized from the {base_name} file"
        ),
        "variants": {n: variants[n].to_dict() for n in names},
        "refusal": {
            "language": lang,
            "detector": SubstringDetector(mode="paper" if config.detector == "paper" else "multilingual").name,
            "n_test": config.n_test,
            "max_new_tokens": config.max_new_tokens,
            "matrix": matrix,
            "matrix_layout": "matrix[direction source or 'baseline'][model variant] = refusal rate on harmful prompts",
            "counts": {m: cross[m]["counts"] for m in cross},
            "prompt_ids": next(iter(cross.values()))["prompt_ids"] if cross else {},
        },
        "geometry": geometry,
        "work_dir": str(work),
        "config": config.to_dict(),
    }
