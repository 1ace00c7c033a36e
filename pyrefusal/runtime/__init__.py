"""Layer 1, the runtime: GGUF models run by llama.cpp (the only layer that touches llama.cpp's C API).

* :mod:`pyrefusal.runtime.capi`: the one module that calls llama.cpp's C API (owner classes, control-vector
  packing, quantization, build facts);
* :mod:`pyrefusal.runtime.runtime`: :class:`Runtime`, a model with one context, pyrefusal's hook, batched decode;
* :mod:`pyrefusal.runtime.protocol`: :class:`ModelRunner`, what stages and steering use of a Runtime.

Per-family facts (:class:`ResidualNodes`, :data:`KNOWN_ARCHITECTURES`, ...) live in :mod:`pyrefusal.families`
and are re-exported here.
"""

from pyrefusal.runtime.protocol import ModelRunner
from pyrefusal.runtime.runtime import (  # first: imports llama_cpp before numpy (CUDA import order)
    KNOWN_ARCHITECTURES,
    PAPER_USER_TURNS,
    Generation,
    ModelInfo,
    PlanEntry,
    PromptFormat,
    ResidualNodes,
    Runtime,
    Timings,
    build_info,
    gpu_offload_supported,
)

__all__ = [
    "KNOWN_ARCHITECTURES",
    "PAPER_USER_TURNS",
    "Generation",
    "ModelInfo",
    "ModelRunner",
    "PlanEntry",
    "PromptFormat",
    "ResidualNodes",
    "Runtime",
    "Timings",
    "build_info",
    "gpu_offload_supported",
]
