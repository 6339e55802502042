"""Benchmark: a mixture-of-experts decode step costs what it computes.

    python scripts/bench_moe.py                      # Qwen3-MoE-shaped small model, batch 4
    python scripts/bench_moe.py --quick --json out.json
    python scripts/bench_moe.py --experts 64 --top-k 8 --batch 1 8

In one run, for each batch size, the time of one jitted decode step (one token per row
at position --context, a KV cache of --context + 8 positions) of four models with the
same attention and embeddings (random weights, float32):

* moe gather: the MoE model, each token's k chosen experts gathered (what `moe_impl`
  "auto" picks for decode: tokens * k <= experts);
* moe ragged: the MoE model, tokens sorted by expert and `jax.lax.ragged_dot` (the
  prefill path; on CPU XLA lowers it to a loop over every expert);
* moe dense: the MoE model, every expert on every token (the all-experts einsum);
* dense active: a dense model whose MLP has the MoE's active parameter count
  (d_ff = k * moe_d_ff), the cost the sparse step should approach.

Times are medians over --repeats interleaved rounds of --steps calls each (compile
excluded); tokens/s = batch / step time. The logits of the three MoE computations are
checked equal (max |diff| printed). Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cli  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models import DecoderConfig, DecoderLM  # noqa: E402


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=_positive, default=32, help="num_experts (default 32)")
    ap.add_argument("--top-k", type=_positive, default=4, help="experts per token (default 4)")
    ap.add_argument("--d-model", type=_positive, default=512)
    ap.add_argument("--moe-d-ff", type=_positive, default=384, help="hidden width of each expert")
    ap.add_argument("--layers", type=_positive, default=4)
    ap.add_argument("--vocab", type=_positive, default=4096)
    ap.add_argument("--context", type=_positive, default=64, help="decode position (cache length - 8)")
    ap.add_argument("--batch", type=_positive, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=_positive, default=10, help="calls per timed round")
    ap.add_argument("--repeats", type=_positive, default=5, help="interleaved rounds (median)")
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 rounds (a smoke run)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = ap.parse_args(argv)
    if args.top_k > args.experts:
        ap.error(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    if args.quick:
        args.d_model, args.moe_d_ff, args.layers, args.vocab, args.repeats, args.steps = 128, 96, 2, 512, 3, 5

    heads = max(1, args.d_model // 64)
    base = DecoderConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=heads,
                         n_kv_heads=heads, head_dim=args.d_model // heads, d_ff=args.top_k * args.moe_d_ff,
                         max_seq_len=args.context + 8)
    moe = base.replace(num_experts=args.experts, experts_per_token=args.top_k, moe_d_ff=args.moe_d_ff)
    moe_lm = DecoderLM.random(moe, jax.random.key(0))
    dense_lm = DecoderLM.random(base, jax.random.key(1))
    assert base.num_params() - (moe.num_active_params() - args.layers * args.d_model * args.experts) == 0
    models = {f"moe {impl}": DecoderLM(moe_lm.params, moe.replace(moe_impl=impl))
              for impl in ("gather", "ragged", "dense")}
    models["dense active"] = dense_lm

    rows = []
    for batch in args.batch:
        tokens = jnp.asarray(np.random.default_rng(batch).integers(0, args.vocab, batch), jnp.int32)
        positions = jnp.full((batch,), args.context, jnp.int32)
        steps, outs = {}, {}
        for name, lm in models.items():
            cache = lm.init_cache(batch, args.context + 8)
            jitted = jax.jit(lambda m, t, p, c: m.decode(t, p, c))  # weights as arguments, not constants
            step = lambda t, p, c, m=lm, f=jitted: f(m, t, p, c)  # noqa: E731
            outs[name] = np.asarray(step(tokens, positions, cache)[0])  # compile
            steps[name] = (step, cache)
        times = {name: [] for name in models}
        for _ in range(args.repeats):  # interleaved rounds
            for name, (step, cache) in steps.items():
                t = time.perf_counter()
                for _ in range(args.steps):
                    out = step(tokens, positions, cache)[0]
                out.block_until_ready()
                times[name].append((time.perf_counter() - t) / args.steps)
        diff = max(float(np.max(np.abs(outs[f"moe {i}"] - outs["moe dense"]))) for i in ("gather", "ragged"))
        for name in models:
            ms = 1e3 * float(np.median(times[name]))
            rows.append(dict(batch=batch, model=name, step_ms=ms, tokens_per_s=batch / ms * 1e3,
                             max_logit_diff_vs_dense=diff if name.startswith("moe") else None))

    print(f"MoE decode step: {args.experts} experts, top-{args.top_k}, d_model {args.d_model}, expert d_ff "
          f"{args.moe_d_ff}, {args.layers} layers; total params {moe.num_params() / 1e6:.1f}M, active "
          f"{moe.num_active_params() / 1e6:.1f}M (dense active model {base.num_params() / 1e6:.1f}M)")
    print(f"{'batch':>5}  {'model':<13} {'step ms':>9} {'tokens/s':>9}  {'vs dense active':>15}")
    for r in rows:
        ref = next(x for x in rows if x["batch"] == r["batch"] and x["model"] == "dense active")
        print(f"{r['batch']:>5}  {r['model']:<13} {r['step_ms']:>9.2f} {r['tokens_per_s']:>9.1f}  "
              f"{r['step_ms'] / ref['step_ms']:>14.2f}x")
    print(f"max |logit diff| of gather/ragged vs dense: {max(r['max_logit_diff_vs_dense'] or 0 for r in rows):.2e}")
    if args.json:
        blob = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
                    platform=platform.platform(), args=vars(args), total_params=moe.num_params(),
                    active_params=moe.num_active_params(), dense_params=base.num_params(), rows=rows)
        _cli.write_json(args.json, blob)
    return 0


if __name__ == "__main__":
    sys.exit(main())
