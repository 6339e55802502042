"""Jitted generation: prefill, then a `lax.scan` decode loop driving a sampler chain.

The loop talks to the model through a three-method protocol (`LanguageModel`), so any
model that implements it works, not only `models.DecoderLM`:

    cache = model.init_cache(B, S)
    logits, cache = model.prefill(prompt_tokens, prompt_lengths, cache)   # [B, V]
    logits, cache = model.decode(tokens, positions, cache)                # [B, V]

and, only for `prompt_logprobs=True`, an optional fourth method:

    logits, cache = model.prefill_all(prompt_tokens, cache)               # [B, P, V]

Randomness: with `k = fold_in(keys[b], i)` for row b's generated index i, the token is
drawn by `sample(fold_in(k, 0), processed_logits)` and processor j of the chain
(0-based) gets `fold_in(k, j + 1)` (see `sample_step`). A row's tokens depend only on
its own key, prompt and sampler values, never on its batch-mates or its position in
the batch. With `n > 1` samples per prompt, sample j of prompt i is row `i * n + j`
and uses the row key `fold_in(keys[i], j)` in place of `keys[b]`: samples are
distinct, and each one is reproduced alone by passing that derived key with `n=1`.

`generate_stream` runs the same decode step (one implementation, `_decode_step`) as a
jitted scan over chunks of steps and yields each chunk as it is produced.

Sampler state (penalties, mirostat, ...) is initialised from the prompts by
`sampler.init(prompt_tokens, prompt_lengths, V, max_new_tokens=N)`, carried through
the `lax.scan`, and frozen once a row has finished.
"""

from __future__ import annotations

import enum
import operator
from typing import Any, Callable, Iterator, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample._chain import Chain, Temperature, chain, check_processor, init_state, sample_step
from jaxsample._sampling import entropy


class LanguageModel(Protocol):
    """What `generate` needs from a model. Implementations should be pytrees (arrays as
    leaves) or hashable; a hashable non-pytree model is treated as a static argument."""

    vocab_size: int

    def init_cache(self, batch_size: int, max_len: int) -> Any:
        """An empty cache for `batch_size` rows of up to `max_len` positions."""

    def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        """Right-padded prompts int32 [B, P] with lengths [B] -> (float logits [B, V] at each
        row's last real token, cache)."""

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        """One token per row, int32 [B] at positions [B] -> (float logits [B, V], cache)."""

    # Optional, needed only for `generate(..., prompt_logprobs=True)`:
    #   prefill_all(tokens int32 [B, P], cache) -> (float logits [B, P, V] at every
    #   position, cache), filling the cache like `prefill`. Padding is replaced by id 0
    #   before the call.


class FinishReason(enum.IntEnum):
    """Why a row stopped (the values of `GenerateOutput.finish_reason`)."""

    LENGTH = 0  #: reached max_new_tokens
    STOP = 1  #: emitted one of the stop ids (the stop token is included in the output)
    NO_VALID_TOKEN = 2  #: the sampler's logits had no finite value (a mask emptied the row) or a NaN


class GenerateStats(NamedTuple):
    """What the sampler did at every step (`generate(..., return_stats=True)`). N = max_new_tokens.

    Attributes:
      entropy: float32 [B, N], entropy in nats of the processed distribution the token
        was drawn from (`jaxsample.entropy` of the processed logits); NaN at a step whose
        processed logits had no valid token; 0 after a row finished.
      num_kept: int32 [B, N], tokens with a logit above -inf after the chain (the
        candidates the draw chose from); 0 after a row finished.
      final_state: the processors' state after the last step, as `sampler.init`
        made it (e.g. a `History`, mirostat's mu); a row's state stops changing when it
        finishes.
    """

    entropy: jax.Array
    num_kept: jax.Array
    final_state: Any


