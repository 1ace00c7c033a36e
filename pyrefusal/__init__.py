"""pyrefusal: the refusal direction of chat LLMs across languages, on GGUF models run by llama.cpp.

The public API, importable from the package itself (loaded on first use, so ``import pyrefusal`` stays cheap and
does not load llama.cpp)::

    import pyrefusal as pr

    settings = pr.RunSettings.preset("paper", model="qwen2.5-coder-1.5b-instruct-q4_k_m", n_test=64)
    results = pr.run(settings, "runs/paper-1.5b")           # extract -> select -> generate -> measure

    with pr.Runtime.open("qwen2.5-coder-0.5b-instruct-q4_k_m") as rt:
        pr.arm(rt, pr.ablation(direction))                   # x - (x·r̂)r̂ at every layer and token

The layers behind these names, top to bottom (``docs/architecture.md``): ``studies`` (run, transfer,
quant-sweep) compose ``stages`` (sample, extract, select, generate, measure, judge), which use ``steering`` (the
router that applies an intervention by hook, LoRA or control vector; exports; ``SteeredModel``), the ``runtime``
(llama.cpp), ``data`` (PolyRefuse, the model registry) and ``method`` (directions, interventions, the selection
rule, refusal detection: NumPy only).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> "module:attribute"
_API: dict[str, str] = {
    # settings and results
    "Settings": "pyrefusal.settings:Settings",
    "RunSettings": "pyrefusal.settings:RunSettings",
    "TransferSettings": "pyrefusal.settings:TransferSettings",
    "QuantSweepSettings": "pyrefusal.settings:QuantSweepSettings",
    "OptimizeSettings": "pyrefusal.settings:OptimizeSettings",
    "RunResults": "pyrefusal.results:RunResults",
    # studies
    "run": "pyrefusal.studies.run:run_pipeline",
    "rerender": "pyrefusal.studies.run:rerender",
    "transfer": "pyrefusal.studies.transfer:run_transfer",
    "quant_sweep": "pyrefusal.studies.quantsweep:run_quant_sweep",
    "optimize": "pyrefusal.studies.optimize:run_optimize",
    # runtime
    "Runtime": "pyrefusal.runtime:Runtime",
    "ModelRunner": "pyrefusal.runtime:ModelRunner",
    "build_info": "pyrefusal.runtime:build_info",
    # method
    "Candidates": "pyrefusal.method.directions:Candidates",
    "mean_difference": "pyrefusal.method.directions:mean_difference",
    "Selection": "pyrefusal.method.selection:Selection",
    "SelectionRule": "pyrefusal.method.selection:SelectionRule",
    "Intervention": "pyrefusal.method.intervention:Intervention",
    "Addition": "pyrefusal.method.intervention:Addition",
    "baseline": "pyrefusal.method.intervention:baseline",
    "ablation": "pyrefusal.method.intervention:ablation",
    "actadd": "pyrefusal.method.intervention:actadd",
    "induce": "pyrefusal.method.intervention:induce",
    "harm_ablation": "pyrefusal.method.intervention:harm_ablation",
    "SubstringDetector": "pyrefusal.method.refusal:SubstringDetector",
    # steering
    "arm": "pyrefusal.steering.router:arm",
    "disarm": "pyrefusal.steering.router:disarm",
    "route": "pyrefusal.steering.router:route",
    "SteeredModel": "pyrefusal.steering.steered:SteeredModel",
    "export_ablation_lora": "pyrefusal.steering.export:export_ablation_lora",
    "export_control_vector": "pyrefusal.steering.export:export_control_vector",
    "export_merged": "pyrefusal.steering.merge:export_merged",
    # data
    "PolyRefuse": "pyrefusal.data.polyrefuse:PolyRefuse",
    "resolve_model": "pyrefusal.data.registry:resolve_model",
    # errors
    "PyrefusalError": "pyrefusal.errors:PyrefusalError",
    "DataError": "pyrefusal.errors:DataError",
    "ModelError": "pyrefusal.errors:ModelError",
    "HookError": "pyrefusal.errors:HookError",
}

__all__ = [
    "Addition",
    "Candidates",
    "DataError",
    "HookError",
    "Intervention",
    "ModelError",
    "ModelRunner",
    "OptimizeSettings",
    "PolyRefuse",
    "PyrefusalError",
    "QuantSweepSettings",
    "RunResults",
    "RunSettings",
    "Runtime",
    "Selection",
    "SelectionRule",
    "Settings",
    "SteeredModel",
    "SubstringDetector",
    "TransferSettings",
    "__version__",
    "ablation",
    "actadd",
    "arm",
    "baseline",
    "build_info",
    "disarm",
    "export_ablation_lora",
    "export_control_vector",
    "export_merged",
    "harm_ablation",
    "induce",
    "mean_difference",
    "optimize",
    "quant_sweep",
    "rerender",
    "resolve_model",
    "route",
    "run",
    "transfer",
]


def __getattr__(name: str) -> Any:
    """Load a public name on first use (PEP 562)."""
    target = _API.get(name)
    if target is None:
        raise AttributeError(f"module 'pyrefusal' has no attribute {name!r}")
    module, attr = target.split(":")
    if module.startswith(("pyrefusal.runtime", "pyrefusal.steering", "pyrefusal.studies")):
        importlib.import_module("llama_cpp")  # before numpy/gguf: required in CUDA processes
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # what static type checkers and IDEs see
    from pyrefusal.data.polyrefuse import PolyRefuse
    from pyrefusal.data.registry import resolve_model
    from pyrefusal.errors import DataError, HookError, ModelError, PyrefusalError
    from pyrefusal.method.directions import Candidates, mean_difference
    from pyrefusal.method.intervention import Addition, Intervention, ablation, actadd, baseline, harm_ablation, induce
    from pyrefusal.method.refusal import SubstringDetector
    from pyrefusal.method.selection import Selection, SelectionRule
    from pyrefusal.results import RunResults
    from pyrefusal.runtime import ModelRunner, Runtime, build_info
    from pyrefusal.settings import OptimizeSettings, QuantSweepSettings, RunSettings, Settings, TransferSettings
    from pyrefusal.steering.export import export_ablation_lora, export_control_vector
    from pyrefusal.steering.merge import export_merged
    from pyrefusal.steering.router import arm, disarm, route
    from pyrefusal.steering.steered import SteeredModel
    from pyrefusal.studies.optimize import run_optimize as optimize
    from pyrefusal.studies.quantsweep import run_quant_sweep as quant_sweep
    from pyrefusal.studies.run import rerender
    from pyrefusal.studies.run import run_pipeline as run
    from pyrefusal.studies.transfer import run_transfer as transfer
