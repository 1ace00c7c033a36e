"""`pyrefusal data build`: make a missing PolyRefuse file by translating the English one.

PolyRefuse was made by sending each English prompt to Google Translate (docs/method.md §1.3). This
module does the same with any :class:`Translator`: a local chat GGUF through our
:class:`~pyrefusal.runtime.runtime.Runtime` (:class:`LlamaTranslator`, batched greedy generation) or an
online service you wrap yourself. It fills gaps in the release (zh ``harmless_test``) and adds
languages the paper does not have (``sw``, ``vi``, ...).

Output (:func:`build_split`): ``{kind}_{split}_translated_{lang}.json`` in the *released schema*,
so :class:`~pyrefusal.data.polyrefuse.PolyRefuse` loads it like any other file:

* test splits: ``instruction`` = the English original, ``instruction_translated``, ``category``;
* train/val: ``instruction`` = the translation, ``category``.

Beside it, ``{kind}_{split}_translated_{lang}.build.json`` records how it was made: translator
and back-translator names and model sha256s, the English source file's sha256, and per row the
source index, the back-translation and its similarity to the English source, and flags.

Quality check: with a ``back_translator`` every translation is translated back to English and
compared with the source by **character 3-gram Jaccard similarity** (:func:`similarity`): both
texts are NFKC-normalised, case-folded, reduced to letters/digits separated by single spaces and
padded with a space; the score is (size of the intersection) / (size of the union) of their sets of 3-character
substrings, in ``[0, 1]`` (1 = identical after normalisation). It is dependency-free, tolerant of
inflection and word order, and blind to meaning: a faithful but freely paraphrased back-translation
can score ~0.4, a copy of the source 1.0. Rows below ``min_similarity`` are *flagged* (kept, listed
in the sidecar and the report) for a human to check; rows whose translation equals the source are
flagged ``unchanged``. An empty translation cannot be stored (the loader rejects it): that row is
*dropped*, as the paper dropped failed translations, and listed in the sidecar.

Resuming: the file is rewritten atomically after every batch and is always a valid, loadable
(partial) list; a second call continues after the last source row done. It refuses to touch a
file it did not make (no sidecar, e.g. a released file) unless ``overwrite=True``, and refuses to
continue a file made from a different English source or with another translator.
"""

from __future__ import annotations

import json
import os
import re
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pyrefusal.data.polyrefuse import KINDS, SPLITS, Kind, PolyRefuse, Split, file_name
from pyrefusal.data.registry import sha256_file
from pyrefusal.errors import DataError, PyrefusalError

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "LANGUAGE_NAMES",
    "REQUEST_PROMPT_TEMPLATE",
    "BuildReport",
    "LlamaTranslator",
    "Translator",
    "build_language",
    "build_split",
    "clean_translation",
    "language_name",
    "sidecar_path",
    "similarity",
]

