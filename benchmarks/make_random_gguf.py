"""Random-weight GGUF models with the exact tensor shapes of real 7-8B chat models, for benchmarks.

Throughput depends on tensor shapes and types, not on weight values, so a random model with the
shapes of Qwen2.5-7B-Instruct or Llama-3.1-8B-Instruct times like the real one and can be made on
a machine that cannot download weights (the GPU machine has no network). Shapes:

==============  =====  =======  ===================  =======  ========  ===============================
shape           arch   n_layer  n_embd / heads / kv  n_ff     n_vocab   extra tensors
==============  =====  =======  ===================  =======  ========  ===============================
qwen2.5-7b      qwen2  28       3584 / 28 / 4        18944    152064    q/k/v biases
llama-3.1-8b    llama  32       4096 / 32 / 8        14336    128256    rope_freqs (llama3 rope scaling)
tiny            llama  4        256 / 4 / 2          768      2048      (CPU smoke tests)
==============  =====  =======  ===================  =======  ========  ===============================

``--scale s`` shrinks a shape (layers, heads, n_ff and vocabulary times ``s``; head size kept) to
test the real architectures on a CPU. ``--dry-run`` lists the tensors and prints parameter counts
and file sizes without writing anything; the full shapes reproduce the published parameter counts
(7,615,616,512 and 8,030,261,248).

How the file is written:

* F16: tensors are generated and written one at a time (``GGUFWriter.add_tensor_info`` for all,
  then ``write_tensor_data`` per tensor), so memory stays at about one tensor (1.1 GB for the
  largest) whatever the model size. Matrices get random half-precision bit patterns: random sign
  and mantissa, exponent drawn from four octaves chosen so the standard deviation is about
  ``1/sqrt(fan_in)`` (embeddings about 0.3); that is ~10x faster than drawing normals. Norm gains
  are ``1 + small noise`` and biases small, in F32 as llama.cpp's converter writes them.
* Q4_K_M: the F16 file is quantized by llama.cpp itself (``llama_model_quantize`` with
  ``LLAMA_FTYPE_MOSTLY_Q4_K_M``), in a child process that imports ``llama_cpp`` first. With
  ``--direct`` the file is written in the Q4_K_M recipe's block types at once instead: random
  quant bytes with fixed, finite super-scales per tensor (seconds for 7B instead of minutes, no
  F16 file; llama.cpp's quantizer is not needed). Same tensor types and sizes, so the same speed.
* Tokenizer: a compact SentencePiece vocabulary (control tokens, the 256 byte tokens, printable
  ASCII) padded with ``UNUSED`` tokens up to the real vocabulary size, so the embedding and the LM
  head have their real shapes; ChatML template.

Usage::

    python benchmarks/make_random_gguf.py --shape qwen2.5-7b --dry-run
    python benchmarks/make_random_gguf.py --shape qwen2.5-7b --dtype q4_k_m --out models/qwen7b-q4_k_m.gguf --keep-f16
    python benchmarks/make_random_gguf.py --shape llama-3.1-8b --scale 0.0625 --dtype q4_k_m --out /tmp/l8.gguf
    python benchmarks/make_random_gguf.py --shape qwen2.5-7b --dtype q4_k_m --direct --out /tmp/q7.gguf

This module must not import ``llama_cpp`` (``paper_stack.py`` imports it for the shapes, and
llama.cpp must be imported before NumPy in CUDA processes).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from pyrefusal.data.synthetic import ModelSizes, SpmVocab, add_model_metadata

# --- shapes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Architecture and sizes of a decoder-only model, as llama.cpp and transformers need them.

    Attributes:
        name: shape name (``qwen2.5-7b``; scaled shapes get ``@<scale>``).
        arch: GGUF architecture (``llama`` or ``qwen2``).
        hf_model_type: transformers ``model_type`` for the paper-stack reference.
        qkv_bias: q/k/v projections have biases (Qwen2).
        rope_scaling: llama3-style rope scaling ``(factor, low_freq_factor, high_freq_factor,
            original_context)`` or None; written as ``rope_freqs.weight`` for llama.cpp.
        expected_params: published parameter count of the real model (checked by ``--dry-run``).
    """

    name: str
    arch: str
    hf_model_type: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    rope_theta: float
    rms_eps: float
    n_ctx_train: int
    qkv_bias: bool = False
    rope_scaling: tuple[float, float, float, int] | None = None
    expected_params: int | None = None
    hf_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SHAPES: dict[str, Shape] = {
    "qwen2.5-7b": Shape(
        name="qwen2.5-7b",
        arch="qwen2",
        hf_model_type="qwen2",
        n_layer=28,
        n_embd=3584,
        n_head=28,
        n_head_kv=4,
        n_ff=18944,
        n_vocab=152064,
        rope_theta=1_000_000.0,
        rms_eps=1e-6,
        n_ctx_train=32768,
        qkv_bias=True,
        expected_params=7_615_616_512,
        hf_extra={"use_sliding_window": False},
    ),
    "llama-3.1-8b": Shape(
        name="llama-3.1-8b",
        arch="llama",
        hf_model_type="llama",
        n_layer=32,
        n_embd=4096,
        n_head=32,
        n_head_kv=8,
        n_ff=14336,
        n_vocab=128256,
        rope_theta=500_000.0,
        rms_eps=1e-5,
        n_ctx_train=131072,
        rope_scaling=(8.0, 1.0, 4.0, 8192),
        expected_params=8_030_261_248,
    ),
    "tiny": Shape(
        name="tiny",
        arch="llama",
        hf_model_type="llama",
        n_layer=4,
        n_embd=256,
        n_head=4,
        n_head_kv=2,
        n_ff=768,
        n_vocab=2048,
        rope_theta=10_000.0,
        rms_eps=1e-5,
        n_ctx_train=4096,
    ),
}

