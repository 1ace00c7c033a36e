"""`pyrefusal optimize`: search partial-weight ablations of a finished run, multilingual, in llama.cpp's graph.

An Optuna study (TPE, seeded, multi-objective: pooled first-token refusal and pooled first-token KL) over the
:class:`~pyrefusal.stages.search.SearchSpace`; every trial is a rank-1 LoRA adapter per residual writer
(:mod:`pyrefusal.steering.weighted`), written, applied to the loaded model and freed, so the model is loaded once.
Everything lives in ``RUN_DIR/optimize/``:

* ``config.json`` (the study's settings), ``study.db`` (Optuna's RDB storage, SQLite: a killed search resumes, and
  ``--trials N`` on a finished one continues it), ``trials.jsonl`` (every trial: parameters, per-language
  objectives, weights, seconds; rewritten from ``study.db`` after each trial);
* ``directions/<lang>/`` for ``--direction-langs`` other than the run's source (extracted once);
* ``reference.json`` (baseline and the paper's pick on the same val prompts), ``completions.jsonl`` (confirmation
  and test generations, reused on resume);
* ``pareto.md``, ``pareto.png``, ``report.md``; with ``--pick N``: ``pick.json`` (read by ``pyrefusal export lora``)
  and ``pick_test.json`` (the pick, the paper's pick and the baseline on the test split the search never saw).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pyrefusal.common import Log, Progress
from pyrefusal.data.polyrefuse import PolyRefuse, Prompt, default_data_dir
from pyrefusal.data.registry import resolve_model
from pyrefusal.errors import DataError, PyrefusalError
from pyrefusal.method import intervention as iv
from pyrefusal.method.directions import Candidates
from pyrefusal.method.selection import Selection, SelectionError, SelectionRule, refusal_token_ids
from pyrefusal.reporting.optimize_report import write_optimize_report
from pyrefusal.results import RunResults
from pyrefusal.rundir import RunLock, write_atomic, write_config
from pyrefusal.runtime import Runtime
from pyrefusal.settings import OptimizeSettings, RunSettings
from pyrefusal.stages.direction import extract_direction
from pyrefusal.stages.generate import Completion, substring_detector, wilson_interval
from pyrefusal.stages.layout import DirectionFiles
from pyrefusal.stages.sample import sample_prompts, sample_train_val
from pyrefusal.stages.search import (
    MEAN,
    SPAN,
    ObjectiveSet,
    SearchSpace,
    TrialScores,
    generate_condition,
    prepare_objective,
    score_armed,
    score_trial,
)
from pyrefusal.stages.shards import Shards
from pyrefusal.stages.tokens import table_refusal_tokens
from pyrefusal.steering import router
from pyrefusal.steering.export import ablation_lora_support
from pyrefusal.steering.weighted import (
    WeightedAblation,
    WriterRows,
    apply_weighted,
    read_pick,
    release_weighted,
    write_weighted_lora,
)

if TYPE_CHECKING:  # the cluster layer (and Ray) load only with --ray
    from pyrefusal.cluster.pool import ClusterSpec

__all__ = ["DEFAULT_TRIALS", "STUDY_NAME", "OptimizePaths", "best_trial", "load_pick", "run_optimize"]

#: Optuna's name of the study in ``study.db``.
STUDY_NAME = "pyrefusal-optimize"
#: Trials of a new study when ``--trials`` is not given.
DEFAULT_TRIALS = 20


@dataclass(frozen=True)
class OptimizePaths:
    """Every file of ``RUN_DIR/optimize/`` (see the module docstring)."""

    root: Path
    config: Path = field(init=False)
    study_db: Path = field(init=False)
    trials: Path = field(init=False)
    reference: Path = field(init=False)
    completions: Path = field(init=False)
    directions: Path = field(init=False)
    adapters: Path = field(init=False)
    pareto_md: Path = field(init=False)
    pareto_png: Path = field(init=False)
    report: Path = field(init=False)
    pick: Path = field(init=False)
    pick_test: Path = field(init=False)

    def __post_init__(self) -> None:
        r = Path(self.root)
        for name, rel in {
            "root": "",
            "config": "config.json",
            "study_db": "study.db",
            "trials": "trials.jsonl",
            "reference": "reference.json",
            "completions": "completions.jsonl",
            "directions": "directions",
            "adapters": "adapters",
            "pareto_md": "pareto.md",
            "pareto_png": "pareto.png",
            "report": "report.md",
            "pick": "pick.json",
            "pick_test": "pick_test.json",
        }.items():
            object.__setattr__(self, name, r / rel if rel else r)


#: The pick of ``RUN_DIR`` (``optimize/pick.json``), or None: the reader lives in :mod:`pyrefusal.steering.weighted`
#: (:func:`~pyrefusal.steering.weighted.read_pick`) so that steering (``chat``, ``serve``, exports) can use it.
load_pick = read_pick


# --- setup: everything checked before any work -------------------------------------------------------


def _load_run(run_dir: Path) -> tuple[RunResults, RunSettings, Candidates, Selection]:
    need = ("results.json", "candidates.npz", "selection.json")
    missing = [n for n in need if not (run_dir / n).exists()]
    if missing:
        raise PyrefusalError(
            f"{run_dir} is not a finished `pyrefusal run` directory (missing {missing}); run "
            f"`pyrefusal run --out {run_dir}` first (an interrupted run resumes)"
        )
    results = RunResults.load(run_dir / "results.json")
    return (
        results,
        results.settings,
        Candidates.load(run_dir / "candidates.npz"),
        Selection.load(run_dir / "selection.json"),
    )


def _data_dir(configured: str | None, results: RunResults) -> Path:
    """The PolyRefuse copy the run read: its ``--data-dir``, else the one its results record, else the default."""
    if configured:
        return Path(configured)
    stored = results.data.get("data_source")
    if isinstance(stored, dict) and stored.get("path") and Path(stored["path"]).is_dir():
        return Path(stored["path"])
    return default_data_dir()


def _complete(config: OptimizeSettings, run: RunSettings, model_path: str) -> OptimizeSettings:
    """The study's settings with the run's model, data, train size and defaults filled in."""
    return config.replace(
        model=model_path,
        data_dir=run.data_dir,
        n_train=run.n_train,
        prune_fraction=run.prune_fraction,
        languages=config.languages or run.target_langs,
        direction_langs=config.direction_langs or (run.source_lang,),
        n_test=config.n_test or run.n_test,
    )


def _check_data(data: PolyRefuse, config: OptimizeSettings, source: str) -> None:
    available = data.languages()
    for lang in (*config.languages, *config.direction_langs):
        if lang not in available:
            raise DataError(f"language {lang!r} has no files in {data.root}; available: {available}")
    for lang in config.languages:
        for kind in ("harmful", "harmless"):
            if not data.has(lang, "val", kind):
                raise DataError(f"{lang}/{kind}_val is missing in {data.root}: the search scores on val prompts")
    for lang in config.direction_langs:
        if lang != source and not all(data.has(lang, s, k) for s in ("train", "val") for k in ("harmful", "harmless")):
            raise DataError(f"--direction-langs {lang}: its train/val files are missing in {data.root}")


def _open_study(paths: OptimizePaths, seed: int, n_startup: int) -> tuple[Any, Any]:
    """``(study, storage)`` of ``study.db``; trials left RUNNING by a killed process become FAIL and are queued
    again with their parameters (so none is lost, and none counts twice)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{paths.study_db}")
    try:
        n_before = len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials)
    except KeyError:
        n_before = 0
    # a fresh seed stream per session: a resumed study must not redraw the first session's startup points
    sampler = optuna.samplers.TPESampler(seed=seed + n_before, n_startup_trials=n_startup)
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY_NAME,
        directions=["minimize", "minimize"],
        sampler=sampler,
        load_if_exists=True,
    )
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tid = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_system_attr(tid, "pyrefusal.interrupted", True)
        storage.set_trial_state_values(tid, TrialState.FAIL)
        study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number}, skip_if_exists=False)
    return study, storage


