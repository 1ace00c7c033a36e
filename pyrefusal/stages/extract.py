"""Stage: activations -> prompt filtering -> difference-in-means candidates (docs/method.md §3-§4).

The model-driven part of direction extraction, shared by ``pyrefusal run`` (:mod:`pyrefusal.studies.run`),
the cross-lingual analysis (:mod:`pyrefusal.studies.transfer`) and the quantization sweep
(:mod:`pyrefusal.studies.quantsweep`). :func:`extract_candidates` takes token lists and returns typed values;
:func:`extract_stage` is the stage the studies compose: it formats the sampled train prompts, extracts,
and owns the stage's files (``candidates.npz``, ``candidates.npy``, ``activations.npz``, the train part of
``prompts.json``; :class:`~pyrefusal.stages.layout.DirectionFiles`), reusing them when present.

The paper's filters: a harmful prompt is kept when the model's refusal score on it is positive (it
refuses), a harmless one when the score is negative (it complies); train prompts are filtered on the
logits of the capture pass, validation prompts on one extra forward pass. When fewer than
:data:`MIN_FILTERED` prompts of a class survive, the unfiltered set is used (the paper's code would
divide by zero), and the log says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pyrefusal.common import Log
from pyrefusal.data.polyrefuse import Prompt
from pyrefusal.method.directions import Candidates, mean_difference
from pyrefusal.method.selection import refusal_scores
from pyrefusal.runtime import ModelRunner, decode_groups
from pyrefusal.stages.layout import DirectionFiles, PromptRecord
from pyrefusal.stages.shards import Shards

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
    kept, n = int(mask.sum()), len(scores)
    # The paper's filter: harmful prompts the model refuses (refusal score > 0), harmless ones it answers (< 0).
    which = "the model refuses (refusal score > 0)" if keep_positive else "the model answers (refusal score < 0)"
    if kept < MIN_FILTERED:
        log(
            f"refusal filter: only {kept} of {n} {what} prompts are ones {which}, fewer than the {MIN_FILTERED} "
            f"needed, so all {n} are used unfiltered; more prompts (--n-train/--n-val) give the filter more to "
            "keep, --no-filter turns it off"
        )
        return np.ones(n, dtype=bool)
    log(f"refusal filter: kept {kept} of {n} {what} prompts, those {which}")
    return mask


def filter_by_refusal(
    runtime: ModelRunner,
    tokens: Sequence[list[int]],
    refusal_ids: Sequence[int],
    keep_positive: bool,
    log: Log,
    what: str,
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


@dataclass(frozen=True)
class CaptureSums:
    """What one extraction unit (:func:`capture_unit`) returns: enough to merge chunks exactly.

    Attributes:
        scores: the refusal score of each prompt of the chunk, float64 ``(n,)`` (the filter decides on all chunks).
        sum_all: float64 sum of the chunk's activations, ``(n_positions, n_layers, n_embd)``.
        sum_kept: the same over the prompts the filter's sign rule keeps (``score > 0`` or ``< 0``).
        acts: the activations themselves, float32 ``(n, n_positions, n_layers, n_embd)``, or None.
    """

    scores: np.ndarray
    sum_all: np.ndarray
    sum_kept: np.ndarray
    acts: np.ndarray | None = None


def capture_unit(
    runtime: ModelRunner,
    tokens: list[list[int]],
    positions: tuple[int, ...],
    refusal_ids: list[int],
    keep_positive: bool,
    keep_activations: bool,
) -> CaptureSums:
    """Extraction unit: capture one chunk of prompts (one decode group) and return its float64 sums.

    A difference in means is exactly mergeable: the driver adds the chunks' sums in chunk order and divides by
    the counts (:meth:`~pyrefusal.method.directions.Candidates.from_sums`).
    """
    acts, logits = runtime.capture(tokens, positions, layers=range(runtime.n_layer))
    # acts: (n, n_positions, n_layers, n_embd) float32; logits: (n, n_vocab)
    scores = refusal_scores(logits, refusal_ids)  # (n,) float64
    kept = scores > 0 if keep_positive else scores < 0
    return CaptureSums(
        scores=scores,
        sum_all=acts.sum(axis=0, dtype=np.float64),
        sum_kept=acts[kept].sum(axis=0, dtype=np.float64),
        acts=acts if keep_activations else None,
    )


def _sharded_sums(
    shards: Shards,
    runtime: ModelRunner,
    tokens: Sequence[list[int]],
    positions: tuple[int, ...],
    refusal_ids: Sequence[int],
    keep_positive: bool,
    keep_activations: bool,
) -> list[CaptureSums]:
    """Run :func:`capture_unit` over the decode groups of ``tokens``; the chunks' sums in chunk order."""
    groups = decode_groups([len(t) for t in tokens], 0, n_seq_max=runtime.n_seq_max, n_ctx=runtime.n_ctx)
    units = [
        ([list(tokens[i]) for i in g], positions, list(refusal_ids), keep_positive, keep_activations) for g in groups
    ]
    out: list[CaptureSums | None] = [None] * len(units)
    for i, part in shards.map(capture_unit, units, label="extraction"):
        out[i] = part
    return [p for p in out if p is not None]


