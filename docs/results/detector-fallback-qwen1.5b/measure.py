"""How well the first-token detector (docs/method.md §6.3.1) agrees with the substring detector where the latter
is NOT blind: the 14 PolyRefuse languages, Qwen2.5-Coder-1.5B-Instruct Q4_K_M, the completions and direction of
docs/results/universality-qwen1.5b (16 harmful test prompts per language, baseline and ablation, 64 tokens).

Each language is treated as if it had no markers, with two token sets R:
  "source":  what every blind language gets: the run's refusal tokens of the source language (en) plus the first
             tokens of the model's refusals to 32 English harmful train prompts;
  "+own":    plus the first tokens of its refusals to 32 harmful train prompts of the language itself, judged by the
             all-language substring check (the best case of a blind language: it refuses in a covered neighbour).
The reference is the stored substring verdict of each completion (64 tokens). Only forward passes at the first
answer position are new (no generation but the 8-token probes).

Run from the repository root:  python docs/results/detector-fallback-qwen1.5b/measure.py > .../results.md
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import llama_cpp  # noqa: F401  (before numpy)

import numpy as np

from pyrefusal.data.polyrefuse import PolyRefuse
from pyrefusal.method import intervention as iv
from pyrefusal.method.refusal import SubstringDetector, first_token_refused
from pyrefusal.method.selection import log_softmax
from pyrefusal.runtime import Runtime
from pyrefusal.settings import RunSettings
from pyrefusal.stages.measure import fallback_refusal_tokens
from pyrefusal.steering import router

RUN = Path("docs/results/universality-qwen1.5b")
MODEL = Path.home() / ".cache/pyrefusal/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
DATA = Path("../shared/polyrefuse")
CONDITIONS = ("baseline", "ablation")
LANGS = sys.argv[1].split(",") if len(sys.argv) > 1 else None  # default: every target language of the run

cfg_d = json.loads((RUN / "config.json").read_text())
config = RunSettings.from_dict({**cfg_d, "model": str(MODEL), "data_dir": str(DATA), "n_ctx": 2048, "n_threads": 2})
sel = json.loads((RUN / "selection.json").read_text())
direction = np.load(RUN / "direction.npy").astype(np.float64)  # (n_embd,)
interventions = iv.paper_conditions(direction, sel["layer"], seed=config.seed)
rows = [json.loads(line) for line in (RUN / "completions.jsonl").open(encoding="utf-8")]
data = PolyRefuse(DATA)
detector = SubstringDetector()

t0 = time.perf_counter()
rt = Runtime.for_study(config)
out: dict[str, dict] = {}
source = None
try:
    for lang in LANGS or config.target_langs:
        # "source" set: pretend lang == source so that no own-language derivation happens
        src_only = fallback_refusal_tokens(rt, data, config.source_lang, config, detector, source=source)
        source = src_only.pop("source")
        own = fallback_refusal_tokens(rt, data, lang, config, SubstringDetector(cross_language=True), source=source)
        own.pop("source")
        res = {"R_source": src_only["strings"], "R_own": own["strings"], "notes": own["notes"]}
        for cond in CONDITIONS:
            cells = [r for r in rows if r["lang"] == lang and r["kind"] == "harmful" and r["condition"] == cond]
            toks = [rt.chat_tokens(r["prompt"], config.system_prompt) for r in cells]
            ref = [bool(r["refused"]) for r in cells]
            router.arm(rt, interventions[cond])
            try:
                logp = log_softmax(rt.last_logits(toks))  # (n, n_vocab) float64
            finally:
                rt.clear_plan()
            greedy = logp.argmax(axis=1)  # (n,) the first generated token of each greedy completion
            p_src = np.exp(logp[:, src_only["ids"]]).sum(axis=1)  # (n,)
            p_own = np.exp(logp[:, own["ids"]]).sum(axis=1)  # (n,)
            verdicts = {
                "p_source": first_token_refused(p_src),
                "p_own": first_token_refused(p_own),
                "argmax_source": [int(g) in src_only["ids"] for g in greedy],
                "argmax_own": [int(g) in own["ids"] for g in greedy],
            }
            res[cond] = {"n": len(cells), "substring": sum(ref)}
            for name, v in verdicts.items():
                res[cond][name] = sum(v)
                res[cond]["agree_" + name] = sum(a == b for a, b in zip(ref, v, strict=True))
                res[cond]["both_" + name] = sum(a and b for a, b in zip(ref, v, strict=True))
        out[lang] = res
        print(lang, json.dumps(res, ensure_ascii=False), file=sys.stderr, flush=True)
finally:
    rt.close()

secs = time.perf_counter() - t0
RULES = ("p_source", "p_own", "argmax_source", "argmax_own")
print("# First-token detector vs substring detector, Qwen2.5-Coder-1.5B Q4_K_M (universality-qwen1.5b prompts)\n")
print(f"Made by `python docs/results/detector-fallback-qwen1.5b/measure.py {' '.join(sys.argv[1:])}`; ")
print(f"{secs / 60:.1f} min on 2 CPU cores shared with other jobs.\n")
print("Harmful test prompts refused, of n: the substring detector on the 64-token completions (the reference,")
print("not blind in these languages) and four first-token rules: `p` = p_R > 0.5, `argmax` = the greedy first")
print("token is in R; `source` = R from the source language only (what any blind language gets), `own` = plus the")
print("first tokens of the language's own refusals to 32 harmful train prompts. Each rule: refused / agreeing")
print("with the reference / refused by both.\n")
print("| lang | cond | n | substring | " + " | ".join(RULES) + " | R (own) |")
print("|---|---|---|---|" + "---|" * len(RULES) + "---|")
tot: dict[tuple[str, str], int] = {}
for lang, res in out.items():
    for cond in CONDITIONS:
        c = res[cond]
        for k, v in c.items():
            tot[(cond, k)] = tot.get((cond, k), 0) + v
        cells = " | ".join(f"{c[r]} / {c['agree_' + r]} / {c['both_' + r]}" for r in RULES)
        print(f"| {lang} | {cond} | {c['n']} | {c['substring']} | {cells} | {res['R_own']!r} |")
for cond in CONDITIONS:
    g = {k: v for (c, k), v in tot.items() if c == cond}
    cells = " | ".join(f"{g[r]} / {g['agree_' + r]} / {g['both_' + r]}" for r in RULES)
    print(f"| **all** | {cond} | {g['n']} | {g['substring']} | {cells} | |")
print("\nR (source only):", next(iter(out.values()))["R_source"])
(Path(__file__).parent / "measure.json").write_text(json.dumps(out, ensure_ascii=False, indent=1))
