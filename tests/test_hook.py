"""The C++ hook inside llama.cpp's graph, checked against independent implementations."""

from __future__ import annotations

import numpy as np
import pytest

from pyrefusal.errors import HookError, ModelError, PyrefusalError
from pyrefusal.method import intervention as iv
from pyrefusal.runtime.runtime import PlanEntry, Runtime
from pyrefusal.steering import router
from tests.tiny_model import orthogonalize, reference_residuals, write_tiny_gemma2_gguf, write_tiny_gguf

PROMPTS = ["Hello there, how are you?", "Ich kann nicht", "我不能 help", "Tell me a story about the sea."]


@pytest.fixture(scope="module")
def rt(tiny_model):
    path, _ = tiny_model
    with Runtime(path, n_ctx=1024, n_batch=256, n_seq_max=8, kv_f32=True) as r:
        yield r


def _direction(n_embd: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n_embd).astype(np.float32)


def test_llama_graph_has_the_residual_nodes(rt):
    names = rt.graph_node_names()
    assert "embd" in names
    for il in range(rt.n_layer):
        assert f"ffn_inp-{il}" in names
        assert f"l_out-{il}" in names


def test_capture_matches_numpy_reference(rt, tiny_model, tiny_spec):
    _, weights = tiny_model
    toks = [rt.tokenize(p) for p in PROMPTS]
    acts, _ = rt.capture(toks, positions=[-3, -2, -1])
    assert acts.shape == (len(PROMPTS), 3, rt.n_layer + 1, rt.n_embd)
    for i, t in enumerate(toks):
        ref = reference_residuals(weights, tiny_spec, t)  # (n_layer+1, n_tokens, n_embd)
        for j, p in enumerate([-3, -2, -1]):
            np.testing.assert_allclose(acts[i, j], ref[:, p, :], atol=2e-4, rtol=1e-4)


def test_ablation_leaves_no_component_along_direction(rt):
    r = _direction(rt.n_embd)
    rhat = r / np.linalg.norm(r)
    toks = [rt.tokenize(p) for p in PROMPTS]
    base, _ = rt.capture(toks, positions=[0, -1])
    abl, _ = rt.capture(toks, positions=[0, -1], ablation=rhat[None, :])
    proj_base = np.abs(base @ rhat)
    proj = np.abs(abl @ rhat)  # (n_prompts, n_pos, n_layers+1)
    norms = np.linalg.norm(abl, axis=-1)
    assert proj_base.max() > 0.05 * np.linalg.norm(base, axis=-1).max()  # there was something to remove
    assert np.all(proj <= 1e-4 * norms)


def test_hook_ablation_equals_orthogonalized_weights(rt, tiny_model, tiny_spec, tmp_path):
    _, weights = tiny_model
    r = _direction(rt.n_embd, seed=3)
    ortho_path = tmp_path / "ortho.gguf"
    write_tiny_gguf(ortho_path, tiny_spec, weights=orthogonalize(weights, r))
    toks = [rt.tokenize(p) for p in PROMPTS]
    base = rt.last_logits(toks)
    router.arm(rt, iv.ablation(r))
    try:
        hooked = rt.last_logits(toks)
    finally:
        rt.clear_plan()
    with Runtime(ortho_path, n_ctx=1024, n_batch=256, n_seq_max=8, kv_f32=True, hook=False) as ortho:
        expected = ortho.last_logits(toks)
    assert np.abs(base - expected).max() > 0.05  # ablation changes the logits
    np.testing.assert_allclose(hooked, expected, atol=2e-4)


def test_ablating_twice_equals_once_and_zero_addition_is_identity(rt):
    r = _direction(rt.n_embd, seed=4)
    toks = [rt.tokenize(p) for p in PROMPTS]
    base = rt.last_logits(toks)
    router.arm(rt, iv.ablation(np.stack([r, 2 * r])))  # same span twice
    twice = rt.last_logits(toks)
    router.arm(rt, iv.ablation(r))
    once = rt.last_logits(toks)
    router.arm(rt, iv.actadd(r, layer=1, coeff=0.0))
    zero = rt.last_logits(toks)
    rt.clear_plan()
    np.testing.assert_allclose(twice, once, atol=1e-5)
    np.testing.assert_allclose(zero, base, atol=1e-6)


