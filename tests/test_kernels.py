"""The accelerator (GPU) selection path: the Pallas counting kernel in interpret mode on
CPU against the sort reference and the float64 reference, on the adversarial suite; its
real Triton lowering (``jax.export`` for ``platforms=["cuda"]``, run on CPU); and the
structure of the compiled path (no sort, no scatter, no ``lax.top_k``, a bounded number
of passes over ``[B, V]``).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample._filters import filters as _filters
from jaxsample._selection import kernels as _kernels
from jaxsample._selection import select as _select
from jaxsample._selection.select import VocabShard
from helpers import (DTYPES, FILTER_CASES, REL_MARGIN, TRITON, adversarial, assert_element_values,
                     assert_filter_matches_reference, assert_same_thresholds, eqns, export_cuda, grid, mass_margin,
                     per_row_k, per_row_p)
from helpers import INTERPRET_KERNEL_PLAN as KERNEL


# ----------------------------------------------------------------------------- primitives


@pytest.mark.parametrize("vocab, dtype", grid(
    [(v, d) for v in (7, 1000, 1500) for d in ("f32", "bf16", "f16")],
    [(1000, "f32"), (1500, "bf16"), (7, "f16")]))
def test_kernel_kth_largest_equals_the_sort(vocab, dtype):
    rng = np.random.default_rng(vocab)
    x = jnp.asarray(adversarial(rng, 24, vocab, subnormal=True), DTYPES[dtype])
    k = per_row_k(rng, 24, vocab)
    got = jax.jit(lambda x, k: _select.kth_largest(x, k, method=KERNEL))(x, k)
    want = jax.jit(lambda x, k: _select.kth_largest(x.astype(jnp.float32), k, method="sort"))(x, k)
    assert got.dtype == x.dtype
    assert_same_thresholds(got, want)
    assert_element_values(x, got)


@pytest.mark.parametrize("vocab, dtype, weighted", grid(
    [(v, d, w) for v in (7, 1000) for d in ("f32", "bf16") for w in (False, True)],
    [(1000, "f32", False), (1000, "bf16", True)]))
def test_kernel_mass_threshold_equals_the_sort(vocab, dtype, weighted):
    rng = np.random.default_rng(vocab + 1)
    s = adversarial(rng, 24, vocab, subnormal=True)
    s = np.asarray(jnp.asarray(s, DTYPES[dtype]).astype(jnp.float32))  # exact in both
    w = rng.exponential(size=s.shape).astype(np.float32) * (rng.random(s.shape) < 0.8)
    p = per_row_p(rng, 24)
    scores = jnp.asarray(s, DTYPES[dtype])
    if weighted:
        got = jax.jit(lambda s, w, p: _select.mass_threshold(s, w, p, method=KERNEL))(scores, w, p)
        want = _select.mass_threshold(jnp.asarray(s), w, p, method="sort")
        weights = w
    else:
        got = jax.jit(lambda s, p: _select.mass_threshold(s, None, p, method=KERNEL))(scores, p)
        want = _select.mass_threshold(jnp.asarray(s), None, p, method="sort")
        weights = np.exp(s.astype(np.float64) - s.max(-1, keepdims=True))
    clear = mass_margin(s.astype(np.float64), np.asarray(weights, np.float64), p) > REL_MARGIN
    assert clear.mean() >= 0.6, clear.mean()
    assert_same_thresholds(got, want, rows=clear)
    assert_element_values(scores, got)


def test_count_above_partial_blocks_and_rows():
    """The raw kernel: per-candidate counts equal a NumPy count, with a last partial
    block (V = 1500 over blocks of 512) whose padding must weigh nothing."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 1500)), jnp.float32)
    keys = np.asarray(_select.ordered_keys(x)).astype(np.int64)
    prefix = np.asarray(keys[:, 17] & 0xF0000000, np.uint32)  # a first digit, per row
    got = _kernels.count_above(x, jnp.asarray(prefix), 24, None, None, width=4,
                               mode="count", interpret=True)
    cand = prefix[:, None].astype(np.int64) | (np.arange(1, 16)[None, :] << 24)
    want = (keys[:, None, :] >= cand[:, :, None]).sum(-1)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_float16_gets_16_bit_keys_on_every_path():
    """One key width per dtype (issue 20): the kernels gave float16 32-bit keys while
    `ordered_keys` gives it 16-bit ones, so the GPU searched 8 digits where 4 do. The
    kernel counts over float16 scores are those of the 16-bit `ordered_keys`, and the
    GPU plan's searches and the fused step run 4 digit passes for float16, as for
    bfloat16."""
    from jaxsample._step import fused as _fused

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((3, 1500)), jnp.float16)
    keys = np.asarray(_select.ordered_keys(x)).astype(np.int64)
    assert keys.max() < 1 << 16
    prefix = np.asarray(keys[:, 17] & 0xF000, np.uint32)  # a first 16-bit digit, per row
    got = _kernels.count_above(x, jnp.asarray(prefix), 8, None, None, width=4,
                               mode="count", interpret=True)
    cand = prefix[:, None].astype(np.int64) | (np.arange(1, 16)[None, :] << 8)
    np.testing.assert_array_equal(np.asarray(got), (keys[:, None, :] >= cand[:, :, None]).sum(-1))

    rows = jax.ShapeDtypeStruct((4,), jnp.int32)
    chain = js.default_chain(temperature=0.7, top_k=np.zeros(4, np.int32), top_p=0.9)
    for dtype in (jnp.bfloat16, jnp.float16):
        x = jax.ShapeDtypeStruct((4, 4096), dtype)
        kth = jax.make_jaxpr(lambda x, k: _select.kth_largest(x, k, method=_select.KERNEL_PLAN))(x, rows)
        fused = jax.make_jaxpr(lambda x: _fused.fused_default_step(
            chain, x, jax.random.split(jax.random.key(0), 4))[:3])(x)
        for jaxpr, want in ((kth, 4), (fused, 2 + 2 * 4)):
            calls = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "pallas_call"]
            assert len(calls) == want, (dtype, len(calls))


