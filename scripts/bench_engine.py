"""Benchmark: decode work that follows the rows (early exit, continuous batching).

    python scripts/bench_engine.py                       # shipped model, 48 held-out prompts
    python scripts/bench_engine.py --quick --json out.json
    python scripts/bench_engine.py --slots 4 8 16 --prompts 96

Workload: --prompts windows of the held-out works (hamlet, twelfth_night; never trained
on) whose lengths follow a skewed (log-normal) distribution in [6, --max-prompt-len];
every row stops at '.', '!' or '?' (stop ids) or at its own limit, drawn from a skewed
(log-normal) distribution in [8, --max-new-tokens]; sampling T=0.8, top-p 0.9. The same
prompts, keys and limits go through every method, in one run:

* batch, no early exit: `generate` --batch rows at a time (each batch padded to its own
  longest prompt, as a tokenizer pads a batch), every one of max_new_tokens
  steps (as the loop ran before it could exit: no stop ids, fixed limit, the tokens cut
  at the first stop on the host; the tokens up to there are the same);
* batch, early exit: `generate` --batch rows at a time with the stop ids and per-row
  limits: each batch runs until its last row is done (to the next chunk of 16 steps);
* generate_many slots=S: continuous batching, a finished row's slot takes the next
  prompt at once;
* ideal slots=S: total generated tokens / S steps (no slot ever idle).

Two more measurements, same run:

* early stop: the first --batch prompts, every row stopping at a newline (or '.', '!',
  '?'), `generate` with max_new_tokens=64 vs 512 (the same tokens): the ratio of their
  times (before early exit and attention over the filled cache it was 16x);
* cache capacity: ms per decode step at position ~100 of --batch rows with a cache of 512
  vs 4096 positions (the difference of 144 and 16 jitted steps over 128; decode attention
  reads only the filled blocks).

Steps are decode steps of the batch (every row advances once a step); tokens/s counts the
generated tokens (the same for every method) over the median wall time of --repeats
interleaved rounds (compile excluded); tok/CPU-s uses process CPU time, steadier on a
shared machine; "paired" is the median over rounds of each round's own ratio to batch
early exit (the two timed back to back, so a machine whose speed drifts between rounds
moves both). "same" checks that every method's tokens equal batch early exit's.
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
import numpy as np  # noqa: E402

import jaxsample as js  # noqa: E402
from models import load_pretrained  # noqa: E402

CHUNK = 16  # generate's early-exit granularity (jaxsample/_decoding/loop.py)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint (default: the shipped Shakespeare model)")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--text", help="take the prompts from this UTF-8 file instead of the held-out works")
    p.add_argument("--max-prompt-len", type=int, default=182)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch", type=int, default=8, help="rows per batch of the batch-by-batch baselines")
    p.add_argument("--slots", type=int, nargs="+", default=[4, 8, 16], help="generate_many slot counts")
    p.add_argument("--chunk-size", type=int, default=16, help="generate_many's steps between host round trips")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="16 prompts, 64 new tokens, slots 8, 1 repeat")
    p.add_argument("--json", help="also write the results as JSON (atomically)")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens, args.max_prompt_len, args.slots, args.repeats = 16, 64, 64, [8], 1
    _cli.check_minimums(p, args, {"--prompts": 1, "--batch": 1, "--repeats": 1, "--chunk-size": 1,
                                  "--max-prompt-len": 6, "--max-new-tokens": 8, "--slots": 1})
    return args


def workload(tok, args):
    """(prompt ids [R, P], lengths [R], per-row limits [R], keys [R]) from the held-out works."""
    rng = np.random.default_rng(args.seed)
    if args.text is None:
        from models.training import load_corpus

        text = np.asarray(load_corpus().valid, np.int32)
    else:
        with open(args.text, encoding="utf-8") as f:
            text = np.asarray(tok.encode(f.read(), add_bos=False), np.int32)
    if len(text) < args.max_prompt_len + 2:
        raise ValueError(f"{len(text)} tokens of text, fewer than --max-prompt-len + 2 = {args.max_prompt_len + 2}")
    lengths = np.clip(np.round(rng.lognormal(np.log(24), 0.8, args.prompts)), 6, args.max_prompt_len).astype(int)
    limits = np.clip(np.round(rng.lognormal(np.log(48), 0.9, args.prompts)), 8, args.max_new_tokens).astype(np.int32)
    starts = rng.integers(0, len(text) - args.max_prompt_len - 1, args.prompts)
    ids = np.full((args.prompts, int(lengths.max()) + 1), tok.pad_id, np.int32)
    for r, (s, n) in enumerate(zip(starts, lengths)):
        ids[r, 0] = tok.bos_id
        ids[r, 1:n + 1] = text[s:s + n]
    keys = jax.random.split(jax.random.key(args.seed), args.prompts)
    return ids, lengths + 1, limits, keys


def cut_at_stop(tokens: np.ndarray, limits: np.ndarray, stops: list[int], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Host truncation of full-length rows at their first stop id (included) or limit."""
    out = np.full_like(tokens, pad)
    lengths = np.zeros(len(tokens), np.int32)
    for r, row in enumerate(tokens):
        hit = np.flatnonzero(np.isin(row[:limits[r]], stops))
        n = int(hit[0]) + 1 if hit.size else int(limits[r])
        out[r, :n], lengths[r] = row[:n], n
    return out, lengths


