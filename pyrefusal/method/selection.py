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

The maths (:func:`refusal_scores`, :func:`kl_divergence`, :func:`apply_rule`) is NumPy only;
:func:`select_direction` drives a Runtime.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pyrefusal.errors import PyrefusalError
from pyrefusal.method.directions import Candidates
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


# The paper's refusal tokens per model family and language (docs/method.md §4.1, its REFUSAL_TOKENS_LANG),
# written as openings whose first token is the paper's id. For Qwen2 every id was checked on
# Qwen2.5's tokenizer (e.g. "申し訳" -> 127748 "申し", "죄송합니다" -> 132759, "И" -> 30174). The
# paper's Gemma ru ids are not decoded there, so Gemma ru uses REFUSAL_OPENINGS.
PAPER_REFUSAL_OPENINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "qwen2": {
        "en": ("I", "As"),
        "zh": ("我",),
        "de": ("Es", "Ich"),
        "ja": ("申し訳", "私は"),
        "ko": ("죄송합니다",),
        "ru": ("Я", "И"),
        "th": ("ขอ", "ฉ"),
        "yo": ("Mo",),
    },
    "llama3": {
        "en": ("I",),
        "zh": ("我",),
        "de": ("Ich",),
        "ja": ("私は",),
        "ko": ("저는",),
        "ru": ("Я",),
        "th": ("ฉัน",),
        "yo": ("I",),
    },
    "gemma2": {
        "en": ("I", "It"),
        "zh": ("我", "很"),
        "de": ("Ich",),
        "ja": ("申し訳", "私は"),
        "ko": ("죄송",),
        "th": ("ฉ",),
        "yo": ("Mi", "Emi"),
    },
}


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


def _log_softmax(logits: np.ndarray) -> np.ndarray:
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
    p = np.exp(_log_softmax(logits))
    p_r = p[:, list(token_ids)].sum(axis=1)
    return np.log(p_r + 1e-8) - np.log(1.0 - p_r + 1e-8)


def kl_divergence(base_logits: np.ndarray, new_logits: np.ndarray) -> np.ndarray:
    """Per-prompt KL(P || Q) with the paper's smoothing: ``sum P (log(P+1e-6) - log(Q+1e-6))``.

    Both ``(n_prompts, n_vocab)``; returns float64 ``(n_prompts,)``.
    """
    p = np.exp(_log_softmax(base_logits))
    q = np.exp(_log_softmax(new_logits))
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
        d = json.loads(path.read_text())
        d["rule"] = SelectionRule(**d["rule"])
        d["scores"] = [CandidateScore(**s) for s in d["scores"]]
        return cls(**d)


def apply_rule(scores: list[CandidateScore], n_layer: int, rule: SelectionRule) -> CandidateScore | None:
    """Apply the filters and order to fully computed scores; marks ``discarded``; returns the pick."""
    cutoff = int(rule.prune_fraction * n_layer)
    for s in scores:
        s.discarded = _discard_reason(s, cutoff, rule)
    kept = [s for s in scores if s.discarded is None]
    kept = sorted(kept, key=lambda s: s.refusal_score)  # stable: ties keep position, layer order
    return kept[0] if kept else None


def _discard_reason(s: CandidateScore, cutoff: int, rule: SelectionRule) -> str | None:
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