# ----------------------------------------------------------------------------- filters


def _kernel_filter(name, m):
    body = {"top_k": _filters.top_k_rows, "top_p": _filters.top_p_rows,
            "typical_p": _filters.typical_p_rows, "min_p": _filters.min_p_rows}[name]
    return jax.jit(lambda x, v: body(x, v, m, VocabShard.whole(x.shape[-1], KERNEL)))


@pytest.mark.parametrize("name, m, dtype", grid(
    [("top_k", 1, "f32"), ("top_k", 3, "bf16"), ("top_p", 1, "f32"), ("top_p", 3, "bf16"),
     ("typical_p", 1, "f32"), ("typical_p", 3, "f32")],
    [("top_k", 1, "f32"), ("top_p", 3, "bf16"), ("typical_p", 3, "f32")]))
def test_kernel_filters_match_the_float64_reference(name, m, dtype):
    """Every filter body, with the GPU plan, against tests/reference.py (set semantics,
    ties kept, min_tokens_to_keep)."""
    vocab = 1000
    rng = np.random.default_rng(vocab + 3)
    _, row_fn, values_fn = FILTER_CASES[name]
    # top_k's disabled values (0, >= V) go through the search here too (no cond): fine.
    logits = jnp.asarray(adversarial(rng, 24, vocab), DTYPES[dtype])
    values = values_fn(rng, 24, vocab)
    out = _kernel_filter(name, m)(logits, values)
    assert_filter_matches_reference(row_fn, logits, values, out, m)


