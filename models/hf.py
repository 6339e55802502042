"""Load local Hugging Face checkpoints of the decoder families below into our `DecoderLM`.

    >>> from models import load_hf
    >>> lm = load_hf("path/to/Llama-3.2-1B")          # config.json + *.safetensors
    >>> logits = lm.forward(tokens)                     # [B, T, V]

Supported `architectures` (each family's details become switches of the one decoder,
see `DecoderConfig`):

| architecture        | what differs from the plain tied Llama decoder                          |
|---------------------|-------------------------------------------------------------------------|
| LlamaForCausalLM    | tied or untied `lm_head`; `rope_scaling` default, `linear`, `llama3`    |
| MistralForCausalLM  | untied; `sliding_window` on every layer                                  |
| Qwen2ForCausalLM    | q/k/v biases; tied or untied; sliding layers from `layer_types`          |
| GemmaForCausalLM    | embeddings * sqrt(D), (1 + w) RMSNorm, GeGLU, free head_dim, tied        |
| Gemma2ForCausalLM   | Gemma + post-norms, attention and final soft-capping, query_pre_attn_scalar, alternating sliding-window layers |
| Qwen3ForCausalLM    | per-head q/k RMSNorm; sliding layers                                     |
| Qwen3MoeForCausalLM | Qwen3 + sparse MoE (top-k, norm_topk_prob, decoder_sparse_step, mlp_only_layers) |
| MixtralForCausalLM  | sparse MoE, top-k renormalised; sliding_window                           |
| Gemma3ForCausalLM   | Gemma 2 + q/k norm, local RoPE base, 5:1 sliding layers, no soft-caps     |
| Gemma3ForConditionalGeneration | its text model only (vision tower not read)                   |
| Phi3ForCausalLM     | fused qkv / gate_up, partial rotary, longrope                           |
| Olmo2ForCausalLM    | norms after each sublayer only, q/k norm over the whole projection       |
| SmolLM3ForCausalLM  | no RoPE on the `no_rope_layers`                                          |

docs/models.md has the details, the MoE benchmark and the ring-cache figures.

Anything else (another architecture, biases where the family has none, another
activation or RoPE type, partial rotary outside Phi-3, bidirectional attention, ...) raises a
`ValueError` naming the field, rather than loading a model that silently computes
something else.

Weights are read with the `safetensors` library one tensor at a time (a single
`model.safetensors`, or the shards named by `model.safetensors.index.json`): names,
shapes and dtypes are checked against the config from the file headers before any
data is read, and each tensor is converted and moved to the device before the next is
read, so peak host memory stays near the size of the loaded model
(scripts/measure_load_memory.py measures it).

Weight layout: Hugging Face `nn.Linear` weights are [out, in]; Flax `Dense` kernels are
[in, out], so projections are transposed. Our RoPE uses the Hugging Face rotate-half
convention, so q/k need no permutation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from models import checkpoint as ckpt
from models.config import DecoderConfig, RopeScaling
from models.decoder import DecoderLM, init_params

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class _Family:
    model_type: str
    tie_default: bool  # the config class's default for tie_word_embeddings
    max_positions_default: int
    activations: tuple[str, ...]  # accepted hidden_act / hidden_activation values
    gemma: bool = False  # scaled embeddings, (1 + w) RMSNorm, GeGLU
    gemma2: bool = False  # + post-norms, soft-capping, query_pre_attn_scalar
    qkv_bias: bool = False  # Qwen2: always on (not a config field)
    qk_norm: str | None = None  # Qwen3, Gemma 3: "head"; OLMo 2: "full"
    olmo2: bool = False  # norms after each sublayer only
    moe: str | None = None  # "qwen3_moe" or "mixtral" tensor names
    fused: bool = False  # Phi-3: qkv_proj and gate_up_proj
    eps_default: float = 1e-6
    theta_default: float = 10000.0
    window_default: int | None = None  # the config class's sliding_window default
    window_switch: bool = False  # the window is off unless use_sliding_window (Qwen2/3, SmolLM3)
    local_rope: bool = False  # Gemma 3: sliding layers have their own RoPE base


FAMILIES: dict[str, _Family] = {
    "LlamaForCausalLM": _Family("llama", False, 2048, ("silu",)),
    "MistralForCausalLM": _Family("mistral", False, 131072, ("silu",), window_default=4096),
    "Qwen2ForCausalLM": _Family("qwen2", False, 32768, ("silu",), qkv_bias=True, window_switch=True),
    # "gelu" is a legacy value of the official Gemma configs meaning the tanh approximation
    # (transformers replaces it the same way).
    "GemmaForCausalLM": _Family("gemma", True, 8192, ("gelu_pytorch_tanh", "gelu"), gemma=True),
    "Gemma2ForCausalLM": _Family("gemma2", True, 8192, ("gelu_pytorch_tanh",), gemma=True, gemma2=True,
                                 window_default=4096),
    "Qwen3ForCausalLM": _Family("qwen3", False, 32768, ("silu",), qk_norm="head", window_switch=True),
    "Qwen3MoeForCausalLM": _Family("qwen3_moe", False, 32768, ("silu",), qk_norm="head", moe="qwen3_moe",
                                   window_switch=True),
    "MixtralForCausalLM": _Family("mixtral", False, 131072, ("silu",), moe="mixtral", eps_default=1e-5,
                                  theta_default=1e6),
    "Gemma3ForCausalLM": _Family("gemma3_text", True, 131072, ("gelu_pytorch_tanh",), gemma=True, gemma2=True,
                                 qk_norm="head", window_default=4096, local_rope=True, theta_default=1e6),
    "Phi3ForCausalLM": _Family("phi3", False, 4096, ("silu",), fused=True, eps_default=1e-5),
    "Olmo2ForCausalLM": _Family("olmo2", False, 2048, ("silu",), qk_norm="full", olmo2=True, eps_default=1e-5),
    "SmolLM3ForCausalLM": _Family("smollm3", True, 32768, ("silu",), window_switch=True, theta_default=2e6),
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
_BY_MODEL_TYPE = {f.model_type: arch for arch, f in FAMILIES.items()}

_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# torch_dtype of the checkpoint -> our dtype. float16 is upcast to float32 (exact):
# the decoder runs in float32 or bfloat16 only.
_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}
_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")


# ---------------------------------------------------------------------------- config


def _read_json(path: str, required: bool = True) -> dict[str, Any]:
    try:
        with open(path) as f:
            blob = json.load(f)
    except FileNotFoundError:
        if not required:
            return {}
        raise ckpt.CheckpointError(f"no {os.path.basename(path)} in {os.path.dirname(path)!r}") from None
    except json.JSONDecodeError as e:
        raise ckpt.CheckpointError(f"{path}: malformed JSON: {e}") from None
    if not isinstance(blob, dict):
        raise ckpt.CheckpointError(f"{path}: expected a JSON object, got {type(blob).__name__}")
    return blob


def read_hf_config(directory: str) -> dict[str, Any]:
    """config.json of a Hugging Face checkpoint directory, as a dict."""
    return _read_json(os.path.join(directory, CONFIG_FILE))


MULTIMODAL = {"Gemma3ForConditionalGeneration": ("gemma3", "Gemma3ForCausalLM", "gemma3_text")}
# Tensor-name prefixes of a multimodal checkpoint's text model (the Hub's layout, and the one
# transformers 5 holds in memory) and the parts the text model never reads.
_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def text_model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The text model's config of a multimodal checkpoint (Gemma 3's `text_config`), as a
    text-only config.json; any other config is returned unchanged.

    The vision tower and projector are not loaded (the decoder takes token ids only); a
    checkpoint without a `text_config` dict says so.
    """
    archs = hf.get("architectures")
    if not (isinstance(archs, list) and len(archs) == 1 and archs[0] in MULTIMODAL):
        return hf
    model_type, text_arch, text_type = MULTIMODAL[archs[0]]
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"config.json: {archs[0]} needs a text_config dict to load its text model, got "
                         f"text_config={text!r}")
    if text.get("model_type", text_type) != text_type:
        raise ValueError(f"config.json: text_config.model_type={text.get('model_type')!r}, expected {text_type!r}")
    out = {**text, "architectures": [text_arch], "model_type": text_type}
    for field in ("tie_word_embeddings", "torch_dtype", "dtype", "quantization_config"):
        if field in hf and field not in text:
            out[field] = hf[field]
    return out


