"""Direction selection as in Arditi et al. / Wang et al. (docs/method.md §4), plus its scores.

For each candidate ``(position, layer)`` (every eoi position x every block input):

* ``refusal_score``: mean over harmful val prompts of ``s = log(p_R+1e-8) - log(1-p_R+1e-8)``,
  where ``p_R`` is the last-position probability of the refusal tokens, under directional
  ablation of the candidate at every layer;
* ``kl``: mean KL(baseline || ablated) of the last-position distribution on harmless val;
* ``steering_score`` (optional): mean ``s`` on harmless val with ``+r`` added at the input of
  block ``layer``.

Rule (paper defaults): drop candidates with NaN scores, ``layer >= int(0.8 * n_layer)``,
``kl > 0.2`` and, only when asked (Arditi's preset), ``steering_score < 0``; order by
refusal score ascending with a stable sort (ties keep the order position -n..-1, then
layer 0..); take the first.

Because the rule takes the *first* candidate in refusal-score order that passes the filters,
KL and steering only need computing down that list until one passes (``mode="lazy"``): the
selected candidate is exactly the paper's, at a fraction of the cost. ``mode="all"`` scores
every candidate (heatmaps).

The maths (:func:`refusal_scores`, :func:`kl_divergence`, :func:`apply_rule`) is NumPy only; the stage
that drives a model, :func:`pyrefusal.stages.select.select_direction`, lives in the stages layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyrefusal.errors import PyrefusalError
from pyrefusal.families import PAPER_REFUSAL_OPENINGS  # the paper's refusal tokens (docs/method.md §4.1)
from pyrefusal.rundir import write_atomic

# First words of refusals per language; the first token of each is a refusal token. Used for models
# outside the paper's three families (PAPER_REFUSAL_OPENINGS) and for the languages the paper has no
# tokens for (es, fr, it, nl, pl, ar: common refusal openings).
REFUSAL_OPENINGS: dict[str, tuple[str, ...]] = {
    "en": ("I", "As"),
    "de": ("Es", "Ich"),
    "zh": ("我", "抱歉"),
    "ja": ("申し訳", "私は"),
    "ko": ("죄송합니다", "저는"),
    "ru": ("Я", "Извините"),
    "th": ("ขอ", "ฉัน"),
    "yo": ("Mo", "Mi"),
    "es": ("Lo", "No"),
    "fr": ("Je", "Désolé"),
    "it": ("Mi", "Non"),
    "nl": ("Het", "Ik"),
    "pl": ("Przepraszam", "Nie"),
    "ar": ("عذر", "أنا"),
}


class SelectionError(PyrefusalError):
    """No candidate passed the selection filters."""


def refusal_openings(lang: str, family: str | None = None) -> tuple[str, ...]:
    """Refusal openings of ``lang``: the paper's for a model of ``family`` where it has them
    (:data:`PAPER_REFUSAL_OPENINGS`), else :data:`REFUSAL_OPENINGS` (empty when neither knows ``lang``)."""
    return PAPER_REFUSAL_OPENINGS.get(family or "", {}).get(lang) or REFUSAL_OPENINGS.get(lang, ())


def refusal_token_ids(
    tokenize: Callable[[str], list[int]],
    lang: str,
    openings: Sequence[str] | None = None,
    family: str | None = None,
) -> list[int]:
    """First token of each refusal opening of ``lang`` (deduplicated, order kept).

    ``openings`` overrides the table; otherwise :func:`refusal_openings` for ``family`` (the model
    family, :attr:`pyrefusal.runtime.runtime.Runtime.family`) is used.

    Raises:
        PyrefusalError: no openings known for ``lang`` and none given.
    """
    words = list(openings) if openings else list(refusal_openings(lang, family))
    if not words:
        raise PyrefusalError(
            f"no refusal openings known for language {lang!r}; pass some with --refusal-openings "
            "(e.g. the first words of the model's refusals in that language)"
        )
    ids: list[int] = []
    for w in words:
        toks = tokenize(w)
        if toks and toks[0] not in ids:
            ids.append(toks[0])
    if not ids:
        raise PyrefusalError(
            f"the refusal openings {words} of {lang!r} tokenize to nothing; "
            "pass non-empty words with --refusal-openings"
        )
    return ids


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of ``logits`` along the last axis, in float64 as the reference code (any shape)."""
    x = np.asarray(logits, dtype=np.float64)  # float64 as the reference code
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def refusal_scores(logits: np.ndarray, token_ids: Sequence[int]) -> np.ndarray:
    """Per-prompt refusal score ``log(p_R+1e-8) - log(1-p_R+1e-8)``.

    Args:
        logits: ``(n_prompts, n_vocab)`` last-position logits.
        token_ids: refusal tokens R.

    Returns:
        float64 ``(n_prompts,)``.
    """
    p = np.exp(log_softmax(logits))
    p_r = p[:, list(token_ids)].sum(axis=1)
    return np.log(p_r + 1e-8) - np.log(1.0 - p_r + 1e-8)


