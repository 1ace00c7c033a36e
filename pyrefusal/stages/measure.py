"""Capability side effects of an intervention: first-token KL and held-out perplexity.

Two cheap checks that an intervention removes refusal without damaging the model
(the abliteration tools heretic and abliterix report first-token KL; Arditi et al. report CE loss):

* :func:`first_token_kl`: mean ``KL(P_baseline || P_intervention)`` of the next-token
  distribution at the last position of chat-formatted harmless prompts, with the paper's
  smoothing (:func:`pyrefusal.method.selection.kl_divergence`). It is the selection KL (docs/method.md §4.2)
  measured on prompts of your choice.
* :func:`perplexity`: ``exp(mean NLL)`` over every predicted token of raw held-out texts (no
  chat template), computed from :meth:`pyrefusal.runtime.runtime.Runtime.token_logprobs` under the
  armed plan.

BOS: each text is tokenised with ``add_special=True``, i.e. the model's own GGUF policy
(``tokenizer.ggml.add_bos_token``): llama-family models get BOS and then their first text token
is predicted too; Qwen2.5 GGUFs add no BOS, so their first text token is context only. Texts
longer than ``max_tokens`` are cut into consecutive windows scored independently (each window
gets BOS again where the model uses one). The number of predicted tokens is reported.

Held-out text: by default the English harmless *val* prompts of PolyRefuse
(:func:`heldout_texts`), or a user's UTF-8 text file (passages separated by blank lines). No
corpus ships with pyrefusal. The harmless val file is also the pool the selection KL samples
from, so use a text file for a strictly unseen sample.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyrefusal.data.polyrefuse import PolyRefuse, Prompt
from pyrefusal.errors import DataError, PyrefusalError
from pyrefusal.method.intervention import Intervention
from pyrefusal.method.refusal import FIRST_TOKEN_DETECTOR, SubstringDetector
from pyrefusal.method.selection import kl_divergence, log_softmax, refusal_openings, refusal_token_ids
from pyrefusal.rundir import digest, write_atomic
from pyrefusal.runtime import ModelRunner
from pyrefusal.settings import RunSettings
from pyrefusal.stages.sample import probe_prompts
from pyrefusal.stages.shards import Serial, Shards, in_order
from pyrefusal.stages.tokens import derive_refusal_tokens
from pyrefusal.steering import router

__all__ = [
    "CapabilityReport",
    "Metrics",
    "capability_report",
    "fallback_refusal_tokens",
    "first_token_kl",
    "heldout_texts",
    "measure_capability",
    "measure_fallback_refusal",
    "measure_first_token_refusal",
    "perplexity",
    "text_nll",
]

ArmFn = Callable[[ModelRunner], None]
"""Arms an intervention on a Runtime, e.g. ``lambda rt: router.arm(rt, iv.ablation(r))``."""


@dataclass(frozen=True)
class CapabilityReport:
    """Side-effect metrics of one intervention (saved in results.json).

    Attributes:
        condition: Name of the intervention measured.
        n_texts: Held-out texts scored for perplexity.
        n_tokens: Tokens predicted (the denominator of the mean NLL).
        baseline_ppl: Perplexity of the unmodified model.
        intervention_ppl: Perplexity under the intervention.
        ppl_ratio: ``intervention_ppl / baseline_ppl`` (1.0 = no change).
        first_token_kl: Mean first-token KL(baseline || intervention) on the harmless prompts.
        n_kl_prompts: Harmless prompts the KL was averaged over.
        text_source: Where the texts came from (e.g. ``"polyrefuse:en/val/harmless"``).
    """

    condition: str
    n_texts: int
    n_tokens: int
    baseline_ppl: float
    intervention_ppl: float
    ppl_ratio: float
    first_token_kl: float
    n_kl_prompts: int
    text_source: str

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of the fields."""
        return asdict(self)


