"""One typed settings model for the studies: ``pyrefusal run``, ``transfer`` and ``quant-sweep``.

A study's settings are everything that determines its results; they are saved as the run directory's
``config.json`` and a resumed run must match them (:func:`pyrefusal.rundir.check_config`). This module
declares them once:

- :class:`Settings` holds the fields every study has (model, data, sample sizes, selection rule, detector,
  runtime resources); :class:`ChatSettings` adds the prompt rendering and GPU placement shared by run and
  transfer; :class:`RunSettings`, :class:`TransferSettings` and :class:`QuantSweepSettings` add their own
  fields and defaults.
- Choices are ``Literal`` types (:data:`Condition`, :data:`Detector`, :data:`Judge`, ...), checked in one
  place (:meth:`Settings.validate`) with messages that name the CLI option and the choices.
- Each field's metadata (:func:`setting`) says how it appears on the command line (option name, help, flag
  form; the CLI generates its click options from it) and whether a finished run may be resumed with another
  value (:meth:`Settings.resumable_keys`).
- Presets usable from Python: ``RunSettings.preset("paper", n_test=100)``.

``RunConfig``, ``TransferConfig`` and ``QuantSweepConfig`` are the former names of the three classes and stay
importable (here and from their study modules).

Foundation layer: imports only the standard library and :mod:`pyrefusal.errors`.
"""

# ruff: noqa: RUF009  (setting() is dataclasses.field with metadata; ruff knows only field() as a field specifier)

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

from typing_extensions import Self

from pyrefusal.errors import PyrefusalError
from pyrefusal.rundir import check_config

__all__ = [
    "CONDITIONS",
    "DEFAULT_TYPES",
    "TRANSFER_CONDITIONS",
    "ChatSettings",
    "Condition",
    "Detector",
    "DirectionProjection",
    "FieldSpec",
    "Judge",
    "OptimizeSettings",
    "PresetName",
    "PromptFormat",
    "QuantSweepConfig",
    "QuantSweepSettings",
    "RunConfig",
    "RunSettings",
    "SelectionMode",
    "Settings",
    "Steering",
    "TokenMethod",
    "TransferCondition",
    "TransferConfig",
    "TransferSettings",
    "parse_language_openings",
    "setting",
]

# --- choices ------------------------------------------------------------------------------------

#: What ``pyrefusal run`` generates test completions under (docs/method.md §5).
Condition = Literal["baseline", "ablation", "actadd", "induce", "harm_ablation", "random_ablation"]
#: The intervention of a transfer matrix: clean ablation or the paper's multi_test condition.
TransferCondition = Literal["ablation", "harm_ablation"]
#: Substring refusal detection: markers per language, or the paper's 13 English strings.
Detector = Literal["multilingual", "paper"]
#: Guard model judging harmful completions, or none.
Judge = Literal["none", "wildguard", "llama-guard-3"]
#: How prompts are rendered without a system prompt: the GGUF chat template, or the paper's bare user turn.
PromptFormat = Literal["template", "paper"]
#: How interventions are applied in generation: auto (in-graph on a GPU, hook on CPU), our hook, or in-graph.
Steering = Literal["auto", "hook", "graph"]
#: Candidate directions as the paper's plain difference in means, or made orthogonal to the harmless mean.
DirectionProjection = Literal["none", "harmless"]
#: Selection scores: KL down to the pick ("lazy"), or for every candidate ("all", for heatmaps).
SelectionMode = Literal["lazy", "all"]
#: Refusal tokens per language: derived from the model's own refusals, or the built-in table.
TokenMethod = Literal["derive", "table"]
#: The presets of :meth:`Settings.preset`.
PresetName = Literal["quick", "paper"]

CONDITIONS: tuple[Condition, ...] = get_args(Condition)
TRANSFER_CONDITIONS: tuple[TransferCondition, ...] = get_args(TransferCondition)