def _median_time(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def early_stop(lm, tok, ids, lengths, keys, sampler, repeats: int) -> dict:
    """`generate` on rows that all stop early: max_new_tokens=512 vs 64, same tokens."""
    stops = [tok.encode(c, add_bos=False)[0] for c in "\n.!?"]
    outs = {}

    def run(n):
        def go():
            outs[n] = js.generate(lm, ids, lengths, keys, max_new_tokens=n, sampler=sampler, stop_ids=stops,
                                  pad_id=tok.pad_id)
            jax.block_until_ready(outs[n].tokens)
        return go

    t64, t512 = _median_time(run(64), repeats), _median_time(run(512), repeats)
    longest = int(np.max(np.asarray(outs[512].lengths)))
    same = longest <= 64 and bool(np.array_equal(np.asarray(outs[512].tokens)[:, :64], np.asarray(outs[64].tokens)))
    return dict(rows=len(ids), longest_row=longest, ms_64=1e3 * t64, ms_512=1e3 * t512, ratio=t512 / t64, same=same)


def cache_capacity(lm, batch: int, repeats: int, position: int = 100, steps: int = 128) -> dict:
    """ms per decode step at ``position`` with a cache of 512 vs 4096 positions.

    One jitted program makes the cache, prefills ``position`` tokens and runs ``m`` decode
    steps; a step costs (t(m = 16 + steps) - t(m = 16)) / steps, which leaves out the
    per-call costs (the cache's allocation, the prefill)."""
    jnp = jax.numpy
    tokens = np.full((batch, position), 65, np.int32)
    result = {}
    for size in (512, 4096):
        def program(m, size=size):
            @jax.jit
            def run(tokens):
                _, cache = lm.prefill(tokens, jnp.full((batch,), position, jnp.int32), lm.init_cache(batch, size))

                def body(i, carry):
                    token, cache = carry
                    logits, cache = lm.decode(token, jnp.full((batch,), position, jnp.int32) + i, cache)
                    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache
                return jax.lax.fori_loop(0, m, body, (jnp.full((batch,), 65, jnp.int32), cache))[0]
            return lambda: jax.block_until_ready(run(tokens))

        short, long = _median_time(program(16), repeats), _median_time(program(16 + steps), repeats)
        if long <= short:
            raise RuntimeError(f"cache capacity: {16 + steps} steps took no longer than 16 "
                               f"({long:.3f} s vs {short:.3f} s): the machine is too noisy to measure")
        result[f"ms_per_step_{size}"] = 1e3 * (long - short) / steps
    result["ratio"] = result["ms_per_step_4096"] / result["ms_per_step_512"]
    return dict(batch=batch, position=position, steps=steps, **result)


def main(argv=None) -> int:
    args = parse_args(argv)
    lm, tok = load_pretrained(args.checkpoint)
    try:
        ids, lengths, limits, keys = workload(tok, args)
    except (OSError, ValueError, ImportError) as e:
        print(f"bench_engine.py: error: prompts: {e}", file=sys.stderr)
        return 2
    stops = [tok.encode(c, add_bos=False)[0] for c in ".!?"]
    sampler = js.default_chain(temperature=0.8, top_p=0.9)
    n, b, pad = args.max_new_tokens, args.batch, tok.pad_id
    common = dict(sampler=sampler, pad_id=pad)
    batches = [slice(i, min(i + b, len(ids))) for i in range(0, len(ids), b)]
    # Each batch padded to its own longest prompt, as a tokenizer's encode_batch pads it.
    batch_ids = {s.start: ids[s, :int(lengths[s].max())] for s in batches}

    def batch_no_exit():
        tokens, steps = [], 0
        for s in batches:
            out = js.generate(lm, batch_ids[s.start], lengths[s], keys[s], max_new_tokens=n, **common)
            tokens.append(np.asarray(out.tokens))
            steps += n
        return cut_at_stop(np.concatenate(tokens), limits, stops, pad)[0], steps

    def batch_early_exit():
        tokens, steps = [], 0
        for s in batches:
            out = js.generate(lm, batch_ids[s.start], lengths[s], keys[s], max_new_tokens=limits[s], stop_ids=stops,
                              **common)
            tokens.append(np.asarray(out.tokens))
            longest = int(np.max(np.asarray(out.lengths)))  # the loop runs whole chunks after index 0
            steps += 1 + min(int(limits[s].max()) - 1, -(-(longest - 1) // CHUNK) * CHUNK)
        width = max(t.shape[1] for t in tokens)
        return np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1])), constant_values=pad)
                               for t in tokens]), steps

    def many(slots):
        def run():
            stream = js.generate_many_stream(lm, ids, lengths, keys, slots=slots, max_new_tokens=limits,
                                             stop_ids=stops, chunk_size=args.chunk_size, **common)
            rows = {c.index: c.tokens for c in stream}
            return np.stack([rows[r] for r in range(len(ids))]), stream.steps
        return run

    methods = {"batch, no early exit": batch_no_exit, "batch, early exit": batch_early_exit}
    for s in args.slots:
        methods[f"generate_many slots={s}"] = many(s)
    results, compile_s = {}, {}
    for name, fn in methods.items():  # compile (first call); keep tokens and steps
        t0 = time.perf_counter()
        results[name] = fn()
        compile_s[name] = time.perf_counter() - t0
    wall = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    for _ in range(args.repeats):  # interleaved rounds
        for name, fn in methods.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    reference = results["batch, early exit"][0]
    generated = int(np.sum(reference != pad))
    base = float(np.median(wall["batch, early exit"]))
    rows = []
    for name in methods:
        tokens, steps = results[name]
        width = min(tokens.shape[1], reference.shape[1])
        seconds, cpu_s = float(np.median(wall[name])), float(np.median(cpu[name]))
        paired = float(np.median(np.asarray(wall["batch, early exit"]) / np.asarray(wall[name])))
        rows.append(dict(method=name, steps=int(steps), tokens_per_s=generated / seconds,
                         tokens_per_cpu_s=generated / cpu_s, vs_early_exit=base / seconds,
                         vs_early_exit_paired=paired,
                         same=bool(np.array_equal(tokens[:, :width], reference[:, :width])), seconds=seconds,
                         compile_s=compile_s[name]))
    for s in args.slots:
        rows.append(dict(method=f"ideal slots={s}", steps=-(-generated // s), tokens_per_s=None,
                         tokens_per_cpu_s=None, vs_early_exit=None, vs_early_exit_paired=None, same=None,
                         seconds=None, compile_s=None))

    first = slice(0, min(b, len(ids)))
    stop_early = early_stop(lm, tok, ids[first], lengths[first], keys[first], sampler, max(args.repeats, 3))
    capacity = cache_capacity(lm, b, max(args.repeats, 3))

    device = jax.devices()[0].device_kind if jax.default_backend() != "cpu" else (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"decode engine: {len(ids)} held-out prompts (lengths {lengths.min()}..{lengths.max()}, mean "
          f"{lengths.mean():.0f}), limits {limits.min()}..{limits.max()} (max_new_tokens {n}), stops .!?, "
          f"{generated} tokens generated, batch {b}, {jax.default_backend()} ({device})")
    print(f"{'method':<26} {'steps':>6} {'tokens/s':>9} {'tok/CPU-s':>10} {'vs early exit':>13} {'paired':>7} "
          f"{'same':>5}")
    for r in rows:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)
        x = lambda v: " " if v is None else "x"
        same = "-" if r["same"] is None else ("yes" if r["same"] else "NO")
        print(f"{r['method']:<26} {r['steps']:>6} {f(r['tokens_per_s'], '9.1f'):>9} "
              f"{f(r['tokens_per_cpu_s'], '10.1f'):>10} {f(r['vs_early_exit'], '.2f'):>12}{x(r['vs_early_exit'])} "
              f"{f(r['vs_early_exit_paired'], '.2f'):>6}{x(r['vs_early_exit_paired'])} {same:>5}")
    print(f"early stop: {stop_early['rows']} rows, longest {stop_early['longest_row']} tokens: "
          f"max_new_tokens=512 {stop_early['ms_512']:.0f} ms vs 64 {stop_early['ms_64']:.0f} ms = "
          f"{stop_early['ratio']:.2f}x (same tokens: {'yes' if stop_early['same'] else 'NO'})")
    print(f"cache capacity: decode at position {capacity['position']}, {capacity['batch']} rows: "
          f"{capacity['ms_per_step_4096']:.2f} ms/step with 4096 positions vs "
          f"{capacity['ms_per_step_512']:.2f} with 512 = {capacity['ratio']:.2f}x")
    if args.json:
        result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      backend=jax.default_backend(), device=device, jax=jax.__version__,
                      checkpoint=args.checkpoint or "shipped", prompts=len(ids), max_new_tokens=n, batch=b,
                      generated=generated, repeats=args.repeats, rows=rows,
                      early_stop=stop_early, cache_capacity=capacity)
        _cli.write_json(args.json, result)
    return 0 if all(r["same"] in (None, True) for r in rows) and stop_early["same"] else 1


if __name__ == "__main__":
    sys.exit(main())
