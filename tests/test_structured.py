"""Constrained decoding (jaxsample/_structured.py): outputs match their regex / validate against
their JSON schema (shipped model, random-weight models, byte and Hugging Face tokenizers); the
device mask and next state equal a brute-force walk of the byte automaton; sampling inside the
allowed set follows the renormalised probabilities; free rows are untouched by constrained
neighbours; no recompilation for a same-size constraint; clear errors; the CLI flags."""

from __future__ import annotations

import doctest
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("regex", reason="the reference mask uses the regex module (partial matching)")
jsonschema = pytest.importorskip("jsonschema", reason="needs pip install '.[test]'")

import jaxsample as js  # noqa: E402
from jaxsample._constraints import structured as _structured  # noqa: E402
from helpers import load_script  # noqa: E402
from helpers import train_bpe  # noqa: E402
from models import ByteTokenizer, DecoderLM, HFTokenizer, load_pretrained, preset, save_model  # noqa: E402

TOK = ByteTokenizer()
DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
NUMBER = r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,3})?"
ENUM = ["yes", "no", "perchance", "nay, my lord"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "scores": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "kind": {"enum": ["a", "b"]},
    },
    "required": ["name", "scores", "address"],
    "additionalProperties": False,  # unset, other properties would be allowed (and the model wanders off)
}


def constraints(tok):
    """(constraint, checker) for a date, a number, an enum and the nested schema."""
    return [
        (js.Regex(DATE, tok), lambda s: re.fullmatch(DATE, s) is not None),
        (js.Regex(NUMBER, tok), lambda s: re.fullmatch(NUMBER, s) is not None),
        (js.Choice(ENUM, tok), lambda s: s in ENUM),
        (js.JSONSchema(SCHEMA, tok), _valid_json),
    ]


def _valid_json(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def check_outputs(lm, tok, seeds: int, max_new_tokens: int, prompt: str = "ROMEO:", min_finished: float = 0.75):
    """Every finished row (STOP) matches its constraint; most rows finish."""
    cases = constraints(tok)
    rows = [c for c, _ in cases for _ in range(seeds)]
    ids, lengths = tok.encode_batch([prompt] * len(rows))
    keys = jax.random.split(jax.random.key(seeds), len(rows))
    sampler = js.chain(js.stack_constraints(rows), js.default_chain(temperature=1.0))
    out = js.generate(lm, ids, lengths, keys, max_new_tokens=max_new_tokens, sampler=sampler,
                      stop_ids=[tok.eos_id], pad_id=tok.pad_id)
    tokens, n, finish = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.finish_reason)
    assert not np.any(finish == js.FinishReason.NO_VALID_TOKEN)
    for i, (_, ok) in enumerate(c for c in cases for _ in range(seeds)):
        if finish[i] == js.FinishReason.STOP:
            assert tokens[i, n[i] - 1] == tok.eos_id
            text = tok.decode(tokens[i, : n[i] - 1])
            assert ok(text), (i, text)
    for k in range(len(cases)):
        assert np.mean(finish[k * seeds:(k + 1) * seeds] == js.FinishReason.STOP) >= min_finished, finish


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shipped():
    return load_pretrained()


@pytest.fixture(scope="module")
def tiny_lm():
    return DecoderLM.random(preset("tiny"), jax.random.key(0))


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """A locally trained byte-level BPE (multi-byte tokens with digits, quotes, braces)."""
    pytest.importorskip("tokenizers")
    texts = ['{"name": "Romeo", "scores": [12, 7], "address": {"city": "Verona", "zip": "37121"}}',
             "2024-01-31, 1999-12-01, -12.5, 3.25, 100", "yes no perchance nay, my lord",
             "To be, or not to be: that is the question. 天气 nice"]
    folder = tmp_path_factory.mktemp("hf")
    train_bpe(folder, texts * 30, 600)
    (folder / "config.json").write_text(json.dumps(dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)))
    return HFTokenizer(str(folder))


# ----------------------------------------------------------------------------- outputs


def test_shipped_model_outputs_match_every_pattern(shipped):
    lm, tok = shipped
    check_outputs(lm, tok, seeds=8, max_new_tokens=128)


def test_random_model_outputs_match_every_pattern(tiny_lm):
    # random weights: every token is likely, so the mask alone steers the output
    check_outputs(tiny_lm, TOK, seeds=8, max_new_tokens=128, min_finished=0.5)


