"""Number formatting shared by the Markdown reports (run, transfer, quantization sweep).

One definition of a percentage, a number and a square matrix table; each report keeps its exact output
through the arguments (e.g. whether NaN prints as ``-`` or as ``nan%``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["matrix_table", "num", "pct"]


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x: float | None, *, nan_as_dash: bool = True) -> str:
    """``x`` in [0, 1] as a whole percentage (``"42%"``); ``"-"`` for None, and for NaN unless
    ``nan_as_dash`` is False (then NaN prints as ``"nan%"``, as the run report always did)."""
    if x is None or (nan_as_dash and _missing(x)):
        return "-"
    return f"{100 * x:.0f}%"


def num(x: float | None, fmt: str) -> str:
    """``x`` formatted with ``fmt`` (e.g. ``".3f"``); ``"-"`` for None and NaN."""
    return "-" if _missing(x) else format(x, fmt)


def matrix_table(names: Sequence[str], m: Sequence[Sequence[float | None]], fmt: str = ".3f") -> list[str]:
    """Markdown lines of a square matrix ``m`` (``len(names)`` x ``len(names)``) with ``names`` on both axes."""
    out = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, a in enumerate(names):
        out.append(f"| {a} | " + " | ".join(num(m[i][j], fmt) for j in range(len(names))) + " |")
    return out
