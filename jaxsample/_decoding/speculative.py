"""Exact speculative decoding: a draft proposes, the target verifies k tokens per call.

Each round, for every row (rows run in lock-step inside one `lax.while_loop`, but each
has its own position in its KV caches and accepts its own number of tokens):

    d_1 .. d_k ~ q                          # the draft's proposals (q: processed draft dist.)
    p_1 .. p_{k+1}                          # the target's processed distributions, ONE call:
                                            #   extend([t, d_1 .. d_k]) -> logits [B, k+1, V]
    accept d_j while u_j < min(1, p_j(d_j) / q_j(d_j))     (u_j ~ U[0, 1))
    first rejection at j:  draw x ~ normalise(max(0, p_j - q_j))
    all k accepted:        draw x ~ p_{k+1}

(Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative
Sampling"). Every emitted token is distributed exactly as under plain `generate`
with the same sampler: p and q are *processed* distributions, the full sampler chain
(temperature, truncations, masks, penalties with their state) applied to the target's
and the draft's logits. Stateful processors advance along the drafted tokens on both
sides; the state kept at the end of a round is the target-side state after the tokens
actually emitted. With temperature 0 (greedy) p and q are point masses, so the output
equals greedy `generate` token for token (up to float rounding of the batched target
call, see `extend`).

Drafts:
  * any `LanguageModel` with the target's vocabulary (its own KV cache; it is fed the
    last two committed tokens each round, rewriting one position idempotently, then
    decodes k - 1 times);
  * `PromptLookup(max_ngram, min_ngram)`: the continuation of the most recent earlier
    occurrence of the row's last n tokens (n = max_ngram, falling back down to
    min_ngram) in the row's own context (prompt + generated); q is a point mass. No
    second model. A row without a match proposes nothing (its round emits one token,
    drawn from p as in `generate`);
  * `NGramDraft` (jaxsample/_decoding/ngram.py): a corpus n-gram table chained k times
    (and optionally prompt lookup first); q is a point mass, looked up on device.

All three implement the draft protocol of :mod:`jaxsample._decoding.drafts`
(``propose(state, ctx, k) -> (tokens, q, state)``); the loop knows no draft type.
Emission follows the one rule of :mod:`jaxsample._decoding.core` (``emit``), applied to
the round's candidates in order.

The target scores k + 1 tokens in one call through an optional protocol method

    logits, cache = model.extend(tokens [B, T], positions [B], cache)   # [B, T, V]

(token t of row b sits at position positions[b] + t); a model without `extend` is
called T times through `decode` (correct, but without the speed-up).

Randomness (per row, documented like `generate`'s): generated index i of row b uses
`s = fold_in(keys[b], i)`, as in `generate`; processors get `fold_in(s, m + 1)` (as in
`sample_step`), the token drawn from the target (residual or bonus draw) uses
`fold_in(s, 0)`, the draft's draw `fold_in(s, DRAFT_STREAM)` and the acceptance uniform
`fold_in(s, ACCEPT_STREAM)`. Index i is decided in exactly one round (proposals after a
rejection are discarded and re-drawn next round with the same keys, but nothing that
was emitted depended on them), so a row's output depends only on its own key, prompt
and sampler values, never on its batch-mates. With n samples per prompt the row key of
sample j of prompt i (row i * n + j) is `fold_in(keys[i], j)`, exactly as in `generate`.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample import _validation as _val
from jaxsample._decoding import core
from jaxsample._decoding.core import LanguageModel, Outputs
from jaxsample._decoding.drafts import DRAFT_STREAM, DraftContext, PromptLookup, as_draft
from jaxsample._decoding.generate import GenerateOutput
from jaxsample._decoding.loop import DecodeStep
from jaxsample._filters import sampling as _sampling
from jaxsample._filters.sampling import fold_in_rows
from jaxsample._processors.base import Chain
from jaxsample._step.step import process_and_draw

__all__ = ["PromptLookup", "SpeculativeOutput", "SpeculativeStats", "speculative_generate",
           "DRAFT_STREAM", "ACCEPT_STREAM", "MAX_DRAFT_TOKENS"]

#: fold_in data of the acceptance uniform (processors use 1..M, the target's draw 0, exactly
#: as in `sample_step`; the draft's draw DRAFT_STREAM).
ACCEPT_STREAM = 0x7FFFFFFF

#: The most tokens a round may draft (`num_draft_tokens`). The draft's proposal is unrolled
#: k times in the compiled program and the target scores [B, k + 1, V] logits a round, so
#: compile time and memory grow with k (k = 10000 took 83 s and 6.3 GB for 16 tokens);
#: a draft accepting each token with probability a gains less than 1 / (1 - a) tokens a
#: round however large k is (docs/limits.md).
MAX_DRAFT_TOKENS = 64

#: The speculative loop's own step for index 0: the chain, then `sample` (never the fused
#: GPU step), as the verification rounds process the target's logits.
_unfused_step = functools.partial(process_and_draw, draw=_sampling.sample)


class SpeculativeStats(NamedTuple):
    """Per-row counters, int32 [B] each. Only what a row could emit counts: a round near
    the end of a row (max_new_tokens, or a stop token) offers fewer than k positions.

    Attributes:
      rounds: target calls (verification rounds) while the row was active; the first
        token (from the prefill) is not a round.
      drafted: draft tokens proposed to the row at positions it could still emit: at
        most min(k, max_new_tokens - generated) per round, none after the row's last
        token (a stop ends it; proposals past the end count as nothing), 0 in a
        prompt-lookup round without a match.
      accepted: drafted tokens accepted *and emitted* (a rejection ends a round's count;
        so does a stop token or the row's last position).
      emitted: tokens the rounds emitted (accepted drafts and the extra token of each
        round): the row's length minus the first token.
    """

    rounds: jax.Array
    drafted: jax.Array
    accepted: jax.Array
    emitted: jax.Array

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted over the whole batch (a host float)."""
        drafted = int(np.sum(np.asarray(self.drafted)))
        return float(np.sum(np.asarray(self.accepted))) / drafted if drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted (after the first) per target call, over the whole batch."""
        rounds = int(np.sum(np.asarray(self.rounds)))
        return float(np.sum(np.asarray(self.emitted))) / rounds if rounds else float("nan")


class SpeculativeOutput(NamedTuple):
    """`speculative_generate`'s result: the same `GenerateOutput` as `generate`, and stats."""

    output: GenerateOutput
    stats: SpeculativeStats


def _uniforms(keys: jax.Array, length: jax.Array, k: int) -> jax.Array:
    """Acceptance uniforms float32 [B, k]: U[0, 1) from fold_in(fold_in(keys[b], length[b] + j), ACCEPT_STREAM)."""
    def one(key, start):
        draw = lambda j: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, start + j), ACCEPT_STREAM))
        return jax.vmap(draw)(jnp.arange(k))
    return jax.vmap(one)(keys, length)


