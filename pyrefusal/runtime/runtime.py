"""The model runtime: GGUF models run by llama.cpp through llama-cpp-python's low-level API.

This module owns the lifetime of llama.cpp objects (model, context, batch), tokenisation and
chat formatting, and batched decoding: many sequences per ``llama_decode`` for prompt
processing and for greedy generation. Every context carries pyrefusal's C++ hook
(:mod:`pyrefusal._core`) as its eval callback, driven through :meth:`Runtime.set_plan`.

It must not import the pipeline stages (directions, selection, evaluation); they import it.

Conventions:
    * ``layer`` is llama.cpp's block index ``il`` (0-based). "Block input ``l``" is the residual
      stream entering block ``l``: node ``embd`` for ``l == 0`` and ``l_out-{l-1}`` otherwise;
      "block input ``n_layer``" is the output of the last block (before the final norm).
    * One decode is always one llama.cpp ubatch (``n_ubatch == n_batch`` and a unified KV
      cache), so graph rows are the batch tokens in order; the hook relies on that.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import llama_cpp  # must be imported before numpy/gguf in CUDA processes (see docs)
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

import numpy as np
from typing_extensions import Self

from pyrefusal import _core
from pyrefusal.errors import HookError, ModelError, PyrefusalError

_SENTINEL = "PYREFUSALINSTRUCTIONSENTINEL"
_SYSTEM_SENTINEL = "PYREFUSALSYSTEMSENTINEL"

# The paper's prompts (docs/method.md §2): one user turn and the opened assistant turn, no system turn at
# all (Qwen2.5's default "You are Qwen, created by Alibaba Cloud…" and Llama 3.1's date header are not
# used). Keyed by a marker that identifies the family in a GGUF chat template; "{x}" is the instruction.
# BOS is added where the model's tokenizer adds it (``tokenizer.ggml.add_bos_token``), once.
PAPER_USER_TURNS: dict[str, tuple[str, str]] = {
    "chatml": ("<|im_start|>", "<|im_start|>user\n{x}<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": (
        "<|start_header_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\n{x}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "gemma": ("<start_of_turn>", "<start_of_turn>user\n{x}<end_of_turn>\n<start_of_turn>model\n"),
}

PromptFormat = Literal["template", "paper"]
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


def _silence_llama_logs() -> None:
    """Route llama.cpp's log output to nowhere unless PYREFUSAL_LLAMA_LOG is set."""
    if os.environ.get("PYREFUSAL_LLAMA_LOG"):
        return
    llama_cpp.llama_log_set(_NULL_LOG, ctypes.c_void_p(0))


