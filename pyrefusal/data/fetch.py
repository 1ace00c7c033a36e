"""Download and check the PolyRefuse dataset files.

PolyRefuse (Wang et al., NeurIPS 2025) lives in the paper's repository,
github.com/mainlp/Multilingual-Refusal. The package ships ``data_manifest.json``, which lists every file
pyrefusal uses, with its size, sha256, record count and *upstream path* in that repository (pinned to commit
``985169d``):

* ``{kind}_{split}_translated_{lang}.json`` of the release are ``PolyRefuse/<same name>``;
* the release has no English train/val files, so the four ``{kind}_{train,val}_translated_en.json`` come
  from the paper's English source splits (``dataset/splits/harmful_train.json``, ``harmful_val.json``,
  ``harmless_{train,val}_200_sampled.json``), row-aligned with the other languages;
* ``en-pools/harmless_{train,val}.json`` are the full English Alpaca pools the paper samples English harmless
  prompts from (``dataset/splits/harmless_{train,val}.json``, 18,793 and 6,264 records);
* ``LICENSE`` (Apache-2.0) is the repository's licence.

:func:`fetch` downloads them with the standard library only (``urllib``): partial downloads are kept as
``<name>.part`` and resumed with an HTTP ``Range`` request, files already present with the right hash are
skipped, each file is checked against the manifest's sha256 before an atomic rename, so a final file is never
corrupt. A host name that does not resolve (offline) stops the whole fetch at once, without retries, and a file
that fails on the network after all its retries stops the remaining ones; the error lists a few lines, not one
per file, and points at the copy shipped with pyrefusal (:mod:`pyrefusal.data.embedded`), which makes fetching
optional.

Why not a download library such as pooch (1.9.0 was evaluated): it downloads into a temporary file that it deletes
on failure (no resume of partial downloads), it has no ``file://`` or local-directory source (used for mirrors and
tests), no per-file fallback between a mirror's upstream layout and a flat copy, and it retries every
``requests`` error, DNS failures included, with sleeps of 1..10 s: the behaviour this module must not have. Keeping
those would have meant a custom pooch downloader holding the same code as here, plus a dependency on requests.

:func:`verify` reports, for every language, split and kind, whether the file is there, its record count,
duplicates, empty strings, schema errors and hash. Both return dataclasses with ``to_dict()`` for the CLI.

``python -m pyrefusal.data.fetch manifest DIR`` regenerates the manifest from a directory laid out like the above
(see :func:`make_manifest`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pyrefusal.data.polyrefuse import (
    EN_POOLS_DIRNAME,
    FILE_RE,
    KINDS,
    SPLITS,
    PolyRefuse,
    default_data_dir,
    language_order,
)
from pyrefusal.data.registry import sha256_file
from pyrefusal.errors import DataError

__all__ = [
    "DEFAULT_REF",
    "FETCH_RECORD_NAME",
    "GITHUB_RAW_TEMPLATE",
    "MANIFEST_FILENAME",
    "PINNED_COMMIT",
    "REPOSITORY",
    "FetchError",
    "FetchReport",
    "FetchedFile",
    "FileCheck",
    "ManifestFile",
    "VerifyReport",
    "fetch",
    "load_manifest",
    "make_manifest",
    "verify",
]

log = logging.getLogger(__name__)

REPOSITORY = "mainlp/Multilingual-Refusal"
"""The paper's GitHub repository, which holds PolyRefuse and the English source splits."""

PINNED_COMMIT = "985169df2a0b1ba56a95c65d5f60e228f12be4a1"
"""The repository commit the manifest's hashes were taken at (short sha ``985169d``)."""

GITHUB_RAW_TEMPLATE = "https://raw.githubusercontent.com/mainlp/Multilingual-Refusal/{ref}/"
"""Default download base; ``{ref}`` is a branch, tag or commit."""

DEFAULT_REF = PINNED_COMMIT  # the commit the manifest hashes were taken from: reproducible by default
"""The ref fetched by default. Pass ``ref=PINNED_COMMIT`` for exactly the manifest's files."""

MANIFEST_FILENAME = "data_manifest.json"
"""Name of the manifest shipped inside the ``pyrefusal`` package."""

FETCH_RECORD_NAME = ".pyrefusal-fetch.json"
"""File written into the data directory by :func:`fetch`: where each file came from (ref, URL, sha256)."""

PART_SUFFIX = ".part"
"""Suffix of an unfinished download; :func:`fetch` resumes it."""

RETRY_BACKOFF_S = 1.0
"""Seconds to wait before the 2nd attempt of a failed download (doubled for each further attempt)."""

_CHUNK = 1 << 20
_USER_AGENT = "pyrefusal-data-fetch/1 (+https://github.com/mainlp/Multilingual-Refusal)"
_POOL_RE = re.compile(r"^harmless_(train|val)\.json$")
_EN_SOURCES = {
    "harmful_train_translated_en.json": "dataset/splits/harmful_train.json",
    "harmful_val_translated_en.json": "dataset/splits/harmful_val.json",
    "harmless_train_translated_en.json": "dataset/splits/harmless_train_200_sampled.json",
    "harmless_val_translated_en.json": "dataset/splits/harmless_val_200_sampled.json",
}
_POOL_SIZES = {"train": 18_793, "val": 6_264}
_LICENSE = "LICENSE"
_BUILD_HINT = "`pyrefusal data build` can make it by translating the English file"
_FIX_HINT = (
    "How to fix: check the network connection and re-run `pyrefusal data fetch` (finished files are kept and "
    "partial downloads resume); or pass --base-url with a mirror of github.com/mainlp/Multilingual-Refusal "
    "(http(s)://, file:// or a local directory, laid out like the repository or flat with the local file "
    "names); or pass --data-dir pointing at an existing PolyRefuse copy instead of fetching."
)

