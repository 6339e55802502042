"""The decode core: one carry, one emit rule, one input preparation (layer 5).

Every decode loop of the library (`generate`, `generate_stream`, `speculative_generate`,
`generate_many`; `beam_search` for its inputs) is built from these pieces:

* :class:`LanguageModel`, the protocol the loops drive (``init_cache``, ``prefill``,
  ``decode``; optionally ``prefill_all``, ``extend``, ``decode_refill`` and ``prefill_into``);
* :func:`prepare_prompts` / :func:`prepare_sampling`: validation and canonical dtypes of
  the inputs, done once on the host before tracing;
* :func:`prefill_samples`: prefill with ``n`` samples per prompt (each prompt once, its
  cache copied to its samples);
* :class:`DecodeState`, the carry of every loop (a pytree of ``[B]`` arrays and the
  model's cache), and :func:`emit`, the one rule that turns a drawn token into output:

      live     = not done (and offered a token this index)
      invalid  = live and token < 0                       -> finish NO_VALID_TOKEN, done
      emitted  = live and token >= 0                      -> lengths += 1
      stopped  = emitted and token in stop_ids            -> finish STOP, done
      full     = emitted and lengths == max_new_tokens[b] -> (finish stays LENGTH), done
      output   = token where emitted, else pad_id

  and :func:`freeze`: a row that was done before a step keeps its sampler state;
* :class:`Outputs`: the per-index output buffers, written row by row at each row's own
  generated index (so rows may advance at different speeds).

A row's generated index is its ``lengths`` entry: a live row has emitted exactly one
token per index before the current one. Its key at index ``i`` is
``fold_in(keys[b], i)`` (see :func:`step_keys`), so a row's tokens depend only on its own
key, prompt and sampler values, never on its batch-mates or the schedule.
"""

from __future__ import annotations

import enum
import inspect
import operator
import os
from typing import Any, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample import _validation as _val
from jaxsample._filters.sampling import entropy
from jaxsample._processors.base import Chain, chain, check_processor
from jaxsample._processors.builtin import Temperature

__all__ = ["LanguageModel", "FinishReason", "DecodeState", "Outputs", "Emission", "emit", "freeze",
           "step_keys", "prepare_prompts", "prepare_sampling", "prepare_inputs", "prefill_samples", "extend", "is_pytree",
           "top_logprobs_of", "step_stats", "MemoryLimitError", "check_memory", "device_memory_bytes"]

Array = jax.Array


class LanguageModel(Protocol):
    """What the decode loops need from a model. Implementations should be pytrees (arrays as
    leaves) or hashable; a hashable non-pytree model is treated as a static argument.

    Optional methods (each with a fallback):

    * ``prefill_all(tokens [B, P], cache) -> (logits [B, P, V], cache)``: logits at every
      prompt position, for ``prompt_logprobs=True`` (no fallback: refused without it).
      Padding is replaced by id 0 before the call; a ``lengths`` keyword, where the
      method has one, receives the prompt lengths [B] (a cache that must not hold the
      padding, such as a sliding-window ring, needs them).
    * ``extend(tokens [B, T], positions [B], cache) -> (logits [B, T, V], cache)``: T
      tokens per row at consecutive positions, for speculative verification (fallback:
      T ``decode`` calls).
    * ``decode_refill(tokens [B], positions [B], prompts [G, W], lengths [G], rows [G],
      cache) -> (logits [B, V], prompt logits [G, V], cache)``: a decode step and G
      prompt prefills into cache rows ``rows`` in one pass (the weights read once), for
      `generate_many`'s slot refills: a decode row at a position outside the cache (-1)
      and a refilled row write nothing of their decode entry; the prompt's logits are
      at its last real token; a refilled row must then decode as a freshly prefilled
      one (every key it reads written by its own prompt or steps). With it the engine
      also calls ``decode`` at position -1 for free slots (nothing may be written). The
      fallback (and the path with ``prompt_logprobs``) is a prefill before the step, below.
    * ``prefill_into(tokens [R, P], lengths [R], rows [R], cache) -> (logits [R, V],
      cache)``: prefill R prompts into the given rows of an existing cache, leaving the
      other rows untouched, for `generate_many`'s slot refills without
      ``decode_refill``. With a cache whose every leaf leads with the batch axis the
      engine does not need it for prompts longer than 16 tokens: it prefills a fresh
      cache of R rows at the prompt's width bucket and copies the rows; otherwise it
      calls ``prefill_into`` at the padded width.
    """

    vocab_size: int

    def init_cache(self, batch_size: int, max_len: int) -> Any:
        """An empty cache for `batch_size` rows of up to `max_len` positions."""

    def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        """Right-padded prompts int32 [B, P] with lengths [B] -> (float logits [B, V] at each
        row's last real token, cache)."""

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        """One token per row, int32 [B] at positions [B] -> (float logits [B, V], cache)."""


