"""The runtime layer's seams: the ModelRunner protocol, the C API owners, the one control-vector packer, the
family table."""

from __future__ import annotations

import numpy as np
import pytest

from pyrefusal import families
from pyrefusal.errors import HookError, PyrefusalError
from pyrefusal.runtime import KNOWN_ARCHITECTURES, ModelRunner, PlanEntry, ResidualNodes, Runtime, capi


def test_runtime_satisfies_the_model_runner_protocol(tiny_model):
    path, _ = tiny_model
    with Runtime(path, n_ctx=256, n_batch=64, n_seq_max=2) as rt:
        runner: ModelRunner = rt  # the assignment a type checker verifies
        assert isinstance(runner, ModelRunner)
        members = [m for m in dir(ModelRunner) if not m.startswith("_")] + list(ModelRunner.__annotations__)
        missing = [m for m in members if not hasattr(rt, m)]
        assert not missing, f"Runtime lacks ModelRunner members {missing}"


def test_owners_close_idempotently_and_refuse_use_after_close(tiny_model):
    path, _ = tiny_model
    rt = Runtime(path, n_ctx=256, n_batch=64, n_seq_max=2)
    assert rt.tokenize("hello")
    rt.close()
    rt.close()  # idempotent
    with pytest.raises(PyrefusalError, match="closed"):
        rt.meta("general.architecture")
    with capi.Model(path, n_gpu_layers=0, use_extra_bufts=False) as model:
        ctx = capi.Context(model, capi.ContextParams(n_ctx=64, n_batch=16, n_seq_max=1, n_threads=1))
        ctx.close()
        ctx.close()
    assert model.closed


def test_pack_control_vector_rows_and_layer_check():
    v = np.arange(4, dtype=np.float32)
    data = capi.pack_control_vector({1: v, 3: 2 * v}, n_embd=4, n_layer=4)  # (n_layer - 1, n_embd)
    assert data.shape == (3, 4) and data.dtype == np.float32
    np.testing.assert_array_equal(data, [v, np.zeros(4), 2 * v])
    with pytest.raises(HookError, match=r"must be in 1\.\.3 \(llama.cpp cannot steer layer 0\)"):
        capi.pack_control_vector({0: v}, n_embd=4, n_layer=4)
    with pytest.raises(HookError, match=r"1\.\.3"):
        capi.pack_control_vector({4: v}, n_embd=4, n_layer=4)


def test_family_table():
    assert families.detect_family("qwen2", None) == "qwen2"
    assert families.detect_family("gemma2", "<start_of_turn>") == "gemma2"
    assert families.detect_family("llama", "... <|start_header_id|> ...") == "llama3"
    assert families.detect_family("llama", "<|im_start|>") is None
    assert families.detect_family("qwen3", "<|im_start|>") is None
    fmt = families.detect_chat_format("{{ '<|im_start|>' }}")
    assert fmt is not None and fmt.name == "chatml" and fmt.system_role
    assert families.detect_chat_format("plain") is None
    assert not families.CHAT_FORMATS["gemma"].system_role
    assert frozenset({"llama", "qwen2", "qwen3", "mistral3"}) == families.LORA_EXACT_ARCHITECTURES
    assert KNOWN_ARCHITECTURES["gemma2"] == ResidualNodes(embd="inp_scaled", attn_resid="sa_out-{il}")
    assert families.residual_nodes("unknown-arch") == ResidualNodes()
    assert families.PAPER_REFUSAL_OPENINGS["qwen2"]["ja"] == ("申し訳", "私は")
    assert "ru" not in families.PAPER_REFUSAL_OPENINGS["gemma2"]
    assert PlanEntry() == PlanEntry(ablate=False, add_index=-1, capture_layer=-1)


def test_runtime_facade_delegates_to_its_parts(tiny_model):
    from pyrefusal import settings
    from pyrefusal.runtime import PromptFormat, Timings

    assert PromptFormat is settings.PromptFormat  # one definition, in the foundation layer
    path, _ = tiny_model
    with Runtime(path, n_ctx=256, n_batch=64, n_seq_max=2, hook=False) as rt:
        with pytest.raises(HookError, match="hook=True"):
            rt.graph_node_names()
        with pytest.raises(HookError, match="hook=True"):
            rt.capture([rt.tokenize("hello")], [-1])
        rt.clear_plan()  # no hook, nothing armed: nothing to do
        rt.last_logits([rt.tokenize("hello")])
        assert rt.timings.decodes == 1 and rt.timings.prompt_tokens == len(rt.tokenize("hello"))
        rt.timings = Timings()  # the decoder counts into the runtime's (new) timings
        rt.last_logits([rt.tokenize("hello")])
        assert rt.timings.decodes == 1
        rt.share_prefix = False
        assert rt.share_prefix is False
