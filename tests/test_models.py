"""The decoder (cache == forward, padding, tied output), config, tokenizer and checkpoints."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxsample as js
from models import checkpoint as ckpt
from models.config import PRESETS, DecoderConfig, preset
from models.decoder import Decoder, DecoderLM, init_params
from models.tokenizer import ByteTokenizer

# Cached decode vs full forward: max abs logit difference, relative to the largest logit
# (logits reach ~10-30 with the O(1) weights of _lm). float32: 1e-6 of the logit range,
# ~10 ulps of the largest logit (the two paths sum attention in different orders).
RTOL_F32 = 1e-6
# bfloat16 (8-bit mantissa; the cache and full-forward paths round differently): 2%.
RTOL_BF16 = 2e-2


@functools.lru_cache(maxsize=None)
def _lm(config: DecoderConfig, seed: int = 0) -> DecoderLM:
    """Random parameters with O(1) activations (the default init's std 0.02 makes every
    logit ~0.1 and attention nearly uniform, which would hide masking/position bugs).
    Drawn with NumPy into init_params' structure (no compile)."""
    template = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    rng = np.random.default_rng(seed)
    new = []
    for path, leaf in leaves:
        name = path[-1].key
        z = rng.standard_normal(leaf.shape, np.float32)
        if name == "embedding":
            x = z
        elif name == "kernel":
            x = z / np.sqrt(leaf.shape[0])
        else:  # norm scales
            x = 1.0 + 0.2 * z
        new.append(jnp.asarray(x.astype(leaf.dtype)))
    return DecoderLM(jax.tree_util.tree_unflatten(treedef, new), config)


TINY = preset("tiny")  # GQA: 4 query heads, 2 kv heads
CASES = {
    "tiny-gqa": TINY,
    "mha": TINY.replace(n_kv_heads=4),
    "mqa": TINY.replace(n_kv_heads=1, rope_theta=500.0),
}


def _check_cached_decode(lm: DecoderLM, rel_tol: float, seed: int = 0, check_prefix: bool = False):
    """Prefill right-padded prompts of different lengths, then decode token by token
    (teacher-forced); every step's logits must match the full forward pass."""
    rng = np.random.default_rng(seed)
    lengths = np.array([5, 1, 9, 3])
    b, total = len(lengths), 16
    seqs = rng.integers(0, 256, size=(b, total)).astype(np.int32)
    prompt = np.full((b, lengths.max()), ByteTokenizer.pad_id, np.int32)
    for i, n in enumerate(lengths):
        prompt[i, :n] = seqs[i, :n]

    forward = jax.jit(lm.forward)
    full = np.asarray(forward(jnp.asarray(seqs)))  # [B, total, V]
    scale = np.abs(full).max()
    assert scale > 5.0, "logits too small for a meaningful comparison"
    atol = rel_tol * scale
    # The full forward is causal: logits at t equal those of the forward pass over the prefix
    # (so comparing with `full` is comparing with the forward over the sequence so far).
    for t in (0, 11) if check_prefix else ():
        prefix = np.asarray(forward(jnp.asarray(seqs[:, :t + 1])))
        np.testing.assert_allclose(prefix[:, t], full[:, t], atol=atol, rtol=0)

    cache = lm.init_cache(b, 32)
    logits, cache = jax.jit(lm.prefill)(jnp.asarray(prompt), jnp.asarray(lengths), cache)
    np.testing.assert_allclose(np.asarray(logits), full[np.arange(b), lengths - 1], atol=atol, rtol=0)
    decode = jax.jit(lm.decode)
    pos = lengths.copy()
    for step in range(total - lengths.max()):
        logits, cache = decode(jnp.asarray(seqs[np.arange(b), pos]), jnp.asarray(pos), cache)
        np.testing.assert_allclose(np.asarray(logits), full[np.arange(b), pos], atol=atol, rtol=0,
                                   err_msg=f"decode step {step}, positions {pos}")
        pos = pos + 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_cached_decode_matches_forward_f32(name):
    _check_cached_decode(_lm(CASES[name]), RTOL_F32, check_prefix=name == "tiny-gqa")


def test_cached_decode_matches_forward_bf16():
    _check_cached_decode(_lm(TINY.replace(dtype="bfloat16")), RTOL_BF16)


