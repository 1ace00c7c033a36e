"""The search space of ``pyrefusal optimize`` as values: weight kernels over layers and interpolated directions.

NumPy only. Three pieces (heretic's parametrisation, extended to several languages):

* :class:`Kernel` / :func:`kernel_weights`: how strongly each layer's residual writers are ablated. A kernel
  has a maximum weight at a (fractional) layer position and falls off linearly to a minimum weight at a
  falloff distance; layers farther away are not edited (weight 0). One kernel per component (attention
  output, MLP output).
* :func:`interpolate_layers`: a fractional direction index ``i + t`` gives the normalised interpolation
  ``unit((1 - t) * unit(v[i]) + t * unit(v[i + 1]))`` of adjacent layers' candidates.
* :func:`mean_direction`: the normalised mean of several languages' unit directions.

The weights mean weight editing: a writer ``W`` of layer ``l`` becomes ``W - w(l) * r̂ r̂ᵀ W``
(``w = 1`` is the paper's full ablation; see :mod:`pyrefusal.steering.weighted`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pyrefusal.errors import PyrefusalError

__all__ = ["Kernel", "interpolate_layers", "kernel_weights", "mean_direction", "unit_or_zero"]


@dataclass(frozen=True)
class Kernel:
    """A weight kernel over layers (heretic's four parameters).

    Attributes:
        max_weight: the weight at ``max_position``.
        max_position: the (fractional) layer index where the weight is largest.
        min_weight: the weight at distance ``falloff`` from ``max_position``.
        falloff: distance (in layers, > 0) over which the weight falls linearly from ``max_weight`` to
            ``min_weight``; layers farther away get weight 0.
    """

    max_weight: float
    max_position: float
    min_weight: float
    falloff: float

    def weights(self, n_layer: int) -> np.ndarray:
        """Per-layer weights, float64 ``(n_layer,)`` (:func:`kernel_weights`)."""
        return kernel_weights(self, n_layer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def full(cls, n_layer: int) -> Kernel:
        """Weight 1 at every layer: the paper's ablation."""
        return cls(1.0, (n_layer - 1) / 2, 1.0, max(n_layer, 1))


def kernel_weights(kernel: Kernel, n_layer: int) -> np.ndarray:
    """``w(l) = max + (|l - pos| / falloff) * (min - max)`` for ``|l - pos| <= falloff``, else 0.

    Returns:
        float64 ``(n_layer,)``.

    Raises:
        PyrefusalError: a non-positive falloff or a non-finite parameter.
    """
    vals = (kernel.max_weight, kernel.max_position, kernel.min_weight, kernel.falloff)
    if not all(math.isfinite(v) for v in vals):
        raise PyrefusalError(f"kernel parameters must be finite, got {kernel}")
    if kernel.falloff <= 0:
        raise PyrefusalError(f"kernel falloff must be > 0 layers, got {kernel.falloff}")
    dist = np.abs(np.arange(n_layer, dtype=np.float64) - kernel.max_position)  # (n_layer,)
    w = kernel.max_weight + (dist / kernel.falloff) * (kernel.min_weight - kernel.max_weight)
    return np.where(dist <= kernel.falloff, w, 0.0)


def unit_or_zero(v: np.ndarray) -> np.ndarray:
    """``v / ||v||`` in float64, or zeros when ``v`` is (numerically) zero."""
    v = np.asarray(v, dtype=np.float64)
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-12 else np.zeros_like(v)


def interpolate_layers(vectors: np.ndarray, index: float) -> np.ndarray:
    """The direction at fractional layer ``index`` of ``vectors`` (one candidate per layer).

    Args:
        vectors: float ``(n_layers, n_embd)`` candidates of one position (raw, any norm).
        index: in ``[0, n_layers - 1]``; ``i + t`` interpolates layers ``i`` and ``i + 1`` with weight ``t``.

    Returns:
        float64 unit ``(n_embd,)``; at a whole ``index`` exactly ``unit(vectors[index])``.

    Raises:
        PyrefusalError: ``index`` out of range, or the interpolation is zero (zero candidates).
    """
    n = vectors.shape[0]
    if not 0 <= index <= n - 1:
        raise PyrefusalError(f"direction index {index} is outside the candidates' layers 0..{n - 1}")
    i = min(math.floor(index), n - 1)
    t = index - i
    u = unit_or_zero(vectors[i])
    if t > 0:
        u = (1 - t) * u + t * unit_or_zero(vectors[i + 1])
    out = unit_or_zero(u)
    if not out.any():
        raise PyrefusalError(f"the candidates at layer index {index} are zero (identical inputs there)")
    return out


def mean_direction(directions: np.ndarray) -> np.ndarray:
    """Normalised mean of unit directions (e.g. one per language), float64 ``(n_embd,)``.

    Args:
        directions: ``(k, n_embd)``; each row is normalised first, so every language counts equally.

    Raises:
        PyrefusalError: the mean is zero (e.g. two opposite directions).
    """
    d = np.atleast_2d(np.asarray(directions, dtype=np.float64))  # (k, n_embd)
    out = unit_or_zero(np.mean([unit_or_zero(r) for r in d], axis=0))
    if not out.any():
        raise PyrefusalError("the directions cancel out: their normalised mean is zero")
    return out
