"""Hostile inputs (issue 24): every size a user or a file controls is bounded before it is
allocated, every malformed input is an error naming it, nothing is silently wrong.

Grows with the features: forged metadata (n-gram tables), oversize sizes (draft tokens,
max_new_tokens against a memory budget), templates (chat templates rendering too much or
nothing), keys of the wrong shape or dtype, broken tokenizer and generation configs,
placeholder beam rows, speculative stats past the end, and a checkpoint swap killed at
every step. Memory budgets are asserted in a subprocess under an address-space limit
where an unbounded allocation is the failure. The limits are listed in docs/limits.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from models import DecoderLM, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_TABLE = os.path.join(ROOT, "models", "checkpoints", "shakespeare", "ngram_draft.safetensors")


def run_limited(code: str, limit_mb: int, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh Python whose address space is capped at `limit_mb` MiB."""
    prelude = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {ROOT!r})
        resource.setrlimit(resource.RLIMIT_AS, ({limit_mb} << 20, {limit_mb} << 20))
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def tiny():
    """A random tiny decoder (byte vocabulary, 259 ids) with weights scaled by 3 (varied output)."""
    lm = DecoderLM.random(preset("tiny"), jax.random.key(0))
    return DecoderLM(jax.tree.map(lambda x: x * 3.0, lm.params), lm.config)


# ----------------------------------------------------------------------------- n-gram tables