#: Smallest vocabulary the compact tokenizer needs (control + byte + ASCII tokens), rounded up.
MIN_VOCAB = 512


def get_shape(name: str, scale: float = 1.0) -> Shape:
    """A named shape, optionally scaled down (``0 < scale <= 1``) for CPU tests.

    Scaling keeps the architecture and the head size: layers, KV heads, query heads (a multiple of
    the KV heads), ``n_ff`` (a multiple of 256, so k-quants apply) and the vocabulary shrink.
    """
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; choose one of {sorted(SHAPES)}")
    s = SHAPES[name]
    if scale == 1.0:
        return s
    if not 0.0 < scale < 1.0:
        raise SystemExit(f"--scale must be in (0, 1]; got {scale}")
    kv = max(1, round(s.n_head_kv * scale))
    heads = max(kv, round(s.n_head * scale / kv) * kv)
    return replace(
        s,
        name=f"{s.name}@{scale:g}",
        n_layer=max(2, round(s.n_layer * scale)),
        n_head=heads,
        n_head_kv=kv,
        n_embd=heads * s.head_dim,
        n_ff=max(256, round(s.n_ff * scale / 256) * 256),
        n_vocab=max(MIN_VOCAB, round(s.n_vocab * scale)),
        expected_params=None,
    )


