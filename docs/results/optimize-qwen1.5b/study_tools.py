"""Helpers of this folder's scripts (run.sh, run-20.sh, run-20-n12.sh, run-100.sh).

python study_tools.py best TRIALS_JSONL (--max-kl X | --half REFERENCE_JSON)
    print the trial with the least pooled val refusal among complete trials with val KL <= the bound (else the
    trial with the least KL); --half: half the paper's pick's val KL in REFERENCE_JSON (`optimize --pick best`
    applies the same rule).
python study_tools.py copy SRC_JSONL DST_JSONL CONDITION [CONDITION ...]
    append SRC's completions of those conditions on test prompts that DST does not hold yet (the baseline and
    the paper's pick are generated once and shared between studies on the same test prompts).
"""

from __future__ import annotations

import argparse
import json
import os


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def best(trials: str, max_kl: float | None, half: str | None) -> int:
    rows = [r for r in _jsonl(trials) if r["state"] == "COMPLETE"]
    if max_kl is None:
        with open(half) as f:
            max_kl = json.load(f)["paper"]["kl"] / 2
    ok = [r for r in rows if r["kl"] <= max_kl]
    return min(ok, key=lambda r: r["refusal"])["number"] if ok else min(rows, key=lambda r: r["kl"])["number"]


def copy(src: str, dst: str, conditions: list[str]) -> None:
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    have = {(r["prompt_id"], r["condition"]) for r in _jsonl(dst)} if os.path.exists(dst) else set()
    with open(dst, "a") as out:
        for r in _jsonl(src):
            key = (r["prompt_id"], r["condition"])
            if r["condition"] in conditions and "/test/" in r["prompt_id"] and key not in have:
                out.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("best")
    b.add_argument("trials")
    bound = b.add_mutually_exclusive_group(required=True)
    bound.add_argument("--max-kl", type=float)
    bound.add_argument("--half", metavar="REFERENCE_JSON")
    c = sub.add_parser("copy")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("conditions", nargs="+")
    args = ap.parse_args()
    if args.cmd == "best":
        print(best(args.trials, args.max_kl, args.half))
    else:
        copy(args.src, args.dst, args.conditions)


if __name__ == "__main__":
    main()
