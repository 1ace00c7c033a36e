"""Quantization sweep mechanics on the tiny model: variants, directions, cross-application, resume, report.

The tiny model has n_embd 64, so only 32-wide block types fit (Q8_0, Q4_0); K-quants need rows of 256.
Its weights are random, so the selection's KL filter is switched off and refusal rates are whatever they are:
these tests check the plumbing, not the science (the real sweep's results are in docs/results/).
"""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp  # noqa: F401  (import llama_cpp before numpy/gguf: required in CUDA processes)

import numpy as np
import pytest

from pyrefusal.errors import PyrefusalError
from pyrefusal.stages.variants import make_variant
from pyrefusal.steering import merge
from pyrefusal.studies import quantsweep
from tests.tiny_model import TinySpec, write_tiny_gguf


def _config(model: Path, data: Path, work: Path, **kw: object) -> quantsweep.QuantSweepConfig:
    base = {
        "model": str(model),
        "types": ("f32", "q8_0", "q4_0"),
        "data_dir": str(data),
        "n_train": 4,
        "n_val": 4,
        "n_test": 3,
        "max_new_tokens": 4,
        "positions": (-1,),
        "kl_threshold": 1e6,  # random weights: any KL
        "work_dir": str(work),
        "n_threads": 1,
    }
    base.update(kw)
    return quantsweep.QuantSweepConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sweep(
    tiny_model: tuple[Path, dict[str, np.ndarray]], polyrefuse_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[quantsweep.QuantSweepConfig, Path, dict]:
    root = tmp_path_factory.mktemp("sweep")
    config = _config(tiny_model[0], polyrefuse_dir, root / "work")
    results = quantsweep.run_quant_sweep(config, root / "out", log=lambda _m: None)
    return config, root / "out", results


def test_sweep_makes_variants_directions_and_the_cross_matrix(sweep: tuple) -> None:
    config, out, res = sweep
    names = ["F32", "Q8_0", "Q4_0"]
    assert list(res["variants"]) == names
    v = res["variants"]
    assert v["F32"]["source"].startswith("base file")
    assert v["Q8_0"]["source"] == v["Q4_0"]["source"] == "quantized from F32"
    assert v["Q8_0"]["tensor_types"]["Q8_0"] > 0 and v["Q4_0"]["tensor_types"]["Q4_0"] > 0
    assert v["F32"]["bits_per_weight"] > v["Q8_0"]["bits_per_weight"] > v["Q4_0"]["bits_per_weight"]
    for name in names:
        assert v[name]["status"] == "ok" and v[name]["selection"]["position"] == -1
        assert np.load(out / "variants" / f"{name}.direction.npy").shape == (64,)
    matrix = res["refusal"]["matrix"]
    assert list(matrix) == ["baseline", *names]  # rows: no direction, then each variant's direction
    for row in matrix.values():
        assert set(row) == set(names) and all(0.0 <= r <= 1.0 for r in row.values())
    # completions: per variant, n_test prompts x (baseline + 3 directions)
    for name in names:
        lines = (out / "completions" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == config.n_test * 4
    geo = res["geometry"]
    assert geo["reference"] == "F32" and geo["names"] == names
    cos = np.array(geo["cosine_selected"])
    np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-9)
    assert cos[0, 1] > 0.9  # Q8_0 barely moves the direction of the F32 model
    assert np.array(geo["cosine_by_layer"]).shape == (3, 3, 3)


def test_report_and_figures_are_written(sweep: tuple) -> None:
    _, out, res = sweep
    report = (out / "report.md").read_text()
    assert "## Cross-application" in report and "| r(Q4_0) |" in report
    assert "quantized from F32" in report
    for png in ("quant_sweep.png", "cosine_by_layer.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "quant_sweep.json").read_text())["variants"].keys() == res["variants"].keys()


def test_rerun_resumes_without_redoing_work(sweep: tuple) -> None:
    config, out, res = sweep
    files = sorted(Path(config.work_dir).glob("*.gguf"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    sizes = {p.name: p.stat().st_size for p in (out / "completions").iterdir()}
    logs: list[str] = []
    again = quantsweep.run_quant_sweep(config, out, log=logs.append)
    assert sum("reusing" in m for m in logs) == 3 and not any("quantizing" in m for m in logs)
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # variant files not rewritten
    assert {p.name: p.stat().st_size for p in (out / "completions").iterdir()} == sizes  # nothing regenerated
    assert again["refusal"]["matrix"] == res["refusal"]["matrix"]
    with pytest.raises(PyrefusalError, match="other settings"):
        quantsweep.run_quant_sweep(quantsweep.QuantSweepConfig(**{**config.__dict__, "n_test": 5}), out)


def test_requantizing_a_quantized_model_needs_the_flag_and_is_labelled(
    tiny_model: tuple[Path, dict[str, np.ndarray]], polyrefuse_dir: Path, tmp_path: Path
) -> None:
    q8 = merge.quantize_gguf(tiny_model[0], tmp_path / "tiny-q8_0.gguf", "q8_0", n_threads=1)
    config = _config(q8, polyrefuse_dir, tmp_path / "work", types=("q8_0", "q4_0"))
    with pytest.raises(PyrefusalError, match="allow_requantize"):
        quantsweep.run_quant_sweep(config, tmp_path / "out", log=lambda _m: None)
    allowed = _config(q8, polyrefuse_dir, tmp_path / "work", allow_requantize=True)
    v = make_variant(q8, merge.FTYPES["q8_0"], "q4_0", tmp_path / "work", allowed, lambda _m: None)
    assert v.status == "ok" and v.source == "requantized from Q8_0, not from original weights"
    assert make_variant(q8, merge.FTYPES["q8_0"], "q8_0", tmp_path, allowed, print).source.startswith("base file")


def test_a_type_llama_cpp_cannot_make_is_skipped_with_the_reason(
    tiny_model: tuple[Path, dict[str, np.ndarray]], polyrefuse_dir: Path, tmp_path: Path
) -> None:
    # IQ2_XXS needs an importance matrix for rows of 256 (narrower rows fall back to IQ4_NL, which does not).
    wide = tmp_path / "wide.gguf"
    write_tiny_gguf(wide, TinySpec(n_layer=1, n_embd=256, n_ff=512))
    config = _config(wide, polyrefuse_dir, tmp_path / "work")
    v = make_variant(wide, 0, "iq2_xxs", tmp_path / "work", config, lambda _m: None)
    assert v.status == "failed" and "importance matrix" in (v.error or ""), v.error
    assert not (tmp_path / "work" / "IQ2_XXS.gguf").exists()
    with pytest.raises(PyrefusalError, match="choose one of"):
        quantsweep.run_quant_sweep(_config(tiny_model[0], polyrefuse_dir, tmp_path, types=("q9_k",)), tmp_path / "o")


def test_settings_are_checked_before_any_work(tmp_path: Path) -> None:
    # an unknown detector fails first: the model is not resolved and nothing is written
    config = _config(tmp_path / "absent.gguf", tmp_path / "no-data", tmp_path / "work", detector="nope")
    with pytest.raises(PyrefusalError, match=r"unknown detector 'nope' \(--detector\)"):
        quantsweep.run_quant_sweep(config, tmp_path / "out", log=lambda _m: None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
