"""Steering: how a direction is applied (one router: hook, LoRA, control vector), exports, merge, SteeredModel.

* :mod:`pyrefusal.steering.router`: the one decider (:func:`decide`, :func:`route`) and :func:`arm` /
  :func:`disarm` for pyrefusal's Runtime; :class:`SteeredModel`, ``pyrefusal chat`` and ``pyrefusal serve``
  ask the same decider.
* :mod:`pyrefusal.steering.export`: control vectors (addition) and ablation LoRAs as llama.cpp files.
* :mod:`pyrefusal.steering.merge`: the ablation baked into a model's weights (``pyrefusal export merged``).
* :mod:`pyrefusal.steering.steered`: llama-cpp-python's ``Llama`` with the direction applied, chat and serve.
"""

from pyrefusal.steering.export import (  # first: imports llama_cpp before numpy (CUDA import order)
    ExportError,
    LoraSupport,
    ablation_lora_support,
    cached_ablation_lora,
    cvec_layer,
    export_ablation_lora,
    export_control_vector,
    load_control_vector,
)
from pyrefusal.steering.router import (
    HookPlan,
    PathChoice,
    Route,
    SteeringError,
    arm,
    decide,
    disarm,
    plan,
    route,
)
from pyrefusal.steering.steered import SteeredModel, Steering, plan_steering, steering_from_run

__all__ = [
    "ExportError",
    "HookPlan",
    "LoraSupport",
    "PathChoice",
    "Route",
    "SteeredModel",
    "Steering",
    "SteeringError",
    "ablation_lora_support",
    "arm",
    "cached_ablation_lora",
    "cvec_layer",
    "decide",
    "disarm",
    "export_ablation_lora",
    "export_control_vector",
    "load_control_vector",
    "plan",
    "plan_steering",
    "route",
    "steering_from_run",
]
