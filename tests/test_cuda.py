"""The hook on the GPU: the CUDA path must give what the CPU path gives, on the tiny model.

Tests marked ``gpu`` compare a fully offloaded runtime (``n_gpu_layers=999``: residual tensors in
CUDA buffers, edited in place by pyrefusal's CUDA kernel) and a partially offloaded one
(``n_gpu_layers=1``: host and device tensors in one graph) with the CPU runtime
(``n_gpu_layers=0``): same captures, same ablated and steered logits, no residual component along
the direction after ablation, and the CUDA kernel (not the generic copy-to-host path) handling
every device node. They skip, with the reason, unless pyrefusal was built with
``PYREFUSAL_CUDA=ON`` and llama.cpp can offload to a GPU. Run them with ``pytest -m gpu``.

Tolerances: llama.cpp's CUDA backend multiplies f32 matrices with TF32 tensor cores (about 10
mantissa bits), so GPU and CPU agree to ~1e-3 relative, not bit for bit; the checks compare
differences with the size of the effect being tested. The ablation itself (double-precision dot
products in the kernel) is checked tightly through the residual projection.

The counters test at the top runs everywhere (the CPU runtime reports no device nodes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from pyrefusal import _core
from pyrefusal.method import intervention as iv
from pyrefusal.runtime.runtime import Runtime, gpu_offload_supported
from pyrefusal.steering import router

PROMPTS = ["Hello there, how are you?", "Ich kann nicht", "我不能 help", "Tell me a story about the sea."]
POSITIONS = [0, -3, -2, -1]
KW = {"n_ctx": 1024, "n_batch": 256, "n_seq_max": 8, "kv_f32": True}
T = TypeVar("T")


def _no_gpu_reason() -> str | None:
    if not _core.cuda_compiled():
        return "pyrefusal._core was built without PYREFUSAL_CUDA=ON (no CUDA hook kernel)"
    if not gpu_offload_supported():
        return "llama.cpp cannot offload to a GPU (a CPU build of llama-cpp-python, or no CUDA device)"
    return None


_REASON = _no_gpu_reason()
gpu = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _direction(n_embd: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n_embd).astype(np.float32)


def _runtime(path: Path, n_gpu_layers: int) -> Iterator[Runtime]:
    with Runtime(path, n_gpu_layers=n_gpu_layers, **KW) as rt:
        yield rt


@pytest.fixture(scope="module")
def cpu(tiny_model: tuple[Path, dict[str, np.ndarray]]) -> Iterator[Runtime]:
    yield from _runtime(tiny_model[0], 0)


@pytest.fixture(scope="module")
def full(tiny_model: tuple[Path, dict[str, np.ndarray]]) -> Iterator[Runtime]:
    if _REASON:
        pytest.skip(_REASON)
    yield from _runtime(tiny_model[0], 999)


@pytest.fixture(scope="module")
def partial(tiny_model: tuple[Path, dict[str, np.ndarray]]) -> Iterator[Runtime]:
    if _REASON:
        pytest.skip(_REASON)
    yield from _runtime(tiny_model[0], 1)


def _tokens(rt: Runtime) -> list[list[int]]:
    return [rt.tokenize(p) for p in PROMPTS]


def _counted(rt: Runtime, fn: Callable[[], T]) -> tuple[T, dict[str, int]]:
    """``fn()``'s result and the hook counters it produced."""
    assert rt.hook is not None
    rt.hook.reset_stats()
    out = fn()
    return out, dict(rt.hook.stats())


def _under(rt: Runtime, spec: iv.Intervention, fn: Callable[[], T], path: str = "hook") -> T:
    """``fn()`` with ``spec`` armed on ``rt`` (through ``path``), disarmed afterwards."""
    router.arm(rt, spec, path=path)  # type: ignore[arg-type]
    try:
        return fn()
    finally:
        router.disarm(rt)


