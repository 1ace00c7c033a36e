"""Every per-family fact pyrefusal knows, in one table (foundation layer: standard library only).

Three kinds of family facts, each keyed the way the code that needs it finds it:

* :data:`ARCHITECTURES`, by ``general.architecture`` of a GGUF: the names of the residual-stream nodes of
  llama.cpp's graph (:class:`ResidualNodes`, where the hook ablates, adds and captures) and whether the rank-k
  LoRA of :mod:`pyrefusal.steering.export` is an exact ablation for that graph.
* :data:`CHAT_FORMATS`, by a marker found in the GGUF chat template: the paper's prompt (one user turn and the
  opened assistant turn, no system turn; docs/method.md §2).
* :data:`FAMILIES`, the paper's three model families (Qwen2, Llama 3, Gemma 2): how a model is recognised
  (:func:`detect_family`: architecture, plus a template marker where the architecture is shared) and the paper's
  refusal openings per language (docs/method.md §4.1).

The older flat tables (:data:`KNOWN_ARCHITECTURES`, :data:`LORA_EXACT_ARCHITECTURES`, :data:`PAPER_USER_TURNS`,
:data:`PAPER_REFUSAL_OPENINGS`) are derived from these and kept for their importers. To support a new
architecture or family, add one entry here (and a test that its graph has the nodes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "ARCHITECTURES",
    "CHAT_FORMATS",
    "FAMILIES",
    "KNOWN_ARCHITECTURES",
    "LORA_EXACT_ARCHITECTURES",
    "PAPER_REFUSAL_OPENINGS",
    "PAPER_USER_TURNS",
    "Architecture",
    "ChatFormat",
    "Family",
    "ResidualNodes",
    "detect_chat_format",
    "detect_family",
    "residual_nodes",
]


# --- architectures ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ResidualNodes:
    """Names of the residual-stream nodes of an architecture's llama.cpp graph.

    Attributes:
        embd: the token-embedding node (input of block 0).
        attn_resid: the residual stream after the attention sub-block of layer ``{il}``.
        block_out: the residual stream after block ``{il}`` (where control vectors are added).
    """

    embd: str = "embd"
    attn_resid: str = "ffn_inp-{il}"
    block_out: str = "l_out-{il}"

    def block_input(self, layer: int) -> str:
        """Node holding the residual stream entering block ``layer`` (``n_layer`` = final)."""
        return self.embd if layer == 0 else self.block_out.format(il=layer - 1)

    def ablation_nodes(self, n_layer: int) -> list[str]:
        """Every write into the residual stream: embeddings, then per layer attention and block output."""
        names = [self.embd]
        for il in range(n_layer):
            names += [self.attn_resid.format(il=il), self.block_out.format(il=il)]
        return names


@dataclass(frozen=True)
class Architecture:
    """What pyrefusal knows of one ``general.architecture``.

    Attributes:
        name: ``general.architecture``.
        nodes: its residual-stream node names (checked against the graph; tests list them).
        lora_exact: its graph is pre-norm with every residual write through ``build_lora_mm`` (checked in
            llama.cpp's src/models/<arch>.cpp), so the rank-k LoRA edit of the writers equals the
            residual-stream ablation. Sandwich norms (Gemma 2/3) put the direction back after the edit.
    """

    name: str
    nodes: ResidualNodes
    lora_exact: bool


# Gemma's graphs (llama.cpp src/models/gemma*.cpp) scale the embeddings by sqrt(n_embd) in a node of
# their own and name the residual stream after attention "sa_out"; every write still goes through
# these two nodes and l_out.
_GEMMA_NODES = ResidualNodes(embd="inp_scaled", attn_resid="sa_out-{il}")

# For pre-norm blocks (llama, qwen, mistral) ablating the residual stream after each write equals the paper's
# hooks on block inputs + attention outputs + MLP outputs. For Gemma's sandwich norms the paper's hooks on the
# sub-block outputs are not an exact ablation (the post-norm puts the direction back, docs/method.md §5.1,
# §9.11); the residual-stream ablation here is, so on Gemma the two differ by design.
ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {
        a.name: a
        for a in (
            Architecture("llama", ResidualNodes(), lora_exact=True),
            Architecture("qwen2", ResidualNodes(), lora_exact=True),
            Architecture("qwen3", ResidualNodes(), lora_exact=True),
            Architecture("mistral3", ResidualNodes(), lora_exact=True),
            Architecture("gemma", _GEMMA_NODES, lora_exact=False),
            Architecture("gemma2", _GEMMA_NODES, lora_exact=False),
            Architecture("gemma3", _GEMMA_NODES, lora_exact=False),
        )
    }
)

#: Architecture -> residual node names, for every architecture whose nodes were checked against the graph.
KNOWN_ARCHITECTURES: dict[str, ResidualNodes] = {name: a.nodes for name, a in ARCHITECTURES.items()}
#: Architectures whose llama.cpp graph is pre-norm with every residual write through
#: ``build_lora_mm`` (checked in src/models/{llama,qwen2,qwen3,mistral3}.cpp of llama.cpp 0.3.36).
LORA_EXACT_ARCHITECTURES: frozenset[str] = frozenset(name for name, a in ARCHITECTURES.items() if a.lora_exact)


def residual_nodes(arch: str) -> ResidualNodes:
    """Residual node names of ``arch``; the default (llama-style) names for an architecture not in the table."""
    return KNOWN_ARCHITECTURES.get(arch, ResidualNodes())


# --- chat formats ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatFormat:
    """A chat format recognised in GGUF chat templates.

    Attributes:
        name: ``"chatml"``, ``"llama3"`` or ``"gemma"``.
        marker: a string only this format's templates contain.
        paper_user_turn: the paper's prompt in this format (docs/method.md §2): the user turn and the opened
            assistant turn, no system turn; ``"{x}"`` stands for the instruction. BOS is added where the
            model's tokenizer adds it (``tokenizer.ggml.add_bos_token``), once.
        system_role: the format's templates accept a system message (Gemma's reject one).
    """

    name: str
    marker: str
    paper_user_turn: str
    system_role: bool = True


# The paper's prompts (docs/method.md §2): no system turn at all (Qwen2.5's default "You are Qwen, created by
# Alibaba Cloud…" and Llama 3.1's date header are not used). Order matters: the first marker found wins.
CHAT_FORMATS: Mapping[str, ChatFormat] = MappingProxyType(
    {
        f.name: f
        for f in (
            ChatFormat("chatml", "<|im_start|>", "<|im_start|>user\n{x}<|im_end|>\n<|im_start|>assistant\n"),
            ChatFormat(
                "llama3",
                "<|start_header_id|>",
                "<|start_header_id|>user<|end_header_id|>\n\n{x}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n",
            ),
            ChatFormat(
                "gemma",
                "<start_of_turn>",
                "<start_of_turn>user\n{x}<end_of_turn>\n<start_of_turn>model\n",
                system_role=False,
            ),
        )
    }
)

#: Chat format -> (template marker, the paper's user turn with ``"{x}"`` for the instruction).
PAPER_USER_TURNS: dict[str, tuple[str, str]] = {name: (f.marker, f.paper_user_turn) for name, f in CHAT_FORMATS.items()}


def detect_chat_format(chat_template: str | None) -> ChatFormat | None:
    """The chat format whose marker the template contains (the first in :data:`CHAT_FORMATS`), or None."""
    template = chat_template or ""
    return next((f for f in CHAT_FORMATS.values() if f.marker in template), None)


# --- the paper's model families ---------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One of the paper's model families.

    Attributes:
        name: ``"qwen2"``, ``"llama3"`` or ``"gemma2"``.
        arch: the ``general.architecture`` of its GGUFs.
        template_marker: where ``arch`` is shared with other families (``llama``), a string the chat template
            must contain; None when the architecture alone decides.
        refusal_openings: language -> the paper's refusal tokens (its REFUSAL_TOKENS_LANG), written as openings
            whose first token is the paper's id (docs/method.md §4.1).
    """

    name: str
    arch: str
    template_marker: str | None
    refusal_openings: Mapping[str, tuple[str, ...]] = field(hash=False)

    def matches(self, arch: str, chat_template: str | None) -> bool:
        """Whether a model of ``arch`` with ``chat_template`` belongs to this family."""
        return arch == self.arch and (self.template_marker is None or self.template_marker in (chat_template or ""))


