"""Stage 1, sample: which prompts a study uses (docs/method.md §1).

* :func:`sample_prompts`: train/val of the source language in the paper's order and seed, plus test prompts
  per target language drawn once and reused in every language (PolyRefuse test files are row-aligned), as
  ``pyrefusal run`` uses them.
* :func:`sample_test_prompts`: harmful test prompts per target (the same rows as :func:`sample_prompts` for
  the same seed), as the transfer and quantization studies use them.
* :func:`probe_prompts`: harmful train prompts for deriving a language's refusal tokens (own RNG).

Sampling writes no file: what was used is recorded by the later stages in ``prompts.json``
(:class:`pyrefusal.stages.layout.PromptRecord`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from pyrefusal.common import Log
from pyrefusal.data.polyrefuse import Kind, PolyRefuse, Prompt, paper_sample
from pyrefusal.errors import DataError

#: Offset of the test-row RNG seed from the sampling seed (both studies draw the same rows).
TEST_SEED_OFFSET = 1000
#: Offset of the refusal-token probe's RNG seed (paper sampling stays untouched).
PROBE_SEED_OFFSET = 2000


@dataclass(frozen=True)
class PromptSample:
    """The prompts of one study.

    Attributes:
        train_val: ``{"harmful_train", "harmless_train", "harmful_val", "harmless_val"}`` -> prompts of the
            source language, in the paper's order.
        test: ``{lang: {"harmful": [...], "harmless": [...]}}`` for every target language with test files,
            the same rows in every language.
        missing: ``"<lang>/<kind>_test"`` files that do not exist (those kinds are skipped).
        short: test files with fewer rows than drawn (their languages see fewer prompts).
    """

    train_val: dict[str, list[Prompt]]
    test: dict[str, dict[str, list[Prompt]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    short: list[str] = field(default_factory=list)


def _draw_rows(rng: random.Random, n_rows: int, n: int) -> list[int]:
    """``min(n, n_rows)`` sorted row indices drawn without replacement."""
    return sorted(rng.sample(range(n_rows), min(n, n_rows)))


def sample_train_val(data: PolyRefuse, lang: str, *, n_train: int, n_val: int, seed: int) -> dict[str, list[Prompt]]:
    """Train/val prompts of ``lang`` in the paper's order (:func:`pyrefusal.data.polyrefuse.paper_sample`)."""
    return paper_sample(data, lang, n_train=n_train, n_val=n_val, seed=seed)


def sample_prompts(
    data: PolyRefuse,
    source_lang: str,
    target_langs: Sequence[str],
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
    log: Log,
) -> PromptSample:
    """Train/val for the source language (paper order), row-aligned test prompts per target language.

    Missing and short test files are logged with the command that completes them, not raised.
    """
    tv = sample_train_val(data, source_lang, n_train=n_train, n_val=n_val, seed=seed)
    rng = random.Random(seed + TEST_SEED_OFFSET)
    test: dict[str, dict[str, list[Prompt]]] = {}
    missing: list[str] = []
    # Test rows are drawn once per kind and reused in every language (PolyRefuse test files are
    # row-aligned), so languages see the same prompts. The row count comes from the English file (the
    # source of every translation; else the longest file of the dataset), not from the target
    # languages, so that adding, removing or reordering --target-langs never changes the draw.
    rows: dict[str, list[int]] = {}
    kinds: tuple[Kind, Kind] = ("harmful", "harmless")
    for kind in kinds:
        sizes = {lang: len(data.load(lang, "test", kind)) for lang in data.languages() if data.has(lang, "test", kind)}
        n_rows = sizes.get("en") or max(sizes.values(), default=0)
        rows[kind] = _draw_rows(rng, n_rows, n_test)
    short: list[str] = []
    for lang in target_langs:
        test[lang] = {}
        for kind in kinds:
            if not data.has(lang, "test", kind):
                missing.append(f"{lang}/{kind}_test")
                continue
            pool = data.load(lang, "test", kind)
            test[lang][kind] = [pool[i] for i in rows[kind] if i < len(pool)]
            if len(test[lang][kind]) < len(rows[kind]):
                short.append(f"{lang}/{kind}_test ({len(test[lang][kind])} of {len(rows[kind])} drawn rows)")
    if missing:
        log(f"missing test files (skipped): {missing}; `pyrefusal data build` can translate them")
    if short:
        log(
            f"test files shorter than the others (their languages are evaluated on fewer prompts): {short}; "
            "`pyrefusal data build` can complete them"
        )
    return PromptSample(tv, test, missing, short)


def sample_test_prompts(data: PolyRefuse, targets: Sequence[str], n_test: int, seed: int) -> dict[str, list[Prompt]]:
    """Harmful test prompts per target language: the same rows in every language.

    The rows are drawn as :func:`sample_prompts` draws its harmful test rows (``random.Random(seed + 1000)``,
    first draw), so ``pyrefusal run`` and ``pyrefusal transfer`` evaluate the same prompts for the same seed.
    The row count is the shortest target file's, so every target has every row.

    Raises:
        DataError: a target has no harmful test file.
    """
    missing = [t for t in targets if not data.has(t, "test", "harmful")]
    if missing:
        raise DataError(
            f"no harmful test file for {missing} in {data.root}; `pyrefusal data build` can translate them, "
            "or drop those targets"
        )
    if not targets:
        return {}
    n_rows = min(len(data.load(t, "test", "harmful")) for t in targets)
    rows = _draw_rows(random.Random(seed + TEST_SEED_OFFSET), n_rows, n_test)
    out: dict[str, list[Prompt]] = {}
    for t in targets:
        pool = data.load(t, "test", "harmful")
        out[t] = [pool[i] for i in rows]
    return out


def probe_prompts(data: PolyRefuse, lang: str, n: int, seed: int) -> list[Prompt]:
    """Harmful train prompts of ``lang`` for deriving refusal tokens (own RNG: paper sampling untouched)."""
    pool = data.load(lang, "train", "harmful")
    if n >= len(pool):
        return pool
    return random.Random(seed + PROBE_SEED_OFFSET).sample(pool, n)
