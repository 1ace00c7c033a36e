"""Geometry of refusal directions (docs/method.md §7.4: our design, reported as an extension).

Cosine of r_X and r_Y layer by layer (:func:`cosine_by_layer`), cosine of the selected directions
(:func:`selected_cosines`), a 2-D PCA of per-prompt activations (:func:`pca_activations`), and projections
onto one direction (:func:`projection_on`). NumPy only, over :class:`~pyrefusal.stages.direction.LanguageDirection`
values (directions of languages or of quantized variants of one model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyrefusal.errors import PyrefusalError
from pyrefusal.method.directions import unit
from pyrefusal.stages.direction import LanguageDirection

__all__ = [
    "DirectionGeometry",
    "PCAResult",
    "common_position",
    "compare_directions",
    "cosine_by_layer",
    "pca_activations",
    "projection_on",
    "selected_cosines",
    "train_activations_at",
]


def common_position(directions: Mapping[str, LanguageDirection]) -> int:
    """The position used to compare languages: the English selection's, else -1."""
    return directions["en"].selection.position if "en" in directions else -1


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis; NaN where either vector is zero (e.g. block input 0)."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (a * b).sum(axis=-1) / (na * nb)
    return np.where((na == 0) | (nb == 0), np.nan, c)


def cosine_by_layer(
    directions: Mapping[str, LanguageDirection], position: int | None = None
) -> tuple[list[str], int, np.ndarray]:
    """Cosine of r_X[p, l] and r_Y[p, l] at one position for every layer.

    Args:
        directions: per language (same model).
        position: eoi position (default :func:`common_position`).

    Returns:
        ``(names, position, cos)``, cos float64 ``(n_langs, n_langs, n_layers)``, NaN where a
        candidate is the zero vector.

    Raises:
        PyrefusalError: directions from models of different shapes.
    """
    names = list(directions)
    if not names:
        return [], -1 if position is None else position, np.zeros((0, 0, 0))
    pos = common_position(directions) if position is None else position
    shapes = {directions[n].candidates.vectors.shape for n in names}
    if len(shapes) != 1:
        raise PyrefusalError(f"directions have different shapes {shapes}; they must come from the same model")
    v = np.stack([directions[n].candidates.vectors[directions[n].candidates.positions.index(pos)] for n in names])
    # v: (n_langs, n_layers, n_embd)
    return names, pos, _cos(v[:, None], v[None, :])  # (n_langs, n_langs, n_layers)


def selected_cosines(directions: Mapping[str, LanguageDirection]) -> tuple[list[str], np.ndarray]:
    """Cosine of the selected directions (each at its own position and layer): ``(names, (n, n))``."""
    names = list(directions)
    v = np.stack([directions[n].direction for n in names])  # (n_langs, n_embd)
    return names, _cos(v[:, None], v[None, :])


