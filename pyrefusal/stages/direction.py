"""The direction stages of one language composed: refusal tokens -> extract -> select (docs/method.md §3-§4).

:func:`extract_direction` runs :func:`~pyrefusal.stages.extract.extract_stage` and
:func:`~pyrefusal.stages.select.select_stage` for one language (or one quantized variant) and returns a
:class:`LanguageDirection`: everything a study needs of that direction. The cross-lingual study
(:mod:`pyrefusal.studies.transfer`) calls it per source language, the quantization sweep
(:mod:`pyrefusal.studies.quantsweep`) per variant; files go to a
:meth:`~pyrefusal.stages.layout.DirectionFiles.language` directory and are reused there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyrefusal.common import Log, Progress
from pyrefusal.data.polyrefuse import Prompt
from pyrefusal.errors import PyrefusalError
from pyrefusal.method.directions import Candidates
from pyrefusal.method.selection import Selection, SelectionRule
from pyrefusal.runtime import ModelRunner
from pyrefusal.stages.extract import extract_stage, load_activations, save_activations
from pyrefusal.stages.layout import DirectionFiles, PromptRecord
from pyrefusal.stages.select import select_stage
from pyrefusal.stages.shards import Shards
from pyrefusal.stages.tokens import RefusalTokens

__all__ = ["LanguageDirection", "extract_direction", "load_language_directions"]


@dataclass
class LanguageDirection:
    """Everything computed for one source language.

    Attributes:
        lang: source language.
        candidates: difference-in-means candidates, float64 ``(n_positions, n_layers, n_embd)``.
        selection: the paper-rule selection, scored with this language's refusal tokens.
        refusal_tokens: the tokens used for filtering and selection.
        prompts: the ``prompts.json`` record (:class:`~pyrefusal.stages.layout.PromptRecord`: kept train and
            val ids, sampled counts; older transfer directories: sampled ids and ``*_kept`` ids).
        activations: per-prompt block-input activations of the sampled train prompts (unfiltered),
            ``{"harmful": (n, n_positions, n_layers, n_embd), "harmless": ...}`` stored as float16;
            ``None`` when not kept.
    """

    lang: str
    candidates: Candidates
    selection: Selection
    refusal_tokens: RefusalTokens
    prompts: dict[str, Any] = field(default_factory=dict)
    activations: dict[str, np.ndarray] | None = None

    @property
    def direction(self) -> np.ndarray:
        """The selected raw (unnormalised) direction, float64 ``(n_embd,)``."""
        return self.candidates.get(self.selection.position, self.selection.layer)

    @property
    def n_layers(self) -> int:
        return int(self.candidates.vectors.shape[1])

    def save(self, directory: Path) -> None:
        """Write every file of ``directions/<lang>/`` (see the module docstring)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.refusal_tokens.save(directory / "refusal_tokens.json")
        PromptRecord(self.prompts).save(directory / "prompts.json")
        self.candidates.save(directory / "candidates.npz")
        if self.activations is not None:
            save_activations(directory / "activations.npz", self.activations)
        self.selection.save(directory / "selection.json")
        np.save(directory / "direction.npy", self.direction.astype(np.float32))

    @classmethod
    def load(cls, directory: Path, lang: str | None = None) -> LanguageDirection:
        """Read a directory written by :meth:`save` (``activations.npz`` is optional).

        Raises:
            PyrefusalError: a required file is missing.
        """
        need = ("refusal_tokens.json", "candidates.npz", "selection.json")
        missing = [n for n in need if not (directory / n).exists()]
        if missing:
            raise PyrefusalError(
                f"{directory} lacks {missing}; it is not a finished direction. Re-run the extraction "
                "(it resumes from what is there)."
            )
        acts_path = directory / "activations.npz"
        prompts_path = directory / "prompts.json"
        return cls(
            lang=lang or directory.name,
            candidates=Candidates.load(directory / "candidates.npz"),
            selection=Selection.load(directory / "selection.json"),
            refusal_tokens=RefusalTokens.load(directory / "refusal_tokens.json"),
            prompts=json.loads(prompts_path.read_text()) if prompts_path.exists() else {},
            activations=load_activations(acts_path) if acts_path.exists() else None,
        )

    def summary(self) -> dict[str, Any]:
        """JSON-able facts about the selection (for transfer.json)."""
        s = self.selection
        record = PromptRecord(self.prompts)
        return {
            "position": s.position,
            "layer": s.layer,
            "kl": s.kl,
            "refusal_score": s.refusal_score,
            "baseline_refusal_score": s.baseline_refusal_score,
            "norm": float(np.linalg.norm(self.direction)),
            "n_harmful_train": self.candidates.n_harmful,
            "n_harmless_train": self.candidates.n_harmless,
            "n_harmful_val": len(record.kept("harmful", "val") or []) or None,
            "n_harmless_val": len(record.kept("harmless", "val") or []) or None,
            "refusal_tokens": self.refusal_tokens.to_dict(),
        }


