"""The paper's stack as a throughput reference: transformers + torch, bf16, eager attention, hooks.

Wang et al. run every intervention as PyTorch hooks on a Hugging Face model (docs/method.md §5.1):
directional ablation ``x <- x - (x . r̂) r̂`` in place, at every layer and position, through

(a) a forward pre-hook on each decoder block (its input, the residual stream),
(b) a forward hook on each ``self_attn`` (its output ``output[0]``),
(c) a forward hook on each ``mlp`` (its output),

with r̂ normalised as ``r / (||r|| + 1e-8)`` and cast to the model dtype (bf16). This script builds a
random-weight model with the shape of a real one from a config dict (``AutoConfig.for_model`` +
``AutoModelForCausalLM.from_config``; nothing is downloaded), attaches those hooks, and times batched,
left-padded greedy ``generate`` at several batch sizes, the way the paper generates (``do_sample=False``).

Reported per batch size, from one timed ``generate`` after a warm-up (a streamer records when each
step's tokens arrive): prompt tokens/s (the prefill) and generation tokens/s (``seqs * (gen - 1)``
tokens over the decode steps, prefill excluded, as for llama.cpp), plus the peak CUDA memory. One
JSON object goes to stdout; progress to stderr.

It runs in its own process: torch must not share a process with llama.cpp (importing both can abort),
and this file never imports ``llama_cpp``. ``bench_gpu.py`` invokes it; on its own::

    python benchmarks/paper_stack.py --shape qwen2.5-7b --seqs 1,16,64 --prompt-len 64 --gen 128
    python benchmarks/paper_stack.py --shape tiny --seqs 1,4 --gen 16 --device cpu
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any


def _sibling(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` by path (works however this script is started)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _log(msg: str) -> None:
    print(f"[paper_stack] {msg}", file=sys.stderr, flush=True)


def build_model(config: dict[str, Any], device: str, dtype_name: str) -> Any:
    """Random-weight causal LM of this config, eager attention, on ``device`` in ``dtype_name``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    hf_cfg = AutoConfig.for_model(model_type, **cfg)
    dtype = getattr(torch, dtype_name)
    with torch.device(device):
        try:  # transformers >= 4.56 names it `dtype`, older versions `torch_dtype`
            model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager", dtype=dtype)
        except TypeError:
            model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager", torch_dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    gen_cfg = model.generation_config
    gen_cfg.eos_token_id = None  # random weights: never stop early; every sequence gets `gen` tokens
    gen_cfg.pad_token_id = cfg.get("pad_token_id", 0)
    gen_cfg.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        if hasattr(gen_cfg, key):
            setattr(gen_cfg, key, None)
    return model


class AblationHooks:
    """The paper's directional-ablation hooks on every block input, attention output and MLP output."""

    def __init__(self, model: Any, direction: Any) -> None:
        import torch

        self.calls = 0
        rhat = direction / (direction.norm(dim=-1, keepdim=True) + 1e-8)
        param = next(model.parameters())
        self.rhat = rhat.to(device=param.device, dtype=param.dtype)  # (n_embd,)
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for block in model.model.layers:
            self.handles.append(block.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(block.self_attn.register_forward_hook(self._post))
            self.handles.append(block.mlp.register_forward_hook(self._post))

    def _ablate_(self, x: Any) -> None:
        """x <- x - (x . r̂) r̂, in place, every row (x: (..., n_embd))."""
        x -= (x @ self.rhat).unsqueeze(-1) * self.rhat
        self.calls += 1

    def _pre(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._ablate_(args[0] if args else kwargs["hidden_states"])

    def _post(self, module: Any, inputs: Any, output: Any) -> None:
        self._ablate_(output[0] if isinstance(output, tuple) else output)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class StepClock:
    """A ``generate`` streamer that only records when each step's tokens arrive.

    ``generate`` calls ``put`` with the prompt first, then once per new token (after that step's
    forward pass), so the prefill is ``t[1] - t[0]`` and the decode steps are ``t[-1] - t[1]``.
    """

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def measure(model: Any, n_seq: int, prompt_len: int, gen: int, device: str, vocab: int, seed: int) -> dict[str, Any]:
    """Prefill and generation throughput of batched greedy ``generate`` (left padding, all prompts full)."""
    import torch

    g = torch.Generator().manual_seed(seed + n_seq)
    ids = torch.randint(8, vocab, (n_seq, prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    cuda = device.startswith("cuda")

    def run(new_tokens: int) -> StepClock:
        clock = StepClock()
        if cuda:
            torch.cuda.synchronize()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=clock,
        )
        if cuda:
            torch.cuda.synchronize()
        assert out.shape == (n_seq, prompt_len + new_tokens), out.shape
        assert len(clock.times) == new_tokens + 1, len(clock.times)
        return clock

    with torch.inference_mode():
        run(4)  # warm-up at this batch size
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = run(gen).times
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {
        "seqs": n_seq,
        "prompt_tps": n_seq * prompt_len / (t[1] - t[0]),
        "gen_tps": n_seq * (gen - 1) / (t[-1] - t[1]),
        "seconds": t[-1] - t[0],
        "peak_torch_mib": peak,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", help="a shape of make_random_gguf.py (qwen2.5-7b, llama-3.1-8b, tiny)")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--config-json", help="transformers config dict (JSON); overrides --shape")
    ap.add_argument("--seqs", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto")
    ap.add_argument("--dtype", default="bfloat16", help="torch dtype name (the paper: bfloat16 for Qwen2/Llama-3)")
    ap.add_argument("--no-hooks", action="store_true", help="time plain generate (the paper's baseline condition)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    import torch
    import transformers

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    if args.config_json:
        config = json.loads(args.config_json)
        shape_name = config.get("name_or_path", "custom")
    else:
        mrg = _sibling("make_random_gguf")
        shape = mrg.get_shape(args.shape, args.scale)
        config, shape_name = mrg.hf_config(shape), shape.name
    _log(f"building a random {config['model_type']} model ({shape_name}) on {device} in {args.dtype}")
    model = build_model(config, device, args.dtype)
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    hooks = None
    if not args.no_hooks:
        direction = torch.randn(config["hidden_size"], generator=torch.Generator().manual_seed(args.seed + 1))
        hooks = AblationHooks(model, direction)
    rows = []
    for n in [int(s) for s in args.seqs.split(",")]:
        calls0 = hooks.calls if hooks else 0
        row = measure(model, n, args.prompt_len, args.gen, device, config["vocab_size"], args.seed)
        if hooks:
            # forwards: 4 (warm-up) + gen (timed run); expect 3 hook calls per layer each
            forwards = 4 + args.gen
            row["hook_calls_per_forward"] = (hooks.calls - calls0) / forwards
        rows.append(row)
        _log(f"seqs={n:3d} prompt {row['prompt_tps']:9.1f} tok/s  gen {row['gen_tps']:9.1f} tok/s")
    result = {
        "stack": "transformers+torch",
        "hooks": "ablation: block pre-hooks + self_attn/mlp forward hooks" if hooks else "none",
        "shape": shape_name,
        "config": config,
        "n_params": n_params,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "attn_implementation": "eager",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompt_len": args.prompt_len,
        "gen": args.gen,
        "load_s": load_s,
        "rows": rows,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
