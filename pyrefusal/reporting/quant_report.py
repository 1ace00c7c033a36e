"""``report.md`` and figures of a ``pyrefusal quant-sweep``, from its ``quant_sweep.json`` dict."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pyrefusal.reporting.fmt import matrix_table, num, pct

__all__ = ["write_quant_report"]


def write_quant_report(results: Mapping[str, Any], out: Path) -> Path:
    """Write ``report.md``, ``quant_sweep.png`` and ``cosine_by_layer.png`` from a ``quant_sweep.json`` dict.

    Returns:
        Path of ``report.md``.
    """
    from pyrefusal.reporting import plots

    out = Path(out)
    ref = results["refusal"]
    geo = results["geometry"]
    variants = results["variants"]
    base = results["model"]["file_type"]
    matrix = ref["matrix"]
    note = results["note"][0].upper() + results["note"][1:]
    lines = [
        f"# Quantization sweep: {Path(results['model']['path']).name}",
        "",
        f"Base file type {base}. {note}. Refusal = substring detector `{ref['detector']}` on "
        f"{ref['n_test']} harmful {ref['language']} test prompts, {ref['max_new_tokens']} greedy tokens; directions "
        f"from n_train {results['config']['n_train']}, n_val {results['config']['n_val']} (paper sampling, "
        f"seed {results['config']['seed']}), selection KL <= {results['config']['kl_threshold']}"
        + (f", positions {results['config']['positions']}" if results["config"]["positions"] else "")
        + ".",
        "",
        "## Variants",
        "",
        (
            "| type | made from | MiB | bits/weight | selected (pos, layer) | KL | refusal score base -> ablated "
            f"| refusal baseline | own direction ablated | {base} direction ablated |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in variants.items():
        s = v.get("selection")
        if v["status"] == "failed":
            lines.append(f"| {name} | failed: {v['error']} | | | | | | | | |")
            continue
        sel = f"({s['position']}, {s['layer']})" if s else "none"
        score = f"{num(s['baseline_refusal_score'], '.2f')} -> {num(s['refusal_score'], '.2f')}" if s else "-"
        rates = [matrix["baseline"].get(name), matrix.get(name, {}).get(name), matrix.get(base, {}).get(name)]
        cells = " | ".join(pct(r, nan_as_dash=False) for r in rates)
        lines.append(
            f"| {name} | {v['source']} | {v['size_bytes'] / 2**20:.0f} | {v['bits_per_weight']:.2f} | {sel} | "
            f"{num(s['kl'] if s else None, '.3f')} | {score} | {cells} |"
        )
    models = [n for n in variants if n in matrix.get("baseline", {})]
    lines += [
        "",
        "## Cross-application: refusal rate (rows: direction ablated; columns: variant answering)",
        "",
        "| direction \\ variant | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for row, cells in matrix.items():
        label = "none (baseline)" if row == "baseline" else f"r({row})"
        lines.append(f"| {label} | " + " | ".join(pct(cells.get(m), nan_as_dash=False) for m in models) + " |")
    if geo.get("names"):
        dn = geo["names"]
        lines += [
            "",
            (
                f"## Cosine of the directions at the {geo['reference']} selection (position {geo['position']}, "
                f"layer {geo['layer']})"
            ),
            "",
            *matrix_table(dn, geo["cosine_at_reference"]),
            "",
            "## Cosine of the selected directions (each at its own position and layer)",
            "",
            *matrix_table(dn, geo["cosine_selected"]),
        ]
        plots.plot_cosine_by_layer(
            dn,
            np.array(geo["cosine_by_layer"], dtype=np.float64),
            out / "cosine_by_layer.png",
            position=geo["position"],
            reference=geo["reference"],
        )
    plots.plot_quant_sweep(results, out / "quant_sweep.png")
    lines += [
        "",
        "![cross-application](quant_sweep.png)",
        "",
        "![cosine by layer](cosine_by_layer.png)" if geo.get("names") else "",
        "",
        "## Files",
        "",
        "| type | storage types (tensor count) | seconds |",
        "|---|---|---|",
    ]
    for name, v in variants.items():
        kinds = ", ".join(f"{k} {n}" for k, n in v["tensor_types"].items())
        secs = ", ".join(f"{k} {t:.0f}" for k, t in v["seconds"].items())
        lines.append(f"| {name} | {kinds} | {secs} |")
    lines += [
        "",
        f"Total wall time {results.get('seconds_total', 0):.0f} s. Variant files: `{results['work_dir']}`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
