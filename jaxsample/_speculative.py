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
  * `NGramDraft` (jaxsample/_ngram.py): a corpus n-gram table chained k times (and
    optionally prompt lookup first); q is a point mass, looked up on device.

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

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample import _sampling
from jaxsample._chain import Chain, Temperature, chain, init_state
from jaxsample._ngram import NGramDraft
from jaxsample._generate import (FinishReason, GenerateOutput, LanguageModel, _as_int, _is_pytree, _prefill_samples,
                                 _row_keys, _sample_keys, _top_logprobs, _validate, _validate_outputs)

__all__ = ["PromptLookup", "SpeculativeOutput", "SpeculativeStats", "speculative_generate",
           "DRAFT_STREAM", "ACCEPT_STREAM"]

#: fold_in data of the draft's draw and of the acceptance uniform (processors use 1..M, the
#: target's draw 0, exactly as in `sample_step`).
DRAFT_STREAM = 0x7FFFFFFE
ACCEPT_STREAM = 0x7FFFFFFF


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
        if isinstance(self.max_ngram, bool) or not isinstance(self.max_ngram, (int, np.integer)) \
                or self.max_ngram < 1:
            raise ValueError(f"PromptLookup: max_ngram must be an int >= 1, got {self.max_ngram!r}")
        if isinstance(self.min_ngram, bool) or not isinstance(self.min_ngram, (int, np.integer)) \
                or not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"PromptLookup: min_ngram must be an int in [1, max_ngram={self.max_ngram}], "
                             f"got {self.min_ngram!r}")


class SpeculativeStats(NamedTuple):
    """Per-row counters, int32 [B] each.

    Attributes:
      rounds: target calls (verification rounds) while the row was active; the first
        token (from the prefill) is not a round.
      drafted: draft tokens proposed to the row (k per round; 0 in a prompt-lookup round
        without a match).
      accepted: draft tokens accepted (a rejection ends a round's count).
    """

    rounds: jax.Array
    drafted: jax.Array
    accepted: jax.Array

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted over the whole batch (a host float)."""
        drafted = int(np.sum(np.asarray(self.drafted)))
        return float(np.sum(np.asarray(self.accepted))) / drafted if drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Generated tokens (after the first) per target call, over the whole batch."""
        rounds = int(np.sum(np.asarray(self.rounds)))
        return float(np.sum(np.asarray(self.accepted)) + rounds) / rounds if rounds else float("nan")


class SpeculativeOutput(NamedTuple):
    """`speculative_generate`'s result: the same `GenerateOutput` as `generate`, and stats."""

    output: GenerateOutput
    stats: SpeculativeStats


def extend(model: LanguageModel, tokens: jax.Array, positions: jax.Array, cache: Any):
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


def _keys_at(keys: jax.Array, index: jax.Array, stream: int | None) -> jax.Array:
    """Keys [B] -> fold_in(fold_in(keys[b], index[b]), stream) per row (stream None: not folded)."""
    def one(k, i):
        s = jax.random.fold_in(k, i)
        return s if stream is None else jax.random.fold_in(s, stream)
    return jax.vmap(one)(keys, index)


def _probs(processed: jax.Array) -> jax.Array:
    """softmax of processed logits in float32; an invalid row (no finite value, NaN) gives NaN."""
    return jax.nn.softmax(processed.astype(jnp.float32), axis=-1)


def _lookup(seq: jax.Array, length: jax.Array, max_ngram: int, k: int, min_ngram: int = 1):
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
        apply = lambda logits_j, index_j: sampler.apply(logits_j, state, _keys_at(keys, index_j, None))
        processed = jax.vmap(apply, in_axes=(1, 1))(t_logits, index)  # [k+1, B, V]
        return processed, jax.tree.map(lambda x: jnp.broadcast_to(x, (t,) + x.shape), state)

    def process(state, xs):
        logits_j, index_j, token_j = xs
        processed = sampler.apply(logits_j, state, _keys_at(keys, index_j, None))
        return sampler.update(state, token_j, processed), (processed, state)

    tokens = jnp.concatenate([drafted, jnp.full((b, 1), -1, jnp.int32)], axis=1)  # no update after the last
    _, (processed, states) = jax.lax.scan(process, state, (jnp.moveaxis(t_logits, 1, 0), index.T, tokens.T))
    return processed, states


