"""Stage 3, select: filter the val prompts and pick one candidate by the paper's rule (docs/method.md §4).

:func:`select_direction` scores candidates with a model (refusal score under ablation, KL on harmless
prompts, optionally the steering score) and applies :class:`~pyrefusal.method.selection.SelectionRule`;
``mode="lazy"`` computes KL only down the refusal-score order until a candidate passes, which picks exactly
the paper's candidate. The scores and the rule themselves are NumPy (:mod:`pyrefusal.method.selection`).

:func:`select_stage` is the stage the studies compose: val filter (:func:`filter_val`), selection, and its
files (``selection.json``, the val part of ``prompts.json``, ``direction.npy``), reusing ``selection.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from pyrefusal.common import Log, Progress
from pyrefusal.data.polyrefuse import Prompt
from pyrefusal.errors import PyrefusalError
from pyrefusal.method import intervention as iv
from pyrefusal.method.directions import Candidates
from pyrefusal.method.selection import (
    CandidateScore,
    Selection,
    SelectionError,
    SelectionRule,
    apply_rule,
    discard_reason,
    kl_divergence,
    refusal_scores,
)
from pyrefusal.runtime import ModelRunner
from pyrefusal.stages.extract import NO_VAL_FILTER, Extracted, filter_by_refusal, format_prompts
from pyrefusal.stages.layout import DirectionFiles
from pyrefusal.stages.shards import Serial, Shards
from pyrefusal.steering import router

__all__ = ["SelectionError", "filter_val", "select_direction", "select_stage"]


def select_direction(
    runtime: ModelRunner,
    candidates: Candidates,
    harmful_val: Sequence[Sequence[int]],
    harmless_val: Sequence[Sequence[int]],
    refusal_tokens: Sequence[int],
    *,
    rule: SelectionRule | None = None,
    mode: Literal["lazy", "all"] = "lazy",
    progress: Progress | None = None,
    shards: Shards | None = None,
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
        shards: score the candidates on several model replicas (the same scores and pick); None: this process.

    Raises:
        SelectionError: no candidate passes; the message says which filter removed them.
    """
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

    # one candidate per unit: on this process (Serial) or spread over model replicas, the same numbers and pick
    scoring = _CandidateScoring(
        shards or Serial(runtime), candidates, harmful_val, harmless_val, refusal_tokens, base_harmless, progress
    )
    scoring.refusal(todo)
    if mode == "all":
        scoring.kl(todo, steering=True)
        pick = apply_rule(scores, n_layer, rule)
    else:
        pick = scoring.lazy_pick(todo, cutoff, rule)
    if mode == "lazy":
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


def ablated_refusal_unit(
    runtime: ModelRunner, vector: np.ndarray, harmful_val: list[list[int]], refusal_tokens: list[int]
) -> float:
    """Selection unit: the mean refusal score of the val harmful prompts with ``vector`` ablated everywhere."""
    router.arm(runtime, iv.ablation(vector))
    try:
        return float(refusal_scores(runtime.last_logits(harmful_val), refusal_tokens).mean())
    finally:
        runtime.clear_plan()


def ablated_kl_unit(
    runtime: ModelRunner,
    vector: np.ndarray,
    layer: int,
    base_harmless: np.ndarray,
    harmless_val: list[list[int]],
    refusal_tokens: list[int],
    steering: bool,
) -> tuple[float, float | None]:
    """Selection unit: first-token KL on the val harmless prompts with ``vector`` ablated (``base_harmless``:
    their unsteered logits ``(n, n_vocab)``), and with ``steering`` the steering score of adding it at ``layer``."""
    router.arm(runtime, iv.ablation(vector))
    try:
        kl = float(kl_divergence(base_harmless, runtime.last_logits(harmless_val)).mean())
    finally:
        runtime.clear_plan()
    steer = None
    if steering:
        router.arm(runtime, iv.actadd(vector, layer, coeff=1.0))
        try:
            steer = float(refusal_scores(runtime.last_logits(harmless_val), refusal_tokens).mean())
        finally:
            runtime.clear_plan()
    return kl, steer


