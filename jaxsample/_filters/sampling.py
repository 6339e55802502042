"""Drawing tokens from logits, greedy decoding and token log-probabilities.

Invalid rows: a row is *valid* when it has at least one finite logit and contains no
NaN (and no ``+inf``). :func:`sample` and :func:`greedy` return ``-1`` for an invalid
row, e.g. one emptied by :func:`jaxsample.ban_tokens` / :func:`jaxsample.allow_tokens`;
callers treat ``-1`` as "no token" (generation reports it as a finish reason).
:func:`token_logprobs` returns NaN for such a row and for the token ``-1``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample import _validation as _val

__all__ = ["sample", "greedy", "token_logprobs", "entropy", "as_typed_key", "fold_in_rows"]

Array = jax.Array
ArrayLike = Any

_F32 = jnp.float32


def as_typed_key(key: ArrayLike) -> Array:
    """Returns ``key`` as a new-style typed key array (``jax.random.key`` style).

    Accepts typed keys of any shape and raw ``uint32`` keys (``jax.random.PRNGKey``
    style, shape ``[..., 2]`` for the default implementation); the random bits are the
    same either way, so a raw key and its wrapped form give the same draws.

    Example:
      >>> import jax
      >>> as_typed_key(jax.random.PRNGKey(0)).shape
      ()
    """
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return key
    key = jnp.asarray(key)
    if key.dtype != jnp.uint32:
        raise ValueError(
            f"key must be a typed PRNG key (jax.random.key) or a raw uint32 key "
            f"(jax.random.PRNGKey), got an array of dtype {key.dtype}"
        )
    return jax.random.wrap_key_data(key)


def fold_in_rows(key: ArrayLike, data: int) -> Array:
    """``jax.random.fold_in`` applied to every key of a key array (any shape).

    Returns a typed key array of the same shape; raw ``uint32`` keys are wrapped first.

    Example:
      >>> import jax
      >>> fold_in_rows(jax.random.split(jax.random.key(0), 3), 1).shape
      (3,)
    """
    key = as_typed_key(key)
    if key.shape == ():
        return jax.random.fold_in(key, data)
    flat = key.reshape(-1)
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(flat).reshape(key.shape)


def _uniform_per_row(key: ArrayLike, batch_shape: tuple[int, ...], count: int | None = None) -> Array:
    """``U[0, 1)`` float32 per row, ``[...]`` (or ``[..., count]``): from one key, or row
    ``r`` from ``key[r]``."""
    tail = () if count is None else (count,)
    if key.shape == ():
        return jax.random.uniform(key, batch_shape + tail, _F32)
    flat = key.reshape(-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, tail, _F32))(flat)
    return u.reshape(batch_shape + tail)


def _valid_rows(x: Array) -> tuple[Array, Array]:
    """(valid ``[...]``, row max ``[..., 1]``) for float32 logits ``x``.

    XLA's max propagates NaN, so a row with a NaN has a NaN max: one reduction decides
    "some finite logit, no NaN, no ``+inf``".
    """
    row_max = jnp.max(x, axis=-1, keepdims=True)  # [..., 1]
    valid = jnp.isfinite(row_max[..., 0])
    return valid, row_max


#: Block of the two-level inverse CDF: block sums, a running sum over blocks, then a
#: running sum inside one block. No running sum over the whole vocabulary (slow on
#: XLA:CPU) and no arg-max over it.
_BLOCK = 256


def _first_true(hit: Array, fill: int) -> Array:
    """Lowest index along the last axis where ``hit`` holds, else ``fill`` (``int32``)."""
    iota = jax.lax.broadcasted_iota(jnp.int32, hit.shape, hit.ndim - 1)
    return jnp.min(jnp.where(hit, iota, fill), axis=-1)


def _pick_in(e: Array, base: Array, target: Array) -> Array:
    """First ``i`` with ``base + cumsum(e)_i > target`` and ``e_i > 0`` (rows of ``e``).

    If float rounding leaves no such ``i`` (the caller guarantees positive mass), the
    last ``i`` with ``e_i > 0``.
    """
    cdf = base[:, None] + jnp.cumsum(e, axis=-1)
    live = e > 0
    first = _first_true((cdf > target[:, None]) & live, e.shape[-1])
    iota = jax.lax.broadcasted_iota(jnp.int32, e.shape, 1)
    last_live = jnp.max(jnp.where(live, iota, 0), axis=-1)
    return jnp.where(first < e.shape[-1], first, last_live)


def sample(key: ArrayLike, logits: ArrayLike) -> Array:
    """Draws one token per row with probability ``softmax(logits)``.

    Inverse-CDF draw (no Gumbel noise over the vocabulary): ``e = exp(x - max x)``,
    ``W`` = the total mass. Up to 512 tokens: ``u ~ U[0, 1)``, the token is the first
    ``i`` with ``cumsum(e)_i > u * W`` and ``e_i > 0``. Larger vocabularies are cut into
    blocks of 256 tokens and drawn in two stages with two uniforms per row: a block with
    probability (block mass) / W, then a token inside it with probability
    ``e_i`` / (block mass). So a token with probability 0 (logit ``-inf``, or
    underflowed) is never drawn, and token ``i`` is drawn with probability ``e_i / W``
    up to float32 resolution: each stage's uniform has 23 random bits, so a block's (or
    a small vocabulary's token's) probability is off by at most about
    ``2**-23 / probability`` relative, e.g. 1.2e-4 for a block of a flat 262144-token
    vocabulary, rather than 3% with one uniform over the whole vocabulary.

    Args:
      key: one PRNG key for the whole array (like ``jax.random.categorical``), or one
        key per row with shape ``logits.shape[:-1]``; then a row's draw depends only on
        its own key, so it is the same alone or at any position of any batch. Typed
        (``jax.random.key``) and raw ``uint32`` (``jax.random.PRNGKey``) keys work.
      logits: ``[..., V]`` floating array.

    Returns:
      ``int32[...]`` token ids; ``-1`` for a row with no finite logit or with a NaN
      (or ``+inf``) logit.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> logits = jnp.log(jnp.array([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]))
      >>> sample(jax.random.key(0), logits)[0]
      Array(1, dtype=int32)
      >>> sample(jax.random.key(0), jnp.full(3, -jnp.inf))
      Array(-1, dtype=int32)
    """
    _val.check_logits(logits, "sample")
    logits = jnp.asarray(logits)
    key = as_typed_key(key)
    if key.shape not in ((), logits.shape[:-1]):
        raise ValueError(
            f"sample: key must be one key or one key per row with shape "
            f"logits.shape[:-1] = {logits.shape[:-1]}, got a key array of shape {key.shape}"
        )
    return _sample(key, logits)


@jax.jit
def _sample(key: Array, logits: Array) -> Array:
    u = _uniform_per_row(key, logits.shape[:-1], 2)  # [..., 2]: block, then token in block
    return inverse_cdf(u[..., 0], logits, u[..., 1])


def inverse_cdf(u: Array, logits: Array, u_inner: Array | None = None) -> Array:
    """The token at quantile ``u`` (``[...]`` in ``[0, 1)``) of ``softmax(logits)``.

    Returns the first ``i`` with ``cumsum(e)_i > u * W`` and ``e_i > 0``, where
    ``e = exp(x - max x)`` and ``W`` is the total mass; ``-1`` for an invalid row.
    Above 512 tokens the running sum is two-level: sums of blocks of 256 and their
    running sum pick the block, then the running sum inside it picks the token. With
    ``u_inner`` (``[...]`` in ``[0, 1)``, independent of ``u``) the token inside the
    block is the one at quantile ``u_inner`` of the block's own distribution (the
    two-stage draw of :func:`sample`); without it, the quantile ``u`` is carried into
    the block (one function of ``u``, up to float32 rounding). A token with ``e_i = 0``
    is never returned.
    """
    x = logits.astype(_F32)  # [..., V]
    batch, vocab = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, vocab)  # [R, V]
    u = jnp.broadcast_to(u, batch).reshape(-1)
    valid, row_max = _valid_rows(x)
    e = jnp.exp(x - row_max)  # [R, V], the arg-max has e = 1
    if vocab <= 2 * _BLOCK:
        cdf = jnp.cumsum(e, axis=-1)
        # The total is the largest running mass, so some live token has cdf > target
        # even if a parallel prefix sum is not exactly monotone.
        total = jnp.max(cdf, axis=-1)
        target = jnp.minimum(u * total, jnp.nextafter(total, jnp.zeros_like(total)))
        token = _pick_in(e, jnp.zeros_like(total), target)
    else:
        pad = -vocab % _BLOCK
        if pad:
            e = jnp.pad(e, ((0, 0), (0, pad)))  # zero mass: never drawn
        blocks = e.reshape(e.shape[0], -1, _BLOCK)  # [R, nb, 256]
        block_cdf = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)  # [R, nb]
        total = jnp.max(block_cdf, axis=-1)
        target = jnp.minimum(u * total, jnp.nextafter(total, jnp.zeros_like(total)))
        # First block whose running mass passes the target: it has positive mass.
        j = _first_true(block_cdf > target[:, None], block_cdf.shape[-1])
        j = jnp.minimum(j, block_cdf.shape[-1] - 1)
        before = jnp.where(
            j > 0, jnp.take_along_axis(block_cdf, jnp.maximum(j - 1, 0)[:, None], 1)[:, 0], 0.0)
        inner = jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0]  # [R, 256]
        if u_inner is None:
            token = j * _BLOCK + _pick_in(inner, before, target)
        else:  # a fresh quantile inside the block (which has positive mass)
            u_inner = jnp.broadcast_to(u_inner, batch).reshape(-1)
            block_total = jnp.max(jnp.cumsum(inner, axis=-1), axis=-1)
            inner_target = jnp.minimum(u_inner * block_total,
                                       jnp.nextafter(block_total, jnp.zeros_like(block_total)))
            token = j * _BLOCK + _pick_in(inner, jnp.zeros_like(block_total), inner_target)
    token = jnp.where(valid, token.astype(jnp.int32), jnp.int32(-1))
    return token.reshape(batch)


def greedy(logits: ArrayLike) -> Array:
    """Arg-max per row, lowest index on ties; ``-1`` for an invalid row.

    Args:
      logits: ``[..., V]`` floating array.

    Returns:
      ``int32[...]``; ``-1`` for a row with no finite logit or with a NaN (or ``+inf``).

    Example:
      >>> import jax.numpy as jnp
      >>> greedy(jnp.array([[1.0, 3.0, 3.0], [-jnp.inf, -jnp.inf, -jnp.inf]]))
      Array([ 1, -1], dtype=int32)
    """
    _val.check_logits(logits, "greedy")
    return _greedy(jnp.asarray(logits))


@jax.jit
def _greedy(logits: Array) -> Array:
    x = logits.astype(_F32)
    valid, row_max = _valid_rows(x)
    # argmax as a max and a min (lowest index on ties): XLA:CPU's arg-max reduction is
    # several times slower than two plain ones.
    first = _first_true(x == row_max, x.shape[-1])
    return jnp.where(valid, first, jnp.int32(-1))


def token_logprobs(logits: ArrayLike, tokens: ArrayLike) -> Array:
    """``log_softmax(logits)[token]`` per row, in float32.

    Used for both the raw log-prob (the model's logits) and the processed one (the
    logits actually sampled from). A removed token (``-inf`` logit) gives ``-inf``; an
    out-of-range token (``-1``) or an invalid row gives NaN.

    Args:
      logits: ``[..., V]`` floating array.
      tokens: integer array broadcastable to ``logits.shape[:-1]``.

    Returns:
      ``float32[...]``.

    Example:
      >>> import jax.numpy as jnp
      >>> token_logprobs(jnp.log(jnp.array([0.25, 0.75])), jnp.array(1))
      Array(-0.28768203, dtype=float32)
    """
    _val.check_logits(logits, "token_logprobs")
    logits = jnp.asarray(logits)
    batch_shape = logits.shape[:-1]
    _val.check_batch_shape("token_logprobs", "tokens", tokens, batch_shape)
    tokens = jnp.broadcast_to(jnp.asarray(tokens), batch_shape)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"token_logprobs: tokens must be integers, got dtype {tokens.dtype}")
    return _token_logprobs(logits, tokens)


@jax.jit
def _token_logprobs(logits: Array, tokens: Array) -> Array:
    vocab = logits.shape[-1]
    x = logits.astype(_F32)  # [..., V]
    # log_softmax(x)[t] = (x_t - max) - log(sum(exp(x - max))), the same arithmetic as
    # jax.nn.log_softmax, without writing the [..., V] log-probs out.
    row_max = jnp.max(x, axis=-1)  # [...]
    log_total = jnp.log(jnp.sum(jnp.exp(x - row_max[..., None]), axis=-1))
    index = jnp.clip(tokens, 0, vocab - 1).astype(jnp.int32)[..., None]
    picked = jnp.take_along_axis(x, index, axis=-1)[..., 0]
    logp = (picked - row_max) - log_total
    in_range = (tokens >= 0) & (tokens < vocab)
    return jnp.where(in_range, logp, jnp.float32(np.nan))


def entropy(logits: ArrayLike) -> Array:
    """Shannon entropy (nats) of ``softmax(logits)`` per row, in float32.

    Math: ``H = -sum_i q_i ln q_i`` with ``q = softmax(logits)`` and ``0 ln 0 = 0``, so
    ``-inf`` entries (tokens a filter removed) contribute exactly nothing; a
    hand-written ``-(p * log_softmax(x)).sum()`` gives NaN there (``0 * -inf``). A row
    with no finite logit, a NaN or a ``+inf`` has no distribution: NaN.

    Args:
      logits: ``[..., V]`` floating array.

    Returns:
      ``float32[...]``.

    Example:
      >>> import jax.numpy as jnp
      >>> entropy(jnp.array([0.0, 0.0, -jnp.inf, -jnp.inf]))  # ln 2
      Array(0.6931472, dtype=float32)
    """
    _val.check_logits(logits, "entropy")
    return _entropy(jnp.asarray(logits))


@jax.jit
def _entropy(logits: Array) -> Array:
    x = logits.astype(_F32)  # [..., V]
    valid, row_max = _valid_rows(x)
    z = x - jnp.where(valid[..., None], row_max, 0.0)
    logq = z - jnp.log(jnp.sum(jnp.exp(z), axis=-1, keepdims=True))  # [..., V]
    h = -jnp.sum(jnp.where(x > -jnp.inf, jnp.exp(logq) * logq, 0.0), axis=-1)
    return jnp.where(valid, h, jnp.float32(np.nan))
