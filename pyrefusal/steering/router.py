"""The one decider of how an intervention is applied: pyrefusal's hook, an ablation LoRA, a control vector.

An :class:`~pyrefusal.method.intervention.Intervention` says *what* to do to the residual stream. This
module decides *how*, from three facts only: the intervention, the model file (its LoRA support, read from
the GGUF header by :func:`~pyrefusal.steering.export.ablation_lora_support`) and the requested path. Every
user of an intervention asks it: :func:`arm` (pyrefusal's :class:`~pyrefusal.runtime.runtime.Runtime`),
and :class:`~pyrefusal.steering.steered.SteeredModel`, ``pyrefusal chat`` and ``pyrefusal serve``
(llama-cpp-python's own ``Llama``, which has no hook), so the choices and the errors are the same everywhere.

The paths (``path=``, :data:`PathChoice`):
    * ``"hook"``: pyrefusal's eval callback edits the residual nodes (:func:`plan`); exact for
      every intervention, but every observed node costs a device sync. Only a Runtime has it.
    * ``"graph"``: llama.cpp's own in-graph adapters, no syncs. Ablation = a rank-k LoRA on
      the writing matrices (:mod:`pyrefusal.steering.export`, cached per model and direction); addition
      at block input ``L >= 2`` = control vector ``direction.(L-1)``; ``harm_ablation`` at
      ``L >= 2`` = the LoRA + ``+r`` at ``direction.(L-1)`` and ``-r`` at ``direction.L``
      (the LoRA keeps every write free of ``r``, so subtracting ``r`` after block ``L`` is what
      the hook's ablation there removes). Parts without an exact in-graph form stay on the hook
      ("graph+hook"): additions at block input 0/1, and the embeddings of models whose LM head
      is tied to ``token_embd.weight``. Without a hook (a ``Llama``) those parts are errors, except
      tied embeddings with ``allow_inexact=True`` (the LoRA then leaves them out; :attr:`Route.exact` is False).
    * ``"auto"``: ``"graph"`` where it is exact, else the hook (other architectures, biases on
      writers, additions combined with ablation).

Imports :mod:`pyrefusal.method.intervention` (values), :mod:`pyrefusal.steering.export` and runtime types;
nothing imports this module from below (no import cycle).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import llama_cpp  # noqa: F401  (import llama_cpp before numpy: required in CUDA processes)

import numpy as np

from pyrefusal.errors import HookError
from pyrefusal.families import ResidualNodes
from pyrefusal.method.intervention import Addition, Intervention, orthonormalize
from pyrefusal.runtime import ModelRunner, PlanEntry
from pyrefusal.steering import export

__all__ = [
    "HookPlan",
    "PathChoice",
    "Route",
    "SteeringError",
    "arm",
    "decide",
    "disarm",
    "plan",
    "route",
]

_LOG = logging.getLogger(__name__)

#: How an intervention may be applied (see the module docstring).
PathChoice = Literal["auto", "hook", "graph"]
#: A compiled hook plan: node -> operations, orthonormal directions (k, n_embd), vectors (n_embd,).
HookPlan = tuple[dict[str, PlanEntry], "np.ndarray | None", list[np.ndarray]]

# A within-block addition must lie in the ablated span (relative residual) for the graph form.
_SPAN_TOL = 1e-4
_LORA_NOTE = "rank-k LoRA on every attn_output/ffn_down write and the token embeddings (scale 1)"
_HOOK_FIX = "Use path='auto' (falls back to the hook) or path='hook'."
_RUNTIME_FIX = (
    "Apply it with pyrefusal's Runtime, whose hook is exact for every intervention "
    "(pyrefusal.steering.arm(runtime, intervention, path='auto'))."
)


class SteeringError(HookError):
    """An intervention cannot be applied to a model the way it was asked (path, model file, adapters).

    A :class:`~pyrefusal.errors.HookError`, so code that catches hook errors from :func:`arm` still does.
    """


@dataclass(frozen=True)
class Route:
    """How an intervention is applied to one model.

    Attributes:
        path: ``"hook"``, ``"graph"`` or ``"graph+hook"`` (in-graph adapters plus the hook on a
            few nodes).
        reason: why, and how it is applied (fallbacks name what prevents the graph path).
        lora_directions: orthonormal ``(k, n_embd)`` ablated by a LoRA adapter, or None.
        lora_embeddings: ``"lora"`` when the adapter also ablates the token embeddings,
            ``"skip"`` when it leaves them out (tied LM head: the hook does them, or nobody
            when there is no hook and ``allow_inexact=True``).
        cvec: llama.cpp control vector, layer ``N`` -> float32 ``(n_embd,)`` added to ``l_out-N``.
        hook: the hook's part, or None.
        exact: False only for the LoRA without embeddings that ``allow_inexact=True`` accepts.
    """

    path: str
    reason: str
    lora_directions: np.ndarray | None = None
    lora_embeddings: Literal["lora", "skip"] = "lora"
    cvec: dict[int, np.ndarray] = field(default_factory=dict)
    hook: HookPlan | None = None
    exact: bool = True


def _check(intervention: Intervention, n_layer: int, n_embd: int) -> np.ndarray | None:
    """Validate widths and layers; the orthonormal ablated directions ``(k, n_embd)`` float32, or None."""
    dirs = None
    if intervention.ablate is not None:
        a = np.atleast_2d(np.asarray(intervention.ablate))  # (k, n_embd)
        if a.shape[1] != n_embd:
            raise SteeringError(
                f"ablation direction has width {a.shape[1]} but the model has n_embd={n_embd}; "
                "the direction was computed for another model"
            )
        dirs = orthonormalize(a)
    for add in intervention.additions:
        width = np.asarray(add.vector).reshape(-1).shape[0]
        if width != n_embd:
            raise SteeringError(
                f"addition vector has width {width} but the model has n_embd={n_embd}; "
                "the direction was computed for another model"
            )
        if not 0 <= add.layer < n_layer:
            raise SteeringError(
                f"addition layer {add.layer} is outside the model's block inputs 0..{n_layer - 1}; "
                "pick a block input of this model"
            )
    return dirs


def plan(intervention: Intervention, nodes: ResidualNodes, n_layer: int, n_embd: int) -> HookPlan:
    """Compile an intervention into a hook plan.

    Returns:
        ``(plan, directions, vectors)``: node name -> PlanEntry; orthonormal float32
        ``(k, n_embd)`` or None; addition vectors ``(n_embd,)`` (one per steered node, summed).

    Raises:
        SteeringError: wrong widths or layers out of range.
        HookError: a zero or non-finite ablation direction.
    """
    entries: dict[str, PlanEntry] = {}
    dirs = _check(intervention, n_layer, n_embd)
    if dirs is not None:
        for name in nodes.ablation_nodes(n_layer):
            entries[name] = PlanEntry(ablate=True)
    sums: dict[str, np.ndarray] = {}
    for add in intervention.additions:
        v = np.asarray(add.vector, dtype=np.float64).reshape(-1)  # (n_embd,)
        targets = [nodes.block_input(add.layer)]
        if add.within_block:
            targets.append(nodes.attn_resid.format(il=add.layer))
        for t in targets:
            sums[t] = sums.get(t, np.zeros(n_embd)) + add.coeff * v
    vectors: list[np.ndarray] = []
    for name, v in sums.items():
        prev = entries.get(name, PlanEntry())
        entries[name] = PlanEntry(ablate=prev.ablate, add_index=len(vectors), capture_layer=prev.capture_layer)
        vectors.append(v.astype(np.float32))
    return entries, dirs, vectors


def decide(
    intervention: Intervention,
    model_path: str | os.PathLike[str],
    n_layer: int,
    n_embd: int,
    path: PathChoice = "auto",
    *,
    nodes: ResidualNodes | None = None,
    allow_inexact: bool = False,
) -> Route:
    """Decide how ``intervention`` is applied to the model in ``model_path`` (no side effects).

    Args:
        intervention: what to apply.
        model_path: the base GGUF (its header says whether a LoRA ablation is exact).
        n_layer: the model's block count.
        n_embd: the model's residual width.
        path: ``"hook"``, ``"graph"`` or ``"auto"`` (see the module docstring).
        nodes: the residual node names when pyrefusal's hook is available (a Runtime); None for
            llama-cpp-python's ``Llama``, which runs in-graph adapters only.
        allow_inexact: without a hook, accept a LoRA that leaves out the token embeddings of a
            model whose LM head is tied to them (not the full ablation; the route says ``exact=False``).

    Returns:
        The :class:`Route`.

    Raises:
        SteeringError: bad widths or layers, an unknown ``path``, ``path="hook"`` without a hook,
            or a part that only the hook applies exactly when ``path="graph"`` or no hook exists;
            every message says how to apply the intervention instead.
    """
    if path not in ("auto", "hook", "graph"):
        raise SteeringError(f"path must be 'auto', 'hook' or 'graph', got {path!r}")
    model_path = Path(model_path)
    if nodes is None:
        if path == "hook":
            raise SteeringError(
                "path='hook' needs pyrefusal's Runtime (its eval-callback hook); llama-cpp-python's Llama runs "
                "only in-graph adapters. Use path='auto' or 'graph', or pyrefusal's Runtime."
            )
        dirs = _check(intervention, n_layer, n_embd)
        compiled: HookPlan | None = None
    else:
        compiled = plan(intervention, nodes, n_layer, n_embd)  # validates widths and layers
        dirs = compiled[1]
        if path == "hook":
            return Route("hook", "hook requested", hook=compiled)

    def hook_only(reason: str) -> Route:
        if compiled is None:
            raise SteeringError(
                f"{intervention.name!r} has no exact form in llama.cpp's graph: {reason}. {_RUNTIME_FIX}"
            )
        if path == "graph":
            raise SteeringError(f"{intervention.name!r} has no exact form in llama.cpp's graph: {reason}. {_HOOK_FIX}")
        return Route("hook", reason, hook=compiled)

    cvec: dict[int, np.ndarray] = {}
    notes: list[str] = []
    hook_adds: list[Addition] = []

    def add_cvec(n: int, u: np.ndarray) -> None:
        cvec[n] = cvec.get(n, np.zeros(n_embd)) + u

    if dirs is not None:
        support = export.ablation_lora_support(model_path)
        if not support.exact:
            return hook_only(f"a LoRA cannot ablate exactly on {model_path.name}: {support.reason}")
        d = dirs.astype(np.float64)  # (k, n_embd)
        for add in intervention.additions:
            u = add.coeff * np.asarray(add.vector, dtype=np.float64).reshape(-1)  # (n_embd,)
            if not add.within_block:
                return hook_only(
                    "an addition combined with ablation is partly removed again at the next ablated node; "
                    "only the hook has those semantics"
                )
            if add.layer < 2:
                return hook_only(
                    f"the within-block addition at block input {add.layer} would be control vector "
                    f"direction.{add.layer - 1}; llama.cpp steers direction.1 and later only (block input >= 2)"
                )
            off_span = np.linalg.norm(u - d.T @ (d @ u))
            if off_span > _SPAN_TOL * max(np.linalg.norm(u), 1e-30):
                return hook_only(
                    "the within-block addition is not in the span of the ablated directions, so the hook would "
                    "add part of it twice; only the hook has those semantics"
                )
            add_cvec(add.layer - 1, u)  # enters block `layer`
            add_cvec(add.layer, -u)  # what the hook's ablation removes after block `layer`
            notes.append(
                f"the within-block addition at block input {add.layer} by control vectors "
                f"direction.{add.layer - 1} and direction.{add.layer}"
            )
        embeddings: Literal["lora", "skip"] = "lora"
        hook: HookPlan | None = None
        exact, reason = True, _LORA_NOTE
        if support.tied_embeddings:
            embeddings = "skip"
            if nodes is not None:
                hook = ({nodes.embd: PlanEntry(ablate=True)}, dirs, [])
                reason = (
                    "rank-k LoRA on every attn_output/ffn_down write (scale 1); LM head tied to token_embd.weight: "
                    "the embeddings are ablated by the hook at node embd"
                )
            else:
                msg = (
                    f"{model_path.name} ties its LM head to token_embd.weight, so the ablation LoRA must leave the "
                    "token embeddings out: their component along the direction stays, which is not the full ablation"
                )
                if not allow_inexact:
                    raise SteeringError(
                        f"{msg}. For the exact ablation use pyrefusal's Runtime, whose hook ablates the embeddings "
                        "(pyrefusal.steering.arm(runtime, ablation(r), path='auto')); or pass allow_inexact=True "
                        "(--allow-inexact) to accept the LoRA without the embeddings."
                    )
                exact, reason = False, msg + " (allow_inexact=True)"
        return Route(
            "graph+hook" if hook else "graph",
            "; ".join([reason, *notes]),
            lora_directions=dirs,
            lora_embeddings=embeddings,
            cvec={n: v.astype(np.float32) for n, v in cvec.items()},
            hook=hook,
            exact=exact,
        )

    for add in intervention.additions:
        u = add.coeff * np.asarray(add.vector, dtype=np.float64).reshape(-1)  # (n_embd,)
        if add.within_block:
            return hook_only(
                "a within-block addition without ablation is added again at ffn_inp; only the hook does that"
            )
        if add.layer >= 2:
            add_cvec(add.layer - 1, u)
            notes.append(
                f"control vector direction.{add.layer - 1}: {add.coeff:+g} * r added to the input of block "
                f"{add.layer}, every token"
            )
        elif compiled is None:
            return hook_only(
                f"an addition at block input {add.layer} would be control-vector direction.{add.layer - 1}; "
                "llama.cpp only steers direction.1 and later (block input >= 2)"
            )
        else:
            hook_adds.append(add)
            notes.append(f"the addition at block input {add.layer} is done by the hook (no direction.0)")
    hook = None
    if hook_adds:
        assert nodes is not None  # hook_adds only when the hook exists
        hook = plan(Intervention(intervention.name, additions=tuple(hook_adds)), nodes, n_layer, n_embd)
    if hook is not None and not cvec:
        return hook_only("; ".join(notes))
    return Route(
        "graph+hook" if hook else "graph",
        "; ".join(notes) if notes else "nothing to apply",
        cvec={n: v.astype(np.float32) for n, v in cvec.items()},
        hook=hook,
    )


def route(runtime: ModelRunner, intervention: Intervention, path: PathChoice = "auto") -> Route:
    """Decide how ``intervention`` is applied to ``runtime`` (no side effects on the runtime).

    Args:
        runtime: a :class:`~pyrefusal.runtime.runtime.Runtime` (its hook is available).
        intervention: what to apply.
        path: ``"hook"``; ``"graph"`` (llama.cpp's adapters, plus the hook only on the nodes
            they cannot reach: block inputs 0/1, tied embeddings; an error where ``"auto"``
            would fall back to the hook entirely); or ``"auto"`` (``"graph"`` where exact, else
            the hook).

    Returns:
        The :class:`Route` (:func:`decide` for the runtime's model file, with its hook).

    Raises:
        SteeringError: as :func:`decide`.
    """
    return decide(intervention, runtime.path, runtime.n_layer, runtime.n_embd, path, nodes=runtime.nodes)


def disarm(runtime: ModelRunner) -> None:
    """Remove every intervention from ``runtime``: hook plan, control vector and LoRA adapters."""
    runtime.clear_plan()
    runtime.set_control_vector(None)
    runtime.set_lora(None)


def arm(runtime: ModelRunner, intervention: Intervention, path: PathChoice = "hook") -> str:
    """Apply ``intervention`` to ``runtime``, replacing whatever was armed before.

    Undo with :func:`disarm` or ``runtime.clear_plan()`` (both remove hook plans, LoRAs and control vectors).

    Args:
        runtime: a :class:`~pyrefusal.runtime.runtime.Runtime`.
        intervention: what to apply.
        path: ``"hook"`` (default, pyrefusal's eval callback), ``"graph"`` or ``"auto"``; see
            :func:`route`. Ablation LoRAs are built once per (model sha256, direction) under
            ``registry.cache_dir() / "adapters"``.

    Returns:
        The path used: ``"hook"``, ``"graph"`` or ``"graph+hook"``.

    Raises:
        SteeringError: as :func:`route`, or the ablation LoRA cannot be built (``path="graph"``).
        HookError: the runtime rejects the plan.
    """
    r = route(runtime, intervention, path)
    disarm(runtime)
    try:
        if r.lora_directions is not None:
            try:
                adapter = export.cached_ablation_lora(
                    runtime.path, r.lora_directions, model_sha256=runtime.sha256, embeddings=r.lora_embeddings
                )
            except export.ExportError as e:
                if path != "auto":
                    raise SteeringError(f"cannot build the ablation LoRA: {e}. Use path='auto' or 'hook'.") from e
                _LOG.warning("ablation LoRA unavailable (%s); using the hook", e)
                compiled = plan(intervention, runtime.nodes, runtime.n_layer, runtime.n_embd)
                r = Route("hook", f"ablation LoRA unavailable: {e}", hook=compiled)
            else:
                runtime.set_lora([(adapter, 1.0)])
        if r.cvec:
            runtime.set_control_vector(r.cvec)
        if r.hook is not None:
            runtime.set_plan(*r.hook)
    except BaseException:
        disarm(runtime)
        raise
    _LOG.info("armed %s via %s (%s)", intervention.name, r.path, r.reason)
    return r.path
