"""llama.cpp's own graph edits on one context: a control vector and LoRA adapters.

These are the two ways llama.cpp itself changes a model's graph, besides pyrefusal's hook
(:mod:`pyrefusal.runtime.hook`); the steering router (:mod:`pyrefusal.steering.router`) picks among the three.
:class:`GraphAdapters` applies and removes them through :mod:`pyrefusal.runtime.capi`, remembering whether any is
on so that removing nothing costs no C call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pyrefusal.errors import ModelError
from pyrefusal.runtime import capi

__all__ = ["GraphAdapters"]


class GraphAdapters:
    """The control vector and LoRA adapters applied to one context.

    Args:
        model: the model (it loads and caches the adapters).
        ctx: the context they apply to.
        path: the model's GGUF file, for messages.
    """

    def __init__(self, model: capi.Model, ctx: capi.Context, *, path: Path) -> None:
        self._model = model
        self._ctx = ctx
        self._path = path
        self._cvec_on = False
        self._lora_on = False

    def set_control_vector(self, vectors: dict[int, np.ndarray] | None) -> None:
        """llama.cpp's own in-graph control vector: ``vectors[il]`` (``(n_embd,)``) is added to ``l_out-{il}``.

        Layer ``il`` here is llama.cpp's convention (the output of block ``il``, i.e. the input
        of block ``il + 1``); ``il`` must be in ``1..n_layer-1`` (llama.cpp has no control-vector
        tensor for layer 0). ``None`` removes the control vector.
        """
        n_embd, n_layer = self._model.n_embd, self._model.n_layer
        if vectors is None:
            if self._cvec_on:
                capi.apply_control_vector(self._ctx.ptr, None, n_embd, n_layer)
                self._cvec_on = False
            return
        capi.apply_control_vector(self._ctx.ptr, vectors, n_embd, n_layer, all_layers=True)
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
                    f"llama.cpp could not load the LoRA adapter {path} for {self._path.name}: it must be a GGUF "
                    "adapter (general.type=adapter) made for this base model's architecture and shapes."
                )
            handles.append((adapter, float(scale)))
        rc = self._ctx.set_loras(handles)
        if rc != 0:
            raise ModelError(f"llama_set_adapters_lora failed with code {rc}")
        self._lora_on = True

    def free_lora(self, path: str | os.PathLike[str]) -> None:
        """Remove every LoRA adapter from the context and free the one loaded from ``path`` (so that a search
        applying a new adapter per trial does not keep them all in memory)."""
        self.set_lora(None)
        self._model.free_lora(str(Path(path).resolve()))

    def clear(self) -> None:
        """Remove the control vector and every LoRA adapter."""
        self.set_control_vector(None)
        self.set_lora(None)
