"""A Llama-style decoder in Flax with a tied output projection and an explicit KV cache.

The config's family switches (models/config.py) turn it into the other decoders that
`models.load_hf` reads: an untied `lm_head`, q/k/v biases (Qwen2), GeGLU, (1 + w)
RMSNorm and scaled embeddings (Gemma), post-norms, soft-capping and sliding-window
layers (Gemma 2, Mistral), scaled RoPE (Llama 3.1). With the defaults it is the
diagram below.

The whole model in one file (nanoGPT style). Shapes use B = batch, T = tokens in this
call, S = cache length, D = d_model, H = query heads, K = key/value heads, Dh = head
width, V = vocabulary.

    h = embedding[tokens]                                  # [B, T, D]
    for each block:
        h = h + Attention(RMSNorm(h))                      # RoPE, grouped-query, KV cache
        h = h + SwiGLU(RMSNorm(h))
    logits = RMSNorm(h) @ embedding.T                      # [B, T, V], tied projection

`DecoderLM` binds a config to its parameters and implements the small model protocol
that `jaxsample.generate` drives: `init_cache`, `prefill` and `decode`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import DecoderConfig
from models.rope import rope


# A sliding-window layer's cache is a ring of `window + RING_SLACK` positions (when that is
# shorter than the cache asked for): position p lives at slot p % size. The slack lets a
# call of up to RING_SLACK + 1 tokens (speculative verification) write drafts that may be
# rejected without overwriting a key the window still needs.
RING_SLACK = 15


class KVCache(NamedTuple):
    """Keys and values of every layer: tuples of L arrays, each [B, K, S_l, Dh].

    Head-major, so each (row, kv head) reads one contiguous [S_l, Dh] block in attention
    (no transpose of the cache per step). A full-attention layer has S_l = the cache
    length S asked for, and position s of row b holds the key/value of that row's token
    at position s. A sliding-window layer of window W holds only a ring of
    S_l = min(S, W + RING_SLACK) positions: position p at slot p % S_l (see
    `layer_cache_len`), so Gemma 3 and Mistral pay for their windows, not the context.
    Which positions are valid is decided by the caller's positions (a query at
    position t attends to cache positions <= t), so the cache needs no length field.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def max_len(self) -> int:
        """The longest cache array (S when the model has a full-attention layer)."""
        return max(k.shape[2] for k in self.k)


def layer_cache_len(config: DecoderConfig, layer: int, max_len: int) -> int:
    """Positions layer `layer`'s cache holds for a cache of `max_len` positions."""
    window = config.layer_window(layer)
    return max_len if window is None else min(max_len, window + RING_SLACK)


def init_cache(config: DecoderConfig, batch_size: int, max_len: int) -> KVCache:
    """An all-zero cache for `batch_size` rows of up to `max_len` positions (sliding-window
    layers hold a ring of their window, see `KVCache`)."""
    zeros = tuple(jnp.zeros((batch_size, config.n_kv_heads, layer_cache_len(config, i, max_len), config.head_dim),
                            config.jnp_dtype) for i in range(config.n_layers))
    return KVCache(k=zeros, v=tuple(jnp.zeros_like(z) for z in zeros))


def cache_bytes(config: DecoderConfig, batch_size: int, max_len: int) -> int:
    """Bytes of `init_cache(config, batch_size, max_len)` (computed from shapes only)."""
    shapes = jax.eval_shape(lambda: init_cache(config, batch_size, max_len))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def position_limit(config: DecoderConfig, cache: KVCache) -> int | None:
    """The first position the cache cannot hold (None: any position >= 0 fits, e.g. a
    model whose layers all use sliding-window rings)."""
    limit = None
    for i, k in enumerate(cache.k):
        size, window = k.shape[2], config.layer_window(i)
        if window is not None and size >= window + RING_SLACK:
            continue  # a full ring: every position fits
        limit = size if limit is None else min(limit, size)
    return limit


def _fresh_cache(config: DecoderConfig, batch_size: int, width: int, like: KVCache) -> KVCache | None:
    """An all-zero cache of `batch_size` rows for a prompt pass of `width` positions from 0,
    each layer as long as such a pass needs (`width`, or its ring) and no longer than in
    `like`; None when a prompt longer than `like` (whose pass must see its limit)."""
    sizes = [layer_cache_len(config, i, width) for i in range(config.n_layers)]
    if any(n > k.shape[2] for n, k in zip(sizes, like.k)):
        return None
    zeros = tuple(jnp.zeros((batch_size, config.n_kv_heads, n, config.head_dim), k.dtype)
                  for n, k in zip(sizes, like.k))
    return KVCache(k=zeros, v=tuple(jnp.zeros_like(z) for z in zeros))


