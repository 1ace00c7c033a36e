"""Independent reference check: HF transformers + torch on the same GGUF agree with llama.cpp.

The default model's activations at the eoi positions and its mean-difference refusal
direction are recomputed by :mod:`pyrefusal.reference` (transformers dequantises the Q4_K_M
weights to float32 and runs its own Qwen2 code) in a separate process (torch must not share a
process with llama_cpp), and compared with pyrefusal's :meth:`Runtime.capture`.

Needs ``pip install "pyrefusal[reference]"`` (torch, transformers, gguf, accelerate); skipped otherwise.
About 2.5 minutes on 2 CPU cores (most of it dequantising the GGUF in transformers).
Results: docs/results/reference-check.md.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from pyrefusal.data.registry import DEFAULT_MODEL, resolve_model
from pyrefusal.errors import PyrefusalError
from pyrefusal.method.directions import mean_difference
from pyrefusal.runtime.runtime import Runtime

pytestmark = pytest.mark.slow

POSITIONS = (-5, -4, -3, -2, -1)
# 32 + 32 prompts: the direction's error is per-prompt activation noise averaged over the
# prompts (with 8 + 8 the minimum cosine over layers >= 2 was 0.98; see the results page).
N_PROMPTS = 32
MIN_COSINE = 0.99
# Layer 1 (the output of block 0 alone) carries a tiny direction (|r|/|x| ~ 0.02 at the last
# positions), where llama.cpp's ~1.3 % activation-quantisation noise is comparable; it is
# reported and held to a looser bound.
FIRST_CHECKED_LAYER = 2
MIN_COSINE_LAYER1 = 0.95
# A candidate counts as non-trivial when its norm is at least this fraction of the mean
# activation norm at that (position, layer); below it the direction is noise-dominated.
MIN_RELATIVE_NORM = 0.02


def _missing_reference_deps() -> list[str]:
    # find_spec only: torch must not be imported into this (llama_cpp) process.
    return [m for m in ("torch", "transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def default_model():
    missing = _missing_reference_deps()
    if missing:
        pytest.skip(f"reference check needs {', '.join(missing)}: pip install 'pyrefusal[reference]'")
    try:
        return resolve_model(DEFAULT_MODEL, progress=False)
    except PyrefusalError as e:
        pytest.skip(f"default model unavailable: {e}")


def _instructions(path, n: int) -> list[str]:
    return [row["instruction"] for row in json.loads(path.read_text(encoding="utf-8"))[:n]]


def test_reference_direction_matches_transformers(default_model, polyrefuse_dir, tmp_path):
    harmful = _instructions(polyrefuse_dir / "harmful_train_translated_en.json", N_PROMPTS)
    harmless = _instructions(polyrefuse_dir / "harmless_train_translated_en.json", N_PROMPTS)

    t0 = time.perf_counter()
    with Runtime(default_model.path, n_ctx=1024, n_seq_max=4) as rt:
        n_layer = rt.n_layer
        tokens = [rt.chat_tokens(p) for p in harmful + harmless]
        assert all(t[-5:] == rt.eoi_tokens() for t in tokens)
        ours, _ = rt.capture(tokens, positions=POSITIONS, layers=range(n_layer))
    t_ours = time.perf_counter() - t0

    spec = tmp_path / "tokens.json"
    spec.write_text(json.dumps({"prompts": tokens, "positions": list(POSITIONS)}))
    out = tmp_path / "reference.npz"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pyrefusal.reference", "--model", str(default_model.path)]
    cmd += ["--tokens", str(spec), "--out", str(out)]
    proc = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    t_ref = time.perf_counter() - t0
    assert proc.returncode == 0, f"reference process failed:\n{proc.stdout}\n{proc.stderr}"
    with np.load(out) as z:
        ref = z["acts"].astype(np.float64)
        versions = [str(v) for v in z["versions"]]
    ours = ours.astype(np.float64)
    assert ref.shape == ours.shape == (2 * N_PROMPTS, len(POSITIONS), n_layer, rt.n_embd)

    # (a) hidden states: relative error per layer over all prompts and eoi positions
    rel = np.sqrt(((ref - ours) ** 2).sum(axis=(0, 1, 3)) / (ref**2).sum(axis=(0, 1, 3)))

    # (b) mean-difference direction at every (position, layer >= 1)
    c_ours = mean_difference(ours[:N_PROMPTS], ours[N_PROMPTS:], POSITIONS)
    c_ref = mean_difference(ref[:N_PROMPTS], ref[N_PROMPTS:], POSITIONS)
    a, b = c_ours.vectors[:, 1:], c_ref.vectors[:, 1:]  # (n_pos, n_layer - 1, n_embd)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    scale = 0.5 * (np.linalg.norm(c_ref.harmful_mean, axis=-1) + np.linalg.norm(c_ref.harmless_mean, axis=-1))
    rel_norm = np.linalg.norm(b, axis=-1) / scale[:, 1:]
    nontrivial = rel_norm >= MIN_RELATIVE_NORM
    nontrivial[:, : FIRST_CHECKED_LAYER - 1] = False

    print(f"\nversions torch/transformers: {versions}; pyrefusal capture {t_ours:.1f}s, reference {t_ref:.1f}s")
    print("layer  rel_err  cos_min  cos_median  |r|/|x|_min")
    for lay in range(n_layer):
        if lay == 0:
            print(f"{lay:5d}  {rel[lay]:.2e}        -           -            -")
            continue
        c = cos[:, lay - 1]
        print(f"{lay:5d}  {rel[lay]:.2e}  {c.min():.4f}  {np.median(c):10.4f}  {rel_norm[:, lay - 1].min():11.3f}")
    checked = f"l >= {FIRST_CHECKED_LAYER}, {nontrivial.sum()}/{nontrivial.size}"
    print(f"min cosine over checked candidates ({checked}): {cos[nontrivial].min():.4f}")
    print(f"min cosine over all l >= 1: {cos.min():.4f}; max relative hidden-state error: {rel.max():.2e}")

    assert rel[0] < 1e-3  # embeddings: the same dequantised table
    assert rel.max() < 0.05  # llama.cpp quantises activations to 8 bits in quantised matmuls
    assert cos[:, 0].min() >= MIN_COSINE_LAYER1
    assert nontrivial.sum() >= nontrivial.size // 2
    assert cos[nontrivial].min() >= MIN_COSINE
