"""GGUF files checked before llama.cpp sees them: a hardened header parser and a metadata validator.

llama.cpp trusts a model file's hyper-parameters: a ``block_count`` of 0 or 0xffffffff, a NaN RMS-norm
epsilon or a head count that does not divide the width ends in a ``GGML_ASSERT`` that aborts the whole
process (SIGABRT), taking every result held in memory with it. :func:`validate_model_file` reads the
header with :func:`parse_gguf` (a bounds-checked parser of our own: gguf-py's ``GGUFReader`` spends
seconds on a 150k-entry tokenizer and raises assorted exceptions on corrupt files) and checks the
metadata pyrefusal and llama.cpp depend on; anything impossible becomes a :class:`GGUFFileError`
that names the file, the key, its value and the fix.

:func:`parse_gguf` is also the parser behind :func:`pyrefusal.steering.export.read_gguf_header`. It
never raises anything but :class:`GGUFFileError` on a corrupt or truncated file (no OverflowError,
ZeroDivisionError, MemoryError): every count and length is checked against the bytes left.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401  (import llama_cpp before numpy/gguf: required in CUDA processes)

import gguf

from pyrefusal.errors import ModelError

__all__ = ["GGUFFileError", "RawGGUF", "RawTensor", "parse_gguf", "validate_model_file"]

#: llama.cpp's LLAMA_MAX_LAYERS: more blocks than this is rejected (or overflows its per-layer arrays).
MAX_LAYERS = 512
#: ggml's GGML_MAX_DIMS.
MAX_DIMS = 4
#: Widths beyond this are not a real model (and would make llama.cpp allocate absurd buffers).
MAX_WIDTH = 1 << 20
#: Architectures without attention heads (``head_count`` 0 is legitimate there).
ATTENTION_FREE = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
_GGUF_VERSION = getattr(gguf, "__version__", "(version unknown)")  # not every gguf release sets __version__
_MAX_DEPTH = 8  # nesting of GGUF arrays of arrays
_FIX = "re-download or re-convert the model (e.g. with llama.cpp's convert_hf_to_gguf.py)"

SCALAR_FORMATS: dict[int, str] = {
    # struct format of each scalar GGUF metadata type (little-endian)
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}


class GGUFFileError(ModelError):
    """A GGUF file is corrupt, truncated, or holds hyper-parameters no model can have."""


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array whose values were skipped: its element type and length."""

    etype: int
    count: int
    duplicate: str | None = None  # for tokenizer.ggml.tokens: a token text that occurs twice (llama.cpp aborts)


@dataclass(frozen=True)
class RawTensor:
    """One tensor-directory entry: name, ggml dimensions (fastest first), type code, absolute data offset."""

    name: str
    ne: tuple[int, ...]
    qtype: int
    offset: int


@dataclass(frozen=True)
class RawGGUF:
    """A parsed GGUF header.

    Attributes:
        path: the file.
        version: GGUF version (2 or 3).
        kv: scalar and string metadata; arrays appear as :class:`ArrayInfo` (values not read).
        tensors: the tensor directory, in file order.
        data_start: absolute offset of the tensor data section.
        file_size: size of the file in bytes.
        invalid_utf8: metadata keys whose string value is not UTF-8 (GGUF strings must be).
    """

    path: Path
    version: int
    kv: dict[str, Any]
    tensors: list[RawTensor]
    data_start: int
    file_size: int
    invalid_utf8: tuple[str, ...] = ()


def _fail(path: Path, what: str, fix: str = _FIX) -> GGUFFileError:
    return GGUFFileError(f"{path}: {what}; {fix}")


