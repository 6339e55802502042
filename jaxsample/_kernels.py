"""Pallas kernels for the accelerator selection path (Triton lowering on GPU).

One kernel, :func:`count_above`: for every row and each of the ``2**width - 1``
candidate thresholds of one radix digit, the mass of the row's elements whose
order-preserving key is ``>=`` the candidate. It reads the logits once, computes the
keys (and the softmax weights) on chip, and writes ``[R, blocks, 2**width]`` partial
sums, which the caller adds up (and, on vocab-sharded rows, ``psum``-s over the
model axis). The search that drives it (:func:`jaxsample._select._digit_search`) is
the same for whole rows and for shards.

Why a kernel: on a GPU, XLA evaluates "mass above 15 candidates" as a ``[R, 15, V]``
compare-and-reduce that costs 4-5 reads of the logits (shared/ANCHORS.md), while a
program that holds a block of the row in registers evaluates the 15 candidates for the
price of one read. Rows are split over programs along the vocabulary (grid
``[R, ceil(V / block)]``), so a batch of one still fills the GPU.

Keys: bfloat16 logits give 16-bit keys (their bits, as :func:`jaxsample._select.
ordered_keys`), every other dtype the 32-bit keys of its float32 value. Weights:
``"count"`` (1 per element: top-k), ``"softmax"`` (``exp(x - row_max)``, top-p) or
``"weights"`` (a second ``[R, V]`` input). A column past ``V`` (the last, partial
block) weighs 0, whatever the padding holds.

On a CPU the kernel runs with ``interpret=True`` (the tests do, against the sort
reference); ``jax.export`` for ``platforms=["cuda"]`` runs the real Triton lowering.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["count_above", "key_bits", "MAX_WIDTH"]

Array = jax.Array

_F32 = jnp.float32
_U32 = jnp.uint32
#: Widest digit a pass may take (2**width - 1 candidates, unrolled in the kernel).
MAX_WIDTH = 4
_LANES = 1 << MAX_WIDTH


def key_bits(dtype) -> int:
    """16 for bfloat16 (its own bits), 32 for every other dtype (its float32 value)."""
    return 16 if jnp.dtype(dtype) == jnp.bfloat16 else 32


def _block_size(rows: int, vocab: int) -> int:
    """Columns per program: a power of two in [512, 8192], aiming at >= 512 programs
    (a few per SM) so that a batch of one still fills the GPU."""
    block = 8192
    while block > 512 and rows * -(-vocab // block) < 512:
        block //= 2
    return block


def _kernel(*refs, width, vocab, block, bits, mode):
    if mode == "weights":
        x_ref, prefix_ref, shift_ref, stat_ref, w_ref, out_ref = refs
    else:
        x_ref, prefix_ref, shift_ref, stat_ref, out_ref = refs
    from jax.experimental import pallas as pl

    x = x_ref[...].astype(_F32)  # [1, block]
    col = pl.program_id(1) * block + lax.broadcasted_iota(jnp.int32, x.shape, 1)
    valid = col < vocab
    x = jnp.where(x == 0, 0.0, x)  # -0.0 -> +0.0
    b = lax.bitcast_convert_type(x, _U32)
    if bits == 16:  # bfloat16: the high half of its float32 bits is its own
        b = lax.shift_right_logical(b, _U32(16))
        sign, full = _U32(0x8000), _U32(0xFFFF)
    else:
        sign, full = _U32(0x80000000), _U32(0xFFFFFFFF)
    key = jnp.where(b >= sign, (~b) & full, b | sign)
    key = jnp.where(jnp.isnan(x), full, key)  # NaN last, as ordered_keys
    if mode == "count":
        w = jnp.ones_like(x)
    elif mode == "softmax":
        w = jnp.exp(x - stat_ref[...])  # stat: the row max
    else:
        w = w_ref[...].astype(_F32)
    w = jnp.where(valid, w, 0.0)
    prefix, shift = prefix_ref[...], shift_ref[...]  # [1, 1] uint32 each
    lane = lax.broadcasted_iota(jnp.int32, (1, _LANES), 1)
    out = jnp.zeros((1, _LANES), _F32)
    for c in range(1, 1 << width):  # static: one masked sum per candidate
        above = key >= (prefix | lax.shift_left(_U32(c), shift))
        out = jnp.where(lane == c, jnp.sum(jnp.where(above, w, 0.0), axis=1, keepdims=True), out)
    out_ref[...] = out


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
      ``c``; for ``"count"`` exact integers (as float32, up to 2**24 per block).
    """
    from jax.experimental import pallas as pl

    rows, vocab = x.shape
    block = _block_size(rows, vocab)
    blocks = -(-vocab // block)
    kernel = functools.partial(_kernel, width=width, vocab=vocab, block=block,
                               bits=key_bits(x.dtype), mode=mode)
    row_block = pl.BlockSpec((1, block), lambda i, j: (i, j))
    per_row = pl.BlockSpec((1, 1), lambda i, j: (i, 0))
    stat = jnp.zeros((rows,), _F32) if stat is None else stat.astype(_F32)
    shift = jnp.broadcast_to(jnp.asarray(shift, _U32), (rows,))
    args = [x, prefix.astype(_U32)[:, None], shift[:, None], stat[:, None]]
    in_specs = [row_block, per_row, per_row, per_row]
    if mode == "weights":
        args.append(weights)
        in_specs.append(row_block)
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        # The Triton lowering (not Mosaic GPU, jax 0.10's default for pallas_call).
        params_type = getattr(pltriton, "CompilerParams", None) or pltriton.TritonCompilerParams
        params["compiler_params"] = params_type(num_warps=4, num_stages=2)
    partial = pl.pallas_call(
        kernel, grid=(rows, blocks), in_specs=in_specs,
        out_specs=pl.BlockSpec((1, _LANES), lambda i, j: (i, j)),
        out_shape=_out_shape((rows, blocks * _LANES), x),
        interpret=interpret, **params)(*args)  # [R, blocks * 16]
    partial = partial.reshape(rows, blocks, _LANES)[:, :, 1:1 << width]
    if mode == "count":  # exact: integers per block, summed as integers
        return jnp.sum(partial.astype(jnp.int32), axis=1)
    return jnp.sum(partial, axis=1)
