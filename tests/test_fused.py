"""The fused sampling step of the default chain (GPU path, `jaxsample._fused`): run by
the Pallas interpreter on CPU against the unfused `sample_step` (the chain's filters,
then `sample`, then `token_logprobs`) on the adversarial suite; its real Triton
lowering (``jax.export`` for ``platforms=["cuda"]``); its structure (no sort, scatter,
top_k or conditional; the number of reads of ``[B, V]``); and the dispatch from
`sample_step` and `generate`.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample._selection import select as _select
from jaxsample._step import fused as _fused
from helpers import DTYPES, TRITON, adversarial, eqns, export_cuda, per_row_k, per_row_p, xla_equal
from helpers import INTERPRET_KERNEL_PLAN as KERNEL

ROWS = 24


def _xla_prims(closed):
    """Primitives of the program outside the kernels (a kernel's `pl.when` is a `cond`
    of its own, on chip, not an XLA conditional)."""
    return [eqn.primitive.name for eqn in eqns(closed.jaxpr, into_kernels=False)]


def _chain(rng, rows, vocab):
    """A default chain with per-row values: greedy rows, disabled stages, edges."""
    t = np.array([(0.0, 1.0, 0.7, 1.5, 0.05, 3.0)[i % 6] for i in range(rows)], np.float32)
    min_p = np.array([(0.0, 0.1, 0.0, 1.0, 0.0, 0.02, 0.3)[i % 7] for i in range(rows)], np.float32)
    return js.default_chain(temperature=t, top_k=per_row_k(rng, rows, vocab),
                            top_p=per_row_p(rng, rows), min_p=min_p)


def _logits(rng, vocab, dtype):
    x = adversarial(rng, ROWS, vocab)
    x[5, 3] = np.nan  # invalid rows: a NaN, a +inf
    x[17, 0] = np.inf
    return jnp.asarray(x, DTYPES[dtype])


@functools.partial(jax.jit, static_argnames="rolled")
def _fused_step(chain, x, keys, rolled=None):
    return _fused.fused_default_step(chain, x, keys, interpret=True, rolled=rolled)


@jax.jit
def _chain_step(chain, x, keys):
    token, _, out = js.sample_step(chain, x, None, keys)  # the CPU path: filters, then sample
    return token, out.token_logprob_raw, out.token_logprob_processed, out.processed_logits


@jax.jit
def _reference_step(chain, x, keys):
    """The unfused step on what the fused step defines: the chain with ``T = 1`` on
    ``x * (1 / T)`` (greedy rows: ``T = 0`` on ``x``); raw log-probs of ``x`` itself."""
    temp, *rest = chain.processors
    t = jnp.broadcast_to(temp.t, x.shape[:-1])
    scaled = jnp.where((t == 0)[:, None], x, (x.astype(jnp.float32) * (1.0 / jnp.where(
        t == 0, 1.0, t))[:, None]).astype(x.dtype))
    token, raw, processed, logits = _chain_step(js.chain(js.Temperature(jnp.where(t == 0, 0.0, 1.0)), *rest),
                                                scaled, keys)
    return token, js.token_logprobs(x, token), processed, logits


def _assert_same_step(got, want, skip=()):
    """Equal steps, except on the rows in `skip`."""
    rows = np.setdiff1d(np.arange(len(got[0])), skip)
    token, raw, processed, logits = (np.asarray(v)[rows] for v in got)
    want_token, want_raw, want_processed, want_logits = (np.asarray(v)[rows] for v in want)
    valid = np.asarray(want_token) >= 0  # an invalid row's processed logits are unspecified
    same_set = np.asarray(jnp.isfinite(logits) == jnp.isfinite(want_logits))[valid]
    assert same_set.all(), np.flatnonzero(valid)[~same_set.all(axis=1)]
    assert xla_equal(logits, want_logits)[valid][np.asarray(jnp.isfinite(want_logits))[valid]].all()
    np.testing.assert_array_equal(token, want_token)
    np.testing.assert_allclose(raw, want_raw, rtol=1e-5, atol=1e-5)  # NaN where NaN
    np.testing.assert_allclose(processed, want_processed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab, dtype", [(300, "f32"), (1000, "f32"), (1000, "bf16"),
                                          pytest.param(1500, "f16", marks=pytest.mark.slow)])
def test_fused_step_equals_the_chain_step(vocab, dtype):
    """Token, raw and processed log-probs and processed logits equal the unfused step's
    on every adversarial kind, with per-row temperatures (greedy rows included), top-k
    (disabled, 1, V, ...), top-p (1, 1e-6, ...), min-p (0, 1, ...), a NaN row and a
    +inf row; 300 tokens takes the one-level draw, the others the two-stage draw with a
    partial last segment."""
    rng = np.random.default_rng(vocab)
    chain = _chain(rng, ROWS, vocab)
    x = _logits(rng, vocab, dtype)
    keys = jax.random.split(jax.random.key(vocab), ROWS)
    got = _fused_step(chain, x, keys)
    want = _reference_step(chain, x, keys)
    # Rows 5 (a NaN) and 17 (+inf) are invalid as the model produced them; the chain
    # may drop a NaN in a truncation and draw from the rest (documented deviation).
    _assert_same_step(got, want, skip=[5, 17])
    assert got[0][5] == -1 and got[0][17] == -1
    assert np.isnan(np.asarray(got[1])[[5, 17]]).all() and np.isnan(np.asarray(got[2])[[5, 17]]).all()
    if dtype == "bf16":  # the unrolled passes (the GPU's program), interpreted
        _assert_same_step(_fused_step(chain, x, keys, rolled=False), want, skip=[5, 17])
    assert got[3].dtype == x.dtype


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_fused_step_on_lm_like_logits_skips_decided_digits(dtype):
    """LM-like rows (a few tokens far above a N(0, 2) bulk, shifted): with top-p alone
    the leading digits of the threshold are decided by `top_p_prefix` (those passes read
    nothing); with a large top-k as well they are not (the survivors' total comes from
    the search); the step equals the unfused one, rolled (interpreter) and unrolled (the
    GPU's program)."""
    rng = np.random.default_rng(12)
    rows, vocab = 12, 2048
    x = rng.standard_normal((rows, vocab)) * 2.0 + np.where(rng.random((rows, vocab)) < 0.003, 12.0, 0.0)
    x = jnp.asarray(x + rng.uniform(0, 25, (rows, 1)), DTYPES[dtype])
    t = np.resize(np.array([1.0, 0.7, 1.3, 1.0, 0.9, 1.0, 0.6, 1.1], np.float32), rows)
    p = np.resize(np.array([0.9, 0.95, 0.5, 0.99, 0.8, 0.9, 0.3, 0.999], np.float32), rows)
    k = np.where(np.arange(rows) >= 8, vocab // 2, 0).astype(np.int32)  # rows 8+: top-k too
    chain = js.default_chain(temperature=t, top_k=k, top_p=p)
    s = (x.astype(jnp.float32) * (1.0 / t)[:, None]).astype(x.dtype).astype(jnp.float32)
    top = jnp.max(s, axis=1)
    _, decided = _fused.top_p_prefix(top, jnp.sum(jnp.exp(s - top[:, None]), axis=1), p, vocab, x.dtype)
    assert (np.asarray(decided)[:8] >= 4).sum() >= 4, decided
    keys = jax.random.split(jax.random.key(4), rows)
    want = _reference_step(chain, x, keys)
    _assert_same_step(_fused_step(chain, x, keys), want)
    _assert_same_step(_fused_step(chain, x, keys, rolled=False), want)


def test_fused_step_top_k_then_top_p_keeps_the_survivors_nucleus():
    """top-k 1000 then top-p 0.3 on 1024 tokens whose nucleus lies among 256 near-ties:
    the top-p mass is that of the top-k survivors (a review's counter-example)."""
    x = np.full((1, 1024), 999.0, np.float32)
    x[0, 0] = 1003.0
    x[0, 1:257] = np.linspace(1002.75, 1003.0, 256, dtype=np.float32)
    chain = js.default_chain(top_k=np.array([1000], np.int32), top_p=np.array([0.3], np.float32))
    keys = jax.random.split(jax.random.key(0), 1)
    _assert_same_step(_fused_step(chain, jnp.asarray(x), keys), _reference_step(chain, jnp.asarray(x), keys))


@pytest.mark.parametrize("dtype, value, t", [("f16", 4000.0, 0.05), ("f32", 3e38, 0.5),
                                             ("f32", -3e38, 0.5)])
def test_fused_step_scaled_overflow_is_an_invalid_row(dtype, value, t):
    """Finite logits whose scaled value overflows (+inf, or every logit -inf): token -1
    and NaN log-probs, as the unfused step."""
    x = jnp.asarray(np.full((2, 600), value, np.float32), DTYPES[dtype])
    chain = js.default_chain(temperature=np.array([t, t], np.float32), top_p=0.9)
    keys = jax.random.split(jax.random.key(0), 2)
    token, raw, processed, _ = _fused_step(chain, x, keys)
    want_token = _reference_step(chain, x, keys)[0]
    np.testing.assert_array_equal(token, [-1, -1])
    np.testing.assert_array_equal(want_token, [-1, -1])
    assert np.isnan(np.asarray(raw)).all() and np.isnan(np.asarray(processed)).all()


def test_sample_step_takes_the_fused_path_on_the_kernel_plan(monkeypatch):
    """With the GPU plan, `sample_step` runs the fused kernels for the default chain (and
    only for it; no XLA conditional) and gives the CPU path's results."""
    rng = np.random.default_rng(3)
    x = _logits(rng, 1000, "f32")
    keys = jax.random.split(jax.random.key(0), ROWS)
    chain = _chain(rng, ROWS, 1000)
    want = _reference_step(chain, x, keys)
    monkeypatch.setattr(_select, "default_plan", lambda *a, **k: KERNEL)
    prims = _xla_prims(jax.make_jaxpr(_chain_step.__wrapped__)(chain, x, keys))
    assert "pallas_call" in prims and "cond" not in prims
    _assert_same_step(jax.jit(_reference_step.__wrapped__)(chain, x, keys), want, skip=[5, 17])
    # Not the default chain's structure: the filters run one by one.
    assert not _fused.fusable(js.chain(js.TopK(5), js.TopP(0.9)))
    assert not _fused.fusable(js.default_chain(min_tokens_to_keep=2))
    assert not _fused.fusable(js.chain(js.BanTokens([3]), js.default_chain()))
    assert _fused.fusable(js.default_chain(), jnp.bfloat16) and not _fused.fusable(js.default_chain(), jnp.float64)


@pytest.mark.slow
def test_generate_takes_the_fused_path_on_the_kernel_plan(monkeypatch):
    """`generate` on the GPU plan (fused step in the scan) gives the CPU path's tokens,
    log-probs and stats."""
    from models import DecoderLM, preset

    rng = np.random.default_rng(3)
    model = DecoderLM.random(preset("tiny"), jax.random.key(1))
    prompts = jnp.asarray(rng.integers(0, 256, (2, 5)), jnp.int32)
    # Temperatures whose reciprocal is exact: x / T == x * (1 / T).
    chain = js.default_chain(temperature=np.array([0.5, 0.0], np.float32), top_k=5, top_p=0.9)

    def run(c):
        return js.generate(model, prompts, jnp.array([5, 3]), jax.random.split(jax.random.key(2), 2),
                           sampler=c, max_new_tokens=4, return_stats=True)

    want = jax.jit(run)(chain)
    monkeypatch.setattr(_select, "default_plan", lambda *a, **k: KERNEL)
    got = jax.jit(run)(chain)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    for name in ("logprobs_raw", "logprobs_processed"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.stats.num_kept, want.stats.num_kept)
    np.testing.assert_allclose(got.stats.entropy, want.stats.entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_fused_step_lowers_for_cuda_with_few_reads_and_no_sort(dtype):
    """The real Triton lowering of every fused kernel succeeds (jax.export on CPU). The
    program has no sort, scatter, top_k or conditional; every read of [B, V] is a
    kernel: stats, one per digit for top-k and for top-p (8 / 4), the segment masses;
    no XLA reduction over the vocabulary."""
    batch, vocab = 4, 131072
    x = jax.ShapeDtypeStruct((batch, vocab), DTYPES[dtype])
    keys = jax.ShapeDtypeStruct((batch,), jax.random.key(0).dtype)
    chain = js.default_chain(temperature=np.ones(batch, np.float32), top_k=np.zeros(batch, np.int32),
                             top_p=np.full(batch, 0.9, np.float32))
    fn = lambda c, x, k: _fused.fused_default_step(c, x, k)[:3]  # noqa: E731
    digits = 8 if dtype == "f32" else 4
    jaxpr = jax.make_jaxpr(fn)(chain, x, keys)
    prims = _xla_prims(jaxpr)
    bad = {p for p in prims if p in ("sort", "top_k", "approx_top_k", "cond", "while")
           or p.startswith("scatter")}
    assert not bad, bad
    assert prims.count("pallas_call") == 2 + 2 * digits
    over_vocab = [eqn.primitive.name for eqn in eqns(jaxpr.jaxpr, into_kernels=False)
                  if eqn.primitive.name.startswith("reduce_") and any(
                      getattr(getattr(v, "aval", None), "shape", ())[-1:] == (vocab,) for v in eqn.invars)]
    assert not over_vocab, over_vocab
    text = export_cuda(fn, chain, x, keys)
    assert text.count(TRITON) == 2 + 2 * digits
    assert not re.search(r"stablehlo\.(sort|scatter|case|if|while)|TopK|topk", text)


def test_fused_step_values_are_traced():
    """New temperatures, k, p and min-p values reuse the compiled step."""
    rng = np.random.default_rng(5)
    x = _logits(rng, 600, "f32")[:4]
    keys = jax.random.split(jax.random.key(0), 4)
    traces = []
    step = jax.jit(lambda c, x, k: (traces.append(1), _fused.fused_default_step(c, x, k, interpret=True))[1])
    for t, k, p, m in ((1.0, 0, 1.0, 0.0), (0.5, 7, 0.9, 0.1), (0.0, 600, 0.3, 1.0)):
        step(js.default_chain(temperature=t, top_k=k, top_p=p, min_p=m), x, keys)
    assert len(traces) == 1


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_top_p_prefix_holds_the_threshold_and_skips_passes(dtype):
    """The bound of `top_p_prefix`: the sort reference's top-p threshold always has the
    decided leading key bits (adversarial rows and LM-like rows, many p), and on LM-like
    logits it decides whole digits (passes that read nothing)."""
    from jaxsample._selection import radix as _radix

    rng = np.random.default_rng(11)
    vocab = 4096
    lm_like = rng.standard_normal((24, vocab)) * 2.0 + np.where(rng.random((24, vocab)) < 0.002, 15.0, 0.0)
    x = np.concatenate([adversarial(rng, 24, vocab), lm_like + rng.uniform(-5, 25, (24, 1))])
    x = jnp.asarray(x, DTYPES[dtype])
    p = jnp.asarray(np.resize([0.5, 0.9, 0.95, 0.99, 0.999, 1e-3], len(x)), jnp.float32)
    x32 = x.astype(jnp.float32)
    top = jnp.max(x32, axis=1)
    total = jnp.sum(jnp.exp(x32 - top[:, None]), axis=1)
    start, decided = _fused.top_p_prefix(top, total, p, vocab, x.dtype)
    bits = _radix.key_bits(x.dtype)
    want = _select.mass_threshold(x32, None, p, method="sort")  # float32: exact for bf16
    key = _radix.ordered_keys(want.astype(jnp.float32), x.dtype)
    low = (bits - decided).astype(jnp.uint32)
    finite = np.asarray(jnp.isfinite(top))
    held = np.asarray((decided == 0) | ((key >> low) == (start >> low)))
    assert held[finite].all(), np.flatnonzero(~held & finite)
    assert (np.asarray(decided)[24:] >= 4).mean() > 0.5  # LM-like rows: digits decided


def test_generate_lowers_for_cuda_with_the_fused_step_and_no_conditional(monkeypatch):
    """The whole `generate` program with the default chain, as a GPU would compile it:
    the fused kernels lower (jax.export for cuda), and no XLA conditional remains in the
    decode loop (each would read its predicate back to the host every step)."""
    from models import DecoderLM, preset

    monkeypatch.setattr(_select, "default_plan", lambda *a, **k: _select.KERNEL_PLAN)
    model = DecoderLM.random(preset("tiny"), jax.random.key(1))

    def run(chain, prompts, lengths, keys):
        out = js.generate(model, prompts, lengths, keys, sampler=chain, max_new_tokens=4)
        return out.tokens, out.logprobs_processed

    text = export_cuda(run, js.default_chain(temperature=0.8, top_p=0.9),
                        jax.ShapeDtypeStruct((2, 5), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32),
                        jax.ShapeDtypeStruct((2,), jax.random.key(0).dtype))
    # Index 0 and the scan body: stats + 2 x 8 digit passes (+ segment masses above 512
    # tokens; the tiny model's rows are drawn whole).
    per_step = 1 + 2 * 8 + (model.config.vocab_size > 512)
    assert text.count(TRITON) == 2 * per_step
    assert not re.search(r"stablehlo\.(case|if)\b", text)  # (the KV-cache writes scatter)
