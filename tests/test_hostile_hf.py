"""Hostile Hugging Face checkpoints (issue 24): forged config fields and index files get an
error naming the field (or shard) and file, before anything large is built or read.

The checkpoints are written here with `safetensors.numpy` (no torch needed): a tiny Llama
whose tensors follow `models.hf.expected_hf_tensors`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from models import CheckpointError, load_hf
from models.config import DecoderConfig
from models.hf import expected_hf_tensors

HF_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=16,
                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=24,
                 max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
                 torch_dtype="float32")


def _tensors(seed=0) -> dict[str, np.ndarray]:
    c = DecoderConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=24)
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, (shape, _, _) in expected_hf_tensors(c).items()}


def _write(directory, config=None, index=None, **overrides):
    """A loadable tiny Llama in `directory`, with config.json fields overridden."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**HF_CONFIG, **(config or {}), **overrides}, f)
    tensors = _tensors()
    if index is None:
        save_file(tensors, os.path.join(directory, "model.safetensors"))
    else:  # index: tensor name -> shard name written into the index (the tensors go to shard.safetensors)
        save_file(tensors, os.path.join(directory, "shard.safetensors"))
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": {name: index(name) for name in tensors}}, f)
    return str(directory)


def test_the_clean_checkpoint_loads(tmp_path):
    lm = load_hf(_write(tmp_path / "ok"))
    assert lm.config.n_layers == 2 and lm.config.n_heads == 2


@pytest.mark.parametrize("field", ["num_attention_heads", "hidden_size", "num_hidden_layers", "vocab_size",
                                   "intermediate_size", "num_key_value_heads", "head_dim"])
@pytest.mark.parametrize("value", [0, -2, "4", 2.5, True])
def test_non_positive_or_non_int_sizes_name_the_field(tmp_path, field, value):
    """num_attention_heads: 0 was a ZeroDivisionError; every size is a positive int or refused."""
    with pytest.raises(ValueError, match=f"config.json: {field}={value!r} must be a positive int"):
        load_hf(_write(tmp_path / "bad", **{field: value}))


@pytest.mark.parametrize("value", ["abc", 0, -1e-6, None, float("nan")])
def test_bad_rms_norm_eps_names_field_and_file(tmp_path, value):
    with pytest.raises(ValueError, match=r"config.json: rms_norm_eps=.* must be a finite number > 0"):
        load_hf(_write(tmp_path / "bad", rms_norm_eps=value))


@pytest.mark.parametrize("config", [dict(rope_theta=-10000.0), dict(rope_theta=0),
                                    dict(rope_theta="big"),
                                    dict(rope_theta=None, rope_parameters={"rope_type": "default",
                                                                           "rope_theta": -5.0})])
def test_negative_rope_theta_is_refused(tmp_path, config):
    """A negative base made every logit NaN and loaded without a word."""
    with pytest.raises(ValueError, match="rope_theta"):
        load_hf(_write(tmp_path / "bad", config))


def test_decoder_config_refuses_non_positive_rope_theta_and_eps():
    base = dict(vocab_size=8, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, d_ff=8)
    with pytest.raises(ValueError, match="rope_theta"):
        DecoderConfig(**base, rope_theta=-1.0)
    with pytest.raises(ValueError, match="norm_eps"):
        DecoderConfig(**base, norm_eps=0.0)


