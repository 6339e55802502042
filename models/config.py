"""Decoder configuration: a frozen dataclass with named presets."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and numerics of a Llama-style decoder with tied embeddings.

    Attributes:
      vocab_size: number of token ids V; logits have shape [..., V].
      d_model: hidden width.
      n_layers: number of transformer blocks.
      n_heads: query heads.
      n_kv_heads: key/value heads (grouped-query attention); divides n_heads.
      head_dim: width of one head (d_model // n_heads for Llama checkpoints).
      d_ff: hidden width of the SwiGLU MLP.
      max_seq_len: longest sequence the model was built for (cache size default).
      rope_theta: base of the rotary position embedding.
      norm_eps: epsilon of RMSNorm.
      dtype: "float32" or "bfloat16", for weights and activations. Logits are
        always returned in float32.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"DecoderConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"DecoderConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"DecoderConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def replace(self, **changes: Any) -> "DecoderConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DecoderConfig fields {unknown}")
        return cls(**d)

    def num_params(self) -> int:
        """Parameter count (embedding counted once: the output projection is tied)."""
        d, h, kv, hd = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        attn = d * h * hd * 2 + d * kv * hd * 2
        mlp = 3 * d * self.d_ff
        return self.vocab_size * d + self.n_layers * (attn + mlp + 2 * d) + d


# Byte-level vocabulary: 256 bytes + BOS, EOS, PAD (see models/tokenizer.py).
BYTE_VOCAB_SIZE = 259

PRESETS: dict[str, DecoderConfig] = {
    # Tiny: for unit tests (compiles in a second or two on CPU).
    "tiny": DecoderConfig(vocab_size=BYTE_VOCAB_SIZE, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                          head_dim=8, d_ff=64, max_seq_len=128),
    # The model shipped in models/checkpoints/shakespeare (byte-level, trained on CPU).
    "shakespeare": DecoderConfig(vocab_size=BYTE_VOCAB_SIZE, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
                                 head_dim=64, d_ff=768, max_seq_len=512),
    # Llama-shaped 110M for benchmarks (the shape in shared/ANCHORS.md).
    "llama-110m": DecoderConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                                head_dim=64, d_ff=2048, max_seq_len=2048, dtype="bfloat16"),
}


def preset(name: str) -> DecoderConfig:
    """Returns the named preset config (``tiny``, ``shakespeare``, ``llama-110m``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