def _text_names(locations: dict[str, str]) -> dict[str, Any]:
    """A multimodal checkpoint's text-model tensors under the text-only names (vision dropped):
    text-only name -> (name in the file, file)."""
    if not any(name.startswith(("language_model.", "model.language_model.")) for name in locations):
        return locations
    out = {}
    for name, file in locations.items():
        original = name
        if name.startswith(_VISION_PREFIXES):
            continue
        for old, new in _TEXT_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = (original, file)
    return out


def is_hf_checkpoint(directory: str) -> bool:
    """True if `directory`'s config.json names a Hugging Face model (`model_type` or
    `architectures`); our own checkpoints (a "model" section) return False."""
    try:
        cfg = read_hf_config(directory)
    except (ckpt.CheckpointError, OSError):
        return False
    return "model" not in cfg and ("model_type" in cfg or "architectures" in cfg)


def _family(hf: dict[str, Any]) -> tuple[str, _Family]:
    archs = hf.get("architectures")
    if not archs and hf.get("model_type") in _BY_MODEL_TYPE:
        archs = [_BY_MODEL_TYPE[hf["model_type"]]]
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in FAMILIES:
        raise ValueError(f"unsupported architectures={archs!r}: expected one of {list(SUPPORTED_ARCHITECTURES)}")
    family = FAMILIES[archs[0]]
    model_type = hf.get("model_type", family.model_type)
    if model_type != family.model_type:
        raise ValueError(f"unsupported model_type={model_type!r} for {archs[0]}: expected {family.model_type!r}")
    return archs[0], family


