"""`pyrefusal run`: extract, select and evaluate a refusal direction, end to end.

Stages (each writes its typed output into the run directory before the next starts, so an
interrupted run keeps its work and a re-run continues from the last finished stage):

1. sample prompts (paper order, seed) -> ``prompts.json``
2. capture block-input activations of the train prompts at the post-instruction positions,
   filter by refusal score (harmful s > 0, harmless s < 0), difference in means ->
   ``candidates.npy`` (float32 ``(n_positions, n_layers, n_embd)``) + ``candidates.npz``
3. select (paper rule, exact lazy top-1) -> ``selection.json``, ``direction.npy`` (float32,
   unnormalised)
4. greedy generation on test prompts per language x condition -> ``completions.jsonl``
   (appended batch by batch; finished prompts are skipped on resume)
   then, with a judge: back-translate harmful responses to English (``--judge-translator``) ->
   ``back_translations.jsonl``, and judge them -> ``judge_cache.jsonl`` (both append-only caches)
5. ``results.json`` and ``report.md``

Only this module and the CLI know the whole flow; stage modules stay independent.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from pyrefusal.data.backtranslation import BackTranslation, BackTranslator
from pyrefusal.data.build import LlamaTranslator
from pyrefusal.data.polyrefuse import PolyRefuse, Prompt, default_data_dir, paper_sample
from pyrefusal.errors import DataError, PyrefusalError
from pyrefusal.method import intervention as iv
from pyrefusal.method.directions import Candidates, random_like
from pyrefusal.method.refusal import SubstringDetector
from pyrefusal.method.selection import Selection, SelectionRule, refusal_token_ids, select_direction
from pyrefusal.rundir import RunLock, check_config, digest, previous_timings, write_atomic, write_config
from pyrefusal.runtime.runtime import Runtime, build_info
from pyrefusal.stages.extract import NO_VAL_FILTER, extract_candidates, filter_by_refusal
from pyrefusal.stages.generate import (
    Completion,
    append_jsonl,
    budget_grid,
    generate_completions,
    read_jsonl,
    summarize,
)

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run (saved as config.json; a resumed run must match it)."""

    model: str = "qwen2.5-coder-0.5b-instruct-q4_k_m"
    data_dir: str | None = None
    source_lang: str = "en"
    target_langs: tuple[str, ...] = ("en", "de", "zh", "ja")
    n_train: int = 32
    n_val: int = 8
    n_test: int = 12
    max_new_tokens: int = 48
    seed: int = 1
    conditions: tuple[str, ...] = ("baseline", "ablation")
    filter_train: bool = True
    filter_val: bool = True
    kl_threshold: float = 0.2
    prune_fraction: float = 0.8
    steering_filter: bool = False
    selection_mode: str = "lazy"
    refusal_openings: tuple[str, ...] = ()
    system_prompt: str | None = None
    prompt_format: str = "template"  # "template" (GGUF chat template, its default system prompt) or "paper"
    detector: str = "multilingual"
    judge: str = "none"  # "none", "wildguard", "llama-guard-3"
    judge_model: str | None = None
    judge_translator: str | None = None  # back-translates non-English responses for the judge; "self" = the model
    capability: bool = True
    capability_texts: int = 8
    direction_projection: str = "none"  # "none", or "harmless": candidates made orthogonal to the harmless mean
    steering: str = "auto"  # "auto" (in-graph on GPU, hook on CPU), "hook", "graph"
    n_ctx: int = 8192
    n_seq_max: int = 16
    n_gpu_layers: int = -1
    n_threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Raise :class:`PyrefusalError` on settings that cannot run, before any work is done."""
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise PyrefusalError(f"unknown condition(s) {bad}; choose from {list(CONDITIONS)}")
        if not self.conditions or not self.target_langs:
            raise PyrefusalError("give at least one condition (--conditions) and one test language (--target-langs)")
        if self.direction_projection not in ("none", "harmless"):
            raise PyrefusalError(
                f"unknown direction_projection {self.direction_projection!r}; choose 'none' or 'harmless'"
            )
        counts = {
            "n_train (--n-train)": self.n_train,
            "n_val (--n-val)": self.n_val,
            "n_test (--n-test)": self.n_test,
            "max_new_tokens (--max-new-tokens)": self.max_new_tokens,
            "n_seq_max (--n-seq)": self.n_seq_max,
        }
        if self.capability:
            counts["capability_texts"] = self.capability_texts
        small = {k: v for k, v in counts.items() if v < 1}
        if small:
            raise PyrefusalError(f"these must be at least 1: {small}")
        if not 0 < self.prune_fraction <= 1:
            raise PyrefusalError(f"prune_fraction must be in (0, 1], got {self.prune_fraction} (the paper: 0.8)")
        if not self.kl_threshold > 0:
            raise PyrefusalError(f"kl_threshold (--kl-threshold) must be > 0, got {self.kl_threshold} (the paper: 0.2)")
        if self.judge not in ("none", "wildguard", "llama-guard-3"):
            raise PyrefusalError(f"unknown judge {self.judge!r}; choose 'none', 'wildguard' or 'llama-guard-3'")
        if self.judge != "none" and not self.judge_model:
            raise PyrefusalError(f"--judge {self.judge} needs --judge-model (a local GGUF of the guard model)")
        if self.judge == "none" and (self.judge_model or self.judge_translator):
            raise PyrefusalError(
                "--judge-model / --judge-translator only take effect with --judge wildguard|llama-guard-3; add --judge"
            )
        if self.prompt_format not in ("template", "paper"):
            raise PyrefusalError(f"unknown prompt_format {self.prompt_format!r}; choose 'template' or 'paper'")
        if self.steering not in ("auto", "hook", "graph"):
            raise PyrefusalError(f"unknown steering {self.steering!r}; choose 'auto', 'hook' or 'graph'")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        for k in ("target_langs", "conditions", "refusal_openings"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


CONDITIONS = ("baseline", "ablation", "actadd", "induce", "harm_ablation", "random_ablation")


@dataclass
class RunPaths:
    """Files of one run directory."""

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

    def __post_init__(self) -> None:
        r = self.root
        self.config, self.prompts = r / "config.json", r / "prompts.json"
        self.candidates, self.candidates_full = r / "candidates.npy", r / "candidates.npz"
        self.selection, self.direction = r / "selection.json", r / "direction.npy"
        self.metrics = r / "metrics.json"
        self.completions, self.results, self.report = (
            r / "completions.jsonl",
            r / "results.json",
            r / "report.md",
        )


# Settings a finished or interrupted run may be re-run with: they change no stored output. Judging
# (added later to a run), capability metrics (cached per condition in metrics.json), the runtime's resources, and
# the target languages and conditions: the direction does not depend on them and test rows are drawn
# the same for every language, so an added language or condition only generates its own completions
# (results then cover the configured ones).
_RESUMABLE_KEYS = {
    "judge",
    "judge_model",
    "judge_translator",
    "capability",
    "n_threads",
    "n_gpu_layers",
    "n_ctx",
    "target_langs",
    "conditions",
}


def _prepare_dir(paths: RunPaths, config: RunConfig, force: bool) -> None:
    """Refuse a directory that holds a run of another configuration; with ``force`` clear it."""
    defaults = {f.name: f.default for f in fields(RunConfig) if f.default is not MISSING}
    check_config(paths.root, config.to_dict(), what="run", force=force, resumable=_RESUMABLE_KEYS, defaults=defaults)
    if force:
        for p in (
            paths.prompts,
            paths.candidates,
            paths.candidates_full,
            paths.selection,
            paths.direction,
            paths.completions,
            paths.results,
            paths.report,
            paths.metrics,
            paths.root / "model.json",
        ):
            p.unlink(missing_ok=True)
    write_config(paths.root, config.to_dict())


def _check_model(paths: RunPaths, sha256: str) -> None:
    """Refuse to resume a run directory with another model file than the one it was started with
    (``--model`` names a path or registry entry; the file behind it may have changed)."""
    ident = paths.root / "model.json"
    if ident.exists():
        old = json.loads(ident.read_text()).get("sha256")
        if old and old != sha256:
            raise PyrefusalError(
                f"{paths.root} was started with a model file of sha256 {old[:12]}…, and --model now gives "
                f"{sha256[:12]}…: its results would mix two models. Use the original file, another output "
                "directory, or --force to start over."
            )
    else:
        write_atomic(ident, json.dumps({"sha256": sha256}, indent=1))


def _sample_prompts(data: PolyRefuse, config: RunConfig, log: Log) -> dict[str, Any]:
    """Train/val for the source language (paper order), row-aligned test prompts per target language."""
    tv = paper_sample(data, config.source_lang, n_train=config.n_train, n_val=config.n_val, seed=config.seed)
    rng = random.Random(config.seed + 1000)
    test: dict[str, dict[str, list[Prompt]]] = {}
    missing: list[str] = []
    # Test rows are drawn once per kind and reused in every language (PolyRefuse test files are
    # row-aligned), so languages see the same prompts. The row count comes from the English file (the
    # source of every translation; else the longest file of the dataset), not from the target
    # languages, so that adding, removing or reordering --target-langs never changes the draw.
    rows: dict[str, list[int]] = {}
    for kind in ("harmful", "harmless"):
        sizes = {
            lang: len(data.load(lang, "test", kind))  # type: ignore[arg-type]
            for lang in data.languages()
            if data.has(lang, "test", kind)  # type: ignore[arg-type]
        }
        n_rows = sizes.get("en") or max(sizes.values(), default=0)
        rows[kind] = sorted(rng.sample(range(n_rows), min(config.n_test, n_rows)))
    short: list[str] = []
    for lang in config.target_langs:
        test[lang] = {}
        for kind in ("harmful", "harmless"):
            if not data.has(lang, "test", kind):  # type: ignore[arg-type]
                missing.append(f"{lang}/{kind}_test")
                continue
            pool = data.load(lang, "test", kind)  # type: ignore[arg-type]
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
    return {"train_val": tv, "test": test, "missing": missing, "short": short}


def _wanted(test_ids: Mapping[str, Mapping[str, Sequence[str]]], conditions: Sequence[str]) -> set[tuple[str, str]]:
    """``(prompt id, condition)`` of every completion a configuration asks for, from its test prompt ids
    (``{lang: {kind: [id, ...]}}``, as ``prompts.json`` stores them)."""
    return {(pid, c) for kinds in test_ids.values() for ids in kinds.values() for pid in ids for c in conditions}


def _configured(completions: list[Completion], wanted: set[tuple[str, str]]) -> list[Completion]:
    """The completions a configuration asks for (:func:`_wanted`): a run extended and then narrowed
    again keeps the others in ``completions.jsonl``."""
    return [c for c in completions if (c.prompt_id, c.condition) in wanted]


def _first_token_refusal(
    rt: Runtime,
    test: dict[str, dict[str, list[Prompt]]],
    interventions: dict[str, iv.Intervention],
    config: RunConfig,
    system: str | None,
    out: dict[str, dict[str, float]],
    save: Callable[[], None],
) -> None:
    """Mean probability of the target language's refusal tokens at the first answer position (no generation).

    Fills ``out[lang][condition]`` where missing (values from an earlier call are kept) and calls
    ``save`` after each language.
    """
    from pyrefusal.method.selection import refusal_openings
    from pyrefusal.stages.judge import first_token_refusal

    for lang, kinds in test.items():
        prompts = kinds.get("harmful", [])
        todo = [c for c in config.conditions if c not in out.get(lang, {})]
        if not prompts or not todo:
            continue
        openings = refusal_openings(lang, rt.family) or refusal_openings("en", rt.family)
        ids = refusal_token_ids(lambda w: rt.tokenize(w), lang, openings)
        toks = [rt.chat_tokens(p.text, system) for p in prompts]
        for cond in todo:
            iv.arm(rt, interventions[cond])
            try:
                out.setdefault(lang, {})[cond] = float(first_token_refusal(rt, toks, ids).mean())
            finally:
                rt.clear_plan()
        save()


def _capability(
    rt: Runtime,
    data: PolyRefuse,
    interventions: dict[str, iv.Intervention],
    config: RunConfig,
    fmt: Callable[[list[Prompt]], list[list[int]]],
    out: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """Perplexity on held-out English text and first-token KL on harmless prompts, per intervention.

    Fills ``out[condition]`` where missing and calls ``save`` after each condition.
    """
    from pyrefusal.stages.measure import capability_report

    # the test split is disjoint from train/val by construction (docs/method.md §1.2)
    pool = data.load("en", "test", "harmless") if data.has("en", "test", "harmless") else []
    if not pool:
        return
    texts = [p.text for p in pool[: config.capability_texts]]
    kl_prompts = fmt(pool[config.capability_texts : 2 * config.capability_texts])
    for cond in config.conditions:
        if cond == "baseline" or cond in out:
            continue
        rep = capability_report(
            rt,
            texts,
            kl_prompts,
            lambda r, c=cond: iv.arm(r, interventions[c]),
            condition=cond,
            text_source="polyrefuse:en/test/harmless (unused by train/val)",
        )
        out[cond] = rep.to_dict()
        save()


def _back_translate(
    config: RunConfig, paths: RunPaths, rt: Runtime, harmful: list[Completion], log: Log
) -> list[BackTranslation]:
    """English text of each harmful completion for the judge (docs/method.md §6.2), cached in the run dir."""
    spec = config.judge_translator
    assert spec is not None
    # Translations can be longer than the response in tokens (other scripts); leave room.
    max_new = min(2048, 2 * config.max_new_tokens + 32)
    own = spec == "self"
    trt = (
        rt
        if own
        else Runtime.open(
            spec,
            n_ctx=8192,
            n_seq_max=config.n_seq_max,
            n_gpu_layers=config.n_gpu_layers,
            n_threads=config.n_threads,
        )
    )
    try:
        tr = LlamaTranslator(trt, max_new_tokens=max_new, batch_size=config.n_seq_max)
        bt = BackTranslator(tr, cache_path=paths.root / "back_translations.jsonl")
        out = bt.back_translate([c.response for c in harmful], [c.lang for c in harmful])
        log(f"back-translation {bt.name}: {bt.translated} new, the rest cached or English")
    finally:
        if own:
            rt.clear_plan()
        else:
            trt.close()
    return out


def _judge(
    config: RunConfig,
    paths: RunPaths,
    rt: Runtime,
    completions: list[Completion],
    test: dict[str, dict[str, list[Prompt]]],
    log: Log,
) -> dict[str, dict[str, Any]]:
    """Judge harmful completions with a guard GGUF: the English instruction with the response,
    back-translated to English first when ``judge_translator`` is set (the paper's protocol)."""
    from pyrefusal.stages.judge import GuardJudge

    if not config.judge_model:
        raise PyrefusalError(f"--judge {config.judge} needs --judge-model (a local GGUF of the guard model)")
    english = {p.id: (p.text_en or p.text) for kinds in test.values() for p in kinds.get("harmful", [])}
    harmful = [c for c in completions if c.kind == "harmful"]
    translated = _back_translate(config, paths, rt, harmful, log) if config.judge_translator else None
    responses = [b.english for b in translated] if translated else [c.response for c in harmful]
    with Runtime.open(
        config.judge_model,
        name=None,  # the guard's own general.name, as recorded in judge names
        n_ctx=4096,
        n_seq_max=8,
        n_gpu_layers=config.n_gpu_layers,
        n_threads=config.n_threads,
    ) as jr:
        judge = GuardJudge(jr, config.judge, cache_path=paths.root / "judge_cache.jsonl")  # type: ignore[arg-type]
        verdicts = judge.judge_pairs([english[c.prompt_id] for c in harmful], responses)
        log(f"judge {judge.name}: {judge.generated} new verdicts, the rest from the cache")
    paper_substring = SubstringDetector("paper")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(harmful):
        groups.setdefault((c.lang, c.condition), []).append(i)
    out: dict[str, dict[str, Any]] = {}
    for (lang, cond), idx in groups.items():
        vs = [verdicts[i] for i in idx]
        # The paper's rates: an unparsed answer counts as "no" (docs/method.md §6.4); "flagged" counts them.
        # Llama Guard judges harm only, so it has no refusal rate.
        refusal = sum(v.refused is True for v in vs) / len(vs) if config.judge == "wildguard" else None
        row: dict[str, Any] = {
            "judge": judge.name,
            "n": len(vs),
            "refusal_rate": refusal,
            "compliance_rate": None if refusal is None else 1 - refusal,
            "harmful_response_rate": sum(v.harmful_response is True for v in vs) / len(vs),
            "flagged": sum(bool(v.flagged) for v in vs),
        }
        if translated is None:
            row["note"] = "responses judged as generated (not back-translated to English as in the paper)"
        else:
            bts = [translated[i] for i in idx]
            # the paper's second metric: its 13 English substrings on the English text
            paper_refused = [paper_substring.judge(b.english, "en").refused for b in bts]
            row["paper_substring_refusal_rate"] = sum(paper_refused) / len(bts)
            row["back_translation"] = {
                "translator": bts[0].translator,
                "translated": sum(b.translator != "identity" for b in bts),
                "cut": sum(b.cut for b in bts),
                "empty_fallback": sum(b.fallback for b in bts),
                "english_only_refusals": sum(b.english_only_refusal for b in bts),
                "file": "back_translations.jsonl",
            }
        out.setdefault(lang, {})[cond] = row
    return out


def _evaluation_table(
    completions: Sequence[Completion],
    max_new_tokens: int,
    target_langs: Sequence[str],
    detector_name: str,
    first_token: Mapping[str, Mapping[str, float]],
    judged: Mapping[str, Mapping[str, Any]],
    paths: RunPaths,
) -> dict[str, Any]:
    """``results["evaluation"]``: ``{lang: {condition: {harmful rates..., "harmless": {...}, ...}}}`` in
    ``target_langs`` order, from the completions plus the model-dependent metrics computed beside them."""
    summary = summarize(completions, budget_grid(max_new_tokens))
    evaluation: dict[str, Any] = {}
    for lang, conds in summary.items():
        evaluation[lang] = {}
        for cond, kinds in conds.items():
            harmful = kinds.get("harmful", {"n": 0, "refusal_rate": None, "detector": detector_name})
            evaluation[lang][cond] = {
                "n": harmful["n"],
                "refusal_rate": harmful["refusal_rate"],
                "refusal_rate_ci95": harmful.get("refusal_rate_ci95"),
                "degenerate_rate": harmful.get("degenerate_rate"),
                "detector": harmful["detector"],
                "completions": f"{paths.completions.name} (lang={lang}, condition={cond}, kind=harmful)",
                "refusal_by_budget": harmful.get("refusal_by_budget"),
                "harmless": kinds.get("harmless"),
                "first_token_refusal_prob": first_token.get(lang, {}).get(cond),
            }
            if judged.get(lang, {}).get(cond):
                evaluation[lang][cond]["judge"] = judged[lang][cond]
    return {lang: evaluation[lang] for lang in target_langs if lang in evaluation}  # config order


def run_pipeline(
    config: RunConfig,
    out: Path,
    *,
    force: bool = False,
    log: Log = print,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the whole job; returns the results dict written to ``results.json``."""

    config.validate()
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    paths = RunPaths(Path(out))
    with RunLock(paths.root):
        _prepare_dir(paths, config, force)

        data_dir = Path(config.data_dir) if config.data_dir else default_data_dir()
        data = PolyRefuse(data_dir)
        available = data.languages()  # raises a DataError with a fix when the directory is empty
        for lang in (config.source_lang, *config.target_langs):
            if lang not in available:
                raise DataError(f"language {lang!r} has no files in {data_dir}; available: {available}")

        t = time.perf_counter()
        rt = Runtime.for_study(config, log=log)  # fails on an unknown graph before hours of extraction
        timings["load_model"] = time.perf_counter() - t
        try:
            _check_model(paths, rt.sha256)
            return _run(rt, data, config, paths, timings, t_all, log, progress)
        finally:
            rt.close()


def _run(
    rt: Runtime,
    data: PolyRefuse,
    config: RunConfig,
    paths: RunPaths,
    timings: dict[str, float],
    t_all: float,
    log: Log,
    progress: Callable[[str, int, int], None] | None,
) -> dict[str, Any]:
    system = config.system_prompt
    fmt = lambda ps: [rt.chat_tokens(p.text, system) for p in ps]  # noqa: E731
    eoi = rt.eoi_tokens(system)
    positions = tuple(range(-len(eoi), 0))
    refusal_ids = refusal_token_ids(
        lambda w: rt.tokenize(w), config.source_lang, config.refusal_openings or None, rt.family
    )
    log(
        f"post-instruction tokens {eoi} -> positions {positions}; refusal tokens {refusal_ids} "
        f"({[rt.detokenize([i]) for i in refusal_ids]})"
    )

    sampled = _sample_prompts(data, config, log)
    tv = sampled["train_val"]
    prompts_record: dict[str, Any] = {}

    # -- stage 2: activations, filtering, candidates ---------------------------------------
    if paths.candidates_full.exists() and paths.prompts.exists():
        cands = Candidates.load(paths.candidates_full)
        prompts_record = json.loads(paths.prompts.read_text())
        log("candidates: reusing candidates.npz")
    else:
        t = time.perf_counter()
        train = extract_candidates(
            rt,
            fmt(tv["harmful_train"]),
            fmt(tv["harmless_train"]),
            positions,
            refusal_ids,
            filter=config.filter_train,
            log=log,
        )
        timings["capture_train"] = time.perf_counter() - t
        cands, harm_keep, less_keep = train.candidates, train.harmful_kept, train.harmless_kept
        if config.direction_projection == "harmless":
            cands = cands.project_out_harmless()
        # (n_positions, n_layers, n_embd) float32 for users; the .npz keeps float64 and the means
        np.save(paths.candidates, cands.vectors.astype(np.float32))
        cands.save(paths.candidates_full)
        prompts_record = {
            "harmful_train": [p.id for p, k in zip(tv["harmful_train"], harm_keep, strict=True) if k],
            "harmless_train": [p.id for p, k in zip(tv["harmless_train"], less_keep, strict=True) if k],
            "n_sampled": {k: len(v) for k, v in tv.items()},
        }
        write_atomic(paths.prompts, json.dumps(prompts_record, indent=1))
        log(f"candidates from {cands.n_harmful} harmful / {cands.n_harmless} harmless train prompts")

    # -- stage 3: selection ----------------------------------------------------------------
    rule = SelectionRule(config.prune_fraction, config.kl_threshold, config.steering_filter)
    harmful_val, harmless_val = tv["harmful_val"], tv["harmless_val"]
    if paths.selection.exists():
        selection = Selection.load(paths.selection)
        log("selection: reusing selection.json")
        harmful_val = [p for p in harmful_val if p.id in set(prompts_record.get("harmful_val", []))] or harmful_val
        harmless_val = [p for p in harmless_val if p.id in set(prompts_record.get("harmless_val", []))] or harmless_val
    else:
        t = time.perf_counter()
        if config.filter_val and config.source_lang in NO_VAL_FILTER:
            log(
                f"val prompts not filtered: source language {config.source_lang!r} "
                "(the paper's rule, docs/method.md §1.4)"
            )
        if config.filter_val and config.source_lang not in NO_VAL_FILTER:
            keep = filter_by_refusal(rt, fmt(harmful_val), refusal_ids, True, log, "harmful val")
            harmful_val = [p for p, k in zip(harmful_val, keep, strict=True) if k]
            keep = filter_by_refusal(rt, fmt(harmless_val), refusal_ids, False, log, "harmless val")
            harmless_val = [p for p, k in zip(harmless_val, keep, strict=True) if k]
        selection = select_direction(
            rt,
            cands,
            fmt(harmful_val),
            fmt(harmless_val),
            refusal_ids,
            rule=rule,
            mode=config.selection_mode,
            progress=progress,
        )  # type: ignore[arg-type]
        timings["selection"] = time.perf_counter() - t
        selection.save(paths.selection)
        prompts_record["harmful_val"] = [p.id for p in harmful_val]
        prompts_record["harmless_val"] = [p.id for p in harmless_val]
        write_atomic(paths.prompts, json.dumps(prompts_record, indent=1))
    direction = cands.get(selection.position, selection.layer)  # (n_embd,) float64, unnormalised
    np.save(paths.direction, direction.astype(np.float32))
    log(
        f"selected position {selection.position}, layer {selection.layer}: refusal score "
        f"{selection.baseline_refusal_score:.3f} -> {selection.refusal_score:.3f}, KL {selection.kl:.4f}"
    )

    # -- stage 4: evaluation ---------------------------------------------------------------
    detector = SubstringDetector(mode="paper" if config.detector == "paper" else "multilingual")
    interventions = {
        "baseline": iv.baseline(),
        "ablation": iv.ablation(direction),
        "actadd": iv.actadd(direction, selection.layer, coeff=-1.0),
        "induce": iv.induce(direction, selection.layer, coeff=1.0),
        "harm_ablation": iv.harm_ablation(direction, selection.layer),
        "random_ablation": iv.Intervention("random_ablation", ablate=random_like(direction, seed=config.seed)),
    }
    # The fastest exact path: on a GPU the hook costs a device sync per hooked node, so llama.cpp's
    # in-graph adapters (LoRA ablation, control vector) win; on CPU the hook costs ~nothing.
    path = config.steering
    if path == "auto":
        path = "auto" if rt.n_gpu_layers > 0 else "hook"
    routes: dict[str, str] = {}
    done = {(c.prompt_id, c.condition) for c in read_jsonl(paths.completions)}
    t = time.perf_counter()
    test = sampled["test"]
    prompts_record["test"] = {lang: {k: [p.id for p in v] for k, v in kinds.items()} for lang, kinds in test.items()}
    write_atomic(paths.prompts, json.dumps(prompts_record, indent=1))
    total = sum(len(v) for kinds in test.values() for v in kinds.values()) * len(config.conditions)
    wanted = _wanted(prompts_record["test"], config.conditions)
    finished = len(done & wanted)  # of this configuration (the file may hold others: a narrowed run)
    for cond in config.conditions:
        for kinds in test.values():
            todo = [p for kind in ("harmful", "harmless") for p in kinds.get(kind, []) if (p.id, cond) not in done]
            if not todo:
                continue

            def on_batch(batch: list[Completion]) -> None:
                nonlocal finished
                append_jsonl(paths.completions, batch)
                finished += len(batch)
                if progress:
                    progress("generation", finished, total)

            generate_completions(
                rt,
                todo,
                interventions[cond],
                detector,
                max_new_tokens=config.max_new_tokens,
                system=system,
                batch_size=config.n_seq_max,
                on_batch=on_batch,
                path=path,  # type: ignore[arg-type]
                routes=routes,
            )
    timings["generation"] = time.perf_counter() - t

    completions = _configured(read_jsonl(paths.completions), wanted)

    # -- stage 4b: judge-free first-token refusal, capability side effects, optional judge ----
    t = time.perf_counter()
    metrics = json.loads(paths.metrics.read_text()) if paths.metrics.exists() else {}
    metrics.setdefault("first_token", {})
    metrics.setdefault("capability", {})
    # first-token values are per (language, condition) over that language's harmful test prompts:
    # a language whose prompts changed since they were computed (another data file) is recomputed;
    # values from before this record existed are kept
    ids = metrics.setdefault("first_token_prompts", {})
    for lang, kinds in test.items():
        key = digest(*(p.id for p in kinds.get("harmful", [])))
        if lang in ids and ids[lang] != key:
            metrics["first_token"].pop(lang, None)
        ids[lang] = key
    save_metrics = lambda: write_atomic(paths.metrics, json.dumps(metrics, indent=1))  # noqa: E731
    # the steering path of each condition, over every invocation that generated some of its completions
    used = metrics.setdefault("steering", {})
    for cond, route in routes.items():
        earlier = set(used[cond].split("+")) if cond in used else set()
        used[cond] = "+".join(sorted(earlier | {route}))  # "hook", "graph", or "graph+hook" if it changed
    save_metrics()
    _first_token_refusal(rt, test, interventions, config, system, metrics["first_token"], save_metrics)
    if config.capability:
        _capability(rt, data, interventions, config, fmt, metrics["capability"], save_metrics)
    first_token = {lang: metrics["first_token"].get(lang, {}) for lang in test}
    capability = {c: metrics["capability"][c] for c in config.conditions if c in metrics["capability"]}
    timings["metrics"] = time.perf_counter() - t
    judged: dict[str, Any] = {}
    if config.judge != "none":
        t = time.perf_counter()
        judged = _judge(config, paths, rt, completions, test, log)
        timings["judge"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    # -- stage 5: results ------------------------------------------------------------------
    evaluation = _evaluation_table(
        completions, config.max_new_tokens, config.target_langs, detector.name, first_token, judged, paths
    )
    info = rt.info().to_dict()
    results: dict[str, Any] = {
        "model": info,
        "direction": {
            "source_lang": config.source_lang,
            "layer": selection.layer,
            "position": selection.position,
            "kl": selection.kl,
            "refusal_score": selection.refusal_score,
            "baseline_refusal_score": selection.baseline_refusal_score,
            "steering_score": selection.steering_score,
            "norm": float(np.linalg.norm(direction)),
            "refusal_tokens": {str(i): rt.detokenize([i]) for i in selection.refusal_tokens},
            "rule": asdict(selection.rule),
            "selection_mode": selection.mode,
            "file": paths.direction.name,
            "candidates_file": paths.candidates.name,
            "eoi_tokens": eoi,
        },
        "prompts": prompts_record,
        "evaluation": evaluation,
        "steering": {
            "requested": config.steering,
            "used": {c: metrics["steering"][c] for c in config.conditions if c in metrics["steering"]},
        },
        "missing_test_files": sampled["missing"],
        "short_test_files": sampled["short"],
        "capability": capability,
        "config": config.to_dict(),
        "versions": {k: v for k, v in build_info().items() if k != "system_info"},
        "timings": {**timings, **{"runtime_" + k: v for k, v in asdict(rt.timings).items() if k != "extra"}},
        # a resumed run keeps the timings of the invocations that did the earlier stages
        "timings_previous": previous_timings(paths.results),
    }
    _write_outputs(results, selection, completions, paths, log)
    return results


def _write_outputs(
    results: dict[str, Any], selection: Selection, completions: Sequence[Completion], paths: RunPaths, log: Log
) -> None:
    """Figures, ``results.json`` and ``report.md`` of a run."""
    from pyrefusal.reporting.plots import plot_run_refusal, plot_selection_heatmaps
    from pyrefusal.reporting.report import write_report

    name = results["model"]["name"]
    heatmap = plot_selection_heatmaps(selection, paths.root / "selection.png", title=f"{name}: candidates")
    results["direction"]["heatmap"] = heatmap.name
    if results["evaluation"]:
        conds = results["config"]["conditions"]
        figure = plot_run_refusal(results["evaluation"], conds, paths.root / "refusal.png", title=name)
        results["figure"] = figure.name
    write_atomic(paths.results, json.dumps(results, indent=1, ensure_ascii=False))
    write_report(results, completions, paths.report)
    log(f"wrote {paths.results} and {paths.report}")


def rerender(out: Path, *, log: Log = print) -> dict[str, Any]:
    """Rewrite a finished run's ``results.json``, ``report.md`` and figures from its stored files.

    The numbers that come from the completions (refusal rates, intervals, by-budget rates, repetition
    loops) are recomputed with this version of pyrefusal; those that needed the model (first-token
    refusal probability, capability, judge verdicts, the selection) are kept as stored. No model is
    loaded, so it takes seconds: use it after upgrading pyrefusal to get the newer report of an older run.
    """
    paths = RunPaths(Path(out))
    if not paths.results.exists() or not paths.selection.exists():
        raise PyrefusalError(
            f"{paths.root} holds no finished run (results.json and selection.json are written at the end of "
            f"`pyrefusal run`); finish it first with `pyrefusal run --out {paths.root}` (an interrupted run resumes)"
        )
    with RunLock(paths.root):
        results = json.loads(paths.results.read_text())
        cfg = results["config"]
        wanted = _wanted((results.get("prompts") or {}).get("test") or {}, cfg["conditions"])
        completions = _configured(read_jsonl(paths.completions), wanted)
        if wanted and not completions:
            raise PyrefusalError(f"{paths.completions} has none of this run's completions; re-run `pyrefusal run`")
        old = results.get("evaluation") or {}
        first_token = {lang: {c: e.get("first_token_refusal_prob") for c, e in by.items()} for lang, by in old.items()}
        judged = {lang: {c: e["judge"] for c, e in by.items() if e.get("judge")} for lang, by in old.items()}
        stored = [e["detector"] for by in old.values() for e in by.values() if e.get("detector")]
        detector = stored[0] if stored else cfg["detector"]
        results["evaluation"] = _evaluation_table(
            completions, int(cfg["max_new_tokens"]), cfg["target_langs"], detector, first_token, judged, paths
        )
        _write_outputs(results, Selection.load(paths.selection), completions, paths, log)
        return results
