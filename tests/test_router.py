"""The steering router: one decider for pyrefusal's Runtime (hook available) and llama-cpp-python's Llama (none).

No model is run: :func:`pyrefusal.steering.router.decide` reads only the GGUF header.
"""

from __future__ import annotations

import llama_cpp  # noqa: F401  (import llama_cpp before numpy: required in CUDA processes)

import numpy as np
import pytest

from pyrefusal.errors import HookError
from pyrefusal.families import residual_nodes
from pyrefusal.method import intervention as iv
from pyrefusal.steering import router
from tests.test_export import _rewrite_gguf

N_LAYER, N_EMBD = 3, 64  # the tiny model (tests/conftest.py)


@pytest.fixture(scope="module")
def r() -> np.ndarray:
    return np.random.default_rng(5).standard_normal(N_EMBD).astype(np.float32)  # (n_embd,)


def test_same_decision_with_and_without_a_hook(tiny_model, r):
    path = tiny_model[0]
    nodes = residual_nodes("llama")
    for spec in (iv.ablation(r), iv.actadd(r, 2, -1.0), iv.baseline()):
        with_hook = router.decide(spec, path, N_LAYER, N_EMBD, "auto", nodes=nodes)
        without = router.decide(spec, path, N_LAYER, N_EMBD, "auto")
        assert with_hook.path == without.path == "graph"
        assert sorted(with_hook.cvec) == sorted(without.cvec)
        assert (with_hook.lora_directions is None) == (without.lora_directions is None)
        assert with_hook.exact and without.exact


def test_without_a_hook_the_hook_parts_are_errors_that_say_how_to_fix(tiny_model, r, tmp_path):
    path = tiny_model[0]
    with pytest.raises(router.SteeringError, match="needs pyrefusal's Runtime"):
        router.decide(iv.ablation(r), path, N_LAYER, N_EMBD, "hook")
    with pytest.raises(router.SteeringError, match=r"block input >= 2.*Runtime"):
        router.decide(iv.actadd(r, 1), path, N_LAYER, N_EMBD, "graph")
    with pytest.raises(router.SteeringError, match="path must be"):
        router.decide(iv.ablation(r), path, N_LAYER, N_EMBD, "fast")  # type: ignore[arg-type]
    with pytest.raises(HookError, match="another model"):  # SteeringError is a HookError
        router.decide(iv.ablation(np.ones(N_EMBD + 1)), path, N_LAYER, N_EMBD)
    tied = _rewrite_gguf(path, tmp_path / "tied.gguf", drop=("output.weight",))
    with pytest.raises(router.SteeringError, match="allow_inexact=True"):
        router.decide(iv.ablation(r), tied, N_LAYER, N_EMBD, "graph")
    inexact = router.decide(iv.ablation(r), tied, N_LAYER, N_EMBD, "graph", allow_inexact=True)
    assert not inexact.exact and inexact.lora_embeddings == "skip" and inexact.hook is None
    hooked = router.decide(iv.ablation(r), tied, N_LAYER, N_EMBD, "graph", nodes=residual_nodes("llama"))
    assert hooked.exact and hooked.path == "graph+hook"  # the hook ablates the embeddings
