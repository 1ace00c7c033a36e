"""Export interventions as files any llama.cpp application can load.

Two formats, two meanings -- never interchange them:

* **Control vector** (``--control-vector FILE``): activation ADDITION. llama.cpp adds tensor
  ``direction.N`` to the residual stream after block ``N`` (node ``l_out-N``, the input of
  block ``N + 1``) at every token. It never projects anything out, so a control vector cannot
  express directional ablation. pyrefusal's :class:`~pyrefusal.method.intervention.Addition` at block
  input ``L`` is ``direction.(L-1)``; block inputs 0 and 1 cannot be steered (llama.cpp has no
  ``direction.0``).
* **LoRA adapter** (``--lora FILE``, scale 1): directional ABLATION. Removing the span of the
  orthonormal rows ``D`` (k, n_embd) from everything that writes into the residual stream is
  the rank-k weight edit ``W <- W - Dᵀ (D W)`` of every ``attn_output`` and ``ffn_down``
  matrix and ``E <- E - (E Dᵀ) D`` of the token embeddings. That is exactly a LoRA with
  ``B = -Dᵀ`` and ``A = D W`` (scale ``alpha / rank = 1``), which llama.cpp adds in its graph on
  top of the unchanged, still-quantized base. ``W`` is read from the base GGUF and dequantized
  with :func:`gguf.quants.dequantize`, i.e. the weights the base model really multiplies with.

Why the LoRA is exact only for some models (see :func:`ablation_lora_support`):
    * pre-norm blocks (llama, qwen2, qwen3, mistral3): ablating every write == ablating the
      residual stream after every write; with post-sublayer norms (Gemma 2/3) it is not;
    * a bias or an output scale on ``attn_output`` / ``ffn_down`` adds a constant (or rescales)
      after the matmul the LoRA edits; mixture-of-experts FFNs write through expert tensors;
    * tied embeddings: when a model has no ``output.weight``, llama.cpp's LM head reuses the
      tensor named ``token_embd.weight`` and applies *its* LoRA to the LM head too
      (``build_lora_mm`` looks adapters up by tensor name). The embedding LoRA's shapes
      (``lora_a`` n_vocab x k) cannot fit the LM-head product, so ggml aborts the process
      (``GGML_ASSERT(ggml_can_mul_mat(a, b))``). For such models the embeddings must be
      left out of the file (``embeddings="skip"``) and ablated another way (pyrefusal's hook
      on node ``embd``); a skip file alone is not the paper's full ablation.

Base GGUF files are read with a small header parser of our own plus ``numpy.memmap``: gguf-py's
``GGUFReader`` spends seconds parsing a 150k-entry tokenizer we never need.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import llama_cpp  # noqa: F401  (import llama_cpp before numpy/gguf: required in CUDA processes)

import gguf
import numpy as np

from pyrefusal import __version__
from pyrefusal.data.registry import cache_dir, cached_sha256
from pyrefusal.errors import ModelError, PyrefusalError
from pyrefusal.families import LORA_EXACT_ARCHITECTURES  # per-architecture LoRA exactness
from pyrefusal.method.intervention import orthonormalize
from pyrefusal.runtime.validate import ArrayInfo, parse_gguf

__all__ = [
    "CVEC_ARCH",
    "LORA_EXACT_ARCHITECTURES",
    "LORA_FORMAT",
    "ExportError",
    "GGUFHeader",
    "LoraSupport",
    "TensorInfo",
    "ablation_lora_support",
    "cached_ablation_lora",
    "cvec_layer",
    "direction_sha256",
    "export_ablation_lora",
    "export_control_vector",
    "load_control_vector",
    "read_gguf_header",
    "read_metadata",
    "write_provenance",
]

#: ``general.architecture`` of a llama.cpp control-vector file.
CVEC_ARCH = "controlvector"
#: Version of pyrefusal's LoRA layout; part of cached adapter names (bump to invalidate caches).
LORA_FORMAT = 1

_WRITERS = ("attn_output", "ffn_down")  # per-block matrices that write into the residual stream
_RESERVED = ("intervention", "version", "semantics")  # pyrefusal.* keys the exporter owns
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*$")
_CHUNK_ELEMENTS = 1 << 24  # dequantize at most ~16M weights (64 MiB float32) at a time

CVEC_SEMANTICS = (
    "ADDITIVE control vector: llama.cpp adds direction.N to the residual stream after block N "
    "(l_out-N = input of block N+1) at every token. It never projects a direction out: this file "
    "is not an ablation."
)
LORA_SEMANTICS = (
    "ABLATION as a rank-k LoRA (B = -D^T, A = D W, alpha = k, so scale 1): every attn_output / "
    "ffn_down write{embd} loses its component in span(D). Load it at scale 1 (--lora FILE) on the "
    "base model whose sha256 is pyrefusal.base_sha256; any other scale or base model is not an ablation."
)


class ExportError(PyrefusalError):
    """An intervention cannot be exported to (or read back from) a llama.cpp adapter file."""


# --- provenance metadata -------------------------------------------------------------------


def _add_metadata(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    """Write one metadata value with a GGUF type matching its Python type."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float64(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        writer.add_array(key, list(value))
    else:  # dicts, mixed lists, ...: JSON text, readable by every GGUF tool
        writer.add_string(key, json.dumps(value, sort_keys=True, default=str))