class RMSNorm(nn.Module):
    """x / rms(x) * w, in float32; `plus_one` scales by (1 + w) instead (Gemma, w starts at 0)."""

    eps: float
    dtype: jnp.dtype
    plus_one: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.dtype).astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + scale if self.plus_one else scale)).astype(self.dtype)


def _dense(features: int, name: str, dtype, std: float = 0.02, bias: bool = False) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=dtype,
                    kernel_init=nn.initializers.normal(std), name=name)


def softcap(x, cap: float | None):
    """cap * tanh(x / cap) (Gemma 2's soft-capping); the identity for cap None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def attend(q, k, v, mask, scale: float | None = None, cap: float | None = None):
    """Grouped-query attention.

    Args:
      q: [B, T, H, Dh]; k, v: [B, K, S, Dh] (head-major, like the cache) with K dividing H.
      mask: [B, T, S] bool, True where query t may attend to key s.
      scale: scores are q.k * scale; None divides by sqrt(Dh).
      cap: soft-cap of the scores (None: off).
    Returns:
      [B, T, H * Dh].
    """
    b, t, h, dh = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, t, kv_heads, h // kv_heads, dh)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(dh) if scale is None else scores * scale
    scores = softcap(scores, cap)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, h * dh)


FILLED_BLOCK = 128  # cache positions per block of `attend_filled`


def attend_filled(q, k, v, positions, scale: float | None = None, cap: float | None = None,
                  block: int = FILLED_BLOCK):
    """One decode query per row against a cache, reading only its filled blocks.

    The cost follows the largest position in the batch, not the cache's capacity: the
    cache is read in blocks of ``block`` positions, up to the block holding
    ``max(positions)``, with an online softmax (running max, sum and weighted values in
    float32). A block holding none of a row's positions leaves that row's running values
    exactly as they were, so a row's result does not depend on how many blocks the other
    rows need (the continuous-batching engine's exactness rests on this). Equal to
    `attend` with the causal mask up to float32 rounding.

    Args:
      q: [B, 1, H, Dh]; k, v: [B, K, S, Dh] (head-major cache) with K dividing H.
      positions: int32 [B], the query's position (it attends to cache positions <= it).
      scale, cap: as `attend`.
      block: positions per block (a static int).
    Returns:
      [B, 1, H * Dh].
    """
    b, _, h, dh = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    if s <= block:  # one block: the plain masked form
        mask = jnp.arange(s)[None, None, :] <= positions[:, None, None]
        return attend(q, k, v, mask, scale, cap)
    q = q.reshape(b, kv_heads, h // kv_heads, dh)  # [B, K, G, Dh]
    low = jnp.finfo(jnp.float32).min
    last = jnp.clip(jnp.max(positions), 0, s - 1) // block  # the last block anyone reads

    def body(j, carry):
        m, l, acc = carry  # [B, K, G], [B, K, G], [B, K, G, Dh]
        start = jnp.minimum(j * block, s - block)  # the last block may overlap the one before
        kb = jax.lax.dynamic_slice_in_dim(k, start, block, axis=2)  # [B, K, blk, Dh]
        vb = jax.lax.dynamic_slice_in_dim(v, start, block, axis=2)
        idx = start + jnp.arange(block)  # [blk]
        valid = (idx[None, :] <= positions[:, None]) & (idx[None, :] >= j * block)  # [B, blk]
        scores = jnp.einsum("bkgd,bksd->bkgs", q, kb, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(dh) if scale is None else scores * scale
        scores = jnp.where(valid[:, None, None], softcap(scores, cap), low)
        new_m = jnp.maximum(m, jnp.max(scores, axis=-1))
        p = jnp.where(valid[:, None, None], jnp.exp(scores - new_m[..., None]), 0.0)
        corr = jnp.exp(m - new_m)
        pv = jnp.einsum("bkgs,bksd->bkgd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
        any_valid = jnp.any(valid, axis=-1)[:, None, None]  # [B, 1, 1]
        m = jnp.where(any_valid, new_m, m)
        l = jnp.where(any_valid, l * corr + jnp.sum(p, axis=-1), l)
        acc = jnp.where(any_valid[..., None], acc * corr[..., None] + pv, acc)
        return m, l, acc

    init = (jnp.full((b, kv_heads, h // kv_heads), low, jnp.float32),
            jnp.zeros((b, kv_heads, h // kv_heads), jnp.float32),
            jnp.zeros((b, kv_heads, h // kv_heads, dh), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, last + 1, body, init)
    out = (acc / jnp.where(l > 0, l, 1.0)[..., None]).astype(v.dtype)  # no valid position: zeros
    return out.reshape(b, 1, h * dh)


def _write_rows(cache, new, slots):
    """cache [B, K, S, Dh] with new [B, K, T, Dh] written at slots [B, T] (slot S: dropped)."""
    rows = jnp.arange(cache.shape[0])[:, None]  # [B, 1] with slots [B, T]: cache[b, :, slot[b, t]]
    return cache.at[rows, :, slots].set(new.astype(cache.dtype).transpose(0, 2, 1, 3), mode="drop")


def full_cache_attention(q, k, v, positions, cache_k, cache_v, scale=None, cap=None):
    """Attention of a full-context layer through its linear cache: this call's keys/values
    are written at their positions, then the queries attend over the cache (a decode
    step, T = 1, reads only the blocks up to the batch's largest position: `attend_filled`).

    Args:
      q: [B, T, H, Dh]; k, v: [B, K, T, Dh] (this call's); positions: [B, T].
      cache_k, cache_v: [B, K, S, Dh].
    Returns:
      (attention output [B, T, H * Dh], (cache_k, cache_v)).
    """
    s = cache_k.shape[2]
    # Outside [0, S) nothing is written (negative indices would wrap): the logits are NaN.
    write_at = jnp.where(positions < 0, s, positions)
    cache_k, cache_v = _write_rows(cache_k, k, write_at), _write_rows(cache_v, v, write_at)
    if q.shape[1] == 1:  # decode: only the filled blocks are read
        return attend_filled(q, cache_k, cache_v, positions[:, 0], scale, cap, block=FILLED_BLOCK), (cache_k, cache_v)
    key_pos = jnp.broadcast_to(jnp.arange(s), (q.shape[0], s))
    mask = key_pos[:, None, :] <= positions[:, :, None]  # [B, T, S] causal
    return attend(q, cache_k, cache_v, mask, scale, cap), (cache_k, cache_v)


def ring_cache_attention(q, k, v, positions, seq_len, cache_k, cache_v, window: int, scale=None, cap=None):
    """Attention of a sliding-window layer through its ring cache of R slots.

    The queries attend over the ring as it was before this call (slot r holds the latest
    position < p0 that is r mod R, p0 = the call's first position) followed by this
    call's own keys, masked to the window (t - window, t]; then the call's keys are
    written at slot p % R, only those of real tokens (p < seq_len) among the last R.
    Stale slots (rejected drafts, a previous occupant of the row) always fall outside
    the window, so they are never attended.

    Args:
      q: [B, T, H, Dh]; k, v: [B, K, T, Dh]; positions: [B, T] consecutive per row.
      seq_len: int32 [B]: tokens at positions >= seq_len are padding (not written).
      cache_k, cache_v: [B, K, R, Dh].
    Returns:
      (attention output [B, T, H * Dh], (cache_k, cache_v)).
    """
    r = cache_k.shape[2]
    before = positions[:, :1] - 1  # [B, 1]
    ring_pos = before - jnp.mod(before - jnp.arange(r)[None, :], r)  # [B, R], all <= before
    keys = jnp.concatenate([cache_k, k.astype(cache_k.dtype)], axis=2)
    values = jnp.concatenate([cache_v, v.astype(cache_v.dtype)], axis=2)
    key_pos = jnp.concatenate([ring_pos, positions], axis=1)[:, None, :]  # [B, 1, R + T]
    query_pos = positions[:, :, None]
    mask = (key_pos <= query_pos) & (key_pos > query_pos - window) & (key_pos >= 0)
    out = attend(q, keys, values, mask, scale, cap)
    last = seq_len[:, None]
    write = (positions >= 0) & (positions < last) & (positions >= last - r)
    slots = jnp.where(write, jnp.mod(positions, r), r)
    return out, (_write_rows(cache_k, k, slots), _write_rows(cache_v, v, slots))


def _activation(name: str):
    return nn.silu if name == "silu" else (lambda x: nn.gelu(x, approximate=True))


class MoE(nn.Module):
    """Sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral): router softmax over E experts,
    top-k (`jax.lax.top_k`: ties go to the lower expert index, as torch.topk on CPU),
    optionally renormalised, each token through its k experts' SwiGLU only.

    Parameters: router.kernel [D, E]; gate, up [E, D, F]; down [E, F, D].
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt = c.jnp_dtype
        e, f, d, k = c.num_experts, c.moe_d_ff, c.d_model, c.experts_per_token
        init = nn.initializers.normal(0.02)
        gate = self.param("gate", init, (e, d, f), dt)
        up = self.param("up", init, (e, d, f), dt)
        down = self.param("down", nn.initializers.normal(0.02 / math.sqrt(2 * c.n_layers)), (e, f, d), dt)
        shape = x.shape
        xf = x.reshape(-1, d)  # [N, D]
        probs = jax.nn.softmax(_dense(e, "router", dt)(xf).astype(jnp.float32), axis=-1)  # [N, E]
        weights, experts = jax.lax.top_k(probs, k)  # [N, k]
        if c.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        out = moe_experts(xf, gate, up, down, weights.astype(dt), experts, c.moe_impl, _activation(c.activation))
        return out.reshape(shape)


def moe_experts(x, gate, up, down, weights, experts, impl: str, act):
    """sum_j weights[n, j] * down_e(act(gate_e x) * up_e x), e = experts[n, j].

    Args:
      x: [N, D]; gate, up: [E, D, F]; down: [E, F, D]; weights, experts: [N, k].
      impl: "gather", "ragged", "dense" or "auto" (see `DecoderConfig.moe_impl`).
    Returns:
      [N, D].
    """
    n, k = experts.shape
    e = gate.shape[0]
    if impl in ("auto", "auto_dense"):
        impl = "gather" if n * k <= e else ("ragged" if impl == "auto" else "dense")
    if impl == "gather":  # reads the k chosen experts of each token
        h = act(jnp.einsum("nd,nkdf->nkf", x, gate[experts])) * jnp.einsum("nd,nkdf->nkf", x, up[experts])
        y = jnp.einsum("nkf,nkfd->nkd", h, down[experts])
        return jnp.einsum("nkd,nk->nd", y, weights)
    if impl == "ragged":  # (token, expert) pairs sorted by expert, one grouped matmul per weight
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        token = order // k
        xs = x[token]  # [N k, D]
        sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
        h = act(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
        ys = jax.lax.ragged_dot(h, down, sizes) * weights.reshape(-1)[order][:, None]
        return jnp.zeros_like(x).at[token].add(ys)
    # dense: every expert on every token, weighted by the (mostly zero) combine matrix
    combine = jnp.zeros((n, e), weights.dtype).at[jnp.arange(n)[:, None], experts].set(weights)
    h = act(jnp.einsum("nd,edf->nef", x, gate)) * jnp.einsum("nd,edf->nef", x, up)
    return jnp.einsum("nef,efd,ne->nd", h, down, combine)


class Refill(NamedTuple):
    """Prompts prefilled in the same pass as a decode step (`DecoderLM.decode_refill`).

    In that pass the hidden states are packed: the decode step's B tokens, then the G
    prompts' W tokens each, as one row [1, B + G * W, D], so every weight is read once."""

    lengths: jax.Array  #: int32 [G], each prompt's real tokens (the rest of its W is padding)
    rows: jax.Array  #: int32 [G], the cache row each prompt fills (outside [0, B): nothing written)
    width: int  #: W, the prompts' padded width (static)


def _unpack(y, decode_rows: int, refill: Refill):
    """A packed [1, B + G * W, ...] -> the decode part [B, 1, ...] and the prompts [G, W, ...]."""
    rest = y.shape[2:]
    return y[0, :decode_rows].reshape((decode_rows, 1) + rest), y[0, decode_rows:].reshape((-1, refill.width) + rest)


def _pack(decode_part, prompts):
    """[B, 1, ...] and [G, W, ...] -> [1, B + G * W, ...] (the inverse of `_unpack`)."""
    flat = lambda y: y.reshape((-1,) + y.shape[2:])  # noqa: E731
    return jnp.concatenate([flat(decode_part), flat(prompts)])[None]


def _refill_attention(q, k, v, refill: Refill, cache_kv, window, scale, cap):
    """A `Refill`'s prompts, in a layer of a `decode_refill` pass: each attends causally to
    its own W keys (positions 0..W-1, as a prefill on a fresh cache), and its keys and
    values are written into its cache row: positions [0, W) of a full-attention layer
    (the row's entries past W are left as they are: a query at position t reads only
    positions <= t, each written by the row's own tokens first), the whole ring of a
    sliding-window layer (built as a prefill into an empty ring).

    Args:
      q: [G, W, H, Dh]; k, v: [G, K, W, Dh]; cache_kv: (k, v), each [B, K, S_l, Dh].
    Returns:
      (attention output [G, W, H * Dh], (cache_k, cache_v)).
    """
    cache_k, cache_v = cache_kv
    g, w = refill.rows.shape[0], refill.width
    positions = jnp.broadcast_to(jnp.arange(w), (g, w))
    if window is None:
        mask = positions[:, None, :] <= positions[:, :, None]  # [G, W, W] causal
        out = attend(q, k, v, mask, scale, cap)
        put = lambda c, new: c.at[refill.rows, :, :w].set(new.astype(c.dtype), mode="drop")  # noqa: E731
        return out, (put(cache_k, k), put(cache_v, v))
    ring = jnp.zeros((g,) + cache_k.shape[1:], cache_k.dtype)
    out, (ring_k, ring_v) = ring_cache_attention(q, k, v, positions, refill.lengths, ring, ring, window, scale, cap)
    put = lambda c, new: c.at[refill.rows].set(new, mode="drop")  # noqa: E731
    return out, (put(cache_k, ring_k), put(cache_v, ring_v))


class Block(nn.Module):
    config: DecoderConfig
    layer: int = 0

    @nn.compact
    def __call__(self, x, positions, cache_kv, seq_len, refill: Refill | None = None):
        """x: [B, T, D]; positions: [B, T]; cache_kv: None or (k, v), each [B, K, S_l, Dh];
        seq_len: int32 [B], tokens at positions >= seq_len are padding.

        With ``refill`` (a `decode_refill` pass), x is packed [1, B + G * W, D]: the decode
        step's B tokens (T = 1; positions, seq_len [B] are theirs) then the G prompts
        (`Refill`); every projection runs once on the packed tokens, attention on each part."""
        c = self.config
        dt = c.jnp_dtype
        window = c.layer_window(self.layer)
        out_std = 0.02 / math.sqrt(2 * c.n_layers)
        norm = lambda name: RMSNorm(c.norm_eps, dt, c.norm_plus_one, name=name)  # noqa: E731
        pre = (lambda name, y: norm(name)(y)) if c.pre_norms else (lambda name, y: y)  # noqa: E731

        y = pre("attn_norm", x)
        b, t, _ = y.shape
        hd = c.head_dim
        q = _dense(c.n_heads * hd, "q", dt, bias=c.qkv_bias)(y)
        k = _dense(c.n_kv_heads * hd, "k", dt, bias=c.qkv_bias)(y)
        v = _dense(c.n_kv_heads * hd, "v", dt, bias=c.qkv_bias)(y).reshape(b, t, c.n_kv_heads, hd)
        if c.qk_norm == "full":  # OLMo 2: over the whole projection
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        q, k = q.reshape(b, t, c.n_heads, hd), k.reshape(b, t, c.n_kv_heads, hd)
        if c.qk_norm == "head":  # Qwen3, Gemma 3: over each head
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        if refill is not None:  # the decode part [B, 1, ...] and the prompts [G, W, ...]
            rows = positions.shape[0]
            (q, q_refill), (k, k_refill), (v, v_refill) = (_unpack(y, rows, refill) for y in (q, k, v))
            refill_positions = jnp.broadcast_to(jnp.arange(refill.width), q_refill.shape[:2])
        if self.layer not in c.no_rope_layers:
            local = window is not None and c.local_rope_theta is not None
            theta, scaling = (c.local_rope_theta, None) if local else (c.rope_theta, c.rope_scaling)
            q = rope(q, positions, theta, scaling, c.rotary_dim, seq_len)
            k = rope(k, positions, theta, scaling, c.rotary_dim, seq_len)
            if refill is not None:
                q_refill = rope(q_refill, refill_positions, theta, scaling, c.rotary_dim, refill.lengths)
                k_refill = rope(k_refill, refill_positions, theta, scaling, c.rotary_dim, refill.lengths)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, Dh]

        if refill is not None:  # the prompts' rows first: their writes precede every read of the cache
            attn_refill, cache_kv = _refill_attention(q_refill, k_refill.transpose(0, 2, 1, 3),
                                                      v_refill.transpose(0, 2, 1, 3), refill, cache_kv, window,
                                                      c.attn_scale, c.attn_softcap)
        if cache_kv is None:  # Full forward: attend within this call, causally.
            mask = positions[:, None, :] <= positions[:, :, None]  # [B, T, T]
            if window is not None:
                mask &= positions[:, None, :] > positions[:, :, None] - window
            attn = attend(q, k, v, mask, c.attn_scale, c.attn_softcap)
        elif window is None:
            attn, cache_kv = full_cache_attention(q, k, v, positions, *cache_kv, c.attn_scale, c.attn_softcap)
        else:
            attn, cache_kv = ring_cache_attention(q, k, v, positions, seq_len, *cache_kv, window, c.attn_scale,
                                                  c.attn_softcap)
        if refill is not None:
            attn = _pack(attn, attn_refill)
        attn = _dense(c.d_model, "o", dt, out_std)(attn)
        x = x + (norm("attn_post_norm")(attn) if c.post_norms else attn)

        y = pre("mlp_norm", x)
        if c.layer_is_moe(self.layer):
            mlp = MoE(c, name="moe")(y)
        else:
            gate = _dense(c.d_ff, "gate", dt)(y)
            up = _dense(c.d_ff, "up", dt)(y)
            mlp = _dense(c.d_model, "down", dt, out_std)(_activation(c.activation)(gate) * up)
        x = x + (norm("mlp_post_norm")(mlp) if c.post_norms else mlp)
        return x, cache_kv


class Decoder(nn.Module):
    """The decoder. `__call__` returns float32 logits and the updated cache."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, tokens, positions, cache: KVCache | None = None, hidden_index=None, lengths=None,
                 refill: Refill | None = None, refill_tokens=None):
        """
        Args:
          tokens: int32 [B, T].
          positions: int32 [B, T], the position of each token in its row.
          cache: None for a plain forward pass, else a `KVCache` to read and update.
          hidden_index: None for logits at every position ([B, T, V]), or int32 [B]
            to return only the logits at that position of each row ([B, V]).
          lengths: None (every token is real), or int32 [B]: tokens at positions
            >= lengths are padding (not written into sliding-window rings; longrope
            picks its factors from the real length).
          refill, refill_tokens: a `Refill` and its prompts int32 [G, W], prefilled into
            their cache rows in the same pass (`DecoderLM.decode_refill`; T = 1, a cache,
            no hidden_index): the logits are then ([B, V], the prompts' last real
            tokens' [G, V]).
        Returns:
          (logits, cache); cache is None when none was given.
        """
        c = self.config
        embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.jnp_dtype, param_dtype=c.jnp_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed")
        if refill is not None:
            tokens = _pack(tokens, refill_tokens)  # [1, B + G * W]
        x = embed(tokens)  # [B, T, D]
        if c.embed_scale:  # Gemma: sqrt(D), rounded to the model's dtype as transformers does
            x = x * jnp.asarray(math.sqrt(c.d_model), c.jnp_dtype)
        seq_len = jnp.max(positions, axis=1) + 1 if lengths is None else lengths
        new_k, new_v = [], []
        for i in range(c.n_layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x, layer_cache = Block(c, i, name=f"layers_{i}")(x, positions, layer_cache, seq_len, refill)
            if cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        if refill is not None:  # each decode token, and each prompt's last real token: [B + G, D]
            rows = positions.shape[0]
            last = rows + jnp.arange(refill.rows.shape[0]) * refill.width + refill.lengths - 1
            x = x[0, jnp.concatenate([jnp.arange(rows), last])]
        elif hidden_index is not None:
            x = jnp.take_along_axis(x, hidden_index[:, None, None], axis=1)[:, 0]  # [B, D]
        x = RMSNorm(c.norm_eps, c.jnp_dtype, c.norm_plus_one, name="final_norm")(x)
        if c.tie_embeddings:
            logits = embed.attend(x).astype(jnp.float32)  # tied projection: x @ embedding.T
        else:
            logits = _dense(c.vocab_size, "lm_head", c.jnp_dtype)(x).astype(jnp.float32)
        logits = softcap(logits, c.final_softcap)
        if refill is not None:
            rows = positions.shape[0]
            decode = _nan_outside_cache(logits[:rows, None], positions, position_limit(c, cache))[:, 0]
            return (decode, logits[rows:]), KVCache(tuple(new_k), tuple(new_v))
        if cache is not None:
            logits = _nan_outside_cache(logits, positions, position_limit(c, cache), hidden_index)
        return logits, (None if cache is None else KVCache(tuple(new_k), tuple(new_v)))


def _nan_outside_cache(logits, positions, max_len: int | None, hidden_index=None):
    """NaN logits for tokens at a position outside the cache [0, S): never a silent result.

    Such a token's key/value is not written (the scatter drops it), so its logits would
    be computed without its own key; NaN makes the mistake visible (a sampler returns
    -1, `generate` reports NO_VALID_TOKEN). Positions [B, T]; logits [B, T, V], or [B, V]
    at `hidden_index`. max_len None: only negative positions are outside.
    """
    outside = positions < 0
    if max_len is not None:
        outside |= positions >= max_len  # [B, T]
    if hidden_index is not None:
        outside = jnp.take_along_axis(outside, hidden_index[:, None], axis=1)[:, 0]  # [B]
    return jnp.where(outside[..., None], jnp.nan, logits)


def init_params(config: DecoderConfig, key: jax.Array):
    """Randomly initialised parameters (normal(0.02); residual outputs scaled by 1/sqrt(2L))."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Decoder(config).init(key, tokens, tokens)["params"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecoderLM:
    """A decoder bound to its parameters: the model protocol `jaxsample.generate` drives.

    It is a pytree (parameters are leaves, the config is static), so it can be passed
    straight into jitted functions.

    Example:
      >>> import jax
      >>> from models import DecoderLM, preset
      >>> lm = DecoderLM.random(preset("tiny"), jax.random.key(0))
      >>> logits = lm.forward(jax.numpy.zeros((1, 5), jax.numpy.int32))  # [1, 5, V]
    """

    params: dict
    config: DecoderConfig = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def random(cls, config: DecoderConfig, key: jax.Array) -> "DecoderLM":
        return cls(params=init_params(config, key), config=config)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def _apply(self, *args, **kwargs):
        return Decoder(self.config).apply({"params": self.params}, *args, **kwargs)

    def forward(self, tokens: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """Full forward pass without cache: int32 [B, T] -> float32 logits [B, T, V].

        `lengths` [B] (optional) marks tokens past each row's length as right padding;
        it only matters for longrope, whose factors depend on the real length."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return self._apply(tokens, positions, lengths=lengths)[0]

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        return init_cache(self.config, batch_size, max_len)

    def _prompt_pass(self, tokens, cache: KVCache, **kwargs):
        """A pass over prompts [B, P] at positions 0..P-1 that fills `cache`.

        Its queries attend only to this call's own keys, so the pass runs on a fresh cache
        of P positions (attention over P keys, not the cache's S) whose entries are then
        written at positions [0, P) of `cache`; the rest of `cache` is untouched. A prompt
        longer than the cache runs on the cache itself (its logits past S are NaN).
        """
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        fresh = _fresh_cache(self.config, tokens.shape[0], tokens.shape[1], cache)
        if fresh is None:
            return self._apply(tokens, positions, cache, **kwargs)
        logits, fresh = self._apply(tokens, positions, fresh, **kwargs)
        write = lambda c, f: jax.lax.dynamic_update_slice(c, f.astype(c.dtype), (0,) * c.ndim)  # noqa: E731
        return logits, jax.tree.map(write, cache, fresh)

    def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache):
        """Runs right-padded prompts [B, P] through the model in one pass, filling the cache.

        Padding sits after each row's real tokens and, by causality, never influences them.
        Pad positions are replaced by id 0 first: any pad id works, even one outside the
        vocabulary (whose embedding lookup would be NaN, and 0 * NaN in attention would
        otherwise reach the real tokens). Attention reads P keys, not the cache's S.
        Returns (logits at each row's last real token [B, V], cache).
        """
        tokens = jnp.where(jnp.arange(tokens.shape[1])[None, :] < lengths[:, None], tokens, 0)
        return self._prompt_pass(tokens, cache, hidden_index=lengths - 1, lengths=lengths)

    def prefill_into(self, tokens: jax.Array, lengths: jax.Array, rows: jax.Array, cache: KVCache):
        """Prefills R prompts into rows `rows` of an existing cache (`generate_many`'s refills).

        tokens int32 [R, P] (right-padded; P may be shorter than the prompts `cache` was
        made for), lengths [R], rows int32 [R] -> (logits [R, V] at each prompt's last real
        token, cache). The logits and the rows written are exactly those of `prefill` on a
        fresh cache of R rows (the whole row: nothing of an earlier occupant is left, not
        even past P); every other row of `cache` is untouched, and a row index outside
        [0, B) writes nothing.
        """
        zeros = jax.tree.map(lambda c: jnp.zeros((tokens.shape[0],) + c.shape[1:], c.dtype), cache)
        logits, fresh = self.prefill(tokens, lengths, zeros)  # attends over P keys (see `prefill`)
        return logits, jax.tree.map(lambda c, f: c.at[rows].set(f, mode="drop"), cache, fresh)

    def decode_refill(self, tokens: jax.Array, positions: jax.Array, prompts: jax.Array, lengths: jax.Array,
                      rows: jax.Array, cache: KVCache):
        """A decode step and G prompt prefills in one pass (`generate_many`'s refills): every
        weight is read once for the step's B tokens and the prompts' G * W.

        tokens, positions int32 [B] as `decode`; prompts int32 [G, W] (right-padded),
        lengths [G], rows int32 [G] -> (logits [B, V], the prompts' logits at their last
        real token [G, V], cache). A decode row at a position outside the cache (e.g. -1)
        writes nothing and gets NaN logits; the other decode rows are exactly `decode`'s
        (up to float rounding); a row that is refilled decodes nothing (NaN logits). Prompt
        g is prefilled into cache row ``rows[g]`` as `prefill` writes a fresh row, at positions [0, W) of
        a full-attention layer and over the whole ring of a sliding-window one; a
        full-attention layer keeps the row's earlier entries past W (never attended: a
        query at position t reads positions <= t, which the row's own tokens wrote
        first). A row index outside [0, B) writes nothing.

        Raises:
          ValueError: W is longer than a full-attention layer's cache.
        """
        w = prompts.shape[1]
        for i, k in enumerate(cache.k):
            if self.config.layer_window(i) is None and w > k.shape[2]:
                raise ValueError(f"decode_refill: prompts of width {w} do not fit layer {i}'s cache of "
                                 f"{k.shape[2]} positions")
        prompts = jnp.where(jnp.arange(w)[None, :] < lengths[:, None], prompts, 0)  # padding -> id 0 (`prefill`)
        refilled = jnp.any(jnp.arange(tokens.shape[0])[:, None] == rows[None, :], axis=1)  # [B]
        positions = jnp.where(refilled, -1, positions)  # a refilled row's decode entry writes nothing
        (logits, prompt_logits), cache = self._apply(tokens[:, None], positions[:, None], cache,
                                                     refill=Refill(lengths, rows, w), refill_tokens=prompts)
        return logits, prompt_logits, cache

    def prefill_all(self, tokens: jax.Array, cache: KVCache, lengths: jax.Array | None = None):
        """Like `prefill` but returns the logits at every prompt position [B, P, V].

        Every id in `tokens` must be inside the vocabulary, padding included (there are
        no lengths to mask it with): `generate` replaces padding by id 0 before calling.
        `lengths` [B] (optional; `generate` passes it) keeps padding out of the
        sliding-window rings, as `prefill` does.
        """
        return self._prompt_pass(tokens, cache, lengths=lengths)

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache):
        """One token per row: tokens int32 [B] at positions int32 [B] -> (logits [B, V], cache).

        A row whose position is outside the cache ([0, S)) gets NaN logits and its cache
        is left unchanged (nothing is overwritten)."""
        logits, cache = self._apply(tokens[:, None], positions[:, None], cache)
        return logits[:, 0], cache

    def extend(self, tokens: jax.Array, positions: jax.Array, cache: KVCache):
        """T tokens per row in one call: tokens int32 [B, T], token t of row b at position
        positions[b] + t -> (logits [B, T, V], cache). Equals T successive `decode` calls
        (up to float rounding); used to verify speculative drafts.

        Raises:
          ValueError: T exceeds what a sliding-window ring can take back (its slack,
            RING_SLACK + 1 tokens for a ring of window + RING_SLACK slots).
        """
        t = tokens.shape[1]
        for i, k in enumerate(cache.k):
            window = self.config.layer_window(i)
            if window is not None and k.shape[2] >= window + RING_SLACK and t > k.shape[2] - window + 1:
                raise ValueError(f"extend: {t} tokens in one call exceed layer {i}'s sliding-window ring "
                                 f"({k.shape[2]} slots for window {window}: at most {k.shape[2] - window + 1})")
        positions = positions[:, None] + jnp.arange(t)[None, :]  # [B, T]
        return self._apply(tokens, positions, cache)