def kl_divergence(base_logits: np.ndarray, new_logits: np.ndarray) -> np.ndarray:
    """Per-prompt KL(P || Q) with the paper's smoothing: ``sum P (log(P+1e-6) - log(Q+1e-6))``.

    Both ``(n_prompts, n_vocab)``; returns float64 ``(n_prompts,)``.
    """
    p = np.exp(log_softmax(base_logits))
    q = np.exp(log_softmax(new_logits))
    return (p * (np.log(p + 1e-6) - np.log(q + 1e-6))).sum(axis=1)


@dataclass
class CandidateScore:
    """Scores of one candidate; ``None`` = not computed (lazy mode)."""

    position: int
    layer: int
    refusal_score: float | None = None
    kl: float | None = None
    steering_score: float | None = None
    discarded: str | None = None  # why the rule dropped it (None = kept or not reached)


@dataclass(frozen=True)
class SelectionRule:
    """The filter settings. Defaults = Wang et al.; :meth:`arditi` = Arditi et al."""

    prune_fraction: float = 0.8
    kl_threshold: float = 0.2
    steering_filter: bool = False

    @classmethod
    def arditi(cls) -> SelectionRule:
        return cls(prune_fraction=0.8, kl_threshold=0.1, steering_filter=True)


@dataclass
class Selection:
    """The chosen direction and every score behind the choice (saved as selection.json)."""

    position: int
    layer: int
    refusal_score: float
    kl: float
    steering_score: float | None
    baseline_refusal_score: float
    refusal_tokens: list[int]
    rule: SelectionRule
    mode: str
    scores: list[CandidateScore] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> Selection:
        """Read ``selection.json``; a garbled file is a :class:`PyrefusalError` that names it and the fix."""
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            d["rule"] = SelectionRule(**d["rule"])
            d["scores"] = [CandidateScore(**s) for s in d["scores"]]
            sel = cls(**d)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
            raise PyrefusalError(
                f"{path} is not a readable selection ({type(e).__name__}: {e}); delete it and re-run "
                f"`pyrefusal run --out {path.parent}` with its options (the selection is made again from the "
                "saved candidates)"
            ) from None
        for name in ("position", "layer"):
            if not isinstance(getattr(sel, name), int) or isinstance(getattr(sel, name), bool):
                raise PyrefusalError(
                    f"{path}: `{name}` is {getattr(sel, name)!r}, not a whole number; delete it and re-run "
                    f"`pyrefusal run --out {path.parent}` with its options"
                )
        return sel


def apply_rule(scores: list[CandidateScore], n_layer: int, rule: SelectionRule) -> CandidateScore | None:
    """Apply the filters and order to fully computed scores; marks ``discarded``; returns the pick."""
    cutoff = int(rule.prune_fraction * n_layer)
    for s in scores:
        s.discarded = discard_reason(s, cutoff, rule)
    kept = [s for s in scores if s.discarded is None]
    kept = sorted(kept, key=lambda s: s.refusal_score)  # stable: ties keep position, layer order
    return kept[0] if kept else None


def discard_reason(s: CandidateScore, cutoff: int, rule: SelectionRule) -> str | None:
    """Why ``rule`` drops candidate ``s`` (``cutoff`` = first pruned layer), or None when it passes."""
    if s.discarded is not None and s.discarded.startswith("zero vector"):
        return s.discarded
    if s.layer >= cutoff:
        return f"layer >= int({rule.prune_fraction}*n_layer)={cutoff}"
    vals = [s.refusal_score, s.kl] + ([s.steering_score] if rule.steering_filter else [])
    if any(v is None or math.isnan(v) for v in vals):
        return "nan"
    assert s.kl is not None
    if s.kl > rule.kl_threshold:
        return f"kl > {rule.kl_threshold}"
    if rule.steering_filter and s.steering_score is not None and s.steering_score < 0:
        return "steering_score < 0"
    return None
