"""Capability metrics (first-token KL, perplexity) and Runtime.token_logprobs on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pyrefusal.errors import DataError, PyrefusalError
from pyrefusal.method import intervention as iv
from pyrefusal.runtime.runtime import Runtime
from pyrefusal.stages.measure import (
    CapabilityReport,
    capability_report,
    first_token_kl,
    heldout_texts,
    perplexity,
    text_nll,
)
from pyrefusal.steering import router
from tests.tiny_model import BOS_ID, reference_logits

TEXTS = ["Hello there, how are you?", "Tell me a story about the sea.", "I cannot help with that", "ok"]


@pytest.fixture(scope="module")
def rt(tiny_model):
    path, _ = tiny_model
    with Runtime(path, n_ctx=1024, n_batch=256, n_seq_max=8, kv_f32=True) as r:
        yield r


def _reference_logprobs(weights, spec, tokens: list[int]) -> np.ndarray:
    """log p(t[i+1] | t[:i+1]) from the NumPy forward pass, with its own float64 log-softmax."""
    logits = reference_logits(weights, spec, tokens)[:-1]  # (n-1, V) float64
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return logp[np.arange(len(tokens) - 1), tokens[1:]]


def test_token_logprobs_match_numpy_reference(rt, tiny_model, tiny_spec):
    _, weights = tiny_model
    prompts = [rt.tokenize(t, add_special=True) for t in TEXTS] + [[BOS_ID]]
    got = rt.token_logprobs(prompts)
    assert len(got) == len(prompts)
    for toks, lp in zip(prompts, got, strict=True):
        assert lp.dtype == np.float64 and lp.shape == (len(toks) - 1,)
        if len(toks) > 1:
            np.testing.assert_allclose(lp, _reference_logprobs(weights, tiny_spec, toks), atol=2e-3, rtol=1e-3)


def test_token_logprobs_small_decodes_agree(tiny_model):
    """Sequences split across several decodes (and a group per sequence) give the same numbers."""
    path, _ = tiny_model
    with Runtime(path, n_ctx=1024, n_batch=256, n_seq_max=8, kv_f32=True) as big:
        prompts = [big.tokenize(t, add_special=True) for t in TEXTS]
        ref = big.token_logprobs(prompts)
    with Runtime(path, n_ctx=64, n_batch=5, n_seq_max=1, kv_f32=True) as small:
        got = small.token_logprobs(prompts)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_token_logprobs_rejects_empty(rt):
    with pytest.raises(PyrefusalError, match="empty prompt"):
        rt.token_logprobs([[BOS_ID, 300], []])
    with pytest.raises(PyrefusalError, match="no prompts"):
        rt.token_logprobs([])


def test_perplexity_is_exp_mean_nll_of_reference(rt, tiny_model, tiny_spec):
    _, weights = tiny_model
    # The tiny GGUF sets add_bos_token, so every text starts with BOS and all its tokens are predicted.
    lps = [_reference_logprobs(weights, tiny_spec, [BOS_ID, *rt.tokenize(t)]) for t in TEXTS]
    expected = math.exp(-np.concatenate(lps).mean())
    got = perplexity(rt, TEXTS)
    assert got == pytest.approx(expected, rel=1e-3)
    total, n = text_nll(rt, TEXTS)
    assert n == sum(len(rt.tokenize(t)) for t in TEXTS)
    assert math.exp(total / n) == pytest.approx(got, rel=1e-12)


def test_perplexity_windows_long_texts(rt, tiny_model, tiny_spec):
    _, weights = tiny_model
    body = rt.tokenize(TEXTS[1])  # 2 windows of (BOS + 5 tokens) and a remainder
    windows = [[BOS_ID, *body[i : i + 5]] for i in range(0, len(body), 5)]
    lps = np.concatenate([_reference_logprobs(weights, tiny_spec, w) for w in windows])
    assert perplexity(rt, [TEXTS[1]], max_tokens=6) == pytest.approx(math.exp(-lps.mean()), rel=1e-3)
    with pytest.raises(PyrefusalError, match="max_tokens"):
        perplexity(rt, TEXTS, max_tokens=1)


def test_first_token_kl_baseline_is_zero_and_ablation_is_not(rt):
    prompts = [rt.chat_tokens(t) for t in TEXTS]
    assert first_token_kl(rt, prompts, lambda r: None) == 0.0
    assert first_token_kl(rt, prompts, lambda r: router.arm(r, iv.baseline())) == 0.0
    direction = np.random.default_rng(3).standard_normal(rt.n_embd)
    kl = first_token_kl(rt, prompts, lambda r: router.arm(r, iv.ablation(direction)))
    assert kl > 1e-4
    # the plan is cleared afterwards: the baseline is unchanged
    assert first_token_kl(rt, prompts, lambda r: None) == 0.0


def test_ablation_changes_perplexity_and_report(rt):
    direction = np.random.default_rng(4).standard_normal(rt.n_embd)
    prompts = [rt.chat_tokens(t) for t in TEXTS[:2]]
    rep = capability_report(
        rt, TEXTS, prompts, lambda r: router.arm(r, iv.ablation(direction)), condition="ablation", text_source="unit"
    )
    assert isinstance(rep, CapabilityReport)
    assert rep.baseline_ppl == pytest.approx(perplexity(rt, TEXTS), rel=1e-9)
    assert rep.intervention_ppl != pytest.approx(rep.baseline_ppl, rel=1e-4)
    assert rep.ppl_ratio == pytest.approx(rep.intervention_ppl / rep.baseline_ppl)
    assert rep.first_token_kl > 0 and rep.n_kl_prompts == 2 and rep.n_texts == len(TEXTS)
    assert rep.to_dict()["condition"] == "ablation"
    assert perplexity(rt, TEXTS) == pytest.approx(rep.baseline_ppl, rel=1e-9)  # plan cleared


def test_heldout_texts_sources(tmp_path, polyrefuse_dir):
    texts, source = heldout_texts(polyrefuse_dir, n=5)
    assert len(texts) == 5 and source == "polyrefuse:en/val/harmless" and all(texts)
    f = tmp_path / "held.txt"
    f.write_text("First passage\nstill first.\n\n\nSecond passage.\n", encoding="utf-8")
    assert heldout_texts(text_file=f) == (["First passage still first.", "Second passage."], "file:held.txt")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no text"):
        heldout_texts(text_file=tmp_path / "empty.txt")
    with pytest.raises(DataError, match="no held-out text"):
        heldout_texts()


@pytest.mark.slow
def test_real_model_perplexity_and_side_effects(polyrefuse_dir):
    """Qwen2.5-Coder-0.5B Q4_K_M: plausible perplexity on EN harmless val; a random ablation moves it."""
    from pyrefusal.data.registry import DEFAULT_MODEL, resolve_model

    try:
        model = resolve_model(DEFAULT_MODEL, progress=False)
    except PyrefusalError as e:
        pytest.skip(f"default model unavailable: {e}")
    texts, source = heldout_texts(polyrefuse_dir, n=6)
    with Runtime(model.path, n_ctx=1024, n_seq_max=8, sha256=model.sha256) as rt:
        long = rt.tokenize(" ".join(texts * 4))[:240]  # crosses the 220-token decode slices of a 152k vocab
        (lp,) = rt.token_logprobs([long])
        assert lp.shape == (239,) and np.all(lp <= 0) and np.all(np.isfinite(lp))
        direction = np.random.default_rng(0).standard_normal(rt.n_embd)
        rep = capability_report(
            rt,
            texts,
            [rt.chat_tokens(t) for t in texts[:4]],
            lambda r: router.arm(r, iv.ablation(direction)),
            condition="random_ablation",
            text_source=source,
        )
    print(rep)
    assert 2.0 < rep.baseline_ppl < 500.0
    assert rep.intervention_ppl != rep.baseline_ppl and rep.first_token_kl > 0
