"""generate_stream: same tokens as generate, chunks without recompiling, early stop, CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample._decoding import stream as _stream
from helpers import BIGRAM_V as V
from helpers import ROOT, bigram, load_script


STEP_FIELDS = ("tokens", "logprobs_raw", "logprobs_processed", "top_token_ids", "top_logprobs")


def concat(chunks):
    """The chunks' per-step fields (and stats' entropy / num_kept) joined along axis 1."""
    join = lambda get: np.concatenate([np.asarray(get(c)) for c in chunks], axis=1)
    out = {f: join(lambda c: getattr(c, f)) for f in STEP_FIELDS if getattr(chunks[0], f) is not None}
    if chunks[0].stats is not None:
        out.update(entropy=join(lambda c: c.stats.entropy), num_kept=join(lambda c: c.stats.num_kept))
    return out


@pytest.mark.parametrize("outputs", [{}, dict(top_logprobs=3, prompt_logprobs=True, return_stats=True)])
def test_stream_outputs_equal_generate(outputs):
    """Every field of every chunk equals generate's for the same keys (ragged prompts, n = 2,
    a stateful chain, a stop id), with and without the optional outputs; with them (static
    settings no other test uses) the chunks after the first share one compiled program."""
    model = bigram(7)  # a TableModel: it has prefill_all, for prompt_logprobs
    prompts, lengths = jnp.array([[3, 4, 5], [6, 0, 0]]), jnp.array([3, 1])
    keys = jax.random.split(jax.random.key(2), 2)
    sampler = js.chain(js.RepetitionPenalty(1.3), js.Temperature(0.9), js.XTC(0.5, 0.05), js.TopK(10))
    kw = dict(max_new_tokens=9, sampler=sampler, stop_ids=[0], pad_id=V - 1, n=2, **outputs)
    out = js.generate(model, prompts, lengths, keys, **kw)
    compiled = _stream._stream_chunk_traced._cache_size()
    chunks = list(js.generate_stream(model, prompts, lengths, keys, chunk_size=3, **kw))
    assert [c.start for c in chunks][:2] == [0, 1] and chunks[0].tokens.shape == (4, 1)
    if outputs:
        assert len(chunks) >= 3 and _stream._stream_chunk_traced._cache_size() == compiled + 1
    got = concat(chunks)
    width = got["tokens"].shape[1]
    want = {f: np.asarray(getattr(out, f)) for f in STEP_FIELDS if getattr(out, f) is not None}
    if out.stats is not None:
        want.update(entropy=np.asarray(out.stats.entropy), num_kept=np.asarray(out.stats.num_kept))
    assert got.keys() == want.keys() and len(got) == (7 if outputs else 3)
    for f in got:
        np.testing.assert_array_equal(got[f], want[f][:, :width], err_msg=f)
    last = chunks[-1]
    assert np.all(np.asarray(last.done))  # every row finished (a stop id or max_new_tokens)
    if width < 9:  # stopped early: the rest of generate's tokens is padding
        assert np.all(np.asarray(out.tokens)[:, width:] == V - 1)
    np.testing.assert_array_equal(last.lengths, out.lengths)
    np.testing.assert_array_equal(last.finish_reason, out.finish_reason)
    if outputs:
        assert got["top_token_ids"].shape == (4, width, 3)
        # prompt log-probs once, on the first chunk, one row per prompt
        np.testing.assert_array_equal(chunks[0].prompt_logprobs, out.prompt_logprobs)
        assert chunks[0].prompt_logprobs.shape == (2, 3) and all(c.prompt_logprobs is None for c in chunks[1:])
        for a, b in zip(jax.tree.leaves(last.stats.final_state), jax.tree.leaves(out.stats.final_state)):
            np.testing.assert_array_equal(a, b)
    else:
        assert all(c.prompt_logprobs is None and c.stats is None and c.top_token_ids is None for c in chunks)


def test_chunks_reuse_one_compiled_program():
    model = bigram(8)
    prompts, lengths = jnp.array([[1, 2, 3, 4, 5, 6]]), jnp.array([6])  # a shape no other test uses
    chunk = _stream._stream_chunk_traced
    before = chunk._cache_size()
    first = list(js.generate_stream(model, prompts, lengths, jax.random.split(jax.random.key(0), 1),
                                    max_new_tokens=12, chunk_size=2, sampler=js.default_chain(temperature=0.7)))
    assert len(first) == 7 and chunk._cache_size() == before + 1  # six chunks, one compile
    second = list(js.generate_stream(model, prompts, lengths, jax.random.split(jax.random.key(1), 1),
                                     max_new_tokens=12, chunk_size=2, sampler=js.default_chain(temperature=1.3)))
    assert len(second) == 7 and chunk._cache_size() == before + 1  # new keys and values: no compile
    tokens = concat(second)["tokens"]
    want = js.generate(model, prompts, lengths, jax.random.split(jax.random.key(1), 1), max_new_tokens=12,
                       sampler=js.default_chain(temperature=1.3)).tokens
    np.testing.assert_array_equal(tokens, want)


def test_stream_stops_when_every_row_is_done_and_checks_chunk_size():
    model = bigram(9)
    prompts, lengths = jnp.array([[1], [2]]), jnp.array([1, 1])
    keys = jax.random.split(jax.random.key(0), 2)
    greedy = np.asarray(js.generate(model, prompts, lengths, keys, max_new_tokens=3).tokens)
    stops = [int(greedy[0, 1]), int(greedy[1, 1])]  # both rows stop at index 1 at the latest
    chunks = list(js.generate_stream(model, prompts, lengths, keys, max_new_tokens=50, chunk_size=4,
                                     stop_ids=stops))
    assert len(chunks) == 2 and np.all(np.asarray(chunks[-1].done))
    with pytest.raises(ValueError, match="chunk_size"):
        js.generate_stream(model, prompts, lengths, keys, max_new_tokens=5, chunk_size=0)


def test_cli_stream_prints_what_generate_returns(tmp_path):
    from models import DecoderLM, load_pretrained, preset, save_model

    cli = load_script("generate")

    path = str(tmp_path / "tiny")
    save_model(path, DecoderLM.random(preset("tiny"), jax.random.key(0)))
    flags = ["ROMEO:", "--checkpoint", path, "--max-new-tokens", "10", "--top-p", "0.9", "--seed", "5"]
    streamed = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate.py"), *flags, "--stream",
                               "--chunk-size", "4"], capture_output=True, timeout=300, cwd=ROOT,
                              env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    stderr = streamed.stderr.decode("utf-8")
    assert streamed.returncode == 0, stderr
    assert "first token" in stderr and "tokens/s" in stderr
    # the same continuation, computed here with generate from the script's own sampler and keys
    args = cli.build_parser().parse_args(flags)
    lm, tok = load_pretrained(path)
    ids, lengths = tok.encode_batch(["ROMEO:"])
    out = js.generate(lm, ids, lengths, cli.prompt_keys(5, 1, 1), max_new_tokens=10,
                      sampler=cli.build_sampler(args, tok), stop_ids=list(tok.eos_ids), pad_id=tok.pad_id)
    want = "[0] ROMEO:" + tok.decode(np.asarray(out.tokens[0, :int(out.lengths[0])]))
    assert streamed.stdout.decode("utf-8") == want + "\n\n"  # bytes: random text may hold a "\r"
    with pytest.raises(SystemExit):  # exits with status 2 before loading anything
        cli.main(["ROMEO:", "--stream", "--num-beams", "2"])
    with pytest.raises(SystemExit):
        cli.main(["ROMEO:", "--stream", "--prompt-lookup", "2"])


def test_cli_streams_several_rows_as_they_finish(tmp_path, capsys):
    """Two prompts x two samples, --stream: each row is printed whole (with its top-N and
    prompt log-probs) as soon as it finishes, so a short "no" row comes before a long one;
    the rows are exactly --no-stream's, which prints them in order at the end."""
    from models import DecoderLM, preset, save_model

    cli = load_script("generate")
    path = str(tmp_path / "tiny")
    save_model(path, DecoderLM.random(preset("tiny"), jax.random.key(0)))
    flags = ["ROMEO:", "JULIET:", "--checkpoint", path, "--max-new-tokens", "24", "--num-samples", "2",
             "--choice", "no,maybe so perhaps", "--temperature", "3", "--seed", "1", "--top-logprobs", "1",
             "--prompt-logprobs", "--chunk-size", "2"]
    blocks = {}
    for mode in ("--stream", "--no-stream"):
        assert cli.main(flags + [mode]) == 0
        out = capsys.readouterr().out
        blocks[mode] = [b for b in out.split("\n\n") if b.strip()]
    tags = lambda mode: [b.split()[0] for b in blocks[mode]]
    assert tags("--no-stream") == ["[0.0]", "[0.1]", "[1.0]", "[1.1]"]
    assert sorted(blocks["--stream"]) == sorted(blocks["--no-stream"])
    # seed 1 draws "no" for rows 0.1 and 1.0 (3 tokens with the end of sequence), the long choice for the others
    assert tags("--stream") == ["[0.1]", "[1.0]", "[0.0]", "[1.1]"]
    assert blocks["--stream"][0].splitlines()[0] == "[0.1] ROMEO:no"
    assert "prompt log-likelihood" in blocks["--stream"][2]  # sample 0 of each prompt carries it


@pytest.mark.parametrize("flag, unstreamed, stdout_tty, stderr_tty, want", [
    (None, [], True, False, True),     # text on a terminal
    (None, [], False, True, True),     # stdout to a file, progress on a terminal
    (None, [], False, False, False),   # both redirected (tests, pipes)
    (None, ["--num-beams"], True, True, False),
    (False, [], True, True, False),
    (True, [], False, False, True),
])
def test_cli_streams_when_someone_watches(monkeypatch, flag, unstreamed, stdout_tty, stderr_tty, want):
    """Without --stream/--no-stream the CLI streams when stdout or stderr is a terminal."""
    gen = load_script("generate")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: stdout_tty, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: stderr_tty, raising=False)
    assert gen.streams(flag, unstreamed) is want
