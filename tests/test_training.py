"""Training (models/training.py, scripts/train.py): loss goes down, kill -9 + resume is exact,
the data split holds out whole files, batches are a pure function of (seed, step)."""

from __future__ import annotations

import glob
import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from models import checkpoint as ckpt
from models.tokenizer import ByteTokenizer
from models.training import batch_at, latest_checkpoint, load_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(ROOT, "scripts", "train.py")

WORDS = ("the king shall speak of love and death my lord good night sweet prince to be or not "
         "that is the question what a piece of work is man").split()


def _text(n_words: int, seed: int) -> str:
    """Learnable pseudo-English: lines of words from a small vocabulary."""
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, size=n_words)
    lines = [" ".join(words[i:i + 9]).capitalize() + "." for i in range(0, n_words, 9)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(_text(4000, seed=0), encoding="utf-8")
    return str(path)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _args(data_file, run_dir, steps, **extra):
    args = ["--preset", "tiny", "--data", data_file, "--run-dir", str(run_dir), "--steps", str(steps),
            "--batch-size", "4", "--seq-len", "16", "--warmup-steps", "2", "--lr", "3e-3",
            "--eval-every", "20", "--eval-windows", "4", "--checkpoint-every", "5", "--keep-checkpoints", "2"]
    for k, v in extra.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


# Runs scripts/train.py with each step slowed down (a sleep before drawing each batch),
# so a kill -9 reliably lands mid-run; the computation itself is unchanged.
_THROTTLED = """
import runpy, sys, time
import models.training as t
_batch_at = t.batch_at
def batch_at(*a, **k):
    time.sleep({delay})
    return _batch_at(*a, **k)
t.batch_at = batch_at
sys.argv = [{script!r}] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def _popen(args, delay=0.0):
    code = _THROTTLED.format(delay=delay, script=TRAIN_PY)
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{err[-3000:]}"
    return err


def _step_of(d: str) -> int:
    return int(os.path.basename(d).split("_")[1])


def _read_flat(step_dir: str, file: str) -> dict[str, np.ndarray]:
    return ckpt.load_safetensors(os.path.join(step_dir, file))[0]


# ------------------------------------------------------------------------- training


def test_short_training_run_decreases_loss(tmp_path, data_file):
    run = tmp_path / "run"
    err = _finish(_popen(_args(data_file, run, 40, eval_every=10, checkpoint_every=40, batch_size=8,
                               out=tmp_path / "export")))
    last = latest_checkpoint(str(run))
    assert last is not None and _step_of(last) == 40
    log = json.loads(open(os.path.join(last, "config.json")).read())["log"]
    assert [e["step"] for e in log] == [10, 20, 30, 40]
    initial = math.log(ByteTokenizer.vocab_size)  # ~5.56 nats: a uniform guess
    val = [e["val_nats_per_byte"] for e in log]
    train = [e["train_loss"] for e in log]
    assert val[-1] < val[0] and train[-1] < train[0], log
    assert val[-1] < 0.7 * initial and train[-1] < 0.7 * initial, log
    # The exported model loads and has a card.
    lm = ckpt.load_model(str(tmp_path / "export"))
    assert lm.config.n_layers == 2
    assert "nats per byte" in (tmp_path / "export" / "README.md").read_text()
    assert "final validation" in err


def test_kill9_then_resume_equals_uninterrupted_run(tmp_path, data_file):
    steps = 40
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"
    reference = _popen(_args(data_file, ref_dir, steps))  # runs alongside, uninterrupted
    victim = _popen(_args(data_file, run_dir, steps), delay=0.05)

    deadline = time.time() + 120
    complete = {ckpt.MODEL_FILE, ckpt.CONFIG_FILE, "opt_state.safetensors"}
    while True:
        assert victim.poll() is None, f"train.py exited before it was killed:\n{victim.communicate()[1][-3000:]}"
        last = latest_checkpoint(str(run_dir))
        if last is not None:  # whatever latest_checkpoint returns is complete, at any moment
            assert os.path.basename(last).startswith("step_")
            try:
                assert set(os.listdir(last)) == complete, os.listdir(last)
            except FileNotFoundError:  # pruned since (keep_checkpoints)
                pass
            if _step_of(last) >= 10:
                break
        assert time.time() < deadline, "no checkpoint for step >= 10 within 120 s"
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL

    killed_at = _step_of(latest_checkpoint(str(run_dir)))
    assert 10 <= killed_at < steps, killed_at
    # A half-written checkpoint (what a kill during a save leaves) is never taken as one.
    (run_dir / ".tmp-step-zzzzzzzz").mkdir()
    (run_dir / ".tmp-step-zzzzzzzz" / "model.safetensors").write_bytes(b"\x00" * 3)
    assert os.path.basename(latest_checkpoint(str(run_dir))).startswith("step_")
    assert latest_checkpoint(str(run_dir)) == os.path.join(str(run_dir), f"step_{killed_at:08d}")

    err = _finish(_popen(_args(data_file, run_dir, steps) + ["--resume"]))
    assert f"resuming from {os.path.join(str(run_dir), f'step_{killed_at:08d}')} (step {killed_at})" in err
    _finish(reference)

    ref_last, run_last = latest_checkpoint(str(ref_dir)), latest_checkpoint(str(run_dir))
    assert _step_of(ref_last) == _step_of(run_last) == steps
    for file in (ckpt.MODEL_FILE, "opt_state.safetensors"):
        ref, got = _read_flat(ref_last, file), _read_flat(run_last, file)
        assert sorted(ref) == sorted(got)
        for name in ref:
            np.testing.assert_array_equal(got[name], ref[name], err_msg=f"{file}: {name}")
    strip = lambda log: [{k: v for k, v in e.items() if k != "time_s"} for e in log]
    ref_log = json.loads(open(os.path.join(ref_last, "config.json")).read())["log"]
    run_log = json.loads(open(os.path.join(run_last, "config.json")).read())["log"]
    assert strip(run_log) == strip(ref_log) and [e["step"] for e in ref_log] == [20, 40]
    # Only complete step_* directories, the newest two (keep_checkpoints=2).
    assert [os.path.basename(d) for d in sorted(glob.glob(os.path.join(ref_dir, "step_*")))] == \
        ["step_00000035", "step_00000040"]


def test_latest_checkpoint_ignores_temp_dirs(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    for name in ("step_00000005", "step_00000020", ".tmp-step-abc", ".tmp-step-zz_99999999", "notes"):
        (tmp_path / name).mkdir()
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_00000020")
    (tmp_path / ".tmp-step-abc").rename(tmp_path / ".tmp-step_00000099")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_00000020")


def test_fresh_run_refuses_existing_checkpoints(tmp_path, data_file):
    (tmp_path / "run" / "step_00000005").mkdir(parents=True)
    from models.config import preset
    from models.training import TrainConfig, train
    with pytest.raises(FileExistsError, match="--resume"):
        train(preset("tiny"), TrainConfig(steps=2, warmup_steps=0), load_corpus([data_file]), str(tmp_path / "run"))


def test_resume_refuses_changed_training_settings(tmp_path, data_file):
    """A resume must continue the same run: changing lr (or steps, which sets the cosine
    schedule) is refused with the field named; eval/checkpoint cadence may change."""
    from models.config import preset
    from models.training import TrainConfig, train

    config, corpus, run = preset("tiny"), load_corpus([data_file]), str(tmp_path / "run")
    base = dict(steps=3, warmup_steps=0, batch_size=2, seq_len=16, eval_windows=2, checkpoint_every=1)
    train(config, TrainConfig(**base), corpus, run, stop_after=1, out=io.StringIO())
    with pytest.raises(ckpt.CheckpointError, match=r"steps: saved 3, requested 5; lr: saved 0.002, requested 0.001"):
        train(config, TrainConfig(**dict(base, lr=1e-3, steps=5)), corpus, run, resume=True, out=io.StringIO())
    state, _ = train(config, TrainConfig(**dict(base, checkpoint_every=2, eval_every=1)), corpus, run,
                     resume=True, out=io.StringIO())
    assert state.step == 3


# ----------------------------------------------------------------------------- data


def _write_works(tmp_path, names):
    files = []
    for i, n in enumerate(names):
        p = tmp_path / n
        p.write_text(f"<{n}>\n" + _text(50, seed=i), encoding="utf-8")
        files.append(str(p))
    return files


def _encoded(files):
    tok = ByteTokenizer()
    return np.concatenate([np.array(tok.encode(open(f, encoding="utf-8").read()) + [tok.eos_id], np.uint16)
                           for f in files])


def test_load_corpus_holds_out_whole_files_by_name(tmp_path):
    files = _write_works(tmp_path, ["hamlet_gut.txt", "macbeth_gut.txt", "twelfth_night_gut.txt",
                                    "othello.txt", "hamlet_notes.txt"])
    corpus = load_corpus(files)
    assert corpus.valid_works == ("hamlet", "twelfth_night")
    assert corpus.train_works == ("macbeth", "othello", "hamlet_notes")  # exact names, not substrings
    np.testing.assert_array_equal(corpus.valid, _encoded([files[0], files[2]]))
    np.testing.assert_array_equal(corpus.train, _encoded([files[1], files[3], files[4]]))
    assert corpus.train.dtype == np.uint16

    custom = load_corpus(files, held_out=["othello"])
    assert custom.valid_works == ("othello",) and "othello" not in custom.train_works
    # No file matches: the last file is held out.
    fallback = load_corpus(files[1:2] + files[3:4], held_out=["nothing"])
    assert fallback.valid_works == ("othello",) and fallback.train_works == ("macbeth",)


def test_load_corpus_single_file_holds_out_the_tail(tmp_path, data_file):
    text = open(data_file, encoding="utf-8").read()
    corpus = load_corpus([data_file], valid_fraction=0.1)
    tok = ByteTokenizer()
    cut = int(len(text) * 0.9)
    assert tok.decode(corpus.train) == text[:cut] and tok.decode(corpus.valid) == text[cut:]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus([str(tmp_path / "nope.txt")])


def test_batch_at_is_a_pure_function_of_seed_and_step():
    stream = np.arange(1000, dtype=np.uint16)
    a = batch_at(stream, 7, 0, 4, 16)
    assert a.shape == (4, 17) and a.dtype == np.int32
    np.testing.assert_array_equal(a, batch_at(stream, 7, 0, 4, 16))
    assert (np.diff(a, axis=1) == 1).all()  # contiguous windows of the stream
    assert not np.array_equal(a, batch_at(stream, 8, 0, 4, 16))
    assert not np.array_equal(a, batch_at(stream, 7, 1, 4, 16))
    # Independent of what was drawn before (no hidden RNG state).
    batch_at(stream, 123, 5, 4, 16)
    np.testing.assert_array_equal(a, batch_at(stream, 7, 0, 4, 16))
