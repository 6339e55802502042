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


class KVCache(NamedTuple):
    """Keys and values of every layer: tuples of L arrays, each [B, K, S, Dh].

    Head-major, so each (row, kv head) reads one contiguous [S, Dh] block in attention
    (no transpose of the cache per step). Position s of row b holds the key/value of
    that row's token at position s.
    Which positions are valid is decided by the caller's positions (a query at
    position t attends to cache positions <= t), so the cache needs no length field.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def init_cache(config: DecoderConfig, batch_size: int, max_len: int) -> KVCache:
    """An all-zero cache for `batch_size` rows of up to `max_len` positions."""
    shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
    zeros = tuple(jnp.zeros(shape, config.jnp_dtype) for _ in range(config.n_layers))
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


class Block(nn.Module):
    config: DecoderConfig
    window: int | None = None  # sliding window of this layer (None: whole context)

    @nn.compact
    def __call__(self, x, positions, cache_kv):
        """x: [B, T, D]; positions: [B, T]; cache_kv: None or (k, v), each [B, K, S, Dh]."""
        c = self.config
        dt = c.jnp_dtype
        out_std = 0.02 / math.sqrt(2 * c.n_layers)
        norm = lambda name: RMSNorm(c.norm_eps, dt, c.norm_plus_one, name=name)  # noqa: E731

        y = norm("attn_norm")(x)
        b, t, _ = y.shape
        q = _dense(c.n_heads * c.head_dim, "q", dt, bias=c.qkv_bias)(y).reshape(b, t, c.n_heads, c.head_dim)
        k = _dense(c.n_kv_heads * c.head_dim, "k", dt, bias=c.qkv_bias)(y).reshape(b, t, c.n_kv_heads, c.head_dim)
        v = _dense(c.n_kv_heads * c.head_dim, "v", dt, bias=c.qkv_bias)(y).reshape(b, t, c.n_kv_heads, c.head_dim)
        q = rope(q, positions, c.rope_theta, c.rope_scaling)
        k = rope(k, positions, c.rope_theta, c.rope_scaling).transpose(0, 2, 1, 3)  # [B, K, T, Dh]
        v = v.transpose(0, 2, 1, 3)  # [B, K, T, Dh]

        if cache_kv is None:  # Full forward: attend within this call, causally.
            keys, values, key_pos = k, v, positions
        else:  # Write this call's keys/values at their positions, then attend over the cache.
            cache_k, cache_v = cache_kv
            rows = jnp.arange(b)[:, None]  # [B, 1] with positions [B, T]: cache[b, :, pos[b, t]]
            k_rows = k.astype(cache_k.dtype).transpose(0, 2, 1, 3)  # [B, T, K, Dh]
            v_rows = v.astype(cache_v.dtype).transpose(0, 2, 1, 3)
            # Outside [0, S) nothing is written (negative indices would wrap): the logits are NaN.
            write_at = jnp.where(positions < 0, cache_k.shape[2], positions)
            cache_k = cache_k.at[rows, :, write_at].set(k_rows, mode="drop")
            cache_v = cache_v.at[rows, :, write_at].set(v_rows, mode="drop")
            keys, values = cache_k, cache_v
            s = cache_k.shape[2]
            key_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
            cache_kv = (cache_k, cache_v)
        mask = key_pos[:, None, :] <= positions[:, :, None]  # [B, T, S] causal
        if self.window is not None:  # and only the last `window` positions
            mask &= key_pos[:, None, :] > positions[:, :, None] - self.window
        if cache_kv is not None and t == 1 and self.window is None:  # decode: the filled blocks only
            attn = attend_filled(q, keys, values, positions[:, 0], c.attn_scale, c.attn_softcap,
                                 block=FILLED_BLOCK)
        else:
            attn = attend(q, keys, values, mask, c.attn_scale, c.attn_softcap)
        attn = _dense(c.d_model, "o", dt, out_std)(attn)
        x = x + (norm("attn_post_norm")(attn) if c.post_norms else attn)

        y = norm("mlp_norm")(x)
        gate = _dense(c.d_ff, "gate", dt)(y)
        up = _dense(c.d_ff, "up", dt)(y)
        act = nn.silu(gate) if c.activation == "silu" else nn.gelu(gate, approximate=True)
        mlp = _dense(c.d_model, "down", dt, out_std)(act * up)
        x = x + (norm("mlp_post_norm")(mlp) if c.post_norms else mlp)
        return x, cache_kv


class Decoder(nn.Module):
    """The decoder. `__call__` returns float32 logits and the updated cache."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, tokens, positions, cache: KVCache | None = None, hidden_index=None):
        """
        Args:
          tokens: int32 [B, T].
          positions: int32 [B, T], the position of each token in its row.
          cache: None for a plain forward pass, else a `KVCache` to read and update.
          hidden_index: None for logits at every position ([B, T, V]), or int32 [B]
            to return only the logits at that position of each row ([B, V]).
        Returns:
          (logits, cache); cache is None when none was given.
        """
        c = self.config
        embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.jnp_dtype, param_dtype=c.jnp_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed")
        x = embed(tokens)  # [B, T, D]
        if c.embed_scale:  # Gemma: sqrt(D), rounded to the model's dtype as transformers does
            x = x * jnp.asarray(math.sqrt(c.d_model), c.jnp_dtype)
        new_k, new_v = [], []
        for i in range(c.n_layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x, layer_cache = Block(c, c.layer_window(i), name=f"layers_{i}")(x, positions, layer_cache)
            if cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        if hidden_index is not None:
            x = jnp.take_along_axis(x, hidden_index[:, None, None], axis=1)[:, 0]  # [B, D]
        x = RMSNorm(c.norm_eps, c.jnp_dtype, c.norm_plus_one, name="final_norm")(x)
        if c.tie_embeddings:
            logits = embed.attend(x).astype(jnp.float32)  # tied projection: x @ embedding.T
        else:
            logits = _dense(c.vocab_size, "lm_head", c.jnp_dtype)(x).astype(jnp.float32)
        logits = softcap(logits, c.final_softcap)
        if cache is not None:
            logits = _nan_outside_cache(logits, positions, cache.max_len, hidden_index)
        return logits, (None if cache is None else KVCache(tuple(new_k), tuple(new_v)))


def _nan_outside_cache(logits, positions, max_len: int, hidden_index=None):
    """NaN logits for tokens at a position outside the cache [0, S): never a silent result.

    Such a token's key/value is not written (the scatter drops it), so its logits would
    be computed without its own key; NaN makes the mistake visible (a sampler returns
    -1, `generate` reports NO_VALID_TOKEN). Positions [B, T]; logits [B, T, V], or [B, V]
    at `hidden_index`.
    """
    outside = (positions < 0) | (positions >= max_len)  # [B, T]
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

    def forward(self, tokens: jax.Array) -> jax.Array:
        """Full forward pass without cache: int32 [B, T] -> float32 logits [B, T, V]."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return self._apply(tokens, positions)[0]

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        return init_cache(self.config, batch_size, max_len)

    def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache):
        """Runs right-padded prompts [B, P] through the model in one pass, filling the cache.

        Padding sits after each row's real tokens and, by causality, never influences them.
        Pad positions are replaced by id 0 first: any pad id works, even one outside the
        vocabulary (whose embedding lookup would be NaN, and 0 * NaN in attention would
        otherwise reach the real tokens).
        Returns (logits at each row's last real token [B, V], cache).
        """
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        tokens = jnp.where(positions < lengths[:, None], tokens, 0)
        return self._apply(tokens, positions, cache, hidden_index=lengths - 1)

    def prefill_all(self, tokens: jax.Array, cache: KVCache):
        """Like `prefill` but returns the logits at every prompt position [B, P, V].

        Every id in `tokens` must be inside the vocabulary, padding included (there are
        no lengths to mask it with): `generate` replaces padding by id 0 before calling.
        """
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return self._apply(tokens, positions, cache)

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache):
        """One token per row: tokens int32 [B] at positions int32 [B] -> (logits [B, V], cache).

        A row whose position is outside the cache ([0, S)) gets NaN logits and its cache
        is left unchanged (nothing is overwritten)."""
        logits, cache = self._apply(tokens[:, None], positions[:, None], cache)
        return logits[:, 0], cache

    def extend(self, tokens: jax.Array, positions: jax.Array, cache: KVCache):
        """T tokens per row in one call: tokens int32 [B, T], token t of row b at position
        positions[b] + t -> (logits [B, T, V], cache). Equals T successive `decode` calls
        (up to float rounding); used to verify speculative drafts."""
        positions = positions[:, None] + jnp.arange(tokens.shape[1])[None, :]  # [B, T]
        return self._apply(tokens, positions, cache)
