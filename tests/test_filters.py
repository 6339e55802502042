"""Filters vs the independent NumPy reference (tests/reference.py), plus their contract:
dtypes, shapes, per-row values, jit/vmap/scan, ties, min_tokens_to_keep, disabled values,
empty and NaN rows, validation errors, and no recompilation when values change."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
import reference as ref
from jaxsample._filters import filters as _filters
from jaxsample._selection import select as _select

FILTERS = {
    "temperature": js.temperature,
    "top_k": js.top_k,
    "top_p": js.top_p,
    "min_p": js.min_p,
    "typical_p": js.typical_p,
    "epsilon_cutoff": js.epsilon_cutoff,
    "eta_cutoff": js.eta_cutoff,
    "top_n_sigma": js.top_n_sigma,
}
TRUNCATIONS = [name for name in FILTERS if name != "temperature"]
DISABLED = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_n_sigma": math.inf,
}
# Rows whose decision is within this distance of a boundary (see reference.py) may
# legitimately differ between float32 and float64; they are skipped and counted.
MARGIN = 1e-4
DTYPES = [jnp.float32, jnp.bfloat16]


# ----------------------------------------------------------------------------- data


def make_logits(rng, batch, vocab, dtype=jnp.float32):
    """Rows of mixed kinds: plain, heavily tied, with -inf entries, tied + -inf,
    all-equal, and a single finite logit. Every row has at least one finite logit."""
    n = int(np.prod(batch))
    rows = []
    for i in range(n):
        x = rng.normal(0.0, 2.0, vocab)
        kind = i % 6
        if kind == 1:
            x = np.round(x)  # ~10 distinct values: many ties
        elif kind == 2:
            x[rng.random(vocab) < 0.4] = -np.inf
        elif kind == 3:
            x = np.round(x / 2.0) * 2.0
            x[rng.random(vocab) < 0.3] = -np.inf
        elif kind == 4 and i % 12 == 4:
            x = np.full(vocab, 0.5)
        elif kind == 5 and i % 12 == 11:
            x = np.full(vocab, -np.inf)
            x[rng.integers(vocab)] = -3.0
        if not np.isfinite(x).any():
            x[rng.integers(vocab)] = 1.0
        rows.append(x)
    return jnp.asarray(np.stack(rows).reshape(tuple(batch) + (vocab,)), dtype)


def make_values(name, rng, n, vocab):
    """One value per row: disabled and edge values mixed with random ones."""
    edges = {
        "temperature": [0.0, 1.0],
        "top_k": [0, 1, 2, vocab - 1, vocab, vocab + 3],
        "top_p": [1.0, 0.01],
        "min_p": [0.0, 1.0],
        "typical_p": [1.0, 0.01],
        "epsilon_cutoff": [0.0, 0.99],
        "eta_cutoff": [0.0, 0.99],
        "top_n_sigma": [math.inf, 0.0],
    }[name]
    draw = {
        "temperature": lambda: rng.uniform(0.05, 3.0),
        "top_k": lambda: rng.integers(1, vocab),
        "top_p": lambda: rng.uniform(0.05, 0.99),
        "min_p": lambda: rng.uniform(0.01, 0.9),
        "typical_p": lambda: rng.uniform(0.05, 0.99),
        "epsilon_cutoff": lambda: rng.uniform(0.0, 0.2),
        "eta_cutoff": lambda: rng.uniform(0.0, 0.9),
        "top_n_sigma": lambda: rng.uniform(0.0, 3.0),
    }[name]
    values = [edges[i % len(edges)] if rng.random() < 0.3 else draw() for i in range(n)]
    return np.asarray(values, np.int32 if name == "top_k" else np.float32)


@functools.lru_cache(maxsize=None)
def jitted(name, m=1):
    fn = FILTERS[name]
    if name == "temperature":
        return jax.jit(fn)
    return jax.jit(functools.partial(fn, min_tokens_to_keep=m))


def reference(name, logits, values, m=1):
    x = np.asarray(logits).astype(np.float64)
    kwargs = {} if name == "temperature" else {"m": m}
    return ref.apply(ref.ROW_FUNCTIONS[name], x, values, **kwargs)


def assert_matches_reference(name, logits, values, out, m=1, tol=MARGIN):
    """Same kept set as the reference (rows clear of a boundary), kept logits unchanged,
    removed ones -inf, dtype and shape preserved, no row emptied."""
    out = np.asarray(out)
    assert out.shape == logits.shape and out.dtype == logits.dtype
    x = np.asarray(logits).astype(np.float64)
    got = out.astype(np.float64)
    ref_out, margin = reference(name, logits, values, m)
    clear = margin > tol
    assert clear.mean() >= 0.8, f"too many boundary rows: {clear.mean()}"
    np.testing.assert_array_equal(np.isfinite(got)[clear], np.isfinite(ref_out)[clear])
    assert not np.isnan(got).any()
    assert np.all(got[np.isinf(got)] < 0)
    if name == "temperature":
        rtol = 1e-6 if logits.dtype == jnp.float32 else 1e-2
        fin = np.isfinite(ref_out)
        np.testing.assert_allclose(got[fin], ref_out[fin], rtol=rtol)
    else:
        fin = np.isfinite(got)
        np.testing.assert_array_equal(got[fin], x[fin])  # kept logits bit-for-bit
        n_in = np.isfinite(x).sum(-1)
        n_out = np.isfinite(got).sum(-1)
        assert np.all(n_out >= np.minimum(m, n_in)), "a truncation emptied a row"


# ----------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(FILTERS))
def test_matches_reference_batched_per_row_values(name, dtype):
    rng = np.random.default_rng(abs(hash((name, str(dtype)))) % 2**32)
    logits = make_logits(rng, (48,), 29, dtype)
    values = make_values(name, rng, 48, 29)
    out = jitted(name)(logits, values)
    assert_matches_reference(name, logits, values, out)


@pytest.mark.parametrize("name", TRUNCATIONS)
def test_min_tokens_to_keep_matches_reference(name):
    rng = np.random.default_rng(7)
    logits = make_logits(rng, (36,), 23)
    values = make_values(name, rng, 36, 23)
    out = jitted(name, 3)(logits, values)
    assert_matches_reference(name, logits, values, out, m=3)


@pytest.mark.parametrize("name", list(FILTERS))
def test_single_row_nd_batch_broadcast_values_and_vmap(name):
    rng = np.random.default_rng(11)
    fn = jitted(name)
    # one row, scalar value
    row = make_logits(rng, (1,), 17)[0]
    value = make_values(name, rng, 1, 17)[0]
    assert_matches_reference(name, row, value, fn(row, value))
    # [2, 3, V] with values [3]: broadcast over the leading axis, one value per column
    logits = make_logits(rng, (2, 3), 17)
    values = make_values(name, rng, 3, 17)
    out = fn(logits, values)
    assert_matches_reference(name, logits, np.broadcast_to(values, (2, 3)), out)
    # vmap over the flattened rows gives the same rows
    flat = logits.reshape(6, 17)
    flat_values = np.tile(values, 2)
    np.testing.assert_array_equal(jax.vmap(fn)(flat, flat_values), out.reshape(6, 17))


@pytest.mark.parametrize("name", ["temperature", "top_k", "top_p"])
def test_lax_scan_over_rows(name):
    rng = np.random.default_rng(16)
    logits = make_logits(rng, (6,), 17)
    values = make_values(name, rng, 6, 17)

    def body(carry, xs):
        x, v = xs
        return carry, FILTERS[name](x, v)

    _, scanned = jax.lax.scan(body, 0, (logits, values))
    np.testing.assert_array_equal(scanned, jitted(name)(logits, values))


def test_disabled_values_are_the_identity():
    rng = np.random.default_rng(3)
    logits = make_logits(rng, (12,), 31, jnp.bfloat16)  # f32: see the recompilation test
    for name, off in DISABLED.items():
        # The filters jit their work, so the scalar is traced here (per-row disabled
        # values are part of the reference tests).
        out = FILTERS[name](logits, off)
        assert out.dtype == logits.dtype
        np.testing.assert_array_equal(np.asarray(out), np.asarray(logits), err_msg=name)
    for k in (31, 32, 1000):  # k >= V is the identity too (not greedy)
        np.testing.assert_array_equal(jitted("top_k")(logits, k), logits)
        np.testing.assert_array_equal(js.top_k(logits, k), logits)


def test_static_and_traced_top_k_agree():
    rng = np.random.default_rng(5)
    logits = make_logits(rng, (24,), 19)
    for k in (0, 1, 2, 7, 18, 19, 25):
        np.testing.assert_array_equal(js.top_k(logits, k), jitted("top_k")(logits, k))
        np.testing.assert_array_equal(
            js.top_k(logits, k, min_tokens_to_keep=3), jitted("top_k", 3)(logits, k)
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", TRUNCATIONS)
def test_large_vocab_matches_reference(name):
    rng = np.random.default_rng(21)
    logits = make_logits(rng, (12,), 20000)
    values = make_values(name, rng, 12, 20000)
    # Running masses move in tiny steps here, so the boundary tolerance is tighter.
    out = jitted(name)(logits, values)
    assert_matches_reference(name, logits, values, out, tol=2e-6)


# ----------------------------------------------------------------------------- ties and boundaries


def finite(x):
    return np.isfinite(np.asarray(x)).tolist()


def test_ties_are_kept_at_every_boundary():
    x = jnp.array([1.0, 3.0, 2.0, 3.0, 2.0, 0.0])
    assert finite(js.top_k(x, 1)) == [False, True, False, True, False, False]
    assert finite(js.top_k(x, 3)) == [False, True, True, True, True, False]
    # q = [.04, .31, .12, .31, .12, .02]: p = 0.5 reaches inside the tie at 3.0 ...
    assert finite(js.top_p(x, 0.5)) == [False, True, False, True, False, False]
    # ... and p = 0.7 inside the tie at 2.0: both 2.0s are kept
    assert finite(js.top_p(x, 0.7)) == [False, True, True, True, True, False]
    assert finite(js.min_p(x, 1.0)) == [False, True, False, True, False, False]
    assert finite(js.top_n_sigma(x, 0.0)) == [False, True, False, True, False, False]
    assert finite(js.epsilon_cutoff(x, 0.2)) == [False, True, False, True, False, False]
    # greedy (t = 0) is the one place a tie is broken: lowest index
    assert finite(js.temperature(x, 0.0)) == [False, True, False, False, False, False]
    # min_tokens_to_keep boundary in a tie: m = 3 lands on the 2.0s, both kept
    assert finite(js.top_p(x, 0.01, min_tokens_to_keep=3)) == [
        False, True, True, True, True, False]


def test_min_tokens_to_keep_is_honoured():
    x = jnp.array([0.0, 5.0, 1.0, 4.0, 2.0, 3.0])
    keep3 = [False, True, False, True, False, True]
    assert finite(js.top_p(x, 0.01, min_tokens_to_keep=3)) == keep3
    assert finite(js.top_k(x, 1, min_tokens_to_keep=3)) == keep3
    assert finite(js.min_p(x, 1.0, min_tokens_to_keep=3)) == keep3
    assert finite(js.epsilon_cutoff(x, 0.99, min_tokens_to_keep=3)) == keep3
    assert finite(js.eta_cutoff(x, 0.99, min_tokens_to_keep=3)) == keep3
    assert finite(js.top_n_sigma(x, 0.0, min_tokens_to_keep=3)) == keep3
    assert sum(finite(js.typical_p(x, 0.01, min_tokens_to_keep=3))) >= 3
    # m larger than V keeps everything
    assert all(finite(js.top_p(x, 0.01, min_tokens_to_keep=10)))


def test_epsilon_can_remove_every_token_but_the_argmax_survives():
    x = jnp.zeros(100)  # uniform, q = 0.01 < epsilon
    out = js.epsilon_cutoff(x, 0.5)
    assert finite(out) == [True] * 100  # all tied at the max: all kept
    x = jnp.arange(100.0) / 100.0  # nearly uniform, distinct
    assert np.flatnonzero(finite(js.epsilon_cutoff(x, 0.5))).tolist() == [99]


def test_min_p_uses_log_p_not_p_times_max_logit():
    x = jnp.array([-10.0, -10.5, -20.0])  # negative logits: the peer bug kept nothing right
    # q ratio of -10.5 vs -10.0 is e^-0.5 = 0.61 >= 0.5: kept; -20 is e^-10: removed
    assert finite(js.min_p(x, 0.5)) == [True, True, False]


def test_top_k_zero_is_off_not_greedy():
    x = jnp.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(js.top_k(x, 0), x)
    np.testing.assert_array_equal(jitted("top_k")(x, jnp.array([0, 1])),
                                  jnp.array([[1.0, 2.0, 3.0], [3.0, -jnp.inf, -jnp.inf]]))


def test_typical_p_keeps_most_typical_tokens():
    x = jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1]))
    # H = 1.2799; |surprisal - H| = [.36, .08, .33, 1.02]: typical set for 0.5 is {0.3, 0.2};
    # the arg-max is not forced in (docs/sampling.md, transformers' TypicalLogitsWarper)
    assert finite(js.typical_p(x, 0.5)) == [False, True, True, False]
    assert finite(js.typical_p(x, 0.25)) == [False, True, False, False]
    # min_tokens_to_keep counts in typicality order: 0.3, then 0.2, then 0.4
    assert finite(js.typical_p(x, 0.25, min_tokens_to_keep=2)) == [False, True, True, False]
    assert finite(js.typical_p(x, 0.25, min_tokens_to_keep=3)) == [True, True, True, False]


def test_top_n_sigma_uses_finite_logits_only():
    x = jnp.array([0.0, 1.0, 2.0, 3.0, -jnp.inf])  # std over the 4 finite: 1.118
    assert finite(js.top_n_sigma(x, 1.0)) == [False, False, True, True, False]
    assert finite(js.top_n_sigma(x, 2.0)) == [False, True, True, True, False]
    one = jnp.array([-jnp.inf, 2.0, -jnp.inf])  # std 0, n = inf: identity, no NaN
    np.testing.assert_array_equal(js.top_n_sigma(one, jnp.inf), one)
    np.testing.assert_array_equal(jitted("top_n_sigma")(one, jnp.inf), one)


def test_temperature_mixes_greedy_and_sampled_rows():
    x = jnp.array([[1.0, 2.0, 2.0], [1.0, 2.0, 2.0]])
    out = jitted("temperature")(x, jnp.array([0.0, 2.0]))
    np.testing.assert_array_equal(out, [[-np.inf, 2.0, -np.inf], [0.5, 1.0, 1.0]])


# ----------------------------------------------------------------------------- empty, NaN rows


def special_row_batch(seed, fill):
    """The reference tests' shape (so compiled functions are reused) with row 2 special."""
    rng = np.random.default_rng(seed)
    logits = np.asarray(make_logits(rng, (48,), 29)).copy()
    fill(logits[2])
    return rng, logits, np.arange(48) != 2