def _positive_int(hf: dict[str, Any], field: str) -> int:
    """hf[field] as a positive int, or a ValueError naming config.json's field and value."""
    value = hf[field]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config.json: {field}={value!r} must be a positive int")
    return value


def _positive_float(value: Any, field: str) -> float:
    """A finite number > 0 (not a bool or a string), or a ValueError naming config.json's field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"config.json: {field}={value!r} must be a finite number > 0")
    return float(value)


def _number(params: dict, key: str, field: str, kind=float):
    try:
        value = params[key]
    except KeyError:
        raise ValueError(f"config.json: {field}={params!r} needs {key!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ValueError(f"config.json: {field}.{key}={value!r} must be a number")
    return kind(value)


def _scaling(params: dict, field: str, hf: dict[str, Any], rotary: int) -> RopeScaling | None:
    """A `RopeScaling` from one rope_scaling / rope_parameters dict (None: default RoPE)."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("su", "yarn") and hf.get("model_type") == "phi3":
        rope_type = "longrope"  # transformers' Phi3Config renames these legacy values
    if rope_type not in ("default", "linear", "llama3", "longrope"):
        raise ValueError(f"unsupported {field}={params!r}: rope_type {rope_type!r} is not 'default', "
                         "'linear', 'llama3' or 'longrope'")
    if rope_type == "longrope" and hf.get("model_type") != "phi3":
        raise ValueError(f"unsupported {field}.rope_type='longrope' for model_type={hf.get('model_type')!r} "
                         "(implemented for phi3)")
    if rope_type == "default":
        return None
    if rope_type == "linear":
        return RopeScaling("linear", _number(params, "factor", field))
    if rope_type == "llama3":
        return RopeScaling("llama3", _number(params, "factor", field), _number(params, "low_freq_factor", field),
                           _number(params, "high_freq_factor", field),
                           _number(params, "original_max_position_embeddings", field, int))
    # longrope (Phi-3 / Phi-4-mini), as transformers' _compute_longrope_parameters
    original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
        raise ValueError(f"config.json: {field} longrope needs a positive original_max_position_embeddings, "
                         f"got {original!r}")
    factors = {}
    for key in ("short_factor", "long_factor"):
        value = params.get(key)
        if (not isinstance(value, list) or len(value) != rotary // 2
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 for x in value)):
            raise ValueError(f"config.json: {field}.{key} must be a list of {rotary // 2} numbers > 0 "
                             f"(rotary width / 2), got {value!r}")
        factors[key] = tuple(float(x) for x in value)
    factor = params.get("factor")
    if factor is None:
        factor = hf.get("max_position_embeddings", 4096) / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling("longrope", float(factor), original_max_position_embeddings=original,
                       attention_factor=_positive_float(attention, f"{field}.attention_factor"), **factors)


def _theta(value, field: str, theta):
    if value is None:
        return theta
    value = _positive_float(value, field)
    if theta is not None and float(theta) != value:
        raise ValueError(f"config.json: conflicting rope_theta={theta!r} and {field}={value!r}")
    return value


def _rope(hf: dict[str, Any], family: _Family, rotary: int) -> tuple[float, RopeScaling | None, float | None]:
    """(rope_theta, scaling, local_rope_theta) from the transformers 4.x (`rope_scaling`,
    `rope_local_base_freq`) or 5.x (`rope_parameters`, per layer type for Gemma 3) layout."""
    theta, scaling = hf.get("rope_theta"), None
    if theta is not None:
        theta = _positive_float(theta, "rope_theta")
    local = hf.get("rope_local_base_freq") if family.local_rope else None
    if local is not None:
        local = _positive_float(local, "rope_local_base_freq")
    for field in ("rope_scaling", "rope_parameters"):
        params = hf.get(field)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ValueError(f"unsupported {field}={params!r}: expected null or a dict")
        if family.local_rope and field == "rope_parameters" and (
                "full_attention" in params or "sliding_attention" in params):
            unknown = sorted(set(params) - {"full_attention", "sliding_attention"})
            if unknown:
                raise ValueError(f"unsupported {field} layer types {unknown}")
            sliding = params.get("sliding_attention") or {}
            if _scaling(sliding, f"{field}.sliding_attention", hf, rotary) is not None:
                raise ValueError(f"unsupported {field}.sliding_attention={sliding!r}: the local layers' RoPE "
                                 "must be the default type")
            local = _theta(sliding.get("rope_theta"), f"{field}.sliding_attention.rope_theta", local)
            params, field = (params.get("full_attention") or {}), f"{field}.full_attention"
        factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if factor != 1.0 and not family.fused:
            raise ValueError(f"unsupported {field}.partial_rotary_factor={factor!r}: partial rotary embeddings "
                             "are implemented for phi3")
        new = _scaling(params, field, hf, rotary)
        theta = _theta(params.get("rope_theta"), f"{field}.rope_theta", theta)
        if new is None:
            continue
        if scaling is not None and scaling != new:
            raise ValueError(f"conflicting rope_scaling and rope_parameters: {scaling!r} vs {new!r}")
        scaling = new
    theta = family.theta_default if theta is None else theta
    if family.local_rope and local is None:
        local = 10000.0
    return theta, scaling, local