def first_token_kl(runtime: ModelRunner, harmless_prompts_tokens: Sequence[Sequence[int]], arm_fn: ArmFn) -> float:
    """Mean KL(baseline || intervention) of the last-position next-token distribution.

    Args:
        runtime: A :class:`pyrefusal.runtime.runtime.Runtime`.
        harmless_prompts_tokens: Chat-formatted prompts (e.g. from ``runtime.chat_tokens``).
        arm_fn: Called once with ``runtime`` to arm the intervention; the plan is cleared after.

    Returns:
        The mean over prompts of ``sum_v P(v) (log(P(v)+1e-6) - log(Q(v)+1e-6))`` (docs/method.md
        §4.2), float. ``arm_fn`` that arms nothing gives exactly 0.0.

    Raises:
        PyrefusalError: No prompts.
    """
    if not harmless_prompts_tokens:
        raise PyrefusalError("first_token_kl needs at least one harmless prompt")
    runtime.clear_plan()
    base = runtime.last_logits(harmless_prompts_tokens)  # (n, n_vocab)
    arm_fn(runtime)
    try:
        new = runtime.last_logits(harmless_prompts_tokens)  # (n, n_vocab)
    finally:
        runtime.clear_plan()
    return float(kl_divergence(base, new).mean())


def _bos_prefix(runtime: ModelRunner) -> list[int]:
    """Tokens the model's tokenizer puts before a text (``[BOS]`` or ``[]``), per its GGUF policy."""
    full = runtime.tokenize("a", add_special=True)
    body = runtime.tokenize("a", add_special=False)
    extra = len(full) - len(body)
    if extra > 0 and full[extra:] == body:
        return full[:extra]
    return []  # no BOS (an appended EOS, if any, is not a prefix and is not scored)


