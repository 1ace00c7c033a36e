"""Tests for pyrefusal.data.polyrefuse: the released PolyRefuse files (from ../shared) and synthetic bad inputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pyrefusal.data.polyrefuse import (
    PAPER_LANGUAGES,
    PolyRefuse,
    Prompt,
    default_data_dir,
    paper_sample,
    sample,
)
from pyrefusal.errors import DataError, PyrefusalError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "polyrefuse"

needs_shared = pytest.mark.skipif(
    not (SHARED / "harmful_train_translated_en.json").is_file(),
    reason=f"the shared PolyRefuse copy is not at {SHARED} (CI keeps it at ../shared beside the checkout)",
)


@pytest.fixture(scope="module")
def data() -> PolyRefuse:
    return PolyRefuse(SHARED)


def write(path: Path, content: object) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------- real dataset
@needs_shared
def test_fourteen_languages_in_paper_order(data: PolyRefuse) -> None:
    assert data.languages() == list(PAPER_LANGUAGES)


@needs_shared
def test_sizes(data: PolyRefuse) -> None:
    inventory = data.inventory()
    assert list(inventory) == list(PAPER_LANGUAGES)
    for lang, row in inventory.items():
        assert row["harmful/train"] == 260, lang
        assert row["harmful/val"] == 39, lang
        assert row["harmful/test"] == 572, lang
        assert row["harmless/train"] == 200, lang
        assert row["harmless/val"] == 200, lang
        assert row["harmless/test"] == (None if lang == "zh" else 500), lang
    assert len(data.load("de", "test", "harmful")) == 572


@needs_shared
def test_zh_has_no_harmless_test_and_the_error_says_so(data: PolyRefuse) -> None:
    assert not data.has("zh", "test", "harmless")
    assert data.has("zh", "test", "harmful")
    with pytest.raises(DataError) as info:
        data.load("zh", "test", "harmless")
    message = str(info.value)
    assert "harmless_test_translated_zh.json" in message
    assert "harmful_test_translated_zh.json" in message  # lists what does exist
    assert "no zh harmless_test" in message
    assert "pyrefusal data build" in message


@needs_shared
def test_unknown_language_lists_present_ones(data: PolyRefuse) -> None:
    with pytest.raises(DataError, match=r"no file at all for language 'qq'.*languages present: en, de"):
        data.load("qq", "train", "harmful")


@needs_shared
def test_test_files_are_translated(data: PolyRefuse) -> None:
    de = data.load("de", "test", "harmful")
    en = data.load("en", "test", "harmful")
    first = de[0]
    assert first.id == "harmful/test/de/0"
    assert (first.lang, first.kind, first.split) == ("de", "harmful", "test")
    assert first.text != first.text_en
    assert first.text_en == en[0].text
    assert first.category == "Harassment/Discrimination"
    assert sum(p.text != p.text_en for p in de) == len(de)
    # English test prompts are their own English original.
    assert all(p.text == p.text_en for p in en)
    assert de[17].id == "harmful/test/de/17"


@needs_shared
def test_train_val_rows_are_aligned_translations(data: PolyRefuse) -> None:
    for split in ("train", "val"):
        for kind in ("harmful", "harmless"):
            de = data.load("de", split, kind)
            en = data.load("en", split, kind)
            assert len(de) == len(en)
            assert all(d.text != e.text for d, e in zip(de, en, strict=True))
            assert all(d.text_en is None for d in de)
            assert all(e.text_en == e.text for e in en)
    assert "hack" in data.load("en", "train", "harmful")[0].text
    assert "hacken" in data.load("de", "train", "harmful")[0].text


@needs_shared
def test_load_is_cached_but_returns_fresh_lists(data: PolyRefuse) -> None:
    first = data.load("ja", "val", "harmful")
    first.clear()
    second = data.load("ja", "val", "harmful")
    assert len(second) == 39
    assert second[0] is data.load("ja", "val", "harmful")[0]


@needs_shared
def test_paper_sample_is_deterministic(data: PolyRefuse) -> None:
    a = paper_sample(data, "de")
    b = paper_sample(data, "de", seed=1)
    c = paper_sample(data, "de", seed=2)
    assert list(a) == ["harmless_train", "harmful_train", "harmless_val", "harmful_val"]
    assert {k: len(v) for k, v in a.items()} == {
        "harmless_train": 128,
        "harmful_train": 128,
        "harmless_val": 32,
        "harmful_val": 32,
    }
    assert a == b
    assert [p.id for p in a["harmful_train"]] != [p.id for p in c["harmful_train"]]
    assert all(p.kind == "harmful" and p.split == "train" for p in a["harmful_train"])
    assert len({p.id for p in a["harmful_train"]}) == 128  # without replacement


@needs_shared
def test_paper_sample_follows_the_paper_call_order(data: PolyRefuse) -> None:
    rng = random.Random(1)
    expected = [
        rng.sample(range(200), 128),  # harmless train
        rng.sample(range(260), 128),  # harmful train
        rng.sample(range(200), 32),  # harmless val
        rng.sample(range(39), 32),  # harmful val
    ]
    got = paper_sample(data, "fr")
    rows = [[int(p.id.rsplit("/", 1)[1]) for p in prompts] for prompts in got.values()]
    assert rows == expected


@needs_shared
def test_same_rows_across_non_english_languages(data: PolyRefuse) -> None:
    de = paper_sample(data, "de")
    yo = paper_sample(data, "yo")
    for key in de:
        assert [p.id.rsplit("/", 1)[1] for p in de[key]] == [p.id.rsplit("/", 1)[1] for p in yo[key]]


@needs_shared
def test_english_uses_the_full_alpaca_pools_when_present(data: PolyRefuse) -> None:
    assert data.has_en_pools()
    assert len(data.load_en_pool("train")) == 18_793
    assert len(data.load_en_pool("val")) == 6_264
    auto = paper_sample(data, "en")
    assert all(p.id.startswith("harmless/train/en/pool/") for p in auto["harmless_train"])
    assert all(p.id.startswith("harmless/val/en/pool/") for p in auto["harmless_val"])
    assert all(p.id.startswith("harmful/train/en/") for p in auto["harmful_train"])
    plain = paper_sample(data, "en", pool_dir=None)
    assert all("/pool/" not in p.id for v in plain.values() for p in v)
    # With the 200-row English files, English draws the same rows as every other language.
    de = paper_sample(data, "de")
    assert [p.id.rsplit("/", 1)[1] for p in plain["harmful_train"]] == [
        p.id.rsplit("/", 1)[1] for p in de["harmful_train"]
    ]


def test_explicit_missing_pool_dir_raises(tmp_path: Path) -> None:
    write(tmp_path / "harmful_train_translated_en.json", [{"instruction": "a"}])
    with pytest.raises(DataError, match=r"harmless_train\.json not found"):
        paper_sample(PolyRefuse(tmp_path), "en", pool_dir=tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ sampling
def _prompts(n: int) -> list[Prompt]:
    return [Prompt(f"harmful/train/xx/{i}", f"p{i}", None, "xx", "harmful", "train") for i in range(n)]


def test_sample_matches_random_sample() -> None:
    pool = _prompts(50)
    assert sample(pool, 10, random.Random(7)) == random.Random(7).sample(pool, 10)


def test_sample_returns_everything_in_order_when_n_is_large() -> None:
    pool = _prompts(5)
    rng = random.Random(3)
    state = rng.getstate()
    assert sample(pool, 5, rng) == pool
    assert sample(pool, 99, rng) == pool
    assert rng.getstate() == state  # no randomness consumed
    assert sample(pool, 0, rng) == []
    with pytest.raises(DataError):
        sample(pool, -1, rng)


# --------------------------------------------------------------------------------------- Prompt values
def test_prompt_round_trips_through_json() -> None:
    prompt = Prompt("harmful/test/de/17", "Text", "Text en", "de", "harmful", "test", "Malware/Hacking")
    assert Prompt.from_dict(json.loads(json.dumps(prompt.to_dict()))) == prompt
    with pytest.raises(DataError, match="'text'"):
        Prompt.from_dict({"id": "x", "lang": "de", "kind": "harmful", "split": "test"})
    with pytest.raises(DataError, match="kind"):
        Prompt.from_dict({"id": "x", "text": "t", "lang": "de", "kind": "evil", "split": "test"})


# ------------------------------------------------------------------------------------ synthetic inputs
def test_missing_root(tmp_path: Path) -> None:
    data = PolyRefuse(tmp_path / "absent")
    assert not data.has("en", "train", "harmful")
    for call in (data.languages, data.inventory, lambda: data.load("en", "train", "harmful")):
        with pytest.raises(DataError) as info:
            call()
        message = str(info.value)
        assert "no PolyRefuse files in" in message
        assert "absent" in message
        assert "pyrefusal data fetch" in message
        assert "--data-dir" in message
        assert "harmful_train_translated_en.json" in message


def test_empty_root(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError, match="no PolyRefuse files"):
        PolyRefuse(tmp_path).languages()


def test_bad_json_names_file_and_position(tmp_path: Path) -> None:
    write(tmp_path / "harmful_train_translated_de.json", '[{"instruction": "a"},\n {"instruction": }]')
    with pytest.raises(DataError) as info:
        PolyRefuse(tmp_path).load("de", "train", "harmful")
    message = str(info.value)
    assert "harmful_train_translated_de.json" in message
    assert "line 2" in message
    assert "column" in message


def test_not_a_list(tmp_path: Path) -> None:
    write(tmp_path / "harmful_val_translated_de.json", {"instruction": "a"})
    with pytest.raises(DataError, match=r"harmful_val_translated_de\.json.*JSON list.*object"):
        PolyRefuse(tmp_path).load("de", "val", "harmful")


def test_record_not_an_object(tmp_path: Path) -> None:
    write(tmp_path / "harmful_val_translated_de.json", [{"instruction": "a"}, "b"])
    with pytest.raises(DataError) as info:
        PolyRefuse(tmp_path).load("de", "val", "harmful")
    message = str(info.value)
    assert "harmful_val_translated_de.json" in message
    assert "record 1" in message
    assert "'instruction'" in message


@pytest.mark.parametrize(
    ("records", "index", "key", "what"),
    [
        ([{"instruction": "a"}, {"category": None}], 1, "instruction", "missing"),
        ([{"instruction": "a"}, {"instruction": "b"}, {"instruction": ""}], 2, "instruction", "empty"),
        ([{"instruction": "   "}], 0, "instruction", "empty"),
        ([{"instruction": 3}], 0, "instruction", "must be a string"),
        ([{"instruction": "a", "category": 5}], 0, "category", "string or null"),
    ],
)
def test_bad_records_name_file_index_and_key(
    tmp_path: Path, records: list[object], index: int, key: str, what: str
) -> None:
    write(tmp_path / "harmless_train_translated_de.json", records)
    with pytest.raises(DataError) as info:
        PolyRefuse(tmp_path).load("de", "train", "harmless")
    message = str(info.value)
    assert "harmless_train_translated_de.json" in message
    assert f"record {index}" in message
    assert f"'{key}'" in message
    assert what in message


def test_non_english_test_file_needs_a_translation(tmp_path: Path) -> None:
    write(tmp_path / "harmful_test_translated_de.json", [{"instruction": "english", "category": None}])
    with pytest.raises(DataError, match=r"record 0: key 'instruction_translated' is missing"):
        PolyRefuse(tmp_path).load("de", "test", "harmful")
    write(tmp_path / "harmful_test_translated_en.json", [{"instruction": "english", "category": None}])
    (prompt,) = PolyRefuse(tmp_path).load("en", "test", "harmful")
    assert prompt.text == prompt.text_en == "english"


def test_made_up_language_is_discovered(tmp_path: Path) -> None:
    write(tmp_path / "harmful_train_translated_xx.json", [{"instruction": "xx one", "category": None}])
    write(tmp_path / "harmful_train_translated_en.json", [{"instruction": "en one", "category": None}])
    write(tmp_path / "harmful_test_back_translated_de.json", [])  # not a PolyRefuse split file
    write(tmp_path / "jailbreakbench_test_translated_de.json", [])
    data = PolyRefuse(tmp_path)
    assert data.languages() == ["en", "xx"]
    assert data.has("xx", "train", "harmful")
    assert not data.has("xx", "val", "harmful")
    (prompt,) = data.load("xx", "train", "harmful")
    assert prompt == Prompt("harmful/train/xx/0", "xx one", None, "xx", "harmful", "train", None)
    assert data.inventory()["xx"] == {
        "harmful/train": 1,
        "harmful/val": None,
        "harmful/test": None,
        "harmless/train": None,
        "harmless/val": None,
        "harmless/test": None,
    }


def test_bad_kind_or_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown split 'dev'"):
        PolyRefuse(tmp_path).load("en", "dev", "harmful")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="unknown kind"):
        PolyRefuse(tmp_path).has("en", "train", "evil")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="invalid language code"):
        PolyRefuse(tmp_path).load("../etc", "train", "harmful")


def test_data_error_is_a_pyrefusal_error() -> None:
    assert issubclass(DataError, PyrefusalError)


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYREFUSAL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PYREFUSAL_CACHE", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "data"
    monkeypatch.delenv("PYREFUSAL_DATA_DIR")
    assert default_data_dir() == tmp_path / "cache" / "polyrefuse"
    monkeypatch.delenv("PYREFUSAL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".cache" / "pyrefusal" / "polyrefuse"
