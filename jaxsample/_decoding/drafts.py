"""Drafts for speculative decoding: the draft protocol and its implementations.

A draft proposes k tokens per row each round; the target verifies them
(:mod:`jaxsample._decoding.speculative`). The protocol, implemented by
:class:`PromptLookup`, `jaxsample.NGramDraft` and :class:`ModelDraft` (any
`LanguageModel` used as a draft is wrapped in one)::

    state = draft.start(prompt_tokens [B, P], prompt_lengths [B], cache_size, n)
    tokens, q, state = draft.propose(state, ctx: DraftContext, k)

``tokens`` is int32 ``[B * n, k]`` (``-1``: no proposal, nothing to accept), ``q`` the
draft's (processed) distributions float32 ``[B * n, k, V]`` the tokens were drawn
from, or None for a point mass on ``tokens`` (tables and lookups). Both methods are
traced inside the jitted loop; ``k`` is static.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from jaxsample import _validation as _val
from jaxsample._decoding import core
from jaxsample._filters import sampling as _sampling
from jaxsample._processors.base import Chain
from jaxsample._step.step import process_and_draw

__all__ = ["Draft", "DraftContext", "PromptLookup", "ModelDraft", "as_draft", "lookup", "DRAFT_STREAM"]

Array = jax.Array

#: fold_in data of the draft's draw (processors use 1..M and the target's draw 0, as in
#: `sample_step`; the acceptance uniform uses `speculative.ACCEPT_STREAM`).
DRAFT_STREAM = 0x7FFFFFFE


class DraftContext(NamedTuple):
    """What a draft sees each round (all ``[B]`` unless said).

    Attributes:
      seq: int32 [B, W], each row's prompt and committed generated tokens (-1 after).
      length: int32, the committed context length (prompt + generated), >= 1.
      generated: int32, generated tokens committed so far (the next generated index).
      sampler: the chain applied to the draft's logits (as to the target's).
      sampler_state: its state after the committed tokens.
      keys: typed row keys; generated index i draws with ``fold_in(keys[b], i)``.
    """

    seq: Array
    length: Array
    generated: Array
    sampler: Chain
    sampler_state: Any
    keys: Array


class Draft(Protocol):
    """The draft protocol (module docstring)."""

    def start(self, prompt_tokens: Array, prompt_lengths: Array, cache_size: int, n: int) -> Any:
        """The draft's state after the prompts (e.g. a prefilled KV cache; () for none)."""

    def propose(self, state: Any, ctx: DraftContext, k: int) -> tuple[Array, Array | None, Any]:
        """(tokens int32 [B, k], q float32 [B, k, V] or None for a point mass, state)."""


@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """Prompt-lookup draft: propose what followed the last n-gram earlier in the row.

    The row's last `max_ngram` tokens are searched in its context (prompt and generated
    tokens); the most recent earlier occurrence wins, and without one the search falls
    back to shorter n-grams, down to `min_ngram`. The k tokens after the match are
    proposed (when the match runs into the suffix itself, the period repeats). q is a
    point mass on the proposal, so acceptance is `u < p(d)`. A row without any match
    proposes nothing that round: its next token is drawn from p alone, like `generate`.
    (The target call still has k + 1 positions: a `lax.cond` to a one-token call would
    copy the KV cache in and out of the branch every round, which costs more on CPU.)

    Attributes:
      max_ngram: longest n-gram to match, >= 1 (static).
      min_ngram: shortest n-gram to match, in [1, max_ngram] (static). Short n-grams
        match more often but predict worse.
    """

    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        _val.check_int("max_ngram", self.max_ngram, fn="PromptLookup", expected="an int >= 1")
        _val.check_int("min_ngram", self.min_ngram, high=self.max_ngram, fn="PromptLookup",
                       expected=f"an int in [1, max_ngram={self.max_ngram}]")

    def start(self, prompt_tokens: Array, prompt_lengths: Array, cache_size: int, n: int) -> Any:
        """No state: the proposals come from the row's own context."""
        return ()

    def propose(self, state: Any, ctx: "DraftContext", k: int) -> tuple[Array, None, Any]:
        """k proposals per row after the most recent earlier match; -1 rows matched nothing."""
        tokens, found = lookup(ctx.seq, ctx.length, self.max_ngram, k, self.min_ngram)
        return jnp.where(found[:, None], tokens, -1), None, state


