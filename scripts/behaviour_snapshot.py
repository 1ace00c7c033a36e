"""Record what pyrefusal's commands write, to check that a refactor changes no behaviour.

Runs the CLI (which is stable across versions) on the tiny random-weight model and, with ``--real``, on the
default model with small sizes, and re-renders every committed ``docs/results/*`` run with ``pyrefusal report``.
It writes ``manifest.json`` in OUT: for every output file its sha256, and for JSON files the content with the
wall-clock fields removed (timings, lock pids), so that two snapshots can be compared::

    python scripts/behaviour_snapshot.py /tmp/before            # before the change
    python scripts/behaviour_snapshot.py /tmp/after --compare /tmp/before/manifest.json

``--compare`` prints every file that differs and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "polyrefuse"
VOLATILE = {"timings", "timings_previous", "wall_s", "elapsed_s", "pid", "seconds", "seconds_total"}
# report.md rows that hold wall-clock seconds
TIMING_LINE = re.compile(r"^\| [a-z_]+ \| [\d.]+ \|$|^Total wall time ")
# Files whose bytes depend on the wall clock or the matplotlib build, not on pyrefusal's behaviour.
SKIP_SUFFIXES = (".png", ".log", ".lock")


def _strip(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _cli(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pyrefusal.cli", *args]
    print("$ pyrefusal", " ".join(args), flush=True)
    r = subprocess.run(cmd, check=False, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-4000:], sep="\n")
        raise SystemExit(f"command failed: {cmd}")


def _tiny_model(out: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.tiny_model import TinySpec, write_tiny_gguf

    path = out / "tiny.gguf"
    write_tiny_gguf(path, TinySpec(), seed=0)
    return path


def _runs(out: Path, real: bool) -> None:
    model = _tiny_model(out)
    data = str(SHARED)
    common = ["--data-dir", data, "--threads", "1"]
    _cli(
        "run", "--model", str(model), *common, "--target-langs", "en,de", "--n-train", "6", "--n-val", "4",
        "--n-test", "3", "--max-new-tokens", "6", "--kl-threshold", "1e9", "--n-seq", "8", "--refusal-openings", "I",
        "--conditions", "baseline,ablation,actadd,induce,harm_ablation,random_ablation", "--out", str(out / "run-tiny"),
    )  # fmt: skip
    _cli(
        "run", "--model", str(model), *common, "--target-langs", "en,ja", "--n-train", "6", "--n-val", "4",
        "--n-test", "2", "--max-new-tokens", "4", "--kl-threshold", "1e9", "--n-seq", "4", "--no-filter",
        "--prompt-format", "paper", "--direction-projection", "harmless", "--all-scores", "--no-capability",
        "--out", str(out / "run-tiny-paper"),
    )  # fmt: skip
    _cli(
        "transfer", "--model", str(model), *common, "--sources", "en,de", "--targets", "en,de", "--n-train", "6",
        "--n-val", "4", "--n-test", "2", "--max-new-tokens", "3", "--kl-threshold", "1e9",
        "--out", str(out / "transfer-tiny"),
    )  # fmt: skip
    _cli(
        "quant-sweep", "--model", str(model), "--types", "f32,q8_0,q4_0", "--data-dir", data, "--threads", "1",
        "--n-train", "4", "--n-val", "4", "--n-test", "3", "--max-new-tokens", "4", "--positions=-1",
        "--allow-requantize", "--work-dir", str(out / "qs-work"), "--out", str(out / "quant-sweep-tiny"),
    )  # fmt: skip
    if real:
        _cli(
            "run", "--target-langs", "en,zh", "--n-train", "8", "--n-val", "4", "--n-test", "3",
            "--max-new-tokens", "12", "--data-dir", data, "--out", str(out / "run-default"),
        )  # fmt: skip
    for run in sorted((ROOT / "docs" / "results").iterdir()):
        if (run / "results.json").exists() and (run / "selection.json").exists():
            copy = out / "report" / run.name
            shutil.copytree(run, copy)
            _cli("report", "--quiet", str(copy))


def _normalised(p: Path, origin: str) -> str:
    """A text file with the directory it was written in replaced by ``$OUT`` and timing rows dropped."""
    text = p.read_text(encoding="utf-8").replace(origin, "$OUT")
    return "\n".join(line for line in text.splitlines() if not TIMING_LINE.search(line))


def _manifest(out: Path, origin: str) -> dict[str, Any]:
    files: dict[str, Any] = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if not p.is_file() or p.name.endswith(SKIP_SUFFIXES) or rel.startswith("qs-work") or rel == "manifest.json":
            continue
        data = _normalised(p, origin).encode() if p.suffix in (".json", ".jsonl", ".md") else p.read_bytes()
        entry: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest()}
        if p.suffix == ".json":
            entry["content"] = _strip(json.loads(data, parse_constant=str))  # NaN as "NaN": comparable
        files[rel] = entry
    return files


def _compare(now: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """Files that differ; runs absent from ``now`` as a whole (``run-default`` without ``--real``) are skipped."""
    ran = {rel.split("/")[0] for rel in now}
    bad = []
    for rel in sorted(set(now) | {r for r in ref if r.split("/")[0] in ran}):
        a, b = now.get(rel), ref.get(rel)
        if a is None or b is None:
            bad.append(f"{rel}: {'missing now' if a is None else 'new'}")
        elif a["sha256"] != b["sha256"] and ("content" not in a or a["content"] != b.get("content")):
            bad.append(f"{rel}: differs")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--real", action="store_true", help="also run the default model (minutes)")
    ap.add_argument("--compare", type=Path, help="a manifest.json to compare with")
    ap.add_argument("--only-compare", action="store_true", help="do not run, compare OUT's files")
    ap.add_argument("--origin", help="the directory OUT's files were written in, if they were moved (default: OUT)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.only_compare:
        _runs(a.out, a.real)
    files = _manifest(a.out, a.origin or str(a.out))
    (a.out / "manifest.json").write_text(json.dumps(files, indent=1, ensure_ascii=False))
    print(f"{len(files)} files recorded in {a.out / 'manifest.json'}")
    if a.compare:
        bad = _compare(files, json.loads(a.compare.read_text()))
        print("\n".join(bad) if bad else "identical to the reference")
        raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