def test_cached_decode_matches_forward_over_many_cache_blocks(monkeypatch):
    """Decode attention reads the cache in blocks (`attend_filled`): with 4-position blocks
    the 32-position cache is 8 blocks, rows at different blocks in one batch."""
    import models.decoder as decoder

    monkeypatch.setattr(decoder, "FILLED_BLOCK", 4)
    _check_cached_decode(_lm(CASES["tiny-gqa"]), RTOL_F32)


@pytest.mark.parametrize("cap", [None, 5.0])
def test_attend_filled_equals_masked_attention_and_ignores_other_rows(cap):
    from models.decoder import attend, attend_filled

    rng = np.random.default_rng(0)
    b, h, kv, s, dh = 4, 4, 2, 40, 8
    q = jnp.asarray(rng.normal(size=(b, 1, h, dh)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, kv, s, dh)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kv, s, dh)), jnp.float32)
    pos = jnp.asarray([0, 7, 8, 37])  # first block, block edges, the overlapping last block
    mask = jnp.arange(s)[None, None, :] <= pos[:, None, None]
    want = attend(q, k, v, mask, 0.3, cap)
    got = attend_filled(q, k, v, pos, 0.3, cap, block=8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-5)
    # Row 1 alone needs one block; beside row 3 the loop runs five: bit-identical results.
    alone = attend_filled(q, k, v, jnp.asarray([0, 7, 0, 0]), 0.3, cap, block=8)
    np.testing.assert_array_equal(np.asarray(alone[1]), np.asarray(got[1]))


def test_padding_never_influences_real_tokens():
    lm = _lm(TINY, seed=3)
    rng = np.random.default_rng(1)
    lengths = jnp.array([2, 6, 4])
    base = rng.integers(0, 256, size=(3, 6)).astype(np.int32)
    mask = np.arange(6)[None] < np.asarray(lengths)[:, None]
    prefill, decode = jax.jit(lm.prefill), jax.jit(lm.decode)
    next_tokens = rng.integers(0, 256, size=(4, 3)).astype(np.int32)

    def run(pad_values):
        tokens = np.where(mask, base, pad_values)
        logits, cache = prefill(jnp.asarray(tokens), lengths, lm.init_cache(3, 16))
        out = [np.asarray(logits)]
        for i, tok in enumerate(next_tokens):
            logits, cache = decode(jnp.asarray(tok), lengths + i, cache)
            out.append(np.asarray(logits))
        return np.stack(out)

    reference = run(ByteTokenizer.pad_id)
    for pads in (0, rng.integers(0, 259, size=(3, 6)), -1, 10_000):  # incl. ids outside the vocabulary
        np.testing.assert_array_equal(run(np.asarray(pads, np.int32)), reference)


def test_logits_are_tied_to_the_embedding():
    lm = _lm(TINY, seed=5)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, size=(2, 7)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(7), tokens.shape)
    apply = jax.jit(lambda p, t, pos: Decoder(TINY).apply({"params": p}, t, pos, capture_intermediates=True,
                                                          mutable=["intermediates"]))
    (logits, _), state = apply(lm.params, tokens, positions)
    hidden = state["intermediates"]["final_norm"]["__call__"][0]  # [B, T, D] after the final norm
    embedding = lm.params["embed"]["embedding"]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(hidden @ embedding.T), atol=1e-5, rtol=1e-5)
    assert not any("lm_head" in k or "unembed" in k for k in ckpt.flatten(lm.params))
    # The embedding matrix is the only output projection: zeroing row v zeroes logit v.
    params = jax.tree.map(lambda x: x, lm.params)
    params["embed"]["embedding"] = embedding.at[42].set(0.0)
    logits2 = jax.jit(DecoderLM.forward)(DecoderLM(params, TINY), tokens)
    np.testing.assert_array_equal(np.asarray(logits2[..., 42]), 0.0)


