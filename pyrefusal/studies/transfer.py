"""Cross-lingual refusal directions: extract one per source language, cross-apply, compare geometry.

This is the experiment of Wang et al. (NeurIPS 2025, docs/method.md §7): a refusal direction r_X is
extracted from prompts in source language X (§3, §4) and ablated while the model answers harmful
prompts in target language Y. If refusal is mediated by one shared direction, ablating r_X
removes refusal in every Y. The stages:

1. **Refusal tokens for any language** (:func:`derive_refusal_tokens`). The paper hard-codes the
   first tokens of refusals for 8 languages (§4.1). Here they are measured instead: generate a few
   greedy tokens for harmful train prompts, keep the responses a refusal detector flags, count
   their first generated token. The paper's table for the model's family
   (:data:`pyrefusal.method.selection.PAPER_REFUSAL_OPENINGS`, else :data:`pyrefusal.method.selection.REFUSAL_OPENINGS`)
   is the fallback, and explicit openings override both.
2. **One direction per source language** (:func:`extract_language_directions`): the pipeline's
   stages 2-3 (capture at the post-instruction positions, filter by refusal score, difference
   in means, lazy selection) with that language's prompts and refusal tokens. Everything is
   saved per language under ``directions/<lang>/``, so an interrupted run resumes.
3. **Transfer matrix** (:func:`transfer_matrix`): refusal rate on each target's harmful test
   prompts (the same rows in every language) with each source's direction ablated, plus the
   unmodified baseline. Completions go to a JSONL file as they are made; a re-run skips finished
   (source, target, prompt) triples.
4. **Geometry** (docs/method.md §7.4, *our design*, an extension rather than a replicated number):
   cosine of r_X and r_Y layer by layer (:func:`cosine_by_layer`), cosine of the selected
   directions (:func:`selected_cosines`), a 2-D PCA of per-prompt activations
   (:func:`pca_activations`), and projections onto the English direction (:func:`projection_on`).
5. :func:`write_transfer_report` and :func:`run_transfer`, which chains everything and writes
   ``transfer.json``.

Output layout of :func:`run_transfer` (``out/``)::

    config.json                      the TransferConfig (a resumed run must match it)
    directions/<lang>/               refusal_tokens.json, prompts.json, candidates.npz,
                                     activations.npz, selection.json, direction.npy
    completions.jsonl                every transfer completion (condition "baseline" or
                                     "<condition>:<source>")
    transfer.json, report.md, *.png
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pyrefusal.data.polyrefuse import PolyRefuse, Prompt, default_data_dir, paper_sample
from pyrefusal.errors import DataError, PyrefusalError
from pyrefusal.method import intervention as iv
from pyrefusal.method.directions import Candidates, random_like, unit
from pyrefusal.method.refusal import RefusalDetector, SubstringDetector
from pyrefusal.method.selection import (
    PAPER_REFUSAL_OPENINGS,
    Selection,
    SelectionRule,
    refusal_openings,
    refusal_token_ids,
    select_direction,
)
from pyrefusal.rundir import RunLock, check_config, previous_timings, write_atomic, write_config
from pyrefusal.stages.extract import NO_VAL_FILTER, extract_candidates, filter_by_refusal
from pyrefusal.stages.generate import Completion, append_jsonl, generate_completions, read_jsonl, wilson_interval

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]

TRANSFER_CONDITIONS = ("ablation", "harm_ablation")
"""Interventions :func:`transfer_matrix` can apply with a source direction."""
CONTROL_ROW = "random"
"""Row of the control: a random direction with the norm of the first source's direction."""


def _quiet(_: str) -> None:
    return None


# =========================================================================================
# 1. Refusal tokens
# =========================================================================================


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
    runtime: Any,
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
    family = getattr(runtime, "family", None)
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
            "(TransferConfig.refusal_openings / --refusal-openings)."
        )
    return RefusalTokens(
        lang,
        weak,
        [runtime.detokenize([i]) for i in weak],
        "derived-weak",
        note=f"no table entry; using rare first tokens: {why}",
        **common,
    )


# =========================================================================================
# 2. One direction per source language
# =========================================================================================