def forge_table(tmp_path, **meta_changes) -> str:
    """The shipped table with some metadata strings changed (the tensors untouched)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    with safe_open(SHIPPED_TABLE, framework="numpy") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_changes)
    path = str(tmp_path / "forged.safetensors")
    save_file(tensors, path, metadata=meta)
    return path


@pytest.mark.parametrize("field, value, match", [
    ("max_ngram", "2000", r"metadata max_ngram=2000 exceeds the bound 32"),
    ("max_ngram", "8000000", r"metadata max_ngram=8000000 exceeds the bound 32"),
    ("probes", "100000", r"metadata probes=100000 exceeds the bound 64"),
    ("max_ngram", "9" * 5000, r"metadata max_ngram='9999.*' is not an int"),
])
def test_forged_ngram_metadata_is_refused(tmp_path, field, value, match):
    """One metadata string changed in the shipped table (max_ngram 2000 took 10 GB before)."""
    with pytest.raises(ValueError, match=match):
        js.NGramDraft.load(forge_table(tmp_path, **{field: value}))


def test_forged_ngram_table_refused_within_a_small_memory_budget(tmp_path):
    """The forged table is refused by its header, in a process capped far below the 10 GB
    the unbounded load + draft took."""
    path = forge_table(tmp_path, max_ngram="2000")
    code = f"""
        import jaxsample as js
        try:
            js.NGramDraft.load({path!r})
        except ValueError as e:
            print("refused:", e)
    """
    r = run_limited(code, limit_mb=3072)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused:" in r.stdout and "max_ngram=2000 exceeds the bound 32" in r.stdout


def test_ngram_slot_count_is_checked_before_reading(tmp_path):
    """A table declaring more than MAX_SLOTS slots is refused from its header alone."""
    from safetensors.numpy import save_file
    from jaxsample._decoding import ngram
    meta = dict(format="jaxsample.ngram_draft", version="1", max_ngram="2", probes="8", vocab_size="8")
    s = 16
    tensors = dict(keys=np.zeros(s, np.uint32), values=np.zeros(s, np.int32), fallback=np.zeros(1, np.int32),
                   stats=np.zeros(4, np.int32))
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path, metadata=meta)
    old = ngram.MAX_SLOTS
    try:
        ngram.MAX_SLOTS = 8  # the real bound (2**28 slots) would need a 2 GiB file to exercise
        with pytest.raises(ValueError, match=r"has 16 slots, above the bound MAX_SLOTS=8"):
            js.NGramDraft.load(path)
    finally:
        ngram.MAX_SLOTS = old
    assert js.NGramDraft.load(path).num_slots == 16


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_ngram=33), r"max_ngram=33 exceeds the bound 32"),
    (dict(probes=65), r"probes=65 exceeds the bound 64"),
])
def test_ngram_build_bounds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        js.NGramDraft.build(np.arange(20) % 5, vocab_size=8, **kwargs)


# ----------------------------------------------------------------------------- speculative decoding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OracleDraft:
    """Proposes the reference continuation ref[b, i] for generated index i (past the end: 0)."""

    ref: jax.Array  # int32 [B, N]

    def start(self, prompt_tokens, prompt_lengths, cache_size, n):
        return ()

    def propose(self, state, ctx, k):
        idx = ctx.generated[:, None] + jnp.arange(k)[None, :]
        w = self.ref.shape[1]
        tokens = jnp.take_along_axis(self.ref, jnp.clip(idx, 0, w - 1), axis=1)
        return jnp.where(idx < w, tokens, 0).astype(jnp.int32), None, state


PROMPT = np.array([[256, 72, 105, 33]], np.int32)


@pytest.mark.parametrize("n, k, rounds, drafted", [
    (14, 4, 3, 4 + 4 + 3),  # 13 tokens after the first: rounds emit 5, 5, 3 (the last offers 3 positions)
    (16, 4, 3, 12),         # 15 tokens: 5, 5, 5
    (16, 64, 1, 15),        # one round; only 15 of the 64 proposals could be emitted
])
def test_speculative_stats_count_only_emitted_tokens(tiny, n, k, rounds, drafted):
    """A draft that always proposes the greedy continuation: every proposal is accepted, so
    the counts are known by hand. Before, proposals past max_new_tokens counted as accepted
    (k=64, n=16: 64 accepted and 65 tokens per target call for 16 tokens)."""
    ref = js.generate(tiny, PROMPT, np.array([4]), jax.random.split(jax.random.key(0), 1), max_new_tokens=n)
    out, stats = js.speculative_generate(tiny, PROMPT, np.array([4]), jax.random.split(jax.random.key(0), 1),
                                         max_new_tokens=n, draft=OracleDraft(jnp.asarray(ref.tokens)),
                                         num_draft_tokens=k)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    assert stats.rounds.tolist() == [rounds]
    assert stats.drafted.tolist() == [drafted] and stats.accepted.tolist() == [drafted]
    assert stats.emitted.tolist() == [n - 1]
    assert stats.tokens_per_round == pytest.approx((n - 1) / rounds)
    assert stats.acceptance_rate == 1.0


def test_speculative_stats_stop_mid_round(tiny):
    """A stop token emitted as the first draft of round 3: the 3 drafts after it were never
    needed, so they are neither drafted nor accepted (before: 12 drafted, 12 accepted)."""
    ref = js.generate(tiny, PROMPT, np.array([4]), jax.random.split(jax.random.key(0), 1), max_new_tokens=16)
    tokens = np.asarray(ref.tokens)[0]
    stop = int(tokens[11])  # rounds emit indices 1..5, 6..10, 11..15: index 11 is round 3's first draft
    assert int(np.flatnonzero(tokens == stop)[0]) == 11, tokens  # this model's greedy text: 146 x4, 81 x7, 37 x5
    out, stats = js.speculative_generate(tiny, PROMPT, np.array([4]), jax.random.split(jax.random.key(0), 1),
                                         max_new_tokens=16, draft=OracleDraft(jnp.asarray(ref.tokens)),
                                         num_draft_tokens=4, stop_ids=[stop])
    assert int(out.lengths[0]) == 12 and int(out.finish_reason[0]) == js.FinishReason.STOP
    assert stats.rounds.tolist() == [3] and stats.emitted.tolist() == [11]
    assert stats.drafted.tolist() == [4 + 4 + 1] and stats.accepted.tolist() == [4 + 4 + 1]


@pytest.mark.parametrize("k", [65, 10000])
def test_num_draft_tokens_is_bounded(tiny, k):
    """k = 10000 took 83 s and 6.3 GB for 16 tokens; now refused before tracing."""
    with pytest.raises(ValueError, match=rf"num_draft_tokens={k} exceeds the bound MAX_DRAFT_TOKENS=64"):
        js.speculative_generate(tiny, PROMPT, np.array([4]), jax.random.split(jax.random.key(0), 1),
                                max_new_tokens=16, draft=js.PromptLookup(2), num_draft_tokens=k)


def test_cli_num_draft_tokens_is_bounded(capsys):
    from scripts.generate import main
    with pytest.raises(SystemExit) as e:
        main(["ROMEO:", "--prompt-lookup", "2", "--num-draft-tokens", "10000", "--max-new-tokens", "16"])
    assert e.value.code == 2
    assert "--num-draft-tokens 10000 exceeds the bound 64" in capsys.readouterr().err


# ----------------------------------------------------------------------------- beam search


def test_beam_search_marks_filler_hypotheses():
    """Vocabulary 4, stop id 3, 2 new tokens: exactly 13 distinct hypotheses exist ([3] and
    the 12 [a, b] with a != 3). With 16 beams the other 3 slots are filler (score -1e9 +
    ...), printed before as real rows; `valid` says which are real."""
    v, eos = 4, 3
    model = StaticTableModel(np.random.default_rng(0).normal(size=(v, v)))
    out = js.beam_search(model, jnp.array([[0, 1]]), jnp.array([2]), num_beams=16, max_new_tokens=2,
                         num_return_sequences=16, stop_ids=[eos], early_stopping="never")
    valid = np.asarray(out.valid[0])
    assert valid.sum() == 13
    real = {tuple(np.asarray(out.sequences[0, r, :out.lengths[0, r]]).tolist()) for r in np.flatnonzero(valid)}
    assert real == {(3,)} | {(a, b) for a in range(3) for b in range(4)}
    assert np.all(np.asarray(out.scores[0])[valid] > -100) and np.all(np.asarray(out.scores[0])[~valid] < -1e8)


@pytest.fixture(scope="module")
def byte_checkpoint(tmp_path_factory):
    """A tiny decoder over the byte tokenizer's 259 ids, saved as a jaxsample checkpoint."""
    from models import DecoderConfig, save_model
    from models.decoder import init_params
    c = DecoderConfig(vocab_size=259, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=24,
                      max_seq_len=64)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_model(path, DecoderLM(jax.jit(lambda k: init_params(c, k))(jax.random.key(0)), c))
    return path