class FinishReason(enum.IntEnum):
    """Why a row stopped (the values of `GenerateOutput.finish_reason`)."""

    LENGTH = 0  #: reached max_new_tokens
    STOP = 1  #: emitted one of the stop ids (the stop token is included in the output)
    NO_VALID_TOKEN = 2  #: the sampler's logits had no finite value (a mask emptied the row) or a NaN


# ----------------------------------------------------------------------------- the carry


class DecodeState(NamedTuple):
    """The carry of every decode loop; every field but ``cache`` is ``[B]``.

    Attributes:
      token: int32, the last emitted token (the next ``decode`` input); ``pad_id`` once
        the row is done.
      cache: the model's cache (any pytree).
      sampler_state: the chain's state (``sampler.init(...)``), frozen once a row is done.
      done: bool, the row has finished.
      lengths: int32, generated tokens so far (a stop token counts) = the row's next
        generated index while it is live.
      finish: int32, a `FinishReason` (final once ``done``).
      position: int32, where ``token`` sits in the row's sequence (prompt length +
        lengths - 1 while live; frozen once done).
    """

    token: Array
    cache: Any
    sampler_state: Any
    done: Array
    lengths: Array
    finish: Array
    position: Array


class Emission(NamedTuple):
    """What :func:`emit` decided for one generated index, ``[B]`` each."""

    token: Array  #: int32, the output value (pad_id where nothing was emitted)
    emitted: Array  #: bool, a token was emitted (written at the row's index)
    active: Array  #: bool, the row was live and offered a token (an invalid draw is active)
    done: Array
    lengths: Array
    finish: Array


def emit(token: Array, done: Array, lengths: Array, finish: Array, *, stops: Array, pad_id: Array,
         limit: Array, offered: Array | None = None) -> Emission:
    """The one emit rule (module docstring): a drawn token -> output, lengths, finish, done.

    Args:
      token: int32 [B] drawn tokens (-1: no valid token).
      done, lengths, finish: the rows' state before this index.
      stops: int32 [S] stop ids (-1 entries never match a token).
      pad_id: int32 [] written where nothing is emitted.
      limit: int32 [B] (or []) each row's max_new_tokens.
      offered: bool [B], rows that have a token at this index (default: all); a row not
        offered one is left unchanged (speculative rounds offer 1 .. k + 1 tokens).
    """
    live = ~done if offered is None else ~done & offered
    invalid = live & (token < 0)
    emitted = live & ~invalid
    stopped = emitted & jnp.isin(token, stops)
    lengths = lengths + emitted.astype(jnp.int32)
    full = emitted & (lengths >= limit)
    finish = jnp.where(invalid, FinishReason.NO_VALID_TOKEN, jnp.where(stopped, FinishReason.STOP, finish))
    return Emission(jnp.where(emitted, token, pad_id), emitted, live, done | invalid | stopped | full,
                    lengths, finish.astype(jnp.int32))


def freeze(new: Any, old: Any, done: Array) -> Any:
    """``new`` for live rows, ``old`` for rows in ``done`` (leaves lead with the batch axis)."""
    keep = lambda n, o: jnp.where(done.reshape(done.shape + (1,) * (n.ndim - 1)), o, n)
    return jax.tree.map(keep, new, old)


def step_keys(keys: Array, index: Array) -> Array:
    """Keys [B] and generated indices [B] (or one index) -> ``fold_in(keys[b], index[b])``."""
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), keys.shape)
    return jax.vmap(jax.random.fold_in)(keys, index)