def hf_config(shape: Shape) -> dict[str, Any]:
    """A transformers config dict (``AutoConfig.for_model(**d)``) with this shape, random init.

    Rope scaling is left out (it does not change the cost); everything that sets tensor shapes is in.
    """
    d: dict[str, Any] = {
        "model_type": shape.hf_model_type,
        "vocab_size": shape.n_vocab,
        "hidden_size": shape.n_embd,
        "intermediate_size": shape.n_ff,
        "num_hidden_layers": shape.n_layer,
        "num_attention_heads": shape.n_head,
        "num_key_value_heads": shape.n_head_kv,
        "max_position_embeddings": shape.n_ctx_train,
        "rms_norm_eps": shape.rms_eps,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    d.update(shape.hf_extra)
    return d


# --- tensors ---------------------------------------------------------------------------------

# Bytes per block and elements per block of the GGML types a Q4_K_M file uses.
_TYPE_BLOCK = {"F32": (4, 1), "F16": (2, 1), "Q4_K": (144, 256), "Q5_K": (176, 256), "Q6_K": (210, 256)}


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the file: GGUF name, NumPy shape ``(rows, cols)`` (``ne`` reversed), role."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "matrix" | "embedding" | "output" | "norm" | "bias" | "rope_freqs"

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def fan_in(self) -> int:
        return self.shape[-1]


def plan_tensors(shape: Shape) -> list[TensorPlan]:
    """Every tensor llama.cpp loads for this shape, in file order (NumPy shapes: ``(out, in)``)."""
    d, kv, ff, v = shape.n_embd, shape.n_embd_kv, shape.n_ff, shape.n_vocab
    q = shape.n_head * shape.head_dim
    out = [TensorPlan("token_embd.weight", (v, d), "embedding")]
    if shape.rope_scaling is not None:
        out.append(TensorPlan("rope_freqs.weight", (shape.head_dim // 2,), "rope_freqs"))
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        out.append(TensorPlan(p + "attn_norm.weight", (d,), "norm"))
        out.append(TensorPlan(p + "attn_q.weight", (q, d), "matrix"))
        out.append(TensorPlan(p + "attn_k.weight", (kv, d), "matrix"))
        out.append(TensorPlan(p + "attn_v.weight", (kv, d), "matrix"))
        if shape.qkv_bias:
            out.append(TensorPlan(p + "attn_q.bias", (q,), "bias"))
            out.append(TensorPlan(p + "attn_k.bias", (kv,), "bias"))
            out.append(TensorPlan(p + "attn_v.bias", (kv,), "bias"))
        out.append(TensorPlan(p + "attn_output.weight", (d, q), "matrix"))
        out.append(TensorPlan(p + "ffn_norm.weight", (d,), "norm"))
        out.append(TensorPlan(p + "ffn_gate.weight", (ff, d), "matrix"))
        out.append(TensorPlan(p + "ffn_up.weight", (ff, d), "matrix"))
        out.append(TensorPlan(p + "ffn_down.weight", (d, ff), "matrix"))
    out.append(TensorPlan("output_norm.weight", (d,), "norm"))
    out.append(TensorPlan("output.weight", (v, d), "output"))
    return out


def _q4_k_m_type(t: TensorPlan, n_layer: int) -> str:
    """GGML type llama.cpp's Q4_K_M recipe (llama-quant.cpp, 0.3.36) gives a tensor of this plan."""
    if len(t.shape) == 1:
        return "F32"
    if t.fan_in % 256:
        return "Q5_K"  # approximate fallback for rows not divisible by 256 (scaled shapes only)
    if t.kind == "output":
        return "Q6_K"
    if t.name.endswith(("attn_v.weight", "ffn_down.weight")):
        i = int(t.name.split(".")[1])
        more_bits = i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2
        return "Q6_K" if more_bits else "Q4_K"
    return "Q4_K"


def tensor_bytes(t: TensorPlan, ggml_type: str) -> int:
    nbytes, block = _TYPE_BLOCK[ggml_type]
    return t.n_elements // block * nbytes


def summarize(shape: Shape) -> dict[str, Any]:
    """Parameter count and data sizes (F16 exact, Q4_K_M estimated) of the shape."""
    plan = plan_tensors(shape)
    n_params = sum(t.n_elements for t in plan if t.kind != "rope_freqs")
    f16 = sum(tensor_bytes(t, "F32" if len(t.shape) == 1 else "F16") for t in plan)
    q4 = sum(tensor_bytes(t, _q4_k_m_type(t, shape.n_layer)) for t in plan)
    return {
        "shape": shape.name,
        "arch": shape.arch,
        "n_tensors": len(plan),
        "n_params": n_params,
        "expected_params": shape.expected_params,
        "f16_data_bytes": f16,
        "q4_k_m_data_bytes_estimate": q4,
    }


# --- tokenizer -------------------------------------------------------------------------------

_SPACE = "\u2581"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def compact_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style vocabulary of exactly ``n_vocab`` tokens: (texts, scores, types).

    Ids 0-4 are the control tokens of :data:`SPECIAL_TOKENS`, then the 256 byte tokens (byte
    fallback makes any text encodable), ``▁`` and printable ASCII, ``▁a``..``▁z``, and ``UNUSED``
    padding. ``UNUSED`` (not ``USER_DEFINED``) keeps llama.cpp's special-token scan short.
    """
    texts = list(SPECIAL_TOKENS)
    types = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * (len(SPECIAL_TOKENS) - 1)
    scores = [0.0] * len(texts)
    for b in range(256):
        texts.append(f"<0x{b:02X}>")
        types.append(gguf.TokenType.BYTE)
        scores.append(0.0)
    for ch in [_SPACE] + [chr(c) for c in range(0x21, 0x7F)]:
        texts.append(ch)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-1000.0)
    for c in range(ord("a"), ord("z") + 1):
        texts.append(_SPACE + chr(c))
        types.append(gguf.TokenType.NORMAL)
        scores.append(1.0)
    if n_vocab < len(texts):
        raise SystemExit(f"vocabulary of {n_vocab} is smaller than the {len(texts)} base tokens")
    for i in range(len(texts), n_vocab):
        texts.append(f"<unused_{i}>")
        types.append(gguf.TokenType.UNUSED)
        scores.append(-1e9)
    return texts, scores, [int(t) for t in types]


#: First id of a normal (text) token: benchmarks draw random prompt tokens from ``[this, n_vocab)``.
FIRST_TEXT_TOKEN = len(SPECIAL_TOKENS) + 256


# --- values ----------------------------------------------------------------------------------


def _fill_f16_bits(out: np.ndarray, seed: tuple[int, ...], e0: int) -> None:
    """Fill a uint16 chunk with half-precision bit patterns (see :func:`random_f16`)."""
    bits = np.random.default_rng(seed).integers(0, 1 << 16, size=len(out), dtype=np.uint16)
    exp = (bits >> 10) & 0x3
    exp += e0
    exp <<= 10
    bits &= 0x83FF  # keep sign and mantissa
    bits |= exp
    out[:] = bits


def random_f16(
    seed: tuple[int, ...], n: int, std: float, workers: int | None = None, chunk: int = 1 << 24
) -> np.ndarray:
    """``n`` random float16 values with standard deviation within ~1.4x of ``std``, mean 0.

    Each value has a random sign and mantissa and an exponent spread over four octaves; with
    magnitudes ``m * 2**(a+k)`` (``m`` uniform in [1, 2), ``k`` uniform in 0..3) the standard
    deviation is ``sqrt(7/12 * 85) * 2**a ≈ 7.04 * 2**a``. No NaN, inf or subnormal. Chunks are
    filled by a thread pool (NumPy releases the GIL); each chunk has its own seed, so the values
    do not depend on the number of threads (``workers``; default: all cores).
    """
    a = round(math.log2(std / 7.04))
    e0 = 15 + a  # biased exponent of the lowest octave
    if not 1 <= e0 <= 27:
        raise ValueError(f"std {std} outside the supported range")
    out = np.empty(n, dtype=np.uint16)
    starts = range(0, n, chunk)
    if len(starts) == 1:
        _fill_f16_bits(out, (*seed, 0), e0)
    else:
        with ThreadPoolExecutor(max_workers=min(len(starts), workers or os.cpu_count() or 1)) as pool:
            jobs = [pool.submit(_fill_f16_bits, out[s : s + chunk], (*seed, k), e0) for k, s in enumerate(starts)]
            for job in jobs:
                job.result()
    return out.view(np.float16)


def _rope_factors(shape: Shape) -> np.ndarray:
    """llama3 rope-scaling factors per frequency (what llama.cpp reads from ``rope_freqs.weight``)."""
    assert shape.rope_scaling is not None
    factor, low, high, old_ctx = shape.rope_scaling
    hd = shape.head_dim
    inv_freq = shape.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    scaled = 1.0 / ((1.0 - smooth) / factor + smooth)  # 1 for short wavelengths, factor for long ones
    return scaled.astype(np.float32)


def tensor_values(t: TensorPlan, shape: Shape, seed: tuple[int, ...], workers: int | None = None) -> np.ndarray:
    """Random values of one tensor: F16 for matrices, F32 for 1-D tensors."""
    rng = np.random.default_rng(seed)
    if t.kind == "norm":
        return (1.0 + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
    if t.kind == "bias":
        return (0.02 * rng.standard_normal(t.shape)).astype(np.float32)
    if t.kind == "rope_freqs":
        return _rope_factors(shape)
    std = 0.3 if t.kind == "embedding" else 1.0 / math.sqrt(t.fan_in)
    return random_f16(seed, t.n_elements, std, workers).reshape(t.shape)


# --- writing ---------------------------------------------------------------------------------


def _add_metadata(w: gguf.GGUFWriter, shape: Shape, file_type: int) -> None:
    """Architecture, tokenizer and chat template keys of a random model of ``shape``."""
    texts, scores, types = compact_vocab(shape.n_vocab)
    add_model_metadata(
        w,
        name=f"random-{shape.name}",
        description="random weights with the tensor shapes of a real model; for benchmarks only",
        file_type=file_type,
        sizes=ModelSizes(
            shape.n_ctx_train,
            shape.n_embd,
            shape.n_layer,
            shape.n_ff,
            shape.n_head,
            shape.n_head_kv,
            shape.head_dim,
            shape.rms_eps,
            shape.rope_theta,
        ),
        vocab=SpmVocab(texts, scores, types, unk=0, bos=1, eos=2, eot=SPECIAL_TOKENS.index("<|im_end|>")),
        chat_template=CHATML,
    )


def _write_streamed(
    shape: Shape,
    path: Path,
    file_type: int,
    infos: list[tuple[TensorPlan, str]],
    values: Any,
    log: bool,
) -> Path:
    """Write the header, then each tensor's data as ``values(i, plan, ggml_type)`` returns it.

    Tensors are produced and written one at a time, so memory stays at about one tensor.
    ``infos`` pairs each tensor of the plan with its GGML type name (``F32``, ``F16``, ``Q4_K`` ...).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    t0 = time.perf_counter()
    w = gguf.GGUFWriter(str(tmp), shape.arch)
    try:
        _add_metadata(w, shape, file_type)
        for t, ggml_type in infos:
            if ggml_type in ("F32", "F16"):
                dtype = np.dtype(np.float32 if ggml_type == "F32" else np.float16)
                w.add_tensor_info(t.name, t.shape, dtype, t.n_elements * dtype.itemsize)
            else:
                # quantized: byte shape (rows, bytes per row) + raw type, as gguf-py expects
                nbytes = tensor_bytes(t, ggml_type)
                rows = t.n_elements // t.fan_in
                w.add_tensor_info(
                    t.name,
                    (rows, nbytes // rows),
                    np.dtype(np.uint8),
                    nbytes,
                    raw_dtype=gguf.GGMLQuantizationType[ggml_type],
                )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        written = 0
        for i, (t, ggml_type) in enumerate(infos):
            data = values(i, t, ggml_type)
            w.write_tensor_data(data)
            written += data.nbytes
            del data
            if log and (i % 50 == 0 or i == len(infos) - 1):
                rate = written / max(time.perf_counter() - t0, 1e-9) / 1e6
                print(f"  {i + 1}/{len(infos)} tensors, {written / 1e9:.2f} GB ({rate:.0f} MB/s)", flush=True)
    finally:
        w.close()
    tmp.replace(path)
    if log:
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def write_f16(shape: Shape, path: Path, seed: int = 0, log: bool = True, workers: int | None = None) -> Path:
    """Write an F16 random-weight GGUF of ``shape`` to ``path``, streaming tensor by tensor.

    ``workers`` threads draw the values (default: all cores); the file does not depend on it.
    """
    infos = [(t, "F32" if len(t.shape) == 1 else "F16") for t in plan_tensors(shape)]
    return _write_streamed(
        shape,
        path,
        gguf.LlamaFileType.MOSTLY_F16,
        infos,
        lambda i, t, _type: tensor_values(t, shape, (seed, i), workers),
        log,
    )


# Random K-quant blocks: where the block's f16 super-scales sit (byte offsets of d and dmin; None:
# no dmin) and the standard deviation of a dequantized value in units of d when every other byte
# of the block is uniformly random (6-bit scales and mins, 4/5/6-bit quants; for Q6_K int8 scales).
# With dmin = ZERO_POINT * d the mean is zero. Derivation: value = d*sc*q - dmin*m with sc, m
# uniform on 0..63 and q on 0..2^b-1, so var = d^2 (E[sc^2]E[q^2] - E[sc]^2 E[q]^2) + dmin^2 var(m).
_BLOCK_SCALES: dict[str, tuple[int, int | None, float, float]] = {
    #        d offset, dmin offset, std / d, dmin / d
    "Q4_K": (0, 2, 257.0, 7.5),
    "Q5_K": (0, 2, 524.0, 15.5),
    "Q6_K": (208, None, 1366.0, 0.0),
}


class RandomBytes:
    """A fixed pool of random bytes that tensors are cut from at random offsets.

    Throughput does not depend on which random bits a weight has, so one pool of ``size``
    bytes, drawn once, serves every tensor: a 4.7 GB Q4_K_M file then costs little more than
    the disk write. Blocks repeat across tensors; values inside a block are uniform.
    """

    def __init__(self, seed: int, size: int = 1 << 26) -> None:
        self._rng = np.random.default_rng(seed)
        self._pool = np.frombuffer(self._rng.bytes(2 * size), dtype=np.uint8)
        self._size = size

    def take(self, n: int) -> np.ndarray:
        """``n`` random bytes (a new array)."""
        out = np.empty(n, dtype=np.uint8)
        done = 0
        while done < n:
            k = min(n - done, self._size)
            off = int(self._rng.integers(0, self._size))
            out[done : done + k] = self._pool[off : off + k]
            done += k
        return out


def random_quant_tensor(t: TensorPlan, ggml_type: str, std: float, pool: RandomBytes) -> np.ndarray:
    """Random blocks of a K-quant type whose dequantized values have about ``std`` and mean 0.

    Returns the tensor's bytes as ``(rows, bytes_per_row)`` uint8. Every byte is random except
    the per-block f16 super-scales ``d`` (and ``dmin``), which are set so that no value is NaN
    or infinite and the spread matches :func:`tensor_values` (``1/sqrt(fan_in)``).
    """
    nbytes, block = _TYPE_BLOCK[ggml_type]
    d_off, dmin_off, std_per_d, zero = _BLOCK_SCALES[ggml_type]
    n_blocks = t.n_elements // block
    raw = pool.take(n_blocks * nbytes).reshape(n_blocks, nbytes)
    d = np.float16(std / std_per_d)
    raw[:, d_off : d_off + 2] = np.frombuffer(d.tobytes(), dtype=np.uint8)
    if dmin_off is not None:
        dmin = np.float16(std / std_per_d * zero)
        raw[:, dmin_off : dmin_off + 2] = np.frombuffer(dmin.tobytes(), dtype=np.uint8)
    rows = t.n_elements // t.fan_in
    return raw.reshape(rows, -1)


def write_direct(shape: Shape, path: Path, dtype: str = "q4_k_m", seed: int = 0, log: bool = True) -> Path:
    """Write a random model directly in ``dtype``'s block types, without an F16 file or llama.cpp.

    Tensor types follow llama.cpp's Q4_K_M recipe as :func:`_q4_k_m_type` models it (checked
    against ``llama_model_quantize`` by the tests); blocks are random (:func:`random_quant_tensor`).
    Seconds instead of minutes for a 7B model, which matters on a GPU machine lent by the minute.
    """
    if dtype != "q4_k_m":
        raise SystemExit(f"direct writing supports q4_k_m only, not {dtype}")
    pool = RandomBytes(seed)
    infos = [(t, _q4_k_m_type(t, shape.n_layer)) for t in plan_tensors(shape)]

    def values(i: int, t: TensorPlan, ggml_type: str) -> np.ndarray:
        if ggml_type in ("F32", "F16"):
            return tensor_values(t, shape, (seed, i))
        std = 0.3 if t.kind == "embedding" else 1.0 / math.sqrt(t.fan_in)
        return random_quant_tensor(t, ggml_type, std, pool)

    return _write_streamed(shape, path, gguf.LlamaFileType.MOSTLY_Q4_K_M, infos, values, log)


_QUANTIZE_CHILD = """
import ctypes, sys
import llama_cpp  # first: before anything that imports NumPy

@llama_cpp.llama_log_callback
def _quiet(level, text, user_data):
    if level >= 4 or sys.argv[5] == "1":  # GGML_LOG_LEVEL_ERROR = 4
        sys.stderr.write(text.decode(errors="replace"))

llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3])
p.nthread = int(sys.argv[4])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
sys.exit(int(rc))
"""

FTYPES = {"q4_k_m": 15}  # LLAMA_FTYPE_MOSTLY_Q4_K_M (llama.h); checked against llama_cpp in the child


def quantize(src: Path, dst: Path, dtype: str = "q4_k_m", threads: int = 0, log: bool = True) -> Path:
    """Quantize ``src`` (F16 GGUF) to ``dst`` with llama.cpp's ``llama_model_quantize``.

    Runs in a child process that imports ``llama_cpp`` before NumPy; ``threads=0`` = all cores.
    llama.cpp's log is shown only for errors, or in full when ``PYREFUSAL_LLAMA_LOG`` is set.
    """
    import_check = f"import llama_cpp, sys; sys.exit(llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M != {FTYPES['q4_k_m']})"
    if subprocess.run([sys.executable, "-c", import_check], check=False).returncode != 0:
        raise SystemExit("llama_cpp is not importable here (or its Q4_K_M ftype differs); cannot quantize")
    tmp = dst.with_name(dst.name + ".partial")
    t0 = time.perf_counter()
    env = dict(os.environ)
    verbose = "1" if os.environ.get("PYREFUSAL_LLAMA_LOG") else "0"
    cmd = [sys.executable, "-c", _QUANTIZE_CHILD, str(src), str(tmp), str(FTYPES[dtype]), str(threads), verbose]
    res = subprocess.run(cmd, env=env, check=False)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"llama_model_quantize failed with code {res.returncode} for {src} (see the log above)")
    tmp.replace(dst)
    if log:
        print(f"quantized {dst} ({dst.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
    return dst


def model_file(model_dir: Path, shape: Shape, dtype: str) -> Path:
    """Conventional file name of a random model: ``<dir>/random-<shape>-<dtype>.gguf``."""
    return model_dir / f"random-{shape.name.replace('@', '-s')}-{dtype}.gguf"


def ensure_model(
    shape: Shape, dtype: str, model_dir: Path, seed: int = 0, threads: int = 0, direct: bool = False
) -> Path:
    """Path of the random model, written when missing: quantized from the F16 file by llama.cpp,
    or with ``direct`` written in its block types at once (:func:`write_direct`)."""
    path = model_file(model_dir, shape, dtype)
    if path.is_file():
        return path
    if direct and dtype != "f16":
        return write_direct(shape, path, dtype, seed)
    f16 = model_file(model_dir, shape, "f16")
    if not f16.is_file():
        write_f16(shape, f16, seed)
    if dtype == "f16":
        return f16
    return quantize(f16, path, dtype, threads)


# --- CLI -------------------------------------------------------------------------------------


def _print_plan(shape: Shape) -> None:
    s = summarize(shape)
    print(f"shape {shape.name}: arch {shape.arch}, {shape.n_layer} layers, n_embd {shape.n_embd}, heads {shape.n_head}")
    print(f"  kv heads {shape.n_head_kv}, head dim {shape.head_dim}, n_ff {shape.n_ff}, vocab {shape.n_vocab}")
    by_kind: dict[str, tuple[int, int]] = {}
    for t in plan_tensors(shape):
        n, e = by_kind.get(t.kind, (0, 0))
        by_kind[t.kind] = (n + 1, e + t.n_elements)
    for kind, (n, e) in by_kind.items():
        print(f"  {kind:11s} {n:4d} tensors {e:>15,d} elements")
    print(f"  parameters      {s['n_params']:>15,d}", end="")
    if shape.expected_params is not None:
        ok = s["n_params"] == shape.expected_params
        print(f"  ({'matches' if ok else 'DIFFERS FROM'} the published {shape.expected_params:,d})")
        if not ok:
            raise SystemExit("tensor plan does not reproduce the published parameter count")
    else:
        print()
    print(f"  F16 data        {s['f16_data_bytes'] / 1e9:8.2f} GB")
    print(f"  Q4_K_M data   ~ {s['q4_k_m_data_bytes_estimate'] / 1e9:8.2f} GB (llama.cpp's type recipe; estimate)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--scale", type=float, default=1.0, help="shrink the shape (0 < s <= 1) for CPU tests")
    ap.add_argument("--dtype", default="f16", choices=["f16", *FTYPES])
    ap.add_argument("--out", type=Path, help="output .gguf (default: build/random-gguf/random-<shape>-<dtype>.gguf)")
    ap.add_argument("--f16", type=Path, help="existing F16 file to quantize (default: write one first)")
    ap.add_argument("--keep-f16", action="store_true", help="keep the intermediate F16 file of a quantized model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="threads for values and quantization (0 = all cores)")
    ap.add_argument(
        "--direct",
        action="store_true",
        help="write a quantized dtype directly as random blocks (seconds; no F16 file, no llama.cpp)",
    )
    ap.add_argument("--dry-run", action="store_true", help="print tensors, parameter count and sizes; write nothing")
    args = ap.parse_args(argv)
    shape = get_shape(args.shape, args.scale)
    if args.dry_run:
        _print_plan(shape)
        return
    out = args.out or model_file(Path("build/random-gguf"), shape, args.dtype)
    workers = args.threads or None
    if args.dtype == "f16":
        write_f16(shape, out, args.seed, workers=workers)
        return
    if args.direct:
        write_direct(shape, out, args.dtype, args.seed)
        return
    src = args.f16
    made = False
    if src is None:
        src = out.with_name(out.stem + ".f16.gguf")
        write_f16(shape, src, args.seed, workers=workers)
        made = True
    quantize(src, out, args.dtype, args.threads)
    if made and not args.keep_f16:
        src.unlink()


if __name__ == "__main__":
    main()
