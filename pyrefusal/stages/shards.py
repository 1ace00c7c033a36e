"""Work units of the stages, and the executors that run them (one process, or a Ray cluster).

A stage that can be spread over several model replicas cuts its work into *units*: a module-level function of this
package called as ``fn(runtime, *args)`` with plain, picklable arguments, returning a plain value. A
:class:`Shards` executor runs units and yields ``(index, value)`` as they finish, in any order; the stage merges the
values in index order, so the result does not depend on which replica ran which unit, nor in which order they finished.
Units are cut along the batches a single process would decode (:func:`decode_groups`), so every replica sees the same
batch shapes as the single process and returns the same numbers.

The in-process executor is :class:`Serial` (the stages' behaviour without ``--ray``); the Ray executor is
:class:`pyrefusal.cluster.pool.RayShards`. A stage given ``shards=None`` keeps its single-process code path.

A stage that needs another model than the study's (the guard judge, a back-translation model) describes it as a
:class:`ReplicaModel`: opened in this process without ``--ray``, or as replicas of its own (:data:`Replicas`, a
:class:`ModelShards`) with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from pyrefusal.common import in_order
from pyrefusal.runtime import ModelRunner, Runtime, decode_groups

__all__ = [
    "ModelShards",
    "ReplicaModel",
    "Replicas",
    "Serial",
    "Shards",
    "Unit",
    "chunks",
    "decode_groups",
    "in_order",
]

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


@runtime_checkable
class ModelShards(Shards, Protocol):
    """Replicas of one model that a stage opened for itself (:data:`Replicas`); it closes them when done.

    Attributes:
        name: the replicas' model name (:attr:`Runtime.name`), as a runtime of this process would report it.
        sha256: the replicas' model file hash (every replica's was checked against it).
    """

    name: str
    sha256: str | None

    def close(self) -> None:
        """Stop the replicas."""
        ...


@dataclass(frozen=True)
class ReplicaModel:
    """How to open a model a stage needs besides the study's own (a guard judge, a translator).

    Attributes:
        model: registry name, GGUF path or hub spec (resolved and sha256-checked where it is opened).
        n_ctx / n_seq_max / n_gpu_layers / n_threads: the runtime's settings (``n_threads`` None = all cores).
        own_name: name the runtime by the GGUF's ``general.name`` (guard verdicts record it), not the registry's.
    """

    model: str
    n_ctx: int
    n_seq_max: int
    n_gpu_layers: int
    n_threads: int | None
    own_name: bool = False

    def open(self) -> Runtime:
        """The model as a runtime of this process."""
        kwargs: dict[str, Any] = {"name": None} if self.own_name else {}
        return Runtime.open(
            self.model,
            n_ctx=self.n_ctx,
            n_seq_max=self.n_seq_max,
            n_gpu_layers=self.n_gpu_layers,
            n_threads=self.n_threads,
            **kwargs,
        )


Replicas = Callable[[ReplicaModel], ModelShards]
"""Opens replicas of a :class:`ReplicaModel` on the study's cluster (``--ray``; the study's own replicas make room
for them first)."""


class Serial:
    """Units run one after the other on one runtime, in order (what a study does without ``--ray``)."""

    width = 1

    def __init__(self, runtime: ModelRunner) -> None:
        self.runtime = runtime

    def map(self, fn: Callable[..., T], units: Sequence[Unit], *, label: str = "") -> Iterator[tuple[int, T]]:
        for i, unit in enumerate(units):
            yield i, fn(self.runtime, *unit)


def chunks(items: Sequence[T], size: int) -> list[list[T]]:
    """``items`` cut into consecutive lists of at most ``size``."""
    return [list(items[i : i + size]) for i in range(0, len(items), max(1, size))]
