"""Print the README numbers of this run (python summarize.py): the Japanese direction in 14 languages,
next to the English direction of ../universality-qwen1.5b (same model, test rows, budget and seed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

here = Path(__file__).parent
en_dir = here.parent / "universality-qwen1.5b"
res = json.loads((here / "results.json").read_text())
en = json.loads((en_dir / "results.json").read_text())
ev, ev_en = res["evaluation"], en["evaluation"]


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def harmless(e: dict, cond: str) -> float | None:
    h = e.get(cond, {}).get("harmless")
    return h["refusal_rate"] if h else None


print(
    "| lang | harmful: baseline | ablation (r_ja) | harm_ablation (r_ja) | ablation (r_en) | "
    "harmless: baseline | harm_ablation (r_ja) |"
)
print("|---|---|---|---|---|---|---|")
for lang, by in ev.items():
    print(
        f"| {lang} | {pct(by['baseline']['refusal_rate'])} | {pct(by['ablation']['refusal_rate'])} | "
        f"{pct(by['harm_ablation']['refusal_rate'])} | {pct(ev_en[lang]['ablation']['refusal_rate'])} | "
        f"{pct(harmless(by, 'baseline'))} | {pct(harmless(by, 'harm_ablation'))} |"
    )

print()
for cond in ("baseline", "ablation", "harm_ablation"):
    rows = [by[cond] for by in ev.values()]
    k = sum(round(r["refusal_rate"] * r["n"]) for r in rows)
    n = sum(r["n"] for r in rows)
    loops = sum(round((r.get("degenerate_rate") or 0) * r["n"]) for r in rows)
    print(f"{cond}: pooled harmful refusal {k}/{n} = {pct(k / n)}; loops {loops}/{n}")


# the two runs' baselines are the same generations (same prompts, batches and greedy decoding)
def completions(d: Path) -> dict[tuple[str, str], str]:
    rows = [json.loads(x) for x in (d / "completions.jsonl").read_text().splitlines() if x.strip()]
    return {(r["prompt_id"], r["kind"]): r["response"] for r in rows if r["condition"] == "baseline"}


a, b = completions(here), completions(en_dir)
same = sum(a[k] == b.get(k) for k in a)
print(f"baseline completions identical to the English-direction run: {same}/{len(a)}")

# geometry: r_ja and r_en at the same (position, layer)
c_ja = np.load(here / "candidates.npy")  # (n_positions, n_layers, n_embd)
c_en = np.load(en_dir / "candidates.npy")
for pos, layer in (
    (res["direction"]["position"], res["direction"]["layer"]),
    (en["direction"]["position"], en["direction"]["layer"]),
):
    i = [-5, -4, -3, -2, -1].index(pos)
    x, y = c_ja[i, layer], c_en[i, layer]
    print(f"cos(r_ja, r_en) at (pos {pos}, layer {layer}): {float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)):.3f}")
print(
    "capability:",
    {
        c: {k: round(v, 4) for k, v in r.items() if k in ("ppl_ratio", "first_token_kl")}
        for c, r in res["capability"].items()
    },
)
print(
    "direction:",
    {k: res["direction"][k] for k in ("position", "layer", "kl", "refusal_score", "baseline_refusal_score")},
)
print("refusal tokens:", res["direction"]["refusal_tokens"])
print("timings:", {k: round(v) for k, v in res["timings"].items() if isinstance(v, float)})
