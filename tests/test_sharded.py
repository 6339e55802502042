"""Vocab-sharded sampling and data/model-parallel generation (jaxsample._sharded, models.sharding).

The multi-device checks run once, in a subprocess with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax is
imported), and report JSON; the tests below read it, so the rest of the suite keeps its
single device. The statistical checks of the counter-based Gumbel draw run in process.

Tolerances: tokens must be equal; log-probs of a sharded run may differ from the
single-device run by float32 rounding of the sharded reductions: |diff| <= 1e-4
(observed ~1e-6).
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample._selection import select as _select
from jaxsample._filters import gumbel as _gumbel
from jaxsample._sharding import sharded as _sharded
from models import DecoderLM, preset
from models import sharding

DEVICES = 8
LOGPROB_ATOL = 1e-4

# ----------------------------------------------------------------------------- the 8-device run


def _filter_cases(batch, vocab):
    """(name, processor) pairs with per-row values, covering every vocab-parallel rule."""
    rng = np.random.default_rng(3)
    row = lambda lo, hi: rng.uniform(lo, hi, batch).astype(np.float32)
    ks = np.array([0, 1, 2, 3, 7, 40, vocab, vocab + 5], np.int32)[:batch]
    return [
        ("temperature", js.Temperature(np.where(np.arange(batch) % 3 == 0, 0.0, row(0.3, 2.0)))),
        ("top_k", js.TopK(ks)),
        ("top_k_m3", js.TopK(ks, min_tokens_to_keep=3)),
        ("top_p", js.TopP(np.concatenate([[1.0], row(0.05, 0.99)[1:]]))),
        ("top_p_m2", js.TopP(0.3, min_tokens_to_keep=2)),
        ("min_p", js.MinP(np.concatenate([[0.0, 1.0], row(0.01, 0.5)[2:]]))),
        ("typical_p", js.TypicalP(np.concatenate([[1.0], row(0.2, 0.99)[1:]]))),
        ("epsilon", js.EpsilonCutoff(row(0.0, 0.05))),
        ("eta", js.EtaCutoff(row(0.0, 0.05))),
        ("top_n_sigma", js.TopNSigma(np.concatenate([[np.inf, 0.0], row(0.2, 3.0)[2:]]))),
        ("logit_bias", js.LogitBias(rng.normal(size=vocab).astype(np.float32))),
        ("logit_bias_rows", js.LogitBias(rng.normal(size=(batch, vocab)).astype(np.float32))),
        ("sparse_bias", js.SparseLogitBias(np.array([1, 5, 5, vocab - 1, -1], np.int32),
                                           np.array([1.0, 2.0, 3.0, 4.0, 9.0], np.float32))),
        ("ban", js.BanTokens(np.array([0, 9, vocab - 1, -1], np.int32))),
        ("allow_rows", js.AllowTokens(rng.integers(-1, vocab, size=(batch, 6)).astype(np.int32))),
        ("default_chain", js.default_chain(temperature=0.7, top_k=20, top_p=0.9, min_p=0.02)),
    ]


def _test_logits(batch, vocab, dtype=np.float32):
    """Logits with ties (rounded to 0.25), -inf entries, an empty row and a flat row."""
    rng = np.random.default_rng(7)
    x = np.round(rng.normal(0, 2.0, (batch, vocab)) * 4) / 4
    x[1, ::3] = -np.inf
    x[2] = 0.5  # every token tied
    x[3] = -np.inf  # an empty row (only masks may produce it; filters keep it empty)
    return jnp.asarray(x, dtype)


def _collectives(hlo_text):
    """(op, result shapes) of every cross-device op in a compiled HLO module's text."""
    import re

    found = []
    pattern = r"= (.*?) (all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)(-start)?\("
    for line in hlo_text.splitlines():
        m = re.search(pattern, line)
        if m:
            shapes = [tuple(int(d) for d in dims.split(",") if d)
                      for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1))]
            found.append((m.group(2), shapes))
    return found


#: The two halves of the 8-device run: "core" (the 2x4 mesh: filters, draw, top log-probs,
#: generate and its loop's HLO) runs by default; "more" (the 1x8 and 8x1 meshes, the kernel
#: plan, the sampling step's HLO, every family switch) is slow-marked.
PARTS = {"core": {"filters": ((2, 4),), "generate": ((2, 4),)},
         "more": {"filters": ((1, 8),), "generate": ((8, 1), (1, 8))}}