@pytest.mark.slow
def test_outputs_match_with_many_seeds(shipped, tiny_lm):
    for seeds in (24, 25):
        check_outputs(shipped[0], shipped[1], seeds=seeds, max_new_tokens=128)
        check_outputs(tiny_lm, TOK, seeds=seeds, max_new_tokens=128, min_finished=0.5)


@pytest.mark.slow
def test_hf_tokenizer_outputs_match_every_pattern(hf_tok):
    lm = DecoderLM.random(preset("tiny").replace(vocab_size=hf_tok.vocab_size), jax.random.key(1))
    check_outputs(lm, hf_tok, seeds=6, max_new_tokens=160, prompt="To be", min_finished=0.5)


def test_hf_token_bytes_concatenate_to_the_decoded_text(hf_tok):
    pieces = js.token_bytes(hf_tok)
    assert pieces[:4] == [None] * 4  # specials
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(1000):
        ids = rng.integers(4, hf_tok.vocab_size, 3).tolist()
        data = b"".join(pieces[i] for i in ids)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert hf_tok.decode(ids) == text
        checked += 1
    assert checked > 100


def test_sentencepiece_style_token_bytes():
    """A "▁"-for-space vocabulary (Llama 2 style decoder): the pieces concatenate to the text,
    with the leading space that the decoder strips."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(["To be, or not to be: that is the question, 2024-01-02"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    pieces = js.token_bytes(tok)
    assert pieces[:3] == [None] * 3
    for text in ("To be, or not", "the question, 2024", "be: to"):
        ids = tok.encode(text).ids
        assert b"".join(pieces[i] for i in ids) == b" " + tok.decode(ids).encode()


# ----------------------------------------------------------------------------- the mask


def _byte_automaton(pattern: str):
    """The independent reference: the ``regex`` module's partial full-match (a viable prefix)."""
    import regex as re2

    return re2.compile(pattern)


def _reference_mask(compiled, prefix: bytes, pieces, eos_id, vocab_size):
    """Brute force: token t is allowed iff prefix + bytes(t) can still be completed to a full
    match (``regex``'s partial matching); EOS iff the prefix is a full match."""
    def text(data):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return None  # these patterns are ASCII: a partial character never fits

    mask = np.zeros(vocab_size, bool)
    here = text(prefix)
    if here is None or compiled.fullmatch(here, partial=True) is None:
        return mask
    for t, piece in enumerate(pieces[:vocab_size]):
        if piece:
            s = text(prefix + piece)
            mask[t] = s is not None and compiled.fullmatch(s, partial=True) is not None
    mask[eos_id] = compiled.fullmatch(here) is not None
    return mask


@pytest.mark.parametrize("which", ["byte", "hf"])
def test_device_mask_equals_brute_force_walk_over_token_bytes(which, hf_tok):
    tok = TOK if which == "byte" else hf_tok
    # the regex module's partial matching on the same patterns is the independent reference
    regexes = [DATE, NUMBER, "(yes|no|perchance)"]
    built = [js.Regex(DATE, tok), js.Regex(NUMBER, tok), js.Choice(["yes", "no", "perchance"], tok)]
    walks = 6  # random walks per constraint, all stacked in one per-row constraint
    c = js.stack_constraints([b for b in built for _ in range(walks)])
    dfas = [_byte_automaton(r) for r in regexes for _ in range(walks)]
    pieces, v = js.token_bytes(tok), tok.vocab_size
    rows = len(dfas)
    apply = jax.jit(lambda s: c.apply(jnp.zeros((rows, v)), s, None))
    update = jax.jit(lambda s, t: c.update(s, t, None))
    state = c.init(jnp.zeros((rows, 1), jnp.int32), None, v)
    prefixes = [b""] * rows
    rng = np.random.default_rng(0)
    for step in range(12):
        device = np.isfinite(np.asarray(apply(state)))
        tokens = []
        for r in range(rows):
            ref = _reference_mask(dfas[r], prefixes[r], pieces, tok.eos_id, v)
            np.testing.assert_array_equal(device[r], ref, err_msg=f"row {r} step {step} prefix {prefixes[r]!r}")
            choices = np.nonzero(ref)[0]
            text = choices[choices != tok.eos_id]
            t = int(rng.choice(text)) if text.size else int(tok.eos_id)
            tokens.append(t)
            prefixes[r] += pieces[t] or b""
        state = update(state, jnp.asarray(tokens, jnp.int32))