_EMBEDDED_HINT = (
    "You may not need to fetch: `pyrefusal run` works offline with the PolyRefuse copy shipped with pyrefusal "
    "(every released file; only the optional English Alpaca pools need `pyrefusal data fetch`); "
    "`pyrefusal data where` says which copy a run reads."
)
_NOT_TRIED = "not tried: the source could not be reached"
_MAX_ERROR_LINES = 5

HashStatus = Literal["ok", "mismatch", "accepted", "not-in-manifest"]
FetchStatus = Literal["downloaded", "resumed", "present", "failed"]


# ------------------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class ManifestFile:
    """One file of the manifest.

    Attributes:
        name: Path relative to the data directory, e.g. ``"harmful_test_translated_de.json"`` or
            ``"en-pools/harmless_train.json"``.
        upstream: Path in the upstream repository, e.g. ``"PolyRefuse/harmful_test_translated_de.json"``.
        size: Size in bytes at the pinned commit.
        sha256: Hex sha256 at the pinned commit.
        records: Number of JSON records, or ``None`` for non-JSON files (the licence).
        lang: Language code, or ``None`` for the licence.
        split: ``"train"``, ``"val"`` or ``"test"``, or ``None``.
        kind: ``"harmful"`` or ``"harmless"``, or ``None``.
        pool: ``True`` for the full English Alpaca pools in ``en-pools/``.
    """

    name: str
    upstream: str
    size: int
    sha256: str
    records: int | None = None
    lang: str | None = None
    split: str | None = None
    kind: str | None = None
    pool: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest entry as a JSON-serialisable dict."""
        return {
            "name": self.name,
            "upstream": self.upstream,
            "size": self.size,
            "sha256": self.sha256,
            "records": self.records,
            "lang": self.lang,
            "split": self.split,
            "kind": self.kind,
            "pool": self.pool,
        }


def _describe_local_file(directory: Path, rel: str) -> dict[str, Any] | None:
    """Classify one file of a data directory for :func:`make_manifest` (``None``: not a dataset file)."""
    path = directory / rel
    parts = rel.split("/")
    if rel == _LICENSE:
        return {"name": rel, "upstream": _LICENSE, "lang": None, "split": None, "kind": None, "pool": False}
    if len(parts) == 1 and (match := FILE_RE.match(rel)):
        kind, split, lang = match.groups()
        upstream = _EN_SOURCES.get(rel, f"PolyRefuse/{rel}")
        return {"name": rel, "upstream": upstream, "lang": lang, "split": split, "kind": kind, "pool": False}
    if len(parts) == 2 and parts[0] == EN_POOLS_DIRNAME and (match := _POOL_RE.match(parts[1])):
        split = match.group(1)
        records = _count_records(path)
        if records != _POOL_SIZES[split]:
            raise DataError(
                f"{path}: {records} records, but the paper's English Alpaca {split} pool "
                f"(dataset/splits/harmless_{split}.json) has {_POOL_SIZES[split]}; this is not that file, "
                "so its upstream path would be wrong. Put the right file there or remove it before making "
                "a manifest"
            )
        return {
            "name": rel,
            "upstream": f"dataset/splits/harmless_{split}.json",
            "lang": "en",
            "split": split,
            "kind": "harmless",
            "pool": True,
        }
    return None


def _count_records(path: Path) -> int:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as JSON ({exc}); fix or remove it") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: the top level must be a JSON list of records")
    return len(data)


def make_manifest(directory: Path | str, *, commit: str = PINNED_COMMIT) -> dict[str, Any]:
    """Build the manifest dict for a data directory (what ``data_manifest.json`` holds).

    Recognised files: ``LICENSE``, ``{kind}_{split}_translated_{lang}.json`` at the top level and
    ``en-pools/harmless_{train,val}.json``; anything else (dot files, ``*.part``) is ignored. Upstream paths
    follow the repository layout described in the module docstring. ``expected_records`` is, per
    ``kind/split``, the most common record count among the PolyRefuse files; ``missing_in_release`` lists
    the language/split/kind combinations absent for a language that has other files (zh harmless test in
    the release).

    Args:
        directory: The data directory (e.g. a verified copy of the release).
        commit: Full sha of the upstream commit the files correspond to.

    Returns:
        A JSON-serialisable dict (``json.dumps(..., indent=2)`` gives the shipped file).

    Raises:
        DataError: If the directory has no PolyRefuse file, a JSON file cannot be parsed, or a file in
            ``en-pools/`` does not have the paper's pool size (so its upstream path would be wrong).
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; pass the directory holding the PolyRefuse JSON files")
    rels = sorted(
        p.relative_to(root).as_posix()
        for p in [
            *root.iterdir(),
            *((root / EN_POOLS_DIRNAME).glob("*") if (root / EN_POOLS_DIRNAME).is_dir() else []),
        ]
        if p.is_file()
    )
    files: list[dict[str, Any]] = []
    for rel in rels:
        entry = _describe_local_file(root, rel)
        if entry is None:
            continue
        path = root / rel
        records = None if rel == _LICENSE else _count_records(path)
        files.append(
            ManifestFile(
                name=rel,
                upstream=entry["upstream"],
                size=path.stat().st_size,
                sha256=sha256_file(path),
                records=records,
                lang=entry["lang"],
                split=entry["split"],
                kind=entry["kind"],
                pool=entry["pool"],
            ).to_dict()
        )
    released = [f for f in files if f["lang"] is not None and not f["pool"]]
    if not released:
        raise DataError(f"no PolyRefuse files in {root}; expected names like harmful_train_translated_en.json")
    counts: dict[str, Counter[int]] = {}
    for f in released:
        counts.setdefault(f"{f['kind']}/{f['split']}", Counter())[f["records"]] += 1
    expected = {
        f"{kind}/{split}": counts[f"{kind}/{split}"].most_common(1)[0][0]
        for kind in KINDS
        for split in SPLITS
        if f"{kind}/{split}" in counts
    }
    present = {(f["lang"], f["split"], f["kind"]) for f in released}
    langs = sorted({f["lang"] for f in released}, key=language_order)
    missing = [
        {
            "name": f"{kind}_{split}_translated_{lang}.json",
            "lang": lang,
            "split": split,
            "kind": kind,
            "note": (
                f"the PolyRefuse release (at {commit[:7]}) has no {lang} {kind}_{split} file; "
                f"`pyrefusal data build` can make it by translating {kind}_{split}_translated_en.json"
            ),
        }
        for lang in langs
        for kind in KINDS
        for split in SPLITS
        if (lang, split, kind) not in present
    ]
    return {
        "format": 1,
        "dataset": "PolyRefuse (Wang et al., NeurIPS 2025, 'Refusal Direction is Universal Across "
        "Safety-Aligned Languages')",
        "repository": f"https://github.com/{REPOSITORY}",
        "commit": commit,
        "commit_short": commit[:7],
        "url_template": GITHUB_RAW_TEMPLATE + "{path}",
        "license": "Apache-2.0",
        "languages": langs,
        "expected_records": expected,
        "missing_in_release": missing,
        "files": files,
    }


