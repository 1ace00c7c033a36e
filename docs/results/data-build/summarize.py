"""Summarize the builds in this directory: back-translation similarity and flags per language, and for
German the trigram similarity to the released (Google) translation of the same rows.

Run from this directory after run.sh: `python summarize.py [RELEASED_DE_JSON]` (default: the
release's harmless_test_translated_de.json in ../../../../shared/polyrefuse). Writes summary.md.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from pyrefusal.data.build import similarity

HERE = Path(__file__).parent
DEFAULT_RELEASED = HERE / "../../../../shared/polyrefuse/harmless_test_translated_de.json"
released = Path(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_RELEASED)
lines = ["# `pyrefusal data build` with Qwen2.5-Coder-1.5B-Instruct as the translator", ""]
lines += [
    "First 48 rows of en harmless_test, `run.sh` (2 CPU cores, about 100 s per language with the",
    "back-translation). Back-translation similarity: character trigram similarity of the back-translation",
    "to the English source (rows below 0.5 are flagged).",
    "",
]
lines += ["| lang | rows | mean back-translation similarity | flagged | similarity to the Google translation |"]
lines += ["|---|---|---|---|---|"]
examples = []
for lang in ("zh", "de"):
    rows = json.loads((HERE / f"harmless_test_translated_{lang}.json").read_text())
    side = json.loads((HERE / f"harmless_test_translated_{lang}.build.json").read_text())
    sims = [r["similarity"] for r in side["rows"]]
    vs_ref = "- (not in the release)"
    if lang == "de":
        ref = {r["instruction"]: r["instruction_translated"] for r in json.loads(released.read_text())}
        s = [similarity(r["instruction_translated"], ref[r["instruction"]]) for r in rows if r["instruction"] in ref]
        vs_ref = f"mean {statistics.mean(s):.2f}, median {statistics.median(s):.2f} (n={len(s)})"
    lines.append(
        f"| {lang} | {len(rows)} | {statistics.mean(sims):.2f} | {len(side['flagged'])}/{len(rows)} | {vs_ref} |"
    )
    for r, sr in list(zip(rows, side["rows"], strict=True))[:3]:
        examples.append(
            f"- {lang}: {r['instruction']!r} -> {r['instruction_translated']!r} "
            f"(back: {sr['back_translation']!r}, {sr['similarity']:.2f})"
        )
lines += ["", "Examples (first rows):", "", *examples, ""]
lines += [
    "The threshold flags many rows that are correct but paraphrased (trigram similarity is strict across a",
    "round trip); the flags are a list to review, not a verdict. Use a stronger multilingual model for data",
    "that matters; the 1.5B coder model is the largest one available offline here.",
    "",
]
(HERE / "summary.md").write_text("\n".join(lines), encoding="utf-8")
print("\n".join(lines))
