"""A tiny local stand-in for the Hugging Face Hub file API, for tests.

``huggingface_hub.hf_hub_download`` (2.4.0) talks to the Hub in two steps, and this server
answers both the way the real Hub does:

1. ``HEAD {endpoint}/{repo}/resolve/{revision}/{filename}`` for metadata. The response must
   carry ``X-Repo-Commit`` (otherwise huggingface_hub decides the endpoint is not a Hub) and an
   ETag. For an LFS file the Hub answers ``302`` with ``Location`` pointing at a CDN on another
   origin, ``X-Linked-Etag`` (the file's sha256) and ``X-Linked-Size``; huggingface_hub does not
   follow a redirect to another origin, it reads the metadata from the ``302`` itself. A small
   (non-LFS) file is answered ``200`` with ``ETag`` = its git blob sha1 and ``Content-Length``.
   Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``),
   which huggingface_hub maps to its exception types.
2. ``GET`` on the location found in step 1 (the CDN URL for LFS files). After a dropped
   connection huggingface_hub resumes with ``Range: bytes=N-``, answered ``206`` with
   ``Content-Range``.

So the fake runs two HTTP servers on 127.0.0.1: the "hub" (whose URL is the endpoint to put in
``HF_ENDPOINT``) and the "cdn" on another port, i.e. another origin, like the real CDN.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlsplit

from typing_extensions import Self

_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")
_BLOB_RE = re.compile(r"^/blobs/(?P<key>[0-9a-f]+)$")
_RANGE_RE = re.compile(r"^bytes=(?P<start>\d+)-(?P<end>\d*)$")


@dataclass
class HubFile:
    """One file served by :class:`FakeHub`.

    Attributes:
        content: The bytes served.
        lfs: Serve it like an LFS file (302 to the CDN, sha256 ETag) rather than a small file.
        advertised_sha256: sha256 announced in ``X-Linked-Etag`` instead of the real one, to
            emulate a Hub whose metadata and bytes disagree (a corrupt mirror or transfer).
        drop_first_get_after: Close the connection after this many body bytes of the first
            GET, to make the client resume with a Range request.
    """

    content: bytes
    lfs: bool = True
    advertised_sha256: str | None = None
    drop_first_get_after: int | None = None
    gets: int = 0

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def git_sha1(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()


@dataclass
class Request:
    """One request the fake received."""

    server: str
    method: str
    path: str
    range: str | None


@dataclass
class FakeHub:
    """Two threaded HTTP servers emulating the Hub's ``/resolve`` API and its CDN.

    Use as a context manager; :attr:`endpoint` is the value for ``HF_ENDPOINT``.
    """

    files: dict[tuple[str, str], HubFile] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    _servers: dict[str, ThreadingHTTPServer] = field(default_factory=dict)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_file(self, repo_id: str, filename: str, content: bytes, **options: object) -> HubFile:
        """Serve ``content`` as ``filename`` of model repo ``repo_id`` (at revision ``main``).

        Args:
            repo_id: ``owner/name``.
            filename: Path inside the repo.
            content: The bytes.
            **options: Extra :class:`HubFile` fields (``lfs``, ``advertised_sha256``,
                ``drop_first_get_after``).

        Returns:
            The registered file.
        """
        hub_file = HubFile(content=content, **options)  # type: ignore[arg-type]
        self.files[(repo_id, filename)] = hub_file
        return hub_file

    @staticmethod
    def commit_of(repo_id: str) -> str:
        """The (fixed) commit hash the fake reports for ``repo_id``."""
        return hashlib.sha1(repo_id.encode()).hexdigest()

    @property
    def endpoint(self) -> str:
        """Base URL of the hub server, e.g. ``http://127.0.0.1:54321``."""
        return self.url_of("hub")

    def url_of(self, name: str) -> str:
        """Base URL of server ``name`` (``"hub"`` or ``"cdn"``)."""
        host, port = self._servers[name].server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        """Start both servers on free ports of 127.0.0.1."""
        for name in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, name))
            server.daemon_threads = True
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.02}, name=f"fake-{name}", daemon=True
            )
            thread.start()
            self._servers[name] = server
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop both servers and free their ports."""
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def by_sha256(self, key: str) -> HubFile | None:
        return next((f for f in self.files.values() if f.sha256 == key), None)


def unused_endpoint() -> str:
    """A ``http://127.0.0.1:PORT`` URL on which nothing listens (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _make_handler(hub: FakeHub, server_name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "FakeHub/1.0"

        def log_message(self, format: str, *args: object) -> None:  # quiet: tests read hub.requests
            pass

        def do_HEAD(self) -> None:
            self._handle(send_body=False)

        def do_GET(self) -> None:
            self._handle(send_body=True)

        def _handle(self, *, send_body: bool) -> None:
            path = urlsplit(self.path).path
            hub.log(Request(server_name, self.command, path, self.headers.get("Range")))
            if server_name == "hub":
                self._resolve(path, send_body)
            else:
                self._blob(path, send_body)

        def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
            body = message.encode()
            self.send_response(status)
            if code is not None:
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
            if commit is not None:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _resolve(self, path: str, send_body: bool) -> None:
            match = _RESOLVE_RE.match(path)
            if match is None:
                self._error(404, None, "Not Found")
                return
            repo_id, revision, filename = (unquote(match[g]) for g in ("repo", "revision", "filename"))
            if not any(repo == repo_id for repo, _ in hub.files):
                self._error(401, "RepoNotFound", "Repository not found")
                return
            commit = hub.commit_of(repo_id)
            if revision not in ("main", commit):
                self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
                return
            hub_file = hub.files.get((repo_id, filename))
            if hub_file is None:
                self._error(404, "EntryNotFound", "Entry not found", commit=commit)
                return
            if hub_file.lfs:
                self.send_response(302)
                location = f"{hub.url_of('cdn')}/blobs/{hub_file.sha256}?X-Amz-Signature=fake"
                self.send_header("Location", location)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("X-Linked-Etag", f'"{hub_file.advertised_sha256 or hub_file.sha256}"')
                self.send_header("X-Linked-Size", str(len(hub_file.content)))
                self.send_header("ETag", f'W/"{hub_file.git_sha1[:20]}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send_content(hub_file, send_body, etag=hub_file.git_sha1, commit=commit)

        def _blob(self, path: str, send_body: bool) -> None:
            match = _BLOB_RE.match(path)
            hub_file = hub.by_sha256(match["key"]) if match else None
            if hub_file is None:
                self._error(404, None, "NoSuchKey")
                return
            self._send_content(hub_file, send_body, etag=hub_file.sha256, commit=None)

        def _send_content(self, hub_file: HubFile, send_body: bool, *, etag: str, commit: str | None) -> None:
            content = hub_file.content
            total = len(content)
            start, status = 0, 200
            range_header = self.headers.get("Range")
            if range_header:
                match = _RANGE_RE.match(range_header.strip())
                if match is None or int(match["start"]) >= total:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{total}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, status = int(match["start"]), 206
                end = min(int(match["end"]), total - 1) if match["end"] else total - 1
                content = content[start : end + 1]
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{start + len(content) - 1}/{total}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(content)))
            self.send_header("ETag", f'"{etag}"')
            if commit is not None:
                self.send_header("X-Repo-Commit", commit)
            self.end_headers()
            if not send_body:
                return
            hub_file.gets += 1
            cut = hub_file.drop_first_get_after
            if hub_file.gets == 1 and cut is not None and cut < len(content):
                self.wfile.write(content[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(content)

    return Handler