@llama_cpp.llama_log_callback
def _NULL_LOG(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    return None


# --- architecture node names ---------------------------------------------------------------


@dataclass(frozen=True)
class ResidualNodes:
    """Names of the residual-stream nodes of an architecture's llama.cpp graph.

    Attributes:
        embd: the token-embedding node (input of block 0).
        attn_resid: the residual stream after the attention sub-block of layer ``{il}``.
        block_out: the residual stream after block ``{il}`` (where control vectors are added).
    """

    embd: str = "embd"
    attn_resid: str = "ffn_inp-{il}"
    block_out: str = "l_out-{il}"

    def block_input(self, layer: int) -> str:
        """Node holding the residual stream entering block ``layer`` (``n_layer`` = final)."""
        return self.embd if layer == 0 else self.block_out.format(il=layer - 1)

    def ablation_nodes(self, n_layer: int) -> list[str]:
        """Every write into the residual stream: embeddings, then per layer attention and block output."""
        names = [self.embd]
        for il in range(n_layer):
            names += [self.attn_resid.format(il=il), self.block_out.format(il=il)]
        return names


# Gemma's graphs (llama.cpp src/models/gemma*.cpp) scale the embeddings by sqrt(n_embd) in a node of
# their own and name the residual stream after attention "sa_out"; every write still goes through
# these two nodes and l_out.
_GEMMA_NODES = ResidualNodes(embd="inp_scaled", attn_resid="sa_out-{il}")

# Architectures whose residual nodes were checked against the graph (tests list them). For pre-norm
# blocks (llama, qwen, mistral) ablating the residual stream after each write equals the paper's hooks
# on block inputs + attention outputs + MLP outputs. For Gemma's sandwich norms the paper's hooks on
# the sub-block outputs are not an exact ablation (the post-norm puts the direction back, docs/method.md
# §5.1, §9.11); the residual-stream ablation here is, so on Gemma the two differ by design.
KNOWN_ARCHITECTURES: dict[str, ResidualNodes] = {
    "llama": ResidualNodes(),
    "qwen2": ResidualNodes(),
    "qwen3": ResidualNodes(),
    "mistral3": ResidualNodes(),
    "gemma": _GEMMA_NODES,
    "gemma2": _GEMMA_NODES,
    "gemma3": _GEMMA_NODES,
}


# --- model facts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What a run records about the model (saved in results.json)."""

    name: str
    path: str
    sha256: str
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_params: int
    file_type: str
    chat_template: str | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("chat_template")
        return d


@dataclass(frozen=True)
class Generation:
    """One greedy completion."""

    tokens: list[int]
    text: str
    finish_reason: str  # "eos" (an end-of-generation token) or "length"


@dataclass
class Timings:
    """Wall-clock seconds and token counts, accumulated per runtime."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    decodes: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    """Streaming SHA-256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU."""
    return bool(llama_cpp.llama_supports_gpu_offload())


def build_info() -> dict[str, Any]:
    """Versions and capabilities of the runtime and of our extension."""
    info = dict(_core.build_info())
    info["llama_cpp_python"] = llama_cpp.__version__
    info["gpu_offload"] = gpu_offload_supported()
    info["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace")
    return info


class _Batch:
    """A llama_batch whose arrays are NumPy buffers (vectorised fills, one seq id per token)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_val = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
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
        n = len(tokens)
        if n > self.capacity:
            raise PyrefusalError(f"internal: batch of {n} tokens exceeds capacity {self.capacity}")
        self.token[:n] = tokens
        self.pos[:n] = pos
        self.seq_val[:n] = seq
        self.logits[:n] = logits
        self.batch.n_tokens = n


# --- the runtime ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanEntry:
    """Operations on one graph node (see csrc/hook.h)."""

    ablate: bool = False
    add_index: int = -1
    capture_layer: int = -1


class Runtime:
    """A loaded GGUF model with one llama.cpp context and pyrefusal's hook attached.

    Args:
        path: GGUF file.
        n_ctx: KV-cache size in tokens, shared by all sequences of a decode group.
        n_batch: most tokens per ``llama_decode`` (also the ubatch size).
        n_seq_max: most sequences decoded together.
        n_gpu_layers: layers to offload; ``-1`` = all when llama.cpp has GPU offload, else 0.
        n_threads: CPU threads (default: all cores).
        hook: attach the eval callback. ``False`` gives plain llama.cpp (for benchmarks).
        name: display name; sha256: known hash (computed when omitted).
        kv_f32: keep the KV cache in f32 instead of llama.cpp's default f16 (exact comparisons).
        repack: let llama.cpp repack quantized weights for its CPU GEMM kernels (faster; their
            results depend slightly on how many rows a matmul has, i.e. on the batch).

    Raises:
        ModelError: the file is missing, not a GGUF, or llama.cpp cannot load it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int = 8192,
        n_batch: int = 2048,
        n_seq_max: int = 32,
        n_gpu_layers: int = -1,
        n_threads: int | None = None,
        hook: bool = True,
        name: str | None = None,
        sha256: str | None = None,
        kv_f32: bool = False,
        repack: bool = True,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"model file not found: {self.path}. Pass an existing .gguf path or a registry name.")
        with self.path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelError(f"{self.path} is not a GGUF file (bad magic). Re-download it or pass a .gguf file.")
        _init_backend()
        _silence_llama_logs()

        mparams = llama_cpp.llama_model_default_params()
        if n_gpu_layers < 0:
            n_gpu_layers = 999 if gpu_offload_supported() else 0
        mparams.n_gpu_layers = n_gpu_layers
        mparams.use_extra_bufts = repack
        self.n_gpu_layers = n_gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise ModelError(
                f"llama.cpp could not load {self.path} (truncated or corrupt file, or an architecture this "
                f"llama.cpp {llama_cpp.__version__} does not know). Set PYREFUSAL_LLAMA_LOG=1 to see llama.cpp's log; "
                "re-download the file if it is truncated."
            )
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_layer = int(llama_cpp.llama_model_n_layer(self._model))
        self.n_embd = int(llama_cpp.llama_model_n_embd(self._model))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.arch = self.meta("general.architecture") or "unknown"
        self.nodes = KNOWN_ARCHITECTURES.get(self.arch, ResidualNodes())

        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self.hook: _core.Hook | None = _core.Hook(self.n_embd) if hook else None
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.kv_unified = True
        cparams.no_perf = True
        if kv_f32:
            # Exact mode: f32 KV cache and no flash attention (llama.cpp's CPU flash attention
            # rounds Q/K/V through f16, ~1e-3 on the residual stream).
            cparams.type_k = llama_cpp.GGML_TYPE_F32
            cparams.type_v = llama_cpp.GGML_TYPE_F32
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        threads = n_threads or os.cpu_count() or 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        if self.hook is not None:
            self._cb = llama_cpp.ggml_backend_sched_eval_callback(_core.callback_address())
            cparams.cb_eval = self._cb
            cparams.cb_eval_user_data = ctypes.c_void_p(self.hook.user_data)
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            self._model = None
            raise ModelError(
                f"llama.cpp could not create a context for {self.path} with n_ctx={n_ctx}, n_batch={n_batch}, "
                f"n_seq_max={n_seq_max}. Lower them (less memory) and try again."
            )
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = _Batch(n_batch)
        self.timings = Timings()
        self._graph_names: set[str] | None = None
        self.share_prefix = True
        self._loras: dict[str, Any] = {}
        self._cvec_on = False
        self._lora_on = False

        template = llama_cpp.llama_model_chat_template(self._model, None)
        self.chat_template: str | None = template.decode() if template else None
        self._formatter: Jinja2ChatFormatter | None = None
        self.name = name or self.meta("general.name") or self.path.stem
        self._sha256 = sha256
        self._eoi: list[int] | None = None
        self._paper_turn: str | None = None
        self._prompt_format: PromptFormat = "template"

    @classmethod
    def for_study(cls, config: Any, *, log: Callable[[str], None] | None = None) -> Runtime:
        """Open the model of a run or transfer ``config`` (its ``model``, ``n_ctx``, ``n_seq_max``,
        ``n_gpu_layers``, ``n_threads`` and ``prompt_format``) and check, before any work, that the
        interventions can edit its graph (:meth:`check_residual_nodes`)."""
        rt = cls.open(
            config.model,
            log=log,
            n_ctx=config.n_ctx,
            n_seq_max=config.n_seq_max,
            n_gpu_layers=config.n_gpu_layers,
            n_threads=config.n_threads,
        )
        try:
            rt.prompt_format = config.prompt_format
            rt.check_residual_nodes()
        except BaseException:
            rt.close()
            raise
        return rt

    @classmethod
    def open(cls, spec: str, *, log: Callable[[str], None] | None = None, **kwargs: Any) -> Runtime:
        """Resolve ``spec`` (registry name, local path or hub spec; see :func:`pyrefusal.data.registry.resolve_model`)
        and load it, carrying over its verified sha256 and registry name. ``kwargs`` go to the constructor.
        """
        from pyrefusal.data.registry import resolve_model  # the registry does not depend on the runtime

        resolved = resolve_model(spec)
        if log is not None:
            log(f"model: {resolved.path} ({resolved.source})")
        kwargs.setdefault("name", resolved.entry.name if resolved.entry else None)
        return cls(resolved.path, sha256=resolved.sha256, **kwargs)

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Free the llama.cpp context and model (idempotent)."""
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # -- metadata ----------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string (None when absent)."""
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_of(self.path)
        return self._sha256

    def info(self) -> ModelInfo:
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self._model, desc, len(desc))
        ftype = self.meta("general.file_type")
        return ModelInfo(
            name=self.name,
            path=str(self.path),
            sha256=self.sha256,
            arch=self.arch,
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_vocab=self.n_vocab,
            n_params=int(llama_cpp.llama_model_n_params(self._model)),
            file_type=f"{desc.value.decode(errors='replace')} (general.file_type={ftype})",
            chat_template=self.chat_template,
        )

    # -- tokens and text ---------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Tokenise ``text`` (special tokens such as ``<|im_start|>`` parsed by default)."""
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Iterable[int], *, special: bool = False) -> str:
        """Text of ``tokens``; control tokens are dropped unless ``special``."""
        return b"".join(self.token_bytes(t, special=special) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # -- chat formatting ---------------------------------------------------------------------

    def _chat_formatter(self) -> Jinja2ChatFormatter:
        if self._formatter is None:
            if not self.chat_template:
                raise ModelError(
                    f"{self.path.name} has no chat template in its metadata (tokenizer.chat_template); "
                    "pyrefusal needs a chat model. Use an instruction-tuned GGUF."
                )
            bos = llama_cpp.llama_vocab_bos(self._vocab)
            eos = llama_cpp.llama_vocab_eos(self._vocab)
            self._formatter = Jinja2ChatFormatter(
                template=self.chat_template,
                bos_token=self.detokenize([bos], special=True) if bos >= 0 else "",
                eos_token=self.detokenize([eos], special=True) if eos >= 0 else "",
                add_generation_prompt=True,
            )
        return self._formatter

    def format_messages(self, messages: list[dict[str, str]]) -> str:
        """Render a conversation (``[{"role": ..., "content": ...}, ...]``) with the GGUF's own
        chat template, ending with the assistant's turn opened (``add_generation_prompt``)."""
        return self._chat_formatter()(messages=messages).prompt  # type: ignore[arg-type]

    def format_chat(self, instruction: str, system: str | None = None) -> str:
        """Render one user turn with the GGUF's own chat template, ready for the reply.

        ``system=None`` leaves the template's default (e.g. Qwen2.5's default system prompt), as any
        llama.cpp chat app would, unless :attr:`prompt_format` is ``"paper"``: then the prompt is the
        user turn alone, with no system turn (:meth:`paper_user_turn`).
        """
        if system is None and self.prompt_format == "paper":
            return self.paper_user_turn().replace("{x}", instruction)
        messages: list[dict[str, str]] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": instruction})
        return self.format_messages(messages)

    @property
    def family(self) -> str | None:
        """The paper's model family this model belongs to (``"qwen2"``, ``"llama3"``, ``"gemma2"``) or None;
        it picks the paper's refusal tokens (:data:`pyrefusal.method.selection.PAPER_REFUSAL_OPENINGS`)."""
        if self.arch in ("qwen2", "gemma2"):
            return self.arch
        if self.arch == "llama" and PAPER_USER_TURNS["llama3"][0] in (self.chat_template or ""):
            return "llama3"
        return None

    @property
    def prompt_format(self) -> PromptFormat:
        """How a prompt without a system message is rendered: ``"template"`` (the GGUF chat template,
        with the default system prompt it may add, as llama.cpp chat apps do) or ``"paper"`` (the user
        turn alone, as the paper: :data:`PAPER_USER_TURNS`)."""
        return self._prompt_format

    @prompt_format.setter
    def prompt_format(self, value: PromptFormat) -> None:
        if value not in ("template", "paper"):
            raise ValueError(f"prompt_format must be 'template' or 'paper', got {value!r}")
        if value != self._prompt_format:
            self._prompt_format = value
            self._eoi = None  # derived from the rendering

    def paper_user_turn(self) -> str:
        """The paper's prompt for this model's chat format, ``"{x}"`` standing for the instruction.

        The family is recognised from the GGUF chat template, and the result is checked against it: the
        template, given a system message, must end with exactly this user turn, so the two renderings
        differ only by the system turn.

        Raises:
            ModelError: the template is not ChatML (Qwen, Yi), Llama 3 or Gemma, or does not end as
                that format does.
        """
        if self._paper_turn is not None:
            return self._paper_turn
        template = self.chat_template or ""
        family = next((f for f, (marker, _) in PAPER_USER_TURNS.items() if marker in template), None)
        if family is None:
            raise ModelError(
                f"the paper's prompt format (no system turn) is defined for ChatML (Qwen, Yi), Llama 3 and Gemma "
                f"chat templates, and {self.path.name}'s template is none of them; use --prompt-format template "
                "(the GGUF's own template) or give an explicit --system-prompt"
            )
        turn = PAPER_USER_TURNS[family][1]
        rendered = (
            self.format_messages(
                [{"role": "system", "content": _SYSTEM_SENTINEL}, {"role": "user", "content": _SENTINEL}]
            )
            if family != "gemma"  # Gemma templates reject a system role
            else self.format_messages([{"role": "user", "content": _SENTINEL}])
        )
        if not rendered.endswith(turn.replace("{x}", _SENTINEL)):
            raise ModelError(
                f"{self.path.name}'s chat template does not end its user turn as the paper's {family} format "
                f"({turn!r}); use --prompt-format template"
            )
        bos = llama_cpp.llama_vocab_bos(self._vocab)  # added where the tokenizer adds it (as HF's tokenizer call)
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        prefix = self.detokenize([bos], special=True) if add_bos and bos >= 0 else ""
        self._paper_turn = prefix + turn
        return self._paper_turn

    def chat_tokens(self, instruction: str, system: str | None = None) -> list[int]:
        """Tokens of a formatted chat prompt (as llama-cpp-python's chat completion tokenises it)."""
        return self.tokenize(self.format_chat(instruction, system), add_special=False, parse_special=True)

    def eoi_tokens(self, system: str | None = None) -> list[int]:
        """Post-instruction tokens: what the template puts after the user's text.

        Derived by rendering a sentinel instruction and tokenising the suffix after it; for
        Qwen2.5 this is ``<|im_end|> \\n <|im_start|> assistant \\n`` (5 tokens).
        """
        if self._eoi is None:
            rendered = self.format_chat(_SENTINEL, system)
            if _SENTINEL not in rendered:
                raise ModelError("the chat template dropped the user's text; cannot derive post-instruction tokens")
            suffix = rendered.split(_SENTINEL)[-1]
            self._eoi = self.tokenize(suffix, add_special=False, parse_special=True)
            if not self._eoi:
                raise ModelError("the chat template puts nothing after the user's text; no post-instruction tokens")
        return list(self._eoi)

    # -- the hook ----------------------------------------------------------------------------

    def _require_hook(self) -> _core.Hook:
        if self.hook is None:
            raise HookError("this Runtime was created with hook=False; create it with hook=True to intervene")
        return self.hook

    def graph_node_names(self) -> set[str]:
        """Names of every node in this model's decode graph (recorded from a 1-token decode)."""
        if self._graph_names is None:
            hook = self._require_hook()
            hook.set_plan({})
            hook.set_record_names(True)
            try:
                self.clear_memory()
                tok = self.tokenize("a", add_special=False) or [0]
                self._decode(np.array(tok[:1]), np.array([0]), np.array([0]), np.array([1]))
            finally:
                names = set(hook.recorded_names())
                hook.set_record_names(False)
                self.clear_memory()
            self._graph_names = names
        return self._graph_names

    def check_residual_nodes(self) -> None:
        """Fail before any work if this model's graph lacks a residual node the interventions edit.

        Raises:
            HookError: an architecture whose graph names its residual stream differently (pyrefusal
                knows :data:`KNOWN_ARCHITECTURES`); the message lists this graph's layer-0 nodes.
        """
        wanted = set(self.nodes.ablation_nodes(self.n_layer))
        missing = sorted(wanted - self.graph_node_names())
        if missing:
            raise HookError(
                f"the {self.arch!r} graph has no node(s) {missing[:6]}, which pyrefusal edits to ablate and add "
                f"directions; it knows the residual nodes of {sorted(KNOWN_ARCHITECTURES)}. Node names of this "
                f"model: {sorted(n for n in self.graph_node_names() if n.endswith('-0'))}. Use a model of a "
                "known architecture, or add its node names to pyrefusal.runtime.runtime.KNOWN_ARCHITECTURES."
            )

    def set_plan(
        self,
        plan: dict[str, PlanEntry],
        directions: np.ndarray | None = None,
        additions: Sequence[np.ndarray] = (),
    ) -> None:
        """Arm the hook: node plan, orthonormal ablation directions and addition vectors.

        Args:
            plan: node name -> operations; every name must exist in this model's graph.
            directions: float32 ``(k, n_embd)``, orthonormal rows (k may be 0).
            additions: vectors ``(n_embd,)`` referenced by ``PlanEntry.add_index``.

        Raises:
            HookError: a node name is not in the graph (unsupported architecture) or shapes are wrong.
        """
        hook = self._require_hook()
        if plan:
            missing = sorted(set(plan) - self.graph_node_names())
            if missing:
                raise HookError(
                    f"the {self.arch!r} graph has no node(s) {missing[:6]}; pyrefusal knows the residual nodes of "
                    f"{sorted(KNOWN_ARCHITECTURES)}. Node names of this model: "
                    f"{sorted(n for n in self.graph_node_names() if n.endswith('-0'))}"
                )
        hook.clear()
        if directions is not None and len(directions):
            d = np.ascontiguousarray(directions, dtype=np.float32)  # (k, n_embd)
            if d.ndim != 2 or d.shape[1] != self.n_embd:
                raise HookError(f"ablation directions must be (k, {self.n_embd}); got {d.shape}")
            hook.set_directions(d)
        for v in additions:
            v = np.ascontiguousarray(v, dtype=np.float32)  # (n_embd,)
            if v.shape != (self.n_embd,):
                raise HookError(f"addition vector must be ({self.n_embd},); got {v.shape}")
            hook.add_vector(v)
        hook.set_plan({k: (e.ablate, e.add_index, e.capture_layer) for k, e in plan.items()})

    def set_control_vector(self, vectors: dict[int, np.ndarray] | None) -> None:
        """llama.cpp's own in-graph control vector: ``vectors[il]`` is added to ``l_out-{il}``.

        Layer ``il`` here is llama.cpp's convention (the output of block ``il``, i.e. the input
        of block ``il + 1``); ``il`` must be in ``1..n_layer-1`` (llama.cpp has no control-vector
        tensor for layer 0). ``None`` removes the control vector.
        """
        if vectors is None:
            if self._cvec_on:
                llama_cpp.llama_set_adapter_cvec(self._ctx, None, 0, self.n_embd, -1, -1)
                self._cvec_on = False
            return
        if any(not 1 <= il < self.n_layer for il in vectors):
            raise HookError(
                f"control-vector layers must be in 1..{self.n_layer - 1} (llama.cpp cannot steer layer 0); "
                f"got {sorted(vectors)}. Use the hook (Addition) to add at block input 0 or 1."
            )
        data = np.zeros((self.n_layer - 1, self.n_embd), dtype=np.float32)  # row il-1 = layer il
        for il, v in vectors.items():
            data[il - 1] += np.asarray(v, dtype=np.float32).reshape(self.n_embd)
        ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = llama_cpp.llama_set_adapter_cvec(self._ctx, ptr, data.size, self.n_embd, 1, self.n_layer - 1)
        if rc != 0:
            raise HookError(f"llama_set_adapter_cvec failed with code {rc}")
        self._cvec_on = True

    def set_lora(self, adapters: Sequence[tuple[str | os.PathLike[str], float]] | None) -> None:
        """Apply GGUF LoRA adapters in llama.cpp's graph (``[(path, scale), ...]``; ``None`` removes them).

        Loaded adapters are cached per path for the model's lifetime (llama.cpp frees them with
        the model).

        Raises:
            ModelError: llama.cpp cannot load an adapter (wrong base model or format).
        """
        if not adapters:
            if self._lora_on:
                llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
                self._lora_on = False
            return
        handles = []
        for path, _ in adapters:
            key = str(Path(path).resolve())
            if key not in self._loras:
                h = llama_cpp.llama_adapter_lora_init(self._model, key.encode())
                if not h:
                    raise ModelError(
                        f"llama.cpp could not load the LoRA adapter {path} for {self.path.name}: it must be a GGUF "
                        "adapter (general.type=adapter) made for this base model's architecture and shapes."
                    )
                self._loras[key] = h
            handles.append(self._loras[key])
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(handles))(*handles)
        scales = (ctypes.c_float * len(handles))(*[float(s) for _, s in adapters])
        rc = llama_cpp.llama_set_adapters_lora(self._ctx, arr, len(handles), scales)
        if rc != 0:
            raise ModelError(f"llama_set_adapters_lora failed with code {rc}")
        self._lora_on = True

    def clear_plan(self) -> None:
        """Remove every intervention: the hook plan, llama.cpp's control vector and LoRA adapters."""
        if self.hook is not None:
            self.hook.clear()
        self.set_control_vector(None)
        self.set_lora(None)

    # -- decoding ----------------------------------------------------------------------------

    def clear_memory(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)

    def _decode(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, logits: np.ndarray) -> None:
        self._batch.fill(tokens, pos, seq, logits)
        rc = llama_cpp.llama_decode(self._ctx, self._batch.batch)
        self.timings.decodes += 1
        err = self.hook.take_error() if self.hook is not None else ""
        if err:
            raise HookError(err)
        if rc != 0:
            raise PyrefusalError(
                f"llama_decode failed with code {rc} ({len(tokens)} tokens). Code 1 means the KV cache is full: "
                "lower the batch/sequence counts or raise n_ctx."
            )

    def _logits(self, n_out: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))  # (n_out, n_vocab) view, float32

    def _groups(self, lengths: Sequence[int], extra: int) -> list[list[int]]:
        """Split sequence indices into groups that fit n_seq_max and the KV cache."""
        groups: list[list[int]] = []
        cur: list[int] = []
        used = 0
        for i, n in enumerate(lengths):
            need = n + extra
            if need > self.n_ctx:
                raise PyrefusalError(
                    f"a prompt of {n} tokens (+{extra} to generate) does not fit n_ctx={self.n_ctx}; raise n_ctx"
                )
            if cur and (len(cur) >= self.n_seq_max or used + need > self.n_ctx):
                groups.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += need
        if cur:
            groups.append(cur)
        return groups

    def _prefill(
        self,
        prompts: Sequence[Sequence[int]],
        members: Sequence[int],
        capture_positions: Sequence[Sequence[int]] | None,
        slot_of: Callable[[int, int], int] | None,
        final_capture: bool,
    ) -> np.ndarray:
        """Decode the prompts of one group (seq id = index in ``members``).

        Returns the last-position logits ``(len(members), n_vocab)`` float32. Captures (when a
        capture plan is armed) go to the hook's buffer at ``slot_of(member, j)`` for the j-th
        requested position of that prompt.
        """
        # Shared prefix (system prompt, turn header): decoded once in seq 0, then shared with
        # the other sequences through the KV cache. It never covers a captured position.
        shared = self._shared_prefix(prompts, members, capture_positions) if self.share_prefix else 0
        t0 = time.perf_counter()
        if shared:
            head = np.asarray(prompts[members[0]][:shared], dtype=np.int32)
            for start in range(0, shared, self.n_batch):
                sl = slice(start, min(start + self.n_batch, shared))
                n = sl.stop - sl.start
                if self.hook is not None:
                    self.hook.set_capture_rows([-1] * n, [])
                self._decode(
                    head[sl],
                    np.arange(sl.start, sl.stop, dtype=np.int32),
                    np.zeros(n, np.int32),
                    np.zeros(n, np.int8),
                )
            for s in range(1, len(members)):
                llama_cpp.llama_memory_seq_cp(self._mem, 0, s, -1, -1)
            self.timings.prompt_tokens += shared
        # Flatten (token, pos, seq, want_logits, capture_slot) over the group.
        toks, poss, seqs, outs, slots = [], [], [], [], []
        for s, m in enumerate(members):
            p = list(prompts[m])[shared:]
            n = len(p)
            want = np.zeros(n, dtype=np.int8)
            want[-1] = 1
            slot = np.full(n, -1, dtype=np.int64)
            if capture_positions is not None and slot_of is not None:
                for j, q in enumerate(capture_positions[m]):
                    idx = (q - shared) if q >= 0 else n + q
                    if not 0 <= idx < n:
                        raise PyrefusalError(f"capture position {q} outside a prompt of {n + shared} tokens")
                    slot[idx] = slot_of(m, j)
                    if final_capture:
                        want[idx] = 1
            toks.append(np.asarray(p, dtype=np.int32))
            poss.append(np.arange(shared, shared + n, dtype=np.int32))
            seqs.append(np.full(n, s, dtype=np.int32))
            outs.append(want)
            slots.append(slot)
        tok, pos, seq = np.concatenate(toks), np.concatenate(poss), np.concatenate(seqs)
        out, slot = np.concatenate(outs), np.concatenate(slots)
        last_idx = np.cumsum([len(t) for t in toks]) - 1  # flat index of each prompt's last token

        result = np.empty((len(members), self.n_vocab), dtype=np.float32)
        for start in range(0, len(tok), self.n_batch):
            sl = slice(start, min(start + self.n_batch, len(tok)))
            if self.hook is not None:
                o = out[sl].astype(bool)
                self.hook.set_capture_rows(slot[sl].tolist(), slot[sl][o].tolist())
            self._decode(tok[sl], pos[sl], seq[sl], out[sl])
            out_flat = np.flatnonzero(out[sl]) + start  # flat indices of this decode's outputs
            logits = self._logits(len(out_flat))
            for k, flat in enumerate(out_flat):
                hit = np.flatnonzero(last_idx == flat)
                if len(hit):
                    result[hit[0]] = logits[k]
        self.timings.prompt_tokens += len(tok)
        self.timings.prompt_seconds += time.perf_counter() - t0
        return result

    def _shared_prefix(
        self,
        prompts: Sequence[Sequence[int]],
        members: Sequence[int],
        capture_positions: Sequence[Sequence[int]] | None,
    ) -> int:
        """Length of the common token prefix of a group that can be decoded once."""
        if len(members) < 2:
            return 0
        first = prompts[members[0]]
        limit = min(len(prompts[m]) for m in members) - 1  # every prompt keeps >= 1 own token
        for m in members:
            if capture_positions is not None:
                n = len(prompts[m])
                for q in capture_positions[m]:
                    limit = min(limit, q if q >= 0 else n + q)
        k = 0
        while k < limit and all(prompts[m][k] == first[k] for m in members):
            k += 1
        return k if k >= 4 else 0  # not worth a separate decode below a few tokens

    def last_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Last-position logits of each prompt under the armed plan, float32 ``(n_prompts, n_vocab)``."""
        if not prompts:
            raise PyrefusalError("no prompts given; pass at least one prompt")
        out = np.empty((len(prompts), self.n_vocab), dtype=np.float32)
        for group in self._groups([len(p) for p in prompts], 0):
            self.clear_memory()
            out[group] = self._prefill(prompts, group, None, None, False)
        self.clear_memory()
        return out

    def capture(
        self,
        prompts: Sequence[Sequence[int]],
        positions: Sequence[int],
        layers: Sequence[int] | None = None,
        *,
        ablation: np.ndarray | None = None,
        armed: tuple[dict[str, PlanEntry], np.ndarray | None, list[np.ndarray]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Capture the residual stream at block inputs.

        Args:
            prompts: token lists.
            positions: token positions to capture in every prompt (negative = from the end).
            layers: block-input indices in ``0..n_layer`` (default all ``n_layer + 1``;
                ``n_layer`` is the output of the last block).
            ablation: optional orthonormal directions ``(k, n_embd)`` ablated at every layer
                while capturing (for checking that the stream is clean).
            armed: optional compiled intervention ``(plan, directions, vectors)`` (see
                :func:`pyrefusal.method.intervention.plan`) active while capturing; the captured
                values are those after the node's edits.

        Returns:
            ``(acts, logits)``: acts float32 ``(n_prompts, n_positions, n_layers_captured, n_embd)``,
            logits float32 ``(n_prompts, n_vocab)`` at the last position.
        """
        if not prompts:
            raise PyrefusalError("no prompts given; pass at least one prompt")
        hook = self._require_hook()
        layers = list(range(self.n_layer + 1)) if layers is None else list(layers)
        if any(not 0 <= lay <= self.n_layer for lay in layers):
            raise PyrefusalError(f"capture layers must be in 0..{self.n_layer}; got {layers}")
        plan: dict[str, PlanEntry] = {}
        directions, vectors = ablation, []
        if armed is not None:
            plan, directions, vectors = dict(armed[0]), armed[1], list(armed[2])
        elif ablation is not None:
            for name in self.nodes.ablation_nodes(self.n_layer):
                plan[name] = PlanEntry(ablate=True)
        for j, lay in enumerate(layers):
            name = self.nodes.block_input(lay)
            prev = plan.get(name, PlanEntry())
            plan[name] = PlanEntry(ablate=prev.ablate, add_index=prev.add_index, capture_layer=j)
        self.set_plan(plan, directions, vectors)
        n_pos = len(positions)
        final = self.n_layer in layers
        acts = np.empty((len(prompts), n_pos, len(layers), self.n_embd), dtype=np.float32)
        logits = np.empty((len(prompts), self.n_vocab), dtype=np.float32)
        try:
            for group in self._groups([len(p) for p in prompts], 0):
                local = {m: i for i, m in enumerate(group)}
                hook.set_capture_buffer(len(group) * n_pos, len(layers))
                self.clear_memory()
                logits[group] = self._prefill(
                    prompts, group, [positions] * len(prompts), lambda m, j, loc=local: loc[m] * n_pos + j, final
                )
                buf = hook.captured()  # (len(group) * n_pos, n_layers_captured, n_embd)
                acts[group] = buf.reshape(len(group), n_pos, len(layers), self.n_embd)
        finally:
            self.clear_plan()
            hook.set_capture_buffer(0, 0)
            self.clear_memory()
        return acts, logits

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        progress: Callable[[int], None] | None = None,
        stop_at_eog: bool = True,
    ) -> list[Generation]:
        """Greedy generation for many prompts, batched (one sequence per prompt per decode).

        Each sequence stops at an end-of-generation token (EOS / end of turn) or after
        ``max_new_tokens``. The armed plan applies to prompt and generated tokens alike.
        ``progress(n)`` is called with the number of sequences finished. ``stop_at_eog=False``
        generates exactly ``max_new_tokens`` (benchmarks). While generating, a capture plan (if
        armed) writes the newest token of sequence ``s`` of a group to capture slot ``s``.
        """
        if not prompts:
            raise PyrefusalError("no prompts given; pass at least one prompt")
        if max_new_tokens < 1:
            raise PyrefusalError("max_new_tokens must be >= 1")
        results: list[Generation | None] = [None] * len(prompts)
        for group in self._groups([len(p) for p in prompts], max_new_tokens):
            self.clear_memory()
            if self.hook is not None:
                self.hook.set_capture_rows([], [])
            logits = self._prefill(prompts, group, None, None, False)
            t0 = time.perf_counter()
            out: list[list[int]] = [[] for _ in group]
            pos = np.array([len(prompts[m]) for m in group], dtype=np.int32)
            active = np.ones(len(group), dtype=bool)
            finish = ["length"] * len(group)
            nxt = logits.argmax(axis=1).astype(np.int32)  # greedy; ties -> lowest id
            ones = np.ones(len(group), dtype=np.int8)
            while True:
                for s in np.flatnonzero(active):
                    tok = int(nxt[s])
                    if stop_at_eog and self.is_eog(tok):
                        active[s] = False
                        finish[s] = "eos"
                        continue
                    out[s].append(tok)
                    if len(out[s]) >= max_new_tokens:
                        active[s] = False
                if not active.any():
                    break
                idx = np.flatnonzero(active)
                if self.hook is not None:
                    rows = idx.tolist()
                    self.hook.set_capture_rows(rows, rows)
                self._decode(nxt[idx], pos[idx], idx.astype(np.int32), ones[: len(idx)])
                pos[idx] += 1
                step = self._logits(len(idx))
                nxt[idx] = step.argmax(axis=1)
                self.timings.generated_tokens += len(idx)
            self.timings.generation_seconds += time.perf_counter() - t0
            for s, m in enumerate(group):
                results[m] = Generation(tokens=out[s], text=self.detokenize(out[s]).strip(), finish_reason=finish[s])
            if progress is not None:
                progress(len(group))
        self.clear_memory()
        return [r for r in results if r is not None]

    def token_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Log-probability of every token given its prefix, under the armed plan (perplexity, scoring).

        Prompts are decoded in groups as :meth:`last_logits` does (no shared-prefix reuse: every
        position needs its own logits). llama.cpp keeps ``n_vocab`` floats per requested position,
        so each ``llama_decode`` takes at most ``2**25 / n_vocab`` tokens (~128 MiB of logits;
        220 tokens for a 152k vocabulary). Log-softmax is taken in float64.

        Args:
            prompts: token lists, each of at least one token (nothing is added: include BOS
                yourself when the model expects one).

        Returns:
            One float64 array ``(n_tokens - 1,)`` per prompt: entry ``i`` is
            ``log p(prompt[i + 1] | prompt[: i + 1])`` (empty for a one-token prompt).

        Raises:
            PyrefusalError: no prompts, an empty prompt, or a prompt longer than ``n_ctx``.
        """
        if not prompts:
            raise PyrefusalError("no prompts given; pass at least one prompt")
        if any(len(p) == 0 for p in prompts):
            raise PyrefusalError("token_logprobs got an empty prompt; every prompt needs at least one token")
        step = max(1, min(self.n_batch, (1 << 25) // self.n_vocab))  # tokens per decode
        out: list[np.ndarray] = [np.empty(0)] * len(prompts)
        for group in self._groups([len(p) for p in prompts], 0):
            self.clear_memory()
            if self.hook is not None:
                self.hook.set_capture_rows([], [])
            t0 = time.perf_counter()
            toks = [np.asarray(prompts[m], dtype=np.int32) for m in group]
            lengths = [len(t) for t in toks]
            tok = np.concatenate(toks)  # (n_flat,)
            pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
            seq = np.concatenate([np.full(n, s, dtype=np.int32) for s, n in enumerate(lengths)])
            want = np.ones(len(tok), dtype=np.int8)
            want[np.cumsum(lengths) - 1] = 0  # a sequence's last token predicts nothing we score
            flat_lp = np.zeros(len(tok), dtype=np.float64)  # flat_lp[j] = log p(tok[j + 1] | ...)
            for start in range(0, len(tok), step):
                sl = slice(start, min(start + step, len(tok)))
                self._decode(tok[sl], pos[sl], seq[sl], want[sl])
                rows = np.flatnonzero(want[sl]) + start  # flat indices with logits, in output order
                if not len(rows):
                    continue
                logits = self._logits(len(rows))  # (len(rows), n_vocab) float32 view
                for a in range(0, len(rows), 32):  # float64 in slices: 32 x n_vocab x 8 bytes
                    x = logits[a : a + 32].astype(np.float64)  # (k, n_vocab)
                    peak = x.max(axis=1, keepdims=True)
                    lse = peak[:, 0] + np.log(np.exp(x - peak).sum(axis=1))  # (k,)
                    r = rows[a : a + 32]
                    flat_lp[r] = x[np.arange(len(r)), tok[r + 1]] - lse
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            for s, m in enumerate(group):
                out[m] = flat_lp[bounds[s] : bounds[s + 1] - 1].copy()
            self.timings.prompt_tokens += len(tok)
            self.timings.prompt_seconds += time.perf_counter() - t0
        self.clear_memory()
        return out