def load_manifest(path: Path | str | None = None) -> dict[str, Any]:
    """Load and check a manifest.

    Args:
        path: A manifest JSON file; ``None`` loads the one shipped in the package.

    Returns:
        The manifest dict (as written by :func:`make_manifest`).

    Raises:
        DataError: If it cannot be read or lacks the expected keys.
    """
    try:
        if path is None:
            text = resources.files("pyrefusal.data").joinpath(MANIFEST_FILENAME).read_text(encoding="utf-8")
            where = f"pyrefusal/data/{MANIFEST_FILENAME}"
        else:
            text = Path(path).expanduser().read_text(encoding="utf-8")
            where = str(path)
        manifest = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"cannot read the data manifest ({exc}); reinstall pyrefusal, or regenerate it with "
            "`python -m pyrefusal.data.fetch manifest DIR -o pyrefusal/data/data_manifest.json`"
        ) from exc
    try:
        _manifest_files(manifest)
        if not isinstance(manifest["commit"], str) or not isinstance(manifest["expected_records"], dict):
            raise TypeError("'commit' must be a string and 'expected_records' an object")
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"{where}: not a pyrefusal data manifest ({exc!r}); regenerate it with "
            "`python -m pyrefusal.data.fetch manifest DIR`"
        ) from exc
    return manifest


def _manifest_files(manifest: Mapping[str, Any]) -> list[ManifestFile]:
    return [
        ManifestFile(
            name=str(f["name"]),
            upstream=str(f["upstream"]),
            size=int(f["size"]),
            sha256=str(f["sha256"]),
            records=f.get("records"),
            lang=f.get("lang"),
            split=f.get("split"),
            kind=f.get("kind"),
            pool=bool(f.get("pool", False)),
        )
        for f in manifest["files"]
    ]


# ------------------------------------------------------------------------------------------------- fetch
@dataclass
class FetchedFile:
    """What :func:`fetch` did with one file.

    Attributes:
        name: Path relative to the data directory.
        status: ``"downloaded"`` (fetched in full), ``"resumed"`` (completed from a ``.part`` with a Range
            request), ``"present"`` (already there with the right content; nothing requested) or ``"failed"``.
        url: The URL the content came from (``None`` if present or failed).
        size: Final size in bytes (``None`` if failed).
        sha256: Final sha256 (``None`` if failed).
        expected_sha256: The manifest's sha256.
        hash_matches: Whether ``sha256`` equals the manifest's (``None`` if failed). ``False`` with a
            non-failed status means different content was accepted (``verify_hash=False``).
        attempts: Download attempts made.
        error: Why it failed, or ``None``.
    """

    name: str
    status: FetchStatus
    expected_sha256: str
    url: str | None = None
    size: int | None = None
    sha256: str | None = None
    hash_matches: bool | None = None
    attempts: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict with one key per field."""
        return dict(self.__dict__)


@dataclass
class FetchReport:
    """Outcome of :func:`fetch`.

    Attributes:
        dest: The data directory.
        base_url: The download base actually used (``{ref}`` filled in).
        ref: The upstream ref requested (branch, tag or commit).
        manifest_commit: The commit the manifest's hashes come from.
        verify_hash: Whether hash mismatches were errors.
        files: One entry per manifest file considered, in manifest order.
        record_path: The provenance file written in ``dest`` (``None`` if nothing could be written).
    """

    dest: Path
    base_url: str
    ref: str
    manifest_commit: str
    verify_hash: bool
    files: list[FetchedFile] = field(default_factory=list)
    record_path: Path | None = None

    @property
    def downloaded(self) -> list[str]:
        """Names fetched by this call (in full or resumed)."""
        return [f.name for f in self.files if f.status in ("downloaded", "resumed")]

    @property
    def resumed(self) -> list[str]:
        """Names completed from a partial download."""
        return [f.name for f in self.files if f.status == "resumed"]

    @property
    def skipped(self) -> list[str]:
        """Names already present with the right content."""
        return [f.name for f in self.files if f.status == "present"]

    @property
    def failed(self) -> list[str]:
        """Names that could not be fetched."""
        return [f.name for f in self.files if f.status == "failed"]

    @property
    def hash_mismatches(self) -> list[str]:
        """Names whose accepted content differs from the manifest (only with ``verify_hash=False``)."""
        return [f.name for f in self.files if f.hash_matches is False and f.status != "failed"]

    @property
    def bytes_downloaded(self) -> int:
        """Total size of the files fetched by this call."""
        return sum(f.size or 0 for f in self.files if f.status in ("downloaded", "resumed"))

    @property
    def ok(self) -> bool:
        """``True`` when no file failed."""
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable summary plus the per-file entries."""
        return {
            "dest": str(self.dest),
            "base_url": self.base_url,
            "ref": self.ref,
            "manifest_commit": self.manifest_commit,
            "verify_hash": self.verify_hash,
            "ok": self.ok,
            "downloaded": self.downloaded,
            "resumed": self.resumed,
            "skipped": self.skipped,
            "failed": self.failed,
            "hash_mismatches": self.hash_mismatches,
            "bytes_downloaded": self.bytes_downloaded,
            "record_path": None if self.record_path is None else str(self.record_path),
            "files": [f.to_dict() for f in self.files],
        }