def _select_rows(stacked: Any, index: jax.Array) -> Any:
    """Leaves [T, B, ...] -> [B, ...], row b taking entry index[b]."""
    def take(x):
        idx = index.reshape((1, -1) + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=0)[0]
    return jax.tree.map(take, stacked)


def _process_verified(sampler, t_logits, state, drafted, keys, length):
    """The target's processed logits at the k + 1 verified positions, [k+1, B, V], and the
    sampler state before each of them (leaves [k+1, B, ...]; the state advances along the
    drafted tokens). A stateless chain processes all positions in one batched call."""
    b, t, _ = t_logits.shape
    index = length[:, None] + jnp.arange(t)[None, :]  # generated index of each position [B, k+1]
    if not sampler.stateful:
        # vmap over positions (not a [B * (k+1)] reshape): per-row values stay aligned with rows.
        apply = lambda logits_j, index_j: sampler.apply(logits_j, state, core.step_keys(keys, index_j))
        processed = jax.vmap(apply, in_axes=(1, 1))(t_logits, index)  # [k+1, B, V]
        return processed, jax.tree.map(lambda x: jnp.broadcast_to(x, (t,) + x.shape), state)

    def process(state, xs):
        logits_j, index_j, token_j = xs
        processed = sampler.apply(logits_j, state, core.step_keys(keys, index_j))
        return sampler.update(state, token_j, processed), (processed, state)

    tokens = jnp.concatenate([drafted, jnp.full((b, 1), -1, jnp.int32)], axis=1)  # no update after the last
    _, (processed, states) = jax.lax.scan(process, state, (jnp.moveaxis(t_logits, 1, 0), index.T, tokens.T))
    return processed, states


