"""Continuous batching: many prompts through a fixed number of decode slots.

`generate_many` decodes at most `slots` rows at a time. When a row finishes, its slot
takes the next prompt at once, inside the same jitted loop, without waiting for the
others and without a trip to the host:

    device, one chunk (`_chunk`, a `lax.while_loop` of up to `chunk_size` steps):
      with model.decode_refill (`_admit_and_step`; every `models` decoder):
        admit + step: the next request into a free slot (sampler state from its own
                      prompt, generated index 0) and one decode step of every slot, in
                      ONE model pass (`decode_refill`: the step's tokens and the prompt at
                      its prefill width read the weights once); the pick samples the
                      new row's first token with the others' next ones
      without it (or with prompt_logprobs; `_fill` + the shared `DecodeStep`):
        fill:         admit the next request into every free slot (`_admit`: a prefill
                      at the prompt's width bucket copied into the slot's cache rows,
                      its first token), then one decode step of every slot
      then harvest:   move every finished row into the chunk's finished-rows buffer
                      (F = 3 * slots rows at most; the chunk ends before it could
                      overflow) and free its slot
    host: dispatch chunk k + 1, then read chunk k's finished rows back (the one
          device -> host transfer of a chunk, overlapped with chunk k + 1) and hand them out

Requests are admitted longest limit first (per-row `max_new_tokens`; equal limits in
input order), by a device counter over that order, so the host supplies nothing between
chunks; it stops once a chunk reports every request done. Admitting the longest first
shortens the tail where the last rows run in a batch of idle slots (on the engine
benchmark 228 -> 205 steps for 8 slots with prefills before the step, the ideal).

Every slot samples with `generate`'s own pick (:meth:`jaxsample._decoding.loop.DecodeStep.pick`:
the sampler and the one emit rule) at its own generated index and position, with its
request's key, sampler values and limit, so a row's tokens are those `generate` gives
it, whatever the schedule: its
randomness depends only on its key and generated index, and the model's rows are
independent (attention masks every other position exactly). Its logits agree with
`generate`'s to float32 rounding, not bit for bit: XLA rounds a matmul row differently
with the number of rows (docs/engine.md).

A refill prefills its prompt at the first of its prefill widths (``prefill_widths``,
by default `prompt_widths(P)`) that holds it (one model pass per width in the program,
only the chosen one runs: a 0-or-1-trip `lax.while_loop` each with ``decode_refill``,
which updates the slots' cache in place, a `lax.switch` on a fresh cache without), so a
short prompt in a batch padded for a long one costs what its own length needs. Shapes
are fixed by (slots, P, N): admitting a new prompt, a new chunk or a new call with
prompts of the same padded shape never recompiles (two programs: the empty slots and the
chunk; ``prefill_widths`` is static).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample import _validation as _val
from jaxsample._decoding import core
from jaxsample._decoding.core import DecodeState, LanguageModel, Outputs
from jaxsample._decoding.generate import GenerateOutput, GenerateStats
from jaxsample._decoding.loop import DecodeStep, initial_state
from jaxsample._processors.base import Chain, init_state, put_rows, take_rows
from jaxsample._step.step import sample_step

__all__ = ["Completion", "ManyStream", "generate_many", "generate_many_stream"]

Array = jax.Array

#: Default decode steps per chunk: the steps between host round trips at most.
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


class _Requests(NamedTuple):
    """Every request's inputs, the same for every chunk of a call (R output rows, B prompts)."""

    sampler: Chain  #: the sampler of all R rows
    tokens: Array  #: int32 [B, P]
    lengths: Array  #: int32 [B]
    keys: Array  #: typed keys [R]
    limit: Array  #: int32 [R]: each row's max_new_tokens
    stops: Array  #: int32 [stops]
    pad_id: Array  #: int32 []
    order: Array  #: int32 [R]: the rows in the order they are admitted


class _Slots(NamedTuple):
    """The device state of the S slots (donated to every chunk: updated in place)."""

    state: DecodeState  #: [S] rows; a free slot is done
    outputs: Outputs  #: [S, N]: the current request of each slot, at its generated indices
    keys: Array  #: typed keys [S]
    limit: Array  #: int32 [S]
    prompt_logprobs: Array | None  #: float32 [S, P]
    sampler: Chain  #: the sampler of the slots' requests (their per-row values)
    owner: Array  #: int32 [S]: the request (output row) each slot runs, -1 when free
    next: Array  #: int32 []: how many requests were admitted (the next is ``order[next]``)