def _train_masks(
    filter: bool,
    harmful_scores: Callable[[], np.ndarray],
    harmless_scores: Callable[[], np.ndarray],
    n_harmful: int,
    n_harmless: int,
    log: Log,
    label: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The train prompts that enter the means: the paper's filter on their refusal scores (``(n,)`` each, computed
    only when ``filter``), else all of them. Returns ``(keep_harmful, keep_harmless)`` bool masks."""
    if not filter:
        return np.ones(n_harmful, dtype=bool), np.ones(n_harmless, dtype=bool)
    pre = f"{label} " if label else ""
    return (
        filter_mask(harmful_scores(), True, log, pre + "harmful train"),
        filter_mask(harmless_scores(), False, log, pre + "harmless train"),
    )


def _merged_mean(parts: Sequence[CaptureSums], mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The mean over the prompts ``mask`` keeps, from the chunks' sums: ``(mean float64 (P, L, E), count)``.

    ``mask`` is either all True (no filter, or the filter fell back to every prompt) or the sign rule each chunk
    applied in :func:`capture_unit`.
    """
    use_all = bool(mask.all())
    total = sum((p.sum_all if use_all else p.sum_kept for p in parts), start=np.zeros_like(parts[0].sum_all))
    n = int(mask.sum())
    return total / n, n


