"""generate's outputs beyond tokens: n samples per prompt (distinct, each reproducible
alone), top-N raw log-probs, prompt log-probs from one prefill, and their validation; the
documented key derivation (tokens and stats rebuilt from it) and `return_stats` (entropy,
kept count, final state: exact, traced only when asked, with every step function)."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample._decoding import generate as _generate
from jaxsample._processors import base as _chain
from helpers import BIGRAM_V, ROOT, bigram, docs_section, row_keys, table_model
from helpers import TABLE_V as V
from helpers import TableModel
from models import DecoderLM, preset

PROMPTS = np.array([[1, 2, 3, 4], [5, 6, 0, 0]], np.int32)
LENGTHS = np.array([4, 2])


def test_n_samples_are_distinct_and_each_reproducible_alone():
    model = table_model(1)
    n, steps = 3, 8
    keys = row_keys(0, 2)
    # stateful, per-row (per output row: B * n) values ride along
    sampler = js.chain(js.RepetitionPenalty(np.linspace(1.0, 1.5, 2 * n).astype(np.float32)),
                       js.Temperature(1.0))
    out = js.generate(model, PROMPTS, LENGTHS, keys, max_new_tokens=steps, sampler=sampler, n=n,
                      top_logprobs=2)
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (2 * n, steps) and out.top_token_ids.shape == (2 * n, steps, 2)
    assert len({tuple(t) for t in tokens}) == 2 * n  # distinct samples
    for i in range(2):
        for j in range(n):
            alone = js.generate(model, PROMPTS[i:i + 1], LENGTHS[i:i + 1],
                                jax.random.fold_in(keys[i], j)[None], max_new_tokens=steps,
                                sampler=js.chain(js.RepetitionPenalty(sampler.processors[0].penalty[i * n + j]),
                                                 js.Temperature(1.0)), top_logprobs=2)
            row = i * n + j
            np.testing.assert_array_equal(alone.tokens[0], tokens[row])
            np.testing.assert_allclose(alone.logprobs_processed[0], out.logprobs_processed[row], atol=1e-6)


def test_n_samples_prefill_each_prompt_once_and_copy_its_cache(tiny_lm):
    """With a batch-leading cache (DecoderLM), prefill runs on the B prompts, not B * n
    rows, and every sample equals the same sample generated alone (its own prefill)."""
    seen = []

    class Recording:  # a hashable (static) wrapper that records prefill's batch at trace time
        vocab_size = tiny_lm.vocab_size
        init_cache = staticmethod(tiny_lm.init_cache)
        decode = staticmethod(tiny_lm.decode)

        @staticmethod
        def prefill(tokens, lengths, cache):
            seen.append(tokens.shape[0])
            return tiny_lm.prefill(tokens, lengths, cache)

    n, steps = 3, 6
    keys = row_keys(4, 2)
    sampler = js.default_chain(temperature=1.0, top_p=0.95)
    out = js.generate(Recording(), PROMPTS, LENGTHS, keys, max_new_tokens=steps, sampler=sampler, n=n)
    assert seen == [2]
    for i in range(2):
        for j in range(n):
            alone = js.generate(tiny_lm, PROMPTS[i:i + 1, :LENGTHS[i]], LENGTHS[i:i + 1],
                                jax.random.fold_in(keys[i], j)[None], max_new_tokens=steps, sampler=sampler)
            np.testing.assert_array_equal(alone.tokens[0], out.tokens[i * n + j])
            np.testing.assert_allclose(alone.logprobs_raw[0], out.logprobs_raw[i * n + j], atol=2e-5)


@pytest.mark.parametrize("layout", [
    lambda b, s: jnp.zeros((s, b), jnp.int32),  # time-major [S, B]
    lambda b, s: jnp.zeros((2, b, s), jnp.int32),  # layer-stacked [L, B, S] with L = B = 2
])
def test_n_samples_fall_back_to_one_prefill_per_sample_for_other_cache_layouts(layout):
    """A cache whose leaves do not lead with the batch axis cannot be repeated (even when
    another axis happens to equal B): generate prefills every sample instead, with the
    same result as a batch-leading cache."""
    model = table_model(2)
    seen = []

    class TimeMajorCache:  # not batch-leading
        vocab_size = V

        @staticmethod
        def init_cache(batch_size, max_len):
            return layout(batch_size, max_len)

        @staticmethod
        def prefill(tokens, lengths, cache):
            seen.append(tokens.shape[0])
            return model.prefill(tokens, lengths, cache)

        @staticmethod
        def prefill_all(tokens, cache):
            return model.prefill_all(tokens, cache)

        @staticmethod
        def decode(tokens, positions, cache):
            return model.decode(tokens, positions, cache)

    keys, sampler = row_keys(5, 2), js.chain(js.Temperature(1.0))
    kwargs = dict(max_new_tokens=5, sampler=sampler, n=4, prompt_logprobs=True)
    ours = js.generate(TimeMajorCache(), PROMPTS, LENGTHS, keys, **kwargs)
    kwargs["prompt_logprobs"] = False
    js.generate(TimeMajorCache(), PROMPTS, LENGTHS, keys, **kwargs)
    assert seen == [8]  # the prompt_logprobs run uses prefill_all; this one prefilled 2 * 4 rows
    copied = js.generate(model, PROMPTS, LENGTHS, keys, **dict(kwargs, prompt_logprobs=True))
    np.testing.assert_array_equal(ours.tokens, copied.tokens)
    np.testing.assert_allclose(ours.prompt_logprobs, copied.prompt_logprobs, atol=1e-6)
    assert ours.prompt_logprobs.shape == (2, PROMPTS.shape[1])


def test_top_logprobs_are_the_top_of_the_raw_log_softmax_and_padded():
    model = table_model(2)
    k = 3
    out = js.generate(model, PROMPTS, LENGTHS, row_keys(1, 2), max_new_tokens=6,
                      sampler=js.chain(js.Temperature(1.5)), stop_ids=[7], pad_id=0, top_logprobs=k)
    table = np.asarray(model.table, np.float64)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for r in range(2):
        prev = PROMPTS[r, LENGTHS[r] - 1]
        for i in range(6):
            if i >= lengths[r]:  # after the stop token: padding
                assert np.all(out.top_token_ids[r, i] == 0) and np.all(out.top_logprobs[r, i] == 0)
                continue
            logp = table[prev] - np.log(np.sum(np.exp(table[prev])))
            order = np.argsort(-logp, kind="stable")[:k]
            np.testing.assert_array_equal(out.top_token_ids[r, i], order)
            np.testing.assert_allclose(out.top_logprobs[r, i], logp[order], atol=1e-5)
            np.testing.assert_allclose(out.logprobs_raw[r, i], logp[tokens[r, i]], atol=1e-5)
            prev = tokens[r, i]
    assert out.prompt_logprobs is None


@pytest.fixture(scope="module")
def tiny_lm():
    return jax.jit(lambda key: DecoderLM.random(preset("tiny"), key))(jax.random.key(7))  # one compile


def test_prompt_logprobs_equal_a_full_forward(tiny_lm):
    prompts = np.array([[256, 10, 20, 30, 40], [256, 7, 8, 258, 258]], np.int32)
    lengths = np.array([5, 3])
    keys = row_keys(2, 2)
    plain = js.generate(tiny_lm, prompts, lengths, keys, max_new_tokens=4)
    out = js.generate(tiny_lm, prompts, lengths, keys, max_new_tokens=4, prompt_logprobs=True, n=2)
    assert out.prompt_logprobs.shape == (2, 5)  # one row per prompt, also with n = 2
    logp = jax.nn.log_softmax(jax.jit(DecoderLM.forward)(tiny_lm, jnp.asarray(prompts)), axis=-1)  # [B, P, V]
    for r in range(2):
        want = [0.0] + [float(logp[r, p - 1, prompts[r, p]]) if p < lengths[r] else 0.0 for p in range(1, 5)]
        np.testing.assert_allclose(out.prompt_logprobs[r], want, atol=1e-4)
    # the same single prefill also seeds generation: greedy tokens are unchanged
    np.testing.assert_array_equal(out.tokens[::2], plain.tokens)
    np.testing.assert_array_equal(out.tokens[1::2], plain.tokens)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), "n must be a positive int"),
    (dict(top_logprobs=V + 1), r"top_logprobs must be an int in \[0, vocab size 8\]"),
    (dict(prompt_logprobs=True), "needs a model with prefill_all"),
])
def test_output_options_are_validated(kwargs, match):
    model = table_model()
    if "prompt_logprobs" in kwargs:  # a model without prefill_all
        model = type("NoPrefillAll", (TableModel,), {"prefill_all": None})(model.table)
    with pytest.raises(ValueError, match=match):
        js.generate(model, PROMPTS, LENGTHS, row_keys(0, 2), max_new_tokens=2, **kwargs)


# ----------------------------------------------------------------------------- keys and stats


def _rebuild(model, prompts, lengths, row_keys, procs, n_steps):
    """generate's tokens from the documented key sentence alone, with numpy statistics.

    Row b, generated index i: k = fold_in(row_keys[b], i); processor j gets
    fold_in(k, j + 1); the token is sample(fold_in(k, 0), processed logits).
    """

    @jax.jit
    def step(logits, state, k):  # one row: logits [1, V]
        for j, p in enumerate(procs):
            logits = p.apply(logits, state[j], jax.random.fold_in(k, j + 1)[None])
        token = js.sample(jax.random.fold_in(k, 0)[None], logits)
        return token, [p.update(s, token, logits) for p, s in zip(procs, state)], logits

    tokens, entropies, kept = [], [], []
    for b in range(prompts.shape[0]):
        logits, _ = model.prefill(prompts[b:b + 1], lengths[b:b + 1], None)
        state = [_chain.init_state(p, prompts[b:b + 1], lengths[b:b + 1], model.vocab_size,
                                 max_new_tokens=n_steps)
                 for p in procs]
        row, ent, kep = [], [], []
        for i in range(n_steps):
            token, state, x = step(logits, state, jax.random.fold_in(row_keys[b], i))
            q = np.asarray(x[0], np.float64)
            q = q[q > -np.inf]
            logq = q - q.max() - np.log(np.sum(np.exp(q - q.max())))
            ent.append(-np.sum(np.exp(logq) * logq))
            kep.append(q.size)
            row.append(int(token[0]))
            logits = model.table[token]
        tokens.append(row), entropies.append(ent), kept.append(kep)
    return np.array(tokens), np.array(entropies), np.array(kept), state


def test_readme_and_docstring_state_the_key_derivation():
    sentence = "fold_in(fold_in(keys[b], i), 0)"
    api = open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8").read()
    assert sentence in docs_section("API tour", "README.md")
    assert sentence in api and "fold_in(fold_in(keys[b], i), j + 1)" in api
    assert "sample(fold_in(k, 0), processed_logits)" in js.generate.__doc__
    assert "fold_in(k, j + 1)" in js.generate.__doc__


def test_tokens_and_stats_rebuilt_from_the_key_sentence():
    model = bigram(2)
    prompts, lengths = jnp.array([[3, 4], [5, 0], [9, 1]]), jnp.array([2, 1, 2])
    keys = jax.random.split(jax.random.key(11), 3)
    procs = (js.RepetitionPenalty(1.5), js.Temperature(0.9), js.XTC(0.7, 0.05), js.TopK(12),
             js.stateless(lambda x, key: x + 0.5 * jax.vmap(lambda k: jax.random.uniform(k, (BIGRAM_V,)))(key)))
    out = js.generate(model, prompts, lengths, keys, max_new_tokens=6, sampler=js.chain(*procs),
                      return_stats=True)
    tokens, ent, kept, state = _rebuild(model, prompts, lengths, keys, procs, 6)
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(out.stats.entropy, ent, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(out.stats.num_kept, kept)
    assert np.all(np.asarray(out.stats.num_kept) <= 12)
    history = out.stats.final_state[0]  # RepetitionPenalty's History: prompt + the 6 tokens
    np.testing.assert_array_equal(history.tokens[2, :8], [9, 1, *tokens[2]])


def test_stats_off_traces_no_stats_code(monkeypatch):
    def boom(*args):
        raise AssertionError("stats computed although return_stats=False")

    from jaxsample._decoding import core

    monkeypatch.setattr(core, "step_stats", boom)
    model = bigram(4)
    out = js.generate(model, jnp.array([[1, 2, 3, 4, 5]]), jnp.array([5]), jax.random.split(jax.random.key(0), 1),
                      max_new_tokens=7, sampler=js.default_chain(temperature=0.5))  # a fresh shape: traced now
    assert out.stats is None and len(out) == len(js.GenerateOutput._fields)
    with pytest.raises(AssertionError, match="stats computed"):
        js.generate(model, jnp.array([[1, 2, 3, 4, 5]]), jnp.array([5]), jax.random.split(jax.random.key(0), 1),
                    max_new_tokens=7, return_stats=True)


def test_stats_lower_to_a_larger_program_only_when_asked():
    model = bigram(5)
    args = (jnp.array([[1, 2]], jnp.int32), jnp.array([2], jnp.int32), jax.random.split(jax.random.key(0), 1),
            js.default_chain(top_p=0.9), jnp.array([-1], jnp.int32), jnp.int32(0), jnp.array([3], jnp.int32))
    static = dict(max_new_tokens=3, cache_size=5, n=1, top_logprobs=0, prompt_logprobs=False,
                  sample_fn=js.sample_step)
    lower = lambda **kw: _generate._generate_traced.lower(model, *args, **static, **kw).as_text()
    off, default, on = lower(return_stats=False), lower(), lower(return_stats=True)
    assert off == default
    assert on.count("stablehlo.exponential") > off.count("stablehlo.exponential")


def test_entropy_is_exact_with_minus_inf_entries():
    x = jnp.array([[0.0, np.log(3.0), -jnp.inf, -jnp.inf],   # p = (1/4, 3/4)
                   [1.0, 1.0, 1.0, 1.0],
                   [-jnp.inf] * 4,                          # no distribution
                   [0.0, jnp.nan, 0.0, 0.0]])
    want0 = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    h = np.asarray(js.entropy(x))
    np.testing.assert_allclose(h[:2], [want0, np.log(4.0)], rtol=1e-6)
    assert np.isnan(h[2]) and np.isnan(h[3])
    # the hand-written formula this replaces gives NaN on the first row
    p = jax.nn.softmax(x[0])
    assert np.isnan(float(-(p * jax.nn.log_softmax(x[0])).sum()))
    # bf16 logits, a huge logit gap (q underflows to 0): still finite and exact
    np.testing.assert_allclose(js.entropy(jnp.array([0.0, -200.0], jnp.bfloat16)), 0.0, atol=1e-30)


@pytest.mark.parametrize("kind", ["sharded", "gumbel"])
def test_stats_with_the_sharded_and_gumbel_step_functions(kind):
    from models import sharding
    sample_fn = js.ShardedSampler(sharding.make_mesh((1, 1))) if kind == "sharded" else js.gumbel_sample_step
    model = bigram(6)
    out = js.generate(model, jnp.array([[1, 2], [3, 0]]), jnp.array([2, 1]), jax.random.split(jax.random.key(3), 2),
                      max_new_tokens=4, sampler=js.default_chain(top_k=5), sample_fn=sample_fn, return_stats=True)
    np.testing.assert_array_equal(out.stats.num_kept, np.full((2, 4), 5))
    assert np.all(np.asarray(out.stats.entropy) > 0) and np.all(np.asarray(out.stats.entropy) < np.log(5) + 1e-5)


def test_check_int_is_the_one_static_integer_check():
    """`_validation.check_int`: what every static count / size argument goes through
    (generate's n and top_logprobs, beam widths, draft sizes, automaton limits, history
    lengths): Python and NumPy ints in range pass as int; bools, floats, strings and
    arrays fail with the parameter, the range and the value."""
    from jaxsample import _validation as _val

    assert _val.check_int("n", np.int64(3)) == 3 and type(_val.check_int("n", np.int64(3))) is int
    assert _val.check_int("k", 0, low=0, high=4) == 0
    for value in (0, True, 2.0, "2", np.array([2])):
        with pytest.raises(ValueError, match=rf"^f: n must be a positive int, got {re.escape(repr(value))}$"):
            _val.check_int("n", value, fn="f")
    with pytest.raises(ValueError, match=r"^k must be an int in \[0, 4\], got 5$"):
        _val.check_int("k", 5, low=0, high=4)
    with pytest.raises(ValueError, match=r"^w must be an int >= 0, got -1$"):
        _val.check_int("w", -1, low=0)
    with pytest.raises(ValueError, match=r"RepetitionPenalty.init: max_new_tokens must be an int >= 0, got -1"):
        js.RepetitionPenalty(1.2).init(np.zeros((1, 3), np.int32), np.array([3]), 8, max_new_tokens=-1)
