"""Chat prompts of a model: its GGUF chat template, the paper's prompt format, post-instruction tokens.

:class:`ChatPrompts` renders conversations with the model's own template (llama-cpp-python's
``Jinja2ChatFormatter``, as its chat completion does) or, in the ``"paper"`` prompt format, as the paper's user
turn alone (:data:`pyrefusal.families.CHAT_FORMATS`, docs/method.md §2). :class:`pyrefusal.runtime.Runtime`
owns one and delegates its chat methods to it; it needs only the model's tokenizer, given as two functions.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

import jinja2

from pyrefusal.errors import ModelError
from pyrefusal.families import detect_chat_format
from pyrefusal.settings import PromptFormat

__all__ = ["ChatPrompts"]

RENDER_SECONDS = 10.0
"""A chat template that has not rendered one conversation after this long is treated as broken (a template with
nested loops over huge ranges would otherwise hang the process; Jinja's sandbox bounds each range, not their
product). Enforced in the main thread (the CLI, studies, SteeredModel called from it)."""


class RenderTimeout(Exception):
    """Raised by :func:`_render_deadline` when a template renders for too long."""

    def __str__(self) -> str:
        return f"rendering took longer than {RENDER_SECONDS:.0f} s (a loop that does not end?)"


@contextlib.contextmanager
def _render_deadline(seconds: float) -> Iterator[None]:
    """Interrupt the block with :class:`RenderTimeout` after ``seconds`` (SIGALRM; main thread only, elsewhere a
    no-op) and restore whatever timer and handler were there."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise RenderTimeout

    old_handler = signal.signal(signal.SIGALRM, expire)
    old_timer = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_timer[0] > 0:  # someone else's timer: give it back what was left
            signal.setitimer(signal.ITIMER_REAL, *old_timer)


# what a broken template raises while compiling or rendering (jinja2.TemplateError covers syntax errors,
# undefined variables and llama-cpp-python's raise_exception; the sandbox raises SecurityError / OverflowError)
_TEMPLATE_ERRORS = (jinja2.TemplateError, TypeError, ValueError, OverflowError, RecursionError, AttributeError)

_SENTINEL = "PYREFUSALINSTRUCTIONSENTINEL"
_SYSTEM_SENTINEL = "PYREFUSALSYSTEMSENTINEL"