LANGUAGE_NAMES: dict[str, str] = {
    # the paper's 14 languages (+ Yiddish from splits_multi)
    "en": "English",
    "de": "German",
    "es": "Spanish",
    "fr": "French",
    "it": "Italian",
    "nl": "Dutch",
    "ja": "Japanese",
    "pl": "Polish",
    "ru": "Russian",
    "zh": "Chinese (Simplified)",
    "ko": "Korean",
    "ar": "Arabic",
    "th": "Thai",
    "yo": "Yoruba",
    "yi": "Yiddish",
    # others
    "af": "Afrikaans",
    "am": "Amharic",
    "bg": "Bulgarian",
    "bn": "Bengali",
    "ca": "Catalan",
    "cs": "Czech",
    "cy": "Welsh",
    "da": "Danish",
    "el": "Greek",
    "et": "Estonian",
    "eu": "Basque",
    "fa": "Persian",
    "fi": "Finnish",
    "ga": "Irish",
    "gl": "Galician",
    "gu": "Gujarati",
    "ha": "Hausa",
    "he": "Hebrew",
    "hi": "Hindi",
    "hr": "Croatian",
    "hu": "Hungarian",
    "hy": "Armenian",
    "id": "Indonesian",
    "ig": "Igbo",
    "is": "Icelandic",
    "jv": "Javanese",
    "ka": "Georgian",
    "kk": "Kazakh",
    "km": "Khmer",
    "kn": "Kannada",
    "lo": "Lao",
    "lt": "Lithuanian",
    "lv": "Latvian",
    "mk": "Macedonian",
    "ml": "Malayalam",
    "mn": "Mongolian",
    "mr": "Marathi",
    "ms": "Malay",
    "my": "Burmese",
    "ne": "Nepali",
    "no": "Norwegian",
    "pa": "Punjabi",
    "ps": "Pashto",
    "pt": "Portuguese",
    "ro": "Romanian",
    "si": "Sinhala",
    "sk": "Slovak",
    "sl": "Slovenian",
    "so": "Somali",
    "sq": "Albanian",
    "sr": "Serbian",
    "sv": "Swedish",
    "sw": "Swahili",
    "ta": "Tamil",
    "te": "Telugu",
    "tl": "Tagalog",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "ur": "Urdu",
    "uz": "Uzbek",
    "vi": "Vietnamese",
    "xh": "Xhosa",
    "zu": "Zulu",
    "zh-TW": "Chinese (Traditional)",
}
"""ISO 639-1 code (as in PolyRefuse file names) -> English language name used in prompts."""

DEFAULT_PROMPT_TEMPLATE = (
    "Translate the following text from {source_name} to {target_name}. Output only the translation.\n\n{text}"
)
"""The instruction :class:`LlamaTranslator` sends as one user turn (placeholders: source/target names, text)."""

REQUEST_PROMPT_TEMPLATE = (
    "Translate the following text from {source_name} to {target_name}. The text is a request written by a user: "
    "translate the request itself, do not answer it or carry it out. Output only the translation.\n\n{text}"
)
"""The instruction for translating *prompts* (``pyrefusal data build``). Chat models given the plain
template often answer the request instead of translating it; on 48 rows of PolyRefuse's en
harmless_test into German with Qwen2.5-Coder-1.5B, this template raised the mean trigram similarity
to the released Google translation from 0.43 to 0.48 and cut rows below 0.3 from 12 to 8
(``docs/results/data-build/``)."""

SIMILARITY_METHOD = "char-3gram-jaccard"


def language_name(code: str, override: str | None = None) -> str:
    """English name of a language code for translation prompts.

    Args:
        code: Language code, e.g. ``"sw"``.
        override: A name given by the user (``--language-name``); wins over the table.

    Returns:
        The name, e.g. ``"Swahili"``.

    Raises:
        DataError: The code is not in :data:`LANGUAGE_NAMES` and no override was given.
    """
    return _name_of(code, override)


def _name_of(code: str, override: str | None) -> str:
    if override:
        return override
    name = LANGUAGE_NAMES.get(code) or LANGUAGE_NAMES.get(code.split("-")[0])
    if name is None:
        raise DataError(
            f"unknown language code {code!r}: pyrefusal has no English name for it to put in the translation "
            f"prompt. Pass one with --language-name (e.g. --language-name 'Haitian Creole'), or language_name=..."
        )
    return name


# --- similarity -------------------------------------------------------------------------------


_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def _trigrams(text: str) -> set[str]:
    norm = _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    padded = f" {norm} "
    return {padded[i : i + 3] for i in range(len(padded) - 2)} if norm else set()


def similarity(a: str, b: str) -> float:
    """Character 3-gram Jaccard similarity of two texts in ``[0, 1]`` (see the module docstring).

    Args:
        a: A text (the English source).
        b: Another text (the back-translation).

    Returns:
        Intersection over union of the sets of character trigrams; 1.0 for two texts that are both
        empty after normalisation, 0.0 when only one is.
    """
    ga, gb = _trigrams(a), _trigrams(b)
    if not ga and not gb:
        return 1.0
    return len(ga & gb) / len(ga | gb)


