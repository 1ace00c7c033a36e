"""Tiny random-weight ``llama`` GGUF model for unit tests, plus NumPy references.

This module builds a few-hundred-KiB F32 GGUF file that llama.cpp (as vendored by
llama-cpp-python 0.3.36) loads in milliseconds, and provides an *independent*
NumPy implementation of the same network so tests can check what llama.cpp
actually computes:

* :func:`tiny_weights` draws deterministic random weights keyed by GGUF tensor name.
* :func:`write_tiny_gguf` writes them with ``gguf-py``'s ``GGUFWriter`` together
  with a complete SentencePiece-style tokenizer and a ChatML chat template.
* :func:`reference_residuals` / :func:`reference_logits` run the forward pass in
  NumPy (pre-norm RMSNorm, RoPE in llama.cpp's ``NORM`` layout, GQA causal
  attention, SwiGLU) -- the llama.cpp graph for ``LLM_ARCH_LLAMA``.
* :func:`orthogonalize` is an independent implementation of directional
  ablation baked into the weights (Arditi et al., 2024).

Weight orientation
------------------
GGUF stores tensor dimensions fastest-first (``ne[0]`` = row length), and
``GGUFWriter.add_tensor`` writes a C-ordered NumPy array of shape ``(rows, cols)``
as ``ne = [cols, rows]``.  llama.cpp's ``build_lora_mm(W, x)`` computes ``W @ x``
with ``W`` of NumPy shape ``(out, in)``.  So every projection here has NumPy shape
``(out_features, in_features)`` and acts as ``y = W @ x`` on a column vector (or
``Y = X @ W.T`` on row-stacked tokens):

=============================  ==========================  =========================
tensor                         NumPy shape                 role
=============================  ==========================  =========================
``token_embd.weight``          ``(n_vocab, n_embd)``       row ``t`` = embedding of t
``blk.i.attn_norm.weight``     ``(n_embd,)``               RMSNorm gain
``blk.i.attn_q.weight``        ``(n_head*hd, n_embd)``     query projection
``blk.i.attn_k.weight``        ``(n_head_kv*hd, n_embd)``  key projection
``blk.i.attn_v.weight``        ``(n_head_kv*hd, n_embd)``  value projection
``blk.i.attn_output.weight``   ``(n_embd, n_head*hd)``     writes into the residual
``blk.i.ffn_norm.weight``      ``(n_embd,)``               RMSNorm gain
``blk.i.ffn_gate.weight``      ``(n_ff, n_embd)``          SwiGLU gate
``blk.i.ffn_up.weight``        ``(n_ff, n_embd)``          SwiGLU up
``blk.i.ffn_down.weight``      ``(n_embd, n_ff)``          writes into the residual
``output_norm.weight``         ``(n_embd,)``               final RMSNorm gain
``output.weight``              ``(n_vocab, n_embd)``       LM head (untied)
=============================  ==========================  =========================

(``hd`` = head dimension = ``n_embd // n_head``.)

Tokenizer choice
----------------
We use the SentencePiece-style ``llama`` tokenizer model (llama.cpp ``SPM``)
rather than GPT-2 byte-level BPE: SPM needs no merge list and no pre-tokenizer
regex name (BPE requires ``tokenizer.ggml.pre`` to be one of llama.cpp's known
names and a consistent ``merges`` list), and SPM's byte fallback (the 256 tokens
``<0x00>``..``<0xFF>``) makes every UTF-8 string encodable and exactly decodable
with a vocabulary of only a few hundred entries.  ``tokenizer.ggml.add_space_prefix``
is set to ``false`` so that ``detokenize(tokenize(s)) == s`` exactly and so that the
text following a special token (e.g. ``"user"`` after ``<|im_start|>``) is not
given a dummy leading ``"▁"`` -- llama.cpp's SPM tokenizer would otherwise insert
one after *every* special token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from pyrefusal.data.synthetic import ModelSizes, SpmVocab, add_model_metadata

__all__ = [
    "BOS_ID",
    "CHATML_TEMPLATE",
    "EOS_ID",
    "IM_END_ID",
    "IM_START_ID",
    "TINY_VOCAB",
    "UNK_ID",
    "TinySpec",
    "TinyVocab",
    "orthogonalize",
    "reference_logits",
    "reference_residuals",
    "tiny_vocab",
    "tiny_weights",
    "weight_shapes",
    "write_tiny_gguf",
]

# ---------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------

#: ChatML: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message, then
#: ``<|im_start|>assistant\n`` when ``add_generation_prompt`` is true.  Written
#: without literal newlines outside string literals so that ``trim_blocks`` /
#: ``lstrip_blocks`` (as used by llama-cpp-python's ``Jinja2ChatFormatter``) make
#: no difference.  ``'\\n'`` in the Python source is ``'\n'`` in Jinja, which Jinja
#: unescapes to a newline.
CHATML_TEMPLATE: str = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

UNK_ID = 0  #: ``<unk>`` (type UNKNOWN)
BOS_ID = 1  #: ``<s>`` (CONTROL)
EOS_ID = 2  #: ``</s>`` (CONTROL, end of generation)
IM_START_ID = 3  #: ``<|im_start|>`` (CONTROL)
IM_END_ID = 4  #: ``<|im_end|>`` (CONTROL, end of turn; EOT and therefore EOG)
_BYTE0_ID = 5  #: ``<0x00>``; byte ``b`` is token ``_BYTE0_ID + b``

_SPACE = "\u2581"  # "▁": SentencePiece's whitespace marker

# Multi-character pieces.  llama.cpp's SPM tokenizer only merges two adjacent
# symbols when their concatenation is itself a token, so every word is added
# together with all of its prefixes (e.g. "▁th" on the way to "▁the").
_WORDS: tuple[str, ...] = (
    "▁the", "▁and", "▁to", "▁of", "▁in", "▁is", "▁it", "▁you", "▁that", "▁for",
    "▁can", "▁not", "▁cannot", "▁help", "▁with", "▁this", "▁how", "▁what",
    "▁I", "▁Sure", "▁Sorry", "▁sorry", "▁here", "▁as",
    "user", "assistant", "system",
)  # fmt: skip


@dataclass(frozen=True)
class TinyVocab:
    """A tokenizer vocabulary as GGUF stores it (three parallel lists)."""

    tokens: tuple[str, ...]  # (n_vocab,) token texts
    scores: tuple[float, ...]  # (n_vocab,) SPM merge priorities (higher merges first)
    types: tuple[int, ...]  # (n_vocab,) gguf.TokenType values

    def __len__(self) -> int:
        return len(self.tokens)

    def token_id(self, text: str) -> int:
        """Return the id of the token whose text is exactly ``text``."""
        return self.tokens.index(text)


def tiny_vocab() -> TinyVocab:
    """Build the SentencePiece-style vocabulary (deterministic, ~450 tokens).

    Layout: 5 special tokens (ids 0-4), the 256 byte tokens (ids 5-260),
    ``"▁"`` and the 94 printable non-space ASCII characters, ``"▁"`` + each
    lowercase ASCII letter, then ``_WORDS`` with their prefixes.
    """
    tokens: list[str] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types: list[int] = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]
    scores: list[float] = [0.0] * len(tokens)

    assert len(tokens) == _BYTE0_ID
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(gguf.TokenType.BYTE)
        scores.append(0.0)

    # Single characters never result from a merge, so their score is irrelevant.
    singles = [_SPACE] + [chr(c) for c in range(0x21, 0x7F)]
    pieces: list[str] = [_SPACE + chr(c) for c in range(ord("a"), ord("z") + 1)]
    for word in _WORDS:
        pieces.extend(word[:k] for k in range(2, len(word) + 1))

    seen = set(tokens)
    for ch in singles:
        tokens.append(ch)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-1000.0)
        seen.add(ch)
    rank = 0
    for piece in pieces:
        if piece in seen:
            continue
        seen.add(piece)
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
        # Longer pieces get higher priority so whole words win over fragments.
        scores.append(float(len(piece)) - 1e-3 * rank)
        rank += 1

    assert len(set(tokens)) == len(tokens)
    return TinyVocab(tuple(tokens), tuple(scores), tuple(int(t) for t in types))


#: The vocabulary every tiny model uses.
TINY_VOCAB: TinyVocab = tiny_vocab()


def _suppressed_output_ids(vocab: TinyVocab) -> list[int]:
    """Token ids whose LM-head row is zeroed (see :func:`tiny_weights`)."""
    special = (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)
    return [
        i
        for i, (text, ttype) in enumerate(zip(vocab.tokens, vocab.types, strict=True))
        if ttype in special or (ttype == gguf.TokenType.BYTE and text != "<0x0A>")
    ]


# ---------------------------------------------------------------------------
# Sizes and weights
# ---------------------------------------------------------------------------


@dataclass
class TinySpec:
    """Sizes and hyper-parameters of a tiny ``llama`` model."""

    n_layer: int = 3
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 2048
    arch: str = "llama"
    rms_eps: float = 1e-5  # written as llama.attention.layer_norm_rms_epsilon
    rope_freq_base: float = 10000.0  # written as llama.rope.freq_base

    def __post_init__(self) -> None:
        if self.arch != "llama":
            raise ValueError(f"only arch 'llama' is supported, got {self.arch!r}")
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be divisible by n_head")
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head must be divisible by n_head_kv")
        if self.head_dim % 2:
            raise ValueError("head dimension must be even for RoPE")

    @property
    def head_dim(self) -> int:
        """Per-head dimension ``hd`` (llama requires n_rot == hd)."""
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        """Width of the K and V projections: ``n_head_kv * hd``."""
        return self.n_head_kv * self.head_dim


def weight_shapes(spec: TinySpec, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """NumPy shape of every tensor, keyed by GGUF tensor name (insertion order = file order)."""
    d, hd, ff = spec.n_embd, spec.head_dim, spec.n_ff
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab_size, d)}
    for i in range(spec.n_layer):
        shapes[f"blk.{i}.attn_norm.weight"] = (d,)
        shapes[f"blk.{i}.attn_q.weight"] = (spec.n_head * hd, d)
        shapes[f"blk.{i}.attn_k.weight"] = (spec.n_embd_kv, d)
        shapes[f"blk.{i}.attn_v.weight"] = (spec.n_embd_kv, d)
        shapes[f"blk.{i}.attn_output.weight"] = (d, spec.n_head * hd)
        shapes[f"blk.{i}.ffn_norm.weight"] = (d,)
        shapes[f"blk.{i}.ffn_gate.weight"] = (ff, d)
        shapes[f"blk.{i}.ffn_up.weight"] = (ff, d)
        shapes[f"blk.{i}.ffn_down.weight"] = (d, ff)
    shapes["output_norm.weight"] = (d,)
    shapes["output.weight"] = (vocab_size, d)
    return shapes


#: Std of the LM-head logits for a unit-RMS final hidden state.  Large enough
#: that greedy top-1 margins are typically > 1 logit (far above llama.cpp's
#: numerical noise), small enough that softmax is not completely saturated.
_LOGIT_STD = 6.0


def tiny_weights(spec: TinySpec, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Draw deterministic random float32 weights for a tiny llama model.

    Scaling keeps activations O(1) through the blocks: embeddings ~ N(0, 1)
    (residual RMS ~ 1), every projection ~ N(0, 1/fan_in), RMSNorm gains
    ~ 1 + N(0, 0.1^2) (not exactly one, so the gains are exercised), and the LM
    head ~ N(0, (_LOGIT_STD^2)/n_embd) so that logits have std ~ 6 and greedy
    choices are not near-ties.

    With the tiny vocabulary, the LM-head rows of control/unknown tokens and of
    byte tokens other than ``<0x0A>`` are zero (logit exactly 0, far below the
    typical top-1 logit), so greedy generation emits printable text, yields
    valid UTF-8 and does not stop at an end-of-generation token early.  Ids are
    those of :data:`TINY_VOCAB`; ids ``>= vocab_size`` are ignored.

    Returns:
        dict name -> C-contiguous float32 array, shapes per :func:`weight_shapes`.
    """
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, shape in weight_shapes(spec, vocab_size).items():
        if len(shape) == 1:  # RMSNorm gain
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "token_embd.weight":
            w = rng.standard_normal(shape)
        elif name == "output.weight":
            w = rng.standard_normal(shape) * (_LOGIT_STD / np.sqrt(shape[1]))
            suppressed = [i for i in _suppressed_output_ids(TINY_VOCAB) if i < vocab_size]
            w[suppressed] = 0.0
        else:  # (out, in) projection: std 1/sqrt(fan_in)
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        weights[name] = np.ascontiguousarray(w, dtype=np.float32)
    return weights