class FetchError(DataError):
    """:func:`fetch` could not get every file; :attr:`report` says what was done (other files are kept)."""

    def __init__(self, message: str, report: FetchReport) -> None:
        super().__init__(message)
        self.report = report


class _NotFound(Exception):
    """Every candidate URL answered 404 (or the file:// path does not exist); retrying will not help."""


class _Transient(Exception):
    """A network problem worth retrying (the .part is kept for resuming)."""


class _Unreachable(Exception):
    """The host name does not resolve (offline, no DNS): no retry and no further file can succeed."""


def _is_name_resolution_error(reason: object) -> bool:
    """Whether a ``URLError.reason`` (or an ``OSError``) is a DNS failure (``socket.gaierror``)."""
    return isinstance(reason, socket.gaierror)


def _resolve_base(base_url: str | None, ref: str) -> str:
    if not ref or any(c.isspace() for c in ref):
        raise DataError(f"invalid ref {ref!r}; pass a branch, tag or commit such as 'main' or {PINNED_COMMIT[:7]!r}")
    quoted_ref = urllib.parse.quote(ref, safe="/")
    if base_url is None:
        base = GITHUB_RAW_TEMPLATE.format(ref=quoted_ref)
    else:
        base = base_url.replace("{ref}", quoted_ref)
        scheme = urllib.parse.urlsplit(base).scheme.lower()
        if scheme not in ("http", "https", "file"):
            local = Path(base).expanduser()
            if not local.is_dir():
                raise DataError(
                    f"base URL {base_url!r} is neither an http(s):// or file:// URL nor an existing "
                    "directory; "
                    "pass e.g. --base-url https://mirror.example/Multilingual-Refusal/main/ or a local folder"
                )
            base = local.resolve().as_uri()
    return base if base.endswith("/") else base + "/"


def _candidate_urls(base: str, entry: ManifestFile) -> list[str]:
    paths = [entry.upstream] if entry.upstream == entry.name else [entry.upstream, entry.name]
    return [base + urllib.parse.quote(p, safe="/") for p in paths]


def _is_not_found(exc: urllib.error.URLError) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in (404, 410)
    return isinstance(exc.reason, (FileNotFoundError, NotADirectoryError, IsADirectoryError))