def write_provenance(writer: gguf.GGUFWriter, provenance: Mapping[str, Any], owned: Mapping[str, Any]) -> None:
    """Write ``provenance`` as ``pyrefusal.<key>`` entries, then the exporter's own keys (every pyrefusal GGUF
    writer uses it: control vectors, LoRAs, merged models).

    Raises:
        ExportError: a key is malformed, or contradicts a key the exporter owns (e.g.
            ``intervention="ablation"`` for a control vector).
    """
    for raw_key, value in provenance.items():
        key = raw_key.removeprefix("pyrefusal.")
        if not _KEY_RE.match(key):
            raise ExportError(f"provenance key {raw_key!r} is not a valid GGUF key; use letters, digits, '_' and '.'")
        if key in owned or key in _RESERVED:
            if key in owned and value != owned[key]:
                if key != "intervention":
                    hint = "Leave this key out; the exporter writes it."
                elif owned[key] == "addition":
                    hint = (
                        "llama.cpp only ADDS control vectors: export an ablation with export_ablation_lora "
                        "(pyrefusal export lora), never as a control vector."
                    )
                else:
                    hint = "This file is an ablation; export an addition with export_control_vector."
                raise ExportError(f"provenance says {key}={value!r} but this file is {key}={owned[key]!r}. {hint}")
            continue
        if value is None:
            continue
        _add_metadata(writer, f"pyrefusal.{key}", value)
    for key, value in owned.items():
        _add_metadata(writer, f"pyrefusal.{key}", value)


def _write_atomically(path: Path, fill: Callable[[Path], None]) -> Path:
    """Write a GGUF through ``fill(writer_path)`` to a temporary file, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fill(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every metadata key of a small GGUF file (an exported adapter) as Python values.

    Args:
        path: a control-vector or LoRA file (not a base model: its tokenizer makes this slow).

    Returns:
        key -> value (strings, numbers, lists); the ``GGUF.*`` header fields are left out.
    """
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# --- control vectors -----------------------------------------------------------------------


def cvec_layer(block_input: int) -> int:
    """The control-vector index ``N`` that adds at pyrefusal's block input ``block_input``.

    Raises:
        ExportError: ``block_input < 2`` (llama.cpp cannot add before block 1's output).
    """
    if block_input < 2:
        raise ExportError(
            f"an addition at block input {block_input} would be control-vector direction.{block_input - 1}; "
            "llama.cpp only steers direction.1 and later (block input >= 2). Apply it with pyrefusal's hook instead."
        )
    return block_input - 1