def test_eos_only_in_accepting_states_then_only_eos():
    c = js.Regex("ab?", TOK)
    eos = TOK.eos_id
    state = c.init(jnp.zeros((1, 1), jnp.int32), None, 259)
    allowed = lambda s: set(np.nonzero(np.isfinite(np.asarray(c.apply(jnp.zeros((1, 259)), s, None)[0])))[0].tolist())
    assert allowed(state) == {ord("a")}
    state = c.update(state, jnp.array([ord("a")]), None)
    assert allowed(state) == {ord("b"), eos}  # accepting, and may go on
    after_b = c.update(state, jnp.array([ord("b")]), None)
    assert allowed(after_b) == {eos}  # accepting with no way on: only EOS
    done = c.update(state, jnp.array([eos]), None)
    assert allowed(done) == {eos}  # after EOS nothing but EOS
    dead = c.update(state, jnp.array([ord("z")]), None)  # a token the mask had removed
    assert allowed(dead) == set()


def test_sampling_frequencies_follow_renormalised_probabilities():
    """Within the allowed set the draw follows softmax(x / t) renormalised over that set.
    Tolerance: every frequency within 5 standard errors of its probability (N = 40000)."""
    n, v = 40_000, TOK.vocab_size
    c = js.Regex("[a-h]x", TOK)
    logits = jnp.asarray(np.random.default_rng(0).normal(0, 1.5, v), jnp.float32)
    sampler = js.chain(c, js.Temperature(0.7))
    state = sampler.init(jnp.zeros((n, 1), jnp.int32), None, v)
    keys = jax.random.split(jax.random.key(3), n)
    tokens = jax.jit(lambda s, k: js.sample_step(sampler, jnp.broadcast_to(logits, (n, v)), s, k)[0])(state, keys)
    counts = np.bincount(np.asarray(tokens), minlength=v)
    allowed = np.arange(ord("a"), ord("h") + 1)
    assert counts.sum() == counts[allowed].sum() == n
    x = np.asarray(logits, np.float64)[allowed] / 0.7
    p = np.exp(x - x.max())
    p /= p.sum()
    freq = counts[allowed] / n
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-9)


def test_free_rows_are_unchanged_by_constrained_neighbours(tiny_lm):
    """Per-row keys: free rows draw the same tokens with or without constrained neighbours,
    also behind stateful penalties and truncations. No stop ids here: a constrained row that
    has matched keeps emitting EOS (only EOS allowed)."""
    ids, lengths = TOK.encode_batch(["ROMEO:", "JULIET:", "NURSE:", "KING:"])
    keys = jax.random.split(jax.random.key(5), 4)
    base = js.preset_chain("default", prune=True, temperature=1.0, top_k=50, top_p=0.95, min_p=0.02,
                           repetition_penalty=1.2, presence_penalty=0.3, no_repeat_ngram=3, dry_multiplier=0.8)
    kw = dict(max_new_tokens=24, stop_ids=[], pad_id=TOK.pad_id)
    free = js.generate(tiny_lm, ids, lengths, keys, sampler=base, **kw)
    mixed_c = js.stack_constraints([js.Regex(DATE, TOK), None, js.Choice(ENUM, TOK), None])
    mixed = js.generate(tiny_lm, ids, lengths, keys, sampler=js.chain(mixed_c, base), **kw)
    for r in (1, 3):
        np.testing.assert_array_equal(np.asarray(mixed.tokens[r]), np.asarray(free.tokens[r]))
    assert not np.array_equal(np.asarray(mixed.tokens[0]), np.asarray(free.tokens[0]))
    for r, ok in ((0, lambda s: re.fullmatch(DATE, s)), (2, lambda s: s in ENUM)):
        row = np.asarray(mixed.tokens[r])
        end = int(np.argmax(row == TOK.eos_id))
        assert end > 0 and ok(TOK.decode(row[:end]))
        # then only EOS, until no_repeat_ngram bans the third one: no valid token, the row ends
        assert row[end:].tolist() == [TOK.eos_id] * 3 + [TOK.pad_id] * (len(row) - end - 3)
        assert int(mixed.finish_reason[r]) == js.FinishReason.NO_VALID_TOKEN


