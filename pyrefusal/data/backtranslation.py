"""Back-translation of responses to English before they are judged (docs/method.md §6.2).

The paper translates every non-English response to English (Google Translate) and gives that text
to WildGuard and to its English substring list; English responses are judged as generated. This
stage does the same with any :class:`~pyrefusal.data.build.Translator` (a local chat GGUF through
:class:`~pyrefusal.data.build.LlamaTranslator` in ``pyrefusal run --judge-translator``), following the
paper's rules: a response of 5000 characters or more is cut to 4999 before translating, and an
empty translation falls back to the original response.

Every translation is appended to a JSONL cache (keyed by translator, model file, language and
text), so an interrupted or repeated run translates nothing twice.

:attr:`BackTranslation.english_only_refusal` marks the rows where the English text reads as a
refusal to the paper's substring list while the original does not to the multilingual list. Either
the translator refused to translate a harmful answer (a refusal the model under test never made), or
the model refused in words the native markers miss (on Qwen2.5-Coder-1.5B: ja
"私はAIアシスタントであり、…不適切です" -> "I am an AI assistant, and ... is inappropriate"). Reports
count these rows so that either case is looked at, not silently absorbed into a rate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from pyrefusal.common import in_order
from pyrefusal.data.build import Translator
from pyrefusal.errors import PyrefusalError
from pyrefusal.method.refusal import SubstringDetector
from pyrefusal.rundir import JsonlCache, digest

__all__ = ["PAPER_MAX_CHARS", "BackTranslation", "BackTranslator", "BatchTranslator"]

PAPER_MAX_CHARS = 4999
"""Responses of 5000 characters or more are cut to this many before translating (docs/method.md §6.2)."""

_CACHE_VERSION = 1
_PAPER = SubstringDetector("paper")
_NATIVE = SubstringDetector("multilingual")


class BatchTranslator(Translator, Protocol):
    """A :class:`~pyrefusal.data.build.Translator` that also translates many batches at once (e.g. on the model
    replicas of a Ray cluster, :class:`pyrefusal.stages.judge.ReplicaTranslator`)."""

    def translate_batches(self, jobs: Sequence[tuple[list[str], str, str]]) -> Iterator[tuple[int, list[str]]]:
        """Translate every ``(texts, source, target)`` job; yield ``(index into jobs, outputs)`` as each finishes,
        in any order, every job exactly once."""
        ...


@dataclass(frozen=True)
class BackTranslation:
    """One response and the English text the judges read.

    Attributes:
        lang: Language of the prompt (``"en"`` responses are not translated).
        response: The response as generated.
        english: What the judges read: the translation, or ``response`` for English.
        translator: Name of the translator, ``"identity"`` for English.
        cut: The response was cut to ``max_chars`` before translating.
        fallback: The translation came back empty and ``english`` is the original (the paper's rule).
        english_only_refusal: ``english`` reads as a refusal (paper substrings) but the original
            does not (multilingual substrings): the translator refusing, or a refusal the native
            markers miss.
    """

    lang: str
    response: str
    english: str
    translator: str
    cut: bool = False
    fallback: bool = False
    english_only_refusal: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackTranslation:
        """Rebuild a record saved with :meth:`to_dict`."""
        return cls(**data)


class BackTranslator:
    """Translate responses to English with a cache on disk.

    Args:
        translator: Any :class:`~pyrefusal.data.build.Translator`; ``model_sha256`` enters the cache key
            when it has one.
        cache_path: JSONL file of translations (``None`` = memory only).
        max_chars: Responses longer than this are cut before translating (paper: 4999).
        batch_size: Responses sent to the translator (and appended to the cache) together.
    """

    def __init__(
        self,
        translator: Translator,
        *,
        cache_path: Path | str | None = None,
        max_chars: int = PAPER_MAX_CHARS,
        batch_size: int = 32,
    ) -> None:
        if not isinstance(translator, Translator):
            raise PyrefusalError(
                f"{translator!r} is not a translator: it needs a `name` and `translate(texts, source, target)`"
            )
        self.translator = translator
        self.max_chars = max_chars
        self.batch_size = max(1, batch_size)
        self._cache = JsonlCache(cache_path, field="record", version=_CACHE_VERSION, what="back-translation")
        self.translated = 0  # responses sent to the translator (cache misses)

    @property
    def name(self) -> str:
        """The translator's name, recorded with every translation."""
        return self.translator.name

    def cache_key(self, lang: str, response: str) -> str:
        """sha256 of (translator name, model sha256, language, response, max_chars), hex."""
        return digest(self.name, getattr(self.translator, "model_sha256", ""), lang, response, self.max_chars)

    def back_translate(self, responses: Sequence[str], langs: Sequence[str]) -> list[BackTranslation]:
        """English text for each response; English ones pass through, cached ones are not redone.

        Args:
            responses: The responses as generated.
            langs: Language of each response's prompt.

        Returns:
            One :class:`BackTranslation` per response, in order.

        Raises:
            PyrefusalError: ``responses`` and ``langs`` differ in length, or the translator returned
                the wrong number of texts.
        """
        if len(responses) != len(langs):
            raise PyrefusalError(f"{len(responses)} responses but {len(langs)} languages; pass one language each")
        pairs = list(zip(responses, langs, strict=True))
        keys = [None if lang.casefold() == "en" else self.cache_key(lang, text) for text, lang in pairs]
        pending: dict[str, dict[str, str]] = {}  # lang -> {key: response}
        for key, (text, lang) in zip(keys, pairs, strict=True):
            if key is not None and key not in self._cache:
                pending.setdefault(lang, {})[key] = text
        batches = [  # (language, [(key, response)]) in the order one process translates them
            (lang, items[start : start + self.batch_size])
            for lang, todo in pending.items()
            for items in [list(todo.items())]
            for start in range(0, len(items), self.batch_size)
        ]
        texts = [[r[: self.max_chars] for _, r in items] for _, items in batches]
        jobs = [(t, lang, "en") for t, (lang, _) in zip(texts, batches, strict=True)]
        run = getattr(self.translator, "translate_batches", None)
        results = run(jobs) if run is not None else ((i, self.translator.translate(*job)) for i, job in enumerate(jobs))
        # appended in batch order, whichever batch finished first: the cache file is the same either way
        in_order(results, lambda i, english: self._record(*batches[i], texts[i], english))
        return [
            BackTranslation(lang, text, text, "identity")
            if key is None
            else BackTranslation.from_dict(self._cache[key])
            for key, (text, lang) in zip(keys, pairs, strict=True)
        ]

    def _record(self, lang: str, items: list[tuple[str, str]], texts: list[str], english: list[str]) -> None:
        """Append one batch's translations (``items``: (key, response); ``texts``: what was sent) to the cache."""
        if len(english) != len(texts):
            raise PyrefusalError(
                f"translator {self.name} returned {len(english)} texts for {len(texts)}; it must return one per input"
            )
        made = []
        for (key, response), text, en in zip(items, texts, english, strict=True):
            fallback = not en.strip()
            en = text if fallback else en
            only_en = _PAPER.judge(en, "en").refused and not _NATIVE.judge(response, lang).refused
            rec = BackTranslation(lang, response, en, self.name, len(text) < len(response), fallback, only_en)
            made.append((key, rec.to_dict(), {}))
        self.translated += len(items)
        self._cache.add(made)
