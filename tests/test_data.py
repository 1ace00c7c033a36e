"""Tests of pyrefusal.data.fetch: fetch from a local HTTP mirror (Range, retries, hashes) and verify.

The mirror is a threaded ``http.server`` on 127.0.0.1 that serves the shared PolyRefuse copy under the
upstream repository layout (``/{ref}/PolyRefuse/...``, ``/{ref}/dataset/splits/...``, ``/{ref}/LICENSE``), or
flat under the local names, with ``Range`` support and switches to corrupt a file or drop a connection.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from pyrefusal.data import fetch as data_mod
from pyrefusal.data.fetch import (
    FETCH_RECORD_NAME,
    PINNED_COMMIT,
    FetchError,
    fetch,
    load_manifest,
    make_manifest,
    verify,
)
from pyrefusal.errors import DataError

SHARED_POLYREFUSE = Path(__file__).resolve().parents[2] / "shared" / "polyrefuse"
MANIFEST = load_manifest()
ENTRIES = {f["name"]: f for f in MANIFEST["files"]}
N_FILES = len(ENTRIES)
N_NO_POOLS = sum(1 for f in MANIFEST["files"] if not f["pool"])

pytestmark = pytest.mark.skipif(
    not SHARED_POLYREFUSE.is_dir(), reason=f"shared PolyRefuse copy not found at {SHARED_POLYREFUSE}"
)


@dataclass
class Hit:
    """One request the mirror received."""

    method: str
    ref: str
    path: str
    range: str | None
    status: int


@dataclass
class Mirror:
    """A local HTTP mirror of the upstream repository (see the module docstring)."""

    flat: bool = False
    corrupt: set[str] = field(default_factory=set)  # local names served with one byte changed
    drop_after: dict[str, int] = field(default_factory=dict)  # local name -> bytes sent before a drop (once)
    hits: list[Hit] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.routes: dict[str, str] = {}  # url path (without ref) -> local name
        for entry in MANIFEST["files"]:
            self.routes[entry["name"] if self.flat else entry["upstream"]] = entry["name"]

    @property
    def base(self) -> str:
        """Base URL with a ``{ref}`` placeholder, as ``fetch(base_url=...)`` takes it."""
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/{{ref}}/"

    def content(self, name: str) -> bytes:
        body = (SHARED_POLYREFUSE / name).read_bytes()
        if name in self.corrupt:
            body = body[:-3] + b" \n]" if body.endswith(b"\n]") else body + b"\n"
        return body

    def gets(self, name: str | None = None) -> list[Hit]:
        """GET requests, optionally only those that mapped to local file ``name``."""
        return [h for h in self.hits if h.method == "GET" and (name is None or self.routes.get(h.path) == name)]

    def start(self) -> None:
        """Listen on a free port of 127.0.0.1 in a daemon thread."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and free the port."""
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@contextmanager
def serving(mirror: Mirror) -> Iterator[Mirror]:
    """Run ``mirror`` for the duration of a ``with`` block."""
    mirror.start()
    try:
        yield mirror
    finally:
        mirror.stop()