def test_cli_beam_search_prints_no_filler(byte_checkpoint, capsys):
    """One new token over 259 ids: 259 hypotheses; 260 beams asked for print 259 rows and say so."""
    from scripts.generate import main
    assert main(["A", "--checkpoint", byte_checkpoint, "--num-beams", "260", "--num-return-sequences", "260",
                 "--max-new-tokens", "1"]) == 0
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith("[")]
    assert len(rows) == 259
    assert not any("score -1000000000" in line for line in rows)
    assert "prompt 0 has only 259 distinct hypotheses of the --num-return-sequences 260" in captured.err


# ----------------------------------------------------------------------------- keys


@pytest.mark.parametrize("keys, match", [
    (np.zeros((1, 3), np.uint32), r"keys must be typed PRNG keys \[B\].*raw uint32 key data \[B, 2\] = \(1, 2\); "
                                  r"got uint32 with shape \(1, 3\)"),
    (np.zeros((1, 2), np.float32), r"keys must be .*; got dtype float32 with shape \(1, 2\)"),
    (np.zeros((1, 2), np.int64), r"keys must be .*; got dtype int64 with shape \(1, 2\)"),
    (np.zeros((1, 2, 2), np.uint32), r"got uint32 with shape \(1, 2, 2\)"),
    ([[1, 2], [3]], r"keys must be typed PRNG keys \[B\] .* got list"),
    (np.zeros(2, np.uint32), "keys must hold one key per row"),
])
def test_raw_keys_of_the_wrong_shape_or_dtype(tiny, keys, match):
    """Before: a JAX TypeError from wrap_key_data (or a silently reinterpreted key)."""
    with pytest.raises(ValueError, match=match):
        js.generate(tiny, PROMPT, np.array([4]), keys, max_new_tokens=2)


def test_raw_keys_equal_typed_keys(tiny):
    typed = jax.random.split(jax.random.key(3), 1)
    a = js.generate(tiny, PROMPT, np.array([4]), typed, max_new_tokens=4, sampler=js.default_chain(temperature=1.0))
    b = js.generate(tiny, PROMPT, np.array([4]), np.asarray(jax.random.key_data(typed)), max_new_tokens=4,
                    sampler=js.default_chain(temperature=1.0))
    np.testing.assert_array_equal(a.tokens, b.tokens)