def _draft_model_proposals(draft, dcache, seq, pos, length, sampler, state, keys, k):
    """k draws from the draft model: (tokens [B, k], q probs [B, k, V], draft cache)."""
    prev = jnp.take_along_axis(seq, jnp.stack([pos - 1, pos], axis=1), axis=1)  # [B, 2]
    logits, dcache = extend(draft, prev, pos - 1, dcache)
    logits = logits[:, -1]

    def draw(logits, state, j):
        proc_keys = _keys_at(keys, length + j, None)
        processed = sampler.apply(logits, state, proc_keys)
        token = _sampling._sample(_keys_at(keys, length + j, DRAFT_STREAM), processed)
        return token, sampler.update(state, token, processed), _probs(processed)

    def body(carry, j):
        token, cache, state = carry
        logits, cache = draft.decode(jnp.maximum(token, 0), pos + j, cache)
        token, state, q = draw(logits, state, j)
        return (token, cache, state), (token, q)

    token, state, q = draw(logits, state, 0)
    (_, dcache, _), (tokens, qs) = jax.lax.scan(body, (token, dcache, state), jnp.arange(1, k))
    tokens = jnp.concatenate([token[:, None], jnp.moveaxis(tokens, 0, 1)], axis=1)  # [B, k]
    qs = jnp.concatenate([q[:, None], jnp.moveaxis(qs, 0, 1)], axis=1)  # [B, k, V]
    return tokens, qs, dcache