def _handler(mirror: Mirror) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _log(self, ref: str, path: str, status: int) -> None:
            with mirror._lock:
                mirror.hits.append(Hit(self.command, ref, path, self.headers.get("Range"), status))

        def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            ref, _, path = unquote(urlsplit(self.path).path).lstrip("/").partition("/")
            name = mirror.routes.get(path)
            if name is None:
                self._log(ref, path, 404)
                self._reply(404, b"not found")
                return
            body = mirror.content(name)
            status, start, headers = 200, 0, {"Content-Type": "application/json"}
            spec = self.headers.get("Range")
            if spec and spec.startswith("bytes=") and spec.endswith("-"):
                start = int(spec[len("bytes=") : -1])
                if start >= len(body):
                    self._log(ref, path, 416)
                    self._reply(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                    return
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
            self._log(ref, path, status)
            chunk = body[start:]
            drop = mirror.drop_after.pop(name, None)
            if drop is not None:  # announce the full length, send part of it, hang up
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
                self.wfile.write(chunk[:drop])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_WR)
                return
            self._reply(status, chunk, headers)

    return Handler


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_mod, "RETRY_BACKOFF_S", 0.0)


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    with serving(Mirror()) as m:
        yield m


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ manifest
def test_manifest_describes_the_shared_copy() -> None:
    assert make_manifest(SHARED_POLYREFUSE) == MANIFEST
    assert MANIFEST["commit"] == PINNED_COMMIT and MANIFEST["commit_short"] == "985169d"
    assert MANIFEST["expected_records"] == {
        "harmful/train": 260,
        "harmful/val": 39,
        "harmful/test": 572,
        "harmless/train": 200,
        "harmless/val": 200,
        "harmless/test": 500,
    }
    assert ENTRIES["harmful_train_translated_en.json"]["upstream"] == "dataset/splits/harmful_train.json"
    assert ENTRIES["harmful_val_translated_en.json"]["upstream"] == "dataset/splits/harmful_val.json"
    assert ENTRIES["harmless_train_translated_en.json"]["upstream"] == "dataset/splits/harmless_train_200_sampled.json"
    assert ENTRIES["harmless_val_translated_en.json"]["upstream"] == "dataset/splits/harmless_val_200_sampled.json"
    assert ENTRIES["en-pools/harmless_train.json"]["upstream"] == "dataset/splits/harmless_train.json"
    assert ENTRIES["en-pools/harmless_train.json"]["records"] == 18_793
    assert ENTRIES["en-pools/harmless_val.json"]["upstream"] == "dataset/splits/harmless_val.json"
    assert ENTRIES["en-pools/harmless_val.json"]["records"] == 6_264
    assert ENTRIES["harmful_test_translated_de.json"]["upstream"] == "PolyRefuse/harmful_test_translated_de.json"
    assert ENTRIES["LICENSE"]["upstream"] == "LICENSE"
    assert "harmless_test_translated_zh.json" not in ENTRIES
    assert [m["name"] for m in MANIFEST["missing_in_release"]] == ["harmless_test_translated_zh.json"]


def test_manifest_cli_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert data_mod.main(["manifest", str(SHARED_POLYREFUSE)]) == 0
    assert json.loads(capsys.readouterr().out) == MANIFEST


# ------------------------------------------------------------------------------------------------ fetch
def test_fetch_everything_then_verify(mirror: Mirror, tmp_path: Path) -> None:
    report = fetch(tmp_path, base_url=mirror.base, progress=False)

    assert report.ok and len(report.downloaded) == N_FILES and not report.hash_mismatches
    # the default ref is the commit the manifest's hashes were taken from (reproducible downloads)
    assert report.ref == data_mod.PINNED_COMMIT and report.base_url.endswith(f"/{data_mod.PINNED_COMMIT}/")
    assert {h.ref for h in mirror.hits} == {data_mod.PINNED_COMMIT}
    assert all(h.status == 200 for h in mirror.hits)  # upstream layout: first candidate URL always works
    assert "dataset/splits/harmless_train.json" in {h.path for h in mirror.hits}
    for name, entry in ENTRIES.items():
        assert _sha(tmp_path / name) == entry["sha256"], name
    assert not list(tmp_path.rglob("*.part"))
    record = json.loads((tmp_path / FETCH_RECORD_NAME).read_text())
    assert record["last_fetch"]["ref"] == data_mod.PINNED_COMMIT
    assert record["files"]["LICENSE"]["matches_manifest"] is True
    json.dumps(report.to_dict())

    result = verify(tmp_path)
    assert result.ok, result.to_markdown()
    assert [f.name for f in result.missing] == ["harmless_test_translated_zh.json"]
    zh = result.missing[0]
    assert "no zh harmless_test" in zh.note and "pyrefusal data build" in zh.note
    assert all(f.hash_status == "ok" and f.count_ok and f.schema_error is None for f in result.present)
    by_name = {f.name: f for f in result.files}
    assert by_name["harmful_test_translated_en.json"].duplicates == 10
    assert by_name["en-pools/harmless_train.json"].records == 18_793
    markdown = result.to_markdown()
    assert "**OK**" in markdown and "harmless_test_translated_zh.json is missing" in markdown
    assert "pyrefusal data build" in markdown
    as_dict = json.loads(json.dumps(result.to_dict()))
    assert as_dict["ok"] and as_dict["missing"] == ["harmless_test_translated_zh.json"]