def test_a_same_size_constraint_never_recompiles():
    traces = []

    @jax.jit
    def step(sampler, logits, keys):
        traces.append(1)  # once per trace
        state = sampler.init(jnp.zeros((2, 1), jnp.int32), None, 259)
        token, state, _ = js.sample_step(sampler, logits, state, keys)
        return token, state

    logits, keys = jnp.zeros((2, 259)), jax.random.split(jax.random.key(0), 2)
    size = dict(max_states=64, max_transitions=512)
    samplers = [js.chain(js.Regex(DATE, TOK, **size), js.TopP(0.9)),
                js.chain(js.Regex(NUMBER, TOK, **size), js.TopP(0.5)),
                js.chain(js.Choice(ENUM, TOK, **size), js.TopP(1.0))]
    tokens = [step(s, logits, keys)[0] for s in samplers]
    assert len(traces) == 1
    # one start state per row is a new signature ([B] instead of []), once
    per_row = [js.chain(js.stack_constraints([js.Choice(["x"], TOK), None], **size), js.TopP(0.9)),
               js.chain(js.stack_constraints([js.Regex(DATE, TOK), js.Choice(ENUM, TOK)], **size), js.TopP(0.5))]
    tokens += [step(s, logits, keys)[0] for s in per_row]
    assert len(traces) == 2
    assert chr(int(tokens[0][0])) in "0123456789" and chr(int(tokens[3][0])) == "x"
    assert chr(int(tokens[4][0])) in "0123456789" and chr(int(tokens[4][1])) in "ynp"
    # default padding: powers of two, so similar constraints share a shape too
    a, b = js.Regex("[0-9]{4}", TOK), js.Regex("[0-9]{2}-[0-9]", TOK)
    assert [x.shape for x in jax.tree.leaves(a)] == [x.shape for x in jax.tree.leaves(b)]


def test_sizes_and_packed_layout():
    c = js.Regex(DATE, TOK)
    s = c.sizes()
    assert c.allowed.dtype == jnp.uint32 and c.allowed.shape == (s["padded_states"], 9)  # ceil(259 / 32)
    assert c.targets.dtype == jnp.int16 and c.offsets.dtype == jnp.int32
    assert s["nbytes"] == 4 * 9 * s["padded_states"] + 4 * s["padded_states"] + 2 * s["padded_transitions"]
    # transitions: one per allowed (state, token) bit
    bits = int(np.unpackbits(np.asarray(c.allowed).view(np.uint8)).sum())
    assert s["transitions"] == bits


