"""PolyRefuse as typed values: file discovery, validated loading, and the paper's sampling.

PolyRefuse (Wang et al., NeurIPS 2025) is a directory of JSON files named
``{kind}_{split}_translated_{lang}.json`` where ``kind`` is ``harmful`` or ``harmless`` and ``split`` is
``train``, ``val`` or ``test``. Each file is a JSON list of records (objects):

* train/val files: ``instruction`` is the prompt *in the file's language* (non-English files overwrote the
  English text with its translation) and ``category`` (usually null). Train/val files of different languages
  are row-aligned: row ``i`` of ``harmful_train_translated_de.json`` translates row ``i`` of the English file.
* test files: ``instruction`` is the *English original*, ``instruction_translated`` the translation, and
  ``category``. The English harmful test file has no ``instruction_translated``.

Released sizes: harmful train 260, harmful val 39, harmful test 572; harmless train/val 200 and harmless
test 500 per language (the released zh has no harmless test). The paper's English harmless pools are the full
Alpaca splits (18,793 train, 6,264 val); when a directory ``en-pools/`` with ``harmless_train.json`` /
``harmless_val.json`` sits beside the data, :func:`paper_sample` uses it for English, as the paper did.

Languages are discovered from the file names, never hard-coded: a file ``harmful_train_translated_xx.json``
makes ``xx`` usable. :data:`PAPER_LANGUAGES` only fixes the order in which languages are listed.

This module imports only the standard library and :mod:`pyrefusal.errors`; it never touches a model.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pyrefusal.errors import DataError

__all__ = [
    "EN_POOLS_DIRNAME",
    "KINDS",
    "PAPER_LANGUAGES",
    "SPLITS",
    "Kind",
    "PolyRefuse",
    "Prompt",
    "Split",
    "default_data_dir",
    "file_name",
    "paper_sample",
    "sample",
]

Kind = Literal["harmful", "harmless"]
Split = Literal["train", "val", "test"]

KINDS: tuple[Kind, ...] = get_args(Kind)
"""The two prompt kinds, in the order ``("harmful", "harmless")``."""

SPLITS: tuple[Split, ...] = get_args(Split)
"""The three splits, in the order ``("train", "val", "test")``."""

PAPER_LANGUAGES: tuple[str, ...] = (
    "en", "de", "es", "fr", "it", "nl", "ja", "pl", "ru", "zh", "ko", "ar", "th", "yo",
)  # fmt: skip
"""The paper's 14 languages in its plotting order. Used for ordering only, never as a restriction."""

EN_POOLS_DIRNAME = "en-pools"
"""Optional sub-directory with the full English Alpaca pools ``harmless_train.json``/``harmless_val.json``."""

_LANG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
FILE_RE = re.compile(rf"^(harmful|harmless)_(train|val|test)_translated_({_LANG_RE.pattern})\.json$")
"""A released PolyRefuse file name: groups kind, split, language (``harmful_train_translated_en.json``)."""
_FETCH_HINT = (
    "run `pyrefusal data fetch` or pass --data-dir pointing at a directory with files like "
    "harmful_train_translated_en.json"
)


def file_name(lang: str, split: Split, kind: Kind) -> str:
    """Return the PolyRefuse file name for one language, split and kind.

    Args:
        lang: Language code as it appears in file names, e.g. ``"de"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        kind: ``"harmful"`` or ``"harmless"``.

    Returns:
        For example ``"harmful_test_translated_de.json"``.
    """
    return f"{kind}_{split}_translated_{lang}.json"


def default_data_dir() -> Path:
    """Return where PolyRefuse is looked for when no directory is given.

    Resolution order: ``$PYREFUSAL_DATA_DIR`` if set and non-empty; else ``$PYREFUSAL_CACHE/polyrefuse`` if
    ``$PYREFUSAL_CACHE`` is set and non-empty; else ``~/.cache/pyrefusal/polyrefuse``. The directory is not
    created and need not exist.

    Returns:
        An absolute, user-expanded path.
    """
    data_dir = os.environ.get("PYREFUSAL_DATA_DIR")
    if data_dir:
        return Path(data_dir).expanduser().absolute()
    cache = os.environ.get("PYREFUSAL_CACHE")
    if cache:
        return (Path(cache).expanduser() / "polyrefuse").absolute()
    return (Path.home() / ".cache" / "pyrefusal" / "polyrefuse").absolute()


