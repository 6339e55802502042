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
