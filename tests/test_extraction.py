"""pyrefusal.stages.extract: the shared activations -> filter -> candidates stage."""

from __future__ import annotations

import numpy as np
import pytest

from pyrefusal.method.directions import mean_difference
from pyrefusal.method.selection import refusal_scores
from pyrefusal.runtime.runtime import Runtime
from pyrefusal.stages.extract import MIN_FILTERED, extract_candidates, filter_by_refusal, filter_mask


def test_filter_mask_keeps_by_sign_and_falls_back_below_the_minimum():
    said: list[str] = []
    s = np.array([0.5, -1.0, 2.0, 3.0, 0.1, -0.2])
    assert filter_mask(s, True, said.append, "x").tolist() == [True, False, True, True, True, False]
    assert said == ["refusal filter: kept 4 of 6 x prompts, those the model refuses (refusal score > 0)"]
    said.clear()
    few = np.array([1.0, -1.0, -2.0, -3.0, -4.0])  # one positive < MIN_FILTERED
    assert MIN_FILTERED > 1
    assert filter_mask(few, True, said.append, "harmful train").all()
    assert len(said) == 1 and "only 1 of 5 harmful train prompts are ones the model refuses" in said[0]
    assert "all 5 are used unfiltered" in said[0] and "--no-filter" in said[0]
    assert filter_mask(few, False, said.append, "y").tolist() == [False, True, True, True, True]


@pytest.fixture(scope="module")
def rt(tiny_model):
    with Runtime(tiny_model[0], n_ctx=1024, n_seq_max=8, kv_f32=True) as r:
        yield r


def _prompts(rt: Runtime, texts: list[str]) -> list[list[int]]:
    return [rt.tokenize(t) for t in texts]


def test_extract_candidates_is_the_mean_difference_of_the_kept_prompts(rt):
    harm = _prompts(rt, [f"harmful prompt number {i}" for i in range(6)])
    less = _prompts(rt, [f"a kind request {i}, please" for i in range(6)])
    positions = (-2, -1)
    # refusal ids chosen so that the filter keeps a strict subset of at least MIN_FILTERED prompts
    _, logits = rt.capture(harm, positions, layers=range(rt.n_layer))
    ids = [int(np.argmax(logits[0]))]
    out = extract_candidates(rt, harm, less, positions, ids, filter=False, log=print, keep_activations=True)
    assert out.harmful_kept.all() and out.harmless_kept.all()
    assert out.harmful_acts is not None and out.harmful_acts.shape == (6, 2, rt.n_layer, rt.n_embd)
    assert out.harmless_acts is not None
    want = mean_difference(out.harmful_acts, out.harmless_acts, positions)
    np.testing.assert_allclose(out.candidates.vectors, want.vectors, rtol=0, atol=1e-6)

    filtered = extract_candidates(rt, harm, less, positions, ids, filter=True, log=print, label="xx")
    assert filtered.harmful_acts is None
    h = refusal_scores(rt.capture(harm, positions)[1], ids)
    l_ = refusal_scores(rt.capture(less, positions)[1], ids)
    np.testing.assert_array_equal(filtered.harmful_kept, filter_mask(h, True, print, "h"))
    np.testing.assert_array_equal(filtered.harmless_kept, filter_mask(l_, False, print, "l"))
    kept = mean_difference(
        out.harmful_acts[filtered.harmful_kept], out.harmless_acts[filtered.harmless_kept], positions
    )
    np.testing.assert_allclose(filtered.candidates.vectors, kept.vectors, rtol=0, atol=1e-6)
    assert filtered.candidates.n_harmful == int(filtered.harmful_kept.sum())


def test_filter_by_refusal_scores_one_forward_pass(rt):
    toks = _prompts(rt, [f"question {i}?" for i in range(6)])
    ids = [5, 6]
    want = filter_mask(refusal_scores(rt.last_logits(toks), ids), True, print, "v")
    np.testing.assert_array_equal(filter_by_refusal(rt, toks, ids, True, print, "v"), want)
