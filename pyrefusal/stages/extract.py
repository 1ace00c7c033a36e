"""Stage: activations -> prompt filtering -> difference-in-means candidates (docs/method.md §3-§4).

The model-driven part of direction extraction, shared by ``pyrefusal run`` (:mod:`pyrefusal.studies.run`),
the cross-lingual analysis (:mod:`pyrefusal.studies.transfer`) and the quantization sweep
(:mod:`pyrefusal.studies.quantsweep`). It takes token lists and returns typed values; where they are stored,
and under which record format, is each caller's business.

The paper's filters: a harmful prompt is kept when the model's refusal score on it is positive (it
refuses), a harmless one when the score is negative (it complies); train prompts are filtered on the
logits of the capture pass, validation prompts on one extra forward pass. When fewer than
:data:`MIN_FILTERED` prompts of a class survive, the unfiltered set is used (the paper's code would
divide by zero), and the log says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyrefusal.method.directions import Candidates, mean_difference
from pyrefusal.method.selection import refusal_scores

Log = Callable[[str], None]

#: Below this many prompts of a class after filtering, the unfiltered set is used.
MIN_FILTERED = 4


NO_VAL_FILTER = frozenset({"yo", "yi"})
"""Source languages whose val prompts the paper does not filter (``filter_val=False``, docs/method.md §1.4):
the model barely refuses in them, so the filter would leave almost no harmful val prompt."""


def filter_mask(scores: np.ndarray, keep_positive: bool, log: Log, what: str) -> np.ndarray:
    """Which prompts the paper's filter keeps: ``scores > 0`` (``keep_positive``) or ``scores < 0``.

    Args:
        scores: refusal scores, ``(n,)``.
        keep_positive: True for harmful prompts (keep refusals), False for harmless ones.
        log: where to say that the filter was bypassed.
        what: the prompt set, for that message ("harmful train").

    Returns:
        Boolean mask ``(n,)``; all True when fewer than :data:`MIN_FILTERED` survive.
    """
    mask = scores > 0 if keep_positive else scores < 0
    if int(mask.sum()) < MIN_FILTERED:
        log(f"filter kept {int(mask.sum())}/{len(scores)} {what} prompts (< {MIN_FILTERED}); using all of them")
        return np.ones(len(scores), dtype=bool)
    return mask


def filter_by_refusal(
    runtime: Any, tokens: Sequence[list[int]], refusal_ids: list[int], keep_positive: bool, log: Log, what: str
) -> np.ndarray:
    """One forward pass over ``tokens`` and :func:`filter_mask` of their refusal scores (``(n,)`` bool)."""
    scores = refusal_scores(runtime.last_logits(list(tokens)), refusal_ids)  # (n,)
    return filter_mask(scores, keep_positive, log, what)


@dataclass(frozen=True)
class TrainCandidates:
    """What :func:`extract_candidates` returns.

    Attributes:
        candidates: difference-in-means vectors at every (position, block input).
        harmful_kept: which harmful train prompts entered the mean, ``(n_harmful,)`` bool.
        harmless_kept: the same for the harmless ones, ``(n_harmless,)`` bool.
        harmful_acts: the captured activations ``(n_harmful, n_positions, n_layer, n_embd)`` float32,
            or None unless asked for (they are large).
        harmless_acts: the same for the harmless prompts.
    """

    candidates: Candidates
    harmful_kept: np.ndarray
    harmless_kept: np.ndarray
    harmful_acts: np.ndarray | None = None
    harmless_acts: np.ndarray | None = None


def extract_candidates(
    runtime: Any,
    harmful: Sequence[list[int]],
    harmless: Sequence[list[int]],
    positions: tuple[int, ...],
    refusal_ids: list[int],
    *,
    filter: bool,
    log: Log,
    label: str = "",
    keep_activations: bool = False,
) -> TrainCandidates:
    """Capture the block inputs of the train prompts, filter them, and take the mean difference.

    Args:
        runtime: a :class:`~pyrefusal.runtime.runtime.Runtime` with the hook.
        harmful: chat-formatted token lists of the harmful train prompts.
        harmless: the same for the harmless train prompts.
        positions: post-instruction positions (negative offsets, e.g. ``(-5, ..., -1)``).
        refusal_ids: refusal token ids for the filter's scores.
        filter: apply the paper's train filter (on the capture pass's logits; no extra pass).
        log: progress messages.
        label: prefix of the filter's messages (a language code).
        keep_activations: also return the captured activations.
    """
    layers = range(runtime.n_layer)  # block inputs 0..L-1
    harm, harm_logits = runtime.capture(list(harmful), positions, layers=layers)
    less, less_logits = runtime.capture(list(harmless), positions, layers=layers)
    # harm / less: (n, n_positions, n_layers, n_embd) float32; *_logits: (n, n_vocab)
    keep_h = np.ones(len(harm), dtype=bool)
    keep_l = np.ones(len(less), dtype=bool)
    if filter:
        pre = f"{label} " if label else ""
        keep_h = filter_mask(refusal_scores(harm_logits, refusal_ids), True, log, pre + "harmful train")
        keep_l = filter_mask(refusal_scores(less_logits, refusal_ids), False, log, pre + "harmless train")
    cands = mean_difference(harm[keep_h], less[keep_l], positions)
    return TrainCandidates(
        cands, keep_h, keep_l, harm if keep_activations else None, less if keep_activations else None
    )
