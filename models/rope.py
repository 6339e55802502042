"""Rotary position embeddings (Hugging Face rotate-half convention) and their scalings.

    inv_freq_i = theta ** (-2i / Dh),  i = 0 .. Dh/2 - 1
    linear:  inv_freq / factor
    llama3:  wavelength w = 2 pi / inv_freq, with L = original_max_position_embeddings,
             w > L / low_freq_factor   -> inv_freq / factor         (long wavelengths)
             w < L / high_freq_factor  -> inv_freq                  (short wavelengths)
             otherwise                 -> (1 - s) inv_freq / factor + s inv_freq,
                                          s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)

The same float32 arithmetic as transformers' `_compute_llama3_parameters`.
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
    # llama3
    old_len = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """Rotary position embedding, Hugging Face Llama convention (rotate-half).

    Args:
      x: [B, T, heads, Dh].
      positions: [B, T] integer positions.
      theta: the base.
      scaling: None, or a `RopeScaling` (linear, llama3).
    """
    inv_freq = inverse_frequencies(x.shape[-1], theta, scaling)  # [Dh/2]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
