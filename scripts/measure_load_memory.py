"""Peak host memory of `models.load_hf` on a generated Llama-shaped checkpoint.

    python scripts/measure_load_memory.py                       # ~1 GB float32, 2 shards
    python scripts/measure_load_memory.py --size-gb 1 --dtype bfloat16 --shards 1 --json runs/load_mem.json

Writes a random-weight Hugging Face checkpoint (config.json + safetensors shards + index)
of about --size-gb, then loads it with `load_hf` in a fresh subprocess and reads that
process's peak resident set size (VmHWM of /proc/self/status: anonymous and file-backed
pages, so the safetensors memory maps count too). Reports the peak over the checkpoint
size, and the same after subtracting the RSS the process had before loading (Python,
jax and XLA). Prints a table; --json writes the numbers (atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cli  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402

from models.checkpoint import atomic_write_json  # noqa: E402

# Llama-shaped: width 2048, 16 heads, 4 KV heads, SwiGLU 5632, vocab 32000 (TinyLlama's shape).
SHAPE = dict(vocab_size=32000, hidden_size=2048, num_attention_heads=16, num_key_value_heads=4,
             intermediate_size=5632)


def shape(hidden_size: int) -> dict:
    """SHAPE at another width (MLP and vocabulary kept): small widths make small checkpoints."""
    return {**SHAPE, "hidden_size": hidden_size}

_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp
from models import load_hf

def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

jnp.zeros(1).block_until_ready()  # XLA up before the baseline
baseline = status("VmRSS")
t0 = time.perf_counter()
lm = load_hf(sys.argv[1])
jax.block_until_ready(lm.params)
seconds = time.perf_counter() - t0
param_bytes = sum(x.nbytes for x in jax.tree.leaves(lm.params))
print(json.dumps(dict(baseline_rss=baseline, peak_rss=status("VmHWM"), final_rss=status("VmRSS"),
                     load_seconds=seconds, param_bytes=param_bytes)))
"""


def tensor_shapes(n_layers: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
    d, ff, v = hidden_size, SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = SHAPE["num_key_value_heads"] * d // SHAPE["num_attention_heads"]
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                    p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                    p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                    p + "mlp.down_proj.weight": (d, ff), p + "input_layernorm.weight": (d,),
                    p + "post_attention_layernorm.weight": (d,)})
    return out


def write_checkpoint(directory: str, size_gb: float, dtype: str, shards: int, hidden_size: int) -> int:
    """A random untied Llama checkpoint of about size_gb; returns its tensor bytes."""
    np_dtype = np.dtype(np.float32) if dtype == "float32" else np.dtype(ml_dtypes.bfloat16)
    fixed = sum(math.prod(s) for s in tensor_shapes(0, hidden_size).values())
    per_layer = sum(math.prod(s) for s in tensor_shapes(1, hidden_size).values()) - fixed
    n_layers = max(1, round((size_gb * 1e9 / np_dtype.itemsize - fixed) / per_layer))
    shapes = tensor_shapes(n_layers, hidden_size)
    names = list(shapes)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    bounds = np.linspace(0, len(names), shards + 1).astype(int)
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: (rng.standard_normal(shapes[n], np.float32) * 0.02).astype(np_dtype)
                for n in names[bounds[s]:bounds[s + 1]]}
        safetensors.numpy.save_file(part, os.path.join(directory, file))
        total += sum(a.nbytes for a in part.values())
        weight_map.update({n: file for n in part})
        del part
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape(hidden_size),
                   "num_hidden_layers": n_layers, "tie_word_embeddings": False, "torch_dtype": dtype,
                   "rms_norm_eps": 1e-5, "max_position_embeddings": 2048}, f)
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size to generate")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=SHAPE["hidden_size"],
                   help="model width (a multiple of 16); the layer count is chosen to reach --size-gb")
    p.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory, removed after)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    if not args.size_gb > 0:
        p.error(f"--size-gb must be > 0, got {args.size_gb}")
    _cli.check_minimums(p, args, {"--shards": 1})
    if args.hidden_size < 16 or args.hidden_size % 16:
        p.error(f"--hidden-size must be a positive multiple of 16, got {args.hidden_size}")
    directory = args.dir or tempfile.mkdtemp(prefix="load-mem-")
    os.makedirs(directory, exist_ok=True)
    try:
        t0 = time.perf_counter()
        size = write_checkpoint(directory, args.size_gb, args.dtype, args.shards, args.hidden_size)
        print(f"wrote {size / 1e9:.3f} GB ({args.dtype}, {args.shards} shards) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run([sys.executable, "-c", _CHILD, directory], capture_output=True, text=True, cwd=root,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    r.update(checkpoint_bytes=size, dtype=args.dtype, shards=args.shards,
             peak_over_size=r["peak_rss"] / size, peak_minus_baseline_over_size=(r["peak_rss"] - r["baseline_rss"]) / size)
    gb = lambda b: f"{b / 1e9:.3f} GB"  # noqa: E731
    rows = [("checkpoint (tensor bytes)", gb(size)), ("RSS before loading (python + jax)", gb(r["baseline_rss"])),
            ("peak RSS while loading", gb(r["peak_rss"])), ("RSS after loading", gb(r["final_rss"])),
            ("peak / checkpoint", f"{r['peak_over_size']:.3f}x"),
            ("(peak - before) / checkpoint", f"{r['peak_minus_baseline_over_size']:.3f}x"),
            ("load time", f"{r['load_seconds']:.1f} s")]
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic_write_json(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
