"""Pallas kernels for the accelerator sampling path (Triton lowering on GPU).

* :func:`count_above`: for every row and each of the ``2**width - 1`` candidate
  thresholds of one radix digit, the mass of the row's elements whose order-preserving
  key is ``>=`` the candidate. It reads the logits once, computes the keys (and the
  softmax weights) on chip, and writes ``[R, blocks, 2**width]`` partial sums, which
  the caller adds up (and, on vocab-sharded rows, ``psum``-s over the model axis). The
  search that drives it (:func:`jaxsample._selection.select._digit_search`, on the
  digit loop of :mod:`jaxsample._selection.radix`) is the same for whole rows and for
  shards: the filters' GPU engine.
* The fused sampling step's kernels (`jaxsample._step.fused`): :func:`row_stats` (one read:
  the raw log-softmax, the scaled max and total, the arg-max, bad entries),
  :func:`chained_pass` (one digit of the same search, which also finishes the
  previous digit on chip, so a search is one launch per digit; temperature, a floor
  key and per-row skipping on chip) and :func:`segment_masses` (the kept mass of every
  256-token segment, for the draw).

Why a kernel: on a GPU, XLA evaluates "mass above 15 candidates" as a ``[R, 15, V]``
compare-and-reduce that costs 4-5 reads of the logits (the peers' published costs, docs/benchmarks.md), while a
program that holds a block of the row in registers evaluates the 15 candidates for the
price of one read. Rows are split over programs along the vocabulary (grid
``[R, ceil(V / block)]``), so a batch of one still fills the GPU.

Keys: those of :mod:`jaxsample._selection.radix` (:func:`~jaxsample._selection.radix.
ordered_keys` of the float32 values the kernel loads, with the width of
:func:`~jaxsample._selection.radix.key_bits`: 16 bits for bfloat16 and float16 logits,
32 for every other dtype), computed on chip. Weights:
``"count"`` (1 per element: top-k), ``"softmax"`` (``exp(x - row_max)``, top-p) or
``"weights"`` (a second ``[R, V]`` input). A column past ``V`` (the last, partial
block) weighs 0, whatever the padding holds.

On a CPU the kernels run with ``interpret=True`` (the tests do, against the sort
reference and the unfused step); ``jax.export`` for ``platforms=["cuda"]`` runs the
real Triton lowering.

The kernel switch (`jaxsample.use_kernels`, ``JAXSAMPLE_KERNELS``; docs/kernels.md)
decides whether the sampling path calls these kernels at all; a kernel that fails while
it is traced raises :class:`jaxsample.KernelError`, whose message names the switch (and
so does the self-check of :func:`jaxsample._selection.select.kernel_self_check`, which a
GPU runs before it first uses them).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax

from jaxsample._selection import radix as _radix
from jaxsample._selection import switch as _switch
from jaxsample._selection.radix import key_bits

__all__ = ["count_above", "row_stats", "chained_pass", "pass_masses", "segment_masses", "key_bits",
           "MAX_WIDTH", "SEGMENT"]

Array = jax.Array

_F32 = jnp.float32
_U32 = jnp.uint32
#: Widest digit a pass may take (2**width - 1 candidates, unrolled in the kernel).
MAX_WIDTH = 4
#: Lanes (candidates) per program and pass.
LANES = _LANES = 1 << MAX_WIDTH


def _block_size(rows: int, vocab: int) -> int:
    """Columns per program: a power of two in [512, 8192], aiming at >= 512 programs
    (a few per SM) so that a batch of one still fills the GPU."""
    block = 8192
    while block > 512 and rows * -(-vocab // block) < 512:
        block //= 2
    return block


def _load_row(ref, in_row):
    """A ``(1, block)`` block of a ``[R, V]`` input as float32, reading only the columns
    inside the row (the last block may hang past ``V``; the Triton lowering of
    ``ref[...]`` would read past the buffer there). What lies outside is 0."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.load(ref, mask=in_row, other=0).astype(_F32)