def _layer_list(hf: dict[str, Any], field: str, n_layers: int) -> list:
    value = hf.get(field)
    if not isinstance(value, list) or len(value) != n_layers:
        raise ValueError(f"config.json: {field}={value!r} must be a list of {n_layers} entries (one per layer)")
    return value


def _sliding(hf: dict[str, Any], family: _Family, n_layers: int) -> tuple[int | None, tuple[int, ...] | None]:
    """(sliding_window, sliding_window_layers) as transformers builds the masks."""
    window = hf.get("sliding_window", family.window_default)  # an explicit null is none
    if family.window_switch and not hf.get("use_sliding_window", False):
        window = None  # Qwen2/Qwen3/SmolLM3 configs carry a window that is off unless use_sliding_window
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        layer_types = _layer_list(hf, "layer_types", n_layers)
        if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
            raise ValueError(f"unsupported layer_types={layer_types!r}: expected {n_layers} entries of "
                             "'full_attention' or 'sliding_attention'")
        layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    elif family.model_type == "gemma2":
        layers = tuple(range(0, n_layers, 2))  # layers 0, 2, 4, ... are local
    elif family.model_type == "gemma3_text":
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern <= 0:
            raise ValueError(f"config.json: sliding_window_pattern={pattern!r} must be a positive int")
        layers = tuple(i for i in range(n_layers) if (i + 1) % pattern)
    elif family.model_type in ("qwen2", "qwen3", "qwen3_moe"):
        layers = tuple(range(hf.get("max_window_layers", 28), n_layers))
    elif family.model_type == "smollm3":
        layers = tuple(i for i, rope in enumerate(_no_rope(hf, n_layers)) if not rope)
    else:
        layers = None  # every layer
    if window is None:
        if layer_types is not None and layers and not family.window_switch:
            raise ValueError(f"layer_types={layer_types!r} names sliding layers but sliding_window is null")
        return None, None
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ValueError(f"unsupported sliding_window={window!r}: expected null or a positive int")
    return (window, layers) if layers != () else (None, None)


def _no_rope(hf: dict[str, Any], n_layers: int) -> list[int]:
    """SmolLM3's per-layer RoPE switch: 1 = rotary, 0 = none (NoPE)."""
    if hf.get("no_rope_layers") is not None:
        flags = _layer_list(hf, "no_rope_layers", n_layers)
        if any(f not in (0, 1) or isinstance(f, bool) for f in flags):
            raise ValueError(f"config.json: no_rope_layers={flags!r} must hold 0 or 1 per layer")
        return flags
    interval = hf.get("no_rope_layer_interval", 4)
    if not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0:
        raise ValueError(f"config.json: no_rope_layer_interval={interval!r} must be a positive int")
    return [int((i + 1) % interval != 0) for i in range(n_layers)]


def _moe(hf: dict[str, Any], family: _Family, n_layers: int) -> dict[str, Any]:
    """DecoderConfig MoE fields of a Qwen3-MoE or Mixtral config."""
    if family.moe == "mixtral":
        experts_field = "num_local_experts"
        experts = hf.get(experts_field, 8)
        d_ff_field, norm, layers = "intermediate_size", True, None
    else:
        experts_field = "num_experts" if "num_experts" in hf else "num_local_experts"
        experts = hf.get(experts_field, 128)
        d_ff_field = "moe_intermediate_size"
        norm = hf.get("norm_topk_prob", False)
        if not isinstance(norm, bool):
            raise ValueError(f"config.json: norm_topk_prob={norm!r} must be true or false")
        step = hf.get("decoder_sparse_step", 1)
        only = hf.get("mlp_only_layers") or []
        if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
            raise ValueError(f"config.json: decoder_sparse_step={step!r} must be a positive int")
        if not isinstance(only, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in only):
            raise ValueError(f"config.json: mlp_only_layers={only!r} must be a list of layer indices")
        layers = tuple(i for i in range(n_layers) if i not in only and (i + 1) % step == 0)
    for field, value in ((experts_field, experts), ("num_experts_per_tok", hf.get("num_experts_per_tok", 2)),
                         (d_ff_field, hf.get(d_ff_field))):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"config.json: {field}={value!r} must be a positive int")
    k = hf.get("num_experts_per_tok", 2)
    if k > experts:
        raise ValueError(f"config.json: num_experts_per_tok={k} exceeds {experts_field}={experts}")
    if experts and layers != ():
        return dict(num_experts=experts, experts_per_token=k, moe_d_ff=hf[d_ff_field], norm_topk_prob=norm,
                    moe_layers=None if layers is None or len(layers) == n_layers else layers)
    return {}


