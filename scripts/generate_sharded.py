"""Generate on a device mesh (data x model parallel) and compare with one device.

    # 8 simulated CPU devices, 2-way data x 4-way model parallel, the tiny preset:
    python scripts/generate_sharded.py --devices 8 --mesh 2,4 --preset tiny

    # the shipped checkpoint (or any jaxsample / Llama checkpoint directory):
    python scripts/generate_sharded.py --devices 8 --mesh 1,8 --checkpoint shipped

    # many hosts (one process per host, same command everywhere):
    JAX_COORDINATOR_ADDRESS=host0:1234 python scripts/generate_sharded.py --multi-host \\
        --num-processes 2 --process-id $RANK --mesh 2,8

The mesh has axes ("data", "model"): the batch is split over "data"; attention heads,
MLP width and the embedding rows (hence the vocabulary of the logits) over "model"; the
sampler works on the vocab-sharded logits without gathering them (jaxsample.ShardedSampler).

Prints the generation speed (generated tokens per second, compile excluded, best of
--repeats runs; the median is shown too) on the mesh and on one device with the same keys, and whether the
tokens are identical (they must be: the sharded draw is `jaxsample.gumbel_sample`).

--devices N only matters on CPU: it sets XLA_FLAGS=--xla_force_host_platform_device_count=N
before JAX starts (the devices are simulated: they share the host's cores).

--multi-host calls jax.distributed.initialize(). Its arguments come from --coordinator /
--num-processes / --process-id, else from JAX_COORDINATOR_ADDRESS (and
JAX_LOCAL_DEVICE_IDS), else from the cluster (SLURM, Open MPI, Cloud TPU, Kubernetes
are detected by JAX). Every process runs the same command; inputs are built from the
same seed on each, each process places only its own shards, and process 0 prints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402 (imports jax, which reads XLA_FLAGS only when its backends start)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", default="2,4", help="data,model devices (default 2,4)")
    p.add_argument("--devices", type=int, default=None,
                   help="simulated CPU devices (sets XLA_FLAGS before JAX starts; default: data*model)")
    p.add_argument("--preset", default="tiny", help="random-weight model preset: tiny, shakespeare, llama-110m")
    p.add_argument("--checkpoint", default=None,
                   help="'shipped' or a checkpoint directory (overrides --preset)")
    p.add_argument("--batch", type=int, default=16, help="rows (divisible by the data-axis size)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    _cli.sampling_flags(p, temperature=0.8, top_k=0, top_p=0.9)
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the compiling one")
    p.add_argument("--no-single", action="store_true", help="skip the one-device comparison")
    p.add_argument("--multi-host", action="store_true", help="call jax.distributed.initialize() first")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    return p


def parse_mesh(text: str) -> tuple[int, int]:
    try:
        parts = tuple(int(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 2 or min(parts) < 1:
        raise ValueError(f"--mesh must be 'data,model' with positive sizes, got {text!r}")
    return parts


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _cli.check_minimums(parser, args, {"--batch": 1, "--prompt-len": 1, "--new-tokens": 1, "--repeats": 0})
    try:
        data, model = parse_mesh(args.mesh)
    except ValueError as e:
        parser.error(str(e))
    devices = args.devices or (None if args.multi_host else data * model)
    if devices and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # Must happen before JAX initialises its backends (it reads XLA_FLAGS once).
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()

    import jax
    import numpy as np

    if args.multi_host:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    import jaxsample as js
    from models import DecoderLM, load_pretrained, preset
    from models.sharding import make_mesh, shard_model

    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    if data * model > jax.device_count():
        raise SystemExit(f"a {data}x{model} mesh needs {data * model} devices, {jax.device_count()} visible "
                         f"(on CPU use --devices {data * model})")
    if args.batch % data:
        raise SystemExit(f"--batch {args.batch} must be divisible by the data-axis size {data}")

    if args.checkpoint:
        lm, _ = load_pretrained(None if args.checkpoint == "shipped" else args.checkpoint)
        name = args.checkpoint
    else:
        lm = DecoderLM.random(preset(args.preset), jax.random.key(args.seed))
        name = f"{args.preset} (random weights)"
    cfg = lm.config
    mesh = make_mesh((data, model))
    slm = shard_model(lm, mesh)

    rng = np.random.default_rng(args.seed)
    vocab = min(cfg.vocab_size, 256)
    prompts = rng.integers(0, vocab, size=(args.batch, args.prompt_len)).astype(np.int32)
    lengths = np.full((args.batch,), args.prompt_len, np.int32)
    keys = jax.random.split(jax.random.key(args.seed + 1), args.batch)
    sampler = None if args.greedy else js.default_chain(temperature=args.temperature, top_k=args.top_k,
                                                       top_p=args.top_p)
    gen = dict(max_new_tokens=args.new_tokens, sampler=sampler)

    def timed(run):
        start = time.perf_counter()
        out = jax.block_until_ready(run())
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = jax.block_until_ready(run())
            times.append(time.perf_counter() - start)
        return out, first, (statistics.median(times), min(times)) if times else None

    say(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} devices "
        f"({jax.process_count()} process(es)); model {name}: {cfg.num_params() / 1e6:.2f}M params, "
        f"V={cfg.vocab_size}, L={cfg.n_layers}, H={cfg.n_heads}, K={cfg.n_kv_heads}")
    say(f"batch {args.batch}, prompt {args.prompt_len}, new tokens {args.new_tokens}, "
        f"{'greedy' if args.greedy else f'T={args.temperature} top_k={args.top_k} top_p={args.top_p}'}")
    rows = []

    out, first, steady = timed(lambda: js.sharded_generate(slm, prompts, lengths, keys, **gen))
    rows.append((f"mesh {data}x{model} (data x model)", first, steady))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        mesh_tokens = np.asarray(multihost_utils.process_allgather(out.tokens, tiled=True))
    else:
        mesh_tokens = np.asarray(out.tokens)

    if not args.no_single:
        single = jax.local_devices()[0]  # on many hosts: every process runs it on its own device
        lm1 = jax.device_put(lm, single)
        p1, l1 = jax.device_put(prompts, single), jax.device_put(lengths, single)
        k1 = jax.device_put(keys, single)
        out1, first1, steady1 = timed(lambda: js.generate(lm1, p1, l1, k1, sample_fn=js.gumbel_sample_step,
                                                          **gen))
        rows.insert(0, ("1 device, gumbel_sample_step", first1, steady1))
        if not args.greedy:
            _, first0, steady0 = timed(lambda: js.generate(lm1, p1, l1, k1, **gen))
            rows.insert(0, ("1 device, plain generate (inverse CDF)", first0, steady0))
        same = np.array_equal(mesh_tokens, np.asarray(out1.tokens))
        mesh_lp = out.logprobs_processed
        if jax.process_count() > 1:
            mesh_lp = multihost_utils.process_allgather(mesh_lp, tiled=True)
        diff = float(np.max(np.abs(np.asarray(mesh_lp) - np.asarray(out1.logprobs_processed))))
        say(f"mesh tokens == 1-device tokens (same keys): {same}; max |logprob diff| = {diff:.2e}")

    generated = args.batch * args.new_tokens
    say(f"{'run':<42} {'first call (s)':>15} {'median (s)':>11} {'best (s)':>9} {'tokens/s':>9}")
    for label, first, steady in rows:
        if steady is None:  # --repeats 0: the only call compiled, so it times nothing
            say(f"{label:<42} {first:>15.2f} {'not timed (--repeats 0)':>31}")
            continue
        median, best = steady
        say(f"{label:<42} {first:>15.2f} {median:>11.3f} {best:>9.3f} {generated / best:>9.0f}")
    say("tokens/s = batch * new tokens / best time of the timed runs (compile excluded)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
