"""Interventions on the residual stream, as values: what to do, not how.

An :class:`Intervention` is a spec (directions, layers, coefficients) that can be saved in
a run and applied to a :class:`~pyrefusal.runtime.runtime.Runtime` by :func:`arm`. The conditions of
the paper are built by :func:`baseline`, :func:`ablation`, :func:`actadd`, :func:`induce` and
:func:`harm_ablation`.

Semantics (Arditi et al. 2024; Wang et al. 2025, docs/method.md §5):
    * Directional ablation ``x <- x - (x.r̂) r̂`` of every write into the residual stream at
      every layer and token: the embeddings, the attention output and the MLP output of each
      block. For pre-norm blocks this equals ablating the residual stream after each write,
      which is what the hook does (nodes ``embd``, ``ffn_inp-il``, ``l_out-il``).
    * Activation addition ``x <- x + a*r`` at the input of block ``layer``, every token.
    * The paper's ``harm_ablation`` = ablation everywhere + ``+1*r`` at the input of the
      selected block, where the addition survives through that block (its attention and MLP
      outputs are ablated, not the stream) and is removed at the next block's input. The hook
      reproduces that by re-adding ``r`` after ablating the stream inside that block.

Two ways to apply them (:func:`arm`, ``path=``):
    * ``"hook"``: pyrefusal's eval callback edits the residual nodes (:func:`plan`); exact for
      every intervention, but every observed node costs a device sync.
    * ``"graph"``: llama.cpp's own in-graph adapters, no syncs. Ablation = a rank-k LoRA on
      the writing matrices (:mod:`pyrefusal.steering.export`, cached per model and direction); addition
      at block input ``L >= 2`` = control vector ``direction.(L-1)``; ``harm_ablation`` at
      ``L >= 2`` = the LoRA + ``+r`` at ``direction.(L-1)`` and ``-r`` at ``direction.L``
      (the LoRA keeps every write free of ``r``, so subtracting ``r`` after block ``L`` is what
      the hook's ablation there removes). Parts without an exact in-graph form stay on the hook
      ("graph+hook"): additions at block input 0/1, and the embeddings of models whose LM head
      is tied to ``token_embd.weight``. ``"auto"`` takes the graph where it is exact and the
      hook otherwise (other architectures, biases on writers, additions combined with ablation).

Imports only NumPy and :mod:`pyrefusal.runtime.runtime` types at module level; :mod:`pyrefusal.steering.export`
(which imports this module) is imported when the graph path is used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import llama_cpp  # noqa: F401  (import llama_cpp before numpy: required in CUDA processes)

import numpy as np

from pyrefusal.errors import HookError
from pyrefusal.runtime.runtime import PlanEntry, ResidualNodes

_LOG = logging.getLogger(__name__)

#: How :func:`arm` may apply an intervention.
PathChoice = Literal["auto", "hook", "graph"]
#: A compiled hook plan: node -> operations, orthonormal directions (k, n_embd), vectors (n_embd,).
HookPlan = tuple[dict[str, PlanEntry], "np.ndarray | None", list[np.ndarray]]

# A within-block addition must lie in the ablated span (relative residual) for the graph form.
_SPAN_TOL = 1e-4


def orthonormalize(directions: np.ndarray) -> np.ndarray:
    """Orthonormal basis (rows) of the span of ``directions``.

    Args:
        directions: ``(n_embd,)`` or ``(k, n_embd)``.

    Returns:
        float32 ``(k', n_embd)`` with orthonormal rows (k' = rank), oriented as Gram-Schmidt
        would (a single direction ``r`` gives ``r / ||r||``, not its negative).

    Raises:
        HookError: a zero or non-finite direction.
    """
    d = np.atleast_2d(np.asarray(directions, dtype=np.float64))  # (k, n_embd)
    if not np.all(np.isfinite(d)):
        raise HookError("direction contains NaN or inf; recompute it")
    if np.any(np.linalg.norm(d, axis=1) == 0):
        raise HookError("a zero direction cannot be ablated; check the direction file")
    q, r = np.linalg.qr(d.T)  # q: (n_embd, k)
    diag = np.diag(r)
    q = q * np.where(diag < 0, -1.0, 1.0)  # Gram-Schmidt orientation: row i . directions[i] > 0
    keep = np.abs(diag) > 1e-10 * np.abs(r).max()
    return np.ascontiguousarray(q[:, keep].T, dtype=np.float32)


@dataclass(frozen=True)
class Addition:
    """Add ``coeff * vector`` to the residual stream entering block ``layer``.

    Attributes:
        vector: ``(n_embd,)``, raw (its norm matters).
        layer: block index whose input is steered (``0..n_layer-1``).
        coeff: scale (the paper's jailbreak ActAdd uses -1, induce-refusal +1).
        within_block: keep the addition inside block ``layer`` even when the stream is ablated
            there (the paper's ``harm_ablation`` hook order).
    """

    vector: np.ndarray
    layer: int
    coeff: float = 1.0
    within_block: bool = False


@dataclass(frozen=True)
class Intervention:
    """A named set of operations on the residual stream.

    Attributes:
        name: condition name used in results (``baseline``, ``ablation``, ...).
        ablate: directions to ablate at every layer, ``(k, n_embd)`` or ``(n_embd,)``; None = none.
        additions: activation additions.
    """

    name: str
    ablate: np.ndarray | None = None
    additions: tuple[Addition, ...] = field(default_factory=tuple)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (no vectors)."""
        return {
            "name": self.name,
            "ablation_directions": 0 if self.ablate is None else int(np.atleast_2d(self.ablate).shape[0]),
            "additions": [
                {
                    "layer": a.layer,
                    "coeff": a.coeff,
                    "norm": float(np.linalg.norm(a.vector)),
                    "within_block": a.within_block,
                }
                for a in self.additions
            ],
        }


def baseline() -> Intervention:
    return Intervention("baseline")


def ablation(direction: np.ndarray) -> Intervention:
    """Directional ablation of ``direction`` at every layer and position."""
    return Intervention("ablation", ablate=np.asarray(direction))


def actadd(direction: np.ndarray, layer: int, coeff: float = -1.0) -> Intervention:
    """Activation addition ``coeff * r`` at the input of block ``layer`` (paper's jailbreak: coeff -1)."""
    return Intervention("actadd", additions=(Addition(np.asarray(direction), layer, coeff),))


def induce(direction: np.ndarray, layer: int, coeff: float = 1.0) -> Intervention:
    """Arditi's induced refusal: ``+coeff * r`` at the input of block ``layer`` (used on harmless prompts)."""
    return Intervention("induce", additions=(Addition(np.asarray(direction), layer, coeff),))


def harm_ablation(direction: np.ndarray, layer: int, coeff: float = 1.0) -> Intervention:
    """The paper's multilingual condition: ablation everywhere + ``+coeff*r`` at block ``layer``."""
    return Intervention(
        "harm_ablation",
        ablate=np.asarray(direction),
        additions=(Addition(np.asarray(direction), layer, coeff, within_block=True),),
    )


def plan(
    intervention: Intervention, nodes: ResidualNodes, n_layer: int, n_embd: int
) -> tuple[dict[str, PlanEntry], np.ndarray | None, list[np.ndarray]]:
    """Compile an intervention into a hook plan.

    Returns:
        ``(plan, directions, vectors)``: node name -> PlanEntry; orthonormal float32
        ``(k, n_embd)`` or None; addition vectors ``(n_embd,)`` (one per steered node, summed).

    Raises:
        HookError: wrong widths or layers out of range.
    """
    entries: dict[str, PlanEntry] = {}
    dirs = None
    if intervention.ablate is not None:
        a = np.atleast_2d(np.asarray(intervention.ablate))
        if a.shape[1] != n_embd:
            raise HookError(
                f"ablation direction has width {a.shape[1]} but the model has n_embd={n_embd}; "
                "the direction was computed for another model"
            )
        dirs = orthonormalize(a)
        for name in nodes.ablation_nodes(n_layer):
            entries[name] = PlanEntry(ablate=True)
    sums: dict[str, np.ndarray] = {}
    for add in intervention.additions:
        v = np.asarray(add.vector, dtype=np.float64).reshape(-1)
        if v.shape[0] != n_embd:
            raise HookError(f"addition vector has width {v.shape[0]} but the model has n_embd={n_embd}")
        if not 0 <= add.layer < n_layer:
            raise HookError(f"addition layer {add.layer} outside 0..{n_layer - 1}")
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


# --- applying interventions ----------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """How :func:`arm` applies an intervention to a runtime.

    Attributes:
        path: ``"hook"``, ``"graph"`` or ``"graph+hook"`` (in-graph adapters plus the hook on a
            few nodes).
        reason: why (fallbacks name what prevents the graph path).
        lora_directions: orthonormal ``(k, n_embd)`` ablated by a LoRA adapter, or None.
        lora_embeddings: ``"lora"`` when the adapter also ablates the token embeddings,
            ``"skip"`` when the hook does it (tied LM head).
        cvec: llama.cpp control vector, layer ``N`` -> ``(n_embd,)`` added to ``l_out-N``.
        hook: the hook's part, or None.
    """

    path: str
    reason: str
    lora_directions: np.ndarray | None = None
    lora_embeddings: Literal["lora", "skip"] = "lora"
    cvec: dict[int, np.ndarray] = field(default_factory=dict)
    hook: HookPlan | None = None


def _hook_only(intervention: Intervention, path: PathChoice, reason: str, compiled: HookPlan) -> Route:
    if path == "graph":
        raise HookError(
            f"{intervention.name!r} has no exact form in llama.cpp's graph: {reason}. Use path='auto' (falls back "
            "to the hook) or path='hook'."
        )
    return Route("hook", reason, hook=compiled)


def route(runtime: Any, intervention: Intervention, path: PathChoice = "auto") -> Route:
    """Decide how ``intervention`` is applied to ``runtime`` (no side effects on the runtime).

    Args:
        runtime: a :class:`~pyrefusal.runtime.runtime.Runtime`.
        intervention: what to apply.
        path: ``"hook"``; ``"graph"`` (llama.cpp's adapters, plus the hook only on the nodes
            they cannot reach: block inputs 0/1, tied embeddings; an error where ``"auto"``
            would fall back to the hook entirely); or ``"auto"`` (``"graph"`` where exact, else
            the hook).

    Returns:
        The :class:`Route`.

    Raises:
        HookError: bad widths or layers (as :func:`plan`), an unknown ``path``, or
            ``path="graph"`` for an intervention that only the hook applies exactly.
    """
    if path not in ("auto", "hook", "graph"):
        raise HookError(f"path must be 'auto', 'hook' or 'graph', got {path!r}")
    n_layer, n_embd = runtime.n_layer, runtime.n_embd
    compiled = plan(intervention, runtime.nodes, n_layer, n_embd)  # validates widths and layers
    if path == "hook":
        return Route("hook", "hook requested", hook=compiled)

    from pyrefusal.steering import export  # imports this module; deferred to avoid an import cycle

    dirs = compiled[1]
    cvec: dict[int, np.ndarray] = {}
    notes: list[str] = []
    hook_adds: list[Addition] = []

    def add_cvec(n: int, u: np.ndarray) -> None:
        cvec[n] = cvec.get(n, np.zeros(n_embd)) + u

    if dirs is not None:
        support = export.ablation_lora_support(runtime.path)
        if not support.exact:
            return _hook_only(intervention, path, f"LoRA ablation not exact: {support.reason}", compiled)
        d = dirs.astype(np.float64)  # (k, n_embd)
        for add in intervention.additions:
            u = add.coeff * np.asarray(add.vector, dtype=np.float64).reshape(-1)  # (n_embd,)
            if not add.within_block:
                return _hook_only(
                    intervention,
                    path,
                    "an addition combined with ablation is partly removed again at the next ablated node; "
                    "only the hook has those semantics",
                    compiled,
                )
            if add.layer < 2:
                return _hook_only(
                    intervention,
                    path,
                    f"the within-block addition at block input {add.layer} would be control vector "
                    f"direction.{add.layer - 1}; llama.cpp steers direction.1 and later only",
                    compiled,
                )
            off_span = np.linalg.norm(u - d.T @ (d @ u))
            if off_span > _SPAN_TOL * max(np.linalg.norm(u), 1e-30):
                return _hook_only(
                    intervention,
                    path,
                    "the within-block addition is not in the span of the ablated directions, so the hook would "
                    "add part of it twice; only the hook has those semantics",
                    compiled,
                )
            add_cvec(add.layer - 1, u)  # enters block `layer`
            add_cvec(add.layer, -u)  # what the hook's ablation removes after block `layer`
        embeddings: Literal["lora", "skip"] = "lora"
        hook: HookPlan | None = None
        if support.tied_embeddings:
            embeddings = "skip"
            hook = ({runtime.nodes.embd: PlanEntry(ablate=True)}, dirs, [])
            notes.append("LM head tied to token_embd.weight: the embeddings are ablated by the hook at node embd")
        return Route(
            "graph+hook" if hook else "graph",
            "; ".join(["ablation by a LoRA adapter", *notes]),
            lora_directions=dirs,
            lora_embeddings=embeddings,
            cvec={n: v.astype(np.float32) for n, v in cvec.items()},
            hook=hook,
        )

    for add in intervention.additions:
        u = add.coeff * np.asarray(add.vector, dtype=np.float64).reshape(-1)
        if add.within_block:
            return _hook_only(
                intervention,
                path,
                "a within-block addition without ablation is added again at ffn_inp; only the hook does that",
                compiled,
            )
        if add.layer >= 2:
            add_cvec(add.layer - 1, u)
        else:
            hook_adds.append(add)
            notes.append(f"the addition at block input {add.layer} is done by the hook (no direction.0)")
    hook = None
    if hook_adds:
        hook = plan(Intervention(intervention.name, additions=tuple(hook_adds)), runtime.nodes, n_layer, n_embd)
    if hook is not None and not cvec:
        return _hook_only(intervention, path, "; ".join(notes), compiled)
    reason = "; ".join(["addition by a control vector" if cvec else "nothing to apply", *notes])
    return Route(
        "graph+hook" if hook else "graph",
        reason,
        cvec={n: v.astype(np.float32) for n, v in cvec.items()},
        hook=hook,
    )


def disarm(runtime: Any) -> None:
    """Remove every intervention from ``runtime``: hook plan, control vector and LoRA adapters."""
    runtime.clear_plan()
    runtime.set_control_vector(None)
    runtime.set_lora(None)


def arm(runtime: Any, intervention: Intervention, path: PathChoice = "hook") -> str:
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
        HookError: as :func:`route`, or the runtime rejects the plan.
    """
    r = route(runtime, intervention, path)
    disarm(runtime)
    try:
        if r.lora_directions is not None:
            from pyrefusal.steering import export

            try:
                adapter = export.cached_ablation_lora(
                    runtime.path, r.lora_directions, model_sha256=runtime.sha256, embeddings=r.lora_embeddings
                )
            except export.ExportError as e:
                if path != "auto":
                    raise HookError(f"cannot build the ablation LoRA: {e}. Use path='auto' or 'hook'.") from e
                _LOG.warning("ablation LoRA unavailable (%s); using the hook", e)
                r = Route("hook", f"ablation LoRA unavailable: {e}", hook=plan(intervention, *_shape(runtime)))
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


def _shape(runtime: Any) -> tuple[ResidualNodes, int, int]:
    return runtime.nodes, runtime.n_layer, runtime.n_embd