def test_present_files_are_not_downloaded_again(mirror: Mirror, tmp_path: Path) -> None:
    fetch(tmp_path, base_url=mirror.base, progress=False, include_pools=False)
    assert len(mirror.gets()) == N_NO_POOLS
    mirror.hits.clear()

    again = fetch(tmp_path, base_url=mirror.base, progress=False)
    # Only the two pools (left out the first time) are requested.
    assert sorted(h.path for h in mirror.gets()) == [
        "dataset/splits/harmless_train.json",
        "dataset/splits/harmless_val.json",
    ]
    assert len(again.skipped) == N_NO_POOLS and sorted(again.downloaded) == [
        "en-pools/harmless_train.json",
        "en-pools/harmless_val.json",
    ]
    mirror.hits.clear()
    third = fetch(tmp_path, base_url=mirror.base, progress=False)
    assert mirror.hits == [] and len(third.skipped) == N_FILES and third.bytes_downloaded == 0


def test_interrupted_download_resumes_with_range(mirror: Mirror, tmp_path: Path) -> None:
    name = "harmful_test_translated_ar.json"
    full = (SHARED_POLYREFUSE / name).read_bytes()
    half = len(full) // 2
    (tmp_path / f"{name}.part").write_bytes(full[:half])

    report = fetch(tmp_path, base_url=mirror.base, ref="985169d", files=[name], progress=False)

    [hit] = mirror.gets(name)
    assert (hit.ref, hit.range, hit.status) == ("985169d", f"bytes={half}-", 206)
    assert report.resumed == [name] and report.ref == "985169d"
    assert _sha(tmp_path / name) == ENTRIES[name]["sha256"]
    assert not (tmp_path / f"{name}.part").exists()