@pytest.mark.parametrize("layer", [1, 2])
def test_hook_addition_equals_llama_control_vector(rt, layer):
    """Addition at block input ``layer`` == llama.cpp control vector ``direction.(layer-1)``."""
    r = _direction(rt.n_embd, seed=5)
    toks = [rt.tokenize(p) for p in PROMPTS]
    base = rt.last_logits(toks)
    router.arm(rt, iv.actadd(r, layer=layer, coeff=0.7))
    hooked = rt.last_logits(toks)
    rt.clear_plan()
    if layer - 1 >= 1:
        rt.set_control_vector({layer - 1: 0.7 * r})
        cvec = rt.last_logits(toks)
        rt.set_control_vector(None)
        np.testing.assert_allclose(hooked, cvec, atol=1e-4)
    else:  # llama.cpp cannot steer the output of block 0: the runtime says so
        with pytest.raises(HookError, match="layer 0"):
            rt.set_control_vector({0: r})
    assert np.abs(hooked - base).max() > 0.05
    after = rt.last_logits(toks)
    np.testing.assert_allclose(after, base, atol=1e-6)  # control vector removed


def test_harm_ablation_keeps_addition_within_its_block(rt):
    """harm_ablation == ablation + r re-added inside block `layer`, removed at the next block input."""
    r = _direction(rt.n_embd, seed=6)
    rhat = r / np.linalg.norm(r)
    toks = [rt.tokenize(p) for p in PROMPTS[:2]]
    compiled = router.plan(iv.harm_ablation(r, layer=1), rt.nodes, rt.n_layer, rt.n_embd)
    entries = compiled[0]
    assert entries["l_out-0"].add_index >= 0 and entries["ffn_inp-1"].add_index >= 0
    assert entries["l_out-1"].add_index == -1 and entries["l_out-1"].ablate
    acts, _ = rt.capture(toks, positions=[0, -1], layers=[0, 1, 2], armed=compiled)
    # block input 1 carries exactly +r along r̂; block inputs 0 and 2 carry nothing
    np.testing.assert_allclose(acts[:, :, 1] @ rhat, np.linalg.norm(r), rtol=1e-4)
    for lay in (0, 2):
        assert np.abs(acts[:, :, lay] @ rhat).max() < 1e-4 * np.linalg.norm(acts[:, :, lay], axis=-1).max()


def test_batched_greedy_equals_sequential(rt):
    toks = [rt.chat_tokens(p) for p in PROMPTS]
    batched = rt.generate(toks, max_new_tokens=24)
    single = [rt.generate([t], max_new_tokens=24)[0] for t in toks]
    assert [g.tokens for g in batched] == [g.tokens for g in single]
    assert all(len(g.tokens) > 0 for g in batched)


def test_batched_greedy_under_ablation_equals_sequential(rt):
    r = _direction(rt.n_embd, seed=7)
    toks = [rt.chat_tokens(p) for p in PROMPTS]
    router.arm(rt, iv.ablation(r))
    try:
        batched = rt.generate(toks, max_new_tokens=16)
        single = [rt.generate([t], max_new_tokens=16)[0] for t in toks]
    finally:
        rt.clear_plan()
    assert [g.tokens for g in batched] == [g.tokens for g in single]


def test_eoi_tokens_from_template(rt):
    eoi = rt.eoi_tokens()
    assert rt.detokenize(eoi, special=True) == "<|im_end|>\n<|im_start|>assistant\n"
    for p in PROMPTS:
        assert rt.chat_tokens(p)[-len(eoi) :] == eoi


def test_truncated_gguf_is_a_clear_error(tiny_model, tmp_path):
    path, _ = tiny_model
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        Runtime(bad)
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"hello world")
    with pytest.raises(ModelError, match="not a GGUF"):
        Runtime(notgguf)


def test_wrong_width_and_empty_inputs_are_clear_errors(rt):
    with pytest.raises(HookError, match="n_embd"):
        router.arm(rt, iv.ablation(np.ones(rt.n_embd + 1)))
    with pytest.raises(HookError, match="zero direction"):
        router.arm(rt, iv.ablation(np.zeros(rt.n_embd)))
    with pytest.raises(PyrefusalError, match="no prompts"):
        rt.generate([], max_new_tokens=4)
    with pytest.raises(PyrefusalError, match="no prompts"):
        rt.capture([], positions=[-1])
    # the runtime still works after the errors
    assert rt.last_logits([rt.tokenize("ok")]).shape == (1, rt.n_vocab)


def test_error_inside_the_graph_is_raised_in_python_and_recoverable(rt):
    """A plan naming a node that is not on the residual stream fails inside the callback, not with a crash."""
    assert "ffn_gate-0" in rt.graph_node_names()  # width n_ff (128), not n_embd (64)
    rt.set_plan({"ffn_gate-0": PlanEntry(ablate=True)}, np.eye(rt.n_embd, dtype=np.float32)[:1])
    with pytest.raises(HookError, match="width 128"):
        rt.last_logits([rt.tokenize("hello")])
    rt.clear_plan()
    base = rt.last_logits([rt.tokenize("hello")])
    assert np.all(np.isfinite(base))
    with pytest.raises(HookError, match="no node"):
        rt.set_plan({"not_a_node-3": PlanEntry(ablate=True)})