def test_decode_past_the_cache_end_gives_nan_and_writes_nothing():
    lm = DecoderLM.random(preset("tiny"), jax.random.key(0))
    cache = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape, x.dtype), lm.init_cache(3, 4))
    logits, new = jax.jit(lm.decode)(jnp.array([11, 12, 13]), jnp.array([2, 4, -1]), cache)
    logits = np.asarray(logits)
    assert np.all(np.isfinite(logits[0])) and np.all(np.isnan(logits[1:]))
    for old_k, new_k in zip(cache.k, new.k):
        np.testing.assert_array_equal(new_k[1:], old_k[1:])  # rows past the end: cache untouched
        assert not np.array_equal(new_k[0], old_k[0])
    # a sampler reports such a row as having no valid token
    assert list(np.asarray(js.sample(jax.random.split(jax.random.key(0), 3), logits))) [1:] == [-1, -1]


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("changes,match", [
    (dict(n_kv_heads=3), r"n_kv_heads=3 must divide n_heads=4"),
    (dict(head_dim=7), r"head_dim must be even.*got 7"),
    (dict(dtype="float16"), r"dtype must be one of.*got 'float16'"),
    (dict(d_model=0), r"d_model must be a positive int, got 0"),
    (dict(vocab_size=2.5), r"vocab_size must be a positive int, got 2.5"),
])
def test_config_validation_names_field_and_value(changes, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**changes)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown DecoderConfig fields \['n_embd'\]"):
        DecoderConfig.from_dict({**TINY.to_dict(), "n_embd": 3})
    assert DecoderConfig.from_dict(json.loads(TINY.to_json())) == TINY
    with pytest.raises(ValueError, match="unknown preset 'gpt2'"):
        preset("gpt2")


def test_presets():
    assert set(PRESETS) >= {"tiny", "shakespeare", "llama-110m"}
    big = preset("llama-110m")
    assert (big.d_model, big.n_layers, big.n_heads, big.vocab_size) == (768, 12, 12, 32000)


@pytest.mark.parametrize("name", ["tiny", "shakespeare", "llama-110m"])
def test_num_params_matches_init(name):
    config = preset(name)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    assert config.num_params() == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    if name == "llama-110m":
        assert 100e6 < config.num_params() < 120e6


# ------------------------------------------------------------------------- tokenizer