def _windows(runtime: ModelRunner, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token windows of at most ``max_tokens`` tokens (BOS repeated per window when the model uses one)."""
    if max_tokens < 2:
        raise PyrefusalError(f"max_tokens must be >= 2 to predict anything; got {max_tokens}")
    bos = _bos_prefix(runtime)
    windows: list[list[int]] = []
    for text in texts:
        body = runtime.tokenize(text, add_special=False)
        width = max_tokens - len(bos)
        for start in range(0, len(body), width):
            window = bos + body[start : start + width]
            if len(window) >= 2:
                windows.append(window)
    return windows


def text_nll(runtime: ModelRunner, texts: Sequence[str], *, max_tokens: int = 512) -> tuple[float, int]:
    """Total negative log-likelihood (nats) and number of predicted tokens of ``texts``.

    Uses the armed plan, so call it after arming an intervention to score under it.

    Args:
        runtime: A :class:`pyrefusal.runtime.runtime.Runtime`.
        texts: Raw texts (no chat template).
        max_tokens: Longest window scored in one sequence (see the module docstring).

    Returns:
        ``(total_nll, n_predicted_tokens)``.

    Raises:
        PyrefusalError: No text yields a token to predict.
    """
    windows = _windows(runtime, texts, max_tokens)
    if not windows:
        raise PyrefusalError(
            "no text has a token to predict (empty texts, or one-token texts on a model without BOS); "
            "pass longer held-out texts"
        )
    lps = runtime.token_logprobs(windows)  # list of (n_tokens - 1,) float64
    total = -float(sum(lp.sum() for lp in lps))
    return total, int(sum(len(lp) for lp in lps))


def perplexity(runtime: ModelRunner, texts: list[str], *, max_tokens: int = 512) -> float:
    """Perplexity ``exp(mean NLL)`` over every predicted token of ``texts`` under the armed plan.

    Args:
        runtime: A :class:`pyrefusal.runtime.runtime.Runtime`.
        texts: Raw held-out texts.
        max_tokens: Longest window scored in one sequence.

    Returns:
        The perplexity (float, >= 1 for a proper distribution in practice).
    """
    total, n = text_nll(runtime, texts, max_tokens=max_tokens)
    return math.exp(total / n)


def heldout_texts(
    data_root: Path | str | None = None,
    *,
    text_file: Path | str | None = None,
    n: int | None = None,
    lang: str = "en",
) -> tuple[list[str], str]:
    """Held-out texts for :func:`perplexity`: PolyRefuse harmless val prompts, or a text file.

    Args:
        data_root: PolyRefuse directory (used when ``text_file`` is None).
        text_file: UTF-8 text file; passages are separated by blank lines.
        n: Keep the first ``n`` texts (all when None).
        lang: Language of the PolyRefuse harmless val file to read.

    Returns:
        ``(texts, source)`` where ``source`` describes the origin for reports.

    Raises:
        DataError: Neither source given, the file is unreadable or holds no text.
    """
    if text_file is not None:
        path = Path(text_file).expanduser()
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read held-out text file {path}: {exc}; pass a UTF-8 text file") from exc
        texts = [" ".join(p.split()) for p in raw.replace("\r\n", "\n").split("\n\n")]
        texts = [t for t in texts if t]
        source = f"file:{path.name}"
    elif data_root is not None:
        texts = [p.text for p in PolyRefuse(data_root).load(lang, "val", "harmless")]
        source = f"polyrefuse:{lang}/val/harmless"
    else:
        raise DataError("no held-out text: pass a PolyRefuse directory or a text file (--ppl-text)")
    if n is not None:
        texts = texts[:n]
    if not texts:
        raise DataError(f"held-out text source {source} holds no text; use a non-empty file")
    return texts, source


def capability_report(
    runtime: ModelRunner,
    texts: Sequence[str],
    harmless_prompts_tokens: Sequence[Sequence[int]],
    arm_fn: ArmFn,
    *,
    condition: str = "intervention",
    text_source: str = "",
    max_tokens: int = 512,
) -> CapabilityReport:
    """Measure perplexity (baseline and intervention) and first-token KL for one intervention.

    Args:
        runtime: A :class:`pyrefusal.runtime.runtime.Runtime`.
        texts: Held-out raw texts (see :func:`heldout_texts`).
        harmless_prompts_tokens: Chat-formatted harmless prompts for the KL.
        arm_fn: Arms the intervention on ``runtime``.
        condition: Name recorded in the report.
        text_source: Origin of ``texts`` recorded in the report.
        max_tokens: Longest perplexity window.

    Returns:
        The :class:`CapabilityReport`. The runtime's plan is cleared afterwards.
    """
    runtime.clear_plan()
    base_nll, n_tok = text_nll(runtime, texts, max_tokens=max_tokens)
    arm_fn(runtime)
    try:
        new_nll, _ = text_nll(runtime, texts, max_tokens=max_tokens)
    finally:
        runtime.clear_plan()
    kl = first_token_kl(runtime, harmless_prompts_tokens, arm_fn)
    base_ppl, new_ppl = math.exp(base_nll / n_tok), math.exp(new_nll / n_tok)
    return CapabilityReport(
        condition=condition,
        n_texts=len(texts),
        n_tokens=n_tok,
        baseline_ppl=base_ppl,
        intervention_ppl=new_ppl,
        ppl_ratio=new_ppl / base_ppl,
        first_token_kl=kl,
        n_kl_prompts=len(harmless_prompts_tokens),
        text_source=text_source,
    )


class Metrics:
    """``metrics.json`` of a run: the measure stage's model-dependent numbers, cached between invocations.

    ``{"first_token": {lang: {condition: mean p_R}}, "capability": {condition: CapabilityReport dict},
    "first_token_prompts": {lang: digest of the harmful test ids}, "steering": {condition: "hook"|"graph"|...}}``,
    plus ``"fallback"`` (:attr:`fallback`) only in runs with languages the substring detector is blind to.
    Wraps the stored dict so that its key order (and bytes) stay as written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}
        for key in ("first_token", "capability", "first_token_prompts", "steering"):
            self.data.setdefault(key, {})

    @property
    def first_token(self) -> dict[str, dict[str, float]]:
        """``{lang: {condition: mean first-token refusal probability}}``."""
        return self.data["first_token"]

    @property
    def capability(self) -> dict[str, Any]:
        """``{condition: CapabilityReport.to_dict()}``."""
        return self.data["capability"]

    @property
    def fallback(self) -> dict[str, Any]:
        """``{lang: record}`` of the first-token detector where the substring detector is blind
        (:func:`measure_fallback_refusal`); created on first use so that other runs' files keep their bytes."""
        return self.data.setdefault("fallback", {})

    @property
    def steering(self) -> dict[str, str]:
        """``{condition: steering path(s) used}``."""
        return self.data["steering"]

    def save(self) -> None:
        """Write ``metrics.json`` atomically."""
        write_atomic(self.path, json.dumps(self.data, indent=1))

    def note_test_prompts(self, test: Mapping[str, Mapping[str, Sequence[Prompt]]]) -> None:
        """Forget the first-token values of a language whose harmful test prompts changed since they were
        computed (another data file); values from before this record existed are kept."""
        ids = self.data["first_token_prompts"]
        for lang, kinds in test.items():
            key = digest(*(p.id for p in kinds.get("harmful", [])))
            if lang in ids and ids[lang] != key:
                self.first_token.pop(lang, None)
                self.data.get("fallback", {}).pop(lang, None)
            ids[lang] = key

    def note_routes(self, routes: Mapping[str, str]) -> None:
        """Record the steering path of each condition over every invocation that generated some of its
        completions: ``"hook"``, ``"graph"``, or ``"graph+hook"`` if it changed."""
        used = self.steering
        for cond, route in routes.items():
            earlier = set(used[cond].split("+")) if cond in used else set()
            used[cond] = "+".join(sorted(earlier | {route}))


