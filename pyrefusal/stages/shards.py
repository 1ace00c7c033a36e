"""Work units of the stages, and the executors that run them (one process, or a Ray cluster).

A stage that can be spread over several model replicas cuts its work into *units*: a module-level function of this
package called as ``fn(runtime, *args)`` with plain, picklable arguments, returning a plain value. A
:class:`Shards` executor runs units and yields ``(index, value)`` as they finish, in any order; the stage merges the
values in index order, so the result does not depend on which replica ran which unit, nor in which order they finished.
Units are cut along the batches a single process would decode (:func:`decode_groups`), so every replica sees the same
batch shapes as the single process and returns the same numbers.

The in-process executor is :class:`Serial` (the stages' behaviour without ``--ray``); the Ray executor is
:class:`pyrefusal.cluster.pool.RayShards`. A stage given ``shards=None`` keeps its single-process code path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from pyrefusal.runtime import ModelRunner, decode_groups

__all__ = ["Serial", "Shards", "Unit", "chunks", "decode_groups", "in_order"]

T = TypeVar("T")

Unit = tuple[Any, ...]
"""The arguments of one unit after the runtime: ``fn(runtime, *unit)``."""


@runtime_checkable
class Shards(Protocol):
    """Runs the units of a stage on one or more model replicas.

    Attributes:
        width: how many units run at the same time (replicas); the lazy selection evaluates this many candidates
            per round.
    """

    width: int

    def map(self, fn: Callable[..., T], units: Sequence[Unit], *, label: str = "") -> Iterator[tuple[int, T]]:
        """Run ``fn(runtime, *unit)`` for every unit; yield ``(index into units, value)`` as each finishes.

        Every unit is yielded exactly once, also when a replica died while running it (it is run again on another
        one). ``label`` names the stage in messages and progress.
        """
        ...


class Serial:
    """Units run one after the other on one runtime, in order (what a study does without ``--ray``)."""

    width = 1

    def __init__(self, runtime: ModelRunner) -> None:
        self.runtime = runtime

    def map(self, fn: Callable[..., T], units: Sequence[Unit], *, label: str = "") -> Iterator[tuple[int, T]]:
        for i, unit in enumerate(units):
            yield i, fn(self.runtime, *unit)


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


def chunks(items: Sequence[T], size: int) -> list[list[T]]:
    """``items`` cut into consecutive lists of at most ``size``."""
    return [list(items[i : i + size]) for i in range(0, len(items), max(1, size))]
