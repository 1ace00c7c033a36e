"""Print the README table of this run from results.json (python summarize.py)."""

from __future__ import annotations

import json
from pathlib import Path

here = Path(__file__).parent
res = json.loads((here / "results.json").read_text())
ev = res["evaluation"]


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def harmless(lang: str, cond: str) -> float | None:
    h = ev[lang].get(cond, {}).get("harmless")
    return h["refusal_rate"] if h else None


print(
    "| lang | harmful: baseline | ablation (r_en) | random direction | harmless: baseline | induce (+r_en) "
    "| first-token refusal prob., baseline → ablation |"
)
print("|---|---|---|---|---|---|---|")
for lang, by in ev.items():
    ft = [by[c]["first_token_refusal_prob"] for c in ("baseline", "ablation")]
    print(
        f"| {lang} | {pct(by['baseline']['refusal_rate'])} | {pct(by['ablation']['refusal_rate'])} | "
        f"{pct(by['random_ablation']['refusal_rate'])} | {pct(harmless(lang, 'baseline'))} | "
        f"{pct(harmless(lang, 'induce'))} | {ft[0]:.3f} → {ft[1]:.4f} |"
    )

print()
for cond in ("baseline", "ablation", "induce", "random_ablation"):
    rows = [by[cond] for by in ev.values()]
    n = sum(r["n"] for r in rows)
    by_budget = {b: sum(r["refusal_by_budget"][b] * r["n"] for r in rows) / n for b in rows[0]["refusal_by_budget"]}
    print(cond, "harmful refusal by budget:", {b: pct(v) for b, v in by_budget.items()})
print()
print(
    "capability:",
    {
        c: {k: round(v, 4) for k, v in r.items() if k in ("ppl_ratio", "first_token_kl")}
        for c, r in res["capability"].items()
    },
)
print("direction:", {k: res["direction"][k] for k in ("position", "layer", "kl")})
print("timings:", {k: round(v) for k, v in res["timings"].items() if isinstance(v, float)})
