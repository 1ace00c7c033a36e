"""pyrefusal on a GPU against plain llama.cpp and the paper's stack: the full table, one command.

For every model shape (random weights, see ``make_random_gguf.py``) and file type, and for 1, 16
and 64 parallel sequences (64-token prompts, ``--gen`` greedy tokens, EOS ignored), this measures
prompt and generation tokens/s of:

* ``plain``          llama.cpp without an eval callback (what any llama.cpp app runs)
* ``capture``        pyrefusal's hook capturing every block input (n_layer + 1 nodes per decode)
* ``hook_ablation``  directional ablation by the hook at every residual write (1 + 2 n_layer nodes;
  the CUDA kernel edits device tensors in place when pyrefusal is built with ``PYREFUSAL_CUDA=ON``)
* ``lora_ablation``  the same ablation in llama.cpp's graph, as a rank-1 LoRA adapter
  (``pyrefusal.steering.export.export_ablation_lora``; skipped with a note when that is not importable)
* ``cvec``           activation addition at one layer through llama.cpp's control vector (in graph)
* ``hook_addition``  the same addition through the hook
* ``paper``          the paper's stack, transformers + torch in bf16 with eager attention and its
  ablation hooks (block pre-hooks, attention and MLP output hooks), in a separate process
  (``paper_stack.py``; skipped with a note when torch/transformers are missing)

It then checks the issue's targets (hook ablation >= 0.80x plain at 1 sequence and >= 0.90x at 64;
the fastest exact ablation path >= 0.95x; ablated pyrefusal >= 15x the paper's stack at 1 sequence
and >= 4x at 64; the paper's full protocol on a 7B model in < 15 min on one GPU; the 8B pipeline
within 8 GiB of GPU memory), estimates the paper's end-to-end protocol from the measured rates
(docs/method.md §10 counts), and measures the peak GPU memory of the pipeline on the 8B Q4_K_M model in
a child process (nvidia-smi sampling, plus llama.cpp's own buffer sizes).

Writes ``<results>/<gpu-name>-<date>.json`` and ``.md`` (``cpu-smoke-<date>`` without a GPU), after
every model, so a run stopped by a time limit keeps what it measured; ``--append`` merges into an
existing file of the same name (to split a run over several commands). ``--deadline-s`` skips what
would start after that many seconds; the order puts the core comparison first (our rows and the
paper's on the first shape, then the memory probe, the other shapes, then the other file types).

Usage::

    python benchmarks/bench_gpu.py                                   # everything (GPU machine)
    python benchmarks/bench_gpu.py --dtype q4_k_m --deadline-s 540    # first part of a split run
    python benchmarks/bench_gpu.py --dtype f16 --no-paper --no-memory --append
    python benchmarks/bench_gpu.py --shape tiny --seqs 1,4 --gen 16   # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import inspect
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import llama_cpp  # noqa: F401  (before numpy: required in CUDA processes)

import numpy as np
from typing_extensions import Self

from pyrefusal.method import intervention as iv
from pyrefusal.runtime.runtime import PlanEntry, Runtime, build_info
from pyrefusal.steering import router

HERE = Path(__file__).resolve().parent
MODES = ("plain", "capture", "hook_ablation", "lora_ablation", "cvec", "hook_addition")
ABLATION_MODES = ("hook_ablation", "lora_ablation")  # exact implementations of the paper's ablation
MODE_DOC = {
    "plain": "llama.cpp, no eval callback",
    "capture": "hook captures every block input (prompt: last 5 positions; generation: each new token)",
    "hook_ablation": "hook ablates the direction at embd + every ffn_inp/l_out (C++; CUDA kernel on device)",
    "lora_ablation": "rank-1 LoRA adapter (W - r r^T W on token_embd, attn_output, ffn_down), in graph",
    "cvec": "llama.cpp control vector at one layer (in graph)",
    "hook_addition": "hook adds a vector at one block input",
    "paper": "transformers + torch, bf16, eager attention, paper's ablation hooks (separate process)",
}

# The targets.
T_HOOK_1, T_HOOK_MAX, T_EXACT = 0.80, 0.90, 0.95
T_PAPER_1, T_PAPER_MAX = 15.0, 4.0
T_E2E_MIN, T_MEM_GIB = 15.0, 8.0

# The paper's protocol (docs/method.md §10).
N_LANGS, N_TEST, N_TRAIN, N_VAL, N_POS, MAX_NEW = 14, 572, 128, 32, 5, 512
JUDGE_PROMPT, JUDGE_GEN = 1000, 32  # WildGuard: ~1k-token input, <= 32 new tokens per completion

# Pipeline defaults for the memory probe (pyrefusal.studies.run.RunConfig; n_batch is Runtime's default).
PIPELINE_N_CTX, PIPELINE_N_SEQ = 8192, 16


def _sibling(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` by path (works with PYTHONSAFEPATH and from any directory)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


mrg = _sibling("make_random_gguf")


def log(msg: str) -> None:
    print(msg, flush=True)


# --- the machine -----------------------------------------------------------------------------


def gpu_info() -> dict[str, Any] | None:
    """Name, driver, CUDA version and memory of GPU 0 from nvidia-smi (None without one)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        q = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        head = subprocess.run([exe], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if q.returncode != 0 or not q.stdout.strip():
        return None
    name, driver, mem = (x.strip() for x in q.stdout.strip().splitlines()[0].split(","))
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", head)
    return {"name": name, "driver": driver, "cuda": cuda.group(1) if cuda else None, "memory_total_mib": int(mem)}


def _smi_used(pid: int | None) -> tuple[int | None, int | None]:
    """(total used MiB on GPU 0, used MiB of process ``pid``) from nvidia-smi; None when unknown."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, None
    total = per_pid = None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        total = int(out.splitlines()[0]) if out else None
        if pid is not None:
            apps = subprocess.run(
                [exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
            for line in apps.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
                    per_pid = int(parts[1])
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return total, per_pid


class GpuMemorySampler:
    """Samples nvidia-smi in a thread; keeps the peak total and the peak of one process."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.pid: int | None = None
        self.baseline, _ = _smi_used(None)
        self.peak_total: int | None = None
        self.peak_pid: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total, mine = _smi_used(self.pid)
            if total is not None:
                self.peak_total = max(self.peak_total or 0, total)
                self.samples += 1
            if mine is not None:
                self.peak_pid = max(self.peak_pid or 0, mine)
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, Any]:
        delta = None
        if self.peak_total is not None and self.baseline is not None:
            delta = self.peak_total - self.baseline
        return {
            "nvidia_smi_samples": self.samples,
            "baseline_used_mib": self.baseline,
            "peak_used_mib": self.peak_total,
            "peak_used_minus_baseline_mib": delta,
            "peak_process_mib": self.peak_pid,
        }


