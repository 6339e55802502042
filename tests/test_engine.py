"""Decode work that follows the rows: early exit, per-row limits, continuous batching.

`generate_many` must give exactly `generate`'s output for every row, whatever the slot
schedule; `generate` must stop once every row is done.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample._decoding import engine
from jaxsample._processors.base import put_rows, take_rows
from helpers import CountingTableModel, row_keys
from models import DecoderLM, preset

V = 259


@pytest.fixture(scope="module")
def lm():
    return DecoderLM.random(dataclasses.replace(preset("tiny"), n_layers=1), jax.random.key(3))


def prompts(seed=0, b=7, p=6):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, size=(b, p)).astype(np.int32)
    lengths = rng.integers(1, p + 1, size=b).astype(np.int32)
    tokens[np.arange(p)[None] >= lengths[:, None]] = 258
    return tokens, lengths


def assert_same(a, b, *, fields=("tokens", "lengths", "finish_reason")):
    for f in fields:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    np.testing.assert_allclose(a.logprobs_raw, b.logprobs_raw, atol=1e-5)
    np.testing.assert_allclose(a.logprobs_processed, b.logprobs_processed, atol=1e-5)


# Stop ids frequent under the random tiny model, so rows end at very different lengths.
STOPS = [3, 17, 40, 101, 200]


@pytest.mark.parametrize("prompt_logprobs", [False, True])  # refills in the step's pass / prefilled before it
def test_generate_many_equals_generate_with_every_output(lm, prompt_logprobs):
    tokens, lengths = prompts(0, b=5)
    k = row_keys(1, 5)
    sampler = js.chain(js.RepetitionPenalty(1.3),
                       js.default_chain(temperature=np.linspace(0.0, 1.4, 10).astype(np.float32), top_p=0.9))
    kw = dict(max_new_tokens=12, sampler=sampler, stop_ids=STOPS, pad_id=258, n=2, top_logprobs=3,
              prompt_logprobs=prompt_logprobs, return_stats=True)
    want = js.generate(lm, tokens, lengths, k, **kw)
    assert len(set(np.asarray(want.lengths).tolist())) > 2  # the rows really end apart
    got = js.generate_many(lm, tokens, lengths, k, slots=3, **kw)
    assert_same(got, want)
    np.testing.assert_array_equal(got.top_token_ids, want.top_token_ids)
    np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, atol=1e-5)
    if prompt_logprobs:
        np.testing.assert_allclose(got.prompt_logprobs, want.prompt_logprobs, atol=1e-5)
    np.testing.assert_allclose(got.stats.entropy, want.stats.entropy, atol=1e-4)
    np.testing.assert_array_equal(got.stats.num_kept, want.stats.num_kept)
    for a, b in zip(jax.tree.leaves(got.stats.final_state), jax.tree.leaves(want.stats.final_state)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("slots", [1, 4, 16])
def test_any_slot_count_gives_the_same_rows(lm, slots):
    tokens, lengths = prompts(2, b=6)
    k = row_keys(4, 6)
    kw = dict(max_new_tokens=10, sampler=js.default_chain(temperature=0.9, top_k=40), stop_ids=STOPS, pad_id=258)
    assert_same(js.generate_many(lm, tokens, lengths, k, slots=slots, **kw), js.generate(lm, tokens, lengths, k, **kw))


def test_per_row_max_new_tokens(lm):
    tokens, lengths = prompts(5, b=4)
    k = row_keys(6, 4)
    kw = dict(sampler=js.default_chain(temperature=0.8), pad_id=258)
    full = js.generate(lm, tokens, lengths, k, max_new_tokens=9, **kw)
    limits = np.array([1, 9, 4, 6])
    out = js.generate(lm, tokens, lengths, k, max_new_tokens=limits, **kw)
    assert out.tokens.shape == (4, 9)
    np.testing.assert_array_equal(out.lengths, limits)  # no stop ids: every row runs to its limit
    np.testing.assert_array_equal(out.finish_reason, [js.FinishReason.LENGTH] * 4)
    for r, n in enumerate(limits):  # the limit changes no token, only where the row ends
        np.testing.assert_array_equal(out.tokens[r, :n], full.tokens[r, :n])
        assert (np.asarray(out.tokens[r, n:]) == 258).all()
    assert_same(js.generate_many(lm, tokens, lengths, k, slots=2, max_new_tokens=limits, **kw), out)
    chunks = list(js.generate_stream(lm, tokens, lengths, k, max_new_tokens=limits, chunk_size=3, **kw))
    np.testing.assert_array_equal(np.concatenate([c.tokens for c in chunks], axis=1), out.tokens)
    with pytest.raises(ValueError, match=r"max_new_tokens\[1\]=0 must be >= 1"):
        js.generate(lm, tokens, lengths, k, max_new_tokens=np.array([1, 0, 2, 2]), **kw)
    with pytest.raises(ValueError, match=r"shape \[B\] = \(4,\)"):
        js.generate(lm, tokens, lengths, k, max_new_tokens=np.array([1, 2]), **kw)


def test_max_new_tokens_changes_no_token(lm):
    tokens, lengths = prompts(7, b=3)
    kw = dict(sampler=js.default_chain(temperature=1.0), pad_id=258)
    short = js.generate(lm, tokens, lengths, row_keys(8, 3), max_new_tokens=5, **kw)
    long = js.generate(lm, tokens, lengths, row_keys(8, 3), max_new_tokens=40, **kw)
    np.testing.assert_array_equal(long.tokens[:, :5], short.tokens)


def test_generate_exits_once_every_row_is_done():
    """Rows that stop after 2-3 tokens: max_new_tokens=256 runs at most one chunk more."""
    table = jnp.full((8, 8), -1e9).at[1, 2].set(0.0).at[2, 3].set(0.0).at[4, 3].set(0.0)  # 1 -> 2 -> 3, 4 -> 3
    model = CountingTableModel(table)
    p = jnp.array([[1, 0], [4, 0]])
    for n in (4, 256):
        calls = CountingTableModel.calls
        calls.clear()
        out = js.generate(model, p, jnp.array([1, 1]), row_keys(0, 2), max_new_tokens=n, stop_ids=[3], pad_id=7)
        jax.effects_barrier()
        np.testing.assert_array_equal(out.lengths, [2, 1])
        np.testing.assert_array_equal(out.tokens[:, :3], [[2, 3, 7], [3, 7, 7]])
        assert len(calls) <= 16, (n, len(calls))  # one chunk (CHUNK = 16 steps) at most


def test_no_recompile_for_new_prompts_or_chunks(lm):
    kw = dict(max_new_tokens=8, sampler=js.default_chain(temperature=0.7), stop_ids=STOPS, pad_id=258, slots=2,
              chunk_size=2)
    tokens, lengths = prompts(9, b=5)
    programs = engine._programs(False)
    before = [f._cache_size() for f in programs]
    js.generate_many(lm, tokens, lengths, row_keys(0, 5), **kw)
    sizes = [f._cache_size() for f in programs]
    assert [a - b for a, b in zip(sizes, before)] == [1, 1]  # the empty slots, one program for every chunk (refills in it)
    tokens, lengths = prompts(10, b=5)
    js.generate_many(lm, tokens, lengths, row_keys(1, 5), **{**kw, "sampler": js.default_chain(temperature=1.3)})
    assert [f._cache_size() for f in programs] == sizes


@pytest.mark.parametrize("refill", ["decode_refill", "prefill"])
def test_refills_happen_inside_a_chunk(lm, refill):
    """Slots refill on device: 6 rows of exactly 8 tokens through 2 slots in 2 round trips:
    the first chunk hands back 3 or 4 rows (it ends once more than 2 = slots rows
    finished), the second the rest. With ``decode_refill`` (one admission a step, in the
    step's pass) each row holds its slot for its 8 steps and the second slot starts a step
    after the first: 25 steps. With prefills before the step (the fallback), index 0 comes
    from the prefill: 3 x 7 = 21 steps, the ideal."""
    model = lm if refill == "decode_refill" else _PrefillRefills(lm, V)
    tokens, lengths = prompts(15, b=6)
    kw = dict(max_new_tokens=8, sampler=js.default_chain(temperature=0.9), pad_id=258)
    want = js.generate(lm, tokens, lengths, row_keys(16, 6), **kw)
    stream = js.generate_many_stream(model, tokens, lengths, row_keys(16, 6), slots=2, chunk_size=64, **kw)
    order = [c.index for c in stream]
    assert (stream.steps, stream.chunks) == ((25, 2) if refill == "decode_refill" else (21, 2))
    assert order == [0, 1, 2, 3, 4, 5]  # admitted in order, each pair finishing one after the other
    got = js.generate_many(model, tokens, lengths, row_keys(16, 6), slots=2, chunk_size=64, **kw)
    assert_same(got, want)


def test_the_next_chunk_is_dispatched_before_a_chunk_is_read_back(lm, monkeypatch):
    """The host dispatches chunk k + 1 before it reads chunk k's finished rows (its one
    device -> host transfer), so the device never waits on the host between chunks."""
    log, real_programs, real_get = [], engine._programs, jax.device_get

    def programs(static_model):
        empty, chunk = real_programs(static_model)

        def dispatch(*args, **kwargs):
            log.append("dispatch")
            return chunk(*args, **kwargs)
        return empty, dispatch

    def read(tree):
        log.append("read")
        return real_get(tree)

    monkeypatch.setattr(engine, "_programs", programs)
    monkeypatch.setattr(jax, "device_get", read)
    tokens, lengths = prompts(15, b=6)
    stream = js.generate_many_stream(lm, tokens, lengths, row_keys(16, 6), slots=2, chunk_size=4, max_new_tokens=8,
                                     sampler=js.default_chain(temperature=0.9), pad_id=258)
    assert len(list(stream)) == 6 and stream.chunks >= 3
    assert log == ["dispatch"] + ["dispatch", "read"] * stream.chunks


@pytest.mark.parametrize("refill", ["decode_refill", "prefill"])
def test_the_chunk_program_lowers_for_cuda(lm, refill):
    """The real GPU lowering of one chunk (`jax.export` for CUDA, run on CPU): refills at
    two prompt widths (in the step's pass: a 0-or-1-trip loop per width; or prefilled
    before it: a switch), a top-p sampler (a conditional), stop ids."""
    model = lm if refill == "decode_refill" else _PrefillRefills(lm, V)
    tokens, lengths = prompts(4, b=5, p=20)
    kw = dict(slots=2, max_new_tokens=6, sampler=js.default_chain(temperature=0.8, top_p=0.9), stop_ids=STOPS,
              pad_id=258, cache_size=None, n=1, top_logprobs=0, prompt_logprobs=False, chunk_size=4,
              sample_fn=js.sample_step, return_stats=False, fn="generate_many")
    inputs, sampling, limit, cfg = engine._prepare(model, tokens, lengths, row_keys(0, 5), **kw)
    assert cfg.widths == engine.prompt_widths(20) == (16, 20)
    assert cfg.decode_refill == (refill == "decode_refill")
    req = engine._requests(inputs, sampling, limit)
    chunk = jax.jit(functools.partial(engine._chunk, cfg=cfg))
    mlir = jax.export.export(chunk, platforms=["cuda"])(model, engine._empty(model, req, cfg), req).mlir_module()
    assert "stablehlo.while" in mlir and "stablehlo.case" in mlir


@pytest.mark.parametrize("refill", ["decode_refill", "prefill"])
def test_rows_that_finish_at_their_first_token(lm, refill):
    """Limits of 1 finish at their first token. Prefilled before the step (the fallback),
    the refills stop once 4 such rows (2 * slots) finished, one step runs, and the next
    chunk runs the rest: 5 steps. With ``decode_refill`` each is admitted in a step of its
    own beside the row of limit 6 (admitted first, longest limit first), which finishes
    at step 6; the first chunk ends once 3 rows finished (after step 4)."""
    model = lm if refill == "decode_refill" else _PrefillRefills(lm, V)
    tokens, lengths = prompts(17, b=6)
    limits = np.array([1, 1, 1, 1, 1, 6], np.int32)
    kw = dict(max_new_tokens=limits, sampler=js.default_chain(temperature=0.9), pad_id=258)
    want = js.generate(lm, tokens, lengths, row_keys(18, 6), **kw)
    stream = js.generate_many_stream(model, tokens, lengths, row_keys(18, 6), slots=2, chunk_size=64, **kw)
    rows = {c.index: c for c in stream}
    assert (stream.steps, stream.chunks) == ((6, 2) if refill == "decode_refill" else (5, 2))
    for r, c in rows.items():
        assert c.length == limits[r]
        np.testing.assert_array_equal(c.tokens, want.tokens[r])
    np.testing.assert_array_equal(np.asarray(want.lengths), limits)


def test_the_longest_limits_are_admitted_first(lm):
    """One slot runs the rows one by one, longest per-row limit first (ties in input order);
    rows of these limits without stop ids run to their limits."""
    tokens, lengths = prompts(19, b=5)
    limits = np.array([2, 5, 3, 5, 1], np.int32)
    kw = dict(max_new_tokens=limits, sampler=js.default_chain(temperature=0.9), pad_id=258)
    want = js.generate(lm, tokens, lengths, row_keys(20, 5), **kw)
    done = list(js.generate_many_stream(lm, tokens, lengths, row_keys(20, 5), slots=1, **kw))
    assert [c.index for c in done] == [1, 3, 2, 0, 4]
    for c in done:
        np.testing.assert_array_equal(c.tokens, want.tokens[c.index])


def test_stream_yields_each_row_once_as_it_finishes(lm):
    tokens, lengths = prompts(11, b=6)
    k = row_keys(12, 6)
    kw = dict(max_new_tokens=10, sampler=js.default_chain(temperature=0.9), stop_ids=STOPS, pad_id=258)
    want = js.generate(lm, tokens, lengths, k, **kw)
    seen = []
    for c in js.generate_many_stream(lm, tokens, lengths, k, slots=2, **kw):
        seen.append(c.index)
        assert c.prompt_index == c.index and c.length == int(want.lengths[c.index])
        np.testing.assert_array_equal(c.tokens, want.tokens[c.index])
    assert sorted(seen) == list(range(6))


def test_constraints_are_per_slot(lm):
    from models import ByteTokenizer

    tok = ByteTokenizer()
    rows = [js.Choice(["yes", "no"], tok), None, js.Regex(r"[0-9]{2,4}", tok), js.Choice(["maybe"], tok)]
    sampler = js.chain(js.stack_constraints(rows), js.Temperature(0.9))
    tokens, lengths = prompts(13, b=4)
    kw = dict(max_new_tokens=6, sampler=sampler, stop_ids=[tok.eos_id], pad_id=258)
    want = js.generate(lm, tokens, lengths, row_keys(14, 4), **kw)
    got = js.generate_many(lm, tokens, lengths, row_keys(14, 4), slots=2, **kw)
    assert_same(got, want)
    assert tok.decode(np.asarray(got.tokens[3])) == "maybe"


def test_prompt_widths():
    assert engine.prompt_widths(6) == (6,)
    assert engine.prompt_widths(16) == (16,)
    assert engine.prompt_widths(17) == (16, 17)
    assert engine.prompt_widths(116) == (16, 24, 32, 48, 64, 96, 116)
    assert engine.prompt_widths(2048) == (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)  # >= P / 32


@pytest.mark.parametrize("refill", ["decode_refill", "prefill"])
def test_refills_at_their_prompt_width_give_generate_rows(lm, refill):
    """Prompts of 3 to 40 tokens padded to 40: each refill prefills at its own width (16, 24,
    32 or 40), in the decode step's pass (``decode_refill``) or before it (the fallback,
    which prompt_logprobs needs); tokens equal generate's on all the prompts at once,
    log-probs to rounding."""
    rng = np.random.default_rng(12)
    lengths = np.array([3, 40, 17, 9, 33, 16, 24], np.int32)
    tokens = rng.integers(0, 256, size=(7, 40)).astype(np.int32)
    tokens[np.arange(40)[None] >= lengths[:, None]] = 258
    k = row_keys(13, 7)
    kw = dict(max_new_tokens=10, sampler=js.default_chain(temperature=0.9, top_p=0.95), stop_ids=STOPS, pad_id=258,
              prompt_logprobs=refill == "prefill")
    want = js.generate(lm, tokens, lengths, k, **kw)
    assert engine.prompt_widths(40) == (16, 24, 32, 40)
    model = (_RefillWidthRecorder if refill == "decode_refill" else _WidthRecorder)(lm, lm.vocab_size)
    _WidthRecorder.widths.clear()
    got = js.generate_many(model, tokens, lengths, k, slots=3, **kw)
    assert_same(got, want)
    if refill == "prefill":
        np.testing.assert_allclose(got.prompt_logprobs, want.prompt_logprobs, atol=1e-5)
    jax.effects_barrier()
    assert sorted(_WidthRecorder.widths) == sorted([16, 40, 24, 16, 40, 16, 24])  # each prompt's own bucket


@pytest.mark.parametrize("recorder", ["_RefillWidthRecorder", "_WidthRecorder"])
def test_prefill_widths_choose_the_refill_widths(lm, recorder):
    """``prefill_widths`` replaces the default widths (P = 40 is always the last): each
    prompt runs at the first that holds it; the tokens are generate's."""
    rng = np.random.default_rng(14)
    lengths = np.array([3, 40, 17, 9, 33, 16, 24], np.int32)
    tokens = rng.integers(0, 256, size=(7, 40)).astype(np.int32)
    tokens[np.arange(40)[None] >= lengths[:, None]] = 258
    k = row_keys(15, 7)
    kw = dict(max_new_tokens=6, sampler=js.default_chain(temperature=0.9), stop_ids=STOPS, pad_id=258)
    expected = js.generate(lm, tokens, lengths, k, **kw)
    model = globals()[recorder](lm, lm.vocab_size)
    _WidthRecorder.widths.clear()
    got = js.generate_many(model, tokens, lengths, k, slots=3, prefill_widths=(20, 8, 20), **kw)
    assert_same(got, expected)
    jax.effects_barrier()
    assert sorted(_WidthRecorder.widths) == sorted([8, 40, 20, 20, 40, 20, 40])


