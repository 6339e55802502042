"""The command-line entry points: generate (reproducible, clear errors) and the plots."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from models import DecoderLM, preset, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_model(path, DecoderLM.random(preset("tiny"), jax.random.key(0)))
    return path


def test_generate_same_seed_same_text(tiny_checkpoint):
    args = ["ROMEO:", "天气", "--checkpoint", tiny_checkpoint, "--max-new-tokens", "12", "--top-p", "0.9",
            "--num-samples", "2"]
    a = run_script("generate.py", *args, "--seed", "3")
    b = run_script("generate.py", *args, "--seed", "3")
    c = run_script("generate.py", *args, "--seed", "4")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout
    assert a.stdout.count("[0.0] ROMEO:") == 1 and a.stdout.count("[1.1] 天气") == 1
    assert "tokens/s" in a.stderr and "compile" in a.stderr


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "1.5"], "1.5"),
    (["--temperature", "-1"], "-1"),
    (["--top-k", "-3"], "-3"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--num-samples", "0"], "--num-samples"),
    (["--checkpoint", "/nonexistent/dir"], "/nonexistent/dir"),
])
def test_generate_invalid_flags_exit_nonzero_with_message(tiny_checkpoint, flags, message):
    args = ["--checkpoint", tiny_checkpoint, "--max-new-tokens", "4", *flags]
    r = run_script("generate.py", *args)
    assert r.returncode == 2
    assert message in r.stderr


def test_plot_distributions_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install '.[plot]')")
    r = run_script("plot_distributions.py", "--out-dir", str(tmp_path), "--no-model")
    assert r.returncode == 0, r.stderr
    for name in ("temperature.png", "top_k.png", "top_p.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bench_writes_its_table_and_json(tmp_path):
    """A miniature run of scripts/bench.py: the markdown tables print and the JSON holds
    one timing per case (positive), the environment and the generate rows."""
    import json

    out = tmp_path / "bench.json"
    r = run_script("bench.py", "--skip-torch", "--shapes", "2x300", "--dtypes", "fp32", "--dists", "flat",
                   "--cases", "top-p,greedy", "--repeats", "1", "--target-ms", "5", "--generate-preset", "tiny",
                   "--new-tokens", "3", "--batches", "2", "--generate-repeats", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "| ours: top-p(0.9) + sample |" in r.stdout and "| jaxsample.generate | fp32 | 2 | greedy |" in r.stdout
    report = json.loads(out.read_text())
    assert report["environment"]["backend"] == "cpu"
    assert report["sampling"] and all(row["seconds"] > 0 for row in report["sampling"])
    assert {(g["mode"], g["dtype"]) for g in report["generate"]} == {("greedy", "fp32"), ("top-p 0.9", "fp32")}
    assert all(g["tokens_per_s"] > 0 for g in report["generate"])


@pytest.mark.parametrize("flags, message", [
    (["--dtypes", "fp16"], "--dtypes: unknown value 'fp16'"),
    (["--shapes", "8by100"], "--shapes: expected BxV pairs"),
    (["--shapes", "8x100x3"], "--shapes: expected BxV pairs"),
    (["--generate-preset", "huge"], "invalid choice: 'huge'"),
])
def test_bench_invalid_flags_exit_2(flags, message):
    r = run_script("bench.py", *flags)
    assert r.returncode == 2 and message in r.stderr
