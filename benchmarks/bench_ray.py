"""The same ``pyrefusal run`` twice, back to back: one process vs a local Ray instance with model replicas.

Issue 14 ("Measure"): on a CPU-only machine a sharded run cannot be faster than one process using the same
cores (the work is CPU-bound), so this measures what ``--ray`` costs and checks that it changes nothing:

- wall time per stage (``results.json`` ``timings``) of both runs and their ratio;
- Ray's own overhead, separately: the start of the local Ray instance (the time between the driver's model load
  and the replicas' ready message, less the replicas' load time Ray reports) and the replicas' model load;
- per-stage unit counts and throughput from the ``ray: ...`` log lines;
- a byte comparison of ``direction.npy``, ``selection.json``, ``completions.jsonl`` (and the other result files);
- the machine (cores) and the load average before/after each run (the cores may be shared with other work: the
  numbers then carry that noise, and the file says so).

Every log line of both runs is time-stamped as it arrives. Writes ``results/<machine>-ray-<date>.{json,md}``.

    python benchmarks/bench_ray.py                       # default model, sizes below (~2 x 3 min on 2 cores)
    python benchmarks/bench_ray.py --n-test 4 --max-new-tokens 16   # shorter
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

COMPARED = (
    "direction.npy",
    "selection.json",
    "completions.jsonl",
    "candidates.npz",
    "prompts.json",
    "metrics.json",
)
"""Run-directory files compared byte for byte (the first three are the issue's)."""

STAGES = ("load_model", "capture_train", "selection", "generation", "metrics", "total")


def _versions() -> dict[str, str]:
    """Versions of the pieces the numbers depend on."""
    out: dict[str, str] = {"python": platform.python_version()}
    for name in ("ray", "llama_cpp", "numpy"):
        try:
            mod = __import__(name)
            out[name] = str(getattr(mod, "__version__", "?"))
        except ImportError:
            out[name] = "not installed"
    try:
        kw: dict[str, Any] = {"cwd": ROOT, "capture_output": True, "text": True}
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, **kw)
        dirty = subprocess.run(["git", "status", "--porcelain", "pyrefusal"], check=False, **kw)
        out["pyrefusal"] = rev.stdout.strip() + (" (pyrefusal/ modified)" if dirty.stdout.strip() else "")
    except OSError:
        out["pyrefusal"] = "?"
    return out


