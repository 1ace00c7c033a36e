"""What the stages and the steering router use of a model runtime, as a structural type.

Stage functions (:mod:`pyrefusal.stages`), the selection rule's scoring (:mod:`pyrefusal.method.selection`), the
steering router (:func:`~pyrefusal.steering.router.arm`) take a model runtime. They are
typed with :class:`ModelRunner` instead of ``Any`` so that any object with these members works (tests pass fakes)
and a type checker sees what a stage needs. :class:`pyrefusal.runtime.Runtime` satisfies it (tests check).

The protocol lists only what code outside :mod:`pyrefusal.runtime` reads or calls; Runtime has more.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # only types: the values live in the runtime's modules (no import cycle at run time)
    from pyrefusal.families import ResidualNodes
    from pyrefusal.runtime.decode import Generation, Timings
    from pyrefusal.runtime.hook import PlanEntry
    from pyrefusal.runtime.runtime import ModelInfo
    from pyrefusal.settings import PromptFormat

__all__ = ["ModelRunner"]


@runtime_checkable
class ModelRunner(Protocol):
    """A loaded chat model that tokenises, decodes in batches and carries interventions.

    Attributes:
        path: the GGUF file.
        name: display name.
        arch: ``general.architecture`` of the GGUF.
        n_layer, n_embd, n_vocab: the model's block count, residual width and vocabulary size.
        n_ctx, n_seq_max, n_gpu_layers: the context's KV size, most sequences per decode, layers offloaded.
        nodes: the residual-stream node names of the architecture's graph.
        chat_template: the GGUF's chat template (None when it has none).
        timings: accumulated token counts and wall-clock seconds.
    """

    path: Path
    name: str
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx: int
    n_seq_max: int
    n_gpu_layers: int
    nodes: ResidualNodes
    chat_template: str | None
    timings: Timings

    @property
    def sha256(self) -> str:
        """SHA-256 of the model file (hex)."""
        ...

    @property
    def family(self) -> str | None:
        """The paper's model family (``"qwen2"``, ``"llama3"``, ``"gemma2"``) or None."""
        ...

    @property
    def prompt_format(self) -> PromptFormat:
        """``"template"`` or ``"paper"`` (how a prompt without a system message is rendered)."""
        ...

    @prompt_format.setter
    def prompt_format(self, value: PromptFormat) -> None: ...

    def info(self) -> ModelInfo:
        """What a run records about the model."""
        ...

    def close(self) -> None:
        """Free the model's native resources (idempotent)."""
        ...

    # tokens and chat
    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]: ...

    def detokenize(self, tokens: Iterable[int], *, special: bool = False) -> str: ...

    def format_messages(self, messages: list[dict[str, str]]) -> str: ...

    def chat_tokens(self, instruction: str, system: str | None = None) -> list[int]: ...

    def eoi_tokens(self, system: str | None = None) -> list[int]: ...

    # interventions
    def set_plan(
        self,
        plan: dict[str, PlanEntry],
        directions: np.ndarray | None = None,
        additions: Sequence[np.ndarray] = (),
    ) -> None: ...

    def set_control_vector(self, vectors: dict[int, np.ndarray] | None) -> None: ...

    def set_lora(self, adapters: Sequence[tuple[str | os.PathLike[str], float]] | None) -> None: ...

    def clear_plan(self) -> None: ...

    # decoding
    def last_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 ``(n_prompts, n_vocab)``."""
        ...

    def capture(
        self,
        prompts: Sequence[Sequence[int]],
        positions: Sequence[int],
        layers: Sequence[int] | None = None,
        *,
        ablation: np.ndarray | None = None,
        armed: tuple[dict[str, PlanEntry], np.ndarray | None, list[np.ndarray]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """acts float32 ``(n_prompts, n_positions, n_layers, n_embd)``, logits float32 ``(n_prompts, n_vocab)``."""
        ...

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        progress: Callable[[int], None] | None = None,
        stop_at_eog: bool = True,
        stop: Callable[[int, Sequence[int]], bool] | None = None,
    ) -> list[Generation]: ...

    def token_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One float64 ``(n_tokens - 1,)`` per prompt."""
        ...