class _Finished(NamedTuple):
    """The rows that finished during one chunk, in the order they finished (F rows at most)."""

    request: Array  #: int32 [F]: the output row of each, -1 past ``count``
    lengths: Array  #: int32 [F]
    finish: Array  #: int32 [F]
    outputs: Outputs  #: [F, N]
    prompt_logprobs: Array | None  #: float32 [F, P] with prompt_logprobs
    sampler_state: Any  #: [F, ...] with return_stats, else None
    count: Array  #: int32 []


@dataclasses.dataclass(frozen=True)
class _Config:
    """The static shape and options of a call (one compiled program per distinct config)."""

    slots: int  #: S
    rows: int  #: R = B * n
    n: int
    max_new_tokens: int  #: N, the output width
    prompt_len: int  #: P
    cache_size: int
    chunk_size: int
    top_logprobs: int
    prompt_logprobs: bool
    return_stats: bool
    sample_fn: Callable
    widths: tuple[int, ...]  #: the prefill widths of a refill, ascending, P last ((P,) without buckets)
    decode_refill: bool = False  #: refills run in the decode step's pass (``model.decode_refill``)

    @property
    def finished_rows(self) -> int:
        """F, the rows a chunk can hand back: its refills stop at 2S finished rows, and one
        step finishes S at most, so a chunk steps while at most S rows have finished."""
        return 3 * self.slots


# ----------------------------------------------------------------------------- programs


def prompt_widths(prompt_len: int) -> tuple[int, ...]:
    """The prompt widths a refill prefills at: the powers of two from 16 and the midpoints
    between them (16, 24, 32, 48, 64, 96, ...: each 4/3 or 3/2 of the one before), those
    at least ``prompt_len / 32`` and below ``prompt_len``, then ``prompt_len`` itself.

    A refill prefills its prompt only up to the first width that holds it, so a short
    prompt in a batch padded for a long one costs about what its own length needs (less
    than 3/2 of it, past the smallest width). Each width is a branch of the chunk program
    (compile time)."""
    widths, w = [prompt_len], 16
    while w < prompt_len:
        if 32 * w >= prompt_len:
            widths.append(w)
        w = w * 3 // 2 if w & (w - 1) == 0 else w * 4 // 3  # a power of two -> its midpoint -> the next
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


def prefill_widths_for(prefill_widths: Sequence[int] | None, prompt_len: int) -> tuple[int, ...]:
    """The prefill widths of a call with prompts padded to ``prompt_len`` (P): those of
    ``prefill_widths`` below P, ascending, then P (None: `prompt_widths(P)`).

    Raises:
      ValueError: ``prefill_widths`` is not a sequence, or one of its widths is not an int
        >= 1, naming the value.
    """
    if prefill_widths is None:
        return prompt_widths(prompt_len)
    if isinstance(prefill_widths, np.ndarray) and prefill_widths.ndim == 1:
        prefill_widths = prefill_widths.tolist()
    if isinstance(prefill_widths, (str, bytes)) or not isinstance(prefill_widths, Sequence):
        raise ValueError(f"generate_many: prefill_widths must be a sequence of ints >= 1 (or None: the default "
                         f"widths), got {prefill_widths!r}")
    widths = {_val.check_int(f"prefill_widths[{i}]", w, fn="generate_many") for i, w in enumerate(prefill_widths)}
    return tuple(sorted(w for w in widths if w < prompt_len)) + (prompt_len,)


def _width_index(widths: tuple[int, ...], lengths: Array) -> Array:
    """The index of the first of ``widths`` (ascending, P last) that holds every prompt of ``lengths``."""
    return jnp.minimum(jnp.searchsorted(jnp.asarray(widths), jnp.max(lengths)), len(widths) - 1)