# ---------------------------------------------------------------------------
# GGUF writer
# ---------------------------------------------------------------------------


def write_tiny_gguf(
    path: Path,
    spec: TinySpec | None = None,
    *,
    weights: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    chat_template: str = CHATML_TEMPLATE,
) -> dict[str, np.ndarray]:
    """Write a tiny all-F32 llama GGUF model to ``path``.

    Args:
        path: destination file (overwritten).
        spec: model sizes; default :class:`TinySpec()`.
        weights: tensors to write (e.g. from :func:`orthogonalize`); default
            ``tiny_weights(spec, len(TINY_VOCAB), seed)``.  Shapes must match
            :func:`weight_shapes` with the tiny vocabulary size.
        seed: RNG seed used when ``weights`` is None.
        chat_template: Jinja template stored as ``tokenizer.chat_template``.

    Returns:
        The float32 weights written (fresh arrays; the caller's are not aliased).

    The same arguments produce a byte-identical file.
    """
    spec = spec if spec is not None else TinySpec()
    n_vocab = len(TINY_VOCAB)
    if weights is None:
        weights = tiny_weights(spec, n_vocab, seed)
    shapes = weight_shapes(spec, n_vocab)
    if set(weights) != set(shapes):
        missing = sorted(set(shapes) - set(weights))
        extra = sorted(set(weights) - set(shapes))
        raise ValueError(f"weights do not match spec: missing={missing} extra={extra}")
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        w = np.array(weights[name], dtype=np.float32, order="C", copy=True)
        if w.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {w.shape}")
        out[name] = w

    _write_f32_gguf(path, spec.arch, "pyrefusal-tiny", spec, out, chat_template)
    return {k: v.copy() for k, v in out.items()}