@pytest.mark.parametrize("bad, message", [
    ("16", "prefill_widths must be a sequence of ints >= 1 (or None: the default widths), got '16'"),
    (16, "prefill_widths must be a sequence of ints >= 1 (or None: the default widths), got 16"),
    ([0], "prefill_widths[0] must be a positive int, got 0"),
    ([16, -1], "prefill_widths[1] must be a positive int, got -1"),
    ([True], "prefill_widths[0] must be a positive int, got True"),
    ([1.5], "prefill_widths[0] must be a positive int, got 1.5"),
    ([[16]], "prefill_widths[0] must be a positive int, got [16]"),
])
def test_prefill_widths_must_be_ints_of_at_least_one(lm, bad, message):
    tokens, lengths = prompts(b=2, p=6)
    with pytest.raises(ValueError, match=re.escape("generate_many: " + message)):
        js.generate_many_stream(lm, tokens, lengths, row_keys(0, 2), slots=1, max_new_tokens=3, prefill_widths=bad)


def test_prefill_widths_are_sorted_deduplicated_and_end_at_the_padded_width():
    assert engine.prefill_widths_for((64, 20, 8, 20, 40), 40) == (8, 20, 40)  # widths >= P are not needed
    assert engine.prefill_widths_for((), 40) == (40,)  # every refill at P
    assert engine.prefill_widths_for(np.array([24, 16]), 40) == (16, 24, 40)
    assert engine.prefill_widths_for(None, 40) == engine.prompt_widths(40)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _PrefillRefills:
    """`models.DecoderLM` without ``decode_refill``: `generate_many` falls back to refills
    prefilled before the step (a fresh cache at the width bucket, its rows copied)."""

    lm: DecoderLM
    vocab_size: int = dataclasses.field(metadata=dict(static=True))

    def init_cache(self, batch_size, max_len):
        return self.lm.init_cache(batch_size, max_len)

    def prefill(self, tokens, lengths, cache):
        return self.lm.prefill(tokens, lengths, cache)

    def prefill_all(self, tokens, cache, lengths=None):
        return self.lm.prefill_all(tokens, cache, lengths=lengths)

    def decode(self, tokens, positions, cache):
        return self.lm.decode(tokens, positions, cache)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _WidthRecorder(_PrefillRefills):
    """`_PrefillRefills` that records, at run time, the width of every prompt pass that really runs."""

    widths = []

    def _record(self, width):
        jax.debug.callback(lambda: _WidthRecorder.widths.append(width))

    def prefill(self, tokens, lengths, cache):
        self._record(tokens.shape[1])
        return self.lm.prefill(tokens, lengths, cache)

    def prefill_all(self, tokens, cache, lengths=None):
        self._record(tokens.shape[1])
        return self.lm.prefill_all(tokens, cache, lengths=lengths)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _RefillWidthRecorder(_WidthRecorder):
    """`_WidthRecorder` with ``decode_refill``: refills run in the decode step's pass."""

    def decode_refill(self, tokens, positions, prompts, lengths, rows, cache):
        self._record(prompts.shape[1])
        return self.lm.decode_refill(tokens, positions, prompts, lengths, rows, cache)


