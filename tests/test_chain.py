"""Processors, chains and sample_step: composition order, pytree behaviour (values traced,
structure static: no recompilation), validation at construction, keys, the stateful
protocol, and log-probs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
import reference as ref
from jaxsample._filters.sampling import fold_in_rows
from jaxsample._processors.base import processor_dataclass, static_field

B, V = 3, 10


def logits_batch(seed=0):
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(0, 2, (B, V)), 1).astype(np.float32)
    x[1, 4] = -np.inf
    return jnp.asarray(x)


def every_processor(scale=1.0):
    """One of each processor; ``scale`` changes the values, never the structure."""
    ids = np.array([[2, -1], [-1, -1], [7, 3]], np.int32)
    return [
        js.LogitBias(scale * np.linspace(-1, 1, V).astype(np.float32)),
        js.SparseLogitBias(ids, scale * np.array([0.5, 9.0], np.float32)),
        js.BanTokens(np.array([5, -1], np.int32)),
        js.Temperature(scale * np.array([0.7, 1.3, 0.0], np.float32)),
        js.TopK(np.array([0, 3, 5], np.int32)),
        js.TopP(0.9 * scale, min_tokens_to_keep=2),
        js.MinP(0.05 * scale),
        js.TypicalP(0.95 * scale),
        js.EpsilonCutoff(1e-3 * scale),
        js.EtaCutoff(1e-3 * scale),
        js.TopNSigma(3.0 * scale),
        js.AllowTokens(np.arange(V - 1, dtype=np.int32)),
    ]


# ----------------------------------------------------------------------------- composition


def test_chain_equals_its_parts_applied_in_order():
    x = logits_batch()
    procs = every_processor()
    expected = x
    for p in procs:
        expected = p(expected)
    np.testing.assert_array_equal(js.chain(*procs)(x), expected)
    # the same through the functional API, one filter at a time
    manual = js.logit_bias(x, procs[0].bias)
    manual = js.sparse_logit_bias(manual, procs[1].token_ids, procs[1].values)
    manual = js.ban_tokens(manual, procs[2].token_ids)
    manual = js.temperature(manual, procs[3].t)
    manual = js.top_k(manual, procs[4].k)
    manual = js.top_p(manual, 0.9, min_tokens_to_keep=2)
    manual = js.min_p(manual, 0.05)
    manual = js.typical_p(manual, 0.95)
    manual = js.epsilon_cutoff(manual, 1e-3)
    manual = js.eta_cutoff(manual, 1e-3)
    manual = js.top_n_sigma(manual, 3.0)
    manual = js.allow_tokens(manual, procs[11].token_ids)
    np.testing.assert_array_equal(expected, manual)
    # apply() with state and keys is the same computation
    c = js.chain(*procs)
    state = c.init(None, None, V)
    assert state == ((),) * len(procs)
    keys = jax.random.split(jax.random.key(0), B)
    np.testing.assert_array_equal(c.apply(x, state, keys), expected)
    # chains nest
    nested = js.chain(js.chain(*procs[:4]), js.chain(*procs[4:]))
    np.testing.assert_array_equal(nested(x), expected)


def test_default_chain_order_and_values():
    c = js.default_chain(temperature=0.5, top_k=5, top_p=0.9, min_p=0.1, min_tokens_to_keep=2)
    assert [type(p).__name__ for p in c.processors] == ["Temperature", "TopK", "TopP", "MinP"]
    assert [p.min_tokens_to_keep for p in c.processors[1:]] == [2, 2, 2]
    x = logits_batch()
    want = js.min_p(js.top_p(js.top_k(js.temperature(x, 0.5), 5, min_tokens_to_keep=2), 0.9,
                             min_tokens_to_keep=2), 0.1, min_tokens_to_keep=2)
    np.testing.assert_array_equal(c(x), want)
    # defaults are all disabled: the identity
    np.testing.assert_array_equal(js.default_chain()(x), x)


def test_temperature_comes_before_top_p():
    """Seeds example: T = 0.5 sharpens to nice .68 / hot .25, so top_p 0.9 keeps 2 words;
    top-p before temperature would keep 4 (the peer bug of the wrong order)."""
    seeds = jnp.array([1.2, 2.0, 3.5, 3.0, 1.8, 1.0])
    kept = np.isfinite(js.default_chain(temperature=0.5, top_p=0.9)(seeds))
    assert np.flatnonzero(kept).tolist() == [2, 3]
    wrong = js.chain(js.TopP(0.9), js.Temperature(0.5))(seeds)
    assert np.flatnonzero(np.isfinite(wrong)).tolist() == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- pytrees, recompilation


def test_values_are_leaves_and_min_tokens_to_keep_is_static():
    c = js.default_chain(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, min_tokens_to_keep=3)
    leaves, treedef = jax.tree_util.tree_flatten(c)
    assert leaves == [0.7, 40, 0.9, 0.05]
    assert "3" in str(treedef)  # min_tokens_to_keep lives in the structure
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.processors[2].p == 0.9 and again.processors[2].min_tokens_to_keep == 3
    # unflattening with placeholders (as jax does internally) must not validate
    placeholders = jax.tree_util.tree_unflatten(treedef, [object()] * len(leaves))
    assert isinstance(placeholders, js.Chain)
    shapes = jax.eval_shape(lambda c: c, c)
    assert isinstance(shapes.processors[0], js.Temperature)


def test_changing_chain_values_never_recompiles():
    traces = []

    @jax.jit
    def step(chain, logits, keys):
        traces.append(1)  # once per trace, i.e. per compilation
        return js.sample_step(chain, logits, chain.init(None, None, V), keys)[0]

    x = logits_batch()
    keys = jax.random.split(jax.random.key(0), B)
    settings = [
        dict(),
        dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.1),
        dict(temperature=1, top_k=1, top_p=1, min_p=0),  # Python ints: canonicalised
        dict(temperature=0.0),  # greedy
        dict(temperature=np.float32(2.0), top_k=np.int64(3), top_p=0.5),
    ]
    for kw in settings:
        step(js.default_chain(**kw), x, keys)
    assert len(traces) == 1
    # per-row values: a new signature once, then no more compilations
    for t in (0.5, 1.5):
        step(js.default_chain(temperature=np.full(B, t, np.float32),
                              top_p=np.full(B, 0.8, np.float32)), x, keys)
    assert len(traces) == 2
    if hasattr(step, "_cache_size"):
        assert step._cache_size() == 2
    # a chain of every processor, then every value changed
    step(js.chain(*every_processor(1.0)), x, keys)
    step(js.chain(*every_processor(0.5)), x, keys)
    assert len(traces) == 3
    # the structure is static: min_tokens_to_keep recompiles (documented)
    step(js.default_chain(min_tokens_to_keep=2), x, keys)
    assert len(traces) == 4


def test_vmap_over_a_chain_with_per_row_values():
    x = logits_batch()
    c = js.default_chain(temperature=np.array([0.5, 1.0, 2.0], np.float32),
                         top_p=np.array([0.5, 0.9, 1.0], np.float32))
    batched = c(x)
    # in_axes built by mapping over the chain: rebuilding processors with 0 / None
    # leaves must not trip validation (TopP(0) would be invalid if constructed)
    axes = jax.tree_util.tree_map(lambda v: 0 if np.ndim(v) else None, c)
    assert axes.processors[2].p == 0
    per_row = jax.vmap(lambda c, row: c(row), in_axes=(axes, 0))(c, x)
    np.testing.assert_array_equal(per_row, batched)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("make,words", [
    (lambda: js.TopP(1.5), ["top_p", "p", "1.5"]),
    (lambda: js.TopP(0), ["top_p", "p", "0"]),
    (lambda: js.TopK(-1), ["top_k", "k", "-1"]),
    (lambda: js.TopK(2.5), ["top_k", "k", "2.5"]),
    (lambda: js.Temperature(-0.5), ["temperature", "t", "-0.5"]),
    (lambda: js.MinP(2.0), ["min_p", "p", "2.0"]),
    (lambda: js.TypicalP(0.0), ["typical_p", "p", "0.0"]),
    (lambda: js.EpsilonCutoff(1.0), ["epsilon", "1.0"]),
    (lambda: js.EtaCutoff(-1.0), ["eta", "-1.0"]),
    (lambda: js.TopNSigma(-2.0), ["n", "-2.0"]),
    (lambda: js.TopP(np.array([0.5, 1.2], np.float32)), ["p", "1.2"]),
    (lambda: js.TopK(3, min_tokens_to_keep=0), ["min_tokens_to_keep", "0"]),
    (lambda: js.BanTokens(np.array([3, -2])), ["token_ids", "-2"]),
    (lambda: js.AllowTokens(np.array([0.5])), ["token_ids", "float"]),
    (lambda: js.default_chain(top_p=0.0), ["top_p", "p", "0.0"]),
    (lambda: js.default_chain(temperature=-1), ["temperature", "t", "-1"]),
    (lambda: js.default_chain(min_tokens_to_keep=0), ["min_tokens_to_keep", "0"]),
    # values are checked as given, before the cast to int32 / float32
    (lambda: js.TopK([2.5, 3.0]), ["k", "integer", "2.5"]),
    (lambda: js.Temperature([1.0, -0.5]), ["t", "-0.5"]),
    (lambda: js.RepetitionPenalty(1.2, window=[1.5, 2.0]), ["window", "integer", "1.5"]),
    (lambda: js.BanTokens([3, 2.5]), ["token_ids", "float"]),
    (lambda: js.LogitBias([0.0, float("inf")]), ["bias", "inf"]),
    (lambda: js.SparseLogitBias([1], [float("nan")]), ["values", "nan"]),
])
def test_invalid_values_raise_at_construction(make, words):
    with pytest.raises(ValueError) as info:
        make()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_chain_rejects_non_processors_and_bad_state():
    with pytest.raises(TypeError, match="LogitsProcessor"):
        js.chain(js.top_p)
    c = js.default_chain()
    with pytest.raises(ValueError, match="one entry per processor"):
        c.apply(logits_batch(), (), None)


# ----------------------------------------------------------------------------- sample_step


def test_sample_step_logprobs_and_keys():
    x = logits_batch()
    c = js.chain(js.BanTokens(np.array([0], np.int32)), js.default_chain(temperature=0.8, top_p=0.9))
    keys = jax.random.split(jax.random.key(3), B)
    state = c.init(jnp.zeros((B, 4), jnp.int32), jnp.full(B, 4, jnp.int32), V)
    token, new_state, out = jax.jit(js.sample_step)(c, x, state, keys)
    assert token.dtype == jnp.int32 and token.shape == (B,)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    processed = c.apply(x, state, keys)
    # the draw uses fold_in(key, 0), row by row
    np.testing.assert_array_equal(token, js.sample(fold_in_rows(keys, 0), processed))
    assert np.all(np.isfinite(np.asarray(processed)[np.arange(B), np.asarray(token)]))
    for r in range(B):
        t = int(token[r])
        want_raw = ref.log_softmax(np.asarray(x[r], np.float64))[t]
        want_proc = ref.log_softmax(np.asarray(processed[r], np.float64))[t]
        np.testing.assert_allclose(out.token_logprob_raw[r], want_raw, rtol=1e-5)
        np.testing.assert_allclose(out.token_logprob_processed[r], want_proc, rtol=1e-5)
    assert isinstance(out, js.StepOutput)
    # raw uint32 keys give the same step
    raw = jax.random.key_data(keys)
    np.testing.assert_array_equal(jax.jit(js.sample_step)(c, x, state, raw)[0], token)


def test_sample_step_rows_are_independent_of_batch_mates():
    x = np.asarray(logits_batch(1))
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(4), B)))
    step = jax.jit(js.sample_step)
    c = js.default_chain(temperature=np.array([1.0, 0.6, 1.4], np.float32), top_k=5)
    token, _, out = step(c, x, c.init(None, None, V), keys)
    for r in range(B):
        row_chain = js.default_chain(temperature=float(c.processors[0].t[r]), top_k=5)
        t1, _, o1 = step(row_chain, x[r:r + 1], row_chain.init(None, None, V), keys[r:r + 1])
        assert int(t1[0]) == int(token[r])
        assert float(o1.token_logprob_processed[0]) == float(out.token_logprob_processed[r])


# ----------------------------------------------------------------------------- stateful / stochastic


@processor_dataclass
class CountPenalty(js.LogitsProcessor):
    """Toy stateful processor: logit -= alpha * count of the token so far (incl. prompt)."""

    alpha: float = 1.0
    stateful = True

    def init(self, prompt_tokens, prompt_lengths, vocab_size):
        valid = jnp.arange(prompt_tokens.shape[1]) < prompt_lengths[:, None]
        one_hot = jax.nn.one_hot(prompt_tokens, vocab_size) * valid[..., None]
        return one_hot.sum(axis=1)  # [B, V]

    def apply(self, logits, state, key):
        return logits - self.alpha * state

    def update(self, state, token, processed_logits):
        return state + jax.nn.one_hot(token, state.shape[-1])


@processor_dataclass
class Jitter(js.LogitsProcessor):
    """Toy stochastic processor: adds scale * U[0, 1) noise drawn from the row's key."""

    scale: float = 1.0
    needs_key = True

    def apply(self, logits, state, key):
        noise = jax.vmap(lambda k: jax.random.uniform(k, (logits.shape[-1],)))(key)
        return logits + self.scale * noise