def _prefill_bucketed(model, tokens, lengths, rows, cache, cache_size, prompt_logprobs, widths):
    """`_prefill_rows` of G prompts [G, P], at the first of ``widths`` (ascending, P last)
    that holds the longest (a traced choice: one program holds every width, only the
    chosen one runs).

    A bucketed refill prefills a fresh cache of G rows inside the chosen branch and copies
    its rows into ``cache`` after it, so the slots' cache never passes through the
    conditional (XLA would copy it whole). It needs a cache whose leaves lead with the
    batch axis; without one ``widths`` is (P,) and the refill runs at width P."""
    p = tokens.shape[1]
    if len(widths) == 1:
        return _prefill_rows(model, tokens, lengths, rows, cache, cache_size, prompt_logprobs)

    def at(w):
        def run():
            logits, fresh, prompt_lp = core.prefill(model, tokens[:, :w], lengths, cache_size, prompt_logprobs)
            if prompt_lp is not None:  # positions past the prompt's width are padding: 0
                prompt_lp = jnp.pad(prompt_lp, ((0, 0), (0, p - w)))
            return logits, fresh, prompt_lp
        return run

    logits, fresh, prompt_lp = jax.lax.switch(_width_index(widths, lengths), [at(w) for w in widths])
    return logits, _copy_rows(cache, fresh, rows), prompt_lp


def _empty(model, req: _Requests, cfg: _Config) -> _Slots:
    """Every slot free (done), with the sampler state of row 0 as a placeholder."""
    size = cfg.slots
    cache = model.init_cache(size, cfg.cache_size)
    index = jnp.zeros((size,), jnp.int32)
    tokens = jnp.zeros((size, cfg.prompt_len), jnp.int32)
    lengths = jnp.ones((size,), jnp.int32)
    sampler = take_rows(req.sampler, index, cfg.rows)
    state = init_state(sampler, tokens, lengths, model.vocab_size, max_new_tokens=cfg.max_new_tokens)
    s = initial_state(cache, state, lengths, req.pad_id)._replace(done=jnp.ones((size,), bool))
    outputs = Outputs.empty(size, cfg.max_new_tokens, req.pad_id, top_logprobs=cfg.top_logprobs,
                            return_stats=cfg.return_stats)
    plp = jnp.zeros((size, cfg.prompt_len), jnp.float32) if cfg.prompt_logprobs else None
    return _Slots(s, outputs, req.keys[index], jnp.zeros((size,), jnp.int32), plp, sampler,
                  jnp.full((size,), -1, jnp.int32), jnp.asarray(0, jnp.int32))


