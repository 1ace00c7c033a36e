"""The PolyRefuse copy shipped inside the package, and where a run's data comes from.

pyrefusal ships the released PolyRefuse files (14 languages x harmful/harmless x train/val/test, the English
train/val splits and the Apache-2.0 ``LICENSE``) as one xz-compressed tar archive,
``pyrefusal/data/polyrefuse_data/polyrefuse-985169d.tar.xz`` (~0.8 MB; 8 MB uncompressed), next to its
``LICENSE`` and ``PROVENANCE.md``. The large English Alpaca pools (``en-pools/``, 3 MB, only needed to reproduce
the paper's English harmless sampling) are not shipped: ``pyrefusal data fetch`` downloads them.

:class:`~pyrefusal.data.polyrefuse.PolyRefuse` reads a directory of plain JSON files, so the archive is
unpacked once into the cache (``$PYREFUSAL_CACHE/polyrefuse-embedded/985169d``, default
``~/.cache/pyrefusal/...``; a private temporary directory when the cache is not writable). Every unpacked file is
checked against the sha256 of ``data_manifest.json`` (the same pin ``pyrefusal data fetch`` uses) before the
directory is renamed into place, so a half-unpacked or altered copy is never used.

:func:`resolve_data_source` decides which copy a study reads, in this order:

1. an explicit directory (``--data-dir``, ``RunConfig.data_dir``);
2. ``$PYREFUSAL_DATA_DIR``;
3. the fetched cache (``$PYREFUSAL_CACHE/polyrefuse``, default ``~/.cache/pyrefusal/polyrefuse``) when it holds
   PolyRefuse files, i.e. after ``pyrefusal data fetch``;
4. the embedded copy.

``python -m pyrefusal.data.embedded build SRC`` rebuilds the archive from a verified PolyRefuse directory.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pyrefusal.data.polyrefuse import EN_POOLS_DIRNAME, FILE_RE
from pyrefusal.data.registry import cache_dir, sha256_file
from pyrefusal.errors import DataError

__all__ = [
    "ARCHIVE_NAME",
    "EMBEDDED_COMMIT",
    "EMBEDDED_PACKAGE",
    "DataSource",
    "Origin",
    "build_archive",
    "embedded_archive",
    "embedded_dir",
    "fetched_dir",
    "has_polyrefuse_files",
    "resolve_data_source",
    "writable_data_dir",
]

EMBEDDED_PACKAGE = "pyrefusal.data"
"""The package holding the ``polyrefuse_data/`` folder."""

EMBEDDED_FOLDER = "polyrefuse_data"
"""The folder (inside :data:`EMBEDDED_PACKAGE`) with the archive, its LICENSE and PROVENANCE.md."""

EMBEDDED_COMMIT = "985169d"
"""Short sha of the upstream commit (github.com/mainlp/Multilingual-Refusal) the shipped files come from."""

ARCHIVE_NAME = f"polyrefuse-{EMBEDDED_COMMIT}.tar.xz"
"""File name of the shipped archive."""

MARKER_NAME = ".pyrefusal-embedded.json"
"""Written into an unpacked copy: the archive's sha256 and the file list, so a stale copy is replaced."""

_ARCHIVE_MTIME = 1_735_689_600  # 2025-01-01T00:00:00Z: fixed, so the archive is byte-reproducible

Origin = Literal["--data-dir", "$PYREFUSAL_DATA_DIR", "fetched", "embedded"]


@dataclass(frozen=True)
class DataSource:
    """Which PolyRefuse copy a study reads.

    Attributes:
        path: The directory :class:`~pyrefusal.data.polyrefuse.PolyRefuse` reads.
        origin: ``"--data-dir"`` (given explicitly), ``"$PYREFUSAL_DATA_DIR"``, ``"fetched"`` (the cache filled by
            ``pyrefusal data fetch``) or ``"embedded"`` (the copy shipped in the package, unpacked into ``path``).
        en_pools: Whether the full English Alpaca pools (``en-pools/``) are there; without them English harmless
            train/val prompts are drawn from the 200-row PolyRefuse files instead of the paper's pools.
    """

    path: Path
    origin: Origin
    en_pools: bool

    def describe(self) -> str:
        """One line for the start of a run: where the data comes from and what that implies."""
        what = {
            "--data-dir": "the directory given with --data-dir",
            "$PYREFUSAL_DATA_DIR": "$PYREFUSAL_DATA_DIR",
            "fetched": "the cache filled by `pyrefusal data fetch`",
            "embedded": f"the copy shipped with pyrefusal (mainlp/Multilingual-Refusal@{EMBEDDED_COMMIT})",
        }[self.origin]
        pools = (
            "with the English Alpaca pools"
            if self.en_pools
            else "without the English Alpaca pools (English harmless prompts come from the 200-row files; "
            "`pyrefusal data fetch` adds the pools)"
        )
        return f"PolyRefuse from {what}: {self.path}, {pools}"

    def to_dict(self) -> dict[str, Any]:
        """The ``data_source`` entry of ``results.json``."""
        return {"origin": self.origin, "path": str(self.path), "en_pools": self.en_pools}


