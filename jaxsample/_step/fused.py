"""The fused sampling step: ``default_chain`` + draw + log-probs in a few kernels (GPU).

:func:`jaxsample.sample_step` with the default chain (``Temperature -> TopK -> TopP ->
MinP``, ``min_tokens_to_keep = 1``) on a GPU runs this instead of applying the four
filters one after the other and then sampling. The token, both log-probs and the
processed logits are those of the unfused step (same keys, same draw; see the
deviations below), up to float32 rounding of the masses (summed in another order on
a GPU: a draw whose uniform lies within a few ulps of a segment boundary may pick the
neighbouring token); what changes is how many times the ``[B, V]`` logits are read and
how many programs run:

1. :func:`jaxsample._selection.kernels.row_stats` (one read): the raw row max and sum of exp
   (the raw log-softmax), the max and sum of exp of the scaled logits ``x * (1 / T)``
   (rounded to the logits' dtype), the arg-max (greedy rows) and a count
   of NaN / ``+inf`` entries (invalid rows).
2. The top-k threshold: the radix digit search of :mod:`jaxsample._selection.select` over the
   keys of the scaled logits, one kernel per 4-bit digit (8 for float32 logits, 4 for
   bfloat16): each kernel also finishes the previous digit from its partial counts
   (:func:`jaxsample._selection.kernels.chained_pass`), so no XLA step runs between passes. A
   row with ``k`` disabled (0 or ``>= V``), a greedy row or an invalid row reads
   nothing (its programs exit at once).
3. The top-p threshold over the top-k survivors: the same search on softmax mass, with
   the top-k key as a floor (so the mass is that of the top-k-filtered row, as in the
   chain) and the total taken from the first pass (no separate pass). Without top-k
   the total is step 1's and a bound (:func:`top_p_prefix`) decides the leading
   digits before any pass: those passes read nothing, as rows with ``p = 1``.
4. min-p needs no pass: its threshold is ``max(s) + ln(min_p)`` (``s``: scaled logits).
5. :func:`jaxsample._selection.kernels.segment_masses` (one read): the kept softmax mass of every
   segment of 256 tokens. The draw is :func:`jaxsample.sample`'s two-stage inverse CDF
   with the same two uniforms: a segment by its mass (a running sum over
   ``V / 256`` numbers), then a token inside it (256 values gathered and recomputed).
   The processed log-prob is ``s_t - max(s) - ln(kept mass)``; the raw one comes from
   step 1.

No sort, no scatter, no ``lax.top_k`` and no ``lax.cond`` (on a GPU a conditional
reads its predicate back to the host): a disabled stage costs its kernel launches but
no reads. Reads of ``[B, V]``: 2 + 4 (bfloat16) or 2 + 8 (float32) with top-p alone,
2 + 8 / 2 + 16 with top-k and top-p, 2 with min-p alone.

Thresholds are digit-aligned keys (the smallest key of the kept set has the same
kept set), compared to the keys of the scaled logits; the kept sets are the chain's
(ties kept), up to float32 rounding in the top-p mass (as every radix path:
:mod:`jaxsample._selection.select`).

Deviations from the unfused step, both documented in `sample_step`:

* The temperature is applied as ``x * (1 / T)``, not ``x / T``: the two differ by at
  most one ulp, and a product rounds identically in a Triton kernel and in XLA (a
  quotient may not: GPU divisions can be approximate), so the kernels, the final
  draw and the log-probs agree on every scaled logit. The fused step equals the
  chain applied to ``x * (1 / T)`` with ``T = 1``.
* A row whose *model* logits hold a NaN or ``+inf`` is invalid (token ``-1``, NaN
  log-probs) whatever the filters; the chain may drop a NaN in a truncation (a NaN
  compares false) and draw from the rest.
* Processed logits come back through their keys: ``-0.0`` reads ``+0.0`` (equal
  values).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxsample._filters import sampling as _sampling
from jaxsample._filters.sampling import fold_in_rows
from jaxsample._processors.base import Chain
from jaxsample._processors.builtin import MinP, Temperature, TopK, TopP
from jaxsample._selection import kernels as _kernels
from jaxsample._selection import radix as _radix

__all__ = ["fusable", "fused_default_step", "top_p_prefix"]

Array = jax.Array

_F32 = jnp.float32
_U32 = jnp.uint32


def fusable(chain: Any, dtype: Any = jnp.float32) -> bool:
    """True for a chain the fused step implements exactly: the four processors of
    :func:`jaxsample.default_chain`, in its order, each with ``min_tokens_to_keep = 1``,
    on float32 / bfloat16 / float16 logits."""
    if type(chain) is not Chain or jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return False
    procs = chain.processors
    if tuple(type(p) for p in procs) != (Temperature, TopK, TopP, MinP):
        return False
    return all(p.min_tokens_to_keep == 1 for p in procs[1:])


def _scaled(x: Array, scale: Array) -> Array:
    """``x * scale`` rounded to ``x.dtype``, as float32: the kernels' ``_scores``, bit
    for bit (a product rounds the same everywhere). Returned through its key (the
    kernels' ``_from_keys``) so that no compiler contracts ``x * scale - top``
    downstream into a fused multiply-add (which subtracts the unrounded product; an
    ``optimization_barrier`` does not stop XLA from fusing)."""
    s = x.astype(_F32) * scale
    if x.dtype != _F32:
        s = s.astype(x.dtype).astype(_F32)
    return _radix.key_value(_radix.ordered_keys(s, x.dtype), x.dtype)


def _keys(s: Array, dtype: Any) -> Array:
    """Keys of scaled scores ``s`` (float32 values of ``dtype``), as the kernels make them."""
    return _radix.ordered_keys(s, dtype)


def fused_default_step(chain: Any, logits: Array, key: Array, *, interpret: bool = False,
                       rolled: bool | None = None) -> tuple[Array, Array, Array, Array]:
    """One step of ``sample_step(default_chain(...), logits, None, key)``, fused.

    Args:
      chain: a chain for which :func:`fusable` holds.
      logits: ``[..., V]`` model logits.
      key: typed keys, one per row (``logits.shape[:-1]``) or one for all.
      interpret: run the kernels in the Pallas interpreter (CPU tests).
      rolled: run the digit passes as a ``fori_loop`` (default: when interpreting,
        one kernel to compile) rather than unrolled (on a GPU, where a loop reads
        its predicate back to the host).

    Returns:
      ``(token int32[...], logprob_raw, logprob_processed, processed_logits)``, as
      :func:`jaxsample.sample_step` (``-1`` / NaN for an invalid row).
    """
    batch, vocab = logits.shape[:-1], logits.shape[-1]
    x = logits.reshape(-1, vocab)  # [R, V]
    rows = x.shape[0]
    temp, top_k, top_p, min_p = chain.processors

    def per_row(v, dtype):
        return jnp.broadcast_to(jnp.asarray(v, dtype), batch).reshape(-1)

    t = per_row(temp.t, _F32)
    k = per_row(top_k.k, jnp.int32)
    p = per_row(top_p.p, _F32)
    p_min = per_row(min_p.p, _F32)
    greedy = t == 0
    scale = 1.0 / jnp.where(greedy, 1.0, t)  # x * (1 / T): see the module docstring

    stats = _kernels.row_stats(x, scale, interpret=interpret)  # one read
    top = stats["scaled_max"]  # max of x * (1 / T)
    # Invalid: a NaN or +inf logit, no finite one, or scaled logits that overflow (the
    # chain's processed row would hold +inf, or nothing finite).
    valid = (stats["bad"] == 0) & (stats["max"] > -jnp.inf) & (greedy | jnp.isfinite(top))
    sampled = valid & ~greedy
    bits = _radix.key_bits(x.dtype)
    digits = (_kernels.MAX_WIDTH,) * (bits // _kernels.MAX_WIDTH)

    def search(target, mode, floor, active, start=None, decided=None):
        key_t = _search(x, target, mode, floor, active, start, decided, top=top, scale=scale,
                        digits=digits, interpret=interpret,
                        rolled=interpret if rolled is None else rolled)
        return jnp.where(active, key_t, _U32(0))  # 0: keeps everything

    k_on = sampled & (k > 0) & (k < vocab)
    floor_k = search(k, "count", None, k_on)  # the k-th largest key
    p_on = sampled & (p < 1)
    # Top-p over the top-k survivors: their total comes from the search's first pass.
    # Without top-k, the total is the stats' and the threshold lies in [lo, top] (the
    # mass below lo is under (1 - p) * total), so the digits shared by the keys of lo
    # and top are decided before any pass: those passes read nothing for the row.
    total = stats["scaled_sum_exp"]
    start, decided = top_p_prefix(top, total, p, vocab, x.dtype)
    # With top-k the total is the survivors', from the search's own first pass: no start.
    start, decided = jnp.where(k_on, _U32(0), start), jnp.where(k_on, 0, decided)
    floor_p = search(lambda first_total: p * jnp.where(k_on, first_total, total), "softmax",
                     floor_k, p_on, start, decided)
    floor = jnp.maximum(floor_k, floor_p)
    t_min = jnp.minimum(top + jnp.log(p_min), top)  # min-p; ln 0 = -inf keeps everything

    u = _sampling._uniform_per_row(fold_in_rows(key, 0), batch, 2).reshape(rows, 2)

    def kept(s):  # s: scaled scores [R, n], float32
        return (_keys(s, x.dtype) >= floor[:, None]) & (s >= t_min[:, None])

    if vocab <= 2 * _kernels.SEGMENT:  # the one-level draw of `sample`: whole rows
        s = _scaled(x, scale[:, None])
        processed = jnp.where(kept(s), s, -jnp.inf)
        token = _sampling.inverse_cdf(u[:, 0], processed)
        mass = jnp.sum(jnp.exp(processed - top[:, None]), axis=1)
    else:
        masses = _kernels.segment_masses(x, scale, top, floor, t_min, interpret=interpret)
        token, mass = _draw(x, scale, masses, u, kept, top)
    token = jnp.where(greedy, stats["argmax"], token)
    token = jnp.where(valid, token, -1)

    x_tok = jnp.take_along_axis(x, jnp.clip(token, 0, vocab - 1)[:, None], axis=1)[:, 0]
    raw = (x_tok.astype(_F32) - stats["max"]) - jnp.log(stats["sum_exp"])
    processed_lp = jnp.where(greedy, 0.0, (_scaled(x_tok, scale) - top) - jnp.log(mass))
    nan = jnp.float32(jnp.nan)
    raw, processed_lp = (jnp.where(token >= 0, v, nan) for v in (raw, processed_lp))

    # The processed logits, as the chain returns them (free under jit when unused).
    s = _scaled(x, scale[:, None])
    ids = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    processed_logits = jnp.where(
        greedy[:, None], jnp.where(ids == stats["argmax"][:, None], x.astype(_F32), -jnp.inf),
        jnp.where(kept(s), s, -jnp.inf)).astype(logits.dtype)
    return (token.reshape(batch), raw.reshape(batch), processed_lp.reshape(batch),
            processed_logits.reshape(logits.shape))


def _search(x, target, mode, floor, active, start, decided, *, top, scale, digits, interpret,
            rolled):
    """The radix digit search (largest digit-aligned key ``T`` with ``mass(key >= T) >=
    target``) on the digit loop of :func:`jaxsample._selection.radix.digit_loop`, one
    kernel launch per digit: each pass also finishes the previous one on chip
    (:func:`jaxsample._selection.kernels.chained_pass`), so no XLA step runs between
    passes. ``target`` may be a function of the row total
    (taken from the first pass); ``start`` / ``decided``: leading bits known before any
    pass (those passes read nothing for the row)."""
    rows, vocab = x.shape
    bits = sum(digits)
    width = digits[0]  # all digits have the same width
    lanes = _kernels.block_lanes(rows, vocab)
    prefix = jnp.zeros((rows,), _U32) if start is None else start
    decided = jnp.zeros((rows,), jnp.int32) if decided is None else decided
    never = jnp.iinfo(jnp.int32).max if mode == "count" else jnp.inf  # first pass: no digit yet

    def run(shift, previous, prefix, target):
        shift = jnp.asarray(shift, _U32)
        skip = (bits - shift.astype(jnp.int32)) <= decided  # a digit the bound decided
        return _kernels.chained_pass(
            x, previous, prefix, shift + width, shift, target, width=width, prev_width=width,
            mode=mode, stat=top, scale=scale, floor=jnp.zeros_like(prefix) if floor is None else floor,
            active=active & ~skip, interpret=interpret)

    dummy = jnp.zeros((rows, _kernels.pass_lanes(rows, vocab)), _F32)
    partials, prefix = run(bits - width, dummy, prefix, jnp.full((rows,), never))
    if callable(target):  # the total is the mass above prefix 0 (lane 0 of the first pass)
        total = jnp.sum(partials[:, :lanes].reshape(rows, -1, _kernels.LANES)[:, :, 0], axis=1)
        target = target(total)

    def step(_, shift, width, carry):
        return run(shift, *carry, target)

    partials, prefix = _radix.digit_loop(step, digits, bits, (partials, prefix), rolled=rolled,
                                         start=1)
    skip_last = bits <= decided  # the last digit (shift 0) decided too
    d = _radix.pick_digit(_kernels.pass_masses(partials, lanes, width=width, mode=mode), target, width)
    return _radix.extend(prefix, jnp.where(skip_last, 0, d), 0)


def top_p_prefix(top: Array, total: Array, p: Array, vocab: int, dtype: Any) -> tuple[Array, Array]:
    """The leading key bits every top-p threshold of the row shares, before any pass.

    With weights ``exp(s - top)`` (total ``W``), the tokens below
    ``lo = top - ln(V / ((1 - p) W)) - 1`` weigh less than ``V exp(lo - top) < (1 - p) W``
    together, so the mass at or above ``lo`` exceeds ``p W`` and the threshold lies in
    ``[lo, top]``: its key shares the leading bits that the keys of ``lo`` and ``top``
    share (the ``- 1``, a factor e, covers rounding in ``W``).

    Returns:
      ``(start uint32 [R], decided int32 [R])``: ``start`` holds the shared leading
      bits, ``decided`` their number rounded down to a digit boundary (0: none).
    """
    bits = _radix.key_bits(dtype)
    lo = top - (jnp.log(vocab / ((1 - p) * total)) + 1.0)
    key_lo, key_top = (_radix.ordered_keys(v.astype(dtype).astype(_F32), dtype) for v in (lo, top))
    common = lax.clz(key_lo ^ key_top).astype(jnp.int32) - (32 - bits)
    decided = jnp.where(p < 1, (common // _kernels.MAX_WIDTH) * _kernels.MAX_WIDTH, 0)
    low_bits = (bits - decided).astype(_U32)
    start = jnp.where(decided > 0, (key_top >> low_bits) << low_bits, _U32(0))
    return start, decided


def _draw(x, scale, masses, u, kept, top):
    """:func:`jaxsample.sample`'s two-stage draw from segment masses ``[R, nb]``:
    (token ``int32 [R]``, total kept mass ``[R]``)."""
    seg = _kernels.SEGMENT
    rows, vocab = x.shape
    cdf = jnp.cumsum(masses, axis=1)  # [R, nb]
    total = jnp.max(cdf, axis=1)
    target = jnp.minimum(u[:, 0] * total, jnp.nextafter(total, jnp.zeros_like(total)))
    j = jnp.minimum(_sampling._first_true(cdf > target[:, None], cdf.shape[1]), cdf.shape[1] - 1)
    cols = j[:, None] * seg + jnp.arange(seg, dtype=jnp.int32)[None, :]  # [R, 256]
    inside = cols < vocab
    s = _scaled(jnp.take_along_axis(x, jnp.minimum(cols, vocab - 1), axis=1), scale[:, None])
    e = jnp.where(inside & kept(s), jnp.exp(s - top[:, None]), 0.0)  # [R, 256]
    block_total = jnp.max(jnp.cumsum(e, axis=1), axis=1)
    inner = jnp.minimum(u[:, 1] * block_total, jnp.nextafter(block_total, jnp.zeros_like(block_total)))
    token = j * seg + _sampling._pick_in(e, jnp.zeros_like(block_total), inner)
    return token.astype(jnp.int32), jnp.sum(masses, axis=1)
