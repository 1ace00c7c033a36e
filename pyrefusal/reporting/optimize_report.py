"""The report of ``pyrefusal optimize``: Pareto front (table and figure), per-language tables, the pick on test.

Renders the summary dict :func:`pyrefusal.studies.optimize.run_optimize` builds (no model needed):
``pareto.md`` (the front of pooled refusal vs. pooled KL, confirmations by generation, per-language objectives),
``pareto.png`` (one point per trial, the front joined, the paper's pick and the baseline marked) and
``report.md`` (``pareto.md`` plus the pick on the test split and where the time went).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure

from pyrefusal.reporting.fmt import num, pct
from pyrefusal.rundir import write_atomic

__all__ = ["pareto_figure", "write_optimize_report"]


def _ci(cell: Mapping[str, Any] | None) -> str:
    """``"12% [5%, 25%] (3/24)"`` of a ``{"k", "n", "rate", "ci"}`` cell."""
    if not cell or not cell.get("n"):
        return "-"
    lo, hi = cell["ci"]
    return f"{pct(cell['rate'])} [{pct(lo)}, {pct(hi)}] ({cell['k']}/{cell['n']})"


def _complete(trials: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [t for t in trials if t.get("state") == "COMPLETE" and "refusal" in t]


def pareto_figure(path: Path, summary: Mapping[str, Any], *, kl_threshold: float) -> None:
    """Refusal (pooled first-token probability) vs. KL: every trial, the Pareto front, the paper's pick."""
    trials = _complete(summary["trials"])
    front = set(summary.get("pareto", []))
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    xs = [max(t["kl"], 1e-6) for t in trials]
    ys = [t["refusal"] for t in trials]
    ax.scatter(xs, ys, s=18, c="#9aa5b1", label="trial")
    pts = sorted((max(t["kl"], 1e-6), t["refusal"], t["number"]) for t in trials if t["number"] in front)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", c="#1f77b4", ms=5, label="Pareto front")
        for x, y, n in pts:
            ax.annotate(f"#{n}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ref = summary["reference"]
    ax.scatter(
        [max(ref["paper"]["kl"], 1e-6)],
        [ref["paper"]["refusal"]],
        marker="*",
        s=160,
        c="#d62728",
        label=f"paper pick (pos {ref['paper']['position']}, layer {ref['paper']['layer']})",
    )
    ax.axhline(ref["baseline"]["refusal"], ls=":", c="k", lw=1, label="baseline refusal")
    ax.axvline(kl_threshold, ls="--", c="#ff7f0e", lw=1, label=f"KL bound {kl_threshold:g}")
    ax.set_xscale("log")
    ax.set_xlabel("first-token KL on harmless val prompts (pooled over languages)")
    ax.set_ylabel("refusal-token probability, harmful val (pooled)")
    ax.set_title(f"pyrefusal optimize: {len(trials)} trials, languages {', '.join(ref['languages'])}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _pareto_lines(summary: Mapping[str, Any], kl_threshold: float) -> list[str]:
    trials = {t["number"]: t for t in _complete(summary["trials"])}
    ref = summary["reference"]
    langs = list(ref["languages"])
    confirmed = summary.get("confirmed", {})
    sizes = ", ".join(f"{k}: {v[0]}+{v[1]}" for k, v in ref["n_val"].items())
    lines = [
        "# pyrefusal optimize",
        "",
        (
            f"Run `{summary['run_dir']}`; {len(trials)} complete trials; objectives on val prompts of "
            f"{', '.join(langs)} ({sizes} harmful+harmless). "
            "Refusal = mean first-token refusal-token probability on harmful prompts (pooled = mean over languages); "
            "KL = first-token KL(baseline || trial) on harmless prompts; false refusal = refusal-token probability on "
            "harmless prompts. Generation = greedy completions judged by the substring detector (95% Wilson interval)."
        ),
        "",
        "## Pareto front (refusal vs. KL)",
        "",
        (
            "| trial | refusal | worst language | KL | false refusal | generation: harmful refused | "
            "generation: harmless refused |"
        ),
        "|---|---|---|---|---|---|---|",
    ]

    def row(name: str, s: Mapping[str, Any], cond: str | None) -> str:
        worst = s.get("worst_lang")
        worst_txt = f"{worst} {num(s.get('worst_refusal'), '.4f')}" if worst else "-"
        gen = confirmed.get(cond or "", {}).get("pooled", {})
        return (
            f"| {name} | {num(s['refusal'], '.4f')} | {worst_txt} | {num(s['kl'], '.4f')} | "
            f"{num(s['false_refusal'], '.4f')} | {_ci(gen.get('harmful'))} | {_ci(gen.get('harmless'))} |"
        )

    lines.append(row("baseline", ref["baseline"], "baseline"))
    lines.append(
        row(f"paper pick (pos {ref['paper']['position']}, layer {ref['paper']['layer']})", ref["paper"], "paper")
    )
    for n in summary.get("pareto", []):
        if n in trials:
            mark = "" if trials[n]["kl"] <= kl_threshold else f" (KL > {kl_threshold:g})"
            lines.append(row(f"#{n}{mark}", trials[n], f"trial-{n}"))
    lines += ["", "![Pareto front](pareto.png)", "", "## Per language (refusal / KL / false refusal)", ""]
    lines += ["| trial | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs)]

    def per(name: str, s: Mapping[str, Any]) -> str:
        cells = []
        for lang in langs:
            v = s.get("per_language", {}).get(lang)
            cells.append(
                "-"
                if v is None
                else f"{num(v['refusal'], '.3f')} / {num(v['kl'], '.3f')} / {num(v['false_refusal'], '.3f')}"
            )
        return f"| {name} | " + " | ".join(cells) + " |"

    lines.append(per("baseline", ref["baseline"]))
    lines.append(per("paper pick", ref["paper"]))
    lines += [per(f"#{n}", trials[n]) for n in summary.get("pareto", []) if n in trials]
    lines += ["", "## Parameters of the Pareto trials", "", "| trial | parameters |", "|---|---|"]
    for n in summary.get("pareto", []):
        if n in trials:
            params = ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trials[n]["params"].items()
            )
            lines.append(f"| #{n} | {params} |")
    return lines


def _pick_lines(pick: Mapping[str, Any]) -> list[str]:
    first, gen = pick["first_token"], pick["generation"]
    lines = [
        f"## The pick (trial {pick['trial']}) on the test split",
        "",
        (
            f"{pick['n_test']} test prompts per kind and language ({', '.join(pick['languages'])}), never seen by the "
            "search; the paper's pick is the run's single direction at full weight (hook). A language without a "
            "harmless test file (PolyRefuse has no zh one) counts in refusal only."
        ),
        "",
        (
            "| condition | first-token refusal | KL | false refusal | harmful refused (generation) | "
            "harmless refused (generation) |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for cond in ("baseline", "paper", "pick"):
        s, g = first[cond], gen[cond].get("pooled", {})
        lines.append(
            f"| {cond} | {num(s['refusal'], '.4f')} | {num(s['kl'], '.4f')} | {num(s['false_refusal'], '.4f')} | "
            f"{_ci(g.get('harmful'))} | {_ci(g.get('harmless'))} |"
        )
    lines += ["", "Harmful prompts refused by generation, per language:", ""]
    langs = pick["languages"]
    lines += ["| condition | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs)]
    for cond in ("baseline", "paper", "pick"):
        lines.append(f"| {cond} | " + " | ".join(_ci(gen[cond].get(lang, {}).get("harmful")) for lang in langs) + " |")
    return lines


def _generation_totals(summary: Mapping[str, Any]) -> dict[str, int]:
    """Completions, generated tokens and early stops over every generation of the summary (pooled cells)."""
    tables = list(summary.get("confirmed", {}).values())
    tables += list((summary.get("pick") or {}).get("generation", {}).values())
    out = {"n": 0, "tokens": 0, "stopped": 0}
    for table in tables:
        for cell in table.get("pooled", {}).values():
            if "tokens" in cell:
                for key in out:
                    out[key] += int(cell[key])
    return out


def write_optimize_report(out: Path, summary: Mapping[str, Any], *, kl_threshold: float) -> None:
    """Write ``pareto.md``, ``pareto.png`` and ``report.md`` into ``out``."""
    lines = _pareto_lines(summary, kl_threshold)
    write_atomic(out / "pareto.md", "\n".join(lines) + "\n")
    pareto_figure(out / "pareto.png", summary, kl_threshold=kl_threshold)
    report = list(lines)
    if summary.get("pick"):
        report += ["", *_pick_lines(summary["pick"])]
    timings = summary.get("timings", {})
    trials = _complete(summary["trials"])
    parts: dict[str, float] = {}
    for t in trials:
        for k, v in t.get("seconds", {}).items():
            parts[k] = parts.get(k, 0.0) + v
    report += ["", "## Time", ""]
    if trials and parts:
        report.append(
            "Per trial (mean over complete trials): "
            + ", ".join(f"{k} {v / len(trials):.2f}s" for k, v in parts.items())
            + "."
        )
    report += [f"- {k}: {v:.1f}s" for k, v in timings.items() if isinstance(v, float) and not math.isnan(v)]
    gen = _generation_totals(summary)
    if gen["n"]:
        report.append(
            f"- generation (confirmation and test): {gen['n']} completions, {gen['tokens']} tokens; "
            f"{gen['stopped']} stopped early once the detector read a refusal (finish_reason refusal_detected)"
        )
    write_atomic(out / "report.md", "\n".join(report) + "\n")