def has_polyrefuse_files(directory: Path) -> bool:
    """Whether ``directory`` holds at least one released PolyRefuse file (``*_translated_*.json``)."""
    try:
        return directory.is_dir() and any(FILE_RE.match(p.name) and p.is_file() for p in directory.iterdir())
    except OSError:
        return False


def fetched_dir() -> Path:
    """Where ``pyrefusal data fetch`` puts the data by default: ``$PYREFUSAL_CACHE/polyrefuse`` (or
    ``~/.cache/pyrefusal/polyrefuse``), ignoring ``$PYREFUSAL_DATA_DIR``."""
    return cache_dir() / "polyrefuse"


def _has_pools(directory: Path) -> bool:
    return all((directory / EN_POOLS_DIRNAME / f"harmless_{s}.json").is_file() for s in ("train", "val"))


def resolve_data_source(explicit: Path | str | None = None) -> DataSource:
    """Pick the PolyRefuse copy to read: explicit, ``$PYREFUSAL_DATA_DIR``, the fetched cache, the embedded copy.

    An explicit directory equal to ``$PYREFUSAL_DATA_DIR`` is reported as coming from the variable (the CLI fills
    ``--data-dir`` from it). Explicit and environment directories are returned as given, whether or not they hold
    files (reading them says what is missing); the fetched cache is used only when it holds PolyRefuse files.

    Args:
        explicit: A directory given by the user, or ``None``.

    Returns:
        The source; for ``"embedded"`` its directory has been unpacked and checked (:func:`embedded_dir`).

    Raises:
        DataError: If the embedded copy is needed and cannot be unpacked or is damaged.
    """
    env = os.environ.get("PYREFUSAL_DATA_DIR") or None
    if explicit is not None and str(explicit) != "":
        path = Path(explicit).expanduser().absolute()
        origin: Origin = "$PYREFUSAL_DATA_DIR" if env and Path(env).expanduser().absolute() == path else "--data-dir"
        return DataSource(path, origin, _has_pools(path))
    if env:
        path = Path(env).expanduser().absolute()
        return DataSource(path, "$PYREFUSAL_DATA_DIR", _has_pools(path))
    fetched = fetched_dir()
    if has_polyrefuse_files(fetched):
        return DataSource(fetched, "fetched", _has_pools(fetched))
    path = embedded_dir()
    return DataSource(path, "embedded", _has_pools(path))