#: File types swept by default: sized for a 0.5B model on 2 CPU cores.
DEFAULT_TYPES: tuple[str, ...] = ("q8_0", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")

# --- field metadata -----------------------------------------------------------------------------

_META = "pyrefusal.setting"


@dataclass(frozen=True)
class FieldSpec:
    """How one settings field is resumed and set from the command line (a field's metadata).

    ``None`` means "as the same field of a base class says" (see :meth:`Settings.spec`), so that a subclass
    redeclaring a field only to change its default keeps the help text and the resume rule.

    Attributes:
        resumable: a finished or interrupted run may be resumed with another value (the value changes no stored
            output, e.g. thread counts, or only adds outputs, e.g. more target languages).
        option: the CLI option without dashes when it is not the field name with ``-`` (``"threads"``).
        help: the option's help text.
        flag: the value a bare flag sets (``--all-scores`` sets ``"all"``; ``--no-filter`` sets ``False``);
            several fields may share one flag option. ``None``: the option takes a value.
        pair: a boolean ``--x/--no-x`` option.
        path: the value is a directory (``click.Path``), stored as a string.
        envvar: an environment variable besides the ``PYREFUSAL_<COMMAND>_<OPTION>`` one.
        parse: turns the option's text into the field's value (default: from the field's type; comma-separated
            text for tuples).
        metavar: what the option's value looks like in ``--help`` (default: click's).
    """

    resumable: bool | None = None
    option: str | None = None
    help: str | None = None
    flag: object = None
    pair: bool | None = None
    path: bool | None = None
    envvar: str | None = None
    parse: Callable[[str], object] | None = None
    metavar: str | None = None

    def merged(self, base: FieldSpec) -> FieldSpec:
        """This spec with every unset (``None``) attribute taken from ``base``."""
        return FieldSpec(
            **{
                f.name: getattr(base, f.name) if getattr(self, f.name) is None else getattr(self, f.name)
                for f in dataclasses.fields(self)
            }
        )


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | None = None,
    resumable: bool | None = None,
    option: str | None = None,
    help: str | None = None,
    flag: object = None,
    pair: bool | None = None,
    path: bool | None = None,
    envvar: str | None = None,
    parse: Callable[[str], object] | None = None,
    metavar: str | None = None,
) -> Any:
    """A settings field (``dataclasses.field``) with its :class:`FieldSpec` as metadata."""
    spec = FieldSpec(resumable, option, help, flag, pair, path, envvar, parse, metavar)
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={_META: spec})
    return field(default=default, metadata={_META: spec})


