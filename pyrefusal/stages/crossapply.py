"""Cross-application: every direction applied while the model answers harmful test prompts (docs/method.md §7).

:func:`transfer_matrix` is the generate stage (:func:`~pyrefusal.stages.generate.generate_stage`) over one
row per direction (plus the baseline and an optional random control), with the refusal rate per row and
target language read back from the completions file. ``pyrefusal transfer`` runs it with one direction per
source language, ``pyrefusal quant-sweep`` with one direction per quantized variant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pyrefusal.common import Log, Progress
from pyrefusal.data.polyrefuse import PolyRefuse
from pyrefusal.errors import PyrefusalError
from pyrefusal.method import intervention as iv
from pyrefusal.method.directions import random_like
from pyrefusal.method.refusal import RefusalDetector
from pyrefusal.runtime import ModelRunner
from pyrefusal.settings import TRANSFER_CONDITIONS
from pyrefusal.stages.direction import LanguageDirection
from pyrefusal.stages.generate import generate_stage, read_jsonl
from pyrefusal.stages.sample import sample_test_prompts
from pyrefusal.stages.shards import Shards

__all__ = ["CONTROL_ROW", "TransferResult", "condition_name", "transfer_matrix"]

CONTROL_ROW = "random"
"""Row of the control: a random direction with the norm of the first source's direction."""


def quiet(_: str) -> None:
    """A log sink that drops every message."""
    return


@dataclass
class TransferResult:
    """Refusal rates on harmful test prompts: baseline per target and one row per source direction.

    Attributes:
        condition: intervention applied with each source direction (``"ablation"`` or ``"harm_ablation"``).
        detector: name of the refusal detector behind every rate.
        sources / targets: languages, in the order given.
        rates: ``{source: {target: refusal rate}}``.
        baseline: ``{target: refusal rate}`` without intervention.
        counts: ``{row: {target: [refused, n]}}`` where row is a source, ``"baseline"`` or
            :data:`CONTROL_ROW`.
        prompt_ids: ``{target: [prompt ids]}`` evaluated.
        completions: file holding every completion.
        control: ``{target: refusal rate}`` with a random direction of the first source's norm
            ablated the same way (``None`` when the run has no control row).
    """

    condition: str
    detector: str
    sources: list[str]
    targets: list[str]
    rates: dict[str, dict[str, float]]
    baseline: dict[str, float]
    counts: dict[str, dict[str, list[int]]]
    prompt_ids: dict[str, list[str]]
    completions: str
    control: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransferResult:
        return cls(**dict(d))


def condition_name(condition: str, source: str) -> str:
    """Condition label of completions made with ``source``'s direction, e.g. ``"ablation:de"``."""
    return f"{condition}:{source}"


def _intervention(condition: str, direction: np.ndarray, layer: int, row: str) -> iv.Intervention:
    if condition == "ablation":
        base = iv.ablation(direction)
    elif condition == "harm_ablation":
        base = iv.harm_ablation(direction, layer)
    else:
        raise PyrefusalError(f"unknown transfer condition {condition!r}; choose from {list(TRANSFER_CONDITIONS)}")
    return replace(base, name=condition_name(condition, row))


def transfer_matrix(
    runtime: ModelRunner,
    directions: Mapping[str, LanguageDirection],
    data: PolyRefuse,
    targets: Sequence[str],
    *,
    n_test: int,
    max_new_tokens: int,
    detector: RefusalDetector,
    condition: str = "ablation",
    completions_path: Path,
    seed: int = 1,
    system: str | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
    log: Log = quiet,
    control: bool = False,
    shards: Shards | None = None,
) -> TransferResult:
    """Refusal rate of every target with every source direction ablated, plus the baselines.

    For each target Y, ``n_test`` harmful test rows (:func:`sample_test_prompts`, the same rows in every
    language) are answered greedily (``max_new_tokens``) without intervention (``"baseline"``) and
    with ``condition`` applied with each source direction r_X (completion condition
    ``"<condition>:<X>"``). With ``control``, a random direction with the norm of the first source's
    direction (seed ``seed``) is applied the same way, at that source's layer for ``harm_ablation``
    (row :data:`CONTROL_ROW`). Completions are appended to ``completions_path`` batch by batch; a
    (condition, prompt id) pair already in the file is not generated again (resume). Rates are
    computed from the file, re-judging responses whose stored detector differs from ``detector``.

    ``shards`` spreads the generation over model replicas (:func:`~pyrefusal.stages.generate.generate_stage`).

    Returns:
        the :class:`TransferResult`.

    Raises:
        PyrefusalError: unknown condition; DataError: a target without harmful test file.
    """
    if condition not in TRANSFER_CONDITIONS:
        raise PyrefusalError(f"unknown transfer condition {condition!r}; choose from {list(TRANSFER_CONDITIONS)}")
    prompts = sample_test_prompts(data, targets, n_test, seed)
    rows: list[tuple[str, iv.Intervention]] = [("baseline", iv.baseline())]
    rows += [(src, _intervention(condition, ld.direction, ld.selection.layer, src)) for src, ld in directions.items()]
    if control:
        first = next(iter(directions.values()))
        noise = random_like(first.direction, seed=seed)
        rows.append((CONTROL_ROW, _intervention(condition, noise, first.selection.layer, CONTROL_ROW)))
    # one generate call per row over all targets: full batches, one plan arm per row
    generate_stage(
        runtime,
        [(inter, [p for t in targets for p in prompts[t]]) for _, inter in rows],
        completions_path,
        detector,
        max_new_tokens=max_new_tokens,
        system=system,
        batch_size=batch_size,
        progress=progress,
        stage="transfer generation",
        log=log,
        shards=shards,
    )
    wanted = {p.id: t for t, ps in prompts.items() for p in ps}
    row_of = {inter.name: row for row, inter in rows}  # completion condition -> matrix row
    cells: dict[str, dict[str, list[int]]] = {}
    for c in read_jsonl(completions_path):
        row = row_of.get(c.condition)
        if c.prompt_id not in wanted or row is None:
            continue
        refused = c.refused if c.detector == detector.name else detector.judge(c.response, c.lang).refused
        cell = cells.setdefault(row, {}).setdefault(wanted[c.prompt_id], [0, 0])
        cell[0] += int(refused)
        cell[1] += 1
    rate = lambda k_n: k_n[0] / k_n[1] if k_n[1] else math.nan  # noqa: E731
    return TransferResult(
        condition=condition,
        detector=detector.name,
        sources=list(directions),
        targets=list(targets),
        rates={s: {t: rate(cells.get(s, {}).get(t, [0, 0])) for t in targets} for s in directions},
        baseline={t: rate(cells.get("baseline", {}).get(t, [0, 0])) for t in targets},
        counts={r: {t: cells.get(r, {}).get(t, [0, 0]) for t in targets} for r, _ in rows},
        prompt_ids={t: [p.id for p in ps] for t, ps in prompts.items()},
        completions=completions_path.name,
        control={t: rate(cells.get(CONTROL_ROW, {}).get(t, [0, 0])) for t in targets} if control else None,
    )
