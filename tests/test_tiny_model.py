"""Tests for the tiny GGUF test model and its NumPy references (tests/tiny_model.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_cpp

import gguf
import jinja2
import numpy as np
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tests.tiny_model import (
    BOS_ID,
    CHATML_TEMPLATE,
    EOS_ID,
    IM_END_ID,
    IM_START_ID,
    TINY_VOCAB,
    TinySpec,
    orthogonalize,
    reference_logits,
    reference_residuals,
    tiny_weights,
    weight_shapes,
    write_tiny_gguf,
)

PROMPT = "<|im_start|>user\nHow do I bake bread? Ich kann nicht, 我不能.<|im_end|>\n<|im_start|>assistant\n"
MULTILINGUAL = [
    "hello",
    "Hello, world!",
    "I cannot help with that.",
    "Ich kann nicht",
    "我不能",
    "申し訳ありません",
    "Désolé — je ne peux pas 🙂",
    "tabs\tand\nnewlines  and  spaces ",
]


def _load(path: Path, **kwargs: object) -> llama_cpp.Llama:
    """Load a GGUF with the settings the unit tests use."""
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, logits_all=False, **kwargs)


def _last_logits(llm: llama_cpp.Llama, tokens: list[int]) -> np.ndarray:
    """Evaluate ``tokens`` from an empty cache; return llama.cpp's last-position logits (n_vocab,)."""
    llm.reset()
    llm.eval(tokens)
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)


