"""Throughput of plain llama.cpp vs pyrefusal's hook and llama.cpp's control vector.

Measures prompt processing (tokens/s over N prompts of a fixed length, all decoded together)
and greedy generation (tokens/s, fixed length, EOS ignored) at several numbers of parallel
sequences, for these modes, all in one process and one run so ratios are comparable:

* ``plain``       context without an eval callback (llama.cpp as any app runs it)
* ``hook_idle``   our callback attached, empty plan (the ask-phase cost only)
* ``capture``     capture every block input (n_layer + 1 nodes per decode)
* ``ablation``    directional ablation at every residual write (1 + 2 * n_layer nodes)
* ``addition``    activation addition at one block input via the hook
* ``cvec``        the same addition through llama.cpp's in-graph control vector
* ``lora``        ablation as a rank-1 LoRA adapter in llama.cpp's graph (no callback)
* ``merged``      ablation baked into the weights (orthogonalized GGUF, requantized), plain context

Usage: ``python benchmarks/bench_hook.py [--model SPEC] [--seqs 1,8,32] [--out benchmarks/results]``
Writes ``<out>/<machine>-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import llama_cpp  # noqa: F401  (before numpy)

import numpy as np

from pyrefusal.data.registry import DEFAULT_MODEL, resolve_model
from pyrefusal.method import intervention as iv
from pyrefusal.runtime.runtime import PlanEntry, Runtime, build_info
from pyrefusal.steering import router

MODES = ("plain", "hook_idle", "capture", "ablation", "addition", "cvec", "lora", "merged")


def _prompts(rt: Runtime, n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    words = np.array("the of and to in is that for it as with was on be by this are from at or an which".split(" "))  # noqa: SIM905
    out = []
    for _ in range(n):
        toks = rt.tokenize(" ".join(rng.choice(words, size=length * 2)))[:length]
        out.append(toks)
    return out


def _arm(rt: Runtime, mode: str, r: np.ndarray, n_seq: int) -> None:
    rt.clear_plan()
    if mode == "lora":
        router.arm(rt, iv.ablation(r), path="graph")
    elif mode == "capture":
        plan = {rt.nodes.block_input(lay): PlanEntry(capture_layer=lay) for lay in range(rt.n_layer + 1)}
        rt.set_plan(plan)
        rt.hook.set_capture_buffer(max(n_seq, 1) * 64, rt.n_layer + 1)
    elif mode == "ablation":
        router.arm(rt, iv.ablation(r))
    elif mode == "addition":
        router.arm(rt, iv.actadd(r, layer=rt.n_layer // 2, coeff=1.0))
    elif mode == "cvec":
        rt.set_control_vector({rt.n_layer // 2 - 1: r})


def measure(rt: Runtime, mode: str, n_seq: int, prompt_len: int, gen_len: int, reps: int) -> dict[str, float]:
    r = np.random.default_rng(0).standard_normal(rt.n_embd).astype(np.float32)
    _arm(rt, mode, r, n_seq)
    prompts = _prompts(rt, n_seq, prompt_len, seed=n_seq)
    rt.share_prefix = False  # random prompts; measure the raw decode
    # prompt processing: capture mode needs positions; others use last_logits
    pp = []
    for _ in range(reps):
        t = time.perf_counter()
        if mode == "capture":
            rt.capture(prompts, positions=list(range(-min(8, prompt_len), 0)))
            _arm(rt, mode, r, n_seq)
        else:
            rt.last_logits(prompts)
        pp.append(n_seq * prompt_len / (time.perf_counter() - t))
    tg = []
    for _ in range(reps):
        t0 = rt.timings.generation_seconds
        n0 = rt.timings.generated_tokens
        rt.generate(prompts, gen_len, stop_at_eog=False)
        tg.append((rt.timings.generated_tokens - n0) / (rt.timings.generation_seconds - t0))
    rt.clear_plan()
    return {"prompt_tps": float(np.median(pp)), "gen_tps": float(np.median(tg))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--seqs", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--tag", default=None, help="machine tag for the file name (default: hostname-cpu)")
    args = ap.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    model = resolve_model(args.model, progress=False)
    rows = []
    ctx = max(seqs) * (args.prompt_len + args.gen_len) + 64
    # The merged export bakes the same random direction into the weights (requantized to the base's types).
    from pyrefusal.steering.merge import export_merged

    args.out.mkdir(parents=True, exist_ok=True)
    merged_path = args.out / ".bench-merged.gguf"
    with Runtime(model.path, hook=False, n_ctx=64, n_seq_max=1) as probe:
        n_embd = probe.n_embd
    direction = np.random.default_rng(0).standard_normal(n_embd).astype(np.float32)
    export_merged(model.path, direction, merged_path, provenance={"purpose": "benchmark"}, validate=False)
    with (
        Runtime(model.path, hook=False, n_ctx=ctx, n_seq_max=max(seqs), sha256=model.sha256) as plain,
        Runtime(model.path, hook=True, n_ctx=ctx, n_seq_max=max(seqs), sha256=model.sha256) as hooked,
        Runtime(merged_path, hook=False, n_ctx=ctx, n_seq_max=max(seqs)) as merged,
    ):
        measure(plain, "plain", 1, 8, 4, 1)  # warm-up
        measure(hooked, "hook_idle", 1, 8, 4, 1)
        for n in seqs:
            for mode in MODES:
                rt = {"plain": plain, "merged": merged}.get(mode, hooked)
                if mode == "cvec" and rt.n_layer // 2 - 1 < 1:
                    continue
                res = measure(rt, mode, n, args.prompt_len, args.gen_len, args.reps)
                rows.append({"seqs": n, "mode": mode, **res})
                print(f"seqs={n:3d} {mode:10s} prompt {res['prompt_tps']:8.1f} tok/s   gen {res['gen_tps']:8.1f} tok/s")
        info = hooked.info().to_dict()
    merged_path.unlink(missing_ok=True)
    for row in rows:
        base = next(x for x in rows if x["seqs"] == row["seqs"] and x["mode"] == "plain")
        row["prompt_ratio"] = row["prompt_tps"] / base["prompt_tps"]
        row["gen_ratio"] = row["gen_tps"] / base["gen_tps"]
    bi = build_info()
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "system_info": bi["system_info"].strip(),
        "gpu_offload": bi["gpu_offload"],
        "cuda_kernel": bi["cuda_kernel"],
    }
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": {k: bi[k] for k in ("llama_cpp_python", "ggml_version", "ggml_commit")},
        "model": {k: info[k] for k in ("name", "arch", "n_layer", "n_embd", "file_type", "sha256")},
        "settings": {"prompt_len": args.prompt_len, "gen_len": args.gen_len, "reps": args.reps},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"cpu{os.cpu_count()}"
    safe = "".join(c if c.isalnum() else "_" for c in info["name"])
    stem = args.out / f"{tag}-{safe}-{dt.date.today().isoformat()}"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Hook throughput: {info['name']} ({info['file_type']})",
        "",
        (
            f"{result['date']}, {machine['cpu_count']} CPU cores, {machine['processor']}, llama-cpp-python "
            f"{bi['llama_cpp_python']} (ggml {bi['ggml_version']}); prompts of {args.prompt_len} tokens, "
            f"{args.gen_len} generated tokens per sequence, median of {args.reps}. "
            "Ratios are vs `plain` in the same run."
        ),
        "",
        "| seqs | mode | prompt tok/s | x plain | gen tok/s | x plain |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seqs']} | {r['mode']} | {r['prompt_tps']:.1f} | {r['prompt_ratio']:.2f} | "
            f"{r['gen_tps']:.1f} | {r['gen_ratio']:.2f} |"
        )
    lines += ["", f"Command: `python benchmarks/bench_hook.py --model {args.model} --seqs {args.seqs}`", ""]
    Path(f"{stem}.md").write_text("\n".join(lines))
    print(f"wrote {stem}.json / .md")


if __name__ == "__main__":
    main()
