"""``results.json`` of a ``pyrefusal run`` as one typed value (foundation: imports nothing above rundir).

Written by :mod:`pyrefusal.studies.run`, read by the CLI, :mod:`pyrefusal.steering.steered` (``steering_from_run``),
:mod:`pyrefusal.reporting` and ``rerender``. It lives at the foundation so that every one of those layers may
import it (steering sits below stages, so the type cannot live in stages/ or reporting/).

:class:`RunResults` wraps the stored JSON object and keeps its key order, so a load/save round trip writes the
same bytes; its properties name the fields readers use, with an error that says how to fix an incomplete file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyrefusal.errors import PyrefusalError
from pyrefusal.rundir import write_atomic

__all__ = ["RESULTS_FILE", "RunResults"]

#: File name of a run's results in its directory.
RESULTS_FILE = "results.json"


@dataclass
class RunResults:
    """A run's ``results.json``.

    Attributes:
        data: the JSON object: ``model``, ``direction``, ``prompts``, ``evaluation``, ``steering``,
            ``missing_test_files``, ``short_test_files``, ``capability``, ``config``, ``versions``, ``timings``,
            ``timings_previous`` (and ``figure`` once plotted).
    """

    data: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> RunResults:
        """Read ``path`` (a ``results.json`` or the run directory holding one).

        Raises:
            PyrefusalError: the file is missing or not a run's results.
        """
        path = Path(path)
        if path.is_dir():
            path = path / RESULTS_FILE
        if not path.exists():
            raise PyrefusalError(f"{path} does not exist; run `pyrefusal run --out {path.parent}` first")
        try:
            data = json.loads(path.read_text())
            _ = data["model"]["path"], data["direction"]["layer"]
        except (ValueError, KeyError, TypeError) as e:
            raise PyrefusalError(
                f"{path} is not a finished run's results ({e!r}); re-run `pyrefusal run --out {path.parent}`"
            ) from e
        return cls(data)

    def save(self, path: Path) -> None:
        """Write ``path`` atomically (``indent=1``, UTF-8 kept as is)."""
        write_atomic(Path(path), json.dumps(self.data, indent=1, ensure_ascii=False))

    @property
    def model(self) -> dict[str, Any]:
        """The model's facts (``name``, ``path``, ``sha256``, ``n_layer``, ...)."""
        return self.data["model"]

    @property
    def direction(self) -> dict[str, Any]:
        """The selected direction's facts (``layer``, ``position``, ``source_lang``, ``file``, ...)."""
        return self.data["direction"]

    @property
    def config(self) -> dict[str, Any]:
        """The run's settings as saved in ``config.json``."""
        return self.data["config"]

    @property
    def conditions(self) -> list[str]:
        """The configured conditions, in order."""
        return list(self.config["conditions"])

    @property
    def evaluation(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{lang: {condition: rates}}`` in the configured language order (empty before generation)."""
        return self.data.get("evaluation") or {}

    @evaluation.setter
    def evaluation(self, value: Mapping[str, Any]) -> None:
        self.data["evaluation"] = dict(value)

    @property
    def test_ids(self) -> dict[str, dict[str, list[str]]]:
        """The test prompt ids ``{lang: {kind: [id, ...]}}`` (``prompts.test``)."""
        return (self.data.get("prompts") or {}).get("test") or {}

    def refusal_rates(self) -> dict[str, dict[str, float | None]]:
        """``{lang: {condition: refusal rate}}`` of the substring detector."""
        return {lang: {c: v["refusal_rate"] for c, v in conds.items()} for lang, conds in self.evaluation.items()}
