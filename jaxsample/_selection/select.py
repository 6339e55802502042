"""Per-row selection primitives: the thresholds the truncation filters keep above.

Every truncation filter in :mod:`jaxsample._filters` is written as

    threshold = <one of the primitives below>(...)      # [...]
    keep      = score >= threshold[..., None]           # [..., V]

so the filters never depend on *how* a threshold is found. The values are defined by
sets, not by positions in a sort:

* ``kth_largest(x, k)`` is the largest value ``t`` in the row with
  ``#{i : x_i >= t} >= k``.
* ``mass_threshold(s, w, p)`` is the largest value ``t`` in the row with
  ``sum(w_i : s_i >= t) >= p * sum(w)``.

Both are found **without sorting the vocabulary** (``method="auto"``):

1. *Order-preserving keys* (:mod:`jaxsample._selection.radix`, shared with the
   kernels and the fused step). A float maps to an unsigned integer with the same order
   (:func:`ordered_keys`: set the sign bit of a non-negative float, invert every bit of
   a negative one; ``-0.0`` becomes ``+0.0``, every NaN the largest key). float32 gives
   32-bit keys; bfloat16 / float16 give 16-bit keys (their values, compared in float32,
   are exact), on every engine (:func:`jaxsample._selection.radix.key_bits`).
2. *Radix select* (:func:`radix_select`): the answer is the largest key ``T`` with
   ``sum(w_i : key_i >= T) >= target``. It is built a digit at a time, most significant
   first. Each pass makes the weighted histogram of the next digit over the elements
   that share the digits chosen so far, and picks the largest digit whose suffix mass
   (plus the mass of every element with a larger prefix) still reaches the target; that
   digit's bucket is never empty, so ``T`` is always the key of an element of the row
   and the threshold is an actual element value. Two engines:

   * ``"scatter"``: one scatter-add histogram of ``2**bits`` buckets per row and pass,
     then a two-level suffix sum over the buckets (block sums, then one block). float32
     in two 16-bit passes (three of 13/10/9 bits below 65536 tokens), 16-bit floats
     in one. The default on CPU, where a
     scatter-add over the vocabulary costs a few reduction passes and a sort a hundred.
   * ``"compare"``: for a ``b``-bit digit, the masses above the ``2**b - 1`` candidate
     thresholds are counted directly (compare and sum over the vocabulary, no scatter).
     Eight 4-bit passes for float32. The default on TPU and for vocab-sharded rows on
     CPU.
   * ``"kernel"``: the same counts from a Pallas kernel (`jaxsample._selection.kernels`) that
     reads the scores once per digit and evaluates the 15 candidates on chip (XLA's
     ``[R, 15, V]`` compare costs 4-5 reads on a GPU). The default on GPU.

   Every engine drives the one digit loop of :func:`jaxsample._selection.radix.
   digit_loop` with its own pass; the compare and kernel engines share one search
   (:func:`_digit_search`), whole rows or vocab shards alike: the per-pass masses go
   through ``VocabShard._psum``, the identity on one device and a ``psum`` over the
   model axis inside `shard_map` (:class:`VocabShard`).

   Counts (top-k) are integers: exact. Masses are float32 sums, accumulated in a
   different order than a sort's running sum, so a row whose running mass lies within
   float32 rounding (relative ~1e-6) of ``p * total`` may be decided differently; the
   guards keep the row non-empty and the threshold an element value.
3. *Candidate window* (CPU): ``lax.top_k`` of a small static window (64) decides
   most rows exactly: a traced ``k`` up to the window, and a mass threshold whose
   crossing lies inside the window (peaked distributions). The radix select runs
   behind a batch-wide ``lax.cond`` only when some row needs it, and the window is
   skipped when it provably cannot decide (``window * max(w) < p * total``, flat
   distributions). Under ``vmap`` both branches of a ``cond`` run (still exact).

``method="sort"`` is the original full-sort implementation, kept as the reference path
(tests, benchmark). A :class:`Plan` instead of a method name fixes the engine, the digit
widths and the window (tests use this to check every path on CPU).

All functions work on the last axis and broadcast over the leading ones.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import operator
import warnings
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from jaxsample._selection import kernels as _kernels
from jaxsample._selection import radix as _radix
from jaxsample._selection import switch as _switch
from jaxsample._selection.radix import from_ordered_keys, ordered_keys, pick_digit

__all__ = [
    "kth_largest",
    "mass_threshold",
    "Plan",
    "default_plan",
    "kernel_self_check",
    "ordered_keys",
    "from_ordered_keys",
    "radix_select",
    "VocabShard",
]

Array = jax.Array

_ENGINES = ("scatter", "compare", "kernel")

_U32 = jnp.uint32
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the sort-free selection runs (static: part of the traced program).

    Attributes:
      engine: ``"scatter"`` (histogram by scatter-add, whole rows only), ``"compare"``
        (count the mass above each candidate digit in XLA) or ``"kernel"`` (the same
        counts from the Pallas kernel of `jaxsample._kernels`).
      digits32: digit widths, most significant first, for 32-bit keys (sum 32).
      digits16: digit widths for 16-bit keys (bfloat16 / float16 scores; sum 16).
      window: static size of the ``lax.top_k`` candidate window tried first for a
        traced ``k`` and for mass thresholds; 0 disables it.
      top_k_static_max: a static ``k`` up to this uses ``lax.top_k(x, k)`` directly.
      interpret: run the kernel engine in the Pallas interpreter (CPU tests).
    """

    engine: str = "scatter"
    digits32: tuple[int, ...] = (16, 16)
    digits16: tuple[int, ...] = (16,)
    window: int = 64
    top_k_static_max: int = 256
    interpret: bool = False

    def __post_init__(self) -> None:
        if self.engine not in _ENGINES:
            raise ValueError(f"Plan: engine must be one of {_ENGINES}, got {self.engine!r}")
        for name, total in (("digits32", 32), ("digits16", 16)):
            digits = tuple(getattr(self, name))
            if sum(digits) != total or any(d < 1 or d > 16 for d in digits):
                raise ValueError(
                    f"Plan: {name} must be widths in [1, 16] summing to {total}, got {digits}")
            object.__setattr__(self, name, digits)
        if self.engine == "compare" and max(self.digits32 + self.digits16) > 8:
            raise ValueError("Plan: the compare engine takes digits of at most 8 bits "
                             "(2**bits - 1 candidates per pass)")
        if self.engine == "kernel" and max(self.digits32 + self.digits16) > _kernels.MAX_WIDTH:
            raise ValueError(f"Plan: the kernel engine takes digits of at most "
                             f"{_kernels.MAX_WIDTH} bits")
        if self.window < 0 or self.top_k_static_max < 0:
            raise ValueError("Plan: window and top_k_static_max must be >= 0")

    def digits(self, bits: int) -> tuple[int, ...]:
        """The digit widths for keys of ``bits`` bits (:func:`jaxsample._selection.radix.
        key_bits`): ``digits32`` or ``digits16``."""
        return self.digits32 if bits == 32 else self.digits16