class GenerateOutput(NamedTuple):
    """Result of `generate`. N = max_new_tokens.

    Attributes:
      tokens: int32 [B, N]; positions at or after `lengths` hold `pad_id`.
      lengths: int32 [B], generated tokens per row (a stop token counts).
      logprobs_raw: float32 [B, N], log_softmax of the model's logits at the chosen token
        (0 at padded positions).
      logprobs_processed: float32 [B, N], log_softmax of the logits actually sampled from
        (after the sampler chain) at the chosen token (0 at padded positions).
      finish_reason: int32 [B], a `FinishReason`.
      top_token_ids: int32 [B, N, K] with K = `top_logprobs`: the K most likely tokens
        under the model's logits at each step, most likely first (`pad_id` at padded
        positions); None unless requested.
      top_logprobs: float32 [B, N, K], their raw log-probs (log_softmax of the model's
        logits; 0 at padded positions); None unless requested.
      prompt_logprobs: float32 [B_prompts, P], raw log-prob of each prompt token given
        the tokens before it (one row per prompt, also when n > 1); position 0 and
        padding hold 0, so a row sums to log p(prompt[1:] | prompt[0]). None unless
        requested.
      stats: a `GenerateStats` with `return_stats=True`, else None.

    With n samples per prompt, B = B_prompts * n rows, prompt-major (row i * n + j is
    sample j of prompt i).
    """

    tokens: jax.Array
    lengths: jax.Array
    logprobs_raw: jax.Array
    logprobs_processed: jax.Array
    finish_reason: jax.Array
    top_token_ids: jax.Array | None = None
    top_logprobs: jax.Array | None = None
    prompt_logprobs: jax.Array | None = None
    stats: GenerateStats | None = None


class StreamChunk(NamedTuple):
    """One chunk of `generate_stream`: generated indices `start .. start + C - 1` of every row.

    Attributes:
      start: int, the generated index of the first column.
      tokens: int32 [B, C]; `pad_id` where a row had already finished.
      logprobs_raw, logprobs_processed: float32 [B, C] (0 where a row had finished).
      lengths: int32 [B], generated tokens per row so far (a stop token counts).
      finish_reason: int32 [B], a `FinishReason`, final for rows with `done`.
      done: bool [B], rows that finished (stop id, no valid token, or max_new_tokens: on
        the last chunk every row is done).
      top_token_ids, top_logprobs: int32 / float32 [B, C, K], `generate`'s top-N fields
        for these C indices (`pad_id` / 0 where a row had finished); None unless
        `top_logprobs=K` was requested.
      prompt_logprobs: float32 [B_prompts, P], as `generate`'s, on the first chunk
        (start 0) only: it comes from the prefill that produced that chunk. None on the
        other chunks and unless requested.
      stats: a `GenerateStats` with `return_stats=True` (else None): `entropy` and
        `num_kept` [B, C] for these C indices, `final_state` the processors' state
        after this chunk (after the last chunk: `generate`'s `final_state`).
    """

    start: int
    tokens: jax.Array
    logprobs_raw: jax.Array
    logprobs_processed: jax.Array
    lengths: jax.Array
    finish_reason: jax.Array
    done: jax.Array
    top_token_ids: jax.Array | None = None
    top_logprobs: jax.Array | None = None
    prompt_logprobs: jax.Array | None = None
    stats: GenerateStats | None = None


def _row_keys(keys: jax.Array, batch: int) -> jax.Array:
    """Normalises keys to typed per-row keys [B]."""
    if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.wrap_key_data(keys)
    if keys.shape == ():
        raise ValueError("keys must hold one key per row (shape [B]); split or fold_in one key per row "
                         "yourself, e.g. jax.random.split(key, B)")
    if keys.shape != (batch,):
        raise ValueError(f"keys must have shape [B] = ({batch},) (one key per row), got {keys.shape}")
    return keys


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


def _validate(prompt_tokens, prompt_lengths, max_new_tokens, cache_size, vocab_size, stop_ids):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
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
    if any(isinstance(x, jax.core.Tracer) or (isinstance(x, jax.Array) and not x.is_fully_addressable)
           for x in (prompt_tokens, prompt_lengths)):
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


def _sample_keys(keys: jax.Array, n: int) -> jax.Array:
    """Keys [B] -> [B * n]: sample j of prompt i gets fold_in(keys[i], j) (row i * n + j)."""
    per_prompt = lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(n))
    return jax.vmap(per_prompt)(keys).reshape(-1)


def _validate_outputs(model, n, top_logprobs, prompt_logprobs):
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int (samples per prompt), got {n!r}")
    if (not isinstance(top_logprobs, (int, np.integer)) or isinstance(top_logprobs, bool)
            or not 0 <= top_logprobs <= model.vocab_size):
        raise ValueError(f"top_logprobs must be an int in [0, vocab size {model.vocab_size}], "
                         f"got {top_logprobs!r}")
    if prompt_logprobs and not callable(getattr(model, "prefill_all", None)):
        raise ValueError(f"prompt_logprobs=True needs a model with prefill_all(tokens, cache) -> "
                         f"(logits [B, P, V], cache); {type(model).__name__} has none")