# ----------------------------------------------------------------------------- checkpoint swap

_KILL_SWEEP = r"""
import json, os, shutil, signal, sys
import numpy as np
import safetensors.numpy
from models import checkpoint
from models.config import DecoderConfig

old_dir, new_dir, target = sys.argv[1:4]

def nest(flat):
    tree = {}
    for name, arr in flat.items():
        node = tree
        *path, leaf = name.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = arr
    return tree

class Fake:  # what save_model reads of a DecoderLM, in numpy only (no XLA work in the forked children)
    def __init__(self, d):
        self.params = nest(safetensors.numpy.load_file(os.path.join(d, "model.safetensors")))
        self.config = DecoderConfig.from_dict(json.load(open(os.path.join(d, "config.json")))["model"])

def fingerprint(d):
    try:
        flat = safetensors.numpy.load_file(os.path.join(d, "model.safetensors"))
        json.load(open(os.path.join(d, "config.json")))
    except Exception as e:
        return "broken: %r" % (e,)
    return float(sum(np.asarray(v, np.float64).sum() for v in flat.values()))

new_lm = Fake(new_dir)
old_fp, new_fp = fingerprint(old_dir), fingerprint(new_dir)
seen = []
for step in range(1, 60):
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(old_dir, target)
    pid = os.fork()
    if pid == 0:
        calls = [0]
        def guard(fn):
            def wrapped(*a, **k):
                calls[0] += 1
                if calls[0] == step:
                    os.kill(os.getpid(), signal.SIGKILL)  # killed just before this step
                return fn(*a, **k)
            return wrapped
        os.replace, os.rename, shutil.rmtree = guard(os.replace), guard(os.rename), guard(shutil.rmtree)
        os.fsync = guard(os.fsync)
        if hasattr(checkpoint, "_exchange"):
            checkpoint._exchange = guard(checkpoint._exchange)
        checkpoint.save_model(target, new_lm)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status)
    fp = fingerprint(target) if os.path.isdir(target) else "missing"
    seen.append(["killed" if killed else "finished", "old" if fp == old_fp else "new" if fp == new_fp else str(fp)])
    if not killed:
        break
print(json.dumps(seen))
"""


def test_save_model_swap_survives_a_kill_at_every_step(tmp_path):
    """A child process saving over an existing checkpoint is SIGKILLed before each of its
    file-system steps in turn (renames, exchange, fsyncs, removals): the checkpoint
    directory always holds the complete old or the complete new model. Before, a kill
    between save_model's two renames left nothing there (the old model at `.old`)."""
    from models import save_model
    c = preset("tiny")
    save_model(str(tmp_path / "old"), DecoderLM.random(c, jax.random.key(1)))
    save_model(str(tmp_path / "new"), DecoderLM.random(c, jax.random.key(2)))
    r = subprocess.run([sys.executable, "-c", _KILL_SWEEP, str(tmp_path / "old"), str(tmp_path / "new"),
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen[-1] == ["finished", "new"], seen
    assert len(seen) > 4  # several steps were interrupted
    states = [state for _, state in seen]
    assert set(states) <= {"old", "new"}, seen
    assert states == sorted(states, key=lambda s: s == "new"), seen  # old ... old, new ... new


# ----------------------------------------------------------------------------- tokenizer files and templates

from helpers import StaticTableModel, checkpoint_dir  # noqa: E402


@pytest.mark.parametrize("content", [b"\x00\xffgarbage", b'{"version": "1.0", "model": {"type": "Quantum"}}',
                                     b"[1, 2, 3]"])
def test_unreadable_tokenizer_json_names_the_file(tmp_path, content):
    from models import HFTokenizer
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"tokenizer\.json' is not a tokenizer\.json the tokenizers library can read"):
        HFTokenizer(str(tmp_path))


@pytest.mark.parametrize("name, content, match", [
    ("tokenizer_config.json", "{broken", r"tokenizer_config\.json: malformed JSON"),
    ("tokenizer_config.json", "[1]", r"tokenizer_config\.json: expected a JSON object, got list"),
    ("config.json", "\xff\xfe", r"config\.json: malformed JSON"),
    ("generation_config.json", '{"temperature": "hot"}', r"generation_config\.json: temperature='hot' must be a "
                                                          r"number >= 0"),
    ("generation_config.json", '{"temperature": -1}', r"generation_config\.json: temperature=-1 must be a number >= 0"),
    ("generation_config.json", '{"top_p": 1.5}', r"generation_config\.json: top_p=1.5 must be a number in \(0, 1\]"),
    ("generation_config.json", '{"top_k": 2.5}', r"generation_config\.json: top_k=2.5 must be an integer >= 0"),
])
def test_broken_config_files_name_file_and_field(tmp_path, tokenizer_file, name, content, match):  # noqa: F811
    from models import HFTokenizer
    folder = checkpoint_dir(tmp_path, tokenizer_file, config=dict(bos_token_id=1, eos_token_id=2))
    (tmp_path / name).write_text(content, encoding="latin-1")
    with pytest.raises(ValueError, match=match):
        HFTokenizer(folder)


def test_cli_names_generation_config_not_dynamic_temperature(tmp_path):
    """A generation_config temperature of -1 was blamed on DynamicTemperature."""
    from scripts.generate import apply_checkpoint_defaults, build_parser
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="llama")))
    (tmp_path / "generation_config.json").write_text(json.dumps(dict(temperature=-1)))
    args = build_parser().parse_args(["--checkpoint", str(tmp_path)])
    with pytest.raises(ValueError, match=r"generation_config\.json: temperature=-1 must be a number >= 0"):
        apply_checkpoint_defaults(args)