def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> DecoderConfig:
    """Maps a Hugging Face config.json dict (one of `SUPPORTED_ARCHITECTURES`) to a `DecoderConfig`.

    Raises ValueError naming the field and value for anything our decoder can't represent
    exactly. `dtype` (float32/bfloat16) overrides the checkpoint's torch_dtype.
    """
    arch, family = _family(hf)
    act_field = "hidden_activation" if hf.get("hidden_activation") else "hidden_act"
    act = hf.get(act_field, family.activations[0])
    if act not in family.activations:
        raise ValueError(f"unsupported {act_field}={act!r} for {arch}: expected one of {list(family.activations)}")
    for field in ("attention_bias", "mlp_bias", "use_bidirectional_attention", "quantization_config"):
        if hf.get(field):
            raise ValueError(f"unsupported {field}={hf[field]!r}")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [f for f in required if f not in hf]
    if missing:
        raise ValueError(f"config.json lacks required fields {missing}")
    for field in required:
        _positive_int(hf, field)
    for field in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        if hf.get(field) is not None:
            _positive_int(hf, field)
    hidden, heads, n_layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or (256 if family.gemma else hidden // heads)
    if not hf.get("head_dim") and not family.gemma and hidden % heads:
        raise ValueError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                         "(and config.json gives no head_dim)")
    if family.fused and hf.get("head_dim") not in (None, hidden // heads):
        raise ValueError(f"unsupported head_dim={hf['head_dim']!r} for {arch}: its head width is "
                         f"hidden_size / num_attention_heads = {hidden // heads}")
    partial = hf.get("partial_rotary_factor", (hf.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
                     if isinstance(hf.get("rope_parameters"), dict) else 1.0)
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise ValueError(f"config.json: partial_rotary_factor={partial!r} must be in (0, 1]")
    if partial != 1.0 and not family.fused:
        raise ValueError(f"unsupported partial_rotary_factor={partial!r} for {arch}: partial rotary embeddings "
                         "are implemented for phi3")
    rotary = int(head_dim * partial)
    if rotary % 2 or rotary <= 0:
        raise ValueError(f"config.json: partial_rotary_factor={partial!r} gives an odd or empty rotary width "
                         f"{rotary} of head_dim={head_dim}")
    theta, scaling, local_theta = _rope(hf, family, rotary)
    window, window_layers = _sliding(hf, family, n_layers)

    if dtype is None:
        torch_dtype = hf.get("torch_dtype", hf.get("dtype")) or "float32"
        if torch_dtype not in _TORCH_DTYPES:
            raise ValueError(f"unsupported torch_dtype={torch_dtype!r}: expected one of {sorted(_TORCH_DTYPES)}")
        dtype = _TORCH_DTYPES[torch_dtype]
    elif dtype not in _NP_DTYPES:
        raise ValueError(f"unsupported dtype={dtype!r}: expected one of {sorted(_NP_DTYPES)}")

    extra: dict[str, Any] = {}
    if family.gemma2:
        scalar = hf.get("query_pre_attn_scalar", 256)
        softcaps = ((None, None) if family.model_type == "gemma3_text" else (50.0, 30.0))
        extra = dict(post_norms=True, attn_scale=_positive_float(scalar, "query_pre_attn_scalar") ** -0.5,
                     attn_softcap=hf.get("attn_logit_softcapping", softcaps[0]),
                     final_softcap=hf.get("final_logit_softcapping", softcaps[1]))
    if family.olmo2:
        extra.update(post_norms=True, pre_norms=False)
    if family.model_type == "smollm3":
        extra["no_rope_layers"] = tuple(i for i, rope in enumerate(_no_rope(hf, n_layers)) if not rope)
    if family.moe:
        extra.update(_moe(hf, family, n_layers))
    return DecoderConfig(
        vocab_size=hf["vocab_size"], d_model=hidden, n_layers=n_layers, n_heads=heads,
        n_kv_heads=kv_heads, head_dim=head_dim, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", family.max_positions_default), rope_theta=theta,
        norm_eps=_positive_float(hf.get("rms_norm_eps", family.eps_default), "rms_norm_eps"), dtype=dtype,
        tie_embeddings=bool(hf.get("tie_word_embeddings", family.tie_default)), qkv_bias=family.qkv_bias,
        activation="gelu_tanh" if family.gemma else "silu", norm_plus_one=family.gemma,
        embed_scale=family.gemma, sliding_window=window, sliding_window_layers=window_layers,
        rope_scaling=scaling, qk_norm=family.qk_norm, rotary_dim=None if rotary == head_dim else rotary,
        local_rope_theta=local_theta if window is not None else None, **extra)


# ---------------------------------------------------------------------------- weights


@dataclasses.dataclass(frozen=True)
class Piece:
    """Where (part of) a Hugging Face tensor goes: rows [lo, hi) of it (fused projections,
    Phi-3), or expert `expert` of a stacked [E, ...] parameter (MoE)."""

    name: str
    lo: int | None = None
    hi: int | None = None
    expert: int | None = None


def expected_hf_tensors(c: DecoderConfig, fused: bool = False,
                        moe_names: str = "qwen3_moe") -> dict[str, tuple[tuple[int, ...], Any, bool]]:
    """HF tensor name -> (HF shape, our flat parameter name or a tuple of `Piece`s, transpose?).

    `fused`: Phi-3's qkv_proj / gate_up_proj; `moe_names`: "qwen3_moe"
    (mlp.gate, mlp.experts.E.{gate,up,down}_proj) or "mixtral"
    (block_sparse_moe.gate, block_sparse_moe.experts.E.w1/w3/w2).
    """
    d, hd = c.d_model, c.head_dim
    h, kv = c.n_heads * hd, c.n_kv_heads * hd
    out: dict[str, tuple[tuple[int, ...], Any, bool]] = {
        "model.embed_tokens.weight": ((c.vocab_size, d), "embed.embedding", False),
        "model.norm.weight": ((d,), "final_norm.scale", False)}
    if not c.tie_embeddings:
        out["lm_head.weight"] = ((c.vocab_size, d), "lm_head.kernel", True)
    for i in range(c.n_layers):
        p, q = f"model.layers.{i}.", f"layers_{i}."
        out[p + "self_attn.o_proj.weight"] = ((d, h), q + "o.kernel", True)
        if fused:
            out[p + "self_attn.qkv_proj.weight"] = ((h + 2 * kv, d), (
                Piece(q + "q.kernel", 0, h), Piece(q + "k.kernel", h, h + kv),
                Piece(q + "v.kernel", h + kv, h + 2 * kv)), True)
        else:
            out.update({
                p + "self_attn.q_proj.weight": ((h, d), q + "q.kernel", True),
                p + "self_attn.k_proj.weight": ((kv, d), q + "k.kernel", True),
                p + "self_attn.v_proj.weight": ((kv, d), q + "v.kernel", True),
            })
        if c.layer_is_moe(i):
            e, f = c.num_experts, c.moe_d_ff
            if moe_names == "mixtral":
                m, names = p + "block_sparse_moe.", ("w1", "w3", "w2")
            else:
                m, names = p + "mlp.", ("gate_proj", "up_proj", "down_proj")
            out[m + "gate.weight"] = ((e, d), q + "moe.router.kernel", True)
            for j in range(e):
                x = f"{m}experts.{j}."
                out[x + names[0] + ".weight"] = ((f, d), (Piece(q + "moe.gate", expert=j),), True)
                out[x + names[1] + ".weight"] = ((f, d), (Piece(q + "moe.up", expert=j),), True)
                out[x + names[2] + ".weight"] = ((d, f), (Piece(q + "moe.down", expert=j),), True)
        elif fused:
            out[p + "mlp.gate_up_proj.weight"] = ((2 * c.d_ff, d), (
                Piece(q + "gate.kernel", 0, c.d_ff), Piece(q + "up.kernel", c.d_ff, 2 * c.d_ff)), True)
            out[p + "mlp.down_proj.weight"] = ((d, c.d_ff), q + "down.kernel", True)
        else:
            out.update({
                p + "mlp.gate_proj.weight": ((c.d_ff, d), q + "gate.kernel", True),
                p + "mlp.up_proj.weight": ((c.d_ff, d), q + "up.kernel", True),
                p + "mlp.down_proj.weight": ((d, c.d_ff), q + "down.kernel", True),
            })
        if c.qk_norm is not None:
            qn, kn = (hd, hd) if c.qk_norm == "head" else (h, kv)
            out[p + "self_attn.q_norm.weight"] = ((qn,), q + "q_norm.scale", False)
            out[p + "self_attn.k_norm.weight"] = ((kn,), q + "k_norm.scale", False)
        if c.qkv_bias:
            out.update({
                p + "self_attn.q_proj.bias": ((h,), q + "q.bias", False),
                p + "self_attn.k_proj.bias": ((kv,), q + "k.bias", False),
                p + "self_attn.v_proj.bias": ((kv,), q + "v.bias", False),
            })
        if c.pre_norms:
            out[p + "input_layernorm.weight"] = ((d,), q + "attn_norm.scale", False)
        if c.post_norms:  # Gemma 2/3, OLMo 2: post_attention_layernorm is the attention's post-norm
            out[p + "post_attention_layernorm.weight"] = ((d,), q + "attn_post_norm.scale", False)
            out[p + "post_feedforward_layernorm.weight"] = ((d,), q + "mlp_post_norm.scale", False)
            if c.pre_norms:
                out[p + "pre_feedforward_layernorm.weight"] = ((d,), q + "mlp_norm.scale", False)
        else:
            out[p + "post_attention_layernorm.weight"] = ((d,), q + "mlp_norm.scale", False)
    return out


def _open(path: str):
    """safe_open with errors that name the file and say what is wrong."""
    try:
        return safe_open(path, framework="numpy")
    except FileNotFoundError:
        raise ckpt.CheckpointError(f"checkpoint file not found: {path}") from None
    except (SafetensorError, OSError) as e:
        raise ckpt.CheckpointError(f"{path}: {ckpt.explain_bad_safetensors(path, e)}") from None


def _check_shard_name(name: str, index_path: str) -> None:
    """A shard named by the index must be a relative path inside the checkpoint directory.

    The name is confined, not the resolved file: a symbolic link inside the directory
    (as in the Hugging Face cache, whose snapshot files link to its blobs) is followed.
    """
    parts = name.replace("\\", "/").split("/")
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise ckpt.CheckpointError(f"{index_path}: shard name {name!r} is not a relative path inside the "
                                   "checkpoint directory")


def _layer_indices(names) -> set[int]:
    out = set()
    for name in names:
        parts = name.split(".")
        for a, b in zip(parts, parts[1:]):
            if a == "layers" and b.isdigit():
                out.add(int(b))
                break
    return out


def check_layer_count(n_layers: Any, locations: dict[str, str], directory: str) -> None:
    """Refuses a config whose layer count exceeds the layers the checkpoint's tensors hold,
    before anything per layer is built (a forged `num_hidden_layers: 10**7` on a small file)."""
    present = _layer_indices(locations)
    held = max(present) + 1 if present else 0
    if isinstance(n_layers, int) and not isinstance(n_layers, bool) and n_layers > held:
        raise ckpt.CheckpointError(f"{directory}: config.json num_hidden_layers={n_layers} but the checkpoint's "
                                   f"tensors hold {held} layers")


def tensor_locations(directory: str) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it (single file, or the index's shards)."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ckpt.CheckpointError(f"{index_path}: malformed index: no 'weight_map' of tensor name -> file")
        files = sorted(set(weight_map.values()))
        for f in files:
            _check_shard_name(f, index_path)
        absent = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if absent:
            raise ckpt.CheckpointError(f"{index_path}: shard files listed in the index are missing: {absent}")
    elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise ckpt.CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory!r} "
                                   "(only safetensors checkpoints are supported)")
    locations: dict[str, str] = {}
    for file in files:
        path = os.path.join(directory, file)
        with _open(path) as f:
            for name in f.keys():
                if weight_map is not None and weight_map.get(name) != file:
                    continue  # the index is authoritative (stale copies in other shards are ignored)
                if name in locations:
                    raise ckpt.CheckpointError(f"{directory}: tensor {name!r} is in both {locations[name]} "
                                               f"and {file}")
                locations[name] = file
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(locations), key=_natural)
        if absent:
            raise ckpt.CheckpointError(f"{index_path}: tensors listed in the index but not in their shard: "
                                       f"{absent[:5]}")
    return locations