def extract_direction(
    runtime: ModelRunner,
    lang: str,
    sampled: Mapping[str, Sequence[Prompt]],
    tokens: RefusalTokens,
    files: DirectionFiles | None,
    *,
    system: str | None,
    filter: bool,
    rule: SelectionRule,
    positions: tuple[int, ...] | None = None,
    keep_activations: bool = False,
    progress: Progress | None = None,
    log: Log,
    label: str | None = None,
    seconds: dict[str, float] | None = None,
    shards: Shards | None = None,
) -> LanguageDirection:
    """Extract (stage 2) and select (stage 3) the refusal direction of one language, reusing ``files``.

    Args:
        runtime: the model (with the hook).
        lang: the prompts' language (its val filter follows the paper's per-language rule).
        sampled: its paper sample (train/val).
        tokens: its refusal tokens (filter and selection scores).
        files: where to save / resume (None: nothing is saved); ``direction.npy`` is written when
            ``files.direction`` is set.
        system: system prompt (None: the template's default).
        filter: the paper's train and val filters.
        rule: selection rule (lazy selection, the paper's exact top-1).
        positions: post-instruction positions to extract (default: all).
        keep_activations: keep per-prompt train activations (float16) for PCA and projections.
        progress: ``progress(stage, done, total)`` of the selection.
        log: messages, prefixed with ``label`` (default ``lang``).
        seconds: filled with ``"candidates"`` and ``"selection"`` wall times as each stage finishes (also
            when selection then fails).
        shards: spread capture and candidate scoring over model replicas (:mod:`pyrefusal.stages.shards`).

    Raises:
        SelectionError: no candidate passed the rule.
    """
    label = lang if label is None else label
    t = time.perf_counter()
    extracted = extract_stage(
        runtime,
        sampled,
        files,
        tokens.ids,
        system=system,
        filter=filter,
        log=log,
        positions=positions,
        keep_activations=keep_activations,
        label=label,
        shards=shards,
    )
    if seconds is not None:
        seconds["candidates"] = time.perf_counter() - t
    t = time.perf_counter()
    selection, _ = select_stage(
        runtime,
        sampled,
        extracted,
        files,
        tokens.ids,
        lang=lang,
        system=system,
        filter=filter,
        rule=rule,
        mode="lazy",
        progress=progress,
        log=log,
        label=label,
        shards=shards,
    )
    if seconds is not None:
        seconds["selection"] = time.perf_counter() - t
    return LanguageDirection(
        label, extracted.candidates, selection, tokens, extracted.prompts.to_dict(), extracted.activations
    )


def load_language_directions(directory: Path, langs: Sequence[str] | None = None) -> dict[str, LanguageDirection]:
    """Load ``directory/<lang>/`` for ``langs`` (default: every finished sub-directory, sorted)."""
    if langs is None:
        langs = sorted(p.name for p in directory.iterdir() if (p / "selection.json").exists())
    return {lang: LanguageDirection.load(directory / lang, lang) for lang in langs}