@dataclass(frozen=True)
class Prompt:
    """One prompt of PolyRefuse.

    Attributes:
        id: Stable identifier ``"{kind}/{split}/{lang}/{row}"`` where ``row`` is the 0-based record index in
            its file, e.g. ``"harmful/test/de/17"``. Rows of the English Alpaca pools are
            ``"{kind}/{split}/en/pool/{row}"``.
        text: The prompt in its language: ``instruction`` for train/val files, ``instruction_translated`` for
            test files (``instruction`` when the file has no translation, i.e. the English test file).
        text_en: The English original when known: a test file's ``instruction``, or ``text`` itself for
            English files; ``None`` for non-English train/val files (the release dropped their English column;
            it is row ``i`` of the English file of the same kind and split).
        lang: Language code from the file name.
        kind: ``"harmful"`` or ``"harmless"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        category: The record's ``category`` (per-source taxonomy for harmful val/test), or ``None``.
    """

    id: str
    text: str
    text_en: str | None
    lang: str
    kind: Kind
    split: Split
    category: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict with one key per field (inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Prompt:
        """Rebuild a prompt saved with :meth:`to_dict`.

        Args:
            data: Mapping with keys ``id``, ``text``, ``lang``, ``kind``, ``split`` (required strings) and
                ``text_en``, ``category`` (string or null, optional). Unknown keys are ignored.

        Returns:
            The prompt.

        Raises:
            DataError: If a required key is missing, or a value has the wrong type or an unknown kind/split.
        """
        if not isinstance(data, Mapping):
            raise DataError(f"a saved prompt must be a JSON object, got {type(data).__name__}")
        fields: dict[str, Any] = {}
        for key in ("id", "text", "lang", "kind", "split"):
            value = data.get(key)
            if not isinstance(value, str) or not value:
                raise DataError(
                    f"saved prompt {data.get('id')!r}: key {key!r} must be a non-empty string, "
                    f"got {value!r}; re-save it with Prompt.to_dict()"
                )
            fields[key] = value
        for key in ("text_en", "category"):
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise DataError(f"saved prompt {fields['id']!r}: key {key!r} must be a string or null, got {value!r}")
            fields[key] = value
        if fields["kind"] not in KINDS:
            raise DataError(f"saved prompt {fields['id']!r}: kind {fields['kind']!r} is not one of {KINDS}")
        if fields["split"] not in SPLITS:
            raise DataError(f"saved prompt {fields['id']!r}: split {fields['split']!r} is not one of {SPLITS}")
        return cls(**fields)


def _check_kind_split(split: str, kind: str) -> None:
    if kind not in KINDS:
        raise DataError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def language_order(lang: str) -> tuple[int, str]:
    """Sort key: the paper's languages in its plotting order (:data:`PAPER_LANGUAGES`), then the others by code."""
    try:
        return (PAPER_LANGUAGES.index(lang), lang)
    except ValueError:
        return (len(PAPER_LANGUAGES), lang)


def _read_json_list(path: Path) -> list[Any]:
    """Read a JSON file whose top level must be a list; every failure is a DataError naming the file."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not valid UTF-8 (byte offset {exc.start}); PolyRefuse files are UTF-8 JSON. "
            "Re-download it with `pyrefusal data fetch`"
        ) from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} (char {exc.pos}): {exc.msg}. "
            "The file is damaged or truncated; re-download it with `pyrefusal data fetch` or rebuild it with "
            "`pyrefusal data build`"
        ) from exc
    except RecursionError:  # hardening: JSON nested deeper than Python's parser can follow
        raise DataError(
            f"{path}: JSON nested too deeply to be PolyRefuse records (a list of flat objects); "
            "re-download it with `pyrefusal data fetch` or rebuild it with `pyrefusal data build`"
        ) from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: the top level must be a JSON list of records, got a JSON {_json_type(data)}; "
            'expected [{"instruction": "...", "category": null}, ...]'
        )
    return data


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__


def _text_field(path: Path, index: int, record: dict[str, Any], key: str, *, required: bool) -> str:
    """Return ``record[key]`` checked to be a non-empty string ("" if absent and not required)."""
    where = f"{path.name}: record {index}"
    if key not in record:
        if not required:
            return ""
        raise DataError(
            f"{where}: key {key!r} is missing (file {path}); every record needs a non-empty string "
            f"{key!r}. Fix the record or rebuild the file with `pyrefusal data build`"
        )
    value = record[key]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: key {key!r} must be a string, got a JSON {_json_type(value)} (file {path}); "
            "fix the record or rebuild the file with `pyrefusal data build`"
        )
    if not value.strip():
        raise DataError(
            f"{where}: key {key!r} is an empty string (file {path}); a failed translation? "
            "Fix the record, drop it, or rebuild the file with `pyrefusal data build`"
        )
    check_encodable(value, where=f"{where}: key {key!r} (file {path})")
    return value


def check_encodable(text: str, *, where: str) -> None:
    """Hardening: raise a :class:`DataError` when ``text`` cannot be encoded as UTF-8 (a lone surrogate such as
    ``"\\ud800"`` in the JSON), which the tokenizer would choke on in ``pyrefusal run``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(
            f"{where}: character {exc.start} is {text[exc.start]!r}, a lone surrogate that is not text "
            "(a broken \\u escape in the JSON); fix or drop the record, or rebuild the file with `pyrefusal data build`"
        ) from None


def _records_to_prompts(
    path: Path, records: list[Any], *, lang: str, split: Split, kind: Kind, id_prefix: str
) -> list[Prompt]:
    """Validate PolyRefuse records and turn them into prompts (errors name file, record index and key)."""
    is_test = split == "test"
    prompts: list[Prompt] = []
    for index, record in enumerate(records):
        where = f"{path.name}: record {index}"
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: each record must be a JSON object with key 'instruction', got a JSON "
                f"{_json_type(record)} (file {path}); fix or rebuild the file"
            )

        instruction = _text_field(path, index, record, "instruction", required=True)
        category = record.get("category")
        if category is not None and not isinstance(category, str):
            raise DataError(
                f"{where}: key 'category' must be a string or null, got a JSON {_json_type(category)} "
                f"(file {path}); fix the record"
            )
        if is_test:
            # Test files keep the English original in `instruction`; only the English file may lack a
            # translation. A non-English test file without one would silently feed English prompts.
            translated = _text_field(path, index, record, "instruction_translated", required=lang != "en")
            text, text_en = (translated or instruction), instruction
        else:
            text = instruction
            text_en = instruction if lang == "en" else None
        prompts.append(
            Prompt(
                id=f"{id_prefix}/{index}",
                text=text,
                text_en=text_en,
                lang=lang,
                kind=kind,
                split=split,
                category=category,
            )
        )
    return prompts


