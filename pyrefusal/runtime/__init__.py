"""Layer 1, the runtime: GGUF models run by llama.cpp (the only layer that touches llama.cpp's C API).

* :mod:`pyrefusal.runtime.capi`: the one module that calls llama.cpp's C API (owner classes, control-vector
  packing, quantization, build facts);
* :mod:`pyrefusal.runtime.runtime`: :class:`Runtime`, a façade over a model with one context that composes
  the parts below and delegates to them;
* :mod:`pyrefusal.runtime.chat`: chat templates and the paper's prompt format (:class:`ChatPrompts`);
* :mod:`pyrefusal.runtime.hook`: the binding of pyrefusal's C++ hook to a model's graph (:class:`HookBinding`,
  :class:`PlanEntry`);
* :mod:`pyrefusal.runtime.adapters`: llama.cpp's control vector and LoRA adapters (:class:`GraphAdapters`);
* :mod:`pyrefusal.runtime.decode`: batched decoding, capture, generation, token scoring (:class:`Decoder`);
* :mod:`pyrefusal.runtime.protocol`: :class:`ModelRunner`, what stages and steering use of a Runtime.

Per-family facts (:class:`ResidualNodes`, :data:`KNOWN_ARCHITECTURES`, ...) live in :mod:`pyrefusal.families`
and :data:`PromptFormat` in :mod:`pyrefusal.settings`; they are re-exported here.
"""

import llama_cpp  # noqa: F401  (first: llama_cpp before numpy/gguf in CUDA processes, see docs)

from pyrefusal.runtime.adapters import GraphAdapters
from pyrefusal.runtime.chat import ChatPrompts
from pyrefusal.runtime.decode import Decoder, Generation, Timings, decode_groups
from pyrefusal.runtime.hook import HookBinding, PlanEntry
from pyrefusal.runtime.protocol import ModelRunner
from pyrefusal.runtime.runtime import (
    KNOWN_ARCHITECTURES,
    PAPER_USER_TURNS,
    ModelInfo,
    PromptFormat,
    ResidualNodes,
    Runtime,
    build_info,
    gpu_offload_supported,
)

__all__ = [
    "KNOWN_ARCHITECTURES",
    "PAPER_USER_TURNS",
    "ChatPrompts",
    "Decoder",
    "Generation",
    "GraphAdapters",
    "HookBinding",
    "ModelInfo",
    "ModelRunner",
    "PlanEntry",
    "PromptFormat",
    "ResidualNodes",
    "Runtime",
    "Timings",
    "build_info",
    "decode_groups",
    "gpu_offload_supported",
]