def export_control_vector(
    path: str | os.PathLike[str],
    vectors: Mapping[int, np.ndarray],
    *,
    model_hint: str,
    provenance: Mapping[str, Any],
    n_layer: int | None = None,
) -> Path:
    """Write a llama.cpp control vector (``--control-vector``): additive steering only.

    Args:
        path: destination ``.gguf`` (overwritten atomically).
        vectors: llama.cpp layer ``N`` -> vector ``(n_embd,)`` added to the output of block
            ``N`` (= input of block ``N + 1``; pyrefusal's Addition at block input ``L`` is
            ``N = L - 1``, see :func:`cvec_layer`). Include the coefficient in the vector.
        model_hint: the base model's architecture or name (llama.cpp does not check it).
        provenance: facts written as ``pyrefusal.<key>``: e.g. ``source_language``,
            ``layer``, ``position``, ``base_sha256``, ``coefficient``. ``intervention``, if
            given, must be ``"addition"``.
        n_layer: the model's block count, to reject ``N > n_layer - 1`` (optional).

    Returns:
        ``path``.

    Raises:
        ExportError: no vectors, ``N < 1`` (llama.cpp cannot steer layer 0), ``N`` beyond
            the model, vectors of different widths or with NaN/inf, or an ablation provenance.
    """
    if not vectors:
        raise ExportError("no vectors to export; pass {layer: vector} with at least one layer >= 1")
    width = None
    rows: dict[int, np.ndarray] = {}
    for n, v in sorted(vectors.items()):
        n = int(n)
        if n < 1:
            raise ExportError(
                f"control-vector layer {n}: llama.cpp cannot steer layer 0 (it has no direction.0 and rejects the "
                "file). Layer N adds to the output of block N = input of block N+1; add at block input 0 or 1 with "
                "pyrefusal's hook instead."
            )
        if n_layer is not None and n > n_layer - 1:
            raise ExportError(f"control-vector layer {n} is beyond the model's layers 1..{n_layer - 1}")
        arr = np.asarray(v, dtype=np.float32)
        if arr.ndim != 1:
            raise ExportError(f"direction.{n} must be 1-D (n_embd,), got shape {arr.shape}")
        if width is not None and arr.shape[0] != width:
            raise ExportError(f"direction.{n} has width {arr.shape[0]} but another vector has {width}")
        if not np.all(np.isfinite(arr)):
            raise ExportError(f"direction.{n} contains NaN or inf; recompute the direction")
        width = arr.shape[0]
        rows[n] = np.ascontiguousarray(arr)

    owned = {
        "intervention": "addition",
        "version": __version__,
        "semantics": CVEC_SEMANTICS,
        "layer_convention": "direction.N is added to l_out-N = input of block N+1 (pyrefusal block input N+1)",
    }

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), CVEC_ARCH)
        try:
            writer.add_string(f"{CVEC_ARCH}.model_hint", model_hint)
            writer.add_int32(f"{CVEC_ARCH}.layer_count", len(rows))
            write_provenance(writer, provenance, owned)
            for n, arr in rows.items():
                writer.add_tensor(f"direction.{n}", arr)  # F32, 1-D (n_embd,)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    return _write_atomically(Path(path), fill)


def load_control_vector(path: str | os.PathLike[str]) -> dict[int, np.ndarray]:
    """Read a llama.cpp control vector (pyrefusal's or another tool's) as llama.cpp would.

    Tensors ``direction.N`` for the same ``N`` are summed, as llama.cpp's loader does.

    Returns:
        llama.cpp layer ``N`` (>= 1) -> float32 ``(n_embd,)``; pass it to
        :meth:`pyrefusal.runtime.runtime.Runtime.set_control_vector`.

    Raises:
        ExportError: not a control vector, a ``direction.0``, non-F32 or non-1-D tensors, or
            a pyrefusal file that says it is not an addition.
    """
    reader = gguf.GGUFReader(str(path))
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if arch != CVEC_ARCH:
        raise ExportError(f"{path} is not a control vector (general.architecture={arch!r}, expected {CVEC_ARCH!r})")
    kind = reader.fields.get("pyrefusal.intervention")
    if kind is not None and kind.contents() != "addition":
        raise ExportError(f"{path} says pyrefusal.intervention={kind.contents()!r}; a control vector can only add")
    out: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        m = re.fullmatch(r"direction\.(\d+)", t.name)
        if m is None:
            raise ExportError(f"{path}: unexpected tensor {t.name!r}; control vectors hold only direction.N tensors")
        n = int(m.group(1))
        if n == 0:
            raise ExportError(f"{path}: direction.0 is invalid (llama.cpp cannot steer layer 0)")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise ExportError(f"{path}: {t.name} must be a 1-D F32 tensor, got {t.tensor_type.name} {list(t.shape)}")
        v = np.array(t.data, dtype=np.float32).reshape(-1)  # (n_embd,)
        out[n] = out[n] + v if n in out else v
    if not out:
        raise ExportError(f"{path} holds no direction tensors")
    return out