def test_stateful_processor_protocol_through_a_scan():
    c = js.chain(CountPenalty(alpha=100.0), js.Temperature(1.0))
    with pytest.raises(TypeError, match="stateful"):
        c(logits_batch())
    prompts = jnp.array([[1, 2, 0], [3, 3, 3]], jnp.int32)
    lengths = jnp.array([2, 1], jnp.int32)
    state = c.init(prompts, lengths, 4)
    np.testing.assert_array_equal(state[0], [[0, 1, 1, 0], [0, 0, 0, 1]])
    keys = jax.random.split(jax.random.key(0), 2)

    def body(state, step):
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
        token, state, _ = js.sample_step(c, jnp.zeros((2, 4)), state, step_keys)
        return state, token

    state, tokens = jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(4)))(state)
    tokens = np.asarray(tokens).T  # [B, steps]
    # a penalty of 100 per use makes every draw a least-used token so far:
    # row 0 (prompt 1, 2) first uses {0, 3}; row 1 (prompt 3) first uses {0, 1, 2}
    assert set(tokens[0, :2]) == {0, 3} and tokens[0, 3] != tokens[0, 2]
    assert set(tokens[1, :3]) == {0, 1, 2}
    counts = np.array([[0, 1, 1, 0], [0, 0, 0, 1]]) + np.stack(
        [np.bincount(t, minlength=4) for t in tokens])
    np.testing.assert_array_equal(state[0], counts)


