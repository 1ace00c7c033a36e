"""The one module that calls llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Everything else in pyrefusal reaches llama.cpp through the small typed functions and owner classes here, in
the spirit of llama-cpp-python's ``_internals``:

* :class:`Model` owns a ``llama_model`` (and its vocabulary): metadata, tokens, chat template, LoRA adapters;
* :class:`Context` owns a ``llama_context`` made from a :class:`Model`: decode, logits, KV memory, control
  vector, LoRA adapters, and pyrefusal's C++ hook as its eval callback;
* :class:`Batch` owns a ``llama_batch`` whose arrays are NumPy buffers;
* :class:`LoraAdapter` is a handle to an adapter loaded for a model (llama.cpp frees it with the model).

Owners free their C objects deterministically: ``close()`` is idempotent, they are context managers, and
``__del__`` is only a fallback. A :class:`Context` keeps its :class:`Model` alive; close the context first.

Also here: backend initialisation, the one llama.cpp log sink (:func:`set_llama_log`), the log capture used
while quantizing (:func:`quantize`), the one control-vector packer (:func:`pack_control_vector`, used by
:class:`pyrefusal.runtime.Runtime` and by :mod:`pyrefusal.steering.steered` for a ``llama_cpp.Llama``), the
llama.cpp file-type constants and build facts.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NewType

import llama_cpp  # must be imported before numpy/gguf in CUDA processes (see docs)

import numpy as np
from typing_extensions import Self

from pyrefusal.errors import HookError, ModelError, PyrefusalError

__all__ = [
    "GGML_LOG_CONT",
    "GGML_LOG_DEBUG",
    "GGML_LOG_ERROR",
    "GGML_LOG_INFO",
    "GGML_LOG_NONE",
    "GGML_LOG_WARN",
    "HARMLESS_WARNINGS",
    "Batch",
    "Context",
    "ContextParams",
    "LlamaContextPtr",
    "LlamaModelPtr",
    "LoraAdapter",
    "Model",
    "QuantizeResult",
    "apply_control_vector",
    "ftype_table",
    "gpu_offload_supported",
    "init_backend",
    "llama_cpp_version",
    "llama_log_wanted",
    "model_n_layer",
    "pack_control_vector",
    "quantize",
    "set_llama_log",
    "silence_logs",
    "system_info",
]

#: An opaque ``llama_model *`` (e.g. ``llama_cpp.Llama.model``).
LlamaModelPtr = NewType("LlamaModelPtr", object)
#: An opaque ``llama_context *`` (e.g. ``llama_cpp.Llama.ctx``).
LlamaContextPtr = NewType("LlamaContextPtr", object)

#: ggml's log levels (``enum ggml_log_level``; llama-cpp-python 0.3.x's own log callback still uses the older
#: numbering and prints WARN lines as errors, which is why its ``verbose=False`` lets warnings through).
GGML_LOG_NONE, GGML_LOG_DEBUG, GGML_LOG_INFO, GGML_LOG_WARN, GGML_LOG_ERROR, GGML_LOG_CONT = 0, 1, 2, 3, 4, 5

# --- process-wide state: backend and logs -----------------------------------------------------

_backend_ready = False


def init_backend() -> None:
    """Initialise llama.cpp's backends once per process (``llama_backend_init``)."""
    global _backend_ready
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


HARMLESS_WARNINGS: tuple[re.Pattern[str], ...] = (
    # a LoRA (the ablation adapter) on a weight that llama.cpp repacked for its CPU kernels stays in a plain CPU
    # buffer: one line per adapted tensor, 12 on Qwen2.5-0.5B; the adapter works as intended
    re.compile(r"cannot use buft 'CPU_REPACK', fallback to CPU"),
    # Qwen2.5 GGUFs mark '</s>' as a normal token; llama.cpp fixes its type itself, on every load
    re.compile(r"control-looking token: .* was not control-type"),
    # a context shorter than the training context: pyrefusal picks n_ctx on purpose
    re.compile(r"n_ctx_per_seq \(\d+\) < n_ctx_train \(\d+\)"),
    re.compile(r"n_ctx_seq \(\d+\) < n_ctx_train \(\d+\)"),
)
"""llama.cpp warnings that say nothing a pyrefusal user can act on; hidden unless the full log is asked for."""

