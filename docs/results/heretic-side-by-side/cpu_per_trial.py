"""CPU and wall seconds per trial from monitor.py samples: the intervals between consecutive trial boundaries.

heretic's boundaries are trial starts ("Running trial N of M") and the end of the study; pyrefusal's are trial
ends ("trial N (k/M): ..."). Only whole intervals between two boundaries are counted. Each interval carries
its start/end (UTC) and the mean 1-minute load average, so intervals of the two tools that ran at the same
time can be compared. Usage: python cpu_per_trial.py OUT.json NAME=MONITOR.jsonl [NAME=MONITOR.jsonl ...]
"""

import itertools
import json
import statistics
import sys
import time


def utc(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t))


def intervals(path: str) -> dict:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    edges = [row for prev, row in itertools.pairwise(rows) if row["boundaries"] > prev["boundaries"]]
    per = []
    for a, b in itertools.pairwise(edges):
        inside = [r["load1"] for r in rows if a["t"] <= r["t"] <= b["t"]]
        per.append(
            {
                "start_utc": utc(a["t"]),
                "end_utc": utc(b["t"]),
                "wall_s": round(b["t"] - a["t"], 1),
                "cpu_s": round(b["cpu_s"] - a["cpu_s"], 1),
                "load1_mean": round(statistics.mean(inside), 2),
            }
        )
    out: dict = {"intervals": per}
    if per:
        out["wall_s_mean"] = round(statistics.mean(p["wall_s"] for p in per), 1)
        out["cpu_s_mean"] = round(statistics.mean(p["cpu_s"] for p in per), 1)
    return out


res = {}
for arg in sys.argv[2:]:
    name, path = arg.split("=", 1)
    res[name] = intervals(path)
with open(sys.argv[1], "w") as f:
    json.dump(res, f, indent=1)
for name, r in res.items():
    print(name, {k: v for k, v in r.items() if k != "intervals"})
    for p in r["intervals"]:
        print("   ", p)