def _complete_trials(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return list(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def run_optimize(
    config: OptimizeSettings,
    out: Path,
    *,
    run_dir: Path | None = None,
    pick: int | str | None = None,
    pick_max_kl: float | None = None,
    force: bool = False,
    log: Log = print,
    progress: Progress | None = None,
    cluster: ClusterSpec | None = None,
) -> dict[str, Any]:
    """Run or continue the search of ``run_dir`` (default: ``out``'s parent) in ``out`` (``RUN_DIR/optimize``).

    Args:
        config: what to search (the run's model and data are used).
        out: the study directory.
        run_dir: the finished run.
        pick: a complete trial number to choose: writes ``pick.json`` and evaluates it on the test split; or
            ``"best"``: the complete trial with the least pooled val refusal among those whose pooled val KL is at
            most ``pick_max_kl`` (:func:`best_trial`).
        pick_max_kl: the KL bound of ``pick="best"``; None: half the paper's pick's KL on the same val prompts
            (the bound of issue 13's goal: no more refusal than the paper's pick at half its KL).
        force: discard the study in ``out`` and start over.
        log / progress: messages and ``progress(stage, done, total)``.
        cluster: score trials on model replicas in a Ray cluster (``--ray``), as many at a time as replicas.

    Returns:
        A summary: trials, Pareto front, pick and its test results.

    Raises:
        PyrefusalError: bad settings, an unfinished run, a model a LoRA cannot ablate exactly, a pick that is no
            complete trial -- all before the model is loaded.
    """
    try:
        import optuna  # noqa: F401  (fail early if the optional dependency is missing)
    except ImportError:
        raise PyrefusalError(
            "`pyrefusal optimize` needs Optuna: pip install 'pyrefusal[optimize]' (optuna==4.9.0)"
        ) from None

    paths = OptimizePaths(Path(out))
    run_dir = Path(run_dir) if run_dir is not None else paths.root.parent
    config.validate()
    if (isinstance(pick, str) and pick != "best") or (isinstance(pick, int) and pick < 0):
        raise PyrefusalError(f"--pick takes a trial number (>= 0) or 'best', got {pick!r}")
    if pick_max_kl is not None and (pick != "best" or pick_max_kl <= 0):
        raise PyrefusalError("--pick-max-kl goes with --pick best and must be > 0")
    results, run, candidates, selection = _load_run(run_dir)
    resolved = resolve_model(results.model.path, progress=False)
    if results.model.sha256 and resolved.sha256 and resolved.sha256 != results.model.sha256:
        raise PyrefusalError(f"{resolved.path} is not the model of {run_dir} (sha256 differs); restore the run's model")
    config = _complete(config, run, str(resolved.path))
    support = ablation_lora_support(resolved.path)
    if not support.exact:
        raise PyrefusalError(
            f"`pyrefusal optimize` applies trials as LoRA adapters, which are not exact for {resolved.path.name}: "
            f"{support.reason}"
        )
    if config.embeddings == "on" and support.tied_embeddings:
        log("note: the LM head is tied to the embeddings, so the search ablates them with the hook (weight 1)")
    data = PolyRefuse(_data_dir(config.data_dir, results))
    _check_data(data, config, run.source_lang)

    paths.root.mkdir(parents=True, exist_ok=True)
    with RunLock(paths.root):
        config.check_directory(paths.root, what="optimize study", force=force)
        if force:
            for p in (paths.study_db, paths.trials, paths.completions, paths.pick, paths.pick_test, paths.reference):
                p.unlink(missing_ok=True)
        write_config(paths.root, config.to_dict())
        n_stored = 0
        if paths.study_db.exists():
            study, _ = _open_study(paths, config.seed, 10)
            n_stored = len(_complete_trials(study))
        target = config.trials if config.trials is not None else (n_stored or DEFAULT_TRIALS)
        if isinstance(pick, int) and pick >= max(target, n_stored) + 3 * target:
            raise PyrefusalError(f"--pick {pick}: the study will not have that trial (it targets {target} trials)")
        settings = run.replace(
            model=str(resolved.path), n_threads=config.n_threads, n_seq_max=config.n_seq_max, n_ctx=config.n_ctx
        )
        rt = Runtime.for_study(settings, log=log)
        shards = None
        try:
            if cluster is not None:
                from pyrefusal.cluster.pool import RayShards  # imports Ray: only with --ray

                shards = RayShards(settings, cluster, sha256=rt.sha256, log=log)
            return _optimize(
                rt,
                data,
                config,
                run,
                paths,
                run_dir,
                candidates,
                selection,
                target,
                pick,
                log,
                progress,
                shards,
                pick_max_kl=pick_max_kl,
            )
        finally:
            if shards is not None:
                shards.close()
            rt.close()


# --- the study ---------------------------------------------------------------------------------


def _directions(
    rt: Runtime,
    data: PolyRefuse,
    config: OptimizeSettings,
    run: RunSettings,
    paths: OptimizePaths,
    source: Candidates,
    log: Log,
) -> dict[str, np.ndarray]:
    """Candidates per direction language: the run's for its source, extracted once for the others."""
    out: dict[str, np.ndarray] = {}
    for lang in config.direction_langs:
        if lang == run.source_lang:
            out[lang] = source.vectors
            continue
        files = DirectionFiles.language(paths.directions / lang, activations=False, direction=False)
        files.root.mkdir(parents=True, exist_ok=True)
        tokens = table_refusal_tokens(rt.tokenize, lambda t: rt.detokenize(t), lang, family=rt.family)
        sampled = sample_train_val(data, lang, n_train=run.n_train, n_val=run.n_val, seed=run.seed)
        try:
            d = extract_direction(
                rt,
                lang,
                sampled,
                tokens,
                files,
                system=run.system_prompt,
                filter=run.filter_train,
                rule=SelectionRule(run.prune_fraction, run.kl_threshold, run.steering_filter),
                log=log,
            )
            out[lang] = d.candidates.vectors
        except SelectionError as e:  # the candidates are what the search needs; the selection is not
            log(f"{lang}: no candidate passed the paper's rule ({e}); its candidates are still searched")
            out[lang] = Candidates.load(files.candidates).vectors
    return out


def _space(
    config: OptimizeSettings, rt: Runtime, directions: dict[str, np.ndarray], positions: tuple[int, ...], sel: Selection
) -> SearchSpace:
    tied = ablation_lora_support(rt.path).tied_embeddings
    embeddings = {
        "auto": (False,) if tied else (True, False),
        "search": (True, False),
        "on": (True,),
        "off": (False,),
    }[config.embeddings]
    langs = tuple(directions)
    sources = langs + ((MEAN,) if config.direction_mix and len(langs) > 1 else ())
    sources += (SPAN,) if config.direction_span and len(langs) > 1 else ()
    hi = max(1.0, float(int(config.prune_fraction * rt.n_layer) - 1))
    return SearchSpace(
        n_layer=rt.n_layer,
        directions=directions,
        positions=positions,
        position_choices=positions if config.positions == "search" else (sel.position,),
        layer_index=config.layer_index,
        index_range=(min(1.0, hi), hi),
        selected=(sel.position, sel.layer),
        sources=sources,
        kernel=config.kernel,
        embeddings=embeddings,
        max_weight=(float(config.max_weight[0]), float(config.max_weight[1])),
    )


def _refusal_ids(rt: Runtime, lang: str, run: RunSettings) -> list[int]:
    openings = run.refusal_openings if lang == run.source_lang and run.refusal_openings else None
    return refusal_token_ids(lambda w: rt.tokenize(w), lang, openings, rt.family)


def _trial_rows(study: Any) -> list[dict[str, Any]]:
    """``trials.jsonl`` rows of every trial in the study, by number."""
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name, "params": dict(t.params)}
        row.update(t.user_attrs.get("scores", {}))
        if "ablation" in t.user_attrs:
            row["weights"] = t.user_attrs["ablation"]
        if "retry_of" in t.user_attrs:
            row["retry_of"] = t.user_attrs["retry_of"]
        if t.datetime_start and t.datetime_complete:
            row["wall_s"] = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append(row)
    return rows


def _write_trials(paths: OptimizePaths, study: Any) -> list[dict[str, Any]]:
    rows = _trial_rows(study)
    write_atomic(paths.trials, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def _rates(rows: list[Completion]) -> dict[str, dict[str, Any]]:
    """``{lang: {kind: {"k", "n", "rate", "ci", "tokens", "stopped"}}}`` of detector refusals (``tokens``:
    generated tokens, ``stopped``: sequences ended early once a refusal was read)."""
    out: dict[str, dict[str, Any]] = {}
    for c in rows:
        cell = out.setdefault(c.lang, {}).setdefault(c.kind, {"k": 0, "n": 0, "tokens": 0, "stopped": 0})
        cell["k"] += int(c.refused)
        cell["n"] += 1
        cell["tokens"] += c.n_tokens
        cell["stopped"] += int(c.finish_reason == "refusal_detected")
    pooled: dict[str, dict[str, int]] = {}
    for by_kind in out.values():
        for kind, cell in by_kind.items():
            p = pooled.setdefault(kind, {"k": 0, "n": 0, "tokens": 0, "stopped": 0})
            for key in p:
                p[key] += cell[key]
    out["pooled"] = {k: dict(v) for k, v in pooled.items()}
    for by_kind in out.values():
        for cell in by_kind.values():
            cell["rate"] = cell["k"] / cell["n"] if cell["n"] else math.nan
            cell["ci"] = list(wilson_interval(cell["k"], cell["n"])) if cell["n"] else [math.nan, math.nan]
    return out


def _optimize(
    rt: Runtime,
    data: PolyRefuse,
    config: OptimizeSettings,
    run: RunSettings,
    paths: OptimizePaths,
    run_dir: Path,
    candidates: Candidates,
    selection: Selection,
    target: int,
    pick: int | str | None,
    log: Log,
    progress: Progress | None,
    shards: Shards | None = None,
    *,
    pick_max_kl: float | None = None,
) -> dict[str, Any]:
    from optuna.trial import TrialState

    timings: dict[str, float] = {}
    system = run.system_prompt
    t = time.perf_counter()
    directions = _directions(rt, data, config, run, paths, candidates, log)
    timings["directions"] = time.perf_counter() - t
    space = _space(config, rt, directions, candidates.positions, selection)
    tied = ablation_lora_support(rt.path).tied_embeddings
    t = time.perf_counter()
    basis, with_embd = space.basis(), (True in space.embeddings) and not tied  # also what a --ray replica builds from
    rows = WriterRows(rt.path, basis, embeddings=with_embd)
    timings["precompute_rows"] = time.perf_counter() - t
    log(
        f"search space: positions {space.position_choices}, layer index {space.layer_index} in {space.index_range}, "
        f"sources {space.sources}, kernel {space.kernel}, embeddings {space.embeddings}; "
        f"writer rows for a {rows.basis.shape[0]}-dimensional basis in {timings['precompute_rows']:.1f}s"
    )

    # -- the study: how many trials are still to run ---------------------------------------------
    n_startup = max(3, min(10, target // 3))
    study, _ = _open_study(paths, config.seed, n_startup)
    done = len(_complete_trials(study))

    # -- objective prompts and their baseline; the paper's pick on the same prompts ------------------
    # (skipped when no trial is to run and nothing is to be confirmed: a --pick on a finished study reads the
    # reference it wrote before instead of scoring the val prompts again)
    t = time.perf_counter()
    ids = {lang: _refusal_ids(rt, lang, run) for lang in config.languages}
    paper_direction = candidates.get(selection.position, selection.layer)  # (n_embd,) float64
    cached = _stored_reference(paths, config)
    sets: list[ObjectiveSet] = []
    if done >= target and not config.n_confirm and cached is not None:
        log(f"no new trials and no confirmations: the val reference is read from {paths.reference.name}")
        reference = cached
    else:
        reference = _val_reference(rt, data, config, run, paths, selection, ids, paper_direction, sets)
        timings["baseline_and_paper"] = time.perf_counter() - t

    # -- the search ---------------------------------------------------------------------------------
    provenance = {"base_sha256": rt.sha256, "source": "pyrefusal optimize trial", "run_dir": str(run_dir)}
    paths.adapters.mkdir(exist_ok=True)
    hook_embd = tied and True in space.embeddings
    if done >= target:
        log(f"study holds {done} complete trials (target {target}); no new trials (--trials N continues it)")
    else:
        log(f"study holds {done} complete trials; running {target - done} more (target {target})")
    trial_seconds: list[float] = []

    def finish(trial: Any, ablation: WeightedAblation, scores: TrialScores, seconds: float) -> None:
        """Store a scored trial in the study, rewrite trials.jsonl, say where the search stands."""
        nonlocal done
        trial.set_user_attr("scores", scores.summary())
        trial.set_user_attr(
            "ablation",
            {"attn": ablation.attn.tolist(), "mlp": ablation.mlp.tolist(), "embeddings": ablation.embeddings},
        )
        study.tell(trial, [scores.refusal, scores.kl])
        done += 1
        trial_seconds.append(seconds)
        _write_trials(paths, study)
        ok = [x for x in _complete_trials(study) if x.values[1] <= config.kl_threshold]
        best = min(ok, key=lambda x: x.values[0]) if ok else None
        eta = np.mean(trial_seconds) * (target - done) / (shards.width if shards is not None else 1)
        lang, worst = scores.worst
        log(
            f"trial {trial.number} ({done}/{target}): refusal {scores.refusal:.4f} (worst {lang} {worst:.4f}), "
            f"KL {scores.kl:.4f}, {trial_seconds[-1]:.1f}s; best with KL <= {config.kl_threshold}: "
            + (f"#{best.number} refusal {best.values[0]:.4f} KL {best.values[1]:.4f}" if best else "none yet")
            + f"; ETA {eta:.0f}s"
        )
        if progress:
            progress("optimize trials", done, target)

    attempts = 0
    while shards is None and done < target and attempts < 3 * target:
        attempts += 1
        trial = study.ask()
        t0 = time.perf_counter()
        try:
            params = space.suggest(trial)
            ablation = space.ablation(params)
            scores = score_trial(
                rt,
                rows,
                ablation,
                sets,
                paths.adapters / f"trial-{trial.number}.gguf",
                provenance={**provenance, "trial": trial.number},
                hook_embeddings=hook_embd and ablation.embeddings > 0,
            )
        except PyrefusalError as e:
            log(f"trial {trial.number} failed: {e}")
            study.tell(trial, state=TrialState.FAIL)
            continue
        finish(trial, ablation, scores, time.perf_counter() - t0)
    # --ray: as many trials at a time as there are replicas (Optuna's ask-and-tell; TPE treats the asked, not yet
    # told trials as running), each scored by a replica as the same rank-1 adapters; the driver alone writes study.db
    while shards is not None and done < target and attempts < 3 * target:
        asked: list[tuple[Any, WeightedAblation]] = []
        for _ in range(min(shards.width, target - done)):
            attempts += 1
            trial = study.ask()
            try:
                asked.append((trial, space.ablation(space.suggest(trial))))
            except PyrefusalError as e:
                log(f"trial {trial.number} failed: {e}")
                study.tell(trial, state=TrialState.FAIL)
        units = [
            (basis, with_embd, ab, sets, {**provenance, "trial": tr.number}, hook_embd and ab.embeddings > 0)
            for tr, ab in asked
        ]
        t0 = time.perf_counter()
        for i, result in shards.map(trial_unit, units, label="optimize trials"):
            trial, ablation = asked[i]
            if isinstance(result, str):
                log(f"trial {trial.number} failed: {result}")
                study.tell(trial, state=TrialState.FAIL)
                continue
            finish(trial, ablation, result, time.perf_counter() - t0)
    trial_rows = _write_trials(paths, study)
    if trial_seconds:
        timings["trials"] = float(np.sum(trial_seconds))
        timings["seconds_per_trial"] = float(np.mean(trial_seconds))

    # -- confirm the Pareto trials by generation on the val prompts -------------------------------------
    t = time.perf_counter()
    detector = substring_detector(config.detector)
    val_prompts = [p for s in sets for p in (*s.harmful, *s.harmless)]
    pareto = sorted(study.best_trials, key=lambda x: x.values[0]) if _complete_trials(study) else []
    confirm_ids = [x.number for x in pareto if x.values[1] <= config.kl_threshold][: config.n_confirm]

    def generate(cond: str, prompts_: list[Prompt], arm: Any) -> list[Completion]:
        return generate_condition(
            rt,
            cond,
            prompts_,
            arm,
            detector,
            paths.completions,
            max_new_tokens=config.max_new_tokens,
            system=system,
            batch_size=config.n_seq_max,
        )

    def with_adapter(number: int, ablation: WeightedAblation, prompts_: list[Prompt], cond: str) -> list[Completion]:
        adapter: list[Path | None] = [None]

        def arm() -> None:
            if ablation.writer_weights():
                adapter[0] = write_weighted_lora(
                    rows,
                    ablation,
                    paths.adapters / f"confirm-{number}.gguf",
                    provenance={**provenance, "trial": number},
                )
            apply_weighted(rt, adapter[0], ablation, hook_embeddings=hook_embd and ablation.embeddings > 0)

        try:
            return generate(cond, prompts_, arm)
        finally:
            release_weighted(rt, adapter[0], delete=True)

    confirmed: dict[str, Any] = {}
    if config.n_confirm:
        confirmed["baseline"] = _rates(generate("baseline", val_prompts, rt.clear_plan))
        confirmed["paper"] = _rates(
            generate("paper", val_prompts, lambda: router.arm(rt, iv.ablation(paper_direction), path="hook"))
        )
        for number in confirm_ids:
            tr = study.trials[number]
            confirmed[f"trial-{number}"] = _rates(
                with_adapter(number, space.ablation(tr.params), val_prompts, f"trial-{number}")
            )
    timings["confirm"] = time.perf_counter() - t

    # -- the pick: pick.json and the test split -------------------------------------------------------
    pick_result: dict[str, Any] | None = None
    if pick is not None:
        complete = {x.number: x for x in _complete_trials(study)}
        rule: dict[str, Any] = {"rule": "number"}
        if pick == "best":
            bound = pick_max_kl if pick_max_kl is not None else reference["paper"]["kl"] / 2
            pick = best_trial({n: (x.values[0], x.values[1]) for n, x in complete.items()}, bound)
            rule = {"rule": "best", "max_kl": bound, "paper_kl": reference["paper"]["kl"]}
            why = "" if pick_max_kl is not None else " (half the paper's pick's)"
            log(
                f"--pick best: trial {pick}, the least pooled val refusal ({complete[pick].values[0]:.4f}) among "
                f"trials with val KL <= {bound:.4f}{why}"
            )
        assert isinstance(pick, int)
        if pick not in complete:
            raise PyrefusalError(
                f"--pick {pick} is no complete trial of this study (complete: {sorted(complete)[:20]}"
                f"{'...' if len(complete) > 20 else ''}); choose one from {paths.pareto_md}"
            )
        tr = complete[pick]
        ablation = space.ablation(tr.params)
        record = {
            "trial": pick,
            "chosen_by": rule,
            "params": dict(tr.params),
            "values": {"refusal": tr.values[0], "kl": tr.values[1]},
            "scores": tr.user_attrs.get("scores", {}),
            "ablation": ablation.to_dict(),
            "embeddings_by_hook": bool(hook_embd and ablation.embeddings > 0),
            "base_sha256": rt.sha256,
            "model": str(rt.path),
            "run_dir": str(run_dir),
        }
        write_atomic(paths.pick, json.dumps(record, indent=1))
        log(
            f"wrote {paths.pick}: `pyrefusal export lora|chat|serve {run_dir}` now use trial {pick} (--paper: "
            "the run's direction)"
        )
        t = time.perf_counter()
        pick_result = _test_split(
            rt, data, config, run, paths, ids, paper_direction, pick, ablation, generate, with_adapter
        )
        timings["test_split"] = time.perf_counter() - t
        write_atomic(paths.pick_test, json.dumps(pick_result, indent=1))
    elif paths.pick_test.exists():
        pick_result = json.loads(paths.pick_test.read_text())

    summary = {
        "run_dir": str(run_dir),
        "trials": trial_rows,
        "pareto": [x.number for x in pareto],
        "confirmed": confirmed,
        "reference": reference,
        "pick": pick_result,
        "timings": timings,
        "space": {
            "positions": list(space.position_choices),
            "layer_index": space.layer_index,
            "index_range": list(space.index_range),
            "sources": list(space.sources),
            "kernel": space.kernel,
            "embeddings": list(space.embeddings),
            "max_weight": list(space.max_weight),
            "basis_rank": int(rows.basis.shape[0]),
        },
        "settings": config.to_dict(),
    }
    write_optimize_report(paths.root, summary, kl_threshold=config.kl_threshold)
    return summary


def best_trial(values: dict[int, tuple[float, float]], max_kl: float) -> int:
    """``--pick best``: the trial with the least pooled val refusal among those with pooled val KL <= ``max_kl``
    (ties: the lower KL, then the lower number).

    Args:
        values: ``{trial number: (pooled refusal, pooled KL)}`` of the complete trials.
        max_kl: the KL bound.

    Raises:
        PyrefusalError: no complete trial, or none within the bound (the message names the closest one).
    """
    if not values:
        raise PyrefusalError("--pick best: the study has no complete trial yet; run some first (--trials N)")
    within = [(r, kl, n) for n, (r, kl) in values.items() if kl <= max_kl]
    if not within:
        n, (r, kl) = min(values.items(), key=lambda item: item[1][1])
        raise PyrefusalError(
            f"--pick best: no trial has val KL <= {max_kl:.4f} (the least is trial {n}'s, {kl:.4f}, refusal {r:.4f}); "
            "raise the bound (--pick-max-kl), run more trials (--trials N), or pick one by number"
        )
    return min(within)[2]


def _stored_reference(paths: OptimizePaths, config: OptimizeSettings) -> dict[str, Any] | None:
    """``reference.json`` when it was written for this study's languages, else None."""
    try:
        ref = json.loads(paths.reference.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ok = isinstance(ref, dict) and ref.get("languages") == list(config.languages) and "paper" in ref
    return ref if ok else None


def _val_reference(
    rt: Runtime,
    data: PolyRefuse,
    config: OptimizeSettings,
    run: RunSettings,
    paths: OptimizePaths,
    selection: Selection,
    ids: dict[str, list[int]],
    paper_direction: np.ndarray,
    sets: list[ObjectiveSet],
) -> dict[str, Any]:
    """Score the val prompts of every objective language (baseline, and the paper's pick by the hook), fill
    ``sets`` with them, and write ``reference.json``; returns its contents."""
    prompts: dict[str, tuple[list[Prompt], list[Prompt]]] = {}
    for lang in config.languages:
        s = sample_train_val(data, lang, n_train=run.n_train, n_val=config.n_val, seed=run.seed)
        prompts[lang] = (s["harmful_val"], s["harmless_val"])
    sets += prepare_objective(rt, prompts, ids, run.system_prompt)
    router.arm(rt, iv.ablation(paper_direction), path="hook")
    try:
        paper = score_armed(rt, sets)
    finally:
        rt.clear_plan()
    reference = {
        "baseline": {
            "refusal": float(np.mean([s.base_refusal for s in sets])),
            "kl": 0.0,
            "false_refusal": float(np.mean([s.base_false_refusal for s in sets])),
            "per_language": {
                s.lang: {"refusal": s.base_refusal, "kl": 0.0, "false_refusal": s.base_false_refusal} for s in sets
            },
        },
        "paper": {"position": selection.position, "layer": selection.layer, **paper.summary()},
        "languages": list(config.languages),
        "n_val": {s.lang: [len(s.harmful), len(s.harmless)] for s in sets},
        "refusal_tokens": {lang: [rt.detokenize([i]) for i in v] for lang, v in ids.items()},
    }
    write_atomic(paths.reference, json.dumps(reference, indent=1, ensure_ascii=False))
    return reference


def _test_split(
    rt: Runtime,
    data: PolyRefuse,
    config: OptimizeSettings,
    run: RunSettings,
    paths: OptimizePaths,
    ids: dict[str, list[int]],
    paper_direction: np.ndarray,
    pick: int,
    ablation: WeightedAblation,
    generate: Any,
    with_adapter: Any,
) -> dict[str, Any]:
    """The pick, the paper's pick and the baseline on the test split (first-token scores and generation)."""
    langs = list(dict.fromkeys((*config.languages, *run.target_langs)))  # English-only searches are tested on all
    sample = sample_prompts(
        data,
        run.source_lang,
        langs,
        n_train=run.n_train,
        n_val=run.n_val,
        n_test=config.n_test,
        seed=run.seed,
        log=lambda s: None,
    )
    test = {lang: (k.get("harmful", []), k.get("harmless", [])) for lang, k in sample.test.items()}
    test = {lang: v for lang, v in test.items() if v[0]}  # zh has no harmless test file: harmful only there
    if not test:
        raise DataError("no language has harmful test prompts; `pyrefusal data build` can make them")
    test_ids = {lang: ids[lang] if lang in ids else _refusal_ids(rt, lang, run) for lang in test}
    sets: list[ObjectiveSet] = prepare_objective(rt, test, test_ids, run.system_prompt, require_harmless=False)
    router.arm(rt, iv.ablation(paper_direction), path="hook")
    try:
        paper = score_armed(rt, sets)
    finally:
        rt.clear_plan()
    tied = ablation_lora_support(rt.path).tied_embeddings
    rows = WriterRows(rt.path, ablation.basis, embeddings=bool(ablation.embeddings) and not tied)
    adapter = None
    if ablation.writer_weights():
        adapter = write_weighted_lora(rows, ablation, paths.adapters / f"pick-{pick}.gguf", provenance={"trial": pick})
    try:
        apply_weighted(rt, adapter, ablation, hook_embeddings=tied and ablation.embeddings > 0)
        chosen: TrialScores = score_armed(rt, sets)
    finally:
        release_weighted(rt, adapter, delete=True)
    prompts = [p for h, n in test.values() for p in (*h, *(n if config.test_harmless else ()))]
    fr = [s.base_false_refusal for s in sets if not math.isnan(s.base_false_refusal)]
    base = {
        "refusal": float(np.mean([s.base_refusal for s in sets])),
        "kl": 0.0,
        "false_refusal": float(np.mean(fr)) if fr else math.nan,
        "per_language": {
            s.lang: {"refusal": s.base_refusal, "kl": 0.0, "false_refusal": s.base_false_refusal} for s in sets
        },
    }
    return {
        "trial": pick,
        "n_test": config.n_test,
        "languages": list(test),
        "first_token": {"baseline": base, "paper": paper.summary(), "pick": chosen.summary()},
        "generation": {
            "baseline": _rates(generate("baseline", prompts, rt.clear_plan)),
            "paper": _rates(
                generate("paper", prompts, lambda: router.arm(rt, iv.ablation(paper_direction), path="hook"))
            ),
            "pick": _rates(with_adapter(pick, ablation, prompts, f"pick-{pick}")),
        },
    }


_ROWS: dict[tuple[str, str, bool], WriterRows] = {}
"""The writer rows of a search basis, per replica process (built on a replica's first trial, then reused)."""


def trial_unit(
    runtime: Runtime,
    basis: np.ndarray,
    embeddings: bool,
    ablation: WeightedAblation,
    sets: list[ObjectiveSet],
    provenance: dict[str, Any],
    hook_embeddings: bool,
) -> TrialScores | str:
    """Ray unit (``optimize --ray``): score one trial on a replica (:func:`~pyrefusal.stages.search.score_trial`,
    its adapter written to a temporary file on the replica's node). ``basis``: the search space's
    ``(k, n_embd)`` basis, from which the replica builds its writer rows once. Returns the scores, or the message
    of a trial that cannot be scored (the driver marks it failed, as one process does)."""
    import hashlib
    import tempfile

    key = (str(runtime.path), hashlib.sha256(np.ascontiguousarray(basis).tobytes()).hexdigest(), embeddings)
    if key not in _ROWS:
        _ROWS[key] = WriterRows(runtime.path, basis, embeddings=embeddings)
    try:
        with tempfile.TemporaryDirectory(prefix="pyrefusal-trial-") as tmp:
            return score_trial(
                runtime,
                _ROWS[key],
                ablation,
                sets,
                Path(tmp) / "trial.gguf",
                provenance=provenance,
                hook_embeddings=hook_embeddings,
            )
    except PyrefusalError as e:
        return str(e)