def parse_gguf(path: str | os.PathLike[str]) -> RawGGUF:
    """Parse the header of a GGUF file (v2/v3, little-endian) without materialising array values.

    Raises:
        GGUFFileError: missing, not a GGUF file, truncated, or a corrupt header (counts beyond the file,
            an alignment of 0 or not a power of two, more than 4 dimensions, unknown value types).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelError(
            f"cannot read model file {path} ({exc.strerror or exc}); pass an existing .gguf file"
        ) from None
    if size < 24:
        raise _fail(path, "not a GGUF file (shorter than a GGUF header)", "pass a .gguf model file")
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, buf, size)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path} ({exc.strerror or exc}); check the file") from None


def _parse(path: Path, buf: mmap.mmap, size: int) -> RawGGUF:
    pos = 0
    bad_utf8: list[str] = []

    def need(n: int, what: str) -> None:
        if n < 0 or pos + n > size:
            raise _fail(
                path, f"truncated or corrupt GGUF header ({what} needs {n} bytes at offset {pos}, file has {size})"
            )

    def take(fmt: str, what: str) -> Any:
        nonlocal pos
        n = struct.calcsize(fmt)
        need(n, what)
        (val,) = struct.unpack_from(fmt, buf, pos)
        pos += n
        return val

    def take_str(what: str, key: str | None = None) -> str:
        nonlocal pos
        n = take("<Q", what)
        need(n, what)
        raw = bytes(buf[pos : pos + n])
        pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            bad_utf8.append(key or what)
            return raw.decode("utf-8", errors="replace")

    def value(vtype: int, key: str, depth: int = 0) -> Any:
        nonlocal pos
        if vtype == gguf.GGUFValueType.STRING:
            return take_str(f"value of {key}", key)
        if vtype == gguf.GGUFValueType.ARRAY:
            if depth >= _MAX_DEPTH:
                raise _fail(path, f"metadata {key}: arrays nested deeper than {_MAX_DEPTH}")
            etype, count = take("<I", f"array type of {key}"), take("<Q", f"array length of {key}")
            if etype == gguf.GGUFValueType.STRING:
                need(8 * count, f"array {key} ({count} strings)")
                seen: set[bytes] | None = set() if key == "tokenizer.ggml.tokens" else None
                duplicate = None
                for _ in range(count):
                    n = take("<Q", f"string in {key}")
                    need(n, f"string in {key}")
                    if seen is not None and duplicate is None:
                        text = bytes(buf[pos : pos + n])
                        if text in seen:
                            duplicate = text.decode("utf-8", errors="replace")
                        seen.add(text)
                    pos += n
                return ArrayInfo(etype, count, duplicate)
            elif etype == gguf.GGUFValueType.ARRAY:
                need(12 * count, f"array {key} ({count} arrays)")
                for _ in range(count):
                    value(etype, key, depth + 1)
            elif etype in SCALAR_FORMATS:
                n = count * struct.calcsize(SCALAR_FORMATS[etype])
                need(n, f"array {key} ({count} values)")
                pos += n
            else:
                raise _fail(path, f"metadata {key}: unknown array element type {etype}")
            return ArrayInfo(etype, count)
        if vtype not in SCALAR_FORMATS:
            raise _fail(path, f"metadata {key}: unknown value type {vtype}")
        return take(SCALAR_FORMATS[vtype], f"value of {key}")

    if bytes(buf[:4]) != b"GGUF":
        raise _fail(path, "not a GGUF file (bad magic)", "pass a .gguf model file")
    pos = 4
    version = take("<I", "version")
    if version < 2 or version > 3:
        raise _fail(path, f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = take("<Q", "tensor count"), take("<Q", "metadata count")
    # each metadata entry takes at least 12 bytes (key length + type), each tensor entry at least 24
    if n_kv * 12 > size - pos or n_tensors * 24 > size - pos:
        raise _fail(
            path, f"corrupt GGUF header ({n_tensors} tensors and {n_kv} metadata entries cannot fit in {size} bytes)"
        )
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = take_str("metadata key")
        kv[key] = value(take("<I", f"type of {key}"), key)
    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = take_str("tensor name")
        n_dims = take("<I", f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _fail(path, f"tensor {name!r} has {n_dims} dimensions (ggml allows 1..{MAX_DIMS})")
        ne = tuple(take("<Q", f"dimensions of {name}") for _ in range(n_dims))
        raw.append((name, ne, take("<I", f"type of {name}"), take("<Q", f"offset of {name}")))
    align = kv.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise _fail(path, f"general.alignment = {align!r} is not a positive power of two (GGUF's default is 32)")
    data_start = (pos + align - 1) // align * align
    tensors = [RawTensor(name, ne, qt, data_start + off) for name, ne, qt, off in raw]
    return RawGGUF(
        path=path,
        version=version,
        kv=kv,
        tensors=tensors,
        data_start=data_start,
        file_size=size,
        invalid_utf8=tuple(bad_utf8),
    )


def tensor_nbytes(t: RawTensor) -> int | None:
    """Bytes of tensor ``t``'s data, or None when its type is unknown to gguf-py or ``ne[0]`` is not whole blocks."""
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.qtype)]
    except (ValueError, KeyError):
        return None
    if t.ne[0] % block:
        return None
    return math.prod(t.ne) // block * type_size


