"""The binding of pyrefusal's C++ hook (:mod:`pyrefusal._core`) to one model's decode graph.

The hook is a context's eval callback: on the graph nodes named in its *plan* it ablates directions, adds
vectors and captures rows of the residual stream (csrc/hook.h). :class:`HookBinding` checks a plan against the
names of this model's graph before arming it (an architecture whose residual nodes are named differently fails
with a message, not silently), validates the shapes of directions and vectors, and turns an error the callback
recorded during a decode into a :class:`~pyrefusal.errors.HookError`.

It does not decode: :class:`~pyrefusal.runtime.Runtime` gives it a ``probe`` that decodes one token, from which
the graph's node names are recorded (:meth:`HookBinding.graph_node_names`). Interventions are compiled into plans
by :func:`pyrefusal.steering.router.plan` and armed by :func:`pyrefusal.steering.router.arm`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import llama_cpp  # noqa: F401  (must be imported before numpy/gguf in CUDA processes, see docs)

import numpy as np

from pyrefusal import _core
from pyrefusal.errors import HookError
from pyrefusal.families import KNOWN_ARCHITECTURES, ResidualNodes

__all__ = ["HookBinding", "PlanEntry"]


@dataclass(frozen=True)
class PlanEntry:
    """Operations on one graph node (see csrc/hook.h)."""

    ablate: bool = False
    add_index: int = -1
    capture_layer: int = -1


class HookBinding:
    """pyrefusal's hook as one model's graph sees it (or no hook: a context created without one).

    Args:
        hook: the context's hook (None: the runtime was created with ``hook=False``; then arming or
            capturing raises, and the per-decode calls do nothing).
        arch: ``general.architecture`` of the model, for messages.
        n_layer, n_embd: the model's block count and residual width.
        nodes: the architecture's residual-stream node names.
        probe: decodes one token with the plan armed at the time (used once, to record the graph's
            node names); leaves the KV cache empty.
    """

    def __init__(
        self,
        hook: _core.Hook | None,
        *,
        arch: str,
        n_layer: int,
        n_embd: int,
        nodes: ResidualNodes,
        probe: Callable[[], None],
    ) -> None:
        self.hook = hook
        self.arch = arch
        self.n_layer = n_layer
        self.n_embd = n_embd
        self.nodes = nodes
        self._probe = probe
        self._graph_names: set[str] | None = None

    def require(self) -> _core.Hook:
        """The hook, for arming or capturing.

        Raises:
            HookError: the runtime has no hook (created with ``hook=False``).
        """
        if self.hook is None:
            raise HookError("this Runtime was created with hook=False; create it with hook=True to intervene")
        return self.hook

    def graph_node_names(self) -> set[str]:
        """Names of every node in this model's decode graph (recorded from a 1-token decode, once)."""
        if self._graph_names is None:
            hook = self.require()
            hook.set_plan({})
            hook.set_record_names(True)
            try:
                self._probe()
            finally:
                names = set(hook.recorded_names())
                hook.set_record_names(False)
            self._graph_names = names
        return self._graph_names

    def check_residual_nodes(self) -> None:
        """Fail before any work if this model's graph lacks a residual node the interventions edit.

        Raises:
            HookError: an architecture whose graph names its residual stream differently (pyrefusal
                knows :data:`KNOWN_ARCHITECTURES`); the message lists this graph's layer-0 nodes.
        """
        wanted = set(self.nodes.ablation_nodes(self.n_layer))
        missing = sorted(wanted - self.graph_node_names())
        if missing:
            raise HookError(
                f"the {self.arch!r} graph has no node(s) {missing[:6]}, which pyrefusal edits to ablate and add "
                f"directions; it knows the residual nodes of {sorted(KNOWN_ARCHITECTURES)}. Node names of this "
                f"model: {sorted(n for n in self.graph_node_names() if n.endswith('-0'))}. Use a model of a "
                "known architecture, or add its node names to pyrefusal.families.ARCHITECTURES."
            )

    def set_plan(
        self,
        plan: dict[str, PlanEntry],
        directions: np.ndarray | None = None,
        additions: Sequence[np.ndarray] = (),
    ) -> None:
        """Arm the hook: node plan, orthonormal ablation directions and addition vectors.

        Args:
            plan: node name -> operations; every name must exist in this model's graph.
            directions: float32 ``(k, n_embd)``, orthonormal rows (k may be 0).
            additions: vectors ``(n_embd,)`` referenced by ``PlanEntry.add_index``.

        Raises:
            HookError: no hook, a node name is not in the graph (unsupported architecture) or shapes are wrong.
        """
        hook = self.require()
        if plan:
            missing = sorted(set(plan) - self.graph_node_names())
            if missing:
                raise HookError(
                    f"the {self.arch!r} graph has no node(s) {missing[:6]}; pyrefusal knows the residual nodes of "
                    f"{sorted(KNOWN_ARCHITECTURES)}. Node names of this model: "
                    f"{sorted(n for n in self.graph_node_names() if n.endswith('-0'))}"
                )
        hook.clear()
        if directions is not None and len(directions):
            d = np.ascontiguousarray(directions, dtype=np.float32)  # (k, n_embd)
            if d.ndim != 2 or d.shape[1] != self.n_embd:
                raise HookError(f"ablation directions must be (k, {self.n_embd}); got {d.shape}")
            hook.set_directions(d)
        for v in additions:
            v = np.ascontiguousarray(v, dtype=np.float32)  # (n_embd,)
            if v.shape != (self.n_embd,):
                raise HookError(f"addition vector must be ({self.n_embd},); got {v.shape}")
            hook.add_vector(v)
        hook.set_plan({k: (e.ablate, e.add_index, e.capture_layer) for k, e in plan.items()})

    def clear(self) -> None:
        """Disarm the hook (plan, directions and vectors); nothing without a hook."""
        if self.hook is not None:
            self.hook.clear()

    def set_capture_rows(self, full: list[int], out: list[int]) -> None:
        """Row -> capture-slot maps for the next decode (``-1``: not captured): ``full`` for batch-sized tensors,
        ``out`` for output-pruned ones (the rows that request logits); nothing without a hook."""
        if self.hook is not None:
            self.hook.set_capture_rows(full, out)

    def raise_error(self) -> None:
        """After a decode: raise the error the hook recorded during it, if any.

        Raises:
            HookError: the callback failed (e.g. a node's shape did not match the plan).
        """
        err = self.hook.take_error() if self.hook is not None else ""
        if err:
            raise HookError(err)
