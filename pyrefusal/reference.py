"""Independent reference: residual-stream capture with HF transformers + torch on the same GGUF.

Used to check pyrefusal's llama.cpp-based activations and refusal direction against a second,
unrelated implementation (transformers dequantises the GGUF weights to float32 and runs its
own model code). Run it as a separate process; it must never share one with llama_cpp
(importing torch next to llama_cpp can abort)::

    python -m pyrefusal.reference --model MODEL.gguf --tokens tokens.json --out acts.npz

``tokens.json`` is ``{"prompts": [[int, ...], ...], "positions": [-5, ..., -1]}`` (token ids
from :meth:`pyrefusal.runtime.runtime.Runtime.chat_tokens`; no tokenizer is loaded here). The output
``.npz`` holds ``acts`` float32 ``(n_prompts, n_positions, n_layer, n_embd)`` with the same
block-input convention as :meth:`Runtime.capture` (index ``l`` = residual stream entering
block ``l``; ``l = 0`` = embeddings) and ``logits`` float32 ``(n_prompts, n_vocab)`` at the
last position. Prompts run one at a time (no padding). Needs ``pip install "pyrefusal[reference]"``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pyrefusal.errors import PyrefusalError

INSTALL_HINT = 'the reference check needs torch, transformers, gguf and accelerate: pip install "pyrefusal[reference]"'


def _import_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as e:
        raise PyrefusalError(f"{INSTALL_HINT} ({e})") from e
    return torch, transformers


def load_model(model: Path, *, threads: int | None = None) -> Any:
    """The GGUF as a float32 transformers causal LM (eval mode)."""
    torch, transformers = _import_torch()
    if threads:
        torch.set_num_threads(threads)
    model = Path(model)
    if not model.is_file():
        raise PyrefusalError(f"model file not found: {model}")
    # transformers >= 4.56 names the argument ``dtype``; older versions only know ``torch_dtype``.
    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    try:
        lm = transformers.AutoModelForCausalLM.from_pretrained(
            str(model.parent), gguf_file=model.name, **{dtype_kw: torch.float32}
        )
    except (ImportError, ValueError) as e:  # GGUF loading also needs the gguf and accelerate packages
        if isinstance(e, ValueError) and "pip install" not in str(e):
            raise
        raise PyrefusalError(f"{INSTALL_HINT} ({e})") from e
    return lm.eval()


def capture(lm: Any, prompts: list[list[int]], positions: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Block inputs at ``positions`` for every prompt, one prompt at a time.

    Returns ``(acts, logits)``: float32 ``(n_prompts, n_positions, n_layer, n_embd)`` and
    float32 ``(n_prompts, n_vocab)`` at the last position.
    """
    torch, _ = _import_torch()
    n_layer = int(lm.config.num_hidden_layers)
    acts, logits = [], []
    with torch.inference_mode():
        for tokens in prompts:
            ids = torch.tensor([tokens], dtype=torch.long)
            out = lm(input_ids=ids, output_hidden_states=True, use_cache=False)
            # hidden_states[l] for l < n_layer is the input of block l; the last entry is final-normed.
            hs = torch.stack(out.hidden_states[:n_layer], dim=0)[:, 0]  # (n_layer, seq, n_embd)
            acts.append(hs[:, positions, :].permute(1, 0, 2).float().numpy())
            logits.append(out.logits[0, -1].float().numpy())
    return np.stack(acts), np.stack(logits)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyrefusal.reference", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="GGUF file")
    ap.add_argument("--tokens", required=True, type=Path, help='JSON {"prompts": [[ids]], "positions": [-5..-1]}')
    ap.add_argument("--out", required=True, type=Path, help="output .npz (acts, logits)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        try:
            spec = json.loads(args.tokens.read_text())
            prompts = [[int(t) for t in p] for p in spec["prompts"]]
            positions = [int(p) for p in spec.get("positions", [-5, -4, -3, -2, -1])]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PyrefusalError(
                f'cannot read token ids from {args.tokens}: {e!r}; expected {{"prompts": [[ids]]}}'
            ) from e
        t0 = time.perf_counter()
        lm = load_model(args.model, threads=args.threads)
        t1 = time.perf_counter()
        acts, logits = capture(lm, prompts, positions)
        t2 = time.perf_counter()
    except PyrefusalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch, transformers = _import_torch()
    np.savez(
        args.out,
        acts=acts,
        logits=logits,
        positions=np.asarray(positions),
        versions=np.asarray([torch.__version__, transformers.__version__]),
        seconds=np.asarray([t1 - t0, t2 - t1]),
    )
    print(f"reference: {len(prompts)} prompts, load {t1 - t0:.1f}s, forward {t2 - t1:.1f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
