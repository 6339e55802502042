"""Counter-based Gumbel-max sampling: the draw whose token does not depend on sharding.

Token ``i`` of a row gets noise from a hash of (the row's key, the global token id
``i``), then the arg-max of ``logits + noise`` is the token. The noise of a token does
not depend on which device holds it, so on vocabulary-sharded logits
(:mod:`jaxsample._sharding.sharded`) the token drawn does not depend on the number of
shards; :func:`gumbel_sample` is the single-device form (the same noise, token for
token).

The counter-based noise: with ``(s0, s1)`` = two ``uint32`` drawn from the row's key
(`jax.random.bits`) and ``i`` the global token id,

.. math::

   h_i = \\mathrm{fmix32}(\\mathrm{fmix32}(i \\oplus s_0) + s_1), \\quad
   v_i = (h_i + \\tfrac12) 2^{-32}, \\quad
   g_i = -\\ln(-\\ln(1 - v_i)),

``fmix32`` being MurmurHash3's finaliser (a bijection on 32 bits), and the token is
``argmax_i (x_i + g_i)``, lowest index on ties. ``g`` is a Gumbel variate with 32-bit
resolution near the winning (upper) tail. The hash is a statistical, not a
cryptographic, generator; it costs a few integer operations per token instead of a
threefry block.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxsample import _validation as _val
from jaxsample._filters import sampling as _sampling
from jaxsample._selection.select import VocabShard

__all__ = ["gumbel_sample"]

Array = jax.Array
ArrayLike = Any

_F32 = jnp.float32
_U32 = jnp.uint32
_NEG_INF = -jnp.inf


def _fmix32(h: Array) -> Array:
    """MurmurHash3's 32-bit finaliser: a bijection of ``uint32`` with full avalanche."""
    h = h ^ (h >> 16)
    h = h * _U32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * _U32(0xC2B2AE35)
    return h ^ (h >> 16)


def _gumbel_noise(seeds: Array, ids: Array) -> Array:
    """Counter-based Gumbel noise ``g[r, j]`` for row seeds ``[R, 2]`` and token ids ``[n]``.

    ``g[r, j]`` depends only on ``seeds[r]`` and ``ids[j]`` (the global token id).
    Returns float32 ``[R, n]``, every value finite.
    """
    seeds = seeds.astype(_U32)
    ids = ids.astype(_U32)[None, :]  # [1, n]
    h = _fmix32(_fmix32(ids ^ seeds[:, 0:1]) + seeds[:, 1:2])  # [R, n]
    v = (h.astype(_F32) + 0.5) * _F32(2.0**-32)  # (0, 1], fine resolution near 0
    v = jnp.minimum(v, _F32(1.0 - 2.0**-24))  # (0, 1): float32 rounds h ~ 2**32 up to 1
    exponential = -jnp.log1p(-v)  # Exp(1), accurate for small v (the winners)
    return -jnp.log(exponential)


def _row_seeds(key: Array, batch_shape: tuple[int, ...]) -> Array:
    """Two ``uint32`` per row, ``[*batch_shape, 2]``: from one key, or row r from ``key[r]``."""
    if key.shape == ():
        return jax.random.bits(key, tuple(batch_shape) + (2,), _U32)
    flat = key.reshape(-1)
    bits = jax.vmap(lambda k: jax.random.bits(k, (2,), _U32))(flat)  # [R, 2]
    return bits.reshape(tuple(batch_shape) + (2,))


def _check_key(fn: str, key: ArrayLike, batch_shape: tuple[int, ...]) -> Array:
    key = _sampling.as_typed_key(key)
    if key.shape not in ((), tuple(batch_shape)):
        raise ValueError(
            f"{fn}: key must be one key or one key per row with shape logits.shape[:-1] = "
            f"{tuple(batch_shape)}, got a key array of shape {key.shape}")
    return key


def _keep(logits: Array, keep: Array) -> Array:
    return jnp.where(keep, logits, jnp.array(_NEG_INF, logits.dtype))


def _draw(seeds: Array, logits: Array, shard: VocabShard, raw: Array | None = None):
    """Gumbel-max over the vocabulary, in two collectives.

    One ``pmax`` of the stacked row maxima (Gumbel scores, logits, NaN flag, and the raw
    logits when given), then one ``pmin`` of the winning id.

    Returns:
      ``(token int32[b], valid bool[b], maxima)``: ``token = -1`` for an invalid row (no
      finite logit, or a NaN); ``maxima = (max of logits, max of raw or None)``.
    """
    x = logits.astype(_F32)  # [b, V_local]
    score = x + _gumbel_noise(seeds, shard.ids())
    rows = [jnp.max(score, -1), jnp.max(x, -1), jnp.any(jnp.isnan(x), axis=-1).astype(_F32)]
    if raw is not None:
        rows.append(jnp.max(raw.astype(_F32), -1))
    top_score, top, nan, *top_raw = shard._pmax(jnp.stack(rows))  # [b] each
    hit = score == top_score[:, None]
    first = jnp.argmax(hit, axis=-1).astype(jnp.int32)
    token = shard._pmin(jnp.where(jnp.any(hit, axis=-1), shard.offset + first, shard.vocab_size))
    valid = jnp.isfinite(top) & (nan == 0)
    token = jnp.where(valid, token, jnp.int32(-1))
    return token, valid, (top, top_raw[0] if top_raw else None)


def gumbel_sample(key: ArrayLike, logits: ArrayLike) -> Array:
    """Draws one token per row with probability ``softmax(logits)``: counter-based Gumbel-max.

    The single-device form of the sharded draw (module docstring): the noise of token
    ``i`` depends only on the row's key and ``i``, so `ShardedSampler` draws the same
    token for the same key on any number of vocabulary shards. Exact in distribution up
    to float32 rounding; a ``-inf`` token is never drawn.

    Args:
      key: one key for the whole array or one key per row (shape ``logits.shape[:-1]``);
        typed or raw ``uint32`` keys.
      logits: ``[..., V]`` floating array.

    Returns:
      ``int32[...]`` token ids; ``-1`` for a row with no finite logit or with a NaN.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> gumbel_sample(jax.random.key(0), jnp.log(jnp.array([[0.0, 1.0, 0.0]])))
      Array([1], dtype=int32)
    """
    _val.check_logits(logits, "gumbel_sample")
    logits = jnp.asarray(logits)
    key = _check_key("gumbel_sample", key, logits.shape[:-1])
    return _gumbel_sample(key, logits)


@jax.jit
def _gumbel_sample(key: Array, logits: Array) -> Array:
    batch_shape, vocab = logits.shape[:-1], logits.shape[-1]
    seeds = _row_seeds(key, batch_shape).reshape(-1, 2)  # [R, 2]
    token = _draw(seeds, logits.reshape(-1, vocab), VocabShard(vocab, vocab))[0]
    return token.reshape(batch_shape)
