"""History-aware penalties and stateful / stochastic samplers: each against a plainly
written NumPy reference (one row at a time, per-row values, disabled = identity),
against transformers' processors where they exist, and inside jitted generate (per-row
values, no recompilation when values change)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from helpers import TABLE_V, count_prefill_traces, table_model

V = TABLE_V  # 8: a small vocabulary, so random contexts repeat a lot (table_model's too)
NEG = -np.inf


# ----------------------------------------------------------------------------- references
# Plain Python / NumPy (float64), one row at a time, straight from docs/sampling.md and the
# named systems' sources. ``ctx`` is the row's context (prompt + output) as a list.


def ref_repetition(x, ctx, r, window):
    seen = set(ctx[-window:] if window else ctx)
    out = np.array(x, np.float64)
    for t in seen:
        out[t] = out[t] / r if out[t] > 0 else out[t] * r
    return out


def ref_presence_frequency(x, tokens, a, b, window):
    """``tokens``: the tokens counted (the output, or prompt + output for llama.cpp)."""
    tokens = tokens[-window:] if window else tokens
    out = np.array(x, np.float64)
    for t in set(tokens):
        c = tokens.count(t)
        out[t] -= b * c + a * (c > 0)
    return out


def ref_no_repeat_ngram(x, ctx, n):
    out = np.array(x, np.float64)
    if n == 0 or len(ctx) < n - 1:
        return out
    prefix = ctx[len(ctx) - n + 1:] if n > 1 else []
    for s in range(len(ctx) - n + 1):
        if ctx[s:s + n - 1] == prefix:
            out[ctx[s + n - 1]] = NEG
    return out


def ref_bad_words(x, ctx, sequences):
    out = np.array(x, np.float64)
    for seq in sequences:
        seq = [t for t in seq if t >= 0]
        if not seq:
            continue
        prefix = seq[:-1]
        if not prefix or (len(ctx) >= len(prefix) and ctx[len(ctx) - len(prefix):] == prefix):
            out[seq[-1]] = NEG
    return out


def ref_dry(x, ctx, multiplier, base, allowed, window, breakers):
    """llama.cpp's DRY with single-token breakers, written as plain loops."""
    out = np.array(x, np.float64)
    if multiplier == 0:
        return out
    ctx = ctx[-window:] if window else list(ctx)
    n = len(ctx)
    rep_limit = n  # tokens after the most recent breaker
    for i in range(n):
        if ctx[n - 1 - i] in breakers:
            rep_limit = i
            break
    longest = {}
    for p in range(n - 1):  # a repeat ending at p; ctx[p + 1] would extend it
        k = 0
        while k < rep_limit and p - k >= 0 and ctx[p - k] == ctx[n - 1 - k]:
            k += 1
        if k >= allowed:
            t = ctx[p + 1]
            longest[t] = max(longest.get(t, 0), k)
    max_exp = int(88.7228391 / math.log(base)) if base > 1.000001 else 0
    for t, length in longest.items():
        if t in breakers:
            continue
        e = length - allowed
        if max_exp > 0 and e > max_exp:
            e = max_exp
        out[t] -= multiplier * base ** e
    return out


def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - np.max(x))
    return e / e.sum()


def ref_xtc_fired(x, threshold):
    """XTC when its draw fires: drop every token with q >= t except the least likely."""
    q = softmax64(x)
    above = [i for i in range(len(x)) if q[i] >= threshold and np.isfinite(x[i])]
    out = np.array(x, np.float64)
    if len(above) >= 2:
        least = min(q[i] for i in above)
        for i in above:
            if q[i] > least:
                out[i] = NEG
    return out


def ref_mirostat_keep(x, mu):
    q = softmax64(x)
    out = np.array(x, np.float64)
    for i in range(len(x)):
        surprise = -math.log2(q[i]) if q[i] > 0 else math.inf
        if x[i] < np.max(x) and surprise > mu:  # the most likely token is always kept
            out[i] = NEG
    return out