def chat_tokenizer(tmp_path, tokenizer_file, template):  # noqa: F811
    from models import HFTokenizer
    return HFTokenizer(checkpoint_dir(tmp_path, tokenizer_file, config=dict(bos_token_id=1, eos_token_id=2),
                                      tokenizer_config=dict(chat_template=template)))


@pytest.mark.parametrize("template, match", [
    ("{{ 'x' * 10**9 }}", r"repeats a sequence of 1 items 1000000000 times, more than max_chars=4000000"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
     r"rendered more than max_chars=4000000 characters"),
    ("{{ 9 ** 100000 ** 100 }}", r"computes 9 \*\* 100000, a number of more than 4096 bits"),  # left-associative
    ("{% if false %}x{% endif %}", "rendered an empty prompt"),
])
def test_chat_template_bounds(tmp_path, tokenizer_file, template, match):  # noqa: F811
    tok = chat_tokenizer(tmp_path, tokenizer_file, template)
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_bound_is_raisable(tmp_path, tokenizer_file):  # noqa: F811
    tok = chat_tokenizer(tmp_path, tokenizer_file, "{{ messages[0]['content'] * 3 }}")
    assert tok.apply_chat_template([{"role": "user", "content": "ab"}]) == "ababab"
    with pytest.raises(ValueError, match="max_chars=5"):
        tok.apply_chat_template([{"role": "user", "content": "ab"}], max_chars=5)
    assert tok.apply_chat_template([{"role": "user", "content": "ab"}], max_chars=6) == "ababab"


def test_huge_chat_template_refused_within_a_memory_budget(tmp_path, tokenizer_file):  # noqa: F811
    """{{ 'x' * 10**9 }} took 7.4 GB and then aborted in the tokenizer; in a process capped at
    1 GiB of address space it is now an error (nothing is built)."""
    folder = checkpoint_dir(tmp_path, tokenizer_file, config=dict(bos_token_id=1, eos_token_id=2),
                            tokenizer_config=dict(chat_template="{{ 'x' * 10**9 }}"))
    code = f"""
        from models.tokenizer import HFTokenizer
        tok = HFTokenizer({folder!r})
        try:
            tok.apply_chat_template([dict(role="user", content="hi")])
        except ValueError as e:
            print("refused:", e)
    """
    r = run_limited(code, limit_mb=1024 + 512)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused:" in r.stdout and "max_chars=4000000" in r.stdout


def test_cli_chat_template_errors_exit_2(tmp_path, tokenizer_file, capsys):  # noqa: F811
    from scripts.generate import encode_prompts, build_parser
    parser = build_parser()
    for template, limit, message in (("{% if false %}x{% endif %}", 100, "rendered an empty prompt"),
                                     ("{{ 'x' * 50 }}", 10, "more than max_chars=10")):
        tok = chat_tokenizer(tmp_path, tokenizer_file, template)
        with pytest.raises(SystemExit) as e:
            encode_prompts(parser, tok, ["hi"], True, limit)
        assert e.value.code == 2
        assert "--chat: the chat template failed: " in capsys.readouterr().err