def test_hook_counters_and_node_listing(rt):
    r = _direction(rt.n_embd)
    rt.hook.reset_stats()
    router.arm(rt, iv.ablation(r))
    rt.last_logits([rt.tokenize("hello world")])
    rt.clear_plan()
    s = rt.hook.stats()
    assert s["observed"] == 1 + 2 * rt.n_layer  # embd + ffn_inp + l_out per layer, one decode
    assert s["device_nodes"] == 0 and s["rows_ablated"] > 0


# A Qwen2.5-style ChatML template: a default system prompt when the conversation has none.
_DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful bot.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_paper_prompt_format_has_no_system_turn(tmp_path):
    path = tmp_path / "default-system.gguf"
    write_tiny_gguf(path, chat_template=_DEFAULT_SYSTEM_TEMPLATE)
    rt = Runtime(path, n_ctx=256, n_seq_max=2, n_threads=1)
    try:
        assert rt.format_chat("Hi").startswith("<|im_start|>system\nYou are a helpful bot.")
        template_eoi = rt.eoi_tokens()
        rt.prompt_format = "paper"
        # the tiny (llama-vocab) tokenizer adds BOS, so the paper's prompt starts with it, once
        assert rt.meta("tokenizer.ggml.add_bos_token") == "true"
        assert rt.format_chat("Hi") == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        assert rt.chat_tokens("Hi")[:2] == [1, 3]  # <s> <|im_start|>
        assert rt.eoi_tokens() == template_eoi  # same post-instruction tokens, recomputed
        # an explicit system prompt goes through the template in either format
        assert rt.format_chat("Hi", "Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>")
        with pytest.raises(ValueError, match="template' or 'paper"):
            rt.prompt_format = "none"  # type: ignore[assignment]
    finally:
        rt.close()
    # a template of another family, or ChatML with other role names, is refused with the way out
    for name, template in (
        ("inst", "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"),
        (
            "human",
            (
                "{% for m in messages %}{{ '<|im_start|>human\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                "{{ '<|im_start|>bot\\n' }}"
            ),
        ),
    ):
        other = tmp_path / f"{name}.gguf"
        write_tiny_gguf(other, chat_template=template)
        rt = Runtime(other, n_ctx=256, n_seq_max=2, n_threads=1)
        try:
            rt.prompt_format = "paper"
            with pytest.raises(ModelError, match="--prompt-format template"):
                rt.format_chat("Hi")
        finally:
            rt.close()


def test_gemma2_residual_nodes_scaled_embeddings_and_exact_ablation(tmp_path):
    """Gemma 2 (sandwich norms, sqrt(d)-scaled embeddings, tied head): the hook edits its own nodes."""
    path = tmp_path / "gemma2.gguf"
    w = write_tiny_gemma2_gguf(path)
    with Runtime(path, n_ctx=512, n_seq_max=4, n_threads=1) as rt:
        assert (rt.arch, rt.family, rt.nodes.block_input(0)) == ("gemma2", "gemma2", "inp_scaled")
        rt.check_residual_nodes()  # every node the interventions edit exists
        prompts = [rt.chat_tokens(p) for p in PROMPTS]
        acts, _ = rt.capture(prompts, positions=[-1, -2])  # (n, 2, n_layer + 1, n_embd)
        # block input 0 is the embedding row scaled by sqrt(n_embd), as the Gemma graph computes it
        emb = w["token_embd.weight"]  # (n_vocab, n_embd)
        for i, toks in enumerate(prompts):
            np.testing.assert_allclose(acts[i, 0, 0], emb[toks[-1]] * np.sqrt(emb.shape[1]), rtol=1e-5, atol=1e-5)
        # ablation at every residual write leaves no component along r at any block input
        r = np.random.default_rng(3).standard_normal(rt.n_embd).astype(np.float32)
        r /= np.linalg.norm(r)
        before = np.abs(acts @ r).max()
        abl, _ = rt.capture(prompts, positions=[-1, -2], ablation=r[None, :])
        after = np.abs(abl @ r) / np.linalg.norm(abl, axis=-1)
        assert before > 0.1 and after.max() < 1e-5
        # weight edits cannot reproduce this through the post-norms: the in-graph path is refused, the hook used
        assert router.arm(rt, iv.ablation(r), path="auto") == "hook"
        gens = rt.generate(prompts[:2], max_new_tokens=4)
        rt.clear_plan()
        assert all(len(g.tokens) >= 1 for g in gens)
