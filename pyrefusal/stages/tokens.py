"""Refusal tokens of any language: the tokens whose probability is the refusal score (docs/method.md §4.1).

The paper hard-codes the first tokens of refusals for 8 languages. :func:`derive_refusal_tokens` measures
them instead: generate a few greedy tokens for harmful train prompts, keep the responses a refusal detector
flags, count their first generated token. The paper's table for the model's family
(:data:`pyrefusal.method.selection.PAPER_REFUSAL_OPENINGS`, else :data:`pyrefusal.method.selection.REFUSAL_OPENINGS`)
is the fallback (:func:`table_refusal_tokens`), and explicit openings override both.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pyrefusal.common import Log
from pyrefusal.data.polyrefuse import PolyRefuse, Prompt
from pyrefusal.errors import PyrefusalError
from pyrefusal.method.refusal import RefusalDetector
from pyrefusal.method.selection import PAPER_REFUSAL_OPENINGS, refusal_openings, refusal_token_ids
from pyrefusal.runtime import ModelRunner
from pyrefusal.settings import TokenMethod
from pyrefusal.stages.sample import probe_prompts

__all__ = [
    "RefusalTokens",
    "count_first_tokens",
    "derive_refusal_tokens",
    "language_refusal_tokens",
    "pick_refusal_tokens",
    "table_refusal_tokens",
]


@dataclass
class RefusalTokens:
    """The refusal tokens R of one language (the first tokens whose probability is the refusal score).

    Attributes:
        lang: language code.
        ids: token ids, most frequent first for derived tokens.
        strings: ``ids`` decoded, one string per id.
        method: how they were obtained: ``"derived"`` (first tokens of the model's own refusals, each seen
            at least ``min_count`` times), ``"paper"`` / ``"table"`` (the paper's openings for the model's
            family, else :data:`REFUSAL_OPENINGS`, tokenized; requested or as fallback when too few refusals
            were found), ``"derived-weak"`` (derived tokens seen fewer
            than ``min_count`` times, used only when the language has no table entry) or ``"override"``
            (explicit openings given by the user).
        counts: first-token id -> number of refusals that start with it (empty when nothing was generated).
        n_prompts: prompts generated for (0 when nothing was generated).
        n_refusals: responses judged as refusals.
        detector: name of the detector that judged them (``None`` when nothing was generated).
        note: why a fallback was taken, if one was.
    """

    lang: str
    ids: list[int]
    strings: list[str]
    method: str
    counts: dict[int, int] = field(default_factory=dict)
    n_prompts: int = 0
    n_refusals: int = 0
    detector: str | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``counts`` keys become strings)."""
        d = asdict(self)
        d["counts"] = {str(k): v for k, v in self.counts.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RefusalTokens:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["counts"] = {int(k): int(v) for k, v in d.get("counts", {}).items()}
        d["ids"] = [int(i) for i in d["ids"]]
        return cls(**d)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> RefusalTokens:
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def count_first_tokens(generated: Sequence[Sequence[int]], refused: Sequence[bool]) -> Counter[int]:
    """Count the first generated token of the responses judged as refusals.

    Args:
        generated: generated token ids per response (an empty list = the model stopped at once).
        refused: detector verdict per response, aligned with ``generated``.

    Returns:
        first-token id -> count, over refusals with at least one token.

    Raises:
        PyrefusalError: the two sequences differ in length.
    """
    if len(generated) != len(refused):
        raise PyrefusalError(f"{len(generated)} generations but {len(refused)} verdicts; pass one verdict each")
    return Counter(int(toks[0]) for toks, r in zip(generated, refused, strict=True) if r and len(toks))


def pick_refusal_tokens(counts: Mapping[int, int], *, top_k: int = 3, min_count: int = 2) -> list[int]:
    """The ``top_k`` most frequent tokens seen at least ``min_count`` times (ties: smaller id first)."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [tok for tok, n in ranked if n >= min_count][:top_k]


def table_refusal_tokens(
    tokenize: Callable[[str], list[int]],
    detokenize: Callable[[list[int]], str],
    lang: str,
    openings: Sequence[str] | None = None,
    *,
    note: str = "",
    family: str | None = None,
) -> RefusalTokens:
    """Refusal tokens from openings: explicit ones (``method="override"``), the paper's for a model of
    ``family`` (``"paper"``, :data:`~pyrefusal.method.selection.PAPER_REFUSAL_OPENINGS`) or :data:`REFUSAL_OPENINGS`.

    Raises:
        PyrefusalError: no openings given and none known for ``lang``.
    """
    ids = refusal_token_ids(tokenize, lang, openings or None, family)
    paper = lang in PAPER_REFUSAL_OPENINGS.get(family or "", {})
    method = "override" if openings else "paper" if paper else "table"
    return RefusalTokens(lang=lang, ids=ids, strings=[detokenize([i]) for i in ids], method=method, note=note)


def derive_refusal_tokens(
    runtime: ModelRunner,
    prompts: Sequence[Prompt],
    lang: str,
    *,
    detector: RefusalDetector,
    max_new_tokens: int = 8,
    top_k: int = 3,
    min_count: int = 2,
    min_refusals: int = 3,
    system: str | None = None,
    batch_size: int = 16,
) -> RefusalTokens:
    """Measure the refusal tokens of ``lang`` from the model's own refusals.

    Greedy generation of ``max_new_tokens`` tokens for each prompt (unmodified model); responses the
    detector judges as refusals vote with their first generated token; the ``top_k`` most frequent
    tokens seen at least ``min_count`` times are the refusal tokens.

    Fallbacks, recorded in ``method`` and ``note``: fewer than ``min_refusals`` refusals or no token
    reaching ``min_count`` -> the tokenized :data:`REFUSAL_OPENINGS` of ``lang``; a language without
    a table entry -> the derived tokens seen fewer times (``"derived-weak"``).

    Args:
        runtime: a :class:`pyrefusal.runtime.runtime.Runtime` (no plan armed).
        prompts: harmful prompts in ``lang`` (e.g. its harmful train split).
        lang: language code (also passed to the detector).
        detector: judges refusals, e.g. ``SubstringDetector()``.
        max_new_tokens: tokens generated per prompt; enough for the detector to see a refusal opening.
        top_k / min_count / min_refusals: see above.
        system: system prompt (``None`` = the chat template's default, as ``pyrefusal run``).
        batch_size: sequences generated together.

    Raises:
        PyrefusalError: no prompts, or no refusal at all and no table entry for ``lang`` (pass openings
            explicitly then).
    """
    if not prompts:
        raise PyrefusalError(f"derive_refusal_tokens needs harmful prompts in {lang!r}; got none")
    runtime.clear_plan()
    generated: list[list[int]] = []
    refused: list[bool] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        gens = runtime.generate([runtime.chat_tokens(p.text, system) for p in chunk], max_new_tokens)
        for g in gens:
            generated.append(list(g.tokens))
            refused.append(detector.judge(g.text, lang).refused)
    counts = count_first_tokens(generated, refused)
    n_ref = sum(refused)
    ids = pick_refusal_tokens(counts, top_k=top_k, min_count=min_count)
    common = {"counts": dict(counts), "n_prompts": len(prompts), "n_refusals": n_ref, "detector": detector.name}
    if n_ref >= min_refusals and ids:
        return RefusalTokens(lang, ids, [runtime.detokenize([i]) for i in ids], "derived", **common)
    why = (
        f"{n_ref}/{len(prompts)} responses were refusals (need {min_refusals}) and "
        f"{len(ids)} first token(s) occurred >= {min_count} times"
    )
    family = getattr(runtime, "family", None)  # fakes in tests may lack it
    if refusal_openings(lang, family):
        fallback = table_refusal_tokens(
            runtime.tokenize, runtime.detokenize, lang, note=f"table fallback: {why}", family=family
        )
        return replace(fallback, **common)
    weak = pick_refusal_tokens(counts, top_k=top_k, min_count=1)
    if not weak:
        raise PyrefusalError(
            f"could not derive refusal tokens for {lang!r} ({why}) and pyrefusal has no refusal openings for it. "
            "Pass the first words of the model's refusals in that language as explicit openings "
            "(the transfer setting refusal_openings / --refusal-openings)."
        )
    return RefusalTokens(
        lang,
        weak,
        [runtime.detokenize([i]) for i in weak],
        "derived-weak",
        note=f"no table entry; using rare first tokens: {why}",
        **common,
    )


def language_refusal_tokens(
    runtime: ModelRunner,
    data: PolyRefuse,
    lang: str,
    saved: Path | None,
    *,
    given: RefusalTokens | None,
    openings: Sequence[str] | None,
    token_method: TokenMethod,
    detector: RefusalDetector,
    n_token_probe: int,
    token_max_new_tokens: int,
    seed: int,
    system: str | None,
    log: Log,
) -> RefusalTokens:
    """The refusal tokens of ``lang``: ``given`` > the ``saved`` file (resume) > explicit ``openings`` > the table
    (``token_method="table"``) or derived from ``n_token_probe`` probe prompts (:func:`derive_refusal_tokens`);
    written to ``saved`` when given."""
    if given is not None:
        toks = given
    elif saved is not None and saved.exists():
        toks = RefusalTokens.load(saved)
        log(f"{lang}: reusing refusal_tokens.json")
    elif openings:
        toks = table_refusal_tokens(runtime.tokenize, runtime.detokenize, lang, openings)
    elif token_method == "table":
        toks = table_refusal_tokens(runtime.tokenize, runtime.detokenize, lang, family=getattr(runtime, "family", None))
    else:
        t = time.perf_counter()
        probe = probe_prompts(data, lang, n_token_probe, seed)
        toks = derive_refusal_tokens(
            runtime,
            probe,
            lang,
            detector=detector,
            max_new_tokens=token_max_new_tokens,
            system=system,
            batch_size=runtime.n_seq_max,
        )
        log(f"{lang}: derived refusal tokens in {time.perf_counter() - t:.1f}s")
    if saved is not None:
        toks.save(saved)
    note = f" - {toks.note}" if toks.note else ""
    log(
        f"{lang}: refusal tokens {toks.ids} {toks.strings} ({toks.method}; "
        f"{toks.n_refusals}/{toks.n_prompts} refusals){note}"
    )
    return toks