def _device_checks(part):
    """Runs in the 8-device subprocess; returns a JSON-able dict of results for `part`."""
    assert jax.device_count() == DEVICES, jax.devices()
    t_start = time.time()
    times = {}
    results = {"filters": {}, "draw": {}, "top_logprobs": {}}

    # Filters and draw: sharded vs the single-device functions, on the part's meshes.
    batch, vocab = 8, 96
    x = _test_logits(batch, vocab)
    cases = _filter_cases(batch, vocab)
    keys = jax.random.split(jax.random.key(11), batch)
    def unsharded(x, keys, procs):
        top_lp, top_ids = jax.lax.top_k(jax.nn.log_softmax(x), 5)
        return [p(x) for p in procs], js.gumbel_sample(keys, x), (top_ids, top_lp)

    expected, expected_draw, expected_top = jax.jit(unsharded)(x, keys, [p for _, p in cases])
    expected = {name: np.asarray(out) for (name, _), out in zip(cases, expected)}
    expected_draw = np.asarray(expected_draw)
    for shape in PARTS[part]["filters"]:
        sampler = _sharded.ShardedSampler(sharding.make_mesh(shape))
        xs = jax.device_put(x, sampler.logits_sharding)

        @jax.jit
        def run(xs, keys, procs):
            return [sampler.apply(p, xs) for p in procs], sampler.sample(keys, xs), sampler.top_logprobs(xs, 5)

        outs, draw, (top_ids, top_lp) = run(xs, keys, [p for _, p in cases])
        name = f"{shape[0]}x{shape[1]}"
        results["filters"][name] = {
            case: bool(np.array_equal(np.asarray(out), expected[case]))
            for (case, _), out in zip(cases, outs)}
        results["draw"][name] = bool(np.array_equal(np.asarray(draw), expected_draw))
        valid = np.isfinite(np.asarray(expected_top[1][:, 0]))  # rows with a finite logit
        results["top_logprobs"][name] = bool(
            np.array_equal(np.asarray(top_ids)[valid], np.asarray(expected_top[0])[valid])
            and np.allclose(np.asarray(top_lp)[valid], np.asarray(expected_top[1])[valid], atol=1e-5))
        times[f"filters {name}"] = time.time() - t_start

    if part == "more":
        _more_step_checks(results, times, t_start, x, keys, cases, expected)
    results.update(_generate_checks(part, times, t_start))
    results["seconds"] = time.time() - t_start
    results["times"] = times
    return results


def _more_step_checks(results, times, t_start, x, keys, cases, expected):
    """The kernel plan on vocab shards and the compiled sampling step's collectives."""
    # The GPU plan (the Pallas counting kernel, interpreted) on vocab shards: the same
    # search, its per-pass masses psum-ed over the model axis.
    kernel = dataclasses.replace(_select.KERNEL_PLAN, interpret=True)
    sampler = _sharded.ShardedSampler(sharding.make_mesh((2, 4)), method=kernel)
    picked = [(n, p) for n, p in cases if n in ("top_k", "top_k_m3", "top_p", "typical_p")]
    outs = jax.jit(lambda xs, procs: [sampler.apply(p, xs) for p in procs])(
        jax.device_put(x, sampler.logits_sharding), [p for _, p in picked])
    results["filters_kernel"] = {n: bool(np.array_equal(np.asarray(o), expected[n]))
                                 for (n, _), o in zip(picked, outs)}
    times["filters kernel"] = time.time() - t_start

    # HLO: the compiled sampling step moves no [B, V] array between devices.
    mesh = sharding.make_mesh((2, 4))
    sampler = _sharded.ShardedSampler(mesh)
    vocab, batch = 1024, 8
    chain = js.chain(js.Temperature(0.8), js.TopK(40), js.TopP(0.9), js.MinP(0.05), js.TypicalP(0.95))
    spec = jax.ShapeDtypeStruct((batch, vocab), jnp.float32, sharding=sampler.logits_sharding)
    state = chain.init(None, None, vocab)
    hlo = jax.jit(lambda l, k: sampler(chain, l, state, k)).lower(spec, keys).compile().as_text()
    naive = jax.jit(lambda l, k: js.sample_step(chain, l, state, k)).lower(spec, keys).compile().as_text()
    ops = _collectives(hlo)
    results["hlo_step"] = {
        "vocab": vocab,
        "sharded": [[op, shapes] for op, shapes in ops],
        "naive": [[op, shapes] for op, shapes in _collectives(naive)],
    }
    times["hlo step"] = time.time() - t_start


