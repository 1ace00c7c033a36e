"""Difference-in-means refusal directions (NumPy only; imports neither llama_cpp nor _core).

Candidates are computed at every post-instruction (eoi) position and every block input, as
Arditi et al. and Wang et al. do: ``r[p, l] = mean_harmful x_l(p) - mean_harmless x_l(p)``,
accumulated in float64. Stored candidates are unnormalised (ablation normalises; ActAdd
uses the raw vector, whose norm matters).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyrefusal.errors import PyrefusalError


@dataclass(frozen=True)
class Candidates:
    """Candidate directions.

    Attributes:
        vectors: float64 ``(n_positions, n_layers, n_embd)``, unnormalised mean differences.
        positions: eoi positions (negative, from the end of the prompt), one per row.
        harmful_mean / harmless_mean: float64 ``(n_positions, n_layers, n_embd)``.
        n_harmful / n_harmless: prompts averaged.
    """

    vectors: np.ndarray
    positions: tuple[int, ...]
    harmful_mean: np.ndarray
    harmless_mean: np.ndarray
    n_harmful: int
    n_harmless: int

    def get(self, position: int, layer: int) -> np.ndarray:
        """The raw candidate at eoi ``position`` (e.g. -1) and block input ``layer``, float64 ``(n_embd,)``."""
        return self.vectors[self.positions.index(position), layer]

    def project_out_harmless(self) -> Candidates:
        """Candidates with their component along the harmless mean removed: ``r - (r.ĥ)ĥ`` per (position, layer).

        The "projected" variant of heretic (``orthogonalize_direction``) and jim-plus's abliteration: the
        harmless mean is what every prompt has in common at that point, so the projected direction only
        keeps what separates harmful from harmless prompts beyond a change of that common component's
        size. The means are kept as they were (the raw difference is ``harmful_mean - harmless_mean``).
        """
        norm = np.linalg.norm(self.harmless_mean, axis=-1, keepdims=True)  # (n_positions, n_layers, 1)
        h = np.divide(self.harmless_mean, norm, out=np.zeros_like(self.harmless_mean), where=norm > 0)
        along = np.sum(self.vectors * h, axis=-1, keepdims=True)  # (n_positions, n_layers, 1)
        return Candidates(
            self.vectors - along * h,
            self.positions,
            self.harmful_mean,
            self.harmless_mean,
            self.n_harmful,
            self.n_harmless,
        )

    @classmethod
    def from_means(
        cls,
        harmful_mean: np.ndarray,
        harmless_mean: np.ndarray,
        positions: tuple[int, ...],
        n_harmful: int,
        n_harmless: int,
    ) -> Candidates:
        """Candidates from the two class means (float64 ``(n_positions, n_layers, n_embd)``), e.g. merged from
        chunk sums computed on several model replicas; the same checks as :func:`mean_difference`."""
        if n_harmful == 0 or n_harmless == 0:
            raise PyrefusalError("need at least one harmful and one harmless prompt to compute a direction")
        diff = harmful_mean - harmless_mean
        if not np.all(np.isfinite(diff)):
            raise PyrefusalError("NaN/inf in the mean difference; the model produced non-finite activations")
        return cls(diff, tuple(positions), harmful_mean, harmless_mean, n_harmful, n_harmless)

    def save(self, path: Path) -> None:
        np.savez(
            path,
            vectors=self.vectors,
            positions=np.asarray(self.positions),
            harmful_mean=self.harmful_mean,
            harmless_mean=self.harmless_mean,
            counts=np.asarray([self.n_harmful, self.n_harmless]),
        )

    @classmethod
    def load(cls, path: Path) -> Candidates:
        with np.load(path) as z:
            return cls(
                vectors=z["vectors"],
                positions=tuple(int(p) for p in z["positions"]),
                harmful_mean=z["harmful_mean"],
                harmless_mean=z["harmless_mean"],
                n_harmful=int(z["counts"][0]),
                n_harmless=int(z["counts"][1]),
            )


def mean_difference(harmful: np.ndarray, harmless: np.ndarray, positions: tuple[int, ...]) -> Candidates:
    """Difference in means of two activation sets.

    Args:
        harmful: ``(n_harmful, n_positions, n_layers, n_embd)`` (any float dtype).
        harmless: ``(n_harmless, n_positions, n_layers, n_embd)``.
        positions: the eoi positions of axis 1.

    Raises:
        PyrefusalError: empty sets, mismatched shapes, or NaNs.
    """
    if harmful.ndim != 4 or harmless.ndim != 4 or harmful.shape[1:] != harmless.shape[1:]:
        raise PyrefusalError(
            f"activation shapes differ: harmful {harmful.shape} vs harmless {harmless.shape}; "
            "both must be (n_prompts, n_positions, n_layers, n_embd) from the same model"
        )
    if len(harmful) == 0 or len(harmless) == 0:
        raise PyrefusalError("need at least one harmful and one harmless prompt to compute a direction")
    # float64 accumulation as in the reference code (a bf16/f32 running mean drifts).
    # (accumulating in float64 without a float64 copy of the activations, which would double the memory)
    mu_pos = harmful.mean(axis=0, dtype=np.float64)  # (n_positions, n_layers, n_embd)
    mu_neg = harmless.mean(axis=0, dtype=np.float64)
    diff = mu_pos - mu_neg
    if not np.all(np.isfinite(diff)):
        raise PyrefusalError("NaN/inf in the mean difference; the model produced non-finite activations")
    return Candidates(diff, tuple(positions), mu_pos, mu_neg, len(harmful), len(harmless))


def unit(v: np.ndarray) -> np.ndarray:
    """``v / (||v|| + 1e-8)`` along the last axis (the paper's normalisation)."""
    v = np.asarray(v, dtype=np.float64)
    return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-8)


def cosine_matrix(directions: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Pairwise cosine similarity of named directions (each ``(n_embd,)``) -> (names, (n, n))."""
    names = list(directions)
    m = unit(np.stack([np.asarray(directions[k], dtype=np.float64) for k in names]))  # (n, n_embd)
    return names, m @ m.T


def random_like(v: np.ndarray, seed: int = 0) -> np.ndarray:
    """A random direction with the same norm as ``v`` (the control condition)."""
    r = np.random.default_rng(seed).standard_normal(np.shape(v))
    return r / np.linalg.norm(r) * np.linalg.norm(v)