#: CPU: scatter-add histograms (2 passes for float32), top-64 candidate window.
CPU_PLAN = Plan("scatter", (16, 16), (16,), window=64, top_k_static_max=256)
#: CPU below 65536 tokens: three narrower passes. The buckets cost memory traffic of
#: their own (zeroing, block sums), which 2**16 per row does not repay on short rows.
CPU_PLAN_SMALL_VOCAB = dataclasses.replace(CPU_PLAN, digits32=(13, 10, 9))
#: TPU / other accelerators: compare-and-count in XLA, 4 bits a pass, no lax.top_k
#: window (it sorts there). Also what vocab-sharded rows use on CPU.
ACCELERATOR_PLAN = Plan("compare", (4,) * 8, (4,) * 4, window=0, top_k_static_max=16)
#: GPU: the Pallas counting kernel (`jaxsample._kernels`), 4 bits a pass (8 passes for
#: float32, 4 for bfloat16), each one read of the logits; no lax.top_k, sort or scatter.
KERNEL_PLAN = Plan("kernel", (4,) * 8, (4,) * 4, window=0, top_k_static_max=0)
#: The kernel plan in the Pallas interpreter: what ``JAXSAMPLE_KERNELS=1`` runs off a GPU.
KERNEL_PLAN_INTERPRET = dataclasses.replace(KERNEL_PLAN, interpret=True)

_GPU = ("gpu", "cuda", "rocm")


def _backend() -> str:
    return jax.default_backend()


def _on_gpu() -> bool:
    """Whether this process runs on a GPU (where the kernels are compiled for real)."""
    return jax.default_backend() in _GPU


def default_plan(backend: str | None = None, vocab: int | None = None, *,
                 sharded: bool = False) -> Plan:
    """The plan ``method="auto"`` uses on ``backend`` (default: ``jax.default_backend()``)
    for rows of ``vocab`` entries; ``sharded``: rows split over devices (only engines
    whose per-pass counts can be ``psum``-ed: compare, kernel).

    The kernel switch (`jaxsample.use_kernels`, ``JAXSAMPLE_KERNELS``; docs/kernels.md)
    decides the kernel plans: off, a GPU gets :data:`ACCELERATOR_PLAN` (pure JAX); on,
    every other backend gets :data:`KERNEL_PLAN_INTERPRET`; auto, a GPU gets
    :data:`KERNEL_PLAN` once the kernels pass their self-check there
    (:func:`kernel_self_check`).
    """
    mode = _switch.kernels_mode()
    backend = _backend() if backend is None else backend
    if backend in _GPU:
        return KERNEL_PLAN if mode != "off" and _kernels_work(mode) else ACCELERATOR_PLAN
    if mode == "on":
        return KERNEL_PLAN_INTERPRET
    if backend != "cpu" or sharded:
        return ACCELERATOR_PLAN
    return CPU_PLAN_SMALL_VOCAB if vocab is not None and vocab < 65536 else CPU_PLAN


_SELF_CHECK: dict[str, Any] = {}


def _kernels_work(mode: str) -> bool:
    """Whether the kernels may run: True off a real GPU (nothing to check: a plan asked
    for by name, or tests); on one, the result of :func:`kernel_self_check`, run once per
    process. A failure raises with the switch ``on`` and warns (then the pure-JAX path)
    with ``auto``."""
    if not _on_gpu():
        return True
    if "error" not in _SELF_CHECK:
        _SELF_CHECK["error"] = kernel_self_check()
    error = _SELF_CHECK["error"]
    if error is None:
        return True
    if mode == "on":
        raise error
    if not _SELF_CHECK.get("warned"):
        _SELF_CHECK["warned"] = True
        warnings.warn(f"{error} Running the pure-JAX path ({_switch.ENV}=auto); set "
                      f"{_switch.ENV}=0 to silence this.", RuntimeWarning, stacklevel=3)
    return False


