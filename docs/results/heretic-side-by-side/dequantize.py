"""Dequantize a GGUF into a transformers checkpoint (run with the heretic venv's python).

transformers' GGUF loader dequantizes every tensor (Q4_K_M -> float32 here) and rebuilds the tokenizer and its
chat template from the GGUF metadata; ``save_pretrained`` writes safetensors that heretic can load by path.
Usage: python dequantize.py MODEL.gguf OUT_DIR
"""

import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf = Path(sys.argv[1])
out = Path(sys.argv[2])
t = time.perf_counter()
tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
# transformers 5 marks a GGUF-loaded model as "quantized with gguf" and refuses to serialize it, although its
# tensors are plain dequantized float32: rebuild a plain model from the config and copy the tensors over.
config = model.config
if hasattr(config, "quantization_config"):
    del config.quantization_config
plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
print(f"state dict copied: missing {missing}, unexpected {unexpected}")
plain.generation_config = model.generation_config
model = plain
model.save_pretrained(out)
tok.save_pretrained(out)
print(
    f"dequantized {gguf.name} -> {out} in {time.perf_counter() - t:.1f}s; dtype {model.dtype}; "
    f"tie_word_embeddings={model.config.tie_word_embeddings}; chat_template set: {tok.chat_template is not None}"
)
