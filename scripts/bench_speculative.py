"""Benchmark: speculative decoding (`jaxsample.speculative_generate`) against plain `generate`.

    python scripts/bench_speculative.py                        # shipped model, held-out prompts
    python scripts/bench_speculative.py --quick --json out.json
    python scripts/bench_speculative.py --draft-checkpoint DIR --num-draft-tokens 2 4 6
    python scripts/bench_speculative.py --num-draft-tokens 3 4 5 6 --ngram-prompt-lookup 0 5

Target: the shipped Shakespeare model (`models.load_pretrained()`, or --checkpoint).
Prompts: --prompts windows of --prompt-len bytes from the held-out works (hamlet,
twelfth_night; never trained on), at evenly spaced offsets, each run alone (batch 1,
the latency-bound case speculative decoding is for). Every prompt generates
--new-tokens tokens (no stop ids) with each method:

* plain: `generate` (greedy, or --temperature T);
* lookup n=N k=K: `speculative_generate(draft=PromptLookup(N), num_draft_tokens=K)`;
* ngram pl=L k=K: `speculative_generate(draft=NGramDraft.load(--ngram-draft, prompt_lookup=L),
  num_draft_tokens=K)` (default: the shipped table, `models.load_ngram_draft()`);
* draft k=K: `speculative_generate(draft=<--draft-checkpoint model>, num_draft_tokens=K)`.

Timing: every method is compiled first, then the methods are timed in interleaved rounds
(fair under background load); a method's time for a prompt is the median over --repeats
rounds, and tokens/s = total generated tokens / total of those medians (prefill included,
compile excluded); the same with process CPU time (all threads) instead of wall time gives
tokens per CPU-second, steadier than wall time on a shared machine. Acceptance = accepted / drafted tokens, tokens per call = generated
tokens per target call (plain: 1). With greedy decoding "same" checks that every
speculative output equals plain `generate`'s token for token.
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
from models import SHIPPED_NGRAM_DRAFT, load_ngram_draft, load_pretrained  # noqa: E402

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="target checkpoint (default: the shipped Shakespeare model)")
    p.add_argument("--draft-checkpoint", default=None,
                   help="a draft model checkpoint (e.g. trained with scripts/train.py --preset tiny); "
                        "without it only prompt lookup is measured")
    p.add_argument("--ngram-draft", default=SHIPPED_NGRAM_DRAFT,
                   help="corpus n-gram draft table (default: the shipped model's); 'none' skips it")
    p.add_argument("--ngram-prompt-lookup", type=int, nargs="+", default=[0],
                   help="in-context match lengths that take precedence over the table (0: table only)")
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts, each run at batch 1")
    p.add_argument("--text", help="take the prompts from this UTF-8 file instead of the held-out works")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--num-draft-tokens", type=int, nargs="+", default=[2, 4, 6], help="k values to try")
    p.add_argument("--prompt-lookup", type=int, default=3, help="max n-gram of the lookup draft")
    p.add_argument("--prompt-lookup-min", type=int, nargs="+", default=[1, 2], help="min n-gram values to try")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (outputs are compared)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 prompts, 128 new tokens, k = 4, 2 repeats")
    p.add_argument("--json", help="also write the results as JSON (atomically)")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.num_draft_tokens, args.repeats = 2, 128, [4], 2
    if any(not 1 <= m <= args.prompt_lookup for m in args.prompt_lookup_min):
        p.error(f"--prompt-lookup-min values must be in [1, --prompt-lookup={args.prompt_lookup}], "
                f"got {args.prompt_lookup_min}")
    _cli.check_minimums(p, args, {"--prompts": 1, "--prompt-len": 1, "--new-tokens": 1, "--repeats": 1,
                                  "--prompt-lookup": 1})
    if any(n < 0 for n in args.ngram_prompt_lookup):
        p.error(f"--ngram-prompt-lookup values must be >= 0, got {args.ngram_prompt_lookup}")
    _cli.check_minimums(p, args, {"--num-draft-tokens": 1, "--temperature": 0})
    if any(k > js.MAX_DRAFT_TOKENS for k in args.num_draft_tokens):
        p.error(f"--num-draft-tokens values must be <= {js.MAX_DRAFT_TOKENS} (docs/limits.md), "
                f"got {args.num_draft_tokens}")
    return args


def held_out_prompts(count: int, length: int, text: str | None = None) -> list[np.ndarray]:
    """`count` windows of `length` byte tokens from the held-out works (or from the file
    `text`), evenly spaced."""
    from models.tokenizer import ByteTokenizer
    from models.training import load_corpus

    if text is None:
        valid = load_corpus().valid
    else:
        with open(text, encoding="utf-8") as f:
            valid = np.asarray(ByteTokenizer().encode(f.read(), add_bos=False))
    if len(valid) < length + 1:
        raise ValueError(f"{len(valid)} tokens of text, fewer than --prompt-len + 1 = {length + 1}")
    starts = np.linspace(0, len(valid) - length - 1, count + 2)[1:-1].astype(int)
    return [np.asarray(valid[s:s + length], np.int32) for s in starts]


def main(argv=None) -> int:
    args = parse_args(argv)
    target, tok = load_pretrained(args.checkpoint)
    draft_dir = args.draft_checkpoint
    draft = load_pretrained(draft_dir)[0] if draft_dir else None
    try:
        ngram = None if args.ngram_draft == "none" else load_ngram_draft(args.ngram_draft)
    except ValueError as e:
        print(f"bench_speculative.py: error: --ngram-draft: {e}", file=sys.stderr)
        return 2
    try:
        prompts = held_out_prompts(args.prompts, args.prompt_len, args.text)
    except (OSError, ValueError, ImportError) as e:
        print(f"bench_speculative.py: error: prompts: {e}", file=sys.stderr)
        return 2
    sampler = js.chain(js.Temperature(args.temperature))
    n = args.new_tokens

    methods = {"plain": None}
    for k in args.num_draft_tokens:
        for m in args.prompt_lookup_min:
            methods[f"lookup n={args.prompt_lookup}..{m} k={k}"] = (js.PromptLookup(args.prompt_lookup, m), k)
        if ngram is not None:
            for pl in args.ngram_prompt_lookup:
                methods[f"ngram pl={pl} k={k}"] = (ngram.replace(prompt_lookup=pl), k)
        if draft is not None:
            methods[f"draft k={k}"] = (draft, k)

    def run(method, prompt, seed):
        ids, lengths, keys = prompt[None], np.array([prompt.size]), jax.random.split(jax.random.key(seed), 1)
        spec = methods[method]
        if spec is None:
            return js.generate(target, ids, lengths, keys, max_new_tokens=n, sampler=sampler), None
        return js.speculative_generate(target, ids, lengths, keys, max_new_tokens=n, draft=spec[0],
                                       num_draft_tokens=spec[1], sampler=sampler)

    outputs, compile_s = {}, {}
    for m in methods:  # compile (first call) and keep the outputs and stats
        t0 = time.perf_counter()
        outputs[m] = [jax.block_until_ready(run(m, pr, i)) for i, pr in enumerate(prompts)]
        compile_s[m] = time.perf_counter() - t0
    times = {m: [[] for _ in prompts] for m in methods}
    cpu = {m: [[] for _ in prompts] for m in methods}
    for _ in range(args.repeats):  # interleaved rounds
        for i, pr in enumerate(prompts):
            for m in methods:
                t0, c0 = time.perf_counter(), time.process_time()
                jax.block_until_ready(run(m, pr, i))
                times[m][i].append(time.perf_counter() - t0)
                cpu[m][i].append(time.process_time() - c0)

    rows = []
    plain_tokens = [np.asarray(o.tokens) for o, _ in outputs["plain"]]
    plain_s = sum(float(np.median(t)) for t in times["plain"])
    plain_cpu = sum(float(np.median(t)) for t in cpu["plain"])
    for m in methods:
        seconds = sum(float(np.median(t)) for t in times[m])
        cpu_s = sum(float(np.median(t)) for t in cpu[m])
        generated = sum(int(np.asarray(o.lengths).sum()) for o, _ in outputs[m])
        stats = [s for _, s in outputs[m] if s is not None]
        drafted = sum(int(np.asarray(s.drafted).sum()) for s in stats)
        accepted = sum(int(np.asarray(s.accepted).sum()) for s in stats)
        rounds = sum(int(np.asarray(s.rounds).sum()) for s in stats)
        same = all(np.array_equal(np.asarray(o.tokens), ref) for (o, _), ref in zip(outputs[m], plain_tokens))
        rows.append(dict(method=m, tokens_per_s=generated / seconds, speedup=plain_s / seconds,
                         tokens_per_cpu_s=generated / cpu_s, cpu_speedup=plain_cpu / cpu_s,
                         acceptance=(accepted / drafted) if drafted else None,
                         tokens_per_call=((accepted + rounds) / rounds) if rounds else 1.0,
                         same_as_plain=same if args.temperature == 0 else None,
                         seconds=seconds, generated=generated, compile_s=compile_s[m]))

    mode = "greedy" if args.temperature == 0 else f"temperature {args.temperature}"
    print(f"speculative decoding vs generate: {len(prompts)} held-out prompts x {args.prompt_len} bytes, "
          f"{n} new tokens, batch 1, {mode}, {jax.default_backend()} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores), draft: {draft_dir or 'none'}, ngram: {args.ngram_draft}")
    print(f"{'method':<22} {'tokens/s':>9} {'speed-up':>9} {'tok/CPU-s':>10} {'CPU speed-up':>12} {'accept':>7} "
          f"{'tok/call':>9} {'same':>5}")
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        same = "-" if r["same_as_plain"] is None else ("yes" if r["same_as_plain"] else "NO")
        print(f"{r['method']:<22} {r['tokens_per_s']:>9.1f} {r['speedup']:>8.2f}x {r['tokens_per_cpu_s']:>10.1f} "
              f"{r['cpu_speedup']:>11.2f}x {acc:>7} "
              f"{r['tokens_per_call']:>9.2f} {same:>5}")
    if args.json:
        result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      backend=jax.default_backend(), machine=platform.machine(), cpu_count=os.cpu_count(),
                      jax=jax.__version__, target=args.checkpoint or "shipped", draft=draft_dir, ngram_draft=args.ngram_draft,
                      prompts=len(prompts), prompt_len=args.prompt_len, new_tokens=n,
                      temperature=args.temperature, repeats=args.repeats, rows=rows)
        _cli.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
