"""The plain translation instruction against REQUEST_PROMPT_TEMPLATE, on the same 48 rows of en
harmless_test translated into German by Qwen2.5-Coder-1.5B, scored by trigram similarity to the
released Google translation. Run from the repository root; writes templates.md next to this file.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import llama_cpp  # noqa: F401  (before numpy)

from pyrefusal.runtime.runtime import Runtime
from pyrefusal.data.build import DEFAULT_PROMPT_TEMPLATE, REQUEST_PROMPT_TEMPLATE, LlamaTranslator, similarity

HERE = Path(__file__).parent
released = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/polyrefuse/harmless_test_translated_de.json")
rows = json.loads(released.read_text())[:48]
source, google = [r["instruction"] for r in rows], [r["instruction_translated"] for r in rows]
lines = ["# Translation instruction: plain vs request-aware", "", "| template | mean | median | rows < 0.3 | s |"]
lines += ["|---|---|---|---|---|"]
examples = []
with Runtime.open("qwen2.5-coder-1.5b-instruct-q4_k_m", n_ctx=8192, n_seq_max=16) as rt:
    for name, template in (("plain", DEFAULT_PROMPT_TEMPLATE), ("request", REQUEST_PROMPT_TEMPLATE)):
        t0 = time.perf_counter()
        out = LlamaTranslator(rt, max_new_tokens=256, prompt_template=template).translate(source, "en", "de")
        sims = [similarity(a, b) for a, b in zip(out, google, strict=True)]
        low = sum(x < 0.3 for x in sims)
        mean, median, secs = statistics.mean(sims), statistics.median(sims), time.perf_counter() - t0
        lines.append(f"| {name} | {mean:.3f} | {median:.3f} | {low} | {secs:.0f} |")
        examples += [f"- {name}: {source[i]!r} -> {out[i]!r}" for i in (1, 5)]
lines += ["", f"Trigram similarity to Google's German, n = {len(rows)}; greedy, 2 CPU cores.", "", *examples, ""]
(HERE / "templates.md").write_text("\n".join(lines), encoding="utf-8")
print("\n".join(lines))
