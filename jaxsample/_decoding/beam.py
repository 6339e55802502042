"""Beam search in one jitted `lax.while_loop`, with the semantics of transformers'.

Every prompt keeps `K = num_beams` running beams and `K` finished hypotheses. One step,
for each prompt (N = max_new_tokens, V = vocab size, C = max(2, 1 + len(stop_ids)) * K):

    acc[k, v]   = running_score[k] + log_softmax(logits[k])[v]            # [K, V]
    top C of acc (over K * V)  ->  candidates (parent beam, token, score) # [C]
    hit[c]      = token[c] in stop_ids  or  this is generated token N
    running     = top K of (score - 1e9 * hit)                             # never a finished one
    finished    = top K of finished  +  {score / gen_len ** length_penalty : c < K and hit[c]}
    KV cache    = cache[parent of each running beam]                       # reordered

Keeping C > K candidates guarantees K unfinished ones to continue with. Only the best K
candidates of a step may finish (a stop token ranked below K is dropped, as in
transformers). A hypothesis' score is its summed log-probability divided by
`gen_len ** length_penalty`, gen_len = generated tokens including the stop token.

A prompt stops changing once no running beam can beat its worst finished hypothesis
(`early_stopping`, below) or, with `early_stopping=True`, once it has K finished
hypotheses; the loop exits when every prompt has stopped, or after N steps. This is
transformers' `_beam_search` (read from transformers 5.24) step for step, float32
throughout, so sequences and scores agree with `generate(num_beams=K, do_sample=False)`.
Prompts are independent: a prompt's result does not depend on its batch-mates (transformers
runs until every prompt has stopped, but a stopped prompt's hypotheses no longer change).

`early_stopping` decides when "no running beam can beat the worst finished one":
  * False (transformers' default): compare the best running beam's score as if it ended
    now, `running / gen_len ** length_penalty`, a heuristic;
  * "never": the same with the most favourable length: `N` when length_penalty > 0
    (longer is better), else now; the canonical beam search with length_penalty 0;
  * True: additionally stop a prompt as soon as it has K finished hypotheses.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample._decoding import core
from jaxsample._decoding.core import FinishReason, LanguageModel
from jaxsample._validation import check_range

_NEG = -1.0e9  # transformers' "impossible" score offset (finite: the masks multiply it by 0 or 1)
_EARLY_STOPPING = {False: 0, True: 1, "never": 2}


class BeamSearchOutput(NamedTuple):
    """Result of `beam_search`: the best `R = num_return_sequences` hypotheses per prompt,
    best first. N = max_new_tokens.

    Attributes:
      sequences: int32 [B, R, N], generated tokens (the prompt excluded); positions at or
        after `lengths` hold `pad_id`.
      lengths: int32 [B, R], generated tokens per hypothesis (a stop token counts).
      scores: float32 [B, R], `sum_logprobs / lengths ** length_penalty` (transformers'
        `sequences_scores`). Only when num_beams exceeds the number of distinct
        hypotheses (tiny vocabularies, or tokens the model gives probability 0) do
        slots hold filler, scored below -1e8 (as in transformers); `valid` says which.
      sum_logprobs: float32 [B, R], summed log-probability of the generated tokens.
      finish_reason: int32 [B, R], `FinishReason.STOP` (ended with a stop id) or
        `FinishReason.LENGTH` (reached max_new_tokens).
      valid: bool [B, R], the slot holds a real hypothesis: one extended only from live
        beams by tokens of finite log-probability. False marks filler (a slot no real
        hypothesis reached: its sequence descends from the -1e9 placeholder beams of
        the first step).
    """

    sequences: jax.Array
    lengths: jax.Array
    scores: jax.Array
    sum_logprobs: jax.Array
    finish_reason: jax.Array
    valid: jax.Array


class _State(NamedTuple):
    """Beam state of B prompts (K running beams, K finished slots each)."""

    run_tokens: jax.Array  # int32 [B, K, N]
    run_scores: jax.Array  # float32 [B, K], summed log-probs (-1e9 offsets on dead beams)
    parent: jax.Array  # int32 [B, K], the beam each running beam extended this step
    fin_tokens: jax.Array  # int32 [B, K, N]
    fin_scores: jax.Array  # float32 [B, K], length-penalised (-1e9 on empty slots)
    fin_sum: jax.Array  # float32 [B, K]
    fin_len: jax.Array  # int32 [B, K]
    fin_stop: jax.Array  # bool [B, K], ended with a stop id
    fin_done: jax.Array  # bool [B, K], slot holds a finished hypothesis
    fin_valid: jax.Array  # bool [B, K], ... descending only from live beams (not filler)
    run_alive: jax.Array  # bool [B, K], running beam descends only from live beams
    open: jax.Array  # bool [B], a running beam may still beat the worst finished one


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, M, ...], idx [B, J] -> x[b, idx[b, j], ...] as [B, J, ...]."""
    return jax.vmap(lambda row, i: row[i])(x, idx)