# ----------------------------------------------------------------------------- outputs


class Outputs(NamedTuple):
    """Per-index output buffers ``[B, W, ...]``, written at each row's own generated index.

    ``top_token_ids`` / ``top_logprobs`` ([B, W, K]) are None unless top-N log-probs were
    asked for, ``entropy`` / ``num_kept`` ([B, W]) unless stats were.
    """

    tokens: Array
    logprobs_raw: Array
    logprobs_processed: Array
    top_token_ids: Array | None = None
    top_logprobs: Array | None = None
    entropy: Array | None = None
    num_kept: Array | None = None

    @classmethod
    def empty(cls, batch: int, width: int, pad_id: Array, *, top_logprobs: int = 0,
              return_stats: bool = False) -> "Outputs":
        zeros = jnp.zeros((batch, width), jnp.float32)
        top = (None, None) if not top_logprobs else (
            jnp.full((batch, width, top_logprobs), pad_id, jnp.int32),
            jnp.zeros((batch, width, top_logprobs), jnp.float32))
        stats = (None, None) if not return_stats else (zeros, jnp.zeros((batch, width), jnp.int32))
        return cls(jnp.full((batch, width), pad_id, jnp.int32), zeros, zeros, *top, *stats)

    def write(self, index: Array, e: Emission, raw: Array, processed: Array,
              top: tuple[Array, Array] | None = None, stats: tuple[Array, Array] | None = None) -> "Outputs":
        """Writes index ``index[b]`` of every row: the token and log-probs (and top-N) where
        ``e.emitted``, the stats where ``e.active``; indices outside ``[0, W)`` are dropped.

        An elementwise select over ``[B, W]`` (not a scatter): each row writes only its own
        row, so a batch-partitioned loop needs no communication for it."""
        columns = jnp.arange(self.tokens.shape[1])[None, :]  # [1, W]

        def put(buf, value, mask):
            hit = (columns == index[:, None]) & mask[:, None]  # [B, W]
            value = value.astype(buf.dtype)[:, None]  # [B, 1, ...]
            return jnp.where(hit.reshape(hit.shape + (1,) * (buf.ndim - 2)), value, buf)

        out = self._replace(tokens=put(self.tokens, e.token, e.emitted),
                            logprobs_raw=put(self.logprobs_raw, raw, e.emitted),
                            logprobs_processed=put(self.logprobs_processed, processed, e.emitted))
        if top is not None and self.top_token_ids is not None:
            out = out._replace(top_token_ids=put(self.top_token_ids, top[0], e.emitted),
                               top_logprobs=put(self.top_logprobs, top[1], e.emitted))
        if stats is not None and self.entropy is not None:
            out = out._replace(entropy=put(self.entropy, stats[0], e.active),
                               num_kept=put(self.num_kept, stats[1], e.active))
        return out


def top_logprobs_of(logits: Array, k: int) -> tuple[Array, Array]:
    """The k most likely tokens per row and their raw log-probs: (ids [..., k], logprobs [..., k])."""
    top_lp, top_ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), k)
    return top_ids, top_lp


def step_stats(processed: Array | None) -> tuple[Array, Array]:
    """(entropy float32 [B], kept int32 [B]) of the processed logits [B, V] of one step."""
    if processed is None:
        raise ValueError("return_stats=True needs processed logits: the sample_fn's StepOutput must carry "
                         "processed_logits (jaxsample.sample_step does)")
    kept = jnp.sum(processed > -jnp.inf, axis=-1).astype(jnp.int32)
    return entropy(processed), kept


# ----------------------------------------------------------------------------- preparation


