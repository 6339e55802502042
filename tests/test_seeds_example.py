"""The seeds' worked example from docs/sampling.md, as a golden test."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from helpers import load_script

WORDS = ("wonderful", "cloudy", "nice", "hot", "gloomy", "delicious")
LOGITS = jnp.array([1.2, 2.0, 3.5, 3.0, 1.8, 1.0], jnp.float32)
NICE = WORDS.index("nice")

# docs/sampling.md, softmax(x / T) to 4 decimals.
TABLE = {
    0.1: [0.0000, 0.0000, 0.9933, 0.0067, 0.0000, 0.0000],
    0.5: [0.0068, 0.0339, 0.6813, 0.2506, 0.0227, 0.0046],
    1.0: [0.0457, 0.1017, 0.4556, 0.2764, 0.0832, 0.0374],
    2.0: [0.0965, 0.1439, 0.3047, 0.2373, 0.1302, 0.0873],
    10.0: [0.1519, 0.1646, 0.1912, 0.1819, 0.1613, 0.1489],
}


def kept(logits):
    return {WORDS[i] for i in np.flatnonzero(np.isfinite(np.asarray(logits)))}


@pytest.mark.parametrize("t", sorted(TABLE))
def test_temperature_table(t):
    p = np.asarray(jax.nn.softmax(js.temperature(LOGITS, t)), np.float64)
    np.testing.assert_array_equal(np.round(p, 4), np.array(TABLE[t]))


def test_temperature_table_per_row_values_in_one_batch():
    ts = np.array(sorted(TABLE), np.float32)  # one temperature per row
    batch = jnp.broadcast_to(LOGITS, (len(ts), 6))
    p = np.asarray(jax.nn.softmax(jax.jit(js.temperature)(batch, ts)), np.float64)
    np.testing.assert_array_equal(np.round(p, 4), np.array([TABLE[t] for t in sorted(TABLE)]))


def test_top_k_zeroes_exactly_v_minus_k_tokens():
    for k in range(1, 7):
        p = np.asarray(jax.nn.softmax(js.top_k(LOGITS, k)))
        assert np.sum(p == 0) == 6 - k, k
        # the survivors are the k most likely words
        assert set(np.argsort(-np.asarray(LOGITS))[:k]) == set(np.flatnonzero(p > 0))
    np.testing.assert_array_equal(js.top_k(LOGITS, 0), LOGITS)  # 0 = off, not greedy


def test_top_p_sets_and_running_mass():
    q = np.asarray(jax.nn.softmax(LOGITS), np.float64)
    running = np.cumsum(np.sort(q)[::-1])
    np.testing.assert_array_equal(
        np.round(running, 4), [0.4556, 0.7320, 0.8337, 0.9169, 0.9626, 1.0]
    )
    assert kept(js.top_p(LOGITS, 0.5)) == {"nice", "hot"}
    assert kept(js.top_p(LOGITS, 0.9)) == {"nice", "hot", "cloudy", "gloomy"}
    assert kept(js.top_p(LOGITS, 1.0)) == set(WORDS)


def test_k1_is_greedy():
    assert int(js.greedy(LOGITS)) == NICE
    assert kept(js.top_k(LOGITS, 1)) == {"nice"}
    assert kept(js.temperature(LOGITS, 0.0)) == {"nice"}
    keys = jax.random.split(jax.random.key(0), 200)
    batch = jnp.broadcast_to(LOGITS, (200, 6))
    tokens = np.asarray(js.sample(keys, js.top_k(batch, 1)))
    assert np.all(tokens == NICE)


def test_min_p_is_relative_to_the_max_probability():
    q = np.asarray(jax.nn.softmax(LOGITS), np.float64)
    for p in (0.05, 0.2, 0.5):
        expected = {WORDS[i] for i in range(6) if q[i] >= p * q.max()}
        assert kept(js.min_p(LOGITS, p)) == expected
    assert kept(js.min_p(LOGITS, 0.2)) == {"nice", "hot", "cloudy"}


def test_seeds_demo_script_runs(capsys):
    demo = load_script("seeds_demo")
    demo.main(draws=2000, seed=1)
    out = capsys.readouterr().out
    assert "0.0068     0.0339     0.6813     0.2506     0.0227     0.0046" in out
    tv = float(out.strip().splitlines()[-1].split(":")[-1])
    assert tv < 0.05  # 2000 draws over 6 tokens: expected TV ~ 0.015