def _generate_checks(part, times, t_start):
    """Generation on `part`'s meshes vs one device, for the same keys."""
    results = {"generate": {}}
    # Generation: every mesh vs one device, for the same keys. The tiny preset with 4 kv
    # heads: attention is split on the 2x4 mesh and replicated on 1x8 (4 heads on 8).
    lm = DecoderLM.random(preset("tiny").replace(n_kv_heads=4), jax.random.key(0))
    batch, plen, new = 8, 6, 10
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 256, size=(batch, plen)).astype(np.int32)
    lengths = np.array([6, 3, 5, 1, 6, 2, 4, 6], np.int32)
    keys = jax.random.split(jax.random.key(1), batch)
    greedy_rows = np.array([1, 1, 0, 0, 0, 0, 0, 0], bool)  # temperature 0: greedy rows
    chain = js.default_chain(
        temperature=np.where(greedy_rows, 0.0, np.array([0, 0, 0.8, 1.0, 1.2, 0.7, 1.0, 2.0])),
        top_k=np.array([0, 0, 0, 5, 0, 20, 0, 0]),
        top_p=np.array([1, 1, 0.9, 1, 0.8, 1, 1, 0.95]),
        min_p=np.array([0, 0, 0, 0, 0, 0, 0.1, 0]))
    reference = js.generate(lm, prompts, lengths, keys, max_new_tokens=new, sampler=chain,
                            sample_fn=js.gumbel_sample_step)
    plain_greedy = js.generate(lm, prompts, lengths, keys, max_new_tokens=new, top_logprobs=3)
    times["reference"] = time.time() - t_start
    results["reference_is_not_constant"] = bool(len(np.unique(np.asarray(reference.tokens)[2:])) > 10)
    for shape in PARTS[part]["generate"]:
        slm = sharding.shard_model(lm, sharding.make_mesh(shape))
        out = js.sharded_generate(slm, prompts, lengths, keys, max_new_tokens=new, sampler=chain)
        name = f"{shape[0]}x{shape[1]}"
        results["generate"][name] = {
            "tokens_equal": bool(np.array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))),
            "greedy_rows_equal_plain_generate": bool(np.array_equal(
                np.asarray(out.tokens)[greedy_rows], np.asarray(plain_greedy.tokens)[greedy_rows])),
            "lengths_equal": bool(np.array_equal(np.asarray(out.lengths), np.asarray(reference.lengths))),
            "logprob_raw_diff": float(np.max(np.abs(np.asarray(out.logprobs_raw)
                                                    - np.asarray(reference.logprobs_raw)))),
            "logprob_processed_diff": float(np.max(np.abs(np.asarray(out.logprobs_processed)
                                                          - np.asarray(reference.logprobs_processed)))),
            "tokens_sharding": str(out.tokens.sharding.spec),
            "padded_vocab": slm.vocab_size,
        }
        if shape == (2, 4):  # the memory estimate is per device for a sharded model
            results["memory"] = {name: _memory_parts(m, batch, plen + new) for name, m in (("one", lm), ("mesh", slm))}
        if shape == (2, 4):  # the whole compiled loop: which arrays cross devices
            results["hlo_generate"] = _generate_collectives(slm, prompts, lengths, keys, chain, new)
        if shape == (2, 4):  # the default greedy sampler (sampler=None) on a 2-D mesh
            out = js.sharded_generate(slm, prompts, lengths, keys, max_new_tokens=new, top_logprobs=3)
            results["greedy_default_equal"] = bool(
                np.array_equal(np.asarray(out.tokens), np.asarray(plain_greedy.tokens)))
            results["generate_top_logprobs_equal"] = bool(
                np.array_equal(np.asarray(out.top_token_ids), np.asarray(plain_greedy.top_token_ids))
                and np.allclose(np.asarray(out.top_logprobs), np.asarray(plain_greedy.top_logprobs),
                                atol=LOGPROB_ATOL))
        times[f"generate {name}"] = time.time() - t_start
    if part == "more":
        results["families"] = _family_checks(prompts, lengths, keys, new)
        times["families"] = time.time() - t_start
    return results