def measure_first_token_refusal(
    runtime: ModelRunner,
    test: Mapping[str, Mapping[str, Sequence[Prompt]]],
    interventions: Mapping[str, Intervention],
    conditions: Sequence[str],
    system: str | None,
    out: dict[str, dict[str, float]],
    save: Callable[[], None],
    shards: Shards | None = None,
) -> None:
    """Mean probability of the target language's refusal tokens at the first answer position (no generation).

    Fills ``out[lang][condition]`` where missing (values from an earlier call are kept) and calls
    ``save`` after each language (with ``shards``: after each value, one unit per language and condition on the
    model replicas).
    """
    units: list[tuple[str, list[list[int]], list[int], Intervention]] = []
    keys: list[tuple[str, str]] = []  # (lang, condition) of each unit
    for lang, kinds in test.items():
        prompts = kinds.get("harmful", [])
        todo = [c for c in conditions if c not in out.get(lang, {})]
        if not prompts or not todo:
            continue
        openings = refusal_openings(lang, runtime.family) or refusal_openings("en", runtime.family)
        ids = refusal_token_ids(lambda w: runtime.tokenize(w), lang, openings)
        toks = [runtime.chat_tokens(p.text, system) for p in prompts]
        if shards is not None:
            units += [(lang, toks, ids, interventions[cond]) for cond in todo]
            keys += [(lang, cond) for cond in todo]
            continue
        for cond in todo:
            out.setdefault(lang, {})[cond] = first_token_unit(runtime, lang, toks, ids, interventions[cond])
        save()
    if shards is not None:

        def record(i: int, value: float) -> None:
            lang, cond = keys[i]
            out.setdefault(lang, {})[cond] = value
            save()

        in_order(shards.map(first_token_unit, units, label="first-token refusal"), record)


def first_token_unit(
    runtime: ModelRunner, lang: str, tokens: list[list[int]], ids: list[int], intervention: Intervention
) -> float:
    """Measure unit: mean refusal-token probability at the first answer position of ``tokens`` (one language's
    chat-formatted harmful prompts) under ``intervention``."""
    from pyrefusal.stages.judge import first_token_refusal

    router.arm(runtime, intervention)
    try:
        return float(first_token_refusal(runtime, tokens, ids).mean())
    finally:
        runtime.clear_plan()


def measure_capability(
    runtime: ModelRunner,
    data: PolyRefuse,
    interventions: Mapping[str, Intervention],
    conditions: Sequence[str],
    n_texts: int,
    system: str | None,
    out: dict[str, Any],
    save: Callable[[], None],
    shards: Shards | None = None,
) -> None:
    """Perplexity on held-out English text and first-token KL on harmless prompts, per intervention
    (:func:`capability_report`): ``n_texts`` English harmless test prompts as texts, the next ``n_texts``
    as KL prompts.

    Fills ``out[condition]`` where missing and calls ``save`` after each condition (with ``shards``: one unit
    per condition on the model replicas).
    """
    # the test split is disjoint from train/val by construction (docs/method.md §1.2)
    pool = data.load("en", "test", "harmless") if data.has("en", "test", "harmless") else []
    if not pool:
        return
    texts = [p.text for p in pool[:n_texts]]
    kl_prompts = [runtime.chat_tokens(p.text, system) for p in pool[n_texts : 2 * n_texts]]
    todo = [c for c in conditions if c != "baseline" and c not in out]
    units = [(texts, kl_prompts, interventions[c], c) for c in todo]

    def record(i: int, value: dict[str, Any]) -> None:
        out[todo[i]] = value
        save()

    in_order((shards or Serial(runtime)).map(capability_unit, units, label="capability"), record)


