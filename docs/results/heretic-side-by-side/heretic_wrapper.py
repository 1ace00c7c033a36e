"""Run heretic's own CLI (``heretic.main.run``) unchanged, with hooks that log what a side-by-side needs.

Run with the heretic venv's python from a directory holding heretic's ``config.toml``. Nothing in heretic's
installed files is edited; this script wraps three methods at runtime:

* ``Model.get_responses_batched``: keeps the last batch of completions (the ones heretic counts refusals on);
* ``Evaluator.count_refusals``: after heretic counted, logs the completions with heretic's own verdicts, tagged
  ``baseline`` (the count in ``Evaluator.__init__``) or ``trial N``;
* ``Model.reset_model`` (start of a trial, heretic's ``objective`` calls it first) and ``Evaluator.get_score``
  (its end): wall time per trial, split into reset+abliterate and scoring (KL forward + generation).

After the study, heretic asks interactively which Pareto trial to use; ``prompt_select`` is replaced by a stub
that answers "Exit program" (no model is saved). Usage: python heretic_wrapper.py OUT.json
"""

import json
import sys
import time

import torch

torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "2")))

out_path = sys.argv[1]
sys.argv = sys.argv[:1]  # heretic parses sys.argv (pydantic CLI source); settings come from config.toml

import heretic.main as hm  # noqa: E402
from heretic.evaluator import Evaluator  # noqa: E402
from heretic.model import Model  # noqa: E402

record = {"trials": [], "baseline": None, "t_import": time.perf_counter()}
state = {"trial": 0, "t_trial": None, "t_score": None, "last": None}


def save():
    with open(out_path, "w") as f:
        json.dump(record, f, indent=1)


orig_responses = Model.get_responses_batched


def get_responses_batched(self, prompts, skip_special_tokens=False):
    responses = orig_responses(self, prompts, skip_special_tokens=skip_special_tokens)
    state["last"] = (prompts, responses)
    return responses


orig_count = Evaluator.count_refusals


def count_refusals(self):
    t = time.perf_counter()
    n = orig_count(self)
    prompts, responses = state["last"]
    entry = {
        "seconds_generate": time.perf_counter() - t,
        "refusals_heretic": n,
        "completions": [
            {"prompt": p.user, "response": r, "refusal_heretic": self.is_refusal(r)}
            for p, r in zip(prompts, responses, strict=True)
        ],
    }
    if state["trial"] == 0:
        record["baseline"] = entry
        record["t_baseline_done"] = time.perf_counter()
    else:
        record["trials"][-1].update(entry)
    save()
    return n


orig_reset = Model.reset_model


def reset_model(self):
    if record["baseline"] is not None:  # heretic's objective() starts every trial with reset_model()
        state["trial"] += 1
        state["t_trial"] = time.perf_counter()
        record["trials"].append({"trial": state["trial"]})
    return orig_reset(self)


orig_score = Evaluator.get_score


def get_score(self):
    t = time.perf_counter()
    score, kl, refusals = orig_score(self)
    end = time.perf_counter()
    tr = record["trials"][-1]
    tr.update(
        {
            "kl": kl,
            "refusals": refusals,
            "n_bad": len(self.bad_prompts),
            "score": list(score),
            "seconds_score": end - t,
            "seconds_reset_abliterate": t - state["t_trial"],
            "seconds_trial": end - state["t_trial"],
        }
    )
    save()
    return score, kl, refusals


def prompt_select(message, choices):
    print(f"[wrapper] {message!r}: answering 'Exit program'")
    return ""


Model.get_responses_batched = get_responses_batched
Evaluator.count_refusals = count_refusals
Model.reset_model = reset_model
Evaluator.get_score = get_score
hm.prompt_select = prompt_select

t0 = time.perf_counter()
hm.run()
record["seconds_total"] = time.perf_counter() - t0
save()
