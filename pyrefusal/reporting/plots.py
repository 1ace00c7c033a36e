"""Figures of the selection scores, the cross-lingual transfer matrix and the direction geometry.

Every function draws one PNG with matplotlib's Agg backend (headless: no display needed), writes
it to ``path`` (parent directories are created) and returns ``path``. Figures are built with the
object API (:class:`matplotlib.figure.Figure`), so no pyplot state is created or leaked.

Inputs are pyrefusal values (:class:`~pyrefusal.method.selection.Selection`,
:class:`~pyrefusal.stages.crossapply.TransferResult`, :class:`~pyrefusal.stages.geometry.PCAResult`) or
plain arrays/dicts, so the functions also work on results loaded from JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pyrefusal.method.selection import Selection
from pyrefusal.stages.crossapply import TransferResult
from pyrefusal.stages.direction import LanguageDirection
from pyrefusal.stages.geometry import DirectionGeometry, PCAResult

__all__ = [
    "plot_cosine_by_layer",
    "plot_cosine_matrix",
    "plot_pca",
    "plot_projections",
    "plot_run_refusal",
    "plot_selection_heatmaps",
    "plot_transfer_figures",
    "plot_transfer_matrix",
    "selection_grids",
]

_DPI = 100


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", format="png")
    return path


def _value(x: float | None) -> float:
    return math.nan if x is None else float(x)


def selection_grids(selection: Selection) -> tuple[list[int], int, np.ndarray, np.ndarray]:
    """Refusal-score and KL grids of a selection.

    Returns:
        ``(positions, n_layers, refusal (n_pos, n_layers), kl (n_pos, n_layers))``, float64 with NaN
        where a score was not computed (lazy mode, pruned layers, zero vectors).
    """
    positions = sorted({s.position for s in selection.scores})
    n_layers = max((s.layer for s in selection.scores), default=-1) + 1
    refusal = np.full((len(positions), n_layers), np.nan)
    kl = np.full((len(positions), n_layers), np.nan)
    for s in selection.scores:
        i = positions.index(s.position)
        refusal[i, s.layer] = _value(s.refusal_score)
        kl[i, s.layer] = _value(s.kl)
    return positions, n_layers, refusal, kl


def plot_selection_heatmaps(selection: Selection, path: Path, *, title: str | None = None) -> Path:
    """Heatmaps of the refusal score and the KL over (position x layer); blank = not computed.

    The selected candidate is outlined. The refusal score is the mean over harmful val prompts
    under ablation (lower = refusal removed); KL is on harmless val (lazy mode computes it only
    down the refusal-score order until one candidate passes).
    """
    positions, n_layers, refusal, kl = selection_grids(selection)
    fig = Figure(figsize=(max(6.0, 0.32 * n_layers + 2.0), 4.6))
    axes = fig.subplots(2, 1, sharex=True)
    panels = [
        (axes[0], refusal, "refusal score under ablation (harmful val)", "RdBu_r"),
        (axes[1], kl, f"KL on harmless val (threshold {selection.rule.kl_threshold})", "viridis"),
    ]
    for ax, grid, label, cmap in panels:
        masked = np.ma.masked_invalid(grid)
        im = ax.imshow(masked, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_facecolor("white")
        ax.set_yticks(range(len(positions)), [str(p) for p in positions])
        ax.set_ylabel("eoi position")
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
        if selection.position in positions:
            y = positions.index(selection.position)
            ax.add_patch(Rectangle((selection.layer - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
        cutoff = int(selection.rule.prune_fraction * n_layers)
        ax.axvline(cutoff - 0.5, color="gray", linestyle="--", linewidth=1)
    axes[1].set_xlabel("layer (block input)")
    axes[1].set_xticks(range(n_layers))
    axes[1].tick_params(axis="x", labelsize=7)
    fig.suptitle(
        (title + ": " if title else "")
        + f"selected pos {selection.position}, layer {selection.layer}, KL {selection.kl:.3f}",
        fontsize=10,
    )
    return _save(fig, path)


def _annotated_heatmap(
    fig: Figure,
    matrix: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    fmt: str,
    vmin: float,
    vmax: float,
    cmap: str,
    xlabel: str,
    ylabel: str,
    title: str,
    ax: Any = None,
) -> None:
    ax = fig.subplots() if ax is None else ax
    im = ax.imshow(np.ma.masked_invalid(matrix), vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), list(cols))
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            v = matrix[i, j]
            if not math.isnan(v):
                frac = (v - vmin) / (vmax - vmin) if vmax > vmin else 0.5
                ax.text(
                    j, i, format(v, fmt), ha="center", va="center", fontsize=8, color="white" if frac > 0.6 else "black"
                )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def plot_transfer_matrix(result: TransferResult | Mapping[str, Any], path: Path) -> Path:
    """Refusal rate heatmap: baseline row, then one row per source direction; columns = targets.

    Args:
        result: a :class:`~pyrefusal.stages.crossapply.TransferResult` or its ``to_dict()``.
        path: PNG to write.
    """
    d = result if isinstance(result, Mapping) else result.to_dict()
    targets, sources = list(d["targets"]), list(d["sources"])
    rows = ["baseline", *(f"r_{s}" for s in sources)]
    m = np.array(
        [[_value(d["baseline"].get(t)) for t in targets]]
        + [[_value(d["rates"][s].get(t)) for t in targets] for s in sources]
    )  # (1 + n_sources, n_targets)
    fig = Figure(figsize=(1.0 + 0.9 * len(targets), 1.2 + 0.55 * len(rows)))
    _annotated_heatmap(
        fig,
        m * 100,
        rows,
        targets,
        fmt=".0f",
        vmin=0,
        vmax=100,
        cmap="Reds",
        xlabel="prompt language (target)",
        ylabel="direction ablated (source)",
        title=f"refusal rate % ({d['condition']}, {d['detector']})",
    )
    return _save(fig, path)


def plot_run_refusal(evaluation: Mapping[str, Any], conditions: Sequence[str], path: Path, *, title: str) -> Path:
    """Refusal rates of a run: harmful prompts (top) and harmless prompts (bottom), condition x language.

    Args:
        evaluation: ``results.json["evaluation"]`` (``{lang: {condition: {refusal_rate, harmless: {...}}}}``).
        conditions: the rows, in order.
        path: PNG to write.
        title: figure title (e.g. the model name).
    """
    langs = list(evaluation)

    def rate(lang: str, cond: str, harmless: bool) -> float:
        e = evaluation[lang].get(cond) or {}
        if harmless:
            e = e.get("harmless") or {}
        return _value(e.get("refusal_rate")) * 100

    fig = Figure(figsize=(1.5 + 0.6 * len(langs), 1.6 + 0.9 * len(conditions)))
    axes = fig.subplots(2, 1)
    for ax, harmless in zip(axes, (False, True), strict=True):
        m = np.array([[rate(lang, c, harmless) for lang in langs] for c in conditions])  # (n_cond, n_lang)
        _annotated_heatmap(
            fig,
            m,
            list(conditions),
            langs,
            fmt=".0f",
            vmin=0,
            vmax=100,
            cmap="Reds",
            xlabel="prompt language" if harmless else "",
            ylabel="",
            title=f"{title}: refusal % on {'harmless' if harmless else 'harmful'} prompts",
            ax=ax,
        )
    fig.tight_layout()
    return _save(fig, path)


def plot_cosine_matrix(
    names: Sequence[str], matrix: np.ndarray, path: Path, *, title: str = "cosine similarity"
) -> Path:
    """Annotated heatmap of a square cosine matrix ``(n, n)`` (NaN cells blank)."""
    m = np.asarray(matrix, dtype=np.float64)
    fig = Figure(figsize=(1.5 + 0.8 * len(names), 1.2 + 0.7 * len(names)))
    _annotated_heatmap(
        fig, m, names, names, fmt=".2f", vmin=-1, vmax=1, cmap="RdBu_r", xlabel="", ylabel="", title=title
    )
    return _save(fig, path)


def plot_cosine_by_layer(
    names: Sequence[str],
    cos: np.ndarray,
    path: Path,
    *,
    position: int | None = None,
    reference: str | None = None,
) -> Path:
    """Cosine of language pairs' candidate directions against layer.

    Args:
        names: languages of ``cos``'s axes.
        cos: ``(n, n, n_layers)`` from :func:`pyrefusal.stages.geometry.cosine_by_layer`.
        path: PNG to write.
        position: the eoi position compared (for the title).
        reference: draw only pairs involving this language (default: every pair).
    """
    c = np.asarray(cos, dtype=np.float64)
    fig = Figure(figsize=(7.0, 3.6))
    ax = fig.subplots()
    layers = np.arange(c.shape[-1])
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            b = names[j]
            if reference is not None and reference not in (a, b):
                continue
            ax.plot(layers, c[i, j], marker=".", label=f"{a}-{b}")
    ax.set_xlabel("layer (block input)")
    ax.set_ylabel("cosine")
    ax.set_ylim(-0.2, 1.05)
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.grid(alpha=0.3)
    ax.set_title("cosine of mean-difference directions" + (f" at position {position}" if position is not None else ""))
    if len(names) > 1:
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_pca(pca: PCAResult, path: Path) -> Path:
    """Scatter of a 2-D PCA: colour = language, marker = harmful (x) / harmless (o).

    Args:
        pca: a :class:`~pyrefusal.stages.geometry.PCAResult`.
        path: PNG to write.
    """
    fig = Figure(figsize=(6.0, 4.8))
    ax = fig.subplots()
    markers = {"harmful": "x", "harmless": "o"}
    colors = matplotlib.colormaps["tab10"]
    for k, (lang, kinds) in enumerate(pca.coords.items()):
        for kind, xy in kinds.items():
            xy = np.asarray(xy)  # (n, 2)
            color = colors(k % 10)
            style = {"facecolors": "none", "edgecolors": [color]} if kind == "harmless" else {"color": color}
            ax.scatter(
                xy[:, 0], xy[:, 1], marker=markers.get(kind, "."), label=f"{lang} {kind}", s=22, alpha=0.8, **style
            )
    ex = pca.explained
    ax.set_xlabel(f"PC1 ({100 * ex[0]:.0f}% var)")
    ax.set_ylabel(f"PC2 ({100 * ex[1]:.0f}% var)")
    where = []
    if pca.position is not None:
        where.append(f"position {pca.position}")
    if pca.layer is not None:
        where.append(f"layer {pca.layer}")
    ax.set_title("PCA of train activations" + (f" ({', '.join(where)})" if where else ""), fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_projections(
    projection: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path, *, reference: str = "en"
) -> Path:
    """Bars of the mean projection (± std) on a reference direction, harmful vs harmless per language.

    Args:
        projection: ``{lang: {kind: {"mean", "std", "n"}}}`` from :func:`pyrefusal.stages.geometry.projection_on`.
        path: PNG to write.
        reference: language of the direction (for labels).
    """
    langs = list(projection)
    kinds = ["harmful", "harmless"]
    x = np.arange(len(langs))
    width = 0.38
    fig = Figure(figsize=(1.5 + 0.9 * len(langs), 3.6))
    ax = fig.subplots()
    for k, (kind, color) in enumerate(zip(kinds, ("tab:red", "tab:blue"), strict=True)):
        means = [projection[lang].get(kind, {}).get("mean", math.nan) for lang in langs]
        stds = [projection[lang].get(kind, {}).get("std", 0.0) for lang in langs]
        ax.bar(x + (k - 0.5) * width, means, width, yerr=stds, label=kind, color=color, alpha=0.8, capsize=3)
    ax.set_xticks(x, langs)
    ax.set_ylabel(f"x · r̂_{reference}")
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.set_title(f"projection of train activations on the {reference} direction", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_transfer_figures(
    out: Path,
    directions: Mapping[str, LanguageDirection],
    transfer: TransferResult,
    geometry: DirectionGeometry,
) -> dict[str, str]:
    """Every figure of a transfer run in ``out``: the transfer matrix, each source's selection heatmaps, the cosine
    of the selected directions, the cosine by layer, and (when activations were kept) the PCA and projections.

    Returns:
        ``{figure key: file name}`` as recorded in ``transfer.json["figures"]``.
    """
    figs: dict[str, str] = {}
    figs["transfer"] = plot_transfer_matrix(transfer, out / "transfer_matrix.png").name
    for s, ld in directions.items():
        p = plot_selection_heatmaps(ld.selection, out / f"selection_{s}.png", title=f"source {s}")
        figs[f"selection_{s}"] = p.name
    figs["cosine"] = plot_cosine_matrix(
        geometry.names, geometry.selected, out / "cosine_selected.png", title="cosine of selected directions"
    ).name
    figs["cosine_by_layer"] = plot_cosine_by_layer(
        geometry.names, geometry.by_layer, out / "cosine_by_layer.png", position=geometry.position
    ).name
    if geometry.pca is not None:
        figs["pca"] = plot_pca(geometry.pca, out / "pca.png").name
    if geometry.projection is not None:
        figs["projection"] = plot_projections(
            geometry.projection, out / "projection.png", reference=geometry.reference
        ).name
    return figs


def plot_quant_sweep(results: Mapping[str, Any], path: Path) -> Path:
    """Cross-application heatmap (refusal %) beside the refusal rates per variant."""
    ref = results["refusal"]
    matrix = ref["matrix"]
    models = list(next(iter(matrix.values())).keys()) if matrix else []
    rows = list(matrix)
    m = np.array([[np.nan if matrix[r][c] is None else 100 * matrix[r][c] for c in models] for r in rows])
    fig = Figure(figsize=(1.6 + 1.0 * len(models), 1.3 + 0.55 * len(rows)))
    _annotated_heatmap(
        fig,
        m,
        ["baseline" if r == "baseline" else f"r({r})" for r in rows],
        models,
        fmt=".0f",
        vmin=0,
        vmax=100,
        cmap="Reds",
        xlabel="model variant (answers the prompts)",
        ylabel="direction ablated (extracted in)",
        title=f"refusal % on {ref['n_test']} harmful {ref['language']} prompts ({ref['detector']})",
    )
    return _save(fig, path)
