"""Checkpoints: safetensors for arrays (never pickle), JSON for config and metadata.

A model checkpoint is a directory holding `model.safetensors` and `config.json`
(and optionally a model card). Every file is written to a temporary name and renamed
into place, and a checkpoint directory itself is assembled under a temporary name and
renamed, so a crash never leaves a half-written checkpoint behind.

The safetensors format is small enough to implement here in NumPy: an 8-byte
little-endian header length, a JSON header mapping names to dtype, shape and byte
offsets, then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np

from models.config import DecoderConfig
from models.decoder import DecoderLM, init_params

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

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
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_safetensors(path: str, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Writes named arrays to a safetensors file, atomically."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, blobs = 0, []
    for name in sorted(arrays):
        arr = np.asarray(arrays[name])
        if arr.dtype not in _ST_NAMES:
            raise TypeError(f"cannot store {name!r} with dtype {arr.dtype} in safetensors")
        data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data section to 8 bytes
    atomic_write_bytes(path, struct.pack("<Q", len(head)) + head + b"".join(blobs))


def load_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a safetensors file; raises `CheckpointError` on a truncated or malformed file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    if len(raw) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({len(raw)} bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise CheckpointError(f"{path}: truncated safetensors header (needs {8 + n} bytes, file has {len(raw)})")
    try:
        header = json.loads(raw[8:8 + n])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed safetensors header: {e}") from None
    metadata = header.pop("__metadata__", {}) or {}
    data = memoryview(raw)[8 + n:]
    arrays = {}
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{path}: malformed safetensors header entry for tensor {name!r}: {info!r}")
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if not 0 <= start <= end:
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {[start, end]}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - start != expected:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - start} bytes, shape {shape} needs {expected}")
        if end > len(data):
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end}, data has {len(data)}")
        arrays[name] = np.frombuffer(data[start:end], dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    return arrays, metadata


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
    existing checkpoint at `directory` is replaced only once the new one is complete.
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
        old = None
        if os.path.exists(directory):
            old = directory + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        try:
            os.replace(tmp, directory)
        except BaseException:
            if old:
                os.replace(old, directory)  # put the previous checkpoint back
            raise
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