def test_empty_rows_stay_empty_and_other_rows_are_unaffected():
    rng, logits, others = special_row_batch(9, lambda row: row.fill(-np.inf))
    for name in FILTERS:
        values = make_values(name, rng, 48, 29)
        out = np.asarray(jitted(name)(logits, values))
        assert np.all(out[2] == -np.inf), name
        assert_matches_reference(name, logits[others], values[others], out[others])


def test_nan_rows_do_not_raise_or_leak_into_other_rows():
    """Documented: no guarantee on a row with a NaN; other rows are exact."""
    rng, logits, others = special_row_batch(10, lambda row: row.__setitem__(3, np.nan))
    for name in FILTERS:
        values = make_values(name, rng, 48, 29)
        out = np.asarray(jitted(name)(logits, values))
        assert_matches_reference(name, logits[others], values[others], out[others])


# ----------------------------------------------------------------------------- masks and biases


def test_logit_bias_dense_matches_reference():
    rng = np.random.default_rng(12)
    logits = make_logits(rng, (3,), 11)
    bias = rng.normal(size=11).astype(np.float32)
    bias[4] = -np.inf
    fn = jax.jit(js.logit_bias)
    out = np.asarray(fn(logits, bias))
    for r in range(3):
        np.testing.assert_allclose(out[r], ref.logit_bias_row(np.asarray(logits[r]), bias)[0],
                                   rtol=1e-6)
    per_row = rng.normal(size=(3, 11)).astype(np.float32)
    out = np.asarray(fn(logits, per_row))
    for r in range(3):
        np.testing.assert_allclose(
            out[r], ref.logit_bias_row(np.asarray(logits[r]), per_row[r])[0], rtol=1e-6)
    out16 = js.logit_bias(logits.astype(jnp.bfloat16), bias)
    assert out16.dtype == jnp.bfloat16


