"""The model runtime: GGUF models run by llama.cpp, reached through :mod:`pyrefusal.runtime.capi`.

This module holds :class:`Runtime`: a model and one context (owned by :mod:`~pyrefusal.runtime.capi`'s
owner classes), tokenisation and chat formatting, and batched decoding: many sequences per ``llama_decode``
for prompt processing and for greedy generation. Every context carries pyrefusal's C++ hook
(:mod:`pyrefusal._core`) as its eval callback, driven through :meth:`Runtime.set_plan`. Per-family facts
(residual node names, the paper's prompts) come from :mod:`pyrefusal.families`.

It must not import the pipeline stages (directions, selection, evaluation); they import it.

Conventions:
    * ``layer`` is llama.cpp's block index ``il`` (0-based). "Block input ``l``" is the residual
      stream entering block ``l``: node ``embd`` for ``l == 0`` and ``l_out-{l-1}`` otherwise;
      "block input ``n_layer``" is the output of the last block (before the final norm).
    * One decode is always one llama.cpp ubatch (``n_ubatch == n_batch`` and a unified KV
      cache), so graph rows are the batch tokens in order; the hook relies on that.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401  (must be imported before numpy/gguf in CUDA processes, see docs)

import numpy as np
from typing_extensions import Self

from pyrefusal import _core
from pyrefusal.data.registry import sha256_file
from pyrefusal.errors import HookError, ModelError, PyrefusalError
from pyrefusal.families import (
    KNOWN_ARCHITECTURES,
    PAPER_USER_TURNS,
    ResidualNodes,
    detect_family,
    residual_nodes,
)
from pyrefusal.runtime import capi
from pyrefusal.runtime.capi import gpu_offload_supported
from pyrefusal.runtime.chat import ChatPrompts, PromptFormat

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


def build_info() -> dict[str, Any]:
    """Versions and capabilities of the runtime and of our extension."""
    info = dict(_core.build_info())
    info["llama_cpp_python"] = capi.llama_cpp_version()
    info["gpu_offload"] = gpu_offload_supported()
    info["system_info"] = capi.system_info()
    return info


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
        self._batch = capi.Batch(n_batch)
        self.timings = Timings()
        self._graph_names: set[str] | None = None
        self.share_prefix = True
        self._cvec_on = False
        self._lora_on = False

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
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            ctx.close()  # the context before its model
        model = getattr(self, "_model", None)
        if model is not None:
            model.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # -- metadata ----------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string (None when absent)."""
        return self._model.meta(key)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def info(self) -> ModelInfo:
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
                "known architecture, or add its node names to pyrefusal.families.ARCHITECTURES."
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
                capi.apply_control_vector(self._ctx.ptr, None, self.n_embd, self.n_layer)
                self._cvec_on = False
            return
        capi.apply_control_vector(self._ctx.ptr, vectors, self.n_embd, self.n_layer, all_layers=True)
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
                self._ctx.set_loras([])
                self._lora_on = False
            return
        handles: list[tuple[capi.LoraAdapter, float]] = []
        for path, scale in adapters:
            adapter = self._model.lora(str(Path(path).resolve()))
            if adapter is None:
                raise ModelError(
                    f"llama.cpp could not load the LoRA adapter {path} for {self.path.name}: it must be a GGUF "
                    "adapter (general.type=adapter) made for this base model's architecture and shapes."
                )
            handles.append((adapter, float(scale)))
        rc = self._ctx.set_loras(handles)
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
        """Clear the KV cache of every sequence."""
        self._ctx.clear_memory()

    def _decode(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, logits: np.ndarray) -> None:
        self._batch.fill(tokens, pos, seq, logits)
        rc = self._ctx.decode(self._batch)
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
        return self._ctx.logits(n_out)  # (n_out, n_vocab) view, float32

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
                self._ctx.seq_copy(0, s)
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