def _memory_parts(model, rows, cache_size):
    """`check_memory`'s estimate by part (a limit of 1 byte refuses, carrying the parts)."""
    from jaxsample._decoding import core

    try:
        core.check_memory(model, fn="test", max_new_tokens=1, rows=rows, cache_size=cache_size, width=1,
                          memory_limit=1)
    except js.MemoryLimitError as e:
        return e.parts
    raise AssertionError("a 1-byte limit was not refused")


def _family_checks(prompts, lengths, keys, new):
    # Every family switch at once (issue 22): untied lm_head, q/k/v biases, q/k norms, pre and
    # post norms, a sliding-window ring layer, 8 experts (expert parallel on both meshes) and a
    # dense layer; greedy tokens on each mesh equal one device's.
    fam = DecoderLM.random(preset("tiny").replace(
        n_kv_heads=4, tie_embeddings=False, qkv_bias=True, qk_norm="head", post_norms=True, sliding_window=3,
        sliding_window_layers=(0,), num_experts=8, experts_per_token=2, moe_d_ff=16, moe_layers=(1,)),
        jax.random.key(2))
    fam_ref = js.generate(fam, prompts, lengths, keys, max_new_tokens=new)
    families = {}
    for shape in ((2, 4), (1, 8)):
        out = js.sharded_generate(sharding.shard_model(fam, sharding.make_mesh(shape)), prompts, lengths, keys,
                                  max_new_tokens=new)
        families[f"{shape[0]}x{shape[1]}"] = bool(np.array_equal(np.asarray(out.tokens), np.asarray(fam_ref.tokens)))
    return families


def _generate_collectives(model, prompts, lengths, keys, chain, new):
    """Collectives of the compiled generate loop that `sharded_generate` just ran (a cache hit)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxsample._decoding import generate as _generate

    mesh = model.mesh
    sampler = _sharded.ShardedSampler(mesh)
    args = (model, jax.device_put(jnp.asarray(prompts), NamedSharding(mesh, P("data", None))),
            jax.device_put(jnp.asarray(lengths), NamedSharding(mesh, P("data"))),
            jax.device_put(keys, NamedSharding(mesh, P("data"))), chain,
            jnp.asarray((-1,), jnp.int32), jnp.asarray(0, jnp.int32),
            jax.device_put(jnp.full((prompts.shape[0],), new, jnp.int32), NamedSharding(mesh, P("data"))))
    static = dict(max_new_tokens=new, cache_size=prompts.shape[1] + new, top_logprobs=0,
                  prompt_logprobs=False, sample_fn=sampler)
    text = _generate._generate_traced.lower(*args, **static).compile().as_text()
    return [[op, shapes] for op, shapes in _collectives(text)]


def _run_device_checks(part):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests_dir)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([root, tests_dir] + [p for p in [env.get("PYTHONPATH")] if p])
    code = f"import json, test_sharded as t; print('RESULT' + json.dumps(t._device_checks({part!r})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tests_dir, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    line = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.fixture(scope="module")
def device_results():
    """The "core" part of the 8-device run (the 2x4 mesh)."""
    return _run_device_checks("core")


@pytest.fixture(scope="module")
def more_device_results():
    """The "more" part (other meshes, kernel plan, step HLO, families): slow tests only."""
    return _run_device_checks("more")


def _results_for(request, mesh):
    """The part of the 8-device run that covers `mesh`."""
    core = any(f"{a}x{b}" == mesh for a, b in PARTS["core"]["filters"] + PARTS["core"]["generate"])
    return request.getfixturevalue("device_results" if core else "more_device_results")


def _meshes(shapes):
    """Mesh names as test parameters; those outside the core part are slow."""
    core = {f"{a}x{b}" for a, b in PARTS["core"]["filters"] + PARTS["core"]["generate"]}
    names = [f"{a}x{b}" for a, b in shapes]
    return [pytest.param(m, marks=() if m in core else pytest.mark.slow) for m in names]


@pytest.mark.parametrize("mesh", _meshes(((2, 4), (1, 8))))
def test_vocab_sharded_filters_equal_unsharded(request, mesh):
    results = _results_for(request, mesh)["filters"][mesh]
    assert results and all(results.values()), {k: v for k, v in results.items() if not v}


@pytest.mark.slow
def test_vocab_sharded_kernel_plan_equals_unsharded(more_device_results):
    """The Pallas counting kernel (interpreted) on a 2x4 mesh keeps the single-device sets."""
    results = more_device_results["filters_kernel"]
    assert results and all(results.values()), {k: v for k, v in results.items() if not v}


@pytest.mark.parametrize("mesh", _meshes(((2, 4), (1, 8))))
def test_sharded_draw_equals_gumbel_sample(request, mesh):
    assert _results_for(request, mesh)["draw"][mesh]


@pytest.mark.parametrize("mesh", _meshes(((2, 4), (1, 8))))
def test_distributed_top_logprobs_equal_lax_top_k(request, mesh):
    assert _results_for(request, mesh)["top_logprobs"][mesh]


@pytest.mark.parametrize("mesh", _meshes(((8, 1), (1, 8), (2, 4))))
def test_sharded_generate_same_tokens_as_one_device(request, mesh):
    results = _results_for(request, mesh)
    r = results["generate"][mesh]
    assert results["reference_is_not_constant"]
    assert r["tokens_equal"] and r["lengths_equal"], r
    assert r["greedy_rows_equal_plain_generate"], r
    assert r["logprob_raw_diff"] <= LOGPROB_ATOL and r["logprob_processed_diff"] <= LOGPROB_ATOL, r
    if mesh != "1x8":
        assert "data" in r["tokens_sharding"], r  # outputs stay split over the batch
    model_size = int(mesh.split("x")[1])
    assert r["padded_vocab"] == -(-259 // model_size) * model_size  # the tiny preset's V = 259


def test_sharded_generate_default_greedy(device_results):
    assert device_results["greedy_default_equal"]
    assert device_results["generate_top_logprobs_equal"]


def test_memory_estimate_of_a_sharded_model_is_per_device(device_results):
    """On the 2x4 mesh each device holds a quarter of the big weights (norms replicated)
    and an eighth of the cache, so the estimate that `sharded_generate` checks against one
    device's memory is per device (before: the whole model against one device)."""
    one, mesh = device_results["memory"]["one"], device_results["memory"]["mesh"]
    assert 3.0 < one["weights"] / mesh["weights"] <= 4.0, (one, mesh)
    assert mesh["KV cache"] == one["KV cache"] // 8, (one, mesh)


