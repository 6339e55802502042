"""sample / greedy / token_logprobs: the distribution, keys, per-row independence,
invalid rows, and the inverse-CDF boundaries."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
import reference as ref
from jaxsample._filters import sampling as _sampling


def assert_frequencies(tokens, probs, sigmas=5.0):
    """Empirical counts of ``tokens`` vs ``probs`` (float64, sums to 1).

    Tolerances: a token with probability 0 is never drawn (exact); every token's count
    is within ``sigmas`` binomial standard deviations (+1) of n * p; and the chi-square
    statistic over tokens with n * p >= 5 is below df + sigmas * sqrt(2 df) (its mean
    plus ``sigmas`` standard deviations). Seeds are fixed, so the test is deterministic.
    """
    tokens = np.asarray(tokens).reshape(-1)
    n = tokens.size
    counts = np.bincount(tokens, minlength=probs.size).astype(np.float64)
    assert counts.size == probs.size, "drew an out-of-range token"
    assert counts[probs == 0].sum() == 0, "drew a removed token"
    expected = n * probs
    bound = sigmas * np.sqrt(expected * (1 - probs)) + 1
    assert np.all(np.abs(counts - expected) <= bound), (counts, expected)
    big = expected >= 5
    chi2 = np.sum((counts[big] - expected[big]) ** 2 / expected[big])
    df = max(int(big.sum()) - 1, 1)
    assert chi2 <= df + sigmas * math.sqrt(2 * df), (chi2, df)


def filtered_rows():
    """Four filtered distributions over V = 12 (with ties and -inf)."""
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(0, 1.5, 12), 1).astype(np.float32)
    x[[3, 8]] = -np.inf
    x[5] = x[6]  # a tie
    x = jnp.asarray(x)
    return jnp.stack([
        x,
        js.top_p(js.temperature(x, 0.7), 0.8),
        js.top_k(x, 4),
        js.min_p(js.temperature(x, 1.5), 0.2),
    ])


def test_per_row_keys_match_the_filtered_distribution():
    rows = filtered_rows()  # [4, V]
    n = 4000
    logits = jnp.repeat(rows, n, axis=0)  # [4n, V]
    keys = jax.random.split(jax.random.key(1), 4 * n)
    tokens = np.asarray(jax.jit(js.sample)(keys, logits)).reshape(4, n)
    assert tokens.dtype == np.int32
    for r in range(4):
        assert_frequencies(tokens[r], ref.softmax(np.asarray(rows[r], np.float64)))


def test_one_key_for_the_whole_batch_matches_the_distribution():
    rows = filtered_rows()
    logits = jnp.repeat(rows[1:2], 8000, axis=0)
    tokens = jax.jit(js.sample)(jax.random.key(2), logits)
    assert_frequencies(tokens, ref.softmax(np.asarray(rows[1], np.float64)))


def test_removed_and_underflowed_tokens_are_never_drawn():
    x = jnp.array([0.0, -200.0, -jnp.inf, 0.5, -150.0, -jnp.inf, -1e30, 1.0], jnp.float32)
    logits = jnp.broadcast_to(x, (5000, 8))
    tokens = np.asarray(js.sample(jax.random.split(jax.random.key(3), 5000), logits))
    assert set(np.unique(tokens)) <= {0, 3, 7}
    assert set(np.unique(tokens)) == {0, 3, 7}


def test_inverse_cdf_boundaries():
    """u at its extremes lands on the first / last token with nonzero probability, and
    each token owns exactly its slice of [0, 1)."""
    x = jnp.array([-jnp.inf, 1.0, 2.0, -jnp.inf, 3.0, -jnp.inf, -200.0])
    largest_u = np.nextafter(np.float32(1), np.float32(0))
    q = ref.softmax(np.asarray(x, np.float64))
    edges = np.cumsum(q)  # token i owns [edges[i-1], edges[i])
    u = np.array([0.0, largest_u, edges[1] - 1e-4, edges[1] + 1e-4, edges[2] + 1e-4],
                 np.float32)
    tokens = jax.jit(_sampling.inverse_cdf)(u, jnp.broadcast_to(x, (5, 7)))
    assert tokens.tolist() == [1, 4, 1, 2, 4]


def test_raw_and_typed_keys_give_the_same_tokens():
    logits = jnp.broadcast_to(filtered_rows()[0], (16, 12))
    typed = jax.random.split(jax.random.key(4), 16)
    raw = jax.random.key_data(typed)  # uint32 [16, 2], jax.random.PRNGKey style
    np.testing.assert_array_equal(js.sample(typed, logits), js.sample(raw, logits))
    single_raw = jax.random.PRNGKey(4)
    np.testing.assert_array_equal(js.sample(single_raw, logits),
                                  js.sample(jax.random.wrap_key_data(single_raw), logits))


def test_a_row_draws_the_same_token_alone_or_anywhere_in_a_batch():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (6, 50)).astype(np.float32)
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(5), 6)))  # raw
    batch = np.asarray(js.sample(keys, logits))
    alone = [int(js.sample(keys[i], logits[i])) for i in range(6)]
    assert batch.tolist() == alone
    perm = np.array([3, 0, 5, 1, 4, 2])
    np.testing.assert_array_equal(js.sample(keys[perm], logits[perm]), batch[perm])
    # inside a bigger batch with other rows, at other positions
    others = rng.normal(0, 2, (4, 50)).astype(np.float32)
    other_keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(99), 4)))
    big = js.sample(np.concatenate([other_keys[:2], keys, other_keys[2:]]),
                    np.concatenate([others[:2], logits, others[2:]]))
    np.testing.assert_array_equal(np.asarray(big)[2:8], batch)
    # under vmap and with an nd batch of keys
    np.testing.assert_array_equal(jax.vmap(js.sample)(keys, logits), batch)
    np.testing.assert_array_equal(
        js.sample(keys.reshape(2, 3, 2), logits.reshape(2, 3, 50)), batch.reshape(2, 3))


def test_rows_sharing_logits_but_not_keys_draw_independently():
    logits = jnp.zeros((2000, 4))  # uniform
    tokens = np.asarray(js.sample(jax.random.split(jax.random.key(6), 2000), logits))
    pairs = tokens[0::2] * 4 + tokens[1::2]  # joint of neighbouring rows: uniform on 16
    assert_frequencies(pairs, np.full(16, 1 / 16))


def test_invalid_rows_return_minus_one_and_do_not_disturb_others():
    rng = np.random.default_rng(7)
    good = rng.normal(size=(2, 9)).astype(np.float32)
    bad = np.stack([
        np.full(9, -np.inf),  # emptied by a mask
        np.where(np.arange(9) == 4, np.nan, good[0]),  # a NaN
        np.where(np.arange(9) == 2, np.inf, good[0]),  # +inf is not a valid logit
    ]).astype(np.float32)
    logits = jnp.asarray(np.concatenate([good[:1], bad, good[1:]]))
    keys = jax.random.split(jax.random.key(7), 5)
    tokens = np.asarray(jax.jit(js.sample)(keys, logits))
    assert tokens[1:4].tolist() == [-1, -1, -1]
    assert tokens[0] == int(js.sample(keys[0], good[0]))
    assert tokens[4] == int(js.sample(keys[4], good[1]))
    assert np.asarray(js.greedy(logits)).tolist() == [
        int(np.argmax(good[0])), -1, -1, -1, int(np.argmax(good[1]))]
    assert int(js.sample(jax.random.key(0), jnp.full(5, -jnp.inf))) == -1


def test_emptied_row_through_a_mask_then_filters_samples_minus_one():
    x = jnp.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    ids = jnp.array([[-1, -1], [0, 2]])  # row 0 allows nothing
    c = js.chain(js.AllowTokens(ids), js.Temperature(0.5), js.TopP(0.9), js.MinP(0.1))
    processed = c(x)
    assert np.all(np.asarray(processed[0]) == -np.inf)
    tokens = js.sample(jax.random.split(jax.random.key(0), 2), processed)
    assert int(tokens[0]) == -1 and int(tokens[1]) in (0, 2)


def test_greedy_lowest_index_on_ties_and_bf16():
    x = jnp.array([[1.0, 3.0, 3.0, -jnp.inf], [-jnp.inf, 0.0, -1.0, 0.0]], jnp.bfloat16)
    assert js.greedy(x).tolist() == [1, 1]
    assert js.greedy(x).dtype == jnp.int32
    assert int(js.greedy(x[0])) == 1
    assert js.sample(jax.random.key(0), x).dtype == jnp.int32


def test_sampling_a_greedy_row_always_gives_the_argmax():
    x = jnp.broadcast_to(jnp.array([0.5, 2.0, 2.0, 1.9]), (500, 4))
    t = js.temperature(x, 0.0)
    tokens = js.sample(jax.random.split(jax.random.key(8), 500), t)
    assert np.all(np.asarray(tokens) == 1)


def test_token_logprobs_match_log_softmax():
    rng = np.random.default_rng(9)
    x = rng.normal(0, 2, (3, 7)).astype(np.float32)
    x[1, 2] = -np.inf
    tokens = np.array([0, 2, 6], np.int32)
    got = np.asarray(js.token_logprobs(x, tokens))
    assert got.dtype == np.float32
    for r in range(3):
        want = ref.log_softmax(x[r].astype(np.float64))[tokens[r]]
        if np.isinf(want):
            assert got[r] == -np.inf
        else:
            np.testing.assert_allclose(got[r], want, rtol=1e-5)
    lp16 = js.token_logprobs(jnp.asarray(x, jnp.bfloat16), tokens)
    assert lp16.dtype == jnp.float32
    x16 = np.asarray(jnp.asarray(x, jnp.bfloat16)).astype(np.float64)
    np.testing.assert_allclose(
        np.asarray(lp16)[[0, 2]], [ref.log_softmax(x16[r])[tokens[r]] for r in (0, 2)],
        rtol=1e-5)
    assert np.isnan(js.token_logprobs(x, np.array([0, -1, 3]))[1])  # token -1: NaN
    assert np.isnan(js.token_logprobs(np.full((1, 3), -np.inf, np.float32), np.array([0]))[0])


@pytest.mark.parametrize("call,words", [
    (lambda: js.sample(jax.random.split(jax.random.key(0), 3), jnp.zeros((4, 5))),
     ["key", "(4,)", "(3,)"]),
    (lambda: js.sample(jnp.zeros(2, jnp.float32), jnp.zeros((4, 5))), ["key", "float32"]),
    (lambda: js.sample(jax.random.key(0), jnp.zeros((4, 5), jnp.int32)), ["logits", "int32"]),
    (lambda: js.greedy(jnp.zeros(5, jnp.int32)), ["logits", "int32"]),
    (lambda: js.token_logprobs(jnp.zeros((4, 5)), jnp.zeros(3, jnp.int32)), ["tokens", "(3,)"]),
])
def test_errors(call, words):
    with pytest.raises(ValueError) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.slow
def test_large_vocab_many_draws_chi_square():
    rng = np.random.default_rng(10)
    x = rng.normal(0, 3, 2000).astype(np.float32)
    processed = js.top_p(js.temperature(jnp.asarray(x), 0.8), 0.95)
    n = 200_000
    tokens = jax.jit(js.sample)(jax.random.split(jax.random.key(11), n),
                                jnp.broadcast_to(processed, (n, 2000)))
    assert_frequencies(tokens, ref.softmax(np.asarray(processed, np.float64)))


@pytest.mark.slow
def test_small_probabilities_are_drawn_at_their_rate():
    # one token at p ~ 1e-3 among a dominant one: 1e6 draws give ~1000 hits
    x = jnp.array([0.0, math.log(1e-3 / (1 - 1e-3)), -jnp.inf])
    n = 1_000_000
    tokens = jax.jit(js.sample)(jax.random.split(jax.random.key(12), n),
                                jnp.broadcast_to(x, (n, 3)))
    assert_frequencies(tokens, ref.softmax(np.asarray(x, np.float64)))