def generate(model: LanguageModel, prompt_tokens: jax.Array, prompt_lengths: jax.Array, keys: jax.Array, *,
             max_new_tokens: int, sampler: Chain | None = None, stop_ids: Sequence[int] = (),
             pad_id: int = 0, cache_size: int | None = None, n: int = 1, top_logprobs: int = 0,
             prompt_logprobs: bool = False, sample_fn: Callable = sample_step,
             return_stats: bool = False) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens per row: prefill, then a jitted `lax.scan`.

    Args:
      model: a `LanguageModel` (e.g. `models.DecoderLM`).
      prompt_tokens: int [B, P], right-padded prompts.
      prompt_lengths: int [B], real tokens per row, in [1, P].
      keys: B PRNG keys, one per row (typed `jax.random.key` or raw uint32 [B, 2]).
      max_new_tokens: N, static.
      sampler: a `Chain` of processors (values are traced: changing them never recompiles);
        None means greedy (`chain(Temperature(0.0))`). Stateful processors (penalties,
        mirostat, ...) get `init(prompt_tokens, prompt_lengths, V, max_new_tokens=N)`.
        Per-row values have one entry per output row (B * n with n samples).
      stop_ids: token ids that end a row (included in its output). Their count is static,
        their values are traced.
      pad_id: written after a row has finished.
      cache_size: KV-cache length S (default P + N); must be >= P + N.
      n: samples per prompt, static. The output has B * n rows, prompt-major; sample j
        of prompt i uses the key `fold_in(keys[i], j)` (n = 1 uses `keys` as given), so
        it is reproduced alone by `generate(..., keys=fold_in(keys[i], j)[None], n=1)`.
        Each prompt is prefilled once and its KV cache copied to its n samples (when
        every cache leaf has the batch as its leading axis; otherwise once per sample).
      top_logprobs: K, static: also return the K most likely tokens of every step with
        their raw log-probs (`top_token_ids`, `top_logprobs`, [B * n, N, K]).
      prompt_logprobs: static: also return the raw log-prob of every prompt token given
        its prefix (`prompt_logprobs`, [B, P]), from the same prefill (the model needs
        `prefill_all`).
      sample_fn: the per-step sampler, static (hashable), called as `sample_step` is:
        `sample_fn(sampler, logits [B, V], state, keys [B]) -> (token [B], state, StepOutput)`.
        `sample_step` (default), `jaxsample.gumbel_sample_step`, or
        `jaxsample.ShardedSampler(mesh)` for logits split over a device mesh. If it has a
        `top_logprobs(logits, K) -> (ids [B, K], logprobs [B, K])` method, that computes
        the top-N log-probs (vocab-parallel for `ShardedSampler`).
      return_stats: static: also return a `GenerateStats` (`out.stats`): per row and
        step the entropy of the processed distribution and the number of tokens the
        chain kept, and the processors' final state. Off, the compiled program is the
        same as without the option. Needs a `sample_fn` whose `StepOutput` carries
        `processed_logits` (`sample_step` does).

    Keys: with `k = fold_in(keys[b], i)` for row b (b's sample key when n > 1) and
    generated index i, the token is drawn by `sample(fold_in(k, 0), processed_logits)`
    and processor j of the chain (0-based) gets `fold_in(k, j + 1)`.

    Returns:
      A `GenerateOutput`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxsample as js
      >>> from models import DecoderLM, preset
      >>> lm = DecoderLM.random(preset("tiny"), jax.random.key(0))
      >>> out = js.generate(lm, jnp.array([[256, 72, 105]]), jnp.array([3]),
      ...                   jax.random.split(jax.random.key(1), 1), max_new_tokens=8,
      ...                   sampler=js.default_chain(temperature=0.8, top_p=0.9))
      >>> out.tokens.shape
      (1, 8)
    """
    args, static = _prepare(model, prompt_tokens, prompt_lengths, keys, max_new_tokens, sampler, stop_ids,
                            pad_id, cache_size, n, top_logprobs, prompt_logprobs, sample_fn, "generate")
    run = _generate_traced_model if _is_pytree(model) else _generate_static_model
    return run(model, *args, **static, return_stats=bool(return_stats))


def _prepare(model, prompt_tokens, prompt_lengths, keys, max_new_tokens, sampler, stop_ids, pad_id,
             cache_size, n, top_logprobs, prompt_logprobs, sample_fn, fn):
    """Validates generate's inputs: (traced args, static kwargs) for the jitted functions."""
    prompt_tokens = jnp.asarray(prompt_tokens) if not isinstance(prompt_tokens, jax.Array) else prompt_tokens
    prompt_lengths = jnp.asarray(prompt_lengths) if not isinstance(prompt_lengths, jax.Array) else prompt_lengths
    stop_ids = tuple(_as_int("stop_ids", s) for s in np.asarray(stop_ids).reshape(-1).tolist())
    pad_id = _as_int("pad_id", pad_id)
    p = prompt_tokens.shape[-1] if prompt_tokens.ndim else 0
    cache_size = p + max_new_tokens if cache_size is None else cache_size
    _validate(prompt_tokens, prompt_lengths, max_new_tokens, cache_size, model.vocab_size, stop_ids)
    _validate_outputs(model, n, top_logprobs, prompt_logprobs)
    keys = _row_keys(keys, prompt_tokens.shape[0])
    if n > 1:
        keys = _sample_keys(keys, n)
    sampler = chain(Temperature(0.0)) if sampler is None else sampler
    check_processor(sampler, f"{fn}: sampler")
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    args = (prompt_tokens.astype(jnp.int32), prompt_lengths.astype(jnp.int32), keys, sampler, stops,
            jnp.asarray(pad_id, jnp.int32))
    static = dict(max_new_tokens=max_new_tokens, cache_size=cache_size, n=int(n), top_logprobs=int(top_logprobs),
                  prompt_logprobs=bool(prompt_logprobs), sample_fn=sample_fn)
    return args, static


def _is_pytree(model) -> bool:
    leaves = jax.tree.leaves(model)
    return not (len(leaves) == 1 and leaves[0] is model)


def _prefill_with_logprobs(model, prompt_tokens, prompt_lengths, cache):
    """One pass over every prompt position: (last logits [B, V], cache, prompt log-probs [B, P])."""
    p = prompt_tokens.shape[1]
    real = jnp.arange(p)[None, :] < prompt_lengths[:, None]  # [B, P]
    tokens = jnp.where(real, prompt_tokens, 0)  # padding may be any id, even outside the vocabulary
    all_logits, cache = model.prefill_all(tokens, cache)  # [B, P, V]
    last = jnp.take_along_axis(all_logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    logp = jax.nn.log_softmax(all_logits[:, :-1].astype(jnp.float32), axis=-1)  # predicts 1 .. P-1
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, P-1]
    first = jnp.zeros((prompt_tokens.shape[0], 1), jnp.float32)
    return last, cache, jnp.concatenate([first, jnp.where(real[:, 1:], picked, 0.0)], axis=1)


def _top_logprobs(logits, k):
    """The k most likely tokens per row and their raw log-probs: (ids [B, k], logprobs [B, k])."""
    top_lp, top_ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), k)
    return top_ids, top_lp