class _Round(NamedTuple):
    """The speculative loop's carry: the decode core's carry plus the round's own buffers."""

    s: core.DecodeState  #: token / position unused: the last committed token is read from seq
    seq: jax.Array  #: int32 [B, W] prompt + committed tokens (-1 after)
    draft_state: Any
    outputs: Outputs
    stats: SpeculativeStats


def _impl(model, draft, prompt_tokens, prompt_lengths, keys, sampler, stops, pad_id, *, max_new_tokens, k, n=1,
          top_logprobs=0, prompt_logprobs=False):
    n_max = max_new_tokens
    p = prompt_tokens.shape[1]
    v = model.vocab_size
    width = p + n_max + k + 1  # context buffer and cache length: room for a full last round
    draft = as_draft(draft)
    limit = jnp.asarray(n_max, jnp.int32)
    # Index 0 from the prefill logits, exactly like generate's first step (n samples per
    # prompt: each prompt prefilled once, logits and caches repeated, as in generate).
    step0 = DecodeStep(model, sampler, keys, stops, pad_id, limit, _unfused_step, top_logprobs)
    s, outputs, prompt_lp = step0.start(prompt_tokens, prompt_lengths, max_new_tokens=n_max + k + 1,
                                        cache_size=width, n=n, prompt_logprobs=prompt_logprobs,
                                        width=n_max)
    draft_state = draft.start(prompt_tokens, prompt_lengths, width, n)
    prompt_tokens = jnp.repeat(prompt_tokens, n, axis=0)  # [B * n, P], row i * n + j = prompt i
    prompt_lengths = jnp.repeat(prompt_lengths, n, axis=0)
    b = prompt_tokens.shape[0]
    cols = jnp.arange(width)[None, :]
    seq = jnp.where(cols < prompt_lengths[:, None], jnp.pad(prompt_tokens, ((0, 0), (0, width - p))), -1)
    seq = seq.at[jnp.arange(b), prompt_lengths].set(jnp.where(s.lengths > 0, outputs.tokens[:, 0], -1))
    zeros = jnp.zeros((b,), jnp.int32)

    def round_(c: _Round) -> _Round:
        s, seq = c.s, c.seq
        length = s.lengths
        # Position of the last committed token, which is not in the target's cache yet (a
        # row that finished with no token at all is clamped: its results are discarded).
        pos = jnp.maximum(prompt_lengths + length - 1, 1)
        # --- draft: k proposals and their distributions q [B, k, V]
        ctx = DraftContext(seq, prompt_lengths + length, length, sampler, s.sampler_state, keys)
        drafted, qs, draft_state = draft.propose(c.draft_state, ctx, k)
        if qs is None:  # a point mass on each proposal
            qs = jax.nn.one_hot(jnp.maximum(drafted, 0), v, dtype=jnp.float32)
        q_valid = drafted >= 0  # a row with no valid proposal proposes nothing acceptable
        qs = jnp.where(q_valid[..., None] & ~jnp.isnan(qs), qs, 0.0)
        drafted = jnp.where(q_valid, drafted, 0)
        # --- target: k + 1 logits in one call, processed with the state along the drafts
        pending = jnp.take_along_axis(seq, pos[:, None], axis=1)
        t_logits, cache = core.extend(model, jnp.concatenate([pending, drafted], axis=1), pos, s.cache)
        processed, states = _process_verified(sampler, t_logits, s.sampler_state, drafted, keys, length)
        ps = jax.nn.softmax(jnp.moveaxis(processed, 0, 1).astype(jnp.float32), axis=-1)  # [B, k+1, V]
        # --- accept / reject
        p_x = jnp.take_along_axis(ps[:, :k], drafted[..., None], axis=-1)[..., 0]  # [B, k]
        q_x = jnp.take_along_axis(qs, drafted[..., None], axis=-1)[..., 0]
        u = _uniforms(keys, length, k)  # [B, k]
        ok = q_valid & (u * q_x < p_x)  # u < min(1, p/q); NaN p (invalid row) rejects
        accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # a in [0, k]
        # --- the extra token: residual at the first rejection, or a bonus draw from p_{k+1}
        p_a = _select_rows(processed, accepted)  # processed target logits at index a [B, V]
        prob_a = jnp.take_along_axis(ps, accepted[:, None, None], axis=1)[:, 0]
        q_a = jnp.take_along_axis(jnp.pad(qs, ((0, 0), (0, 1), (0, 0))), accepted[:, None, None], axis=1)[:, 0]
        residual = jnp.maximum(prob_a - q_a, 0.0)
        residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, prob_a)
        extra_logits = jnp.where((accepted == k)[:, None], p_a, jnp.log(residual))
        extra = _sampling._sample(fold_in_rows(core.step_keys(keys, length + accepted), 0), extra_logits)
        # --- emit candidates c_0 .. c_a in order, by the one emit rule
        j = jnp.arange(k + 1)[None, :]
        cand = jnp.where(j < accepted[:, None], jnp.pad(drafted, ((0, 0), (0, 1))), extra[:, None])  # [B, k+1]
        safe = jnp.clip(cand, 0, v - 1)
        raw_j = jnp.take_along_axis(jax.nn.log_softmax(t_logits, -1), safe[..., None], -1)[..., 0]
        proc_j = jnp.take_along_axis(jnp.log(ps), safe[..., None], -1)[..., 0]
        top_j = core.top_logprobs_of(t_logits, top_logprobs) if top_logprobs else None  # [B, k+1, K]

        def emit_one(carry, xs):
            done, lengths, finish, outputs, seq = carry
            jj, token, raw, proc, top = xs
            e = core.emit(token, done, lengths, finish, stops=stops, pad_id=pad_id, limit=limit,
                          offered=jj <= accepted)
            outputs = outputs.write(lengths, e, raw, proc, top)
            dest = jnp.where(e.emitted, prompt_lengths + lengths, width)  # width: dropped
            seq = seq.at[jnp.arange(b), dest].set(token, mode="drop")
            return (e.done, e.lengths, e.finish, outputs, seq), None

        xs = (jnp.arange(k + 1), cand.T, raw_j.T, proc_j.T,
              None if top_j is None else tuple(jnp.moveaxis(x, 1, 0) for x in top_j))
        (done, lengths, finish, outputs, seq), _ = jax.lax.scan(
            emit_one, (s.done, s.lengths, s.finish, c.outputs, seq), xs)
        # --- sampler state after the emitted tokens (frozen for rows that were done)
        new_state = sampler.update(_select_rows(states, accepted), extra, p_a)
        state = core.freeze(new_state, s.sampler_state, s.done)
        # --- stats: only positions the row could emit (its remaining length) count
        active = (~s.done).astype(jnp.int32)
        budget = jnp.minimum(k, jnp.maximum(limit - length, 0))  # [B] drafts that could be emitted
        offered = jnp.sum((j[:, :k] < budget[:, None]) & q_valid, axis=1).astype(jnp.int32)
        emitted = lengths - length  # 0 for rows that were done
        # A row that ended this round (a stop) never needed the proposals after its last token.
        offered = jnp.where(done & ~s.done, jnp.minimum(offered, emitted), offered)
        stats = SpeculativeStats(c.stats.rounds + active, c.stats.drafted + offered * active,
                                 c.stats.accepted + jnp.minimum(accepted, emitted) * active,
                                 c.stats.emitted + emitted * active)
        s = s._replace(cache=cache, sampler_state=state, done=done, lengths=lengths, finish=finish)
        return _Round(s, seq, draft_state, outputs, stats)

    carry = _Round(s, seq, draft_state, outputs, SpeculativeStats(zeros, zeros, zeros, zeros))
    out = jax.lax.while_loop(lambda c: ~jnp.all(c.s.done), round_, carry)
    o = out.outputs
    result = GenerateOutput(o.tokens, out.s.lengths, o.logprobs_raw, o.logprobs_processed, out.s.finish,
                            o.top_token_ids, o.top_logprobs, prompt_lp)
    return SpeculativeOutput(result, out.stats)


