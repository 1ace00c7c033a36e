"""Steered chat models for apps: llama-cpp-python's ``Llama`` with the refusal direction applied.

pyrefusal's own :class:`~pyrefusal.runtime.runtime.Runtime` is built for experiments (batched greedy
decoding, the eval-callback hook). Apps want the ordinary llama-cpp-python objects instead:
``Llama.create_chat_completion`` (streaming, sampling, chat templates) and the OpenAI-compatible
server. This module puts the intervention into llama.cpp's own graph so that those objects run
it unchanged, with no hook and no device syncs; :mod:`pyrefusal.steering.router` decides how (the same
decider as pyrefusal's Runtime uses, asked without a hook):

* **Ablation** (``intervention="ablation"``): the rank-k LoRA of :mod:`pyrefusal.steering.export`
  (cached per model and direction by :func:`~pyrefusal.steering.export.cached_ablation_lora`), loaded at
  scale 1 through ``Llama(lora_path=...)``. It is exact for the architectures
  :func:`~pyrefusal.steering.export.ablation_lora_support` accepts, except when the LM head is tied to
  the token embeddings: the LoRA must then leave the embeddings out, which is *not* the full
  ablation. That is an error unless ``allow_inexact=True`` (recorded in :meth:`Steering.describe`);
  the exact alternative is pyrefusal's Runtime (``pyrefusal.steering.arm(runtime, ..., path="auto")``
  ablates the embeddings with its hook).
* **Addition** (``intervention="addition"``): ``coeff * r`` added to the residual stream
  entering block ``layer`` (pyrefusal's :func:`~pyrefusal.method.intervention.actadd`), i.e. llama.cpp
  control vector ``direction.(layer-1)`` (:func:`~pyrefusal.steering.export.cvec_layer`), set on the
  ``Llama``'s context with ``llama_set_adapter_cvec``. llama-cpp-python 0.3.36 creates that
  context once in ``Llama.__init__``; ``reset()`` and ``load_state()`` keep it (and a control
  vector is not part of a saved state). :class:`SteeredModel` still checks the context pointer
  whenever the ``Llama`` is reached and sets the vector again on a new context.

:func:`serve` runs llama-cpp-python's OpenAI-compatible server with the same adapters (extras:
``pip install "pyrefusal[serve]"``); :func:`chat_repl` is a small terminal chat.

Example:
    >>> model = SteeredModel.from_run("runs/qwen", intervention="ablation")  # doctest: +SKIP
    >>> model.create_chat_completion([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import llama_cpp  # import llama_cpp before numpy/gguf: required in CUDA processes

import jinja2
import numpy as np
from typing_extensions import Self

from pyrefusal.errors import HookError, ModelError
from pyrefusal.method import intervention as iv
from pyrefusal.results import RESULTS_FILE, ResultsError, RunResults, load_direction
from pyrefusal.runtime import capi
from pyrefusal.runtime.validate import validate_model_file
from pyrefusal.steering.export import (
    ExportError,
    ablation_lora_support,
    cached_ablation_lora,
    direction_sha256,
    read_gguf_header,
)
from pyrefusal.steering.router import SteeringError, decide
from pyrefusal.steering.weighted import WeightedAblation, cached_weighted_lora, read_pick

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

__all__ = [
    "SERVE_EXTRAS",
    "SteeredModel",
    "Steering",
    "SteeringError",
    "build_app",
    "chat_repl",
    "plan_pick",
    "plan_steering",
    "serve",
    "set_control_vector",
    "steering_from_run",
]

_LOG = logging.getLogger(__name__)

#: Python modules llama-cpp-python's server needs (the ``serve`` extra of pyrefusal).
SERVE_EXTRAS: tuple[str, ...] = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
_SERVE_HINT = (
    'pip install "pyrefusal[serve]" (or: pip install fastapi uvicorn sse-starlette "starlette-context<0.4" '
    "pydantic-settings)"
)

InterventionKind = Literal["ablation", "addition"]


# --- what to apply -------------------------------------------------------------------------


@dataclass(frozen=True)
class Steering:
    """An intervention resolved to llama.cpp adapters for one model file.

    Attributes:
        model_path: the base GGUF.
        intervention: ``"ablation"``, ``"addition"``, or ``"none"`` (no direction given).
        direction: the direction as given, float32 ``(n_embd,)`` or ``(k, n_embd)``; None for ``"none"``.
        lora_path: ablation LoRA adapter (load at scale 1), or None.
        control_vector: llama.cpp layer ``N`` -> float32 ``(n_embd,)`` added to ``l_out-N``
            (coefficient included); empty unless ``"addition"``.
        layer: pyrefusal block input of the addition (None for ablation).
        coeff: the addition's coefficient (None for ablation).
        exact: True when the adapters reproduce pyrefusal's intervention exactly.
        note: what is not exact, or how it is applied.
        n_layer: the model's block count.
        n_embd: the model's residual width.
        provenance: facts about the source (run directory, hashes, selection).
        weighted: the partial-weight ablation of ``pyrefusal optimize --pick N`` that ``lora_path`` carries (a
            per-writer weighted LoRA, the file ``pyrefusal export lora`` writes), or None for the paper's ablation.
        pick: the pick's record (``trial``, val first-token ``refusal`` and ``kl``) when ``weighted`` is set.
    """

    model_path: Path
    intervention: Literal["ablation", "addition", "none"]
    direction: np.ndarray | None
    exact: bool
    note: str
    n_layer: int
    n_embd: int
    lora_path: Path | None = None
    control_vector: dict[int, np.ndarray] = field(default_factory=dict)
    layer: int | None = None
    coeff: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    weighted: WeightedAblation | None = None
    pick: dict[str, Any] | None = None

    @property
    def source(self) -> str:
        """Which intervention this is, in words (the startup line of ``chat`` and ``serve``)."""
        if self.pick is not None:
            return (
                f"optimize pick #{self.pick['trial']} (per-writer weighted ablation; val first-token KL "
                f"{self.pick['kl']:.4f}, refusal {self.pick['refusal']:.4f}; --paper for the run's direction)"
            )
        if self.direction is None:
            return "no direction"
        if "run_dir" in self.provenance:
            return (
                f"the paper's direction (the run's pick: position {self.provenance.get('position')}, "
                f"layer {self.provenance.get('selected_layer')})"
            )
        return "the given direction"

    @property
    def path(self) -> Literal["lora", "cvec", "none"]:
        """How llama.cpp applies it: ``"lora"`` (adapter), ``"cvec"`` (control vector) or ``"none"``."""
        if self.lora_path is not None:
            return "lora"
        return "cvec" if self.control_vector else "none"

    def as_intervention(self) -> iv.Intervention:
        """The equivalent :class:`~pyrefusal.method.intervention.Intervention` (for pyrefusal's Runtime).

        Raises:
            SteeringError: a weighted ablation (an optimize pick) has per-writer weights no Intervention holds;
                apply it to a Runtime with :func:`pyrefusal.steering.weighted.apply_weighted`.
        """
        if self.weighted is not None:
            raise SteeringError(
                "an optimize pick is a per-writer weighted ablation, not an Intervention; apply it to a Runtime with "
                "pyrefusal.steering.weighted.apply_weighted(runtime, steering.lora_path, steering.weighted, ...)"
            )
        if self.intervention == "ablation":
            assert self.direction is not None
            return iv.ablation(self.direction)
        if self.intervention == "addition":
            assert self.direction is not None and self.layer is not None and self.coeff is not None
            return iv.actadd(self.direction, self.layer, self.coeff)
        return iv.baseline()

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: what is applied, how, and whether it is exact (no vectors)."""
        out: dict[str, Any] = {
            "intervention": self.intervention,
            "path": self.path,
            "model": str(self.model_path),
            "file": str(self.lora_path) if self.lora_path is not None else None,
            "layer": self.layer,
            "cvec_layers": sorted(self.control_vector),
            "coefficient": self.coeff,
            "exact": self.exact,
            "note": self.note,
            "source": self.source,
        }
        if self.pick is not None:
            out["pick"] = dict(self.pick)
        if self.direction is not None:
            out["direction_sha256"] = direction_sha256(self.direction)
            out["direction_norm"] = float(np.linalg.norm(self.direction))
        if self.provenance:
            out["provenance"] = dict(self.provenance)
        return out


def plan_steering(
    model_path: str | os.PathLike[str],
    direction: np.ndarray | None,
    *,
    intervention: InterventionKind = "ablation",
    layer: int | None = None,
    coeff: float = -1.0,
    allow_inexact: bool = False,
    model_sha256: str | None = None,
    adapter_root: Path | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Steering:
    """Resolve a direction into llama.cpp adapters for ``model_path`` (builds the cached LoRA).

    This validates the inputs (file, width, layer) and builds the files; the choice of adapter and whether it is
    exact is :func:`pyrefusal.steering.router.decide`'s, asked without a hook (``nodes=None``), as for every
    other user of an intervention.

    Args:
        model_path: the base GGUF.
        direction: ``(n_embd,)`` (or ``(k, n_embd)`` for ablation); None = no steering.
        intervention: ``"ablation"`` (LoRA) or ``"addition"`` (control vector).
        layer: block input of the addition (``2..n_layer-1``); ignored for ablation.
        coeff: the addition's coefficient (-1 bypasses refusal, as the paper's ActAdd).
        allow_inexact: accept an ablation LoRA without the token embeddings on a model whose LM
            head is tied to them (not the full ablation; recorded in ``exact``/``note``).
        model_sha256: the base file's sha256 when known (else computed once, with a sidecar).
        adapter_root: where cached LoRA adapters go (default ``cache_dir()/adapters``).
        provenance: facts recorded in :meth:`Steering.describe`.

    Returns:
        The :class:`Steering`.

    Raises:
        SteeringError: wrong width, an addition without a layer or at block input < 2, or an
            ablation the LoRA cannot express exactly (the router's errors; see the module docstring).
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise SteeringError(f"model file not found: {model_path}. Pass the .gguf the direction was computed on.")
    try:
        validate_model_file(model_path)  # impossible hyper-parameters abort inside llama.cpp: refuse them first
        header = read_gguf_header(model_path)
    except (ExportError, ModelError) as e:
        raise SteeringError(str(e)) from e
    arch = str(header.kv.get("general.architecture", "unknown"))
    n_layer = int(header.kv.get(f"{arch}.block_count", 0))
    n_embd = int(header.kv.get(f"{arch}.embedding_length", 0))
    if n_layer <= 0 or n_embd <= 0:
        raise SteeringError(
            f"{model_path.name} lacks {arch}.block_count / {arch}.embedding_length; it is not a model llama.cpp runs"
        )
    base: dict[str, Any] = {"model_path": model_path, "n_layer": n_layer, "n_embd": n_embd}
    base["provenance"] = dict(provenance or {})
    if intervention not in ("ablation", "addition"):
        raise SteeringError(f"intervention must be 'ablation' or 'addition', got {intervention!r}")
    if direction is None:
        return Steering(**base, intervention="none", direction=None, exact=True, note="no direction: the plain model")

    d = np.asarray(direction, dtype=np.float32)
    if d.shape[-1] != n_embd or d.ndim not in (1, 2):
        raise SteeringError(
            f"the direction has shape {d.shape} but {model_path.name} has n_embd={n_embd}; "
            "it was computed for another model (pass that model's .gguf)"
        )
    if not np.all(np.isfinite(d)) or not np.all(np.linalg.norm(np.atleast_2d(d), axis=1) > 0):
        raise SteeringError("the direction is zero or contains NaN/inf; recompute it (pyrefusal run)")

    if intervention == "addition":
        if d.ndim != 1:
            raise SteeringError(f"an addition takes one direction (n_embd,), got shape {d.shape}")
        if layer is None:
            raise SteeringError(
                "an addition needs layer= (the block input to steer; a run records it as direction.layer)"
            )
        spec = iv.actadd(d, int(layer), float(coeff))
    else:
        spec = iv.ablation(d)
    # The router decides (no hook here: llama-cpp-python's Llama runs in-graph adapters only).
    route = decide(spec, model_path, n_layer, n_embd, "graph", nodes=None, allow_inexact=allow_inexact)
    if route.lora_directions is None:
        assert layer is not None  # an addition (checked above)
        return Steering(
            **base,
            intervention="addition",
            direction=d,
            control_vector=dict(route.cvec),  # {direction.(layer-1): coeff * r}
            layer=int(layer),
            coeff=float(coeff),
            exact=route.exact,
            note=route.reason,
        )
    try:
        lora = cached_ablation_lora(
            model_path, d, model_sha256=model_sha256, embeddings=route.lora_embeddings, root=adapter_root
        )
    except ExportError as e:
        raise SteeringError(f"cannot build the ablation LoRA: {e}") from e
    return Steering(**base, intervention="ablation", direction=d, lora_path=lora, exact=route.exact, note=route.reason)


def _read_run(run_dir: Path) -> tuple[RunResults, np.ndarray]:
    """The run's checked results and its direction ``(n_embd,)`` float32."""
    results_path, direction_path = run_dir / RESULTS_FILE, run_dir / "direction.npy"
    if not results_path.is_file() or not direction_path.is_file():
        raise SteeringError(f"{run_dir} has no results.json/direction.npy; run `pyrefusal run --out {run_dir}` first")
    try:
        results = RunResults.load(results_path)
        direction = load_direction(direction_path)  # (n_embd,) float32, checked (no pickles)
    except ResultsError as e:
        raise SteeringError(str(e)) from e
    return results, direction


def steering_from_run(
    run_dir: str | os.PathLike[str],
    *,
    intervention: InterventionKind = "ablation",
    layer: int | None = None,
    coeff: float = -1.0,
    model_path: str | os.PathLike[str] | None = None,
    allow_inexact: bool = False,
    verify: bool = True,
    adapter_root: Path | None = None,
    paper: bool = False,
) -> Steering:
    """:func:`plan_steering` for a finished run directory (``results.json`` + ``direction.npy``).

    An ablation uses the trial ``pyrefusal optimize RUN_DIR --pick N`` chose (``optimize/pick.json``) when there
    is one, as ``export lora`` does: its per-writer weighted LoRA (:func:`plan_pick`). ``paper=True`` ignores the
    pick and ablates the run's direction (the paper's rule).

    Args:
        run_dir: the ``pyrefusal run --out`` directory.
        intervention: ``"ablation"`` or ``"addition"``.
        layer: block input of the addition (default: the run's selected ``direction.layer``).
        coeff: the addition's coefficient.
        model_path: the run's model if it moved (default: the run's ``model.path``).
        allow_inexact: as in :func:`plan_steering`.
        verify: check the model file's sha256 against the run's ``model.sha256``.
        adapter_root: as in :func:`plan_steering`.
        paper: ignore ``optimize/pick.json`` (ablation only; an addition always uses the run's direction).

    Returns:
        The :class:`Steering`, with the run's selection in its provenance.

    Raises:
        SteeringError: missing files, a different model, a damaged pick, or as :func:`plan_steering`.
    """
    run_dir = Path(run_dir)
    results, direction = _read_run(run_dir)
    model = Path(model_path) if model_path is not None else Path(results.model.path)
    if not model.is_file():
        raise SteeringError(f"the run's model {model} is not there; pass model_path= (--model) with its new location")
    expected = results.model.sha256
    sha = None
    if verify and expected:
        from pyrefusal.data.registry import cached_sha256

        sha = cached_sha256(model)
        if sha != expected:
            raise SteeringError(
                f"{model} (sha256 {sha[:12]}) is not the model of {run_dir} ({expected[:12]}); pass the run's model"
            )
    sel = results.direction
    prov = {
        "run_dir": str(run_dir),
        "source_language": sel.source_lang,
        "selected_layer": sel.layer,
        "position": sel.position,
        "base_sha256": expected,
    }
    if intervention == "ablation" and not paper:
        try:
            chosen = read_pick(run_dir)
        except ExportError as e:
            raise SteeringError(str(e)) from None
        if chosen is not None:
            ablation, record = chosen
            if expected and record.get("base_sha256") and record["base_sha256"] != expected:
                raise SteeringError(
                    f"{run_dir / 'optimize' / 'pick.json'} was picked on another model (sha256 "
                    f"{str(record['base_sha256'])[:12]}, the run's {expected[:12]}); pick again with "
                    f"`pyrefusal optimize {run_dir} --pick N`, or pass --paper (paper=True)"
                )
            return plan_pick(
                model,
                ablation,
                record,
                allow_inexact=allow_inexact,
                model_sha256=sha,
                adapter_root=adapter_root,
                provenance={k: v for k, v in prov.items() if v is not None},
            )
    return plan_steering(
        model,
        direction,
        intervention=intervention,
        layer=sel.layer if layer is None else layer,
        coeff=coeff,
        allow_inexact=allow_inexact,
        model_sha256=sha,  # None: computed (once, with a sidecar) from the file actually loaded
        adapter_root=adapter_root,
        provenance={k: v for k, v in prov.items() if v is not None},
    )


def plan_pick(
    model_path: str | os.PathLike[str],
    ablation: WeightedAblation,
    record: Mapping[str, Any],
    *,
    allow_inexact: bool = False,
    model_sha256: str | None = None,
    adapter_root: Path | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Steering:
    """Resolve an optimize pick (:func:`~pyrefusal.steering.weighted.read_pick`) into its per-writer weighted LoRA.

    The adapter is :func:`~pyrefusal.steering.weighted.cached_weighted_lora`'s, i.e. the file ``pyrefusal export
    lora`` writes for the pick, loaded at scale 1: llama.cpp applies ``W - w(l) r̂ r̂ᵀ W`` per writer in its graph.

    Args:
        model_path: the base GGUF.
        ablation: the pick's weighted ablation.
        record: the pick's record (``trial``, ``values``: val first-token ``refusal`` and ``kl``).
        allow_inexact: a pick that edits the token embeddings on a model whose LM head is tied to them: leave the
            embeddings out of the LoRA (not the whole intervention; recorded in ``exact``/``note``).
        model_sha256, adapter_root, provenance: as in :func:`plan_steering`.

    Raises:
        SteeringError: a model the LoRA cannot ablate exactly, a pick for another model shape, or tied embeddings
            without ``allow_inexact``.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise SteeringError(f"model file not found: {model_path}. Pass the .gguf the pick was searched on.")
    try:
        validate_model_file(model_path)
        support = ablation_lora_support(model_path)
    except (ExportError, ModelError) as e:
        raise SteeringError(str(e)) from e
    if not support.exact:
        raise SteeringError(f"a LoRA cannot apply the optimize pick exactly on {model_path.name}: {support.reason}")
    n_layer, n_embd = len(support.writers) // 2, support.n_embd
    if ablation.n_layer != n_layer or ablation.n_embd != n_embd:
        raise SteeringError(
            f"the optimize pick has {ablation.n_layer} layers x {ablation.n_embd} but {model_path.name} "
            f"has {n_layer} x {n_embd}: it was searched on another model; pass that model or --paper"
        )
    exact, note = True, "per-writer weighted ablation LoRA (optimize pick), in llama.cpp's graph"
    if ablation.embeddings and support.tied_embeddings:
        if not allow_inexact:
            raise SteeringError(
                f"the optimize pick also edits the token embeddings, but {model_path.name} ties its LM head to them, "
                "so the LoRA must leave them out (not the whole pick). Pass allow_inexact=True (--allow-inexact) to "
                "accept that, or --paper for the run's direction; pyrefusal's Runtime applies the whole pick "
                "(pyrefusal.steering.weighted.apply_weighted)"
            )
        exact = False
        note = f"{model_path.name} ties its LM head to the embeddings: the pick's embedding edit is left out"
    values = record.get("values", {})
    pick = {
        "trial": record.get("trial"),
        "refusal": float(values.get("refusal", math.nan)),
        "kl": float(values.get("kl", math.nan)),
    }
    try:
        lora = cached_weighted_lora(
            model_path,
            ablation,
            model_sha256=model_sha256,
            skip_embeddings=not exact,
            root=adapter_root,
            provenance={"optimize_trial": pick["trial"]} if isinstance(pick["trial"], int) else None,
        )
    except ExportError as e:
        raise SteeringError(f"cannot build the optimize pick's LoRA: {e}") from e
    return Steering(
        model_path=model_path,
        intervention="ablation",
        direction=ablation.direction.astype(np.float32),
        exact=exact,
        note=note,
        n_layer=n_layer,
        n_embd=n_embd,
        lora_path=lora,
        provenance={**dict(provenance or {}), "optimize_trial": pick["trial"]},
        weighted=ablation,
        pick=pick,
    )


def set_control_vector(ctx: Any, vectors: Mapping[int, np.ndarray], n_embd: int, n_layer: int) -> None:
    """Set llama.cpp control vectors on a context (``llama_set_adapter_cvec``), replacing any before.

    Args:
        ctx: a ``llama_context`` pointer (``Llama.ctx``).
        vectors: llama.cpp layer ``N`` (``1..n_layer-1``) -> ``(n_embd,)`` added to ``l_out-N``;
            empty clears the control vector.
        n_embd: the model's residual width.
        n_layer: the model's block count.

    Raises:
        SteeringError: a layer outside ``1..n_layer-1`` or llama.cpp rejects the vector.
    """
    try:  # the one packer, shared with Runtime.set_control_vector
        capi.apply_control_vector(ctx, vectors, n_embd, n_layer)
    except HookError as e:
        raise SteeringError(str(e)) from e


# --- the chat object -----------------------------------------------------------------------


class SteeredModel:
    """llama-cpp-python's ``Llama`` with the refusal direction applied in llama.cpp's graph.

    Behaves like a ``llama_cpp.Llama`` for apps: :meth:`create_chat_completion` (also
    ``stream=True``), :meth:`create_completion`, :meth:`tokenize` and calling the object are
    delegated, and every other attribute is looked up on the underlying :attr:`llama`.

    Args:
        model_path: the base GGUF.
        direction: the refusal direction ``(n_embd,)`` (ablation also takes ``(k, n_embd)``);
            None = the plain model.
        intervention: ``"ablation"`` (LoRA, default) or ``"addition"`` (control vector).
        layer: block input of the addition (``2..n_layer-1``); ignored for ablation.
        coeff: the addition's coefficient (-1 = the paper's jailbreak ActAdd).
        n_ctx: context size in tokens.
        n_gpu_layers: layers to offload (-1 = all; ignored by CPU builds).
        allow_inexact: accept the LoRA without embeddings on tied-embedding models.
        steering: an already resolved :class:`Steering` (then ``direction``/``intervention``/
            ``layer``/``coeff`` must be left at their defaults).
        **llama_kwargs: passed to ``llama_cpp.Llama`` (``verbose`` defaults to False;
            ``lora_path`` is not allowed, the steering owns it).

    Raises:
        SteeringError: as :func:`plan_steering`, or a conflicting ``lora_path``.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        direction: np.ndarray | None = None,
        intervention: InterventionKind = "ablation",
        layer: int | None = None,
        coeff: float = -1.0,
        n_ctx: int = 4096,
        n_gpu_layers: int = -1,
        allow_inexact: bool = False,
        steering: Steering | None = None,
        **llama_kwargs: Any,
    ) -> None:
        if "lora_path" in llama_kwargs or "lora_scale" in llama_kwargs:
            raise SteeringError(
                "SteeredModel sets lora_path itself (the ablation adapter at scale 1); use llama_cpp.Llama directly "
                "to load another adapter"
            )
        if steering is None:
            steering = plan_steering(
                model_path,
                direction,
                intervention=intervention,
                layer=layer,
                coeff=coeff,
                allow_inexact=allow_inexact,
            )
        elif direction is not None:
            raise SteeringError("pass either steering= or direction=, not both")
        elif Path(model_path).resolve() != steering.model_path.resolve():
            raise SteeringError(f"steering is for {steering.model_path}, not {model_path}; pass the same model file")
        self._steering = steering
        self._cvec_ctx: int | None = None
        llama_kwargs.setdefault("verbose", False)
        lora = str(steering.lora_path) if steering.lora_path is not None else None
        self._llama = llama_cpp.Llama(
            str(steering.model_path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, lora_path=lora, **llama_kwargs
        )
        self._sync_control_vector()

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike[str],
        *,
        intervention: InterventionKind = "ablation",
        layer: int | None = None,
        coeff: float = -1.0,
        model_path: str | os.PathLike[str] | None = None,
        allow_inexact: bool = False,
        verify: bool = True,
        paper: bool = False,
        **kwargs: Any,
    ) -> SteeredModel:
        """Load the model of a finished run with its direction applied (its optimize pick when there is one).

        Args:
            run_dir: the ``pyrefusal run --out`` directory (``results.json``, ``direction.npy``).
            intervention: ``"ablation"`` or ``"addition"``.
            layer: block input of the addition (default: the run's selected layer).
            coeff: the addition's coefficient.
            model_path: the run's model if it moved.
            allow_inexact: as in :func:`plan_steering`.
            verify: check the model's sha256 against the run.
            paper: ignore ``optimize/pick.json`` and ablate the run's direction (see :func:`steering_from_run`).
            **kwargs: ``n_ctx``, ``n_gpu_layers`` and ``llama_cpp.Llama`` arguments.

        Returns:
            The :class:`SteeredModel`.
        """
        steering = steering_from_run(
            run_dir,
            intervention=intervention,
            layer=layer,
            coeff=coeff,
            model_path=model_path,
            allow_inexact=allow_inexact,
            verify=verify,
            paper=paper,
        )
        return cls(steering.model_path, steering=steering, **kwargs)

    # -- steering ----------------------------------------------------------------------------

    def _sync_control_vector(self) -> None:
        """Set the control vector on the Llama's current context if it is not there yet."""
        llama = self.__dict__.get("_llama")
        if llama is None or not self._steering.control_vector:
            return
        ctx = llama.ctx
        if ctx is None:
            raise SteeringError("the model was closed; create a new SteeredModel")
        if ctx != self._cvec_ctx:
            s = self._steering
            set_control_vector(ctx, s.control_vector, s.n_embd, s.n_layer)
            self._cvec_ctx = ctx

    @property
    def llama(self) -> llama_cpp.Llama:
        """The underlying ``llama_cpp.Llama`` (its context carries the steering)."""
        self._sync_control_vector()
        return self._llama

    @property
    def steering(self) -> Steering:
        """What is applied (:class:`Steering`)."""
        return self._steering

    @property
    def intervention(self) -> iv.Intervention:
        """The equivalent pyrefusal :class:`~pyrefusal.method.intervention.Intervention`."""
        return self._steering.as_intervention()

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the direction came from (run directory, hashes, selection) and the model file."""
        return {"model": str(self._steering.model_path), **self._steering.provenance}

    @property
    def exact(self) -> bool:
        """True when llama.cpp applies exactly pyrefusal's intervention."""
        return self._steering.exact

    def describe(self) -> dict[str, Any]:
        """What is applied and how: path (``lora``/``cvec``/``none``), file, layer, coefficient, exactness."""
        return self._steering.describe()

    # -- delegation --------------------------------------------------------------------------

    def create_chat_completion(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        """``Llama.create_chat_completion`` on the steered model (``stream=True`` returns an iterator of chunks)."""
        return self.llama.create_chat_completion(messages, **kwargs)

    def create_completion(self, prompt: str | list[int], **kwargs: Any) -> Any:
        """``Llama.create_completion`` on the steered model (raw prompt, no chat template)."""
        return self.llama.create_completion(prompt, **kwargs)

    def __call__(self, prompt: str | list[int], **kwargs: Any) -> Any:
        """Same as :meth:`create_completion` (as ``Llama.__call__``)."""
        return self.llama(prompt, **kwargs)

    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        """``Llama.tokenize`` (also accepts ``str``)."""
        raw = text.encode("utf-8") if isinstance(text, str) else text
        return self.llama.tokenize(raw, add_bos=add_bos, special=special)

    def __getattr__(self, name: str) -> Any:
        llama = self.__dict__.get("_llama")
        if llama is None or name.startswith("__"):
            raise AttributeError(name)
        self._sync_control_vector()
        return getattr(llama, name)

    def close(self) -> None:
        """Free the llama.cpp model and context (idempotent)."""
        llama = self.__dict__.get("_llama")
        if llama is not None:
            llama.close()
            self._cvec_ctx = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self._steering
        how = {"lora": f"LoRA {s.lora_path}", "cvec": f"control vector at block input {s.layer}", "none": "nothing"}
        return f"SteeredModel({s.model_path.name}, {s.intervention} via {how[s.path]}, exact={s.exact})"


# --- terminal chat -------------------------------------------------------------------------


_REPL_HELP = "/reset clears the conversation, /quit exits."


def chat_repl(
    model: SteeredModel,
    *,
    system: str | None = None,
    max_tokens: int = 512,
    input_fn: Callable[[str], str] = input,
    output: IO[str] = sys.stdout,
    **completion_kwargs: Any,
) -> list[dict[str, str]]:
    """Interactive chat with streaming output until ``/quit`` or end of input.

    Commands: ``/reset`` (forget the conversation, keep the system prompt), ``/quit`` (or
    ``/exit``, Ctrl-D), ``/help``. Ctrl-C during a reply stops that reply.

    Args:
        model: the steered model.
        system: system prompt (None keeps the chat template's default).
        max_tokens: most tokens per reply.
        input_fn: reads one user line given a prompt string (inject for tests).
        output: where replies are written.
        **completion_kwargs: sampling options for ``create_chat_completion`` (``temperature``, ...).

    Returns:
        The conversation at exit (system, user and assistant messages).
    """

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise SteeringError(f"max_tokens must be a whole number >= 1 (--max-tokens), got {max_tokens!r}")

    def fresh() -> list[dict[str, str]]:
        return [{"role": "system", "content": system}] if system is not None else []

    def say(text: str) -> None:
        output.write(text)
        output.flush()

    d = model.describe()
    how = {"lora": "ablation LoRA", "cvec": f"control vector at block input {d['layer']}", "none": "no steering"}
    say(
        f"pyrefusal chat: {d['intervention']} ({how[d['path']]}{'' if d['exact'] else ', NOT exact'}) of "
        f"{d['source']}. {_REPL_HELP}\n"
    )
    messages = fresh()
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            say("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            messages = fresh()
            say("(conversation cleared)\n")
            continue
        if text == "/help":
            say(_REPL_HELP + "\n")
            continue
        if text.startswith("/"):
            say(f"unknown command {text.split()[0]}; {_REPL_HELP}\n")
            continue
        messages.append({"role": "user", "content": line})
        reply: list[str] = []
        try:
            stream: Iterator[dict[str, Any]] = model.create_chat_completion(
                messages, stream=True, max_tokens=max_tokens, **completion_kwargs
            )
            for chunk in stream:
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    reply.append(piece)
                    say(piece)
        except KeyboardInterrupt:
            say(" [interrupted]")
        except ValueError as e:  # llama-cpp-python: the prompt exceeds the context window
            messages.pop()
            say(f"error: {e}. Type /reset to start a new conversation.\n")
            continue
        except jinja2.TemplateError as e:  # the GGUF's chat template does not render this conversation
            messages.pop()
            say(
                f"error: {model.steering.model_path.name}'s chat template does not render: {type(e).__name__}: "
                f"{str(e)[:200]}. Restart without --system (or with one, if it needs one), or use a GGUF whose "
                "template works (gguf-py's gguf_new_metadata.py --chat-template-file replaces it).\n"
            )
            continue
        say("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return messages


# --- OpenAI-compatible server --------------------------------------------------------------


def _require_server_extras() -> None:
    missing = []
    for mod in SERVE_EXTRAS:
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise SteeringError(f"the OpenAI-compatible server needs {', '.join(missing)}: {_SERVE_HINT}")


def build_app(
    model_path: str | os.PathLike[str],
    lora_path: str | os.PathLike[str] | None = None,
    *,
    control_vector: Mapping[int, np.ndarray] | None = None,
    n_ctx: int = 4096,
    n_gpu_layers: int = -1,
    model_alias: str | None = None,
    api_key: str | None = None,
    verbose: bool = False,
    describe: Mapping[str, Any] | None = None,
    **model_settings: Any,
) -> FastAPI:
    """llama-cpp-python's OpenAI-compatible FastAPI app, serving the steered model.

    The ablation LoRA goes in as ``ModelSettings.lora_path`` (scale 1). A control vector has no
    server setting: it is set on the context of the model the server loaded (its ``LlamaProxy``),
    and again on every model the proxy loads later. llama-cpp-python keeps one server per
    process (module globals): build one app at a time.

    Args:
        model_path: the base GGUF.
        lora_path: ablation adapter (e.g. :attr:`Steering.lora_path`), or None.
        control_vector: llama.cpp layer ``N`` -> ``(n_embd,)`` (e.g. :attr:`Steering.control_vector`).
        n_ctx: context size.
        n_gpu_layers: layers to offload (-1 = all).
        model_alias: the model name clients see (default: the file's name, never its path on this machine).
        api_key: require this bearer token (recommended when not bound to localhost).
        verbose: llama.cpp's loading log.
        describe: JSON-able description served at ``GET /pyrefusal/steering`` (e.g.
            :meth:`Steering.describe`).
        **model_settings: other ``llama_cpp.server.settings.ModelSettings`` fields.

    Returns:
        The FastAPI app (run it with uvicorn, or use :func:`serve`).

    Raises:
        SteeringError: the server extras are missing, ``CONFIG_FILE`` is set (llama-cpp-python
            would ignore these settings), or the control vector cannot be set.
    """
    _require_server_extras()
    from llama_cpp.server import app as server_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    if os.environ.get("CONFIG_FILE"):
        raise SteeringError(
            "CONFIG_FILE is set: llama-cpp-python's server would load that configuration instead of the steered "
            "model. Unset CONFIG_FILE."
        )
    for key in ("model", "lora_path", "lora_base"):
        if key in model_settings:
            raise SteeringError(f"{key} is set by pyrefusal's steering; do not pass it in model_settings")
    settings = ModelSettings(
        model=str(model_path),
        lora_path=str(lora_path) if lora_path is not None else None,
        n_ctx=n_ctx,
        n_gpu_layers=n_gpu_layers,
        model_alias=model_alias or Path(model_path).name,
        verbose=verbose,
        **model_settings,
    )
    app = server_app.create_app(server_settings=ServerSettings(api_key=api_key), model_settings=[settings])
    vectors = {int(n): np.asarray(v, dtype=np.float32) for n, v in (control_vector or {}).items()}
    if vectors:
        proxy = server_app._llama_proxy  # the LlamaProxy create_app made; it loaded the default model
        if proxy is None or proxy._current_model is None:
            raise SteeringError("llama-cpp-python's server did not load the model; cannot set the control vector")
        load = proxy.load_llama_from_model_settings

        def steer(llama: llama_cpp.Llama) -> llama_cpp.Llama:
            set_control_vector(llama.ctx, vectors, llama.n_embd(), capi.model_n_layer(llama.model))
            return llama

        steer(proxy._current_model)
        proxy.load_llama_from_model_settings = lambda s: steer(load(s))  # models the proxy reloads later
    info = dict(describe) if describe is not None else {"lora_path": lora_path and str(lora_path)}
    info.setdefault("cvec_layers", sorted(vectors))
    app.state.pyrefusal_steering = info

    @app.get("/pyrefusal/steering")
    def steering_info() -> dict[str, Any]:
        return info

    app.add_middleware(RequestValidator, n_ctx=n_ctx)
    return app


#: Roles a chat message may have (OpenAI's and llama-cpp-python's).
CHAT_ROLES = ("system", "user", "assistant", "tool", "function", "developer")
#: ``max_tokens`` of a request that gives none: generation is always bounded (at most the context).
DEFAULT_MAX_TOKENS = 512
_MAX_BODY = 16 << 20  # bytes: a bigger request body is refused (413)
_GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/engines/copilot-codex/completions")


def check_request(path: str, body: bytes, *, n_ctx: int) -> tuple[int, str] | dict[str, Any]:
    """Validate a generation request's body before llama-cpp-python sees it.

    Returns:
        The request as a dict (``max_tokens`` filled in when absent: at most ``min(DEFAULT_MAX_TOKENS, n_ctx)``), or
        ``(HTTP status, message)`` for a client error: 400 for a body that is not UTF-8 JSON, 422 for a JSON
        object whose fields are wrong (``messages`` not a non-empty list of ``{role, content: str}``, ``prompt``
        not text, ``max_tokens`` not an integer in 1..n_ctx, ...). Messages never contain server paths.
    """
    try:
        req = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        return 400, "the request body is not UTF-8"
    except (ValueError, RecursionError) as e:
        return 400, f"the request body is not valid JSON ({str(e)[:120]})"
    if not isinstance(req, dict):
        return 422, f"the request body must be a JSON object, not {type(req).__name__}"
    if path.endswith("/chat/completions"):
        msgs = req.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return 422, "`messages` must be a non-empty list of {role, content} objects"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                return 422, f"messages[{i}] must be an object with `role` and `content`"
            if m.get("role") not in CHAT_ROLES:
                return 422, f"messages[{i}].role must be one of {list(CHAT_ROLES)}, got {str(m.get('role'))[:40]!r}"
            if not isinstance(m.get("content"), str):
                return 422, f"messages[{i}].content must be a string"
    else:
        prompt = req.get("prompt", "")
        ok = isinstance(prompt, str) or (
            isinstance(prompt, list) and all(isinstance(x, str) or (isinstance(x, int) and x >= 0) for x in prompt)
        )
        if not ok:
            return 422, "`prompt` must be a string, a list of strings or a list of token ids"
    for key in ("max_tokens", "max_completion_tokens"):
        v = req.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= n_ctx:
            return 422, f"`{key}` must be an integer in 1..{n_ctx} (the context size), got {str(v)[:40]}"
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repeat_penalty"):
        v = req.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            return 422, f"`{key}` must be a finite number"
    if req.get("max_tokens") is None and req.get("max_completion_tokens") is None:
        req["max_tokens"] = min(DEFAULT_MAX_TOKENS, n_ctx)
    return req


class RequestValidator:
    """ASGI middleware in front of llama-cpp-python's app: client errors get 400/422 with a message (never a 500
    or a server path), and every generation is bounded (:func:`check_request`)."""

    def __init__(self, app: Any, *, n_ctx: int) -> None:
        self.app, self.n_ctx = app, n_ctx

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in _GENERATION_ROUTES:
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > _MAX_BODY:
                await _json_error(send, 413, f"the request body is larger than {_MAX_BODY >> 20} MiB")
                return
        checked = check_request(scope["path"], b"".join(chunks), n_ctx=self.n_ctx)
        if isinstance(checked, tuple):
            await _json_error(send, *checked)
            return
        body = json.dumps(checked).encode("utf-8")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _json_error(send: Any, status: int, message: str) -> None:
    """An OpenAI-style error response."""
    kind = "invalid_request_error"
    payload = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model_path: str | os.PathLike[str],
    lora_path: str | os.PathLike[str] | None = None,
    *,
    control_vector: Mapping[int, np.ndarray] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    log_level: str = "info",
    **app_kwargs: Any,
) -> None:
    """Serve the steered model on an OpenAI-compatible HTTP endpoint (blocks until stopped).

    Clients use ``http://HOST:PORT/v1`` (``/v1/chat/completions``, ``/v1/completions``,
    ``/v1/models``). For a run: ``st = steering_from_run(...)``; ``serve(st.model_path,
    st.lora_path, control_vector=st.control_vector, describe=st.describe())``.

    Args:
        model_path: the base GGUF.
        lora_path: ablation adapter, or None.
        control_vector: llama.cpp layer -> vector, or None.
        host: listen address (default localhost only; the server has no auth without ``api_key``).
        port: listen port.
        api_key: bearer token clients must send.
        log_level: uvicorn's log level.
        **app_kwargs: passed to :func:`build_app` (``n_ctx``, ``n_gpu_layers``, ``model_alias``, ...).

    Raises:
        SteeringError: as :func:`build_app` (missing extras: ``pip install "pyrefusal[serve]"``).
    """
    _require_server_extras()
    import uvicorn

    if not _is_loopback(host):
        _LOG.warning(
            "serving on %s: reachable from other machines%s", host, "" if api_key else " with NO authentication"
        )
    app = build_app(model_path, lora_path, control_vector=control_vector, api_key=api_key, **app_kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
