"""Count refusals on both sides' completions with one shared detector and write the side-by-side JSON.

Shared detector: ``pyrefusal.method.refusal.SubstringDetector()`` (multilingual mode, language ``en``: the
English marker list, the same detector ``pyrefusal optimize`` confirms with). heretic's own verdicts (its
marker list, empty response = refusal) are kept next to it.

Inputs: heretic.json (from heretic_wrapper.py), the pyrefusal study directory RUN/optimize (trials.jsonl,
completions.jsonl, reference.json). Usage: python score.py HERETIC_JSON RUN_DIR OUT_JSON  (main environment)
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from pyrefusal.method.refusal import SubstringDetector

heretic_path, run_dir, out_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
det = SubstringDetector()


def shared(text: str) -> bool:
    return det.judge(text, "en").refused


def pareto(points: list[dict]) -> list[dict]:
    """Points not dominated in (refusals, kl), both minimised; sorted by refusals."""
    front = [
        p
        for p in points
        if not any(
            q["refusals"] <= p["refusals"]
            and q["kl"] <= p["kl"]
            and (q["refusals"], q["kl"]) != (p["refusals"], p["kl"])
            for q in points
        )
    ]
    return sorted(front, key=lambda p: (p["refusals"], p["kl"]))


# -- heretic ----------------------------------------------------------------------------------------------
h = json.loads(heretic_path.read_text())
h_points = []
for t in h["trials"]:
    if "completions" not in t:
        continue  # an unfinished trial
    h_points.append(
        {
            "trial": t["trial"],
            "kl": t["kl"],
            "refusals": sum(shared(c["response"]) for c in t["completions"]),
            "refusals_heretic_detector": t["refusals_heretic"],
            "n": len(t["completions"]),
            "seconds_trial": t["seconds_trial"],
            "seconds_score": t["seconds_score"],
            "seconds_generate": t["seconds_generate"],
            "seconds_reset_abliterate": t["seconds_reset_abliterate"],
        }
    )
hb = h["baseline"]
heretic = {
    "baseline": {
        "refusals": sum(shared(c["response"]) for c in hb["completions"]),
        "refusals_heretic_detector": hb["refusals_heretic"],
        "n": len(hb["completions"]),
    },
    "trials": h_points,
    "pareto": pareto(h_points),
    "seconds_per_trial_mean": statistics.mean(p["seconds_trial"] for p in h_points) if h_points else None,
    "seconds_total": h.get("seconds_total"),
}

# -- pyrefusal --------------------------------------------------------------------------------------------
opt = run_dir / "optimize"
trials = [json.loads(line) for line in (opt / "trials.jsonl").read_text().splitlines() if line.strip()]
trials = [t for t in trials if t["state"] == "COMPLETE"]
by_cond: dict[str, list[dict]] = defaultdict(list)
for line in (opt / "completions.jsonl").read_text().splitlines():
    r = json.loads(line)
    if r["kind"] == "harmful":
        by_cond[r["condition"]].append(r)
p_trials = []
for t in trials:
    row = {
        "trial": t["number"],
        "kl": t["kl"],
        "first_token_refusal": t["refusal"],
        "seconds_trial": sum(t["seconds"].values()),
        "seconds": t["seconds"],
    }
    cond = [c for c in by_cond if c.split()[-1] == str(t["number"]) or c == f"trial-{t['number']}"]
    if cond:
        rows = by_cond[cond[0]]
        row.update({"confirmed_as": cond[0], "refusals": sum(shared(r["response"]) for r in rows), "n": len(rows)})
    p_trials.append(row)
confirmed = [p for p in p_trials if "refusals" in p]
pyrefusal = {
    "conditions": sorted(by_cond),
    "baseline": {
        "refusals": sum(shared(r["response"]) for r in by_cond.get("baseline", [])),
        "n": len(by_cond.get("baseline", [])),
    },
    "paper": (
        {"refusals": sum(shared(r["response"]) for r in by_cond["paper"]), "n": len(by_cond["paper"])}
        if "paper" in by_cond
        else None
    ),
    "reference": json.loads((opt / "reference.json").read_text()),
    "trials": p_trials,
    "pareto_first_token": pareto([{**p, "refusals": p["first_token_refusal"]} for p in p_trials]),
    "pareto": pareto(confirmed),
    "seconds_per_trial_mean": statistics.mean(p["seconds_trial"] for p in p_trials) if p_trials else None,
}
ratio = (
    heretic["seconds_per_trial_mean"] / pyrefusal["seconds_per_trial_mean"]
    if heretic["seconds_per_trial_mean"] and pyrefusal["seconds_per_trial_mean"]
    else None
)
out = {
    "detector": det.name,
    "heretic": heretic,
    "pyrefusal": pyrefusal,
    "ratio_mean_wall_s_per_trial_not_same_window": ratio,
}
out_path.write_text(json.dumps(out, indent=1))
print(json.dumps({k: out[k] for k in ("detector", "ratio_mean_wall_s_per_trial_not_same_window")}))
print("heretic baseline", heretic["baseline"], "mean s/trial", heretic["seconds_per_trial_mean"])
for p in h_points:
    print(
        "  heretic trial",
        p["trial"],
        "refusals",
        p["refusals"],
        "/",
        p["n"],
        "(heretic's detector",
        p["refusals_heretic_detector"],
        ") KL",
        round(p["kl"], 4),
        "s",
        round(p["seconds_trial"], 1),
    )
print(
    "pyrefusal baseline",
    pyrefusal["baseline"],
    "paper",
    pyrefusal["paper"],
    "mean s/trial",
    pyrefusal["seconds_per_trial_mean"],
)
for p in p_trials:
    print(
        "  pyrefusal trial",
        p["trial"],
        "first-token",
        round(p["first_token_refusal"], 4),
        "refusals",
        p.get("refusals"),
        "/",
        p.get("n"),
        "KL",
        round(p["kl"], 4),
        "s",
        round(p["seconds_trial"], 1),
    )
