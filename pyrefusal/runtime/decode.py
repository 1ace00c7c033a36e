"""Batched decoding on one llama.cpp context: prompt processing, capture, greedy generation, token scoring.

:class:`Decoder` puts many sequences in each ``llama_decode``: it groups prompts so that a group fits
``n_seq_max`` and the KV cache, decodes a group's shared prefix (system prompt, turn header) once and shares it
through the KV cache, and reads the logits of the requested rows. Around each decode it tells pyrefusal's hook
(:mod:`pyrefusal.runtime.hook`) which batch rows to capture and raises the errors it recorded.

The numbers it returns depend on how prompts are grouped and ordered (llama.cpp's kernels see different batch
shapes), so grouping and prefix sharing are part of the results: change them only on purpose.

Conventions:
    * One decode is always one llama.cpp ubatch (``n_ubatch == n_batch`` and a unified KV
      cache), so graph rows are the batch tokens in order; the hook relies on that.
    * Sequence ids inside a group are the prompt's index in the group.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import llama_cpp  # noqa: F401  (must be imported before numpy/gguf in CUDA processes, see docs)

import numpy as np

from pyrefusal.errors import PyrefusalError
from pyrefusal.runtime import capi
from pyrefusal.runtime.hook import HookBinding, PlanEntry

__all__ = ["Decoder", "Generation", "Timings"]


@dataclass(frozen=True)
class Generation:
    """One greedy completion."""

    tokens: list[int]
    text: str
    finish_reason: str  # "eos" (an end-of-generation token), "length", or "stopped" (generate's stop callback)


@dataclass
class Timings:
    """Wall-clock seconds and token counts, accumulated per runtime."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    decodes: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def decode_groups(lengths: Sequence[int], extra: int, *, n_seq_max: int, n_ctx: int) -> list[list[int]]:
    """Split prompt indices into the groups one context decodes together: consecutive prompts, at most
    ``n_seq_max`` per group, their tokens (each prompt's length + ``extra``) within ``n_ctx``.

    The grouping is part of the results (batch shapes), so work split over several replicas
    (:mod:`pyrefusal.stages.shards`) is cut along these groups.
    """
    groups: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        need = n + extra
        if cur and (len(cur) >= n_seq_max or used + need > n_ctx):
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += need
    if cur:
        groups.append(cur)
    return groups


