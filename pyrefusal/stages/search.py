"""The stages of ``pyrefusal optimize``: search space, per-trial scoring, confirmation and test evaluation.

* :class:`SearchSpace` turns a trial's parameters into a
  :class:`~pyrefusal.steering.weighted.WeightedAblation` (direction from position, fractional layer index and
  source language or the normalised mean of several languages; a weight kernel per component; embeddings on or
  off). It only needs an object with Optuna's ``suggest_float`` / ``suggest_int`` / ``suggest_categorical``.
* :func:`prepare_objective` tokenises the val prompts of every objective language and computes the baseline
  logits once; :func:`score_trial` arms one ablation as a LoRA adapter written by
  :func:`~pyrefusal.steering.weighted.write_weighted_lora` (the function ``export lora`` uses for a pick), scores
  it and frees it: first-token refusal probability on harmful prompts, first-token KL and refusal probability
  on harmless prompts, per language.
* :func:`generate_condition` generates greedily under an armed condition and judges each response with a
  substring detector (confirmation of Pareto trials on val prompts, and the test split of a pick), appending
  to ``completions.jsonl``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from pyrefusal.data.polyrefuse import Prompt
from pyrefusal.errors import PyrefusalError
from pyrefusal.method.kernel import Kernel, interpolate_layers, mean_direction
from pyrefusal.method.refusal import RefusalDetector
from pyrefusal.method.selection import kl_divergence, log_softmax
from pyrefusal.runtime import Runtime
from pyrefusal.stages.generate import Completion, append_jsonl, complete_armed, read_jsonl
from pyrefusal.steering.weighted import (
    WeightedAblation,
    WriterRows,
    apply_weighted,
    release_weighted,
    write_weighted_lora,
)

__all__ = [
    "LanguageScores",
    "ObjectiveSet",
    "SearchSpace",
    "TrialScores",
    "generate_condition",
    "prepare_objective",
    "score_armed",
    "score_trial",
]

MEAN = "mean"  # the direction source that averages every language's direction
SPAN = "span"  # the direction source that removes every language's direction together (rank k, orthonormalised)


class TrialLike(Protocol):
    """What :meth:`SearchSpace.suggest` needs of an Optuna trial."""

    def suggest_float(self, name: str, low: float, high: float) -> float: ...

    def suggest_int(self, name: str, low: int, high: int) -> int: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


@dataclass(frozen=True)
class SearchSpace:
    """What ``pyrefusal optimize`` searches (each part switchable by its settings).

    Attributes:
        n_layer: the model's blocks.
        directions: per source language, candidates float64 ``(n_positions, n_layers, n_embd)``.
        positions: eoi positions of axis 0 of every ``directions`` array.
        position_choices: positions the search may pick (one: fixed).
        layer_index: ``"fractional"`` (float index, adjacent candidates interpolated), ``"integer"`` or
            ``"selected"`` (the run's layer).
        index_range: ``(low, high)`` of the direction index.
        selected: the run's ``(position, layer)``.
        sources: direction sources to choose from (language codes, :data:`MEAN`, and :data:`SPAN`: all the
            languages' directions at once, a rank-k ablation).
        kernel: ``"per-component"`` (attention and MLP kernels), ``"shared"`` (one kernel) or ``"full"``
            (weight 1 everywhere: the paper's ablation).
        embeddings: the choices for editing the embeddings (``(True, False)``: searched).
        max_weight: ``(low, high)`` of a kernel's maximum weight.
    """

    n_layer: int
    directions: Mapping[str, np.ndarray]
    positions: tuple[int, ...]
    position_choices: tuple[int, ...]
    layer_index: Literal["fractional", "integer", "selected"]
    index_range: tuple[float, float]
    selected: tuple[int, int]
    sources: tuple[str, ...]
    kernel: Literal["per-component", "shared", "full"]
    embeddings: tuple[bool, ...]
    max_weight: tuple[float, float] = (0.8, 1.5)

    # -- the space -------------------------------------------------------------------------------

    def suggest(self, trial: TrialLike) -> dict[str, Any]:
        """Draw one point: ``{parameter: value}`` (Optuna records the same names)."""
        p: dict[str, Any] = {}
        if len(self.position_choices) > 1:
            p["position"] = trial.suggest_categorical("position", list(self.position_choices))
        lo, hi = self.index_range
        if self.layer_index == "fractional" and hi > lo:
            p["direction_index"] = trial.suggest_float("direction_index", lo, hi)
        elif self.layer_index == "integer" and math.floor(hi) > math.ceil(lo):
            p["direction_index"] = trial.suggest_int("direction_index", math.ceil(lo), math.floor(hi))
        if len(self.sources) > 1:
            p["direction_source"] = trial.suggest_categorical("direction_source", list(self.sources))
        last = float(self.n_layer - 1)
        for comp in {"per-component": ("attn", "mlp"), "shared": ("all",), "full": ()}[self.kernel]:
            p[f"{comp}.max_weight"] = trial.suggest_float(f"{comp}.max_weight", *self.max_weight)
            p[f"{comp}.max_position"] = trial.suggest_float(f"{comp}.max_position", 0.0, last)
            p[f"{comp}.min_weight_frac"] = trial.suggest_float(f"{comp}.min_weight_frac", 0.0, 1.0)
            p[f"{comp}.falloff"] = trial.suggest_float(f"{comp}.falloff", 1.0, max(1.0, 0.6 * last) + 1e-9)
        if len(self.embeddings) > 1:
            p["embeddings"] = trial.suggest_categorical("embeddings", list(self.embeddings))
        return p

    def direction(self, params: Mapping[str, Any]) -> np.ndarray:
        """The unit direction of ``params``, float64 ``(n_embd,)``; for :data:`SPAN` one direction per language,
        ``(k, n_embd)`` (orthonormalised by :class:`~pyrefusal.steering.weighted.WeightedAblation`)."""
        pos = int(params.get("position", self.position_choices[0]))
        if self.layer_index == "selected":
            index: float = float(self.selected[1])
        else:
            index = float(params.get("direction_index", self.index_range[0]))
        source = str(params.get("direction_source", self.sources[0]))
        row = self.positions.index(pos)
        langs = list(self.directions) if source in (MEAN, SPAN) else [source]
        dirs = [interpolate_layers(self.directions[lang][row], index) for lang in langs]
        if source == SPAN:
            return np.stack(dirs)  # (k, n_embd)
        return dirs[0] if len(dirs) == 1 else mean_direction(np.stack(dirs))

    def kernels(self, params: Mapping[str, Any]) -> tuple[Kernel, Kernel]:
        """The ``(attention, MLP)`` kernels of ``params``."""

        def one(comp: str) -> Kernel:
            mx = float(params[f"{comp}.max_weight"])
            return Kernel(
                mx,
                float(params[f"{comp}.max_position"]),
                mx * float(params[f"{comp}.min_weight_frac"]),
                float(params[f"{comp}.falloff"]),
            )

        if self.kernel == "full":
            full = Kernel.full(self.n_layer)
            return full, full
        if self.kernel == "shared":
            k = one("all")
            return k, k
        return one("attn"), one("mlp")

    def ablation(self, params: Mapping[str, Any]) -> WeightedAblation:
        """The intervention of ``params`` (deterministic: ``pick.json`` can be rebuilt from the parameters)."""
        attn, mlp = self.kernels(params)
        embd = bool(params.get("embeddings", self.embeddings[0]))
        return WeightedAblation(
            self.direction(params), attn.weights(self.n_layer), mlp.weights(self.n_layer), 1.0 if embd else 0.0
        )

    def basis(self) -> np.ndarray:
        """Every candidate the space can combine, float64 ``(m, n_embd)`` (non-zero ones only)."""
        lo, hi = self.index_range
        if self.layer_index == "selected":
            layers = [self.selected[1]]
        else:
            layers = list(range(math.floor(lo), min(math.ceil(hi), self.n_layer - 1) + 1))
        rows = [
            v[self.positions.index(p), lay]
            for v in self.directions.values()
            for p in self.position_choices
            for lay in layers
        ]
        out = np.stack(rows)
        return out[np.linalg.norm(out, axis=1) > 1e-12]


# --- scoring ------------------------------------------------------------------------------------


@dataclass
class ObjectiveSet:
    """The val prompts of one objective language, tokenised, with their baseline.

    Attributes:
        lang: language.
        harmful / harmless: the prompts.
        refusal_ids: the language's refusal tokens.
        harmful_tokens / harmless_tokens: chat-formatted tokens.
        base_harmless: baseline logits of the harmless prompts, float32 ``(n_harmless, n_vocab)``.
        base_refusal / base_false_refusal: baseline mean refusal-token probability on harmful / harmless prompts.
    """

    lang: str
    harmful: list[Prompt]
    harmless: list[Prompt]
    refusal_ids: list[int]
    harmful_tokens: list[list[int]] = field(default_factory=list)
    harmless_tokens: list[list[int]] = field(default_factory=list)
    base_harmless: np.ndarray | None = None
    base_refusal: float = math.nan
    base_false_refusal: float = math.nan


@dataclass(frozen=True)
class LanguageScores:
    """One language's objectives under one intervention (means over its val prompts)."""

    refusal: float
    kl: float
    false_refusal: float

    def to_dict(self) -> dict[str, float]:
        return {"refusal": self.refusal, "kl": self.kl, "false_refusal": self.false_refusal}


@dataclass(frozen=True)
class TrialScores:
    """Objectives of one intervention over every objective language.

    Attributes:
        per_language: ``{lang: LanguageScores}``.
        seconds: where the trial's time went (``build``, ``apply``, ``forward``, ``release``).
    """

    per_language: dict[str, LanguageScores]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def refusal(self) -> float:
        """Pooled refusal: the mean over languages (each language counts equally)."""
        return float(np.mean([s.refusal for s in self.per_language.values()]))

    @property
    def worst(self) -> tuple[str, float]:
        """The language with the most refusal and its value."""
        lang = max(self.per_language, key=lambda k: self.per_language[k].refusal)
        return lang, self.per_language[lang].refusal

    @property
    def kl(self) -> float:
        """Pooled first-token KL on harmless prompts (mean over the languages that have them)."""
        return _nanmean([s.kl for s in self.per_language.values()])

    @property
    def false_refusal(self) -> float:
        """Pooled refusal-token probability on harmless prompts (languages that have them)."""
        return _nanmean([s.false_refusal for s in self.per_language.values()])

    def summary(self) -> dict[str, Any]:
        """JSON values: pooled objectives, worst language, per language, seconds."""
        lang, worst = self.worst
        return {
            "refusal": self.refusal,
            "kl": self.kl,
            "false_refusal": self.false_refusal,
            "worst_lang": lang,
            "worst_refusal": worst,
            "per_language": {k: v.to_dict() for k, v in self.per_language.items()},
            "seconds": dict(self.seconds),
        }


def _nanmean(values: Sequence[float] | np.ndarray) -> float:
    """Mean of the non-NaN values; NaN when there are none (e.g. a language without harmless prompts)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan


def _p_refusal(logits: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Refusal-token probability per prompt, float64 ``(n,)`` from logits ``(n, n_vocab)``."""
    return np.exp(log_softmax(logits))[:, list(ids)].sum(axis=1)


def prepare_objective(
    runtime: Runtime,
    prompts: Mapping[str, tuple[Sequence[Prompt], Sequence[Prompt]]],
    refusal_ids: Mapping[str, Sequence[int]],
    system: str | None,
    *,
    require_harmless: bool = True,
) -> list[ObjectiveSet]:
    """Tokenise ``{lang: (harmful, harmless)}`` and compute the baseline (no intervention) once.

    With ``require_harmless=False`` a language may lack harmless prompts (e.g. PolyRefuse has no zh harmless test
    file); its KL and false refusal are then NaN and left out of the pooled values.

    Raises:
        PyrefusalError: a language without harmful (or, when required, harmless) prompts.
    """
    sets = []
    for lang, (harmful, harmless) in prompts.items():
        if not harmful or (require_harmless and not harmless):
            raise PyrefusalError(f"language {lang!r} has no harmful or no harmless val prompts to score trials on")
        s = ObjectiveSet(lang, list(harmful), list(harmless), list(refusal_ids[lang]))
        s.harmful_tokens = [runtime.chat_tokens(p.text, system) for p in harmful]
        s.harmless_tokens = [runtime.chat_tokens(p.text, system) for p in harmless]
        sets.append(s)
    runtime.clear_plan()
    harmful_logits, harmless_logits = _forward(runtime, sets)
    for s, hl, nl in zip(sets, harmful_logits, harmless_logits, strict=True):
        s.base_harmless = nl
        s.base_refusal = float(_p_refusal(hl, s.refusal_ids).mean())
        s.base_false_refusal = _nanmean(_p_refusal(nl, s.refusal_ids))
    return sets


def _forward(runtime: Runtime, sets: Sequence[ObjectiveSet]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Last-position logits of every set's harmful and harmless prompts, in one batched call."""
    toks = [t for s in sets for t in (*s.harmful_tokens, *s.harmless_tokens)]
    logits = runtime.last_logits(toks)  # (n_total, n_vocab)
    harmful, harmless, i = [], [], 0
    for s in sets:
        a, b = len(s.harmful_tokens), len(s.harmless_tokens)
        harmful.append(logits[i : i + a])
        harmless.append(logits[i + a : i + a + b])
        i += a + b
    return harmful, harmless


def score_armed(runtime: Runtime, sets: Sequence[ObjectiveSet]) -> TrialScores:
    """The objectives under whatever is armed on ``runtime`` now (the caller arms and clears)."""
    harmful, harmless = _forward(runtime, sets)
    per: dict[str, LanguageScores] = {}
    for s, hl, nl in zip(sets, harmful, harmless, strict=True):
        assert s.base_harmless is not None
        per[s.lang] = LanguageScores(
            refusal=float(_p_refusal(hl, s.refusal_ids).mean()),
            kl=_nanmean(kl_divergence(s.base_harmless, nl)),
            false_refusal=_nanmean(_p_refusal(nl, s.refusal_ids)),
        )
    return TrialScores(per)


def score_trial(
    runtime: Runtime,
    rows: WriterRows,
    ablation: WeightedAblation,
    sets: Sequence[ObjectiveSet],
    adapter_path: Path,
    *,
    provenance: Mapping[str, Any],
    hook_embeddings: bool,
) -> TrialScores:
    """Write ``ablation`` as a LoRA adapter, apply it in llama.cpp's graph, score it, free it and delete the file.

    Args:
        runtime: the model (loaded once per study).
        rows: the study's precomputed writer rows.
        ablation: the trial's intervention.
        sets: from :func:`prepare_objective`.
        adapter_path: where the trial's adapter file is written (deleted afterwards).
        provenance: written into the adapter.
        hook_embeddings: ablate the embeddings with the hook (tied embeddings).
    """
    t0 = time.perf_counter()
    path = None
    if ablation.writer_weights() or (ablation.embeddings and not hook_embeddings):
        path = write_weighted_lora(rows, ablation, adapter_path, provenance=provenance)
    t1 = time.perf_counter()
    try:
        apply_weighted(runtime, path, ablation, hook_embeddings=hook_embeddings)
        t2 = time.perf_counter()
        scores = score_armed(runtime, sets)
        t3 = time.perf_counter()
    finally:
        release_weighted(runtime, path, delete=True)
    t4 = time.perf_counter()
    return TrialScores(
        scores.per_language, {"build": t1 - t0, "apply": t2 - t1, "forward": t3 - t2, "release": t4 - t3}
    )


# --- generation ------------------------------------------------------------------------------


def generate_condition(
    runtime: Runtime,
    condition: str,
    prompts: Sequence[Prompt],
    arm: Callable[[], None],
    detector: RefusalDetector,
    completions_path: Path,
    *,
    max_new_tokens: int,
    system: str | None,
    batch_size: int,
    stop_when_refused: bool = True,
) -> list[Completion]:
    """Greedy completions of ``prompts`` under ``condition`` (armed by ``arm``), judged by ``detector``.

    Completions already in ``completions_path`` for ``(prompt id, condition)`` are reused; new ones are appended
    batch by batch (a killed study keeps them). The runtime's plan is cleared afterwards. With
    ``stop_when_refused`` (default) a sequence ends once the detector has read a refusal (finish_reason
    ``"refusal_detected"``, :func:`~pyrefusal.stages.generate.complete_armed`): the search only needs verdicts.

    Returns:
        One completion per prompt, in ``prompts`` order.
    """
    have = {(c.prompt_id, c.condition): c for c in read_jsonl(completions_path)} if completions_path.exists() else {}
    todo = [p for p in prompts if (p.id, condition) not in have]
    if todo:
        arm()

        def keep(batch: list[Completion]) -> None:
            append_jsonl(completions_path, batch)  # a killed study keeps what it generated
            have.update({(c.prompt_id, c.condition): c for c in batch})

        try:
            complete_armed(
                runtime,
                todo,
                condition,
                detector,
                max_new_tokens=max_new_tokens,
                system=system,
                batch_size=batch_size,
                on_batch=keep,
                stop_when_refused=stop_when_refused,
            )
        finally:
            runtime.clear_plan()
    return [have[(p.id, condition)] for p in prompts]
