"""Checkpoints: safetensors for arrays (never pickle), JSON for config and metadata.

A model checkpoint is a directory holding `model.safetensors` and `config.json`
(and optionally a model card). Every file is written to a temporary name and renamed
into place, and a checkpoint directory itself is assembled under a temporary name and
renamed, so a crash never leaves a half-written checkpoint behind.

Arrays are read and written with the `safetensors` library (numpy backend; bfloat16
through ml_dtypes).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import struct
import sys
import tempfile
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from jaxsample import atomic_file
from models.config import DecoderConfig
from models.decoder import DecoderLM, init_params

# The dtypes our checkpoints store (ml_dtypes gives numpy its bfloat16).
_ST_DTYPES = tuple(np.dtype(t) for t in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.int64,
                                         np.int32, np.int16, np.int8, np.uint8, np.uint32, np.uint64, np.bool_))

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, or does not match what was expected."""


# The process umask (read once; os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# ----------------------------------------------------------------------------- files


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same directory + rename."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_safetensors(path: str, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Writes named arrays to a safetensors file (the `safetensors` library), atomically."""
    arrays = {name: np.asarray(arrays[name], order="C") for name in sorted(arrays)}  # keeps 0-d shapes
    for name, arr in arrays.items():
        if arr.dtype not in _ST_DTYPES:
            raise TypeError(f"cannot store {name!r} with dtype {arr.dtype} in safetensors")
    with atomic_file(path) as tmp:
        safetensors.numpy.save_file(arrays, tmp, metadata={str(k): str(v) for k, v in (metadata or {}).items()})


def explain_bad_safetensors(path: str, error: Exception) -> str:
    """A precise reason why `safetensors` refused `path` (truncation found from the sizes),
    else the library's own message."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"truncated safetensors file ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return f"truncated safetensors header (needs {8 + n} bytes, file has {size})"
            header = json.loads(f.read(n))
        data = size - 8 - n
        for name, info in header.items():
            if name != "__metadata__" and info["data_offsets"][1] > data:
                return f"truncated: tensor {name!r} ends at byte {info['data_offsets'][1]}, data has {data}"
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    return f"not a valid safetensors file: {error}"


def load_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a safetensors file; raises `CheckpointError` on a truncated or malformed file."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
    except (safetensors.SafetensorError, OSError, TypeError) as e:
        raise CheckpointError(f"{path}: {explain_bad_safetensors(path, e)}") from None


# --------------------------------------------------------------------------- pytrees


def flatten(tree: Any) -> dict[str, np.ndarray]:
    """Nested dict/tuple pytree -> {"a.b.0.c": array}."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = ".".join(_key_name(k) for k in path)
        flat[name] = np.asarray(leaf)
    return flat


def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def unflatten_like(template: Any, flat: Mapping[str, np.ndarray], what: str) -> Any:
    """Fills `template`'s structure from `flat`, validating names, shapes and dtypes."""
    expected = _shapes(template)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{what}: tensor names do not match: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    for name, (shape, dtype) in expected.items():
        arr = flat[name]
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"{what}: tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}")
        if arr.dtype != dtype:
            raise CheckpointError(f"{what}: tensor {name!r} has dtype {arr.dtype}, expected {dtype}")
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [".".join(_key_name(k) for k in path) for path, _ in leaves_with_path]
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(flat[n]) for n in names])


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[".".join(_key_name(k) for k in path)] = (tuple(leaf.shape), np.dtype(leaf.dtype))
    return out


# ----------------------------------------------------------------------------- models


def save_model(directory: str, lm: DecoderLM, metadata: Mapping[str, Any] | None = None,
               card: str | None = None) -> None:
    """Saves a model as `directory/{model.safetensors, config.json}` (+ README.md card).

    The directory is assembled under a temporary name and renamed into place; an
    existing checkpoint at `directory` is replaced only once the new one is complete,
    by one atomic exchange of the two directories (Linux `renameat2(RENAME_EXCHANGE)`),
    so a reader, or a process killed at any point, finds the old or the new model at
    `directory`, never neither. Where the exchange is unavailable it falls back to two
    renames (the old model sits at `directory.old` between them).
    """
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(directory))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 directories
        save_safetensors(os.path.join(tmp, MODEL_FILE), flatten(lm.params),
                         {"format": "jaxsample-decoder"})
        atomic_write_json(os.path.join(tmp, CONFIG_FILE),
                          {"model": lm.config.to_dict(), "metadata": dict(metadata or {})})
        if card is not None:
            atomic_write_bytes(os.path.join(tmp, "README.md"), card.encode())
        _fsync_dir(tmp)
        if os.path.lexists(directory) and _exchange(tmp, directory):
            # One atomic step: `directory` now holds the new model, `tmp` the old one. A
            # reader (or a kill) sees the old or the new checkpoint, never neither.
            _fsync_dir(parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if os.path.lexists(directory):
            # No atomic exchange here (not Linux, or a file system without RENAME_EXCHANGE):
            # the two renames leave a moment with the old model at `directory`.old only.
            old = directory + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(old, directory)  # put the previous checkpoint back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)  # nothing to replace: one atomic rename
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: str) -> None:
    """Makes the renames inside `path` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps the paths `a` and `b` (both must exist); False where the platform or
    file system cannot (then nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a!r} and {b!r}: {os.strerror(err)}")


def load_config(directory: str) -> tuple[DecoderConfig, dict[str, Any]]:
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            blob = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"no {CONFIG_FILE} in checkpoint directory {directory!r}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON: {e}") from None
    if "model" not in blob:
        raise CheckpointError(f"{path}: no 'model' section (is this a jaxsample checkpoint?)")
    try:
        config = DecoderConfig.from_dict(blob["model"])
    except (TypeError, ValueError) as e:  # missing/unknown fields, invalid values
        raise CheckpointError(f"{path}: invalid model config: {e}") from None
    return config, blob.get("metadata", {})


def load_model(directory: str) -> DecoderLM:
    """Loads a model saved by `save_model`, validating tensor names, shapes and dtypes."""
    config, _ = load_config(directory)
    flat, _ = load_safetensors(os.path.join(directory, MODEL_FILE))
    template = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    params = unflatten_like(template, flat, os.path.join(directory, MODEL_FILE))
    return DecoderLM(params=params, config=config)
