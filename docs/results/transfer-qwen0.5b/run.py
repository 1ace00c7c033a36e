"""Real-model cross-lingual transfer run (pyrefusal.studies.transfer.run_transfer)."""
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYREFUSAL_CACHE", "/work/cache/pyrefusal-cache")
sys.path.insert(0, "/work/main")
import llama_cpp  # noqa: F401  (before numpy)

from pyrefusal.studies.transfer import TransferConfig, run_transfer
from pyrefusal.data.registry import DEFAULT_MODEL

t0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


last = {}


def progress(stage: str, done: int, total: int) -> None:
    if done == total or done - last.get(stage, 0) >= max(1, total // 4):
        last[stage] = done
        log(f"  {stage}: {done}/{total}")


config = TransferConfig(
    model=DEFAULT_MODEL,
    data_dir="/work/shared/polyrefuse",
    sources=("en", "de", "zh", "ja"),
    targets=("en", "de", "zh", "ja", "ru"),
    n_train=32,
    n_val=6,
    n_test=16,
    max_new_tokens=32,
    n_threads=int(os.environ.get("N_THREADS", "1")),  # 1 thread: faster than 2 on a contended 2-core box
)
res = run_transfer(config, Path(sys.argv[1] if len(sys.argv) > 1 else "/work/scratch-xl/transfer-qwen0.5b"), log, progress)
log(f"done in {time.time() - t0:.1f}s")
