"""The radix core: order-preserving keys, their width, and the digit loop (defined once).

Every sort-free threshold of the library is a radix search over these keys: the CPU
scatter engine and the compare engine (:mod:`jaxsample._selection.select`), the Pallas
counting kernels (:mod:`jaxsample._selection.kernels`, which call :func:`ordered_keys`
and :func:`key_value` on chip) and the fused GPU step (:mod:`jaxsample._step.fused`).
docs/benchmarks.md ("How the sort-free paths work") describes the engines.

* :func:`key_bits`: 16 for the 2-byte floats (bfloat16, float16: the key is their own
  bit pattern), 32 for every other dtype (the key of its float32 value).
* :func:`ordered_keys` / :func:`from_ordered_keys` / :func:`key_value`: a float maps to
  an unsigned integer with the same order: set the sign bit of a non-negative float,
  invert every bit of a negative one; ``-0.0`` becomes ``+0.0``, every NaN the largest
  key. Only ``jnp`` / ``lax`` element-wise operations, so the same functions run in XLA
  and inside a kernel.
* :func:`digit_loop`: the most-significant-first walk over a key's digits that every
  engine drives with its own pass (a histogram, a compare-and-count, a kernel launch),
  unrolled or as one ``fori_loop``; :func:`pick_digit` is the compare / kernel engines'
  choice of a digit from the masses above its candidates.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["key_bits", "ordered_keys", "from_ordered_keys", "key_value", "digit_loop",
           "pick_digit", "extend"]

Array = jax.Array

_U32 = jnp.uint32
_F32 = jnp.float32


def key_bits(dtype: Any) -> int:
    """Significant bits of the keys of ``dtype``: 16 for bfloat16 and float16 (their own
    bits), 32 for every other dtype (the bits of its float32 value)."""
    dtype = jnp.dtype(dtype)
    return 16 if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2 else 32


def _masks(bits: int) -> tuple[Array, Array]:
    """(sign bit, all bits) of a ``bits``-bit key, as uint32."""
    return (_U32(0x8000), _U32(0xFFFF)) if bits == 16 else (_U32(0x80000000), _U32(0xFFFFFFFF))


def ordered_keys(x: Array, dtype: Any = None) -> Array:
    """Order-preserving unsigned keys, as ``uint32`` with :func:`key_bits` significant bits.

    Args:
      x: the values: an array of ``dtype``, or the (exact) float32 values of ``dtype``
        (what a kernel holds after loading a block). A non-float array is taken as
        float32.
      dtype: the dtype whose keys to make (default ``x.dtype``).

    ``a < b`` iff ``key(a) < key(b)`` for non-NaN values; ``-0.0`` and ``+0.0`` get the
    same key; ``-inf`` gets the smallest non-NaN key; every NaN gets the largest key (a
    sort puts NaN last too).

    Example:
      >>> import jax.numpy as jnp
      >>> k = ordered_keys(jnp.array([-jnp.inf, -1.0, -0.0, 0.0, 2.0]))
      >>> bool(jnp.all(k[1:] >= k[:-1])), bool(k[2] == k[3])
      (True, True)
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(_F32)
    dtype = jnp.dtype(x.dtype if dtype is None else dtype)
    bits = key_bits(dtype)
    if bits == 32 and x.dtype != _F32:
        x = x.astype(_F32)
    x = jnp.where(x == 0, jnp.zeros_like(x), x)  # -0.0 -> +0.0
    if bits == 32:
        b = lax.bitcast_convert_type(x, _U32)
    elif x.dtype == _F32 and dtype == jnp.bfloat16:  # its float32 bits: its own, then zeros
        b = lax.shift_right_logical(lax.bitcast_convert_type(x, _U32), _U32(16))
    else:
        b = lax.bitcast_convert_type(x.astype(dtype), jnp.uint16).astype(_U32)
    sign, full = _masks(bits)
    key = jnp.where(b >= sign, (~b) & full, b | sign)
    return jnp.where(jnp.isnan(x), full, key)


def _key_bits_of_value(key: Array, bits: int) -> Array:
    """The bit pattern (uint32, low ``bits`` bits) of the value of a key."""
    sign, full = _masks(bits)
    return jnp.where(key >= sign, key & (full >> 1), (~key) & full)


def from_ordered_keys(key: Array, dtype: Any = _F32) -> Array:
    """Inverse of :func:`ordered_keys`: the value of ``dtype`` (``-0.0`` comes back as
    ``+0.0``, the NaN key as a NaN)."""
    dtype = jnp.dtype(dtype)
    bits = key_bits(dtype)
    b = _key_bits_of_value(key, bits)
    if bits == 16:
        return lax.bitcast_convert_type(b.astype(jnp.uint16), dtype)
    out = lax.bitcast_convert_type(b, _F32)
    return out if dtype == _F32 else out.astype(dtype)


def key_value(key: Array, dtype: Any) -> Array:
    """The float32 value of a key of ``dtype`` (:func:`from_ordered_keys` then float32),
    as a kernel computes it (bfloat16 by a shift, no 16-bit type)."""
    dtype = jnp.dtype(dtype)
    bits = key_bits(dtype)
    if bits == 16 and dtype == jnp.bfloat16:
        return lax.bitcast_convert_type(lax.shift_left(_key_bits_of_value(key, 16), _U32(16)), _F32)
    return from_ordered_keys(key, dtype).astype(_F32)


def extend(prefix: Array, digit: Array, shift: Any) -> Array:
    """``prefix | digit << shift`` (uint32): the search's key with one more digit."""
    return prefix | (digit.astype(_U32) << jnp.asarray(shift, _U32))


def pick_digit(mass: Array, target: Array, width: int) -> Array:
    """The digit of one pass: the largest ``c`` in ``1 .. 2**width - 1`` whose mass
    ``mass[:, c - 1]`` (``[R, C]``) reaches ``target`` (``[R]``), else 0; int32 ``[R]``."""
    c = jnp.arange(1, 1 << width, dtype=jnp.int32)
    return jnp.max(jnp.where(mass >= target[:, None], c[None, :], 0), axis=1)


def digit_loop(step: Callable[[Any, Any, int, Any], Any], digits: tuple[int, ...], bits: int,
               carry: Any, *, rolled: bool = False, start: int = 0) -> Any:
    """The radix walk: ``carry = step(i, shift, width, carry)`` for each digit ``i`` from
    ``start``, most significant first (``shift``: the digit's lowest bit, ``bits -
    sum(digits[:i + 1])``).

    Unrolled, ``i`` and ``shift`` are Python ints (on a GPU a ``while`` loop reads its
    predicate back to the host every trip). With ``rolled`` (and equal widths) the
    digits run as one ``fori_loop`` with a traced ``i`` (int32) and ``shift`` (uint32):
    one body to trace and compile, which the Pallas interpreter needs (one kernel to
    compile instead of one per digit).
    """
    if sum(digits) != bits:
        raise ValueError(f"digit_loop: digits {digits} do not sum to {bits} bits")
    if rolled and len(set(digits)) == 1:
        width = digits[0]
        return lax.fori_loop(start, len(digits), lambda i, c: step(
            i, (bits - width * (i + 1)).astype(_U32), width, c), carry)
    shift = bits - sum(digits[:start])
    for i in range(start, len(digits)):
        shift -= digits[i]
        carry = step(i, shift, digits[i], carry)
    return carry
