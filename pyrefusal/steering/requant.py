"""Direction-aware requantization: quantized weights whose component along a direction is (almost) exactly removed.

A merged ablation (:mod:`pyrefusal.steering.merge`) edits every residual writer ``W`` (NumPy ``(n_embd, n_in)``)
to ``W' = W - w r rᵀ W``. Quantizing ``W'`` again rounds every element independently, and the rounding errors
add up along ``r``: on Qwen2.5-Coder-0.5B Q4_K_M, llama.cpp's requantization puts back ~40 % of the component the
edit removed. Here the rounding is chosen instead, block format by block format:

* :func:`decode` / :func:`encode` read and write the integer quant values ``q`` of a tensor's blocks (with NumPy;
  the layouts of ggml's Q4_0, Q5_0, Q8_0, Q4_K and Q6_K, checked against ``gguf.quants.dequantize`` in the tests).
  Every element's value is ``step * q + offset`` (Q4_K: ``step = d·sc``, ``offset = -dmin·m`` of its sub-block;
  Q6_K: ``step = d·scale``; Q8_0 / Q5_0 / Q4_0: ``step = d``). Only ``q`` is ever rewritten: scales, minimums
  and every other byte of a block stay as they are.
* :func:`round_to_grid` puts the exact edited weights on a given grid (nearest ``q`` for the grid's scales),
  e.g. the base tensor's own blocks (then the merged matrix differs from the base only where the edit moved an
  element across a rounding boundary); :func:`best_blocks` takes each block from whichever of two grids (the
  base's, llama.cpp's requantization) is closer to the exact edit: blocks carry their own scales.
* :func:`refit` then cancels what rounding left along ``r``: for every group that the direction sums over
  (a column ``j`` of a writer: ``e_j = Σ_i r_i (W_q[i, j] - W'[i, j])``; a row of the embeddings), it moves a
  few elements by one quant step, ``Δe = ±r_i·step_i``, picking the moves that add the least squared error per
  unit of ``|e|`` removed (elements whose rounding was closest to a tie first), in a few rounds with ever
  smaller moves, until ``|e|`` is as small as the available steps allow. Vectorised over all groups.

Only a single direction (rank 1) can be re-fitted; other formats are not handled (:data:`REFIT_TYPES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp  # noqa: F401  (import llama_cpp before numpy/gguf: required in CUDA processes)

import gguf
import numpy as np

__all__ = ["REFIT_TYPES", "Grid", "RefitStats", "best_blocks", "decode", "encode", "refit", "round_to_grid"]

Q = gguf.GGMLQuantizationType

#: Storage types whose quant values :func:`decode` / :func:`encode` handle (and so :func:`refit` can adjust).
REFIT_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset({Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K})

#: Range of the stored integer ``q`` per type (Q8_0: llama.cpp writes -127..127; -128 is valid too).
_Q_RANGE: dict[gguf.GGMLQuantizationType, tuple[int, int]] = {
    Q.Q4_0: (-8, 7),
    Q.Q5_0: (-16, 15),
    Q.Q8_0: (-128, 127),
    Q.Q4_K: (0, 15),
    Q.Q6_K: (-32, 31),
}


@dataclass
class Grid:
    """The quant values of a tensor's rows and the grid they live on.

    Attributes:
        qtype: storage type.
        raw: the blocks, uint8 ``(n_rows, row_bytes)`` (kept for :func:`encode`).
        q: integer quant values, int16 ``(n_rows, ne0)``.
        step: value of one quant step per element, float32 ``(n_rows, ne0)``.
        offset: value at ``q = 0`` per element, float32 ``(n_rows, ne0)`` (non-zero for Q4_K only).
        lo / hi: the range of ``q``.
    """

    qtype: gguf.GGMLQuantizationType
    raw: np.ndarray
    q: np.ndarray
    step: np.ndarray
    offset: np.ndarray
    lo: int
    hi: int

    def values(self) -> np.ndarray:
        """The dequantized rows, float64 ``(n_rows, ne0)``."""
        return self.step.astype(np.float64) * self.q + self.offset


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian float16 fields ``(n, 2)`` uint8 -> float32 ``(n,)``."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32).reshape(-1)


def _nibbles(qs: np.ndarray, groups: int) -> np.ndarray:
    """ggml's nibble packing read: ``qs`` (n, groups * L) -> values (n, groups * 2 * L); low nibbles of a group
    of L bytes are its first L values, high nibbles the next L."""
    n = qs.shape[0]
    g = qs.reshape(n, groups, 1, -1) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (g & np.uint8(0x0F)).reshape(n, -1)


def _pack_nibbles(v: np.ndarray, groups: int) -> np.ndarray:
    """Inverse of :func:`_nibbles`: values (n, groups * 2 * L) in 0..15 -> bytes (n, groups * L)."""
    n = v.shape[0]
    g = v.astype(np.uint8).reshape(n, groups, 2, -1)
    return (g[:, :, 0] | (g[:, :, 1] << np.uint8(4))).reshape(n, -1)


def _q4k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 packed bytes per block -> 6-bit scales and mins, each (n, 8)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def decode(raw: np.ndarray, qtype: gguf.GGMLQuantizationType, ne0: int) -> Grid:
    """Read the quant values of rows of one tensor.

    Args:
        raw: uint8 ``(n_rows, row_bytes)``: the rows' blocks as stored.
        qtype: storage type, one of :data:`REFIT_TYPES`.
        ne0: row length (elements).

    Raises:
        ValueError: a type outside :data:`REFIT_TYPES`.
    """
    if qtype not in REFIT_TYPES:
        raise ValueError(f"cannot decode {qtype.name}")
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(-1, size)  # (n_blocks, size)
    nb = b.shape[0]
    offset = np.zeros((nb, block), dtype=np.float32)
    if qtype == Q.Q8_0:
        d = _f16(b[:, :2])
        q = b[:, 2:].view(np.int8).astype(np.int16)
        step = np.repeat(d[:, None], block, axis=1)
    elif qtype in (Q.Q4_0, Q.Q5_0):
        d = _f16(b[:, :2])
        step = np.repeat(d[:, None], block, axis=1)
        if qtype == Q.Q4_0:
            q = _nibbles(b[:, 2:], 1).astype(np.int16) - 8
        else:
            qh = np.ascontiguousarray(b[:, 2:6]).view(np.uint32).reshape(nb, 1)
            hi = ((qh >> np.arange(32, dtype=np.uint32).reshape(1, 32)) & np.uint32(1)).astype(np.int16)
            q = (_nibbles(b[:, 6:], 1).astype(np.int16) | (hi << 4)) - 16
    elif qtype == Q.Q4_K:
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, mn = _q4k_scale_min(b[:, 4:16])  # (nb, 8) sub-blocks of 32
        step = np.repeat((d[:, None] * sc.astype(np.float32)), 32, axis=1)
        offset = np.repeat(-(dmin[:, None] * mn.astype(np.float32)), 32, axis=1)
        q = _nibbles(b[:, 16:], 4).astype(np.int16)
    else:  # Q6_K: ql[128] qh[64] scales[16] d
        ql = _nibbles(b[:, :128], 2).astype(np.int16)  # (nb, 256)
        qh = b[:, 128:192].reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        qh = (qh & np.uint8(3)).reshape(nb, 256).astype(np.int16)
        q = (ql | (qh << 4)) - 32
        sc = b[:, 192:208].view(np.int8).astype(np.float32)  # (nb, 16) sub-blocks of 16
        d = _f16(b[:, 208:210])
        step = np.repeat(d[:, None] * sc, 16, axis=1)
    lo, hi = _Q_RANGE[qtype]
    shape = (n_rows, ne0)
    return Grid(qtype, raw, q.reshape(shape), step.reshape(shape), offset.reshape(shape), lo, hi)


def encode(grid: Grid, q: np.ndarray) -> np.ndarray:
    """The rows' blocks with their quant values replaced by ``q`` (int ``(n_rows, ne0)``, within the grid's
    range); every other byte (scales, minimums) is copied from ``grid.raw``. Returns uint8 ``(n_rows,
    row_bytes)``."""
    qtype = grid.qtype
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.array(grid.raw, dtype=np.uint8, copy=True).reshape(-1, size)  # (n_blocks, size)
    nb = out.shape[0]
    qi = np.clip(np.asarray(q, dtype=np.int16), grid.lo, grid.hi).reshape(nb, block)
    if qtype == Q.Q8_0:
        out[:, 2:] = qi.astype(np.int8).view(np.uint8)
    elif qtype == Q.Q4_0:
        out[:, 2:] = _pack_nibbles(qi + 8, 1)
    elif qtype == Q.Q5_0:
        u = (qi + 16).astype(np.uint32)
        bits = ((u >> 4) & 1) << np.arange(32, dtype=np.uint32).reshape(1, 32)
        out[:, 2:6] = np.bitwise_or.reduce(bits, axis=1).astype("<u4").reshape(nb, 1).view(np.uint8)
        out[:, 6:] = _pack_nibbles(u & 0x0F, 1)
    elif qtype == Q.Q4_K:
        out[:, 16:] = _pack_nibbles(qi, 4)
    else:  # Q6_K
        u = (qi + 32).astype(np.uint8)
        out[:, :128] = _pack_nibbles(u & 0x0F, 2)
        h = (u >> 4).reshape(nb, 2, 4, 32)
        out[:, 128:192] = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(nb, 64)
    return out.reshape(grid.raw.shape)


def round_to_grid(grid: Grid, target: np.ndarray) -> np.ndarray:
    """Nearest quant values of ``target`` (float ``(n_rows, ne0)``) on the grid's scales, clipped to its range
    (elements with a zero step keep their ``q``). Returns int16 ``(n_rows, ne0)``."""
    step = grid.step.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((np.asarray(target, dtype=np.float64) - grid.offset) / step)
    q = np.where(step > 0, q, grid.q)
    return np.clip(q, grid.lo, grid.hi).astype(np.int16)


def best_blocks(a: Grid, qa: np.ndarray, b: Grid, qb: np.ndarray, target: np.ndarray) -> tuple[Grid, np.ndarray, int]:
    """Block by block, the grid (and quant values) closer to ``target``.

    Every block carries its own scales, so a tensor may take each block from either of two quantizations of
    the same type and shape (e.g. the base's own blocks with the edit rounded onto them, and llama.cpp's
    requantization of the edit).

    Args:
        a / b: two grids of the same type and shape; qa / qb: quant values on them, int ``(n_rows, ne0)``.
        target: the exact weights, float ``(n_rows, ne0)``.

    Returns:
        The mixed grid (its ``raw`` the chosen blocks), its quant values, and how many blocks came from ``b``.
    """
    if a.qtype != b.qtype or a.q.shape != b.q.shape:
        raise ValueError("best_blocks needs two grids of one type and shape")
    block, size = gguf.GGML_QUANT_SIZES[a.qtype]
    n_rows, ne0 = a.q.shape
    t = np.asarray(target, dtype=np.float64)
    ea = ((a.step * np.asarray(qa) + a.offset - t) ** 2).reshape(n_rows, ne0 // block, block).sum(axis=2)
    eb = ((b.step * np.asarray(qb) + b.offset - t) ** 2).reshape(n_rows, ne0 // block, block).sum(axis=2)
    use_b = eb < ea  # (n_rows, n_blocks)
    raw = np.where(use_b[:, :, None], b.raw.reshape(n_rows, -1, size), a.raw.reshape(n_rows, -1, size))
    per_elem = np.repeat(use_b, block, axis=1)  # (n_rows, ne0)
    grid = Grid(
        a.qtype,
        raw.reshape(a.raw.shape),
        np.where(per_elem, b.q, a.q),
        np.where(per_elem, b.step, a.step),
        np.where(per_elem, b.offset, a.offset),
        a.lo,
        a.hi,
    )
    return grid, np.where(per_elem, qb, qa).astype(np.int16), int(use_b.sum())


@dataclass(frozen=True)
class RefitStats:
    """What :func:`refit` did to one tensor (sums of squares over its groups).

    Attributes:
        residual_before / residual_after: ``Σ_g e_g²`` before and after (``e_g`` the rounding error along ``r``).
        err_before / err_after: ``||W_q - W'||_F²`` before and after (the added squared error of the moves).
        moved: number of quant values changed by the re-fit.
    """

    residual_before: float
    residual_after: float
    err_before: float
    err_after: float
    moved: int


_SHORTLIST = 32  # fewest cheapest candidate moves sorted per group and round
_TOL = 0.01  # a group is done when its |e| is below this share of the typical starting |e|


def refit(
    grid: Grid, q: np.ndarray, target: np.ndarray, r: np.ndarray, *, axis: int, rounds: int = 8
) -> tuple[np.ndarray, RefitStats]:
    """Move quant values by ±1 step so that the rounding error along ``r`` (almost) vanishes.

    Args:
        grid: the tensor's grid (steps, offsets, range), :func:`decode` of the blocks whose scales are kept.
        q: starting quant values, int ``(n_rows, ne0)`` (e.g. :func:`round_to_grid` or the decoded ``grid.q``).
        target: the exact weights, float ``(n_rows, ne0)``.
        r: unit direction ``(n_embd,)``.
        axis: the axis the direction sums over: 0 for a writer stored as ``(n_embd, n_in)`` (one residual per
            column), 1 for embedding rows ``(n_vocab, n_embd)`` (one residual per row).
        rounds: passes; each cancels the remaining ``|e|`` with moves no larger than twice ``|e|``.

    Returns:
        The new quant values (int16 ``(n_rows, ne0)``) and :class:`RefitStats`.
    """
    # group-major orientation: (n_groups, n_cand); the direction's entries belong to the candidates
    t = np.asarray(target, dtype=np.float64)
    qq, st, off = np.asarray(q, dtype=np.int16), grid.step.astype(np.float64), grid.offset
    if axis == 0:
        qq, st, off, t = qq.T, st.T, off.T, t.T
    qq = np.array(qq, dtype=np.int16, copy=True)
    err = st * qq + off - t  # (G, C)
    w = np.asarray(r, dtype=np.float64).reshape(1, -1)  # (1, C)
    e = err @ w[0]  # (G,)
    stats0 = (float(e @ e), float(np.sum(err**2)))
    moved = np.zeros(qq.shape, dtype=bool)
    act = np.arange(qq.shape[0])  # groups still worth a round
    for _ in range(rounds):
        ea = e[act]
        sta, erra, qa = st[act], err[act], qq[act]  # (A, C)
        ws = w * sta  # Δe of a +1 move (steps may be negative: Q6_K's scales are signed)
        s = (-np.sign(ea)[:, None] * np.sign(ws)).astype(np.int16)  # the move that shrinks |e|
        qn = qa + s
        a = np.abs(ws)  # |Δe| of that move
        ok = (s != 0) & (qn >= grid.lo) & (qn <= grid.hi) & (a < 2 * np.abs(ea)[:, None])
        if not ok.any():
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(ok, sta * (sta + 2 * s * erra) / a, np.inf)  # added squared error per unit of |e|
            # shortlist as long as nearly every group needs (|e| over a typical move); the rest: next round
            ao = np.where(ok, a, 0.0)
            typical = np.sum(ao * ao, axis=1) / np.sum(ao, axis=1)  # size-weighted: cheap moves tend to be big
            need = np.where(typical > 0, np.abs(ea) / typical, 0.0)
        k = int(min(ratio.shape[1], max(_SHORTLIST, 2 * float(np.quantile(need, 0.99)) + 8)))
        idx = np.argpartition(ratio, k - 1, axis=1)[:, :k] if k < ratio.shape[1] else np.argsort(ratio, axis=1)
        order = np.take_along_axis(idx, np.argsort(np.take_along_axis(ratio, idx, 1), axis=1), 1)  # (A, k)
        ok_s = np.take_along_axis(ok, order, 1)
        a_s = np.where(ok_s, np.take_along_axis(a, order, 1), 0.0)
        rem = np.abs(ea)  # (A,) walk the sorted moves, vectorised over groups: take each that shrinks |e|
        take = np.zeros(ok_s.shape, dtype=bool)
        for j in range(order.shape[1]):
            tj = ok_s[:, j] & (a_s[:, j] < 2 * rem)
            take[:, j] = tj
            rem = rem - np.where(tj, a_s[:, j], 0.0)
        if not take.any():
            break
        ti, tj = np.nonzero(take)
        ci = order[ti, tj]
        gi = act[ti]
        ds = s[ti, ci]
        qq[gi, ci] += ds
        err[gi, ci] += ds * st[gi, ci]
        moved[gi, ci] = True
        e[act] = err[act] @ w[0]
        # next round: groups that moved this round (one that could not move cannot next time either) and whose
        # |e| is still above _TOL of a typical starting residual
        act = act[take.any(axis=1) & (np.abs(e[act]) > _TOL * np.sqrt(stats0[0] / max(e.size, 1)))]
        if act.size == 0:
            break
    out = qq.T if axis == 0 else qq
    stats = RefitStats(stats0[0], float(e @ e), stats0[1], float(np.sum(err**2)), int(moved.sum()))
    return np.ascontiguousarray(out), stats
