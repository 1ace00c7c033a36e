"""Interventions on the residual stream, as values: what to do, not how.

An :class:`Intervention` is a spec (directions, layers, coefficients) that can be saved in a run. The
conditions of the paper are built by :func:`baseline`, :func:`ablation`, :func:`actadd`, :func:`induce` and
:func:`harm_ablation`. How one is applied to a model (pyrefusal's hook, an ablation LoRA, a llama.cpp control
vector) is decided in one place, :mod:`pyrefusal.steering.router` (``arm``, ``route``, ``plan``).

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

Imports only NumPy and :mod:`pyrefusal.errors` (no llama_cpp, no runtime): the method layer holds values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pyrefusal.errors import HookError
from pyrefusal.method.directions import random_like


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
    """No intervention (the model as it is)."""
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


def paper_conditions(direction: np.ndarray, layer: int, *, seed: int) -> dict[str, Intervention]:
    """The intervention of every condition ``pyrefusal run`` knows, from the selected direction ``(n_embd,)``
    and its layer: ``baseline``, ``ablation``, ``actadd`` (``-r`` at ``layer``), ``induce`` (``+r`` there),
    ``harm_ablation`` (the paper's, docs/method.md §5.3) and ``random_ablation`` (a random direction of the
    same norm, seeded: the control)."""
    return {
        "baseline": baseline(),
        "ablation": ablation(direction),
        "actadd": actadd(direction, layer, coeff=-1.0),
        "induce": induce(direction, layer, coeff=1.0),
        "harm_ablation": harm_ablation(direction, layer),
        "random_ablation": Intervention("random_ablation", ablate=random_like(direction, seed=seed)),
    }