def writable_data_dir(explicit: Path | str | None = None) -> Path:
    """The directory to add files to (``pyrefusal data build``): never the unpacked shipped copy.

    An explicit directory or ``$PYREFUSAL_DATA_DIR`` is returned as is. Otherwise the fetched cache
    (:func:`fetched_dir`); when it holds no PolyRefuse file yet, it is first filled with the shipped files, so that
    it is a complete copy (the lookup order then picks it, with the added files, instead of the shipped copy).

    Raises:
        DataError: If the cache cannot be written or the shipped copy cannot be unpacked.
    """
    source = resolve_data_source(explicit) if explicit or os.environ.get("PYREFUSAL_DATA_DIR") else None
    if source is not None:
        return source.path
    target = fetched_dir()
    if has_polyrefuse_files(target):
        return target
    shipped = embedded_dir()
    try:
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(shipped.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                shutil.copyfile(path, target / path.name)
    except OSError as exc:
        raise DataError(
            f"cannot copy the shipped PolyRefuse files into {target} ({exc}); pass a writable --data-dir"
        ) from exc
    return target


# --------------------------------------------------------------------------------------------- the archive
def embedded_archive() -> Path:
    """Path of the shipped archive.

    Raises:
        DataError: If the installation lacks it (a build that dropped package data).
    """
    path = Path(str(resources.files(EMBEDDED_PACKAGE).joinpath(EMBEDDED_FOLDER, ARCHIVE_NAME)))
    if not path.is_file():
        raise DataError(
            f"the PolyRefuse copy shipped with pyrefusal is missing ({path}): the installation dropped its package "
            "data. Reinstall pyrefusal (`pip install .`), run `pyrefusal data fetch`, or pass --data-dir"
        )
    return path


def _manifest_hashes() -> dict[str, str]:
    text = resources.files(EMBEDDED_PACKAGE).joinpath("data_manifest.json").read_text(encoding="utf-8")
    return {str(f["name"]): str(f["sha256"]) for f in json.loads(text)["files"]}


def _unpack(archive: Path, dest: Path, archive_sha: str) -> None:
    """Unpack ``archive`` into the new directory ``dest``, checking each file against the manifest."""
    hashes = _manifest_hashes()
    names: list[str] = []
    try:
        with tarfile.open(archive, "r:xz") as tar:
            for member in tar.getmembers():
                name = member.name
                if not member.isfile() or "/" in name or name.startswith(".") or name not in hashes:
                    raise DataError(f"{archive}: unexpected member {name!r}; reinstall pyrefusal")
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                with source, (dest / name).open("wb") as out:
                    shutil.copyfileobj(source, out)
                names.append(name)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: cannot be unpacked into {dest} ({exc}); reinstall pyrefusal") from exc
    for name in names:
        got = sha256_file(dest / name)
        if got != hashes[name]:
            raise DataError(
                f"{archive}: {name} has sha256 {got}, data_manifest.json expects {hashes[name]}; the shipped copy "
                "is damaged: reinstall pyrefusal or run `pyrefusal data fetch`"
            )
    marker = {"archive_sha256": archive_sha, "commit": EMBEDDED_COMMIT, "files": sorted(names)}
    (dest / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def _is_current(directory: Path, archive_sha: str) -> bool:
    try:
        marker = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
        return marker.get("archive_sha256") == archive_sha and all(
            (directory / n).is_file() for n in marker.get("files", [])
        )
    except (OSError, ValueError, AttributeError):
        return False


def embedded_dir(parent: Path | None = None) -> Path:
    """Unpack the shipped PolyRefuse copy (once) and return its directory.

    The copy lives in ``parent / "polyrefuse-embedded" / EMBEDDED_COMMIT`` (``parent`` defaults to pyrefusal's
    cache root). It is unpacked into a temporary sibling, checked file by file against ``data_manifest.json`` and
    renamed into place, so concurrent first runs are safe and a broken copy is never used. An existing copy made
    from the same archive (same sha256) is reused; ~0.3 s to unpack the first time. When the cache is not
    writable, a per-user temporary directory is used instead.

    Args:
        parent: Directory to unpack under, instead of the cache root.

    Returns:
        The directory with the 83 released JSON files and ``LICENSE``.

    Raises:
        DataError: If the archive is missing or damaged, or no writable place exists.
    """
    archive = embedded_archive()
    archive_sha = sha256_file(archive)
    bases = (
        [parent]
        if parent is not None
        else [cache_dir(), Path(tempfile.gettempdir()) / f"pyrefusal-{getattr(os, 'getuid', lambda: 0)()}"]
    )
    errors: list[str] = []
    for base in bases:
        target = base / "polyrefuse-embedded" / EMBEDDED_COMMIT
        if _is_current(target, archive_sha):
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
        except OSError as exc:
            errors.append(f"{target.parent}: {exc.strerror or exc}")
            continue
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the copy is read-only data anyone may read
            _unpack(archive, tmp, archive_sha)
            if target.exists():
                if _is_current(target, archive_sha):  # another process finished first
                    return target
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.rename(tmp, target)
            except OSError:
                if _is_current(target, archive_sha):
                    return target
                raise
            return target
        except OSError as exc:
            errors.append(f"{target}: {exc.strerror or exc}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise DataError(
        "cannot unpack the PolyRefuse copy shipped with pyrefusal (" + "; ".join(errors) + "); set "
        "$PYREFUSAL_CACHE to a writable directory or pass --data-dir"
    )


def build_archive(source: Path | str, output: Path | str, *, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """Write the embedded archive from a PolyRefuse directory (how the shipped file was made).

    Takes ``LICENSE`` and every released ``*_translated_*.json`` at the top level of ``source`` (not ``en-pools/``),
    checks each against the manifest's sha256, and writes a reproducible tar (sorted names, fixed mtime, owner 0)
    compressed with xz preset 9e.

    Args:
        source: A verified PolyRefuse directory (e.g. after ``pyrefusal data fetch``).
        output: The ``.tar.xz`` to write.
        manifest: A manifest dict instead of the shipped one.

    Returns:
        The archived names, sorted.

    Raises:
        DataError: If a file is not in the manifest or its hash differs.
    """
    import lzma

    src = Path(source).expanduser()
    hashes = (
        {str(f["name"]): str(f["sha256"]) for f in manifest["files"]} if manifest is not None else _manifest_hashes()
    )
    names = sorted(p.name for p in src.iterdir() if p.is_file() and (p.name == "LICENSE" or FILE_RE.match(p.name)))
    for name in names:
        if hashes.get(name) != sha256_file(src / name):
            raise DataError(f"{src / name}: not the manifest's file (sha256 differs or unknown); fetch it again")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            data = (src / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _ARCHIVE_MTIME, 0o644
            tar.addfile(info, io.BytesIO(data))
    Path(output).write_bytes(lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pyrefusal.data.embedded build SRC [-o FILE]``: rebuild the shipped archive."""
    parser = argparse.ArgumentParser(prog="python -m pyrefusal.data.embedded", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("build", help="write the embedded .tar.xz from a verified PolyRefuse directory")
    cmd.add_argument("source", type=Path)
    default_out = Path(__file__).parent / EMBEDDED_FOLDER / ARCHIVE_NAME
    cmd.add_argument("-o", "--output", type=Path, default=default_out)
    args = parser.parse_args(argv)
    try:
        names = build_archive(args.source, args.output)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.output}: {len(names)} files, {args.output.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
