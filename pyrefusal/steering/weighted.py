"""Partial-weight ablation as llama.cpp LoRA adapters: what ``pyrefusal optimize`` searches and exports.

A :class:`WeightedAblation` is a unit direction ``r̂`` and a weight per residual writer: every
``blk.l.attn_output.weight`` becomes ``W - a(l) r̂ r̂ᵀ W``, every ``blk.l.ffn_down.weight``
``W - m(l) r̂ r̂ᵀ W``, and (when ``embeddings > 0``) the token embeddings ``E - e (E r̂) r̂ᵀ``. With all weights
1 this is the paper's weight orthogonalisation (docs/method.md §5.4), which
:func:`pyrefusal.steering.export.export_ablation_lora` writes as a LoRA. Here each writer is its own rank-1
LoRA: ``lora_b = -w r̂`` (NumPy ``(n_embd, 1)``), ``lora_a = r̂ᵀ W`` (``(1, n_in)``), ``adapter.lora.alpha = 1``
(scale 1); writers with weight 0 are left out of the file. A rank-k ablation (k orthonormal directions ``R``,
e.g. one per language) is the same with ``lora_b = -w Rᵀ`` ``(n_embd, k)``, ``lora_a = R W`` ``(k, n_in)`` and
``adapter.lora.alpha = k`` (llama.cpp scales by alpha / rank, so again scale 1).

The search must not reload the model, so ``r̂ᵀ W`` is not recomputed from the GGUF per trial: a
:class:`WriterRows` holds ``Q W`` for an orthonormal basis ``Q`` of every direction the search can pick
(computed once per study from the dequantized weights, exactly as the export reads them). Any ``r̂`` in the
span of ``Q`` has ``r̂ᵀ W = (Q r̂)ᵀ (Q W)``. :func:`write_weighted_lora` builds and writes the adapter from a
``WriterRows``; the search calls it with the study's basis, :func:`export_weighted_lora` with the basis
``{r̂}`` alone: the same function, so what was searched is what is exported (equal up to float rounding).

Tied embeddings (no ``output.weight``): a ``token_embd`` LoRA would also hit the LM head and crash llama.cpp
(see :mod:`pyrefusal.steering.export`), so such a file cannot carry the embeddings; pyrefusal's Runtime then
ablates node ``embd`` with its hook (:func:`apply_weighted`, weight 1 only).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401  (import llama_cpp before numpy/gguf: required in CUDA processes)

import gguf
import numpy as np

from pyrefusal import __version__
from pyrefusal.data.registry import cache_dir, cached_sha256
from pyrefusal.runtime import PlanEntry, Runtime
from pyrefusal.steering.export import (
    LORA_FORMAT,
    ExportError,
    LoraSupport,
    ablation_lora_support,
    read_gguf_header,
    write_provenance,
)

__all__ = [
    "PICK_FILE",
    "WEIGHTED_SEMANTICS",
    "WeightedAblation",
    "WriterRows",
    "apply_weighted",
    "cached_weighted_lora",
    "export_weighted_lora",
    "pick_control_vector",
    "read_pick",
    "release_weighted",
    "weighted_lora_tensors",
    "write_weighted_lora",
]

WEIGHTED_SEMANTICS = (
    "PARTIAL-WEIGHT ABLATION as rank-1 LoRAs (lora_b = -w r, lora_a = r^T W, alpha = 1, so scale 1): each "
    "attn_output / ffn_down W of layer l becomes W - w(l) r r^T W with the weights in pyrefusal.weights{embd}. "
    "Load it at scale 1 (--lora FILE) on the base model whose sha256 is pyrefusal.base_sha256."
)
WEIGHTED_SEMANTICS_RANK_K = (
    "PARTIAL-WEIGHT ABLATION of {rank} orthonormal directions R as rank-{rank} LoRAs (lora_b = -w R^T, "
    "lora_a = R W, alpha = {rank}, so scale 1): each attn_output / ffn_down W of layer l becomes W - w(l) R^T R W "
    "with the weights in pyrefusal.weights{embd}. Load it at scale 1 (--lora FILE) on the base model whose sha256 "
    "is pyrefusal.base_sha256."
)
_CHUNK_ELEMENTS = 1 << 24  # dequantize at most ~16M weights at a time
#: Where ``pyrefusal optimize RUN_DIR --pick N`` writes the chosen trial, relative to the run directory.
PICK_FILE = Path("optimize") / "pick.json"


@dataclass(frozen=True)
class WeightedAblation:
    """One partial-weight ablation (a trial of ``pyrefusal optimize``, or its pick).

    Rank k > 1 (``direction`` of shape ``(k, n_embd)``, e.g. one direction per language): the rows are
    orthonormalised (Gram-Schmidt orientation) and every writer becomes ``W - w(l) Rᵀ R W``, i.e. the span of the
    k directions is removed with the writer's weight; the LoRA then has rank k.

    Attributes:
        direction: unit direction r̂, float64 ``(n_embd,)``; or orthonormal rows R, float64 ``(k, n_embd)``.
        attn: weight of each layer's ``attn_output``, float64 ``(n_layer,)``.
        mlp: weight of each layer's ``ffn_down``, float64 ``(n_layer,)``.
        embeddings: weight of the token embeddings (0 = not edited).
    """

    direction: np.ndarray
    attn: np.ndarray
    mlp: np.ndarray
    embeddings: float = 0.0

    def __post_init__(self) -> None:
        d = np.asarray(self.direction, dtype=np.float64)
        if d.ndim == 2 and d.shape[0] == 1:
            d = d[0]
        if d.ndim == 2:
            d = _orthonormal_rows(d)  # (k, n_embd)
        else:
            d = d.reshape(-1)
            n = float(np.linalg.norm(d))
            if not np.isfinite(n) or n == 0.0:
                raise ExportError("a weighted ablation needs a finite, non-zero direction")
            d = d / n
        object.__setattr__(self, "direction", d)
        a = np.asarray(self.attn, dtype=np.float64).reshape(-1)
        m = np.asarray(self.mlp, dtype=np.float64).reshape(-1)
        if a.shape != m.shape:
            raise ExportError(f"attention weights {a.shape} and MLP weights {m.shape} must cover the same layers")
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(m)) and np.isfinite(self.embeddings)):
            raise ExportError("ablation weights must be finite")
        object.__setattr__(self, "attn", a)
        object.__setattr__(self, "mlp", m)
        object.__setattr__(self, "embeddings", float(self.embeddings))

    @property
    def n_layer(self) -> int:
        return int(self.attn.shape[0])

    @property
    def rank(self) -> int:
        """How many directions are removed (1, or k for a ``(k, n_embd)`` direction)."""
        return 1 if self.direction.ndim == 1 else int(self.direction.shape[0])

    @property
    def n_embd(self) -> int:
        return int(self.direction.shape[-1])

    @property
    def basis(self) -> np.ndarray:
        """The orthonormal directions as rows, float64 ``(k, n_embd)``."""
        return np.atleast_2d(self.direction)

    def writer_weights(self) -> dict[str, float]:
        """``{tensor name: weight}`` of every writer with a non-zero weight (layer order, attention first)."""
        out: dict[str, float] = {}
        for il in range(self.n_layer):
            if self.attn[il] != 0.0:
                out[f"blk.{il}.attn_output.weight"] = float(self.attn[il])
            if self.mlp[il] != 0.0:
                out[f"blk.{il}.ffn_down.weight"] = float(self.mlp[il])
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON values (``pick.json``)."""
        return {
            "direction": self.direction.tolist(),  # (n_embd,) or (k, n_embd)
            "attn": [float(x) for x in self.attn],
            "mlp": [float(x) for x in self.mlp],
            "embeddings": self.embeddings,
        }

    def sha256(self) -> str:
        """Hash of the direction and the weights (float64 bytes; names cached adapters)."""
        h = hashlib.sha256(f"{self.n_layer}x{self.direction.shape}:{self.embeddings!r}:".encode())
        for a in (self.direction, self.attn, self.mlp):
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        return h.hexdigest()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WeightedAblation:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(np.asarray(d["direction"]), np.asarray(d["attn"]), np.asarray(d["mlp"]), d.get("embeddings", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(
                f"not a weighted ablation ({e}); write it again with `pyrefusal optimize --pick N`"
            ) from e


def _orthonormal_rows(d: np.ndarray) -> np.ndarray:
    """Orthonormal rows spanning the rows of ``d`` (``(k, n_embd)``, float64), in Gram-Schmidt orientation.

    Raises:
        ExportError: non-finite values, or rows that are linearly dependent (the rank would be less than k).
    """
    if not np.all(np.isfinite(d)):
        raise ExportError("ablation directions must be finite")
    if np.abs(d @ d.T - np.eye(d.shape[0])).max() <= 1e-12:  # already orthonormal (e.g. read from pick.json): kept
        return np.ascontiguousarray(d)
    q, r = np.linalg.qr(d.T)  # q (n_embd, k), r (k, k)
    diag = np.abs(np.diag(r))
    if diag.size == 0 or diag.min() <= 1e-8 * max(float(np.linalg.norm(d, axis=1).max()), 1e-300):
        raise ExportError(f"the {d.shape[0]} ablation directions are (nearly) linearly dependent; drop one")
    return np.ascontiguousarray((q * np.sign(np.diag(r))).T)  # (k, n_embd)


def _checked_support(model_path: Path) -> LoraSupport:
    support = ablation_lora_support(model_path)
    if not support.exact:
        raise ExportError(
            f"a LoRA cannot ablate exactly on {model_path.name}: {support.reason}. "
            "`pyrefusal optimize` applies its trials as LoRA adapters, so it cannot search this model."
        )
    return support


class WriterRows:
    """``Q W`` of every residual writer for an orthonormal basis ``Q`` (and ``E Qᵀ`` of the embeddings).

    Args:
        model_path: the base GGUF (dequantized with gguf-py, as the LoRA export reads it).
        basis: ``(m, n_embd)`` directions whose span the search draws from (any norm, any rank).
        embeddings: also keep ``E Qᵀ`` (only for models whose embeddings a LoRA may carry).

    Attributes:
        basis: orthonormal float64 ``(k, n_embd)``.
        rows: ``{writer name: float32 (k, n_in)}``.
        embd_rows: float32 ``(n_vocab, k)`` or None.
        support: the model's :class:`~pyrefusal.steering.export.LoraSupport`.

    Raises:
        ExportError: a LoRA is not exact for this model, a basis of the wrong width, or embeddings asked on a
            model with tied embeddings.
    """

    def __init__(self, model_path: str | os.PathLike[str], basis: np.ndarray, *, embeddings: bool) -> None:
        self.model_path = Path(model_path)
        self.support = _checked_support(self.model_path)
        b = np.atleast_2d(np.asarray(basis, dtype=np.float64))  # (m, n_embd)
        if b.shape[1] != self.support.n_embd:
            raise ExportError(
                f"directions of width {b.shape[1]} do not fit {self.model_path.name} (n_embd={self.support.n_embd})"
            )
        if embeddings and self.support.tied_embeddings:
            raise ExportError(
                f"{self.model_path.name} ties its LM head to token_embd.weight: a LoRA cannot carry the embeddings"
            )
        _u, s, vt = np.linalg.svd(b, full_matrices=False)
        keep = s > 1e-10 * max(float(s.max(initial=0.0)), 1e-300)
        self.basis = np.ascontiguousarray(vt[keep])  # (k, n_embd) orthonormal float64
        header = read_gguf_header(self.model_path)
        q = self.basis
        self.rows: dict[str, np.ndarray] = {}
        for name in self.support.writers:
            t = header.tensors[name]  # W: NumPy (n_embd, n_in); Q W: (k, n_in)
            step = max(1, _CHUNK_ELEMENTS // t.ne[0])
            acc = np.zeros((q.shape[0], t.ne[0]), dtype=np.float64)
            for s0 in range(0, t.n_rows, step):
                e0 = min(s0 + step, t.n_rows)
                acc += q[:, s0:e0] @ header.rows(name, s0, e0).astype(np.float64)
            self.rows[name] = acc.astype(np.float32)
        self.embd_rows: np.ndarray | None = None
        if embeddings:
            t = header.tensors["token_embd.weight"]  # E: (n_vocab, n_embd); E Qᵀ: (n_vocab, k)
            step = max(1, _CHUNK_ELEMENTS // t.ne[0])
            out = np.empty((t.n_rows, q.shape[0]), dtype=np.float32)
            for s0 in range(0, t.n_rows, step):
                e0 = min(s0 + step, t.n_rows)
                out[s0:e0] = header.rows("token_embd.weight", s0, e0).astype(np.float64) @ q.T
            self.embd_rows = out

    def coefficients(self, direction: np.ndarray) -> np.ndarray:
        """``Q r̂``, float64 ``(k,)``; for directions ``R`` of shape ``(j, n_embd)``: ``Q Rᵀ``, ``(k, j)``.

        Raises:
            ExportError: ``direction`` is not in the span of the basis (the rows cannot express it).
        """
        d = np.asarray(direction, dtype=np.float64)
        if d.ndim == 2:
            c2 = self.basis @ d.T  # (k, j)
            if np.linalg.norm(d.T - self.basis.T @ c2) > 1e-6 * max(np.linalg.norm(d), 1e-300):
                raise ExportError("a direction is outside the span of the precomputed directions")
            return c2
        r = d.reshape(-1)
        c = self.basis @ r
        if np.linalg.norm(r - self.basis.T @ c) > 1e-6 * max(np.linalg.norm(r), 1e-300):
            raise ExportError("the direction is outside the span of the precomputed directions")
        return c


def weighted_lora_tensors(rows: WriterRows, ablation: WeightedAblation) -> list[tuple[str, np.ndarray]]:
    """The adapter's tensors: per edited writer ``(name.lora_a (1, n_in), name.lora_b (n_embd, 1))``, float32
    (rank k: ``(k, n_in)`` and ``(n_embd, k)``).

    Raises:
        ExportError: embeddings asked but ``rows`` holds none, or the direction is outside the rows' span.
    """
    if ablation.rank > 1:
        return _rank_k_tensors(rows, ablation)
    c = rows.coefficients(ablation.direction)  # (k,)
    r = ablation.direction  # (n_embd,)
    tensors: list[tuple[str, np.ndarray]] = []
    if ablation.embeddings != 0.0:
        a = _embedding_rows(rows) @ c  # (n_vocab,) = E r̂
        tensors += [
            ("token_embd.weight.lora_a", a.reshape(-1, 1)),
            ("token_embd.weight.lora_b", (-ablation.embeddings * r).reshape(-1, 1)),
        ]
    for name, w in ablation.writer_weights().items():
        a = c @ rows.rows[name].astype(np.float64)  # (n_in,) = r̂ᵀ W
        tensors += [(f"{name}.lora_a", a.reshape(1, -1)), (f"{name}.lora_b", (-w * r).reshape(-1, 1))]
    return [(n, np.ascontiguousarray(t, dtype=np.float32)) for n, t in tensors]


def _embedding_rows(rows: WriterRows) -> np.ndarray:
    """The rows' token-embedding block ``E Qᵀ`` as float64 ``(n_vocab, k)``, for an ablation that edits the embeddings.

    Raises:
        ExportError: ``rows`` were built without the embeddings.
    """
    if rows.embd_rows is None:
        raise ExportError(
            "the embeddings are to be edited but the adapter rows were built without them"
            + (" (tied LM head: the LoRA cannot carry them)" if rows.support.tied_embeddings else "")
        )
    return rows.embd_rows.astype(np.float64)


def _rank_k_tensors(rows: WriterRows, ablation: WeightedAblation) -> list[tuple[str, np.ndarray]]:
    """:func:`weighted_lora_tensors` for ``R`` of shape ``(j, n_embd)``: ``lora_a = R W`` ``(j, n_in)``,
    ``lora_b = -w Rᵀ`` ``(n_embd, j)``; embeddings ``lora_a = E Rᵀ`` ``(n_vocab, j)``, ``lora_b = -e Rᵀ``."""
    R = ablation.direction  # (j, n_embd) orthonormal
    c = rows.coefficients(R)  # (k, j)
    tensors: list[tuple[str, np.ndarray]] = []
    if ablation.embeddings != 0.0:
        tensors += [
            ("token_embd.weight.lora_a", _embedding_rows(rows) @ c),  # (n_vocab, j) = E Rᵀ
            ("token_embd.weight.lora_b", -ablation.embeddings * R.T),  # (n_embd, j)
        ]
    for name, w in ablation.writer_weights().items():
        a = c.T @ rows.rows[name].astype(np.float64)  # (j, n_in) = R W
        tensors += [(f"{name}.lora_a", a), (f"{name}.lora_b", -w * R.T)]
    return [(n, np.ascontiguousarray(t, dtype=np.float32)) for n, t in tensors]


def write_weighted_lora(
    rows: WriterRows,
    ablation: WeightedAblation,
    out_path: str | os.PathLike[str],
    *,
    provenance: Mapping[str, Any],
) -> Path:
    """Write the rank-1 LoRA of ``ablation`` (tensors of :func:`weighted_lora_tensors`) to ``out_path``.

    ``provenance`` is written as ``pyrefusal.<key>``; ``base_sha256`` is computed when absent. The file is
    written next to ``out_path`` and renamed over it.

    Raises:
        ExportError: as :func:`weighted_lora_tensors`, or the ablation has a layer count the model lacks.
    """
    if ablation.n_layer * 2 != len(rows.support.writers):
        raise ExportError(
            f"the ablation has weights for {ablation.n_layer} layers but {rows.model_path.name} has "
            f"{len(rows.support.writers) // 2}"
        )
    tensors = weighted_lora_tensors(rows, ablation)
    if not tensors:
        raise ExportError("every ablation weight is 0: there is nothing to write")
    out = Path(out_path)
    prov = dict(provenance)
    base_sha = str(prov.pop("base_sha256", "") or cached_sha256(rows.model_path))
    owned = {
        "intervention": "weighted_ablation",
        "version": __version__,
        "semantics": (WEIGHTED_SEMANTICS if ablation.rank == 1 else WEIGHTED_SEMANTICS_RANK_K).format(
            embd=f"; token embeddings weight {ablation.embeddings:g}" if ablation.embeddings else "", rank=ablation.rank
        ),
        "base_sha256": base_sha,
        "base_file": rows.model_path.name,
        "rank": ablation.rank,
        "lora_format": LORA_FORMAT,
        "weights": json.dumps({"attn": ablation.to_dict()["attn"], "mlp": ablation.to_dict()["mlp"]}),
        "ablation.embeddings": "lora" if ablation.embeddings else "NOT edited by this file",
    }
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), rows.support.arch)
    try:
        writer.add_type("adapter")
        writer.add_name("pyrefusal partial-weight refusal-direction ablation")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(ablation.rank))  # llama.cpp scales by alpha / rank: 1
        write_provenance(writer, prov, owned)
        for name, arr in tensors:
            writer.add_tensor(name, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, out)
    return out


def export_weighted_lora(
    model_path: str | os.PathLike[str],
    ablation: WeightedAblation,
    out_path: str | os.PathLike[str],
    *,
    provenance: Mapping[str, Any],
    skip_embeddings: bool = False,
) -> Path:
    """Export ``ablation`` (e.g. ``pick.json`` of ``pyrefusal optimize``) as a LoRA for ``model_path``.

    Builds :class:`WriterRows` for the basis ``{r̂}`` and writes with :func:`write_weighted_lora`, the function
    the search used. ``skip_embeddings`` leaves the embeddings out (required when the model ties them to its LM
    head and the ablation edits them; the file then is not the whole intervention).

    Raises:
        ExportError: a LoRA is not exact for the model, or tied embeddings without ``skip_embeddings``.
    """
    path = Path(model_path)
    support = _checked_support(path)
    if ablation.embeddings and support.tied_embeddings and not skip_embeddings:
        raise ExportError(
            f"this ablation also edits the token embeddings, but {path.name} ties its LM head to token_embd.weight, "
            "so a LoRA cannot carry them (llama.cpp would abort). Pass --skip-embeddings to export the attention/MLP "
            "part only (pyrefusal's runtime ablates the embeddings with its hook), or search with --embeddings off."
        )
    if skip_embeddings and ablation.embeddings:
        ablation = WeightedAblation(ablation.direction, ablation.attn, ablation.mlp, 0.0)
    rows = WriterRows(path, ablation.basis, embeddings=bool(ablation.embeddings))
    return write_weighted_lora(rows, ablation, out_path, provenance=provenance)


def read_pick(run_dir: str | os.PathLike[str]) -> tuple[WeightedAblation, dict[str, Any]] | None:
    """The intervention ``pyrefusal optimize RUN_DIR --pick N`` chose (``RUN_DIR/optimize/pick.json``) and its
    record (``trial``, ``values`` = val first-token ``refusal``/``kl``, ``base_sha256``, ...), or None when no
    trial was picked.

    The one reader of ``pick.json``: ``export lora``, :mod:`pyrefusal.steering.steered` (``chat``, ``serve``) and
    ``pyrefusal.studies.optimize.load_pick`` (a re-export) all use it.

    Raises:
        ExportError: ``pick.json`` exists but cannot be read.
    """
    path = Path(run_dir) / PICK_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        return WeightedAblation.from_dict(record["ablation"]), record
    except (json.JSONDecodeError, KeyError, TypeError, ExportError) as e:
        raise ExportError(
            f"{path} is damaged ({e}); write it again with `pyrefusal optimize {run_dir} --pick N`"
        ) from None


def pick_control_vector(
    ablation: WeightedAblation, record: Mapping[str, Any], run_direction: np.ndarray, run_layer: int
) -> tuple[np.ndarray, int]:
    """What ``export cvec`` adds for an optimize pick: the pick's direction and the block input to add it at.

    A control vector adds a fixed vector; the pick's per-writer weights are an ablation that no control vector can
    express (``export lora`` / ``export merged`` carry them). What carries over is the searched direction (its
    position, fractional layer and language mix), scaled to the norm of the run's difference-in-means direction, so
    that ``--coeff`` means what it means for the run's own direction, added at the whole layer nearest to the pick's
    layer index.

    Args:
        ablation: the pick (:func:`read_pick`).
        record: its ``pick.json`` record (``params.direction_index`` when the layer was searched).
        run_direction: the run's direction, float ``(n_embd,)`` (``direction.npy``: not unit).
        run_layer: the run's selected layer (the pick's layer when the search kept it).

    Returns:
        ``(vector (n_embd,) float32, block input)``.

    Raises:
        ExportError: a rank-k pick (``--direction-span``): a control vector adds one direction.
    """
    if ablation.rank > 1:
        raise ExportError(
            f"this pick removes {ablation.rank} directions at once (--direction-span); a control vector "
            "adds one. Export the pick with `export lora` or `export merged`, or the run's direction with --paper"
        )
    index = record.get("params", {}).get("direction_index")
    block = run_layer if index is None else round(float(index))
    scale = float(np.linalg.norm(np.asarray(run_direction, dtype=np.float64)))
    return (ablation.direction * scale).astype(np.float32), block


def cached_weighted_lora(
    model_path: str | os.PathLike[str],
    ablation: WeightedAblation,
    *,
    model_sha256: str | None = None,
    skip_embeddings: bool = False,
    root: Path | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """The LoRA of ``ablation`` for ``model_path``, written once under ``cache_dir()/adapters`` by
    :func:`export_weighted_lora` (the file ``pyrefusal export lora`` writes for a pick).

    Args:
        model_path: the base GGUF.
        ablation: e.g. :func:`read_pick`'s.
        model_sha256: the base's sha256 when already known (else computed, with a sidecar).
        skip_embeddings: as in :func:`export_weighted_lora` (tied LM head: the file then is not exact).
        root: cache directory (default ``registry.cache_dir() / "adapters"``).
        provenance: extra ``pyrefusal.<key>`` facts written into a new file.

    Raises:
        ExportError: as :func:`export_weighted_lora`.
    """
    sha = model_sha256 or cached_sha256(model_path)
    root = root if root is not None else cache_dir() / "adapters"
    tag = "-noembd" if skip_embeddings and ablation.embeddings else ""
    out = root / f"weighted-{sha[:16]}-{ablation.sha256()[:16]}-v{LORA_FORMAT}{tag}.gguf"
    if not out.is_file():
        prov = {"source": "pyrefusal runtime cache", **dict(provenance or {}), "base_sha256": sha}
        export_weighted_lora(model_path, ablation, out, provenance=prov, skip_embeddings=skip_embeddings)
    return out


def apply_weighted(
    runtime: Runtime, adapter: str | os.PathLike[str] | None, ablation: WeightedAblation, *, hook_embeddings: bool
) -> None:
    """Arm a written adapter on ``runtime`` (scale 1) and, with ``hook_embeddings``, ablate node ``embd`` with the
    hook (tied embeddings; full weight). ``adapter=None`` arms the hook part only. Undo with
    :func:`release_weighted`."""
    runtime.clear_plan()
    if adapter is not None:
        runtime.set_lora([(adapter, 1.0)])
    if hook_embeddings:
        d = ablation.basis.astype(np.float32)  # (k, n_embd)
        runtime.set_plan({runtime.nodes.embd: PlanEntry(ablate=True)}, d)


def release_weighted(runtime: Runtime, adapter: str | os.PathLike[str] | None, *, delete: bool) -> None:
    """Remove every intervention from ``runtime``, free the adapter loaded from ``adapter`` and (``delete``)
    remove its file."""
    runtime.clear_plan()
    if adapter is not None:
        runtime.free_lora(adapter)
        if delete:
            Path(adapter).unlink(missing_ok=True)
