"""Generate text with the shipped Shakespeare model (or any checkpoint) from the command line.

    python scripts/generate.py "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-p 0.9
    python scripts/generate.py --prompt-file prompts.txt --num-samples 3 --seed 1
    python scripts/generate.py "Hello" --checkpoint path/to/llama-dir --greedy

Prints each continuation, then the compile time and the decode speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxsample as js  # noqa: E402
from models import CheckpointError, load_pretrained  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", help="prompt texts (default: one prompt, 'ROMEO:')")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--checkpoint", help="jaxsample checkpoint or Hugging Face Llama directory "
                                        "(default: the shipped Shakespeare model)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt, each with its own key")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores the sampling flags)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="1 disables")
    p.add_argument("--min-p", type=float, default=0.0, help="0 disables")
    p.add_argument("--typical-p", type=float, default=1.0, help="1 disables")
    p.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="stop a row at the end-of-sequence token")
    return p


def build_sampler(args) -> js.Chain | None:
    """The default order (SAMPLING.md): temperature -> top_k -> top_p -> min_p -> typical_p.

    Filters left at their identity value are omitted (fewer passes over the vocabulary).
    """
    if args.greedy:
        return None
    processors = [js.Temperature(args.temperature)]
    if args.top_k != 0:
        processors.append(js.TopK(args.top_k))
    if args.top_p != 1.0:
        processors.append(js.TopP(args.top_p))
    if args.min_p != 0.0:
        processors.append(js.MinP(args.min_p))
    if args.typical_p != 1.0:
        processors.append(js.TypicalP(args.typical_p))
    return js.chain(*processors)


def row_keys(seed: int, num_prompts: int, num_samples: int) -> jax.Array:
    """Key of sample j of prompt i: fold_in(fold_in(key(seed), i), j); reproducible alone."""
    base = jax.random.key(seed)
    return jnp.stack([jax.random.fold_in(jax.random.fold_in(base, i), j)
                      for i in range(num_prompts) for j in range(num_samples)])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts = list(args.prompts)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            parser.error(f"--prompt-file: {e}")
    prompts = prompts or ["ROMEO:"]
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_samples < 1:
        parser.error(f"--num-samples must be >= 1, got {args.num_samples}")
    try:
        sampler = build_sampler(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        lm, tok = load_pretrained(args.checkpoint)
    except (CheckpointError, OSError, ValueError, ImportError) as e:
        parser.error(f"--checkpoint: {e}")

    texts = [p for p in prompts for _ in range(args.num_samples)]
    ids, lengths = tok.encode_batch(texts)
    keys = row_keys(args.seed, len(prompts), args.num_samples)
    stop_ids = [tok.eos_id] if args.stop_at_eos else []
    run = lambda: js.generate(lm, ids, lengths, keys, max_new_tokens=args.max_new_tokens, sampler=sampler,
                              stop_ids=stop_ids, pad_id=tok.pad_id)
    try:
        t0 = time.perf_counter()
        out = jax.block_until_ready(run())  # compiles, then runs
        first = time.perf_counter() - t0
    except ValueError as e:
        parser.error(str(e))
    t0 = time.perf_counter()
    jax.block_until_ready(run())  # steady state
    steady = time.perf_counter() - t0

    tokens, gen_lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for i, text in enumerate(texts):
        tag = f"[{i // args.num_samples}.{i % args.num_samples}]" if args.num_samples > 1 else f"[{i}]"
        print(f"{tag} {text}{tok.decode(tokens[i, : gen_lengths[i]])}")
        print()
    n_tokens = int(gen_lengths.sum())
    print(f"compile {max(first - steady, 0.0):.2f} s | generate {steady * 1e3:.0f} ms for {n_tokens} tokens "
          f"({n_tokens / steady:,.0f} tokens/s, batch {len(texts)}, {jax.default_backend()})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