def test_sparse_bias_ban_allow_with_padding():
    rng = np.random.default_rng(13)
    logits = make_logits(rng, (3,), 10)
    ids = np.array([[1, 4, -1, 4], [0, -1, -1, -1], [-1, -1, -1, -1]], np.int32)
    vals = np.array([[1.0, 2.0, 9.0, 0.5], [-3.0, 9.0, 9.0, 9.0], [9.0] * 4], np.float32)
    sparse = np.asarray(jax.jit(js.sparse_logit_bias)(logits, ids, vals))
    ban = np.asarray(jax.jit(js.ban_tokens)(logits, ids))
    allow = np.asarray(jax.jit(js.allow_tokens)(logits, ids))
    for r in range(3):
        x = np.asarray(logits[r])
        np.testing.assert_allclose(sparse[r], ref.sparse_logit_bias_row(x, ids[r], vals[r])[0],
                                   rtol=1e-6)
        np.testing.assert_array_equal(ban[r], ref.ban_tokens_row(x, ids[r])[0])
        np.testing.assert_array_equal(allow[r], ref.allow_tokens_row(x, ids[r])[0])
    assert np.all(allow[2] == -np.inf)  # an all-padding allow list empties the row
    # one id list [N] shared by every row; vmap over rows agrees
    shared = np.array([2, -1, 7], np.int32)
    np.testing.assert_array_equal(
        js.ban_tokens(logits, shared), jax.vmap(js.ban_tokens, (0, None))(logits, shared))
    assert finite(js.ban_tokens(logits[0], shared)) == [
        i not in (2, 7) and bool(np.isfinite(logits[0, i])) for i in range(10)]
    out16 = js.allow_tokens(logits.astype(jnp.bfloat16), shared)
    assert out16.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- selection seam