@pytest.mark.slow
def test_kernel_filters_equal_the_cpu_path_on_large_rows():
    """[4, 32003] (no multiple of any block): the GPU plan keeps the sets the CPU plan keeps."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(adversarial(rng, 9, 32003)[[0, 3, 5, 8]])
    k = np.array([1, 50, 4000, 32003], np.int32)
    p = np.array([0.9, 0.5, 0.99, 0.3], np.float32)
    np.testing.assert_array_equal(_kernel_filter("top_k", 1)(x, k), js.top_k(x, k))
    np.testing.assert_array_equal(_kernel_filter("top_p", 1)(x, p), js.top_p(x, p))


# ----------------------------------------------------------------------------- lowering


@pytest.mark.parametrize("shape, dtype", [((2, 1000), "f32"), ((1, 32000), "bf16"),
                                          ((3, 4096), "f16")])
def test_every_gpu_kernel_lowers_for_cuda(shape, dtype):
    """The real Triton lowering of every kernel variant (count / softmax / weights, 16-
    and 32-bit keys, partial last block) succeeds: jax.export runs it on CPU."""
    x = jax.ShapeDtypeStruct(shape, DTYPES[dtype])
    rows = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
    k = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    shard = VocabShard.whole(shape[1], _select.KERNEL_PLAN)
    text = export_cuda(lambda x, k, p: (_filters.top_k_rows(x, k, 1, shard),
                                         _filters.top_p_rows(x, p, 2, shard),
                                         _filters.typical_p_rows(x, p, 1, shard)), x, k, rows)
    assert text.count(TRITON) >= 3


def test_sharded_gpu_path_lowers_for_cuda_inside_shard_map():
    """`ShardedSampler` with the GPU plan: the kernels lower inside `shard_map` (with its
    varying-axes check on), one per digit: 4 for bf16 top-k + 4 for bf16 top-p."""
    from models import sharding

    sampler = js.ShardedSampler(sharding.make_mesh((1, 1)), method=_select.KERNEL_PLAN)
    chain = js.default_chain(top_k=np.array([1, 5, 9, 40]), top_p=0.9)
    text = export_cuda(lambda x: sampler.apply(chain, x),
                        jax.ShapeDtypeStruct((4, 1024), jnp.bfloat16))
    assert text.count(TRITON) == 8


def _passes(closed, vocab):
    """Equations that read a ``[..., V]`` operand and reduce or count it: reductions over
    the vocabulary and the kernel calls (one read of the logits each)."""
    return sum(
        1 for eqn in eqns(closed.jaxpr)
        if (eqn.primitive.name == "pallas_call" or eqn.primitive.name.startswith("reduce_")
            or eqn.primitive.name in ("argmax", "argmin"))
        and any(getattr(getattr(v, "aval", None), "shape", ())[-1:] == (vocab,) for v in eqn.invars))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_gpu_path_has_no_sort_scatter_or_top_k_and_few_passes(dtype):
    """The GPU plan's top-p, top-k and typical-p: no sort, scatter or top_k anywhere in
    the program (jaxpr, and the module lowered for cuda), and a bounded number of
    passes over [B, V]: one per radix digit (8 for float32, 4 for bfloat16) plus a few
    fused reductions (max, total, snap; XLA merges the repeated row max)."""
    batch, vocab = 4, 4096
    shard = VocabShard.whole(vocab, _select.KERNEL_PLAN)
    x = jax.ShapeDtypeStruct((batch, vocab), DTYPES[dtype])
    v = jax.ShapeDtypeStruct((batch,), jnp.float32)
    k = jax.ShapeDtypeStruct((batch,), jnp.int32)
    digits = 8 if dtype == "f32" else 4
    cases = {"top_p": (lambda x, p: _filters.top_p_rows(x, p, 1, shard), v, digits + 4),
             "top_k": (lambda x, k: _filters.top_k_rows(x, k, 1, shard), k, digits),
             # typical-p searches float32 scores: 8 digits; log_softmax, entropy, the
             # scores' max and total, snap
             "typical_p": (lambda x, p: _filters.typical_p_rows(x, p, 1, shard), v, 8 + 6)}
    for name, (fn, arg, max_passes) in cases.items():
        jaxpr = jax.make_jaxpr(fn)(x, arg)
        prims = {eqn.primitive.name for eqn in eqns(jaxpr.jaxpr)}
        bad = {p for p in prims if p in ("sort", "top_k", "approx_top_k") or p.startswith("scatter")}
        assert not bad, (name, bad)
        assert "pallas_call" in prims, name
        passes = _passes(jaxpr, vocab)
        assert min(digits, max_passes) <= passes <= max_passes, (name, passes)
        text = export_cuda(fn, x, arg)
        assert not re.search(r"stablehlo\.(sort|scatter)|TopK|topk", text), name


# ----------------------------------------------------------------------------- dispatch


def test_default_plans_dispatch_by_backend():
    assert _select.default_plan("gpu").engine == "kernel"
    assert _select.default_plan("cuda").engine == "kernel"
    assert _select.default_plan("tpu").engine == "compare"
    assert _select.default_plan("cpu", 131072).engine == "scatter"
    assert _select.default_plan("cpu", 131072, sharded=True).engine == "compare"
    with pytest.raises(ValueError, match="engine"):
        _select.Plan("bogus")
    with pytest.raises(ValueError, match="kernel engine"):
        _select.Plan("kernel", (8,) * 4, (8, 8))


# ----------------------------------------------------------------------------- transformers


def test_typical_p_equals_transformers_on_random_logits():
    """typical_p (min_tokens_to_keep in typicality order) keeps exactly the tokens of
    transformers' TypicalLogitsWarper, on random float32 logits, on the CPU path and
    on the GPU plan."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TypicalLogitsWarper

    rng = np.random.default_rng(0)
    for vocab, mass, m, scale in ((50, 0.9, 1, 1.0), (1000, 0.5, 3, 2.0), (1000, 0.95, 1, 0.5),
                                  (257, 0.2, 5, 3.0), (1000, 0.02, 4, 1.0)):
        x = (rng.standard_normal((16, vocab)) * scale).astype(np.float32)
        warper = TypicalLogitsWarper(mass=mass, min_tokens_to_keep=m)
        theirs = np.isfinite(warper(None, torch.from_numpy(x)).numpy())
        ours = np.isfinite(np.asarray(js.typical_p(x, mass, min_tokens_to_keep=m)))
        np.testing.assert_array_equal(ours, theirs, err_msg=f"V={vocab} p={mass} m={m}")
        if (vocab, m) == (1000, 3):  # one shape through the (interpreted) kernel
            on_gpu_plan = _kernel_filter("typical_p", m)(jnp.asarray(x), np.full(16, mass, np.float32))
            np.testing.assert_array_equal(np.isfinite(np.asarray(on_gpu_plan)), theirs)