def train_activations_at(
    directions: Mapping[str, LanguageDirection], position: int, layer: int
) -> dict[str, dict[str, np.ndarray]]:
    """Stored per-prompt train activations at one (position, layer): ``{lang: {kind: (n, n_embd) float64}}``.

    Languages without stored activations are left out.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for lang, ld in directions.items():
        if ld.activations is None:
            continue
        j = ld.candidates.positions.index(position)
        out[lang] = {k: ld.activations[k][:, j, layer].astype(np.float64) for k in ("harmful", "harmless")}
    return out


@dataclass
class PCAResult:
    """2-D PCA of activations pooled over languages and kinds.

    Attributes:
        coords: ``{lang: {kind: (n, 2)}}`` projections on the first two components.
        explained: variance ratio of the two components.
        components: ``(2, n_embd)`` unit rows; mean: ``(n_embd,)`` subtracted before projecting.
        layer / position: where the activations were taken (``None`` when unknown).
    """

    coords: dict[str, dict[str, np.ndarray]]
    explained: tuple[float, float]
    components: np.ndarray
    mean: np.ndarray
    layer: int | None = None
    position: int | None = None


def pca_activations(
    acts: Mapping[str, Mapping[str, np.ndarray]], *, layer: int | None = None, position: int | None = None
) -> PCAResult:
    """2-D PCA of per-prompt activations (harmful vs harmless x language).

    Args:
        acts: ``{lang: {"harmful": (n, n_embd), "harmless": (m, n_embd)}}``.
        layer / position: recorded in the result.

    Raises:
        PyrefusalError: fewer than 2 activations in all.
    """
    keys = [(lang, kind) for lang, kinds in acts.items() for kind in kinds]
    x = np.concatenate([np.asarray(acts[lang][kind], dtype=np.float64) for lang, kind in keys])  # (N, n_embd)
    if len(x) < 2:
        raise PyrefusalError("PCA needs at least 2 activations; store activations (keep_activations=True)")
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:2]  # (2, n_embd)
    var = s**2
    explained = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    coords: dict[str, dict[str, np.ndarray]] = {}
    for lang, kind in keys:
        coords.setdefault(lang, {})[kind] = (np.asarray(acts[lang][kind], dtype=np.float64) - mean) @ comps.T
    ex = tuple(float(e) for e in np.pad(explained, (0, 2))[:2])
    return PCAResult(coords, (ex[0], ex[1]), comps, mean, layer, position)


def projection_on(
    direction: np.ndarray, acts: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, dict[str, dict[str, float]]]:
    """Projection ``x . r̂`` of each activation on a direction, summarised per language and kind.

    Args:
        direction: ``(n_embd,)``, e.g. the English direction (normalised here).
        acts: ``{lang: {kind: (n, n_embd)}}``.

    Returns:
        ``{lang: {kind: {"mean", "std", "n"}}}``.
    """
    r = unit(np.asarray(direction, dtype=np.float64))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for lang, kinds in acts.items():
        for kind, a in kinds.items():
            p = np.asarray(a, dtype=np.float64) @ r  # (n,)
            out.setdefault(lang, {})[kind] = {"mean": float(p.mean()), "std": float(p.std()), "n": len(p)}
    return out


@dataclass
class DirectionGeometry:
    """How a set of directions of one model relate, compared where the reference direction was selected.

    Attributes:
        reference: the direction whose selected position and layer are compared (and projected on).
        names: the directions, in order (the matrices' axes).
        position / layer: the reference's selected position and layer.
        by_layer: cosine of the candidates at ``position``, float64 ``(n, n, n_layers)`` (:func:`cosine_by_layer`).
        selected: cosine of the selected directions, float64 ``(n, n)`` (:func:`selected_cosines`).
        pca: 2-D PCA of the stored train activations at (position, layer), or None (none stored / not asked).
        projection: :func:`projection_on` the reference direction, or None (likewise).
    """

    reference: str
    names: list[str]
    position: int
    layer: int
    by_layer: np.ndarray
    selected: np.ndarray
    pca: PCAResult | None = None
    projection: dict[str, dict[str, dict[str, float]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """``transfer.json["geometry"]``: the facts and matrices as JSON values (NaN kept as float)."""
        return {
            "names": self.names,
            "position": self.position,
            "layer": self.layer,
            "projection_reference": self.reference,
            "selected_cosine": self.selected.tolist(),
            "cosine_at_layer": self.by_layer[:, :, self.layer].tolist(),
            "cosine_by_layer": self.by_layer.tolist(),
            "pca_explained": list(self.pca.explained) if self.pca else None,
            "projection": self.projection,
        }


def compare_directions(
    directions: Mapping[str, LanguageDirection], reference: str, *, activations: bool = True
) -> DirectionGeometry:
    """Cosines of ``directions`` at ``reference``'s selected position and layer and, with ``activations``, the PCA
    of their stored train activations there and their projections on the reference direction.

    Raises:
        PyrefusalError: directions from models of different shapes.
    """
    ref = directions[reference]
    names, pos, by_layer = cosine_by_layer(directions, ref.selection.position)
    layer = ref.selection.layer
    _, sel = selected_cosines(directions)
    geometry = DirectionGeometry(reference, names, pos, layer, by_layer, sel)
    if activations:
        acts = train_activations_at(directions, pos, layer)
        if acts:
            geometry.pca = pca_activations(acts, layer=layer, position=pos)
            geometry.projection = projection_on(ref.direction, acts)
    return geometry
