"""Research ergonomics (issue 16): writing processors, keys, stats, decode past the cache.

Each test names the friction point it covers; every one failed before the fix.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample._decoding import generate as _generate
from jaxsample._processors import base as _chain
from jaxsample._filters.sampling import fold_in_rows
from models import DecoderLM, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Bigram:
    """A fake model: next-token logits are a row of a fixed random table."""

    table: jax.Array  # [V, V]
    vocab_size: int = dataclasses.field(default=V, metadata=dict(static=True))

    def init_cache(self, batch_size, max_len):
        return jnp.zeros((batch_size,), jnp.int32)

    def prefill(self, tokens, lengths, cache):
        last = tokens[jnp.arange(tokens.shape[0]), lengths - 1]
        return self.table[last], last

    def decode(self, tokens, positions, cache):
        return self.table[tokens], tokens


def bigram(seed=0):
    return Bigram(2.0 * jax.random.normal(jax.random.key(seed), (V, V)))


def compiles(fn):
    """A jitted ``fn`` and a list that grows by one at every trace (= compile)."""
    traces = []

    def traced(*args):
        traces.append(1)
        return fn(*args)

    return jax.jit(traced), traces


def docs_section(title, page="docs/api.md"):
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


# ----------------------------------------------------------------------------- 1. public decorator, docs/api.md


def test_processor_dataclass_and_static_field_are_public():
    assert js.processor_dataclass is _chain.processor_dataclass
    assert js.static_field is _chain.static_field
    assert {"processor_dataclass", "static_field", "stateless", "entropy", "generate_stream"} <= set(js.__all__)


def test_readme_write_your_own_processor_runs_without_recompiling():
    section = docs_section("Write your own processor")
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 1
    # The classes as docs/api.md defines them (tests/test_docs.py runs the whole blocks, with
    # the shipped model, in order): here they drive generate on a small model.
    definitions = blocks[0][:blocks[0].index("lm, tok = load_pretrained()")]
    namespace: dict = {}
    exec(compile(definitions, "docs/api.md", "exec"), namespace)  # noqa: S102 - the docs' own code
    soft_cap, penalty = namespace["SoftCap"], namespace["PreviousTokenPenalty"]
    assert not soft_cap.stateful and penalty.stateful
    model = bigram(1)
    prompts, lengths = jnp.array([[1, 2, 3], [4, 5, 0]]), jnp.array([3, 2])
    keys = jax.random.split(jax.random.key(0), 2)
    before = _generate._generate_traced._cache_size()
    outs = [js.generate(model, prompts, lengths, keys, max_new_tokens=5,
                        sampler=js.chain(soft_cap(cap), penalty(p), js.TopP(0.9)))
            for cap, p in ((5.0, 0.0), (np.float64(2.0), 100), (jnp.float32(1.5), jnp.float32(100.0)))]
    assert _generate._generate_traced._cache_size() == before + 1  # one compile for three settings
    tokens = np.asarray(outs[1].tokens)
    last = np.array([3, 5])
    prev = np.concatenate([last[:, None], tokens[:, :-1]], axis=1)
    assert np.all(tokens != prev)  # a penalty of 100 on the previous token: never repeated


# ----------------------------------------------------------------------------- 2. pytree check


class Bare(js.LogitsProcessor):  # not decorated: not a pytree
    def apply(self, logits, state, key):
        return logits


class MyTopK(js.TopK):  # a subclass of a registered processor is not registered itself
    pass


@js.processor_dataclass
class Named(js.LogitsProcessor):
    label: str = "x"  # non-numeric data field: should be static_field()

    def apply(self, logits, state, key):
        return logits


@pytest.mark.parametrize("proc, cls", [(Bare(), "Bare"), (MyTopK(3), "MyTopK")])
def test_chain_and_generate_refuse_unregistered_processors(proc, cls):
    with pytest.raises(TypeError, match=f"{cls}.*processor_dataclass"):
        js.chain(js.Temperature(0.5), proc)
    with pytest.raises(TypeError, match=f"{cls}.*processor_dataclass"):
        js.Chain((proc,))
    with pytest.raises(TypeError, match=f"generate: sampler {cls}.*processor_dataclass"):
        js.generate(bigram(), jnp.array([[1]]), jnp.array([1]), jax.random.split(jax.random.key(0), 1),
                    max_new_tokens=2, sampler=proc)


def test_chain_refuses_non_numeric_leaves_and_functions():
    with pytest.raises(TypeError, match=r"argument 0 \(Named\): field \.label holds a str.*static_field"):
        js.chain(Named("y"))
    with pytest.raises(TypeError, match="stateless"):
        js.chain(lambda logits: logits)


# ----------------------------------------------------------------------------- 3. stateless


def test_stateless_wraps_a_function_and_a_keyed_function():
    x = jax.random.normal(jax.random.key(3), (2, V))
    keys = jax.random.split(jax.random.key(4), 2)
    cap = js.stateless(lambda logits: 3.0 * jnp.tanh(logits / 3.0))
    noise = js.stateless(lambda logits, key: logits + jax.vmap(lambda k: jax.random.gumbel(k, (V,)))(key))
    assert not cap.needs_key and noise.needs_key
    c = js.chain(cap, js.Temperature(0.5), noise)
    want = js.temperature(3.0 * jnp.tanh(x / 3.0), 0.5)
    want = want + jax.vmap(lambda k: jax.random.gumbel(k, (V,)))(fold_in_rows(keys, 3))
    np.testing.assert_allclose(c(x, keys), want, rtol=1e-6)
    # inside generate: a stateless-only chain, tokens equal the hand-written loop below
    out = js.generate(bigram(), jnp.array([[7]]), jnp.array([1]), keys[:1], max_new_tokens=3,
                      sampler=js.chain(cap, js.TopK(4)))
    assert out.tokens.shape == (1, 3)
    with pytest.raises(TypeError, match="callable"):
        js.stateless(3.0)


# ----------------------------------------------------------------------------- 4. fixed dtypes


def _variants(cls, name, value, **kw):
    """The same value as a Python number, a NumPy scalar (float64/int64) and a JAX scalar."""
    np_value = np.float64(value) if isinstance(value, float) else np.int64(value)
    jax_value = jnp.float32(value) if isinstance(value, float) else jnp.int32(value)
    return [cls(**{name: v}, **kw) for v in (value, np_value, jax_value)]


PROCESSORS = [
    (js.Temperature, "t", 0.7, {}), (js.TopK, "k", 5, {}), (js.TopP, "p", 0.9, {}), (js.MinP, "p", 0.1, {}),
    (js.TypicalP, "p", 0.9, {}), (js.EpsilonCutoff, "epsilon", 0.01, {}), (js.EtaCutoff, "eta", 0.01, {}),
    (js.TopNSigma, "n", 1.5, {}),
    (js.RepetitionPenalty, "penalty", 1.3, {}), (js.RepetitionPenalty, "window", 8, {}),
    (js.PresenceFrequencyPenalty, "presence", 0.5, {}), (js.PresenceFrequencyPenalty, "frequency", 0.5, {}),
    (js.NoRepeatNGram, "n", 3, {}), (js.MinNewTokens, "min_new_tokens", 2, {"stop_ids": [1]}),
    (js.DRY, "multiplier", 0.8, {}), (js.DRY, "base", 1.5, {}), (js.DRY, "allowed_length", 3, {}),
    (js.XTC, "probability", 0.5, {}), (js.XTC, "threshold", 0.2, {}),
    (js.MirostatV2, "tau", 3.0, {}), (js.MirostatV2, "eta", 0.2, {}),
    (js.DynamicTemperature, "t", 0.8, {}), (js.DynamicTemperature, "range", 0.3, {}),
    (js.DynamicTemperature, "exponent", 1.5, {}),
]


def test_python_numpy_and_jax_values_give_one_compile_for_every_processor():
    for cls, name, value, kw in PROCESSORS:
        fn, traces = compiles(lambda c: jax.tree.map(lambda v: v + 1, c))
        for proc in _variants(cls, name, value, **kw):
            fn(proc)
        assert len(traces) == 1, f"{cls.__name__}({name}=...) compiled {len(traces)} times"
    # arrays of ids and biases too: a list, a NumPy int64 array and a JAX array
    for make in (js.BanTokens, js.AllowTokens, lambda ids: js.SparseLogitBias(ids, [0.5, -1.0]),
                 lambda ids: js.LogitBias(np.asarray(ids, np.float64) / 10)):
        fn, traces = compiles(lambda c: jax.tree.map(lambda v: v + 1, c))
        for ids in ([1, 2], np.array([1, 2], np.int64), jnp.array([1, 2])):
            fn(make(ids))
        assert len(traces) == 1


def test_processor_leaves_are_float32_and_int32_arrays():
    assert js.Temperature(1).t.dtype == np.float32 and js.TopK(3.0).k.dtype == np.int32
    assert js.TopP(jnp.bfloat16(0.5)).p.dtype == jnp.float32
    with pytest.raises(ValueError, match="window must fit in int32"):
        js.RepetitionPenalty(1.2, window=2**40)


# ----------------------------------------------------------------------------- 5 + 7. keys, stats


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
        state = [_chain.init_state(p, prompts[b:b + 1], lengths[b:b + 1], V, max_new_tokens=n_steps)
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
             js.stateless(lambda x, key: x + 0.5 * jax.vmap(lambda k: jax.random.uniform(k, (V,)))(key)))
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


# ----------------------------------------------------------------------------- 6. sample_step without init


def test_sample_step_takes_a_stateless_chain_without_init():
    x = jax.random.normal(jax.random.key(0), (3, V))
    keys = jax.random.split(jax.random.key(1), 3)
    c = js.chain(js.Temperature(0.8), js.TopK(5))
    want, want_state, _ = js.sample_step(c, x, c.init(None, None, V), keys)
    for state in (None, ()):
        token, new_state, _ = js.sample_step(c, x, state, keys)
        np.testing.assert_array_equal(token, want)
        assert new_state == want_state == ((), ())
    with pytest.raises(ValueError, match="RepetitionPenalty keeps state.*chain.init"):
        js.sample_step(js.chain(js.RepetitionPenalty(1.2)), x, None, keys)


# ----------------------------------------------------------------------------- 8. decode past the cache end


def test_decode_past_the_cache_end_gives_nan_and_writes_nothing():
    lm = DecoderLM.random(preset("tiny"), jax.random.key(0))
    cache = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape, x.dtype), lm.init_cache(3, 4))
    logits, new = jax.jit(lm.decode)(jnp.array([11, 12, 13]), jnp.array([2, 4, -1]), cache)
    logits = np.asarray(logits)
    assert np.all(np.isfinite(logits[0])) and np.all(np.isnan(logits[1:]))
    for old_k, new_k in zip(cache.k, new.k):
        np.testing.assert_array_equal(new_k[1:], old_k[1:])  # rows past the end: cache untouched
        assert not np.array_equal(new_k[0], old_k[0])
    # a sampler reports such a row as having no valid token
    assert list(np.asarray(js.sample(jax.random.split(jax.random.key(0), 3), logits))) [1:] == [-1, -1]


# ----------------------------------------------------------------------------- review follow-ups

def test_float_values_are_never_truncated_to_an_int_default():
    @js.processor_dataclass
    class Scale(js.LogitsProcessor):
        factor: jnp.ndarray = 1  # an int default, no declared type

        def apply(self, logits, state, key):
            return logits * self.factor

    @js.processor_dataclass
    class Every(js.LogitsProcessor):
        n: int = 1  # declared int

        def apply(self, logits, state, key):
            return logits

    for value in (0.5, np.float32(0.5), jnp.float32(0.5)):
        assert float(Scale(value).factor) == 0.5
    np.testing.assert_array_equal(js.chain(Scale(0.5))(jnp.ones((1, 2))), [[0.5, 0.5]])
    np.testing.assert_array_equal(Scale(jnp.array([0.25, 0.75])).factor, [0.25, 0.75])
    assert Every(2.0).n.dtype == np.int32 and int(Every(2.0).n) == 2
    with pytest.raises(ValueError, match=r"Every: n must be an integer, got 2\.5"):
        Every(2.5)


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
