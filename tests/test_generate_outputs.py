"""generate's outputs beyond tokens: n samples per prompt (distinct, each reproducible
alone), top-N raw log-probs, prompt log-probs from one prefill, and their validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from models import DecoderLM, preset
from test_penalties import V, TableModel, table_model

PROMPTS = np.array([[1, 2, 3, 4], [5, 6, 0, 0]], np.int32)
LENGTHS = np.array([4, 2])


def keys_for(seed, b):
    return jax.random.split(jax.random.key(seed), b)


def test_n_samples_are_distinct_and_each_reproducible_alone():
    model = table_model(1)
    n, steps = 3, 8
    keys = keys_for(0, 2)
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
    keys = keys_for(4, 2)
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

    keys, sampler = keys_for(5, 2), js.chain(js.Temperature(1.0))
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
    out = js.generate(model, PROMPTS, LENGTHS, keys_for(1, 2), max_new_tokens=6,
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
    keys = keys_for(2, 2)
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
        js.generate(model, PROMPTS, LENGTHS, keys_for(0, 2), max_new_tokens=2, **kwargs)