def _prefill(model, prompt_tokens, prompt_lengths, cache_size, prompt_logprobs):
    """(last logits [B, V], cache, prompt log-probs [B, P] or None) for B prompts."""
    cache = model.init_cache(prompt_tokens.shape[0], cache_size)
    if prompt_logprobs:
        return _prefill_with_logprobs(model, prompt_tokens, prompt_lengths, cache)
    return (*model.prefill(prompt_tokens, prompt_lengths, cache), None)


def _batch_leading_cache(model, b: int, n: int, cache_size: int) -> bool:
    """True when the cache for b * n rows is the cache for b rows with every leaf's leading
    axis (and only it) scaled by n: then repeating a prefilled cache along axis 0 is right."""
    small = jax.eval_shape(lambda: model.init_cache(b, cache_size))
    large = jax.eval_shape(lambda: model.init_cache(b * n, cache_size))
    small_leaves, small_def = jax.tree.flatten(small)
    large_leaves, large_def = jax.tree.flatten(large)
    return small_def == large_def and all(
        s.ndim >= 1 and s.dtype == l.dtype and l.shape == (s.shape[0] * n, *s.shape[1:]) and s.shape[0] == b
        for s, l in zip(small_leaves, large_leaves))


def _prefill_samples(model, prompt_tokens, prompt_lengths, cache_size, n, prompt_logprobs):
    """Prefill for n samples per prompt: (logits [B * n, V], cache of B * n rows, prompt
    log-probs [B, P] or None).

    Each prompt is prefilled once and its logits and cache are repeated n times, when
    every cache leaf has the batch as its leading axis (as `models.DecoderLM`'s has); a
    cache of any other layout falls back to prefilling every sample.
    """
    b = prompt_tokens.shape[0]
    if n == 1:
        return _prefill(model, prompt_tokens, prompt_lengths, cache_size, prompt_logprobs)
    if _batch_leading_cache(model, b, n, cache_size):
        logits, cache, prompt_lp = _prefill(model, prompt_tokens, prompt_lengths, cache_size, prompt_logprobs)
        repeat = lambda x: jnp.repeat(x, n, axis=0)
        return repeat(logits), jax.tree.map(repeat, cache), prompt_lp
    logits, cache, prompt_lp = _prefill(model, jnp.repeat(prompt_tokens, n, axis=0),
                                        jnp.repeat(prompt_lengths, n, axis=0), cache_size, prompt_logprobs)
    return logits, cache, (None if prompt_lp is None else prompt_lp[::n])  # one row per prompt


