"""Where the stages keep their files: the run directory layout and the ``prompts.json`` record.

Every stage reads and writes its files through these types, so a file name is written once:

* :class:`DirectionFiles`: the files of the direction stages (sample -> extract -> select) in one
  directory: a ``pyrefusal run`` directory, a ``transfer`` run's ``directions/<lang>/``, a quantization
  sweep's ``extract-<hash>/<TYPE>/``.
* :class:`RunPaths`: every file of a ``pyrefusal run`` directory.
* :class:`PromptRecord`: ``prompts.json``, the ids of the prompts that entered each stage.

One ``prompts.json`` schema (written by every study since the restructure)::

    {"harmful_train": [ids kept by the train filter], "harmless_train": [...],
     "n_sampled": {"harmful_train": n, "harmless_train": n, "harmful_val": n, "harmless_val": n},
     "harmful_val": [ids kept by the val filter], "harmless_val": [...],
     "test": {lang: {kind: [ids]}}}            (``pyrefusal run`` only)

Transfer directories written before it store every sampled id under ``harmful_train`` / ``harmful_val`` and the
kept ones under ``harmful_train_kept`` / ``harmful_val_kept``; :class:`PromptRecord` reads both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pyrefusal.data.polyrefuse import Kind, Prompt
from pyrefusal.rundir import write_atomic

Split = Literal["train", "val"]

#: ``prompts.json`` value types: id lists, the sampled counts, the test ids per language and kind.
RecordValue = list[str] | dict[str, int] | dict[str, dict[str, list[str]]]


@dataclass(frozen=True)
class DirectionFiles:
    """The files of the direction stages in one directory.

    Attributes:
        root: the directory.
        prompts: ``prompts.json`` (:class:`PromptRecord`).
        candidates: ``candidates.npz`` (float64 candidates and means, :class:`~pyrefusal.method.directions.Candidates`).
        candidates_f32: ``candidates.npy``, float32 ``(n_positions, n_layers, n_embd)`` for users, or None
            (written by ``pyrefusal run`` only).
        activations: ``activations.npz``, per-prompt float16 train activations, or None (not kept).
        selection: ``selection.json``.
        direction: ``direction.npy``, the selected raw direction float32 ``(n_embd,)``, or None (not written).
        refusal_tokens: ``refusal_tokens.json`` of the language (transfer, quantization sweep), or None.
    """

    root: Path
    candidates_f32: Path | None = None
    activations: Path | None = None
    direction: Path | None = None
    refusal_tokens: Path | None = None
    prompts: Path = field(init=False)
    candidates: Path = field(init=False)
    selection: Path = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", self.root / "prompts.json")
        object.__setattr__(self, "candidates", self.root / "candidates.npz")
        object.__setattr__(self, "selection", self.root / "selection.json")

    @classmethod
    def language(cls, root: Path, *, activations: bool = True, direction: bool = True) -> DirectionFiles:
        """The layout of one language's (or variant's) directory: ``refusal_tokens.json``, ``prompts.json``,
        ``candidates.npz``, ``activations.npz`` (when ``activations``), ``selection.json``, ``direction.npy``
        (when ``direction``)."""
        return cls(
            root,
            activations=root / "activations.npz" if activations else None,
            direction=root / "direction.npy" if direction else None,
            refusal_tokens=root / "refusal_tokens.json",
        )


@dataclass(frozen=True)
class RunPaths:
    """Every file of a ``pyrefusal run`` directory (the stage that writes it in brackets).

    Attributes:
        root: the directory.
        config: ``config.json`` (the study's settings).
        prompts / candidates / candidates_full / selection / direction: the direction stages'
            (:meth:`direction_files`): ``prompts.json``, ``candidates.npy``, ``candidates.npz``,
            ``selection.json``, ``direction.npy``.
        completions: ``completions.jsonl`` (generate).
        metrics: ``metrics.json`` (measure: first-token refusal, capability, steering routes).
        back_translations / judge_cache: ``back_translations.jsonl`` / ``judge_cache.jsonl`` (judge).
        model: ``model.json`` (the model file's sha256).
        results / report: ``results.json`` / ``report.md`` (results, reporting).
    """

    root: Path
    config: Path = field(init=False)
    prompts: Path = field(init=False)
    candidates: Path = field(init=False)
    candidates_full: Path = field(init=False)
    selection: Path = field(init=False)
    direction: Path = field(init=False)
    completions: Path = field(init=False)
    results: Path = field(init=False)
    report: Path = field(init=False)
    metrics: Path = field(init=False)
    back_translations: Path = field(init=False)
    judge_cache: Path = field(init=False)
    model: Path = field(init=False)

    def __post_init__(self) -> None:
        r = Path(self.root)
        names = {
            "root": r,
            "config": r / "config.json",
            "prompts": r / "prompts.json",
            "candidates": r / "candidates.npy",
            "candidates_full": r / "candidates.npz",
            "selection": r / "selection.json",
            "direction": r / "direction.npy",
            "completions": r / "completions.jsonl",
            "results": r / "results.json",
            "report": r / "report.md",
            "metrics": r / "metrics.json",
            "back_translations": r / "back_translations.jsonl",
            "judge_cache": r / "judge_cache.jsonl",
            "model": r / "model.json",
        }
        for k, v in names.items():
            object.__setattr__(self, k, v)

    def direction_files(self) -> DirectionFiles:
        """The direction stages' view of this directory."""
        return DirectionFiles(self.root, candidates_f32=self.candidates, direction=self.direction)

    def outputs(self) -> tuple[Path, ...]:
        """The files a run writes after ``config.json`` (what ``--force`` deletes); the append-only judge
        caches are kept."""
        return (
            self.prompts,
            self.candidates,
            self.candidates_full,
            self.selection,
            self.direction,
            self.completions,
            self.results,
            self.report,
            self.metrics,
            self.model,
        )


class PromptRecord:
    """``prompts.json``: the ids of the prompts each stage used (schema in the module docstring).

    Wraps the stored dict so that its key order, and so its bytes, stay as written; reads both the current
    schema and the older transfer one (``*_kept`` keys).
    """

    def __init__(self, data: Mapping[str, RecordValue] | None = None) -> None:
        self.data: dict[str, RecordValue] = dict(data or {})

    @classmethod
    def load(cls, path: Path) -> PromptRecord:
        """Read ``prompts.json`` (either schema)."""
        return cls(json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        """Write ``prompts.json`` atomically (``indent=1``, ASCII)."""
        write_atomic(path, json.dumps(self.data, indent=1))

    def to_dict(self) -> dict[str, RecordValue]:
        """The stored dict (as embedded in ``results.json["prompts"]``)."""
        return self.data

    @classmethod
    def from_train(
        cls, sampled: Mapping[str, Sequence[Prompt]], harmful_kept: Sequence[bool], harmless_kept: Sequence[bool]
    ) -> PromptRecord:
        """The record after the extract stage: kept train ids and every split's sampled count."""
        return cls(
            {
                "harmful_train": [p.id for p, k in zip(sampled["harmful_train"], harmful_kept, strict=True) if k],
                "harmless_train": [p.id for p, k in zip(sampled["harmless_train"], harmless_kept, strict=True) if k],
                "n_sampled": {k: len(v) for k, v in sampled.items()},
            }
        )

    def set_val(self, harmful: Sequence[Prompt], harmless: Sequence[Prompt]) -> None:
        """Record the val prompts kept by the val filter (the select stage)."""
        self.data["harmful_val"] = [p.id for p in harmful]
        self.data["harmless_val"] = [p.id for p in harmless]

    def set_test(self, test: Mapping[str, Mapping[str, Sequence[Prompt]]]) -> None:
        """Record the test prompt ids ``{lang: {kind: [id, ...]}}`` (``pyrefusal run``)."""
        self.data["test"] = {lang: {k: [p.id for p in v] for k, v in kinds.items()} for lang, kinds in test.items()}

    @property
    def test(self) -> dict[str, dict[str, list[str]]]:
        """The test prompt ids ``{lang: {kind: [id, ...]}}`` (empty when not recorded)."""
        t = self.data.get("test")
        return t if isinstance(t, dict) else {}  # type: ignore[return-value]

    def kept(self, kind: Kind, split: Split) -> list[str] | None:
        """Ids of the ``kind`` prompts of ``split`` that the filter kept (None when not recorded yet)."""
        old = self.data.get(f"{kind}_{split}_kept")  # transfer directories before the one schema
        value = old if old is not None else self.data.get(f"{kind}_{split}")
        return list(value) if isinstance(value, list) else None