def _scores(x, scale_ref, dtype):
    """The kernel's float32 view of a block of scores ``x`` (float32 values of
    ``dtype``): ``x``, or with a per-row ``scale`` (an inverse temperature) ``x * scale``
    rounded to ``dtype``. A product, not a quotient: IEEE multiplication rounds the
    same in every backend (Triton, XLA, the interpreter), so the kernels and the XLA
    code around them agree on every scaled value bit for bit."""
    if scale_ref is None:
        return x
    x = x * scale_ref[...]
    return x if dtype == _F32 else x.astype(dtype).astype(_F32)


def _keys(x, dtype):
    """Order-preserving keys (uint32) of the float32 values ``x`` of ``dtype``."""
    return _radix.ordered_keys(x, dtype)


def _from_keys(key, dtype):
    """The float32 value of a key of ``dtype`` (the inverse of :func:`_keys`; ``-0.0``
    comes back as ``+0.0``, a NaN as a NaN).

    ``exp(_from_keys(key) - stat)`` rather than ``exp(s - stat)`` for a scaled ``s``:
    the compiler cannot see through the round trip, so it cannot contract the product
    ``x * scale`` and the subtraction into one fused multiply-add, which would
    subtract the *unrounded* product (for large logits far more than a rounding error,
    e.g. ``exp(+1e22)`` at logits of ``-1e30``).
    """
    return _radix.key_value(key, dtype)


def _columns(block, vocab, shape):
    """(global column ``int32``, ``column < vocab``) of the current block."""
    from jax.experimental import pallas as pl

    col = pl.program_id(1) * block + lax.broadcasted_iota(jnp.int32, shape, 1)
    return col, col < vocab


def _gated(out_ref, active_ref, compute):
    """Writes ``compute()`` to ``out_ref``, or zeros without reading anything when the
    row is inactive (``active_ref`` is ``None``: always active). Two exclusive branches:
    each output element is stored once."""
    from jax.experimental import pallas as pl

    if active_ref is None:
        out_ref[...] = compute()
        return
    active = active_ref[0, 0] != 0

    @pl.when(active)
    def _():
        out_ref[...] = compute()

    @pl.when(jnp.logical_not(active))
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)


def _count_kernel(*refs, width, vocab, block, mode):
    if mode == "weights":
        x_ref, prefix_ref, shift_ref, stat_ref, w_ref, out_ref = refs
    else:
        (x_ref, prefix_ref, shift_ref, stat_ref, out_ref), w_ref = refs, None
    _, in_row = _columns(block, vocab, (1, block))
    x = _load_row(x_ref, in_row)  # [1, block]
    key = _keys(x, x_ref.dtype)
    w = _weights(x, key, in_row, dtype=x_ref.dtype, mode=mode, stat_ref=stat_ref, scaled=False,
                 floor_ref=None, w_ref=w_ref)
    out_ref[...] = _candidate_masses(key, w, prefix_ref[...], shift_ref[...], width)


def _weights(x, key, in_row, *, dtype, mode, stat_ref, scaled, floor_ref, w_ref=None):
    """Each element's weight (0 outside the row and below the floor)."""
    if mode == "count":
        w = jnp.ones_like(x)
    elif mode == "softmax":  # stat: the row max
        w = jnp.exp((_from_keys(key, dtype) if scaled else x) - stat_ref[...])
    else:
        w = _load_row(w_ref, in_row)
    valid = in_row
    if floor_ref is not None:  # only the elements at or above the floor count
        valid = valid & (key >= floor_ref[...])
    return jnp.where(valid, w, 0.0)


def _candidate_masses(key, w, prefix, shift, width):
    """``(1, 16)``: lane ``c`` holds the mass of ``key >= prefix | c << shift`` (lane 0:
    above the prefix itself; lanes past ``2**width - 1`` hold 0)."""
    lane = lax.broadcasted_iota(jnp.int32, (1, _LANES), 1)
    out = jnp.zeros((1, _LANES), _F32)
    for c in range(1 << width):  # static: one masked sum per candidate
        above = key >= (prefix | lax.shift_left(_U32(c), shift))
        out = jnp.where(lane == c, jnp.sum(jnp.where(above, w, 0.0), axis=1, keepdims=True), out)
    return out