def _impl(model, draft, prompt_tokens, prompt_lengths, keys, sampler, stops, pad_id, *, max_new_tokens, k, n=1,
          top_logprobs=0, prompt_logprobs=False):
    n_max = max_new_tokens
    p = prompt_tokens.shape[1]
    v = model.vocab_size
    width = p + n_max + k + 1  # context buffer and cache length: room for a full last round
    # n samples per prompt: each prompt prefilled once, logits and caches repeated (as in generate)
    logits, cache, prompt_lp = _prefill_samples(model, prompt_tokens, prompt_lengths, width, n, prompt_logprobs)
    lookup = isinstance(draft, PromptLookup)
    ngram = isinstance(draft, NGramDraft)
    dcache = () if lookup or ngram else _prefill_samples(draft, prompt_tokens, prompt_lengths, width, n, False)[1]
    prompt_tokens = jnp.repeat(prompt_tokens, n, axis=0)  # [B * n, P], row i * n + j = prompt i
    prompt_lengths = jnp.repeat(prompt_lengths, n, axis=0)
    b = prompt_tokens.shape[0]
    state = init_state(sampler, prompt_tokens, prompt_lengths, v, max_new_tokens=n_max + k + 1)

    # Index 0 from the prefill logits, exactly like generate's first step.
    key0 = _keys_at(keys, jnp.zeros((b,), jnp.int32), None)
    processed = sampler.apply(logits, state, key0)
    first = _sampling._sample(_keys_at(keys, jnp.zeros((b,), jnp.int32), 0), processed)
    state = sampler.update(state, first, processed)
    invalid = first < 0
    stopped = ~invalid & jnp.isin(first, stops)
    done = invalid | stopped | (n_max == 1)
    finish = jnp.where(invalid, FinishReason.NO_VALID_TOKEN,
                       jnp.where(stopped, FinishReason.STOP, FinishReason.LENGTH)).astype(jnp.int32)
    length = (~invalid).astype(jnp.int32)
    cols = jnp.arange(width)[None, :]
    seq = jnp.where(cols < prompt_lengths[:, None], jnp.pad(prompt_tokens, ((0, 0), (0, width - p))), -1)
    seq = seq.at[jnp.arange(b), prompt_lengths].set(jnp.where(invalid, -1, first))
    out_w = n_max + k + 1
    raw = jnp.zeros((b, out_w), jnp.float32).at[:, 0].set(
        jnp.where(invalid, 0.0, _sampling._token_logprobs(logits, first)))
    proc_lp = jnp.zeros((b, out_w), jnp.float32).at[:, 0].set(
        jnp.where(invalid, 0.0, _sampling._token_logprobs(processed, first)))
    # top-N raw log-probs per emitted index (`()` unless requested): ids, log-probs [B, out_w, K]
    tops = () if not top_logprobs else tuple(
        jnp.zeros((b, out_w, top_logprobs), x.dtype).at[:, 0].set(x) for x in _top_logprobs(logits, top_logprobs))
    zeros = jnp.zeros((b,), jnp.int32)
    stats = SpeculativeStats(zeros, zeros, zeros)

    def round_(carry):
        seq, length, done, finish, cache, dcache, state, raw, proc_lp, tops, stats = carry
        # Position of the last committed token, which is not in the target's cache yet (a
        # row that finished with no token at all is clamped: its results are discarded).
        pos = jnp.maximum(prompt_lengths + length - 1, 1)
        # --- draft: k proposals and their distributions q [B, k, V]
        if lookup:
            drafted, found = _lookup(seq, prompt_lengths + length, draft.max_ngram, k, draft.min_ngram)
            qs = jax.nn.one_hot(drafted, v, dtype=jnp.float32)
            drafted = jnp.where(found[:, None], drafted, -1)  # no match: nothing to accept
        elif ngram:
            drafted = draft.propose(seq, prompt_lengths + length, k)
            qs = jax.nn.one_hot(drafted, v, dtype=jnp.float32)
        else:
            drafted, qs, dcache = _draft_model_proposals(draft, dcache, seq, pos, length, sampler, state, keys, k)
        q_valid = drafted >= 0  # a draft row with no valid token proposes nothing acceptable
        qs = jnp.where(q_valid[..., None] & ~jnp.isnan(qs), qs, 0.0)
        drafted = jnp.where(q_valid, drafted, 0)
        # --- target: k + 1 logits in one call, processed with the state along the drafts
        pending = jnp.take_along_axis(seq, pos[:, None], axis=1)
        t_logits, cache = extend(model, jnp.concatenate([pending, drafted], axis=1), pos, cache)  # [B, k+1, V]
        processed, states = _process_verified(sampler, t_logits, state, drafted, keys, length)
        ps = _probs(jnp.moveaxis(processed, 0, 1))  # [B, k+1, V]
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
        extra = _sampling._sample(_keys_at(keys, length + accepted, 0), extra_logits)
        # --- emit candidates c_0 .. c_a, cut at max_new_tokens, a stop id or an invalid draw
        j = jnp.arange(k + 1)[None, :]
        cand = jnp.where(j < accepted[:, None], jnp.pad(drafted, ((0, 0), (0, 1))), extra[:, None])  # [B, k+1]
        in_round = (j <= accepted[:, None]) & (length[:, None] + j < n_max)
        bad = (j == accepted[:, None]) & (extra[:, None] < 0)
        stop = jnp.isin(cand, stops) & ~bad
        ends = in_round & (bad | stop)
        end = jnp.min(jnp.where(ends, j, k + 1), axis=1)  # first stop / invalid index (k+1: none)
        emit = in_round & (j <= end[:, None]) & ~bad & ~done[:, None]
        n_emit = jnp.sum(emit, axis=1)
        hit_bad = jnp.any(ends & bad & (j == end[:, None]), axis=1) & ~done
        hit_stop = jnp.any(ends & stop & (j == end[:, None]), axis=1) & ~done
        new_length = length + n_emit
        new_done = done | hit_bad | hit_stop | (new_length >= n_max)
        finish = jnp.where(hit_bad, FinishReason.NO_VALID_TOKEN, jnp.where(hit_stop, FinishReason.STOP, finish))
        # --- write tokens and log-probs at generated indices length + j
        rows = jnp.arange(b)[:, None]
        dest = jnp.where(emit, prompt_lengths[:, None] + length[:, None] + j, width)  # width: dropped
        seq = seq.at[rows, dest].set(cand, mode="drop")
        out_dest = jnp.where(emit, length[:, None] + j, out_w)
        safe = jnp.clip(cand, 0, v - 1)
        raw_j = jnp.take_along_axis(jax.nn.log_softmax(t_logits, -1), safe[..., None], -1)[..., 0]
        proc_j = jnp.take_along_axis(jnp.log(ps), safe[..., None], -1)[..., 0]
        raw = raw.at[rows, out_dest].set(raw_j, mode="drop")
        proc_lp = proc_lp.at[rows, out_dest].set(proc_j, mode="drop")
        if top_logprobs:  # the top-N of the verification call's raw logits [B, k+1, K]
            tops = tuple(x.at[rows, out_dest].set(x_j, mode="drop")
                         for x, x_j in zip(tops, _top_logprobs(t_logits, top_logprobs)))
        # --- sampler state after the emitted tokens (frozen for rows that are done)
        new_state = sampler.update(_select_rows(states, accepted), extra, p_a)
        keep = lambda new, old: jnp.where(new_done.reshape(new_done.shape + (1,) * (new.ndim - 1)), old, new)
        state = jax.tree.map(keep, new_state, state)
        active = (~done).astype(jnp.int32)
        proposed = active * q_valid[:, 0].astype(jnp.int32)  # rows that had a proposal this round
        stats = SpeculativeStats(stats.rounds + active, stats.drafted + k * proposed,
                                 stats.accepted + accepted * active)
        return seq, new_length, new_done, finish, cache, dcache, state, raw, proc_lp, tops, stats

    carry = (seq, length, done, finish, cache, dcache, state, raw, proc_lp, tops, stats)
    seq, length, done, finish, *_, raw, proc_lp, tops, stats = jax.lax.while_loop(
        lambda c: ~jnp.all(c[2]), round_, carry)
    idx = jnp.arange(n_max)[None, :]
    emitted = idx < length[:, None]
    tokens = jnp.take_along_axis(seq, jnp.minimum(prompt_lengths[:, None] + idx, width - 1), axis=1)
    top_ids, top_lp = (None, None) if not top_logprobs else (
        jnp.where(emitted[..., None], tops[0][:, :n_max], pad_id),
        jnp.where(emitted[..., None], tops[1][:, :n_max], 0.0))
    out = GenerateOutput(jnp.where(emitted, tokens, pad_id), length, jnp.where(emitted, raw[:, :n_max], 0.0),
                         jnp.where(emitted, proc_lp[:, :n_max], 0.0), finish, top_ids, top_lp, prompt_lp)
    return SpeculativeOutput(out, stats)