class _CandidateScoring:
    """Candidate scores computed by :class:`~pyrefusal.stages.shards.Shards` units (one candidate per unit), with
    the results of the single-process scoring: the lazy rule takes the same candidate and records the same scores
    (KL values computed past the pick in the last round are dropped again)."""

    def __init__(
        self,
        shards: Shards,
        candidates: Candidates,
        harmful_val: Sequence[Sequence[int]],
        harmless_val: Sequence[Sequence[int]],
        refusal_tokens: Sequence[int],
        base_harmless: np.ndarray,
        progress: Progress | None,
    ) -> None:
        self.shards = shards
        self.candidates = candidates
        self.harmful = [list(t) for t in harmful_val]
        self.harmless = [list(t) for t in harmless_val]
        self.tokens = list(refusal_tokens)
        self.base = base_harmless  # (n_harmless_val, n_vocab) float32
        self.progress = progress

    def refusal(self, todo: list[CandidateScore]) -> None:
        units = [(self.candidates.get(s.position, s.layer), self.harmful, self.tokens) for s in todo]
        for done, (i, value) in enumerate(self.shards.map(ablated_refusal_unit, units, label="refusal score"), 1):
            todo[i].refusal_score = value
            if self.progress:
                self.progress("refusal score", done, len(todo))

    def kl(
        self,
        items: list[CandidateScore],
        *,
        steering: bool,
        stage: str = "kl",
        offset: int = 0,
        total: int | None = None,
    ) -> None:
        units = [
            (self.candidates.get(s.position, s.layer), s.layer, self.base, self.harmless, self.tokens, steering)
            for s in items
        ]
        for done, (i, (kl, steer)) in enumerate(self.shards.map(ablated_kl_unit, units, label=stage), 1):
            items[i].kl = kl
            if steering:
                items[i].steering_score = steer
            if self.progress:
                self.progress(stage, offset + done, total or len(items))

    def lazy_pick(self, todo: list[CandidateScore], cutoff: int, rule: SelectionRule) -> CandidateScore | None:
        order = sorted(
            (s for s in todo if s.refusal_score is not None and not math.isnan(s.refusal_score)),
            key=lambda s: s.refusal_score,
        )  # stable, as the single-process rule
        for s in todo:
            if s.refusal_score is None or math.isnan(s.refusal_score):
                s.discarded = "nan"
        width = max(1, self.shards.width)
        for start in range(0, len(order), width):
            batch = order[start : start + width]
            self.kl(batch, steering=rule.steering_filter, stage="kl (lazy)", offset=start, total=len(order))
            for j, s in enumerate(batch):
                reason = discard_reason(s, cutoff, rule)
                s.discarded = reason
                if reason is None:
                    for later in batch[j + 1 :]:  # not reached by the single-process rule
                        later.kl, later.steering_score, later.discarded = None, None, None
                    return s
        return None


def filter_val(
    runtime: ModelRunner,
    sampled: Mapping[str, Sequence[Prompt]],
    refusal_ids: Sequence[int],
    *,
    lang: str,
    system: str | None,
    filter: bool,
    log: Log,
    label: str = "",
) -> tuple[list[Prompt], list[Prompt]]:
    """The val prompts that enter selection: harmful ones the model refuses (s > 0), harmless ones it
    answers (s < 0), each by one forward pass; unfiltered when ``filter`` is off or ``lang`` is one of
    :data:`~pyrefusal.stages.extract.NO_VAL_FILTER` (the paper's rule, docs/method.md §1.4).

    Returns:
        ``(harmful, harmless)`` kept val prompts.
    """
    pre = f"{label}: " if label else ""
    harmful, harmless = list(sampled["harmful_val"]), list(sampled["harmless_val"])
    if not filter:
        return harmful, harmless
    if lang in NO_VAL_FILTER:
        log(f"{pre}val prompts not filtered: source language {lang!r} (the paper's rule, docs/method.md §1.4)")
        return harmful, harmless
    what = f"{label} " if label else ""
    keep = filter_by_refusal(
        runtime, format_prompts(runtime, harmful, system), refusal_ids, True, log, what + "harmful val"
    )
    harmful = [p for p, k in zip(harmful, keep, strict=True) if k]
    keep = filter_by_refusal(
        runtime, format_prompts(runtime, harmless, system), refusal_ids, False, log, what + "harmless val"
    )
    harmless = [p for p, k in zip(harmless, keep, strict=True) if k]
    return harmful, harmless


def select_stage(
    runtime: ModelRunner,
    sampled: Mapping[str, Sequence[Prompt]],
    extracted: Extracted,
    files: DirectionFiles | None,
    refusal_ids: Sequence[int],
    *,
    lang: str,
    system: str | None,
    filter: bool,
    rule: SelectionRule,
    mode: Literal["lazy", "all"] = "lazy",
    progress: Progress | None = None,
    log: Log,
    label: str = "",
    shards: Shards | None = None,
) -> tuple[Selection, float | None]:
    """Stage 3: val filter and selection; saves ``selection.json`` and the kept val ids in ``prompts.json``
    (``extracted.prompts`` is updated), or reuses ``selection.json``; then writes ``direction.npy`` when
    ``files.direction`` is set.

    ``shards`` scores the candidates on several model replicas (:func:`select_direction`).

    Returns:
        ``(selection, seconds)``: seconds is None when ``selection.json`` was reused.

    Raises:
        SelectionError: no candidate passed the rule.
    """
    pre = f"{label}: " if label else ""
    seconds = None
    if files is not None and files.selection.exists():
        selection = Selection.load(files.selection)
        log(f"{pre}reusing selection.json")
    else:
        t = time.perf_counter()
        harmful, harmless = filter_val(
            runtime, sampled, refusal_ids, lang=lang, system=system, filter=filter, log=log, label=label
        )
        selection = select_direction(
            runtime,
            extracted.candidates,
            format_prompts(runtime, harmful, system),
            format_prompts(runtime, harmless, system),
            refusal_ids,
            rule=rule,
            mode=mode,
            progress=progress,
            shards=shards,
        )
        seconds = time.perf_counter() - t
        log(f"{pre}selection in {seconds:.1f}s")
        extracted.prompts.set_val(harmful, harmless)
        if files is not None:
            selection.save(files.selection)
            extracted.prompts.save(files.prompts)
    direction = extracted.candidates.get(selection.position, selection.layer)  # (n_embd,) float64, unnormalised
    if files is not None and files.direction is not None:
        np.save(files.direction, direction.astype(np.float32))
    log(
        f"{pre}selected position {selection.position}, layer {selection.layer}: refusal score "
        f"{selection.baseline_refusal_score:.3f} -> {selection.refusal_score:.3f}, KL {selection.kl:.4f}"
    )
    return selection, seconds