def _init_state(b: int, k: int, n: int, pad_id: jax.Array) -> _State:
    tokens = jnp.full((b, k, n), pad_id, jnp.int32)
    # Only beam 0 is alive at the start, so the K copies of a prompt do not pick the same tokens.
    run_scores = jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_NEG)
    zeros_b = jnp.zeros((b, k), bool)
    return _State(tokens, run_scores, jnp.zeros((b, k), jnp.int32), tokens, jnp.full((b, k), _NEG, jnp.float32),
                  jnp.zeros((b, k), jnp.float32), jnp.zeros((b, k), jnp.int32), zeros_b, zeros_b, zeros_b,
                  zeros_b.at[:, 0].set(True), jnp.ones((b,), bool))


def _frozen(s: _State, early_stopping: jax.Array) -> jax.Array:
    """bool [B]: prompts whose finished hypotheses can no longer change."""
    return ~s.open | ((early_stopping == 1) & jnp.all(s.fin_done, axis=-1))


def _step(i, logits, s: _State, stops, length_penalty, early_stopping, max_new_tokens) -> _State:
    """Generated index i (0-based) from logits [B * K, V] of the running beams."""
    b, k, _ = s.run_tokens.shape
    v = logits.shape[-1]
    c = max(2, 1 + stops.shape[0]) * k  # transformers' beams_to_keep (stops is (-1,) without stop ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, v)
    acc = (logp + s.run_scores[:, :, None]).reshape(b, k * v)
    top_lp, top_idx = jax.lax.top_k(acc, c)  # [B, C], best first
    parent, token = top_idx // v, top_idx % v
    cand_tokens = _gather(s.run_tokens, parent).at[:, :, i].set(token)  # [B, C, N]
    stopped = jnp.isin(token, stops)
    hit = stopped | (i + 1 >= max_new_tokens)  # [B, C]
    alive = _gather(s.run_alive, parent) & jnp.isfinite(top_lp)  # [B, C]: not descended from a placeholder

    # Running beams: the best K candidates that did not finish.
    run_lp = top_lp + hit.astype(jnp.float32) * _NEG
    nxt = jax.lax.top_k(run_lp, k)[1]  # [B, K]
    run_tokens, run_scores, run_parent = _gather(cand_tokens, nxt), _gather(run_lp, nxt), _gather(parent, nxt)
    run_alive = _gather(alive & ~hit, nxt)

    # Finished hypotheses: merge the best-K candidates that just finished into the K slots.
    gen_len = i + 1
    just = hit & (jnp.arange(c) < k)[None, :]
    cand = top_lp / (jnp.asarray(gen_len, jnp.float32) ** length_penalty)
    full = jnp.all(s.fin_done, axis=-1, keepdims=True) & (early_stopping == 1)
    cand = cand + full.astype(jnp.float32) * _NEG
    cand = cand + (~s.open[:, None]).astype(jnp.float32) * _NEG
    cand = cand + (~just).astype(jnp.float32) * _NEG
    merged = jnp.concatenate([s.fin_scores, cand], axis=1)  # [B, K + C]
    best = jax.lax.top_k(merged, k)[1]
    cat = lambda old, new: _gather(jnp.concatenate([old, new], axis=1), best)
    fin = dict(fin_tokens=cat(s.fin_tokens, cand_tokens), fin_scores=_gather(merged, best),
               fin_sum=cat(s.fin_sum, top_lp), fin_len=cat(s.fin_len, jnp.full((b, c), gen_len, jnp.int32)),
               fin_stop=cat(s.fin_stop, stopped), fin_done=cat(s.fin_done, just),
               fin_valid=cat(s.fin_valid, just & alive))

    # Can the best running beam still beat the worst finished hypothesis?
    never_long = (early_stopping == 2) & (length_penalty > 0)
    best_len = jnp.where(never_long, jnp.float32(max_new_tokens), jnp.asarray(gen_len, jnp.float32))
    best_running = run_scores[:, :1] / best_len ** length_penalty  # [B, 1]
    worst = jnp.where(fin["fin_done"], jnp.min(fin["fin_scores"], axis=1, keepdims=True), _NEG)  # [B, K]
    still_open = s.open & jnp.any(best_running > worst, axis=-1)
    return _State(run_tokens, run_scores, run_parent, **fin, run_alive=run_alive, open=still_open)