@dataclass
class LanguageDirection:
    """Everything computed for one source language.

    Attributes:
        lang: source language.
        candidates: difference-in-means candidates, float64 ``(n_positions, n_layers, n_embd)``.
        selection: the paper-rule selection, scored with this language's refusal tokens.
        refusal_tokens: the tokens used for filtering and selection.
        prompts: prompt ids (``harmful_train``/``harmless_train``/``*_val`` as sampled and ``*_kept``
            after filtering) and sizes.
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
        (directory / "prompts.json").write_text(json.dumps(self.prompts, indent=1))
        self.candidates.save(directory / "candidates.npz")
        if self.activations is not None:
            _save_activations(directory / "activations.npz", self.activations)
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
            activations=_load_activations(acts_path) if acts_path.exists() else None,
        )

    def summary(self) -> dict[str, Any]:
        """JSON-able facts about the selection (for transfer.json)."""
        s = self.selection
        return {
            "position": s.position,
            "layer": s.layer,
            "kl": s.kl,
            "refusal_score": s.refusal_score,
            "baseline_refusal_score": s.baseline_refusal_score,
            "norm": float(np.linalg.norm(self.direction)),
            "n_harmful_train": self.candidates.n_harmful,
            "n_harmless_train": self.candidates.n_harmless,
            "n_harmful_val": len(self.prompts.get("harmful_val_kept", [])) or None,
            "n_harmless_val": len(self.prompts.get("harmless_val_kept", [])) or None,
            "refusal_tokens": self.refusal_tokens.to_dict(),
        }


def _save_activations(path: Path, acts: Mapping[str, np.ndarray]) -> None:
    np.savez_compressed(path, **{k: np.asarray(v, dtype=np.float16) for k, v in acts.items()})


def _load_activations(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _probe_prompts(data: PolyRefuse, lang: str, n: int, seed: int) -> list[Prompt]:
    """Harmful train prompts of ``lang`` for deriving refusal tokens (own RNG: paper sampling untouched)."""
    pool = data.load(lang, "train", "harmful")
    if n >= len(pool):
        return pool
    return random.Random(seed + 2000).sample(pool, n)


def extract_language_directions(
    runtime: Any,
    data: PolyRefuse,
    langs: Sequence[str],
    *,
    n_train: int,
    n_val: int,
    seed: int = 1,
    filter: bool = True,
    system: str | None = None,
    selection_rule: SelectionRule | None = None,
    progress: Progress | None = None,
    out_dir: Path | None = None,
    refusal_tokens: Mapping[str, RefusalTokens] | None = None,
    token_method: Literal["derive", "table"] = "derive",
    openings: Mapping[str, Sequence[str]] | None = None,
    detector: RefusalDetector | None = None,
    n_token_probe: int = 32,
    token_max_new_tokens: int = 8,
    keep_activations: bool = True,
    log: Log = _quiet,
) -> dict[str, LanguageDirection]:
    """Extract and select a refusal direction for every language in ``langs``.

    Per language X: paper sampling (:func:`pyrefusal.data.polyrefuse.paper_sample`, seed ``seed``); refusal
    tokens of X (``refusal_tokens[X]`` if given, else ``openings[X]``, else derived or the table per
    ``token_method``); capture of the block inputs ``0..L-1`` at the post-instruction positions;
    filtering (harmful s > 0, harmless s < 0 under X's tokens, train and val; unfiltered below
    :data:`~pyrefusal.stages.extract.MIN_FILTERED`); :func:`~pyrefusal.method.directions.mean_difference`;
    :func:`~pyrefusal.method.selection.select_direction` (lazy, exact paper top-1).

    With ``out_dir``, each language is saved to ``out_dir/<lang>/`` stage by stage, and files already
    there are reused (resume). The caller must make sure they came from the same settings
    (:func:`run_transfer` checks its ``config.json``).

    Args:
        runtime: a :class:`pyrefusal.runtime.runtime.Runtime`.
        data: PolyRefuse.
        langs: source languages.
        n_train / n_val / seed: paper sampling sizes and seed.
        filter: filter train and val prompts by refusal score.
        system: system prompt (``None`` = template default).
        selection_rule: filters (default: the paper's).
        progress: ``progress(stage, done, total)``; stages are prefixed with the language.
        out_dir: where to save / resume per-language results.
        refusal_tokens: precomputed tokens per language (take precedence).
        token_method: ``"derive"`` (measure; table fallback) or ``"table"`` (the paper-style table).
        openings: explicit refusal openings per language (override).
        detector: judges refusals when deriving tokens (default multilingual substrings).
        n_token_probe / token_max_new_tokens: prompts and tokens generated to derive tokens.
        keep_activations: keep per-prompt train activations (float16) for PCA and projections.
        log: message sink.

    Returns:
        ``{lang: LanguageDirection}`` in ``langs`` order.

    Raises:
        PyrefusalError: unknown language, or selection found no candidate.
    """
    rule = selection_rule or SelectionRule()
    detector = detector or SubstringDetector()
    ex = _Extractor(runtime, system, log)
    out: dict[str, LanguageDirection] = {}
    for lang in langs:
        if lang not in data.languages():
            raise DataError(f"source language {lang!r} has no files in {data.root}; available: {data.languages()}")
        d = out_dir / lang if out_dir is not None else None
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
        prog = (lambda s, i, n, _l=lang: progress(f"{_l}: {s}", i, n)) if progress else None
        # refusal tokens: given > saved > explicit openings > table / derived
        if refusal_tokens and lang in refusal_tokens:
            toks = refusal_tokens[lang]
        elif d is not None and (d / "refusal_tokens.json").exists():
            toks = RefusalTokens.load(d / "refusal_tokens.json")
            log(f"{lang}: reusing refusal_tokens.json")
        elif openings and openings.get(lang):
            toks = table_refusal_tokens(runtime.tokenize, runtime.detokenize, lang, openings[lang])
        elif token_method == "table":
            family = getattr(runtime, "family", None)
            toks = table_refusal_tokens(runtime.tokenize, runtime.detokenize, lang, family=family)
        else:
            t = time.perf_counter()
            probe = _probe_prompts(data, lang, n_token_probe, seed)
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
        if d is not None:
            toks.save(d / "refusal_tokens.json")
        note = f" - {toks.note}" if toks.note else ""
        log(
            f"{lang}: refusal tokens {toks.ids} {toks.strings} ({toks.method}; "
            f"{toks.n_refusals}/{toks.n_prompts} refusals){note}"
        )
        tv = paper_sample(data, lang, n_train=n_train, n_val=n_val, seed=seed)
        cands, record, acts = ex.candidates(lang, d, tv, toks.ids, filter, keep_activations)
        selection = ex.selection(lang, d, tv, toks.ids, cands, record, filter, rule, prog)
        ld = LanguageDirection(lang, cands, selection, toks, record, acts)
        if d is not None:
            np.save(d / "direction.npy", ld.direction.astype(np.float32))
        log(
            f"{lang}: selected position {selection.position}, layer {selection.layer}: refusal score "
            f"{selection.baseline_refusal_score:.3f} -> {selection.refusal_score:.3f}, KL {selection.kl:.4f}"
        )
        out[lang] = ld
    return out


class _Extractor:
    """The model-driven stages of one source language, each reusing its files in ``d`` when present."""

    def __init__(self, runtime: Any, system: str | None, log: Log) -> None:
        self.rt, self.system, self.log = runtime, system, log
        self.positions = tuple(range(-len(runtime.eoi_tokens(system)), 0))  # e.g. (-5, ..., -1)

    def fmt(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        return [self.rt.chat_tokens(p.text, self.system) for p in prompts]

    def candidates(
        self,
        lang: str,
        d: Path | None,
        tv: Mapping[str, list[Prompt]],
        refusal_ids: list[int],
        filter: bool,
        keep_activations: bool,
    ) -> tuple[Candidates, dict[str, Any], dict[str, np.ndarray] | None]:
        """Capture, filter, difference in means -> (candidates, prompt record, activations or None)."""
        if d is not None and (d / "candidates.npz").exists() and (d / "prompts.json").exists():
            acts = _load_activations(d / "activations.npz") if (d / "activations.npz").exists() else None
            self.log(f"{lang}: reusing candidates.npz")
            return Candidates.load(d / "candidates.npz"), json.loads((d / "prompts.json").read_text()), acts
        train = extract_candidates(
            self.rt,
            self.fmt(tv["harmful_train"]),
            self.fmt(tv["harmless_train"]),
            self.positions,
            refusal_ids,
            filter=filter,
            log=self.log,
            label=lang,
            keep_activations=keep_activations,
        )
        cands, keep_h, keep_l = train.candidates, train.harmful_kept, train.harmless_kept
        record: dict[str, Any] = {
            "harmful_train": [p.id for p in tv["harmful_train"]],
            "harmless_train": [p.id for p in tv["harmless_train"]],
            "harmful_train_kept": [p.id for p, k in zip(tv["harmful_train"], keep_h, strict=True) if k],
            "harmless_train_kept": [p.id for p, k in zip(tv["harmless_train"], keep_l, strict=True) if k],
        }
        acts = None
        if train.harmful_acts is not None and train.harmless_acts is not None:
            acts = {
                "harmful": train.harmful_acts.astype(np.float16),
                "harmless": train.harmless_acts.astype(np.float16),
            }
        if d is not None:
            cands.save(d / "candidates.npz")
            if acts is not None:
                _save_activations(d / "activations.npz", acts)
            (d / "prompts.json").write_text(json.dumps(record, indent=1))
        self.log(f"{lang}: candidates from {cands.n_harmful} harmful / {cands.n_harmless} harmless train prompts")
        return cands, record, acts

    def selection(
        self,
        lang: str,
        d: Path | None,
        tv: Mapping[str, list[Prompt]],
        refusal_ids: list[int],
        cands: Candidates,
        record: dict[str, Any],
        filter: bool,
        rule: SelectionRule,
        progress: Progress | None,
    ) -> Selection:
        """Filter the val prompts and select (lazy, paper rule); updates ``record`` with the val ids."""
        if d is not None and (d / "selection.json").exists():
            self.log(f"{lang}: reusing selection.json")
            return Selection.load(d / "selection.json")
        kept: dict[str, list[Prompt]] = {}
        if filter and lang in NO_VAL_FILTER:
            self.log(f"{lang}: val prompts not filtered (the paper's rule for this language, docs/method.md §1.4)")
        for kind, positive in (("harmful", True), ("harmless", False)):
            ps = tv[f"{kind}_val"]
            if filter and lang not in NO_VAL_FILTER:
                mask = filter_by_refusal(self.rt, self.fmt(ps), refusal_ids, positive, self.log, f"{lang} {kind} val")
                ps = [p for p, k in zip(ps, mask, strict=True) if k]
            kept[kind] = ps
            record[f"{kind}_val"] = [p.id for p in tv[f"{kind}_val"]]
            record[f"{kind}_val_kept"] = [p.id for p in ps]
        t = time.perf_counter()
        selection = select_direction(
            self.rt,
            cands,
            self.fmt(kept["harmful"]),
            self.fmt(kept["harmless"]),
            refusal_ids,
            rule=rule,
            mode="lazy",
            progress=progress,
        )
        self.log(f"{lang}: selection in {time.perf_counter() - t:.1f}s")
        if d is not None:
            (d / "prompts.json").write_text(json.dumps(record, indent=1))
            selection.save(d / "selection.json")
        return selection


def load_language_directions(directory: Path, langs: Sequence[str] | None = None) -> dict[str, LanguageDirection]:
    """Load ``directory/<lang>/`` for ``langs`` (default: every finished sub-directory, sorted)."""
    if langs is None:
        langs = sorted(p.name for p in directory.iterdir() if (p / "selection.json").exists())
    return {lang: LanguageDirection.load(directory / lang, lang) for lang in langs}


# =========================================================================================
# 3. Transfer matrix
# =========================================================================================


def sample_test_prompts(data: PolyRefuse, targets: Sequence[str], n_test: int, seed: int) -> dict[str, list[Prompt]]:
    """Harmful test prompts per target language: the same rows in every language.

    The rows are drawn as ``pyrefusal run`` draws its harmful test rows (``random.Random(seed + 1000)``,
    first draw), so both commands evaluate the same prompts for the same seed.

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
    rows = sorted(random.Random(seed + 1000).sample(range(n_rows), min(n_test, n_rows)))
    out: dict[str, list[Prompt]] = {}
    for t in targets:
        pool = data.load(t, "test", "harmful")
        out[t] = [pool[i] for i in rows]
    return out


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
    runtime: Any,
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
    log: Log = _quiet,
    control: bool = False,
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
    done = {(c.condition, c.prompt_id) for c in read_jsonl(completions_path)}
    total = len(rows) * sum(len(v) for v in prompts.values())
    finished = sum(1 for _, inter in rows for ps in prompts.values() for p in ps if (inter.name, p.id) in done)
    if finished:
        log(f"transfer: {finished}/{total} completions already in {completions_path.name}; resuming")
    for _, inter in rows:
        # one generate call per row over all targets: full batches, one plan arm per row
        todo = [p for t in targets for p in prompts[t] if (inter.name, p.id) not in done]
        if not todo:
            continue

        def on_batch(batch: list[Completion]) -> None:
            nonlocal finished
            append_jsonl(completions_path, batch)
            finished += len(batch)
            if progress:
                progress("transfer generation", finished, total)

        generate_completions(
            runtime,
            todo,
            inter,
            detector,
            max_new_tokens=max_new_tokens,
            system=system,
            batch_size=batch_size,
            on_batch=on_batch,
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


# =========================================================================================
# 4. Geometry (docs/method.md §7.4: our design, reported as an extension)
# =========================================================================================


def common_position(directions: Mapping[str, LanguageDirection]) -> int:
    """The position used to compare languages: the English selection's, else -1."""
    return directions["en"].selection.position if "en" in directions else -1


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis; NaN where either vector is zero (e.g. block input 0)."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (a * b).sum(axis=-1) / (na * nb)
    return np.where((na == 0) | (nb == 0), np.nan, c)


def cosine_by_layer(
    directions: Mapping[str, LanguageDirection], position: int | None = None
) -> tuple[list[str], int, np.ndarray]:
    """Cosine of r_X[p, l] and r_Y[p, l] at one position for every layer.

    Args:
        directions: per language (same model).
        position: eoi position (default :func:`common_position`).

    Returns:
        ``(names, position, cos)``, cos float64 ``(n_langs, n_langs, n_layers)``, NaN where a
        candidate is the zero vector.

    Raises:
        PyrefusalError: directions from models of different shapes.
    """
    names = list(directions)
    if not names:
        return [], -1 if position is None else position, np.zeros((0, 0, 0))
    pos = common_position(directions) if position is None else position
    shapes = {directions[n].candidates.vectors.shape for n in names}
    if len(shapes) != 1:
        raise PyrefusalError(f"directions have different shapes {shapes}; they must come from the same model")
    v = np.stack([directions[n].candidates.vectors[directions[n].candidates.positions.index(pos)] for n in names])
    # v: (n_langs, n_layers, n_embd)
    return names, pos, _cos(v[:, None], v[None, :])  # (n_langs, n_langs, n_layers)


def selected_cosines(directions: Mapping[str, LanguageDirection]) -> tuple[list[str], np.ndarray]:
    """Cosine of the selected directions (each at its own position and layer): ``(names, (n, n))``."""
    names = list(directions)
    v = np.stack([directions[n].direction for n in names])  # (n_langs, n_embd)
    return names, _cos(v[:, None], v[None, :])


def train_activations_at(
    directions: Mapping[str, LanguageDirection], position: int, layer: int
) -> dict[str, dict[str, np.ndarray]]:
    """Stored per-prompt train activations at one (position, layer): ``{lang: {kind: (n, n_embd) float64}}``.

    Languages without stored activations are left out.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for lang, ld in directions.items():
        if ld.activations is None:
            continue
        j = ld.candidates.positions.index(position)
        out[lang] = {k: ld.activations[k][:, j, layer].astype(np.float64) for k in ("harmful", "harmless")}
    return out


@dataclass
class PCAResult:
    """2-D PCA of activations pooled over languages and kinds.

    Attributes:
        coords: ``{lang: {kind: (n, 2)}}`` projections on the first two components.
        explained: variance ratio of the two components.
        components: ``(2, n_embd)`` unit rows; mean: ``(n_embd,)`` subtracted before projecting.
        layer / position: where the activations were taken (``None`` when unknown).
    """

    coords: dict[str, dict[str, np.ndarray]]
    explained: tuple[float, float]
    components: np.ndarray
    mean: np.ndarray
    layer: int | None = None
    position: int | None = None


def pca_activations(
    acts: Mapping[str, Mapping[str, np.ndarray]], *, layer: int | None = None, position: int | None = None
) -> PCAResult:
    """2-D PCA of per-prompt activations (harmful vs harmless x language).

    Args:
        acts: ``{lang: {"harmful": (n, n_embd), "harmless": (m, n_embd)}}``.
        layer / position: recorded in the result.

    Raises:
        PyrefusalError: fewer than 2 activations in all.
    """
    keys = [(lang, kind) for lang, kinds in acts.items() for kind in kinds]
    x = np.concatenate([np.asarray(acts[lang][kind], dtype=np.float64) for lang, kind in keys])  # (N, n_embd)
    if len(x) < 2:
        raise PyrefusalError("PCA needs at least 2 activations; store activations (keep_activations=True)")
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:2]  # (2, n_embd)
    var = s**2
    explained = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    coords: dict[str, dict[str, np.ndarray]] = {}
    for lang, kind in keys:
        coords.setdefault(lang, {})[kind] = (np.asarray(acts[lang][kind], dtype=np.float64) - mean) @ comps.T
    ex = tuple(float(e) for e in np.pad(explained, (0, 2))[:2])
    return PCAResult(coords, (ex[0], ex[1]), comps, mean, layer, position)


def projection_on(
    direction: np.ndarray, acts: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, dict[str, dict[str, float]]]:
    """Projection ``x . r̂`` of each activation on a direction, summarised per language and kind.

    Args:
        direction: ``(n_embd,)``, e.g. the English direction (normalised here).
        acts: ``{lang: {kind: (n, n_embd)}}``.

    Returns:
        ``{lang: {kind: {"mean", "std", "n"}}}``.
    """
    r = unit(np.asarray(direction, dtype=np.float64))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for lang, kinds in acts.items():
        for kind, a in kinds.items():
            p = np.asarray(a, dtype=np.float64) @ r  # (n,)
            out.setdefault(lang, {})[kind] = {"mean": float(p.mean()), "std": float(p.std()), "n": len(p)}
    return out


# =========================================================================================
# 5. Report
# =========================================================================================


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def write_transfer_report(result: Mapping[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/report.md`` from a transfer.json dict (as returned by :func:`run_transfer`).

    Tables: baseline per target, the transfer matrix (source rows x target columns), the selection
    per source language, the refusal tokens, the cosine matrices; the figures listed under
    ``result["figures"]`` (file names relative to ``out_dir``) are embedded.

    Returns:
        the report path.
    """
    tr = result["transfer"]
    targets, sources = tr["targets"], tr["sources"]
    model = result.get("model", {})
    cfg = result.get("config", {})
    figs = result.get("figures", {})
    lines = [
        f"# Cross-lingual refusal-direction transfer: {model.get('name', '?')}",
        "",
        (
            f"- model: `{Path(str(model.get('path', '?'))).name}` ({model.get('arch', '?')}, "
            f"{model.get('n_layer', '?')} layers, n_embd {model.get('n_embd', '?')})"
        ),
        (
            f"- condition: **{tr['condition']}** of the source direction at every layer and position; "
            f"detector **{tr['detector']}** (substring matching: misses refusals phrased without a marker)"
        ),
        (
            f"- sizes: {cfg.get('n_train')} train / {cfg.get('n_val')} val prompts per kind and source (before "
            f"filtering), {cfg.get('n_test')} harmful test prompts per target (same rows in every language), "
            f"{cfg.get('max_new_tokens')} new tokens, seed {cfg.get('seed')}"
        ),
        "",
        "## Refusal rate on harmful test prompts",
        "",
        (
            "Rows: direction ablated (source language); columns: prompt language (target). "
            "Lower = the direction removed more refusal."
        ),
        "",
        "| source \\ target | " + " | ".join(targets) + " |",
        "|---|" + "---|" * len(targets),
        "| **baseline** (no intervention) | " + " | ".join(_pct(tr["baseline"].get(t)) for t in targets) + " |",
    ]
    for s in sources:
        lines.append(f"| r_{s} | " + " | ".join(_pct(tr["rates"][s].get(t)) for t in targets) + " |")
    if tr.get("control"):
        lines.append(
            f"| random direction (control, norm of r_{sources[0]}) | "
            + " | ".join(_pct(tr["control"].get(t)) for t in targets)
            + " |"
        )
    n = {t: tr["counts"]["baseline"][t][1] for t in targets}
    lines += ["", f"n per cell: {', '.join(f'{t} {n[t]}' for t in targets)}. 95% Wilson intervals:", ""]
    lines += ["| row \\ target | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for row, label in [("baseline", "baseline"), *((s, f"r_{s}") for s in sources), (CONTROL_ROW, "random")]:
        counts = tr["counts"].get(row)
        if not counts:
            continue
        cells = []
        for t in targets:
            if t in counts and counts[t][1]:
                lo, hi = wilson_interval(*counts[t])
                cells.append(f"[{_pct(lo)}, {_pct(hi)}]")
            else:
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    if "transfer" in figs:
        lines += [f"![transfer matrix]({figs['transfer']})", ""]

    lines += [
        "## Selected direction per source language",
        "",
        (
            "| source | position | layer | KL | refusal score (val) base -> ablated | norm | train harmful/harmless "
            "| refusal tokens (method, refusals/probed) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in sources:
        d = result["directions"][s]
        rt = d["refusal_tokens"]
        toks = ", ".join(repr(x) for x in rt["strings"])
        lines.append(
            f"| {s} | {d['position']} | {d['layer']} | {_num(d['kl'], '.4f')} | "
            f"{_num(d['baseline_refusal_score'])} -> {_num(d['refusal_score'])} | {_num(d['norm'])} | "
            f"{d['n_harmful_train']}/{d['n_harmless_train']} | {toks} ({rt['method']}, "
            f"{rt['n_refusals']}/{rt['n_prompts']}) |"
        )
    notes = [f"- {s}: {result['directions'][s]['refusal_tokens']['note']}" for s in sources]
    notes = [x for x in notes if not x.endswith(": ")]
    if notes:
        lines += ["", "Refusal-token notes:", "", *notes]
    lines.append("")
    for s in sources:
        key = f"selection_{s}"
        if key in figs:
            lines += [f"![selection scores {s}]({figs[key]})", ""]

    geo = result.get("geometry", {})
    if geo:
        lines += [
            "## Geometry (extension; docs/method.md §7.4, our design, not a replicated number)",
            "",
            "Cosine similarity of the selected directions (each at its own position and layer):",
            "",
        ]
        names = geo["names"]
        lines += _matrix_table(names, geo["selected_cosine"])
        pos, lay = geo["position"], geo["layer"]
        lines += [
            "",
            f"Cosine at the common position {pos} and the English (or first) source's layer {lay}:",
            "",
            *_matrix_table(names, geo["cosine_at_layer"]),
            "",
        ]
        for key, alt in (
            ("cosine", "cosine matrix"),
            ("cosine_by_layer", "cosine by layer"),
            ("pca", "PCA"),
            ("projection", "projection"),
        ):
            if key in figs:
                lines += [f"![{alt}]({figs[key]})", ""]
        proj = geo.get("projection")
        if proj:
            lines += [
                f"Projection of train activations (position {pos}, layer {lay}) on r̂_{geo['projection_reference']}:",
                "",
                "| language | harmful mean ± std | harmless mean ± std |",
                "|---|---|---|",
            ]
            for lang, kinds in proj.items():
                h, less = kinds["harmful"], kinds["harmless"]
                lines.append(f"| {lang} | {h['mean']:.2f} ± {h['std']:.2f} | {less['mean']:.2f} ± {less['std']:.2f} |")
            lines.append("")
    t = result.get("timings", {})
    if t:
        secs = {k: v for k, v in t.items() if not k.startswith("runtime_") or k.endswith("_seconds")}
        lines += ["## Timings (this invocation)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in secs.items() if isinstance(v, (int, float))]
        counts = {k: v for k, v in t.items() if k not in secs}
        if counts:
            shown = ", ".join(f"{k.removeprefix('runtime_')} {v}" for k, v in counts.items())
            lines += ["", f"Runtime counters: {shown}"]
        lines.append("")
    earlier = result.get("timings_previous") or []
    if earlier:
        totals = ", ".join(f"{x.get('total', math.nan):.1f}" for x in earlier)
        lines += [f"Earlier invocations of this run (resumed since), total seconds: {totals}.", ""]
    path = Path(out_dir) / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _matrix_table(names: Sequence[str], m: Sequence[Sequence[float | None]]) -> list[str]:
    out = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, a in enumerate(names):
        out.append(f"| {a} | " + " | ".join(_num(m[i][j], ".3f") for j in range(len(names))) + " |")
    return out


# =========================================================================================
# 6. The whole experiment
# =========================================================================================


@dataclass(frozen=True)
class TransferConfig:
    """Everything that determines a transfer run (saved as ``config.json``).

    Defaults are sized for 2 CPU cores and a 0.5B model (a few minutes per source language);
    the paper uses n_train 128, n_val 32, all 572 test prompts and 512 new tokens.

    Attributes:
        model: registry name or GGUF path.
        data_dir: PolyRefuse directory (default :func:`pyrefusal.data.polyrefuse.default_data_dir`).
        sources / targets: languages whose direction is extracted / whose prompts are answered.
        n_train / n_val / n_test: prompts per kind (train, val) and harmful test prompts per target.
        max_new_tokens: tokens generated per test prompt.
        seed: sampling seed (paper: 1).
        kl_threshold / prune_fraction / steering_filter: selection rule (paper: 0.2 / 0.8 / False).
        condition: ``"ablation"`` (clean) or ``"harm_ablation"`` (the paper's multi_test condition).
        detector: ``"multilingual"`` or ``"paper"`` substring matching.
        filter: filter train/val prompts by refusal score.
        system_prompt: ``None`` = the chat template's default.
        prompt_format: ``"template"`` (the GGUF chat template) or ``"paper"`` (no system turn at all when
            ``system_prompt`` is ``None``, as the paper; :attr:`pyrefusal.runtime.runtime.Runtime.prompt_format`).
        token_method: ``"derive"`` refusal tokens from the model's refusals (table fallback) or ``"table"``.
        n_token_probe / token_max_new_tokens: prompts and tokens generated to derive refusal tokens.
        refusal_openings: explicit refusal openings per language (override), e.g. ``{"de": ("Ich",)}``.
        keep_activations: store per-prompt train activations (float16) for PCA and projections.
        random_control: also apply a random direction with the first source's norm (the control row).
        n_ctx / n_seq_max / n_gpu_layers / n_threads: runtime settings.
    """

    model: str = "qwen2.5-coder-0.5b-instruct-q4_k_m"
    data_dir: str | None = None
    sources: tuple[str, ...] = ("en", "de", "zh", "ja")
    targets: tuple[str, ...] = ("en", "de", "zh", "ja", "ru")
    n_train: int = 16
    n_val: int = 6
    n_test: int = 8
    max_new_tokens: int = 32
    seed: int = 1
    kl_threshold: float = 0.2
    prune_fraction: float = 0.8
    steering_filter: bool = False
    condition: str = "ablation"
    detector: str = "multilingual"
    filter: bool = True
    system_prompt: str | None = None
    prompt_format: str = "template"
    token_method: str = "derive"
    n_token_probe: int = 32
    token_max_new_tokens: int = 8
    refusal_openings: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    keep_activations: bool = True
    random_control: bool = True
    n_ctx: int = 8192
    n_seq_max: int = 16
    n_gpu_layers: int = -1
    n_threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"], d["targets"] = list(self.sources), list(self.targets)
        d["refusal_openings"] = {k: list(v) for k, v in self.refusal_openings.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransferConfig:
        d = dict(d)
        for k in ("sources", "targets"):
            if k in d:
                d[k] = tuple(d[k])
        if "refusal_openings" in d:
            d["refusal_openings"] = {k: tuple(v) for k, v in (d["refusal_openings"] or {}).items()}
        return cls(**d)

    def rule(self) -> SelectionRule:
        return SelectionRule(self.prune_fraction, self.kl_threshold, self.steering_filter)


# Settings that do not change stored results: a resumed run may differ in these.
_RESUMABLE_KEYS = {"sources", "targets", "random_control", "n_threads", "n_gpu_layers", "n_ctx"}


def _check_config(out: Path, config: TransferConfig, force: bool) -> None:
    defaults = {f.name: f.default for f in fields(TransferConfig) if f.default is not MISSING}
    new = check_config(
        out, config.to_dict(), what="transfer run", force=force, resumable=_RESUMABLE_KEYS, defaults=defaults
    )
    if force:
        for name in ("completions.jsonl", "transfer.json", "report.md"):
            (out / name).unlink(missing_ok=True)
        ddir = out / "directions"
        if ddir.exists():
            for f in sorted(ddir.glob("*/*")):
                f.unlink()
    write_config(out, new)


def run_transfer(
    config: TransferConfig,
    out: Path,
    log: Log = print,
    progress: Progress | None = None,
    *,
    force: bool = False,
    plots: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the cross-lingual experiment; returns the dict written to ``transfer.json``.

    Chains: refusal tokens and a direction per source language (:func:`extract_language_directions`,
    saved under ``out/directions/``), the transfer matrix (:func:`transfer_matrix`, completions in
    ``out/completions.jsonl``), geometry (cosines, PCA, projections on the English direction, or on
    the first source's when English is not a source), figures (:mod:`pyrefusal.reporting.plots`) and
    ``report.md``.

    Args:
        config: the settings.
        out: output directory (created; resumed when it holds a run with the same settings, where
            sources/targets may differ: finished languages and completions are reused).
        log: message sink.
        progress: ``progress(stage, done, total)``.
        force: delete previous results in ``out`` first.
        plots: write the PNG figures.

    Raises:
        PyrefusalError: settings clash with ``out``, unknown languages/condition, or selection fails.
    """
    from pyrefusal.runtime.runtime import Runtime, build_info

    if config.prompt_format not in ("template", "paper"):
        raise PyrefusalError(f"unknown prompt_format {config.prompt_format!r}; choose 'template' or 'paper'")
    if config.condition not in TRANSFER_CONDITIONS:
        raise PyrefusalError(
            f"unknown transfer condition {config.condition!r}; choose from {list(TRANSFER_CONDITIONS)}"
        )
    if config.detector not in ("multilingual", "paper"):
        raise PyrefusalError(f"unknown detector {config.detector!r}; choose 'multilingual' or 'paper'")
    if config.token_method not in ("derive", "table"):
        raise PyrefusalError(f"unknown token_method {config.token_method!r}; choose 'derive' or 'table'")
    if not config.sources or not config.targets:
        raise PyrefusalError("give at least one source and one target language")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        data_dir = Path(config.data_dir) if config.data_dir else default_data_dir()
        data = PolyRefuse(data_dir)
        available = data.languages()  # raises a DataError with a fix when the directory is empty
        unknown = [x for x in (*config.sources, *config.targets) if x not in available]
        if unknown:
            raise DataError(f"language(s) {unknown} have no files in {data_dir}; available: {available}")
        _check_config(out, config, force)

        timings: dict[str, float] = {}
        t_all = time.perf_counter()
        t = time.perf_counter()
        rt = Runtime.for_study(config, log=log)  # fails on an unknown graph before any extraction
        timings["load_model"] = time.perf_counter() - t
        detector = SubstringDetector(mode="paper" if config.detector == "paper" else "multilingual")
        try:
            t = time.perf_counter()
            directions = extract_language_directions(
                rt,
                data,
                config.sources,
                n_train=config.n_train,
                n_val=config.n_val,
                seed=config.seed,
                filter=config.filter,
                system=config.system_prompt,
                selection_rule=config.rule(),
                progress=progress,
                out_dir=out / "directions",
                token_method=config.token_method,  # type: ignore[arg-type]
                openings=config.refusal_openings,
                detector=detector,
                n_token_probe=config.n_token_probe,
                token_max_new_tokens=config.token_max_new_tokens,
                keep_activations=config.keep_activations,
                log=log,
            )
            timings["directions"] = time.perf_counter() - t
            t = time.perf_counter()
            transfer = transfer_matrix(
                rt,
                directions,
                data,
                config.targets,
                n_test=config.n_test,
                max_new_tokens=config.max_new_tokens,
                detector=detector,
                condition=config.condition,
                completions_path=out / "completions.jsonl",
                seed=config.seed,
                system=config.system_prompt,
                batch_size=config.n_seq_max,
                progress=progress,
                log=log,
                control=config.random_control,
            )
            timings["transfer"] = time.perf_counter() - t
            info = rt.info().to_dict()
            runtime_timings = {"runtime_" + k: v for k, v in asdict(rt.timings).items() if k != "extra"}
        finally:
            rt.close()

        geometry = _geometry(directions)
        result: dict[str, Any] = {
            "model": info,
            "config": config.to_dict(),
            "transfer": transfer.to_dict(),
            "directions": {s: ld.summary() for s, ld in directions.items()},
            "geometry": geometry["json"],
            "figures": {},
            "versions": {k: v for k, v in build_info().items() if k != "system_info"},
        }
        if plots:
            t = time.perf_counter()
            result["figures"] = _figures(out, directions, transfer, geometry)
            timings["plots"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_all
        result["timings"] = {**timings, **runtime_timings}
        # a resumed run keeps the timings of the invocations that did the earlier work
        result["timings_previous"] = previous_timings(out / "transfer.json")
        write_atomic(out / "transfer.json", json.dumps(_jsonable(result), indent=1, ensure_ascii=False))
        report = write_transfer_report(_jsonable(result), out)
        log(f"wrote {out / 'transfer.json'} and {report}")
        return _jsonable(result)


def _geometry(directions: Mapping[str, LanguageDirection]) -> dict[str, Any]:
    """Cosines, PCA and projections; returns ``{"json": ..., plus arrays for the figures}``."""
    ref = "en" if "en" in directions else next(iter(directions))
    names, pos, by_layer = cosine_by_layer(directions, directions[ref].selection.position)
    layer = directions[ref].selection.layer
    _, sel = selected_cosines(directions)
    acts = train_activations_at(directions, pos, layer)
    pca = pca_activations(acts, layer=layer, position=pos) if acts else None
    proj = projection_on(directions[ref].direction, acts) if acts else None
    js = {
        "names": names,
        "position": pos,
        "layer": layer,
        "projection_reference": ref,
        "selected_cosine": sel.tolist(),
        "cosine_at_layer": by_layer[:, :, layer].tolist(),
        "cosine_by_layer": by_layer.tolist(),
        "pca_explained": list(pca.explained) if pca else None,
        "projection": proj,
    }
    return {"json": js, "by_layer": by_layer, "selected": sel, "pca": pca, "projection": proj}


def _figures(
    out: Path,
    directions: Mapping[str, LanguageDirection],
    transfer: TransferResult,
    geometry: Mapping[str, Any],
) -> dict[str, str]:
    from pyrefusal.reporting import plots

    figs: dict[str, str] = {}
    figs["transfer"] = plots.plot_transfer_matrix(transfer, out / "transfer_matrix.png").name
    for s, ld in directions.items():
        p = plots.plot_selection_heatmaps(ld.selection, out / f"selection_{s}.png", title=f"source {s}")
        figs[f"selection_{s}"] = p.name
    js = geometry["json"]
    figs["cosine"] = plots.plot_cosine_matrix(
        js["names"], geometry["selected"], out / "cosine_selected.png", title="cosine of selected directions"
    ).name
    figs["cosine_by_layer"] = plots.plot_cosine_by_layer(
        js["names"], geometry["by_layer"], out / "cosine_by_layer.png", position=js["position"]
    ).name
    if geometry["pca"] is not None:
        figs["pca"] = plots.plot_pca(geometry["pca"], out / "pca.png").name
    if geometry["projection"] is not None:
        figs["projection"] = plots.plot_projections(
            geometry["projection"], out / "projection.png", reference=js["projection_reference"]
        ).name
    return figs


def _jsonable(x: Any) -> Any:
    """NaN -> None, tuples -> lists, NumPy scalars -> Python (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
