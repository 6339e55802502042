"""scripts/bench.py never prints a figure finer than its method resolves.

The decode step is (t(N) - t(1)) / (N - 1); when that difference is not above the
run-to-run spread of the timings it measures nothing, and the table says "below timer
resolution" (the JSON: null and `decode_below_resolution: true`) instead of a clamped
number (it once printed `decode tokens/s 7000000000.0`). Deterministic: the timings are
given, not measured.
"""

from __future__ import annotations

import json

import pytest

from helpers import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


def one_token_runs(*seconds):
    """A stand-in for `run_one`: the warm-up call, then these timings in turn."""
    it = iter((99.0, *seconds))
    return lambda: next(it)


def test_resolved_step_is_the_difference_over_n_minus_1(bench):
    # t(10) runs 0.100, 0.101, 0.102 s (median 0.101); t(1) runs 0.010, 0.011, 0.012 (median 0.011);
    # spread 0.002 s < difference 0.090 s -> 0.090 / 9 = 10 ms per step, batch 4 -> 400 tokens/s.
    r = bench._rates(4, 10, [0.100, 0.101, 0.102], one_token_runs(0.010, 0.011, 0.012), 3)
    assert r["decode_below_resolution"] is False
    assert r["decode_ms_per_step"] == pytest.approx(10.0)
    assert r["decode_tokens_per_s"] == pytest.approx(400.0)
    assert r["tokens_per_s"] == pytest.approx(4 * 10 / 0.101)
    assert r["noise_s"] == pytest.approx(0.002)


@pytest.mark.parametrize("samples, ones", [
    ([0.00099], (0.0016, 0.0016, 0.0017)),          # the reported case: t(N) < t(1), once clamped to 1e-9
    ([0.0110, 0.0112], (0.0100, 0.0105, 0.0110)),   # difference 0.0006 s within the spread 0.001 s
    ([0.0105], (0.0105, 0.0105, 0.0105)),           # no difference at all
])
def test_difference_within_the_spread_is_below_resolution(bench, samples, ones):
    r = bench._rates(1, 8, samples, one_token_runs(*ones), len(samples))
    assert r["decode_below_resolution"] is True
    assert r["decode_ms_per_step"] is None and r["decode_tokens_per_s"] is None
    assert r["tokens_per_s"] > 0  # the end-to-end rate is a plain ratio, always resolved


def test_table_and_json_say_below_resolution_never_a_number(bench):
    below = {"system": "jaxsample.generate", "dtype": "fp32", "batch": 1, "mode": "greedy",
             **bench._rates(1, 8, [0.00099], one_token_runs(0.0016, 0.0016, 0.0017), 1),
             "compile_s": None, "compile_below_resolution": True}
    resolved = {"system": "jaxsample.generate", "dtype": "fp32", "batch": 4, "mode": "top-p 0.9",
                **bench._rates(4, 10, [0.100, 0.101, 0.102], one_token_runs(0.010, 0.011, 0.012), 3),
                "compile_s": 2.5, "compile_below_resolution": False}
    table = bench.generate_table([below, resolved]).splitlines()
    assert table[2] == ("| jaxsample.generate | fp32 | 1 | greedy | 8080.8 | below timer resolution "
                        "| below timer resolution | below timer resolution |")
    assert table[3] == "| jaxsample.generate | fp32 | 4 | top-p 0.9 | 396.0 | 10.00 | 400.0 | 2.5 |"
    row = json.loads(json.dumps(below))  # as --json writes it
    assert row["decode_ms_per_step"] is None and row["decode_tokens_per_s"] is None
    assert row["decode_below_resolution"] is True and row["compile_s"] is None