def _as_int(name: str, value: Any) -> int:
    """A Python int in int32 range; bools, floats and strings are refused, not truncated."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be integers, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be integers, got {value!r}") from None
    if not -2**31 <= out < 2**31:
        raise ValueError(f"{name} must fit in int32, got {out}")
    return out


def row_limits(max_new_tokens: Any, batch: int) -> np.ndarray:
    """Per-prompt ``max_new_tokens`` (int array [B], each >= 1) as int32 host values."""
    if isinstance(max_new_tokens, jax.core.Tracer):
        raise ValueError("max_new_tokens: a per-row array must be concrete (its maximum is the static "
                         "output width N)")
    arr = np.asarray(max_new_tokens)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"max_new_tokens: a per-row array must hold integers, got dtype {arr.dtype}")
    if arr.shape != (batch,):
        raise ValueError(f"max_new_tokens: a per-row array must have shape [B] = ({batch},) (one limit per "
                         f"prompt), got {arr.shape}")
    bad = np.flatnonzero(arr < 1)
    if bad.size:
        raise ValueError(f"max_new_tokens[{bad[0]}]={arr[bad[0]]} must be >= 1")
    if arr.max() >= 2**31:
        raise ValueError(f"max_new_tokens: {arr.max()} does not fit in int32")
    return arr.astype(np.int32)


def positive_int(name: str, value: Any) -> int:
    """``value`` as a Python int >= 1; bools, floats and strings are refused."""
    return _val.check_int(name, value)


class Prompts(NamedTuple):
    """Validated prompt inputs (:func:`prepare_prompts`)."""

    tokens: Array  #: int32 [B, P]
    lengths: Array  #: int32 [B]
    stops: Array  #: int32 [max(1, S)] (-1: no stop id)
    pad_id: Array  #: int32 []
    max_new_tokens: int
    cache_size: int
    stop_ids: tuple[int, ...]


def _is_concrete(*xs: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) or (isinstance(x, jax.Array) and not x.is_fully_addressable)
                   for x in xs)


def check_prompts(prompt_tokens, prompt_lengths, max_new_tokens, cache_size, vocab_size, stop_ids) -> None:
    """Shape, dtype and value checks of the prompts (values only when this host sees them)."""
    positive_int("max_new_tokens", max_new_tokens)
    if prompt_tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must have shape [B, P], got {prompt_tokens.shape}")
    b, p = prompt_tokens.shape
    if prompt_lengths.shape != (b,):
        raise ValueError(f"prompt_lengths must have shape [B] = ({b},), got {prompt_lengths.shape}")
    if not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
        raise ValueError(f"prompt_tokens must be integers, got dtype {prompt_tokens.dtype}")
    if not jnp.issubdtype(prompt_lengths.dtype, jnp.integer):
        raise ValueError(f"prompt_lengths must be integers, got dtype {prompt_lengths.dtype}")
    if cache_size < p + max_new_tokens:
        raise ValueError(f"cache_size={cache_size} is smaller than prompt length P={p} + "
                         f"max_new_tokens={max_new_tokens} = {p + max_new_tokens}")
    for s in stop_ids:
        if not 0 <= s < vocab_size:
            raise ValueError(f"stop id {s} is outside the vocabulary [0, {vocab_size})")
    if not _is_concrete(prompt_tokens, prompt_lengths):
        return  # values unknown here (traced, or spread over several hosts): the caller checks them
    lengths = np.asarray(prompt_lengths)
    bad = np.flatnonzero((lengths < 1) | (lengths > p))
    if bad.size:
        raise ValueError(f"prompt_lengths[{bad[0]}]={lengths[bad[0]]} is outside [1, P={p}]")
    tokens = np.asarray(prompt_tokens)
    real = np.arange(p)[None, :] < lengths[:, None]
    bad = np.argwhere(real & ((tokens < 0) | (tokens >= vocab_size)))
    if bad.size:
        r, c = bad[0]
        raise ValueError(f"prompt_tokens[{r}, {c}]={tokens[r, c]} is outside the vocabulary [0, {vocab_size})")


def prepare_prompts(model: LanguageModel, prompt_tokens: Any, prompt_lengths: Any, *, max_new_tokens: Any,
                    stop_ids: Sequence[int] = (), pad_id: int = 0, cache_size: int | None = None,
                    extra_positions: int = 0) -> Prompts:
    """Validates the prompt inputs of every decode loop (on the host, before tracing).

    ``extra_positions``: cache room the loop needs beyond ``P + max_new_tokens`` (the
    default cache size is ``P + max_new_tokens + extra_positions``).
    """
    prompt_tokens = prompt_tokens if isinstance(prompt_tokens, jax.Array) else jnp.asarray(prompt_tokens)
    prompt_lengths = prompt_lengths if isinstance(prompt_lengths, jax.Array) else jnp.asarray(prompt_lengths)
    stop_ids = tuple(_as_int("stop_ids", s) for s in np.asarray(stop_ids).reshape(-1).tolist())
    pad_id = _as_int("pad_id", pad_id)
    max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
    p = prompt_tokens.shape[-1] if prompt_tokens.ndim else 0
    cache_size = p + max_new_tokens + extra_positions if cache_size is None else cache_size
    check_prompts(prompt_tokens, prompt_lengths, max_new_tokens, cache_size, model.vocab_size, stop_ids)
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    return Prompts(prompt_tokens.astype(jnp.int32), prompt_lengths.astype(jnp.int32), stops,
                   jnp.asarray(pad_id, jnp.int32), max_new_tokens, int(cache_size), stop_ids)


def row_keys(keys: Any, batch: int) -> Array:
    """Normalises keys to typed per-row keys [B]."""
    if not jnp.issubdtype(getattr(keys, "dtype", np.float32), jax.dtypes.prng_key):
        keys = _wrap_raw_keys(keys, batch)
    if keys.shape == ():
        raise ValueError("keys must hold one key per row (shape [B]); split or fold_in one key per row "
                         "yourself, e.g. jax.random.split(key, B)")
    if keys.shape != (batch,):
        raise ValueError(f"keys must have shape [B] = ({batch},) (one key per row), got {keys.shape}")
    return keys


def _wrap_raw_keys(keys: Any, batch: int) -> Array:
    """Raw key data uint32 [B, D] (D: the default PRNG implementation's key size, 2 for
    threefry) -> typed keys [B]; anything else is an error naming `keys`."""
    data_shape = jax.random.key_data(jax.random.key(0)).shape  # (D,) of the default implementation
    try:
        arr = keys if isinstance(keys, jax.Array) else np.asarray(keys)
    except Exception:  # noqa: BLE001 - ragged lists, objects: say what was expected
        raise ValueError(f"keys must be typed PRNG keys [B] (jax.random.key / split) or raw uint32 key data "
                         f"[B, {data_shape[0]}], got {type(keys).__name__}") from None
    expected = f"typed PRNG keys [B] (jax.random.key / split) or raw uint32 key data [B, {data_shape[0]}] = " \
               f"({batch}, {data_shape[0]})"
    if arr.dtype != np.uint32:
        raise ValueError(f"keys must be {expected}; got dtype {arr.dtype} with shape {tuple(arr.shape)}")
    if arr.ndim == len(data_shape) and tuple(arr.shape) == data_shape:
        raise ValueError("keys must hold one key per row (shape [B]); split or fold_in one key per row "
                         "yourself, e.g. jax.random.split(key, B)")
    if arr.ndim != 1 + len(data_shape) or tuple(arr.shape[1:]) != data_shape:
        raise ValueError(f"keys must be {expected}; got uint32 with shape {tuple(arr.shape)}")
    return jax.random.wrap_key_data(arr)


def sample_keys(keys: Array, n: int) -> Array:
    """Keys [B] -> [B * n]: sample j of prompt i gets fold_in(keys[i], j) (row i * n + j)."""
    per_prompt = lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(n))
    return jax.vmap(per_prompt)(keys).reshape(-1)


class Sampling(NamedTuple):
    """Validated sampling inputs (:func:`prepare_sampling`)."""

    keys: Array  #: typed keys [B * n], row i * n + j = fold_in(keys[i], j) when n > 1
    sampler: Chain
    n: int
    top_logprobs: int
    prompt_logprobs: bool


def prepare_sampling(model: LanguageModel, keys: Any, batch: int, *, sampler: Chain | None, n: int = 1,
                     top_logprobs: int = 0, prompt_logprobs: bool = False, fn: str) -> Sampling:
    """Validates the sampling inputs of `generate`-like loops: keys, sampler, outputs."""
    _val.check_int("n", n, expected="a positive int (samples per prompt)")
    _val.check_int("top_logprobs", top_logprobs, low=0, high=model.vocab_size,
                   expected=f"an int in [0, vocab size {model.vocab_size}]")
    if prompt_logprobs and not callable(getattr(model, "prefill_all", None)):
        raise ValueError(f"prompt_logprobs=True needs a model with prefill_all(tokens, cache) -> "
                         f"(logits [B, P, V], cache); {type(model).__name__} has none")
    keys = row_keys(keys, batch)
    if n > 1:
        keys = sample_keys(keys, n)
    sampler = chain(Temperature(0.0)) if sampler is None else sampler
    check_processor(sampler, f"{fn}: sampler")
    return Sampling(keys, sampler, int(n), int(top_logprobs), bool(prompt_logprobs))


def prepare_inputs(model: LanguageModel, prompt_tokens: Any, prompt_lengths: Any, keys: Any, *,
                   max_new_tokens: Any, sampler: Chain | None, stop_ids: Sequence[int], pad_id: int,
                   cache_size: int | None, n: int, top_logprobs: int, prompt_logprobs: bool,
                   fn: str) -> tuple[Prompts, Sampling, jax.Array]:
    """`prepare_prompts` and `prepare_sampling` for a loop with per-row limits:
    (prompts, sampling, limit int32 [B * n]).

    ``max_new_tokens`` is an int N, or an int array [B] of per-prompt limits whose maximum
    is the static N (each prompt's limit repeated for its n samples).
    """
    limits = None
    if np.ndim(max_new_tokens) > 0:  # per-row limits: the static bound is their maximum
        limits = row_limits(max_new_tokens, np.shape(prompt_tokens)[0] if np.ndim(prompt_tokens) else 0)
        max_new_tokens = int(limits.max())
    prompts = prepare_prompts(model, prompt_tokens, prompt_lengths, max_new_tokens=max_new_tokens,
                              stop_ids=stop_ids, pad_id=pad_id, cache_size=cache_size)
    sampling = prepare_sampling(model, keys, prompts.tokens.shape[0], sampler=sampler, n=n,
                                top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs, fn=fn)
    if limits is None:
        limit = jnp.full(sampling.keys.shape, prompts.max_new_tokens, jnp.int32)
    else:
        limit = jnp.asarray(np.repeat(limits, sampling.n), jnp.int32)
    return prompts, sampling, limit


def is_pytree(model: Any) -> bool:
    """True when ``model`` has array leaves (traced by the loops), False for a static object."""
    leaves = jax.tree.leaves(model)
    return not (len(leaves) == 1 and leaves[0] is model)


# ----------------------------------------------------------------------------- prefill


def _prefill_with_logprobs(model, prompt_tokens, prompt_lengths, cache):
    """One pass over every prompt position: (last logits [B, V], cache, prompt log-probs [B, P])."""
    p = prompt_tokens.shape[1]
    real = jnp.arange(p)[None, :] < prompt_lengths[:, None]  # [B, P]
    tokens = jnp.where(real, prompt_tokens, 0)  # padding may be any id, even outside the vocabulary
    if "lengths" in inspect.signature(model.prefill_all).parameters:  # keeps padding out of its cache
        all_logits, cache = model.prefill_all(tokens, cache, lengths=prompt_lengths)  # [B, P, V]
    else:
        all_logits, cache = model.prefill_all(tokens, cache)  # [B, P, V]
    last = jnp.take_along_axis(all_logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    logp = jax.nn.log_softmax(all_logits[:, :-1].astype(jnp.float32), axis=-1)  # predicts 1 .. P-1
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, P-1]
    first = jnp.zeros((prompt_tokens.shape[0], 1), jnp.float32)
    return last, cache, jnp.concatenate([first, jnp.where(real[:, 1:], picked, 0.0)], axis=1)


def prefill(model, prompt_tokens, prompt_lengths, cache_size, prompt_logprobs):
    """(last logits [B, V], cache, prompt log-probs [B, P] or None) for B prompts."""
    cache = model.init_cache(prompt_tokens.shape[0], cache_size)
    if prompt_logprobs:
        return _prefill_with_logprobs(model, prompt_tokens, prompt_lengths, cache)
    return (*model.prefill(prompt_tokens, prompt_lengths, cache), None)


def batch_leading_cache(model, b: int, n: int, cache_size: int) -> bool:
    """True when the cache for b * n rows is the cache for b rows with every leaf's leading
    axis (and only it) scaled by n: then repeating a prefilled cache along axis 0 is right."""
    small = jax.eval_shape(lambda: model.init_cache(b, cache_size))
    large = jax.eval_shape(lambda: model.init_cache(b * n, cache_size))
    small_leaves, small_def = jax.tree.flatten(small)
    large_leaves, large_def = jax.tree.flatten(large)
    return small_def == large_def and all(
        s.ndim >= 1 and s.dtype == l.dtype and l.shape == (s.shape[0] * n, *s.shape[1:]) and s.shape[0] == b
        for s, l in zip(small_leaves, large_leaves))


def prefill_samples(model, prompt_tokens, prompt_lengths, cache_size, n, prompt_logprobs):
    """Prefill for n samples per prompt: (logits [B * n, V], cache of B * n rows, prompt
    log-probs [B, P] or None).

    Each prompt is prefilled once and its logits and cache are repeated n times, when
    every cache leaf has the batch as its leading axis (as `models.DecoderLM`'s has); a
    cache of any other layout falls back to prefilling every sample.
    """
    b = prompt_tokens.shape[0]
    if n == 1:
        return prefill(model, prompt_tokens, prompt_lengths, cache_size, prompt_logprobs)
    if batch_leading_cache(model, b, n, cache_size):
        logits, cache, prompt_lp = prefill(model, prompt_tokens, prompt_lengths, cache_size, prompt_logprobs)
        repeat = lambda x: jnp.repeat(x, n, axis=0)
        return repeat(logits), jax.tree.map(repeat, cache), prompt_lp
    logits, cache, prompt_lp = prefill(model, jnp.repeat(prompt_tokens, n, axis=0),
                                       jnp.repeat(prompt_lengths, n, axis=0), cache_size, prompt_logprobs)
    return logits, cache, (None if prompt_lp is None else prompt_lp[::n])  # one row per prompt


def extend(model: LanguageModel, tokens: Array, positions: Array, cache: Any):
    """T tokens per row at consecutive positions from `positions` [B]: (logits [B, T, V], cache).

    Uses `model.extend` when the model has one, else T `decode` calls.
    """
    if callable(getattr(model, "extend", None)):
        return model.extend(tokens, positions, cache)
    out = []
    for t in range(tokens.shape[1]):
        logits, cache = model.decode(tokens[:, t], positions + t, cache)
        out.append(logits)
    return jnp.stack(out, axis=1), cache


# ----------------------------------------------------------------------------- memory budget


class MemoryLimitError(ValueError):
    """A decode loop's estimated memory exceeds the limit (raised before anything is compiled).

    Attributes:
      fn: the function that refused ("generate", ...).
      max_new_tokens: the requested N.
      rows: output rows (B * n; beams for beam search, slots for generate_many).
      estimate: estimated bytes (weights + KV cache + output buffers + working buffers).
      limit: the limit in bytes.
      parts: the estimate by part, bytes.
    """

    def __init__(self, message: str, *, fn: str, max_new_tokens: int, rows: int, estimate: int, limit: float,
                 parts: dict[str, int]):
        super().__init__(message)
        self.fn, self.max_new_tokens, self.rows = fn, max_new_tokens, rows
        self.estimate, self.limit, self.parts = estimate, limit, parts


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def device_memory_bytes() -> int | None:
    """The default device's memory in bytes: an accelerator's `bytes_limit`; on CPU the
    physical memory (or the cgroup's limit when lower); None when unknown."""
    device = jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform != "cpu":
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            text = f.read().strip()
        if text.isdigit():
            total = min(total, int(text))
    except OSError:
        pass
    return int(total)


_CACHE_BYTES: dict = {}


def _cache_bytes(model: LanguageModel, rows: int, cache_size: int) -> int:
    """Bytes of `model.init_cache(rows, cache_size)` from its shapes (memoised by the
    model's hashable `config` when it has one: `jax.eval_shape` costs milliseconds)."""
    config = getattr(model, "config", None)
    try:
        key = (type(model), config, rows, cache_size) if config is not None else None
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _CACHE_BYTES:
        return _CACHE_BYTES[key]
    cache = jax.eval_shape(lambda: model.init_cache(rows, cache_size))
    size = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))
    if key is not None:
        if len(_CACHE_BYTES) > 256:
            _CACHE_BYTES.clear()
        _CACHE_BYTES[key] = size
    return size


def _weight_bytes_per_device(model: Any) -> tuple[int, int]:
    """(bytes of the model's array leaves on one device, devices they span).

    A leaf split over a mesh counts its largest shard; the devices are the most any leaf
    spans (1 for a model on one device)."""
    weights, devices = 0, 1
    for x in jax.tree.leaves(model):
        if not hasattr(x, "nbytes"):
            continue
        sharding = getattr(x, "sharding", None)
        spread = len(sharding.device_set) if sharding is not None else 1
        if spread > 1:
            devices = max(devices, spread)
            weights += max(int(s.data.nbytes) for s in x.addressable_shards)
        else:
            weights += int(x.nbytes)
    return weights, devices


def check_memory(model: LanguageModel, *, fn: str, max_new_tokens: int, rows: int, cache_size: int, width: int,
                 top_logprobs: int = 0, return_stats: bool = False, prompt_rows: int = 0, prompt_len: int = 0,
                 prompt_logprobs: bool = False, extra_bytes: int = 0, memory_limit: Any = None) -> None:
    """Refuses a run whose estimated memory exceeds `memory_limit` (bytes; None: the default
    device's memory, `device_memory_bytes`), before anything is traced or compiled.

    The estimate (docs/limits.md) adds the model's weights (its array leaves), the KV cache
    for `rows` x `cache_size` (the exact shapes of `model.init_cache`, by `jax.eval_shape`),
    the output buffers ([rows, width] tokens and two log-probs; top-N and stats when asked
    for), a few [rows, V] float32 working buffers, the prefill's [B, P, V] logits with
    prompt log-probs, and `extra_bytes` (a loop's own buffers). For a model split over a
    mesh (`models.sharding.shard_model`) the estimate is per device, against one device's
    memory: each weight's largest shard, and the rest divided evenly over the devices the
    weights span (a floor: XLA may replicate some of it).

    Raises:
      MemoryLimitError: naming `max_new_tokens`, the estimate by part and the limit.
    """
    if memory_limit is not None and (isinstance(memory_limit, bool) or not isinstance(memory_limit, (int, float))
                                     or not memory_limit > 0):
        raise ValueError(f"memory_limit must be a number of bytes > 0 (or None: the device's memory), "
                         f"got {memory_limit!r}")
    limit = device_memory_bytes() if memory_limit is None else memory_limit
    if limit is None:
        return
    v = int(model.vocab_size)
    weights, devices = _weight_bytes_per_device(model)
    parts = {
        "weights": weights,
        "KV cache": _cache_bytes(model, rows, cache_size) // devices,
        "outputs": rows * width * (12 + 8 * int(top_logprobs) + (8 if return_stats else 0)) // devices,
        "working": (4 * rows * v * 4 + (prompt_rows * prompt_len * v * 4 if prompt_logprobs else 0)
                    + int(extra_bytes)) // devices,
    }
    total = sum(parts.values())
    if total <= limit:
        return
    source = "the default device's memory" if memory_limit is None else "as passed"
    detail = ", ".join(f"{name} {_gb(b)}" for name, b in parts.items())
    raise MemoryLimitError(
        f"{fn}: max_new_tokens={max_new_tokens} for {rows} rows (KV cache of {cache_size} positions) needs an "
        f"estimated {_gb(total)} ({detail}), above memory_limit={_gb(limit)} ({source}); lower max_new_tokens "
        f"or the batch, or pass a larger memory_limit in bytes (docs/limits.md)",
        fn=fn, max_new_tokens=max_new_tokens, rows=rows, estimate=total, limit=limit, parts=parts)
