"""Model replicas as Ray actors, and the :class:`~pyrefusal.stages.shards.Shards` executor that runs units on them.

:class:`RayShards` starts (or joins) a Ray cluster, places one :class:`ModelWorker` actor per GPU (``num_gpus=1``)
or per group of CPU cores, each loading the study's model once: the worker resolves the model on its own node
(registry, cache, download) and verifies its sha256, so weights never travel through Ray's object store. Units are
handed to idle workers one at a time; a worker that dies while running one (actor death, node loss, a process that
exits) is replaced and its unit runs again on a live worker, so every unit is counted exactly once. A unit that
fails with an error (a bad prompt, an impossible setting) stops the study with that error, as in one process.

The driver remains the only writer of the run directory: units return values, the stages merge them and write.
Ray is imported only here and only when ``--ray`` is given (:func:`require_ray`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from pyrefusal.common import Log
from pyrefusal.errors import PyrefusalError
from pyrefusal.runtime import Runtime
from pyrefusal.settings import ChatSettings
from pyrefusal.stages.shards import ReplicaModel, Unit

T = TypeVar("T")

RAY_PIN = "ray==2.60.0"
"""The Ray release pyrefusal is tested with (the ``ray`` extra)."""

FAULT_ENV = "PYREFUSAL_RAY_FAULT"
"""Fault injection for tests and drills: ``LABEL:INDEX:MARKER`` makes the worker that gets unit ``INDEX`` of the
stage ``LABEL`` exit its process (as a killed node would) once: when the file ``MARKER`` does not exist yet; it
creates it first, so the rerun of that unit succeeds."""

SHARE_BYTES = 1 << 20
"""NumPy arguments of at least this size go to Ray's object store once per stage instead of once per unit."""

STATUS_SECONDS = 10.0
"""How often a long stage prints its cluster-wide status (units done / total, tokens/s, ETA)."""

MAX_ATTEMPTS = 3
"""A unit whose worker died this many times stops the study (the cluster, not the unit, is probably broken)."""


class ClusterError(PyrefusalError):
    """The Ray cluster cannot run the study (Ray missing, no GPU, disagreeing model files, dead workers)."""


def require_ray() -> Any:
    """Import Ray or say how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(
            "--ray needs Ray, which is not installed: pip install 'pyrefusal[ray]' (or pip install "
            f"'{RAY_PIN}'), on the driver and on every node of the cluster"
        ) from None
    return ray


def connect(spec: ClusterSpec) -> Any:
    """Start a local Ray instance or join ``spec.address`` (once per process); returns the ``ray`` module."""
    ray = require_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if spec.address:
            kwargs["address"] = spec.address
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:  # Ray's own words are useful
            raise ClusterError(
                f"cannot start or join the Ray cluster at {spec.address or 'a local instance'}: {exc}. Start one "
                "with `ray start --head` and pass its address (--ray ADDRESS), or omit the address for a local one"
            ) from None
    return ray


@dataclass(frozen=True)
class ClusterSpec:
    """Where and how wide to run a study's units.

    Attributes:
        address: a running cluster (``ray start --head`` prints it, e.g. ``10.0.0.5:6379``, or ``auto``); None: a
            local Ray instance on this machine (or ``$RAY_ADDRESS`` when set).
        workers: model replicas; None: one per GPU, or one per ``threads`` CPU cores.
        threads: CPU threads per replica; None: the study's ``--threads`` when given, else the cores divided by the
            replicas (CPU) or 1 (GPU).
        env: environment variables set in every replica's process (Ray ``runtime_env``), e.g. ``PYREFUSAL_*``
            settings or :data:`FAULT_ENV` for a fault drill.
        ready_timeout: seconds to wait for a replica to load its model (a cluster without free resources would
            otherwise wait for ever).
    """

    address: str | None = None
    workers: int | None = None
    threads: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    ready_timeout: float = 900.0

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ClusterError(f"--ray-workers must be >= 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ClusterError(f"threads per Ray worker must be >= 1, got {self.threads}")


class ModelWorker:
    """One model replica (a Ray actor): loads the study's model once and runs units on it.

    Args:
        config: the study's settings (model, context sizes, GPU layers, prompt format), or another model a stage
            needs (a guard judge, a translator); ``n_threads`` is the replica's.
    """

    def __init__(self, config: ChatSettings | ReplicaModel) -> None:
        self.error: PyrefusalError | None = None
        try:
            self.runtime = config.open() if isinstance(config, ReplicaModel) else Runtime.for_study(config)
        except PyrefusalError as e:  # kept for info(), so the driver gets pyrefusal's message, not Ray's traceback
            self.error = e

    def info(self) -> dict[str, Any]:
        """The replica's model hash, node and offload, checked by the driver before any unit runs."""
        if self.error is not None:
            raise self.error
        rt = self.runtime
        return {
            "sha256": rt.sha256,
            "name": rt.name,
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "n_gpu_layers": rt.n_gpu_layers,
        }

    def call(self, fn: Callable[..., Any], label: str, index: int, *unit: Any) -> tuple[Any, int]:
        """``fn(runtime, *unit)``; returns its value and the tokens the replica decoded for it. (The unit's
        arguments come one by one so that Ray resolves those the driver put in the object store.)"""
        _maybe_fail(label, index)
        t = self.runtime.timings
        before = t.prompt_tokens + t.generated_tokens
        value = fn(self.runtime, *unit)
        t = self.runtime.timings
        return value, t.prompt_tokens + t.generated_tokens - before


