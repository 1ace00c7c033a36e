"""Small types shared by every layer (foundation: imports nothing of pyrefusal)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

#: A progress-message sink: ``print``, ``click.echo`` or a list's ``append``.
Log = Callable[[str], None]

#: A progress callback ``(stage, done, total)``, e.g. one tqdm bar per stage.
Progress = Callable[[str, int, int], None]


def in_order(results: Iterable[tuple[int, T]], on_next: Callable[[int, T], None]) -> None:
    """Hand ``(index, value)`` pairs that arrive in any order to ``on_next`` in index order 0, 1, 2, ...

    A value is held back until every lower index has been handed on, so a driver that appends to a file in
    ``on_next`` writes the same file as a single process, and a driver killed meanwhile loses only units that
    are recomputed on resume.
    """
    held: dict[int, T] = {}
    nxt = 0
    for i, value in results:
        held[i] = value
        while nxt in held:
            on_next(nxt, held.pop(nxt))
            nxt += 1