# ----------------------------------------------------------------------------- the switch


@pytest.fixture
def switch(monkeypatch):
    """The kernel switch, reset (environment variable unset, no `use_kernels`) and reset
    again afterwards."""
    from jaxsample._selection import switch as _switch

    monkeypatch.delenv(_switch.ENV, raising=False)
    js.use_kernels(None)
    yield _switch
    js.use_kernels(None)


def test_switch_positions_choose_the_plan(switch, monkeypatch):
    """JAXSAMPLE_KERNELS (auto / 0 / 1) and `use_kernels` (which wins, globally or in a
    `with` block) decide the plans: off, a GPU gets the pure-JAX compare plan; on, the
    CPU gets the kernel plan in the Pallas interpreter."""
    gpu, cpu = (lambda: _select.default_plan("gpu")), (lambda: _select.default_plan("cpu", 131072))
    assert gpu() == _select.KERNEL_PLAN and cpu() == _select.CPU_PLAN  # auto
    for value, on_gpu, on_cpu in (("0", _select.ACCELERATOR_PLAN, _select.CPU_PLAN),
                                  ("off", _select.ACCELERATOR_PLAN, _select.CPU_PLAN),
                                  ("1", _select.KERNEL_PLAN, _select.KERNEL_PLAN_INTERPRET),
                                  ("auto", _select.KERNEL_PLAN, _select.CPU_PLAN)):
        monkeypatch.setenv(switch.ENV, value)
        assert (gpu(), cpu()) == (on_gpu, on_cpu), value
    monkeypatch.setenv(switch.ENV, "1")
    with js.use_kernels(False):  # the setting wins over the variable
        assert gpu() == _select.ACCELERATOR_PLAN and switch.kernels_mode() == "off"
        with js.use_kernels("auto"):
            assert gpu() == _select.KERNEL_PLAN and cpu() == _select.CPU_PLAN
        assert switch.kernels_mode() == "off"
    assert switch.kernels_mode() == "on"  # restored: the variable again
    js.use_kernels(False)  # process-wide
    assert gpu() == _select.ACCELERATOR_PLAN
    monkeypatch.setenv(switch.ENV, "maybe")
    js.use_kernels(None)
    with pytest.raises(ValueError, match="JAXSAMPLE_KERNELS.*'maybe'"):
        gpu()
    with pytest.raises(ValueError, match=r"use_kernels\(enabled\).*'yes please'"):
        js.use_kernels("yes please")


def _switch_program(vocab=128):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((4, vocab)) * 3, jnp.float32)
    chain = js.default_chain(top_k=np.array([0, 5, 50, vocab]), top_p=0.9)

    def step(x, keys):  # sample_step with the default chain: the fused step when on
        token, _, out = js.sample_step(chain, x, None, keys)
        return token, out.token_logprob_processed, js.top_p(x, 0.8), js.top_k(x, jnp.array([1, 3, 9, vocab]))

    return step, (x, jax.random.split(jax.random.key(2), 4))


def test_both_switch_positions_trace_on_cpu(switch):
    """On: a filter traces to the Pallas kernels (interpreted on CPU); off: no kernel.
    (`sample_step`'s fused step: the slow test below and the cuda export.)"""
    x = jnp.zeros((4, 128), jnp.bfloat16)
    for on in (True, False):
        with js.use_kernels(on):
            prims = {e.primitive.name for e in eqns(jax.make_jaxpr(lambda x: js.top_p(x, 0.8))(x).jaxpr)}
            assert ("pallas_call" in prims) == on, on