def test_generate_loop_hlo_has_only_all_reduces(device_results):
    """The whole compiled loop on the 2x4 mesh: Megatron all-reduces of activations
    ([b, T, D]) and per-row sampler reductions; no all-gather of logits, cache or weights."""
    ops = device_results["hlo_generate"]
    assert ops and {op for op, _ in ops} == {"all-reduce"}, ops
    vocab = 260  # 259 padded to a multiple of 4
    assert not [c for c in ops if any(vocab in s for s in c[1])], ops


@pytest.mark.slow
def test_sampling_step_hlo_has_no_gather_of_the_logits(more_device_results):
    """The compiled step of a 5-stage chain: only per-row all-reduces cross devices.

    The control: the same chain run through plain `sample_step` on the same sharded
    logits makes XLA gather them (an all-gather with a V-sized dimension), so the
    check below does detect a gather when there is one.
    """
    hlo = more_device_results["hlo_step"]
    vocab, batch = hlo["vocab"], 8

    def moves_logits(shapes):
        return any(vocab in s or math.prod(s) >= batch * vocab // DEVICES for s in shapes)

    sharded = hlo["sharded"]
    assert sharded, "expected collective reductions in the sharded step"
    assert {op for op, _ in sharded} == {"all-reduce"}, sharded
    assert not [c for c in sharded if moves_logits(c[1])], sharded
    assert any(op == "all-gather" and moves_logits(shapes) for op, shapes in hlo["naive"]), hlo["naive"]


# ----------------------------------------------------------------------------- in process


def _chi2_ok(tokens, probs, sigmas=5.0):
    """Counts of ``tokens`` vs ``probs``: p = 0 never drawn; chi-square <= df + 5 sqrt(2 df)."""
    counts = np.bincount(np.asarray(tokens).reshape(-1), minlength=probs.size).astype(np.float64)
    assert counts.size == probs.size
    assert counts[probs == 0].sum() == 0, "drew a removed token"
    expected = counts.sum() * probs
    big = expected >= 5
    chi2 = np.sum((counts[big] - expected[big]) ** 2 / expected[big])
    df = max(int(big.sum()) - 1, 1)
    assert chi2 <= df + sigmas * math.sqrt(2 * df), (chi2, df)


def test_gumbel_sample_matches_softmax_seeds_example():
    """The seeds' example (V = 6) at T = 1 and T = 0.5, and a filtered row with -inf."""
    x = jnp.array([1.2, 2.0, 3.5, 3.0, 1.8, 1.0])
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    for logits in (x, x / 0.5, js.top_p(x, 0.9)):
        probs = np.asarray(jax.nn.softmax(logits), np.float64)
        probs = probs / probs.sum()
        tokens = js.gumbel_sample(keys, jnp.broadcast_to(logits, (n, 6)))
        _chi2_ok(tokens, probs)


def test_gumbel_sample_large_vocab_tail():
    """V = 2048, near-flat logits: the winners' noise sits far in the Gumbel tail."""
    vocab, n = 2048, 4000
    logits = jnp.log(jnp.linspace(1.0, 4.0, vocab))  # probabilities from 1 to 4 (x 1/Z)
    keys = jax.random.split(jax.random.key(5), n)
    tokens = np.asarray(js.gumbel_sample(keys, jnp.broadcast_to(logits, (n, vocab))))
    probs = np.asarray(jax.nn.softmax(logits), np.float64)
    bins = np.arange(vocab) // 128  # 16 groups of 128 tokens
    grouped = np.bincount(bins, weights=probs / probs.sum())
    _chi2_ok(bins[tokens], grouped)


def test_counter_noise_is_uniform_and_independent():
    """The hash's uniforms: flat histogram, no correlation between neighbouring ids or rows."""
    seeds = _gumbel._row_seeds(jax.random.split(jax.random.key(2), 256), (256,))
    g = np.asarray(_gumbel._gumbel_noise(seeds, jnp.arange(4096)), np.float64)  # [256, 4096]
    u = np.exp(-np.exp(-g))  # Gumbel CDF: uniform on (0, 1) if the noise is right
    counts = np.histogram(u, bins=64, range=(0, 1))[0]
    expected = u.size / 64
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 <= 63 + 5 * math.sqrt(2 * 63), chi2
    assert abs(np.mean(g) - 0.5772156649) < 0.01  # Euler-Mascheroni: the Gumbel mean
    z = (u - 0.5) * math.sqrt(12)
    limit = 5 / math.sqrt(z.size)
    assert abs(np.mean(z[:, 1:] * z[:, :-1])) < limit  # neighbouring token ids
    assert abs(np.mean(z[1:] * z[:-1])) < limit  # neighbouring rows (keys)
    assert np.all(np.isfinite(g))


def test_gumbel_sample_per_row_keys_and_invalid_rows():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 50)), jnp.float32)
    x = x.at[1].set(-jnp.inf).at[2, 3].set(jnp.nan).at[4, :49].set(-jnp.inf)
    keys = jax.random.split(jax.random.key(4), 5)
    tokens = np.asarray(js.gumbel_sample(keys, x))
    assert tokens[1] == -1 and tokens[2] == -1 and tokens[4] == 49
    alone = [int(js.gumbel_sample(keys[r:r + 1], x[r:r + 1])[0]) for r in (0, 3)]
    assert alone == [tokens[0], tokens[3]]  # a row's token does not depend on its batch-mates
    one_key = js.gumbel_sample(jax.random.key(4), x)
    assert one_key.shape == (5,)
    with pytest.raises(ValueError, match="one key per row"):
        js.gumbel_sample(keys[:2], x)


