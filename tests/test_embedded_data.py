"""The PolyRefuse copy shipped in the package (pyrefusal.data.embedded) and the data lookup order."""

from __future__ import annotations

import hashlib
import json
import lzma
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyrefusal.cli import main
from pyrefusal.data import embedded
from pyrefusal.data.embedded import (
    ARCHIVE_NAME,
    build_archive,
    embedded_archive,
    embedded_dir,
    resolve_data_source,
    writable_data_dir,
)
from pyrefusal.data.fetch import load_manifest
from pyrefusal.data.polyrefuse import PAPER_LANGUAGES, PolyRefuse, paper_sample
from pyrefusal.errors import DataError

SHARED_POLYREFUSE = Path(__file__).resolve().parents[2] / "shared" / "polyrefuse"
MANIFEST = {f["name"]: f for f in load_manifest()["files"]}
SHIPPED = sorted(name for name, f in MANIFEST.items() if not f["pool"])  # 83 JSON files + LICENSE


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $PYREFUSAL_DATA_DIR, and a private, empty cache root."""
    monkeypatch.delenv("PYREFUSAL_DATA_DIR", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("PYREFUSAL_CACHE", str(cache))
    return cache


def test_the_archive_holds_every_released_file_and_no_pool() -> None:
    archive = embedded_archive()
    assert archive.name == ARCHIVE_NAME and archive.stat().st_size < 1_000_000  # ~0.78 MB for 8.1 MB of JSON
    with tarfile.open(archive, "r:xz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert sorted(members) == SHIPPED and len(SHIPPED) == 84
    for name, body in members.items():
        assert hashlib.sha256(body).hexdigest() == MANIFEST[name]["sha256"], name
    folder = archive.parent
    assert (folder / "LICENSE").read_bytes() == members["LICENSE"]
    provenance = (folder / "PROVENANCE.md").read_text()
    assert "mainlp/Multilingual-Refusal" in provenance and "985169d" in provenance and "Apache" in provenance


@pytest.mark.skipif(not SHARED_POLYREFUSE.is_dir(), reason="shared PolyRefuse copy not found")
def test_the_build_command_reproduces_the_shipped_archive(tmp_path: Path) -> None:
    out = tmp_path / ARCHIVE_NAME
    names = build_archive(SHARED_POLYREFUSE, out)
    assert names == SHIPPED  # en-pools/ left out
    assert out.read_bytes() == embedded_archive().read_bytes()


def test_unpacked_once_checked_and_complete(tmp_path: Path) -> None:
    root = embedded_dir(tmp_path)
    assert root == tmp_path / "polyrefuse-embedded" / embedded.EMBEDDED_COMMIT
    data = PolyRefuse(root)
    assert data.languages() == list(PAPER_LANGUAGES)
    table = data.inventory()
    for lang in PAPER_LANGUAGES:
        expected = {"harmful/train": 260, "harmful/val": 39, "harmful/test": 572}
        expected |= {"harmless/train": 200, "harmless/val": 200, "harmless/test": None if lang == "zh" else 500}
        assert table[lang] == expected, lang
    assert not data.has_en_pools()
    assert len(paper_sample(data, "en")["harmless_train"]) == 128  # drawn from the 200-row file
    stamp = (root / "harmful_train_translated_en.json").stat().st_mtime_ns
    assert embedded_dir(tmp_path) == root  # reused, not unpacked again
    assert (root / "harmful_train_translated_en.json").stat().st_mtime_ns == stamp
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temporary left behind


def test_a_damaged_copy_is_replaced_and_a_damaged_archive_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = embedded_dir(tmp_path)
    (root / "harmful_val_translated_de.json").unlink()
    assert embedded_dir(tmp_path) == root and (root / "harmful_val_translated_de.json").is_file()

    bad = tmp_path / "bad" / ARCHIVE_NAME
    bad.parent.mkdir()
    with tarfile.open(embedded_archive(), "r:xz") as tar:
        raw = bytearray(lzma.decompress(embedded_archive().read_bytes()))
        offset = tar.getmember("harmful_test_translated_fr.json").offset_data + 100
    raw[offset] ^= 0x20  # one changed letter inside a file: the tar stays valid, the sha256 does not
    bad.write_bytes(lzma.compress(bytes(raw)))
    monkeypatch.setattr(embedded, "embedded_archive", lambda: bad)
    with pytest.raises(DataError, match=r"harmful_test_translated_fr\.json has sha256"):
        embedded_dir(tmp_path / "other")
    assert not (tmp_path / "other" / "polyrefuse-embedded" / embedded.EMBEDDED_COMMIT).exists()


def test_lookup_order(clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = resolve_data_source()
    assert source.origin == "embedded" and source.path == clean_env.resolve() / "polyrefuse-embedded" / "985169d"
    assert source.to_dict() == {"origin": "embedded", "path": str(source.path), "en_pools": False}
    assert "shipped with pyrefusal" in source.describe() and "pyrefusal data fetch" in source.describe()

    fetched = clean_env / "polyrefuse"  # what `pyrefusal data fetch` fills
    fetched.mkdir(parents=True)
    assert resolve_data_source().origin == "embedded"  # an empty cache is not a source
    (fetched / "harmful_train_translated_en.json").write_text("[]")
    assert (resolve_data_source().origin, resolve_data_source().path) == ("fetched", fetched.resolve())

    env_dir = tmp_path / "env"
    monkeypatch.setenv("PYREFUSAL_DATA_DIR", str(env_dir))
    assert (resolve_data_source().origin, resolve_data_source().path) == ("$PYREFUSAL_DATA_DIR", env_dir)
    assert resolve_data_source(env_dir).origin == "$PYREFUSAL_DATA_DIR"  # the CLI fills --data-dir from it
    explicit = resolve_data_source(tmp_path / "mine")
    assert (explicit.origin, explicit.path) == ("--data-dir", tmp_path / "mine")


def test_cli_where_and_verify_use_the_shipped_copy(clean_env: Path) -> None:
    r = CliRunner().invoke(main, ["data", "where"])
    assert r.exit_code == 0 and "shipped with pyrefusal" in r.output
    r = CliRunner().invoke(main, ["data", "verify", "--json"])
    report = json.loads(r.output)
    assert r.exit_code == 0 and report["ok"] and report["n_present"] == 83
    assert sorted(report["missing"]) == [
        "en-pools/harmless_train.json",
        "en-pools/harmless_val.json",
        "harmless_test_translated_zh.json",
    ]


def test_an_unwritable_cache_falls_back_to_a_temporary_directory(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_env.write_text("not a directory")  # the cache root cannot hold anything
    monkeypatch.setattr(embedded.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    source = resolve_data_source()
    assert source.origin == "embedded" and str(source.path).startswith(str(tmp_path / "tmp"))
    assert PolyRefuse(source.path).has("de", "test", "harmful")


def test_run_without_data_dir_reads_the_shipped_copy_and_ends_with_a_summary(
    clean_env: Path, tiny_model, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = [
        "run", "--model", str(tiny_model[0]), "--threads", "1", "--target-langs", "en,de", "--n-train", "6",
        "--n-val", "4", "--n-test", "2", "--max-new-tokens", "4", "--kl-threshold", "1e9", "--n-seq", "8",
        "--refusal-openings", "I", "--no-capability", "--out", str(out),
    ]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    embedded_path = clean_env.resolve() / "polyrefuse-embedded" / "985169d"
    assert "data: PolyRefuse from the copy shipped with pyrefusal (mainlp/Multilingual-Refusal@985169d): " in r.output
    results = json.loads((out / "results.json").read_text())
    assert results["data_source"] == {"origin": "embedded", "path": str(embedded_path), "en_pools": False}
    # the end of the run: a short summary and the paths, not report.md nor a JSON blob
    tail = r.output[r.output.index("direction: layer") :]
    assert f"layer {results['direction']['layer']}, position {results['direction']['position']}" in tail
    assert "# " not in tail and "{" not in tail and len(tail.splitlines()) <= 8
    rate = results["evaluation"]["de"]["ablation"]["refusal_rate"]
    assert any(line.split()[0] == "de" and f"{100 * rate:.0f}%" in line for line in tail.splitlines()[2:-1])
    assert f"written to {out}: report.md" in tail and (out / "report.md").is_file()


def test_files_are_added_to_the_fetched_cache_seeded_from_the_shipped_copy(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = writable_data_dir()
    assert target == clean_env.resolve() / "polyrefuse"
    assert sorted(p.name for p in target.iterdir()) == SHIPPED  # a complete copy, not one built file alone
    (target / "harmless_test_translated_zh.json").write_text('[{"instruction": "x", "instruction_translated": "y"}]')
    source = resolve_data_source()
    assert source.origin == "fetched" and PolyRefuse(source.path).has("zh", "test", "harmless")
    assert writable_data_dir() == target  # already a copy: used as is
    monkeypatch.setenv("PYREFUSAL_DATA_DIR", str(tmp_path / "mine"))
    assert writable_data_dir() == tmp_path / "mine"
