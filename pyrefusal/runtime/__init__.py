"""Layer 1, the runtime: GGUF models run by llama.cpp (the only layer that touches llama.cpp's C API)."""
