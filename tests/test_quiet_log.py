"""llama.cpp's log goes through one filtering callback (issue 15, §4): no load chatter, errors always.

serve, chat and SteeredModel used to print a "cannot use buft 'CPU_REPACK'" warning per adapted tensor (12 on
Qwen2.5-0.5B): llama-cpp-python's own callback reads ggml's WARN level as an error. A Q4_0 copy of the tiny model
reproduces them (the CPU backend repacks Q4_0 weights, which LoRA tensors then cannot share).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pyrefusal.errors import ModelError
from pyrefusal.runtime import capi
from pyrefusal.steering.steered import SteeredModel

REPACK = "cannot use buft 'CPU_REPACK'"


def test_the_filter_keeps_errors_and_useful_warnings_only() -> None:
    repack = (
        "llama_adapter_lora_init_impl: lora for 'blk.0.ffn_down.weight' cannot use buft 'CPU_REPACK', fallback to CPU\n"
    )
    assert not capi.llama_log_wanted(capi.GGML_LOG_WARN, repack)
    assert not capi.llama_log_wanted(capi.GGML_LOG_WARN, "load: control-looking token: 128247 '</s>' was not control-type; this is probably a bug in the model. its type will be overridden\n")  # fmt: skip  # noqa: E501
    assert capi.llama_log_wanted(capi.GGML_LOG_WARN, "llama_model_quantize_impl: WARNING: 1 of 30 tensor(s) required fallback quantization\n")  # fmt: skip  # noqa: E501
    assert capi.llama_log_wanted(capi.GGML_LOG_ERROR, "llama_model_load: error loading model: " + repack)
    assert not capi.llama_log_wanted(capi.GGML_LOG_INFO, "llama_model_loader: - kv   0: general.architecture\n")
    assert not capi.llama_log_wanted(capi.GGML_LOG_DEBUG, "anything\n")


@pytest.fixture(scope="module")
def tiny_q4(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q4") / "tiny-q4_0.gguf"
    res = capi.quantize(tiny_model[0], out, capi.ftype_table()["q4_0"], n_threads=1, allow_requantize=False)
    assert res.rc == 0
    return out


def _load(path: Path) -> None:
    direction = np.random.default_rng(0).standard_normal(64).astype(np.float32)  # (n_embd,)
    sm = SteeredModel(path, direction=direction, n_ctx=256, n_threads=1, allow_inexact=True)
    assert sm.create_completion("hi", max_tokens=2)["choices"]  # the ablation adapter is in place and works
    del sm


def test_loading_a_steered_model_prints_no_repack_warnings(tiny_q4, capfd, monkeypatch) -> None:
    monkeypatch.delenv("PYREFUSAL_LLAMA_LOG", raising=False)
    capfd.readouterr()
    _load(tiny_q4)
    out, err = capfd.readouterr()
    assert REPACK not in err and REPACK not in out
    assert "llama_model_loader" not in err  # no info chatter either


def test_the_full_log_is_there_when_asked_for(tiny_q4, capfd, monkeypatch) -> None:
    """The same load with PYREFUSAL_LLAMA_LOG=1 prints the warnings: the quiet test above can fail."""
    monkeypatch.setenv("PYREFUSAL_LLAMA_LOG", "1")
    capfd.readouterr()
    _load(tiny_q4)
    _, err = capfd.readouterr()
    assert err.count(REPACK) == 6  # attn_output and ffn_down of 3 blocks


def test_llama_cpp_errors_are_always_shown(tiny_model, tmp_path, capfd, monkeypatch) -> None:
    monkeypatch.delenv("PYREFUSAL_LLAMA_LOG", raising=False)
    broken = tmp_path / "truncated.gguf"
    broken.write_bytes(tiny_model[0].read_bytes()[:4096])
    capfd.readouterr()
    with pytest.raises(ModelError, match="could not load"):
        capi.Model(broken, n_gpu_layers=0, use_extra_bufts=True)
    _, err = capfd.readouterr()
    assert "error loading model" in err


def test_the_cli_flag_asks_for_the_full_log(monkeypatch) -> None:
    from click.testing import CliRunner

    from pyrefusal.cli import main

    monkeypatch.setenv("PYREFUSAL_LLAMA_LOG", "0")  # "0" is off; setenv also restores the variable after the test
    assert CliRunner().invoke(main, ["doctor"]).exit_code == 0
    assert os.environ["PYREFUSAL_LLAMA_LOG"] == "0"
    r = CliRunner().invoke(main, ["--llama-log", "doctor"])
    assert r.exit_code == 0, r.output
    assert os.environ["PYREFUSAL_LLAMA_LOG"] == "1"  # what capi's sink reads, inherited by worker processes