def test_vocab_shard_selection_matches_select():
    """The radix searches equal `_select` (ties, -0.0/+0.0, -inf) on one device."""
    rng = np.random.default_rng(1)
    x = np.round(rng.normal(size=(6, 40)) * 2) / 2
    x[0, :5] = -0.0
    x[1, ::2] = -np.inf
    x = jnp.asarray(x, jnp.float32)
    shard = _sharded.VocabShard(40, 40)
    k = jnp.array([1, 2, 7, 20, 39, 40])
    w = jnp.exp(x - jnp.max(x, -1, keepdims=True))
    p = jnp.array([0.1, 0.5, 0.9, 0.999, 1.0, 0.3])

    @jax.jit
    def both(x, k, w, p):
        ours = (shard.kth_largest(x, k), shard.mass_threshold(x, w, p), shard.argmax(x), shard.logsumexp(x))
        theirs = (_select.kth_largest(x, k), _select.mass_threshold(x, w, p), jnp.argmax(x, -1),
                  jax.nn.logsumexp(x, -1))
        return ours, theirs

    ours, theirs = both(x, k, w, p)
    for a, b in zip(ours[:3], theirs[:3]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ours[3], theirs[3], rtol=1e-6)


def test_sharded_sampler_on_a_one_device_mesh():
    sampler = _sharded.ShardedSampler(sharding.make_mesh((1, 1)))
    x = _test_logits(4, 32)
    keys = jax.random.split(jax.random.key(3), 4)
    chain = js.default_chain(temperature=0.9, top_p=0.8)
    state = chain.init(None, None, 32)
    steps = jax.jit(lambda x, keys: (sampler(chain, x, state, keys),
                                     js.gumbel_sample_step(chain, x, state, keys)))
    (token, _, out), (ref_token, _, ref_out) = steps(x, keys)
    np.testing.assert_array_equal(token, ref_token)
    np.testing.assert_allclose(out.token_logprob_processed, ref_out.token_logprob_processed, atol=1e-6)
    np.testing.assert_allclose(out.token_logprob_raw, ref_out.token_logprob_raw, atol=1e-6)
    assert token[3] == -1  # the empty row


