"""Back-translation before judging: the paper's rules (cut, empty fallback), caching, English-only refusals."""

from __future__ import annotations

import json

import pytest

from pyrefusal.data.backtranslation import PAPER_MAX_CHARS, BackTranslation, BackTranslator
from pyrefusal.errors import PyrefusalError


class Recorder:
    """A translator that tags each text and records what it was asked."""

    model_sha256 = "0" * 64

    def __init__(self, name: str = "fake:tag", answers: dict[str, str] | None = None) -> None:
        self._name = name
        self.answers = answers or {}
        self.calls: list[tuple[list[str], str, str]] = []

    @property
    def name(self) -> str:
        return self._name

    def translate(self, texts: list[str], source: str, target: str) -> list[str]:
        self.calls.append((list(texts), source, target))
        return [self.answers.get(t, f"<{source}>{t}") for t in texts]


def test_english_passes_through_and_others_are_translated_per_language():
    tr = Recorder()
    bt = BackTranslator(tr, batch_size=2)
    responses = ["Hallo", "Sure, here", "你好", "Welt", "Hallo", "Tschüss"]
    langs = ["de", "en", "zh", "de", "de", "de"]
    out = bt.back_translate(responses, langs)
    assert [b.english for b in out] == ["<de>Hallo", "Sure, here", "<zh>你好", "<de>Welt", "<de>Hallo", "<de>Tschüss"]
    assert out[1].translator == "identity" and out[0].translator == "fake:tag"
    assert all(b.response == r and b.lang == lang for b, r, lang in zip(out, responses, langs, strict=True))
    # one call per language and batch, always into English; the duplicate "Hallo" is translated once
    assert tr.calls == [(["Hallo", "Welt"], "de", "en"), (["Tschüss"], "de", "en"), (["你好"], "zh", "en")]
    assert bt.translated == 4


class Unordered(Recorder):
    """A batch translator (as on Ray replicas) whose batches finish in reverse order."""

    def translate_batches(self, jobs):
        done = [(i, self.translate(*job)) for i, job in enumerate(jobs)]
        yield from reversed(done)


def test_batches_finishing_out_of_order_write_the_same_cache(tmp_path):
    responses = ["Hallo", "Welt", "你好", "Tschüss", "Hallo", "مرحبا", "Guten Tag"]
    langs = ["de", "de", "zh", "de", "de", "ar", "de"]
    plain, unordered = tmp_path / "plain.jsonl", tmp_path / "unordered.jsonl"
    a = BackTranslator(Recorder(), cache_path=plain, batch_size=2).back_translate(responses, langs)
    tr = Unordered()
    b = BackTranslator(tr, cache_path=unordered, batch_size=2).back_translate(responses, langs)
    assert a == b and len(tr.calls) == 4  # de: 2 batches (4 distinct texts), zh: 1, ar: 1
    assert plain.read_bytes() == unordered.read_bytes()  # appended in batch order, not in finishing order


def test_cache_on_disk_survives_a_cut_last_line_and_keys_on_the_translator(tmp_path):
    cache = tmp_path / "bt.jsonl"
    first = BackTranslator(Recorder(), cache_path=cache).back_translate(["eins", "zwei"], ["de", "de"])
    assert len(cache.read_text().splitlines()) == 2
    again = Recorder()
    assert BackTranslator(again, cache_path=cache).back_translate(["eins", "zwei"], ["de", "de"]) == first
    assert again.calls == []
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1][:20])  # an interrupted write
    redo = Recorder()
    assert BackTranslator(redo, cache_path=cache).back_translate(["eins", "zwei"], ["de", "de"]) == first
    assert redo.calls == [(["zwei"], "de", "en")]
    # another translator, or the same text in another language, is not served from the cache
    other = Recorder(name="fake:other")
    BackTranslator(other, cache_path=cache).back_translate(["eins"], ["de"])
    assert other.calls == [(["eins"], "de", "en")]
    bt = BackTranslator(Recorder())
    assert bt.cache_key("de", "eins") != bt.cache_key("nl", "eins")
    # a damaged line in the middle is an error that says what to do
    cache.write_text("not json\n" + cache.read_text())
    with pytest.raises(PyrefusalError, match="delete the file"):
        BackTranslator(Recorder(), cache_path=cache)


def test_paper_rules_cut_long_responses_and_fall_back_on_empty_translations():
    long = "x" * (PAPER_MAX_CHARS + 1001)
    tr = Recorder(answers={"leer": "   "})
    out = BackTranslator(tr).back_translate([long, "leer", "kurz"], ["de", "de", "de"])
    assert tr.calls[0][0][0] == "x" * PAPER_MAX_CHARS
    assert out[0].cut and out[0].response == long and out[0].english == "<de>" + "x" * PAPER_MAX_CHARS
    assert out[1].fallback and out[1].english == "leer"  # the paper judges the original then
    assert not out[2].cut and not out[2].fallback


def test_refusals_only_in_english_are_marked():
    answers = {
        "Hier ist die Anleitung: Schritt 1": "I'm sorry, but I cannot translate this.",
        "Es tut mir leid, das kann ich nicht.": "I'm sorry, I can't do that.",
        "Hier ist ein Gedicht.": "Here is a poem.",
    }
    out = BackTranslator(Recorder(answers=answers)).back_translate(list(answers), ["de"] * 3)
    # the model complied but the translation reads as a refusal (here: the translator refused)
    assert [b.english_only_refusal for b in out] == [True, False, False]


def test_records_round_trip_and_errors_are_clear():
    b = BackTranslation("de", "Hallo", "Hello", "fake:tag", cut=True)
    assert BackTranslation.from_dict(json.loads(json.dumps(b.to_dict()))) == b
    with pytest.raises(PyrefusalError, match="one language each"):
        BackTranslator(Recorder()).back_translate(["a", "b"], ["de"])
    with pytest.raises(PyrefusalError, match="not a translator"):
        BackTranslator(object())  # type: ignore[arg-type]

    class Short(Recorder):
        def translate(self, texts, source, target):
            return texts[:-1]

    with pytest.raises(PyrefusalError, match="one per input"):
        BackTranslator(Short()).back_translate(["a", "b"], ["de", "de"])