def _beam_search_impl(model, prompt_tokens, prompt_lengths, stops, pad_id, length_penalty, early_stopping, *,
                      num_beams, max_new_tokens, cache_size):
    """All K finished hypotheses per prompt, best first (the caller keeps the first R)."""
    b, k, n = prompt_tokens.shape[0], num_beams, max_new_tokens
    # Each prompt is prefilled once; its logits and cache are copied to its K beams (rows b * K + j).
    logits, cache, _ = core.prefill_samples(model, prompt_tokens, prompt_lengths, cache_size, k, False)
    positions = jnp.repeat(prompt_lengths, k)  # [B * K], where generated token 0 goes
    step = lambda i, logits, s: _step(i, logits, s, stops, length_penalty, early_stopping, n)
    state = step(0, logits, _init_state(b, k, n, pad_id))

    def cond(carry):
        i, _, s = carry
        return (i < n) & jnp.any(~_frozen(s, early_stopping))

    def body(carry):
        i, cache, s = carry
        rows = (jnp.arange(b)[:, None] * k + s.parent).reshape(-1)  # [B * K], each beam's parent row
        cache = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cache)
        token = jax.lax.dynamic_index_in_dim(s.run_tokens, i - 1, axis=2, keepdims=False).reshape(-1)
        logits, cache = model.decode(token, positions + i - 1, cache)
        return i + 1, cache, step(i, logits, s)

    _, _, s = jax.lax.while_loop(cond, body, (jnp.asarray(1), cache, state))
    finish = jnp.where(s.fin_stop, FinishReason.STOP, FinishReason.LENGTH).astype(jnp.int32)
    return BeamSearchOutput(s.fin_tokens, s.fin_len, s.fin_scores, s.fin_sum, finish, s.fin_valid)


_STATIC = ("num_beams", "max_new_tokens", "cache_size")
_beam_traced_model = jax.jit(_beam_search_impl, static_argnames=_STATIC)
_beam_static_model = jax.jit(_beam_search_impl, static_argnums=(0,), static_argnames=_STATIC)


def _validate_beam(model, b, num_beams, num_return_sequences, length_penalty, early_stopping, n_stops, cache_size):
    num_beams = core.positive_int("num_beams", num_beams)
    num_return_sequences = core.positive_int("num_return_sequences", num_return_sequences)
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} must be <= num_beams={num_beams}")
    if np.ndim(length_penalty) != 0:
        raise ValueError(f"length_penalty must be a scalar, got shape {np.shape(length_penalty)}")
    check_range("beam_search", "length_penalty", length_penalty, -np.inf, np.inf, low_closed=False,
                high_closed=False)
    if isinstance(early_stopping, str) and early_stopping == "never":
        mode = _EARLY_STOPPING["never"]
    elif isinstance(early_stopping, (bool, np.bool_)):
        mode = _EARLY_STOPPING[bool(early_stopping)]
    else:
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    keep = max(2, 1 + n_stops)
    if keep > model.vocab_size:
        raise ValueError(f"stop_ids: beam search keeps max(2, 1 + len(stop_ids)) = {keep} candidates per beam, "
                         f"more than the vocabulary size {model.vocab_size}")
    if not core.batch_leading_cache(model, b, num_beams, cache_size):
        raise ValueError(f"beam search reorders the KV cache along its leading axis, but "
                         f"{type(model).__name__}.init_cache(B, S) has leaves whose leading axis is not B")
    return num_beams, num_return_sequences, mode


