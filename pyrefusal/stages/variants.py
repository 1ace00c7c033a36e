"""Quantized variants of one model (the ``quant-sweep`` study's stages).

* :func:`make_variant`: the GGUF of one llama.cpp file type (the base file itself or a quantization of it) and
  its file facts -> :class:`Variant`;
* :func:`extract_variant_direction`: the direction stages (sample -> extract -> filter -> select) in one variant
  -> :class:`~pyrefusal.stages.direction.LanguageDirection` (files under ``work/<TYPE>/``, reused on resume);
* :func:`sweep_results`: every variant, the cross-application matrix and the geometry as ``quant_sweep.json``.

Requantization (a quantized base made into another type) is labelled in :attr:`Variant.source`; the study refuses
it unless asked (``--allow-requantize``).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyrefusal.common import Log, Progress
from pyrefusal.data.polyrefuse import PolyRefuse
from pyrefusal.data.registry import ResolvedModel
from pyrefusal.errors import PyrefusalError
from pyrefusal.method.selection import SelectionError, SelectionRule
from pyrefusal.settings import QuantSweepSettings
from pyrefusal.stages.direction import LanguageDirection, extract_direction
from pyrefusal.stages.extract import post_instruction_positions
from pyrefusal.stages.generate import substring_detector
from pyrefusal.stages.geometry import compare_directions
from pyrefusal.stages.layout import DirectionFiles
from pyrefusal.stages.sample import sample_train_val
from pyrefusal.stages.tokens import table_refusal_tokens
from pyrefusal.steering.export import read_gguf_header
from pyrefusal.steering.merge import FLOAT_FTYPES, MergeError, ftype_name, parse_ftype, quantize_gguf

__all__ = [
    "Variant",
    "cross_rate",
    "extract_variant_direction",
    "file_facts",
    "load_variant_direction",
    "make_variant",
    "sweep_results",
]


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
        selection: :meth:`pyrefusal.stages.direction.LanguageDirection.summary` of its direction.
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
        """The stored ``variants/<TYPE>.json`` object (field order)."""
        return asdict(self)


def file_facts(path: Path) -> tuple[int, float, dict[str, int]]:
    """(size, bits per weight of the tensors, tensors per storage type) of a GGUF file."""
    h = read_gguf_header(path)
    n_weights = sum(int(np.prod(t.ne)) for t in h.tensors.values())
    counts = Counter(t.qtype.name for t in h.tensors.values())
    size = path.stat().st_size
    return size, 8.0 * size / max(n_weights, 1), dict(sorted(counts.items()))


def make_variant(
    base: Path, base_ftype: int | None, name: str, work: Path, config: QuantSweepSettings, log: Log
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
    v.size_bytes, v.bits_per_weight, v.tensor_types = file_facts(Path(v.path))
    return v


def extract_variant_direction(
    variant: Variant, data: PolyRefuse, config: QuantSweepSettings, work: Path, log: Log, progress: Progress | None
) -> LanguageDirection | None:
    """Extract and select the variant's direction (reusing ``work/<TYPE>/`` files); None if nothing passes."""
    from pyrefusal.runtime import Runtime

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


def load_variant_direction(work: Path, name: str) -> LanguageDirection | None:
    """The direction :func:`extract_variant_direction` stored for variant ``name`` under ``work``, or None."""
    d = work / name
    return LanguageDirection.load(d, name) if (d / "selection.json").exists() else None


def cross_rate(cross: Mapping[str, Any], model: str, row: str, lang: str) -> float | None:
    """Refusal rate of variant ``model`` with ``row`` (``"baseline"`` or a direction's variant) ablated."""
    res = cross.get(model)
    if res is None:
        return None
    value = res["baseline"].get(lang) if row == "baseline" else res["rates"].get(row, {}).get(lang)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def sweep_results(
    config: QuantSweepSettings,
    resolved: ResolvedModel,
    base: Path,
    base_ftype: int | None,
    variants: Mapping[str, Variant],
    directions: Mapping[str, LanguageDirection],
    cross: Mapping[str, Any],
    work: Path,
) -> dict[str, Any]:
    """``quant_sweep.json`` (without ``versions`` and ``seconds_total``, which the study adds).

    Args:
        config: the sweep's settings.
        resolved / base / base_ftype: the base model, its file and its llama.cpp file type.
        variants: every variant, in the configured order.
        directions: the variants' selected directions (those that have one).
        cross: ``{variant: TransferResult.to_dict()}`` of the cross-application in each variant that runs.
        work: the work directory (variant GGUFs).
    """
    lang = config.source_lang
    names = list(variants)
    base_name = ftype_name(base_ftype)
    ref = base_name if base_name in directions else next(iter(directions), None)
    geometry: dict[str, Any] = {"reference": ref}
    if ref is not None:
        geo = compare_directions(directions, ref, activations=False)
        geometry.update(
            names=geo.names,
            position=geo.position,
            layer=geo.layer,
            cosine_at_reference=geo.by_layer[:, :, geo.layer].tolist(),
            cosine_selected=geo.selected.tolist(),
            cosine_by_layer=geo.by_layer.tolist(),
        )
    matrix = {
        row: {m: cross_rate(cross, m, row, lang) for m in names if m in cross} for row in ["baseline", *directions]
    }
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
            "detector": substring_detector(config.detector).name,
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