class ChatPrompts:
    """Chat formatting for one model.

    Args:
        template: the GGUF chat template (None: the model has none; formatting then raises).
        file_name: the model file's name, for error messages.
        tokenize: ``text -> tokens`` with special tokens parsed and nothing added.
        special_text: ``token -> text`` of a special token (BOS/EOS as the template writes them).
        bos, eos: the vocabulary's BOS / EOS ids (negative when absent).
        add_bos: whether the tokenizer adds BOS (the paper's prompt then starts with it, once).
    """

    def __init__(
        self,
        template: str | None,
        *,
        file_name: str,
        tokenize: Callable[[str], list[int]],
        special_text: Callable[[int], str],
        bos: int,
        eos: int,
        add_bos: bool,
    ) -> None:
        self.template = template
        self._file_name = file_name
        self._tokenize = tokenize
        self._special_text = special_text
        self._bos, self._eos, self._add_bos = bos, eos, add_bos
        self._formatter: Jinja2ChatFormatter | None = None
        self._eoi: list[int] | None = None
        self._paper_turn: str | None = None
        self._prompt_format: PromptFormat = "template"

    def _chat_formatter(self) -> Jinja2ChatFormatter:
        if self._formatter is None:
            if not self.template:
                raise ModelError(
                    f"{self._file_name} has no chat template in its metadata (tokenizer.chat_template); "
                    "pyrefusal needs a chat model. Use an instruction-tuned GGUF."
                )
            try:
                self._formatter = Jinja2ChatFormatter(
                    template=self.template,
                    bos_token=self._special_text(self._bos) if self._bos >= 0 else "",
                    eos_token=self._special_text(self._eos) if self._eos >= 0 else "",
                    add_generation_prompt=True,
                )
            except _TEMPLATE_ERRORS as e:
                raise self._template_error(e) from None
        return self._formatter

    def _template_error(self, e: BaseException) -> ModelError:
        """A template that does not render: name the model, the Jinja error, and what to pass instead."""
        return ModelError(
            f"{self._file_name}'s chat template (tokenizer.chat_template) does not render: {type(e).__name__}: "
            f"{str(e)[:300]}. If it rejects the system turn, leave out --system-prompt (or give one if it needs "
            "one); for ChatML / Llama 3 / Gemma models try --prompt-format paper; otherwise override the template "
            "in the GGUF (gguf-py's gguf_new_metadata.py --chat-template-file) or use a GGUF whose template works"
        )

    def format_messages(self, messages: list[dict[str, str]]) -> str:
        """Render a conversation (``[{"role": ..., "content": ...}, ...]``) with the GGUF's own
        chat template, ending with the assistant's turn opened (``add_generation_prompt``).

        Raises:
            ModelError: the template does not render (syntax error, undefined variable, ``raise_exception``).
        """
        formatter = self._chat_formatter()
        try:
            with _render_deadline(RENDER_SECONDS):
                return formatter(messages=messages).prompt  # type: ignore[arg-type]
        except (*_TEMPLATE_ERRORS, RenderTimeout) as e:
            raise self._template_error(e) from None

    def format_chat(self, instruction: str, system: str | None = None) -> str:
        """Render one user turn, ready for the reply (see :meth:`pyrefusal.runtime.Runtime.format_chat`)."""
        if system is None and self.prompt_format == "paper":
            return self.paper_user_turn().replace("{x}", instruction)
        messages: list[dict[str, str]] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": instruction})
        return self.format_messages(messages)

    @property
    def prompt_format(self) -> PromptFormat:
        """``"template"`` or ``"paper"`` (see :attr:`pyrefusal.runtime.Runtime.prompt_format`)."""
        return self._prompt_format

    @prompt_format.setter
    def prompt_format(self, value: PromptFormat) -> None:
        if value not in ("template", "paper"):
            raise ValueError(f"prompt_format must be 'template' or 'paper', got {value!r}")
        if value != self._prompt_format:
            self._prompt_format = value
            self._eoi = None  # derived from the rendering

    def paper_user_turn(self) -> str:
        """The paper's prompt for this chat format, ``"{x}"`` standing for the instruction (see
        :meth:`pyrefusal.runtime.Runtime.paper_user_turn`).

        Raises:
            ModelError: the template is not ChatML (Qwen, Yi), Llama 3 or Gemma, or does not end as
                that format does.
        """
        if self._paper_turn is not None:
            return self._paper_turn
        fmt = detect_chat_format(self.template)
        if fmt is None:
            raise ModelError(
                f"the paper's prompt format (no system turn) is defined for ChatML (Qwen, Yi), Llama 3 and Gemma "
                f"chat templates, and {self._file_name}'s template is none of them; use --prompt-format template "
                "(the GGUF's own template) or give an explicit --system-prompt"
            )
        family, turn = fmt.name, fmt.paper_user_turn
        rendered = (
            self.format_messages(
                [{"role": "system", "content": _SYSTEM_SENTINEL}, {"role": "user", "content": _SENTINEL}]
            )
            if fmt.system_role  # Gemma templates reject a system role
            else self.format_messages([{"role": "user", "content": _SENTINEL}])
        )
        if not rendered.endswith(turn.replace("{x}", _SENTINEL)):
            raise ModelError(
                f"{self._file_name}'s chat template does not end its user turn as the paper's {family} format "
                f"({turn!r}); use --prompt-format template"
            )
        # BOS is added where the tokenizer adds it (as HF's tokenizer call)
        prefix = self._special_text(self._bos) if self._add_bos and self._bos >= 0 else ""
        self._paper_turn = prefix + turn
        return self._paper_turn

    def eoi_tokens(self, system: str | None = None) -> list[int]:
        """Post-instruction tokens (see :meth:`pyrefusal.runtime.Runtime.eoi_tokens`)."""
        if self._eoi is None:
            rendered = self.format_chat(_SENTINEL, system)
            if _SENTINEL not in rendered:
                raise ModelError("the chat template dropped the user's text; cannot derive post-instruction tokens")
            suffix = rendered.split(_SENTINEL)[-1]
            self._eoi = self._tokenize(suffix)
            if not self._eoi:
                raise ModelError("the chat template puts nothing after the user's text; no post-instruction tokens")
        return list(self._eoi)