def _maybe_fail(label: str, index: int) -> None:
    """Exit the process once for the unit :data:`FAULT_ENV` names (fault drills and tests)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    want_label, want_index, marker = spec.split(":", 2)
    if want_label == label and int(want_index) == index and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(f"{os.getpid()}\n")
        os._exit(1)


class RayShards:
    """Runs stage units on model replicas in a Ray cluster (:class:`~pyrefusal.stages.shards.Shards`).

    Args:
        config: the study's settings, or another model a stage needs (:class:`~pyrefusal.stages.shards.ReplicaModel`:
            the guard judge, a back-translation model); every replica loads ``config.model``.
        spec: the cluster and its width.
        sha256: the model hash the driver expects (its own copy's); a replica whose file differs is an error. None:
            the first replica's, which every other replica must match.
        log: messages (workers started, units rerun, per-stage throughput).

    Attributes:
        name / sha256: the replicas' model name and file hash (:class:`~pyrefusal.stages.shards.ModelShards`).
    """

    def __init__(
        self, config: ChatSettings | ReplicaModel, spec: ClusterSpec, *, sha256: str | None = None, log: Log = print
    ) -> None:
        self.ray = require_ray()
        self.log = log
        self.spec = spec
        self.sha256 = sha256
        self.name = ""
        self.reruns = 0
        ray = connect(spec)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)))
        if config.n_gpu_layers > 0 and gpus == 0:
            raise ClusterError(
                f"--n-gpu-layers {config.n_gpu_layers} asks for a GPU, but the Ray cluster has none ({cpus} CPUs). "
                "Add GPU nodes (ray start --num-gpus N), or run on CPU with --n-gpu-layers 0"
            )
        self.use_gpu = gpus > 0 and config.n_gpu_layers != 0
        if self.use_gpu:
            workers = spec.workers or gpus
            threads = spec.threads or config.n_threads or 1
        else:
            threads = spec.threads or config.n_threads or max(1, cpus // (spec.workers or cpus))
            workers = spec.workers or max(1, cpus // threads)
        self.threads = threads
        gpu_layers = config.n_gpu_layers if self.use_gpu else 0
        self.config = dataclasses.replace(config, n_threads=threads, n_gpu_layers=gpu_layers)
        self._actor = ray.remote(ModelWorker).options(**_placement(spec, threads, self.use_gpu), max_restarts=0)
        t = time.perf_counter()
        self.workers = [self._start() for _ in range(workers)]
        try:
            infos = [self._ready(w) for w in self.workers]
        except BaseException:
            self.close()  # free what was placed: a failed start leaves no replica holding the cluster's CPUs/GPUs
            raise
        self.width = len(self.workers)
        self.name = infos[0]["name"]
        nodes = sorted({i["node"] for i in infos})
        what = "" if isinstance(config, ChatSettings) else f" of {self.name}"
        log(
            f"ray: {self.width} model replica(s){what} on {len(nodes)} node(s) ({', '.join(nodes)}), "
            f"{'1 GPU' if self.use_gpu else f'{threads} CPU thread(s)'} each, loaded in {time.perf_counter() - t:.1f}s"
        )

    # -- workers ------------------------------------------------------------------------------

    def _start(self) -> Any:
        return self._actor.remote(self.config)

    def _ready(self, worker: Any) -> dict[str, Any]:
        """Wait for a replica to load its model (at most ``spec.ready_timeout`` seconds); check the file's sha256
        against the driver's."""
        ray = self.ray
        try:
            info = ray.get(worker.info.remote(), timeout=self.spec.ready_timeout)
        except ray.exceptions.RayTaskError as exc:  # the model could not be loaded there (pyrefusal's error)
            raise _cause(exc) from None
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(
                f"a model replica was not ready after {self.spec.ready_timeout:.0f}s: the cluster has no free "
                f"{'GPU' if self.use_gpu else f'{self.threads} CPUs'} for it (other jobs, a lost node) or loading is "
                "slow. Ask for fewer replicas (--ray-workers N), free resources, or raise the timeout "
                "(ClusterSpec.ready_timeout)"
            ) from None
        except ray.exceptions.RayActorError as exc:  # the replica's process died while starting (memory, a crash)
            raise ClusterError(f"a model replica died while loading the model: {_last_line(exc)}") from None
        if self.sha256 is None:
            self.sha256 = info["sha256"]
        elif info["sha256"] != self.sha256:
            raise ClusterError(
                f"the model file on node {info['node']} has sha256 {info['sha256'][:12]}…, the driver's "
                f"{self.sha256[:12]}…: the nodes hold different files under the same name. Remove the stale copy "
                "there (pyrefusal models fetch verifies downloads) or pass the same --model file everywhere"
            )
        return info

    def _replace(self, k: int) -> None:
        """Swap worker ``k`` (dead) for a fresh replica."""
        self._kill(self.workers[k])
        self.workers[k] = self._start()
        self._ready(self.workers[k])

    def _shared(self, arg: Any, refs: dict[int, Any], repeated: set[int]) -> Any:
        """``arg``, or an object-store reference to it when it is a large NumPy array (e.g. the baseline logits
        ``(n_val, n_vocab)`` that every KL unit reads) or a container several units share (``repeated``: e.g. the
        prompt sets every optimize trial scores): put once, read by every unit from the store."""
        big = isinstance(arg, np.ndarray) and arg.nbytes >= SHARE_BYTES
        if big or (id(arg) in repeated and isinstance(arg, list | tuple | dict)):
            if id(arg) not in refs:
                refs[id(arg)] = self.ray.put(arg)
            return refs[id(arg)]
        return arg

    def close(self) -> None:
        """Stop the replicas (the Ray instance stays up for the next study of this process)."""
        for w in self.workers:
            self._kill(w)
        self.workers = []

    def _kill(self, worker: Any) -> None:
        """Stop a replica; one that is already gone is fine."""
        with contextlib.suppress(ValueError, self.ray.exceptions.RayError):
            self.ray.kill(worker)

    def __enter__(self) -> RayShards:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- Shards -------------------------------------------------------------------------------

    def map(self, fn: Callable[..., T], units: Sequence[Unit], *, label: str = "") -> Iterator[tuple[int, T]]:
        """Run the units on the replicas, one unit per idle replica; yield ``(index, value)`` as they finish.

        A replica that dies mid-unit is replaced and the unit runs again (at most :data:`MAX_ATTEMPTS` times).
        """
        ray = self.ray
        if not units:
            return
        if not self.workers:
            raise ClusterError(
                f"the {label or 'stage'} units have no replicas: this RayShards was closed (a stage opened another "
                "model's replicas in its place). Open a new RayShards for them"
            )
        pending: deque[int] = deque(range(len(units)))
        attempts = [0] * len(units)
        idle = list(range(len(self.workers)))
        inflight: dict[Any, tuple[int, int]] = {}
        shared: dict[int, Any] = {}  # id(array) -> object ref: a large array shared by many units is sent once
        seen = Counter(id(a) for unit in units for a in unit)
        repeated = {k for k, n in seen.items() if n > 1}
        t, tokens, done = time.perf_counter(), 0, 0
        last = t
        while pending or inflight:
            while pending and idle:
                i, k = pending.popleft(), idle.pop(0)
                args = [self._shared(a, shared, repeated) for a in units[i]]
                inflight[self.workers[k].call.remote(fn, label, i, *args)] = (k, i)
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            k, i = inflight.pop(ref)
            try:
                value, n = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the unit itself failed: the study's error
                for other in inflight:
                    ray.cancel(other, force=False)
                raise _cause(exc) from None
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                attempts[i] += 1
                self.reruns += 1
                if attempts[i] >= MAX_ATTEMPTS:
                    raise ClusterError(
                        f"{label or 'a'} unit {i} lost its worker {attempts[i]} times (last: {type(exc).__name__}); "
                        "the cluster is unstable. Fix the nodes and re-run the same command: finished work is kept"
                    ) from None
                self.log(f"ray: a worker died during {label or 'a'} unit {i}; it runs again on a fresh replica")
                self._replace(k)
                pending.appendleft(i)
                idle.append(k)
                continue
            idle.append(k)
            tokens += n
            done += 1
            now = time.perf_counter()
            if now - last >= STATUS_SECONDS and done < len(units):
                last = now
                rate = done / (now - t)
                self.log(
                    f"ray: {label or 'units'}: {done}/{len(units)} units, {tokens / (now - t):.0f} tokens/s, "
                    f"ETA {(len(units) - done) / rate:.0f}s ({self.width} replicas)"
                )
            yield i, value
        secs = time.perf_counter() - t
        self.log(
            f"ray: {label or 'units'}: {done} units on {self.width} replica(s) in {secs:.1f}s, "
            f"{tokens / max(secs, 1e-9):.0f} tokens/s"
        )


def _last_line(exc: BaseException) -> str:
    """The last line of Ray's message for ``exc`` (the exception that ended the process), without the traceback."""
    text = str(getattr(exc, "error_msg", None) or exc)
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else type(exc).__name__


def _cause(exc: Any) -> BaseException:
    """The exception a unit raised on its worker (a PyrefusalError keeps its message), else Ray's."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return ClusterError(f"a unit failed on a Ray worker: {exc}")


def _placement(spec: ClusterSpec, cpus: int, gpu: bool) -> dict[str, Any]:
    """Ray options of a replica or a job: its CPUs, one GPU or none, and ``spec.env`` in its process."""
    options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": 1 if gpu else 0}
    if spec.env:
        options["runtime_env"] = {"env_vars": dict(spec.env)}
    return options


def _job(fn: Callable[..., T], label: str, index: int, args: Unit) -> T:
    """A whole-study job on a Ray worker: ``fn(*args)`` (with the :data:`FAULT_ENV` drill)."""
    _maybe_fail(label, index)
    return fn(*args)


def run_jobs(
    fn: Callable[..., T],
    jobs: Sequence[Unit],
    spec: ClusterSpec,
    *,
    threads: int | None,
    log: Log = print,
    label: str = "job",
) -> Iterator[tuple[int, T]]:
    """Whole-study jobs (e.g. one quantization variant each) as parallel Ray tasks; yield ``(index, value)`` as
    each finishes.

    Each job loads its own model on its node (``fn`` resolves it there) and returns values; the driver writes.
    A job whose worker dies is retried by Ray (up to :data:`MAX_ATTEMPTS` times); one that raises stops the study
    with its error.
    """
    ray = connect(spec)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    placement = _placement(spec, spec.threads or threads or 1, gpus > 0)
    task = ray.remote(_job).options(**placement, max_retries=MAX_ATTEMPTS, retry_exceptions=False)
    pending = deque(range(len(jobs)))
    limit = spec.workers or len(jobs)  # --ray-workers: at most this many jobs at a time
    refs: dict[Any, int] = {}
    t = time.perf_counter()
    log(f"ray: {len(jobs)} {label} job(s), {min(limit, len(jobs))} at a time")
    while refs or pending:
        while pending and len(refs) < limit:
            i = pending.popleft()
            refs[task.remote(fn, label, i, jobs[i])] = i
        (ref,), _ = ray.wait(list(refs), num_returns=1)
        i = refs.pop(ref)
        try:
            value = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            for other in refs:
                ray.cancel(other)
            raise _cause(exc) from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as exc:
            raise ClusterError(
                f"{label} job {i} lost its worker {MAX_ATTEMPTS} times ({type(exc).__name__}); the cluster is "
                "unstable. Fix the nodes and re-run the same command: finished work is kept"
            ) from None
        log(f"ray: {label} job {i + 1}/{len(jobs)} done ({time.perf_counter() - t:.1f}s)")
        yield i, value
