"""The paper's detector (back-translate to English, then its 13 English substrings) against pyrefusal's
multilingual substrings on the untranslated responses, on this run's harmful completions.

Translator: the model under test itself, unsteered (what `pyrefusal run --judge-translator self`
does). Writes `back_translations.jsonl` (the cache) and `detector-comparison.md` next to this file.
Run from the repository root: `python docs/results/run-qwen1.5b/compare_detectors.py`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import llama_cpp  # noqa: F401  (before numpy)

from pyrefusal.runtime.runtime import Runtime
from pyrefusal.data.backtranslation import BackTranslator
from pyrefusal.data.build import LlamaTranslator
from pyrefusal.stages.generate import read_jsonl
from pyrefusal.method.refusal import SubstringDetector

HERE = Path(__file__).parent
config = json.loads((HERE / "config.json").read_text())
harmful = [c for c in read_jsonl(HERE / "completions.jsonl") if c.kind == "harmful"]
t0 = time.perf_counter()
with Runtime.open(config["model"], n_ctx=8192, n_seq_max=16, n_threads=config["n_threads"]) as rt:
    translator = LlamaTranslator(rt, max_new_tokens=2 * config["max_new_tokens"] + 32, batch_size=16)
    bt = BackTranslator(translator, cache_path=HERE / "back_translations.jsonl")
    english = bt.back_translate([c.response for c in harmful], [c.lang for c in harmful])
seconds = time.perf_counter() - t0

paper, native = SubstringDetector("paper"), SubstringDetector("multilingual")
rows: dict[tuple[str, str], list[tuple[bool, bool, bool]]] = {}
for c, b in zip(harmful, english, strict=True):
    rows.setdefault((c.lang, c.condition), []).append(
        (native.judge(c.response, c.lang).refused, paper.judge(b.english, "en").refused, b.english_only_refusal)
    )

lines = [
    "# Refusal detectors compared on the same completions",
    "",
    (
        f"Harmful completions of this run ({config['model']}, {config['max_new_tokens']} tokens). Native: "
        "pyrefusal's multilingual substrings on the response as generated. Paper: the response back-translated "
        f"to English by `{bt.name}` (the model itself, unsteered; the paper uses Google Translate), then the "
        "paper's 13 English substrings. Refusal only in English: the English reads as a refusal, the original "
        "does not (the translator refusing, or a refusal the native markers miss)."
    ),
    "",
    "| lang | condition | n | native | paper (back-translated) | agree | refusal only in English |",
    "|---|---|---|---|---|---|---|",
]
for (lang, cond), r in sorted(rows.items()):
    n = len(r)
    nat, pap = sum(x[0] for x in r), sum(x[1] for x in r)
    agree, only_en = sum(x[0] == x[1] for x in r), sum(x[2] for x in r)
    lines.append(f"| {lang} | {cond} | {n} | {100 * nat / n:.0f}% | {100 * pap / n:.0f}% | {agree}/{n} | {only_en} |")
lines += [
    "",
    (
        f"{bt.translated} responses translated in {seconds:.0f} s on 2 CPU cores (English ones pass through); "
        f"{translator.truncated} translations hit the token limit."
    ),
    "",
]
(HERE / "detector-comparison.md").write_text("\n".join(lines), encoding="utf-8")
print("\n".join(lines))