def _run(cmd: list[str], log_path: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run ``cmd`` (stdout and stderr together), time-stamping each line as it arrives; returns the wall time
    and the ``(seconds since start, line)`` pairs. A failing command stops the benchmark with its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as p:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
    wall = time.perf_counter() - t0
    log_path.write_text("".join(f"{t:8.2f}  {s}\n" for t, s in lines))
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n" + "\n".join(s for _, s in lines[-30:]))
    return wall, lines


def _ray_overhead(lines: list[tuple[float, str]], driver_load_s: float) -> dict[str, Any]:
    """Ray's start-up and the replicas' load time, and the per-stage ``ray: <stage>: N units ...`` lines.

    The driver logs ``model: <path>`` when it has resolved the model, then loads it (``driver_load_s``, the
    ``load_model`` timing), then starts the replicas and logs ``ray: N model replica(s) ... loaded in Xs``
    (X: from the actors' creation until every replica answered). Ray's start-up is what remains between the
    two lines: import ray, ``ray.init`` of a local instance.
    """
    out: dict[str, Any] = {"stages": {}}
    ready = [(t, s) for t, s in lines if re.search(r"ray: \d+ model replica", s)]
    if ready:
        t_ready, s_ready = ready[0]
        m = re.search(r"loaded in ([\d.]+)s", s_ready)
        load = float(m.group(1)) if m else float("nan")
        model = [t for t, s in lines if t < t_ready and s.startswith("model: ")]
        t_model = model[-1] if model else 0.0
        out["replicas_line"] = s_ready.strip()
        out["replica_load_s"] = load
        out["ray_start_s"] = round(t_ready - t_model - driver_load_s - load, 2)
        out["ray_start_note"] = (
            "time from the driver's `model:` line to the replicas' message, less the driver's model load "
            "(load_model) and the replicas' load time: import ray + ray.init of a local instance"
        )
    for _, s in lines:
        m = re.search(r"ray: (.+?): (\d+) units on (\d+) replica\(s\) in ([\d.]+)s, (\d+) tokens/s", s)
        if m:
            out["stages"].setdefault(m.group(1), []).append(
                {
                    "units": int(m.group(2)),
                    "replicas": int(m.group(3)),
                    "s": float(m.group(4)),
                    "tok_s": int(m.group(5)),
                }
            )
    out["reruns"] = sum("worker died" in s for _, s in lines)
    return out


def _sha(p: Path) -> str | None:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None


def _compare(a: Path, b: Path) -> dict[str, Any]:
    """Byte comparison of the result files; for differing JSONL files, how many lines differ."""
    out: dict[str, Any] = {}
    for name in COMPARED:
        ha, hb = _sha(a / name), _sha(b / name)
        row: dict[str, Any] = {"single": ha, "ray": hb, "identical": ha is not None and ha == hb}
        if name.endswith(".jsonl") and ha and hb and ha != hb:
            la = (a / name).read_text().splitlines()
            lb = (b / name).read_text().splitlines()
            row["lines"] = [len(la), len(lb)]
            row["differing_lines"] = sum(x != y for x, y in zip(la, lb, strict=False)) + abs(len(la) - len(lb))
        out[name] = row
    return out


def _md(rec: dict[str, Any]) -> str:
    """The markdown table of one benchmark record."""
    s, r = rec["single"], rec["ray"]
    ov = r["ray_overhead"]
    lines = [
        f"# Ray executor vs one process: {rec['model']} ({rec['machine']['cores']} CPU cores)",
        "",
        f"{rec['date']}, {rec['machine']['cores']} CPU cores ({rec['machine']['cpu']}), "
        f"{rec['machine']['platform']}; versions: " + ", ".join(f"{k} {v}" for k, v in rec["versions"].items()) + ".",
        "",
        (
            f"Sizes: `{' '.join(rec['run_args'])}`. Single process: `--threads {rec['threads_single']}`; Ray: "
            f"`--ray --ray-workers {rec['ray_workers']} --threads {rec['threads_ray']}` (a local Ray instance, "
            f"{rec['ray_workers']} replicas x {rec['threads_ray']} thread; the driver also loads the model for its "
            "own stages). One measurement each, back to back, single first."
        ),
        "",
        "**Shared machine.** "
        + rec["machine"]["note"]
        + f" Load average (1/5/15 min) before the single run {s['load_before']}, after it {s['load_after']}; "
        f"after the Ray run {r['load_after']}.",
        "",
    ]
    x = rec.get("single_extra")
    if x is None:
        lines += ["| stage | single (s) | ray (s) | ray / single |", "|---|---:|---:|---:|"]
    else:
        lines[-2] += (
            f" Then a third run, one process with `--threads {x['threads']}` (as each replica), load average "
            f"before {x['load_before']}, after {x['load_after']}."
        )
        lines += [
            (
                f"| stage | single, {rec['threads_single']} threads (s) | ray (s) | ray / single | single, "
                f"{x['threads']} thread(s) (s) | ray / single {x['threads']} |"
            ),
            "|---|---:|---:|---:|---:|---:|",
        ]

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    def ratio(num: float | None, den: float | None) -> str:
        return f"{num / den:.2f}" if num and den else "-"

    rows = [(k, s["timings"].get(k), r["timings"].get(k), x["timings"].get(k) if x else None) for k in STAGES]
    rows.append(("wall (process)", s["wall_s"], r["wall_s"], x["wall_s"] if x else None))
    for k, a, b, c in rows:
        if a is None and b is None:
            continue
        row = f"| {k} | {cell(a)} | {cell(b)} | {ratio(b, a)} |"
        if x is not None:
            row += f" {cell(c)} | {ratio(b, c)} |"
        lines.append(row)
    lines += [
        "",
        (
            f"Ray's own cost (inside `total`, before extraction): start-up {ov.get('ray_start_s')} s "
            f"(import ray, `ray.init` of a local instance), replica start and model load (in parallel) "
            f"{ov.get('replica_load_s')} s (`{ov.get('replicas_line', '')}`). Workers died and reran: "
            f"{ov['reruns']}."
        ),
        "",
        "| stage (ray log) | units | replicas | s | tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage, rows in ov["stages"].items():
        for row in rows:
            lines.append(f"| {stage} | {row['units']} | {row['replicas']} | {row['s']:.1f} | {row['tok_s']} |")
    lines += ["", "Byte comparison of the run directories (single against ray):", ""]
    if "compare_extra" in rec:
        same = all(row["identical"] for row in rec["compare_extra"].values())
        lines.append(
            f"The third run (`--threads {x['threads'] if x else '?'}`) against the first: "
            + ("all files identical." if same else "DIFFERENT: " + json.dumps(rec["compare_extra"]))
        )
        lines.append("")
    lines += ["| file | identical | note |", "|---|---|---|"]
    for name, row in rec["compare"].items():
        note = ""
        if "differing_lines" in row:
            note = f"{row['differing_lines']} of {row['lines'][0]} lines differ"
        elif not row["identical"]:
            note = f"sha256 {str(row['single'])[:12]} vs {str(row['ray'])[:12]}"
        lines.append(f"| `{name}` | {'yes' if row['identical'] else 'NO'} | {note} |")
    lines += ["", f"Command: `{rec['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct-q4_k_m")
    ap.add_argument("--target-langs", default="en,de")
    ap.add_argument("--n-train", type=int, default=16)
    ap.add_argument("--n-val", type=int, default=8)
    ap.add_argument("--n-test", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--n-seq", type=int, default=8, help="sequences per decode group = prompts per unit")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="single-process threads")
    ap.add_argument("--ray-workers", type=int, default=2)
    ap.add_argument("--ray-threads", type=int, default=1, help="threads per replica (and the driver)")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench-ray")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--machine", default=f"cpu{os.cpu_count()}")
    ap.add_argument(
        "--note",
        default="The cores are shared with other engineers' work (tests, builds) during the measurement.",
        help="what else ran on the machine",
    )
    ap.add_argument("--reprocess", type=Path, help="a results JSON: rebuild its summary from the logs in --work")
    ap.add_argument(
        "--add-single-threads", type=int, help="with --reprocess: add a third run, one process with N threads"
    )
    args = ap.parse_args()
    if args.reprocess and args.add_single_threads:
        add_single(args.reprocess, args.work, args.add_single_threads)
        return
    if args.reprocess:
        reprocess(args.reprocess, args.work)
        return

    exe = shutil.which("pyrefusal") or sys.exit("the pyrefusal command is not on PATH (pip install -e .)")
    run_args = [
        "--model", args.model, "--target-langs", args.target_langs, "--n-train", str(args.n_train),
        "--n-val", str(args.n_val), "--n-test", str(args.n_test), "--max-new-tokens", str(args.max_new_tokens),
        "--n-seq", str(args.n_seq), "--no-capability",
    ]  # fmt: skip
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    record: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": args.model,
        "machine": {
            "name": args.machine,
            "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "platform": platform.platform(),
            "note": args.note,
        },
        "versions": _versions(),
        "run_args": run_args,
        "threads_single": args.threads,
        "ray_workers": args.ray_workers,
        "threads_ray": args.ray_threads,
        "command": " ".join(["python", "benchmarks/bench_ray.py", *sys.argv[1:]]),
    }
    variants = {
        "single": ["--threads", str(args.threads)],
        "ray": ["--threads", str(args.ray_threads), "--ray", "--ray-workers", str(args.ray_workers)],
    }
    for name, extra in variants.items():
        out = args.work / name
        cmd = [exe, "run", *run_args, *extra, "--out", str(out)]
        load_before = [round(x, 2) for x in os.getloadavg()]
        print(f"[{name}] {' '.join(cmd)}  (load {load_before})", flush=True)
        wall, lines = _run(cmd, args.work / f"{name}.log")
        res = json.loads((out / "results.json").read_text())
        rec: dict[str, Any] = {
            "wall_s": round(wall, 2),
            "timings": {k: round(v, 2) for k, v in res.get("timings", {}).items()},
            "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "cmd": cmd,
        }
        if name == "ray":
            rec["ray_overhead"] = _ray_overhead(lines, rec["timings"].get("load_model", 0.0))
        record[name] = rec
        print(f"[{name}] {wall:.1f}s, timings {rec['timings']}", flush=True)
    _finish(record, args.work, args.results)


def _finish(record: dict[str, Any], work: Path, results: Path) -> None:
    """Ratio and byte comparison; write ``<machine>-ray-<date>.{json,md}`` under ``results``."""
    record["ratio_total"] = round(record["ray"]["timings"]["total"] / record["single"]["timings"]["total"], 3)
    record["compare"] = _compare(work / "single", work / "ray")
    if "single_extra" in record:
        record["compare_extra"] = _compare(work / "single", work / record["single_extra"]["dir"])
    results.mkdir(parents=True, exist_ok=True)
    stem = f"{record['machine']['name']}-ray-{record['date'][:10]}"
    (results / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    md = _md(record)
    (results / f"{stem}.md").write_text(md)
    print(md)


def _read_log(path: Path) -> list[tuple[float, str]]:
    """The ``(seconds, line)`` pairs of a log :func:`_run` wrote."""
    out: list[tuple[float, str]] = []
    for line in path.read_text().splitlines():
        head, _, text = line.lstrip().partition("  ")
        try:
            out.append((float(head), text))
        except ValueError:  # a continuation of a multi-line message
            out.append((out[-1][0] if out else 0.0, line))
    return out


def _measure(cmd: list[str], log: Path, out: Path) -> dict[str, Any]:
    """One timed run: wall time, ``results.json`` timings, load averages before and after."""
    load_before = [round(x, 2) for x in os.getloadavg()]
    print(f"{' '.join(cmd)}  (load {load_before})", flush=True)
    wall, lines = _run(cmd, log)
    res = json.loads((out / "results.json").read_text())
    rec = {
        "wall_s": round(wall, 2),
        "timings": {k: round(v, 2) for k, v in res.get("timings", {}).items()},
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "cmd": cmd,
        "lines": lines,
    }
    print(f"{wall:.1f}s, timings {rec['timings']}", flush=True)
    return rec


def add_single(record_path: Path, work: Path, threads: int) -> None:
    """Add a third run to a finished benchmark (``--reprocess JSON --add-single-threads N``): one process with
    ``N`` threads, the same settings, after the other two (e.g. N = the replicas' thread count, to separate
    what Ray changes from what the thread count changes on a shared machine)."""
    record = json.loads(record_path.read_text())
    exe = shutil.which("pyrefusal") or sys.exit("the pyrefusal command is not on PATH (pip install -e .)")
    name = f"single-t{threads}"
    out = work / name
    if out.exists():
        shutil.rmtree(out)
    cmd = [exe, "run", *record["run_args"], "--threads", str(threads), "--out", str(out)]
    rec = _measure(cmd, work / f"{name}.log", out)
    rec.pop("lines")
    record["single_extra"] = {**rec, "threads": threads, "dir": name}
    record["command"] += (
        f"; then python benchmarks/bench_ray.py --reprocess {record_path} --add-single-threads {threads}"
    )
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    reprocess(record_path, work)


def reprocess(record_path: Path, work: Path) -> None:
    """Rebuild the summary of a finished benchmark from its logs and run directories (``--reprocess``): the
    measured numbers (wall times, timings, load averages) are kept, the derived ones are computed again."""
    record = json.loads(record_path.read_text())
    ray = record["ray"]
    ray["ray_overhead"] = _ray_overhead(_read_log(work / "ray.log"), ray["timings"].get("load_model", 0.0))
    _finish(record, work, record_path.parent)


if __name__ == "__main__":
    main()
