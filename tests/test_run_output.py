"""What `pyrefusal run` shows while it works: progress bars that end cleanly (issue 15, §4)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pyrefusal.cli import _progress_bars
from pyrefusal.settings import RunSettings
from pyrefusal.studies.run import run_pipeline


def test_a_stage_that_stops_early_is_closed_when_the_next_starts(capsys: pytest.CaptureFixture[str]) -> None:
    progress = _progress_bars()
    for i in range(5):  # the lazy KL stops at the pick, here after 5 of 90 candidates
        progress("kl (lazy)", i + 1, 90)
    for i in range(3):
        progress("generation", i + 1, 3)
    err = capsys.readouterr().err
    last_kl = [line for line in err[: err.index("generation")].split("\r") if line.strip()][-1]
    assert "stopped at 5: the rest was not needed" in last_kl and "5/5" in last_kl  # no 5/90 with an hour's ETA
    assert err.count("generation: 100%") == 1


def test_a_language_without_markers_is_flagged(tiny_model, polyrefuse_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for path in polyrefuse_dir.glob("*_translated_*.json"):
        if path.name.endswith(("_en.json", "_de.json")):
            shutil.copyfile(path, data / path.name)
            if path.name.endswith("_de.json"):  # German rows under a code the detector has no phrases for
                shutil.copyfile(path, data / path.name.replace("_de.json", "_sw.json"))
    said: list[str] = []
    config = RunSettings(
        model=str(tiny_model[0]), data_dir=str(data), target_langs=("en", "sw"), n_train=6, n_val=4, n_test=2,
        max_new_tokens=4, kl_threshold=1e9, n_threads=1, capability=False, refusal_openings=("I",),
    )  # fmt: skip
    results = run_pipeline(config, tmp_path / "run", log=said.append)
    assert results["detector_blind_languages"] == ["sw"]
    [warning] = [s for s in said if s.startswith("warning: the substring-multilingual refusal detector")]
    assert "no phrases for sw" in warning and "first_token_refusal_prob" in warning
    assert results["evaluation"]["sw"]["baseline"]["first_token_refusal_prob"] is not None  # the judge-free signal