def test_docstring_examples():
    result = doctest.testmod(_structured, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("build, match", [
    (lambda: js.Regex("a(", TOK), r"Regex: pattern='a\(': invalid regular expression"),
    (lambda: js.Regex("a^b", TOK), "pattern='a\\^b': an anchor"),
    (lambda: js.Regex(DATE, TOK, max_states=4), "needs more than max_states=4 states"),
    (lambda: js.Regex(DATE, TOK, max_transitions=10), "more than max_transitions=10"),
    (lambda: js.Regex(DATE, TOK, max_states=0), "max_states must be a positive int"),
    (lambda: js.JSONSchema("{not json", TOK), "schema is not valid JSON"),
    (lambda: js.JSONSchema({"type": "foo"}, TOK), r"#/type: unknown type 'foo'"),
    (lambda: js.JSONSchema({"type": "array", "contains": {"type": "integer"}}, TOK), r"#/contains"),
    (lambda: js.JSONSchema({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, TOK),
     r"#/properties/a/uniqueItems"),
    (lambda: js.Choice([], TOK), "choices must not be empty"),
    (lambda: js.stack_constraints([None, None]), "every row is None"),
])
def test_bad_input_is_a_clear_error_before_tracing(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_more_errors(hf_tok):
    class Digits:  # any object with token_bytes() and eos_id: here a vocabulary of digits only
        vocab_size, eos_id = 11, 10

        def token_bytes(self):
            return [str(i).encode() for i in range(10)] + [None]

    digits = js.Regex("[0-9]+", Digits())
    mask = digits.apply(jnp.zeros((1, 11)), digits.init(jnp.zeros((1, 1), jnp.int32), None, 11), None)
    assert np.isfinite(np.asarray(mask[0])).tolist() == [True] * 10 + [False]  # no EOS before a digit
    with pytest.raises(ValueError, match=r"pattern='\[0-9\]x'.*cannot spell any complete match"):
        js.Regex("[0-9]x", Digits())  # the vocabulary cannot spell "x"
    with pytest.raises(ValueError, match=r"pattern='\[0-9\]\+x'.*cannot spell any complete match"):
        js.Regex("[0-9]+x", Digits())  # a digit loop with no way out: refused
    trap = js.Regex("1[0-9]*x|2", Digits())  # after "1" the output could never end: "1" is masked
    state = trap.init(jnp.zeros((1, 1), jnp.int32), None, 11)
    assert np.nonzero(np.isfinite(np.asarray(trap.apply(jnp.zeros((1, 11)), state, None)[0])))[0].tolist() == [2]
    with pytest.raises(ValueError, match="different vocabularies"):
        js.stack_constraints([js.Regex("a", TOK), js.Regex("a", hf_tok)])
    with pytest.raises(TypeError, match="choices must be a list"):
        js.Choice("yes,no", TOK)
    c = js.stack_constraints([js.Regex("a", TOK), None])
    with pytest.raises(ValueError, match="one start state per row was given for 2 rows, but the batch has 3"):
        c.init(jnp.zeros((3, 1), jnp.int32), None, 259)
    with pytest.raises(ValueError, match="model's vocabulary"):
        c.init(jnp.zeros((2, 1), jnp.int32), None, 100)
    assert js.JSONSchema({"type": "integer", "minimum": 0}, TOK).sizes()["states"] > 2
    # regex semantics follow Python's re on these: escapes in choices are literal
    c = js.Choice(["a.b", "(x|y)", "1+1"], TOK)
    assert c.sizes()["states"] == js.Choice(["axb", "[x,y]", "121"], TOK).sizes()["states"]


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_lm):
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_model(path, tiny_lm)
    return path


def run_generate(capsys, *argv):
    code = load_script("generate").main(list(argv))
    return code, capsys.readouterr()


def test_cli_regex_and_json_output(capsys, tiny_checkpoint):
    code, out = run_generate(capsys, "ROMEO:", "KING:", "--checkpoint", tiny_checkpoint, "--regex", DATE,
                             "--max-new-tokens", "16", "--num-samples", "2", "--json-output")
    assert code == 0
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["prompt"] for r in rows] == ["ROMEO:", "ROMEO:", "KING:", "KING:"]
    for r in rows:
        assert set(r) == {"prompt", "completion", "token_ids", "finish_reason"}
        assert r["finish_reason"] == "stop" and r["token_ids"][-1] == TOK.eos_id
        assert re.fullmatch(DATE, r["completion"]) and TOK.decode(r["token_ids"]) == r["completion"]


@pytest.mark.slow
def test_cli_choice_and_json_schema(capsys, tiny_checkpoint, tmp_path):
    code, out = run_generate(capsys, "KING:", "--checkpoint", tiny_checkpoint, "--choice", ",".join(ENUM[:3]),
                             "--max-new-tokens", "12", "--json-output", "--num-samples", "3")
    assert code == 0
    assert all(json.loads(line)["completion"] in ENUM for line in out.out.splitlines())
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    code, out = run_generate(capsys, "KING:", "--checkpoint", tiny_checkpoint, "--json-schema", str(schema),
                             "--max-new-tokens", "120", "--json-output", "--seed", "1")
    row = json.loads(out.out)
    if row["finish_reason"] == "stop":
        jsonschema.validate(json.loads(row["completion"]), SCHEMA)


@pytest.mark.parametrize("flags, message", [
    (["--regex", "a("], "--regex: Regex: pattern='a(': invalid regular expression"),
    (["--json-schema", "/nonexistent.json"], "--json-schema: cannot read a JSON schema"),
    (["--regex", "a", "--choice", "a,b"], "not allowed with argument"),
    (["--regex", "a", "--num-beams", "2"], "--regex cannot be used with --num-beams"),
])
def test_cli_bad_constraints_exit_2_with_message(capsys, tiny_checkpoint, flags, message):
    with pytest.raises(SystemExit) as e:
        run_generate(capsys, "--checkpoint", tiny_checkpoint, "--max-new-tokens", "4", *flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