def _admit(model, slots: _Slots, req: _Requests, slot: Array, cfg: _Config) -> _Slots:
    """Request ``req.order[slots.next]`` into slot ``slot`` (traced ints): its prefill at its width
    bucket, its sampler state from its own prompt, its generated index 0."""
    r = jnp.reshape(req.order[slots.next], (1,))
    at = jnp.reshape(slot, (1,))
    tokens = jnp.take(req.tokens, r // cfg.n, axis=0)  # [1, P]
    lengths = jnp.take(req.lengths, r // cfg.n, axis=0)  # [1]
    row_sampler = take_rows(req.sampler, r, cfg.rows)
    logits, cache, prompt_lp = _prefill_bucketed(model, tokens, lengths, at, slots.state.cache, cfg.cache_size,
                                                 cfg.prompt_logprobs, cfg.widths)
    state = init_state(row_sampler, tokens, lengths, model.vocab_size, max_new_tokens=cfg.max_new_tokens)
    step = DecodeStep(model, row_sampler, req.keys[r], req.stops, req.pad_id, req.limit[r], cfg.sample_fn,
                      cfg.top_logprobs, cfg.return_stats)
    s, out = step.pick(logits, initial_state((), state, lengths, req.pad_id),
                       Outputs.empty(1, cfg.max_new_tokens, req.pad_id, top_logprobs=cfg.top_logprobs,
                                     return_stats=cfg.return_stats))
    seated = _seat(slots._replace(state=slots.state._replace(cache=())), req, r, at, s._replace(cache=()), out,
                   prompt_lp, row_sampler, cfg)
    return seated._replace(state=seated.state._replace(cache=cache))


def _seat(slots: _Slots, req: _Requests, r: Array, at: Array, state: DecodeState, outputs: Outputs,
          prompt_lp: Array | None, row_sampler: Chain, cfg: _Config) -> _Slots:
    """``slots`` (its state without the cache) with request ``r`` [1] in slot ``at`` [1]: its
    carry ``state`` and ``outputs`` (1 row each), key, limit, prompt log-probs, sampler
    values and owner; one more request admitted."""
    put = lambda dst, src: dst.at[at].set(src.astype(dst.dtype), mode="drop")
    return _Slots(jax.tree.map(put, slots.state, state), jax.tree.map(put, slots.outputs, outputs),
                  put(slots.keys, req.keys[r]), put(slots.limit, req.limit[r]),
                  None if prompt_lp is None else put(slots.prompt_logprobs, prompt_lp),
                  put_rows(slots.sampler, at, row_sampler, cfg.slots), put(slots.owner, r), slots.next + 1)


def _harvest(slots: _Slots, fin: _Finished, cfg: _Config) -> tuple[_Slots, _Finished]:
    """Moves every finished row (a done slot with a request) into ``fin`` and frees its slot.

    ``fin`` always has room: a chunk steps only while S rows of room are left, and admits
    a request (whose row may finish at its first token) only while one is."""
    s = slots.state
    finished = (slots.owner >= 0) & s.done  # [S]
    dest = jnp.where(finished, fin.count + jnp.cumsum(finished) - 1, cfg.finished_rows)  # F: dropped
    put = lambda buf, value: buf.at[dest].set(value.astype(buf.dtype), mode="drop")
    maybe = lambda buf, value: None if buf is None else jax.tree.map(put, buf, value)
    fin = _Finished(put(fin.request, slots.owner), put(fin.lengths, s.lengths), put(fin.finish, s.finish),
                    jax.tree.map(put, fin.outputs, slots.outputs), maybe(fin.prompt_logprobs, slots.prompt_logprobs),
                    maybe(fin.sampler_state, s.sampler_state), fin.count + jnp.sum(finished, dtype=jnp.int32))
    return slots._replace(owner=jnp.where(finished, -1, slots.owner)), fin


def _fill(model, slots: _Slots, fin: _Finished, req: _Requests, cfg: _Config) -> tuple[_Slots, _Finished]:
    """Admits the next requests into free slots, one at a time, while both last (a row that
    finishes at its first token is harvested at once and frees its slot again)."""
    def can(carry):
        slots, fin = carry
        return jnp.any(slots.owner < 0) & (slots.next < cfg.rows) & (fin.count < 2 * cfg.slots)

    def admit_one(carry):
        slots, fin = carry
        slots = _admit(model, slots, req, jnp.argmax(slots.owner < 0), cfg)
        return _harvest(slots, fin, cfg)

    return jax.lax.while_loop(can, admit_one, (slots, fin))


def _run_if(pred: Array, fn: Callable, carry):
    """``fn(carry)`` where ``pred`` holds, else ``carry``: a `lax.while_loop` of 0 or 1 trips,
    whose carry (the slots' cache) XLA updates in place, where a `lax.cond` would copy it."""
    return jax.lax.while_loop(lambda c: c[0], lambda c: (jnp.asarray(False), fn(c[1])), (pred, carry))[1]


def _admit_and_step(model, slots: _Slots, fin: _Finished, req: _Requests,
                    cfg: _Config) -> tuple[_Slots, _Finished, Array]:
    """One decode step of every slot that also admits the next request into a free slot,
    in one pass of the model (``model.decode_refill``: its prompt at its prefill width and
    the step's tokens read the weights once), then the harvest.

    The admitted row's sampler state comes from its own prompt and its generated index is
    0: the step's pick samples its first token from the prompt's logits, the other rows'
    next tokens from theirs. Rows that are done (free slots, the admitted one) decode at
    position -1, which writes nothing into their cache rows (every key a query of a slot
    reads was written by that slot's current occupant: its prompt's pass, then its
    steps). At most one request is admitted a step; one that waits for the next step
    leaves its slot idle for that step. Returns (slots, fin,
    whether any slot was live in the step)."""
    free = slots.owner < 0
    admit = jnp.any(free) & (slots.next < cfg.rows) & (fin.count < 2 * cfg.slots)
    at = jnp.where(admit, jnp.argmax(free), cfg.slots).reshape(1)  # S (no slot): nothing is admitted
    r = jnp.reshape(req.order[jnp.minimum(slots.next, cfg.rows - 1)], (1,))
    tokens = jnp.take(req.tokens, r // cfg.n, axis=0)  # [1, P]
    lengths = jnp.take(req.lengths, r // cfg.n, axis=0)  # [1]

    def take_slot(slots: _Slots) -> _Slots:  # request r into slot `at` (run only when admitting)
        row_sampler = take_rows(req.sampler, r, cfg.rows)
        state = init_state(row_sampler, tokens, lengths, model.vocab_size, max_new_tokens=cfg.max_new_tokens)
        empty = Outputs.empty(1, cfg.max_new_tokens, req.pad_id, top_logprobs=cfg.top_logprobs,
                              return_stats=cfg.return_stats)
        return _seat(slots, req, r, at, initial_state((), state, lengths, req.pad_id), empty, None, row_sampler, cfg)

    cache = slots.state.cache
    slots = _run_if(admit, take_slot, slots._replace(state=slots.state._replace(cache=())))
    s = slots.state._replace(cache=cache)
    positions = jnp.where(s.done | (jnp.arange(cfg.slots) == at[0]), -1, s.position)

    # one model pass: decode + the prompt at the first width that holds it, or decode alone
    branch = jnp.where(admit, _width_index(cfg.widths, lengths), len(cfg.widths))
    carry = (jnp.zeros((cfg.slots, model.vocab_size), jnp.float32), s.cache)
    for j, w in enumerate(cfg.widths):
        def refill(c, w=w):
            logits, first, cache = model.decode_refill(s.token, positions, tokens[:, :w], lengths, at, c[1])
            logits = jnp.where((jnp.arange(cfg.slots) == at[0])[:, None], first, logits)
            return logits.astype(jnp.float32), cache
        carry = _run_if(branch == j, refill, carry)

    def decode(c):
        logits, cache = model.decode(s.token, positions, c[1])
        return logits.astype(jnp.float32), cache
    carry = _run_if(branch == len(cfg.widths), decode, carry)
    logits, cache = carry

    step = DecodeStep(model, slots.sampler, slots.keys, req.stops, req.pad_id, slots.limit, cfg.sample_fn,
                      cfg.top_logprobs, cfg.return_stats)
    s, outputs = step.pick(logits, s._replace(cache=cache), slots.outputs)
    return *_harvest(slots._replace(state=s, outputs=outputs), fin, cfg), jnp.any(slots.owner >= 0)


def _chunk(model, slots: _Slots, req: _Requests, *, cfg: _Config) -> tuple[_Slots, _Finished, Array, Array]:
    """Up to ``cfg.chunk_size`` decode steps of every slot, refilling a slot as soon as its
    row finishes: (slots, the rows finished, steps run, whether every request is done).

    Each iteration is one step: with ``decode_refill``, admit at most one request and
    step every slot in one model pass (`_admit_and_step`); otherwise fill the free slots,
    then step (the refill is traced once: one copy of the prefill branches in the
    program). The chunk stops early when no request is left to run, or once more than S
    rows finished in it: refills stop at 2S finished rows, a step finishes S at most, so
    the buffer of F = 3S rows never overflows."""
    f = cfg.finished_rows
    empty = Outputs.empty(f, cfg.max_new_tokens, req.pad_id, top_logprobs=cfg.top_logprobs,
                          return_stats=cfg.return_stats)
    zeros = lambda x: jnp.zeros((f,) + x.shape[1:], x.dtype)
    fin = _Finished(jnp.full((f,), -1, jnp.int32), jnp.zeros((f,), jnp.int32), jnp.zeros((f,), jnp.int32), empty,
                    None if slots.prompt_logprobs is None else zeros(slots.prompt_logprobs),
                    jax.tree.map(zeros, slots.state.sampler_state) if cfg.return_stats else None,
                    jnp.asarray(0, jnp.int32))

    def more(carry):
        i, _, slots, fin = carry
        return ((i < cfg.chunk_size) & (jnp.any(slots.owner >= 0) | (slots.next < cfg.rows))
                & (fin.count <= cfg.slots))

    def body(carry):
        i, steps, slots, fin = carry
        if cfg.decode_refill:
            slots, fin, live = _admit_and_step(model, slots, fin, req, cfg)
            return i + 1, steps + live.astype(jnp.int32), slots, fin
        slots, fin = _fill(model, slots, fin, req, cfg)
        step = DecodeStep(model, slots.sampler, slots.keys, req.stops, req.pad_id, slots.limit, cfg.sample_fn,
                          cfg.top_logprobs, cfg.return_stats)
        live = jnp.any(slots.owner >= 0)  # False only when every refill finished at its first token
        s, outputs = step.step(slots.state, slots.outputs)
        slots, fin = _harvest(slots._replace(state=s, outputs=outputs), fin, cfg)
        return i + 1, steps + live.astype(jnp.int32), slots, fin

    zero = jnp.asarray(0, jnp.int32)
    _, steps, slots, fin = jax.lax.while_loop(more, body, (zero, zero, slots, fin))
    all_done = (slots.next >= cfg.rows) & jnp.all(slots.owner < 0)
    return slots, fin, steps, all_done


@functools.lru_cache(maxsize=None)
def _programs(static_model: bool):
    """The two jitted programs (empty slots, one chunk); the model is a static argument
    when it is not a pytree."""
    model_arg = (0,) if static_model else ()
    empty = jax.jit(_empty, static_argnums=model_arg + (2,))
    chunk = jax.jit(_chunk, static_argnums=model_arg, static_argnames=("cfg",), donate_argnums=(1,))
    return empty, chunk


# ----------------------------------------------------------------------------- host loop


def _finished_bytes(f: int, n: int, p: int, top_logprobs: int, prompt_logprobs: bool, return_stats: bool,
                    sampler_state_bytes: int = 0) -> int:
    """Bytes of a chunk's `_Finished` buffer of ``f`` rows: per token an int32 id and two
    float32 log-probs, top-K ids and log-probs, with stats an entropy and a kept count; the
    prompt's log-probs; with stats each row's sampler state (``sampler_state_bytes``)."""
    per_token = 12 + 8 * top_logprobs + (8 if return_stats else 0)
    state = sampler_state_bytes if return_stats else 0
    return f * (n * per_token + (4 * p if prompt_logprobs else 0) + 12 + state)


def _sampler_state_bytes(sampler: Chain, rows: int, prompt_len: int, vocab_size: int, max_new_tokens: int) -> int:
    """Bytes of one row's sampler state (``init_state`` of row 0, by `jax.eval_shape`)."""
    one = jax.eval_shape(lambda: init_state(take_rows(sampler, jnp.zeros((1,), jnp.int32), rows),
                                            jnp.zeros((1, prompt_len), jnp.int32), jnp.ones((1,), jnp.int32),
                                            vocab_size, max_new_tokens=max_new_tokens))
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(one))


def _prepare(model, prompt_tokens, prompt_lengths, keys, *, slots, max_new_tokens, sampler, stop_ids, pad_id,
             cache_size, n, top_logprobs, prompt_logprobs, chunk_size, sample_fn, return_stats, fn,
             memory_limit=None, prefill_widths=None) -> tuple[Any, Any, Array, _Config]:
    prompts, sampling, limit = core.prepare_inputs(
        model, prompt_tokens, prompt_lengths, keys, max_new_tokens=max_new_tokens, sampler=sampler,
        stop_ids=stop_ids, pad_id=pad_id, cache_size=cache_size, n=n, top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs, fn=fn)
    slots = core.positive_int("slots", slots)
    chunk_size = core.positive_int("chunk_size", chunk_size)
    widths = prefill_widths_for(prefill_widths, int(prompts.tokens.shape[1]))
    rows = sampling.keys.shape[0]
    state_bytes = 0
    if return_stats:
        state_bytes = _sampler_state_bytes(sampling.sampler, rows, int(prompts.tokens.shape[1]), model.vocab_size,
                                           prompts.max_new_tokens)
    finished = _finished_bytes(3 * min(slots, rows), prompts.max_new_tokens, int(prompts.tokens.shape[1]),
                               sampling.top_logprobs, sampling.prompt_logprobs, bool(return_stats), state_bytes)
    core.check_memory(model, fn=fn, max_new_tokens=prompts.max_new_tokens, rows=min(slots, rows),
                      cache_size=prompts.cache_size, width=prompts.max_new_tokens + chunk_size,
                      top_logprobs=sampling.top_logprobs, prompt_rows=min(slots, rows),
                      prompt_len=int(prompts.tokens.shape[1]), prompt_logprobs=sampling.prompt_logprobs,
                      extra_bytes=finished, memory_limit=memory_limit)
    batch_leading = core.batch_leading_cache(model, 1, min(slots, rows), prompts.cache_size)
    merged = callable(getattr(model, "decode_refill", None)) and not sampling.prompt_logprobs
    if sampling.prompt_logprobs and not batch_leading:
        raise ValueError(f"{fn}: prompt_logprobs=True refills a slot by copying a prefilled cache's rows: "
                         f"{type(model).__name__}'s cache needs every leaf to lead with the batch axis")
    if len(widths) > 1 and prefill_widths is not None and not (batch_leading or merged):
        raise ValueError(f"{fn}: prefill_widths={prefill_widths!r} refills at a width by copying a prefilled "
                         f"cache's rows: {type(model).__name__}'s cache needs every leaf to lead with the batch "
                         f"axis (its refills run at the padded width {widths[-1]}: pass prefill_widths=None)")
    if not (merged or callable(getattr(model, "prefill_into", None)) or batch_leading):
        raise ValueError(f"{fn}: refilling a slot writes a prefilled cache into that slot's rows: "
                         f"{type(model).__name__} needs prefill_into(tokens, lengths, rows, cache), or a cache "
                         f"whose every leaf leads with the batch axis")
    cfg = _Config(slots=min(slots, rows), rows=rows, n=sampling.n, max_new_tokens=prompts.max_new_tokens,
                  prompt_len=int(prompts.tokens.shape[1]), cache_size=prompts.cache_size, chunk_size=chunk_size,
                  top_logprobs=sampling.top_logprobs, prompt_logprobs=sampling.prompt_logprobs,
                  return_stats=bool(return_stats), sample_fn=sample_fn,
                  widths=widths if batch_leading or merged else widths[-1:], decode_refill=merged)
    return prompts, sampling, limit, cfg


def generate_many_stream(model: LanguageModel, prompt_tokens: Any, prompt_lengths: Any, keys: Any, *, slots: int,
                         max_new_tokens: Any, sampler: Chain | None = None, stop_ids: Sequence[int] = (),
                         pad_id: int = 0, cache_size: int | None = None, n: int = 1, top_logprobs: int = 0,
                         prompt_logprobs: bool = False, sample_fn: Callable = sample_step,
                         return_stats: bool = False, chunk_size: int = CHUNK,
                         memory_limit: float | None = None,
                         prefill_widths: Sequence[int] | None = None) -> "ManyStream":
    """`generate_many`, yielding each row as soon as it finishes (a `Completion`, host arrays).

    A row is handed out at the end of the chunk of steps it finished in (at most
    ``chunk_size`` steps later). Rows come in the order they finish (``Completion.index``
    says which row); the tokens and log-probs of each are `generate`'s for that row. Use
    it to write a data set to disk as it goes. Arguments as `generate_many`. The iterator
    counts its work as it goes (``.steps``: decode steps run, ``.chunks``: host round trips).

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
    prompts, sampling, limit, cfg = _prepare(
        model, prompt_tokens, prompt_lengths, keys, slots=slots, max_new_tokens=max_new_tokens, sampler=sampler,
        stop_ids=stop_ids, pad_id=pad_id, cache_size=cache_size, n=n, top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs, chunk_size=chunk_size, sample_fn=sample_fn, return_stats=return_stats,
        fn="generate_many", memory_limit=memory_limit, prefill_widths=prefill_widths)
    return ManyStream(lambda stream: _schedule(stream, model, prompts, sampling, limit, cfg))


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


def _requests(prompts, sampling, limit) -> _Requests:
    """The requests of a call, to be admitted longest limit first (ties in input order)."""
    order = jnp.argsort(-limit, stable=True).astype(jnp.int32)
    return _Requests(sampling.sampler, prompts.tokens, prompts.lengths, sampling.keys, limit, prompts.stops,
                     prompts.pad_id, order)


def _schedule(stream, model, prompts, sampling, limit, cfg: _Config):
    """The host loop: dispatch chunk k + 1 before reading chunk k's finished rows back (the
    one device -> host transfer of a chunk), so the host's work overlaps the device's."""
    empty, chunk = _programs(not core.is_pytree(model))
    req = _requests(prompts, sampling, limit)
    pending = chunk(model, empty(model, req, cfg), req, cfg=cfg)
    while True:
        slots, fin, steps, all_done = pending
        pending = chunk(model, slots, req, cfg=cfg)  # dispatched: it runs while this one is read back
        fin, steps, all_done = jax.device_get((fin, steps, all_done))
        stream.steps += int(steps)
        stream.chunks += 1
        for f in range(int(fin.count)):
            yield _completion(fin, f, cfg.n)
        if all_done:
            return


def _completion(fin: _Finished, f: int, n: int) -> Completion:
    o = fin.outputs
    row = lambda x: None if x is None else np.asarray(x[f])
    stats = None
    if fin.sampler_state is not None:
        stats = GenerateStats(row(o.entropy), row(o.num_kept), jax.tree.map(lambda x: np.asarray(x[f]),
                                                                            fin.sampler_state))
    r = int(fin.request[f])
    return Completion(r, r // n, int(fin.lengths[f]), row(o.tokens), row(o.logprobs_raw), row(o.logprobs_processed),
                      int(fin.finish[f]), row(o.top_token_ids), row(o.top_logprobs), row(fin.prompt_logprobs), stats)


def generate_many(model: LanguageModel, prompt_tokens: Any, prompt_lengths: Any, keys: Any, *, slots: int,
                  max_new_tokens: Any, sampler: Chain | None = None, stop_ids: Sequence[int] = (), pad_id: int = 0,
                  cache_size: int | None = None, n: int = 1, top_logprobs: int = 0, prompt_logprobs: bool = False,
                  sample_fn: Callable = sample_step, return_stats: bool = False,
                  chunk_size: int = CHUNK, memory_limit: float | None = None,
                  prefill_widths: Sequence[int] | None = None) -> GenerateOutput:
    """`generate` for any number of prompts, decoding at most `slots` rows at a time.

    When a row finishes, its slot takes the next prompt (prefilled into that slot's cache
    rows, at its own positions, its sampler state initialised from its own prompt)
    without waiting for the others (continuous batching), inside the jitted loop. Rows
    are admitted longest ``max_new_tokens`` first (equal limits in input order), which
    shortens the tail of a run where the last rows decode beside idle slots. The output is `generate`'s for
    all the prompts at once, in input order: the same tokens (a row's randomness depends
    only on its key and generated index), log-probs to float32 rounding (XLA rounds a
    row differently with the batch shape; docs/engine.md).

    Args:
      model: a `LanguageModel`. With the optional ``decode_refill`` (every `models`
        decoder has it) a refill runs in the decode step's model pass, at its prompt's
        width, one admission a step. Without it, or with ``prompt_logprobs``, a refill is
        a prefill before the step: when every cache leaf leads with the batch axis and
        the prompts are padded past 16 tokens, of a fresh cache at its prompt's width
        bucket whose rows are copied into the slot; otherwise the model's optional
        ``prefill_into(tokens, lengths, rows, cache)`` at the padded width (with
        ``prompt_logprobs``, which ``prefill_into`` does not give, the cache must lead
        with the batch axis).
      prompt_tokens, prompt_lengths, keys, sampler, stop_ids, pad_id, cache_size, n,
        top_logprobs, prompt_logprobs, sample_fn, return_stats: as `generate` (per-row
        sampler values have one entry per output row, B * n).
      slots: rows decoded at a time, static (the decode batch).
      max_new_tokens: an int N, or an int array [B] of per-prompt limits (its maximum is
        the static N: the output width).
      chunk_size: decode steps between host round trips at most, static: a finished row
        is handed out at the end of its chunk (a refill never waits for one; a chunk
        ends early once more than ``slots`` rows finished in it, or no request is left).
      memory_limit: as in `generate`, for the `slots` decoding rows.
      prefill_widths: the prompt widths a refill may prefill at, static (as JetStream's
        prefill lengths): a refill runs at the first that holds its prompt, and the padded
        width P is always the last (widths at or above P are not needed; widths below it
        need ``decode_refill`` or a cache whose every leaf leads with the batch axis). Each
        width is a model pass in the chunk program: fewer compile faster, and cost short prompts more
        positions; ``()`` refills every prompt at P. None (the default): `prompt_widths(P)`,
        the powers of two from 16 and the midpoints between them (docs/engine.md).

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
    prompts, sampling, limit, cfg = _prepare(
        model, prompt_tokens, prompt_lengths, keys, slots=slots, max_new_tokens=max_new_tokens, sampler=sampler,
        stop_ids=stop_ids, pad_id=pad_id, cache_size=cache_size, n=n, top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs, chunk_size=chunk_size, sample_fn=sample_fn, return_stats=return_stats,
        fn="generate_many", memory_limit=memory_limit, prefill_widths=prefill_widths)
    stream = ManyStream(lambda stream: _schedule(stream, model, prompts, sampling, limit, cfg))
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
