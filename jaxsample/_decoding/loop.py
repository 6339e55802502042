"""The decode step every sampling loop runs, and the early-exit loop over chunks of steps.

:class:`DecodeStep` holds what one step needs besides the carry (the model, the sampler,
the row keys, stop ids, pad id, per-row limits and the output options):

    start:  prefill -> sampler.init -> pick(index 0)                  -> DecodeState, Outputs
    step:   model.decode(s.token, s.position) -> pick(index s.lengths) -> DecodeState, Outputs
    pick:   sample_fn(sampler, logits, state, fold_in(keys[b], lengths[b]))
            -> emit (core.emit) -> freeze the state of rows done before -> write the outputs

:func:`run_until_done` runs ``step`` as a `lax.while_loop` over chunks of `lax.scan`ned
steps, exiting once every row is done: the work follows what the rows need, not the
static ``max_new_tokens`` (rows that reach their limit are done).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample._decoding import core
from jaxsample._decoding.core import DecodeState, FinishReason, Outputs
from jaxsample._processors.base import Chain, init_state

__all__ = ["DecodeStep", "run_until_done", "CHUNK"]

Array = jax.Array

#: Decode steps per chunk of the early-exit loop: the loop checks "every row done" once a
#: chunk, so at most CHUNK - 1 steps run after the last row finished.
CHUNK = 16


class DecodeStep(NamedTuple):
    """One decode step's context (built inside a jitted function; see the module docstring)."""

    model: Any
    sampler: Chain
    keys: Array  #: typed keys [B], one per row
    stops: Array  #: int32 [S]
    pad_id: Array  #: int32 []
    limit: Array  #: int32 [B] (or []): each row's max_new_tokens
    sample_fn: Callable
    top_logprobs: int = 0
    return_stats: bool = False

    def pick(self, logits: Array, s: DecodeState, outputs: Outputs, offset: Any = 0) -> tuple[DecodeState, Outputs]:
        """Samples every live row's next generated index (``s.lengths``) from ``logits`` [B, V]
        and writes it at column ``index - offset`` of ``outputs``."""
        index = s.lengths
        token, new_state, out = self.sample_fn(self.sampler, logits, s.sampler_state,
                                               core.step_keys(self.keys, index))
        e = core.emit(token, s.done, s.lengths, s.finish, stops=self.stops, pad_id=self.pad_id, limit=self.limit)
        top = None
        if self.top_logprobs:
            top_fn = getattr(self.sample_fn, "top_logprobs", core.top_logprobs_of)
            top = top_fn(logits, self.top_logprobs)  # [B, K] each
        stats = core.step_stats(out.processed_logits) if self.return_stats else None
        outputs = outputs.write(index - offset, e, out.token_logprob_raw, out.token_logprob_processed, top, stats)
        state = core.freeze(new_state, s.sampler_state, s.done)
        return DecodeState(e.token, s.cache, state, e.done, e.lengths, e.finish,
                           s.position + e.emitted.astype(jnp.int32)), outputs

    def step(self, s: DecodeState, outputs: Outputs, offset: Any = 0) -> tuple[DecodeState, Outputs]:
        """Decodes every row's last token at its position, then :meth:`pick`."""
        logits, cache = self.model.decode(s.token, s.position, s.cache)
        return self.pick(logits, s._replace(cache=cache), outputs, offset)

    def start(self, prompt_tokens: Array, prompt_lengths: Array, *, max_new_tokens: int, cache_size: int, n: int,
              prompt_logprobs: bool, width: int) -> tuple[DecodeState, Outputs, Array | None]:
        """Prefill (each prompt once for its n samples) and generated index 0:
        (state, outputs of width ``width``, prompt log-probs or None)."""
        logits, cache, prompt_lp = core.prefill_samples(self.model, prompt_tokens, prompt_lengths, cache_size, n,
                                                        prompt_logprobs)
        tokens = jnp.repeat(prompt_tokens, n, axis=0)  # [B * n, P], row i * n + j = prompt i
        lengths = jnp.repeat(prompt_lengths, n, axis=0)
        b = tokens.shape[0]
        state = init_state(self.sampler, tokens, lengths, self.model.vocab_size, max_new_tokens=max_new_tokens)
        s = initial_state(cache, state, lengths, self.pad_id)
        outputs = Outputs.empty(b, width, self.pad_id, top_logprobs=self.top_logprobs,
                                return_stats=self.return_stats)
        s, outputs = self.pick(logits, s, outputs)
        return s, outputs, prompt_lp


def initial_state(cache: Any, sampler_state: Any, prompt_lengths: Array, pad_id: Array) -> DecodeState:
    """The carry before generated index 0 of rows whose prompts are in ``cache``."""
    b = prompt_lengths.shape[0]
    return DecodeState(token=jnp.full((b,), pad_id, jnp.int32), cache=cache, sampler_state=sampler_state,
                       done=jnp.zeros((b,), bool), lengths=jnp.zeros((b,), jnp.int32),
                       finish=jnp.asarray(np.full((b,), FinishReason.LENGTH, np.int32)), position=prompt_lengths - 1)


def run_until_done(step: Callable, s: DecodeState, outputs: Outputs, steps: int,
                   chunk: int = CHUNK, constrain: Callable | None = None) -> tuple[DecodeState, Outputs]:
    """Runs ``step(s, outputs) -> (s, outputs)`` up to ``steps`` times, in chunks of ``chunk``
    scanned steps, stopping after the first chunk at whose end every row is done.

    ``constrain`` (optional) maps a per-row array (leading axis B) to itself with a layout
    constraint; it is applied to the carry's per-row fields and the output buffers at every
    chunk, so a partitioned loop (`jaxsample.sharded_generate`) keeps them split over the
    batch (a `lax.while_loop` carry gets no layout from its body otherwise).
    """
    if steps <= 0:
        return s, outputs
    chunk = max(1, min(chunk, steps))

    def pin(s, outputs):
        if constrain is None:
            return s, outputs
        rows = {f: constrain(getattr(s, f)) for f in ("token", "done", "lengths", "finish", "position")}
        return s._replace(**rows), jax.tree.map(constrain, outputs)

    def run_chunk(carry):
        s, outputs, i = carry
        (s, outputs), _ = jax.lax.scan(lambda c, _: (step(*c), None), (s, outputs), None, length=chunk)
        return *pin(s, outputs), i + chunk

    def more(carry):
        s, _, i = carry
        return (i < steps) & ~jnp.all(s.done)

    s, outputs = pin(s, outputs)
    s, outputs, _ = jax.lax.while_loop(more, run_chunk, (s, outputs, jnp.asarray(0, jnp.int32)))
    return s, outputs