def _write_f32_gguf(
    path: Path,
    arch: str,
    name: str,
    spec: TinySpec,
    tensors: dict[str, np.ndarray],
    chat_template: str,
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
) -> None:
    """Write an all-F32 GGUF of architecture ``arch`` with the tiny tokenizer; ``extra`` adds keys."""
    writer = gguf.GGUFWriter(str(path), arch)  # also writes general.architecture
    try:
        add_model_metadata(
            writer,
            name=name,
            file_type=gguf.LlamaFileType.ALL_F32,
            sizes=ModelSizes(
                spec.n_ctx_train,
                spec.n_embd,
                spec.n_layer,
                spec.n_ff,
                spec.n_head,
                spec.n_head_kv,
                spec.head_dim,
                spec.rms_eps,
                spec.rope_freq_base,
            ),
            vocab=SpmVocab(TINY_VOCAB.tokens, TINY_VOCAB.scores, TINY_VOCAB.types, UNK_ID, BOS_ID, EOS_ID, IM_END_ID),
            chat_template=chat_template,
        )
        if extra is not None:
            extra(writer)
        for tensor_name, w in tensors.items():
            writer.add_tensor(tensor_name, w)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


# ---------------------------------------------------------------------------
# NumPy reference forward pass
# ---------------------------------------------------------------------------


