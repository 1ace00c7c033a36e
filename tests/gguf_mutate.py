"""Helpers for hostile-input tests: patch one metadata value of a GGUF in place, and load files in a subprocess.

A load that aborts inside llama.cpp (SIGABRT) would kill pytest; :func:`load_in_subprocess` runs the
loads in a child process that reports each file's outcome before the next, so a crash is an outcome
the test can assert on.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from pyrefusal.runtime.validate import SCALAR_FORMATS

_FMT = SCALAR_FORMATS


def value_offset(data: bytes, key: str) -> tuple[int, int]:
    """(offset of the value, GGUF value type) of scalar metadata ``key`` in the file bytes ``data``."""
    enc = key.encode()
    at = data.index(struct.pack("<Q", len(enc)) + enc)
    vpos = at + 8 + len(enc)
    (vtype,) = struct.unpack_from("<I", data, vpos)
    return vpos + 4, vtype


def patch_kv(src: Path, dst: Path, key: str, value: float) -> Path:
    """Copy ``src`` to ``dst`` with scalar metadata ``key`` set to ``value`` (same type, same size; the
    value's bits are written modulo the type's range, e.g. -1 in a UINT32 is 0xffffffff)."""
    data = bytearray(src.read_bytes())
    pos, vtype = value_offset(bytes(data), key)
    fmt = _FMT[vtype]
    if fmt in ("<f", "<d"):
        struct.pack_into(fmt, data, pos, float(value))
    else:
        bits = struct.calcsize(fmt) * 8
        struct.pack_into(fmt.upper() if fmt != "<?" else fmt, data, pos, int(value) % (1 << bits))
    dst.write_bytes(bytes(data))
    return dst


_WORKER = r"""
import json, sys
import llama_cpp  # noqa: F401
from pyrefusal.errors import PyrefusalError
from pyrefusal.runtime.runtime import Runtime
out = open(sys.argv[1], "a")
decode = sys.argv[2] == "1"
for path in sys.argv[3:]:
    out.write(json.dumps({"path": path, "start": True}) + "\n"); out.flush()
    try:
        with Runtime(path, n_ctx=64, n_batch=64, n_seq_max=1, n_threads=1, n_gpu_layers=0) as rt:
            if decode:  # a short greedy generation: some files load but abort in the first decode
                rt.generate([rt.chat_tokens("Hi")], 2)
        res = {"path": path, "outcome": "load"}
    except PyrefusalError as exc:
        res = {"path": path, "outcome": "clean", "type": type(exc).__name__, "message": str(exc)}
    except BaseException as exc:  # an unexpected exception type: a bug
        res = {"path": path, "outcome": "traceback", "type": type(exc).__name__, "message": str(exc)[:300]}
    out.write(json.dumps(res) + "\n"); out.flush()
"""


def load_in_subprocess(
    paths: list[Path], log: Path, *, decode: bool = True, timeout: float = 600
) -> dict[str, dict[str, str]]:
    """Open each model file with :class:`pyrefusal.runtime.runtime.Runtime` in child processes (and, with
    ``decode``, generate two tokens of a chat prompt).

    Returns:
        path -> ``{"outcome": "load" | "clean" | "traceback" | "crash", ...}``; "crash" (with the signal or
        exit code) when the child died while loading that file. The files after a crash are loaded by a new child.
    """
    results: dict[str, dict[str, str]] = {}
    todo = [str(p) for p in paths]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    while todo:
        log.unlink(missing_ok=True)
        proc = subprocess.run(
            [sys.executable, "-c", _WORKER, str(log), "1" if decode else "0", *todo],
            check=False,
            env=env,
            capture_output=True,
            timeout=timeout,
        )
        started = None
        for line in log.read_text().splitlines() if log.exists() else []:
            row = json.loads(line)
            if row.get("start"):
                started = row["path"]
            else:
                results[row["path"]] = row
                started = None
        if started is not None:  # died while loading this one
            results[started] = {"outcome": "crash", "returncode": str(proc.returncode)}
        elif proc.returncode != 0 and len(results) < len(paths):
            raise RuntimeError(f"loader died outside a load: {proc.returncode} {proc.stderr.decode()[-2000:]}")
        todo = [p for p in todo if p not in results]
    return results