def test_part_from_other_content_is_restarted(mirror: Mirror, tmp_path: Path) -> None:
    name = "harmless_val_translated_ja.json"
    size = ENTRIES[name]["size"]
    (tmp_path / f"{name}.part").write_bytes(b"x" * (size // 2))  # same length as a real half, wrong bytes

    report = fetch(tmp_path, base_url=mirror.base, files=[name], progress=False)

    assert [(h.range, h.status) for h in mirror.gets(name)] == [(f"bytes={size // 2}-", 206), (None, 200)]
    assert report.files[0].status == "downloaded"
    assert _sha(tmp_path / name) == ENTRIES[name]["sha256"]


def test_dropped_connection_is_retried_and_resumed(mirror: Mirror, tmp_path: Path) -> None:
    name = "harmful_train_translated_th.json"
    mirror.drop_after[name] = 10_000

    report = fetch(tmp_path, base_url=mirror.base, files=[name], progress=False)

    assert [(h.range, h.status) for h in mirror.gets(name)] == [(None, 200), ("bytes=10000-", 206)]
    assert report.files[0].status == "resumed" and report.files[0].attempts == 2
    assert _sha(tmp_path / name) == ENTRIES[name]["sha256"]


def test_corrupt_content_is_an_error_and_never_a_final_file(mirror: Mirror, tmp_path: Path) -> None:
    bad = "harmless_val_translated_de.json"
    mirror.corrupt.add(bad)

    with pytest.raises(FetchError) as info:
        fetch(tmp_path, base_url=mirror.base, progress=False, include_pools=False)

    message = str(info.value)
    assert isinstance(info.value, DataError)
    assert bad in message and ENTRIES[bad]["sha256"] in message
    assert _sha_of_bytes(mirror.content(bad)) in message
    assert "--no-verify-hash" in message and "--ref" in message and "--data-dir" in message
    assert not (tmp_path / bad).exists() and not (tmp_path / f"{bad}.part").exists()
    assert info.value.report.failed == [bad]
    assert len(info.value.report.downloaded) == N_NO_POOLS - 1  # the others are kept

    # Accepting the different content is explicit and recorded; verify then marks it "accepted".
    accepted = fetch(tmp_path, base_url=mirror.base, progress=False, include_pools=False, verify_hash=False)
    assert accepted.downloaded == [bad] and accepted.hash_mismatches == [bad]
    record = json.loads((tmp_path / FETCH_RECORD_NAME).read_text())
    assert record["files"][bad]["matches_manifest"] is False
    assert record["files"][bad]["sha256"] == _sha(tmp_path / bad)
    check = {f.name: f for f in verify(tmp_path).files}[bad]
    assert check.hash_status == "accepted"
    mirror.hits.clear()
    fetch(tmp_path, base_url=mirror.base, progress=False, include_pools=False, verify_hash=False)
    assert mirror.gets() == []


def _sha_of_bytes(body: bytes) -> str:
    import hashlib

    return hashlib.sha256(body).hexdigest()


def test_flat_mirror_and_local_directory(tmp_path: Path) -> None:
    names = [
        "harmful_train_translated_en.json",
        "en-pools/harmless_val.json",
        "harmful_val_translated_de.json",
    ]
    with serving(Mirror(flat=True)) as flat:
        fetch(tmp_path / "http", base_url=flat.base, files=names, progress=False)
        en_hits = [(h.path, h.status) for h in flat.hits if "harmful_train" in h.path]
        assert en_hits == [
            ("dataset/splits/harmful_train.json", 404),
            ("harmful_train_translated_en.json", 200),
        ]
    fetch(tmp_path / "dir", base_url=str(SHARED_POLYREFUSE), files=names, progress=False)
    for name in names:
        assert _sha(tmp_path / "http" / name) == _sha(tmp_path / "dir" / name) == ENTRIES[name]["sha256"]


def test_missing_upstream_file_fails_without_retries(tmp_path: Path) -> None:
    with serving(Mirror()) as empty:
        empty.routes.clear()
        with pytest.raises(FetchError) as info:
            fetch(tmp_path, base_url=empty.base, files=["harmful_val_translated_fr.json"], progress=False)
        assert len(empty.gets()) == 2  # upstream path, then the flat name; no retry for a 404
    message = str(info.value)
    assert "harmful_val_translated_fr.json" in message and "PolyRefuse/harmful_val_translated_fr.json" in message
    assert "--base-url" in message and "--data-dir" in message
    assert not (tmp_path / "harmful_val_translated_fr.json").exists()


def test_unreachable_server_is_retried_then_reported(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError) as info:
        fetch(
            tmp_path,
            base_url=f"http://127.0.0.1:{port}/",
            files=["harmful_val_translated_it.json"],
            progress=False,
            retries=2,
            timeout=5,
        )
    assert "failed after 2 attempt(s)" in str(info.value) and "network" in str(info.value)
    assert info.value.report.files[0].attempts == 2


def test_offline_fails_at_once_with_a_short_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host name that does not resolve stops the fetch on the first request: no retry, no 86 error lines."""
    import urllib.error

    calls: list[str] = []

    def no_dns(url: str, offset: int, timeout: float) -> None:
        calls.append(url)
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(data_mod, "_open", no_dns)
    with pytest.raises(FetchError) as info:
        fetch(tmp_path, progress=False, retries=3)
    assert len(calls) == 1  # one request in all, not 3 attempts x 86 files
    report = info.value.report
    assert len(report.failed) == N_FILES and report.files[0].attempts == 1
    message = str(info.value)
    assert "cannot resolve the host name 'raw.githubusercontent.com'" in message
    assert f"{N_FILES - 1} other file(s) not tried" in message
    assert "shipped with pyrefusal" in message and len(message.splitlines()) <= 6


def test_many_failures_are_summarised(tmp_path: Path) -> None:
    with serving(Mirror()) as empty:
        empty.routes.clear()  # every file answers 404: each is tried, the message stays short
        with pytest.raises(FetchError) as info:
            fetch(tmp_path, base_url=empty.base, progress=False, include_pools=False)
    message = str(info.value)
    assert f"could not fetch {N_NO_POOLS} of {N_NO_POOLS}" in message
    assert f"and {N_NO_POOLS - 5} more file(s) failed" in message and len(message.splitlines()) <= 9


def test_bad_arguments_say_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="neither an http"):
        fetch(tmp_path, base_url=str(tmp_path / "nowhere"), progress=False)
    with pytest.raises(DataError, match="not in the manifest"):
        fetch(tmp_path, base_url=str(SHARED_POLYREFUSE), files=["nope.json"], progress=False)


# ------------------------------------------------------------------------------------------------ verify
@pytest.fixture
def local_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(SHARED_POLYREFUSE, dest)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def test_verify_reports_broken_json(local_copy: Path) -> None:
    broken = local_copy / "harmful_val_translated_fr.json"
    broken.write_bytes(broken.read_bytes()[:500])

    result = verify(local_copy)

    assert not result.ok
    check = {f.name: f for f in result.files}["harmful_val_translated_fr.json"]
    assert check.present and check.records is None and check.hash_status == "mismatch"
    assert check.schema_error is not None and "invalid JSON" in check.schema_error
    assert [f.name for f in result.schema_errors] == ["harmful_val_translated_fr.json"]
    assert "harmful_val_translated_fr.json" in result.to_markdown()
    assert "invalid JSON" in result.to_markdown() and "**NOT OK**" in result.to_markdown()
    assert "harmful_val_translated_fr.json" in result.to_dict()["schema_errors"]


def test_verify_counts_empty_strings_duplicates_and_changed_content(local_copy: Path) -> None:
    path = local_copy / "harmless_train_translated_de.json"
    records = json.loads(path.read_text())
    records[3]["instruction"] = "  "
    records.append(dict(records[0]))
    path.write_text(json.dumps(records))

    check = {f.name: f for f in verify(local_copy).files}[path.name]

    assert check.empty_strings == 1 and check.duplicates == 1
    assert check.records == 201 and check.expected_records == 200 and check.count_ok is False
    assert check.hash_status == "mismatch" and "empty string" in (check.schema_error or "")


def test_verify_tolerates_missing_pools_and_extra_languages(local_copy: Path) -> None:
    shutil.rmtree(local_copy / "en-pools")
    shutil.copy(local_copy / "harmful_val_translated_de.json", local_copy / "harmful_val_translated_yi.json")
    (local_copy / "harmless_test_translated_zh.json").write_text(
        json.dumps([{"instruction": "Hi", "instruction_translated": "你好", "category": None}])
    )

    result = verify(local_copy)

    assert result.ok
    checks = {f.name: f for f in result.files}
    assert checks["en-pools/harmless_train.json"].present is False
    assert "optional" in (checks["en-pools/harmless_train.json"].note or "")
    assert checks["harmful_val_translated_yi.json"].hash_status == "not-in-manifest"
    assert checks["harmful_val_translated_yi.json"].count_ok is True
    assert checks["harmful_train_translated_yi.json"].present is False
    assert checks["harmless_test_translated_zh.json"].hash_status == "not-in-manifest"
    assert checks["harmless_test_translated_zh.json"].count_ok is False  # 1 of 500: reported, not fatal


def test_verify_empty_directory_is_not_ok(tmp_path: Path) -> None:
    result = verify(tmp_path)
    assert not result.ok and not result.present
    assert "pyrefusal data fetch" in result.to_markdown()


def test_a_different_license_file_does_not_fail_the_fetch(mirror: Mirror, tmp_path: Path) -> None:
    """LICENSE is not data: upstream bytes that differ are accepted (and recorded), data files stay strict."""
    mirror.corrupt.add("LICENSE")
    report = fetch(tmp_path, base_url=mirror.base, progress=False, include_pools=False)
    assert (tmp_path / "LICENSE").exists()
    assert "LICENSE" in [f.name for f in report.files if f.hash_matches is False]