def test_take_and_put_rows_follow_the_field_ranks():
    c = js.chain(js.TopP(jnp.array([0.5, 0.9, 1.0])), js.BanTokens(jnp.array([[1, -1], [2, 3], [-1, -1]])),
                 js.BanTokens(jnp.array([4, 5])), js.Temperature(0.7))
    sub = take_rows(c, jnp.array([2, 0]), 3)
    np.testing.assert_array_equal(sub.processors[0].p, [1.0, 0.5])
    np.testing.assert_array_equal(sub.processors[1].token_ids, [[-1, -1], [1, -1]])
    np.testing.assert_array_equal(sub.processors[2].token_ids, [4, 5])  # shared: an id list of rank 1
    back = put_rows(c, jnp.array([1]), take_rows(c, jnp.array([0]), 3), 3)
    np.testing.assert_array_equal(back.processors[0].p, [0.5, 0.5, 1.0])
    np.testing.assert_array_equal(back.processors[1].token_ids, [[1, -1], [1, -1], [-1, -1]])


def test_refills_need_prefill_into_or_a_batch_leading_cache():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class Transposed(CountingTableModel):
        def init_cache(self, batch_size, max_len):
            return jnp.zeros((max_len, batch_size), jnp.int32)

    model = Transposed(jnp.zeros((8, 8)))
    with pytest.raises(ValueError, match="generate_many: refilling a slot .* prefill_into"):
        js.generate_many(model, jnp.array([[1, 2]]), jnp.array([2]), row_keys(0, 1), slots=1, max_new_tokens=3)

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class TransposedWithRefills(Transposed):
        def prefill_into(self, tokens, lengths, rows, cache):
            return self.prefill(tokens, lengths, cache)

        def prefill_all(self, tokens, cache, lengths=None):
            return jnp.zeros(tokens.shape + (8,)), cache

    with pytest.raises(ValueError, match="generate_many: prompt_logprobs=True .* lead with the batch axis"):
        js.generate_many(TransposedWithRefills(jnp.zeros((8, 8))), jnp.array([[1, 2]]), jnp.array([2]),
                         row_keys(0, 1), slots=1, max_new_tokens=3, prompt_logprobs=True)
    with pytest.raises(ValueError, match=r"generate_many: prefill_widths=\(1,\) refills at a width .* batch axis"):
        js.generate_many(TransposedWithRefills(jnp.zeros((8, 8))), jnp.array([[1, 2]]), jnp.array([2]),
                         row_keys(0, 1), slots=1, max_new_tokens=3, prefill_widths=(1,))
    js.generate_many(TransposedWithRefills(jnp.zeros((8, 8))), jnp.array([[1, 2]]), jnp.array([2]), row_keys(0, 1),
                     slots=1, max_new_tokens=3, prefill_widths=(2,))  # no width below P = 2: nothing to refuse
    with pytest.raises(ValueError, match="slots must be a positive int, got 0"):
        js.generate_many(CountingTableModel(jnp.zeros((8, 8))), jnp.array([[1, 2]]), jnp.array([2]), row_keys(0, 1),
                         slots=0, max_new_tokens=3)