def ref_dynatemp(x, t, delta, exponent):
    x = np.asarray(x, np.float64)
    if delta <= 0:
        t_eff = t
    else:
        finite = np.isfinite(x)
        n = int(finite.sum())
        if n <= 1:
            return x.copy()
        q = softmax64(x)
        h = -sum(qi * math.log(qi) for qi in q if qi > 0)
        t_min, t_max = max(0.0, t - delta), t + delta
        t_eff = t_min + (t_max - t_min) * (h / math.log(n)) ** exponent
    if t_eff == 0:
        out = np.full_like(x, NEG)
        out[np.argmax(x)] = x[np.argmax(x)]
        return out
    return x / t_eff


# ----------------------------------------------------------------------------- random contexts


def random_case(seed, b=5, p=6, steps=7):
    """Prompts [B, P] (right-padded, lengths in [1, P]), generated tokens [B, steps], logits."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, p + 1, size=b)
    prompts = rng.integers(0, V, size=(b, p)).astype(np.int32)
    prompts[np.arange(p)[None] >= lengths[:, None]] = 0
    # repetitive output: copy spans of the prompt now and then
    gen = rng.integers(0, V, size=(b, steps)).astype(np.int32)
    gen[::2, 2:5] = prompts[::2, :3]
    logits = np.round(rng.normal(0, 2, (b, V)), 2).astype(np.float32)
    logits[1, 3] = -np.inf
    return prompts, lengths, gen, logits


def run_processor(proc, prompts, lengths, gen, logits, max_new_tokens=None):
    """init from the prompts, update with each generated token, then apply."""
    n = gen.shape[1] if max_new_tokens is None else max_new_tokens
    state = proc.init(jnp.asarray(prompts), jnp.asarray(lengths), V, max_new_tokens=n)
    for i in range(gen.shape[1]):
        state = proc.update(state, jnp.asarray(gen[:, i]), jnp.asarray(logits))
    return np.asarray(proc.apply(jnp.asarray(logits), state, None))


def contexts(prompts, lengths, gen):
    return [list(prompts[r, :lengths[r]]) + list(gen[r]) for r in range(len(lengths))]


def assert_rows(out, want):
    np.testing.assert_allclose(out, np.asarray(want, np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_repetition_penalty_matches_reference(seed):
    prompts, lengths, gen, x = random_case(seed)
    r = np.array([1.0, 1.3, 2.0, 0.7, 1.5], np.float32)
    window = np.array([0, 0, 3, 5, 1], np.int32)
    out = run_processor(js.RepetitionPenalty(r, window), prompts, lengths, gen, x)
    ctx = contexts(prompts, lengths, gen)
    assert_rows(out, [ref_repetition(x[i], ctx[i], r[i], window[i]) for i in range(5)])


@pytest.mark.parametrize("include_prompt", [False, True])
def test_presence_frequency_matches_reference(include_prompt):
    prompts, lengths, gen, x = random_case(2)
    a = np.array([0.0, 0.5, -0.3, 1.0, 0.2], np.float32)
    b = np.array([0.0, 0.2, 0.4, -0.1, 1.0], np.float32)
    window = np.array([0, 2, 0, 4, 9], np.int32)
    proc = js.PresenceFrequencyPenalty(a, b, window, include_prompt=include_prompt)
    out = run_processor(proc, prompts, lengths, gen, x)
    counted = contexts(prompts, lengths, gen) if include_prompt else [list(g) for g in gen]
    assert_rows(out, [ref_presence_frequency(x[i], counted[i], a[i], b[i], window[i]) for i in range(5)])


@pytest.mark.parametrize("seed", [0, 3])
def test_no_repeat_ngram_matches_reference(seed):
    prompts, lengths, gen, x = random_case(seed)
    n = np.array([0, 1, 2, 3, 4], np.int32)
    out = run_processor(js.NoRepeatNGram(n), prompts, lengths, gen, x)
    ctx = contexts(prompts, lengths, gen)
    assert_rows(out, [ref_no_repeat_ngram(x[i], ctx[i], n[i]) for i in range(5)])


def test_bad_words_matches_reference_shared_and_per_row():
    prompts, lengths, gen, x = random_case(4)
    ctx = contexts(prompts, lengths, gen)
    # sequences built from each row's own context end, so some of them match
    shared = [[5], [ctx[0][-2], ctx[0][-1], 6], [ctx[2][-1], 1], [7, 7, 7, 7]]
    out = run_processor(js.BadWords(shared), prompts, lengths, gen, x)
    assert_rows(out, [ref_bad_words(x[i], ctx[i], shared) for i in range(5)])
    per_row = np.full((5, 2, 3), -1, np.int32)
    for i in range(5):
        per_row[i, 0, :2] = [ctx[i][-1], (i + 2) % V]
        per_row[i, 1, :1] = [i]
    out = run_processor(js.BadWords(per_row), prompts, lengths, gen, x)
    assert_rows(out, [ref_bad_words(x[i], ctx[i], per_row[i].tolist()) for i in range(5)])
    # output-only matching (vLLM): the prompt is not part of the context
    out = run_processor(js.BadWords(shared, include_prompt=False), prompts, lengths, gen[:, :1], x)
    assert_rows(out, [ref_bad_words(x[i], [int(gen[i, 0])], shared) for i in range(5)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dry_matches_reference(seed):
    prompts, lengths, gen, x = random_case(seed, steps=9)
    mult = np.array([0.0, 0.8, 1.0, 2.0, 0.5], np.float32)
    base = np.array([1.75, 1.75, 2.0, 1.0, 3.0], np.float32)
    allowed = np.array([2, 1, 2, 0, 1], np.int32)
    window = np.array([0, 0, 6, 0, 4], np.int32)
    breakers = np.array([[4, -1], [6, -1], [-1, -1], [2, 5], [-1, -1]], np.int32)
    proc = js.DRY(mult, base, allowed, window, breakers)
    out = run_processor(proc, prompts, lengths, gen, x)
    ctx = contexts(prompts, lengths, gen)
    want = [ref_dry(x[i], ctx[i], mult[i], base[i], allowed[i], window[i], set(breakers[i]) - {-1})
            for i in range(5)]
    assert_rows(out, want)


def test_dry_long_repeat_and_exponent_clamp():
    ctx = [1, 2] * 30 + [1]  # a 59-token repeat: 2 would extend it
    x = np.zeros((1, V), np.float32)
    for base, allowed in [(1.75, 2), (1e10, 1)]:  # the second clamps at floor(88.72 / ln 1e10) = 3
        proc = js.DRY(1e-30, base, allowed)
        out = run_processor(proc, np.array([ctx]), np.array([len(ctx)]), np.zeros((1, 0), np.int32), x, 1)
        assert_rows(out, [ref_dry(x[0], ctx, 1e-30, base, allowed, 0, set())])
    # the doc example: "1 2 3" repeats, so emitting 4 would make the repeat 4 long
    out = run_processor(js.DRY(1.0, 2.0, 2), np.array([[1, 2, 3, 4, 1, 2, 3]]), np.array([7]),
                        np.zeros((1, 0), np.int32), x, 1)
    np.testing.assert_array_equal(out[0], [0, 0, 0, 0, -2, 0, 0, 0])


def test_min_new_tokens_per_row():
    proc = js.MinNewTokens(np.array([0, 1, 3], np.int32), stop_ids=[[6, 7], [7, -1], [7, -1]])
    state = proc.init(jnp.zeros((3, 2), jnp.int32), jnp.array([1, 2, 2]), V)
    x = jnp.zeros((3, V))
    banned = []
    for _ in range(4):
        banned.append(~np.isfinite(np.asarray(proc.apply(x, state, None))))
        state = proc.update(state, jnp.zeros(3, jnp.int32), x)
    banned = np.stack(banned)  # [step, B, V]
    assert not banned[:, 0].any()  # min 0: the identity
    assert banned[0, 1, 7] and not banned[1:, 1].any()
    assert banned[:3, 2, 7].all() and not banned[3, 2].any() and not banned[:, 2, 6].any()


def test_xtc_fires_with_its_probability_and_matches_reference():
    rng = np.random.default_rng(5)
    b = 400
    x = np.round(rng.normal(0, 1.5, (b, V)), 2).astype(np.float32)
    threshold = np.where(np.arange(b) % 2 == 0, 0.1, 0.05).astype(np.float32)
    keys = jax.random.split(jax.random.key(3), b)
    always = np.asarray(js.XTC(1.0, threshold)(jnp.asarray(x), keys))
    assert_rows(always, [ref_xtc_fired(x[i], threshold[i]) for i in range(b)])
    np.testing.assert_array_equal(js.XTC(0.0, threshold)(jnp.asarray(x), keys), x)  # identity
    half = np.asarray(js.XTC(0.5, threshold)(jnp.asarray(x), keys))
    fired = np.array([not np.array_equal(half[i], x[i]) for i in range(b)])
    changes = np.array([not np.array_equal(always[i], x[i]) for i in range(b)])
    for i in range(b):  # each row is either untouched or exactly the fired version
        assert np.array_equal(half[i], x[i]) or np.array_equal(half[i], always[i])
    assert 0.4 < fired[changes].mean() < 0.6
    # its own draw: the same keys give the same rows, alone or in the batch
    np.testing.assert_array_equal(js.XTC(0.5, threshold[7:8])(jnp.asarray(x[7:8]), keys[7:8])[0], half[7])
    np.testing.assert_array_equal(js.XTC(1.0, 0.6)(jnp.asarray(x), keys), x)  # threshold > 0.5


def test_mirostat_truncation_and_mu_update():
    rng = np.random.default_rng(6)
    x = np.round(rng.normal(0, 2, (4, V)), 2).astype(np.float32)
    tau = np.array([1.0, 3.0, 0.0, np.inf], np.float32)
    eta = np.array([0.1, 0.5, 1.0, 0.3], np.float32)
    proc = js.MirostatV2(tau, eta)
    mu = proc.init(jnp.zeros((4, 1), jnp.int32), jnp.ones(4, jnp.int32), V)
    np.testing.assert_allclose(mu, 2 * tau)
    mu_ref = 2.0 * tau.astype(np.float64)
    keys = jax.random.split(jax.random.key(0), 4)
    for step in range(5):
        logits = jnp.asarray(x + step * 0.3 * rng.normal(size=x.shape).astype(np.float32))
        token, mu, _ = js.sample_step(proc, logits, mu, keys)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
        for i in range(4):
            kept = ref_mirostat_keep(np.asarray(logits[i]), mu_ref[i])
            if np.isinf(tau[i]):
                np.testing.assert_array_equal(kept, np.asarray(logits[i]))
            assert np.isfinite(kept[int(token[i])])
            q = softmax64(kept)  # the truncated, renormalised distribution it was drawn from
            if np.isfinite(tau[i]):
                mu_ref[i] -= eta[i] * (-math.log2(q[int(token[i])]) - tau[i])
        np.testing.assert_allclose(np.asarray(mu), mu_ref, rtol=1e-4, atol=1e-4)


def test_dynamic_temperature_matches_reference():
    rng = np.random.default_rng(7)
    x = np.round(rng.normal(0, 2, (6, V)), 2).astype(np.float32)
    x[4, 1:] = -np.inf  # one candidate
    t = np.array([1.0, 0.8, 1.5, 0.3, 1.0, 0.0], np.float32)
    delta = np.array([0.0, 0.5, 1.0, 0.5, 0.5, 0.0], np.float32)
    exponent = np.array([1.0, 2.0, 0.5, 1.0, 1.0, 1.0], np.float32)
    out = np.asarray(js.DynamicTemperature(t, delta, exponent)(jnp.asarray(x)))
    assert_rows(out, [ref_dynatemp(x[i], t[i], delta[i], exponent[i]) for i in range(6)])


@pytest.mark.parametrize("proc", [
    js.RepetitionPenalty(1.0, 3), js.PresenceFrequencyPenalty(0.0, 0.0), js.NoRepeatNGram(0),
    js.DRY(0.0), js.MinNewTokens(0, stop_ids=[1]), js.MirostatV2(), js.DynamicTemperature(),
    js.BadWords([[-1, -1]]),
], ids=lambda p: type(p).__name__)
def test_identity_values_are_the_identity(proc):
    prompts, lengths, gen, x = random_case(8)
    np.testing.assert_array_equal(run_processor(proc, prompts, lengths, gen, x), x)


def test_history_slides_when_full_and_skips_no_token():
    h = js.History.create(jnp.array([[1, 2, 3, 4]]), jnp.array([4]), capacity=3)
    np.testing.assert_array_equal(h.tokens, [[2, 3, 4]])
    h = h.append(jnp.array([5])).append(jnp.array([-1]))
    np.testing.assert_array_equal(h.tokens, [[3, 4, 5]])
    assert int(h.count[0]) == 3


@pytest.mark.parametrize("make, words", [
    (lambda: js.RepetitionPenalty(0.0), "penalty must be in"),
    (lambda: js.RepetitionPenalty(1.2, window=-1), "window must be in"),
    (lambda: js.NoRepeatNGram(1.5), "n must be an integer"),
    (lambda: js.DRY(0.8, base=0.9), "base must be in"),
    (lambda: js.XTC(1.5), "probability must be in"),
    (lambda: js.MirostatV2(tau=-1.0), "tau must be in"),
    (lambda: js.PresenceFrequencyPenalty(np.nan), "presence must be in"),
    (lambda: js.BadWords([[1, -1, 2]]), "right-padded"),
    (lambda: js.MinNewTokens(2, stop_ids=[-3]), "stop_ids must be >= 0"),
    (lambda: js.DynamicTemperature(range=-0.5), "range must be in"),
])
def test_invalid_values_raise(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_stateful_init_needs_prompts_and_capacity():
    with pytest.raises(ValueError, match="max_new_tokens"):
        js.RepetitionPenalty(1.2).init(jnp.zeros((1, 2), jnp.int32), jnp.array([2]), V)
    with pytest.raises(ValueError, match="prompts"):
        js.MirostatV2(5.0).init(None, None, V)
    with pytest.raises(ValueError, match="vocab size"):
        js.BadWords([[9]]).init(jnp.zeros((1, 2), jnp.int32), jnp.array([2]), V)
    with pytest.raises(TypeError, match="stateful"):
        js.RepetitionPenalty(1.2)(jnp.zeros((1, V)))


# ----------------------------------------------------------------------------- transformers


def test_matches_transformers_processors():
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(9)
    b, p, steps = 3, 5, 6
    prompts = rng.integers(0, V, size=(b, p)).astype(np.int32)
    gen = rng.integers(0, V, size=(b, steps)).astype(np.int32)
    gen[0, 1:4] = prompts[0, :3]
    ctx = np.concatenate([prompts, gen], axis=1)  # equal lengths: no padding for torch
    x = rng.normal(0, 2, (b, V)).astype(np.float32)
    ids, scores = torch.tensor(ctx, dtype=torch.long), torch.tensor(x)
    lengths = np.full(b, p)
    bad = [[5], [int(ctx[0, -1]), 2], [int(ctx[1, -2]), int(ctx[1, -1]), 3]]
    cases = [
        (js.RepetitionPenalty(1.3), lp.RepetitionPenaltyLogitsProcessor(1.3)),
        (js.RepetitionPenalty(0.8), lp.RepetitionPenaltyLogitsProcessor(0.8)),
        (js.NoRepeatNGram(2), lp.NoRepeatNGramLogitsProcessor(2)),
        (js.NoRepeatNGram(3), lp.NoRepeatNGramLogitsProcessor(3)),
        (js.BadWords(bad), lp.NoBadWordsLogitsProcessor(bad)),
    ]
    for ours, theirs in cases:
        out = run_processor(ours, prompts, lengths, gen, x)
        np.testing.assert_allclose(out, theirs(ids, scores.clone()).numpy(), rtol=1e-6,
                                   err_msg=type(ours).__name__)
    for done in (2, 4, 6):  # min_new_tokens = 4, eos 6: banned while fewer than 4 generated
        ours = run_processor(js.MinNewTokens(4, stop_ids=[6]), prompts, lengths, gen[:, :done], x)
        theirs = lp.MinNewTokensLengthLogitsProcessor(p, 4, 6)(ids[:, :p + done], scores.clone())
        np.testing.assert_array_equal(ours, theirs.numpy())


# ----------------------------------------------------------------------------- inside generate


PROMPTS = np.array([[1, 2, 3, 1, 2], [4, 4, 0, 0, 0], [5, 6, 7, 5, 0], [2, 0, 0, 0, 0]], np.int32)
LENGTHS = np.array([5, 2, 4, 1])
N_NEW = 10


def every_method(scale):
    """A chain of every history-aware / stateful method with per-row values, and its
    reference: ``ref(row, raw_logits, ctx, step, mu) -> processed`` (float64)."""
    r = np.array([1.0, 1.5, 2.5, 0.8]) ** scale
    w = np.array([0, 3, 0, 5], np.int32)
    a = np.array([0.0, 1.0, 0.5, 2.0]) * scale
    f = np.array([0.5, 0.0, 1.0, 0.3]) * scale
    n = np.array([2, 3, 0, 1], np.int32) if scale == 1 else np.array([0, 2, 4, 0], np.int32)
    mult = np.array([1.0, 0.0, 2.0, 0.5]) * scale
    bad = [[3], [1, 2, 4], [6, 7]]
    mn = np.array([0, 3, 5, 10], np.int32) // scale
    t = np.array([1.0, 0.7, 1.3, 0.9]) * scale
    dt = np.array([0.0, 0.5, 0.3, 0.0]) * scale
    xp = np.array([0.0, 1.0, 0.0, 1.0])  # 0 or 1: the reference knows whether XTC fires
    tau = np.array([np.inf, 4.0, 2.0, np.inf]) * scale
    f32 = lambda v: np.asarray(v, np.float32)
    chain = js.chain(
        js.MinNewTokens(mn, stop_ids=[0, 7]),
        js.BadWords(bad),
        js.RepetitionPenalty(f32(r), w),
        js.PresenceFrequencyPenalty(f32(a), f32(f), w),
        js.NoRepeatNGram(n),
        js.DRY(f32(mult), 1.75, 1, 0, [6]),
        js.DynamicTemperature(f32(t), f32(dt), 1.0),
        js.XTC(f32(xp), 0.2),
        js.MirostatV2(f32(tau), 0.5),
    )

    def ref(i, x, ctx, step, mu):
        if step < mn[i]:
            x = ref_bad_words(x, [], [[0], [7]])
        x = ref_bad_words(x, ctx, bad)
        x = ref_repetition(x, ctx, r[i], w[i])
        x = ref_presence_frequency(x, ctx[LENGTHS[i]:], a[i], f[i], w[i])
        x = ref_no_repeat_ngram(x, ctx, n[i])
        x = ref_dry(x, ctx, mult[i], 1.75, 1, 0, {6})
        x = ref_dynatemp(x, t[i], dt[i], 1.0)
        x = ref_xtc_fired(x, 0.2) if xp[i] else x
        return ref_mirostat_keep(x, mu)

    return chain, ref, tau


def replay(model, out, ref, tau, eta=0.5):
    """Replays every row: each emitted token must be allowed by the reference chain and its
    processed log-prob must equal the reference's (mirostat's mu tracked alongside)."""
    table = np.asarray(model.table, np.float64)
    tokens, n_gen = np.asarray(out.tokens), np.asarray(out.lengths)
    for i in range(tokens.shape[0]):
        ctx, mu = list(PROMPTS[i, :LENGTHS[i]]), 2.0 * tau[i]
        for step in range(n_gen[i]):
            x = ref(i, table[ctx[-1]], ctx, step, mu)
            token = int(tokens[i, step])
            assert np.isfinite(x[token]), (i, step)
            logq = x - np.max(x) - np.log(np.sum(np.exp(x - np.max(x))))
            np.testing.assert_allclose(out.logprobs_processed[i, step], logq[token], atol=2e-4,
                                       err_msg=str((i, step)))
            if np.isfinite(tau[i]):
                mu -= eta * (-logq[token] / math.log(2) - tau[i])
            ctx.append(token)


def test_every_method_inside_generate_matches_reference_without_recompiling():
    model, traces = count_prefill_traces(table_model())  # traces: one entry per compilation
    tokens = []
    for scale in (1, 2):  # every value changes (and some methods turn on or off)
        chain, ref, tau = every_method(scale)
        keys = jax.random.split(jax.random.key(scale), len(LENGTHS))
        out = js.generate(model, PROMPTS, LENGTHS, keys, max_new_tokens=N_NEW, sampler=chain)
        replay(model, out, ref, tau)
        assert np.asarray(out.lengths).sum() > 20
        tokens.append(np.asarray(out.tokens))
    assert len(traces) == 1
    assert not np.array_equal(*tokens)