# For Qwen2 every id was checked on Qwen2.5's tokenizer (e.g. "申し訳" -> 127748 "申し", "죄송합니다" -> 132759,
# "И" -> 30174). The paper's Gemma ru ids are not decoded there, so Gemma has no ru entry (the generic
# openings of pyrefusal.method.selection.REFUSAL_OPENINGS apply).
FAMILIES: Mapping[str, Family] = MappingProxyType(
    {
        f.name: f
        for f in (
            Family(
                "qwen2",
                arch="qwen2",
                template_marker=None,
                refusal_openings=MappingProxyType(
                    {
                        "en": ("I", "As"),
                        "zh": ("我",),
                        "de": ("Es", "Ich"),
                        "ja": ("申し訳", "私は"),
                        "ko": ("죄송합니다",),
                        "ru": ("Я", "И"),
                        "th": ("ขอ", "ฉ"),
                        "yo": ("Mo",),
                    }
                ),
            ),
            Family(
                "llama3",
                arch="llama",
                template_marker=CHAT_FORMATS["llama3"].marker,
                refusal_openings=MappingProxyType(
                    {
                        "en": ("I",),
                        "zh": ("我",),
                        "de": ("Ich",),
                        "ja": ("私は",),
                        "ko": ("저는",),
                        "ru": ("Я",),
                        "th": ("ฉัน",),
                        "yo": ("I",),
                    }
                ),
            ),
            Family(
                "gemma2",
                arch="gemma2",
                template_marker=None,
                refusal_openings=MappingProxyType(
                    {
                        "en": ("I", "It"),
                        "zh": ("我", "很"),
                        "de": ("Ich",),
                        "ja": ("申し訳", "私は"),
                        "ko": ("죄송",),
                        "th": ("ฉ",),
                        "yo": ("Mi", "Emi"),
                    }
                ),
            ),
        )
    }
)

#: Family -> language -> the paper's refusal openings (docs/method.md §4.1).
PAPER_REFUSAL_OPENINGS: dict[str, dict[str, tuple[str, ...]]] = {
    name: dict(f.refusal_openings) for name, f in FAMILIES.items()
}


def detect_family(arch: str, chat_template: str | None) -> str | None:
    """The paper's family of a model (``"qwen2"``, ``"llama3"``, ``"gemma2"``) from its ``general.architecture``
    and chat template, or None when it is none of them."""
    return next((f.name for f in FAMILIES.values() if f.matches(arch, chat_template)), None)