@dataclasses.dataclass(frozen=True)
class ModelDraft:
    """A `LanguageModel` as a draft: its own KV cache, k draws from its processed logits.

    Each round it is fed the last two committed tokens (rewriting one position
    idempotently), then decodes k - 1 times; draw j of row b uses the processors' keys of
    generated index ``i = generated[b] + j`` and the draw key ``fold_in(fold_in(keys[b], i),
    DRAFT_STREAM)``, with the sampler state advancing along the draws.
    """

    model: Any

    def start(self, prompt_tokens: Array, prompt_lengths: Array, cache_size: int, n: int) -> Any:
        return core.prefill_samples(self.model, prompt_tokens, prompt_lengths, cache_size, n, False)[1]

    def propose(self, cache: Any, ctx: DraftContext, k: int) -> tuple[Array, Array, Any]:
        pos = jnp.maximum(ctx.length - 1, 1)  # the last committed token (clamped: see speculative)
        prev = jnp.take_along_axis(ctx.seq, jnp.stack([pos - 1, pos], axis=1), axis=1)  # [B, 2]
        logits, cache = core.extend(self.model, prev, pos - 1, cache)
        logits = logits[:, -1]

        def draw(logits, state, j):
            keys = core.step_keys(ctx.keys, ctx.generated + j)
            token, state, out = process_and_draw(ctx.sampler, logits, state, keys, _sampling.sample,
                                                 stream=DRAFT_STREAM)
            return token, state, jax.nn.softmax(out.processed_logits.astype(jnp.float32), axis=-1)

        def body(carry, j):
            token, cache, state = carry
            logits, cache = self.model.decode(jnp.maximum(token, 0), pos + j, cache)
            token, state, q = draw(logits, state, j)
            return (token, cache, state), (token, q)

        token, state, q = draw(logits, ctx.sampler_state, 0)
        (_, cache, _), (tokens, qs) = jax.lax.scan(body, (token, cache, state), jnp.arange(1, k))
        tokens = jnp.concatenate([token[:, None], jnp.moveaxis(tokens, 0, 1)], axis=1)  # [B, k]
        qs = jnp.concatenate([q[:, None], jnp.moveaxis(qs, 0, 1)], axis=1)  # [B, k, V]
        return tokens, qs, cache


def as_draft(draft: Any) -> Any:
    """``draft`` when it implements the protocol (has ``propose``), else a `ModelDraft` of it."""
    return draft if callable(getattr(draft, "propose", None)) else ModelDraft(draft)


def lookup(seq: jax.Array, length: jax.Array, max_ngram: int, k: int, min_ngram: int = 1):
    """Prompt-lookup proposals from the committed context seq[b, :length[b]]: (tokens int32
    [B, k], found bool [B]); a row without a match proposes its last token (found False).

    An earlier occurrence is identified by the index e of its last token (e <= length - 2):
    run[e] = how many of the context's last tokens seq[e], seq[e - 1], ... repeat (capped at
    max_ngram). The longest run >= min_ngram wins, the most recent e among equals, and the
    proposal is what followed it, seq[e + 1 ...] (when it runs into the suffix itself, the
    period length - 1 - e repeats). max_ngram static slices and one reduction over [B, W]:
    no gather over the context.
    """
    b, w = seq.shape
    at = lambda idx: jnp.take_along_axis(seq, jnp.clip(idx, 0, w - 1), axis=1)
    tail = at(length[:, None] - 1 - jnp.arange(max_ngram)[None, :])  # [B, N]: the last, the one before, ...
    padded = jnp.pad(seq, ((0, 0), (max_ngram, 0)), constant_values=-2)  # -2 never equals a token
    matching = jnp.ones((b, w), bool)
    run = jnp.zeros((b, w), jnp.int32)
    for o in range(max_ngram):  # matching: seq[e - o'] == tail[o'] for every o' <= o
        matching &= padded[:, max_ngram - o:max_ngram - o + w] == tail[:, o:o + 1]
        run += matching
    e = jnp.arange(w)[None, :]
    score = jnp.where((e <= length[:, None] - 2) & (run >= min_ngram), run * w + e, -1)
    best = jnp.max(score, axis=1)  # longest run first, then the most recent occurrence
    found = best >= 0
    end = best % w
    period = jnp.maximum(length - 1 - end, 1)  # known tokens after the match (>= 1)
    idx = end[:, None] + 1 + jnp.arange(k)[None, :] % period[:, None]
    return jnp.where(found[:, None], at(idx), tail[:, :1]), found