def _decode_step(model, sampler, keys, stops, pad_id, prompt_lengths, *, sample_fn, top_logprobs=0,
                 return_stats=False):
    """The decode loop's two pieces, shared by `generate` and `generate_stream`.

    Returns `(pick, body)`: `pick(i, logits, state, done, lengths, finish)` samples
    generated index i for every row, and `body(carry, i)` is one `lax.scan` step (decode
    the previous token, then pick) over the carry `(token, cache, state, done, lengths,
    finish)`. Per-step outputs: `(token, logprob_raw, logprob_processed)`, then the
    top-K ids and log-probs if `top_logprobs`, then entropy and kept count if
    `return_stats`.
    """

    def pick(i, logits, state, done, lengths, finish):
        """Samples generated index i for every row; finished rows keep their state and emit pad."""
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
        token, new_state, out = sample_fn(sampler, logits, state, step_keys)
        active = ~done
        invalid = active & (token < 0)
        emitted = active & ~invalid
        stopped = emitted & jnp.isin(token, stops)
        token = jnp.where(emitted, token, pad_id)
        keep_old = lambda new, old: jnp.where(done.reshape(done.shape + (1,) * (new.ndim - 1)), old, new)
        state = jax.tree.map(keep_old, new_state, state)
        finish = jnp.where(invalid, FinishReason.NO_VALID_TOKEN, jnp.where(stopped, FinishReason.STOP, finish))
        lengths = lengths + emitted.astype(jnp.int32)
        raw = jnp.where(emitted, out.token_logprob_raw, 0.0)
        processed = jnp.where(emitted, out.token_logprob_processed, 0.0)
        ys = (token, raw, processed)
        if top_logprobs:
            top_fn = getattr(sample_fn, "top_logprobs", _top_logprobs)
            top_ids, top_lp = top_fn(logits, top_logprobs)  # [B, K] each
            ys += (jnp.where(emitted[:, None], top_ids, pad_id), jnp.where(emitted[:, None], top_lp, 0.0))
        if return_stats:
            ys += _step_stats(out, active)
        return (token, state, done | invalid | stopped, lengths, finish), ys

    def body(carry, i):
        token, cache, state, done, lengths, finish = carry
        # The token generated at index i - 1 sits at position prompt_length + i - 1.
        logits, cache = model.decode(token, prompt_lengths + i - 1, cache)
        (token, state, done, lengths, finish), ys = pick(i, logits, state, done, lengths, finish)
        return (token, cache, state, done, lengths, finish), ys

    return pick, body


def _step_stats(out, active):
    """(entropy float32 [B], kept int32 [B]) of the processed logits; 0 for finished rows."""
    if out.processed_logits is None:
        raise ValueError("return_stats=True needs processed logits: the sample_fn's StepOutput must carry "
                         "processed_logits (jaxsample.sample_step does)")
    processed = out.processed_logits  # [B, V]
    kept = jnp.sum(processed > -jnp.inf, axis=-1).astype(jnp.int32)
    return jnp.where(active, entropy(processed), 0.0), jnp.where(active, kept, 0)


