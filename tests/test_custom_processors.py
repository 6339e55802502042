"""Writing your own processor: `processor_dataclass` and `static_field` are public and the
docs' example runs without recompiling; chains and generate refuse processors that are not
registered pytrees; `stateless` wraps plain functions; values become float32 / int32 leaves
(one compile for Python, NumPy and JAX values; floats never truncated to an int default);
`sample_step` takes a stateless chain without `init`."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample._decoding import generate as _generate
from jaxsample._processors import base as _chain
from jaxsample._filters.sampling import fold_in_rows
from helpers import BIGRAM_V as V
from helpers import bigram, compiles, docs_section


# ----------------------------------------------------------------------------- public decorator, docs/api.md


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


# ----------------------------------------------------------------------------- pytree check


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


# ----------------------------------------------------------------------------- stateless


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


# ----------------------------------------------------------------------------- fixed dtypes


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


# ----------------------------------------------------------------------------- sample_step without init


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


# ----------------------------------------------------------------------------- float values


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