def _out_shape(shape: tuple[int, ...], like: Array) -> jax.ShapeDtypeStruct:
    """float32 ``shape`` varying over the same manual mesh axes as ``like`` (inside
    `shard_map` with ``check_vma``, Pallas needs to be told; outside it is empty)."""
    aval = jax.typeof(like) if hasattr(jax, "typeof") else None
    accepted = inspect.signature(jax.ShapeDtypeStruct).parameters
    # The field's name moved between jax versions: manual_axis_type (0.10), vma (earlier).
    for attr, keyword in (("mat", "manual_axis_type"), ("vma", "vma")):
        value = getattr(aval, attr, None)
        if value is not None and keyword in accepted:
            return jax.ShapeDtypeStruct(shape, _F32, **{keyword: value})
    return jax.ShapeDtypeStruct(shape, _F32)


def _per_row(value: Array, dtype) -> Array:
    """A ``[R]`` per-row value as the ``[R, 1]`` input a ``(1, 1)`` block reads."""
    return value.astype(dtype)[:, None]


def _launch(kernel, x: Array, per_row: list[Array], row_inputs: list[Array], lanes: int,
            block: int, interpret: bool) -> Array:
    """``kernel`` over the grid ``[R, ceil(V / block)]``: ``x`` and ``row_inputs`` in
    ``(1, block)`` blocks, each of ``per_row`` (``[R, 1]``) as a ``(1, 1)`` block;
    returns the ``float32 [R, blocks * lanes]`` of the programs' ``(1, lanes)`` outputs."""
    from jax.experimental import pallas as pl

    rows, vocab = x.shape
    blocks = -(-vocab // block)
    row_block = pl.BlockSpec((1, block), lambda i, j: (i, j))
    one = pl.BlockSpec((1, 1), lambda i, j: (i, 0))
    return _call(
        kernel, (x, *per_row, *row_inputs), grid=(rows, blocks),
        in_specs=[row_block] + [one] * len(per_row) + [row_block] * len(row_inputs),
        out_specs=pl.BlockSpec((1, lanes), lambda i, j: (i, j)),
        out_shape=_out_shape((rows, blocks * lanes), x),
        interpret=interpret, **_params(block, interpret))


def _call(kernel, args, **params):
    """``pl.pallas_call(kernel, **params)(*args)``; a failure raises
    :class:`jaxsample.KernelError` naming the kernel switch."""
    from jax.experimental import pallas as pl

    name = getattr(getattr(kernel, "func", kernel), "__name__", "kernel").strip("_")
    try:
        return pl.pallas_call(kernel, **params)(*args)
    except Exception as error:  # noqa: BLE001 (whatever Pallas raised, with the way out)
        raise _switch.KernelError(
            f"jaxsample's Pallas kernel {name} failed ({type(error).__name__}: {error}); "
            f"{_switch.HINT}") from error


def _params(block: int, interpret: bool) -> dict:
    """``pallas_call`` keywords: the Triton lowering (not Mosaic GPU, jax 0.10's default
    for pallas_call), 8 warps on the wide blocks (at most 16-32 elements per thread in
    registers)."""
    if interpret:
        return {}
    from jax.experimental.pallas import triton as pltriton

    params_type = getattr(pltriton, "CompilerParams", None) or pltriton.TritonCompilerParams
    return {"compiler_params": params_type(num_warps=8 if block >= 4096 else 4, num_stages=2)}


def count_above(x: Array, prefix: Array, shift: Array | int, stat: Array | None,
                weights: Array | None, *, width: int, mode: str,
                interpret: bool = False) -> Array:
    """Mass of ``key >= prefix | (c << shift)`` for ``c = 1 .. 2**width - 1``, per row.

    Args:
      x: ``[R, V]`` float scores (keys as :func:`key_bits`).
      prefix: ``uint32 [R]``, the digits decided so far (zero below ``shift + width``).
      shift: the digit's position (an int or a traced scalar: one kernel serves every
        digit).
      stat: ``float32 [R]``, the row max for ``mode="softmax"`` (ignored otherwise).
      weights: ``[R, V]`` weights for ``mode="weights"``, else None.
      width: the digit's width (static; ``width <= MAX_WIDTH``).
      mode: ``"count"``, ``"softmax"`` or ``"weights"``.
      interpret: run the kernel in the Pallas interpreter (CPU, tests).

    Returns:
      ``float32 [R, 2**width - 1]``: column ``c - 1`` holds the mass above candidate
      ``c``; for ``"count"`` exact integers as ``int32`` (up to 2**24 per block).
    """
    rows, vocab = x.shape
    block = _block_size(rows, vocab)
    kernel = functools.partial(_count_kernel, width=width, vocab=vocab, block=block, mode=mode)
    stat = jnp.zeros((rows,), _F32) if stat is None else stat
    shift = jnp.broadcast_to(jnp.asarray(shift, _U32), (rows,))
    per_row = [_per_row(prefix, _U32), _per_row(shift, _U32), _per_row(stat, _F32)]
    row_inputs = [weights] if mode == "weights" else []
    partial = _launch(kernel, x, per_row, row_inputs, _LANES, block, interpret)  # [R, blocks * 16]
    return pass_masses(partial, partial.shape[1], width=width, mode=mode)


# ----------------------------------------------------------------------------- fused step

#: Lanes of :func:`row_stats`: raw max, raw sum of exp, scaled max, arg-max, bad count,
#: scaled sum of exp.
_STATS = 8


def _stats_kernel(x_ref, scale_ref, out_ref, *, vocab, block):
    col, valid = _columns(block, vocab, (1, block))
    raw = _load_row(x_ref, valid)  # [1, block]
    bad = jnp.isnan(raw) | (raw == jnp.inf)
    ok = valid & ~bad
    neg_inf = jnp.float32(-jnp.inf)

    def max_and_sum(x):
        x = jnp.where(ok, x, neg_inf)
        top = jnp.max(x, axis=1, keepdims=True)  # [1, 1]
        safe = jnp.where(top > neg_inf, top, 0.0)
        return x, top, jnp.sum(jnp.exp(x - safe), axis=1, keepdims=True)

    x0, m0, s0 = max_and_sum(raw)
    # The scaled scores, through their keys (see _from_keys: no fused multiply-add).
    dtype = x_ref.dtype
    _, m1, s1 = max_and_sum(_from_keys(_keys(_scores(raw, scale_ref, dtype), dtype), dtype))
    arg = jnp.min(jnp.where(ok & (x0 == m0), col, vocab), axis=1, keepdims=True)
    n_bad = jnp.sum(jnp.where(valid & bad, 1.0, 0.0), axis=1, keepdims=True)
    lane = lax.broadcasted_iota(jnp.int32, (1, _STATS), 1)
    out = jnp.zeros((1, _STATS), _F32)
    for c, value in enumerate((m0, s0, m1, arg.astype(_F32), n_bad, s1)):
        out = jnp.where(lane == c, value, out)
    out_ref[...] = out


def row_stats(x: Array, scale: Array, *, interpret: bool = False) -> dict[str, Array]:
    """One read of ``x [R, V]``: what a sampling step needs about each row.

    Returns a dict of ``[R]`` arrays: ``max`` and ``sum_exp`` (``sum exp(x - max)``) of
    the raw scores (their log-softmax), ``scaled_max`` and ``scaled_sum_exp`` (the same
    for ``x * scale`` rounded to ``x.dtype``), ``argmax`` (lowest index on ties, int32) and ``bad`` (the number of
    NaN and ``+inf`` entries, int32). NaN and ``+inf`` entries are left out of the
    max, the sum and the arg-max.
    """
    rows, vocab = x.shape
    block = _block_size(rows, vocab)
    kernel = functools.partial(_stats_kernel, vocab=vocab, block=block)
    part = _launch(kernel, x, [_per_row(scale, _F32)], [], _STATS, block, interpret)
    part = part.reshape(rows, -1, _STATS)  # [R, blocks, lanes]
    def combine(block_max, block_sum):  # block sums are relative to the block max
        top = jnp.max(block_max, axis=1)
        safe = jnp.where(top > -jnp.inf, top, 0.0)
        return top, jnp.sum(jnp.where(block_max > -jnp.inf,
                                      block_sum * jnp.exp(block_max - safe[:, None]), 0.0), axis=1)

    m0, s0 = combine(part[:, :, 0], part[:, :, 1])
    m1, s1 = combine(part[:, :, 2], part[:, :, 5])
    arg = jnp.min(jnp.where(part[:, :, 0] == m0[:, None], part[:, :, 3], vocab), axis=1)
    return {"max": m0, "sum_exp": s0, "scaled_max": m1, "scaled_sum_exp": s1,
            "argmax": arg.astype(jnp.int32), "bad": jnp.sum(part[:, :, 4], axis=1).astype(jnp.int32)}


#: Tokens per segment of :func:`segment_masses` (the sampler's inverse-CDF block).
SEGMENT = 256


def _masses_kernel(x_ref, scale_ref, stat_ref, floor_ref, t_min_ref, out_ref, *, vocab, block):
    _, valid = _columns(block, vocab, (1, block))
    x = _scores(_load_row(x_ref, valid), scale_ref, x_ref.dtype)  # [1, block]
    key = _keys(x, x_ref.dtype)
    keep = valid & (key >= floor_ref[...]) & (x >= t_min_ref[...])
    e = jnp.where(keep, jnp.exp(_from_keys(key, x_ref.dtype) - stat_ref[...]), 0.0)
    segments = block // SEGMENT
    out_ref[...] = jnp.sum(e.reshape(segments, SEGMENT), axis=1).reshape(1, segments)


def segment_masses(x: Array, scale: Array, stat: Array, floor: Array, t_min: Array, *,
                   interpret: bool = False) -> Array:
    """Softmax mass of the kept tokens per segment of :data:`SEGMENT` tokens: one read.

    Token ``i`` of row ``r`` weighs ``exp(s_i - stat_r)`` where ``s = x * scale``
    (rounded to ``x.dtype``) if it is kept, ``key(s_i) >= floor_r`` and
    ``s_i >= t_min_r``, else 0 (as does every column past ``V``).

    Returns:
      ``float32 [R, ceil(V / SEGMENT)]``.
    """
    rows, vocab = x.shape
    block = max(_block_size(rows, vocab), SEGMENT)
    kernel = functools.partial(_masses_kernel, vocab=vocab, block=block)
    per_row = [_per_row(scale, _F32), _per_row(stat, _F32), _per_row(floor, _U32),
               _per_row(t_min, _F32)]
    part = _launch(kernel, x, per_row, [], block // SEGMENT, block, interpret)
    return part[:, :-(-vocab // SEGMENT)]


# ----------------------------------------------------------------------------- chained passes


def _chained_kernel(x_ref, prefix_ref, prev_shift_ref, shift_ref, target_ref, stat_ref, scale_ref,
                    floor_ref, active_ref, prev_ref, out_ref, prefix_out_ref, *, width, prev_width,
                    vocab, block, mode, prev_lanes):
    from jax.experimental.pallas import triton as pltriton

    _, in_row = _columns(block, vocab, (1, block))
    # The previous pass's digit, from its partial masses over every block of the row.
    lanes = prev_ref.shape[1]
    lane = lax.broadcasted_iota(jnp.int32, (1, lanes), 1)
    part = pltriton.load(prev_ref, mask=lane < prev_lanes, other=0).reshape(lanes // _LANES, _LANES)
    if mode == "count":  # exact: integers per block, summed as integers
        mass = jnp.sum(part.astype(jnp.int32), axis=0, keepdims=True)  # [1, 16]
    else:
        mass = jnp.sum(part, axis=0, keepdims=True)
    # radix.pick_digit, on the 16 lanes (lane c: the mass above candidate c)
    c = lax.broadcasted_iota(jnp.int32, (1, _LANES), 1)
    ok = (mass >= target_ref[...]) & (c >= 1) & (c < (1 << prev_width))
    d = jnp.max(jnp.where(ok, c, 0), axis=1, keepdims=True)  # [1, 1]
    prefix = _radix.extend(prefix_ref[...], d, prev_shift_ref[...])
    prefix_out_ref[...] = prefix  # (every program of the row writes the same value)

    def compute():
        x = _scores(_load_row(x_ref, in_row), scale_ref, x_ref.dtype)  # [1, block]
        key = _keys(x, x_ref.dtype)
        w = _weights(x, key, in_row, dtype=x_ref.dtype, mode=mode, stat_ref=stat_ref,
                     scaled=True, floor_ref=floor_ref)
        return _candidate_masses(key, w, prefix, shift_ref[...], width)

    _gated(out_ref, active_ref, compute)


def chained_pass(x: Array, previous: Array, prefix: Array, prev_shift: Array | int,
                 shift: Array | int, target: Array, *, width: int, prev_width: int, mode: str,
                 stat: Array, scale: Array, floor: Array, active: Array,
                 interpret: bool = False) -> tuple[Array, Array]:
    """One digit pass that also finishes the previous one on chip (no XLA step between).

    Every program reads the previous pass's partial masses of its row (``previous``,
    as returned here: 16 per block, :func:`pass_lanes` in all; zeros before the first
    pass), adds them up (``pass_lanes`` floats from L2 per program), picks the previous digit (the largest ``c`` whose mass reaches
    ``target``), extends ``prefix`` with it at ``prev_shift``, and then counts the
    masses above the ``2**width - 1`` candidates of the digit at ``shift``: one step of
    the digit loop of `jaxsample._selection.radix`, one launch per digit.

    Args:
      x: ``[R, V]`` scores; ``scale`` (``[R]``) multiplies them on chip (rounded to
        ``x.dtype``), ``stat`` (``[R]``) is their max (softmax weights).
      previous: ``float32 [R, P]`` partial masses of the previous pass.
      prefix: ``uint32 [R]``: what the previous pass counted above.
      target: ``[R]``: int32 counts (``mode="count"``) or float32 mass.
      floor, active: as :func:`count_above`; an inactive row's partials are 0.

    Returns:
      ``(partials float32 [R, P'], prefix uint32 [R])``: this pass's partial masses
      (``P'`` a power of two; lanes past ``16 * blocks`` are unspecified) and the
      prefix it counted above.
    """
    from jax.experimental import pallas as pl

    rows, vocab = x.shape
    block = _block_size(rows, vocab)
    blocks = -(-vocab // block)
    lanes = pass_lanes(rows, vocab)
    if previous.shape != (rows, lanes):
        raise ValueError(f"chained_pass: previous must be [{rows}, {lanes}], got {previous.shape}")
    kernel = functools.partial(_chained_kernel, width=width, prev_width=prev_width, vocab=vocab,
                               block=block, mode=mode,
                               prev_lanes=_LANES * blocks)
    target_dtype = jnp.int32 if mode == "count" else _F32
    per_row = [_per_row(prefix, _U32),
               _per_row(jnp.broadcast_to(jnp.asarray(prev_shift, _U32), (rows,)), _U32),
               _per_row(jnp.broadcast_to(jnp.asarray(shift, _U32), (rows,)), _U32),
               _per_row(target, target_dtype), _per_row(stat, _F32), _per_row(scale, _F32),
               _per_row(floor, _U32), _per_row(active, jnp.int32)]
    one = pl.BlockSpec((1, 1), lambda i, j: (i, 0))
    partials, prefix = _call(
        kernel, (x, *per_row, previous), grid=(rows, blocks),
        in_specs=[pl.BlockSpec((1, block), lambda i, j: (i, j))] + [one] * len(per_row)
        + [pl.BlockSpec((1, lanes), lambda i, j: (i, 0))],
        out_specs=[pl.BlockSpec((1, _LANES), lambda i, j: (i, j)), one],
        out_shape=[_out_shape((rows, lanes), x),
                   jax.ShapeDtypeStruct((rows, 1), _U32)],
        interpret=interpret, **_params(block, interpret))
    return partials, prefix[:, 0]


def pass_masses(partials: Array, blocks_lanes: int, *, width: int, mode: str) -> Array:
    """A pass's masses above its candidates from its partials ``[R, P]`` (the first
    ``blocks_lanes`` lanes), in XLA: ``[R, 2**width - 1]`` (int32 for counts)."""
    part = partials[:, :blocks_lanes].reshape(partials.shape[0], -1, _LANES)[:, :, 1:1 << width]
    return jnp.sum(part.astype(jnp.int32), axis=1) if mode == "count" else jnp.sum(part, axis=1)


def pass_lanes(rows: int, vocab: int) -> int:
    """Lanes of :func:`chained_pass`'s partials: a power of two ``>= 16 * blocks``."""
    return _LANES * (1 << (-(-vocab // _block_size(rows, vocab)) - 1).bit_length())


def block_lanes(rows: int, vocab: int) -> int:
    """``16 * blocks``: the meaningful lanes of a pass's partials for ``[rows, vocab]``."""
    return _LANES * -(-vocab // _block_size(rows, vocab))
