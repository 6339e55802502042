"""Continuous batching: many prompts through a fixed number of decode slots.

`generate_many` decodes at most `slots` rows at a time. When a row finishes, its slot
takes the next prompt without waiting for the others:

    host:   admit a request into every free slot      (`_admit`: prefill at the prompt's width
                                                        bucket into the slot's cache
                                                        rows, sampler state from its
                                                        own prompt, generated index 0)
            run one chunk                              (`_chunk`: up to `chunk_size` decode
                                                        steps of the shared `DecodeStep`,
                                                        ending early once a slot finishes
                                                        while prompts are waiting)
            read the slots back                        (one device -> host transfer a chunk)
            hand finished rows out, free their slots

Every slot runs `generate`'s own decode step (:class:`jaxsample._decoding.loop.DecodeStep`)
at its own generated index and position, with its request's key, sampler values and
limit, so a row's tokens are those `generate` gives it, whatever the schedule: its
randomness depends only on its key and generated index, and the model's rows are
independent (attention masks every other position exactly). Its logits agree with
`generate`'s to float32 rounding, not bit for bit: XLA rounds a matmul row differently
with the number of rows (docs/engine.md).

A refill prefills its prompt at the first of `prompt_widths(P)` that holds it (one
`lax.switch` branch per width), so a short prompt in a batch padded for a long one costs
what its own length needs. Shapes are fixed by (slots, P, N): admitting a new prompt, a
new chunk or a new call with prompts of the same padded shape never recompiles.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample._decoding import core
from jaxsample._decoding.core import DecodeState, LanguageModel, Outputs
from jaxsample._decoding.generate import GenerateOutput, GenerateStats
from jaxsample._decoding.loop import DecodeStep, initial_state
from jaxsample._processors.base import Chain, init_state, put_rows, take_rows
from jaxsample._step.step import sample_step

__all__ = ["Completion", "ManyStream", "generate_many", "generate_many_stream"]

Array = jax.Array

#: Default decode steps per chunk (a chunk also ends when a row finishes while prompts wait).
CHUNK = 16


class Completion(NamedTuple):
    """One finished row of `generate_many_stream` (host NumPy arrays, N = max_new_tokens).

    Attributes:
      index: the row's index in `generate_many`'s output (prompt-major: sample j of prompt
        i is row ``i * n + j``).
      prompt_index: i, the prompt it continues.
      length: generated tokens (a stop token counts).
      tokens: int32 [N], ``pad_id`` from ``length`` on.
      logprobs_raw, logprobs_processed: float32 [N] (0 from ``length`` on).
      finish_reason: a `FinishReason` value.
      top_token_ids, top_logprobs: [N, K] with ``top_logprobs=K``, else None.
      prompt_logprobs: float32 [P] with ``prompt_logprobs=True``, else None.
      stats: a `GenerateStats` of this row (``entropy`` and ``num_kept`` [N],
        ``final_state`` the row's processor state) with ``return_stats=True``, else None.
    """

    index: int
    prompt_index: int
    length: int
    tokens: np.ndarray
    logprobs_raw: np.ndarray
    logprobs_processed: np.ndarray
    finish_reason: int
    top_token_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    prompt_logprobs: np.ndarray | None = None
    stats: GenerateStats | None = None


class _Slots(NamedTuple):
    """The device state of the slots (donated to every program: updated in place)."""

    state: DecodeState  #: [S] rows; a free slot is done
    outputs: Outputs  #: [S, N]: the current request of each slot, at its generated indices
    keys: Array  #: typed keys [S]
    limit: Array  #: int32 [S]
    prompt_logprobs: Array | None  #: float32 [S, P]


# ----------------------------------------------------------------------------- programs


def prompt_widths(prompt_len: int) -> tuple[int, ...]:
    """The prompt widths a refill prefills at: powers of two from 16 (and at least
    ``prompt_len / 32``) below ``prompt_len``, then ``prompt_len`` itself.

    A refill prefills its prompt only up to the first width that holds it, so a short
    prompt in a batch padded for a long one costs what its own length needs."""
    widths, w = [prompt_len], 16
    while w < prompt_len:
        if 32 * w >= prompt_len:
            widths.append(w)
        w *= 2
    return tuple(sorted(widths))


def _prefill_rows(model, tokens, lengths, rows, cache, cache_size, prompt_logprobs):
    """Prefill G prompts into cache rows ``rows`` [G]: (logits [G, V], cache, prompt log-probs [G, W])."""
    if not prompt_logprobs and callable(getattr(model, "prefill_into", None)):
        logits, cache = model.prefill_into(tokens, lengths, rows, cache)
        return logits, cache, None
    logits, fresh, prompt_lp = core.prefill(model, tokens, lengths, cache_size, prompt_logprobs)
    return logits, _copy_rows(cache, fresh, rows), prompt_lp


def _copy_rows(cache, fresh, rows):
    """``cache`` with rows ``rows`` [G] replaced by the G rows of ``fresh`` (batch-leading leaves)."""
    return jax.tree.map(lambda c, f: c.at[rows].set(f.astype(c.dtype), mode="drop"), cache, fresh)


def _prefill_bucketed(model, tokens, lengths, rows, cache, cache_size, prompt_logprobs, width, bucketed):
    """`_prefill_rows` of prompts [G, P], at ``prompt_widths(P)[width]`` positions (a traced
    index: one program holds every width, only the chosen one runs) when ``bucketed``.

    A bucketed refill prefills a fresh cache of G rows inside the chosen branch and copies
    its rows into ``cache`` after it, so the slots' cache never passes through the
    conditional (XLA would copy it whole). It needs a cache whose leaves lead with the
    batch axis; without one (``bucketed`` False) the refill runs at width P."""
    p = tokens.shape[1]
    widths = prompt_widths(p)
    if not bucketed or len(widths) == 1:
        return _prefill_rows(model, tokens, lengths, rows, cache, cache_size, prompt_logprobs)

    def at(w):
        def run():
            logits, fresh, prompt_lp = core.prefill(model, tokens[:, :w], lengths, cache_size, prompt_logprobs)
            if prompt_lp is not None:  # positions past the prompt's width are padding: 0
                prompt_lp = jnp.pad(prompt_lp, ((0, 0), (0, p - w)))
            return logits, fresh, prompt_lp
        return run

    logits, fresh, prompt_lp = jax.lax.switch(width, [at(w) for w in widths])
    return logits, _copy_rows(cache, fresh, rows), prompt_lp


def _empty(model, sampler, keys, pad_id, *, slots, max_new_tokens, cache_size, prompt_len, top_logprobs,
           prompt_logprobs, return_stats, rows):
    """Every slot free (done), with the sampler state of row 0 as a placeholder."""
    cache = model.init_cache(slots, cache_size)
    index = jnp.zeros((slots,), jnp.int32)
    tokens = jnp.zeros((slots, prompt_len), jnp.int32)
    lengths = jnp.ones((slots,), jnp.int32)
    state = init_state(take_rows(sampler, index, rows), tokens, lengths, model.vocab_size,
                       max_new_tokens=max_new_tokens)
    s = initial_state(cache, state, lengths, pad_id)._replace(done=jnp.ones((slots,), bool))
    outputs = Outputs.empty(slots, max_new_tokens, pad_id, top_logprobs=top_logprobs, return_stats=return_stats)
    plp = jnp.zeros((slots, prompt_len), jnp.float32) if prompt_logprobs else None
    return _Slots(s, outputs, keys[index], jnp.zeros((slots,), jnp.int32), plp), take_rows(sampler, index, rows)


def _admit(model, slots: _Slots, slot_sampler, sampler, prompt_tokens, prompt_lengths, keys, limit, stops, pad_id,
           request, slot, width, *, bucketed, n, max_new_tokens, cache_size, top_logprobs, prompt_logprobs, sample_fn,
           return_stats):
    """Request ``request`` (a traced int: row ``request`` of the output) into slot ``slot``,
    prefilled at ``prompt_widths(P)[width]`` positions."""
    rows = keys.shape[0]
    r = jnp.reshape(request, (1,))
    at = jnp.reshape(slot, (1,))
    tokens = jnp.take(prompt_tokens, r // n, axis=0)  # [1, P]
    lengths = jnp.take(prompt_lengths, r // n, axis=0)  # [1]
    row_sampler = take_rows(sampler, r, rows)
    logits, cache, prompt_lp = _prefill_bucketed(model, tokens, lengths, at, slots.state.cache, cache_size,
                                                 prompt_logprobs, width, bucketed)
    state = init_state(row_sampler, tokens, lengths, model.vocab_size, max_new_tokens=max_new_tokens)
    step = DecodeStep(model, row_sampler, keys[r], stops, pad_id, limit[r], sample_fn, top_logprobs, return_stats)
    s, out = step.pick(logits, initial_state((), state, lengths, pad_id),
                       Outputs.empty(1, max_new_tokens, pad_id, top_logprobs=top_logprobs, return_stats=return_stats))
    put = lambda dst, src: dst.at[at].set(src.astype(dst.dtype), mode="drop")
    new_state = jax.tree.map(put, slots.state._replace(cache=()), s._replace(cache=()))._replace(cache=cache)
    plp = None if prompt_lp is None else put(slots.prompt_logprobs, prompt_lp)
    new = _Slots(new_state, jax.tree.map(put, slots.outputs, out), put(slots.keys, keys[r]),
                 put(slots.limit, limit[r]), plp)
    return new, put_rows(slot_sampler, at, row_sampler, slots.keys.shape[0])


def _chunk(model, slots: _Slots, slot_sampler, stops, pad_id, waiting, *, chunk_size, sample_fn, top_logprobs,
           return_stats):
    """Up to ``chunk_size`` decode steps of every slot; ends early when every slot is done, or
    when a slot finishes while requests are ``waiting`` (a traced bool)."""
    step = DecodeStep(model, slot_sampler, slots.keys, stops, pad_id, slots.limit, sample_fn, top_logprobs,
                      return_stats)
    was_done = slots.state.done

    def more(carry):
        i, s, _ = carry
        finished = jnp.any(s.done & ~was_done)
        return (i < chunk_size) & ~jnp.all(s.done) & ~(waiting & finished)

    def body(carry):
        i, s, outputs = carry
        s, outputs = step.step(s, outputs)
        return i + 1, s, outputs

    steps, s, outputs = jax.lax.while_loop(more, body, (jnp.asarray(0, jnp.int32), slots.state, slots.outputs))
    return slots._replace(state=s, outputs=outputs), steps


_STATIC_EMPTY = ("slots", "max_new_tokens", "cache_size", "prompt_len", "top_logprobs", "prompt_logprobs",
                 "return_stats", "rows")
_STATIC_ADMIT = ("bucketed", "n", "max_new_tokens", "cache_size", "top_logprobs", "prompt_logprobs", "sample_fn", "return_stats")
_STATIC_CHUNK = ("chunk_size", "sample_fn", "top_logprobs", "return_stats")


@functools.lru_cache(maxsize=None)
def _programs(static_model: bool):
    """The three jitted programs; the model is a static argument when it is not a pytree."""
    model_arg = (0,) if static_model else ()
    empty = jax.jit(_empty, static_argnums=model_arg, static_argnames=_STATIC_EMPTY)
    admit = jax.jit(_admit, static_argnums=model_arg, static_argnames=_STATIC_ADMIT, donate_argnums=(1,))
    chunk = jax.jit(_chunk, static_argnums=model_arg, static_argnames=_STATIC_CHUNK, donate_argnums=(1,))
    return empty, admit, chunk


# ----------------------------------------------------------------------------- host loop


def _prepare(model, prompt_tokens, prompt_lengths, keys, *, slots, max_new_tokens, sampler, stop_ids, pad_id,
             cache_size, n, top_logprobs, prompt_logprobs, chunk_size, fn, memory_limit=None):
    prompts, sampling, limit = core.prepare_inputs(
        model, prompt_tokens, prompt_lengths, keys, max_new_tokens=max_new_tokens, sampler=sampler,
        stop_ids=stop_ids, pad_id=pad_id, cache_size=cache_size, n=n, top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs, fn=fn)
    slots = core.positive_int("slots", slots)
    chunk_size = core.positive_int("chunk_size", chunk_size)
    rows = sampling.keys.shape[0]
    core.check_memory(model, fn=fn, max_new_tokens=prompts.max_new_tokens, rows=min(slots, rows),
                      cache_size=prompts.cache_size, width=prompts.max_new_tokens + chunk_size,
                      top_logprobs=sampling.top_logprobs, prompt_rows=min(slots, rows),
                      prompt_len=int(prompts.tokens.shape[1]), prompt_logprobs=sampling.prompt_logprobs,
                      memory_limit=memory_limit)
    batch_leading = core.batch_leading_cache(model, 1, min(slots, rows), prompts.cache_size)
    if sampling.prompt_logprobs and not batch_leading:
        raise ValueError(f"{fn}: prompt_logprobs=True refills a slot by copying a prefilled cache's rows: "
                         f"{type(model).__name__}'s cache needs every leaf to lead with the batch axis")
    if not callable(getattr(model, "prefill_into", None)) and not batch_leading:
        raise ValueError(f"{fn}: refilling a slot writes a prefilled cache into that slot's rows: "
                         f"{type(model).__name__} needs prefill_into(tokens, lengths, rows, cache), or a cache "
                         f"whose every leaf leads with the batch axis")
    return prompts, sampling, limit, min(slots, rows), chunk_size, batch_leading


def generate_many_stream(model: LanguageModel, prompt_tokens: Any, prompt_lengths: Any, keys: Any, *, slots: int,
                         max_new_tokens: Any, sampler: Chain | None = None, stop_ids: Sequence[int] = (),
                         pad_id: int = 0, cache_size: int | None = None, n: int = 1, top_logprobs: int = 0,
                         prompt_logprobs: bool = False, sample_fn: Callable = sample_step,
                         return_stats: bool = False, chunk_size: int = CHUNK,
                         memory_limit: float | None = None) -> "ManyStream":
    """`generate_many`, yielding each row as soon as it finishes (a `Completion`, host arrays).

    Rows come in the order they finish (``Completion.index`` says which row); the tokens
    and log-probs of each are `generate`'s for that row. Use it to write a data set to
    disk as it goes. Arguments as `generate_many`. The iterator counts its work as it goes
    (``.steps``: decode steps run, ``.chunks``: host round trips).

    Example:
      >>> import jax, jax.numpy as jnp, jaxsample as js
      >>> from models import DecoderLM, preset
      >>> lm = DecoderLM.random(preset("tiny"), jax.random.key(0))
      >>> prompts = jnp.array([[256, 72, 105], [256, 72, 0]])
      >>> done = js.generate_many_stream(lm, prompts, jnp.array([3, 2]), jax.random.split(jax.random.key(1), 2),
      ...                                slots=1, max_new_tokens=4)
      >>> sorted(c.index for c in done)
      [0, 1]
    """
    prompts, sampling, limit, n_slots, chunk_size, bucketed = _prepare(
        model, prompt_tokens, prompt_lengths, keys, slots=slots, max_new_tokens=max_new_tokens, sampler=sampler,
        stop_ids=stop_ids, pad_id=pad_id, cache_size=cache_size, n=n, top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs, chunk_size=chunk_size, fn="generate_many", memory_limit=memory_limit)
    return ManyStream(lambda stream: _schedule(stream, model, prompts, sampling, limit, n_slots, chunk_size,
                                               sample_fn, bool(return_stats), bucketed))


class ManyStream:
    """The iterator `generate_many_stream` returns: `Completion`s as rows finish.

    Attributes (updated as it runs):
      steps: decode steps run so far (every slot advances once a step).
      chunks: chunks run so far (one device -> host transfer each).
    """

    def __init__(self, schedule):
        self.steps = 0
        self.chunks = 0
        self._rows = schedule(self)

    def __iter__(self) -> "ManyStream":
        return self

    def __next__(self) -> Completion:
        return next(self._rows)


def _schedule(stream, model, prompts, sampling, limit, n_slots, chunk_size, sample_fn, return_stats, bucketed):
    empty, admit, chunk = _programs(not core.is_pytree(model))
    rows = sampling.keys.shape[0]
    n, big_n = sampling.n, prompts.max_new_tokens
    common = dict(max_new_tokens=big_n, cache_size=prompts.cache_size, top_logprobs=sampling.top_logprobs,
                  prompt_logprobs=sampling.prompt_logprobs, return_stats=return_stats)
    slots, slot_sampler = empty(model, sampling.sampler, sampling.keys, prompts.pad_id, slots=n_slots,
                                prompt_len=prompts.tokens.shape[1], rows=rows, **common)
    queue = collections.deque(range(rows))
    widths = prompt_widths(prompts.tokens.shape[1])
    width_of = np.searchsorted(np.asarray(widths), np.asarray(prompts.lengths))  # each prompt's width index
    owner = np.full((n_slots,), -1, np.int64)  # the request each slot runs (-1: free)

    def fill(slots, slot_sampler):
        for s in np.flatnonzero(owner < 0):
            if not queue:
                break
            owner[s] = queue.popleft()
            slots, slot_sampler = admit(model, slots, slot_sampler, sampling.sampler, prompts.tokens, prompts.lengths,
                                        sampling.keys, limit, prompts.stops, prompts.pad_id,
                                        jnp.asarray(owner[s], jnp.int32), jnp.asarray(s, jnp.int32),
                                        jnp.asarray(width_of[owner[s] // n], jnp.int32), bucketed=bucketed, n=n,
                                        sample_fn=sample_fn, **common)
        return slots, slot_sampler

    slots, slot_sampler = fill(slots, slot_sampler)
    while np.any(owner >= 0):
        slots, steps = chunk(model, slots, slot_sampler, prompts.stops, prompts.pad_id, jnp.asarray(bool(queue)),
                             chunk_size=chunk_size, sample_fn=sample_fn, top_logprobs=sampling.top_logprobs,
                             return_stats=return_stats)
        host = jax.device_get(_readback(slots, steps, return_stats))  # the one round trip of the chunk
        stream.steps += int(host["steps"])
        stream.chunks += 1
        for s in np.flatnonzero((owner >= 0) & host["done"]):
            yield _completion(host, s, int(owner[s]), n)
            owner[s] = -1
        slots, slot_sampler = fill(slots, slot_sampler)


def _readback(slots: _Slots, steps: Array, return_stats: bool) -> dict:
    s = slots.state
    out = dict(steps=steps, done=s.done, lengths=s.lengths, finish=s.finish, outputs=slots.outputs,
               prompt_logprobs=slots.prompt_logprobs)
    if return_stats:
        out["sampler_state"] = s.sampler_state
    return out


def _completion(host: dict, s: int, r: int, n: int) -> Completion:
    o = host["outputs"]
    row = lambda x: None if x is None else np.asarray(x[s])
    stats = None
    if "sampler_state" in host:
        stats = GenerateStats(row(o.entropy), row(o.num_kept), jax.tree.map(lambda x: np.asarray(x[s]),
                                                                            host["sampler_state"]))
    return Completion(r, r // n, int(host["lengths"][s]), row(o.tokens), row(o.logprobs_raw),
                      row(o.logprobs_processed), int(host["finish"][s]), row(o.top_token_ids), row(o.top_logprobs),
                      row(host["prompt_logprobs"]), stats)


def generate_many(model: LanguageModel, prompt_tokens: Any, prompt_lengths: Any, keys: Any, *, slots: int,
                  max_new_tokens: Any, sampler: Chain | None = None, stop_ids: Sequence[int] = (), pad_id: int = 0,
                  cache_size: int | None = None, n: int = 1, top_logprobs: int = 0, prompt_logprobs: bool = False,
                  sample_fn: Callable = sample_step, return_stats: bool = False,
                  chunk_size: int = CHUNK, memory_limit: float | None = None) -> GenerateOutput:
    """`generate` for any number of prompts, decoding at most `slots` rows at a time.

    When a row finishes, its slot takes the next prompt (prefilled into that slot's cache
    rows, at its own positions, its sampler state initialised from its own prompt)
    without waiting for the others (continuous batching). The output is `generate`'s for
    all the prompts at once, in input order: the same tokens (a row's randomness depends
    only on its key and generated index), log-probs to float32 rounding (XLA rounds a
    row differently with the batch shape; docs/engine.md).

    Args:
      model: a `LanguageModel`. When every cache leaf leads with the batch axis and the
        prompts are padded past 16 tokens, a refill prefills a fresh cache at its prompt's
        width bucket and copies its rows into the slot; otherwise it uses the model's
        optional ``prefill_into(tokens, lengths, rows, cache)`` at the padded width (with
        ``prompt_logprobs``, which ``prefill_into`` does not give, the cache must lead
        with the batch axis).
      prompt_tokens, prompt_lengths, keys, sampler, stop_ids, pad_id, cache_size, n,
        top_logprobs, prompt_logprobs, sample_fn, return_stats: as `generate` (per-row
        sampler values have one entry per output row, B * n).
      slots: rows decoded at a time, static (the decode batch).
      max_new_tokens: an int N, or an int array [B] of per-prompt limits (its maximum is
        the static N: the output width).
      chunk_size: decode steps between host round trips at most, static (a chunk ends
        early when a row finishes while prompts wait for a slot).
      memory_limit: as in `generate`, for the `slots` decoding rows.

    Returns:
      A `GenerateOutput` for the B * n rows, as `generate`'s.

    Example:
      >>> import jax, jax.numpy as jnp, jaxsample as js
      >>> from models import DecoderLM, preset
      >>> lm = DecoderLM.random(preset("tiny"), jax.random.key(0))
      >>> prompts = jnp.array([[256, 72, 105], [256, 72, 0], [256, 105, 0]])
      >>> keys = jax.random.split(jax.random.key(1), 3)
      >>> out = js.generate_many(lm, prompts, jnp.array([3, 2, 2]), keys, slots=2, max_new_tokens=5,
      ...                        sampler=js.default_chain(temperature=0.8))
      >>> bool((out.tokens == js.generate(lm, prompts, jnp.array([3, 2, 2]), keys, max_new_tokens=5,
      ...                                 sampler=js.default_chain(temperature=0.8)).tokens).all())
      True
    """
    prompts, sampling, limit, n_slots, chunk_size, bucketed = _prepare(
        model, prompt_tokens, prompt_lengths, keys, slots=slots, max_new_tokens=max_new_tokens, sampler=sampler,
        stop_ids=stop_ids, pad_id=pad_id, cache_size=cache_size, n=n, top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs, chunk_size=chunk_size, fn="generate_many", memory_limit=memory_limit)
    stream = ManyStream(lambda stream: _schedule(stream, model, prompts, sampling, limit, n_slots, chunk_size,
                                                 sample_fn, bool(return_stats), bucketed))
    done = sorted(stream, key=lambda c: c.index)
    stack = lambda field: None if getattr(done[0], field) is None else jnp.asarray(
        np.stack([getattr(c, field) for c in done]))
    prompt_lp = None
    if sampling.prompt_logprobs:
        prompt_lp = jnp.asarray(np.stack([c.prompt_logprobs for c in done[::sampling.n]]))
    stats = None
    if return_stats:
        stats = GenerateStats(jnp.asarray(np.stack([c.stats.entropy for c in done])),
                              jnp.asarray(np.stack([c.stats.num_kept for c in done])),
                              jax.tree.map(lambda *x: jnp.asarray(np.stack(x)), *[c.stats.final_state for c in done]))
    return GenerateOutput(stack("tokens"), jnp.asarray([c.length for c in done], jnp.int32),
                          stack("logprobs_raw"), stack("logprobs_processed"),
                          jnp.asarray([c.finish_reason for c in done], jnp.int32), stack("top_token_ids"),
                          stack("top_logprobs"), prompt_lp, stats)
