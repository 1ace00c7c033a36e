"""Evaluation: greedy completions under an intervention, refusal detection, and rates.

Completions are values (:class:`Completion`) written to JSONL as they are produced, so an
interrupted run keeps what it generated. Refusal detection goes through a
:class:`~pyrefusal.refusal.RefusalDetector`; every number records which detector made it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyrefusal import intervention as iv
from pyrefusal.dataset import Prompt
from pyrefusal.refusal import RefusalDetector


@dataclass(frozen=True)
class Completion:
    """One greedy completion and its refusal verdict."""

    prompt_id: str
    lang: str
    kind: str
    condition: str
    prompt: str
    response: str
    n_tokens: int
    finish_reason: str
    refused: bool
    marker: str | None
    detector: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate_completions(
    runtime: Any,
    prompts: Sequence[Prompt],
    intervention: iv.Intervention,
    detector: RefusalDetector,
    *,
    max_new_tokens: int,
    system: str | None = None,
    batch_size: int = 16,
    on_batch: Callable[[list[Completion]], None] | None = None,
    path: iv.PathChoice = "hook",
    routes: dict[str, str] | None = None,
) -> list[Completion]:
    """Generate greedily for ``prompts`` under ``intervention`` and judge each response.

    ``on_batch`` receives each finished batch (e.g. to append it to a JSONL file). ``path`` picks
    hook or in-graph steering (:func:`pyrefusal.intervention.arm`); the path actually used is
    stored in ``routes[intervention.name]`` when ``routes`` is given.
    """
    used = iv.arm(runtime, intervention, path=path)
    if routes is not None:
        routes[intervention.name] = used
    out: list[Completion] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            gens = runtime.generate([runtime.chat_tokens(p.text, system) for p in chunk], max_new_tokens)
            batch = []
            for p, g in zip(chunk, gens, strict=True):
                v = detector.judge(g.text, p.lang)
                batch.append(
                    Completion(
                        prompt_id=p.id,
                        lang=p.lang,
                        kind=p.kind,
                        condition=intervention.name,
                        prompt=p.text,
                        response=g.text,
                        n_tokens=len(g.tokens),
                        finish_reason=g.finish_reason,
                        refused=v.refused,
                        marker=v.marker,
                        detector=v.detector,
                    )
                )
            out += batch
            if on_batch is not None:
                on_batch(batch)
    finally:
        runtime.clear_plan()
    return out


def append_jsonl(path: Path, rows: Iterable[Completion]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[Completion]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(Completion(**json.loads(line)))
    return rows


def summarize(completions: Iterable[Completion]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Refusal rates: ``{lang: {condition: {kind: {"n", "refused", "refusal_rate", "detector"}}}}``."""
    acc: dict[tuple[str, str, str], list[Completion]] = {}
    for c in completions:
        acc.setdefault((c.lang, c.condition, c.kind), []).append(c)
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for (lang, cond, kind), rows in sorted(acc.items()):
        k = sum(r.refused for r in rows)
        out.setdefault(lang, {}).setdefault(cond, {})[kind] = {
            "n": len(rows),
            "refused": k,
            "refusal_rate": k / len(rows),
            "detector": rows[0].detector,
        }
    return out
