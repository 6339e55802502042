"""Sort-free selection (`jaxsample._select`) and the fast sampler paths: exactness against
the full-sort reference path (``method="sort"``) and the float64 NumPy reference
(tests/reference.py), on random and adversarial logits, for every engine / digit plan /
window setting, plus the two-level inverse-CDF sampler's distribution and boundaries.

Counts (top-k) must match exactly. Masses are float32 sums in a different order than a
sort's running sum, so a row whose float64 running mass passes within a relative 1e-5
of ``p * total`` may be decided differently; such rows are skipped and counted (and
must stay a minority), as in tests/test_filters.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
import reference as ref
from jaxsample._filters import sampling as _sampling
from jaxsample._selection import select as _select
from jaxsample._selection.select import Plan
from helpers import (FILTER_CASES, REL_MARGIN, adversarial, assert_element_values,
                     assert_filter_matches_reference, assert_same_thresholds, grid, mass_margin, per_row_k,
                     per_row_p)

PLANS = {
    # the CPU plan: top-64 window, then scatter radix 13+10+9 below 65536 tokens, 16+16
    # above (16 for bf16)
    "auto": "auto",
    "radix": "radix",  # scatter radix only
    "scatter-16-16": Plan("scatter", (16, 16), (16,), window=0),  # the large-vocab CPU digits
    "compare": _select.ACCELERATOR_PLAN,  # the GPU/TPU plan: 4-bit compare passes
    "scatter-11-11-10": Plan("scatter", (11, 11, 10), (5, 5, 6), window=0),
    "compare-8-window4": Plan("compare", (8, 8, 8, 8), (8, 8), window=4, top_k_static_max=0),
}
slow = pytest.mark.slow

# The default run covers every engine and the auto path (window + scatter fallback) at a
# small and a mid vocabulary; -m slow runs the full matrix.
PRIMITIVE_GRID = grid(
    [(plan, vocab) for plan in PLANS for vocab in (1, 7, 1000)],
    [("auto", 1), ("auto", 7), ("auto", 1000), ("compare", 7), ("compare", 1000),
     ("scatter-16-16", 1000), ("scatter-11-11-10", 1000), ("compare-8-window4", 1000)])


# ----------------------------------------------------------------------------- jitted primitives


@functools.lru_cache(maxsize=None)
def kth_fn(method):
    return jax.jit(lambda x, k: _select.kth_largest(x, k, method=method))


@functools.lru_cache(maxsize=None)
def mass_fn(method, with_weights):
    if with_weights:
        return jax.jit(lambda s, w, p: _select.mass_threshold(s, w, p, method=method))
    return jax.jit(lambda s, p: _select.mass_threshold(s, None, p, method=method))


# ----------------------------------------------------------------------------- keys


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_ordered_keys_preserve_order_and_round_trip(dtype):
    rng = np.random.default_rng(0)
    specials = [-np.inf, np.inf, -0.0, 0.0, 1e-45, -1e-45, 1e-40, -3.0, 3.0, 65504.0]
    x = np.concatenate([rng.standard_normal(300) * 10.0 ** rng.integers(-6, 5, 300), specials])
    x = jnp.asarray(x, dtype)
    keys = np.asarray(_select.ordered_keys(x)).astype(np.int64)
    i, j = np.triu_indices(x.shape[0], 1)
    # The order of the keys is the order XLA compares in (XLA:CPU treats subnormals as
    # zero, so ``x >= threshold`` in the filters does too).
    xla_order = np.asarray(jnp.sign((x[i] > x[j]).astype(jnp.int32) - (x[i] < x[j]).astype(jnp.int32)))
    np.testing.assert_array_equal(np.sign(keys[i] - keys[j]), xla_order)
    back = _select.from_ordered_keys(jnp.asarray(keys, jnp.uint32), dtype)
    np.testing.assert_array_equal(np.asarray(back == x), True)
    nan_key = _select.ordered_keys(jnp.array([np.nan, -np.nan], dtype))
    assert np.all(np.asarray(nan_key) >= keys.max())  # NaN last, as in a sort


# ----------------------------------------------------------------------------- primitives vs sort


@pytest.mark.parametrize("plan, vocab", PRIMITIVE_GRID)
def test_kth_largest_equals_the_sort(plan, vocab):
    rng = np.random.default_rng(vocab)
    x = adversarial(rng, 36, vocab, subnormal=True)
    k = per_row_k(rng, 36, vocab)
    got = kth_fn(PLANS[plan])(x, k)
    want = kth_fn("sort")(x, k)
    assert_same_thresholds(got, want)
    assert_element_values(x, got)


@pytest.mark.parametrize("plan", ["auto", pytest.param("compare", marks=slow)])
def test_kth_largest_static_k_and_broadcasting(plan):
    rng = np.random.default_rng(1)
    x = adversarial(rng, 12, 300, subnormal=True).reshape(3, 4, 300)
    method = PLANS[plan]
    for k in (1, 299, 1000):  # lax.top_k, radix, clamped to V
        assert_same_thresholds(
            _select.kth_largest(x, k, method=method), _select.kth_largest(x, k, method="sort"))
    k = np.array([1, 70, 300, 5])  # one k per column of the [3, 4] batch
    assert_same_thresholds(kth_fn(method)(x, k), kth_fn("sort")(x, np.broadcast_to(k, (3, 4))))


@pytest.mark.parametrize("weighted", [False, True], ids=["softmax", "weights"])
@pytest.mark.parametrize("plan, vocab", PRIMITIVE_GRID)
def test_mass_threshold_equals_the_sort(plan, vocab, weighted):
    rng = np.random.default_rng(vocab + 7 * weighted)
    x = adversarial(rng, 36, vocab, subnormal=True)
    p = per_row_p(rng, 36)
    if weighted:
        w = rng.random(x.shape).astype(np.float32) * (rng.random(x.shape) < 0.8)
        w[3] = 0.0  # a row with no mass
        got, want = mass_fn(PLANS[plan], True)(x, w, p), mass_fn("sort", True)(x, w, p)
    else:
        got, want = mass_fn(PLANS[plan], False)(x, p), mass_fn("sort", False)(x, p)
        top = np.max(x.astype(np.float64), -1, keepdims=True)
        w = np.exp(x.astype(np.float64) - top)
    margin = mass_margin(x.astype(np.float64), np.asarray(w, np.float64), p)
    clear = margin > REL_MARGIN
    assert clear.mean() >= 0.75, clear.mean()
    assert_same_thresholds(got, want, clear)
    assert_element_values(x, got)


def test_mass_threshold_edge_rows():
    x = np.array([[1.0, 2.0, 2.0, -np.inf],
                  [-np.inf] * 4,
                  [-np.inf, 5.0, -np.inf, -np.inf],
                  [3.0, 3.0, 3.0, 3.0],
                  [0.0, 1.0, 2.0, 3.0]], np.float32)
    for method in ["auto", _select.ACCELERATOR_PLAN]:
        fn = mass_fn(method, False)
        np.testing.assert_array_equal(fn(x, np.ones(5, np.float32)), [-np.inf] * 5)  # p = 1
        got = np.asarray(fn(x, np.full(5, 1e-6, np.float32)))  # tiny p: the max
        np.testing.assert_array_equal(got, [2.0, -np.inf, 5.0, 3.0, 3.0])
        w = np.zeros_like(x)  # no mass: the max score, as the sort gives
        np.testing.assert_array_equal(
            mass_fn(method, True)(x[[0, 3]], w[[0, 3]], np.full(2, 0.5, np.float32)),
            mass_fn("sort", True)(x[[0, 3]], w[[0, 3]], np.full(2, 0.5, np.float32)))


@pytest.mark.parametrize("plan", ["auto", "compare"])
def test_16_bit_scores_use_16_bit_keys_and_equal_the_float32_sort(plan):
    rng = np.random.default_rng(2)
    x16 = jnp.asarray(adversarial(rng, 24, 1000), jnp.bfloat16)  # ties everywhere
    x32 = x16.astype(jnp.float32)
    k = per_row_k(rng, 24, 1000)
    p = per_row_p(rng, 24)
    kth = kth_fn(PLANS[plan])(x16, k)
    assert kth.dtype == jnp.bfloat16
    assert_same_thresholds(kth, kth_fn("sort")(x32, k))
    got = mass_fn(PLANS[plan], False)(x16, p).astype(jnp.float32)
    want = mass_fn("sort", False)(x32, p)
    w = np.exp(np.asarray(x32, np.float64) - np.asarray(x32, np.float64).max(-1, keepdims=True))
    clear = mass_margin(np.asarray(x32, np.float64), w, p) > REL_MARGIN
    assert_same_thresholds(got, want, clear)


def test_window_decides_peaked_rows_and_falls_back_exactly():
    """Batches where the top-64 window decides every row, some rows, or none."""
    rng = np.random.default_rng(3)
    vocab = 5000
    peaked = (-3.0 * np.log(np.stack([rng.permutation(vocab) for _ in range(6)]) + 1)).astype(np.float32)
    flat = rng.standard_normal((6, vocab)).astype(np.float32)
    p = np.full(6, 0.9, np.float32)
    for x in (peaked, flat, np.concatenate([peaked[:3], flat[:3]])):
        np.testing.assert_array_equal(mass_fn("auto", False)(x, p), mass_fn("sort", False)(x, p))
    k = np.array([1, 50, 64, 65, 4000, 5000], np.int32)
    for kk in (k, np.minimum(k, 64)):
        np.testing.assert_array_equal(kth_fn("auto")(flat, kk), kth_fn("sort")(flat, kk))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_no_sort_in_the_compiled_filters_and_sampler(dtype):
    """The sort-free paths stay sort-free after XLA's rewrites (e.g. a top-k whose only
    use is its last column must not turn back into a full sort). XLA:CPU only."""
    if jax.default_backend() != "cpu":
        pytest.skip("checks XLA:CPU's compiled HLO")
    batch, vocab = 4, 4096
    keys = jax.random.split(jax.random.key(0), batch)
    chain = js.default_chain(temperature=0.8, top_k=np.full(batch, 40), top_p=0.9, min_p=0.05,
                             min_tokens_to_keep=2)

    def everything(x, k, p):
        outs = [js.top_p(x, p), js.top_p(x, p, min_tokens_to_keep=3), js.top_k(x, k),
                js.top_k(x, 50), js.top_k(x, 1000), js.typical_p(x, p),
                js.min_p(x, 0.1, min_tokens_to_keep=3), js.temperature(x, 0.0)]
        tokens = [js.sample(keys, x), js.greedy(x),
                  js.sample_step(chain, x, chain.init(None, None, vocab), keys)[0]]
        return outs, tokens

    x = jnp.zeros((batch, vocab), dtype)
    hlo = jax.jit(everything).lower(x, np.full(batch, 50), np.full(batch, 0.9, np.float32))
    sorts = [line for line in hlo.compile().as_text().splitlines() if " sort(" in line]
    assert not sorts, sorts[:3]


# ----------------------------------------------------------------------------- filters vs reference


@functools.lru_cache(maxsize=None)
def filter_fn(name, m):
    return jax.jit(functools.partial(FILTER_CASES[name][0], min_tokens_to_keep=m))


FILTER_GRID = grid(
    [(name, vocab, dtype, m) for name in FILTER_CASES for vocab in (1, 7, 1000)
     for dtype in ("f32", "bf16") for m in (1, 3)],
    [(name, vocab, dtype, m) for name in FILTER_CASES
     for vocab, dtype, m in ((7, "f32", 1), (1000, "f32", 1), (1000, "f32", 3), (1000, "bf16", 1))
     if name in ("top_k", "top_p") or (vocab, m) == (1000, 1)])


@pytest.mark.parametrize("name, vocab, dtype, m", FILTER_GRID)
def test_filters_match_the_float64_reference(name, vocab, dtype, m):
    rng = np.random.default_rng(vocab + 3)
    fn, row_fn, values_fn = FILTER_CASES[name]
    logits = jnp.asarray(adversarial(rng, 24, vocab), {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype])
    values = values_fn(rng, 24, vocab)
    assert_filter_matches_reference(row_fn, logits, values, filter_fn(name, m)(logits, values), m)


@pytest.mark.parametrize("name", grid([(n,) for n in FILTER_CASES], [("top_k",), ("top_p",)]))
def test_filters_at_a_vocab_that_is_no_multiple_of_any_block(name):
    rng = np.random.default_rng(32003)
    fn, row_fn, values_fn = FILTER_CASES[name]
    logits = jnp.asarray(adversarial(rng, 12, 32003))
    values = values_fn(rng, 12, 32003)
    # Masses move in steps of ~1 / V here: more rows sit near a boundary.
    assert_filter_matches_reference(row_fn, logits, values, filter_fn(name, 1)(logits, values),
                                    min_clear=0.5)


def test_filters_under_vmap_equal_the_batched_call():
    """Under vmap the batch-wide conds become selects: both branches run, same result."""
    rng = np.random.default_rng(4)
    logits = jnp.asarray(adversarial(rng, 12, 300))
    k, p = per_row_k(rng, 12, 300), per_row_p(rng, 12)
    np.testing.assert_array_equal(jax.vmap(js.top_k)(logits, k), js.top_k(logits, k))
    np.testing.assert_array_equal(jax.vmap(js.top_p)(logits, p), js.top_p(logits, p))
    t = np.where(np.arange(12) % 3 == 0, 0.0, 0.7).astype(np.float32)
    np.testing.assert_array_equal(jax.vmap(js.temperature)(logits, t), js.temperature(logits, t))


def test_default_chain_matches_the_reference_composition():
    rng = np.random.default_rng(5)
    vocab = 1000
    logits = jnp.asarray(adversarial(rng, 24, vocab)[np.arange(24) % 12 != 2])  # no 1e3 rows
    n = logits.shape[0]
    t = rng.uniform(0.5, 1.5, n).astype(np.float32)
    k = per_row_k(rng, n, vocab)
    p = per_row_p(rng, n)
    mp = np.where(np.arange(n) % 2 == 0, 0.0, 0.05).astype(np.float32)
    for m in (2,):
        chain = js.default_chain(temperature=t, top_k=k, top_p=p, min_p=mp, min_tokens_to_keep=m)
        out = np.asarray(jax.jit(lambda c, x: c(x))(chain, logits), np.float64)
        x = np.asarray(logits, np.float64) / t[:, None]
        margins = []
        for row_fn, v in ((ref.top_k_row, k), (ref.top_p_row, p), (ref.min_p_row, mp)):
            x, margin = ref.apply(row_fn, x, v, m=m)
            margins.append(margin)
        clear = np.min(margins, axis=0) > 1e-4
        assert clear.mean() >= 0.75
        np.testing.assert_array_equal(np.isfinite(out)[clear], np.isfinite(x)[clear])


# ----------------------------------------------------------------------------- sampler fast paths


def test_two_level_inverse_cdf_boundaries():
    """u = 0 and the largest u land on the first and last live tokens, across blocks and
    the zero padding of a vocabulary that is no multiple of the block."""
    vocab = 1000  # 4 blocks of 256, the last one padded
    x = np.full(vocab, -np.inf, np.float32)
    live = [255, 256, 511, 700, 999]
    x[live] = [0.0, 1.0, -1.0, 0.5, 2.0]
    x[900] = -200.0  # underflows to zero mass: never drawn
    q = ref.softmax(x.astype(np.float64))
    edges = np.cumsum(q[live])
    largest = np.nextafter(np.float32(1), np.float32(0))
    u = np.array([0.0, largest] + [e - 1e-4 for e in edges[:-1]] + [e + 1e-4 for e in edges[:-1]],
                 np.float32)
    tokens = jax.jit(_sampling.inverse_cdf)(u, np.broadcast_to(x, (len(u), vocab)))
    assert tokens.tolist() == [255, 999] + live[:-1] + live[1:]


def test_two_level_sampler_matches_the_distribution():
    vocab = 1000
    rng = np.random.default_rng(6)
    x = np.full(vocab, -np.inf, np.float32)
    live = rng.choice(vocab, 24, replace=False)
    live[:4] = [0, 255, 256, 999]
    x[live] = rng.normal(0, 1, 24)
    x[5] = -150.0  # underflow
    q = ref.softmax(x.astype(np.float64))
    n = 24000
    keys = jax.random.split(jax.random.key(7), n)
    tokens = np.asarray(jax.jit(jax.vmap(js.sample, (0, None)))(keys, jnp.asarray(x)))
    counts = np.bincount(tokens, minlength=vocab).astype(np.float64)
    assert counts[q == 0].sum() == 0
    expected = n * q
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(expected * (1 - q)) + 1)
    big = expected >= 5
    chi2 = np.sum((counts[big] - expected[big]) ** 2 / expected[big])
    df = int(big.sum()) - 1
    assert chi2 <= df + 5 * math.sqrt(2 * df), (chi2, df)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_greedy_and_zero_temperature_take_the_lowest_index_on_ties(dtype):
    rng = np.random.default_rng(8)
    x = np.round(rng.normal(0, 1, (8, 700)))
    x[1, :] = -np.inf
    x[2, 100:] = -np.inf
    x[3, [5, 600]] = 50.0
    x = jnp.asarray(x, dtype)
    want = np.argmax(np.asarray(x, np.float32), axis=-1)
    want[1] = -1
    np.testing.assert_array_equal(js.greedy(x), want)
    t = js.temperature(x, np.zeros(8, np.float32))
    kept = np.isfinite(np.asarray(t, np.float32))
    assert kept[[0, 2, 3, 4, 5, 6, 7]].sum(-1).tolist() == [1] * 7
    np.testing.assert_array_equal(np.argmax(kept, -1)[[0, 2, 3]], want[[0, 2, 3]])


def test_token_logprobs_equal_log_softmax():
    rng = np.random.default_rng(9)
    x = adversarial(rng, 12, 1000)
    tokens = np.array([np.argmax(r) for r in x], np.int32)
    tokens[1] = 3
    tokens[2] = -1
    got = np.asarray(js.token_logprobs(x, tokens))
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(x), axis=-1))
    want = np.take_along_axis(logp, np.maximum(tokens, 0)[:, None], -1)[:, 0]
    want[2] = np.nan
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- big sweeps (slow)


@pytest.mark.slow
@pytest.mark.parametrize("vocab", [32003, 131072])
@pytest.mark.parametrize("plan", list(PLANS))
def test_large_vocab_sweep_equals_the_sort(plan, vocab):
    rng = np.random.default_rng(vocab % 1000)
    x = adversarial(rng, 24, vocab, subnormal=True)
    if plan in ("compare", "compare-8-window4"):
        x = x[:12]  # the compare engine materialises [R, C, V] on CPU: keep it small
    n = x.shape[0]
    k = per_row_k(rng, n, vocab)
    assert_same_thresholds(kth_fn(PLANS[plan])(x, k), kth_fn("sort")(x, k))
    p = per_row_p(rng, n)
    got, want = mass_fn(PLANS[plan], False)(x, p), mass_fn("sort", False)(x, p)
    w = np.exp(x.astype(np.float64) - x.astype(np.float64).max(-1, keepdims=True))
    clear = mass_margin(x.astype(np.float64), w, p) > REL_MARGIN
    assert clear.mean() >= 0.5
    assert_same_thresholds(got, want, clear)
    assert_element_values(x, got)


def test_two_stage_draw_resolves_tokens_inside_a_block_exactly():
    """With u_inner, the token inside the chosen block is the one at quantile u_inner of
    the block's own distribution: over a fine grid of u_inner, each token of the block
    gets its share of the block's mass to grid resolution, independently of how small
    the block is in the whole vocabulary (one uniform over the vocabulary could not
    resolve tokens whose mass is below 2**-23)."""
    vocab = 4096
    rng = np.random.default_rng(11)
    x = rng.normal(0, 1, vocab).astype(np.float32)
    x[256:512] -= 12.0  # block 1 holds ~1e-5 of the mass: its tokens are ~4e-8 each
    q = ref.softmax(x.astype(np.float64))
    block = q[256:512] / q[256:512].sum()
    before = q[:256].sum()
    u_block = np.float32(before + 0.5 * q[256:512].sum())  # lands in block 1
    grid = 1 << 14
    u_inner = (np.arange(grid) + 0.5) / grid
    tokens = jax.jit(_sampling.inverse_cdf)(np.full(grid, u_block, np.float32),
                                            np.broadcast_to(x, (grid, vocab)), u_inner.astype(np.float32))
    tokens = np.asarray(tokens)
    assert tokens.min() >= 256 and tokens.max() < 512
    share = np.bincount(tokens - 256, minlength=256) / grid
    np.testing.assert_allclose(share, block, atol=1.5 / grid)


def test_sample_draws_the_block_then_the_token_from_two_uniforms():
    """js.sample is inverse_cdf(u[..., 0], x, u[..., 1]) with u = two uniforms per row
    from the row's key (the documented two-stage draw)."""
    x = np.random.default_rng(12).normal(0, 2, (6, 3000)).astype(np.float32)
    keys = jax.random.split(jax.random.key(13), 6)
    u = jax.vmap(lambda k: jax.random.uniform(k, (2,), jnp.float32))(keys)
    expected = _sampling.inverse_cdf(u[:, 0], jnp.asarray(x), u[:, 1])
    np.testing.assert_array_equal(js.sample(keys, x), expected)