TEXTS = ["", "hello", "天气不错 🙂🚀 naïve café\n\ttabs", "\x00\x7f control", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 👩‍👩‍👧‍👦"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and all(0 <= i < 256 for i in ids[1:])
    assert len(ids) == 1 + len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_byte_tokenizer_batch():
    tok = ByteTokenizer()
    texts = ["a", "天气", "🙂 ok"]
    ids, lengths = tok.encode_batch(texts)
    assert ids.dtype == np.int32 and lengths.dtype == np.int32
    expected_lengths = [1 + len(t.encode()) for t in texts]
    assert lengths.tolist() == expected_lengths
    assert ids.shape == (3, max(expected_lengths))
    for row, n, t in zip(ids, lengths, texts):
        assert row[:n].tolist() == tok.encode(t)
        assert (row[n:] == tok.pad_id).all()
    assert tok.decode_batch(ids, lengths) == texts
    assert tok.decode_batch(ids) == texts  # pads are special ids: skipped
    with pytest.raises(TypeError):
        tok.encode_batch("not a list")
    with pytest.raises(ValueError):
        tok.encode_batch([""], add_bos=False)


def test_byte_tokenizer_skips_special_ids():
    tok = ByteTokenizer()
    ids = [tok.bos_id, *b"ab", tok.eos_id, tok.pad_id, *b"c", tok.pad_id]
    assert tok.decode(ids) == "abc"
    assert tok.decode(np.array(ids)) == "abc"
    assert tok.decode(list("天".encode())[:2]) == "\ufffd"  # a cut multi-byte char


# ----------------------------------------------------------------------- checkpoints


def _assert_same_model(a: DecoderLM, b: DecoderLM):
    assert a.config == b.config
    assert jax.tree.structure(a.params) == jax.tree.structure(b.params)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    lm = _lm(TINY.replace(dtype=dtype), seed=7)
    path = tmp_path / "ckpt"
    ckpt.save_model(str(path), lm, metadata={"note": "x"}, card="# card\n")
    loaded = ckpt.load_model(str(path))
    _assert_same_model(lm, loaded)
    assert sorted(os.listdir(path)) == ["README.md", "config.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["ckpt"]  # no temp files/dirs left behind
    assert ckpt.load_config(str(path))[1] == {"note": "x"}
    # Overwriting an existing checkpoint also leaves nothing behind.
    lm2 = _lm(TINY.replace(dtype=dtype), seed=8)
    ckpt.save_model(str(path), lm2)
    _assert_same_model(lm2, ckpt.load_model(str(path)))
    assert os.listdir(tmp_path) == ["ckpt"]
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]


def test_saved_files_get_normal_permissions(tmp_path):
    # mkstemp/mkdtemp create 0600/0700 entries; save_model gives them the umask's permissions.
    ckpt.save_model(str(tmp_path / "c"), _lm(TINY))
    assert os.stat(tmp_path / "c").st_mode & 0o777 == 0o777 & ~ckpt._UMASK
    assert os.stat(tmp_path / "c" / "model.safetensors").st_mode & 0o777 == 0o666 & ~ckpt._UMASK


def test_failed_overwrite_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Without an atomic exchange (the fallback of two renames), if moving the new
    checkpoint into place fails, the old one is put back: the directory never ends up
    missing or half-written. (tests/test_hostile.py kills a save with the exchange.)"""
    path = str(tmp_path / "ckpt")
    old = _lm(TINY, seed=1)
    ckpt.save_model(path, old)
    real_replace = os.replace

    def failing_replace(src, dst):  # only the final move of the assembled directory fails
        if os.path.basename(src).startswith(".tmp-ckpt") and os.path.isdir(src):
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    monkeypatch.setattr(ckpt, "_exchange", lambda src, dst: False)  # a platform without RENAME_EXCHANGE
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_model(path, _lm(TINY, seed=2))
    monkeypatch.undo()
    _assert_same_model(old, ckpt.load_model(path))
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.fixture()
def saved(tmp_path):
    lm = _lm(TINY)
    path = tmp_path / "ckpt"
    ckpt.save_model(str(path), lm)
    return lm, path


@pytest.mark.parametrize("keep,match", [
    (5, r"truncated safetensors file \(5 bytes\)"),
    (100, r"truncated safetensors header"),
    (-10, r"truncated: tensor '.*' ends at byte"),
])
def test_truncated_checkpoint_raises(saved, keep, match):
    _, path = saved
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:keep])
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.load_model(str(path))


def _rewrite(path, edit):
    flat, _ = ckpt.load_safetensors(str(path / "model.safetensors"))
    edit(flat)
    ckpt.save_safetensors(str(path / "model.safetensors"), flat)


def test_wrong_shape_raises(saved):
    _, path = saved
    _rewrite(path, lambda f: f.__setitem__("layers_1.up.kernel", np.zeros((32, 65), np.float32)))
    with pytest.raises(ckpt.CheckpointError, match=r"'layers_1.up.kernel' has shape \(32, 65\), expected \(32, 64\)"):
        ckpt.load_model(str(path))


def test_wrong_dtype_raises(saved):
    _, path = saved
    _rewrite(path, lambda f: f.__setitem__("final_norm.scale", f["final_norm.scale"].astype(ml_dtypes.bfloat16)))
    with pytest.raises(ckpt.CheckpointError, match=r"'final_norm.scale' has dtype bfloat16, expected float32"):
        ckpt.load_model(str(path))


def test_missing_and_unexpected_tensors_raise(saved):
    _, path = saved
    _rewrite(path, lambda f: f.pop("layers_0.k.kernel"))
    with pytest.raises(ckpt.CheckpointError, match=r"missing \['layers_0.k.kernel'\]"):
        ckpt.load_model(str(path))
    _rewrite(path, lambda f: f.update({"layers_0.k.kernel": np.zeros((32, 16), np.float32),
                                       "lm_head.kernel": np.zeros((32, 259), np.float32)}))
    with pytest.raises(ckpt.CheckpointError, match=r"unexpected \['lm_head.kernel'\]"):
        ckpt.load_model(str(path))


def test_missing_files_raise(saved, tmp_path):
    _, path = saved
    os.remove(path / "model.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint file not found"):
        ckpt.load_model(str(path))
    with pytest.raises(ckpt.CheckpointError, match="no config.json"):
        ckpt.load_model(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("edit,match", [
    (lambda b: b["model"].update(d_model=64), r"'embed.embedding' has shape \(259, 32\), expected \(259, 64\)"),
    (lambda b: b["model"].update(n_layers=3), r"missing \['layers_2\."),
    (lambda b: b["model"].update(dtype="bfloat16"), r"has dtype float32, expected bfloat16"),
    (lambda b: b["model"].update(n_kv_heads=3), r"invalid model config: .*n_kv_heads=3"),
    (lambda b: b["model"].pop("d_ff"), r"invalid model config: .*d_ff"),
    (lambda b: b["model"].update(hidden=3), r"invalid model config: .*unknown DecoderConfig fields \['hidden'\]"),
    (lambda b: b.pop("model"), r"no 'model' section"),
])
def test_config_json_mismatch_raises(saved, edit, match):
    _, path = saved
    blob = json.loads((path / "config.json").read_text())
    edit(blob)
    (path / "config.json").write_text(json.dumps(blob))
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.load_model(str(path))


def test_malformed_config_json_raises(saved):
    _, path = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="malformed JSON"):
        ckpt.load_model(str(path))
