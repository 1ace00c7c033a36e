"""Write the prompts of the pyrefusal side as heretic dataset files (plain text, one prompt per line).

* direction prompts (heretic's good_prompts / bad_prompts): exactly the train prompts the pyrefusal run used for
  its candidates (``RUN/prompts.json``, after its refusal filter);
* evaluation prompts (heretic's good/bad_evaluation_prompts): the English val prompts that
  ``pyrefusal optimize RUN --languages en --n-val N`` scores (``sample_train_val`` with the run's n_train and
  seed, as pyrefusal/studies/optimize.py draws them).

Usage: python export_prompts.py RUN_DIR N_VAL OUT_DIR  (main pyrefusal environment)
"""

import json
import sys
from pathlib import Path

from pyrefusal.data.polyrefuse import PolyRefuse
from pyrefusal.results import RunResults
from pyrefusal.stages.sample import sample_train_val

run_dir, n_val, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
results = RunResults.load(run_dir / "results.json")
run = results.settings
data = PolyRefuse(results.data["data_source"]["path"])
recorded = json.loads((run_dir / "prompts.json").read_text())


def write(name: str, texts: list[str]) -> None:
    flat = [" ".join(t.split()) for t in texts]  # heretic's text format is one prompt per line
    (out / f"{name}.txt").write_text("".join(t + "\n" for t in flat), encoding="utf-8")
    changed = sum(a != b for a, b in zip(texts, flat, strict=False))
    print(f"{name}: {len(flat)} prompts ({changed} had line breaks/odd whitespace collapsed)")


s = sample_train_val(data, "en", n_train=run.n_train, n_val=n_val, seed=run.seed)
# The recorded train ids are resolved through the run's own (unfiltered) sample, not as rows of a split file: runs
# that draw harmless prompts from the pool record ids such as "harmless/train/en/pool/4402".
drawn = sample_train_val(data, "en", n_train=run.n_train, n_val=run.n_val, seed=run.seed)
texts = {p.id: p.text for ps in drawn.values() for p in ps}

write("bad_train", [texts[i] for i in recorded["harmful_train"]])
write("good_train", [texts[i] for i in recorded["harmless_train"]])
write("bad_eval", [p.text for p in s["harmful_val"]])
write("good_eval", [p.text for p in s["harmless_val"]])
