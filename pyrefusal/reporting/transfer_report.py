"""``report.md`` of a ``pyrefusal transfer`` run, from its ``transfer.json`` dict."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyrefusal.reporting.fmt import matrix_table, num, pct
from pyrefusal.stages.crossapply import CONTROL_ROW
from pyrefusal.stages.generate import wilson_interval

__all__ = ["write_transfer_report"]


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
        "| **baseline** (no intervention) | " + " | ".join(pct(tr["baseline"].get(t)) for t in targets) + " |",
    ]
    for s in sources:
        lines.append(f"| r_{s} | " + " | ".join(pct(tr["rates"][s].get(t)) for t in targets) + " |")
    if tr.get("control"):
        lines.append(
            f"| random direction (control, norm of r_{sources[0]}) | "
            + " | ".join(pct(tr["control"].get(t)) for t in targets)
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
                cells.append(f"[{pct(lo)}, {pct(hi)}]")
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
            f"| {s} | {d['position']} | {d['layer']} | {num(d['kl'], '.4f')} | "
            f"{num(d['baseline_refusal_score'], '.2f')} -> {num(d['refusal_score'], '.2f')} | "
            f"{num(d['norm'], '.2f')} | "
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
        lines += matrix_table(names, geo["selected_cosine"])
        pos, lay = geo["position"], geo["layer"]
        lines += [
            "",
            f"Cosine at the common position {pos} and the English (or first) source's layer {lay}:",
            "",
            *matrix_table(names, geo["cosine_at_layer"]),
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
