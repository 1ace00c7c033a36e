"""Behaviour pinned across versions: run directories written by pyrefusal 0.1.0 before the restructure.

``tests/golden/*-v0.1.0`` were written by the flat-package version (commit 93ecab5) with the commands below
(``scripts/behaviour_snapshot.py`` runs the same ones). The same commands must give the same direction,
selection, candidates and completions today, and those old directories must resume and re-render.
The tiny model is written by :func:`tests.tiny_model.write_tiny_gguf` with seed 0, byte-identical to the one
the golden runs used (its sha256 is pinned in ``model.json``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from pyrefusal.cli import main

GOLDEN = Path(__file__).parent / "golden"
CONDITIONS = "baseline,ablation,actadd,induce,harm_ablation,random_ablation"


def _run_args(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "run", "--model", str(model), "--data-dir", str(data), "--threads", "1", "--target-langs", "en,de",
        "--n-train", "6", "--n-val", "4", "--n-test", "3", "--max-new-tokens", "6", "--kl-threshold", "1e9",
        "--n-seq", "8", "--refusal-openings", "I", "--conditions", CONDITIONS, "--out", str(out),
    ]  # fmt: skip


def _transfer_args(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "transfer", "--model", str(model), "--data-dir", str(data), "--threads", "1", "--sources", "en,de",
        "--targets", "en,de", "--n-train", "6", "--n-val", "4", "--n-test", "2", "--max-new-tokens", "3",
        "--kl-threshold", "1e9", "--out", str(out),
    ]  # fmt: skip


def _invoke(args: list[str]) -> None:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output + repr(r.exception)


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _stable(results: dict[str, Any]) -> dict[str, Any]:
    """results.json without what depends on the machine, the clock or where the files lie."""
    drop = {"timings", "timings_previous", "versions", "config", "model", "data_source"}  # data_source: a path
    return {k: v for k, v in results.items() if k not in drop}


def _without_timings(report: Path) -> list[str]:
    """report.md's lines but its wall-clock rows (``| generation | 0.1 |``)."""
    return [line for line in report.read_text().splitlines() if not re.match(r"^\| [a-z_]+ \| [\d.]+ \|$", line)]


def _moved(golden: str, tmp: Path, model: Path, data: Path) -> Path:
    """A copy of a golden directory as if moved to this machine: its config names this model and data path."""
    out = tmp / golden
    shutil.copytree(GOLDEN / golden, out)
    cfg = _json(out / "config.json")
    cfg["model"], cfg["data_dir"] = str(model), str(data)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


@pytest.fixture(scope="module")
def fresh_run(tiny_model, polyrefuse_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("golden") / "run"
    _invoke(_run_args(tiny_model[0], polyrefuse_dir, out))
    return out


def test_run_gives_the_outputs_of_v0_1_0(fresh_run: Path) -> None:
    old = GOLDEN / "run-tiny-v0.1.0"
    assert (fresh_run / "model.json").read_text() == (old / "model.json").read_text()  # the same tiny model
    assert (fresh_run / "completions.jsonl").read_bytes() == (old / "completions.jsonl").read_bytes()
    np.testing.assert_array_equal(np.load(fresh_run / "direction.npy"), np.load(old / "direction.npy"))
    np.testing.assert_array_equal(np.load(fresh_run / "candidates.npy"), np.load(old / "candidates.npy"))
    for name in ("selection.json", "prompts.json", "metrics.json"):
        assert _json(fresh_run / name) == _json(old / name), name
    assert _stable(_json(fresh_run / "results.json")) == _stable(_json(old / "results.json"))
    assert _without_timings(fresh_run / "report.md") == _without_timings(old / "report.md")


def test_a_v0_1_0_run_directory_resumes_and_rerenders(tiny_model, polyrefuse_dir, tmp_path) -> None:
    old = _moved("run-tiny-v0.1.0", tmp_path, tiny_model[0], polyrefuse_dir)
    before = (old / "completions.jsonl").read_bytes()
    stored = _stable(_json(old / "results.json"))
    _invoke(["report", "--quiet", str(old)])
    assert _stable(_json(old / "results.json")) == stored
    _invoke(_run_args(tiny_model[0], polyrefuse_dir, old))  # finished: nothing to generate
    assert (old / "completions.jsonl").read_bytes() == before
    assert _stable(_json(old / "results.json")) == stored


def test_transfer_gives_the_outputs_of_v0_1_0(tiny_model, polyrefuse_dir, tmp_path) -> None:
    out, old = tmp_path / "transfer", GOLDEN / "transfer-tiny-v0.1.0"
    _invoke(_transfer_args(tiny_model[0], polyrefuse_dir, out))
    assert (out / "completions.jsonl").read_bytes() == (old / "completions.jsonl").read_bytes()
    for lang in ("en", "de"):
        d, o = out / "directions" / lang, old / "directions" / lang
        np.testing.assert_array_equal(np.load(d / "direction.npy"), np.load(o / "direction.npy"))
        assert _json(d / "selection.json") == _json(o / "selection.json")
        assert _json(d / "refusal_tokens.json") == _json(o / "refusal_tokens.json")
    assert _stable(_json(out / "transfer.json")) == _stable(_json(old / "transfer.json"))


def test_a_v0_1_0_transfer_directory_resumes(tiny_model, polyrefuse_dir, tmp_path) -> None:
    old = _moved("transfer-tiny-v0.1.0", tmp_path, tiny_model[0], polyrefuse_dir)
    before = (old / "completions.jsonl").read_bytes()
    stored = _stable(_json(old / "transfer.json"))
    _invoke(_transfer_args(tiny_model[0], polyrefuse_dir, old))
    assert (old / "completions.jsonl").read_bytes() == before
    assert _stable(_json(old / "transfer.json")) == stored