_captured: list[tuple[int, str]] | None = None
_show_all = False
_last_shown = False  # whether the last line was shown (GGML_LOG_CONT lines continue it)


def llama_log_wanted(level: int, text: str) -> bool:
    """Whether pyrefusal's llama.cpp log sink prints a line (without ``PYREFUSAL_LLAMA_LOG`` / ``--llama-log``).

    Errors always; warnings unless they match :data:`HARMLESS_WARNINGS`; info and debug chatter (loading
    banners, tensor lists, context sizes) never. A ``GGML_LOG_CONT`` line follows the line it continues (the
    sink handles that).
    """
    if level == GGML_LOG_ERROR:
        return True
    if level == GGML_LOG_WARN:
        return not any(p.search(text) for p in HARMLESS_WARNINGS)
    return False


def _log_everything() -> bool:
    return _show_all or os.environ.get("PYREFUSAL_LLAMA_LOG", "").strip().lower() not in ("", "0", "false", "no")


@llama_cpp.llama_log_callback
def _log_sink(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """The one llama.cpp log callback: filters (:func:`llama_log_wanted`) and, while :func:`captured_logs`
    runs, collects. Never raises (an exception cannot cross the C boundary)."""
    global _last_shown
    try:
        line = text.decode("utf-8", errors="replace")
        if _captured is not None:
            _captured.append((int(level), line))
            del _captured[:-400]  # keep the tail only
            show = _log_everything()  # the capturing caller turns the lines into its own error
        elif level == GGML_LOG_CONT:
            show = _last_shown
        else:
            show = _log_everything() or llama_log_wanted(int(level), line)
        _last_shown = show
        if show:
            sys.stderr.write(line)
            sys.stderr.flush()
    except Exception:  # noqa: BLE001, S110  (nothing may escape into llama.cpp; a lost log line is harmless)
        pass


def set_llama_log(*, verbose: bool | None = None) -> None:
    """Route llama.cpp's (and ggml's) log through pyrefusal's sink (``llama_log_set``), replacing llama-cpp-python's.

    The sink prints llama.cpp's errors and its warnings but :data:`HARMLESS_WARNINGS`, and drops info and debug
    lines; with ``verbose=True`` (or ``PYREFUSAL_LLAMA_LOG=1``, or the CLI's ``--llama-log``) it prints every
    line. Installed when this module is imported and again whenever pyrefusal loads a model, so a
    ``llama_cpp.Llama`` (``SteeredModel``, ``chat``, ``serve``) logs through it too. The callback object is a
    module global, so it outlives every model.

    Args:
        verbose: ``True`` prints the full log, ``False`` filters again, ``None`` keeps the current choice.
    """
    global _show_all
    if verbose is not None:
        _show_all = verbose
    llama_cpp.llama_log_set(_log_sink, ctypes.c_void_p(0))


def silence_logs() -> None:
    """Install the filtering log sink (:func:`set_llama_log`); kept under its old name (it no longer drops
    errors: llama.cpp's errors are printed, its info chatter and harmless warnings are not)."""
    set_llama_log()


@contextmanager
def captured_logs() -> Iterator[list[tuple[int, str]]]:
    """Collect llama.cpp's log lines ``(level, text)`` (the last 400) while the block runs instead of printing
    them (they are printed too with ``PYREFUSAL_LLAMA_LOG``), then filter the log again."""
    global _captured
    lines: list[tuple[int, str]] = []
    _captured = lines
    set_llama_log()
    try:
        yield lines
    finally:
        _captured = None


set_llama_log()  # from import on: llama-cpp-python's own callback prints warnings as errors


# --- build facts ----------------------------------------------------------------------------


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU."""
    return bool(llama_cpp.llama_supports_gpu_offload())


def system_info() -> str:
    """llama.cpp's system info line (CPU features, backends)."""
    return llama_cpp.llama_print_system_info().decode(errors="replace")


def llama_cpp_version() -> str:
    """The llama-cpp-python version."""
    return str(llama_cpp.__version__)


def ftype_table() -> dict[str, int]:
    """``llama_ftype`` values by lower-case name (``q4_k_m`` -> 15), read from llama-cpp-python's constants."""
    table: dict[str, int] = {}
    for attr in dir(llama_cpp):
        for prefix in ("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_"):
            if attr.startswith(prefix):
                table[attr.removeprefix(prefix).lower()] = int(getattr(llama_cpp, attr))
    return table


# --- quantization -----------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizeResult:
    """What ``llama_model_quantize`` returned: its code (0 = success) and the log lines it wrote."""

    rc: int
    log: list[tuple[int, str]]


def quantize(
    src: Path,
    dst: Path,
    ftype: int,
    *,
    n_threads: int,
    allow_requantize: bool,
    keep_types: Mapping[str, int] | None = None,
) -> QuantizeResult:
    """Run ``llama_model_quantize`` from ``src`` to ``dst`` with llama.cpp's log captured.

    Args:
        src, dst: input and output GGUF paths (``dst`` is written directly; callers use a temporary name).
        ftype: ``llama_ftype`` of the output.
        n_threads: quantization threads.
        allow_requantize: let llama.cpp quantize tensors that are already quantized.
        keep_types: tensor name -> ggml type that overrides the recipe (one exact-name pattern per tensor).

    Returns:
        the return code and the captured log lines (the caller turns a failure into its own error).
    """
    init_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = n_threads
    params.ftype = ftype
    params.allow_requantize = allow_requantize
    patterns: list[bytes] = []  # keeps the C strings alive during the call
    if keep_types:
        overrides = (llama_cpp.llama_model_tensor_override * (len(keep_types) + 1))()
        for i, (name, qtype) in enumerate(keep_types.items()):
            patterns.append(f"^{re.escape(name)}$".encode())
            overrides[i].pattern = patterns[-1]
            overrides[i].type = int(qtype)
        overrides[len(keep_types)].pattern = None  # terminator
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    with captured_logs() as lines:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    return QuantizeResult(int(rc), lines)


# --- control vectors --------------------------------------------------------------------------


def pack_control_vector(vectors: Mapping[int, np.ndarray], n_embd: int, n_layer: int) -> np.ndarray:
    """Pack ``{layer: vector}`` into the flat buffer ``llama_set_adapter_cvec`` reads.

    Layer ``il`` is llama.cpp's convention: the vector is added to ``l_out-{il}`` (the output of block ``il``,
    i.e. the input of block ``il + 1``); ``il`` must be in ``1..n_layer-1`` (llama.cpp has no control-vector
    tensor for layer 0). Vectors given for the same layer add up.

    Returns:
        float32 ``(n_layer - 1, n_embd)``: row ``il - 1`` is layer ``il``, zeros where no vector is given.

    Raises:
        HookError: a layer outside ``1..n_layer-1``.
    """
    if any(not 1 <= il < n_layer for il in vectors):
        raise HookError(
            f"control-vector layers must be in 1..{n_layer - 1} (llama.cpp cannot steer layer 0); "
            f"got {sorted(vectors)}. Use the hook (Addition) to add at block input 0 or 1."
        )
    data = np.zeros((n_layer - 1, n_embd), dtype=np.float32)  # (n_layer - 1, n_embd), row il-1 = layer il
    for il, v in vectors.items():
        data[il - 1] += np.asarray(v, dtype=np.float32).reshape(n_embd)
    return data


def apply_control_vector(
    ctx: LlamaContextPtr,
    vectors: Mapping[int, np.ndarray] | None,
    n_embd: int,
    n_layer: int,
    *,
    all_layers: bool = False,
) -> None:
    """Set (or, for ``None`` / empty, clear) llama.cpp's control vector on a context, replacing any before.

    Args:
        ctx: a ``llama_context`` pointer (:attr:`Context.ptr`, or ``llama_cpp.Llama.ctx``).
        vectors: llama.cpp layer -> ``(n_embd,)`` (see :func:`pack_control_vector`); ``None`` clears, and so
            does an empty mapping unless ``all_layers`` (which sets a zero vector).
        n_embd, n_layer: the model's residual width and block count.
        all_layers: apply the packed buffer to layers ``1..n_layer-1`` (zeros where none is given) instead of
            only ``min(vectors)..max(vectors)``.

    Raises:
        HookError: a layer outside ``1..n_layer-1`` or llama.cpp rejects the vector.
    """
    if vectors is None or (not vectors and not all_layers):
        llama_cpp.llama_set_adapter_cvec(ctx, None, 0, n_embd, -1, -1)
        return
    data = pack_control_vector(vectors, n_embd, n_layer)
    start, end = (1, n_layer - 1) if all_layers else (min(vectors), max(vectors))
    ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))  # llama.cpp copies the data
    rc = llama_cpp.llama_set_adapter_cvec(ctx, ptr, data.size, n_embd, start, end)
    if rc != 0:
        raise HookError(f"llama_set_adapter_cvec failed with code {rc}; is the model's n_embd {n_embd}?")