def select_direction(
    runtime: Any,
    candidates: Candidates,
    harmful_val: Sequence[Sequence[int]],
    harmless_val: Sequence[Sequence[int]],
    refusal_tokens: Sequence[int],
    *,
    rule: SelectionRule | None = None,
    mode: Literal["lazy", "all"] = "lazy",
    progress: Callable[[str, int, int], None] | None = None,
) -> Selection:
    """Score candidates on the val prompts with ``runtime`` and pick one by ``rule``.

    Args:
        runtime: a :class:`pyrefusal.runtime.runtime.Runtime` of the model the candidates came from.
        candidates: from :func:`pyrefusal.method.directions.mean_difference`.
        harmful_val / harmless_val: chat-formatted token lists.
        refusal_tokens: ids whose probability defines the refusal score.
        rule: filters (default: the paper's).
        mode: ``"lazy"`` (exact top-1, KL only as far as needed) or ``"all"``.
        progress: ``progress(stage, done, total)``.

    Raises:
        SelectionError: no candidate passes; the message says which filter removed them.
    """
    from pyrefusal.method import intervention as iv  # local: keeps the maths importable without the runtime

    rule = rule or SelectionRule()
    n_layer = candidates.vectors.shape[1]
    if not harmful_val or not harmless_val:
        raise PyrefusalError("selection needs harmful and harmless val prompts; got an empty set")
    runtime.clear_plan()
    base_harmful = runtime.last_logits(harmful_val)
    base_harmless = runtime.last_logits(harmless_val)
    baseline_score = float(refusal_scores(base_harmful, refusal_tokens).mean())
    cutoff = int(rule.prune_fraction * n_layer)

    scores = [CandidateScore(p, lay) for p in candidates.positions for lay in range(n_layer)]
    for s in scores:
        # e.g. block input 0 at a post-instruction position: every prompt has the same token
        # there, so the mean difference is exactly zero and there is nothing to ablate.
        if np.linalg.norm(candidates.get(s.position, s.layer)) == 0.0:
            s.refusal_score, s.discarded = math.nan, "zero vector (identical inputs)"
    todo = [s for s in scores if (s.layer < cutoff or mode == "all") and s.discarded is None]

    def ablated(s: CandidateScore, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        iv.arm(runtime, iv.ablation(candidates.get(s.position, s.layer)))
        try:
            return runtime.last_logits(prompts)
        finally:
            runtime.clear_plan()

    def fill_kl(s: CandidateScore) -> None:
        s.kl = float(kl_divergence(base_harmless, ablated(s, harmless_val)).mean())
        if rule.steering_filter or mode == "all":
            iv.arm(runtime, iv.actadd(candidates.get(s.position, s.layer), s.layer, coeff=1.0))
            try:
                s.steering_score = float(refusal_scores(runtime.last_logits(harmless_val), refusal_tokens).mean())
            finally:
                runtime.clear_plan()

    for i, s in enumerate(todo):
        s.refusal_score = float(refusal_scores(ablated(s, harmful_val), refusal_tokens).mean())
        if progress:
            progress("refusal score", i + 1, len(todo))
    if mode == "all":
        for i, s in enumerate(todo):
            fill_kl(s)
            if progress:
                progress("kl", i + 1, len(todo))
        pick = apply_rule(scores, n_layer, rule)
    else:
        pick = None
        order = sorted(
            (s for s in todo if s.refusal_score is not None and not math.isnan(s.refusal_score)),
            key=lambda s: s.refusal_score,
        )  # stable
        for s in todo:
            if s.refusal_score is None or math.isnan(s.refusal_score):
                s.discarded = "nan"
        for j, s in enumerate(order):
            fill_kl(s)
            if progress:
                progress("kl (lazy)", j + 1, len(order))
            reason = _discard_reason(s, cutoff, rule)
            s.discarded = reason
            if reason is None:
                pick = s
                break
        for s in scores:
            if s.layer >= cutoff:
                s.discarded = f"layer >= int({rule.prune_fraction}*n_layer)={cutoff}"
    if pick is None:
        reasons: dict[str, int] = {}
        for s in scores:
            reasons[s.discarded or "not reached"] = reasons.get(s.discarded or "not reached", 0) + 1
        raise SelectionError(
            f"no candidate passed the selection filters ({reasons}). Relax them, e.g. --kl-threshold 0.5, "
            "or use more val prompts (--n-val)."
        )
    assert pick.refusal_score is not None and pick.kl is not None
    return Selection(
        position=pick.position,
        layer=pick.layer,
        refusal_score=pick.refusal_score,
        kl=pick.kl,
        steering_score=pick.steering_score,
        baseline_refusal_score=baseline_score,
        refusal_tokens=list(refusal_tokens),
        rule=rule,
        mode=mode,
        scores=scores,
    )
