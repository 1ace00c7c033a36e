"""Run directories: the saved configuration that makes a resumed run safe, and keyed caches.

A stage that writes into an output directory saves its configuration there as ``config.json``. A
later call in the same directory resumes only if every setting outside ``resumable`` is unchanged;
otherwise it is refused rather than mixing results of two configurations.

:class:`JsonlCache` is the append-only file behind the judge's verdicts and the back-translations:
what was computed is on disk as soon as a batch finishes, and an interrupted write costs one line.
Imports nothing else from the package but the errors.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from pyrefusal.errors import PyrefusalError


def check_config(
    out: Path,
    config: Mapping[str, Any],
    *,
    what: str,
    force: bool,
    resumable: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
    options: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Refuse to resume ``out`` under different settings; return ``config`` as JSON values.

    Args:
        out: the output directory (its ``config.json`` is compared).
        config: the new configuration (JSON-able).
        what: name of the job for the message ("transfer run", "sweep").
        force: skip the comparison (the caller clears its outputs).
        resumable: keys that may change between calls (runtime settings, added targets).
        defaults: values of settings added after a saved config was written (a key missing from the
            saved config is taken to have had its default, so older runs still resume).
        options: ``{key: "--option"}`` where the CLI option that sets a key is not ``--`` + the key with
            dashes (:meth:`pyrefusal.settings.Settings.option_names`); the message names them.

    Raises:
        PyrefusalError: a setting outside ``resumable`` differs from the saved one.
    """
    new = json.loads(json.dumps(dict(config)))
    path = out / "config.json"
    if path.exists() and not force:
        old = json.loads(path.read_text())
        known = json.loads(json.dumps(dict(defaults or {})))
        diff = {
            k: (old.get(k, known.get(k)), v)
            for k, v in new.items()
            if k not in resumable and old.get(k, known.get(k)) != v
        }
        if diff:
            shown = "; ".join(
                f"{_option(k, options or {})}: {old_v!r} there, {new_v!r} now" for k, (old_v, new_v) in diff.items()
            )
            raise PyrefusalError(
                f"{out} holds a {what} with other settings ({shown}). To resume it, re-run with the settings "
                f"it was started with (all in {path}, e.g. the same --preset); to keep it and try the new "
                "settings, use another output directory; --force deletes its results and starts over."
            )
    return new


def _option(key: str, options: Mapping[str, str]) -> str:
    """How a user sets config field ``key``: ``"--n-test (n_test)"``, ``"--n-seq (n_seq_max)"``."""
    return f"{options.get(key, '--' + key.replace('_', '-'))} ({key})"


