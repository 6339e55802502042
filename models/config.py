"""Decoder configuration: a frozen dataclass with named presets."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_ACTIVATIONS = ("silu", "gelu_tanh")
_ROPE_TYPES = ("linear", "llama3", "longrope")
_QK_NORMS = (None, "head", "full")
_MOE_IMPLS = ("auto", "gather", "ragged", "dense", "auto_dense")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for longer contexts (Hugging Face `rope_scaling`).

    Attributes:
      rope_type: "linear" (every inverse frequency divided by `factor`) or "llama3"
        (Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth
        interpolation between; see `models.rope.inverse_frequencies`).
      factor: the context extension factor.
      low_freq_factor, high_freq_factor: llama3 only.
      original_max_position_embeddings: llama3, longrope (the pretraining length).
      short_factor, long_factor: longrope (Phi-3, Phi-4-mini) only: per-frequency
        divisors of the inverse frequencies ([rotary_dim / 2] each); a call whose
        row reaches beyond `original_max_position_embeddings` uses `long_factor`,
        otherwise `short_factor`, as transformers decides per forward call.
      attention_factor: longrope only: cos and sin are multiplied by it.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float = 1.0

    def __post_init__(self):
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(f"RopeScaling.rope_type must be one of {list(_ROPE_TYPES)}, got {self.rope_type!r}")
        if not self.factor > 0:
            raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor!r}")
        if self.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                value = getattr(self, name)
                if not isinstance(value, tuple) or not value or any(
                        not isinstance(x, (int, float)) or not x > 0 for x in value):
                    raise ValueError(f"RopeScaling.{name} must be a non-empty tuple of numbers > 0 for longrope, "
                                     f"got {value!r}")
            if len(self.short_factor) != len(self.long_factor):
                raise ValueError("RopeScaling: short_factor and long_factor differ in length")
            if not self.attention_factor > 0:
                raise ValueError(f"RopeScaling.attention_factor must be > 0, got {self.attention_factor!r}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(f"RopeScaling: llama3 needs high_freq_factor > low_freq_factor > 0, got "
                             f"{self.high_freq_factor!r} and {self.low_freq_factor!r}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and numerics of a Llama-style decoder (tied embeddings by default).

    The fields after `dtype` are the family switches of the Hugging Face checkpoints
    `models.load_hf` reads; their defaults are the plain tied Llama decoder.

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
      tie_embeddings: logits = hidden @ embedding.T; False adds an `lm_head` matrix.
      qkv_bias: biases on the query/key/value projections (Qwen2).
      activation: gate activation of the gated MLP: "silu" (SwiGLU) or "gelu_tanh"
        (GeGLU with the tanh approximation, Gemma).
      norm_plus_one: RMSNorm scales by (1 + w) instead of w (Gemma; w starts at 0).
      embed_scale: multiply the embeddings by sqrt(d_model) (Gemma).
      post_norms: also RMSNorm the attention and MLP outputs before the residual
        add (Gemma 2).
      attn_scale: query scale; None is 1 / sqrt(head_dim) (Gemma 2:
        query_pre_attn_scalar ** -0.5).
      attn_softcap: attention scores -> cap * tanh(scores / cap) (Gemma 2); None: off.
      final_softcap: logits -> cap * tanh(logits / cap) (Gemma 2); None: off.
      sliding_window: a query at position t attends to keys at positions
        > t - sliding_window (Mistral, Gemma 2); None: the whole context.
      sliding_window_layers: the layers that use the window; None: every layer.
      rope_scaling: None, or a `RopeScaling` (Llama 3.1 "llama3", "linear", Phi-3 "longrope").
      qk_norm: RMSNorm of the queries and keys before RoPE: None (off), "head" (over
        each head's Dh: Qwen3, Gemma 3) or "full" (over the whole projection: OLMo 2).
      pre_norms: RMSNorm the input of each sublayer (False: OLMo 2, which only
        normalises the sublayer outputs; then `post_norms` must be True).
      no_rope_layers: layers whose attention uses no rotary embedding (SmolLM3).
      rotary_dim: rotate only the first `rotary_dim` of each head's Dh (Phi-3/Phi-4-mini
        `partial_rotary_factor`); None: all of them.
      local_rope_theta: RoPE base of the sliding-window layers, which then use no
        `rope_scaling` (Gemma 3); None: every layer uses `rope_theta` and `rope_scaling`.
      num_experts: experts of the sparse MoE MLP (0: dense MLP everywhere).
      experts_per_token: top-k experts each token is routed to.
      moe_d_ff: hidden width of each expert.
      norm_topk_prob: renormalise the top-k router probabilities to sum to 1 (Mixtral
        always; Qwen3-MoE's `norm_topk_prob`).
      moe_layers: the layers with a MoE MLP (the others are dense with `d_ff`);
        None: every layer (when num_experts > 0).
      moe_impl: how a MoE layer computes: "gather" (each token's chosen experts'
        weights gathered: reads k experts per token), "ragged" (tokens sorted by
        expert, `jax.lax.ragged_dot` grouped matmuls), "dense" (every expert on every
        token, weighted by a mask: the reference and benchmark baseline), "auto"
        (gather when tokens * k <= num_experts, i.e. decode; ragged otherwise),
        "auto_dense" (gather, else dense: for code that vmaps the model, such as
        `models.sharding`, since `jax.lax.ragged_dot` has no batching rule there).
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
    tie_embeddings: bool = True
    qkv_bias: bool = False
    activation: str = "silu"
    norm_plus_one: bool = False
    embed_scale: bool = False
    post_norms: bool = False
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] | None = None
    rope_scaling: RopeScaling | None = None
    qk_norm: str | None = None
    pre_norms: bool = True
    no_rope_layers: tuple[int, ...] = ()
    rotary_dim: int | None = None
    local_rope_theta: float | None = None
    num_experts: int = 0
    experts_per_token: int = 0
    moe_d_ff: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[int, ...] | None = None
    moe_impl: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"DecoderConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"DecoderConfig.{name} must be a finite number > 0, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"DecoderConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"DecoderConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"DecoderConfig.activation must be one of {list(_ACTIVATIONS)}, got {self.activation!r}")
        for name in ("attn_scale", "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"DecoderConfig.{name} must be None or > 0, got {value!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"DecoderConfig.sliding_window must be None or a positive int, got {self.sliding_window!r}")
        layers = self.sliding_window_layers
        if layers is not None:
            if not isinstance(layers, tuple) or any(not isinstance(i, int) or not 0 <= i < self.n_layers
                                                    for i in layers):
                raise ValueError(f"DecoderConfig.sliding_window_layers must be a tuple of layer indices in "
                                 f"[0, {self.n_layers}), got {layers!r}")
            if self.sliding_window is None and layers:
                raise ValueError(f"DecoderConfig.sliding_window_layers={layers!r} needs a sliding_window")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"DecoderConfig.rope_scaling must be None or a RopeScaling, got {self.rope_scaling!r}")
        if self.qk_norm not in _QK_NORMS:
            raise ValueError(f"DecoderConfig.qk_norm must be one of {list(_QK_NORMS)}, got {self.qk_norm!r}")
        if not self.pre_norms and not self.post_norms:
            raise ValueError("DecoderConfig.pre_norms=False needs post_norms=True (some norm per sublayer)")
        for name in ("no_rope_layers", "moe_layers"):
            value = getattr(self, name)
            if value is None and name == "moe_layers":
                continue
            if not isinstance(value, tuple) or any(not isinstance(i, int) or not 0 <= i < self.n_layers
                                                   for i in value):
                raise ValueError(f"DecoderConfig.{name} must be a tuple of layer indices in [0, {self.n_layers}), "
                                 f"got {value!r}")
        if self.rotary_dim is not None and (not isinstance(self.rotary_dim, int) or self.rotary_dim <= 0
                                            or self.rotary_dim % 2 or self.rotary_dim > self.head_dim):
            raise ValueError(f"DecoderConfig.rotary_dim must be None or an even int in (0, head_dim={self.head_dim}], "
                             f"got {self.rotary_dim!r}")
        rs = self.rope_scaling
        if rs is not None and rs.rope_type == "longrope" and 2 * len(rs.short_factor) != self.rotary_width:
            raise ValueError(f"RopeScaling longrope factors have {len(rs.short_factor)} entries, expected "
                             f"rotary width / 2 = {self.rotary_width // 2}")
        if self.local_rope_theta is not None and not self.local_rope_theta > 0:
            raise ValueError(f"DecoderConfig.local_rope_theta must be None or > 0, got {self.local_rope_theta!r}")
        if self.moe_impl not in _MOE_IMPLS:
            raise ValueError(f"DecoderConfig.moe_impl must be one of {list(_MOE_IMPLS)}, got {self.moe_impl!r}")
        if self.num_experts:
            for name in ("num_experts", "experts_per_token", "moe_d_ff"):
                value = getattr(self, name)
                if not isinstance(value, int) or value <= 0:
                    raise ValueError(f"DecoderConfig.{name} must be a positive int for a MoE model, got {value!r}")
            if self.experts_per_token > self.num_experts:
                raise ValueError(f"DecoderConfig.experts_per_token={self.experts_per_token} exceeds "
                                 f"num_experts={self.num_experts}")

    @property
    def rotary_width(self) -> int:
        """How many of each head's Dh dimensions RoPE rotates."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def layer_is_moe(self, layer: int) -> bool:
        """True if layer `layer`'s MLP is the sparse mixture of experts."""
        return self.num_experts > 0 and (self.moe_layers is None or layer in self.moe_layers)

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: it attends to the whole context)."""
        if self.sliding_window_layers is None or layer in self.sliding_window_layers:
            return self.sliding_window
        return None

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
        d = dict(d)
        if isinstance(d.get("rope_scaling"), dict):  # JSON round trip of the nested dataclass
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        for name in ("sliding_window_layers", "no_rope_layers", "moe_layers"):
            if isinstance(d.get(name), list):
                d[name] = tuple(d[name])
        if isinstance(d.get("rope_scaling"), RopeScaling):
            rs = d["rope_scaling"]
            for name in ("short_factor", "long_factor"):
                if isinstance(getattr(rs, name), list):
                    rs = dataclasses.replace(rs, **{name: tuple(getattr(rs, name))})
            d["rope_scaling"] = rs
        return cls(**d)

    def num_params(self) -> int:
        """Parameter count (the embedding counted once when the output projection is tied)."""
        d, h, kv, hd = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        attn = d * h * hd * 2 + d * kv * hd * 2 + (h + 2 * kv) * hd * self.qkv_bias
        attn += {None: 0, "head": 2 * hd, "full": (h + kv) * hd}[self.qk_norm]
        norms = (2 * self.pre_norms + 2 * self.post_norms) * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        total = embed + d
        for i in range(self.n_layers):
            mlp = (self.num_experts * 3 * d * self.moe_d_ff + d * self.num_experts if self.layer_is_moe(i)
                   else 3 * d * self.d_ff)
            total += attn + mlp + norms
        return total

    def num_active_params(self) -> int:
        """Parameters a token computes with: `num_params` with each MoE layer's experts
        counted `experts_per_token` times instead of `num_experts` times."""
        if not self.num_experts:
            return self.num_params()
        n_moe = sum(self.layer_is_moe(i) for i in range(self.n_layers))
        idle = (self.num_experts - self.experts_per_token) * 3 * self.d_model * self.moe_d_ff
        return self.num_params() - n_moe * idle


# Byte-level vocabulary: 256 bytes + BOS, EOS, PAD (see models/tokenizer.py).
BYTE_VOCAB_SIZE = 259

PRESETS: dict[str, DecoderConfig] = {
    # Tiny: for unit tests (compiles in a second or two on CPU).
    "tiny": DecoderConfig(vocab_size=BYTE_VOCAB_SIZE, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                          head_dim=8, d_ff=64, max_seq_len=128),
    # The model shipped in models/checkpoints/shakespeare (byte-level, trained on CPU).
    "shakespeare": DecoderConfig(vocab_size=BYTE_VOCAB_SIZE, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
                                 head_dim=64, d_ff=768, max_seq_len=512),
    # Llama-shaped 110M for benchmarks (the Llama-110M shape of the peers' published benchmarks).
    "llama-110m": DecoderConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                                head_dim=64, d_ff=2048, max_seq_len=2048, dtype="bfloat16"),
}


def preset(name: str) -> DecoderConfig:
    """Returns the named preset config (``tiny``, ``shakespeare``, ``llama-110m``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
