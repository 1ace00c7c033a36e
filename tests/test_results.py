"""RunResults: the one reader of a run's results.json (typed views, byte-identical round trip, clear errors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import llama_cpp  # noqa: F401  (import llama_cpp before numpy: required in CUDA processes)

import pytest
from click.testing import CliRunner

from pyrefusal.cli import main
from pyrefusal.results import ResultsError, RunResults
from pyrefusal.settings import RunSettings

GOLDEN = Path(__file__).parent / "golden" / "run-tiny-v0.1.0"


def test_views_and_round_trip_of_a_stored_run(tmp_path: Path) -> None:
    stored = json.loads((GOLDEN / "results.json").read_text())
    results = RunResults.load(GOLDEN)  # a directory or the file itself
    assert results.model.path == stored["model"]["path"] and results.model.n_layer == stored["model"]["n_layer"]
    d = results.direction
    keys = ("layer", "position", "source_lang")
    assert (d.layer, d.position, d.source_lang) == tuple(stored["direction"][k] for k in keys)
    assert d.file == "direction.npy" and d.norm == stored["direction"]["norm"]
    assert isinstance(results.settings, RunSettings) and list(results.settings.conditions) == results.conditions
    assert results.refusal_rates() == {
        lang: {c: v["refusal_rate"] for c, v in by.items()} for lang, by in stored["evaluation"].items()
    }
    results.save(tmp_path / "results.json")
    assert (tmp_path / "results.json").read_bytes() == (GOLDEN / "results.json").read_bytes()


def _broken_run(tmp_path: Path, text: str) -> Path:
    """A copy of the golden run whose results.json holds ``text``."""
    run = tmp_path / "run"
    shutil.copytree(GOLDEN, run)
    (run / "results.json").write_text(text)
    return run


def _edited(**changes: object) -> str:
    stored = json.loads((GOLDEN / "results.json").read_text())
    for key, value in changes.items():
        if value is None:
            stored.pop(key)
        else:
            stored[key] = value
    return json.dumps(stored)


BROKEN = {
    "not JSON": ('{"model": {"path": "x.gguf"', "is not JSON"),
    "no model": (_edited(model=None), "lacks `model`"),
    "no config": (_edited(config=None), "lacks `config`"),
    "layer not a number": (
        _edited(direction={**json.loads((GOLDEN / "results.json").read_text())["direction"], "layer": "12"}),
        r"`direction.layer` is '12', not a whole number",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_load_names_the_file_the_problem_and_the_fix(tmp_path: Path, case: str) -> None:
    text, problem = BROKEN[case]
    run = _broken_run(tmp_path, text)
    with pytest.raises(ResultsError, match=problem) as e:
        RunResults.load(run)
    assert str(run / "results.json") in str(e.value) and f"pyrefusal run --out {run}" in str(e.value)


@pytest.mark.parametrize("command", ["report", "export lora"])
def test_commands_on_a_corrupt_results_json_say_what_to_do(tmp_path: Path, command: str) -> None:
    run = _broken_run(tmp_path, BROKEN["not JSON"][0])
    r = CliRunner().invoke(main, [*command.split(), str(run)])
    assert r.exit_code == 2, r.output
    message = " ".join(r.output.split())  # click may wrap the error
    assert f"{run / 'results.json'} is not JSON" in message and f"re-run `pyrefusal run --out {run}`" in message