def _csv(text: str) -> tuple[str, ...]:
    """``"en, de,,zh"`` -> ``("en", "de", "zh")``."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_language_openings(text: str) -> dict[str, tuple[str, ...]]:
    """``"de=Ich,Es;ja=申し訳"`` -> ``{"de": ("Ich", "Es"), "ja": ("申し訳",)}`` (parts without ``=`` are ignored)."""
    openings: dict[str, tuple[str, ...]] = {}
    for part in text.split(";"):
        if "=" in part:
            lang, words = part.split("=", 1)
            openings[lang.strip()] = _csv(words)
    return openings


def _quoted_choices(choices: tuple[object, ...]) -> str:
    """``('a', 'b', 'c')`` -> ``"'a', 'b' or 'c'"``."""
    quoted = [repr(c) for c in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


S = TypeVar("S", bound="Settings")

# --- the settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The settings every study has. Subclasses add their own and set :attr:`KEYS` and :attr:`OPTIONS`.

    Attributes:
        model: registry name, local GGUF path or hub spec.
        data_dir: PolyRefuse directory (default: :func:`pyrefusal.data.embedded.resolve_data_source`).
        n_train / n_val: prompts per kind for extraction / selection (paper sampling, ``seed``).
        n_test: test prompts per kind and language.
        max_new_tokens: greedy tokens per completion.
        seed: sampling seed (paper: 1).
        kl_threshold / prune_fraction: selection rule (paper: 0.2 / 0.8).
        detector: substring refusal detection (:data:`Detector`).
        n_ctx / n_seq_max / n_threads: runtime settings.
    """

    #: Whether a key missing from an older ``config.json`` is taken to have had its default (so older
    #: directories resume); False: it counts as a changed setting.
    MISSING_KEYS_TAKE_DEFAULTS: ClassVar[bool] = True
    #: The order of ``config.json``'s keys (:meth:`to_dict`); every field, each once.
    KEYS: ClassVar[tuple[str, ...]] = (
        "model",
        "data_dir",
        "n_train",
        "n_val",
        "n_test",
        "max_new_tokens",
        "seed",
        "kl_threshold",
        "prune_fraction",
        "detector",
        "n_ctx",
        "n_seq_max",
        "n_threads",
    )
    #: The fields the study's command has an option for, in ``--help`` order.
    OPTIONS: ClassVar[tuple[str, ...]] = ("model", "data_dir", "n_train", "n_val", "n_test", "max_new_tokens", "seed")
    #: Field values of each preset (:meth:`preset`); "quick" is the defaults.
    PRESETS: ClassVar[Mapping[str, Mapping[str, object]]] = {
        "quick": {},
        "paper": {"n_train": 128, "n_val": 32, "n_test": 572, "max_new_tokens": 512},
    }

    model: str = setting(
        "qwen2.5-coder-0.5b-instruct-q4_k_m",
        help="Registry name, local .gguf path, or hub spec hf://owner/repo/file.gguf.",
    )
    data_dir: str | None = setting(
        None,
        path=True,
        envvar="PYREFUSAL_DATA_DIR",
        help="Directory in PolyRefuse's released layout (default: $PYREFUSAL_DATA_DIR, else the cache filled by "
        "`pyrefusal data fetch`, else the copy shipped with pyrefusal).",
    )
    n_train: int = setting(32, help="Train prompts per class (paper: 128).")
    n_val: int = setting(8, help="Val prompts per class (paper: 32).")
    n_test: int = setting(12, help="Test prompts per class and language (paper: 572).")
    max_new_tokens: int = setting(48, help="Greedy tokens per completion (paper: 512).")
    seed: int = setting(1, help="Sampling seed (paper: 1).")
    kl_threshold: float = setting(0.2, help="Selection: max KL on harmless val (paper 0.2).")
    prune_fraction: float = setting(0.8)
    detector: Detector = setting(
        "multilingual",
        help="Refusal detector: markers per language (multilingual) or the paper's English strings (paper).",
    )
    n_ctx: int = setting(8192, resumable=True, help="Context size in tokens (raise it for long prompts).")
    n_seq_max: int = setting(16, option="n-seq", help="Sequences decoded together.")
    n_threads: int | None = setting(None, resumable=True, option="threads", help="CPU threads (default: all cores).")

    # --- declared facts about the fields ---

    @classmethod
    def spec(cls, name: str) -> FieldSpec:
        """Field ``name``'s :class:`FieldSpec`, unset attributes taken from the base classes' declarations."""
        spec = FieldSpec()
        for klass in cls.__mro__:
            declared = getattr(klass, "__dataclass_fields__", {}).get(name)
            if declared is not None and _META in declared.metadata:
                spec = spec.merged(declared.metadata[_META])
        return spec

    @classmethod
    def option_name(cls, name: str) -> str:
        """The CLI option that sets field ``name``: ``"--n-seq"`` for ``n_seq_max``."""
        return "--" + (cls.spec(name).option or name.replace("_", "-"))

    @classmethod
    def option_names(cls) -> dict[str, str]:
        """``{field: "--option"}`` for every field (also those without an option: ``--`` + the field name)."""
        return {f.name: cls.option_name(f.name) for f in dataclasses.fields(cls)}

    @classmethod
    def resumable_keys(cls) -> frozenset[str]:
        """Fields a finished or interrupted run may be resumed with another value of."""
        return frozenset(f.name for f in dataclasses.fields(cls) if cls.spec(f.name).resumable)

    def check_directory(self, out: Path, *, what: str, force: bool) -> dict[str, Any]:
        """Refuse to resume ``out`` (its ``config.json``) under other settings, by this class's resume rules
        (:func:`pyrefusal.rundir.check_config`); returns the settings as the JSON values ``config.json`` holds.

        ``what`` names the job in the message ("run", "transfer run"); ``force`` skips the comparison (the study
        clears its outputs)."""
        return check_config(
            out,
            self.to_dict(),
            what=what,
            force=force,
            resumable=self.resumable_keys(),
            defaults=self.defaults() if self.MISSING_KEYS_TAKE_DEFAULTS else None,
            options=self.option_names(),
        )

    @classmethod
    def defaults(cls) -> dict[str, object]:
        """``{field: default}``: the value a ``config.json`` written before the field existed is taken to have."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    @classmethod
    def field_types(cls) -> dict[str, object]:
        """``{field: resolved type}`` (the annotations are strings under ``from __future__ import annotations``)."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def choices(cls, name: str) -> tuple[object, ...] | None:
        """The allowed values of field ``name`` (its ``Literal``, or its tuple's element ``Literal``), else ``None``."""
        tp = cls.field_types()[name]
        if get_origin(tp) is tuple:
            tp = get_args(tp)[0]
        return get_args(tp) if get_origin(tp) is Literal else None

    # --- construction ---

    @classmethod
    def preset(cls, name: str = "quick", /, **overrides: Any) -> Self:
        """The settings of preset ``name`` (:attr:`PRESETS`), with ``overrides`` on top.

        ``RunSettings.preset("paper")`` gives the paper's sizes and prompts (128/32 train/val, 572 test, 512 tokens,
        baseline + ablation + harm_ablation, prompt format "paper"); "quick" gives the defaults.
        """
        if name not in cls.PRESETS:
            raise PyrefusalError(f"unknown preset {name!r} (--preset); choose {_quoted_choices(tuple(cls.PRESETS))}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values in :attr:`KEYS` order: the ``config.json`` of a run (tuples as lists)."""
        names = {f.name for f in dataclasses.fields(self)}
        if set(self.KEYS) != names or len(self.KEYS) != len(names):
            raise AssertionError(f"{type(self).__name__}.KEYS must list every field once: {sorted(names)}")
        return {k: _jsonable(getattr(self, k)) for k in self.KEYS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Settings from :meth:`to_dict`'s output or an older ``config.json`` (lists become tuples; missing keys
        take their defaults).

        Raises:
            PyrefusalError: a key that is no setting of this study (e.g. another study's ``config.json``).
        """
        hints = cls.field_types()
        unknown = [k for k in d if k not in hints]
        if unknown:
            raise PyrefusalError(f"{unknown} are no {cls.__name__} fields; is this config.json from another study?")
        return cls(**{k: _from_json(hints[k], v) for k, v in d.items()})

    # --- checks ---

    def validate(self) -> None:
        """Raise :class:`PyrefusalError` on settings that cannot run, before any work is done.

        Checks every ``Literal`` field against its choices (the message names the CLI option), then
        :meth:`_check`, the study's own rules.
        """
        for f in dataclasses.fields(self):
            allowed = self.choices(f.name)
            if allowed is None:
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                bad = [v for v in value if v not in allowed]
                if bad:
                    raise PyrefusalError(
                        f"unknown {f.name} {bad} ({self.option_name(f.name)}); choose from {list(allowed)}"
                    )
            elif value not in allowed:
                raise PyrefusalError(
                    f"unknown {f.name} {value!r} ({self.option_name(f.name)}); choose {_quoted_choices(allowed)}"
                )
        self._check_ranges()
        self._check()

    #: Lower bounds of numeric fields every study shares (checked by :meth:`validate`; ``None`` values are skipped).
    MINIMUM: ClassVar[Mapping[str, int]] = {"seed": 0, "n_ctx": 1, "n_seq_max": 1, "n_threads": 1}

    def _check_ranges(self) -> None:
        """Raise on a numeric field below its :attr:`MINIMUM` (``--seed -1``, ``--n-ctx 0``), before any work."""
        names = {f.name for f in dataclasses.fields(self)}
        for name, low in self.MINIMUM.items():
            value = getattr(self, name, None) if name in names else None
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PyrefusalError(
                    f"{name} ({self.option_name(name)}) must be a whole number >= {low}, got {value!r}"
                )

    def _check(self) -> None:
        """The study's own rules beyond the choices (overridden by subclasses)."""

    def _at_least_one(self, names: tuple[str, ...]) -> None:
        """Raise when one of the count fields ``names`` is below 1 (the message names their options)."""
        small = {f"{k} ({self.option_name(k)})": getattr(self, k) for k in names if getattr(self, k) < 1}
        if small:
            raise PyrefusalError(f"these must be at least 1: {small}")


def _jsonable(value: object) -> object:
    """Tuples (also inside mappings) as lists, mappings as plain dicts: what ``config.json`` holds."""
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _from_json(tp: object, value: object) -> object:
    """A JSON value as field type ``tp`` wants it: lists as tuples (also inside mappings)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return value if value is None or len(inner) != 1 else _from_json(inner[0], value)
    if origin is tuple and isinstance(value, list | tuple):
        return tuple(value)
    if origin in (Mapping, dict) and isinstance(value, Mapping):
        return {k: _from_json(get_args(tp)[1], v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class ChatSettings(Settings):
    """Settings shared by run and transfer: how prompts are rendered, the selection's steering filter and the
    model's GPU layers.

    Attributes:
        system_prompt: ``None`` = the chat template's default.
        prompt_format: :data:`PromptFormat`: ``"template"`` (the GGUF chat template) or ``"paper"`` (no system
            turn at all when ``system_prompt`` is ``None``, as the paper).
        steering_filter: selection also requires steering score >= 0 (Arditi et al.; the paper: no).
        n_gpu_layers: layers offloaded (-1 = all when llama.cpp has GPU offload).
    """

    PRESETS: ClassVar[Mapping[str, Mapping[str, object]]] = {
        "quick": {},
        "paper": {**Settings.PRESETS["paper"], "prompt_format": "paper"},
    }

    system_prompt: str | None = setting(None, help="System prompt (default: the chat template's own default).")
    prompt_format: PromptFormat = setting(
        "template",
        help="Without --system-prompt: 'template' renders the GGUF chat template, with the default system prompt it "
        "may add (Qwen2.5: 'You are Qwen, created by Alibaba Cloud...'), as llama.cpp chat apps do; 'paper' renders "
        "the user turn alone, no system turn, as the paper (ChatML, Llama 3 and Gemma templates).",
    )
    steering_filter: bool = setting(
        False, pair=True, help="Selection: also require steering score >= 0 (Arditi et al.)."
    )
    n_gpu_layers: int = setting(-1, resumable=True, help="-1 = all when llama.cpp has GPU offload.")


@dataclass(frozen=True)
class RunSettings(ChatSettings):
    """Everything that determines a ``pyrefusal run`` (saved as config.json; a resumed run must match it).

    Resumable (:meth:`resumable_keys`): judging (added later to a run), capability metrics (cached per
    condition in metrics.json), the runtime's resources, and the target languages and conditions: the
    direction does not depend on them and test rows are drawn the same for every language, so an added
    language or condition only generates its own completions (results then cover the configured ones).
    """

    KEYS: ClassVar[tuple[str, ...]] = (
        "model",
        "data_dir",
        "source_lang",
        "target_langs",
        "n_train",
        "n_val",
        "n_test",
        "max_new_tokens",
        "seed",
        "conditions",
        "filter_train",
        "filter_val",
        "kl_threshold",
        "prune_fraction",
        "steering_filter",
        "selection_mode",
        "refusal_openings",
        "system_prompt",
        "prompt_format",
        "detector",
        "judge",
        "judge_model",
        "judge_translator",
        "capability",
        "capability_texts",
        "direction_projection",
        "steering",
        "n_ctx",
        "n_seq_max",
        "n_gpu_layers",
        "n_threads",
    )
    OPTIONS: ClassVar[tuple[str, ...]] = (
        "model",
        "data_dir",
        "source_lang",
        "target_langs",
        "n_train",
        "n_val",
        "n_test",
        "max_new_tokens",
        "seed",
        "conditions",
        "kl_threshold",
        "steering_filter",
        "direction_projection",
        "selection_mode",
        "filter_train",  # --no-filter, also sets filter_val
        "refusal_openings",
        "system_prompt",
        "prompt_format",
        "detector",
        "judge",
        "judge_model",
        "judge_translator",
        "capability",
        "steering",
        "n_ctx",  # a prompt longer than the context is fixed with --n-ctx (or PYREFUSAL_RUN_N_CTX)
        "n_seq_max",
        "n_gpu_layers",
        "n_threads",
    )
    PRESETS: ClassVar[Mapping[str, Mapping[str, object]]] = {
        "quick": {},
        "paper": {**ChatSettings.PRESETS["paper"], "conditions": ("baseline", "ablation", "harm_ablation")},
    }

    source_lang: str = setting("en", help="Language of the train/val prompts.")
    target_langs: tuple[str, ...] = setting(
        ("en", "de", "zh", "ja"), resumable=True, help="Comma-separated test languages."
    )
    conditions: tuple[Condition, ...] = setting(
        ("baseline", "ablation"),
        resumable=True,
        help="Comma-separated: baseline, ablation, actadd, induce, harm_ablation, random_ablation.",
    )
    filter_train: bool = setting(
        True, option="no-filter", flag=False, help="Do not filter train/val prompts by the model's refusal score."
    )
    filter_val: bool = setting(True, option="no-filter", flag=False)
    selection_mode: SelectionMode = setting(
        "lazy",
        option="all-scores",
        flag="all",
        help="Score KL for every candidate (heatmaps), not only down to the pick.",
    )
    refusal_openings: tuple[str, ...] = setting(
        (), help="Comma-separated first words of refusals in the source language."
    )
    judge: Judge = setting(
        "none", resumable=True, help="Also judge harmful completions with a guard model (needs --judge-model)."
    )
    judge_model: str | None = setting(None, resumable=True, help="Guard model GGUF (path, registry name or hub spec).")
    judge_translator: str | None = setting(
        None,
        resumable=True,
        help="Chat GGUF that back-translates non-English responses to English before judging, as the paper "
        "does (registry name, path, hub spec, or 'self' for the model under test); cached in the run directory.",
    )
    capability: bool = setting(
        True,
        resumable=True,
        pair=True,
        help="Measure perplexity on held-out text and first-token KL per intervention.",
    )
    capability_texts: int = setting(8)
    direction_projection: DirectionProjection = setting(
        "none",
        help="harmless = make every candidate orthogonal to the harmless mean before selection (the "
        "'projected' abliteration of heretic and jim-plus); none = the paper's plain difference in means.",
    )
    steering: Steering = setting(
        "auto",
        help="How interventions are applied in generation: llama.cpp adapters in the graph (LoRA ablation, "
        "control vector), our hook, or auto (in-graph on a GPU, hook on CPU).",
    )

    def _check(self) -> None:
        if not self.conditions or not self.target_langs:
            raise PyrefusalError("give at least one condition (--conditions) and one test language (--target-langs)")
        counts = ("n_train", "n_val", "n_test", "max_new_tokens", "n_seq_max")
        self._at_least_one((*counts, "capability_texts") if self.capability else counts)
        if not 0 < self.prune_fraction <= 1:
            raise PyrefusalError(f"prune_fraction must be in (0, 1], got {self.prune_fraction} (the paper: 0.8)")
        if not self.kl_threshold > 0:
            raise PyrefusalError(f"kl_threshold (--kl-threshold) must be > 0, got {self.kl_threshold} (the paper: 0.2)")
        if self.judge != "none" and not self.judge_model:
            raise PyrefusalError(f"--judge {self.judge} needs --judge-model (a local GGUF of the guard model)")
        if self.judge == "none" and (self.judge_model or self.judge_translator):
            raise PyrefusalError(
                "--judge-model / --judge-translator only take effect with --judge wildguard|llama-guard-3; add --judge"
            )


@dataclass(frozen=True)
class TransferSettings(ChatSettings):
    """Everything that determines a transfer run (saved as ``config.json``).

    Defaults are sized for 2 CPU cores and a 0.5B model (a few minutes per source language);
    the paper uses n_train 128, n_val 32, all 572 test prompts and 512 new tokens (:meth:`preset` "paper").

    Attributes:
        sources / targets: languages whose direction is extracted / whose prompts are answered.
        n_test: harmful test prompts per target.
        condition: :data:`TransferCondition`: ``"ablation"`` (clean) or ``"harm_ablation"`` (the paper's
            multi_test condition).
        filter: filter train/val prompts by refusal score.
        token_method: ``"derive"`` refusal tokens from the model's refusals (table fallback) or ``"table"``.
        n_token_probe / token_max_new_tokens: prompts and tokens generated to derive refusal tokens.
        refusal_openings: explicit refusal openings per language (override), e.g. ``{"de": ("Ich",)}``.
        keep_activations: store per-prompt train activations (float16) for PCA and projections.
        random_control: also apply a random direction with the first source's norm (the control row).

    Resumable: sources, targets, random_control and the runtime's resources (they do not change stored results).
    """

    KEYS: ClassVar[tuple[str, ...]] = (
        "model",
        "data_dir",
        "sources",
        "targets",
        "n_train",
        "n_val",
        "n_test",
        "max_new_tokens",
        "seed",
        "kl_threshold",
        "prune_fraction",
        "steering_filter",
        "condition",
        "detector",
        "filter",
        "system_prompt",
        "prompt_format",
        "token_method",
        "n_token_probe",
        "token_max_new_tokens",
        "refusal_openings",
        "keep_activations",
        "random_control",
        "n_ctx",
        "n_seq_max",
        "n_gpu_layers",
        "n_threads",
    )
    OPTIONS: ClassVar[tuple[str, ...]] = (
        "model",
        "data_dir",
        "sources",
        "targets",
        "n_train",
        "n_val",
        "n_test",
        "max_new_tokens",
        "seed",
        "kl_threshold",
        "condition",
        "detector",
        "token_method",
        "refusal_openings",
        "prompt_format",
        "random_control",
        "n_threads",
        "n_gpu_layers",
    )

    sources: tuple[str, ...] = setting(
        ("en", "de", "zh", "ja"), resumable=True, help="Languages whose directions are extracted."
    )
    targets: tuple[str, ...] = setting(("en", "de", "zh", "ja", "ru"), resumable=True, help="Languages evaluated.")
    n_train: int = setting(16)
    n_val: int = setting(6)
    n_test: int = setting(8, help="Harmful test prompts per target language (paper: 572).")
    max_new_tokens: int = setting(32)
    condition: TransferCondition = setting(
        "ablation", help="Intervention of the matrix: clean ablation, or the paper's harm_ablation (multi_test)."
    )
    filter: bool = setting(True)
    token_method: TokenMethod = setting(
        "derive", help="Refusal tokens per language: from the model's own refusals, or the built-in table."
    )
    n_token_probe: int = setting(32)
    token_max_new_tokens: int = setting(8)
    refusal_openings: Mapping[str, tuple[str, ...]] = setting(
        default_factory=dict, parse=parse_language_openings, help='Per-language overrides, e.g. "de=Ich,Es;ja=申し訳".'
    )
    keep_activations: bool = setting(True)
    random_control: bool = setting(
        True,
        resumable=True,
        pair=True,
        help="Also ablate a random direction with the first source's norm (the control row).",
    )

    def _check(self) -> None:
        if not self.sources or not self.targets:
            raise PyrefusalError("give at least one source and one target language")


@dataclass(frozen=True)
class QuantSweepSettings(Settings):
    """Everything that determines a quantization sweep (saved as ``config.json``).

    Attributes:
        types: llama.cpp file types (``q8_0``, ``q5_k_m``, ``f16``, ...); the model's own type uses the model
            file itself.
        allow_requantize: permit making variants from an already-quantized model (required then; the
            report says "requantized from <type>, not from original weights").
        source_lang: language of the train/val/test prompts and of the refusal tokens.
        n_test: harmful test prompts answered by every (variant, direction) pair.
        positions: post-instruction positions (negative) whose candidates are extracted and selected from;
            empty = all of them (the paper). Fewer positions make selection proportionally cheaper.
        filter: filter train/val prompts by refusal score (paper).
        work_dir: where variant GGUFs and extraction files go (default under the pyrefusal cache).

    Resumable: types, work_dir, allow_requantize and the runtime's resources (n_ctx, n_seq_max, n_threads),
    which are not part of the results.
    """

    # as before the settings model: a key missing from an older sweep's config.json counts as a changed setting
    MISSING_KEYS_TAKE_DEFAULTS: ClassVar[bool] = False
    KEYS: ClassVar[tuple[str, ...]] = (
        "model",
        "types",
        "allow_requantize",
        "data_dir",
        "source_lang",
        "n_train",
        "n_val",
        "n_test",
        "max_new_tokens",
        "seed",
        "positions",
        "kl_threshold",
        "prune_fraction",
        "filter",
        "detector",
        "work_dir",
        "n_ctx",
        "n_seq_max",
        "n_threads",
    )
    OPTIONS: ClassVar[tuple[str, ...]] = (
        "model",
        "types",
        "allow_requantize",
        "data_dir",
        "n_train",
        "n_val",
        "n_test",
        "max_new_tokens",
        "positions",
        "seed",
        "work_dir",
        "n_threads",
    )

    types: tuple[str, ...] = setting(DEFAULT_TYPES, resumable=True, help="Comma-separated llama.cpp file types.")
    allow_requantize: bool = setting(
        False,
        resumable=True,
        flag=True,
        help="Required when the source is already quantized: variants are derived from quantized weights.",
    )
    source_lang: str = setting("en", help="Language of the prompts and of the refusal tokens.")
    n_train: int = setting(16)
    n_val: int = setting(6)
    n_test: int = setting(12, help="Harmful test prompts answered by every (variant, direction) pair.")
    max_new_tokens: int = setting(24)
    positions: tuple[int, ...] = setting(
        (),
        parse=lambda text: tuple(int(p) for p in _csv(text)),
        help="Comma-separated eoi positions to consider (default: all).",
    )
    filter: bool = setting(True)
    work_dir: str | None = setting(
        None, resumable=True, path=True, help="Where the variant GGUFs go (default: the cache)."
    )
    n_ctx: int = setting(4096)
    n_seq_max: int = setting(16, resumable=True)


#: Which eoi positions ``pyrefusal optimize`` may take its direction from.
OptimizePositions = Literal["search", "selected"]
#: How ``pyrefusal optimize`` picks the direction's layer: fractional index, whole layers, or the run's layer.
LayerIndex = Literal["fractional", "integer", "selected"]
#: Weight kernels of ``pyrefusal optimize``: one per component, one shared, or weight 1 everywhere (the paper).
KernelMode = Literal["per-component", "shared", "full"]
#: Whether ``pyrefusal optimize`` edits the token embeddings (auto: searched, off when the LM head is tied).
EmbeddingsMode = Literal["auto", "search", "on", "off"]


def _floats(text: str) -> tuple[float, ...]:
    """``"0.8,1.5"`` -> ``(0.8, 1.5)``."""
    return tuple(float(v) for v in _csv(text))


@dataclass(frozen=True)
class OptimizeSettings(Settings):
    """Everything that determines a ``pyrefusal optimize`` study of a finished run (``RUN_DIR/optimize/config.json``).

    The model, data, train sizes and refusal settings are the run's (filled in by the study); these fields say
    what is searched and on which prompts. See docs (README "pyrefusal optimize") for the search space.

    Attributes:
        trials: complete trials the study should hold (more continue it; None: 20 for a new study, else none
            added).
        languages: objective languages (default: the run's target languages).
        n_val: val prompts per kind and language scored per trial.
        n_test: test prompts per kind and language for the pick (0: the run's).
        max_new_tokens: greedy tokens of the confirmation and test generations.
        seed: TPE sampler seed.
        positions / layer_index / direction_langs / direction_mix / direction_span / kernel / embeddings /
            max_weight: the search space (each part switchable).
        kl_threshold: trials whose pooled KL exceeds it are not confirmed by generation.
        n_confirm: Pareto trials confirmed by generation on the val prompts.
        test_harmless: the pick's test generation also covers the harmless prompts.

    Resumable: trials, n_test and test_harmless (only the pick's test split uses them), n_confirm, kl_threshold
    and the runtime's resources.
    """

    KEYS: ClassVar[tuple[str, ...]] = (
        "model",
        "data_dir",
        "trials",
        "languages",
        "n_train",
        "n_val",
        "n_test",
        "max_new_tokens",
        "seed",
        "positions",
        "layer_index",
        "direction_langs",
        "direction_mix",
        "direction_span",
        "kernel",
        "embeddings",
        "max_weight",
        "kl_threshold",
        "prune_fraction",
        "n_confirm",
        "test_harmless",
        "detector",
        "n_ctx",
        "n_seq_max",
        "n_threads",
    )
    OPTIONS: ClassVar[tuple[str, ...]] = (
        "trials",
        "languages",
        "n_val",
        "n_test",
        "max_new_tokens",
        "seed",
        "positions",
        "layer_index",
        "direction_langs",
        "direction_mix",
        "direction_span",
        "kernel",
        "embeddings",
        "max_weight",
        "kl_threshold",
        "n_confirm",
        "test_harmless",
        "detector",
        "n_seq_max",
        "n_threads",
    )

    trials: int | None = setting(
        None,
        resumable=True,
        help="Complete trials the study should hold; more than it has continues it (default: 20 for a new study, "
        "none added to an existing one).",
    )
    languages: tuple[str, ...] = setting(
        (), help="Comma-separated objective languages (default: the run's target languages; 'en' = heretic's)."
    )
    n_val: int = setting(8, help="Val prompts per kind and language scored by every trial.")
    n_test: int = setting(
        0, resumable=True, help="Test prompts per kind and language for --pick (0: the run's --n-test)."
    )
    max_new_tokens: int = setting(48, help="Greedy tokens of the confirmation and test generations.")
    seed: int = setting(1, help="Seed of the TPE sampler.")
    positions: OptimizePositions = setting(
        "search", help="Direction position: search every eoi position, or keep the run's selected one."
    )
    layer_index: LayerIndex = setting(
        "fractional",
        help="Direction layer: fractional index interpolating adjacent layers' candidates, whole layers, or the "
        "run's selected layer.",
    )
    direction_langs: tuple[str, ...] = setting(
        (),
        help="Comma-separated languages whose directions may be used (extracted for languages other than the run's "
        "source; default: the source only).",
    )
    direction_mix: bool = setting(
        True, pair=True, help="With several --direction-langs, also try the normalised mean of their directions."
    )
    direction_span: bool = setting(
        False,
        pair=True,
        help="With several --direction-langs, also try removing all their directions at once (rank k = one per "
        "language, orthonormalised; the same per-writer LoRA at rank k).",
    )
    kernel: KernelMode = setting(
        "per-component",
        help="Layer weights: a kernel per component (attention, MLP), one shared kernel, or full (weight 1 "
        "everywhere, the paper's ablation).",
    )
    embeddings: EmbeddingsMode = setting(
        "auto",
        help="Edit the token embeddings: search on/off, always, never; auto = search, or off when the model ties "
        "its LM head to the embeddings (a LoRA cannot carry them there).",
    )
    max_weight: tuple[float, ...] = setting(
        (0.8, 1.5), parse=_floats, help="Range 'low,high' of a kernel's maximum weight (heretic: 0.8,1.5)."
    )
    kl_threshold: float = setting(
        0.2, resumable=True, help="Trials whose pooled first-token KL exceeds this are not confirmed by generation."
    )
    n_confirm: int = setting(5, resumable=True, help="Pareto trials confirmed by greedy generation on val prompts.")
    test_harmless: bool = setting(
        True,
        pair=True,
        resumable=True,
        help="--pick: also generate on the harmless test prompts (false refusals by the detector); "
        "--no-test-harmless generates on the harmful ones only (first-token false refusal is still reported).",
    )
    n_ctx: int = setting(4096, resumable=True)
    n_seq_max: int = setting(16, resumable=True)

    def _check(self) -> None:
        if self.trials is not None and self.trials < 1:
            raise PyrefusalError(f"trials (--trials) must be at least 1, got {self.trials}")
        self._at_least_one(("n_val", "max_new_tokens", "n_seq_max"))
        if self.n_test < 0 or self.n_confirm < 0:
            raise PyrefusalError("--n-test and --n-confirm must be >= 0")
        if len(self.max_weight) != 2 or not 0 <= self.max_weight[0] <= self.max_weight[1]:
            raise PyrefusalError(f"--max-weight must be 'low,high' with 0 <= low <= high, got {self.max_weight}")
        if not self.kl_threshold > 0:
            raise PyrefusalError(f"kl_threshold (--kl-threshold) must be > 0, got {self.kl_threshold}")


# Former names (config.json's classes before the settings model), kept for tests and users.
RunConfig = RunSettings
TransferConfig = TransferSettings
QuantSweepConfig = QuantSweepSettings
