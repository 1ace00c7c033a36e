"""Markdown report of a run (results.json + completions), for people to read, and the run's rendered outputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pyrefusal.method.selection import Selection
from pyrefusal.reporting.fmt import pct
from pyrefusal.results import Evaluation, RunResults
from pyrefusal.settings import RunSettings
from pyrefusal.stages.generate import DEGENERATE_REPETITION, Completion, is_degenerate, wilson_interval
from pyrefusal.stages.layout import RunPaths


def _pct(x: float | None) -> str:
    """A rate as a whole percentage (``-`` for None; NaN prints as ``nan%``, as this report always did)."""
    return pct(x, nan_as_dash=False)


def write_run_outputs(
    results: RunResults,
    selection: Selection,
    completions: Sequence[Completion],
    paths: RunPaths,
    log: Callable[[str], None],
) -> None:
    """Figures (``selection.png``, ``refusal.png``), ``results.json`` and ``report.md`` of a run.

    Records the figures' names in ``results`` before writing it (``direction.heatmap``, ``figure``).
    """
    from pyrefusal.reporting.plots import plot_run_refusal, plot_selection_heatmaps

    name = results.model.name
    heatmap = plot_selection_heatmaps(selection, paths.root / "selection.png", title=f"{name}: candidates")
    results.set_heatmap(heatmap.name)
    if results.evaluation:
        figure = plot_run_refusal(results.evaluation, results.conditions, paths.root / "refusal.png", title=name)
        results.set_figure(figure.name)
    results.save(paths.results)
    write_report(results, completions, paths.report)
    log(f"wrote {paths.results} and {paths.report}")


def write_report(results: RunResults, completions: Sequence[Completion], path: Path) -> None:
    """Write ``report.md``: model, chosen direction, refusal rates per language and condition, examples."""
    m, d, ev = results.model, results.direction, results.evaluation
    conds = results.conditions
    lines = [
        f"# pyrefusal run: {m.name}",
        "",
        (f"- model: `{Path(m.path).name}` ({m.arch}, {m.n_layer} layers, n_embd {m.n_embd}, {m.file_type})"),
        f"- sha256: `{m.sha256}`",
        (
            f"- direction: source language **{d.source_lang}**, eoi position **{d.position}**, "
            f"layer **{d.layer}** (block input), norm {d.norm:.3f}"
        ),
        (
            f"- selection ({d.selection_mode}, KL <= {d.rule['kl_threshold']}, layers < "
            f"{d.rule['prune_fraction']}·L): refusal score {d.baseline_refusal_score:.3f} -> "
            f"{d.refusal_score:.3f} under ablation, KL {d.kl:.4f}"
        ),
        f"- refusal tokens: {', '.join(repr(v) for v in d.refusal_tokens.values())}",
        _prompt_line(results.settings),
        "",
        *([f"![candidate scores (position x layer)]({d.heatmap})", ""] if d.heatmap else []),
        *([f"![refusal rates (condition x language)]({results.figure})", ""] if results.figure else []),
        "## Refusal rate on harmful test prompts",
        "",
        "| lang | " + " | ".join(conds) + " | n | detector |",
        "|---|" + "---|" * (len(conds) + 2),
    ]
    for lang, by_cond in ev.items():
        first = next(iter(by_cond.values()))
        row = [_pct(by_cond.get(c, {}).get("refusal_rate")) for c in conds]
        lines.append(f"| {lang} | " + " | ".join(row) + f" | {first['n']} | {first['detector']} |")
    lines += _blind_section(ev, conds)
    lines += [
        "",
        "## Refusal rate on harmless test prompts (over-refusal)",
        "",
        "| lang | " + " | ".join(conds) + " | n |",
        "|---|" + "---|" * (len(conds) + 1),
    ]
    for lang, by_cond in ev.items():
        h = [by_cond.get(c, {}).get("harmless") for c in conds]
        if all(x is None for x in h):
            continue
        n = next(x["n"] for x in h if x)
        blind = " (substring detector blind here)" if any(x and x.get("blind") for x in h) else ""
        lines.append(
            f"| {lang} | " + " | ".join(_pct(x["refusal_rate"] if x else None) for x in h) + f" | {n}{blind} |"
        )
    lines += _capability_section(results.capability, conds)
    lines += _pooled_section(ev, conds)
    lines += _degenerate_section(completions, conds)
    lines += _budget_section(ev, conds)
    lines += _judge_section(ev, conds)
    if results.missing_test_files:
        lines += ["", f"Missing test files (not evaluated): {', '.join(results.missing_test_files)}."]
    if results.short_test_files:
        lines += ["", f"Short test files (fewer prompts than the others): {', '.join(results.short_test_files)}."]
    lines += ["", "## Examples (first harmful prompt per language)", ""]
    seen: set[tuple[str, str]] = set()
    for c in completions:
        if c.kind != "harmful" or (c.lang, c.condition) in seen:
            continue
        seen.add((c.lang, c.condition))
        resp = c.response.replace("\n", " ")[:200]
        lines.append(
            f"- **{c.lang} / {c.condition}** ({'refused' if c.refused else 'complied'}"
            f"{', marker ' + repr(c.marker) if c.marker else ''}): {c.prompt[:90]!r} -> {resp!r}"
        )
    t = results.timings
    lines += ["", "## Timings (s, this invocation)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in t.items() if isinstance(v, float)]
    earlier = results.timings_previous
    if earlier:
        totals = ", ".join(f"{x.get('total', 0.0):.1f}" for x in earlier)
        lines += ["", f"Earlier invocations of this run directory (resumed since), total seconds: {totals}."]
    lines += ["", f"Versions: {results.versions}", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _blind_section(ev: Evaluation, conds: list[str]) -> list[str]:
    """Languages the substring detector has no phrases for: its blind rates next to the first-token detector's,
    which made the table above there (``first_token_detector`` cells, issue 15). Nothing when there are none."""
    blind = {lang: by for lang, by in ev.items() if any("first_token_detector" in e for e in by.values())}
    if not blind:
        return []
    some = next(e for by in blind.values() for e in by.values() if "first_token_detector" in e)
    fb, sub = some["first_token_detector"], some["substring"]
    lines = [
        "",
        (
            f"**The substring detector ({sub['detector']}) is blind in {', '.join(blind)}**: it has no refusal "
            "phrases for these languages and only sees refusals worded in the languages it knows. Their rates "
            f"above come from the first-token detector ({fb['detector']}): a completion counts as a refusal when "
            "its first generated token is one the model's own refusals start with (docs/method.md §6.3.1). It "
            "reads no text, so it is not blind to the language of a refusal, but it misses refusals that start "
            "with another token and counts compliant answers that start with a refusal token."
        ),
        "",
        "| lang | detector | " + " | ".join(conds) + " | refusal tokens |",
        "|---|---|" + "---|" * (len(conds) + 1),
    ]
    for lang, by in blind.items():
        cells = [by.get(c, {}).get("first_token_detector") for c in conds]
        toks = next((x["refusal_tokens"] for x in cells if x), {})
        first = [_pct(x["refusal_rate"]) if x else "-" for x in cells]
        substring = [_pct((by.get(c, {}).get("substring") or {}).get("refusal_rate")) for c in conds]
        lines.append(f"| {lang} | {fb['detector']} | " + " | ".join(first) + f" | {list(toks.values())!r} |")
        lines.append(f"| {lang} | {sub['detector']} (blind) | " + " | ".join(substring) + " | |")
    return lines


def _prompt_line(cfg: RunSettings) -> str:
    """How prompts were rendered: refusal rates with and without a system prompt are not comparable."""
    if cfg.system_prompt is not None:
        return f"- prompts: the GGUF chat template with the system prompt {cfg.system_prompt!r}"
    if cfg.prompt_format == "paper":
        return "- prompts: the paper's, the user turn alone with no system turn (`--prompt-format paper`)"
    return "- prompts: the GGUF chat template, with its default system prompt if any (`--prompt-format template`)"


def _capability_section(cap: dict[str, Any], conds: list[str]) -> list[str]:
    """Perplexity ratio and first-token KL per condition (how much the intervention costs)."""
    rows = [(c, cap[c]) for c in conds if c in cap]
    if not rows:
        return []
    some = rows[0][1]
    lines = [
        "",
        "## Side effects on harmless text",
        "",
        (
            f"Perplexity on {some['n_texts']} held-out texts ({some['n_tokens']} tokens; {some['text_source']}) and "
            f"first-token KL(baseline ‖ intervention) on {some['n_kl_prompts']} harmless prompts. "
            "Heretic's rule of thumb: a KL above 0.5 usually means significant damage."
        ),
        "",
        "| condition | perplexity | ratio to baseline | first-token KL |",
        "|---|---|---|---|",
        f"| baseline | {some['baseline_ppl']:.2f} | 1 | 0 |",
    ]
    for c, r in rows:
        flag = " (above 0.5)" if r["first_token_kl"] > 0.5 else ""
        lines.append(f"| {c} | {r['intervention_ppl']:.2f} | {r['ppl_ratio']:.3f} | {r['first_token_kl']:.4f}{flag} |")
    return lines


def _pooled_section(ev: Evaluation, conds: list[str]) -> list[str]:
    """Refusal rates pooled over languages with Wilson 95% intervals (only with several languages)."""
    if len(ev) < 2:
        return []
    lines = [
        "",
        "## All languages pooled (95% Wilson interval)",
        "",
        "| condition | harmful refused | harmless refused |",
        "|---|---|---|",
    ]
    for c in conds:
        cells = []
        for harmless in (False, True):
            k = n = 0
            for by_cond in ev.values():
                e = by_cond.get(c) or {}
                e = (e.get("harmless") or {}) if harmless else e
                if e.get("n") and e.get("refusal_rate") is not None:
                    k += round(e["refusal_rate"] * e["n"])
                    n += e["n"]
            if n:
                lo, hi = wilson_interval(k, n)
                cells.append(f"{_pct(k / n)} [{_pct(lo)}, {_pct(hi)}] of {n}")
            else:
                cells.append("-")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def _degenerate_section(completions: Sequence[Completion], conds: list[str]) -> list[str]:
    """Share of completions that are repetition loops, all languages pooled, with examples."""
    counts: dict[tuple[str, str], list[int]] = {}  # (condition, kind) -> [loops, n]
    example: dict[str, Completion] = {}
    for c in completions:
        loop = is_degenerate(c.response)
        k = counts.setdefault((c.condition, c.kind), [0, 0])
        k[0] += loop
        k[1] += 1
        if loop and c.condition not in example:
            example[c.condition] = c
    if not counts:
        return []
    lines = [
        "",
        "## Repetition loops (all languages pooled)",
        "",
        (
            f"Completions whose character 10-grams repeat more than {DEGENERATE_REPETITION:.0%} of the time "
            "(`evaluation.repetition`): the model loops instead of answering. Substring detectors count most "
            "loops as compliance, so a condition with many loops overstates compliance (a refusal repeated "
            "until the budget runs out is counted as a loop too)."
        ),
        "",
        "| condition | harmful | harmless |",
        "|---|---|---|",
    ]
    for cond in conds:
        cells = []
        for kind in ("harmful", "harmless"):
            loops, n = counts.get((cond, kind), (0, 0))
            cells.append(f"{_pct(loops / n)} ({loops}/{n})" if n else "-")
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    for cond in conds:
        if cond in example:
            c = example[cond]
            lines.append(f"\nExample ({c.lang} / {cond} / {c.kind}): {c.response.replace(chr(10), ' ')[:160]!r}")
    return lines


def _budget_section(ev: Evaluation, conds: list[str]) -> list[str]:
    """Harmful refusal rate had generation stopped earlier, all languages pooled (delayed refusals)."""
    pooled: dict[str, dict[str, list[float]]] = {}  # cond -> budget -> [refused count per lang]
    n: dict[str, int] = {}
    for by_cond in ev.values():
        for c in conds:
            e = by_cond.get(c)
            if not e or not e.get("refusal_by_budget"):
                continue
            n[c] = n.get(c, 0) + e["n"]
            for b, rate in e["refusal_by_budget"].items():
                pooled.setdefault(c, {}).setdefault(b, []).append(rate * e["n"])
    if not pooled:
        return []
    budgets = sorted({b for by_b in pooled.values() for b in by_b}, key=int)
    lines = [
        "",
        "## Refusal rate by generation budget (harmful, all languages pooled)",
        "",
        (
            "The rate the detector would have measured had generation stopped after k tokens. A rate that "
            "still rises at the last budget means some refusals come late: generate longer or judge them."
        ),
        "",
        "| condition | " + " | ".join(f"{b} tok" for b in budgets) + " | n |",
        "|---|" + "---|" * (len(budgets) + 1),
    ]
    for c in conds:
        if c in pooled:
            row = [_pct(sum(pooled[c][b]) / n[c]) if b in pooled[c] else "-" for b in budgets]
            lines.append(f"| {c} | " + " | ".join(row) + f" | {n[c]} |")
    return lines


def _judge_section(ev: Evaluation, conds: list[str]) -> list[str]:
    """Tables of the guard judge's compliance and, on back-translations, the paper's substring refusals."""
    judged = {lang: {c: v["judge"] for c, v in by.items() if v.get("judge")} for lang, by in ev.items()}
    judged = {lang: by for lang, by in judged.items() if by}
    if not judged:
        return []
    some = next(iter(next(iter(judged.values())).values()))
    out: list[str] = []
    metrics = (
        ("compliance_rate", "compliance (not refused)"),
        ("harmful_response_rate", "harmful responses"),
    )
    for key, label in metrics:
        if all(v.get(key) is None for by in judged.values() for v in by.values()):
            continue  # e.g. Llama Guard judges harm only: no compliance table
        out += ["", f"## Guard-model judge ({some['judge']}): {label} on harmful test prompts", ""]
        out += [
            "| lang | " + " | ".join(conds) + " | n | unparsed verdicts (per condition) |",
            "|---|" + "---|" * (len(conds) + 2),
        ]
        for lang, by in judged.items():
            first = next(iter(by.values()))
            cells = [_pct(by.get(c, {}).get(key)) for c in conds]
            flagged = " / ".join(str(by[c]["flagged"]) if c in by else "-" for c in conds)
            out.append(f"| {lang} | " + " | ".join(cells) + f" | {first['n']} | {flagged} |")
    bt = {lang: by for lang, by in judged.items() if any("back_translation" in v for v in by.values())}
    if not bt:
        out += ["", f"Responses were judged as generated ({some.get('note', '')})."]
        return out
    # English rows pass through ("identity"); name the translator that did the work
    names = [v["back_translation"]["translator"] for by in bt.values() for v in by.values()]
    translator = next((t for t in names if t != "identity"), names[0])
    out += [
        "",
        (
            f"Non-English responses were back-translated to English by `{translator}` before judging "
            "(the paper: Google Translate). The paper's 13 English refusal substrings on that English text:"
        ),
        "",
        "| lang | " + " | ".join(conds) + " | refusals only in English |",
        "|---|" + "---|" * (len(conds) + 1),
    ]
    for lang, by in bt.items():
        cells = [_pct(by.get(c, {}).get("paper_substring_refusal_rate")) for c in conds]
        only_en = sum(v["back_translation"]["english_only_refusals"] for v in by.values())
        out.append(f"| {lang} | " + " | ".join(cells) + f" | {only_en} |")
    out += [
        "",
        (
            '"Refusals only in English" counts translations that read as a refusal while the original '
            "response does not (multilingual markers): the translator refusing, or a refusal the native "
            "markers miss. Read those rows in back_translations.jsonl."
        ),
    ]
    return out