def test_select_primitives_follow_their_set_definitions():
    """kth_largest and mass_threshold are defined by sets (so a sort-free version can
    replace them); check them against brute force over the candidate values."""
    rng = np.random.default_rng(14)
    scores = np.round(rng.normal(size=(16, 12)), 1).astype(np.float32)
    scores[::5, :3] = -np.inf
    weights = rng.random((16, 12)).astype(np.float32)
    ks = rng.integers(1, 13, size=16)
    ps = rng.uniform(0.05, 0.95, size=16).astype(np.float32)
    kth = np.asarray(jax.jit(_select.kth_largest)(scores, ks))
    thr = np.asarray(jax.jit(_select.mass_threshold)(scores, weights, ps))
    thr_softmax = np.asarray(jax.jit(_select.mass_threshold)(scores, None, ps))
    for r in range(16):
        s, w = scores[r].astype(np.float64), weights[r].astype(np.float64)
        assert kth[r] == max(t for t in s if np.sum(s >= t) >= ks[r])
        assert thr[r] == max(t for t in s if np.sum(w[s >= t]) >= ps[r] * w.sum())
        q = ref.softmax(s)  # default weights: the softmax mass of the scores
        assert thr_softmax[r] == max(t for t in s if np.sum(q[s >= t]) >= ps[r])
    assert float(_select.kth_largest(jnp.asarray(scores[0]), 3)) == kth[0] or ks[0] != 3
    np.testing.assert_array_equal(
        _select.kth_largest(jnp.asarray(scores), 4),
        jax.jit(_select.kth_largest)(scores, jnp.full(16, 4)))
    assert np.all(np.asarray(_select.mass_threshold(scores, weights, 1.0)) == -np.inf)


