"""The run-directory lock (:class:`pyrefusal.rundir.RunLock`) and atomic writes under concurrency and failure.

The lock must be atomic: several processes racing for the same directory never hold it at the same
time. Each holder appends its pid to a shared log on entry and exit; overlapping intervals in that
log would be two holders at once.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from pyrefusal.errors import PyrefusalError
from pyrefusal.rundir import RunLock, write_atomic


def _contend(out: str, log: str, rounds: int) -> int:
    """Try ``rounds`` times to take the lock; while held, record entry/exit in ``log``. Returns the number held."""
    held = 0
    for _ in range(rounds):
        try:
            with RunLock(Path(out)):
                with open(log, "a") as f:
                    f.write(f"in {os.getpid()}\n")
                time.sleep(0.001)
                with open(log, "a") as f:
                    f.write(f"out {os.getpid()}\n")
                held += 1
        except PyrefusalError:
            pass
    return held


def test_lock_never_held_twice(tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "log"
    out.mkdir()
    ctx = mp.get_context("fork")
    with ctx.Pool(4) as pool:
        held = pool.starmap(_contend, [(str(out), str(log), 50)] * 4)
    lines = log.read_text().splitlines()
    assert sum(held) == len(lines) // 2 > 0
    depth = 0
    for line in lines:  # the log must read in, out, in, out, ... with the same pid in each pair
        depth += 1 if line.startswith("in ") else -1
        assert depth in (0, 1), "two processes held the lock at once"
    pairs = list(zip(lines[::2], lines[1::2], strict=True))
    assert all(a.split()[1] == b.split()[1] and a.startswith("in") for a, b in pairs)
    assert not (out / ".lock").exists()


def _hold_forever(out: str, ready: str) -> None:
    with RunLock(Path(out)):
        Path(ready).write_text("1")
        time.sleep(60)


def test_live_holder_refused_and_killed_holder_taken_over(tmp_path: Path) -> None:
    out, ready = tmp_path / "run", tmp_path / "ready"
    proc = mp.get_context("fork").Process(target=_hold_forever, args=(str(out), str(ready)))
    proc.start()
    try:
        for _ in range(500):
            if ready.exists():
                break
            time.sleep(0.01)
        assert (out / ".lock").read_text() == str(proc.pid)
        with pytest.raises(PyrefusalError, match=f"in use by another pyrefusal process \\(pid {proc.pid}\\)"):
            RunLock(out).__enter__()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    assert (out / ".lock").exists()  # left behind by the killed holder: stale, taken over
    with RunLock(out):
        assert (out / ".lock").read_text() == str(os.getpid())
    assert not (out / ".lock").exists()


def test_legacy_pid_lock_and_reentry(tmp_path: Path) -> None:
    (tmp_path / ".lock").write_text("1")  # an older pyrefusal's pid-only lock by a live process
    with pytest.raises(PyrefusalError, match="pid 1"):
        RunLock(tmp_path).__enter__()
    (tmp_path / ".lock").write_text("")  # empty: stale
    with RunLock(tmp_path), RunLock(tmp_path):  # re-entrant in one process
        assert (tmp_path / ".lock").exists()
    assert not (tmp_path / ".lock").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PyrefusalError, match=f"cannot write {ro / 'x.json'}.*writable"):
            write_atomic(ro / "x.json", "{}")
        with pytest.raises(PyrefusalError, match="writable --out"):
            RunLock(ro / "sub").__enter__()
    finally:
        ro.chmod(0o700)
    assert os.listdir(ro) == []


def test_write_atomic_cleans_its_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "prompts.json"
    target.write_text("old")

    def full(*_: object, **__: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(PyrefusalError, match=r"cannot write .*prompts.json \(No space left on device\); free space"):
        write_atomic(target, "new")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["prompts.json"]


def test_cli_reports_a_full_disk(tiny_model, tmp_path, monkeypatch) -> None:
    """An OSError of a full disk inside a study is a clean error naming the path (exit 2, no traceback)."""
    from click.testing import CliRunner

    from pyrefusal import cli

    def full(config, out, **_):
        raise OSError(28, "No space left on device", str(out / "candidates.npz"))

    monkeypatch.setattr("pyrefusal.studies.run.run_pipeline", full)
    r = CliRunner().invoke(cli.main, ["run", "--model", str(tiny_model[0]), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert f"cannot write {tmp_path / 'o' / 'candidates.npz'} (No space left on device); free space" in r.output