# --- reading base models -------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file.

    Attributes:
        name: GGUF tensor name.
        ne: ggml dimensions, fastest first (``ne[0]`` = row length).
        qtype: storage type.
        offset: absolute byte offset of the data in the file.
    """

    name: str
    ne: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    offset: int

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.ne[1:], dtype=np.int64)) if len(self.ne) > 1 else 1

    @property
    def row_bytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return self.ne[0] // block * size


@dataclass(frozen=True)
class GGUFHeader:
    """Metadata and tensor directory of a GGUF file (array values are skipped, not kept).

    Attributes:
        path: the file.
        kv: scalar and string metadata.
        tensors: name -> :class:`TensorInfo`, in file order.
    """

    path: Path
    kv: dict[str, Any]
    tensors: dict[str, TensorInfo]

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Dequantized float32 rows ``start:stop`` of tensor ``name``: ``(stop - start, ne[0])``.

        Raises:
            ExportError: gguf-py cannot dequantize this storage type.
        """
        t = self.tensors[name]
        try:
            raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.n_rows, t.row_bytes))
        except (ValueError, OSError) as e:  # data beyond the end of the file
            raise ExportError(
                f"{self.path}: cannot read tensor {name} ({e}); the file is truncated, re-download it"
            ) from None
        try:
            out = gguf.quants.dequantize(np.ascontiguousarray(raw[start:stop]), t.qtype)
        except NotImplementedError as e:
            raise ExportError(
                f"gguf-py cannot dequantize {name} ({t.qtype.name}); upgrade gguf, or use pyrefusal's hook "
                "for this model"
            ) from e
        return np.asarray(out, dtype=np.float32).reshape(stop - start, t.ne[0])


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse a GGUF header (v2/v3, little-endian) without materialising array values.

    The parsing is :func:`pyrefusal.runtime.validate.parse_gguf`'s: every count and length is checked
    against the file, so a corrupt header is an :class:`ExportError`, never an OverflowError or a
    ZeroDivisionError. Array metadata is left out of :attr:`GGUFHeader.kv`.

    Raises:
        ExportError: not a GGUF file, a truncated/corrupt header, or a tensor type unknown to gguf-py.
    """
    try:
        raw = parse_gguf(path)
    except ModelError as e:
        raise ExportError(str(e)) from None
    kv = {k: v for k, v in raw.kv.items() if not isinstance(v, ArrayInfo)}
    tensors: dict[str, TensorInfo] = {}
    for t in raw.tensors:
        try:
            qtype = gguf.GGMLQuantizationType(t.qtype)
        except ValueError:
            raise ExportError(
                f"{raw.path}: tensor {t.name!r} has type {t.qtype}, unknown to gguf "
                f"{getattr(gguf, '__version__', '(version unknown)')}; upgrade gguf (`pip install -U gguf`) "
                "or convert the model to a standard type"
            ) from None
        tensors[t.name] = TensorInfo(t.name, t.ne, qtype, t.offset)
    return GGUFHeader(path=raw.path, kv=kv, tensors=tensors)


# --- LoRA ablation -------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSupport:
    """Whether a rank-k LoRA is an exact ablation for a model, and what it would contain.

    Attributes:
        exact: True when the LoRA reproduces the residual-stream ablation exactly.
        reason: why not (empty when exact).
        arch: ``general.architecture``.
        n_embd: residual width.
        tied_embeddings: no ``output.weight``: the LM head is ``token_embd.weight``, so the
            embeddings cannot be in the LoRA (see the module docstring).
        writers: names of the matrices the LoRA edits (without the embeddings).
    """

    exact: bool
    reason: str
    arch: str
    n_embd: int
    tied_embeddings: bool
    writers: tuple[str, ...] = field(default_factory=tuple)


_SUPPORT_CACHE: dict[tuple[str, int, int], LoraSupport] = {}


def ablation_lora_support(model_path: str | os.PathLike[str]) -> LoraSupport:
    """Check from the GGUF header whether a LoRA ablation is exact for this model (cached per file)."""
    path = Path(model_path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SUPPORT_CACHE:
        _SUPPORT_CACHE[key] = _support(read_gguf_header(path))
    return _SUPPORT_CACHE[key]


def _support(h: GGUFHeader) -> LoraSupport:
    arch = str(h.kv.get("general.architecture", "unknown"))
    n_embd = int(h.kv.get(f"{arch}.embedding_length", 0))
    n_layer = int(h.kv.get(f"{arch}.block_count", 0))
    tied = "output.weight" not in h.tensors

    def no(reason: str) -> LoraSupport:
        return LoraSupport(False, reason, arch, n_embd, tied)

    if arch not in LORA_EXACT_ARCHITECTURES:
        return no(
            f"architecture {arch!r} is not one whose llama.cpp graph pyrefusal checked for LoRA ablation "
            f"({sorted(LORA_EXACT_ARCHITECTURES)}: pre-norm blocks, every residual write through build_lora_mm); "
            "post-sublayer norms (e.g. Gemma 2/3) make the weight edit differ from the residual-stream ablation"
        )
    if n_embd <= 0 or n_layer <= 0:
        return no(f"the GGUF lacks {arch}.embedding_length / {arch}.block_count")
    if int(h.kv.get("split.count", 1) or 1) > 1:
        return no(
            f"{h.path.name} is shard 1 of a split GGUF ({h.kv['split.count']} files) and the weights are spread "
            "over them; merge it into one file first (llama.cpp's `llama-gguf-split --merge`)"
        )
    names = set(h.tensors)
    moe = sorted(n for n in names if "_exps." in n or "_shexp." in n or ".ffn_gate_inp." in n)
    if moe:
        return no(f"mixture-of-experts FFN ({moe[0]}, ...): expert writes are not covered by the LoRA")
    extra = sorted(
        n
        for n in names
        if (m := re.fullmatch(r"blk\.\d+\.(attn_output|ffn_down)\.(\w+)", n)) and m.group(2) != "weight"
    )
    if extra:
        return no(
            f"{extra[0]} exists: a bias or scale on a residual writer is applied after the matmul the LoRA edits, "
            "so its component along the direction would stay (the hook ablates it)"
        )
    if "token_embd.weight" not in names:
        return no("no token_embd.weight tensor")
    writers = []
    for il in range(n_layer):
        for w in _WRITERS:
            name = f"blk.{il}.{w}.weight"
            t = h.tensors.get(name)
            if t is None:
                return no(f"{name} is missing; this block writes into the residual stream some other way")
            if len(t.ne) != 2 or t.ne[1] != n_embd:
                return no(f"{name} has shape {list(t.ne)}, expected [n_in, {n_embd}]")
            if t.qtype not in gguf.GGML_QUANT_SIZES:
                return no(f"{name} has storage type {t.qtype.name}, unknown to gguf-py")
            writers.append(name)
    if h.tensors["token_embd.weight"].ne[0] != n_embd:
        return no("token_embd.weight width differs from n_embd (an input projection follows the embeddings)")
    return LoraSupport(True, "", arch, n_embd, tied, tuple(writers))


def direction_sha256(directions: np.ndarray) -> str:
    """Hash of the orthonormal basis that an ablation removes (names cached adapters)."""
    d = orthonormalize(directions)  # (k, n_embd) float32
    h = hashlib.sha256(f"{d.shape[0]}x{d.shape[1]}:".encode())
    h.update(d.tobytes())
    return h.hexdigest()


def _project_rows(h: GGUFHeader, name: str, d: np.ndarray, side: Literal["left", "right"]) -> np.ndarray:
    """``D @ W`` (left, W rows in the residual space) or ``W @ Dᵀ`` (right, W = embeddings), float64.

    ``W`` (NumPy shape ``(n_rows, ne[0])``) is dequantized in row chunks to bound memory.
    """
    t = h.tensors[name]
    step = max(1, _CHUNK_ELEMENTS // t.ne[0])
    if side == "left":  # W: (n_embd, n_in); D @ W: (k, n_in)
        acc = np.zeros((d.shape[0], t.ne[0]), dtype=np.float64)
        for s in range(0, t.n_rows, step):
            e = min(s + step, t.n_rows)
            acc += d[:, s:e] @ h.rows(name, s, e).astype(np.float64)
        return acc
    out = np.empty((t.n_rows, d.shape[0]), dtype=np.float64)  # E: (n_vocab, n_embd); E @ Dᵀ: (n_vocab, k)
    for s in range(0, t.n_rows, step):
        e = min(s + step, t.n_rows)
        out[s:e] = h.rows(name, s, e).astype(np.float64) @ d.T
    return out


def export_ablation_lora(
    model_path: str | os.PathLike[str],
    direction: np.ndarray,
    out_path: str | os.PathLike[str],
    *,
    provenance: Mapping[str, Any],
    embeddings: Literal["auto", "lora", "skip"] = "auto",
) -> Path:
    """Write a LoRA adapter that ablates ``direction`` exactly on top of the unchanged base model.

    For orthonormal rows ``D`` (k, n_embd) spanning ``direction``: tensors
    ``blk.N.{attn_output,ffn_down}.weight.lora_a`` = ``D W`` (NumPy (k, n_in); ggml ne
    [n_in, k]) and ``.lora_b`` = ``-Dᵀ`` (NumPy (n_embd, k); ne [k, n_embd]); for the
    embeddings ``token_embd.weight.lora_a`` = ``E Dᵀ`` (NumPy (n_vocab, k); ne [k, n_vocab],
    gathered by token id) and ``.lora_b`` = ``-Dᵀ``. ``adapter.lora.alpha`` = k so that
    llama.cpp's scale ``alpha / rank`` is 1. These are the shapes
    ``llama_adapter_lora_init`` checks (src/llama-adapter.cpp).

    Args:
        model_path: the base GGUF (any quantization gguf-py can dequantize).
        direction: ``(n_embd,)`` or ``(k, n_embd)``; its span is ablated.
        out_path: destination ``.gguf`` (overwritten atomically).
        provenance: written as ``pyrefusal.<key>`` (e.g. ``source_language``, ``layer``,
            ``position``); ``base_sha256`` is computed when absent.
        embeddings: ``"lora"`` puts the token embeddings in the file, ``"skip"`` leaves them
            out (the file then ablates the attention/MLP writes only), ``"auto"`` = ``"lora"``
            unless the model ties its LM head to the embeddings, where it is an error.

    Returns:
        ``out_path``.

    Raises:
        ExportError: the LoRA would not be exact for this model (architecture, biases,
            mixture of experts), tied embeddings without ``embeddings="skip"``, or a
            direction of the wrong width.
    """
    model_path = Path(model_path)
    support = ablation_lora_support(model_path)
    if not support.exact:
        raise ExportError(
            f"a LoRA cannot ablate exactly on {model_path.name}: {support.reason}. "
            "Use pyrefusal's hook (pyrefusal run), or bake the ablation into dequantized weights."
        )
    if embeddings == "auto":
        if support.tied_embeddings:
            raise ExportError(
                f"{model_path.name} ties its LM head to token_embd.weight: llama.cpp would apply a token_embd LoRA to "
                "the LM head too and abort (GGML_ASSERT in ggml_mul_mat). Pass embeddings='skip' (--skip-embeddings) "
                "to export the attention/MLP ablation only; the embeddings then keep their component along the "
                "direction, which is not the paper's full ablation (pyrefusal's runtime ablates them with its hook)."
            )
        embeddings = "lora"
    if embeddings == "lora" and support.tied_embeddings:
        raise ExportError(
            f"{model_path.name} ties its LM head to token_embd.weight; a token_embd LoRA would crash llama.cpp. "
            "Use embeddings='skip'."
        )
    if embeddings not in ("lora", "skip"):
        raise ExportError(f"embeddings must be 'auto', 'lora' or 'skip', got {embeddings!r}")

    try:
        d32 = orthonormalize(direction)  # (k, n_embd) float32
    except PyrefusalError as e:
        raise ExportError(str(e)) from e
    if d32.shape[1] != support.n_embd:
        raise ExportError(
            f"the direction has width {d32.shape[1]} but {model_path.name} has n_embd={support.n_embd}; "
            "it was computed for another model"
        )
    d = d32.astype(np.float64)
    k = d.shape[0]
    b = np.ascontiguousarray(-d.T, dtype=np.float32)  # (n_embd, k) = -Dᵀ
    header = read_gguf_header(model_path)
    tensors: list[tuple[str, np.ndarray]] = []
    if embeddings == "lora":
        a_emb = _project_rows(header, "token_embd.weight", d, "right")  # (n_vocab, k)
        tensors += [("token_embd.weight.lora_a", a_emb), ("token_embd.weight.lora_b", b)]
    for name in support.writers:
        a = _project_rows(header, name, d, "left")  # (k, n_in)
        tensors += [(f"{name}.lora_a", a), (f"{name}.lora_b", b)]

    prov = dict(provenance)
    base_sha = str(prov.pop("base_sha256", "") or prov.pop("pyrefusal.base_sha256", "") or cached_sha256(model_path))
    owned = {
        "intervention": "ablation",
        "version": __version__,
        "semantics": LORA_SEMANTICS.format(embd="" if embeddings == "skip" else " and the token embeddings"),
        "base_sha256": base_sha,
        "base_file": model_path.name,
        "direction_sha256": direction_sha256(d32),
        "rank": k,
        "lora_format": LORA_FORMAT,
        "ablation.embeddings": "lora"
        if embeddings == "lora"
        else "NOT ablated by this file"
        + (" (LM head tied to token_embd.weight)" if support.tied_embeddings else "")
        + "; ablate the embd node separately for the full ablation",
    }

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), support.arch)  # general.architecture = the base's
        try:
            writer.add_type("adapter")
            writer.add_name("pyrefusal refusal-direction ablation")
            writer.add_string("adapter.type", "lora")
            writer.add_float32("adapter.lora.alpha", float(k))
            write_provenance(writer, prov, owned)
            for name, arr in tensors:
                writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    return _write_atomically(Path(out_path), fill)


def cached_ablation_lora(
    model_path: str | os.PathLike[str],
    direction: np.ndarray,
    *,
    model_sha256: str | None = None,
    embeddings: Literal["auto", "lora", "skip"] = "auto",
    root: Path | None = None,
) -> Path:
    """The ablation LoRA for (model, direction), built once under ``cache_dir()/adapters``.

    Args:
        model_path: the base GGUF.
        direction: ``(n_embd,)`` or ``(k, n_embd)``.
        model_sha256: the base's sha256 when already known (else computed, with a sidecar).
        embeddings: as in :func:`export_ablation_lora`.
        root: cache directory (default ``registry.cache_dir() / "adapters"``).

    Returns:
        Path of the adapter file.
    """
    sha = model_sha256 or cached_sha256(model_path)
    if embeddings == "auto":
        embeddings = "skip" if ablation_lora_support(model_path).tied_embeddings else "lora"
    root = root if root is not None else cache_dir() / "adapters"
    tag = "" if embeddings == "lora" else "-noembd"
    out = root / f"ablation-{sha[:16]}-{direction_sha256(direction)[:16]}-v{LORA_FORMAT}{tag}.gguf"
    if not out.is_file():
        export_ablation_lora(
            model_path,
            direction,
            out,
            provenance={"base_sha256": sha, "source": "pyrefusal runtime cache"},
            embeddings=embeddings,
        )
    return out