# ----------------------------------------------------------------------------- validation


X = jnp.zeros((4, 8))

ERRORS = [
    (lambda: js.temperature(X, -0.5), ["temperature", "t", "-0.5"]),
    (lambda: js.temperature(X, math.inf), ["temperature", "t", "inf"]),
    (lambda: js.top_k(X, -1), ["top_k", "k", "-1"]),
    (lambda: js.top_k(X, 2.5), ["top_k", "k", "2.5"]),
    (lambda: js.top_k(X, np.array([1, 2, -3, 4])), ["top_k", "k", "-3"]),
    (lambda: js.top_p(X, 0.0), ["top_p", "p", "0.0", "(0, 1]"]),
    (lambda: js.top_p(X, 1.5), ["top_p", "p", "1.5"]),
    (lambda: js.top_p(X, np.array([0.5, 0.9, 1.5, 0.2])), ["top_p", "p", "1.5"]),
    (lambda: js.top_p(X, float("nan")), ["top_p", "p", "nan"]),
    (lambda: js.min_p(X, -0.1), ["min_p", "p", "-0.1"]),
    (lambda: js.min_p(X, 1.5), ["min_p", "p", "1.5"]),
    (lambda: js.typical_p(X, 0.0), ["typical_p", "p", "0.0"]),
    (lambda: js.typical_p(X, 2.0), ["typical_p", "p", "2.0"]),
    (lambda: js.epsilon_cutoff(X, 1.0), ["epsilon_cutoff", "epsilon", "1.0"]),
    (lambda: js.epsilon_cutoff(X, -0.2), ["epsilon_cutoff", "epsilon", "-0.2"]),
    (lambda: js.eta_cutoff(X, 1.0), ["eta_cutoff", "eta", "1.0"]),
    (lambda: js.top_n_sigma(X, -1.0), ["top_n_sigma", "n", "-1.0"]),
    (lambda: js.top_p(X, 0.9, min_tokens_to_keep=0), ["min_tokens_to_keep", "0"]),
    (lambda: js.top_k(X, 3, min_tokens_to_keep=-2), ["min_tokens_to_keep", "-2"]),
    (lambda: js.top_p(jnp.zeros((4, 8), jnp.int32), 0.9), ["logits", "int32"]),
    (lambda: js.temperature(jnp.zeros(8, jnp.int32), 1.0), ["logits", "int32"]),
    (lambda: js.top_p(X, np.full(3, 0.9)), ["p", "(3,)", "(4,)"]),
    (lambda: js.top_k(X, np.ones((4, 8), np.int32)), ["k", "(4, 8)"]),
    (lambda: js.logit_bias(X, jnp.zeros(7)), ["bias", "(7,)"]),
    (lambda: js.ban_tokens(X, jnp.array([1, 8])), ["token_ids", "8"]),
    (lambda: js.allow_tokens(X, jnp.array([1, -2])), ["token_ids", "-2"]),
    (lambda: js.ban_tokens(X, jnp.array([1.0, 2.0])), ["token_ids", "float32"]),
    (lambda: js.ban_tokens(X, jnp.zeros((3, 2), jnp.int32)), ["token_ids", "(3,)"]),
    (lambda: js.sparse_logit_bias(X, jnp.array([1, 2]), jnp.zeros(3)), ["values", "(3,)"]),
    # Python lists are checked like arrays (not skipped)
    (lambda: js.top_p(X, [0.9, 1.5, 0.5, 0.5]), ["top_p", "p", "1.5"]),
    (lambda: js.top_k(X, [2, -3, 1, 1]), ["top_k", "k", "-3"]),
    (lambda: js.temperature(X, [-1.0, 1.0, 1.0, 1.0]), ["temperature", "t", "-1.0"]),
    (lambda: js.ban_tokens(X, [1, -5]), ["token_ids", "-5"]),
    (lambda: js.allow_tokens(X, [99]), ["token_ids", "99"]),
    (lambda: js.top_k(X, np.full(4, 2**32 + 1)), ["top_k", "k", "2**31 - 1", "4294967297"]),
    # a +inf or NaN bias would empty the row's softmax; -inf (a ban) is fine
    (lambda: js.logit_bias(X, jnp.array([0, 0, np.inf, 0, 0, 0, 0, 0])), ["logit_bias", "bias", "inf"]),
    (lambda: js.logit_bias(X, np.array([0, 0, np.nan, 0, 0, 0, 0, 0])), ["logit_bias", "bias", "nan"]),
    (lambda: js.sparse_logit_bias(X, jnp.array([1, 2]), jnp.array([1.0, np.inf])), ["values", "inf"]),
]