def model_n_layer(model: LlamaModelPtr) -> int:
    """Block count of a ``llama_model`` pointer (e.g. ``llama_cpp.Llama.model``)."""
    return int(llama_cpp.llama_model_n_layer(model))


# --- owners -----------------------------------------------------------------------------------


class Owner:
    """Base of the classes that own C objects: ``close()`` frees them (idempotent), also at the end of a
    ``with`` block, and as a last resort when the object is garbage-collected."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True)
class LoraAdapter:
    """A GGUF LoRA adapter loaded for one :class:`Model` (llama.cpp frees it with the model)."""

    path: str
    handle: object  # llama_adapter_lora_p


class Model(Owner):
    """Owner of a ``llama_model`` loaded from a GGUF file.

    Args:
        path: GGUF file (the caller checks it exists and is a GGUF).
        n_gpu_layers: layers to offload.
        use_extra_bufts: let llama.cpp repack quantized weights for its CPU GEMM kernels.

    Raises:
        ModelError: llama.cpp cannot load the file.
    """

    def __init__(self, path: Path, *, n_gpu_layers: int, use_extra_bufts: bool) -> None:
        self.path = path
        self._ptr: object | None = None
        init_backend()
        silence_logs()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        mparams.use_extra_bufts = use_extra_bufts
        ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not ptr:
            raise ModelError(
                f"llama.cpp could not load {path} (truncated or corrupt file, or an architecture this "
                f"llama.cpp {llama_cpp.__version__} does not know). Set PYREFUSAL_LLAMA_LOG=1 to see llama.cpp's log; "
                "re-download the file if it is truncated."
            )
        self._ptr = ptr
        self._vocab = llama_cpp.llama_model_get_vocab(ptr)
        self.n_layer = int(llama_cpp.llama_model_n_layer(ptr))
        self.n_embd = int(llama_cpp.llama_model_n_embd(ptr))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._loras: dict[str, LoraAdapter] = {}

    @property
    def ptr(self) -> LlamaModelPtr:
        """The ``llama_model *``; raises once closed."""
        if not self._ptr:
            raise PyrefusalError(f"the model {self.path.name} was closed; load it again")
        return LlamaModelPtr(self._ptr)

    @property
    def closed(self) -> bool:
        return not self._ptr

    def close(self) -> None:
        """Free the model (idempotent; close its contexts first)."""
        if self._ptr:
            llama_cpp.llama_model_free(self._ptr)
            self._ptr = None
            self._loras.clear()

    # metadata
    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string (None when absent)."""
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else None

    def desc(self) -> str:
        """llama.cpp's one-line description (architecture, size, file type)."""
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.ptr, desc, len(desc))
        return desc.value.decode(errors="replace")

    def n_params(self) -> int:
        return int(llama_cpp.llama_model_n_params(self.ptr))

    def chat_template(self) -> str | None:
        """The GGUF's default chat template (None when it has none)."""
        template = llama_cpp.llama_model_chat_template(self.ptr, None)
        return template.decode() if template else None

    # vocabulary
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def token_to_piece(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def bos(self) -> int:
        """BOS token id (negative when the vocabulary has none)."""
        return int(llama_cpp.llama_vocab_bos(self._vocab))

    def eos(self) -> int:
        """EOS token id (negative when the vocabulary has none)."""
        return int(llama_cpp.llama_vocab_eos(self._vocab))

    def add_bos(self) -> bool:
        """Whether the tokenizer adds BOS (``tokenizer.ggml.add_bos_token``)."""
        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    # adapters
    def lora(self, path: str) -> LoraAdapter | None:
        """The LoRA adapter at ``path`` (resolved), loaded once per model; None when llama.cpp cannot load it."""
        if path not in self._loras:
            h = llama_cpp.llama_adapter_lora_init(self.ptr, path.encode())
            if not h:
                return None
            self._loras[path] = LoraAdapter(path, h)
        return self._loras[path]

    def free_lora(self, path: str) -> None:
        """Free the adapter loaded from ``path`` (resolved), if one is; it must no longer be set on a context."""
        adapter = self._loras.pop(path, None)
        if adapter is not None and self._ptr:
            llama_cpp.llama_adapter_lora_free(adapter.handle)


@dataclass(frozen=True)
class ContextParams:
    """The context settings pyrefusal uses (everything else is llama.cpp's default).

    ``n_ubatch == n_batch`` and a unified KV cache, so that one decode is one ubatch (the hook relies on it).
    ``kv_f32``: f32 KV cache and no flash attention (llama.cpp's CPU flash attention rounds Q/K/V through f16).
    """

    n_ctx: int
    n_batch: int
    n_seq_max: int
    n_threads: int
    kv_f32: bool = False


class Context(Owner):
    """Owner of a ``llama_context`` for a :class:`Model`, optionally with pyrefusal's hook as eval callback.

    Args:
        model: the model (kept alive by the context).
        params: context settings.
        eval_callback: ``(address, user_data)`` of a C ``ggml_backend_sched_eval_callback`` and its user data
            (pyrefusal's hook: ``_core.callback_address()``, ``Hook.user_data``), or None.

    Raises:
        ModelError: llama.cpp cannot create the context (usually too little memory).
    """

    def __init__(self, model: Model, params: ContextParams, *, eval_callback: tuple[int, int] | None = None) -> None:
        self.model = model
        self._ptr: object | None = None
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = params.n_ctx
        cparams.n_batch = params.n_batch
        cparams.n_ubatch = params.n_batch
        cparams.n_seq_max = params.n_seq_max
        cparams.kv_unified = True
        cparams.no_perf = True
        if params.kv_f32:
            cparams.type_k = llama_cpp.GGML_TYPE_F32
            cparams.type_v = llama_cpp.GGML_TYPE_F32
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.n_threads = params.n_threads
        cparams.n_threads_batch = params.n_threads
        self._cb: object | None = None
        if eval_callback is not None:
            self._cb = llama_cpp.ggml_backend_sched_eval_callback(eval_callback[0])  # kept alive with the context
            cparams.cb_eval = self._cb
            cparams.cb_eval_user_data = ctypes.c_void_p(eval_callback[1])
        ptr = llama_cpp.llama_init_from_model(model.ptr, cparams)
        if not ptr:
            raise ModelError(
                f"llama.cpp could not create a context for {model.path} with n_ctx={params.n_ctx}, "
                f"n_batch={params.n_batch}, n_seq_max={params.n_seq_max}. Lower them (less memory) and try again."
            )
        self._ptr = ptr
        self._mem = llama_cpp.llama_get_memory(ptr)
        self.n_vocab = model.n_vocab

    @property
    def ptr(self) -> LlamaContextPtr:
        """The ``llama_context *``; raises once closed."""
        if not self._ptr:
            raise PyrefusalError("the llama.cpp context was closed; create a new Runtime")
        return LlamaContextPtr(self._ptr)

    def close(self) -> None:
        """Free the context (idempotent)."""
        if self._ptr:
            llama_cpp.llama_free(self._ptr)
            self._ptr = None

    def decode(self, batch: Batch) -> int:
        """``llama_decode`` of the batch; returns llama.cpp's code (0 = success, 1 = KV cache full)."""
        return int(llama_cpp.llama_decode(self.ptr, batch.batch))

    def logits(self, n_out: int) -> np.ndarray:
        """The last decode's logits: a float32 ``(n_out, n_vocab)`` view, valid until the next decode."""
        ptr = llama_cpp.llama_get_logits(self.ptr)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))  # (n_out, n_vocab) view, float32

    def clear_memory(self) -> None:
        """Clear the KV cache (every sequence, data included)."""
        llama_cpp.llama_memory_clear(self._mem, True)

    def seq_copy(self, src: int, dst: int) -> None:
        """Share sequence ``src``'s whole KV cache with sequence ``dst``."""
        llama_cpp.llama_memory_seq_cp(self._mem, src, dst, -1, -1)

    def set_loras(self, adapters: Sequence[tuple[LoraAdapter, float]]) -> int:
        """Apply LoRA adapters with scales (empty: remove them); returns llama.cpp's code (0 = success)."""
        if not adapters:
            return int(llama_cpp.llama_set_adapters_lora(self.ptr, None, 0, None))
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(adapters))(*[a.handle for a, _ in adapters])
        scales = (ctypes.c_float * len(adapters))(*[float(s) for _, s in adapters])
        return int(llama_cpp.llama_set_adapters_lora(self.ptr, arr, len(adapters), scales))