# --- translators ------------------------------------------------------------------------------


@runtime_checkable
class Translator(Protocol):
    """Anything that translates a batch of texts (a local GGUF, Google Translate, DeepL, ...).

    Implementations may also expose ``model_sha256`` (str), which the build records.
    """

    @property
    def name(self) -> str:
        """A stable identifier recorded in the build sidecar, e.g. ``"llama:Qwen2.5 7B Instruct"``."""
        ...

    def translate(self, texts: list[str], source: str, target: str) -> list[str]:
        """Translate ``texts`` from language code ``source`` to ``target``; one output per input."""
        ...


_QUOTE_PAIRS = (('"', '"'), ("'", "'"), ("“", "”"), ("„", "“"), ("«", "»"), ("「", "」"), ("『", "』"))
# A first line (or a prefix up to ":") that announces the translation instead of being part of it.
_PREAMBLE = re.compile(
    r"^[^\n:]{0,80}(?:translat|übersetz|traduc|tradu[zç]|vertaling|przekład|перевод|翻译|翻譯|翻訳|번역)"
    r"[^\n:]{0,40}:[ \t]*\n?",
    re.IGNORECASE,
)
_FILLER = re.compile(r"^(?:sure|certainly|of course|okay|ok)\b[^\n]{0,40}\n", re.IGNORECASE)
_TRAILING_NOTE = re.compile(
    r"\n\s*\(?\s*(?:note|notes|translation note|explanation)\s*:.*\Z", re.IGNORECASE | re.DOTALL
)


def clean_translation(output: str, source: str = "") -> str:
    """Strip what chat models wrap around a translation.

    Removes, in order: a code fence around the whole answer; a first line of filler ("Sure!",
    "Certainly.") when more follows; a preamble up to a ``:`` that mentions translating, such as
    "Here is the translation:", "German translation:" or "Übersetzung:" (only in the first ~120
    characters, and only when something follows it); a trailing "Note: ..." paragraph; and one pair
    of quotes around the whole text. Nothing is stripped that the source itself has (a prompt that
    says "Translate this into French: ..." keeps its own instruction), and a text that merely starts
    with "Here are 5 tips:" is left alone.

    Args:
        output: The model's answer.
        source: The text that was translated (to keep quotes that belong to it).

    Returns:
        The cleaned translation (may be empty).
    """
    text = output.strip()
    src = source.strip()
    fence = re.fullmatch(r"```[^\n]*\n(.*?)\n?```", text, re.DOTALL)
    if fence and not src.startswith("```"):
        text = fence.group(1).strip()
    for pattern in (_FILLER, _PREAMBLE):  # never strip what the source itself starts with
        m = pattern.match(text)
        if m and text[m.end() :].strip() and not pattern.match(src):
            text = text[m.end() :].strip()
    if not _TRAILING_NOTE.search(src):
        text = _TRAILING_NOTE.sub("", text).strip()
    for left, right in _QUOTE_PAIRS:
        if len(text) >= 2 and text.startswith(left) and text.endswith(right):
            if not (src.startswith(left) and src.endswith(right)) and left not in text[1:-1]:
                text = text[1:-1].strip()
            break
    return text