def test_huge_layer_count_is_refused_before_building_anything(tmp_path):
    """num_hidden_layers 10**7 on a tiny file: refused from the file headers, in a subprocess whose
    address space is capped at 6 GiB (the old loader built 10**7 layers' tensor names: 6.6 GB)."""
    directory = _write(tmp_path / "huge", num_hidden_layers=10 ** 7)
    code = ("import resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({6 << 30}, {6 << 30}))\n"
            "from models import load_hf\n"
            "try:\n"
            f"    load_hf({directory!r})\n"
            "except ValueError as e:\n"
            "    print('REFUSED', e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                       env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "REFUSED" in r.stdout and "num_hidden_layers=10000000" in r.stdout
    assert "tensors hold 2 layers" in r.stdout


def test_huge_layer_count_in_process(tmp_path):
    with pytest.raises(CheckpointError, match="num_hidden_layers=10000000 but the checkpoint's tensors hold 2"):
        load_hf(_write(tmp_path / "huge", num_hidden_layers=10 ** 7))


@pytest.mark.parametrize("shard", ["../../../../etc/passwd", "/etc/passwd", "sub/../../outside.safetensors",
                                   "..\\..\\x.safetensors", ""])
def test_index_shard_names_are_confined_to_the_directory(tmp_path, shard):
    """An index naming ../../../../etc/passwd as a shard was opened."""
    outside = tmp_path / "outside.safetensors"
    save_file(_tensors(), str(outside))  # a real, readable file outside the checkpoint
    directory = _write(tmp_path / "ckpt" / "sub", index=lambda name: shard if "layers.1" in name
                       else "shard.safetensors")
    with pytest.raises(CheckpointError, match=r"shard name .* is not a relative path inside the checkpoint"):
        load_hf(directory)


def test_index_with_plain_shard_names_loads(tmp_path):
    lm = load_hf(_write(tmp_path / "ok", index=lambda name: "shard.safetensors"))
    assert lm.config.n_layers == 2


# ------------------------------------------------- issue 22: malformed fields of the new families

_FAMILY = {
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=8),
    "qwen3_moe": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=8),
    "mixtral": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4),
    "gemma3": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", head_dim=8),
    "phi3": dict(architectures=["Phi3ForCausalLM"], model_type="phi3"),
    "olmo2": dict(architectures=["Olmo2ForCausalLM"], model_type="olmo2"),
    "smollm3": dict(architectures=["SmolLM3ForCausalLM"], model_type="smollm3"),
}


@pytest.mark.parametrize("family,change,match", [
    ("qwen3", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_parameters=.*yarn"),
    ("qwen3", dict(quantization_config={"quant_method": "fp8"}), "quantization_config=.*fp8"),
    ("qwen3", dict(attention_bias=True), "attention_bias=True"),
    ("qwen3_moe", dict(num_experts_per_tok=5), "num_experts_per_tok=5 exceeds num_experts=4"),
    ("qwen3_moe", dict(moe_intermediate_size=0), "moe_intermediate_size=0"),
    ("qwen3_moe", dict(decoder_sparse_step=0), "decoder_sparse_step=0"),
    ("qwen3_moe", dict(norm_topk_prob="yes"), "norm_topk_prob='yes'"),
    ("mixtral", dict(num_local_experts=0), "num_local_experts=0"),
    ("gemma3", dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     "sliding_attention"),
    ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0}}),
     "rope_parameters.full_attention=.*dynamic"),
    ("gemma3", dict(sliding_window_pattern=0, layer_types=None), "sliding_window_pattern=0"),
    ("gemma3", dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
    ("phi3", dict(rope_parameters={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0] * 4,
                                   "original_max_position_embeddings": 16}), "short_factor must be a list of 4"),
    ("phi3", dict(rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}),
     "original_max_position_embeddings"),
    ("phi3", dict(partial_rotary_factor=0.1), "partial_rotary_factor=0.1"),
    ("olmo2", dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5.*phi3"),
    ("smollm3", dict(no_rope_layers=[1]), "no_rope_layers=.*2 entries"),
    ("smollm3", dict(no_rope_layer_interval=0), "no_rope_layer_interval=0"),
    ("qwen3", dict(rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 4,
                                    "long_factor": [1.0] * 4}), "longrope.*phi3"),
])
def test_new_family_fields_are_refused_by_name(family, change, match):
    from models.hf import config_from_hf

    with pytest.raises(ValueError, match=match):
        config_from_hf({**HF_CONFIG, **_FAMILY[family], **change})


def test_new_families_map_their_switches():
    from models.hf import config_from_hf

    assert config_from_hf({**HF_CONFIG, **_FAMILY["olmo2"]}).pre_norms is False
    assert config_from_hf({**HF_CONFIG, **_FAMILY["smollm3"], "num_hidden_layers": 8}).no_rope_layers == (3, 7)
    moe = config_from_hf({**HF_CONFIG, **_FAMILY["qwen3_moe"], "mlp_only_layers": [0]})
    assert moe.moe_layers == (1,) and moe.norm_topk_prob is False
    g = config_from_hf({**HF_CONFIG, **_FAMILY["gemma3"], "num_hidden_layers": 6, "sliding_window": 4,
                        "rope_local_base_freq": 123.0, "rope_theta": 5e5})
    assert g.sliding_window_layers == (0, 1, 2, 3, 4) and g.local_rope_theta == 123.0 and g.rope_theta == 5e5