def _normalize_names(locations: dict[str, str], config: DecoderConfig) -> dict[str, tuple[str, str]]:
    """Our expected HF name -> (name in the file, file); drops what the model never reads."""
    out = {}
    bare = "model.embed_tokens.weight" not in locations and "embed_tokens.weight" in locations
    for name, file in locations.items():
        source, file = file if isinstance(file, tuple) else (name, file)  # renamed: (name in the file, file)
        if name.endswith("rotary_emb.inv_freq"):  # an old buffer, recomputed
            continue
        if name == "lm_head.weight" and config.tie_embeddings:  # tied: transformers ignores it too
            continue
        out[("model." + name) if bare and name != "lm_head.weight" else name] = (source, file)
    return out


def iter_hf_tensors(directory: str, config: DecoderConfig, locations: dict[str, str] | None = None,
                    fused: bool = False, moe_names: str = "qwen3_moe") -> Iterator[tuple[str, np.ndarray]]:
    """Yields (our flat parameter name, array in our layout and dtype), one tensor at a time.

    Every name, shape and dtype is validated from the file headers before any data is read.
    `locations` is `tensor_locations(directory)` when the caller has it already.
    """
    if locations is None:
        locations = tensor_locations(directory)
    check_layer_count(config.n_layers, locations, directory)
    locations = _normalize_names(locations, config)
    expected = expected_hf_tensors(config, fused, moe_names)
    missing = sorted(set(expected) - set(locations), key=_natural)
    unexpected = sorted(set(locations) - set(expected), key=_natural)
    if missing or unexpected:
        raise ckpt.CheckpointError(
            f"{directory}: tensor names do not match the config ({config.n_layers} layers, "
            f"tie_embeddings={config.tie_embeddings}, qkv_bias={config.qkv_bias}, post_norms={config.post_norms}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(locations[name][1], []).append(name)
    for file, names in by_file.items():
        with _open(os.path.join(directory, file)) as f:
            for name in names:
                info = f.get_slice(locations[name][0])
                shape, st_dtype = tuple(info.get_shape()), info.get_dtype()
                if shape != expected[name][0]:
                    raise ckpt.CheckpointError(f"{directory}/{file}: tensor {name!r} has shape {shape}, "
                                               f"expected {expected[name][0]} from config.json")
                if st_dtype not in _FLOAT_DTYPES:
                    raise ckpt.CheckpointError(f"{directory}/{file}: tensor {name!r} has non-float dtype {st_dtype}")
    target = _NP_DTYPES[config.dtype]
    stacks: dict[str, list] = {}
    for file, names in by_file.items():
        path = os.path.join(directory, file)
        for name in names:
            # One open per tensor: the file's memory map (whose touched pages count as
            # resident memory) is released after each tensor, not after the whole shard.
            with _open(path) as f:
                try:
                    arr = f.get_tensor(locations[name][0])
                except SafetensorError as e:
                    raise ckpt.CheckpointError(f"{path}: cannot read tensor {name!r}: {e}") from None
            _, ours, transpose = expected[name]
            arr = arr.astype(target, copy=False)
            if isinstance(ours, str):
                yield ours, (arr.T if transpose else arr)
                continue
            for piece in ours:
                part = arr if piece.lo is None else arr[piece.lo:piece.hi]
                part = part.T if transpose else part
                if piece.expert is None:
                    yield piece.name, np.ascontiguousarray(part)
                    continue
                if piece.name not in stacks:  # experts of one layer: [E, ...], yielded when complete
                    stacks[piece.name] = [np.empty((config.num_experts,) + part.shape, target), 0]
                stacks[piece.name][0][piece.expert] = part
                stacks[piece.name][1] += 1
                if stacks[piece.name][1] == config.num_experts:
                    yield piece.name, stacks.pop(piece.name)[0]


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def load_hf(directory: str, dtype: str | None = None) -> DecoderLM:
    """Loads a local Hugging Face checkpoint directory (one of `SUPPORTED_ARCHITECTURES`).

    Args:
      directory: holds config.json and model.safetensors (or shards + index).
      dtype: "float32" or "bfloat16"; default: the checkpoint's torch_dtype
        (float16 checkpoints load as float32).
    Returns:
      A `DecoderLM` (the `generate` protocol, plus `forward(tokens) -> [B, T, V]`).
    Raises:
      ValueError: the config describes a model our decoder cannot represent exactly;
        the message names the field.
      CheckpointError (a ValueError): files missing or truncated, tensor names or shapes wrong.

    Example:
      >>> lm = load_hf("path/to/Qwen2-0.5B")
      >>> lm.config.qkv_bias, lm.config.tie_embeddings
      (True, True)
    """
    raw = read_hf_config(directory)
    hf = text_model_config(raw)
    locations = tensor_locations(directory)  # file headers only
    if hf is not raw:  # multimodal: the text model's tensors, renamed; the vision tower is not read
        text = _text_names(locations)
        if not any(name.startswith("model.layers.") for name in text):
            raise ckpt.CheckpointError(f"{directory}: {raw['architectures'][0]} checkpoint without its text "
                                       "model's weights (no language_model.model.layers.* tensors)")
        locations = text
    check_layer_count(hf.get("num_hidden_layers"), locations, directory)  # before any per-layer build
    config = config_from_hf(hf, dtype)
    _, family = _family(hf)
    flat = {}
    for name, arr in iter_hf_tensors(directory, config, locations, family.fused, family.moe or "qwen3_moe"):
        flat[name] = jnp.asarray(arr)  # on the device now; the host copy is freed before the next tensor
        del arr
    template = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return DecoderLM(params=ckpt.unflatten_like(template, flat, directory), config=config)


# ------------------------------------------------------------------ generation defaults


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """The checkpoint's generation settings (`generation_config.json`, then `config.json`).

    Attributes:
      eos_ids: every end-of-sequence id, in order, without repeats (Llama 3 has several).
      temperature, top_p, top_k: the checkpoint's default sampling values; None where the
        checkpoint sets none. `do_sample: false` makes the temperature 0 (greedy), as
        transformers does.
    """

    eos_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None


def _ids(value: Any, field: str) -> list[int]:
    values = value if isinstance(value, list) else [] if value is None else [value]
    if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
        raise ValueError(f"{field}={value!r}: expected an int or a list of ints")
    return values


def read_generation_defaults(directory: str) -> GenerationDefaults:
    """Reads `GenerationDefaults` from a checkpoint directory (missing files give empty defaults)."""
    config = _read_json(os.path.join(directory, CONFIG_FILE), required=False)
    gen = _read_json(os.path.join(directory, GENERATION_CONFIG_FILE), required=False)
    eos = []
    for value, field in ((gen.get("eos_token_id"), "generation_config.json eos_token_id"),
                         (config.get("eos_token_id"), "config.json eos_token_id")):
        for i in _ids(value, field):
            if i not in eos:
                eos.append(i)
    temperature, top_p, top_k = gen.get("temperature"), gen.get("top_p"), gen.get("top_k")
    if gen.get("do_sample") is False:
        temperature = 0.0
    return GenerationDefaults(
        eos_ids=tuple(eos), temperature=None if temperature is None else float(temperature),
        top_p=None if top_p is None else float(top_p), top_k=None if top_k is None else int(top_k))
