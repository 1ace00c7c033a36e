"""The model runtime: a GGUF model run by llama.cpp with pyrefusal's hook, as one object.

:class:`Runtime` is a façade: it opens a model and one context (owned by :mod:`~pyrefusal.runtime.capi`'s owner
classes) and composes the parts that work on them, delegating its methods to them:

* :class:`~pyrefusal.runtime.chat.ChatPrompts` (:mod:`~pyrefusal.runtime.chat`): chat templates, the paper's
  prompt format, post-instruction tokens;
* :class:`~pyrefusal.runtime.hook.HookBinding` (:mod:`~pyrefusal.runtime.hook`): pyrefusal's C++ hook
  (:mod:`pyrefusal._core`), the context's eval callback, armed through :meth:`Runtime.set_plan`;
* :class:`~pyrefusal.runtime.adapters.GraphAdapters` (:mod:`~pyrefusal.runtime.adapters`): llama.cpp's control
  vector and LoRA adapters;
* :class:`~pyrefusal.runtime.decode.Decoder` (:mod:`~pyrefusal.runtime.decode`): batched decoding, many
  sequences per ``llama_decode``, for prompt processing, capture, greedy generation and token scoring.

Per-family facts (residual node names, the paper's prompts) come from :mod:`pyrefusal.families`. Code above the
runtime layer is typed with :class:`~pyrefusal.runtime.protocol.ModelRunner`, which Runtime satisfies.

Conventions:
    * ``layer`` is llama.cpp's block index ``il`` (0-based). "Block input ``l``" is the residual
      stream entering block ``l``: node ``embd`` for ``l == 0`` and ``l_out-{l-1}`` otherwise;
      "block input ``n_layer``" is the output of the last block (before the final norm).
    * One decode is always one llama.cpp ubatch (``n_ubatch == n_batch`` and a unified KV
      cache), so graph rows are the batch tokens in order; the hook relies on that.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401  (must be imported before numpy/gguf in CUDA processes, see docs)

import numpy as np

from pyrefusal import _core
from pyrefusal.data.registry import sha256_file
from pyrefusal.errors import ModelError
from pyrefusal.families import (
    KNOWN_ARCHITECTURES,
    PAPER_USER_TURNS,
    ResidualNodes,
    detect_family,
    residual_nodes,
)
from pyrefusal.runtime import capi
from pyrefusal.runtime.adapters import GraphAdapters
from pyrefusal.runtime.capi import gpu_offload_supported
from pyrefusal.runtime.chat import ChatPrompts
from pyrefusal.runtime.decode import Decoder, Generation, Timings
from pyrefusal.runtime.hook import HookBinding, PlanEntry
from pyrefusal.runtime.validate import validate_model_file
from pyrefusal.settings import ChatSettings, PromptFormat

__all__ = [
    "KNOWN_ARCHITECTURES",
    "PAPER_USER_TURNS",
    "Generation",
    "ModelInfo",
    "PlanEntry",
    "PromptFormat",
    "ResidualNodes",
    "Runtime",
    "Timings",
    "build_info",
    "gpu_offload_supported",
]


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


def build_info() -> dict[str, Any]:
    """Versions and capabilities of the runtime and of our extension."""
    info = dict(_core.build_info())
    info["llama_cpp_python"] = capi.llama_cpp_version()
    info["gpu_offload"] = gpu_offload_supported()
    info["system_info"] = capi.system_info()
    return info


# --- the runtime ---------------------------------------------------------------------------


class Runtime(capi.Owner):
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

    Attributes:
        hook: pyrefusal's C++ hook (None with ``hook=False``).
        chat: the chat formatting (:class:`~pyrefusal.runtime.chat.ChatPrompts`).
        timings, share_prefix: the decoder's counters and prefix sharing (:class:`~pyrefusal.runtime.decode.Decoder`).

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
        validate_model_file(self.path)  # impossible hyper-parameters abort inside llama.cpp: refuse them first
        if n_gpu_layers < 0:
            n_gpu_layers = 999 if gpu_offload_supported() else 0
        self.n_gpu_layers = n_gpu_layers
        self._model = capi.Model(self.path, n_gpu_layers=n_gpu_layers, use_extra_bufts=repack)
        self.n_layer = self._model.n_layer
        self.n_embd = self._model.n_embd
        self.n_vocab = self._model.n_vocab
        self.arch = self.meta("general.architecture") or "unknown"
        self.nodes = residual_nodes(self.arch)

        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self.hook: _core.Hook | None = _core.Hook(self.n_embd) if hook else None
        params = capi.ContextParams(
            n_ctx=n_ctx, n_batch=n_batch, n_seq_max=n_seq_max, n_threads=n_threads or os.cpu_count() or 1, kv_f32=kv_f32
        )
        callback = (_core.callback_address(), self.hook.user_data) if self.hook is not None else None
        try:
            self._ctx = capi.Context(self._model, params, eval_callback=callback)
        except BaseException:
            self._model.close()
            raise
        self._hook = HookBinding(
            self.hook, arch=self.arch, n_layer=self.n_layer, n_embd=self.n_embd, nodes=self.nodes, probe=self._probe
        )
        self._adapters = GraphAdapters(self._model, self._ctx, path=self.path)
        self._decoder = Decoder(
            self._model, self._ctx, params, self._hook, detokenize=self.detokenize, clear_plan=self.clear_plan
        )

        self.chat_template: str | None = self._model.chat_template()
        self.chat = ChatPrompts(
            self.chat_template,
            file_name=self.path.name,
            tokenize=lambda text: self.tokenize(text, add_special=False, parse_special=True),
            special_text=lambda token: self.detokenize([token], special=True),
            bos=self._model.bos(),
            eos=self._model.eos(),
            add_bos=self._model.add_bos(),
        )
        self.name = name or self.meta("general.name") or self.path.stem
        self._sha256 = sha256

    @classmethod
    def for_study(cls, config: ChatSettings, *, log: Callable[[str], None] | None = None) -> Runtime:
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
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            ctx.close()  # the context before its model
        model = getattr(self, "_model", None)
        if model is not None:
            model.close()

    # -- metadata ----------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string (None when absent)."""
        return self._model.meta(key)

    @property
    def sha256(self) -> str:
        """SHA-256 of the model file (hex; computed on first use unless given)."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def info(self) -> ModelInfo:
        """What a run records about the model."""
        ftype = self.meta("general.file_type")
        return ModelInfo(
            name=self.name,
            path=str(self.path),
            sha256=self.sha256,
            arch=self.arch,
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_vocab=self.n_vocab,
            n_params=self._model.n_params(),
            file_type=f"{self._model.desc()} (general.file_type={ftype})",
            chat_template=self.chat_template,
        )

    # -- tokens and text ---------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Tokenise ``text`` (special tokens such as ``<|im_start|>`` parsed by default)."""
        return self._model.tokenize(text, add_special=add_special, parse_special=parse_special)

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """Bytes of one token's text (a piece may be part of a UTF-8 character)."""
        return self._model.token_to_piece(token, special=special)

    def detokenize(self, tokens: Iterable[int], *, special: bool = False) -> str:
        """Text of ``tokens``; control tokens are dropped unless ``special``."""
        return b"".join(self.token_bytes(t, special=special) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, end of turn)."""
        return self._model.is_eog(token)

    # -- chat formatting ---------------------------------------------------------------------

    def format_messages(self, messages: list[dict[str, str]]) -> str:
        """Render a conversation (``[{"role": ..., "content": ...}, ...]``) with the GGUF's own
        chat template, ending with the assistant's turn opened (``add_generation_prompt``)."""
        return self.chat.format_messages(messages)

    def format_chat(self, instruction: str, system: str | None = None) -> str:
        """Render one user turn with the GGUF's own chat template, ready for the reply.

        ``system=None`` leaves the template's default (e.g. Qwen2.5's default system prompt), as any
        llama.cpp chat app would, unless :attr:`prompt_format` is ``"paper"``: then the prompt is the
        user turn alone, with no system turn (:meth:`paper_user_turn`).
        """
        return self.chat.format_chat(instruction, system)

    @property
    def family(self) -> str | None:
        """The paper's model family this model belongs to (``"qwen2"``, ``"llama3"``, ``"gemma2"``) or None;
        it picks the paper's refusal tokens (:data:`pyrefusal.families.PAPER_REFUSAL_OPENINGS`)."""
        return detect_family(self.arch, self.chat_template)

    @property
    def prompt_format(self) -> PromptFormat:
        """How a prompt without a system message is rendered: ``"template"`` (the GGUF chat template,
        with the default system prompt it may add, as llama.cpp chat apps do) or ``"paper"`` (the user
        turn alone, as the paper: :data:`PAPER_USER_TURNS`)."""
        return self.chat.prompt_format

    @prompt_format.setter
    def prompt_format(self, value: PromptFormat) -> None:
        self.chat.prompt_format = value

    def paper_user_turn(self) -> str:
        """The paper's prompt for this model's chat format, ``"{x}"`` standing for the instruction.

        The family is recognised from the GGUF chat template, and the result is checked against it: the
        template, given a system message, must end with exactly this user turn, so the two renderings
        differ only by the system turn.

        Raises:
            ModelError: the template is not ChatML (Qwen, Yi), Llama 3 or Gemma, or does not end as
                that format does.
        """
        return self.chat.paper_user_turn()

    def chat_tokens(self, instruction: str, system: str | None = None) -> list[int]:
        """Tokens of a formatted chat prompt (as llama-cpp-python's chat completion tokenises it)."""
        return self.tokenize(self.format_chat(instruction, system), add_special=False, parse_special=True)

    def eoi_tokens(self, system: str | None = None) -> list[int]:
        """Post-instruction tokens: what the template puts after the user's text.

        Derived by rendering a sentinel instruction and tokenising the suffix after it; for
        Qwen2.5 this is ``<|im_end|> \\n <|im_start|> assistant \\n`` (5 tokens).
        """
        return self.chat.eoi_tokens(system)

    # -- the hook (HookBinding) --------------------------------------------------------------

    def _probe(self) -> None:
        """One 1-token decode, from which the hook records the graph's node names."""
        tok = self.tokenize("a", add_special=False) or [0]
        self._decoder.probe(tok[0])

    def graph_node_names(self) -> set[str]:
        """Names of every node in this model's decode graph (recorded from a 1-token decode)."""
        return self._hook.graph_node_names()

    def check_residual_nodes(self) -> None:
        """Fail before any work if this model's graph lacks a residual node the interventions edit.

        Raises:
            HookError: an architecture whose graph names its residual stream differently (pyrefusal
                knows :data:`KNOWN_ARCHITECTURES`); the message lists this graph's layer-0 nodes.
        """
        self._hook.check_residual_nodes()

    def set_plan(
        self,
        plan: dict[str, PlanEntry],
        directions: np.ndarray | None = None,
        additions: Sequence[np.ndarray] = (),
    ) -> None:
        """Arm the hook: node plan, orthonormal ablation directions float32 ``(k, n_embd)`` and addition vectors
        ``(n_embd,)`` (see :meth:`~pyrefusal.runtime.hook.HookBinding.set_plan`).

        Raises:
            HookError: no hook, a node name is not in the graph (unsupported architecture) or shapes are wrong.
        """
        self._hook.set_plan(plan, directions, additions)

    # -- llama.cpp's control vector and LoRA (GraphAdapters) -----------------------------------

    def set_control_vector(self, vectors: dict[int, np.ndarray] | None) -> None:
        """llama.cpp's own in-graph control vector: ``vectors[il]`` (``(n_embd,)``) is added to ``l_out-{il}``,
        ``il`` in ``1..n_layer-1``; ``None`` removes it (see :class:`~pyrefusal.runtime.adapters.GraphAdapters`)."""
        self._adapters.set_control_vector(vectors)

    def set_lora(self, adapters: Sequence[tuple[str | os.PathLike[str], float]] | None) -> None:
        """Apply GGUF LoRA adapters in llama.cpp's graph (``[(path, scale), ...]``; ``None`` removes them).

        Raises:
            ModelError: llama.cpp cannot load an adapter (wrong base model or format).
        """
        self._adapters.set_lora(adapters)

    def free_lora(self, path: str | os.PathLike[str]) -> None:
        """Remove the LoRA adapters from the context and free the one loaded from ``path`` (see
        :meth:`~pyrefusal.runtime.adapters.GraphAdapters.free_lora`)."""
        self._adapters.free_lora(path)

    def clear_plan(self) -> None:
        """Remove every intervention: the hook plan, llama.cpp's control vector and LoRA adapters."""
        self._hook.clear()
        self._adapters.clear()

    # -- decoding (Decoder) --------------------------------------------------------------------

    @property
    def timings(self) -> Timings:
        """Token counts and wall-clock seconds accumulated by this runtime's decodes."""
        return self._decoder.timings

    @timings.setter
    def timings(self, value: Timings) -> None:
        self._decoder.timings = value

    @property
    def share_prefix(self) -> bool:
        """Decode a group's common prompt prefix once and share it through the KV cache (default True)."""
        return self._decoder.share_prefix

    @share_prefix.setter
    def share_prefix(self, value: bool) -> None:
        self._decoder.share_prefix = value

    def clear_memory(self) -> None:
        """Clear the KV cache of every sequence."""
        self._decoder.clear_memory()

    def last_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Last-position logits of each prompt under the armed plan, float32 ``(n_prompts, n_vocab)``."""
        return self._decoder.last_logits(prompts)

    def capture(
        self,
        prompts: Sequence[Sequence[int]],
        positions: Sequence[int],
        layers: Sequence[int] | None = None,
        *,
        ablation: np.ndarray | None = None,
        armed: tuple[dict[str, PlanEntry], np.ndarray | None, list[np.ndarray]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Capture the residual stream at block inputs ``layers`` (default all ``0..n_layer``) and token
        ``positions`` of every prompt (see :meth:`~pyrefusal.runtime.decode.Decoder.capture`).

        Returns:
            ``(acts, logits)``: acts float32 ``(n_prompts, n_positions, n_layers_captured, n_embd)``,
            logits float32 ``(n_prompts, n_vocab)`` at the last position.
        """
        return self._decoder.capture(prompts, positions, layers, ablation=ablation, armed=armed)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        progress: Callable[[int], None] | None = None,
        stop_at_eog: bool = True,
        stop: Callable[[int, Sequence[int]], bool] | None = None,
    ) -> list[Generation]:
        """Greedy generation for many prompts, batched, under the armed plan (see
        :meth:`~pyrefusal.runtime.decode.Decoder.generate`)."""
        return self._decoder.generate(prompts, max_new_tokens, progress=progress, stop_at_eog=stop_at_eog, stop=stop)

    def token_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Log-probability of every token given its prefix, under the armed plan: one float64
        ``(n_tokens - 1,)`` per prompt (see :meth:`~pyrefusal.runtime.decode.Decoder.token_logprobs`)."""
        return self._decoder.token_logprobs(prompts)