def write_config(out: Path, config: Mapping[str, Any]) -> None:
    """Save ``config`` as ``out/config.json`` (creating ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.json", json.dumps(dict(config), indent=1))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so that an interrupted
    write leaves the old file (or none), never a truncated one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # never leave a temporary behind
        raise storage_error(path, exc) from None
    except BaseException:  # interrupted (Ctrl-C): the old file stays, the temporary goes
        tmp.unlink(missing_ok=True)
        raise


def storage_error(path: Path, exc: OSError) -> PyrefusalError:
    """A :class:`PyrefusalError` for a failed write of ``path`` that says which path and what to do."""
    why = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        fix = "free space on that disk (what was computed before is kept; re-run the same command to resume)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make that directory writable or choose another --out (re-running resumes from what is saved)"
    else:
        fix = "check the disk and that directory, then re-run the same command to resume"
    return PyrefusalError(f"cannot write {path} ({why}); {fix}")


def read_records(path: Path, *, what: str) -> list[tuple[int, Any]]:
    """The JSON records of a JSONL file as ``(line number, value)``, in file order.

    A last line cut by an interrupted write (not valid JSON, or valid but without its newline) is
    repaired in the file: removed if unreadable, terminated if complete, so that later appends start
    on a line of their own. An unreadable line anywhere else is an error that says how to recover.
    """
    if not path.is_file():
        return []
    raw = path.read_text(encoding="utf-8")
    lines = raw.splitlines()
    out: list[tuple[int, Any]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            if n == len(lines):  # cut by an interrupted write: drop it (that entry is made again)
                path.write_text("".join(x + "\n" for x in lines[:-1]), encoding="utf-8")
                return out
            raise PyrefusalError(
                f"{path}: line {n} is not a {what} record ({exc}); remove that line (or delete the file to rebuild it)"
            ) from None
    if raw and not raw.endswith("\n"):  # complete last record cut before its newline
        with path.open("a", encoding="utf-8") as f:
            f.write("\n")
    return out


class RunLock:
    """An exclusive lock on an output directory, so that two processes never write into the same files.

    Acquisition is atomic: the lock is an OS advisory lock (``fcntl.flock``) on ``.lock``, which the
    kernel grants to one open file at a time and drops when its owner exits, however it exits; the
    file also holds the owner's pid for the error message. A ``.lock`` left behind by a process that
    was killed is therefore free and is taken over. A ``.lock`` that names a live process but is not
    flock-held (written by an earlier pyrefusal, which only wrote the pid) is still refused. Within
    one process the lock is re-entrant (a nested ``with RunLock(out)`` is a no-op).

    POSIX only (Linux, macOS): Windows is not a target of pyrefusal.

    Raises:
        PyrefusalError: another live process holds the directory, or it cannot be locked.
    """

    _held: ClassVar[dict[str, int]] = {}  # resolved lock path -> nesting depth in this process

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / ".lock"
        self._fd: int | None = None

    def _key(self) -> str:
        return str(self.path.resolve())

    def __enter__(self) -> RunLock:  # noqa: PYI034  (Self needs Python 3.11)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PyrefusalError(
                f"cannot create the output directory {self.path.parent} ({exc.strerror or exc}); "
                "choose a writable --out"
            ) from None
        key = self._key()
        if key in RunLock._held:
            RunLock._held[key] += 1
            return self
        for _ in range(50):  # each retry follows a holder that removed the file between our open and lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as exc:
                raise PyrefusalError(
                    f"cannot create {self.path} ({exc.strerror or exc}); choose a writable --out"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise PyrefusalError(
                    f"{self.path.parent} is in use by another pyrefusal process (pid {pid or 'unknown'}); wait "
                    "for it to finish or use another output directory"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder unlinked this file on release: lock the current one
                os.close(fd)
                continue
            pid = _read_pid(fd)
            if pid and pid != os.getpid() and _alive(pid):  # an older pyrefusal's pid-only lock
                os.close(fd)
                raise PyrefusalError(
                    f"{self.path.parent} is in use by another pyrefusal process (pid {pid}); wait for it "
                    f"to finish or use another output directory (delete {self.path} if that process is gone)"
                )
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._fd = fd
            RunLock._held[key] = 1
            return self
        raise PyrefusalError(f"could not lock {self.path.parent}; delete {self.path} and retry")

    def __exit__(self, *exc: object) -> None:
        key = self._key()
        if self._fd is None:  # a nested use
            if key in RunLock._held:
                RunLock._held[key] -= 1
            return
        del RunLock._held[key]
        # unlink while still holding the lock, so that a waiter that opened this file sees it is gone
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(fd: int) -> int:
    """The pid written in an open lock file (0 when empty or unreadable)."""
    try:
        return int(os.pread(fd, 32, 0).decode("ascii", "replace").strip() or 0)
    except (OSError, ValueError):
        return 0


def previous_timings(path: Path) -> list[dict[str, Any]]:
    """Timings of the earlier invocations recorded in an existing results file (oldest first).

    A run's results file holds ``timings`` (this invocation) and ``timings_previous`` (the earlier
    ones); a resumed run appends its predecessor's, so what the earlier stages cost is never lost.
    """
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    return [*old.get("timings_previous", []), *([old["timings"]] if old.get("timings") else [])]


def digest(*parts: Any) -> str:
    """sha256 (hex) of the JSON list of ``parts``: a cache key that changes with any part."""
    payload = json.dumps(list(parts), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JsonlCache:
    """Values keyed by a digest, kept in memory and appended to a JSONL file as they are made.

    Each line is ``{"v": version, "key": ..., <extra fields>, <field>: value}``. The file is read at
    construction. A last line cut by an interrupted write is removed from the file (that entry is
    computed again); any other unreadable line is an error that says how to rebuild.

    Args:
        path: The JSONL file (``None`` = memory only).
        field: Name of the value's field in each line (``"verdict"``, ``"english"``).
        version: Written into every line.
        what: Name of the cache in error messages ("judge-cache", "back-translation").

    Raises:
        PyrefusalError: A line other than the last is not a record of this cache.
    """

    def __init__(self, path: Path | str | None, *, field: str, version: int = 1, what: str = "cache") -> None:
        self.path = Path(path) if path is not None else None
        self.field, self.version, self.what = field, version, what
        self._values: dict[str, Any] = {}
        if self.path is not None and self.path.is_file():
            self._load(self.path)

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def _load(self, path: Path) -> None:
        for n, row in read_records(path, what=self.what):
            try:
                self._values[row["key"]] = row[self.field]
            except (KeyError, TypeError) as exc:
                raise PyrefusalError(
                    f"{path}: line {n} is not a {self.what} record (no {exc}); delete the file to rebuild it"
                ) from None

    def add(self, entries: Iterable[tuple[str, Any, Mapping[str, Any]]]) -> None:
        """Keep ``(key, value, extra fields)`` entries and append them to the file in one write."""
        rows = []
        for key, value, extra in entries:
            self._values[key] = value
            rows.append({"v": self.version, "key": key, **extra, self.field: value})
        if self.path is None or not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