def _assert_same_effect(got: np.ndarray, expected: np.ndarray, base: np.ndarray) -> None:
    """The intervention moves the CPU logits (``base`` -> ``expected``) by > 0.5, and the GPU's
    ``got`` is within 5% of that move of the CPU's."""
    effect = np.abs(expected - base).max()
    assert effect > 0.5  # the intervention matters on this model
    assert np.abs(got - expected).max() < 0.05 * effect


def _max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the largest |b|."""
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- runs everywhere ---------------------------------------------------------------------------


def test_cpu_runtime_counts_host_nodes_only(cpu):
    toks = _tokens(cpu)
    r = _direction(cpu.n_embd)
    n_pos, n_layers = len(POSITIONS), cpu.n_layer + 1

    _, s = _counted(cpu, lambda: cpu.capture(toks, positions=POSITIONS, ablation=r[None, :] / np.linalg.norm(r)))
    assert s["observed"] > 0
    assert s["asked"] >= s["observed"]
    assert s["device_nodes"] == 0
    assert s["cuda_kernel_nodes"] == 0
    assert s["rows_captured"] == len(toks) * n_pos * n_layers
    assert s["rows_ablated"] >= sum(len(t) for t in toks)  # at least every token at embd
    assert s["rows_added"] == 0

    cpu.clear_plan()
    _, idle = _counted(cpu, lambda: cpu.last_logits(toks))
    assert idle["asked"] > 0
    assert idle["observed"] == idle["device_nodes"] == idle["rows_ablated"] == 0

    assert cpu.hook is not None
    cpu.hook.reset_stats()
    assert all(v == 0 for v in cpu.hook.stats().values())


# --- GPU -----------------------------------------------------------------------------------------


def _check_device_counters(s: dict[str, int], *, host_nodes_expected: bool) -> None:
    assert s["device_nodes"] > 0, s
    assert s["cuda_kernel_nodes"] > 0, s
    # every device node is f32 in a CUDA buffer: the kernel handles all of them, no host round trip
    assert s["cuda_kernel_nodes"] == s["device_nodes"], s
    if host_nodes_expected:
        assert s["observed"] > s["device_nodes"], s


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("which", ["full", "partial"])
def test_gpu_capture_matches_cpu(which, cpu, request):
    rt: Runtime = request.getfixturevalue(which)
    toks = _tokens(cpu)
    ref, ref_logits = cpu.capture(toks, positions=POSITIONS)
    (acts, logits), s = _counted(rt, lambda: rt.capture(toks, positions=POSITIONS))
    assert acts.shape == ref.shape
    assert _max_rel_diff(acts, ref) < 1e-2
    assert _max_rel_diff(logits, ref_logits) < 1e-2
    # `embd` (get_rows, never offloaded) is a host tensor; with one offloaded layer, usually the first
    # layers' nodes too
    _check_device_counters(s, host_nodes_expected=which == "partial")
    assert s["rows_captured"] == len(toks) * len(POSITIONS) * (rt.n_layer + 1)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("which", ["full", "partial"])
def test_gpu_ablated_logits_match_cpu(which, cpu, request):
    rt: Runtime = request.getfixturevalue(which)
    toks = _tokens(cpu)
    r = _direction(cpu.n_embd, seed=3)
    base = cpu.last_logits(toks)
    expected = _under(cpu, iv.ablation(r), lambda: cpu.last_logits(toks))
    got, s = _under(rt, iv.ablation(r), lambda: _counted(rt, lambda: rt.last_logits(toks)))
    _assert_same_effect(got, expected, base)
    assert _max_rel_diff(got, expected) < 1e-2
    _check_device_counters(s, host_nodes_expected=which == "partial")
    assert s["rows_ablated"] > 0


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("which", ["full", "partial"])
def test_gpu_ablation_leaves_no_component_along_direction(which, request):
    rt: Runtime = request.getfixturevalue(which)
    r = _direction(rt.n_embd, seed=5)
    rhat = r / np.linalg.norm(r)
    toks = _tokens(rt)
    base, _ = rt.capture(toks, positions=POSITIONS)
    abl, _ = rt.capture(toks, positions=POSITIONS, ablation=rhat[None, :])
    assert np.abs(base @ rhat).max() > 0.05 * np.linalg.norm(base, axis=-1).max()
    proj = np.abs(abl @ rhat)  # (n_prompts, n_pos, n_layer + 1)
    assert np.all(proj <= 1e-4 * np.linalg.norm(abl, axis=-1))


@pytest.mark.gpu
@gpu
def test_gpu_ablation_of_several_directions_matches_cpu(full, cpu):
    """Three orthonormal directions at once (the kernel loops over them within one launch)."""
    q, _ = np.linalg.qr(np.random.default_rng(11).standard_normal((cpu.n_embd, 3)))
    dirs = q.T.astype(np.float32)  # (3, n_embd), orthonormal rows
    toks = _tokens(cpu)
    base = cpu.last_logits(toks)
    spec = iv.ablation(dirs)
    expected = _under(cpu, spec, lambda: cpu.last_logits(toks))
    got, s = _under(full, spec, lambda: _counted(full, lambda: full.last_logits(toks)))
    acts, _ = full.capture(toks, positions=POSITIONS, ablation=dirs)  # capture arms its own plan
    _assert_same_effect(got, expected, base)
    _check_device_counters(s, host_nodes_expected=False)
    # no component along any of the three directions, at any captured position and layer
    proj = np.abs(acts @ dirs.T)  # (n_prompts, n_pos, n_layer + 1, 3)
    assert np.all(proj <= 1e-4 * np.linalg.norm(acts, axis=-1, keepdims=True))


@pytest.mark.gpu
@gpu
def test_gpu_in_graph_lora_ablation_matches_the_cpu_hook(full, cpu):
    """The rank-1 LoRA path (llama.cpp's own CUDA kernels) gives the hook's ablation on the GPU too."""
    toks = _tokens(cpu)
    r = _direction(cpu.n_embd, seed=13)
    base = cpu.last_logits(toks)
    expected = _under(cpu, iv.ablation(r), lambda: cpu.last_logits(toks))
    assert router.route(full, iv.ablation(r), "graph").path in ("graph", "graph+hook")
    got = _under(full, iv.ablation(r), lambda: full.last_logits(toks), path="graph")
    _assert_same_effect(got, expected, base)


@pytest.mark.gpu
@gpu
def test_gpu_addition_matches_cpu(full, cpu):
    toks = _tokens(cpu)
    r = _direction(cpu.n_embd, seed=7)
    base = cpu.last_logits(toks)
    spec = iv.actadd(r, layer=1, coeff=2.0)
    expected = _under(cpu, spec, lambda: cpu.last_logits(toks))
    got, s = _under(full, spec, lambda: _counted(full, lambda: full.last_logits(toks)))
    _assert_same_effect(got, expected, base)
    assert s["rows_added"] > 0
    assert s["cuda_kernel_nodes"] > 0


@pytest.mark.gpu
@gpu
def test_gpu_ablated_generation_matches_cpu_up_to_near_ties(full, cpu):
    """Greedy decoding (one row per sequence per decode) under ablation + addition.

    A GPU token may differ from the CPU's only where the CPU's top-2 logit margin is within the
    TF32 noise; the first such step is checked by teacher-forcing the CPU on the common prefix.
    """
    toks = _tokens(cpu)
    r = _direction(cpu.n_embd, seed=9)
    spec = iv.harm_ablation(r, layer=1)
    outs = {
        rt.n_gpu_layers: _under(rt, spec, lambda rt=rt: [g.tokens for g in rt.generate(toks, 8, stop_at_eog=False)])
        for rt in (cpu, full)
    }
    router.arm(cpu, spec)
    try:
        for prompt, a, b in zip(toks, outs[0], outs[999], strict=True):
            k = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
            if k is None:
                continue
            logits = cpu.last_logits([prompt + a[:k]])[0]
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] < 0.5, f"GPU diverged at step {k} where the CPU margin is {top2[1] - top2[0]:.3f}"
    finally:
        cpu.clear_plan()