_STATIC = ("max_new_tokens", "k", "n", "top_logprobs", "prompt_logprobs")


@functools.lru_cache(maxsize=None)
def _jitted(static_model: bool, static_draft: bool):
    argnums = tuple(i for i, s in ((0, static_model), (1, static_draft)) if s)
    return jax.jit(_impl, static_argnums=argnums, static_argnames=_STATIC)


def speculative_generate(model: LanguageModel, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
                         keys: jax.Array, *, max_new_tokens: int, draft: LanguageModel | PromptLookup,
                         num_draft_tokens: int = 4, sampler: Chain | None = None, stop_ids: Sequence[int] = (),
                         pad_id: int = 0, n: int = 1, top_logprobs: int = 0,
                         prompt_logprobs: bool = False) -> SpeculativeOutput:
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
        `model`), `PromptLookup(max_ngram)`, or an `NGramDraft` table built for the
        target's vocabulary.
      num_draft_tokens: k >= 1, static.
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

    Returns:
      `SpeculativeOutput(output, stats)`: `output` is the `GenerateOutput` of `generate`
      (tokens, lengths, raw and processed log-probs, finish reasons, top-N and prompt
      log-probs when requested; `stats` None), `stats` the per-row rounds / drafted /
      accepted counts. `logprobs_processed` is the log-prob of each token under the
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
    prompt_tokens = prompt_tokens if isinstance(prompt_tokens, jax.Array) else jnp.asarray(prompt_tokens)
    prompt_lengths = prompt_lengths if isinstance(prompt_lengths, jax.Array) else jnp.asarray(prompt_lengths)
    stop_ids = tuple(_as_int("stop_ids", s) for s in np.asarray(stop_ids).reshape(-1).tolist())
    pad_id = _as_int("pad_id", pad_id)
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, (int, np.integer)) \
            or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be an int >= 1, got {num_draft_tokens!r}")
    if isinstance(draft, NGramDraft):
        if draft.vocab_size != model.vocab_size:
            raise ValueError(f"draft: NGramDraft vocab_size {draft.vocab_size} != target vocab_size "
                             f"{model.vocab_size}: build the table with the target's tokenizer")
    elif not isinstance(draft, PromptLookup):
        for name in ("init_cache", "prefill", "decode"):
            if not callable(getattr(draft, name, None)):
                raise ValueError(f"draft must be a LanguageModel (init_cache, prefill, decode), "
                                 f"PromptLookup(n) or NGramDraft; {type(draft).__name__} has no {name}()")
        if draft.vocab_size != model.vocab_size:
            raise ValueError(f"draft vocab_size {draft.vocab_size} != target vocab_size {model.vocab_size}: "
                             f"the draft must share the target's tokenizer")
    p = prompt_tokens.shape[-1] if prompt_tokens.ndim else 0
    _validate(prompt_tokens, prompt_lengths, max_new_tokens, p + max_new_tokens, model.vocab_size, stop_ids)
    _validate_outputs(model, n, top_logprobs, prompt_logprobs)
    keys = _row_keys(keys, prompt_tokens.shape[0])
    if n > 1:
        keys = _sample_keys(keys, n)  # row i * n + j: fold_in(keys[i], j), as in generate
    sampler = chain(Temperature(0.0)) if sampler is None else sampler
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    run = _jitted(not _is_pytree(model), not _is_pytree(draft))
    return run(model, draft, prompt_tokens.astype(jnp.int32), prompt_lengths.astype(jnp.int32), keys, sampler,
               stops, jnp.asarray(pad_id, jnp.int32), max_new_tokens=int(max_new_tokens), k=int(num_draft_tokens),
               n=int(n), top_logprobs=int(top_logprobs), prompt_logprobs=bool(prompt_logprobs))