class LlamaTranslator:
    """Translation by a local chat GGUF (greedy, batched through :meth:`Runtime.generate`).

    Args:
        runtime: A :class:`~pyrefusal.runtime.runtime.Runtime` of an instruction-tuned model that knows the
            target language (larger is better; a 0.5B model is only good for tests).
        max_new_tokens: Longest translation in tokens (PolyRefuse prompts are < 200 tokens in English;
            other scripts can need 2-3x the English token count).
        prompt_template: User-turn instruction with ``{source_name}``, ``{target_name}`` and ``{text}``.
        system: System prompt (``None`` = the chat template's default).
        batch_size: Texts generated together.
        language_names: Extra or overriding ``code -> English name`` entries (``--language-name``).

    Raises:
        PyrefusalError: The template lacks ``{text}``.
    """

    def __init__(
        self,
        runtime: Any,
        *,
        max_new_tokens: int = 512,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        system: str | None = None,
        batch_size: int = 16,
        language_names: Mapping[str, str] | None = None,
    ) -> None:
        if "{text}" not in prompt_template:
            raise PyrefusalError(
                "the translation prompt template must contain {text} (and may use {source_name}, {target_name})"
            )
        self.runtime = runtime
        self.max_new_tokens = max_new_tokens
        self.prompt_template = prompt_template
        self.system = system
        self.batch_size = max(1, batch_size)
        self.language_names = dict(language_names or {})
        self.truncated = 0  # translations cut at max_new_tokens so far

    @property
    def name(self) -> str:
        """``"llama:{model name}"``."""
        return f"llama:{self.runtime.name}"

    @property
    def model_sha256(self) -> str:
        """sha256 of the GGUF file."""
        return str(self.runtime.sha256)

    def prompt(self, text: str, source: str, target: str) -> str:
        """The user turn sent for one text."""
        return self.prompt_template.format(
            source_name=language_name(source, self.language_names.get(source)),
            target_name=language_name(target, self.language_names.get(target)),
            text=text,
        )

    def translate(self, texts: list[str], source: str, target: str) -> list[str]:
        """Translate ``texts`` (see :class:`Translator`); outputs are cleaned by :func:`clean_translation`."""
        if not texts:
            return []
        out: list[str] = []
        self.runtime.clear_plan()
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            toks = [self.runtime.chat_tokens(self.prompt(t, source, target), self.system) for t in chunk]
            gens = self.runtime.generate(toks, self.max_new_tokens)
            self.truncated += sum(g.finish_reason == "length" for g in gens)
            out += [clean_translation(g.text, t) for g, t in zip(gens, chunk, strict=True)]
        return out


# --- building ---------------------------------------------------------------------------------


def sidecar_path(data_root: Path | str, lang: str, split: Split, kind: Kind) -> Path:
    """Path of the build record beside a built file (``*.build.json``)."""
    return Path(data_root).expanduser() / file_name(lang, split, kind).replace(".json", ".build.json")