# ----------------------------------------------------------------------------- memory budget


def test_max_new_tokens_beyond_the_memory_limit_is_refused_before_compiling(tiny):
    """The estimate is the exact KV cache (from init_cache's shapes) plus weights, outputs and
    working buffers; the error names the argument, its value, the estimate and the limit."""
    keys = jax.random.split(jax.random.key(0), 2)
    prompts = np.repeat(PROMPT, 2, 0)
    cache = jax.eval_shape(lambda: tiny.init_cache(2, 4 + 10 ** 7))
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    with pytest.raises(js.MemoryLimitError) as e:
        js.generate(tiny, prompts, np.array([4, 4]), keys, max_new_tokens=10 ** 7, memory_limit=1e9)
    err = e.value
    assert err.max_new_tokens == 10 ** 7 and err.rows == 2 and err.limit == 1e9
    assert err.parts["KV cache"] == cache_bytes
    assert err.parts["outputs"] == 2 * 10 ** 7 * 12  # tokens, raw and processed log-probs
    assert err.estimate == sum(err.parts.values()) > 1e9
    assert "generate: max_new_tokens=10000000 for 2 rows" in str(err) and "memory_limit=1.00 GB" in str(err)
    # The same run fits a limit raised above its estimate (checked, not compiled: N = 4 here).
    js.generate(tiny, prompts, np.array([4, 4]), keys, max_new_tokens=4, memory_limit=err.estimate)


@pytest.mark.parametrize("call", ["generate_stream", "speculative_generate", "beam_search", "generate_many"])
def test_every_decode_loop_checks_the_memory_limit(tiny, call):
    keys = jax.random.split(jax.random.key(0), 1)
    common = dict(max_new_tokens=10 ** 6, memory_limit=1e6)
    run = {
        "generate_stream": lambda: js.generate_stream(tiny, PROMPT, np.array([4]), keys, **common),
        "speculative_generate": lambda: js.speculative_generate(tiny, PROMPT, np.array([4]), keys,
                                                                draft=js.PromptLookup(2), **common),
        "beam_search": lambda: js.beam_search(tiny, PROMPT, np.array([4]), num_beams=4, **common),
        "generate_many": lambda: js.generate_many(tiny, PROMPT, np.array([4]), keys, slots=1, **common),
    }[call]
    with pytest.raises(js.MemoryLimitError, match=rf"{call}: max_new_tokens=1000000"):
        run()


@pytest.mark.parametrize("limit", [0, -1.0, "8GB", True])
def test_memory_limit_values(tiny, limit):
    with pytest.raises(ValueError, match="memory_limit must be a number of bytes > 0"):
        js.generate(tiny, PROMPT, np.array([4]), jax.random.split(jax.random.key(0), 1), max_new_tokens=2,
                    memory_limit=limit)


def test_cli_max_new_tokens_ten_million_is_an_error_not_an_oom():
    """Before: an XLA out-of-memory traceback. Run in a process whose address space is capped
    at 12 GiB, so an attempted allocation of the 82 GB cache could not succeed either."""
    code = """
        import sys
        from scripts.generate import main
        for argv in (["ROMEO:", "--max-new-tokens", "10000000", "--no-stream"],
                     ["ROMEO:", "--max-new-tokens", "8", "--no-stream", "--memory-limit-gb", "0.001"]):
            try:
                main(argv)
            except SystemExit as e:
                print("exit", e.code)
    """
    r = run_limited(code, limit_mb=12 * 1024, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["exit", "2", "exit", "2"], (r.stdout, r.stderr[-3000:])
    assert "--max-new-tokens 10000000 (1 rows) needs an estimated 82." in r.stderr
    assert "raise the limit with --memory-limit-gb" in r.stderr
    assert "--max-new-tokens 8 (1 rows) needs an estimated" in r.stderr and "memory limit 0.00 GB" in r.stderr
    assert "Traceback" not in r.stderr
