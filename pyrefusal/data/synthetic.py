"""GGUF metadata for synthetic (random-weight) chat models: the tests' tiny model and the benchmarks'
7B/8B-shaped ones.

Both write a decoder-only model with a SentencePiece-style tokenizer (``tokenizer.ggml.model =
llama``: no merge list, byte fallback so any text encodes), no space prefix (so text after a special
token gets no dummy ``▁``), BOS added, and a chat template. :func:`add_model_metadata` writes those
keys once for both; the callers choose sizes, vocabulary and tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gguf


@dataclass(frozen=True)
class SpmVocab:
    """A SentencePiece-style vocabulary and its special token ids.

    Attributes:
        tokens: token texts, ``(n_vocab,)``.
        scores: SentencePiece scores, one per token.
        types: ``gguf.TokenType`` values, one per token.
        unk, bos, eos: ids of ``<unk>``, ``<s>`` and ``</s>``.
        eot: end-of-turn id (``<|im_end|>`` in ChatML); llama.cpp ends generation on it.
    """

    tokens: Sequence[str]
    scores: Sequence[float]
    types: Sequence[int]
    unk: int
    bos: int
    eos: int
    eot: int


@dataclass(frozen=True)
class ModelSizes:
    """Hyper-parameters llama.cpp reads for a llama-style decoder (``<arch>.*`` keys)."""

    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_freq_base: float


def add_model_metadata(
    w: gguf.GGUFWriter,
    *,
    name: str,
    file_type: int,
    sizes: ModelSizes,
    vocab: SpmVocab,
    chat_template: str,
    description: str | None = None,
) -> None:
    """Write the general, hyper-parameter and tokenizer keys of a synthetic model to ``w``.

    ``general.architecture`` is written by ``GGUFWriter`` itself (its ``arch`` argument).
    """
    w.add_name(name)
    if description:
        w.add_description(description)
    w.add_file_type(file_type)
    w.add_context_length(sizes.n_ctx_train)
    w.add_embedding_length(sizes.n_embd)
    w.add_block_count(sizes.n_layer)
    w.add_feed_forward_length(sizes.n_ff)
    w.add_head_count(sizes.n_head)
    w.add_head_count_kv(sizes.n_head_kv)
    w.add_layer_norm_rms_eps(sizes.rms_eps)
    w.add_rope_dimension_count(sizes.head_dim)  # llama: must equal the head size
    w.add_rope_freq_base(sizes.rope_freq_base)
    w.add_vocab_size(len(vocab.tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(list(vocab.tokens))
    w.add_token_scores(list(vocab.scores))
    w.add_token_types(list(vocab.types))
    w.add_unk_token_id(vocab.unk)
    w.add_bos_token_id(vocab.bos)
    w.add_eos_token_id(vocab.eos)
    w.add_eot_token_id(vocab.eot)  # end of turn -> end of generation
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(chat_template)
