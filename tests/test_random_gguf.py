"""benchmarks/make_random_gguf.py: random 7B/8B-shaped models for the GPU benchmark.

The GPU machine is lent by the minute, so its Q4_K_M models are written directly as random
K-quant blocks instead of F16 + llama.cpp's quantizer. These tests check, on scaled-down shapes
of the real architectures, that the direct file has exactly the tensor types and sizes llama.cpp's
own Q4_K_M quantization gives (so it times the same), that its weights dequantize to finite values
with the intended spread, and that llama.cpp loads it and produces finite logits.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import llama_cpp  # noqa: F401  (before numpy)

import gguf
import numpy as np
import pytest

from pyrefusal.runtime.runtime import Runtime

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


sys.path.insert(0, str(BENCH))  # the benchmark scripts are plain modules in benchmarks/
mrg = importlib.import_module("make_random_gguf")


def _types(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    r = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_bytes)) for t in r.tensors}


@pytest.fixture(scope="module", params=["qwen2.5-7b", "llama-3.1-8b"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, Path]:
    """(shape, direct Q4_K_M file, llama.cpp-quantized Q4_K_M file) of a scaled real shape."""
    # 0.07 keeps the head size and makes n_embd a multiple of 256 (k-quants on every matrix)
    shape = mrg.get_shape(request.param, 0.07 if request.param == "qwen2.5-7b" else 0.0625)
    d = tmp_path_factory.mktemp("rand")
    direct = mrg.write_direct(shape, d / "direct.gguf", log=False)
    f16 = mrg.write_f16(shape, d / "f16.gguf", log=False, workers=1)
    quant = mrg.quantize(f16, d / "quant.gguf", threads=2, log=False)
    return shape, direct, quant


def test_direct_file_has_llamacpp_q4_k_m_types_and_sizes(pair):
    _, direct, quant = pair
    got, want = _types(direct), _types(quant)  # llama.cpp writes the output matrix first: compare as maps
    assert sorted(got) == sorted(want)
    assert any(t == "Q6_K" for t, _, _ in got.values()) and any(t == "Q4_K" for t, _, _ in got.values())
    assert got == want, {k: (got[k], want[k]) for k in got if got[k] != want[k]}


def test_direct_weights_are_finite_with_the_intended_spread(pair):
    _, direct, _ = pair
    seen = set()
    for t in gguf.GGUFReader(str(direct)).tensors:
        if t.tensor_type.name not in ("Q4_K", "Q6_K"):
            continue
        seen.add(t.tensor_type.name)
        w = gguf.dequantize(t.data, t.tensor_type)  # (rows, fan_in)
        assert np.isfinite(w).all(), t.name
        fan_in = w.shape[-1]
        want = 0.3 if t.name == "token_embd.weight" else 1.0 / math.sqrt(fan_in)
        assert abs(float(w.mean())) < 0.1 * want, t.name
        assert 0.7 * want < float(w.std()) < 1.4 * want, (t.name, float(w.std()), want)
    assert seen == {"Q4_K", "Q6_K"}


def test_llamacpp_loads_the_direct_file_and_gives_finite_logits(pair):
    shape, direct, _ = pair
    with Runtime(direct, n_ctx=256, n_batch=64, n_seq_max=2) as rt:
        assert (rt.n_layer, rt.n_embd) == (shape.n_layer, shape.n_embd)
        toks = [[1, *range(mrg.FIRST_TEXT_TOKEN, mrg.FIRST_TEXT_TOKEN + 12)], [1, 300, 301, 302]]
        logits = rt.last_logits(toks)  # (2, n_vocab)
        assert logits.shape == (2, shape.n_vocab)
        assert np.isfinite(logits).all()
        assert float(logits.std()) > 0.0