def capability_unit(
    runtime: ModelRunner, texts: list[str], kl_prompts: list[list[int]], intervention: Intervention, condition: str
) -> dict[str, Any]:
    """Measure unit: :func:`capability_report` of one intervention (``condition``), as stored in ``metrics.json``."""
    return capability_report(
        runtime,
        texts,
        kl_prompts,
        lambda r: router.arm(r, intervention),
        condition=condition,
        text_source="polyrefuse:en/test/harmless (unused by train/val)",
    ).to_dict()


FALLBACK_PROBE = 32
"""Harmful train prompts per language generated to derive the fallback detector's refusal tokens."""
FALLBACK_PROBE_TOKENS = 8
"""Tokens generated per probe prompt: enough for the substring detector to see a refusal opening."""


def fallback_refusal_tokens(
    runtime: ModelRunner,
    data: PolyRefuse,
    lang: str,
    config: RunSettings,
    detector: SubstringDetector,
    *,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The refusal tokens R of the first-token detector for ``lang`` (a language ``detector`` is blind to).

    R is the union, in this order, of
      1. ``run:<source>``: the run's own refusal tokens (``--refusal-openings`` or the table of the source
         language for the model's family, as the direction was selected with);
      2. ``derived:<source>``: first tokens of the model's refusals to :data:`FALLBACK_PROBE` harmful train prompts
         of the source language (greedy, :data:`FALLBACK_PROBE_TOKENS` tokens, refusals judged by ``detector``;
         :func:`pyrefusal.stages.tokens.derive_refusal_tokens`, which falls back to the table when the model
         refused fewer than 3 of them);
      3. ``derived:<lang>``: the same on ``lang``'s own harmful train prompts when the data has them. There
         ``detector`` checks every language's markers, so a refusal written in a neighbouring covered language
         ("我不能…" to a Cantonese prompt, "Я не могу…" to a Ukrainian one) votes with its first token.

    Args:
        runtime: the run's model (no plan armed).
        data: the run's PolyRefuse copy.
        lang: the blind language.
        config: the run's settings (source language, refusal openings, seed, system prompt).
        detector: the run's substring detector.
        source: the source part (1 and 2) computed for another language, reused as is.

    Returns:
        ``{"ids": [...], "strings": [...], "sources": {name: [ids]}, "notes": {name: note}}``; ``"source"`` holds
        parts 1 and 2 (pass it back as ``source`` for the next language).
    """
    family = getattr(runtime, "family", None)
    src = config.source_lang

    def derive(code: str) -> tuple[list[int], str]:
        """First tokens of the model's refusals to ``code``'s harmful train prompts, and how they were found."""
        probe = probe_prompts(data, code, FALLBACK_PROBE, config.seed)
        toks = derive_refusal_tokens(
            runtime,
            probe,
            code,
            detector=detector,
            max_new_tokens=FALLBACK_PROBE_TOKENS,
            system=config.system_prompt,
            batch_size=runtime.n_seq_max,
        )
        return toks.ids, f"{toks.method}, {toks.n_refusals}/{toks.n_prompts} refusals. {toks.note}".strip()

    if source is None:
        run_ids = refusal_token_ids(lambda w: runtime.tokenize(w), src, config.refusal_openings or None, family)
        source = {"sources": {f"run:{src}": run_ids}, "notes": {}}
        if data.has(src, "train", "harmful"):
            source["sources"][f"derived:{src}"], source["notes"][f"derived:{src}"] = derive(src)
    parts: dict[str, list[int]] = dict(source["sources"])
    notes: dict[str, str] = dict(source["notes"])
    if lang != src and data.has(lang, "train", "harmful"):
        try:
            parts[f"derived:{lang}"], notes[f"derived:{lang}"] = derive(lang)
        except PyrefusalError:  # no refusal the markers see and no table for lang: nothing to add
            notes[f"derived:{lang}"] = (
                f"none: no first token of a refusal the substring markers see in {FALLBACK_PROBE} harmful train prompts"
            )
    ids = list(dict.fromkeys(i for part in parts.values() for i in part))
    return {
        "ids": ids,
        "strings": [runtime.detokenize([i]) for i in ids],
        "sources": parts,
        "notes": notes,
        "source": source,
    }


def measure_fallback_refusal(
    runtime: ModelRunner,
    data: PolyRefuse,
    test: Mapping[str, Mapping[str, Sequence[Prompt]]],
    blind: Sequence[str],
    interventions: Mapping[str, Intervention],
    config: RunSettings,
    detector: SubstringDetector,
    metrics: Metrics,
    log: Callable[[str], None],
) -> None:
    """The first-token detector's measurements for the languages the substring detector is blind to (issue 15).

    For each blind language with harmful test prompts: its refusal tokens R (:func:`fallback_refusal_tokens`) and,
    per condition, one forward pass over its harmful test prompts under that condition giving, per prompt, the
    greedy first token (the argmax at the first answer position: the first token of the greedy completion) and
    ``p_R``. The evaluation table turns them into per-completion verdicts "first token in R"
    (:func:`pyrefusal.method.refusal.greedy_first_token_refused`). Stored in ``metrics.fallback``:
    ``{lang: {"detector", "refusal_tokens": {"ids", "strings", "sources", "notes"}, "prompt_ids",
    "greedy_token": {condition: [token id per prompt]}, "p_refusal": {condition: [p_R per prompt]}}}``; what is
    there is reused (resume), and ``metrics`` is saved after each condition.
    """
    source: dict[str, Any] | None = None
    for lang in blind:
        prompts = test.get(lang, {}).get("harmful", [])
        if not prompts:
            continue
        rec = metrics.fallback.get(lang)
        ids_now = [p.id for p in prompts]
        if rec is None or rec.get("detector") != FIRST_TOKEN_DETECTOR or rec.get("prompt_ids") != ids_now:
            toks = fallback_refusal_tokens(runtime, data, lang, config, detector, source=source)
            source = toks.pop("source")
            rec = metrics.fallback[lang] = {
                "detector": FIRST_TOKEN_DETECTOR,
                "refusal_tokens": toks,
                "prompt_ids": ids_now,
                "greedy_token": {},
                "p_refusal": {},
            }
            metrics.save()
        log(
            f"{lang}: the {detector.name} detector is blind here; refusal rates from the first-token detector "
            f"(a completion whose first token is in R = {rec['refusal_tokens']['ids']} "
            f"{rec['refusal_tokens']['strings']}, the first tokens of the model's own refusals)"
        )
        if f"derived:{lang}" not in rec["refusal_tokens"]["sources"]:
            log(
                f"warning: {lang}: no refusal of the model was recognised in {lang}'s harmful train prompts (or it "
                f"has none), so R holds only {config.source_lang} tokens and refusals worded in {lang} are likely "
                "missed by the first-token detector too (docs/results/detector-fallback-qwen1.5b); add --judge"
            )
        toks_in = [runtime.chat_tokens(p.text, config.system_prompt) for p in prompts]
        ids = rec["refusal_tokens"]["ids"]
        greedy = rec["greedy_token"]
        for cond in config.conditions:
            if cond in rec["p_refusal"] and cond in greedy:
                continue
            router.arm(runtime, interventions[cond])
            try:
                logp = log_softmax(runtime.last_logits(toks_in))  # (n_prompts, n_vocab) float64
            finally:
                runtime.clear_plan()
            rec["p_refusal"][cond] = [float(x) for x in np.exp(logp[:, ids]).sum(axis=1)]  # p_R per prompt
            greedy[cond] = [int(t) for t in logp.argmax(axis=1)]  # the greedy completion's first token
            metrics.save()
