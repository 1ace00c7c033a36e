"""compare.md: the multilingual and the English-only study's picks, the paper's pick and the baseline on the same
test prompts (from both studies' pick_test.json and trials.jsonl).

Usage: python summarize.py HERE [MULTI_DIR EN_DIR OUT_NAME] (default: run run-en compare.md)"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(cell: dict | None) -> str:
    if not cell or not cell.get("n"):
        return "-"
    lo, hi = cell["ci"]
    return f"{100 * cell['rate']:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}] ({cell['k']}/{cell['n']})"


def main(here: Path, m_dir: str = "run", e_dir: str = "run-en", out_name: str = "compare.md") -> None:
    multi = json.loads((here / m_dir / "pick_test.json").read_text())
    en = json.loads((here / e_dir / "pick_test.json").read_text())
    trials = {
        d: [json.loads(x) for x in (here / d / "trials.jsonl").read_text().splitlines() if x.strip()]
        for d in (m_dir, e_dir)
    }
    complete = {d: [t for t in rows if t["state"] == "COMPLETE"] for d, rows in trials.items()}
    assert multi["languages"] == en["languages"] and multi["n_test"] == en["n_test"], "not the same test split"
    langs = multi["languages"]
    cols = [
        ("baseline", multi, "baseline"),
        ("paper's pick", multi, "paper"),
        (f"multilingual pick #{multi['trial']}", multi, "pick"),
        (f"English-only pick #{en['trial']}", en, "pick"),
    ]
    for c in ("baseline", "paper"):  # the same completions in both studies (copied from the run)
        assert multi["generation"][c]["pooled"] == en["generation"][c]["pooled"], c
    out = [
        "# Multilingual vs. English-only optimize on Qwen2.5-Coder-1.5B-Instruct Q4_K_M: the test split",
        "",
        (
            f"{multi['n_test']} test prompts per kind and language ({', '.join(langs)}; zh has no harmless test file), "
            "never seen by either search. Generation: greedy, 32 tokens, multilingual substring detector, 95% Wilson "
            "intervals; pooled = all prompts together. First-token: refusal-token probability on harmful prompts and "
            "KL(baseline || condition) on harmless prompts, means over languages."
        ),
        "",
        (
            "| condition | val: refusal / KL (first token) | test: first-token refusal | test: first-token KL | "
            "test: harmful refused | test: harmless refused |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for name, src, cond in cols:
        ft, gen = src["first_token"][cond], src["generation"][cond]["pooled"]
        val = "-"
        if cond == "pick":
            d = m_dir if src is multi else e_dir
            t = next(t for t in complete[d] if t["number"] == src["trial"])
            val = f"{t['refusal']:.4f} / {t['kl']:.4f}"
        out.append(
            f"| {name} | {val} | {ft['refusal']:.4f} | {ft['kl']:.4f} | {pct(gen.get('harmful'))} | "
            f"{pct(gen.get('harmless'))} |"
        )
    out += ["", "Harmful test prompts refused by generation, per language:", ""]
    out += ["| language | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for lang in langs:
        out.append(
            f"| {lang} | " + " | ".join(pct(s["generation"][c].get(lang, {}).get("harmful")) for _, s, c in cols) + " |"
        )
    out += [
        "",
        "First-token refusal probability on harmful test prompts / first-token KL on harmless ones, per language:",
        "",
    ]
    out += ["| language | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for lang in langs:
        cells = []
        for _, s, c in cols:
            v = s["first_token"][c]["per_language"].get(lang)
            cells.append("-" if v is None else f"{v['refusal']:.3f} / {v['kl']:.3f}")
        out.append(f"| {lang} | " + " | ".join(cells) + " |")
    out += ["", "The studies (val prompts, first-token objectives):", ""]
    out += ["| study | complete trials | trials with val KL <= 0.10 | mean s/trial | pick |", "|---|---|---|---|---|"]
    for d, src in ((m_dir, multi), (e_dir, en)):
        rows = complete[d]
        secs = [t["wall_s"] for t in rows if "wall_s" in t]
        ok = [t for t in rows if t["kl"] <= 0.1]
        out.append(f"| {d} | {len(rows)} | {len(ok)} | {sum(secs) / max(len(secs), 1):.1f} | #{src['trial']} |")
    (here / out_name).write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