def _open(url: str, offset: int, timeout: float) -> Any:
    headers = {"User-Agent": _USER_AGENT}
    if offset and url.startswith(("http://", "https://")):
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _download(urls: Sequence[str], part: Path, timeout: float, on_bytes: Callable[[int], None]) -> tuple[str, bool]:
    """Download the first URL that exists into ``part`` (appending after a 206). Returns (url, resumed)."""
    offset = part.stat().st_size if part.is_file() else 0
    not_found: list[str] = []
    for url in urls:
        try:
            resp = _open(url, offset, timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # our .part is at least as long as the file: start over
                part.unlink(missing_ok=True)
                return _download(urls, part, timeout, on_bytes)
            if _is_not_found(exc):
                not_found.append(f"{url}: HTTP {exc.code}")
                continue
            if exc.code in (408, 425, 429) or exc.code >= 500:
                raise _Transient(f"{url}: HTTP {exc.code} {exc.reason}") from exc
            not_found.append(f"{url}: HTTP {exc.code} {exc.reason}")
            continue
        except urllib.error.URLError as exc:
            if _is_not_found(exc):
                not_found.append(f"{url}: no such file")
                continue
            if _is_name_resolution_error(exc.reason):
                host = urllib.parse.urlsplit(url).hostname
                raise _Unreachable(f"cannot resolve the host name {host!r} ({exc.reason})") from exc
            raise _Transient(f"{url}: {exc.reason}") from exc
        except (OSError, http.client.HTTPException) as exc:
            if _is_name_resolution_error(exc):
                host = urllib.parse.urlsplit(url).hostname
                raise _Unreachable(f"cannot resolve the host name {host!r} ({exc})") from exc
            raise _Transient(f"{url}: {exc!r}") from exc

        with resp:
            status = resp.getcode() or 200  # file:// responses have no status code
            resumed = False
            mode = "wb"
            if status == 206:
                match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                if not match or int(match.group(1)) != offset:
                    part.unlink(missing_ok=True)
                    raise _Transient(f"{url}: answered 206 with Content-Range {resp.headers.get('Content-Range')!r}")
                resumed, mode = True, "ab"
            length_header = resp.headers.get("Content-Length")
            expected_len = int(length_header) if length_header and length_header.isdigit() else None
            received = 0
            try:
                with part.open(mode) as fh:
                    while chunk := resp.read(_CHUNK):
                        fh.write(chunk)
                        received += len(chunk)
                        on_bytes(len(chunk))
                    fh.flush()
                    os.fsync(fh.fileno())
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(f"{url}: connection lost after {received} bytes ({exc!r})") from exc
            if expected_len is not None and received < expected_len:
                raise _Transient(f"{url}: connection closed after {received} of {expected_len} bytes")
        return url, resumed
    raise _NotFound("; ".join(not_found))


def _read_record(dest: Path) -> dict[str, Any]:
    try:
        record = json.loads((dest / FETCH_RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _accepted_sha(record: Mapping[str, Any], name: str) -> str | None:
    entry = record.get("files", {}).get(name) if isinstance(record.get("files"), dict) else None
    if isinstance(entry, dict) and entry.get("matches_manifest") is False:
        sha = entry.get("sha256")
        return sha if isinstance(sha, str) else None
    return None


def _write_record(dest: Path, record: dict[str, Any]) -> Path | None:
    path = dest / FETCH_RECORD_NAME
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write %s: %s", path, exc)
        return None
    return path


@contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled or total <= 0:
        yield lambda _n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="PolyRefuse", file=sys.stderr) as bar:
        yield bar.update


def _mismatch_message(entry: ManifestFile, got: str, url: str, ref: str) -> str:
    return (
        f"{entry.name}: sha256 mismatch: downloaded {got} from {url}, but the manifest expects "
        f"{entry.sha256} (pinned to {REPOSITORY}@{PINNED_COMMIT[:7]}; fetched ref {ref!r}). "
        "Nothing was written for this file. "
        f"The upstream file may have changed since {PINNED_COMMIT[:7]}: fetch the pinned version with "
        f"--ref {PINNED_COMMIT}, or pass --no-verify-hash to accept (and record) the different content"
    )


def _fetch_one(
    entry: ManifestFile,
    dest: Path,
    base: str,
    *,
    ref: str,
    verify_hash: bool,
    retries: int,
    timeout: float,
    accepted_sha: str | None,
    on_bytes: Callable[[int], None],
) -> tuple[FetchedFile, str | None]:
    """Fetch one file. Returns its outcome and, when the source cannot be reached at all (a host name that does
    not resolve, or every attempt failed on the network), why the remaining files should not be tried."""
    final = dest / entry.name
    part = final.with_name(final.name + PART_SUFFIX)
    result = FetchedFile(name=entry.name, status="failed", expected_sha256=entry.sha256)

    if final.is_file():
        size = final.stat().st_size
        sha = sha256_file(final) if size == entry.size or (not verify_hash and accepted_sha) else None
        if sha == entry.sha256 or (not verify_hash and sha is not None and sha == accepted_sha):
            result.status, result.size, result.sha256 = "present", size, sha
            result.hash_matches = sha == entry.sha256
            return result, None
        # Wrong content: download again; the old file is replaced only once the new one is verified.

    final.parent.mkdir(parents=True, exist_ok=True)
    if part.is_file() and part.stat().st_size >= entry.size:
        # A complete (or over-long) leftover: keep it if it is the right file, else start over.
        if part.stat().st_size == entry.size and sha256_file(part) == entry.sha256:
            os.replace(part, final)
            result.status, result.size, result.sha256, result.hash_matches = (
                "resumed",
                entry.size,
                entry.sha256,
                True,
            )
            return result, None
        part.unlink()

    urls = _candidate_urls(base, entry)
    restarted = False
    last_error = ""
    while result.attempts < retries:
        result.attempts += 1
        try:
            url, resumed = _download(urls, part, timeout, on_bytes)
        except _NotFound as exc:
            result.error = (
                f"{entry.name}: not found at any candidate URL ({exc}). The mirror must hold it under its "
                f"upstream path {entry.upstream!r} or its local name {entry.name!r}"
            )
            return result, None
        except _Unreachable as exc:  # offline or no DNS: retrying (or trying other files) cannot help
            result.error = f"{entry.name}: {exc}"
            return result, str(exc)
        except _Transient as exc:
            last_error = str(exc)
            if result.attempts < retries:
                time.sleep(RETRY_BACKOFF_S * 2 ** (result.attempts - 1))
            continue
        got = sha256_file(part)
        if got != entry.sha256 and resumed and not restarted:
            # The kept .part may belong to another version of the file: one fresh download before judging.
            part.unlink(missing_ok=True)
            restarted = True
            result.attempts -= 1
            continue
        # Data files are strict; a non-data file (LICENSE) whose upstream bytes differ is accepted with a
        # warning rather than failing the whole fetch.
        if got != entry.sha256 and verify_hash and entry.records is not None:
            part.unlink(missing_ok=True)
            result.error = _mismatch_message(entry, got, url, ref)
            return result, None
        size = part.stat().st_size
        os.replace(part, final)
        result.status = "resumed" if resumed else "downloaded"
        result.url, result.size, result.sha256, result.hash_matches = url, size, got, got == entry.sha256
        if not result.hash_matches:
            log.warning(
                "%s: accepted sha256 %s (manifest: %s) from %s: hash verification off, or not a data file",
                entry.name,
                got,
                entry.sha256,
                url,
            )
        return result, None
    kept = f" The partial download is kept as {part.name} and the next fetch resumes it." if part.is_file() else ""
    result.error = f"{entry.name}: failed after {result.attempts} attempt(s): {last_error}.{kept}"
    return result, f"the network failed {result.attempts} time(s) in a row ({last_error})"


def fetch(
    dest: Path | str | None = None,
    *,
    base_url: str | None = None,
    ref: str = DEFAULT_REF,
    include_pools: bool = True,
    verify_hash: bool = True,
    progress: bool = True,
    files: Collection[str] | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    manifest: Mapping[str, Any] | None = None,
) -> FetchReport:
    """Download the PolyRefuse files listed in the manifest into ``dest``.

    For each file, URLs are tried in order: ``{base}{upstream path}`` then ``{base}{local name}`` (so a mirror
    may copy the repository layout or be a flat copy of a data directory). Content goes to ``<name>.part``; an
    existing ``.part`` is resumed with ``Range: bytes=N-`` (appended on ``206``, restarted on ``200``). Each
    download is checked against the manifest sha256 and then atomically renamed, so a final file is never
    partial or corrupt. Files already present with the right size and hash are not requested. Network errors
    are retried (``retries`` attempts in all, with back-off); a missing file (404) is not. A provenance record
    (ref, URL, sha256 per file) is written to ``dest/.pyrefusal-fetch.json``.

    Args:
        dest: Data directory to fill (created if needed); default :func:`pyrefusal.data.polyrefuse.default_data_dir`.
        base_url: Download base instead of ``https://raw.githubusercontent.com/mainlp/Multilingual-Refusal/{ref}/``:
            an ``http(s)://`` or ``file://`` URL or a local directory; ``{ref}`` in it is replaced by ``ref``.
        ref: Upstream branch, tag or commit (default ``"main"``). Use :data:`PINNED_COMMIT` for exactly the
            files the manifest describes.
        include_pools: Also fetch ``en-pools/`` (the full English Alpaca pools, ~3 MB; needed to reproduce the
            paper's English harmless sampling).
        verify_hash: Treat content that differs from the manifest as an error (default). ``False`` accepts it
            and records the different hash (``FetchReport.hash_mismatches``, the provenance file).
        progress: Show a byte progress bar on stderr.
        files: Only these manifest names (e.g. ``["harmful_test_translated_de.json"]``); default all.
        retries: Attempts per file for network errors (at least 1).
        timeout: Socket timeout in seconds per request.
        manifest: A manifest dict instead of the shipped one (see :func:`load_manifest`).

    Returns:
        The report; ``report.ok`` is ``True`` (failures raise).

    Raises:
        FetchError: If any file could not be fetched or had the wrong hash. The message lists each failed
            file, why, and how to fix it; files that succeeded are kept and ``exc.report`` holds the full
            report.
        DataError: If ``base_url``/``ref``/``files`` are invalid or ``dest`` cannot be created.
    """
    man = load_manifest() if manifest is None else manifest
    entries = _manifest_files(man)
    if not include_pools:
        entries = [e for e in entries if not e.pool]
    if files is not None:
        wanted = set(files)
        unknown = sorted(wanted - {e.name for e in entries})
        if unknown:
            raise DataError(
                f"not in the manifest{'' if include_pools else ' (pools excluded)'}: {', '.join(unknown)}; "
                f"known names look like {entries[0].name!r} or 'en-pools/harmless_train.json'"
            )
        entries = [e for e in entries if e.name in wanted]
    if retries < 1:
        raise DataError(f"retries must be at least 1, got {retries}")
    base = _resolve_base(base_url, ref)
    root = Path(dest).expanduser() if dest is not None else default_data_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the data directory {root} ({exc}); pass a writable --data-dir") from exc

    record = _read_record(root)
    report = FetchReport(dest=root, base_url=base, ref=ref, manifest_commit=str(man["commit"]), verify_hash=verify_hash)
    to_get = [e for e in entries if not (root / e.name).is_file() or (root / e.name).stat().st_size != e.size]
    with _progress_bar(sum(e.size for e in to_get), progress) as on_bytes:
        stop: str | None = None
        for entry in entries:
            if stop is not None:  # the source is unreachable: do not spend minutes failing on every file
                report.files.append(
                    FetchedFile(name=entry.name, status="failed", expected_sha256=entry.sha256, error=_NOT_TRIED)
                )
                continue
            result, stop = _fetch_one(
                entry,
                root,
                base,
                ref=ref,
                verify_hash=verify_hash,
                retries=retries,
                timeout=timeout,
                accepted_sha=_accepted_sha(record, entry.name),
                on_bytes=on_bytes,
            )
            report.files.append(result)

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    known = record.get("files") if isinstance(record.get("files"), dict) else {}
    for f in report.files:
        if f.status in ("downloaded", "resumed"):
            known[f.name] = {
                "sha256": f.sha256,
                "size": f.size,
                "url": f.url,
                "ref": ref,
                "matches_manifest": f.hash_matches,
                "fetched_at": now,
            }
    new_record = {
        "manifest_commit": report.manifest_commit,
        "last_fetch": {"ref": ref, "base_url": base, "verify_hash": verify_hash, "time": now},
        "files": known,
    }
    report.record_path = _write_record(root, new_record)

    failed = [f for f in report.files if f.status == "failed"]
    if failed:
        raise FetchError(_failure_summary(failed, len(report.files), root, base), report)
    return report


def _failure_summary(failed: Sequence[FetchedFile], n_files: int, root: Path, base: str) -> str:
    """A few lines, not one per file: the first errors, a count of the rest, and what to do."""
    tried = [f for f in failed if f.error != _NOT_TRIED]
    lines = [f"  - {f.error}" for f in tried[:_MAX_ERROR_LINES]]
    if len(tried) > _MAX_ERROR_LINES:
        lines.append(f"  - ... and {len(tried) - _MAX_ERROR_LINES} more file(s) failed the same way")
    not_tried = len(failed) - len(tried)
    if not_tried:
        lines.append(f"  - {not_tried} other file(s) not tried: the source could not be reached")
    return (
        f"could not fetch {len(failed)} of {n_files} PolyRefuse file(s) into {root} from {base}:\n"
        + "\n".join(lines)
        + f"\n{_FIX_HINT}\n{_EMBEDDED_HINT}"
    )


# ------------------------------------------------------------------------------------------------- verify
@dataclass
class FileCheck:
    """The checks of one dataset file.

    Attributes:
        name: Path relative to the data directory.
        lang: Language code.
        split: ``"train"``, ``"val"`` or ``"test"``.
        kind: ``"harmful"`` or ``"harmless"``.
        pool: ``True`` for the English Alpaca pools in ``en-pools/``.
        present: Whether the file exists.
        records: Number of records (``None`` if missing or not a JSON list).
        expected_records: From the manifest (the file's own count, else the release size of its kind/split).
        duplicates: Records whose prompt text repeats an earlier record's (``None`` if unreadable).
        empty_strings: Records with an empty or blank ``instruction``/``instruction_translated``.
        schema_error: The :class:`DataError` message of :meth:`PolyRefuse.load`, or ``None``.
        sha256: The file's sha256 (``None`` if missing).
        expected_sha256: The manifest's sha256, or ``None`` for files the manifest does not list.
        hash_status: ``"ok"``, ``"mismatch"``, ``"accepted"`` (differs from the manifest but is the content
            ``fetch(verify_hash=False)`` recorded), ``"not-in-manifest"``, or ``None`` if missing.
        note: Explanation for a missing file, or ``None``.
    """

    name: str
    lang: str
    split: str
    kind: str
    pool: bool = False
    present: bool = False
    records: int | None = None
    expected_records: int | None = None
    duplicates: int | None = None
    empty_strings: int | None = None
    schema_error: str | None = None
    sha256: str | None = None
    expected_sha256: str | None = None
    hash_status: HashStatus | None = None
    note: str | None = None

    @property
    def count_ok(self) -> bool | None:
        """Whether the record count is the expected one (``None`` if either is unknown)."""
        if self.records is None or self.expected_records is None:
            return None
        return self.records == self.expected_records

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict with one key per field plus ``count_ok``."""
        return {**self.__dict__, "count_ok": self.count_ok}


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`.

    Attributes:
        root: The data directory checked.
        manifest_commit: The commit the manifest's hashes come from.
        files: One check per language x kind x split (languages of the manifest plus any found), then the
            English pools.
    """

    root: Path
    manifest_commit: str
    files: list[FileCheck] = field(default_factory=list)

    @property
    def present(self) -> list[FileCheck]:
        """Checks of files that exist."""
        return [f for f in self.files if f.present]

    @property
    def missing(self) -> list[FileCheck]:
        """Checks of files that do not exist (reported, not fatal)."""
        return [f for f in self.files if not f.present]

    @property
    def schema_errors(self) -> list[FileCheck]:
        """Checks of files that fail to load."""
        return [f for f in self.files if f.schema_error is not None]

    @property
    def hash_mismatches(self) -> list[FileCheck]:
        """Checks of files whose content differs from the manifest (and was not accepted by a fetch)."""
        return [f for f in self.files if f.hash_status == "mismatch"]

    @property
    def count_mismatches(self) -> list[FileCheck]:
        """Checks of files with an unexpected record count (reported, not fatal by itself)."""
        return [f for f in self.files if f.count_ok is False]

    @property
    def ok(self) -> bool:
        """``True`` if at least one file is present and none has a schema error or a hash mismatch."""
        return bool(self.present) and not self.schema_errors and not self.hash_mismatches

    def notes(self) -> list[str]:
        """Human-readable remarks: missing files, accepted hashes, count mismatches, duplicates."""
        out: list[str] = []
        if not self.present:
            out.append(f"No PolyRefuse file found in {self.root}: run `pyrefusal data fetch` or pass --data-dir.")
        for f in self.missing:
            if f.note:
                out.append(f"{f.name} is missing: {f.note}.")
        other_missing = [f.name for f in self.missing if not f.note]
        if other_missing and self.present:
            out.append(
                f"{len(other_missing)} file(s) missing ({', '.join(other_missing)}): run "
                "`pyrefusal data fetch` to download them."
            )
        for f in self.hash_mismatches:
            out.append(
                f"{f.name}: sha256 {f.sha256} differs from the manifest's {f.expected_sha256} "
                f"(release at {self.manifest_commit[:7]}); re-download it with `pyrefusal data fetch`, "
                "or, if the different content is intended, fetch it with --no-verify-hash to record it."
            )
        for f in self.files:
            if f.hash_status == "accepted":
                out.append(
                    f"{f.name}: content differs from the manifest but is what `pyrefusal data fetch "
                    f"--no-verify-hash` accepted (see {FETCH_RECORD_NAME})."
                )
        for f in self.count_mismatches:
            out.append(f"{f.name}: {f.records} records, expected {f.expected_records}.")
        dups = [f for f in self.files if f.duplicates]
        if dups:
            out.append(
                f"{len(dups)} file(s) repeat some prompt texts (the 'duplicates' column counts records "
                "that repeat an earlier one). The released harmful test files have ~10 each, inherited "
                "from the English sources; this is not an error."
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable summary plus the per-file checks."""
        return {
            "root": str(self.root),
            "manifest_commit": self.manifest_commit,
            "ok": self.ok,
            "n_present": len(self.present),
            "n_missing": len(self.missing),
            "missing": [f.name for f in self.missing],
            "schema_errors": {f.name: f.schema_error for f in self.schema_errors},
            "hash_mismatches": [f.name for f in self.hash_mismatches],
            "count_mismatches": [f.name for f in self.count_mismatches],
            "notes": self.notes(),
            "files": [f.to_dict() for f in self.files],
        }

    def to_markdown(self) -> str:
        """Return a Markdown report: a verdict line, one table row per file, then notes."""
        verdict = "OK" if self.ok else "NOT OK"
        lines = [
            f"# PolyRefuse check: `{self.root}`",
            "",
            (
                f"**{verdict}**: {len(self.present)} of {len(self.files)} files present, "
                f"{len(self.schema_errors)} schema error(s), {len(self.hash_mismatches)} hash mismatch(es) "
                f"(manifest: {REPOSITORY}@{self.manifest_commit[:7]})."
            ),
            "",
            "| lang | kind | split | file | records | expected | duplicates | empty | sha256 | problem |",
            "|---|---|---|---|---:|---:|---:|---:|---|---|",
        ]

        def cell(value: object) -> str:
            return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

        for f in self.files:
            if not f.present:
                problem = "missing" + (" (not in the release)" if f.note else "")
            elif f.schema_error:
                problem = f.schema_error
            elif f.hash_status == "mismatch":
                problem = "sha256 differs from the manifest"
            elif f.count_ok is False:
                problem = "unexpected record count"
            else:
                problem = ""
            split = f"{f.split} (pool)" if f.pool else f.split
            lines.append(
                "| "
                + " | ".join(
                    cell(v)
                    for v in (
                        f.lang,
                        f.kind,
                        split,
                        f"`{f.name}`",
                        f.records,
                        f.expected_records,
                        f.duplicates,
                        f.empty_strings,
                        f.hash_status,
                        problem,
                    )
                )
                + " |"
            )
        notes = self.notes()
        if notes:
            lines += ["", "Notes:", "", *(f"- {n}" for n in notes)]
        return "\n".join(lines) + "\n"


def _raw_stats(path: Path, split: str) -> tuple[int | None, int | None, int | None]:
    """(records, duplicates, empty strings) from the raw JSON, best effort (``None`` where unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None, None, None
    if not isinstance(data, list):
        return None, None, None
    texts: list[str] = []
    empty = 0
    for record in data:
        if not isinstance(record, dict):
            continue
        instruction, translated = record.get("instruction"), record.get("instruction_translated")
        if any(isinstance(v, str) and not v.strip() for v in (instruction, translated)):
            empty += 1
        text = translated if split == "test" and isinstance(translated, str) else instruction
        if isinstance(text, str) and text.strip():
            texts.append(text)
    return len(data), len(texts) - len(set(texts)), empty


def verify(root: Path | str | None = None, *, manifest: Mapping[str, Any] | None = None) -> VerifyReport:
    """Check a PolyRefuse directory file by file.

    Every language of the manifest (and any other language found in ``root``) is checked for all six
    ``kind x split`` files, then the English pools in ``en-pools/``. For a present file: record count vs the
    manifest, duplicate prompt texts, empty strings, loading with :meth:`PolyRefuse.load` (a
    :class:`DataError` is recorded as a schema error) and sha256 vs the manifest. Missing files are reported,
    never fatal; the release has no zh harmless test, which the report says (``pyrefusal data build`` can
    make it).

    Args:
        root: The data directory; default :func:`pyrefusal.data.polyrefuse.default_data_dir`.
        manifest: A manifest dict instead of the shipped one.

    Returns:
        The report; ``report.ok`` is ``False`` on any schema error or hash mismatch, or if no file is present.
    """
    man = load_manifest() if manifest is None else manifest
    base = Path(root).expanduser() if root is not None else default_data_dir()
    by_name = {e.name: e for e in _manifest_files(man)}
    expected_by_kind: Mapping[str, int] = man.get("expected_records", {})
    release_gaps = {m["name"]: m.get("note", "") for m in man.get("missing_in_release", []) if "name" in m}
    record = _read_record(base)
    data = PolyRefuse(base)

    langs = {e.lang for e in by_name.values() if e.lang and not e.pool}
    if base.is_dir():
        langs |= {m.group(3) for p in base.iterdir() if (m := FILE_RE.match(p.name)) and p.is_file()}

    targets: list[tuple[str, str, str, str, bool]] = [
        (f"{kind}_{split}_translated_{lang}.json", lang, split, kind, False)
        for lang in sorted(langs, key=language_order)
        for kind in KINDS
        for split in SPLITS
    ]
    targets += [(f"{EN_POOLS_DIRNAME}/harmless_{s}.json", "en", s, "harmless", True) for s in ("train", "val")]

    report = VerifyReport(root=base, manifest_commit=str(man.get("commit", "")))
    for name, lang, split, kind, pool in targets:
        entry = by_name.get(name)
        check = FileCheck(name=name, lang=lang, split=split, kind=kind, pool=pool)
        check.expected_records = (
            entry.records
            if entry is not None and entry.records is not None
            else expected_by_kind.get(f"{kind}/{split}")
        )
        if pool and entry is None:
            check.expected_records = _POOL_SIZES[split]
        path = base / name
        if not path.is_file():
            if name in release_gaps:
                check.note = release_gaps[name] or f"absent from the PolyRefuse release; {_BUILD_HINT}"
            elif pool:
                check.note = (
                    "optional: the full English Alpaca pools, needed only to reproduce the paper's English "
                    "harmless sampling; `pyrefusal data fetch` downloads them"
                )
            report.files.append(check)
            continue
        check.present = True
        check.records, check.duplicates, check.empty_strings = _raw_stats(path, split)
        try:
            if pool:
                data.load_en_pool(split)  # type: ignore[arg-type]
            else:
                data.load(lang, split, kind)  # type: ignore[arg-type]
        except DataError as exc:
            check.schema_error = str(exc)
        check.sha256 = sha256_file(path)
        if entry is None:
            check.hash_status = "not-in-manifest"
        else:
            check.expected_sha256 = entry.sha256
            if check.sha256 == entry.sha256:
                check.hash_status = "ok"
            elif check.sha256 == _accepted_sha(record, name):
                check.hash_status = "accepted"
            else:
                check.hash_status = "mismatch"
        report.files.append(check)
    return report


# ------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pyrefusal.data.fetch manifest DIR [-o FILE] [--commit SHA]``: print or write a manifest."""
    parser = argparse.ArgumentParser(prog="python -m pyrefusal.data.fetch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("manifest", help="build data_manifest.json from a PolyRefuse directory")
    cmd.add_argument("directory", type=Path, help="directory with the PolyRefuse JSON files (and en-pools/)")
    cmd.add_argument("--commit", default=PINNED_COMMIT, help="full sha of the upstream commit the files match")
    cmd.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        manifest = make_manifest(args.directory, commit=args.commit)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
