"""pyrefusal: the refusal direction of chat LLMs across languages, on GGUF models run by llama.cpp."""

from __future__ import annotations

__version__ = "0.1.0"