def _start(model, prompt_tokens, prompt_lengths, keys, sampler, stops, pad_id, *, max_new_tokens, cache_size, n,
           top_logprobs, prompt_logprobs, sample_fn, return_stats):
    """Prefill and generated index 0: (carry, ys of index 0, prompt log-probs, row prompt lengths)."""
    logits, cache, prompt_lp = _prefill_samples(model, prompt_tokens, prompt_lengths, cache_size, n,
                                                prompt_logprobs)
    prompt_tokens = jnp.repeat(prompt_tokens, n, axis=0)  # [B * n, P], row i * n + j = prompt i
    prompt_lengths = jnp.repeat(prompt_lengths, n, axis=0)
    b = prompt_tokens.shape[0]
    state = init_state(sampler, prompt_tokens, prompt_lengths, model.vocab_size,
                       max_new_tokens=max_new_tokens)
    pick, _ = _decode_step(model, sampler, keys, stops, pad_id, prompt_lengths, sample_fn=sample_fn,
                           top_logprobs=top_logprobs, return_stats=return_stats)
    done = jnp.zeros((b,), bool)
    lengths = jnp.zeros((b,), jnp.int32)
    finish = jnp.full((b,), FinishReason.LENGTH, jnp.int32)
    (token, state, done, lengths, finish), first = pick(0, logits, state, done, lengths, finish)
    return (token, cache, state, done, lengths, finish), first, prompt_lp, prompt_lengths


def _generate_impl(model, prompt_tokens, prompt_lengths, keys, sampler, stops, pad_id, *,
                   max_new_tokens, cache_size, n=1, top_logprobs=0, prompt_logprobs=False, sample_fn=sample_step,
                   return_stats=False):
    carry, first, prompt_lp, prompt_lengths = _start(
        model, prompt_tokens, prompt_lengths, keys, sampler, stops, pad_id, max_new_tokens=max_new_tokens,
        cache_size=cache_size, n=n, top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
        sample_fn=sample_fn, return_stats=return_stats)
    _, body = _decode_step(model, sampler, keys, stops, pad_id, prompt_lengths, sample_fn=sample_fn,
                           top_logprobs=top_logprobs, return_stats=return_stats)
    (_, _, state, _, lengths, finish), rest = jax.lax.scan(body, carry, jnp.arange(1, max_new_tokens))
    # first: [B, ...] for index 0; rest: [N-1, B, ...] -> [B, N, ...]
    ys = [jnp.concatenate([f[:, None], jnp.moveaxis(r, 0, 1)], axis=1) for f, r in zip(first, rest)]
    (tokens, raw, processed), top, stats = _split_outputs(ys, top_logprobs, return_stats, state)
    return GenerateOutput(tokens, lengths, raw, processed, finish, *top, prompt_lp, stats)


def _split_outputs(ys, top_logprobs, return_stats, state):
    """`_decode_step`'s per-step outputs (stacked over steps) -> ((tokens, raw, processed),
    (top ids, top log-probs) or (None, None), `GenerateStats` or None)."""
    top = tuple(ys[3:5]) if top_logprobs else (None, None)
    stats = GenerateStats(*ys[-2:], final_state=state) if return_stats else None
    return tuple(ys[:3]), top, stats


_STATIC = ("max_new_tokens", "cache_size", "n", "top_logprobs", "prompt_logprobs", "sample_fn", "return_stats")
_generate_traced_model = jax.jit(_generate_impl, static_argnames=_STATIC)
_generate_static_model = jax.jit(_generate_impl, static_argnums=(0,), static_argnames=_STATIC)


# ----------------------------------------------------------------------------- streaming