def test_cli_batch_size_writes_every_row_as_one_batch_would(tmp_path):
    """--prompt-file with more rows than --batch-size: JSON lines as rows finish, then the
    file; every row's tokens equal the one-batch --json-output run's."""
    import json
    import os
    import subprocess
    import sys

    from models import save_model

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ckpt = str(tmp_path / "tiny")
    save_model(ckpt, DecoderLM.random(dataclasses.replace(preset("tiny"), n_layers=1), jax.random.key(3)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET: O\nA\nTo be\nKING:\n", encoding="utf-8")
    flags = ["--prompt-file", str(prompts), "--checkpoint", ckpt, "--max-new-tokens", "8", "--num-samples", "2",
             "--seed", "5", "--top-p", "0.9"]
    run = lambda *extra: subprocess.run([sys.executable, os.path.join(root, "scripts", "generate.py"), *flags,
                                         *extra], capture_output=True, text=True, timeout=600, cwd=root)
    out = tmp_path / "out.jsonl"
    many = run("--batch-size", "3", "--output", str(out), "--prefill-widths", "4")  # "A": 2 tokens, the rest P
    assert many.returncode == 0, many.stderr
    assert "10/10" in many.stderr and "tokens/s" in many.stderr  # the progress bar's last state
    assert not os.path.exists(str(out) + ".partial")
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(10))
    one = run("--json-output", "--no-stream")
    assert one.returncode == 0, one.stderr
    want = [json.loads(line) for line in one.stdout.splitlines() if line.startswith("{")]
    for r in rows:
        assert r["token_ids"] == want[r["index"]]["token_ids"] and r["prompt"] == want[r["index"]]["prompt"]
    few = tmp_path / "few.jsonl"  # --output with no more rows than --batch-size: still written
    one_batch = run("--batch-size", "16", "--output", str(few))
    assert one_batch.returncode == 0, one_batch.stderr
    few_rows = [json.loads(line) for line in few.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["index"] for r in few_rows) == list(range(10))
    assert all(r["token_ids"] == want[r["index"]]["token_ids"] for r in few_rows)
    bad = run("--batch-size", "3", "--prompt-lookup", "3")
    assert bad.returncode == 2 and "--batch-size (continuous batching) cannot be used with --prompt-lookup" in bad.stderr
    bad = run("--batch-size", "3", "--prefill-widths", "16", "0")
    assert bad.returncode == 2 and "--prefill-widths must be >= 1, got [16, 0]" in bad.stderr
    bad = run("--prefill-widths", "16")
    assert bad.returncode == 2 and "--prefill-widths needs --batch-size" in bad.stderr


def test_the_memory_check_counts_the_finished_rows_buffer(lm, monkeypatch):
    seen = {}

    def check_memory(model, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(engine.core, "check_memory", check_memory)
    tokens, lengths = prompts(b=3, p=6)
    js.generate_many_stream(lm, tokens, lengths, row_keys(0, 3), slots=2, max_new_tokens=5, top_logprobs=2)
    # 3 * slots = 6 rows; per token an id, two log-probs and 2 top ids + log-probs (28 bytes);
    # per row its request, length and finish reason (12 bytes)
    assert seen["extra_bytes"] == 6 * (5 * 28 + 12)
    js.generate_many_stream(lm, tokens, lengths, row_keys(0, 3), slots=2, max_new_tokens=5, return_stats=True,
                            prompt_logprobs=True)
    assert seen["extra_bytes"] == 6 * (5 * (12 + 8) + 4 * tokens.shape[1] + 12)
    # with stats each finished row also holds its sampler state: a repetition penalty's
    # history of P + N = 11 int32 tokens and its int32 count (48 bytes)
    js.generate_many_stream(lm, tokens, lengths, row_keys(0, 3), slots=2, max_new_tokens=5, return_stats=True,
                            sampler=js.chain(js.RepetitionPenalty(1.2), js.Temperature(0.8)))
    assert seen["extra_bytes"] == 6 * (5 * (12 + 8) + 12 + 4 * (tokens.shape[1] + 5) + 4)