def beam_search(model: LanguageModel, prompt_tokens: jax.Array, prompt_lengths: jax.Array, *, num_beams: int,
                max_new_tokens: int, length_penalty: float = 1.0, early_stopping: bool | str = False,
                num_return_sequences: int = 1, stop_ids: Sequence[int] = (), pad_id: int = 0,
                cache_size: int | None = None, memory_limit: float | None = None) -> BeamSearchOutput:
    """Beam search decoding, deterministic, in one jitted loop (transformers' semantics).

    Each prompt keeps `num_beams` hypotheses; every step extends them by every token,
    keeps the `num_beams` best unfinished continuations by summed log-probability, and
    files the ones that ended (a stop id, or `max_new_tokens`) among the `num_beams`
    best finished hypotheses, scored

        score = sum_t log p(y_t | prompt, y_<t) / len(y) ** length_penalty

    The running beams' KV cache rows are reordered by their parent beam each step, so
    the model's cache leaves must lead with the batch axis (as `models.DecoderLM`'s do).
    The result equals `transformers`' `generate(num_beams=..., do_sample=False,
    length_penalty=..., early_stopping=..., num_return_sequences=..., eos_token_id=stop_ids)`
    for the same model (no logits processors; see the module docstring for the rules).

    Args:
      model: a `LanguageModel` whose cache leaves lead with the batch axis.
      prompt_tokens: int [B, P], right-padded prompts.
      prompt_lengths: int [B], real tokens per row, in [1, P].
      num_beams: K >= 1, static. K = 1 follows the same rules, which equal greedy search
        (what transformers runs for one beam) except with early_stopping="never" and
        length_penalty > 0.
      max_new_tokens: N >= 1, static.
      length_penalty: exponent on the length in the score, traced (changing it does not
        recompile). > 0 favours longer hypotheses, < 0 shorter ones.
      early_stopping: True, False or "never" (transformers' meaning), traced.
      num_return_sequences: R in [1, K]: the R best hypotheses per prompt (changing it
        does not recompile).
      stop_ids: token ids that end a hypothesis (it includes the stop token). Their count
        is static, their values are traced.
      pad_id: fills the sequences after their length.
      cache_size: KV-cache length S (default P + N); must be >= P + N.
      memory_limit: as in `generate` (B * K cache rows; the beams' token buffers).

    Returns:
      A `BeamSearchOutput` with [B, R] hypotheses, best first (`valid` marks the real
      ones when fewer than R exist).

    Example:
      >>> import jax, jax.numpy as jnp, jaxsample as js
      >>> from models import DecoderLM, preset
      >>> lm = DecoderLM.random(preset("tiny"), jax.random.key(0))
      >>> out = js.beam_search(lm, jnp.array([[256, 72, 105]]), jnp.array([3]), num_beams=4,
      ...                      max_new_tokens=8, num_return_sequences=2)
      >>> out.sequences.shape, out.scores.shape
      ((1, 2, 8), (1, 2))
    """
    prompts = core.prepare_prompts(model, prompt_tokens, prompt_lengths, max_new_tokens=max_new_tokens,
                                   stop_ids=stop_ids, pad_id=pad_id, cache_size=cache_size)
    num_beams, num_return_sequences, mode = _validate_beam(model, prompts.tokens.shape[0], num_beams,
                                                           num_return_sequences, length_penalty, early_stopping,
                                                           len(prompts.stop_ids), prompts.cache_size)
    b, c = int(prompts.tokens.shape[0]), max(2, 1 + len(prompts.stop_ids)) * num_beams
    core.check_memory(model, fn="beam_search", max_new_tokens=prompts.max_new_tokens, rows=b * num_beams,
                      cache_size=prompts.cache_size, width=0,
                      extra_bytes=2 * b * (2 * num_beams + c) * prompts.max_new_tokens * 4,  # [B, K|C, N] tokens
                      memory_limit=memory_limit)
    args = (prompts.tokens, prompts.lengths, prompts.stops, prompts.pad_id, jnp.asarray(length_penalty, jnp.float32),
            jnp.asarray(mode, jnp.int32))
    run = _beam_traced_model if core.is_pytree(model) else _beam_static_model
    out = run(model, *args, num_beams=num_beams, max_new_tokens=prompts.max_new_tokens,
              cache_size=prompts.cache_size)
    return jax.tree.map(lambda x: x[:, :num_return_sequences], out)