_STATIC = ("max_new_tokens", "k", "n", "top_logprobs", "prompt_logprobs")


@functools.lru_cache(maxsize=None)
def _jitted(static_model: bool, static_draft: bool):
    argnums = tuple(i for i, s in ((0, static_model), (1, static_draft)) if s)
    return jax.jit(_impl, static_argnums=argnums, static_argnames=_STATIC)


def speculative_generate(model: LanguageModel, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
                         keys: jax.Array, *, max_new_tokens: int, draft: Any,
                         num_draft_tokens: int = 4, sampler: Chain | None = None, stop_ids: Sequence[int] = (),
                         pad_id: int = 0, n: int = 1, top_logprobs: int = 0,
                         prompt_logprobs: bool = False, memory_limit: float | None = None) -> SpeculativeOutput:
    """`generate` with exact speculative decoding: same output distribution, fewer target calls.

    Each round the draft proposes `num_draft_tokens` (k) tokens per row, the target
    scores all of them in one call (`model.extend`, else k + 1 `decode` calls) and a
    prefix is accepted by rejection sampling on the processed distributions (see the
    module docstring for the math and the key layout). Greedy (temperature 0) output
    equals greedy `generate` token for token; sampled output has the distribution of
    `generate` with the same sampler, but not the same tokens for the same keys.

    Args:
      model: the target `LanguageModel` (e.g. `models.DecoderLM`, which has `extend`).
      prompt_tokens: int [B, P], right-padded prompts.
      prompt_lengths: int [B], real tokens per row, in [1, P].
      keys: B PRNG keys, one per row (typed or raw uint32 [B, 2]).
      max_new_tokens: N, static.
      draft: a `LanguageModel` with the target's vocabulary (a pytree or hashable, like
        `model`), `PromptLookup(max_ngram)`, an `NGramDraft` table built for the
        target's vocabulary, or any object implementing the draft protocol
        (`start`, `propose`: :mod:`jaxsample._decoding.drafts`).
      num_draft_tokens: k in [1, MAX_DRAFT_TOKENS = 64], static.
      sampler: a `Chain` (None: greedy); applied to the target's and the draft's logits
        with the same keys and state updates. Stateful processors are initialised with
        `max_new_tokens=N + k + 1` (room for the drafted tokens of the last round).
      stop_ids: token ids that end a row (included in its output).
      pad_id: written after a row has finished.
      n: samples per prompt, static, as in `generate`: B * n output rows, prompt-major;
        sample j of prompt i uses the row key `fold_in(keys[i], j)` (n = 1: `keys` as
        given), so it is reproduced alone by passing that key with n = 1. Each prompt
        is prefilled once (target and draft) and its caches copied to its samples.
        Per-row sampler values have B * n entries.
      top_logprobs: K, static, as in `generate`: the K most likely tokens at every
        emitted index with their raw log-probs (`top_token_ids`, `top_logprobs`,
        [B * n, N, K]), taken from the target's logits of the verification call that
        decided that index (index 0: the prefill's).
      prompt_logprobs: static, as in `generate`: the raw log-prob of every prompt token
        given its prefix ([B, P], one row per prompt), from the target's prefill (the
        target needs `prefill_all`).
      memory_limit: as in `generate` (the target's cache holds P + N + k + 1 positions;
        a model draft's cache is not counted).

    Returns:
      `SpeculativeOutput(output, stats)`: `output` is the `GenerateOutput` of `generate`
      (tokens, lengths, raw and processed log-probs, finish reasons, top-N and prompt
      log-probs when requested; `stats` None), `stats` the per-row rounds / drafted /
      accepted / emitted counts (`SpeculativeStats`). `logprobs_processed` is the log-prob of each token under the
      processed target distribution p it is distributed by (the token may come from the
      draft or from the residual, but its marginal is p, as in `generate`).

    Example:
      >>> import jax, jax.numpy as jnp, jaxsample as js
      >>> from models import DecoderLM, preset
      >>> lm = DecoderLM.random(preset("tiny"), jax.random.key(0))
      >>> out, stats = js.speculative_generate(lm, jnp.array([[256, 72, 105, 72, 105]]), jnp.array([5]),
      ...                                      jax.random.split(jax.random.key(1), 1), max_new_tokens=8,
      ...                                      draft=js.PromptLookup(2), num_draft_tokens=3)
      >>> out.tokens.shape
      (1, 8)
    """
    k = _val.check_int("num_draft_tokens", num_draft_tokens, expected="an int >= 1")
    if k > MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens={k} exceeds the bound MAX_DRAFT_TOKENS="
                         f"{MAX_DRAFT_TOKENS} (docs/limits.md): each round compiles k proposal steps and "
                         f"scores k + 1 tokens, and acceptance falls geometrically with k")
    _check_draft(model, draft)
    prompts = core.prepare_prompts(model, prompt_tokens, prompt_lengths, max_new_tokens=max_new_tokens,
                                   stop_ids=stop_ids, pad_id=pad_id)
    sampling = core.prepare_sampling(model, keys, prompts.tokens.shape[0], sampler=sampler, n=n,
                                     top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
                                     fn="speculative_generate")
    rows, p = int(sampling.keys.shape[0]), int(prompts.tokens.shape[1])
    core.check_memory(model, fn="speculative_generate", max_new_tokens=prompts.max_new_tokens, rows=rows,
                      cache_size=p + prompts.max_new_tokens + k + 1, width=prompts.max_new_tokens,
                      top_logprobs=sampling.top_logprobs, prompt_rows=int(prompts.tokens.shape[0]), prompt_len=p,
                      prompt_logprobs=sampling.prompt_logprobs,
                      extra_bytes=3 * rows * (k + 1) * model.vocab_size * 4,  # the round's logits / probabilities
                      memory_limit=memory_limit)
    run = _jitted(not core.is_pytree(model), not core.is_pytree(draft))
    return run(model, draft, prompts.tokens, prompts.lengths, sampling.keys, sampling.sampler, prompts.stops,
               prompts.pad_id, max_new_tokens=prompts.max_new_tokens, k=k, n=sampling.n,
               top_logprobs=sampling.top_logprobs, prompt_logprobs=sampling.prompt_logprobs)


def _check_draft(model: LanguageModel, draft: Any) -> None:
    """A protocol draft must share the target's vocabulary when it has one; a model draft
    must be a `LanguageModel` with the target's vocabulary."""
    if callable(getattr(draft, "propose", None)):
        size = getattr(draft, "vocab_size", None)
        if size is not None and size != model.vocab_size:
            raise ValueError(f"draft: {type(draft).__name__} vocab_size {size} != target vocab_size "
                             f"{model.vocab_size}: build the draft with the target's tokenizer")
        return
    for name in ("init_cache", "prefill", "decode"):
        if not callable(getattr(draft, name, None)):
            raise ValueError(f"draft must be a LanguageModel (init_cache, prefill, decode), "
                             f"PromptLookup(n) or NGramDraft; {type(draft).__name__} has no {name}()")
    if draft.vocab_size != model.vocab_size:
        raise ValueError(f"draft vocab_size {draft.vocab_size} != target vocab_size {model.vocab_size}: "
                         f"the draft must share the target's tokenizer")
