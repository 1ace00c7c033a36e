"""Print the README comparison (python compare.py): the paper's prompts (no system turn, this directory)
against the GGUF template with Qwen's default system prompt (../run-qwen1.5b), same everything else."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

here = Path(__file__).parent
tpl_dir = here.parent / "run-qwen1.5b"
paper, tpl = (json.loads((d / "results.json").read_text()) for d in (here, tpl_dir))


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


conds = paper["config"]["conditions"]
print("| prompt | condition | " + " | ".join(paper["evaluation"]) + " | first-token refusal prob. (en) |")
print("|---|---|" + "---|" * (len(paper["evaluation"]) + 1))
for label, res in (("template (default system prompt)", tpl), ("paper (no system turn)", paper)):
    for c in conds:
        cells = [pct(res["evaluation"][lang][c]["refusal_rate"]) for lang in paper["evaluation"]]
        ft = res["evaluation"]["en"][c]["first_token_refusal_prob"]
        print(f"| {label} | {c} | " + " | ".join(cells) + f" | {ft:.3f} |")
print()
for label, res in (("template", tpl), ("paper", paper)):
    d = res["direction"]
    cap = {c: (round(r["ppl_ratio"], 3), round(r["first_token_kl"], 4)) for c, r in res["capability"].items()}
    print(
        f"{label}: pick (pos {d['position']}, layer {d['layer']}), KL {d['kl']:.4f}, refusal score "
        f"{d['baseline_refusal_score']:.3f} -> {d['refusal_score']:.3f}; kept train prompts "
        f"{len(res['prompts']['harmful_train'])} harmful / {len(res['prompts']['harmless_train'])} harmless; "
        f"capability (ppl ratio, KL) {cap}"
    )
a, b = np.load(here / "direction.npy"), np.load(tpl_dir / "direction.npy")
print(f"cos(direction_paper, direction_template) = {float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)):.3f}")
print("timings:", {k: round(v) for k, v in paper["timings"].items() if isinstance(v, float)})