def kernel_self_check(interpret: bool = False) -> Exception | None:
    """Compiles and runs every Pallas kernel once on small rows (float32 and bfloat16)
    and checks the results against the pure-JAX path.

    Runs in a thread of its own (JAX's tracing state is per thread), so it may be
    called while a function is being traced: that is when :func:`default_plan` asks.

    Returns:
      ``None`` when every kernel ran and agreed, else the :class:`jaxsample.KernelError`
      to raise (its message names the switch).
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_self_check, interpret).result()


def _self_check(interpret: bool) -> Exception | None:
    rng = np.random.default_rng(0)
    rows, vocab = 2, 1500
    kernel = dataclasses.replace(KERNEL_PLAN, interpret=interpret)
    problems = []
    try:
        for dtype in (_F32, jnp.bfloat16):
            x = jnp.asarray(rng.standard_normal((rows, vocab)), dtype)
            w = jnp.asarray(rng.exponential(size=(rows, vocab)), _F32)
            k, p = jnp.array([1, 37], jnp.int32), jnp.array([0.5, 0.9], _F32)

            def thresholds(x, k, p, w, plan):
                return (kth_largest(x, k, method=plan), mass_threshold(x, None, p, method=plan),
                        mass_threshold(x, w, p, method=plan))

            got = jax.jit(functools.partial(thresholds, plan=kernel))(x, k, p, w)
            want = jax.jit(functools.partial(thresholds, plan=ACCELERATOR_PLAN))(x, k, p, w)
            x32 = np.asarray(x.astype(_F32))
            soft = np.exp(x32 - x32.max(1, keepdims=True))
            name = jnp.dtype(dtype).name
            if not np.array_equal(np.asarray(got[0]), np.asarray(want[0])):
                problems.append(f"top-k thresholds ({name})")
            for label, t, weight in (("top-p", got[1], soft), ("weighted mass", got[2], w)):
                t, weight = np.asarray(t.astype(_F32))[:, None], np.asarray(weight, np.float64)
                target = np.asarray(p)[:, None] * weight.sum(1, keepdims=True)
                kept, above = (np.sum(np.where(m, weight, 0), 1, keepdims=True)
                               for m in (x32 >= t, x32 > t))
                if not (np.all(kept >= target * (1 - 1e-4)) and np.all(above <= target * (1 + 1e-4))):
                    problems.append(f"{label} thresholds ({name})")
            scale = jnp.ones((rows,), _F32)
            stats = jax.jit(functools.partial(_kernels.row_stats, interpret=interpret))(x, scale)
            if not (np.array_equal(np.asarray(stats["argmax"]), x32.argmax(1))
                    and np.array_equal(np.asarray(stats["max"]), x32.max(1))):
                problems.append(f"row_stats ({name})")
            top = jnp.asarray(x32.max(1))
            masses = jax.jit(functools.partial(_kernels.segment_masses, interpret=interpret))(
                x, scale, top, jnp.zeros((rows,), _U32), jnp.full((rows,), -jnp.inf))
            if not np.allclose(np.asarray(masses).sum(1), soft.sum(1), rtol=1e-4):
                problems.append(f"segment_masses ({name})")
            bits = _radix.key_bits(dtype)
            lanes = _kernels.pass_lanes(rows, vocab)

            def first_digit(x):
                partials, _ = _kernels.chained_pass(
                    x, jnp.zeros((rows, lanes), _F32), jnp.zeros((rows,), _U32), bits, bits - 4,
                    jnp.full((rows,), 2 ** 30, jnp.int32), width=4, prev_width=4, mode="count",
                    stat=top, scale=scale, floor=jnp.zeros((rows,), _U32),
                    active=jnp.ones((rows,), jnp.int32), interpret=interpret)
                return _kernels.pass_masses(partials, _kernels.block_lanes(rows, vocab), width=4,
                                            mode="count")

            keys = np.asarray(ordered_keys(x)).astype(np.int64)
            cand = (np.arange(1, 16) << (bits - 4))[None, :, None]
            if not np.array_equal(np.asarray(jax.jit(first_digit)(x)),
                                  (keys[:, None, :] >= cand).sum(-1)):
                problems.append(f"chained_pass ({name})")
    except Exception as error:  # noqa: BLE001 (any failure: lowering, Triton, CUDA)
        detail = str(error) if isinstance(error, _switch.KernelError) else (
            f"{type(error).__name__}: {error}; {_switch.HINT}")
        return _switch.KernelError(f"jaxsample's Pallas GPU kernels failed their self-check "
                                   f"on {jax.devices()[0]}: {detail}")
    if problems:
        return _switch.KernelError(
            f"jaxsample's Pallas GPU kernels gave wrong results in their self-check on "
            f"{jax.devices()[0]}: {', '.join(problems)}. {_switch.HINT}.")
    return None


def _resolve(method: Any, vocab: int, sharded: bool = False) -> Plan | None:
    """``None`` for the sort reference, else the :class:`Plan` to use."""
    if isinstance(method, Plan):
        plan = method
    elif method == "sort":
        if sharded:
            raise ValueError("method='sort' needs whole rows (shard.axis is None)")
        return None
    elif method in ("auto", "radix"):
        plan = default_plan(vocab=vocab, sharded=sharded)
        plan = dataclasses.replace(plan, window=0) if method == "radix" else plan
    else:
        raise ValueError(f"method must be 'auto', 'radix', 'sort' or a Plan, got {method!r}")
    if sharded:  # no local lax.top_k shortcut, no local-only histogram
        if plan.engine == "scatter":
            plan = dataclasses.replace(ACCELERATOR_PLAN, interpret=plan.interpret)
        plan = dataclasses.replace(plan, window=0, top_k_static_max=0)
    return plan


# ----------------------------------------------------------------------------- VocabShard


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """One device's slice ``[..., V_local]`` of rows split over the vocabulary.

    Its methods reduce over the *whole* vocabulary: a local reduction over the last
    axis followed by a collective over ``axis`` (none when ``axis`` is None: whole
    rows on one device, :meth:`whole`). That collective is the only difference between
    the single-device and the vocab-sharded filters: the selection primitives
    (:func:`kth_largest`, :func:`mass_threshold`) and every filter of
    :mod:`jaxsample._filters` take a shard and run the same code on both. Results are
    per row (``[...]``) and identical on every device of the vocabulary group.

    Attributes:
      vocab_size: V, the global vocabulary size.
      local_size: V_local = V / (size of ``axis``).
      axis: the mesh axis the vocabulary is split over, or None.
      offset: global id of local column 0 (``axis_index * V_local``; traced).
      method: the selection method the primitives use when called with
        ``method="auto"``: ``"auto"`` (the backend's :func:`default_plan`), or a
        :class:`Plan` (tests run every engine through the filters this way).
    """

    vocab_size: int
    local_size: int
    axis: str | None = None
    offset: Any = 0
    method: Any = "auto"

    @classmethod
    def inside(cls, vocab_size: int, local_size: int, axis: str | None,
               method: Any = "auto") -> "VocabShard":
        """The shard of the current device (call inside `jax.shard_map`)."""
        offset = 0 if axis is None else lax.axis_index(axis) * local_size
        return cls(vocab_size, local_size, axis, offset, method)

    @classmethod
    def whole(cls, vocab_size: int, method: Any = "auto") -> "VocabShard":
        """Whole rows on one device: every collective is the identity."""
        return cls(vocab_size, vocab_size, method=method)

    # -- collectives over the vocabulary (identity on one device)
    def _pmax(self, x: Array) -> Array:
        return x if self.axis is None else lax.pmax(x, self.axis)

    def _pmin(self, x: Array) -> Array:
        return x if self.axis is None else lax.pmin(x, self.axis)

    def _psum(self, x: Array) -> Array:
        return x if self.axis is None else lax.psum(x, self.axis)

    def ids(self) -> Array:
        """Global token ids of the local columns, ``int32[V_local]``."""
        return self.offset + jnp.arange(self.local_size, dtype=jnp.int32)

    def max(self, x: Array) -> Array:
        """Row max over the vocabulary."""
        return self._pmax(jnp.max(x, axis=-1))

    def min(self, x: Array) -> Array:
        """Row min over the vocabulary."""
        return self._pmin(jnp.min(x, axis=-1))

    def sum(self, x: Array) -> Array:
        """Row sum over the vocabulary."""
        return self._psum(jnp.sum(x, axis=-1))

    def any(self, x: Array) -> Array:
        """Row ``any`` over the vocabulary (bool)."""
        return self._pmax(jnp.any(x, axis=-1).astype(jnp.int32)) > 0

    def logsumexp(self, x: Array) -> Array:
        """``ln sum_i exp(x_i)`` per row, as ``jax.nn.logsumexp`` (``-inf`` for an empty row)."""
        top = self.max(x)
        shift = lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
        return jnp.log(self.sum(jnp.exp(x - shift[..., None]))) + shift

    def log_softmax(self, x: Array) -> Array:
        """``x - logsumexp(x)``, ``[..., V_local]``, as ``jax.nn.log_softmax``."""
        shifted = x - lax.stop_gradient(self.max(x))[..., None]
        return shifted - jnp.log(self.sum(jnp.exp(shifted)))[..., None]

    def argmax(self, x: Array) -> Array:
        """Global arg-max per row, lowest id on ties; ``V`` for a row of NaNs.

        A max and a min (XLA:CPU's variadic arg-max reduction is several times slower
        than two plain reductions).
        """
        top = self.max(x)  # [...]
        index = jnp.where(x == top[..., None], self.ids(), self.vocab_size)
        return self._pmin(jnp.min(index, axis=-1))

    def entropy(self, logq: Array) -> Array:
        """``H = -sum_i q_i ln q_i`` per row from log-probabilities (``0 ln 0 = 0``)."""
        q = jnp.exp(logq)
        return -self.sum(jnp.where(q > 0, q * logq, 0.0))

    def kth_largest(self, x: Array, k: Any, *, method: Any = "auto") -> Array:
        """:func:`kth_largest` over the whole (sharded) row."""
        return kth_largest(x, k, method=method, shard=self)

    def mass_threshold(self, scores: Array, weights: Array | None, p: Any, *,
                       method: Any = "auto") -> Array:
        """:func:`mass_threshold` over the whole (sharded) row."""
        return mass_threshold(scores, weights, p, method=method, shard=self)

    def top_value(self, x: Array, m: int, *, method: Any = "auto") -> Array:
        """The ``m``-th largest value (``m`` static); the max when ``m = 1``."""
        return self.max(x) if m == 1 else self.kth_largest(x, m, method=method)


def _shard_for(x: Array, shard: VocabShard | None, method: Any) -> tuple[VocabShard, Any]:
    """(the shard, the method to use): ``method="auto"`` defers to the shard's."""
    shard = VocabShard.whole(x.shape[-1]) if shard is None else shard
    return shard, shard.method if isinstance(method, str) and method == "auto" else method


# ----------------------------------------------------------------------------- keys


# ordered_keys, from_ordered_keys: :mod:`jaxsample._selection.radix` (re-exported here).


# ----------------------------------------------------------------------------- radix select


def _rev_cumsum(h: Array) -> Array:
    """Inclusive suffix sums along the last (small) axis."""
    return jnp.flip(jnp.cumsum(jnp.flip(h, -1), axis=-1), -1)


def _pick(hist: Array, above: Array, target: Array) -> tuple[Array, Array]:
    """Largest non-empty bucket ``d`` with ``above + sum(hist[d:]) >= target``.

    ``hist`` is ``[R, n]`` (bucket masses of the elements sharing the current prefix),
    ``above`` ``[R]`` the mass of the elements with a larger prefix. If rounding leaves
    no bucket passing, the smallest non-empty bucket is taken (everything is kept).
    Returns ``(d int32 [R], above + sum(hist[d+1:]))``.
    """
    iota = lax.broadcasted_iota(jnp.int32, hist.shape, 1)
    n = hist.shape[-1]
    incl = _rev_cumsum(hist)  # [R, n]
    excl = jnp.concatenate([incl[:, 1:], jnp.zeros_like(incl[:, :1])], axis=1)
    live = hist > 0
    ok = live & (above[:, None] + incl >= target[:, None])
    best = jnp.max(jnp.where(ok, iota, -1), axis=1)
    lowest = jnp.min(jnp.where(live, iota, n), axis=1)
    d = jnp.where(best >= 0, best, jnp.where(lowest < n, lowest, 0))
    rest = jnp.take_along_axis(excl, d[:, None], axis=1)[:, 0]
    return d, above + rest


def _pick_two_level(hist: Array, above: Array, target: Array) -> tuple[Array, Array]:
    """:func:`_pick` over ``2**b`` buckets as block sums, then one block (no big cumsum)."""
    rows, n = hist.shape
    if n <= 64:
        return _pick(hist, above, target)
    n_lo = 1 << ((n.bit_length() - 1) // 2)
    blocks = hist.reshape(rows, n // n_lo, n_lo)
    j, above_j = _pick(jnp.sum(blocks, axis=2), above, target)  # block, mass above it
    inner = jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0]  # [R, n_lo]
    l, above_l = _pick(inner, above_j, target)
    return j * n_lo + l, above_l


def _scatter_pass(keys, weights, target, prefix, above, shift, width, first):
    rows, vocab = keys.shape
    n = 1 << width
    digit = (lax.shift_right_logical(keys, _U32(shift)) & _U32(n - 1)).astype(jnp.int32)
    index = digit + (lax.broadcasted_iota(jnp.int32, keys.shape, 0) * n)  # [R, V]
    if not first:  # only the elements that share the digits chosen so far
        hi = shift + width
        same = lax.shift_right_logical(keys, _U32(hi)) == lax.shift_right_logical(
            prefix, _U32(hi))[:, None]
        index = jnp.where(same, index, rows * n)  # out of range: dropped
    if weights is None:
        updates = jnp.ones((), jnp.int32)
        hist = jnp.zeros((rows * n,), jnp.int32)
    else:
        updates = weights.reshape(-1)
        hist = jnp.zeros((rows * n,), weights.dtype)
    hist = hist.at[index.reshape(-1)].add(updates, mode="drop").reshape(rows, n)
    return _pick_two_level(hist, above, target)


def _compare_counts(keys, weights):
    """``count(prefix, shift, width)`` of the compare engine: ``[R, C, V]`` compare + sum."""

    def count(prefix, shift, width):
        digits = jnp.arange(1, 1 << width, dtype=_U32)  # [C]
        cand = prefix[:, None] | (digits << jnp.asarray(shift, _U32))[None, :]  # [R, C]
        above = keys[:, None, :] >= cand[:, :, None]  # [R, C, V]
        if weights is None:
            return jnp.sum(above, axis=2, dtype=jnp.int32)
        return jnp.sum(jnp.where(above, weights[:, None, :], 0), axis=2)

    return count


def _digit_search(count, target: Array, digits: tuple[int, ...], bits: int,
                  reduce=lambda m: m, rolled: bool = False) -> Array:
    """Largest ``T`` (digit-aligned) with ``mass(key >= T) >= target``: the one search.

    Builds ``T`` a digit at a time, most significant first. ``count(prefix, shift,
    width)`` returns the *local* masses ``[R, 2**width - 1]`` above the candidates
    ``prefix | c << shift`` (``c = 1, 2, ...``); ``reduce`` adds them up over the
    devices holding the rest of the row (identity for whole rows, a ``psum`` inside
    `shard_map`). The digit is the largest ``c`` whose mass reaches the target (0 if
    none: the mass is non-increasing in ``c``). In exact arithmetic ``T`` is the key of
    an element of the row; the callers snap it to one when the masses are rounded.
    One evaluation of ``count`` per digit: ``len(digits)`` passes over the row,
    unrolled (on a GPU a ``while`` loop reads its predicate back to the host every
    trip), or a ``fori_loop`` with a traced ``shift`` when ``rolled`` (the Pallas
    interpreter: one kernel to compile instead of one per digit).
    """
    def step(_, shift, width, prefix):
        mass = reduce(count(prefix, jnp.asarray(shift, _U32), width))  # [R, C]
        return _radix.extend(prefix, pick_digit(mass, target, width), shift)

    prefix = jnp.zeros_like(target, _U32)  # (inside shard_map: varies like the target)
    return _radix.digit_loop(step, digits, bits, prefix, rolled=rolled)


def _snap(keys: Array, prefix: Array, shard: VocabShard) -> Array:
    """The smallest key ``>= prefix`` of the row (``prefix`` itself if none): one pass.

    In exact arithmetic the search already ends on an element; this makes it so even
    when rounding made the per-candidate sums non-monotone.
    """
    full = _U32(0xFFFFFFFF)
    snapped = shard.min(jnp.where(keys >= prefix[:, None], keys, full))
    return jnp.where(snapped == full, prefix, snapped)


def radix_select(keys: Array, weights: Array | None, target: Array, *, bits: int = 32,
                 plan: Plan = CPU_PLAN) -> Array:
    """Largest key ``T`` (a key of the row) with ``sum(w_i : key_i >= T) >= target``.

    Args:
      keys: ``uint32 [R, V]`` order-preserving keys (:func:`ordered_keys`) with
        ``bits`` significant bits.
      weights: ``[R, V]`` non-negative weights, or ``None`` for counts (weight 1).
      target: ``[R]``; int32 for counts, the weights' dtype otherwise. Should be at
        most the row total; if it is not (float rounding), the smallest key with a
        positive weight is returned.
      bits: 32 or 16.
      plan: engine (``"scatter"`` or ``"compare"``; the kernel engine works on the
        scores themselves, see :func:`kth_largest`) and digit widths.

    Returns:
      ``uint32 [R]``.
    """
    rows = keys.shape[0]
    digits = plan.digits(bits)
    if plan.engine == "kernel":
        raise ValueError("radix_select: the kernel engine takes scores, not keys")
    if plan.engine == "compare":
        prefix = _digit_search(_compare_counts(keys, weights), target, digits, bits)
        return _snap(keys, prefix, VocabShard.whole(keys.shape[-1]))

    def step(i, shift, width, carry):  # one scatter-add histogram of the digit
        prefix, above = carry
        d, above = _scatter_pass(keys, weights, target, prefix, above, shift, width, first=i == 0)
        return _radix.extend(prefix, d, shift), above

    start = (jnp.zeros((rows,), _U32), jnp.zeros((rows,), target.dtype))
    return _radix.digit_loop(step, digits, bits, start)[0]


def _search(s: Array, weights: Array | None, target: Array, plan: Plan, shard: VocabShard,
            *, softmax_max: Array | None = None, snap: bool = True) -> Array:
    """The threshold value (``s.dtype``) for rows ``s [R, V_local]``: the largest element
    ``t`` with ``mass(s >= t) >= target``, mass = counts (``weights=None``, no
    ``softmax_max``), softmax weights ``exp(s - softmax_max)``, or ``weights``.

    Scatter (whole rows only) and compare work on materialised keys; the kernel engine
    reads the scores themselves once per digit.
    """
    keys = ordered_keys(s)
    bits = _radix.key_bits(s.dtype)
    if plan.engine == "kernel":
        mode = "count" if weights is None and softmax_max is None else (
            "softmax" if weights is None else "weights")
        count = functools.partial(_kernel_counts, s, softmax_max, weights, mode, plan.interpret)
    else:
        if softmax_max is not None:
            weights = jnp.exp(s.astype(_F32) - softmax_max[:, None])
        if plan.engine == "scatter":
            if shard.axis is not None:
                raise ValueError("the scatter engine needs whole rows")
            return from_ordered_keys(radix_select(keys, weights, target, bits=bits, plan=plan),
                                     s.dtype)
        count = _compare_counts(keys, weights)
    prefix = _digit_search(count, target, plan.digits(bits), bits, shard._psum,
                           rolled=plan.engine == "kernel" and plan.interpret)
    if snap:
        prefix = _snap(keys, prefix, shard)
    return from_ordered_keys(prefix, s.dtype)


def _kernel_counts(s, softmax_max, weights, mode, interpret, prefix, shift, width):
    return _kernels.count_above(s, prefix, shift, softmax_max, weights, width=width,
                                mode=mode, interpret=interpret)


# ----------------------------------------------------------------------------- kth_largest


def _rows(x: Array) -> Array:
    return x.reshape(-1, x.shape[-1])


def _top_k(x: Array, k: int) -> tuple[Array, Array]:
    """``lax.top_k`` in float32 (exact for 16-bit inputs), kept a top-k on XLA:CPU.

    XLA:CPU rewrites ``sort + slice [:k]`` into its fast TopK, but a top-k whose only
    use is one column (``values[..., k - 1]``) is simplified back into a full sort of
    the row (~100x slower); the optimisation barrier on the outputs prevents that.
    (bfloat16 top-k is slow there too, hence float32.)
    """
    return lax.optimization_barrier(lax.top_k(x.astype(_F32), k))


def kth_largest(x: jax.Array, k, *, method: Any = "auto",
                shard: VocabShard | None = None) -> jax.Array:
    """The ``k``-th largest value of each row (1-based, duplicates counted).

    Math: ``kth_largest(x, k) = max{t in x : #{i : x_i >= t} >= k}``, with ``k``
    clamped to ``[1, V]``. ``x >= kth_largest(x, k)`` keeps at least ``k`` entries,
    more when there are ties at the boundary.

    Args:
      x: ``[..., V]`` float array (``-inf`` allowed; NaN rows give no guarantee).
      k: a static Python ``int`` or an integer array broadcastable to
        ``x.shape[:-1]`` (traced: any per-row value, no static cap).
      method: ``"auto"`` (sort-free: the backend's :func:`default_plan`), ``"radix"``
        (radix select only), ``"sort"`` (the full-sort reference) or a :class:`Plan`.
      shard: the rows are the local slices ``[..., V_local]`` of a vocabulary split
        over ``shard.axis`` (inside `shard_map`); None: whole rows.

    Returns:
      ``[...]`` array of ``x.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> kth_largest(jnp.array([1.0, 3.0, 3.0, 2.0]), 2)
      Array(3., dtype=float32)
      >>> kth_largest(jnp.array([[1.0, 3.0, 3.0, 2.0]]), jnp.array([4]))
      Array([1.], dtype=float32)
    """
    x = jnp.asarray(x)
    shard, method = _shard_for(x, shard, method)
    vocab = shard.vocab_size
    plan = _resolve(method, vocab, sharded=shard.axis is not None)
    batch = x.shape[:-1]
    try:
        k_static = operator.index(k)
    except TypeError:
        k_static = None
    if plan is None:
        return _kth_largest_sort(x, k, k_static)
    if k_static is not None:
        k_static = min(max(k_static, 1), vocab)
        if k_static <= plan.top_k_static_max:
            values, _ = _top_k(x, k_static)  # [..., k]
            return values[..., k_static - 1].astype(x.dtype)
        k = k_static
    k = jnp.clip(jnp.broadcast_to(jnp.asarray(k).astype(jnp.int32), batch), 1, vocab)
    flat_x, flat_k = _rows(x), k.reshape(-1)

    def radix(_):
        return _search(flat_x, None, flat_k, plan, shard, snap=False)

    window = min(plan.window, vocab)
    if window == 0 or (k_static is not None and k_static > window):
        return radix(None).reshape(batch)

    def from_window(_):
        values, _ = _top_k(flat_x, window)  # [R, W]
        index = jnp.minimum(flat_k, window)[:, None] - 1
        return jnp.take_along_axis(values, index, axis=1)[:, 0].astype(x.dtype)

    out = lax.cond(jnp.any(flat_k > window), radix, from_window, None)
    return out.reshape(batch)


def _kth_largest_sort(x: Array, k: Any, k_static: int | None) -> Array:
    """The reference: ``lax.top_k`` for a static ``k``, a full sort for a traced one."""
    vocab = x.shape[-1]
    if k_static is not None:
        k_static = min(max(k_static, 1), vocab)
        values, _ = lax.top_k(x, k_static)  # [..., k]
        return values[..., k_static - 1]
    ascending = jnp.sort(x, axis=-1)  # [..., V]
    k = jnp.clip(jnp.asarray(k).astype(jnp.int32), 1, vocab)  # [...]
    index = jnp.broadcast_to(vocab - k, x.shape[:-1])[..., None]  # [..., 1]
    return jnp.take_along_axis(ascending, index, axis=-1)[..., 0]


# ----------------------------------------------------------------------------- mass_threshold


def mass_threshold(scores: jax.Array, weights: jax.Array | None, p, *,
                   method: Any = "auto", shard: VocabShard | None = None) -> jax.Array:
    """Largest score whose upper set holds at least a fraction ``p`` of the mass.

    Math: with ``W = sum_i w_i``,
    ``t = max{s in scores : sum(w_i : s_i >= s) >= p * W}`` and ``t = -inf`` where
    ``p >= 1`` (so ``p = 1`` keeps everything even when fp32 rounding makes the
    running mass reach ``W`` early). Equivalently: sort by score descending, let ``m``
    be the first position where the running mass reaches ``p * W``, ``t = s[m]``;
    all ties with ``s[m]`` are inside ``scores >= t``. A row with no finite score
    (``weights=None``) gives ``-inf``.

    Nucleus (top-p) uses ``scores = logits`` with the default softmax weights; locally
    typical sampling uses ``scores = -|surprisal - entropy|, weights = q``.

    Args:
      scores: ``[..., V]`` float array; higher scores enter the set first.
      weights: ``[..., V]`` non-negative float array (unnormalised is fine), or
        ``None`` for ``exp(scores - max(scores))``, the softmax mass of logits.
      p: fraction in ``(0, 1]``, scalar or broadcastable to ``scores.shape[:-1]``.
      method: ``"auto"`` (sort-free: the backend's :func:`default_plan`), ``"radix"``,
        ``"sort"`` (the full-sort reference) or a :class:`Plan`.
      shard: the rows are the local slices ``[..., V_local]`` of a vocabulary split
        over ``shard.axis`` (inside `shard_map`); None: whole rows.

    Returns:
      ``[...]`` threshold, same dtype as ``scores``.

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([3.5, 3.0, 2.0, 1.0])
      >>> w = jnp.array([0.5, 0.3, 0.15, 0.05])
      >>> mass_threshold(s, w, 0.7)
      Array(3., dtype=float32)
      >>> mass_threshold(jnp.log(w), None, 0.9)  # softmax weights: the same masses
      Array(-1.89712, dtype=float32)
    """
    scores = jnp.asarray(scores)
    shard, method = _shard_for(scores, shard, method)
    plan = _resolve(method, shard.vocab_size, sharded=shard.axis is not None)
    if plan is None:
        return _mass_threshold_sort(scores, weights, p)
    batch, vocab = scores.shape[:-1], scores.shape[-1]
    s = _rows(scores)  # [R, V], scores' dtype
    s32 = s.astype(_F32)
    top = shard.max(s32)  # [R]
    if weights is None:  # softmax mass: exp(s - top), the arg-max has weight 1
        w = None
        total = shard.sum(jnp.exp(s32 - top[:, None]))
    else:
        w = _rows(jnp.broadcast_to(jnp.asarray(weights), scores.shape)).astype(_F32)
        total = shard.sum(w)  # [R]
    p = jnp.broadcast_to(jnp.asarray(p, _F32), batch).reshape(-1)
    target = p * total
    # Rows that need a search: p < 1 and a positive finite total.
    active = (p < 1) & (total > 0) & (total < jnp.inf)

    def radix(_):
        t = jnp.where(active, target, 0)
        return _search(s, None if weights is None else w, t, plan, shard,
                       softmax_max=top if weights is None else None)

    window = min(plan.window, vocab)
    if window == 0:
        t = radix(None)
    else:
        w_max = None
        if w is None:
            w, w_max = jnp.exp(s32 - top[:, None]), jnp.ones_like(top)

        def from_window(_):
            values, index = _top_k(s32, window)  # [R, W], descending
            if weights is None:
                w_top = jnp.exp(values - top[:, None])
            else:
                w_top = jnp.take_along_axis(w, index, axis=1)
            cum = jnp.cumsum(w_top, axis=1)
            m = jnp.minimum(jnp.sum(cum < target[:, None], axis=1), window - 1)
            t = jnp.take_along_axis(values, m[:, None], axis=1)[:, 0].astype(s.dtype)
            return t, cum[:, -1] >= target  # (threshold, decided by the window)

        def skip_window(_):
            return jnp.zeros(top.shape, s.dtype), jnp.zeros(top.shape, bool)

        if w_max is None:
            w_max = jnp.max(w, axis=1)
        # The window cannot reach the target if even `window` copies of the largest
        # weight fall short: then skip lax.top_k and search directly.
        hopeless = active & (window * w_max < target)
        t, decided = lax.cond(jnp.any(hopeless), skip_window, from_window, None)
        t = lax.cond(jnp.any(active & ~decided), radix, lambda _: t, None)
    neg_inf = jnp.array(-jnp.inf, s.dtype)
    top_s = top.astype(s.dtype)
    t = jnp.where(active, t, jnp.where(total == 0, top_s, neg_inf))
    t = jnp.where(p >= 1, neg_inf, t)
    return t.reshape(batch)


def _mass_threshold_sort(scores: Array, weights: Array | None, p: Any) -> Array:
    """The reference: one full sort, a running sum, the first position reaching p."""
    vocab = scores.shape[-1]
    if weights is None:
        # Softmax mass of the scores themselves: one sort, weights from sorted values.
        neg_sorted = jnp.sort(-scores, axis=-1)  # [..., V] scores descending, negated
        w_sorted = jnp.exp(-neg_sorted - jnp.max(scores, axis=-1, keepdims=True))
    else:
        # Sort descending by score, carrying the weights along: [..., V] each.
        weights = jnp.broadcast_to(jnp.asarray(weights), scores.shape)
        neg_sorted, w_sorted = lax.sort((-scores, weights), dimension=-1, num_keys=1)
    cum = jnp.cumsum(w_sorted, axis=-1)  # [..., V]
    p = jnp.asarray(p, dtype=cum.dtype)  # [...] or scalar
    target = p[..., None] * cum[..., -1:]  # [..., 1]
    m = jnp.sum(cum < target, axis=-1, dtype=jnp.int32)  # [...] first position reaching
    m = jnp.minimum(m, vocab - 1)
    t = -jnp.take_along_axis(neg_sorted, m[..., None], axis=-1)[..., 0]  # [...]
    return jnp.where(p >= 1, jnp.array(-jnp.inf, t.dtype), t)