@pytest.mark.slow
def test_both_switch_positions_give_the_same_samples_on_cpu(switch):
    """Both positions run on CPU (on: the Pallas interpreter, the fused step for
    `sample_step`) and give the same tokens, log-probs and kept sets; the switch is part
    of jit's cache key (one jitted function, traced once per position)."""
    step, args = _switch_program()
    with js.use_kernels(True):
        assert "pallas_call" in {e.primitive.name for e in eqns(jax.make_jaxpr(step)(*args).jaxpr)}
    traces = []
    jitted = jax.jit(lambda *a: (traces.append(1), step(*a))[1])
    results = {on: (js.use_kernels(on), jitted(*args))[1] for on in (True, False)}
    js.use_kernels(True)
    jitted(*args)  # cached: no third trace
    assert len(traces) == 2
    for got, want in zip(results[True], results[False]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)


def test_kernel_path_exports_for_cuda_by_the_switch(switch, monkeypatch):
    """As a GPU would compile it (jax.export for cuda, the real Triton lowering): the
    same jitted `sample_step` + `top_p` has Triton kernels with the switch on and none
    with it off (the same function traced again: the switch is in jit's cache key)."""
    monkeypatch.setattr(_select, "_backend", lambda: "gpu")  # plans as on a GPU
    chain = js.default_chain(temperature=0.8, top_p=0.9)
    fn = jax.jit(lambda x, keys: (js.sample_step(chain, x, None, keys)[0], js.top_p(x, 0.5)))
    shapes = (jax.ShapeDtypeStruct((2, 512), jnp.bfloat16),
              jax.ShapeDtypeStruct((2,), jax.random.key(0).dtype))
    counts = {}
    for on in (True, False):  # ("auto" is "on" on a GPU: test_switch_positions_choose_the_plan)
        with js.use_kernels(on):
            counts[on] = export_cuda(fn, *shapes).count(TRITON)
    # the fused step: stats + 4 top-k digits (they skip) + 4 top-p digits (rows of 512 are
    # drawn whole); top_p: 4 digits
    assert counts == {True: 1 + 2 * 4 + 4, False: 0}, counts


def test_a_kernel_failure_names_the_switch(switch, monkeypatch):
    """A kernel that fails while traced, a self-check that fails (`auto`: a warning and
    the pure-JAX path; `on`: the error) and a self-check that finds wrong results: each
    message names JAXSAMPLE_KERNELS=0 and use_kernels(False)."""
    def broken(*args, **kwargs):
        raise NotImplementedError("no Triton lowering for this op")

    monkeypatch.setattr(_kernels, "_candidate_masses", broken)
    x = jnp.zeros((2, 600))
    with pytest.raises(js.KernelError, match=r"_kernel failed.*JAXSAMPLE_KERNELS=0.*use_kernels\(False\)"):
        _select.kth_largest(x, 3, method=KERNEL)
    error = _select.kernel_self_check(interpret=True)
    assert isinstance(error, js.KernelError) and "NotImplementedError" in str(error)
    assert "JAXSAMPLE_KERNELS=0" in str(error) and "use_kernels(False)" in str(error)

    monkeypatch.setattr(_select, "_on_gpu", lambda: True)
    monkeypatch.setattr(_select, "_SELF_CHECK", {"error": error})
    with pytest.warns(RuntimeWarning, match="JAXSAMPLE_KERNELS=0"):
        assert _select.default_plan("gpu") == _select.ACCELERATOR_PLAN  # auto: falls back
    with js.use_kernels(True), pytest.raises(js.KernelError, match="JAXSAMPLE_KERNELS=0"):
        _select.default_plan("gpu")


@pytest.mark.slow
def test_kernel_self_check_passes_and_catches_wrong_results(monkeypatch):
    """Every kernel, interpreted, agrees with the pure-JAX path; one that gives a wrong
    arg-max is reported by name."""
    assert _select.kernel_self_check(interpret=True) is None
    row_stats = _kernels.row_stats
    monkeypatch.setattr(_kernels, "row_stats", lambda *a, **k: {
        **row_stats(*a, **k), "argmax": jnp.zeros((2,), jnp.int32) - 1})
    error = _select.kernel_self_check(interpret=True)
    assert isinstance(error, js.KernelError) and "wrong results" in str(error)
    assert "row_stats (float32)" in str(error) and "JAXSAMPLE_KERNELS=0" in str(error)