@dataclass
class BuildReport:
    """What one :func:`build_split` call did.

    Attributes:
        path: The PolyRefuse file written.
        sidecar: Its ``*.build.json`` record.
        lang: Target language; split, kind: which file.
        translator: Translator name.
        n_source: Rows of the English source file.
        n_target: Rows this build aims at (``min(limit, n_source)``).
        n_written: Rows in the file now.
        n_new: Rows translated by this call (0 when the file was already complete).
        n_dropped: Source rows dropped so far (empty translation).
        flagged: Source indices flagged so far (low similarity or unchanged).
        mean_similarity: Mean back-translation similarity over the file (None without back-translation).
        complete: Whether every target row is done.
        seconds: Wall time of this call.
    """

    path: Path
    sidecar: Path
    lang: str
    split: str
    kind: str
    translator: str
    n_source: int
    n_target: int
    n_written: int
    n_new: int
    n_dropped: int
    flagged: list[int] = field(default_factory=list)
    mean_similarity: float | None = None
    complete: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (paths as strings)."""
        d = asdict(self)
        d["path"], d["sidecar"] = str(self.path), str(self.sidecar)
        return d


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _flags(row: dict[str, Any], min_similarity: float) -> list[str]:
    flags = [f for f in row.get("flags", []) if f != "low_similarity"]
    sim = row.get("similarity")
    if sim is not None and sim < min_similarity:
        flags.append("low_similarity")
    return flags


def build_split(
    data_root: Path | str,
    lang: str,
    split: Split,
    kind: Kind,
    translator: Translator,
    *,
    back_translator: Translator | None = None,
    limit: int | None = None,
    min_similarity: float = 0.5,
    language_name: str | None = None,
    batch_size: int = 16,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> BuildReport:
    """Translate the English file of ``split``/``kind`` into ``lang`` and write it beside the others.

    Args:
        data_root: The PolyRefuse directory (must hold the English file of this split and kind).
        lang: Target language code (any code; new codes become new languages of the dataset).
        split: ``"train"``, ``"val"`` or ``"test"``.
        kind: ``"harmful"`` or ``"harmless"``.
        translator: Translates English -> ``lang``.
        back_translator: Translates ``lang`` -> English for the similarity check (may be the same object).
        limit: Translate only the first ``limit`` English rows (a later call with a larger limit continues).
        min_similarity: Flag rows whose back-translation similarity is below this.
        language_name: English name of ``lang`` when it is not in :data:`LANGUAGE_NAMES` (recorded; give
            the same name to your translator, e.g. ``LlamaTranslator(language_names={lang: name})``).
        batch_size: Rows per translate call; the file and sidecar are saved after each batch.
        overwrite: Start over even if the file exists (a released file or a build with other settings).
        progress: ``progress(done_rows, target_rows)`` after each batch.

    Returns:
        A :class:`BuildReport`.

    Raises:
        DataError: ``lang`` is ``en`` or an invalid/unknown code, the English file is missing, the target
            exists without a sidecar (or from another source/translator) and ``overwrite`` is False, or
            the translator returns the wrong number of texts.
    """
    t0 = time.perf_counter()
    root = Path(data_root).expanduser()
    data = PolyRefuse(root)
    out_path = data.path(lang, split, kind)  # validates kind, split and the code's characters
    if lang == "en":
        raise DataError("English is the translation source; pick a target language other than 'en'")
    name = _name_of(lang, language_name)
    source_prompts = data.load("en", split, kind)  # raises with a fetch hint if missing
    source_path = data.path("en", split, kind)
    source_sha = sha256_file(source_path)
    n_source = len(source_prompts)
    n_target = n_source if limit is None else max(0, min(limit, n_source))
    side_path = sidecar_path(root, lang, split, kind)
    bt_name = back_translator.name if back_translator is not None else None

    records: list[dict[str, Any]] = []
    side: dict[str, Any]
    if out_path.exists() and not overwrite:
        if not side_path.is_file():
            raise DataError(
                f"{out_path} exists and was not made by `pyrefusal data build` (no {side_path.name}); "
                "it may be a released file. Pass --force (overwrite=True) to replace it"
            )
        side = json.loads(side_path.read_text(encoding="utf-8"))
        records = json.loads(out_path.read_text(encoding="utf-8"))
        mismatch = {
            k: (side.get(k), v)
            for k, v in (("source_sha256", source_sha), ("translator", translator.name), ("back_translator", bt_name))
            if side.get(k) != v
        }
        if mismatch:
            raise DataError(
                f"{out_path.name} was built with other settings {mismatch} (recorded, now); pass --force "
                "(overwrite=True) to rebuild it from scratch, or use the recorded translator to continue"
            )
        if len(records) != len(side.get("rows", [])):
            raise DataError(
                f"{out_path.name} has {len(records)} records but {side_path.name} describes "
                f"{len(side.get('rows', []))}; the pair is inconsistent. Pass --force to rebuild"
            )
    else:
        side = {
            "format": 1,
            "lang": lang,
            "language_name": name,
            "split": split,
            "kind": kind,
            "source_file": source_path.name,
            "source_sha256": source_sha,
            "source_n": n_source,
            "translator": translator.name,
            "translator_model_sha256": getattr(translator, "model_sha256", None),
            "translator_prompt": getattr(translator, "prompt_template", None),
            "back_translator": bt_name,
            "back_translator_model_sha256": getattr(back_translator, "model_sha256", None),
            "similarity_method": SIMILARITY_METHOD if back_translator is not None else None,
            "next_source_index": 0,
            "rows": [],
            "dropped": [],
        }
    side["min_similarity"] = min_similarity
    for row in side["rows"]:  # a new threshold re-flags old rows too
        row["flags"] = _flags(row, min_similarity)

    def save() -> None:
        side["n_rows"] = len(records)
        side["complete"] = side["next_source_index"] >= n_source
        side["flagged"] = [r["source_index"] for r in side["rows"] if r["flags"]]
        side["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_json_atomic(out_path, records)
        _write_json_atomic(side_path, side)

    is_test = split == "test"
    n_new = 0
    start = int(side["next_source_index"])
    for lo in range(start, n_target, max(1, batch_size)):
        idx = list(range(lo, min(lo + max(1, batch_size), n_target)))
        english = [source_prompts[i].text_en or source_prompts[i].text for i in idx]
        translated = translator.translate(english, "en", lang)
        if len(translated) != len(english):
            raise DataError(
                f"translator {translator.name} returned {len(translated)} texts for {len(english)}; "
                "a Translator must return one translation per input"
            )
        keep = [(i, e, t.strip()) for i, e, t in zip(idx, english, translated, strict=True) if t and t.strip()]
        for i, _, t in zip(idx, english, translated, strict=True):
            if not (t and t.strip()):
                side["dropped"].append({"source_index": i, "reason": "empty translation"})
        backs: list[str | None] = [None] * len(keep)
        if back_translator is not None and keep:
            backs = list(back_translator.translate([t for _, _, t in keep], lang, "en"))
            if len(backs) != len(keep):
                raise DataError(f"back-translator {back_translator.name} returned {len(backs)} texts for {len(keep)}")
        for (i, e, t), back in zip(keep, backs, strict=True):
            category = source_prompts[i].category
            if is_test:
                records.append({"instruction": e, "instruction_translated": t, "category": category})
            else:
                records.append({"instruction": t, "category": category})
            row: dict[str, Any] = {
                "source_index": i,
                "back_translation": back,
                "similarity": None if back is None else round(similarity(e, back), 4),
                "flags": ["unchanged"] if _trigrams(t) == _trigrams(e) else [],
            }
            row["flags"] = _flags(row, min_similarity)
            side["rows"].append(row)
        side["next_source_index"] = idx[-1] + 1
        n_new += len(idx)
        save()
        if progress is not None:
            progress(side["next_source_index"], n_target)
    if n_new == 0:
        save()  # records a new threshold; writes a valid empty file for limit=0

    sims = [r["similarity"] for r in side["rows"] if r["similarity"] is not None]
    return BuildReport(
        path=out_path,
        sidecar=side_path,
        lang=lang,
        split=split,
        kind=kind,
        translator=translator.name,
        n_source=n_source,
        n_target=n_target,
        n_written=len(records),
        n_new=n_new,
        n_dropped=len(side["dropped"]),
        flagged=list(side["flagged"]),
        mean_similarity=sum(sims) / len(sims) if sims else None,
        complete=bool(side["complete"]),
        seconds=time.perf_counter() - t0,
    )


def build_language(
    data_root: Path | str,
    lang: str,
    translator: Translator,
    *,
    splits: Sequence[Split] = SPLITS,
    kinds: Sequence[Kind] = KINDS,
    skip_existing: bool = True,
    **kwargs: Any,
) -> list[BuildReport]:
    """Build every missing (or resumable) file of ``lang`` for the given splits and kinds.

    Files that exist without a build sidecar (released files) are skipped when ``skip_existing``;
    files with a sidecar are continued. Other keyword arguments go to :func:`build_split`.

    Returns:
        One report per file built or continued, in kind-then-split order.
    """
    root = Path(data_root).expanduser()
    reports: list[BuildReport] = []
    for kind in kinds:
        for split in splits:
            target = PolyRefuse(root).path(lang, split, kind)
            if skip_existing and target.exists() and not sidecar_path(root, lang, split, kind).exists():
                continue
            reports.append(build_split(root, lang, split, kind, translator, **kwargs))
    return reports