def test_processor_keys_are_fold_in_of_the_step_key():
    x = logits_batch()
    keys = jax.random.split(jax.random.key(5), B)
    c = js.chain(js.Temperature(2.0), Jitter(0.5))
    with pytest.raises(TypeError, match="key"):
        c(x)
    want = Jitter(0.5).apply(js.temperature(x, 2.0), (), fold_in_rows(keys, 2))
    np.testing.assert_allclose(c(x, keys), want, rtol=1e-6)
    np.testing.assert_allclose(c.apply(x, c.init(None, None, V), keys), want, rtol=1e-6)
    # per-row: a row's processed logits depend only on its own key
    alone = c(x[1:2], keys[1:2])
    np.testing.assert_allclose(alone[0], want[1], rtol=1e-6)


def test_static_field_is_static():
    @processor_dataclass
    class Scaled(js.LogitsProcessor):
        factor: float = 2.0
        mode: str = static_field(default="mul")

        def apply(self, logits, state, key):
            return logits * self.factor if self.mode == "mul" else logits + self.factor

    leaves, treedef = jax.tree_util.tree_flatten(Scaled(3.0, "add"))
    assert leaves == [3.0] and "add" in str(treedef)
    assert math.isclose(float(Scaled(3.0, "add")(jnp.zeros(1))[0]), 3.0)