_BLK = re.compile(r"^blk\.(\d+)\.")


def validate_model_file(path: str | os.PathLike[str]) -> RawGGUF:
    """Check a model GGUF's header and the hyper-parameters llama.cpp relies on, before llama.cpp loads it.

    Checked: a parseable header (see :func:`parse_gguf`); ``general.architecture`` a string;
    ``{arch}.block_count`` in 1..512 and equal to the number of ``blk.N`` tensor groups;
    ``{arch}.embedding_length`` in 1..2^20 and equal to ``token_embd.weight``'s row length;
    ``context_length`` > 0; head counts >= 1 (0 only for attention-free architectures) with ``head_count_kv`` dividing
    ``head_count`` and ``head_count`` dividing the width (unless ``key_length`` gives the head size);
    RMS / layer-norm epsilons and RoPE bases finite and positive; every tensor of a known type with whole
    blocks per row, non-negative dimensions, aligned and inside the file; UTF-8 metadata strings; a non-empty
    vocabulary without duplicate tokens that matches ``token_embd.weight``. Adapter files (control vectors,
    LoRAs) only get the header and tensor checks.

    Returns:
        The parsed header.

    Raises:
        GGUFFileError: the first problem found, naming the key, its value and the fix.
    """
    g = parse_gguf(path)
    p, kv = g.path, g.kv
    for t in g.tensors:
        if any(d < 0 or d >= 1 << 62 for d in t.ne) or math.prod(t.ne) >= 1 << 62:
            raise _fail(p, f"tensor {t.name!r} has impossible dimensions {list(t.ne)}")
        if t.offset % kv.get("general.alignment", 32):
            raise _fail(p, f"tensor {t.name!r}'s data offset {t.offset} is not aligned")
        nbytes = tensor_nbytes(t)
        if nbytes is None:
            raise _fail(
                p,
                f"tensor {t.name!r} has type {t.qtype} unknown to gguf {_GGUF_VERSION} or a row "
                f"length {t.ne[0]} that is not whole blocks",
                "upgrade gguf (`pip install -U gguf`) or re-convert the model",
            )
        if t.offset + nbytes > g.file_size:
            raise _fail(
                p,
                f"truncated or corrupt file: tensor {t.name!r} ends at byte {t.offset + nbytes}, beyond the file's "
                f"{g.file_size} bytes",
            )
    if g.invalid_utf8:
        raise _fail(p, f"metadata {', '.join(g.invalid_utf8[:3])} is not UTF-8 text (GGUF strings must be)")
    arch = kv.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise _fail(p, f"general.architecture = {arch!r} is not an architecture name")
    if arch == "controlvector" or kv.get("general.type") == "adapter":
        return g
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", arch):
        raise _fail(p, f"general.architecture = {arch!r} is not an architecture name")

    def num(key: str, *, required: bool = False, lo: float = 1, hi: float | None = None, real: bool = False) -> Any:
        full = f"{arch}.{key}"
        if full not in kv:
            if required:
                raise _fail(p, f"{full} is missing")
            return None
        v = kv[full]
        if isinstance(v, ArrayInfo):
            return v  # per-layer arrays: checked by the caller where it matters
        ok_type = isinstance(v, (int, float)) if real else isinstance(v, int)
        if (
            isinstance(v, bool)
            or not ok_type
            or (real and not math.isfinite(v))
            or v < lo
            or (hi is not None and v > hi)
        ):
            rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            kind = "a finite number" if real else "an integer"
            raise _fail(p, f"{full} = {v!r} is impossible (must be {kind} {rng})")
        return v

    n_layer = num("block_count", required=True, hi=MAX_LAYERS)
    if isinstance(n_layer, ArrayInfo):
        raise _fail(p, f"{arch}.block_count is an array; it must be an integer in 1..{MAX_LAYERS}")
    blocks = {int(m.group(1)) for t in g.tensors if (m := _BLK.match(t.name))}
    if blocks and max(blocks) + 1 != n_layer:
        raise _fail(p, f"{arch}.block_count = {n_layer} but the file has tensors for blocks 0..{max(blocks)}")
    n_embd = num("embedding_length", required=True, hi=MAX_WIDTH)
    if isinstance(n_embd, ArrayInfo):
        raise _fail(p, f"{arch}.embedding_length is an array; it must be an integer in 1..{MAX_WIDTH}")
    by_name = {t.name: t for t in g.tensors}
    embd = by_name.get("token_embd.weight")
    if embd is not None and embd.ne[0] != n_embd:
        raise _fail(p, f"{arch}.embedding_length = {n_embd} but token_embd.weight has rows of {embd.ne[0]}")
    num("context_length", hi=1 << 31)
    ff = num("feed_forward_length", lo=0, hi=1 << 24)
    if isinstance(ff, ArrayInfo) and ff.count not in (0, n_layer):
        raise _fail(p, f"{arch}.feed_forward_length has {ff.count} entries for {n_layer} blocks")
    n_head = num("attention.head_count", lo=0, hi=1 << 16)
    n_head_kv = num("attention.head_count_kv", lo=0, hi=1 << 16)
    for key, v in (("attention.head_count", n_head), ("attention.head_count_kv", n_head_kv)):
        if isinstance(v, ArrayInfo) and v.count != n_layer:
            raise _fail(p, f"{arch}.{key} has {v.count} entries for {n_layer} blocks")
    if n_head == 0 and arch not in ATTENTION_FREE:
        raise _fail(p, f"{arch}.attention.head_count = 0 is impossible for a {arch} model (it has attention)")
    head_size = num("attention.key_length", hi=1 << 16)
    if isinstance(n_head, int) and n_head > 0:
        if head_size is None and n_embd % n_head:
            raise _fail(p, f"{arch}.attention.head_count = {n_head} does not divide {arch}.embedding_length = {n_embd}")
        if isinstance(n_head_kv, int) and (n_head_kv == 0 or n_head % n_head_kv):
            raise _fail(p, f"{arch}.attention.head_count_kv = {n_head_kv} does not divide head_count = {n_head}")
    for key in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        num(key, lo=1e-30, hi=1.0, real=True)
    for key in ("rope.freq_base", "rope.scaling.factor"):
        num(key, lo=1e-30, real=True)
    rot = num("rope.dimension_count", lo=0, hi=1 << 16)
    head = head_size or (n_embd // n_head if isinstance(n_head, int) and n_head > 0 else None)
    if isinstance(rot, int) and (rot % 2 or (head is not None and rot > head)):
        raise _fail(p, f"{arch}.rope.dimension_count = {rot} must be even and at most the head size ({head})")
    tokens = kv.get("tokenizer.ggml.tokens")
    if tokens is not None:
        if not isinstance(tokens, ArrayInfo) or tokens.count == 0:
            raise _fail(p, "tokenizer.ggml.tokens is empty or not a list")
        if tokens.duplicate is not None:
            raise _fail(p, f"tokenizer.ggml.tokens holds the token {tokens.duplicate[:40]!r} twice")
        if embd is not None and len(embd.ne) > 1 and embd.ne[1] != tokens.count:
            raise _fail(p, f"tokenizer.ggml.tokens has {tokens.count} tokens but token_embd.weight has {embd.ne[1]}")
        for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            arr = kv.get(key)
            if isinstance(arr, ArrayInfo) and arr.count != tokens.count:
                raise _fail(p, f"{key} has {arr.count} entries for {tokens.count} tokens")
    return g