def _rms_norm(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps) * gain``."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def _rope_norm(x: np.ndarray, freq_base: float) -> np.ndarray:
    """RoPE in llama.cpp's ``LLAMA_ROPE_TYPE_NORM`` layout (used by arch llama).

    Rotates *adjacent* pairs ``(x[2i], x[2i+1])`` of each head by angle
    ``pos * freq_base^(-2i/hd)`` (NEOX style would pair ``i`` with ``i + hd/2``).

    x: (n_tokens, n_heads, hd), token ``t`` at position ``t``.
    """
    n_tokens, _, hd = x.shape
    inv_freq = freq_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # (hd/2,)
    ang = np.arange(n_tokens, dtype=np.float64)[:, None] * inv_freq[None, :]  # (n, hd/2)
    cos = np.cos(ang)[:, None, :]  # (n, 1, hd/2)
    sin = np.sin(ang)[:, None, :]
    x0 = x[..., 0::2]  # (n, heads, hd/2)
    x1 = x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def _block(x: np.ndarray, w: dict[str, np.ndarray], spec: TinySpec, i: int) -> np.ndarray:
    """One pre-norm llama block.  x: (n_tokens, n_embd) -> (n_tokens, n_embd)."""
    n, hd = x.shape[0], spec.head_dim
    p = f"blk.{i}."
    eps = spec.rms_eps

    h = _rms_norm(x, w[p + "attn_norm.weight"], eps)  # (n, d)
    q = (h @ w[p + "attn_q.weight"].T).reshape(n, spec.n_head, hd)  # (n, H, hd)
    k = (h @ w[p + "attn_k.weight"].T).reshape(n, spec.n_head_kv, hd)  # (n, Hkv, hd)
    v = (h @ w[p + "attn_v.weight"].T).reshape(n, spec.n_head_kv, hd)  # (n, Hkv, hd)
    q = _rope_norm(q, spec.rope_freq_base)
    k = _rope_norm(k, spec.rope_freq_base)
    # GQA: query head j reads kv head j // (n_head / n_head_kv).
    group = spec.n_head // spec.n_head_kv
    k = np.repeat(k, group, axis=1)  # (n, H, hd)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)  # (H, n, n)
    causal = np.triu(np.ones((n, n), dtype=bool), k=1)  # key after query
    scores = np.where(causal[None], -np.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    attn = np.einsum("hqk,khd->qhd", probs, v).reshape(n, spec.n_head * hd)  # (n, H*hd)
    x = x + attn @ w[p + "attn_output.weight"].T  # (n, d)

    h = _rms_norm(x, w[p + "ffn_norm.weight"], eps)
    gate = h @ w[p + "ffn_gate.weight"].T  # (n, ff)
    up = h @ w[p + "ffn_up.weight"].T  # (n, ff)
    act = gate / (1.0 + np.exp(-gate)) * up  # SiLU(gate) * up
    return x + act @ w[p + "ffn_down.weight"].T  # (n, d)


def reference_residuals(weights: dict[str, np.ndarray], spec: TinySpec, tokens: list[int] | np.ndarray) -> np.ndarray:
    """Residual stream of the tiny model, computed in float64 NumPy.

    Args:
        weights: tensors keyed by GGUF name (see module docstring for shapes).
        spec: sizes, ``rms_eps`` and ``rope_freq_base``.
        tokens: token ids at positions ``0..n_tokens-1`` (include BOS yourself).

    Returns:
        (n_layer + 1, n_tokens, n_embd): index ``l`` is the input of block ``l``
        (index 0 = token embeddings); the last index is the output of the last
        block (before ``output_norm``).
    """
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    ids = np.asarray(tokens, dtype=np.int64)
    x = w["token_embd.weight"][ids]  # (n, d)
    out = [x]
    for i in range(spec.n_layer):
        x = _block(x, w, spec, i)
        out.append(x)
    return np.stack(out)


def reference_logits(weights: dict[str, np.ndarray], spec: TinySpec, tokens: list[int] | np.ndarray) -> np.ndarray:
    """Logits of the tiny model for every position: (n_tokens, n_vocab), float64."""
    x = reference_residuals(weights, spec, tokens)[-1]  # (n, d)
    w_norm = np.asarray(weights["output_norm.weight"], dtype=np.float64)
    w_out = np.asarray(weights["output.weight"], dtype=np.float64)  # (V, d)
    return _rms_norm(x, w_norm, spec.rms_eps) @ w_out.T  # (n, V)


# ---------------------------------------------------------------------------
# Weight orthogonalization
# ---------------------------------------------------------------------------


def orthogonalize(weights: dict[str, np.ndarray], direction: np.ndarray) -> dict[str, np.ndarray]:
    """Remove the direction ``r`` from everything that writes into the residual stream.

    With ``r̂ = r / ||r||``:

    * ``token_embd.weight`` (n_vocab, n_embd), rows are residual vectors:
      ``E <- E - (E r̂) r̂ᵀ``;
    * ``blk.{i}.attn_output.weight`` (n_embd, n_head*hd) and
      ``blk.{i}.ffn_down.weight`` (n_embd, n_ff), columns live in the residual
      space (``y = W @ x``): ``W <- W - r̂ (r̂ᵀ W)``.

    Every other tensor is copied unchanged.  Arithmetic is done in float64 and
    cast back to each tensor's dtype.  The input dict and arrays are not modified.

    Args:
        weights: tensors keyed by GGUF name.
        direction: (n_embd,) non-zero direction ``r``.

    Returns:
        A new dict with new arrays.
    """
    r = np.asarray(direction, dtype=np.float64).reshape(-1)  # (d,)
    norm = np.linalg.norm(r)
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("direction must be finite and non-zero")
    r_hat = r / norm
    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        w64 = np.asarray(w, dtype=np.float64)
        if name == "token_embd.weight":
            if w64.shape[1] != r_hat.shape[0]:
                raise ValueError(f"{name}: width {w64.shape[1]} != direction size {r_hat.shape[0]}")
            new = w64 - np.outer(w64 @ r_hat, r_hat)  # (V, d)
        elif name.endswith((".attn_output.weight", ".ffn_down.weight")):
            if w64.shape[0] != r_hat.shape[0]:
                raise ValueError(f"{name}: height {w64.shape[0]} != direction size {r_hat.shape[0]}")
            new = w64 - np.outer(r_hat, r_hat @ w64)  # (d, in)
        else:
            out[name] = np.array(w, copy=True)
            continue
        out[name] = np.ascontiguousarray(new, dtype=np.asarray(w).dtype)
    return out


# ---------------------------------------------------------------------------
# Gemma 2 variant (post-sublayer "sandwich" norms, scaled embeddings, tied LM head)
# ---------------------------------------------------------------------------


def gemma2_weight_shapes(spec: TinySpec, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """NumPy shapes of a tiny ``gemma2`` model: the llama tensors, plus ``post_attention_norm`` and
    ``post_ffw_norm`` per block, and no ``output.weight`` (the LM head is the embedding matrix)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in weight_shapes(spec, vocab_size).items():
        if name == "output.weight":
            continue
        shapes[name] = shape
        if name.endswith(".attn_output.weight"):
            shapes[name.replace("attn_output", "post_attention_norm")] = (spec.n_embd,)
        if name.endswith(".ffn_down.weight"):
            shapes[name.replace("ffn_down", "post_ffw_norm")] = (spec.n_embd,)
    return shapes


def write_tiny_gemma2_gguf(path: Path, spec: TinySpec | None = None, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny all-F32 ``gemma2`` GGUF (random weights, the tiny tokenizer and ChatML template).

    Returns:
        The float32 weights written, keyed by tensor name.
    """
    spec = spec if spec is not None else TinySpec()
    n_vocab = len(TINY_VOCAB)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in gemma2_weight_shapes(spec, n_vocab).items():
        if len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "token_embd.weight":  # also the LM head: keep logits O(_LOGIT_STD) for a unit-RMS state
            w = rng.standard_normal(shape) * (_LOGIT_STD / np.sqrt(shape[1]))
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = np.ascontiguousarray(w, dtype=np.float32)

    def gemma2_keys(writer: gguf.GGUFWriter) -> None:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
        writer.add_attn_logit_softcapping(50.0)
        writer.add_final_logit_softcapping(30.0)
        writer.add_sliding_window(4096)

    _write_f32_gguf(path, "gemma2", "pyrefusal-tiny-gemma2", spec, out, CHATML_TEMPLATE, gemma2_keys)
    return {k: v.copy() for k, v in out.items()}


def finished_tiny_run(model: Path, data_dir: Path, out: Path, *, target_langs: tuple[str, ...], n_test: int) -> Path:
    """A finished `pyrefusal run` directory ``out`` on the tiny model, at the small sizes the export and optimize
    tests share (a few seconds); returns ``out``."""
    from pyrefusal.settings import RunConfig
    from pyrefusal.studies.run import run_pipeline

    cfg = RunConfig(
        model=str(model),
        data_dir=str(data_dir),
        target_langs=target_langs,
        n_train=6,
        n_val=4,
        n_test=n_test,
        max_new_tokens=4,
        kl_threshold=1e9,
        n_ctx=2048,
        n_seq_max=8,
        refusal_openings=("I",),
        capability=False,
    )
    run_pipeline(cfg, out, log=lambda s: None)
    return out