class Decoder:
    """Batched decoding of token sequences on one context, with pyrefusal's hook driven around each decode.

    Args:
        model: the model (vocabulary size, end-of-generation tokens).
        ctx: the context to decode on.
        params: the context's sizes (``n_ctx``, ``n_batch``, ``n_seq_max``).
        hook: the context's hook binding (possibly without a hook).
        detokenize: ``tokens -> text`` of a completion (control tokens dropped).
        clear_plan: removes every intervention (hook plan, control vector, LoRA); :meth:`capture` calls it
            when it ends, as its capture plan replaced the armed one.

    Attributes:
        timings: token counts and seconds of every decode so far.
        share_prefix: decode a group's common prompt prefix once and share it through the KV cache (default);
            ``False`` decodes every prompt whole.
    """

    def __init__(
        self,
        model: capi.Model,
        ctx: capi.Context,
        params: capi.ContextParams,
        hook: HookBinding,
        *,
        detokenize: Callable[[Sequence[int]], str],
        clear_plan: Callable[[], None],
    ) -> None:
        self._model = model
        self._ctx = ctx
        self._hook = hook
        self._detokenize = detokenize
        self._clear_plan = clear_plan
        self.n_ctx = params.n_ctx
        self.n_batch = params.n_batch
        self.n_seq_max = params.n_seq_max
        self.n_layer = model.n_layer
        self.n_embd = model.n_embd
        self.n_vocab = model.n_vocab
        self._batch = capi.Batch(params.n_batch)
        self.timings = Timings()
        self.share_prefix = True

    def probe(self, token: int) -> None:
        """Decode ``token`` alone (sequence 0, position 0, with logits) on an empty KV cache, and empty it again:
        the smallest decode that builds the whole graph (the hook records its node names from it)."""
        self.clear_memory()
        try:
            self._decode(np.array([token]), np.array([0]), np.array([0]), np.array([1]))
        finally:
            self.clear_memory()

    def clear_memory(self) -> None:
        """Clear the KV cache of every sequence."""
        self._ctx.clear_memory()

    def _decode(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, logits: np.ndarray) -> None:
        self._batch.fill(tokens, pos, seq, logits)
        rc = self._ctx.decode(self._batch)
        self.timings.decodes += 1
        self._hook.raise_error()
        if rc != 0:
            raise PyrefusalError(
                f"llama_decode failed with code {rc} ({len(tokens)} tokens). Code 1 means the KV cache is full: "
                "lower the batch/sequence counts or raise n_ctx."
            )

    def _logits(self, n_out: int) -> np.ndarray:
        return self._ctx.logits(n_out)  # (n_out, n_vocab) view, float32

    def _groups(self, lengths: Sequence[int], extra: int) -> list[list[int]]:
        """Split sequence indices into groups that fit n_seq_max and the KV cache (:func:`decode_groups`)."""
        for n in lengths:
            if n + extra > self.n_ctx:
                raise PyrefusalError(
                    f"a prompt of {n} tokens (+{extra} to generate) does not fit n_ctx={self.n_ctx}; raise n_ctx"
                )
        return decode_groups(lengths, extra, n_seq_max=self.n_seq_max, n_ctx=self.n_ctx)

    def _prefill(
        self,
        prompts: Sequence[Sequence[int]],
        members: Sequence[int],
        capture_positions: Sequence[Sequence[int]] | None,
        slot_of: Callable[[int, int], int] | None,
        final_capture: bool,
    ) -> np.ndarray:
        """Decode the prompts of one group (seq id = index in ``members``).

        Returns the last-position logits ``(len(members), n_vocab)`` float32. Captures (when a
        capture plan is armed) go to the hook's buffer at ``slot_of(member, j)`` for the j-th
        requested position of that prompt.
        """
        # Shared prefix (system prompt, turn header): decoded once in seq 0, then shared with
        # the other sequences through the KV cache. It never covers a captured position.
        shared = self._shared_prefix(prompts, members, capture_positions) if self.share_prefix else 0
        t0 = time.perf_counter()
        if shared:
            head = np.asarray(prompts[members[0]][:shared], dtype=np.int32)
            for start in range(0, shared, self.n_batch):
                sl = slice(start, min(start + self.n_batch, shared))
                n = sl.stop - sl.start
                self._hook.set_capture_rows([-1] * n, [])
                self._decode(
                    head[sl],
                    np.arange(sl.start, sl.stop, dtype=np.int32),
                    np.zeros(n, np.int32),
                    np.zeros(n, np.int8),
                )
            for s in range(1, len(members)):
                self._ctx.seq_copy(0, s)
            self.timings.prompt_tokens += shared
        # Flatten (token, pos, seq, want_logits, capture_slot) over the group.
        toks, poss, seqs, outs, slots = [], [], [], [], []
        for s, m in enumerate(members):
            p = list(prompts[m])[shared:]
            n = len(p)
            want = np.zeros(n, dtype=np.int8)
            want[-1] = 1
            slot = np.full(n, -1, dtype=np.int64)
            if capture_positions is not None and slot_of is not None:
                for j, q in enumerate(capture_positions[m]):
                    idx = (q - shared) if q >= 0 else n + q
                    if not 0 <= idx < n:
                        raise PyrefusalError(f"capture position {q} outside a prompt of {n + shared} tokens")
                    slot[idx] = slot_of(m, j)
                    if final_capture:
                        want[idx] = 1
            toks.append(np.asarray(p, dtype=np.int32))
            poss.append(np.arange(shared, shared + n, dtype=np.int32))
            seqs.append(np.full(n, s, dtype=np.int32))
            outs.append(want)
            slots.append(slot)
        tok, pos, seq = np.concatenate(toks), np.concatenate(poss), np.concatenate(seqs)
        out, slot = np.concatenate(outs), np.concatenate(slots)
        last_idx = np.cumsum([len(t) for t in toks]) - 1  # flat index of each prompt's last token

        result = np.empty((len(members), self.n_vocab), dtype=np.float32)
        for start in range(0, len(tok), self.n_batch):
            sl = slice(start, min(start + self.n_batch, len(tok)))
            if self._hook.hook is not None:  # row maps only where a hook reads them
                o = out[sl].astype(bool)
                self._hook.set_capture_rows(slot[sl].tolist(), slot[sl][o].tolist())
            self._decode(tok[sl], pos[sl], seq[sl], out[sl])
            out_flat = np.flatnonzero(out[sl]) + start  # flat indices of this decode's outputs
            logits = self._logits(len(out_flat))
            for k, flat in enumerate(out_flat):
                hit = np.flatnonzero(last_idx == flat)
                if len(hit):
                    result[hit[0]] = logits[k]
        self.timings.prompt_tokens += len(tok)
        self.timings.prompt_seconds += time.perf_counter() - t0
        return result

    def _shared_prefix(
        self,
        prompts: Sequence[Sequence[int]],
        members: Sequence[int],
        capture_positions: Sequence[Sequence[int]] | None,
    ) -> int:
        """Length of the common token prefix of a group that can be decoded once."""
        if len(members) < 2:
            return 0
        first = prompts[members[0]]
        limit = min(len(prompts[m]) for m in members) - 1  # every prompt keeps >= 1 own token
        for m in members:
            if capture_positions is not None:
                n = len(prompts[m])
                for q in capture_positions[m]:
                    limit = min(limit, q if q >= 0 else n + q)
        k = 0
        while k < limit and all(prompts[m][k] == first[k] for m in members):
            k += 1
        return k if k >= 4 else 0  # not worth a separate decode below a few tokens

    def last_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Last-position logits of each prompt under the armed plan, float32 ``(n_prompts, n_vocab)``."""
        if not prompts:
            raise PyrefusalError("no prompts given; pass at least one prompt")
        out = np.empty((len(prompts), self.n_vocab), dtype=np.float32)
        for group in self._groups([len(p) for p in prompts], 0):
            self.clear_memory()
            out[group] = self._prefill(prompts, group, None, None, False)
        self.clear_memory()
        return out

    def capture(
        self,
        prompts: Sequence[Sequence[int]],
        positions: Sequence[int],
        layers: Sequence[int] | None = None,
        *,
        ablation: np.ndarray | None = None,
        armed: tuple[dict[str, PlanEntry], np.ndarray | None, list[np.ndarray]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Capture the residual stream at block inputs.

        Args:
            prompts: token lists.
            positions: token positions to capture in every prompt (negative = from the end).
            layers: block-input indices in ``0..n_layer`` (default all ``n_layer + 1``;
                ``n_layer`` is the output of the last block).
            ablation: optional orthonormal directions ``(k, n_embd)`` ablated at every layer
                while capturing (for checking that the stream is clean).
            armed: optional compiled intervention ``(plan, directions, vectors)`` (see
                :func:`pyrefusal.steering.router.plan`) active while capturing; the captured
                values are those after the node's edits.

        Returns:
            ``(acts, logits)``: acts float32 ``(n_prompts, n_positions, n_layers_captured, n_embd)``,
            logits float32 ``(n_prompts, n_vocab)`` at the last position.
        """
        if not prompts:
            raise PyrefusalError("no prompts given; pass at least one prompt")
        hook = self._hook.require()
        layers = list(range(self.n_layer + 1)) if layers is None else list(layers)
        if any(not 0 <= lay <= self.n_layer for lay in layers):
            raise PyrefusalError(f"capture layers must be in 0..{self.n_layer}; got {layers}")
        plan: dict[str, PlanEntry] = {}
        directions, vectors = ablation, []
        if armed is not None:
            plan, directions, vectors = dict(armed[0]), armed[1], list(armed[2])
        elif ablation is not None:
            for name in self._hook.nodes.ablation_nodes(self.n_layer):
                plan[name] = PlanEntry(ablate=True)
        for j, lay in enumerate(layers):
            name = self._hook.nodes.block_input(lay)
            prev = plan.get(name, PlanEntry())
            plan[name] = PlanEntry(ablate=prev.ablate, add_index=prev.add_index, capture_layer=j)
        self._hook.set_plan(plan, directions, vectors)
        n_pos = len(positions)
        final = self.n_layer in layers
        acts = np.empty((len(prompts), n_pos, len(layers), self.n_embd), dtype=np.float32)
        logits = np.empty((len(prompts), self.n_vocab), dtype=np.float32)
        try:
            for group in self._groups([len(p) for p in prompts], 0):
                local = {m: i for i, m in enumerate(group)}
                hook.set_capture_buffer(len(group) * n_pos, len(layers))
                self.clear_memory()
                logits[group] = self._prefill(
                    prompts, group, [positions] * len(prompts), lambda m, j, loc=local: loc[m] * n_pos + j, final
                )
                buf = hook.captured()  # (len(group) * n_pos, n_layers_captured, n_embd)
                acts[group] = buf.reshape(len(group), n_pos, len(layers), self.n_embd)
        finally:
            self._clear_plan()
            hook.set_capture_buffer(0, 0)
            self.clear_memory()
        return acts, logits

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        progress: Callable[[int], None] | None = None,
        stop_at_eog: bool = True,
        stop: Callable[[int, Sequence[int]], bool] | None = None,
    ) -> list[Generation]:
        """Greedy generation for many prompts, batched (one sequence per prompt per decode).

        Each sequence stops at an end-of-generation token (EOS / end of turn) or after
        ``max_new_tokens``. The armed plan applies to prompt and generated tokens alike.
        ``progress(n)`` is called with the number of sequences finished. ``stop_at_eog=False``
        generates exactly ``max_new_tokens`` (benchmarks). ``stop(m, tokens)``, when given, is asked after each
        token a sequence gains below the budget (``m``: its prompt's index, ``tokens``: its generated tokens so
        far); True ends it there with finish_reason ``"stopped"`` (e.g. once a refusal detector has decided).
        While generating, a capture plan (if
        armed) writes the newest token of sequence ``s`` of a group to capture slot ``s``.
        """
        if not prompts:
            raise PyrefusalError("no prompts given; pass at least one prompt")
        if max_new_tokens < 1:
            raise PyrefusalError("max_new_tokens must be >= 1")
        results: list[Generation | None] = [None] * len(prompts)
        for group in self._groups([len(p) for p in prompts], max_new_tokens):
            self.clear_memory()
            self._hook.set_capture_rows([], [])
            logits = self._prefill(prompts, group, None, None, False)
            t0 = time.perf_counter()
            out: list[list[int]] = [[] for _ in group]
            pos = np.array([len(prompts[m]) for m in group], dtype=np.int32)
            active = np.ones(len(group), dtype=bool)
            finish = ["length"] * len(group)
            nxt = logits.argmax(axis=1).astype(np.int32)  # greedy; ties -> lowest id
            ones = np.ones(len(group), dtype=np.int8)
            while True:
                for s in np.flatnonzero(active):
                    tok = int(nxt[s])
                    if stop_at_eog and self._model.is_eog(tok):
                        active[s] = False
                        finish[s] = "eos"
                        continue
                    out[s].append(tok)
                    if len(out[s]) >= max_new_tokens:
                        active[s] = False
                    elif stop is not None and stop(group[s], out[s]):
                        active[s] = False
                        finish[s] = "stopped"
                if not active.any():
                    break
                idx = np.flatnonzero(active)
                if self._hook.hook is not None:
                    rows = idx.tolist()
                    self._hook.set_capture_rows(rows, rows)
                self._decode(nxt[idx], pos[idx], idx.astype(np.int32), ones[: len(idx)])
                pos[idx] += 1
                step = self._logits(len(idx))
                nxt[idx] = step.argmax(axis=1)
                self.timings.generated_tokens += len(idx)
            self.timings.generation_seconds += time.perf_counter() - t0
            for s, m in enumerate(group):
                results[m] = Generation(tokens=out[s], text=self._detokenize(out[s]).strip(), finish_reason=finish[s])
            if progress is not None:
                progress(len(group))
        self.clear_memory()
        return [r for r in results if r is not None]

    def token_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Log-probability of every token given its prefix, under the armed plan (perplexity, scoring).

        Prompts are decoded in groups as :meth:`last_logits` does (no shared-prefix reuse: every
        position needs its own logits). llama.cpp keeps ``n_vocab`` floats per requested position,
        so each ``llama_decode`` takes at most ``2**25 / n_vocab`` tokens (~128 MiB of logits;
        220 tokens for a 152k vocabulary). Log-softmax is taken in float64.

        Args:
            prompts: token lists, each of at least one token (nothing is added: include BOS
                yourself when the model expects one).

        Returns:
            One float64 array ``(n_tokens - 1,)`` per prompt: entry ``i`` is
            ``log p(prompt[i + 1] | prompt[: i + 1])`` (empty for a one-token prompt).

        Raises:
            PyrefusalError: no prompts, an empty prompt, or a prompt longer than ``n_ctx``.
        """
        if not prompts:
            raise PyrefusalError("no prompts given; pass at least one prompt")
        if any(len(p) == 0 for p in prompts):
            raise PyrefusalError("token_logprobs got an empty prompt; every prompt needs at least one token")
        step = max(1, min(self.n_batch, (1 << 25) // self.n_vocab))  # tokens per decode
        out: list[np.ndarray] = [np.empty(0)] * len(prompts)
        for group in self._groups([len(p) for p in prompts], 0):
            self.clear_memory()
            self._hook.set_capture_rows([], [])
            t0 = time.perf_counter()
            toks = [np.asarray(prompts[m], dtype=np.int32) for m in group]
            lengths = [len(t) for t in toks]
            tok = np.concatenate(toks)  # (n_flat,)
            pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
            seq = np.concatenate([np.full(n, s, dtype=np.int32) for s, n in enumerate(lengths)])
            want = np.ones(len(tok), dtype=np.int8)
            want[np.cumsum(lengths) - 1] = 0  # a sequence's last token predicts nothing we score
            flat_lp = np.zeros(len(tok), dtype=np.float64)  # flat_lp[j] = log p(tok[j + 1] | ...)
            for start in range(0, len(tok), step):
                sl = slice(start, min(start + step, len(tok)))
                self._decode(tok[sl], pos[sl], seq[sl], want[sl])
                rows = np.flatnonzero(want[sl]) + start  # flat indices with logits, in output order
                if not len(rows):
                    continue
                logits = self._logits(len(rows))  # (len(rows), n_vocab) float32 view
                for a in range(0, len(rows), 32):  # float64 in slices: 32 x n_vocab x 8 bytes
                    x = logits[a : a + 32].astype(np.float64)  # (k, n_vocab)
                    peak = x.max(axis=1, keepdims=True)
                    lse = peak[:, 0] + np.log(np.exp(x - peak).sum(axis=1))  # (k,)
                    r = rows[a : a + 32]
                    flat_lp[r] = x[np.arange(len(r)), tok[r + 1]] - lse
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            for s, m in enumerate(group):
                out[m] = flat_lp[bounds[s] : bounds[s + 1] - 1].copy()
            self.timings.prompt_tokens += len(tok)
            self.timings.prompt_seconds += time.perf_counter() - t0
        self.clear_memory()
        return out