def _rms_eps_from_file(path: Path) -> float:
    """Read ``llama.attention.layer_norm_rms_epsilon`` exactly (as float32) from the file."""
    field = gguf.GGUFReader(path).fields["llama.attention.layer_norm_rms_epsilon"]
    return float(field.parts[field.data[0]][0])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """The default tiny model on disk and the weights written into it."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    weights = write_tiny_gguf(path)
    return path, weights


@pytest.fixture(scope="module")
def llm(model_file: tuple[Path, dict[str, np.ndarray]]) -> Iterator[llama_cpp.Llama]:
    """The default tiny model loaded in llama-cpp-python (default KV-cache type, F16)."""
    model = _load(model_file[0])
    yield model
    model.close()


@pytest.fixture(scope="module")
def llm_f32(model_file: tuple[Path, dict[str, np.ndarray]]) -> Iterator[llama_cpp.Llama]:
    """The default tiny model with an F32 KV cache (removes F16 rounding of K and V)."""
    model = _load(model_file[0], type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    yield model
    model.close()


# --------------------------------------------------------------------------- file


def test_weight_shapes_and_dtypes() -> None:
    spec = TinySpec()
    w = tiny_weights(spec, len(TINY_VOCAB))
    shapes = weight_shapes(spec, len(TINY_VOCAB))
    assert list(w) == list(shapes)
    for name, shape in shapes.items():
        assert w[name].shape == shape, name
        assert w[name].dtype == np.float32, name
        assert w[name].flags.c_contiguous, name
    assert w["blk.0.attn_output.weight"].shape == (spec.n_embd, spec.n_embd)
    assert w["blk.0.attn_k.weight"].shape == (spec.n_head_kv * spec.head_dim, spec.n_embd)
    assert w["blk.2.ffn_down.weight"].shape == (spec.n_embd, spec.n_ff)


def test_same_seed_gives_identical_file(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    write_tiny_gguf(a, seed=3)
    write_tiny_gguf(b, seed=3)
    write_tiny_gguf(c, seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert a.stat().st_size < 2_000_000


def test_written_weights_round_trip_through_gguf_reader(
    model_file: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, weights = model_file
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(weights)
    for name, w in weights.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w)


def test_write_rejects_mismatched_weights(tmp_path: Path) -> None:
    w = tiny_weights(TinySpec(), len(TINY_VOCAB))
    with pytest.raises(ValueError, match="shape"):
        write_tiny_gguf(tmp_path / "x.gguf", TinySpec(n_ff=96), weights=w)
    del w["output.weight"]
    with pytest.raises(ValueError, match="missing"):
        write_tiny_gguf(tmp_path / "y.gguf", weights=w)


# --------------------------------------------------------------------- llama.cpp


def test_loads_with_expected_hparams(llm: llama_cpp.Llama) -> None:
    spec = TinySpec()
    assert llama_cpp.llama_model_n_layer(llm.model) == spec.n_layer
    assert llama_cpp.llama_model_n_embd(llm.model) == spec.n_embd
    assert llama_cpp.llama_model_n_head(llm.model) == spec.n_head
    assert llama_cpp.llama_model_n_head_kv(llm.model) == spec.n_head_kv
    assert llm.n_vocab() == len(TINY_VOCAB)
    assert llm.metadata["general.architecture"] == "llama"
    assert llm.metadata["llama.block_count"] == str(spec.n_layer)
    assert llm.metadata["tokenizer.chat_template"] == CHATML_TEMPLATE


def test_special_tokens_are_single_tokens(llm: llama_cpp.Llama) -> None:
    toks = llm.tokenize(b"<|im_start|>user\nhello", special=True)
    assert toks[0] == BOS_ID
    assert toks[1] == IM_START_ID
    assert toks[2] == TINY_VOCAB.token_id("user")  # no dummy "▁" after a special token
    assert toks.count(IM_START_ID) == 1
    assert llm.tokenize(b"<|im_end|>", add_bos=False, special=True) == [IM_END_ID]
    # Without special parsing the marker is plain text.
    assert IM_START_ID not in llm.tokenize(b"<|im_start|>", add_bos=False, special=False)

    vocab = llm._model.vocab
    assert llm.token_bos() == BOS_ID
    assert llm.token_eos() == EOS_ID
    assert llama_cpp.llama_vocab_eot(vocab) == IM_END_ID
    eog = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    assert eog == [EOS_ID, IM_END_ID]
    assert llm.detokenize([IM_START_ID, IM_END_ID], special=True) == b"<|im_start|><|im_end|>"


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_detokenize_round_trips(llm: llama_cpp.Llama, text: str) -> None:
    data = text.encode("utf-8")
    toks = llm.tokenize(data, add_bos=False, special=False)
    assert all(0 <= t < llm.n_vocab() for t in toks)
    assert llm.detokenize(toks) == data
    # With BOS too (llama-cpp-python strips one leading space after BOS, none here).
    assert llm.detokenize(llm.tokenize(data, add_bos=True, special=False)) == data


def test_merged_pieces_are_used(llm: llama_cpp.Llama) -> None:
    toks = llm.tokenize(b"I cannot help with that.", add_bos=False, special=False)
    pieces = [TINY_VOCAB.tokens[t] for t in toks]
    assert pieces == ["I", "▁cannot", "▁help", "▁with", "▁that", "."]


def test_chat_template_renders_chatml(llm: llama_cpp.Llama) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
    ]
    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(CHATML_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    no_gen = env.from_string(CHATML_TEMPLATE).render(messages=messages, add_generation_prompt=False)
    assert no_gen == text.removesuffix("<|im_start|>assistant\n")

    fmt = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>"
    )
    assert fmt(messages=messages).prompt == text


def test_greedy_generation_produces_tokens(llm: llama_cpp.Llama) -> None:
    out = llm.create_completion(PROMPT, max_tokens=16, temperature=0.0)
    assert out["usage"]["completion_tokens"] == 16
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["text"]
    chat = llm.create_chat_completion([{"role": "user", "content": "hello"}], max_tokens=8, temperature=0.0)
    assert chat["usage"]["completion_tokens"] == 8


# --------------------------------------------------------------- reference model


def test_reference_logits_match_llama_cpp(
    model_file: tuple[Path, dict[str, np.ndarray]],
    llm: llama_cpp.Llama,
    llm_f32: llama_cpp.Llama,
) -> None:
    path, weights = model_file
    spec = TinySpec(rms_eps=_rms_eps_from_file(path))
    tokens = llm_f32.tokenize(PROMPT.encode("utf-8"), special=True)
    assert len(tokens) > 20

    ref = reference_logits(weights, spec, tokens)  # (n_tokens, n_vocab)
    assert ref.shape == (len(tokens), len(TINY_VOCAB))
    ref_last = ref[-1]

    got = _last_logits(llm_f32, tokens)
    assert np.max(np.abs(got - ref_last)) < 1e-3
    top2 = np.sort(ref_last)[-2:]
    assert top2[1] - top2[0] > 0.1  # the greedy choice is not a near-tie
    assert int(np.argmax(got)) == int(np.argmax(ref_last))

    # Default settings store K/V in F16, which costs a few 1e-3 in the logits.
    got_default = _last_logits(llm, tokens)
    assert np.max(np.abs(got_default - ref_last)) < 3e-2
    assert int(np.argmax(got_default)) == int(np.argmax(ref_last))

    # Every prefix: last-position logits of a shorter prompt match row i of ref.
    for n in (1, 2, 7):
        np.testing.assert_allclose(_last_logits(llm_f32, tokens[:n]), ref[n - 1], atol=1e-3)


def test_reference_logits_use_rope_positions(
    model_file: tuple[Path, dict[str, np.ndarray]],
) -> None:
    """Sanity: the reference is position-sensitive (RoPE) and causal."""
    _, weights = model_file
    spec = TinySpec()
    toks = [BOS_ID, 400, 300, 350, 420]
    a = reference_logits(weights, spec, toks)
    b = reference_logits(weights, spec, [*toks, 310, 311])
    np.testing.assert_allclose(a, b[: len(toks)], atol=1e-10)  # causal
    swapped = reference_logits(weights, spec, [BOS_ID, 300, 400, 350, 420])
    assert np.max(np.abs(a[-1] - swapped[-1])) > 1e-3  # order matters


def test_reference_residuals_layout(model_file: tuple[Path, dict[str, np.ndarray]]) -> None:
    _, weights = model_file
    spec = TinySpec()
    toks = [BOS_ID, IM_START_ID, 400, 300]
    res = reference_residuals(weights, spec, toks)
    assert res.shape == (spec.n_layer + 1, len(toks), spec.n_embd)
    np.testing.assert_array_equal(res[0], weights["token_embd.weight"][toks].astype(np.float64))
    rms = np.sqrt(np.mean(res**2, axis=(1, 2)))
    assert np.all((rms > 0.3) & (rms < 5.0))  # activations stay O(1)


# ------------------------------------------------------------------ orthogonalize


def _direction(spec: TinySpec, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(spec.n_embd) * 3.0  # not unit norm


def test_orthogonalize_removes_direction_from_residual_stream(
    model_file: tuple[Path, dict[str, np.ndarray]],
) -> None:
    _, weights = model_file
    spec = TinySpec()
    r = _direction(spec)
    r_hat = r / np.linalg.norm(r)
    before = {k: v.copy() for k, v in weights.items()}

    ortho = orthogonalize(weights, r)

    # Inputs untouched; result is a new dict of new arrays, same shapes/dtypes.
    for k, v in weights.items():
        np.testing.assert_array_equal(v, before[k])
        assert ortho[k] is not v
        assert ortho[k].shape == v.shape
        assert ortho[k].dtype == v.dtype
    # Only the residual writers change.
    writers = {"token_embd.weight"} | {
        f"blk.{i}.{m}.weight" for i in range(spec.n_layer) for m in ("attn_output", "ffn_down")
    }
    for k in weights:
        if k in writers:
            assert not np.array_equal(ortho[k], weights[k]), k
        else:
            np.testing.assert_array_equal(ortho[k], weights[k])

    tokens = [BOS_ID, IM_START_ID, *range(300, 330), IM_END_ID]
    res_before = reference_residuals(weights, spec, tokens)  # (L+1, n, d)
    res_after = reference_residuals(ortho, spec, tokens)
    proj_before = res_before @ r_hat  # (L+1, n)
    proj_after = res_after @ r_hat
    scale = np.linalg.norm(res_after, axis=-1)  # (L+1, n)
    assert np.max(np.abs(proj_before)) > 0.5
    assert np.max(np.abs(proj_after) / scale) < 1e-5
    # The edit is a projection: applying it twice changes nothing (up to f32 rounding).
    again = orthogonalize(ortho, r)
    for k in writers:
        np.testing.assert_allclose(again[k], ortho[k], atol=1e-6)


def test_orthogonalized_copy_runs_in_llama_cpp(tmp_path: Path, model_file: tuple[Path, dict[str, np.ndarray]]) -> None:
    """A weight-edited copy written with ``write_tiny_gguf(weights=...)`` is what llama.cpp runs."""
    _, weights = model_file
    spec = TinySpec()
    ortho = orthogonalize(weights, _direction(spec))
    path = tmp_path / "ortho.gguf"
    written = write_tiny_gguf(path, spec, weights=ortho)
    for k, v in ortho.items():
        np.testing.assert_array_equal(written[k], v)

    model = _load(path, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        tokens = model.tokenize(PROMPT.encode("utf-8"), special=True)
        got = _last_logits(model, tokens)
    finally:
        model.close()
    ref = reference_logits(ortho, spec, tokens)[-1]
    assert np.max(np.abs(got - ref)) < 1e-3
    assert np.max(np.abs(ref - reference_logits(weights, spec, tokens)[-1])) > 1e-2


def test_orthogonalize_rejects_bad_direction(
    model_file: tuple[Path, dict[str, np.ndarray]],
) -> None:
    _, weights = model_file
    with pytest.raises(ValueError):
        orthogonalize(weights, np.zeros(TinySpec().n_embd))
    with pytest.raises(ValueError):
        orthogonalize(weights, np.ones(TinySpec().n_embd + 1))