def test_unsupported_processors_are_refused():
    from jaxsample._processors.base import processor_dataclass

    @processor_dataclass
    class Counting(js.LogitsProcessor):
        stateful = True

        def apply(self, logits, state, key):
            return logits

    sampler = _sharded.ShardedSampler(sharding.make_mesh((1, 1)))
    with pytest.raises(NotImplementedError, match="Counting is stateful"):
        sampler.apply(js.chain(js.TopK(2), Counting()), jnp.zeros((2, 8)))
    three = types.SimpleNamespace(shape={"data": 1, "model": 3}, axis_names=("data", "model"))
    with pytest.raises(ValueError, match="not divisible"):
        _sharded.ShardedSampler(three)._apply(js.TopK(2), jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match="no axis"):
        _sharded.ShardedSampler(sharding.make_mesh((1, 1)), vocab_axis="vocab")


@pytest.mark.slow
def test_sharded_generate_every_family_switch(more_device_results):
    assert more_device_results["families"] == {"2x4": True, "1x8": True}


def test_param_specs_place_every_family_parameter():
    P = jax.sharding.PartitionSpec
    mesh = types.SimpleNamespace(shape={"data": 2, "model": 4})
    c = preset("tiny").replace(n_kv_heads=4, tie_embeddings=False, qkv_bias=True, qk_norm="head", post_norms=True,
                               num_experts=8, experts_per_token=2, moe_d_ff=6, moe_layers=(1,))
    specs = sharding.param_specs(c, mesh)
    assert specs["lm_head"]["kernel"] == P(None, "model")
    assert specs["layers_0"]["q"]["bias"] == P("model") and specs["layers_0"]["q_norm"]["scale"] == P()
    assert specs["layers_0"]["attn_post_norm"]["scale"] == P()
    assert specs["layers_1"]["moe"]["gate"] == P("model", None, None)  # 8 experts on 4: expert parallel
    assert specs["layers_1"]["moe"]["router"]["kernel"] == P(None, None)
    odd = sharding.param_specs(c.replace(num_experts=6, moe_d_ff=8), mesh)["layers_1"]["moe"]
    assert odd["gate"] == P(None, None, "model") and odd["down"] == P(None, "model", None)  # tensor parallel


def test_param_specs_follow_the_divisibility_rule():
    mesh = types.SimpleNamespace(shape={"data": 2, "model": 4})
    specs = sharding.param_specs(preset("shakespeare"), mesh)  # 4 heads, 4 kv heads: split
    layer = specs["layers_0"]
    P = jax.sharding.PartitionSpec
    assert specs["embed"]["embedding"] == P("model", None)
    assert layer["q"]["kernel"] == P(None, "model") and layer["o"]["kernel"] == P("model", None)
    assert layer["gate"]["kernel"] == P(None, "model") and layer["down"]["kernel"] == P("model", None)
    assert layer["attn_norm"]["scale"] == P()
    tiny = sharding.param_specs(preset("tiny"), mesh)["layers_0"]  # 2 kv heads on 4: replicated
    assert tiny["q"]["kernel"] == P(None, None) and tiny["k"]["kernel"] == P(None, None)
    assert sharding.cache_specs(preset("shakespeare"), mesh).k[0] == P("data", "model", None, None)
    assert sharding.padded_vocab_size(259, 8) == 264