def generate_stream(model: LanguageModel, prompt_tokens: jax.Array, prompt_lengths: jax.Array, keys: jax.Array,
                    *, max_new_tokens: int, chunk_size: int = 16, sampler: Chain | None = None,
                    stop_ids: Sequence[int] = (), pad_id: int = 0, cache_size: int | None = None, n: int = 1,
                    top_logprobs: int = 0, prompt_logprobs: bool = False, sample_fn: Callable = sample_step,
                    return_stats: bool = False) -> Iterator[StreamChunk]:
    """Like `generate`, but yields the tokens chunk by chunk while they are produced.

    The first chunk is generated index 0 alone (right after the prefill: the first
    token as early as possible); then each chunk is `chunk_size` steps of the same
    jitted decode step as `generate`, run as a `lax.scan` that carries the cache and
    the sampler state from chunk to chunk. The tokens (and log-probs) are therefore
    equal to `generate`'s for the same inputs and keys. Every chunk runs the same
    compiled program (the start index is traced; steps past `max_new_tokens` in the
    last chunk are skipped by a `lax.cond`), so a new chunk never recompiles. The
    loop stops early once every row has finished (one host sync per chunk).

    Args:
      model, prompt_tokens, prompt_lengths, keys, max_new_tokens, sampler, stop_ids,
        pad_id, cache_size, n, top_logprobs, prompt_logprobs, sample_fn, return_stats:
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
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    args, static = _prepare(model, prompt_tokens, prompt_lengths, keys, max_new_tokens, sampler, stop_ids,
                            pad_id, cache_size, n, top_logprobs, prompt_logprobs, sample_fn, "generate_stream")
    return _stream(model, args, static, int(chunk_size), bool(return_stats))


def _stream(model, args, static, chunk_size, return_stats):
    _, _, keys, sampler, stops, pad_id = args
    traced = _is_pytree(model)
    start = _stream_start_traced if traced else _stream_start_static
    step = _stream_chunk_traced if traced else _stream_chunk_static
    top_logprobs = static["top_logprobs"]
    n_steps = static["max_new_tokens"]

    def chunk(begin, carry, ys, prompt_lp=None):
        _, _, state, done, lengths, finish = carry
        main, top, stats = _split_outputs(ys, top_logprobs, return_stats, state)
        done = done | (begin + main[0].shape[1] >= n_steps)  # the last chunk: every row is done
        return StreamChunk(begin, *main, lengths, finish, done, *top, prompt_lp, stats)

    carry, first, prompt_lp, prompt_lengths = start(model, *args, **static, return_stats=return_stats)
    yield chunk(0, carry, [y[:, None] for y in first], prompt_lp)
    limit = jnp.asarray(n_steps, jnp.int32)
    for begin in range(1, n_steps, chunk_size):
        token, cache, state, done, lengths, finish = carry  # the cache is donated: updated in place
        if bool(np.all(np.asarray(done))):
            return
        carry, ys = step(model, sampler, keys, stops, pad_id, prompt_lengths, cache, (token, state, done, lengths,
                         finish), jnp.asarray(begin, jnp.int32), limit, chunk_size=chunk_size,
                         sample_fn=static["sample_fn"], top_logprobs=top_logprobs, return_stats=return_stats)
        width = min(chunk_size, n_steps - begin)
        yield chunk(begin, carry, [y[:, :width] for y in ys])


def _stream_chunk(model, sampler, keys, stops, pad_id, prompt_lengths, cache, rest, begin, limit, *, chunk_size,
                  sample_fn, top_logprobs=0, return_stats=False):
    """`chunk_size` decode steps from generated index `begin` (traced); steps >= `limit` are skipped.

    The carry comes as `cache` (donated: the KV cache is updated in place) and `rest`
    (token, state, done, lengths, finish), which the caller may still hold."""
    _, body = _decode_step(model, sampler, keys, stops, pad_id, prompt_lengths, sample_fn=sample_fn,
                           top_logprobs=top_logprobs, return_stats=return_stats)
    token, state, done, lengths, finish = rest
    carry = (token, cache, state, done, lengths, finish)

    def gated(carry, i):
        skip = lambda carry, i: (carry, jax.tree.map(jnp.zeros_like, jax.eval_shape(body, carry, i)[1]))
        return jax.lax.cond(i < limit, body, skip, carry, i)

    carry, ys = jax.lax.scan(gated, carry, begin + jnp.arange(chunk_size))
    return carry, tuple(jnp.moveaxis(y, 0, 1) for y in ys)  # [C, B] -> [B, C]


_START_STATIC = _STATIC
_CHUNK_STATIC = ("chunk_size", "sample_fn", "top_logprobs", "return_stats")
_stream_start_traced = jax.jit(_start, static_argnames=_START_STATIC)
_stream_start_static = jax.jit(_start, static_argnums=(0,), static_argnames=_START_STATIC)
_stream_chunk_traced = jax.jit(_stream_chunk, static_argnames=_CHUNK_STATIC, donate_argnums=(6,))
_stream_chunk_static = jax.jit(_stream_chunk, static_argnums=(0,), static_argnames=_CHUNK_STATIC,
                               donate_argnums=(6,))
