"""``results.json`` of a ``pyrefusal run`` as one typed value (foundation: imports only settings, rundir, errors).

Written by :mod:`pyrefusal.stages.results` (``assemble_results``) for :mod:`pyrefusal.studies.run`, read by the CLI
(``report``, ``export``), :mod:`pyrefusal.steering.steered` (``steering_from_run``), :mod:`pyrefusal.reporting`
and ``rerender``. It lives at the foundation so that every one of those layers may import it (steering sits below
stages, so the type cannot live in stages/ or reporting/).

:class:`RunResults` wraps the stored JSON object and keeps its key order, so a load/save round trip writes the
same bytes. Readers use its typed views (:class:`ModelFacts`, :class:`DirectionFacts`, :class:`EvaluationCell`
rows, :class:`~pyrefusal.settings.RunSettings`) instead of indexing the dict; :meth:`RunResults.load` checks what
they rely on once and says which file is wrong and how to recover.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pyrefusal.errors import PyrefusalError
from pyrefusal.rundir import write_atomic
from pyrefusal.settings import RunSettings

if TYPE_CHECKING:  # numpy is imported where a direction is read, not with this module
    import numpy as np

__all__ = [
    "RESULTS_FILE",
    "DirectionFacts",
    "Evaluation",
    "EvaluationCell",
    "ModelFacts",
    "ResultsError",
    "RunResults",
    "load_direction",
]

#: File name of a run's results in its directory.
RESULTS_FILE = "results.json"


class ResultsError(PyrefusalError):
    """A run's ``results.json`` is missing, not JSON, or lacks what its readers need (the message says how to
    recover)."""


class EvaluationCell(TypedDict, total=False):
    """One ``results["evaluation"][lang][condition]``: the harmful prompts' rates plus the metrics beside them.

    ``harmless`` holds the same rates for the harmless prompts (``None`` when none were generated); ``judge`` is
    there only when a guard judge ran.
    """

    n: int
    refusal_rate: float | None
    refusal_rate_ci95: list[float] | None
    degenerate_rate: float | None
    detector: str
    completions: str
    refusal_by_budget: dict[str, float] | None
    harmless: dict[str, Any] | None
    first_token_refusal_prob: float | None
    judge: dict[str, Any]
    # only in languages the substring detector is blind to (stages.results.evaluation_table): its numbers, and the
    # first-token detector's that make refusal_rate there
    substring: dict[str, Any]
    first_token_detector: dict[str, Any]


#: ``{lang: {condition: EvaluationCell}}`` in the configured language order.
Evaluation = dict[str, dict[str, EvaluationCell]]


@dataclass(frozen=True)
class ModelFacts:
    """What a run recorded about its model (``results["model"]``); fields an old or hand-written file lacks are
    ``None``."""

    name: str
    path: str
    sha256: str | None
    arch: str | None
    n_layer: int | None
    n_embd: int | None
    file_type: str | None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelFacts:
        """The facts of a stored ``model`` object."""
        return cls(
            name=str(d.get("name", Path(str(d["path"])).stem)),
            path=str(d["path"]),
            sha256=d.get("sha256"),
            arch=d.get("arch"),
            n_layer=d.get("n_layer"),
            n_embd=d.get("n_embd"),
            file_type=d.get("file_type"),
        )


@dataclass(frozen=True)
class DirectionFacts:
    """The selected direction (``results["direction"]``): where it was found and how it scored.

    Attributes:
        layer: block input it was read at (and is applied at for additions).
        position: post-instruction token offset (negative).
        source_lang: language of the prompts it was extracted from.
        norm: L2 norm of the stored (unnormalised) direction.
        file: the ``.npy`` holding it, relative to the run directory.
        kl / refusal_score / baseline_refusal_score / steering_score: the selection's scores.
        selection_mode: ``"lazy"`` or ``"full"``.
        rule: the selection rule's settings (``prune_fraction``, ``kl_threshold``, ``steering_filter``).
        refusal_tokens: ``{token id: text}`` of the refusal score.
        heatmap: the candidates figure, once plotted.
    """

    layer: int
    position: int
    source_lang: str | None
    norm: float | None
    file: str
    kl: float | None
    refusal_score: float | None
    baseline_refusal_score: float | None
    steering_score: float | None
    selection_mode: str | None
    rule: dict[str, Any]
    refusal_tokens: dict[str, str]
    heatmap: str | None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DirectionFacts:
        """The facts of a stored ``direction`` object."""
        return cls(
            layer=int(d["layer"]),
            position=int(d["position"]),
            source_lang=d.get("source_lang"),
            norm=d.get("norm"),
            file=str(d.get("file", "direction.npy")),
            kl=d.get("kl"),
            refusal_score=d.get("refusal_score"),
            baseline_refusal_score=d.get("baseline_refusal_score"),
            steering_score=d.get("steering_score"),
            selection_mode=d.get("selection_mode"),
            rule=dict(d.get("rule") or {}),
            refusal_tokens=dict(d.get("refusal_tokens") or {}),
            heatmap=d.get("heatmap"),
        )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class RunResults:
    """A run's ``results.json``.

    Attributes:
        data: the JSON object: ``model``, ``direction``, ``prompts``, ``evaluation``, ``steering``,
            ``missing_test_files``, ``short_test_files``, ``capability``, ``config``, ``versions``, ``timings``,
            ``timings_previous`` (and ``figure`` once plotted), in that order.
    """

    data: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> RunResults:
        """Read and check ``path`` (a ``results.json`` or the run directory holding one).

        Checks that it is a JSON object with a ``model`` object naming its ``path``, a ``config`` object, and a
        ``direction`` whose ``layer`` and ``position`` are whole numbers: what every reader relies on.

        Raises:
            ResultsError: the file is missing, not JSON, or fails a check; the message names the file, what is
                wrong, and how to recover.
        """
        path = Path(path)
        if path.is_dir():
            path = path / RESULTS_FILE
        run_dir = path.parent
        rerun = (
            f"re-run `pyrefusal run --out {run_dir}` with the options in {run_dir / 'config.json'} "
            "(finished stages are reused; results.json is written again)"
        )
        if not path.is_file():
            raise ResultsError(f"{path} does not exist: {run_dir} holds no finished run; {rerun}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ResultsError(f"{path} is not JSON ({e}); the file was cut or edited: {rerun}") from None
        if not isinstance(data, dict):
            raise ResultsError(f"{path} holds a {type(data).__name__}, not a run's results object; {rerun}")
        problem = cls._problem(data)
        if problem:
            raise ResultsError(f"{path} is not a finished run's results: {problem}; {rerun}")
        return cls(data)

    @staticmethod
    def _problem(data: Mapping[str, Any]) -> str | None:
        """What a loaded object lacks for the readers, or ``None``."""
        model = data.get("model")
        if not isinstance(model, dict) or not isinstance(model.get("path"), str):
            return "it lacks `model` (an object with the model file's `path`)"
        if not isinstance(data.get("config"), dict):
            return "it lacks `config` (the run's settings)"
        direction = data.get("direction")
        if not isinstance(direction, dict):
            return "it lacks `direction` (the selected layer and position)"
        for key in ("layer", "position"):
            if not _is_int(direction.get(key)):
                return f"`direction.{key}` is {direction.get(key)!r}, not a whole number"
        return None

    def save(self, path: Path) -> None:
        """Write ``path`` atomically (``indent=1``, UTF-8 kept as is)."""
        write_atomic(Path(path), json.dumps(self.data, indent=1, ensure_ascii=False))

    # --- typed views -------------------------------------------------------------------------

    @property
    def model(self) -> ModelFacts:
        """The model's facts (``results["model"]``)."""
        return ModelFacts.from_dict(self.data["model"])

    @property
    def direction(self) -> DirectionFacts:
        """The selected direction's facts (``results["direction"]``)."""
        return DirectionFacts.from_dict(self.data["direction"])

    @property
    def config(self) -> dict[str, Any]:
        """The run's settings as stored (``config.json``'s object, key order kept)."""
        return self.data["config"]

    @property
    def settings(self) -> RunSettings:
        """The run's settings as :class:`~pyrefusal.settings.RunSettings` (keys an older run lacks take their
        defaults)."""
        return RunSettings.from_dict(self.config)

    @property
    def conditions(self) -> list[str]:
        """The configured conditions, in order."""
        return list(self.config["conditions"])

    @property
    def evaluation(self) -> Evaluation:
        """``{lang: {condition: EvaluationCell}}`` in the configured language order (empty before generation)."""
        return self.data.get("evaluation") or {}

    @evaluation.setter
    def evaluation(self, value: Mapping[str, Any]) -> None:
        self.data["evaluation"] = dict(value)

    @property
    def test_ids(self) -> dict[str, dict[str, list[str]]]:
        """The test prompt ids ``{lang: {kind: [id, ...]}}`` (``prompts.test``)."""
        return (self.data.get("prompts") or {}).get("test") or {}

    @property
    def steering(self) -> dict[str, Any]:
        """``{"requested": path, "used": {condition: path}}``: the steering path asked for and the one each
        condition ran with."""
        return self.data.get("steering") or {}

    @property
    def capability(self) -> dict[str, dict[str, Any]]:
        """``{condition: side-effect metrics}`` (perplexity ratio, first-token KL; empty when not measured)."""
        return self.data.get("capability") or {}

    @property
    def missing_test_files(self) -> list[str]:
        """Target languages' test files that were not there (not evaluated)."""
        return list(self.data.get("missing_test_files") or [])

    @property
    def short_test_files(self) -> list[str]:
        """Test files with fewer prompts than the others."""
        return list(self.data.get("short_test_files") or [])

    @property
    def figure(self) -> str | None:
        """The refusal-rate figure, once plotted."""
        return self.data.get("figure")

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per stage of the invocation that wrote the file."""
        return self.data.get("timings") or {}

    @property
    def timings_previous(self) -> list[dict[str, float]]:
        """Timings of the earlier invocations of a resumed run (oldest first)."""
        return list(self.data.get("timings_previous") or [])

    @property
    def versions(self) -> dict[str, Any]:
        """pyrefusal, llama-cpp-python and build facts of the writer."""
        return self.data.get("versions") or {}

    def refusal_rates(self) -> dict[str, dict[str, float | None]]:
        """``{lang: {condition: refusal rate}}`` of the substring detector."""
        return {lang: {c: v["refusal_rate"] for c, v in conds.items()} for lang, conds in self.evaluation.items()}

    # --- what the figures add ------------------------------------------------------------------

    def set_heatmap(self, name: str) -> None:
        """Record the candidates figure's file name (``direction.heatmap``)."""
        self.data["direction"]["heatmap"] = name

    def set_figure(self, name: str) -> None:
        """Record the refusal-rate figure's file name (``figure``)."""
        self.data["figure"] = name