def extract_candidates(
    runtime: ModelRunner,
    harmful: Sequence[list[int]],
    harmless: Sequence[list[int]],
    positions: tuple[int, ...],
    refusal_ids: Sequence[int],
    *,
    filter: bool,
    log: Log,
    label: str = "",
    keep_activations: bool = False,
    shards: Shards | None = None,
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
        shards: spread the capture over model replicas (one unit per decode group, merged by float64 sums);
            None: this process, as before.
    """
    if shards is not None:
        return _extract_sharded(
            shards, runtime, harmful, harmless, positions, refusal_ids, filter, log, label, keep_activations
        )
    layers = range(runtime.n_layer)  # block inputs 0..L-1
    harm, harm_logits = runtime.capture(list(harmful), positions, layers=layers)
    less, less_logits = runtime.capture(list(harmless), positions, layers=layers)
    # harm / less: (n, n_positions, n_layers, n_embd) float32; *_logits: (n, n_vocab)
    keep_h, keep_l = _train_masks(
        filter,
        lambda: refusal_scores(harm_logits, refusal_ids),
        lambda: refusal_scores(less_logits, refusal_ids),
        len(harm),
        len(less),
        log,
        label,
    )
    cands = mean_difference(harm[keep_h], less[keep_l], positions)
    return TrainCandidates(
        cands, keep_h, keep_l, harm if keep_activations else None, less if keep_activations else None
    )


def _extract_sharded(
    shards: Shards,
    runtime: ModelRunner,
    harmful: Sequence[list[int]],
    harmless: Sequence[list[int]],
    positions: tuple[int, ...],
    refusal_ids: Sequence[int],
    filter: bool,
    log: Log,
    label: str,
    keep_activations: bool,
) -> TrainCandidates:
    """:func:`extract_candidates` with the capture spread over ``shards``; the same filter messages and result."""
    harm = _sharded_sums(shards, runtime, harmful, positions, refusal_ids, True, keep_activations)
    less = _sharded_sums(shards, runtime, harmless, positions, refusal_ids, False, keep_activations)
    harm_scores = np.concatenate([p.scores for p in harm])  # (n_harmful,)
    less_scores = np.concatenate([p.scores for p in less])  # (n_harmless,)
    keep_h, keep_l = _train_masks(
        filter, lambda: harm_scores, lambda: less_scores, len(harm_scores), len(less_scores), log, label
    )
    mu_pos, n_pos = _merged_mean(harm, keep_h)
    mu_neg, n_neg = _merged_mean(less, keep_l)
    cands = Candidates.from_means(mu_pos, mu_neg, positions, n_pos, n_neg)
    acts_h = acts_l = None
    if keep_activations:
        acts_h = np.concatenate([p.acts for p in harm if p.acts is not None])
        acts_l = np.concatenate([p.acts for p in less if p.acts is not None])
    return TrainCandidates(cands, keep_h, keep_l, acts_h, acts_l)


def post_instruction_positions(runtime: ModelRunner, system: str | None) -> tuple[int, ...]:
    """The post-instruction (eoi) positions of the chat template, e.g. ``(-5, ..., -1)`` (docs/method.md §3)."""
    return tuple(range(-len(runtime.eoi_tokens(system)), 0))


def format_prompts(runtime: ModelRunner, prompts: Sequence[Prompt], system: str | None) -> list[list[int]]:
    """Chat-formatted token lists of ``prompts`` (``system`` = None: the template's default)."""
    return [runtime.chat_tokens(p.text, system) for p in prompts]


def save_activations(path: Path, acts: Mapping[str, np.ndarray]) -> None:
    """Write per-prompt activations ``{kind: (n, n_positions, n_layers, n_embd)}`` as float16 ``.npz``."""
    np.savez_compressed(path, **{k: np.asarray(v, dtype=np.float16) for k, v in acts.items()})


def load_activations(path: Path) -> dict[str, np.ndarray]:
    """Inverse of :func:`save_activations` (float16 arrays)."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@dataclass(frozen=True)
class Extracted:
    """What :func:`extract_stage` returns.

    Attributes:
        candidates: the difference-in-means candidates, float64 ``(n_positions, n_layers, n_embd)``.
        prompts: the ``prompts.json`` record (kept train ids, sampled counts; later stages add to it).
        activations: ``{"harmful": (n, n_positions, n_layers, n_embd), "harmless": ...}`` float16, or None.
        seconds: wall time of the extraction, None when the files were reused.
    """

    candidates: Candidates
    prompts: PromptRecord
    activations: dict[str, np.ndarray] | None = None
    seconds: float | None = None


def extract_stage(
    runtime: ModelRunner,
    sampled: Mapping[str, Sequence[Prompt]],
    files: DirectionFiles | None,
    refusal_ids: Sequence[int],
    *,
    system: str | None,
    filter: bool,
    log: Log,
    positions: tuple[int, ...] | None = None,
    projection: Literal["none", "harmless"] = "none",
    keep_activations: bool = False,
    label: str = "",
    shards: Shards | None = None,
) -> Extracted:
    """Stage 2: capture the train prompts, filter them, take the mean difference; save or reuse the files.

    Args:
        runtime: the model (with the hook).
        sampled: the paper sample (``harmful_train``, ``harmless_train``, ``harmful_val``, ``harmless_val``).
        files: where the stage's files go (None: nothing is saved or reused); ``candidates.npz`` and
            ``prompts.json`` there are reused, with ``activations.npz`` when present. ``candidates.npy`` is
            written when ``files.candidates_f32`` is set.
        refusal_ids: refusal tokens for the filter's scores.
        system: system prompt (None: the template's default).
        filter: the paper's train filter.
        log: messages (prefixed with ``label`` when given).
        positions: post-instruction positions to extract (default: all of them).
        projection: ``"harmless"``: candidates made orthogonal to the harmless mean.
        keep_activations: capture and return (and, with ``files.activations``, save) the per-prompt
            train activations.
        label: a language or variant name for the messages.
        shards: spread the capture over model replicas (:func:`extract_candidates`); None: this process.
    """
    pre = f"{label}: " if label else ""
    if files is not None and files.candidates.exists() and files.prompts.exists():
        acts = None
        if files.activations is not None and files.activations.exists():
            acts = load_activations(files.activations)
        log(f"{pre}reusing candidates.npz")
        return Extracted(Candidates.load(files.candidates), PromptRecord.load(files.prompts), acts)
    t = time.perf_counter()
    train = extract_candidates(
        runtime,
        format_prompts(runtime, sampled["harmful_train"], system),
        format_prompts(runtime, sampled["harmless_train"], system),
        positions if positions is not None else post_instruction_positions(runtime, system),
        refusal_ids,
        filter=filter,
        log=log,
        label=label,
        keep_activations=keep_activations,
        shards=shards,
    )
    cands = train.candidates.project_out_harmless() if projection == "harmless" else train.candidates
    record = PromptRecord.from_train(sampled, list(train.harmful_kept), list(train.harmless_kept))
    acts = None
    if train.harmful_acts is not None and train.harmless_acts is not None:
        acts = {"harmful": train.harmful_acts.astype(np.float16), "harmless": train.harmless_acts.astype(np.float16)}
    if files is not None:
        if files.candidates_f32 is not None:
            # (n_positions, n_layers, n_embd) float32 for users; the .npz keeps float64 and the means
            np.save(files.candidates_f32, cands.vectors.astype(np.float32))
        cands.save(files.candidates)
        if acts is not None and files.activations is not None:
            save_activations(files.activations, acts)
        record.save(files.prompts)
    log(f"{pre}candidates from {cands.n_harmful} harmful / {cands.n_harmless} harmless train prompts")
    return Extracted(cands, record, acts, time.perf_counter() - t)
