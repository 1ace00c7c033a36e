"""Type stubs for pyrefusal._core (csrc/bindings.cpp): the in-graph residual-stream hook."""

from typing import Any

import numpy as np
import numpy.typing as npt

class Hook:
    """Create a hook for a model of width n_embd."""

    def __init__(self, n_embd: int) -> None: ...
    @property
    def n_embd(self) -> int: ...
    @property
    def n_directions(self) -> int: ...
    @property
    def user_data(self) -> int:
        """Address to pass as llama_context_params.cb_eval_user_data."""
    def set_directions(self, directions: npt.NDArray[np.float32]) -> None:
        """Set orthonormal ablation directions, float32 (k, n_embd); k=0 clears."""
    def add_vector(self, vector: npt.NDArray[np.float32]) -> int:
        """Register an addition vector (n_embd,), already scaled; returns its index."""
    def set_plan(self, plan: dict[str, tuple[bool, int, int]]) -> None:
        """Replace the node plan: {node_name: (ablate, add_index, capture_layer)}."""
    def clear(self) -> None:
        """Drop plan, directions and addition vectors."""
    def set_capture_buffer(self, n_slots: int, n_layers: int) -> None:
        """Allocate a zeroed capture buffer of shape (n_slots, n_layers, n_embd)."""
    def set_capture_rows(self, full: list[int], out: list[int]) -> None:
        """Row->slot maps for the next decode: `full` for batch-sized tensors, `out` for output-pruned ones."""
    def captured(self) -> npt.NDArray[np.float32]:
        """Copy of the capture buffer, float32 (n_slots, n_layers, n_embd)."""
    def set_record_names(self, on: bool) -> None:
        """Record the name of every node the scheduler asks about."""
    def recorded_names(self) -> list[str]:
        """Names recorded since set_record_names(True)."""
    def take_error(self) -> str:
        """Return and clear the error recorded inside the callback ('' if none)."""
    def stats(self) -> dict[str, int]:
        """Counters since the last reset_stats(): asked, observed, rows_ablated, rows_added,
        rows_captured, device_nodes, cuda_kernel_nodes, data_ns (time in the data phase)."""
    def reset_stats(self) -> None: ...

def callback_address() -> int:
    """Address of the C eval callback, for llama_context_params.cb_eval."""

def cuda_compiled() -> bool:
    """Whether this build contains the CUDA in-place kernel."""

def build_info() -> dict[str, Any]:
    """Build facts: CUDA kernel compiled, ggml version/commit of the linked library."""
