"""Streaming generation: `generate`'s decode step, chunk by chunk from the host."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample._decoding import core
from jaxsample._decoding.core import LanguageModel, Outputs
from jaxsample._decoding.generate import GenerateStats, StreamChunk, prepare_generate
from jaxsample._decoding.loop import DecodeStep
from jaxsample._processors.base import Chain
from jaxsample._step.step import sample_step

__all__ = ["generate_stream"]


def generate_stream(model: LanguageModel, prompt_tokens: jax.Array, prompt_lengths: jax.Array, keys: jax.Array,
                    *, max_new_tokens: int, chunk_size: int = 16, sampler: Chain | None = None,
                    stop_ids: Sequence[int] = (), pad_id: int = 0, cache_size: int | None = None, n: int = 1,
                    top_logprobs: int = 0, prompt_logprobs: bool = False, sample_fn: Callable = sample_step,
                    return_stats: bool = False, memory_limit: float | None = None) -> Iterator[StreamChunk]:
    """Like `generate`, but yields the tokens chunk by chunk while they are produced.

    The first chunk is generated index 0 alone (right after the prefill: the first
    token as early as possible); then each chunk is `chunk_size` steps of the same
    jitted decode step as `generate`, run as a `lax.scan` that carries the cache and
    the sampler state from chunk to chunk. The tokens (and log-probs) are therefore
    equal to `generate`'s for the same inputs and keys. Every chunk runs the same
    compiled program (the start index is traced; a row that reached `max_new_tokens`
    is done and emits nothing more), so a new chunk never recompiles. The loop stops
    early once every row has finished (one host sync per chunk).

    Args:
      model, prompt_tokens, prompt_lengths, keys, max_new_tokens, sampler, stop_ids,
        pad_id, cache_size, n, top_logprobs, prompt_logprobs, sample_fn, return_stats,
        memory_limit:
        as for `generate`, with the same meaning and layout per chunk.
      chunk_size: C, static: decode steps per chunk (larger: fewer host round trips).

    Yields:
      `StreamChunk`s; concatenating a per-step field (`tokens`, the log-probs, the top-N
      fields, `stats.entropy`, `stats.num_kept`) along axis 1 gives `generate`'s up to
      the last chunk (padded where rows finished). `prompt_logprobs` comes once, on the
      first chunk; the last chunk's `lengths`, `finish_reason` and `stats.final_state`
      are `generate`'s.

    Example:
      >>> import jax, jax.numpy as jnp, jaxsample as js
      >>> from models import DecoderLM, preset
      >>> lm = DecoderLM.random(preset("tiny"), jax.random.key(0))
      >>> chunks = js.generate_stream(lm, jnp.array([[256, 72, 105]]), jnp.array([3]),
      ...                             jax.random.split(jax.random.key(1), 1), max_new_tokens=8,
      ...                             chunk_size=4, sampler=js.default_chain(temperature=0.8))
      >>> [c.tokens.shape[1] for c in chunks]
      [1, 4, 3]
    """
    core.positive_int("chunk_size", chunk_size)
    args, static = prepare_generate(model, prompt_tokens, prompt_lengths, keys, max_new_tokens=max_new_tokens,
                                    sampler=sampler, stop_ids=stop_ids, pad_id=pad_id, cache_size=cache_size, n=n,
                                    top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
                                    sample_fn=sample_fn, fn="generate_stream", return_stats=return_stats,
                                    memory_limit=memory_limit)
    return _stream(model, args, static, int(chunk_size), bool(return_stats))


def _chunk(begin: int, s, outputs: Outputs, width: int, return_stats: bool, prompt_lp=None) -> StreamChunk:
    """Columns ``[0, width)`` of a chunk's output buffers as a `StreamChunk`."""
    cut = lambda x: None if x is None else x[:, :width]
    stats = GenerateStats(cut(outputs.entropy), cut(outputs.num_kept), s.sampler_state) if return_stats else None
    return StreamChunk(begin, cut(outputs.tokens), cut(outputs.logprobs_raw), cut(outputs.logprobs_processed),
                       s.lengths, s.finish, s.done, cut(outputs.top_token_ids), cut(outputs.top_logprobs),
                       prompt_lp, stats)


def _stream(model, args, static, chunk_size, return_stats):
    traced = core.is_pytree(model)
    start = _stream_start_traced if traced else _stream_start_static
    run = _stream_chunk_traced if traced else _stream_chunk_static
    n_steps = static["max_new_tokens"]
    s, outputs, prompt_lp = start(model, *args, **static, return_stats=return_stats)
    yield _chunk(0, s, outputs, 1, return_stats, prompt_lp)
    _, _, keys, sampler, stops, pad_id, limit = args
    for begin in range(1, n_steps, chunk_size):
        if bool(np.all(np.asarray(s.done))):
            return
        cache, rest = s.cache, s._replace(cache=())  # the cache is donated: updated in place
        s, outputs = run(model, sampler, keys, stops, pad_id, limit, cache, rest, jnp.asarray(begin, jnp.int32),
                         chunk_size=chunk_size, sample_fn=static["sample_fn"],
                         top_logprobs=static["top_logprobs"], return_stats=return_stats)
        yield _chunk(begin, s, outputs, min(chunk_size, n_steps - begin), return_stats)


def _stream_start(model, prompt_tokens, prompt_lengths, keys, sampler, stops, pad_id, limit, *, max_new_tokens,
                  cache_size, n, top_logprobs, prompt_logprobs, sample_fn, return_stats):
    """Prefill and generated index 0: (state, outputs of width 1, prompt log-probs)."""
    step = DecodeStep(model, sampler, keys, stops, pad_id, limit, sample_fn, top_logprobs, return_stats)
    return step.start(prompt_tokens, prompt_lengths, max_new_tokens=max_new_tokens, cache_size=cache_size, n=n,
                      prompt_logprobs=prompt_logprobs, width=1)


def _stream_chunk_impl(model, sampler, keys, stops, pad_id, limit, cache, rest, begin, *, chunk_size, sample_fn,
                       top_logprobs=0, return_stats=False):
    """`chunk_size` decode steps writing generated indices ``begin .. begin + C - 1`` (begin traced).

    The carry comes as `cache` (donated: the KV cache is updated in place) and `rest`
    (the other `DecodeState` fields), which the caller may still hold."""
    step = DecodeStep(model, sampler, keys, stops, pad_id, limit, sample_fn, top_logprobs, return_stats)
    outputs = Outputs.empty(keys.shape[0], chunk_size, pad_id, top_logprobs=top_logprobs, return_stats=return_stats)
    body = lambda carry, _: (step.step(*carry, offset=begin), None)
    (s, outputs), _ = jax.lax.scan(body, (rest._replace(cache=cache), outputs), None, length=chunk_size)
    return s, outputs


_START_STATIC = ("max_new_tokens", "cache_size", "n", "top_logprobs", "prompt_logprobs", "sample_fn", "return_stats")
_CHUNK_STATIC = ("chunk_size", "sample_fn", "top_logprobs", "return_stats")
_stream_start_traced = jax.jit(_stream_start, static_argnames=_START_STATIC)
_stream_start_static = jax.jit(_stream_start, static_argnums=(0,), static_argnames=_START_STATIC)
_stream_chunk_traced = jax.jit(_stream_chunk_impl, static_argnames=_CHUNK_STATIC, donate_argnums=(6,))
_stream_chunk_static = jax.jit(_stream_chunk_impl, static_argnums=(0,), static_argnames=_CHUNK_STATIC,
                               donate_argnums=(6,))