class Batch:
    """Owner of a ``llama_batch`` whose arrays are NumPy buffers (vectorised fills, one seq id per token).

    The C struct points into the NumPy arrays, which this object keeps alive; nothing is allocated by llama.cpp.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)  # (capacity,)
        self.pos = np.zeros(capacity, dtype=np.int32)  # (capacity,)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)  # (capacity,)
        self.seq_val = np.zeros(capacity, dtype=np.int32)  # (capacity,)
        self.logits = np.zeros(capacity, dtype=np.int8)  # (capacity,)
        base = self.seq_val.ctypes.data
        self._seq_ptrs = (ctypes.POINTER(ctypes.c_int32) * capacity)(
            *[ctypes.cast(base + 4 * i, ctypes.POINTER(ctypes.c_int32)) for i in range(capacity)]
        )
        self.batch = llama_cpp.llama_batch()
        self.batch.token = self.token.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token))
        self.batch.embd = ctypes.POINTER(ctypes.c_float)()
        self.batch.pos = self.pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
        self.batch.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.batch.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id)))
        self.batch.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def fill(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, logits: np.ndarray) -> None:
        """Load ``n`` tokens: ids, positions, sequence ids and output flags, each ``(n,)``."""
        n = len(tokens)
        if n > self.capacity:
            raise PyrefusalError(f"internal: batch of {n} tokens exceeds capacity {self.capacity}")
        self.token[:n] = tokens
        self.pos[:n] = pos
        self.seq_val[:n] = seq
        self.logits[:n] = logits
        self.batch.n_tokens = n
