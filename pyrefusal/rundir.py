"""Run directories: the saved configuration that makes a resumed run safe.

A stage that writes into an output directory saves its configuration there as ``config.json``. A
later call in the same directory resumes only if every setting outside ``resumable`` is unchanged;
otherwise it is refused rather than mixing results of two configurations. Imports nothing else from
the package but the errors.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from pyrefusal.errors import PyrefusalError


def check_config(
    out: Path, config: Mapping[str, Any], *, what: str, force: bool, resumable: Collection[str] = ()
) -> dict[str, Any]:
    """Refuse to resume ``out`` under different settings; return ``config`` as JSON values.

    Args:
        out: the output directory (its ``config.json`` is compared).
        config: the new configuration (JSON-able).
        what: name of the job for the message ("transfer run", "sweep").
        force: skip the comparison (the caller clears its outputs).
        resumable: keys that may change between calls (runtime settings, added targets).

    Raises:
        PyrefusalError: a setting outside ``resumable`` differs from the saved one.
    """
    new = json.loads(json.dumps(dict(config)))
    path = out / "config.json"
    if path.exists() and not force:
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in new.items() if k not in resumable and old.get(k) != v}
        if diff:
            raise PyrefusalError(
                f"{out} holds a {what} with other settings {diff} (old, new). Use another output directory, "
                "or force=True / --force to start over there."
            )
    return new


def write_config(out: Path, config: Mapping[str, Any]) -> None:
    """Save ``config`` as ``out/config.json`` (creating ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dict(config), indent=1))
