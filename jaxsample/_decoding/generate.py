"""Jitted generation: prefill, then a decode loop that exits once every row is done.

The loop talks to the model through the `LanguageModel` protocol (see
:mod:`jaxsample._decoding.core`), so any model that implements it works, not only
`models.DecoderLM`:

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

The decode step is :class:`jaxsample._decoding.loop.DecodeStep` (one emit rule, one
carry), run as a `lax.while_loop` over chunks of scanned steps that exits once every
row has stopped; `generate_stream` (:mod:`jaxsample._decoding.stream`) runs the same
step chunk by chunk from the host.

Sampler state (penalties, mirostat, ...) is initialised from the prompts by
`sampler.init(prompt_tokens, prompt_lengths, V, max_new_tokens=N)`, carried through
the loop, and frozen once a row has finished.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax

from jaxsample._decoding import core
from jaxsample._decoding.core import FinishReason, LanguageModel, Outputs
from jaxsample._decoding.loop import DecodeStep, run_until_done
from jaxsample._processors.base import Chain
from jaxsample._step.step import sample_step

__all__ = ["FinishReason", "GenerateOutput", "GenerateStats", "LanguageModel", "StreamChunk", "generate",
           "prepare_generate", "to_generate_output"]


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


def generate(model: LanguageModel, prompt_tokens: jax.Array, prompt_lengths: jax.Array, keys: jax.Array, *,
             max_new_tokens: int, sampler: Chain | None = None, stop_ids: Sequence[int] = (),
             pad_id: int = 0, cache_size: int | None = None, n: int = 1, top_logprobs: int = 0,
             prompt_logprobs: bool = False, sample_fn: Callable = sample_step,
             return_stats: bool = False, memory_limit: float | None = None) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens per row: prefill, then a jitted `lax.scan`.

    Args:
      model: a `LanguageModel` (e.g. `models.DecoderLM`).
      prompt_tokens: int [B, P], right-padded prompts.
      prompt_lengths: int [B], real tokens per row, in [1, P].
      keys: B PRNG keys, one per row (typed `jax.random.key` or raw uint32 [B, 2]).
      max_new_tokens: N, static; or an int array [B] of per-prompt limits (like vLLM's
        per-request ``max_tokens``), whose maximum is the static N (the output width):
        changing the limits below that maximum never recompiles.
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
      memory_limit: bytes the run may take, checked against an estimate (weights, KV
        cache, output buffers) before compiling (`MemoryLimitError`, docs/limits.md);
        None: the default device's memory.

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
    args, static = prepare_generate(model, prompt_tokens, prompt_lengths, keys, max_new_tokens=max_new_tokens,
                                    sampler=sampler, stop_ids=stop_ids, pad_id=pad_id, cache_size=cache_size, n=n,
                                    top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
                                    sample_fn=sample_fn, fn="generate", return_stats=return_stats,
                                    memory_limit=memory_limit)
    run = _generate_traced if core.is_pytree(model) else _generate_static
    return run(model, *args, **static, return_stats=bool(return_stats))


def prepare_generate(model, prompt_tokens, prompt_lengths, keys, *, max_new_tokens, sampler, stop_ids, pad_id,
                     cache_size, n, top_logprobs, prompt_logprobs, sample_fn, fn, return_stats=False,
                     memory_limit=None):
    """Validates generate's inputs: (traced args, static kwargs) of the jitted programs.

    Traced: prompt tokens [B, P], lengths [B], keys [B * n], sampler, stops, pad id,
    per-row limits [B * n]. Static: max_new_tokens, cache_size, n, top_logprobs,
    prompt_logprobs, sample_fn.
    """
    prompts, sampling, limit = core.prepare_inputs(
        model, prompt_tokens, prompt_lengths, keys, max_new_tokens=max_new_tokens, sampler=sampler,
        stop_ids=stop_ids, pad_id=pad_id, cache_size=cache_size, n=n, top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs, fn=fn)
    core.check_memory(model, fn=fn, max_new_tokens=prompts.max_new_tokens, rows=int(sampling.keys.shape[0]),
                      cache_size=prompts.cache_size, width=prompts.max_new_tokens, top_logprobs=sampling.top_logprobs,
                      return_stats=bool(return_stats), prompt_rows=int(prompts.tokens.shape[0]),
                      prompt_len=int(prompts.tokens.shape[1]), prompt_logprobs=sampling.prompt_logprobs,
                      memory_limit=memory_limit)
    args = (prompts.tokens, prompts.lengths, sampling.keys, sampling.sampler, prompts.stops, prompts.pad_id, limit)
    static = dict(max_new_tokens=prompts.max_new_tokens, cache_size=prompts.cache_size, n=sampling.n,
                  top_logprobs=sampling.top_logprobs, prompt_logprobs=sampling.prompt_logprobs, sample_fn=sample_fn)
    return args, static


def to_generate_output(s, outputs: Outputs, prompt_lp, return_stats: bool) -> "GenerateOutput":
    """The final carry and output buffers -> `GenerateOutput`."""
    stats = GenerateStats(outputs.entropy, outputs.num_kept, s.sampler_state) if return_stats else None
    return GenerateOutput(outputs.tokens, s.lengths, outputs.logprobs_raw, outputs.logprobs_processed, s.finish,
                          outputs.top_token_ids, outputs.top_logprobs, prompt_lp, stats)


def _generate_impl(model, prompt_tokens, prompt_lengths, keys, sampler, stops, pad_id, limit, *, max_new_tokens,
                   cache_size, n=1, top_logprobs=0, prompt_logprobs=False, sample_fn=sample_step, return_stats=False):
    step = DecodeStep(model, sampler, keys, stops, pad_id, limit, sample_fn, top_logprobs, return_stats)
    s, outputs, prompt_lp = step.start(prompt_tokens, prompt_lengths, max_new_tokens=max_new_tokens,
                                       cache_size=cache_size, n=n, prompt_logprobs=prompt_logprobs,
                                       width=max_new_tokens)
    s, outputs = run_until_done(step.step, s, outputs, max_new_tokens - 1,
                                constrain=getattr(sample_fn, "constrain_rows", None))
    return to_generate_output(s, outputs, prompt_lp, return_stats)


_STATIC = ("max_new_tokens", "cache_size", "n", "top_logprobs", "prompt_logprobs", "sample_fn", "return_stats")
_generate_traced = jax.jit(_generate_impl, static_argnames=_STATIC)
_generate_static = jax.jit(_generate_impl, static_argnums=(0,), static_argnames=_STATIC)