@pytest.mark.parametrize("call,words", ERRORS, ids=[" ".join(w) for _, w in ERRORS])
def test_invalid_values_raise_value_error_naming_parameter_and_value(call, words):
    with pytest.raises(ValueError) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_minus_inf_bias_is_a_ban():
    out = js.logit_bias(X, jnp.where(jnp.arange(8) == 2, -jnp.inf, 0.0))
    assert np.isneginf(np.asarray(out)[:, 2]).all() and np.isfinite(np.asarray(out)[:, 3]).all()


def test_eager_top_k_with_python_ints_compiles_once():
    """A Python int k is traced like any other value: eager calls with k = 1, 2, 3, 0 and
    a k >= V share one compilation, and each equals the reference."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 300)), jnp.float32)
    js.top_k(x, 7)  # warm up this shape
    before = _filters._truncation_on_rows._cache_size()
    for k in (1, 2, 3, 0, 300, 1000):
        expected = [np.isfinite(ref.top_k_row(row, k)[0]) for row in np.asarray(x)]
        np.testing.assert_array_equal(np.isfinite(js.top_k(x, k)), expected)
    assert _filters._truncation_on_rows._cache_size() == before


def test_traced_values_are_not_checked_but_shapes_are():
    # a traced value cannot be checked in Python: no error, no clamping decision made here
    out = jax.jit(js.top_p)(X, 0.5)
    assert out.shape == X.shape
    with pytest.raises(ValueError, match="p"):
        jax.jit(js.top_p)(X, jnp.full(3, 0.5))


# ----------------------------------------------------------------------------- recompilation


@pytest.mark.parametrize("name", list(FILTERS))
def test_changing_values_never_recompiles(name):
    traces = []

    @jax.jit
    def f(x, v):
        traces.append(1)  # runs once per trace (= per compilation)
        return FILTERS[name](x, v)

    rng = np.random.default_rng(15)
    x = make_logits(rng, (4,), 9)
    scalars = [DISABLED[name]] + [make_values(name, rng, 4, 9)[i].item() for i in range(4)]
    if name == "top_k":
        scalars = [int(s) for s in scalars]
    else:
        scalars = [float(s) for s in scalars]
    for v in scalars:
        out = f(x, v)
        if v == DISABLED[name]:  # traced disabled value: the identity, bit for bit
            np.testing.assert_array_equal(out, x)
    assert len(traces) == 1
    for _ in range(3):
        f(x, make_values(name, rng, 4, 9))  # per-row arrays: one more signature
    assert len(traces) == 2
    if hasattr(f, "_cache_size"):
        assert f._cache_size() == 2
