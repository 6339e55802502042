"""Rotary position embeddings (Hugging Face rotate-half convention) and their scalings.

    inv_freq_i = theta ** (-2i / Dh),  i = 0 .. Dh/2 - 1
    linear:  inv_freq / factor
    llama3:  wavelength w = 2 pi / inv_freq, with L = original_max_position_embeddings,
             w > L / low_freq_factor   -> inv_freq / factor         (long wavelengths)
             w < L / high_freq_factor  -> inv_freq                  (short wavelengths)
             otherwise                 -> (1 - s) inv_freq / factor + s inv_freq,
                                          s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)

    longrope (Phi-3): inv_freq / short_factor, or inv_freq / long_factor for a row whose
             call reaches past original_max_position_embeddings; cos and sin times
             attention_factor

The same float32 arithmetic as transformers' `_compute_llama3_parameters` and
`_compute_longrope_parameters`. Partial rotary embeddings (Phi-3's
`partial_rotary_factor`) rotate the first `rotary_dim` dimensions of each head and pass
the rest through.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from models.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """float32 [Dh/2] inverse frequencies of RoPE, scaled as `scaling` says."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "longrope":  # the short factors; `rope` picks the long ones per row
        return inv_freq / jnp.asarray(scaling.short_factor, jnp.float32)
    # llama3
    old_len = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling: RopeScaling | None = None,
         rotary_dim: int | None = None, seq_len: jax.Array | None = None) -> jax.Array:
    """Rotary position embedding, Hugging Face Llama convention (rotate-half).

    Args:
      x: [B, T, heads, Dh].
      positions: [B, T] integer positions.
      theta: the base.
      scaling: None, or a `RopeScaling` (linear, llama3, longrope).
      rotary_dim: rotate only the first `rotary_dim` dimensions (None: all Dh).
      seq_len: longrope only: int32 [B], the sequence length each row's call reaches
        (transformers' max(position_ids) + 1); None: the largest position of the row + 1.
    """
    dh = x.shape[-1]
    rd = dh if rotary_dim is None else rotary_dim
    inv_freq = inverse_frequencies(rd, theta, scaling)  # [rd/2]
    mscale = 1.0
    if scaling is not None and scaling.rope_type == "longrope":
        if seq_len is None:
            seq_len = jnp.max(positions, axis=1) + 1
        long = inverse_frequencies(rd, theta) / jnp.asarray(scaling.long_factor, jnp.float32)
        use_long = (seq_len > scaling.original_max_position_embeddings)[:, None, None]  # [B, 1, 1]
        inv_freq = jnp.where(use_long, long, inv_freq)  # [B, 1, rd/2]
        mscale = scaling.attention_factor
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, rd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, rd]
    x32 = x.astype(jnp.float32)
    x_rot, x_pass = x32[..., :rd], x32[..., rd:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if mscale != 1.0:
        cos, sin = cos * mscale, sin * mscale
    out = x_rot * cos + rotated * sin
    if rd < dh:
        out = jnp.concatenate([out, x_pass], axis=-1)
    return out.astype(x.dtype)