def load_direction(path: Path, *, n_embd: int | None = None) -> np.ndarray:
    """A run's stored direction (``direction.npy``, or a variant's ``<TYPE>.direction.npy``), checked.

    Read with ``allow_pickle=False`` (a ``.npy`` holding Python objects is refused, never unpickled).

    Args:
        path: the ``.npy`` file.
        n_embd: the model's width, when known: the direction must have exactly that many entries.

    Returns:
        float32 ``(n_embd,)``.

    Raises:
        ResultsError: missing, not a ``.npy`` (truncated, garbage), an object or non-numeric array, not 1-D,
            the wrong width, NaN/inf or all zeros; the message names the file and how to recover.
    """
    import numpy as np

    path = Path(path)
    rerun = (
        f"delete it and re-run `pyrefusal run --out {path.parent}` with the options in {path.parent / 'config.json'} "
        "(it is written again from the saved candidates)"
    )
    if not path.is_file():
        raise ResultsError(f"{path} does not exist; {rerun}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, TypeError) as e:  # truncated, not .npy, or an object array
        raise ResultsError(f"{path} is not a readable direction ({e}); {rerun}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        kind = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise ResultsError(f"{path} holds {kind} values, not a real-valued direction; {rerun}")
    if arr.ndim != 1 or arr.size == 0 or (n_embd is not None and arr.shape[0] != n_embd):
        want = f"({n_embd},)" if n_embd is not None else "(n_embd,)"
        raise ResultsError(f"{path} has shape {arr.shape}, not {want}; {rerun}")
    out = arr.astype(np.float32)  # (n_embd,)
    if not np.all(np.isfinite(out)) or not np.any(out):
        raise ResultsError(f"{path} holds NaN/inf or only zeros, not a direction; {rerun}")
    return out