class PolyRefuse:
    """A directory of PolyRefuse JSON files, loaded lazily and validated.

    Construction touches nothing on disk; the directory is scanned on each query (so files added later, e.g.
    by ``pyrefusal data build``, are seen) and each file is parsed at most once per instance.

    Args:
        root: Directory holding ``{kind}_{split}_translated_{lang}.json`` files (and optionally
            ``en-pools/``).

    Example:
        >>> data = PolyRefuse(default_data_dir())
        >>> data.load("de", "test", "harmful")[0].id
        'harmful/test/de/0'
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()
        self._cache: dict[tuple[str, str, str], tuple[Prompt, ...]] = {}
        self._pool_cache: dict[tuple[Path, str], tuple[Prompt, ...]] = {}

    def __repr__(self) -> str:
        return f"PolyRefuse({str(self.root)!r})"

    # ----------------------------------------------------------------------------------------- discovery
    def _scan(self) -> dict[str, dict[tuple[Split, Kind], Path]]:
        """Map language -> {(split, kind): path} for every well-named file; raise if there is none."""
        found: dict[str, dict[tuple[Split, Kind], Path]] = {}
        if self.root.is_dir():
            for path in self.root.iterdir():
                match = FILE_RE.match(path.name)
                if match and path.is_file():
                    kind, split, lang = match.groups()
                    found.setdefault(lang, {})[(split, kind)] = path  # type: ignore[index]
        if not found:
            state = "does not exist" if not self.root.exists() else "has none"
            raise DataError(f"no PolyRefuse files in {self.root} (the directory {state}); {_FETCH_HINT}")
        return found

    def path(self, lang: str, split: Split, kind: Kind) -> Path:
        """Return the path a file would have (whether or not it exists)."""
        _check_kind_split(split, kind)
        if not _LANG_RE.fullmatch(lang):
            raise DataError(f"invalid language code {lang!r}; use the code from the file names, e.g. 'de' or 'zh'")
        return self.root / file_name(lang, split, kind)

    def languages(self) -> list[str]:
        """Return every language code with at least one file present.

        Returns:
            Codes ordered as :data:`PAPER_LANGUAGES` first, then any other code alphabetically.

        Raises:
            DataError: If the directory is missing or holds no PolyRefuse file.
        """
        return sorted(self._scan(), key=language_order)

    def has(self, lang: str, split: Split, kind: Kind) -> bool:
        """Return whether the file for ``lang``/``split``/``kind`` exists.

        A missing root gives ``False``; only a bad kind, split or language code raises :class:`DataError`.
        """
        _check_kind_split(split, kind)
        return self.path(lang, split, kind).is_file()

    def inventory(self) -> dict[str, dict[str, int | None]]:
        """Count the records of every file.

        Parses (and validates) every present file, so a damaged file raises here, naming itself.

        Returns:
            ``{lang: {"harmful/train": 260, ..., "harmless/test": None}}`` with all six ``"kind/split"``
            keys per language, ``None`` where the file is missing. Languages in :meth:`languages` order.

        Raises:
            DataError: If the directory holds no file, or a present file is invalid.
        """
        scan = self._scan()
        table: dict[str, dict[str, int | None]] = {}
        for lang in sorted(scan, key=language_order):
            row: dict[str, int | None] = {}
            for kind in KINDS:
                for split in SPLITS:
                    row[f"{kind}/{split}"] = (
                        len(self._load_tuple(lang, split, kind)) if (split, kind) in scan[lang] else None
                    )
            table[lang] = row
        return table

    # ------------------------------------------------------------------------------------------- loading
    def load(self, lang: str, split: Split, kind: Kind) -> list[Prompt]:
        """Load one file as prompts, in file order.

        Args:
            lang: Language code, e.g. ``"de"``.
            split: ``"train"``, ``"val"`` or ``"test"``.
            kind: ``"harmful"`` or ``"harmless"``.

        Returns:
            A new list (safe to mutate) of ``n`` prompts, ``n`` = the file's record count (e.g. 572 for
            harmful test). Parsed once per instance, then served from a cache.

        Raises:
            DataError: If the directory or file is missing (the message lists what exists for ``lang``), the
                JSON is invalid, the top level is not a list, or a record is not an object / lacks a non-empty
                string ``instruction`` (``instruction_translated`` for non-English test files).
        """
        return list(self._load_tuple(lang, split, kind))

    def _load_tuple(self, lang: str, split: Split, kind: Kind) -> tuple[Prompt, ...]:
        _check_kind_split(split, kind)
        key = (lang, split, kind)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        path = self.path(lang, split, kind)
        if not path.is_file():
            raise self._missing_file_error(lang, split, kind)
        records = _read_json_list(path)
        prompts = tuple(
            _records_to_prompts(path, records, lang=lang, split=split, kind=kind, id_prefix=f"{kind}/{split}/{lang}")
        )
        self._cache[key] = prompts
        return prompts

    def _missing_file_error(self, lang: str, split: Split, kind: Kind) -> DataError:
        scan = self._scan()  # raises the "no PolyRefuse files" error for an empty or missing root
        name = file_name(lang, split, kind)
        if lang in scan:
            present = ", ".join(file_name(lang, s, k) for k in KINDS for s in SPLITS if (s, k) in scan[lang])
            detail = f"files present for {lang!r}: {present}"
        else:
            detail = f"no file at all for language {lang!r}; languages present: {', '.join(self.languages())}"
        note = ""
        if (lang, split, kind) == ("zh", "test", "harmless"):
            note = " The released PolyRefuse has no zh harmless_test."
        return DataError(
            f"{name} not found in {self.root}; {detail}.{note} `pyrefusal data build` can make a missing "
            f"file by translating the English one ({file_name('en', split, kind)})."
        )

    def has_en_pools(self, pool_dir: Path | str | None = None) -> bool:
        """Return whether the full English harmless pools are present.

        Args:
            pool_dir: Directory to check; defaults to ``root / "en-pools"``.
        """
        base = Path(pool_dir).expanduser() if pool_dir is not None else self.root / EN_POOLS_DIRNAME
        return all((base / f"harmless_{split}.json").is_file() for split in ("train", "val"))

    def load_en_pool(self, split: Literal["train", "val"], pool_dir: Path | str | None = None) -> list[Prompt]:
        """Load a full English Alpaca harmless pool (the paper's English harmless train/val source).

        Args:
            split: ``"train"`` (18,793 prompts in the paper) or ``"val"`` (6,264).
            pool_dir: Directory holding ``harmless_{split}.json``; defaults to ``root / "en-pools"``.

        Returns:
            Prompts with ids ``"harmless/{split}/en/pool/{row}"``, in file order.

        Raises:
            DataError: If the file is missing or invalid.
        """
        if split not in ("train", "val"):
            raise DataError(f"English pools exist for train and val only, not {split!r}")
        base = Path(pool_dir).expanduser() if pool_dir is not None else self.root / EN_POOLS_DIRNAME
        path = base / f"harmless_{split}.json"
        key = (path, split)
        cached = self._pool_cache.get(key)
        if cached is None:
            if not path.is_file():
                raise DataError(
                    f"{path.name} not found in {base}; the English Alpaca pools are optional files "
                    "harmless_train.json / harmless_val.json (keys 'instruction', 'category'). Pass "
                    "pool_dir=None to paper_sample to use the 200-row PolyRefuse English files instead"
                )
            records = _read_json_list(path)
            cached = tuple(
                _records_to_prompts(
                    path,
                    records,
                    lang="en",
                    split=split,
                    kind="harmless",
                    id_prefix=f"harmless/{split}/en/pool",
                )
            )
            self._pool_cache[key] = cached
        return list(cached)


def sample(prompts: Sequence[Prompt], n: int, rng: random.Random) -> list[Prompt]:
    """Draw ``n`` prompts without replacement, exactly as the paper's ``random.sample(pool, n)``.

    For ``n < len(prompts)`` this is ``rng.sample(list(prompts), n)``, so with the paper's pool order and
    seed it picks the paper's prompts in the paper's order. For ``n >= len(prompts)`` it returns every prompt
    in the original order *without consuming randomness* (Python's ``random.sample`` would raise for
    ``n > len`` and return a shuffled copy for ``n == len``); later draws from the same ``rng`` then differ
    from what the paper's code would produce. That never happens with the paper's sizes (128 of >=200, 32 of
    >=39).

    Args:
        prompts: The pool, in file order.
        n: How many to draw; must be >= 0.
        rng: The random generator to draw from (advanced in place).

    Returns:
        A new list of ``min(n, len(prompts))`` prompts.

    Raises:
        DataError: If ``n`` is negative.
    """
    if n < 0:
        raise DataError(f"cannot sample {n} prompts; n must be >= 0")
    pool = list(prompts)
    if n >= len(pool):
        return pool
    return rng.sample(pool, n)


def paper_sample(
    data: PolyRefuse,
    lang: str,
    *,
    n_train: int = 128,
    n_val: int = 32,
    seed: int = 1,
    pool_dir: Path | str | Literal["auto"] | None = "auto",
) -> dict[str, list[Prompt]]:
    """Sample train/val prompts for one source language as the paper's ``load_and_sample_datasets`` does.

    One ``random.Random(seed)`` is used for four draws in the paper's fixed order (docs/method.md §1.4): harmless
    train, harmful train, harmless val, harmful val. ``random.Random(1).sample`` gives the same draws as the
    paper's ``random.seed(1); random.sample``. Filtering by refusal score (done later with a model) is not
    part of this function.

    Args:
        data: The dataset.
        lang: Source language code.
        n_train: Prompts per kind for training (direction extraction); the paper uses 128.
        n_val: Prompts per kind for validation (direction selection); the paper uses 32.
        seed: The paper uses 1 (Arditi et al. used 42).
        pool_dir: Only for ``lang == "en"``: where the full English Alpaca harmless pools
            (``harmless_train.json``, ``harmless_val.json``) are. ``"auto"`` (default) uses
            ``data.root / "en-pools"`` when both files exist, else the PolyRefuse English files (200 rows
            each, which gives different prompts than the paper's English run). A path requires the files.
            ``None`` always uses the PolyRefuse English files.

    Returns:
        ``{"harmless_train": [...], "harmful_train": [...], "harmless_val": [...], "harmful_val": [...]}``,
        the lists of size ``min(n, pool size)`` (128/128/32/32 with the paper's settings).

    Raises:
        DataError: If a needed file is missing or invalid.
    """
    use_pools = False
    explicit_pool: Path | None = None
    if lang == "en" and pool_dir is not None:
        if pool_dir == "auto":
            use_pools = data.has_en_pools()
        else:
            explicit_pool = Path(pool_dir)
            use_pools = True

    def pool(split: Literal["train", "val"], kind: Kind) -> list[Prompt]:
        if kind == "harmless" and use_pools:
            return data.load_en_pool(split, explicit_pool)
        return data.load(lang, split, kind)

    rng = random.Random(seed)
    out: dict[str, list[Prompt]] = {}
    out["harmless_train"] = sample(pool("train", "harmless"), n_train, rng)
    out["harmful_train"] = sample(pool("train", "harmful"), n_train, rng)
    out["harmless_val"] = sample(pool("val", "harmless"), n_val, rng)
    out["harmful_val"] = sample(pool("val", "harmful"), n_val, rng)
    return out