_BUFFER_RE = re.compile(r"(\S+)\s+(model|KV|compute|output|RS)\s+buffer size\s*=\s*([\d.]+)\s*MiB")


def parse_llama_buffers(text: str) -> dict[str, Any]:
    """llama.cpp's reported buffer sizes (MiB) from its log, and their sum on devices (not host)."""
    sizes: dict[str, float] = {}
    for m in _BUFFER_RE.finditer(text):
        key = f"{m.group(1)} {m.group(2)}"
        sizes[key] = max(sizes.get(key, 0.0), float(m.group(3)))
    on_device = sum(v for k, v in sizes.items() if not k.startswith(("CPU", "CUDA_Host")))
    return {"buffers_mib": sizes, "device_buffers_mib": on_device, "all_buffers_mib": sum(sizes.values())}


# --- measuring -------------------------------------------------------------------------------


def random_prompts(n_vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` prompts of random text-token ids (the random models have no meaningful text)."""
    rng = np.random.default_rng(seed)
    return rng.integers(mrg.FIRST_TEXT_TOKEN, n_vocab, size=(n, length)).tolist()


def direction(n_embd: int, seed: int = 0) -> np.ndarray:
    """A random direction of norm 4 (float32)."""
    r = np.random.default_rng(seed).standard_normal(n_embd)
    return (4.0 * r / np.linalg.norm(r)).astype(np.float32)


def export_lora(model: Path, r: np.ndarray, out_dir: Path) -> tuple[Path | None, str, float]:
    """Export the ablation LoRA with ``pyrefusal.steering.export`` when available: (path or None, note, seconds)."""
    try:
        from pyrefusal.steering.export import export_ablation_lora
    except ImportError as e:
        return None, f"lora_ablation skipped: pyrefusal.steering.export.export_ablation_lora not importable ({e})", 0.0
    out = out_dir / f"{model.stem}-ablation-lora.gguf"
    t = time.perf_counter()
    try:
        kwargs: dict[str, Any] = {}
        if "provenance" in inspect.signature(export_ablation_lora).parameters:
            kwargs["provenance"] = {"source": "benchmarks/bench_gpu.py", "direction": "random (benchmark only)"}
        export_ablation_lora(model, r, out, **kwargs)
    except Exception as e:  # noqa: BLE001  (any failure becomes a note; the table goes on)
        return None, f"lora_ablation skipped: export_ablation_lora failed on {model.name}: {e!r}", 0.0
    return out, "", time.perf_counter() - t


class Bench:
    """The two llama.cpp runtimes of one model and the mode switches."""

    def __init__(self, plain: Runtime, hooked: Runtime, r: np.ndarray, lora: Path | None) -> None:
        self.plain, self.hooked, self.r, self.lora = plain, hooked, r, lora
        self.layer = max(1, plain.n_layer // 2)  # steered block input (cvec: l_out-(layer-1))

    def runtime(self, mode: str) -> Runtime:
        return self.plain if mode in ("plain", "lora_ablation", "cvec") else self.hooked

    def arm(self, mode: str, n_seq: int) -> None:
        rt = self.runtime(mode)
        self.disarm()
        if mode == "capture":
            plan = {rt.nodes.block_input(lay): PlanEntry(capture_layer=lay) for lay in range(rt.n_layer + 1)}
            rt.set_plan(plan)
            assert rt.hook is not None
            rt.hook.set_capture_buffer(n_seq, rt.n_layer + 1)
        elif mode == "hook_ablation":
            router.arm(rt, iv.ablation(self.r))
        elif mode == "hook_addition":
            router.arm(rt, iv.actadd(self.r, layer=self.layer, coeff=1.0))
        elif mode == "cvec":
            rt.set_control_vector({self.layer - 1 if self.layer > 1 else 1: self.r})
        elif mode == "lora_ablation":
            assert self.lora is not None
            rt.set_lora([(self.lora, 1.0)])

    def disarm(self) -> None:
        for rt in (self.plain, self.hooked):
            rt.clear_plan()
            rt.set_control_vector(None)
        if self.lora is not None:
            self.plain.set_lora(None)

    def measure(self, mode: str, n_seq: int, prompt_len: int, gen: int, reps: int) -> dict[str, Any]:
        rt = self.runtime(mode)
        prompts = random_prompts(rt.n_vocab, n_seq, prompt_len, seed=n_seq)
        rt.share_prefix = False
        self.arm(mode, n_seq)
        stats0 = dict(rt.hook.stats()) if rt.hook is not None else {}
        rt.generate(prompts, 4, stop_at_eog=False)  # warm-up at this batch size
        pp, tg, cb = [], [], []
        for _ in range(reps):
            t = time.perf_counter()
            if mode == "capture":
                rt.capture(prompts, positions=list(range(-min(N_POS, prompt_len), 0)))
            else:
                rt.last_logits(prompts)
            pp.append(n_seq * prompt_len / (time.perf_counter() - t))
            if mode == "capture":
                self.arm(mode, n_seq)
            s0, n0 = rt.timings.generation_seconds, rt.timings.generated_tokens
            ns0 = rt.hook.stats()["data_ns"] if rt.hook is not None else 0
            rt.generate(prompts, gen, stop_at_eog=False)
            seconds = rt.timings.generation_seconds - s0
            tg.append((rt.timings.generated_tokens - n0) / seconds)
            if rt.hook is not None:  # share of generation time spent inside our callback's data phase
                cb.append((rt.hook.stats()["data_ns"] - ns0) / 1e9 / seconds)
        row: dict[str, Any] = {"prompt_tps": float(np.median(pp)), "gen_tps": float(np.median(tg))}
        if rt.hook is not None:
            s = rt.hook.stats()
            row["hook"] = {k: int(s[k] - stats0.get(k, 0)) for k in ("observed", "device_nodes", "cuda_kernel_nodes")}
            row["hook"]["gen_callback_share"] = float(np.median(cb))
        self.disarm()
        return row


def run_paper(args: argparse.Namespace, shape: Any, timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run paper_stack.py in its own process: (result or None, note)."""
    env = dict(os.environ)
    if args.paper_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.paper_pythonpath, env.get("PYTHONPATH", "")) if p)
    probe = "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'transformers')))"
    if subprocess.run([args.paper_python, "-c", probe], env=env, check=False).returncode != 0:
        return None, "paper row skipped: torch and/or transformers are not installed for the paper-stack interpreter"
    cmd = [
        args.paper_python,
        str(HERE / "paper_stack.py"),
        "--shape",
        shape.name.split("@")[0],
        "--scale",
        str(args.scale),
        "--seqs",
        args.seqs,
        "--prompt-len",
        str(args.prompt_len),
        "--gen",
        str(args.gen),
        "--device",
        args.paper_device,
    ]
    log(f"paper stack: {' '.join(cmd[1:])}")
    try:
        res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"paper row for {shape.name} skipped: paper_stack.py ran past the time budget ({timeout:.0f} s)"
    if res.returncode != 0:
        return None, f"paper row for {shape.name} failed: paper_stack.py exited with {res.returncode} (see its log)"
    return json.loads(res.stdout.strip().splitlines()[-1]), ""


def memory_probe_child(path: Path, n_ctx: int, n_seq: int, prompt_len: int, gen: int, threads: int | None) -> None:
    """(child) Run the pipeline's three stages once on ``path`` and print a JSON summary."""
    t0 = time.perf_counter()
    rt = Runtime(path, n_ctx=n_ctx, n_seq_max=n_seq, n_threads=threads, sha256="not-computed")
    load_s = time.perf_counter() - t0
    prompts = random_prompts(rt.n_vocab, n_seq, prompt_len, seed=7)
    r = direction(rt.n_embd)
    rt.capture(prompts, positions=list(range(-N_POS, 0)))  # extraction
    router.arm(rt, iv.ablation(r))
    rt.last_logits(prompts)  # selection
    router.arm(rt, iv.harm_ablation(r, layer=rt.n_layer // 2))
    rt.generate(prompts, gen, stop_at_eog=False)  # evaluation
    assert rt.hook is not None
    stats = rt.hook.stats()
    rt.close()
    out = {"n_ctx": n_ctx, "n_seq": n_seq, "n_gpu_layers": rt.n_gpu_layers, "load_s": load_s, "hook": dict(stats)}
    print(json.dumps(out), flush=True)


def run_memory_probe(args: argparse.Namespace, path: Path, timeout: float) -> dict[str, Any]:
    """Peak GPU memory of the pipeline in a child process (nvidia-smi + llama.cpp's buffer log)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", str(path)]
    cmd += ["--prompt-len", str(args.prompt_len), "--gen", "64"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYREFUSAL_LLAMA_LOG="1")
    log(f"memory probe: {path.name}, n_ctx {PIPELINE_N_CTX}, {PIPELINE_N_SEQ} sequences (pipeline defaults)")
    sampler = GpuMemorySampler()
    with sampler:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler.pid = proc.pid
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
    out: dict[str, Any] = {"model": path.name, **sampler.result(), **parse_llama_buffers(stderr)}
    if proc.returncode == 0 and stdout.strip():
        out["child"] = json.loads(stdout.strip().splitlines()[-1])
    else:
        out["error"] = f"memory probe exited with {proc.returncode}: {stderr.strip()[-800:]}"
    # the measure that decides the target: the process's own peak when nvidia-smi lists it, else the
    # rise of the GPU's used memory, else llama.cpp's device buffers (no CUDA context included)
    for key in ("peak_process_mib", "peak_used_minus_baseline_mib", "device_buffers_mib"):
        if out.get(key):
            out["peak_mib"], out["peak_source"] = out[key], key
            break
    return out


def bench_model(
    args: argparse.Namespace,
    res: dict[str, Any],
    shape: Any,
    dtype: str,
    todo: dict[int, list[str]],
    left: Callable[[], float],
    add_row: Callable[[dict[str, Any]], None],
) -> None:
    """Load one model twice (plain and hooked), export its LoRA, and measure ``todo[seqs]`` modes."""
    seqs = sorted(todo)
    n_ctx = -(-max(seqs) * (args.prompt_len + args.gen + 8) // 256) * 256
    t0 = time.perf_counter()
    path = mrg.ensure_model(shape, dtype, args.model_dir, direct=args.direct_quant)
    make_s = time.perf_counter() - t0
    kw = {"n_ctx": n_ctx, "n_seq_max": max(seqs), "n_threads": args.threads, "sha256": "not-computed"}
    t0 = time.perf_counter()
    with Runtime(path, hook=False, **kw) as plain, Runtime(path, hook=True, **kw) as hooked:
        load_s = time.perf_counter() - t0
        r = direction(plain.n_embd)
        lora, lora_s = None, 0.0
        if any("lora_ablation" in ms for ms in todo.values()):
            lora, why, lora_s = export_lora(path, r, args.model_dir)
            if lora is None:
                res["notes"].append(why)
                log(why)
        bench = Bench(plain, hooked, r, lora)
        t0 = time.perf_counter()
        for rt in (plain, hooked):  # page in the weights, warm up kernels and clocks before any timing
            warm = random_prompts(rt.n_vocab, max(seqs), args.prompt_len, seed=1)
            rt.last_logits(warm)
            rt.generate(warm, 8, stop_at_eog=False)
        warm_s = time.perf_counter() - t0
        info = plain.info().to_dict()
        res["models"][f"{shape.name} {dtype}"] = {
            **{k: info[k] for k in ("arch", "n_layer", "n_embd", "n_vocab", "n_params", "file_type")},
            "file_bytes": path.stat().st_size,
            "n_gpu_layers": plain.n_gpu_layers,
            "make_s": make_s,
            "load_two_runtimes_s": load_s,
            "warm_up_s": warm_s,
            "lora_export_s": lora_s,
        }
        for n in seqs:
            for mode in todo[n]:
                if mode == "lora_ablation" and lora is None:
                    continue
                if left() < 20:
                    res["notes"].append(f"{shape.name} {dtype} {mode} {n} seq skipped: time budget")
                    continue
                row: dict[str, Any] = {"shape": shape.name, "dtype": dtype, "mode": mode, "seqs": n}
                try:
                    row.update(bench.measure(mode, n, args.prompt_len, args.gen, args.reps))
                    base = _find(res["rows"], shape.name, dtype, "plain", n)
                    ratio = f" ({row['gen_tps'] / base['gen_tps']:.2f}x)" if base and mode != "plain" else ""
                    log(
                        f"{shape.name} {dtype} seqs={n:3d} {mode:14s} prompt {row['prompt_tps']:9.1f} tok/s"
                        f"  gen {row['gen_tps']:9.1f} tok/s{ratio}"
                    )
                except Exception as e:  # noqa: BLE001  (one broken mode must not lose the table)
                    row["error"] = repr(e)
                    log(f"{shape.name} {dtype} seqs={n} {mode}: ERROR {e!r}")
                    bench.disarm()
                add_row(row)


# --- results ---------------------------------------------------------------------------------


def _key(row: dict[str, Any]) -> tuple[str, str, str, int]:
    return (row["shape"], row["dtype"], row["mode"], int(row["seqs"]))


def _find(rows: list[dict[str, Any]], shape: str, dtype: str, mode: str, seqs: int) -> dict[str, Any] | None:
    for r in rows:
        if _key(r) == (shape, dtype, mode, seqs) and "gen_tps" in r:
            return r
    return None


def _verdict(measured: float | None, target: float, higher_is_better: bool) -> str:
    if measured is None:
        return "n/a"
    ok = measured >= target if higher_is_better else measured < target
    if higher_is_better:
        how = f"{(measured / target - 1) * 100:+.0f}% vs target"
    else:
        how = f"{(measured / target - 1) * 100:+.0f}% vs limit"
    return f"{'pass' if ok else 'MISS'} ({how})"


def e2e_estimate(shape: Any, rates: dict[str, float], len_base: float, len_abl: float, prompt_len: int) -> dict:
    """Minutes of the paper's protocol at the measured rates (tok/s); docs/method.md §10 counts.

    ``rates``: prompt/gen tok/s of plain, capture, hook_ablation, hook_addition at the largest batch.
    Selection counts all 6 passes of the paper's code over 5 positions x n_layer candidates x 32
    prompts (3 with ablation, 3 with ActAdd); generation covers the 2 reported conditions (baseline,
    harm_ablation) x 14 languages x 572 prompts.
    """
    cands = N_POS * shape.n_layer
    n_gen = N_LANGS * N_TEST
    steps = [
        ("extraction: capture 2x128 train prompts", 2 * N_TRAIN * prompt_len, rates["capture_prompt"]),
        (
            "filtering: refusal scores, 2x128 + 2x32 prompts",
            (2 * N_TRAIN + 2 * N_VAL) * prompt_len,
            rates["plain_prompt"],
        ),
        (
            f"selection: 3 ablation passes x {cands} candidates x 32 prompts",
            3 * cands * N_VAL * prompt_len,
            rates["hook_ablation_prompt"],
        ),
        (
            f"selection: 3 ActAdd passes x {cands} candidates x 32 prompts",
            3 * cands * N_VAL * prompt_len,
            rates["hook_addition_prompt"],
        ),
        (f"generation prompts: 2 x {n_gen}", 2 * n_gen * prompt_len, rates["plain_prompt"]),
    ]
    fixed = sum(tok / rate for _, tok, rate in steps)
    out: dict[str, Any] = {"steps": [{"step": s, "tokens": t, "tok_s": r, "s": t / r} for s, t, r in steps]}
    variants = {}
    for name, lb, la in (("max 512 tokens", MAX_NEW, MAX_NEW), ("measured lengths", len_base, len_abl)):
        g_base = n_gen * lb / rates["plain_gen"]
        g_abl = n_gen * la / rates["hook_ablation_gen"]
        variants[name] = {
            "baseline_tokens": n_gen * lb,
            "ablated_tokens": n_gen * la,
            "generation_s": g_base + g_abl,
            "total_min": (fixed + g_base + g_abl) / 60,
        }
    judge = 2 * n_gen * (JUDGE_PROMPT / rates["plain_prompt"] + JUDGE_GEN / rates["plain_gen"])
    out.update({"fixed_s": fixed, "variants": variants, "judge_s_rough": judge})
    return out


def paper_e2e(shape: Any, rows: list[dict[str, Any]], seqs: int, prompt_len: int) -> float | None:
    """Minutes of the protocol on the paper's stack from its measured rates (every batch runs to 512)."""
    r = _find(rows, shape.name, "bf16", "paper", seqs)
    if r is None:
        return None
    cands = N_POS * shape.n_layer
    n_gen = N_LANGS * N_TEST
    prompt_tokens = (2 * N_TRAIN + 2 * N_TRAIN + 2 * N_VAL + 6 * cands * N_VAL + 2 * n_gen) * prompt_len
    return (prompt_tokens / r["prompt_tps"] + 2 * n_gen * MAX_NEW / r["gen_tps"]) / 60


def evaluate(res: dict[str, Any], args: argparse.Namespace) -> None:
    """Fill ``res['targets']`` and ``res['e2e']`` from the rows."""
    rows = res["rows"]
    targets: list[dict[str, Any]] = []
    e2e: list[dict[str, Any]] = []
    for shape_name, dtype in _combos(rows):
        shape = _shape_from_name(shape_name)
        seqs = sorted({int(r["seqs"]) for r in rows if r["shape"] == shape_name and r["dtype"] == dtype})
        lo, hi = seqs[0], seqs[-1]
        model = f"{shape_name} {dtype}"

        for n, t in ((lo, T_HOOK_1), (hi, T_HOOK_MAX)) if hi != lo else ((lo, T_HOOK_1),):
            a = _find(rows, shape_name, dtype, "hook_ablation", n)
            b = _find(rows, shape_name, dtype, "plain", n)
            m = a["gen_tps"] / b["gen_tps"] if a and b else None
            targets.append(_target(f"hook ablation vs plain, {n} seq", model, m, t, True, "x"))
        for n in seqs:
            mode, tps = _best_ablation(rows, shape_name, dtype, n)
            base = _find(rows, shape_name, dtype, "plain", n)
            m = tps / base["gen_tps"] if tps and base else None
            targets.append(_target(f"fastest exact ablation ({mode}) vs plain, {n} seq", model, m, T_EXACT, True, "x"))
        for n, t in ((lo, T_PAPER_1), (hi, T_PAPER_MAX)) if hi != lo else ((lo, T_PAPER_1),):
            mode, tps = _best_ablation(rows, shape_name, dtype, n)
            paper = _find(rows, shape_name, "bf16", "paper", n)
            m = tps / paper["gen_tps"] if tps and paper else None
            targets.append(_target(f"ablated pyrefusal ({mode}) vs paper stack, {n} seq", model, m, t, True, "x"))
        rates = {}
        for mode in ("plain", "capture", "hook_ablation", "hook_addition"):
            r = _find(rows, shape_name, dtype, mode, hi)
            if r:
                rates[f"{mode}_prompt"], rates[f"{mode}_gen"] = r["prompt_tps"], r["gen_tps"]
        needed = ("plain_prompt", "plain_gen", "capture_prompt", "hook_ablation_prompt", "hook_ablation_gen")
        if all(k in rates for k in needed):
            rates.setdefault("hook_addition_prompt", rates["hook_ablation_prompt"])
            est = e2e_estimate(shape, rates, args.len_baseline, args.len_ablated, args.prompt_len)
            est.update({"model": model, "seqs": hi, "paper_stack_min": paper_e2e(shape, rows, hi, args.prompt_len)})
            e2e.append(est)
            for variant, v in est["variants"].items():
                name = f"full protocol ({variant}) on one GPU, {hi} seqs"
                targets.append(_target(name, model, v["total_min"], T_E2E_MIN, False, " min"))
    mem = res.get("memory") or {}
    if mem.get("peak_mib"):
        gib = mem["peak_mib"] / 1024
        targets.append(
            _target(f"pipeline peak GPU memory ({mem['peak_source']})", mem["model"], gib, T_MEM_GIB, False, " GiB")
        )
    res["targets"], res["e2e"] = targets, e2e


def _best_ablation(rows: list[dict[str, Any]], shape: str, dtype: str, n: int) -> tuple[str | None, float | None]:
    """(mode, gen tok/s) of the fastest exact ablation mode measured, or (None, None)."""
    found = [(m, _find(rows, shape, dtype, m, n)) for m in ABLATION_MODES]
    rated = [(m, r["gen_tps"]) for m, r in found if r]
    return max(rated, key=lambda x: x[1]) if rated else (None, None)


def _target(name: str, model: str, measured: float | None, target: float, higher: bool, unit: str) -> dict[str, Any]:
    return {
        "target": name,
        "model": model,
        "measured": measured,
        "limit": target,
        "unit": unit.strip(),
        "op": ">=" if higher else "<",
        "result": _verdict(measured, target, higher),
    }


def _combos(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(shape, dtype) pairs of the llama.cpp rows, in first-measured order."""
    return list(dict.fromkeys((r["shape"], r["dtype"]) for r in rows if r["mode"] != "paper"))


def _shape_from_name(name: str) -> Any:
    base, _, scale = name.partition("@")
    return mrg.get_shape(base, float(scale) if scale else 1.0)


def render_md(res: dict[str, Any]) -> str:
    """The results as Markdown (tables of tok/s and ratios, targets, e2e estimate, memory, notes)."""
    gpu = res.get("gpu") or {}
    v = res["versions"]
    s = res["settings"]
    title = gpu.get("name") or "CPU (smoke test: tiny sizes, numbers say nothing about GPUs)"
    lines = [f"# pyrefusal GPU benchmark: {title}", ""]
    facts = [
        f"Date {res['date']}",
        f"driver {gpu.get('driver')}, CUDA {gpu.get('cuda')}" if gpu else f"{res['machine']['cpu_count']} CPU cores",
        f"llama-cpp-python {v['llama_cpp_python']} (ggml {v['ggml_version']}, {v['ggml_commit']})",
        f"pyrefusal CUDA kernel compiled: {v['cuda_kernel']}, llama.cpp GPU offload: {v['gpu_offload']}",
    ]
    if v.get("torch"):
        facts.append(f"paper stack: torch {v['torch']}, transformers {v['transformers']}")
    lines.append("; ".join(facts) + ".")
    lines += [
        "",
        (
            f"Prompts of {s['prompt_len']} random tokens, {s['gen']} greedy tokens per sequence (EOS ignored), "
            f"median of {s['reps']} run(s) after a warm-up; ratios are against `plain` of the same model in the same "
            "run. Random-weight models with the real tensor shapes (benchmarks/make_random_gguf.py). Single runs: "
            "trust ratios more than absolute numbers."
        ),
        "",
    ]
    rows = res["rows"]
    combos = _combos(rows)
    for what, key in (("Generation", "gen_tps"), ("Prompt processing", "prompt_tps")):
        lines += [f"## {what} tokens/s (x plain)", ""]
        for shape_name, dtype in combos:
            seqs = sorted({int(r["seqs"]) for r in rows if r["shape"] == shape_name and r["dtype"] == dtype})
            lines += [f"### {shape_name} {dtype.upper()}", ""]
            lines.append("| mode | " + " | ".join(f"{n} seq" for n in seqs) + " |")
            lines.append("|---|" + "---:|" * len(seqs))
            for mode in (*MODES, "paper"):
                cells = []
                for n in seqs:
                    r = _find(rows, shape_name, "bf16" if mode == "paper" else dtype, mode, n)
                    base = _find(rows, shape_name, dtype, "plain", n)
                    if r is None:
                        err = next(
                            (x.get("error") for x in rows if _key(x) == (shape_name, dtype, mode, n) and "error" in x),
                            None,
                        )
                        cells.append("error" if err else "-")
                    elif mode == "plain" or base is None:
                        cells.append(f"{r[key]:.1f}")
                    else:
                        cells.append(f"{r[key]:.1f} ({r[key] / base[key]:.2f}x)")
                label = "paper (transformers bf16)" if mode == "paper" else mode
                if any(c != "-" for c in cells):
                    lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
    hooked = [r for r in rows if "hook" in r]
    if hooked:
        lines += [
            "## Hook counters and where the hook's time goes (generation)",
            "",
            "Nodes handled: all / in device memory / by the CUDA kernel. `callback` is the share of the hooked",
            "generation time spent inside pyrefusal's callback (kernels, copies, its stream syncs); `extra per token`",
            "is the hooked run's time per generated token minus plain llama.cpp's, split into the callback and the",
            "rest (the scheduler's graph splits at every hooked node and its backend syncs).",
            "",
            "| model | mode | seqs | observed | device | CUDA kernel | callback | extra per token: callback / rest |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in hooked:
            h = r["hook"]
            share, split = h.get("gen_callback_share"), "-"
            base = _find(rows, r["shape"], r["dtype"], "plain", r["seqs"])
            if share is not None and base and r.get("gen_tps") and base.get("gen_tps"):
                t_hook, t_plain = 1e3 / r["gen_tps"], 1e3 / base["gen_tps"]  # ms per generated token (all seqs)
                in_cb = share * t_hook
                split = f"{t_hook - t_plain:.3f} ms: {in_cb:.3f} / {t_hook - t_plain - in_cb:.3f} ms"
            lines.append(
                f"| {r['shape']} {r['dtype']} | {r['mode']} | {r['seqs']} | {h['observed']} | {h['device_nodes']} | "
                f"{h['cuda_kernel_nodes']} | {'-' if share is None else f'{share:.1%}'} | {split} |"
            )
        lines.append("")
    lines += ["## Targets", "", "| target | model | measured | target | result |", "|---|---|---:|---:|---|"]
    for t in res.get("targets", []):
        m = "-" if t["measured"] is None else f"{t['measured']:.2f} {t['unit']}".strip()
        lines.append(f"| {t['target']} | {t['model']} | {m} | {t['op']} {t['limit']:g} {t['unit']} | {t['result']} |")
    lines += [
        "",
        (
            "`fastest exact ablation` = the faster of hook_ablation and lora_ablation (both exact directional "
            "ablation for pre-norm models); `ablated pyrefusal vs paper stack` compares that rate with the paper's "
            "stack at the same number of sequences; the `1 seq` / `64 seq` targets use the smallest / largest batch "
            "measured."
        ),
        "",
        "## End-to-end estimate of the paper's protocol (one GPU)",
        "",
        (
            f"Counts from docs/method.md §10 (5 positions x n_layer candidates, 32 val prompts, 14 languages x "
            f"{N_TEST} prompts x 2 reported conditions), prompt tokens at the benchmark's prompt length, rates "
            f"measured above at the largest batch. `measured lengths` = mean completion lengths "
            f"{s['len_baseline']:g} (baseline) and "
            f"{s['len_ablated']:g} (ablated) tokens (the paper's content lengths, docs/method.md §10); `max 512` = "
            "every completion runs to 512 tokens, as HF generate does in batches. Generation rates were measured on "
            "short contexts, so long completions will be somewhat slower. Judging (WildGuard-7B, one ~1k-token call "
            "per completion) and back-translation are not in the total; a rough judge time at the plain rates is "
            "listed."
        ),
        "",
    ]
    for est in res.get("e2e", []):
        lines += [f"### {est['model']} ({est['seqs']} parallel sequences)", "", "| step | tokens | tok/s | min |"]
        lines.append("|---|---:|---:|---:|")
        for st in est["steps"]:
            lines.append(f"| {st['step']} | {st['tokens']:,.0f} | {st['tok_s']:.0f} | {st['s'] / 60:.2f} |")
        for name, var in est["variants"].items():
            lines.append(
                f"| generation ({name}): {var['baseline_tokens']:,.0f} baseline + {var['ablated_tokens']:,.0f} "
                f"ablated tokens | {var['baseline_tokens'] + var['ablated_tokens']:,.0f} | | "
                f"{var['generation_s'] / 60:.1f} |"
            )
        for name, var in est["variants"].items():
            lines.append(f"| **total ({name})** | | | **{var['total_min']:.1f}** |")
        lines.append(f"| judge, rough (not in total) | | | {est['judge_s_rough'] / 60:.1f} |")
        if est.get("paper_stack_min") is not None:
            lines.append(
                f"| paper stack, same counts, every completion 512 tokens | | | {est['paper_stack_min']:.1f} |"
            )
        lines.append("")
    mem = res.get("memory")
    lines += ["## Peak GPU memory of the pipeline", ""]
    if mem:
        lines.append(
            f"{mem['model']}: pipeline defaults (n_ctx {PIPELINE_N_CTX}, {PIPELINE_N_SEQ} sequences, n_batch 2048), "
            "capture + ablated scoring + harm_ablation generation in a child process."
        )
        lines.append("")
        lines.append("| measure | MiB |")
        lines.append("|---|---:|")
        for k in ("peak_process_mib", "peak_used_minus_baseline_mib", "peak_used_mib", "device_buffers_mib"):
            if mem.get(k) is not None:
                lines.append(f"| {k} | {mem[k]:.0f} |")
        for k, val in sorted((mem.get("buffers_mib") or {}).items()):
            lines.append(f"| llama.cpp {k} buffer | {val:.1f} |")
        if mem.get("error"):
            lines.append(f"\nError: {mem['error']}")
    else:
        lines.append("not measured in this run")
    lines += ["", "## Modes", ""]
    lines += [f"- `{k}`: {d}" for k, d in MODE_DOC.items()]
    notes = res.get("notes", [])
    errors = [f"{'/'.join(map(str, _key(r)))}: {r['error']}" for r in rows if "error" in r]
    if notes or errors:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in [*notes, *errors]]
    lines += ["", "## Commands", ""]
    lines += [f"- `{c}`" for c in res.get("commands", [])]
    lines.append("")
    return "\n".join(lines)


def save(res: dict[str, Any], stem: Path, args: argparse.Namespace) -> None:
    evaluate(res, args)
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(res, indent=1))
    Path(f"{stem}.md").write_text(render_md(res))


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-7b,llama-3.1-8b", help="comma-separated shapes of make_random_gguf")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink the shapes (CPU tests)")
    ap.add_argument("--dtype", default="q4_k_m,f16", help="comma-separated: q4_k_m, f16")
    ap.add_argument("--model-dir", type=Path, default=Path("build/random-gguf"), help="random GGUFs (made if missing)")
    ap.add_argument(
        "--direct-quant",
        action="store_true",
        help="write missing Q4_K_M models directly as random blocks (seconds) instead of F16 + llama.cpp's quantizer",
    )
    ap.add_argument("--seqs", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-paper", action="store_true", help="skip the paper-stack rows")
    ap.add_argument("--paper-python", default=sys.executable, help="interpreter with torch + transformers")
    ap.add_argument("--paper-pythonpath", default="", help="extra PYTHONPATH for the paper stack (e.g. a torch dir)")
    ap.add_argument("--paper-device", default="auto")
    ap.add_argument("--no-memory", action="store_true", help="skip the pipeline memory probe")
    ap.add_argument(
        "--memory-shape", default=None, help="shape of the memory probe, Q4_K_M (default: llama-3.1-8b if benchmarked)"
    )
    ap.add_argument("--len-baseline", type=float, default=150.0, help="mean baseline completion length (e2e)")
    ap.add_argument("--len-ablated", type=float, default=420.0, help="mean ablated completion length (e2e)")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--tag", default=None, help="file-name tag (default: the GPU's name, or cpu-smoke)")
    ap.add_argument(
        "--append",
        action="store_true",
        help="merge into the existing result file of the same name and measure only what it lacks",
    )
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp CPU threads (default: all cores)")
    ap.add_argument("--deadline-s", type=float, default=0.0, help="start nothing after this many seconds (0 = none)")
    ap.add_argument("--memory-probe", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_probe:
        memory_probe_child(args.memory_probe, PIPELINE_N_CTX, PIPELINE_N_SEQ, args.prompt_len, args.gen, args.threads)
        return

    t_start = time.perf_counter()

    def left() -> float:
        """Seconds left before --deadline-s (a day without one: subprocess timeouts need a number)."""
        return args.deadline_s - (time.perf_counter() - t_start) if args.deadline_s else 86400.0

    shapes = [mrg.get_shape(s, args.scale) for s in args.shape.split(",")]
    dtypes = args.dtype.split(",")
    seqs = [int(s) for s in args.seqs.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown or "plain" not in modes:
        raise SystemExit(f"--modes must include plain and be among {MODES}; got {modes}")
    gpu = gpu_info()
    bi = build_info()
    tag = args.tag or (re.sub(r"[^A-Za-z0-9]+", "-", gpu["name"]).strip("-") if gpu else "cpu-smoke")
    stem = args.results / f"{tag}-{dt.date.today().isoformat()}"
    command = "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res: dict[str, Any] = {"rows": [], "notes": [], "commands": [], "models": {}, "paper": {}}
    if args.append and Path(f"{stem}.json").is_file():
        res = json.loads(Path(f"{stem}.json").read_text())
    res.update(
        {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "gpu": gpu,
            "machine": {
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
            },
            "versions": {
                **res.get("versions", {}),
                **{k: bi[k] for k in ("llama_cpp_python", "ggml_version", "ggml_commit", "gpu_offload")},
                "cuda_kernel": bi["cuda_kernel"],
                "system_info": bi["system_info"].strip(),
            },
            "settings": {
                "prompt_len": args.prompt_len,
                "gen": args.gen,
                "reps": args.reps,
                "len_baseline": args.len_baseline,
                "len_ablated": args.len_ablated,
            },
        }
    )
    res["commands"].append(command)
    note = res["notes"].append

    def add_row(row: dict[str, Any]) -> None:
        res["rows"] = [r for r in res["rows"] if _key(r) != _key(row)] + [row]

    log(f"results -> {stem}.json/.md; GPU: {gpu['name'] if gpu else 'none'}; CUDA kernel: {bi['cuda_kernel']}")

    def memory() -> None:
        """Peak GPU memory of the pipeline on the 8B Q4_K_M model (child process)."""
        measured = res.get("memory") and "error" not in res["memory"]
        if args.no_memory or (args.append and measured):
            return
        names = [s.name.split("@")[0] for s in shapes]
        mname = args.memory_shape or ("llama-3.1-8b" if "llama-3.1-8b" in names else names[-1])
        if left() < 60:
            note("memory probe skipped: time budget")
            return
        path = mrg.ensure_model(mrg.get_shape(mname, args.scale), "q4_k_m", args.model_dir, direct=args.direct_quant)
        res["memory"] = run_memory_probe(args, path, timeout=min(left(), 900))
        log(f"memory: {json.dumps({k: v for k, v in res['memory'].items() if k != 'buffers_mib'})}")
        save(res, stem, args)

    def paper(shape: Any) -> None:
        """The paper's stack on ``shape`` (separate process; our runtimes are closed by then)."""
        if args.no_paper or (args.append and shape.name in res["paper"]):
            return
        if left() < 60:
            note(f"paper row for {shape.name} skipped: time budget")
            return
        out, why = run_paper(args, shape, timeout=left())
        if out is None:
            note(why)
            log(why)
            return
        res["paper"][shape.name] = {k: v for k, v in out.items() if k != "rows"}
        res["versions"].update({"torch": out["torch"], "transformers": out["transformers"]})
        for r in out["rows"]:
            add_row({"shape": shape.name, "dtype": "bf16", "mode": "paper", **r})
        save(res, stem, args)

    def llama(shape: Any, dtype: str) -> None:
        """Every llama.cpp mode at every batch size on one model (what ``--append`` still lacks)."""
        done = lambda m, n: args.append and _find(res["rows"], shape.name, dtype, m, n)  # noqa: E731
        todo = {n: [m for m in modes if not done(m, n)] for n in seqs}
        todo = {n: (["plain"] + [m for m in ms if m != "plain"]) if ms else [] for n, ms in todo.items()}
        if not any(todo.values()):
            return
        if left() < 60:
            note(f"{shape.name} {dtype} skipped: time budget (--deadline-s {args.deadline_s:g})")
            return
        bench_model(args, res, shape, dtype, todo, left, add_row)
        save(res, stem, args)

    # Most important first, so that a run cut short by its time limit has the core comparison: our
    # rows and the paper's on the first shape, then the memory probe, the other shapes, other file types.
    first, rest = shapes[0], shapes[1:]
    steps: list[tuple[str, Callable[[], None]]] = [
        (f"{first.name} {dtypes[0]}", lambda: llama(first, dtypes[0])),
        (f"paper {first.name}", lambda: paper(first)),
        ("memory probe", memory),
    ]
    steps += [(f"{s.name} {dtypes[0]}", lambda s=s: llama(s, dtypes[0])) for s in rest]
    steps += [(f"paper {s.name}", lambda s=s: paper(s)) for s in rest]
    steps += [(f"{s.name} {d}", lambda s=s, d=d: llama(s, d)) for d in dtypes[1:] for s in shapes]
    for what, step in steps:
        log(f"[{time.perf_counter() - t_start:6.0f} s] {what}")
        step()
    save(res, stem, args)
    log(f"wrote {stem}.json and {stem}.md")
    for t in res["targets"]:
        m = "-" if t["measured"] is None else f"{t['measured']:.2f}{t['unit']}"
        log(f"  {t['result']:28s} {t['target']} [{t['model']}]: {m}")


if __name__ == "__main__":
    main()
