"""Shared test code: toy models, adversarial inputs, assertions and small utilities.

Test modules import from here (and from ``reference``, the independent float64
implementation), never from each other; shared pytest fixtures live in ``conftest.py``.
``tests/test_layers.py`` checks that rule.

Contents:

* paths and scripts: `ROOT`, `docs_section` (one section of a docs page), `load_script`
  (a module of ``scripts/``), `re_search`, `cli_texts` (generate.py's output per flag set).
* keys: `row_keys`.
* toy models (the `jaxsample.generate` model protocol, no neural network):
  `TableModel` (a pytree bigram: logits = table[last token]) and its variants
  `ExtendTableModel` (+ ``extend``), `CountingTableModel` (counts executed decode steps),
  `StaticTableModel` (hashable, not a pytree), with the factories `table_model` and
  `bigram`; `PlusOneModel` (always predicts last + 1); `make_hf_llama` (a small random
  transformers Llama); `count_prefill_traces` (a copy of a pytree model that records each
  trace of ``prefill``).
* speculative decoding: the ragged prompts `LOOKUP_PROMPTS` / `LOOKUP_LENGTHS`,
  `exact_distribution` (a chain's exact distribution over every sequence) and `chi_square`.
* selection: `adversarial` logits, the filter table `FILTER_CASES`, per-row `per_row_k` /
  `per_row_p`, `mass_margin`, `REL_MARGIN`, the threshold assertions and
  `assert_filter_matches_reference`; `grid` (a parameter matrix whose off-grid cases are slow).
* compiled programs: `compiles` (a trace counter), the Pallas interpreter plan
  `INTERPRET_KERNEL_PLAN`, `DTYPES`, `eqns` (every equation of a jaxpr) and
  `export_cuda` (the real Triton lowering, run on CPU).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
from typing import ClassVar

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
import reference as ref
from jaxsample._selection import select as _select

#: The repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def docs_section(title, page="docs/api.md"):
    """The text of the ``## {title}`` section of ``page`` (a path from the repository root)."""
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def load_script(name):
    """A fresh module object of ``scripts/{name}.py`` (executed on every call)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def re_search(pattern, text):
    """Whether ``text`` (a message, or None for no message) matches the regex ``pattern``."""
    return text is not None and re.search(pattern, text) is not None


def cli_texts(gen, capsys, base, *extras):
    """scripts/generate.py's (module ``gen``) stdout for `base + extra`, for each extra; a
    non-empty extra is a draft flag, so its run must report the acceptance rate."""
    texts = []
    for extra in extras:
        assert gen.main(base + extra) == 0
        captured = capsys.readouterr()
        texts.append(captured.out)
        if extra:
            assert "speculative: acceptance" in captured.err
    return texts


# ----------------------------------------------------------------------------- keys


def row_keys(seed, b):
    """``b`` independent row keys ``[b]`` split from ``jax.random.key(seed)``."""
    return jax.random.split(jax.random.key(seed), b)


# ----------------------------------------------------------------------------- toy models

#: Vocabulary of `table_model` (small, so random contexts repeat a lot).
TABLE_V = 8
#: Vocabulary of `bigram`.
BIGRAM_V = 32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TableModel:
    """A bigram toy model: next-token logits = ``table[last token]``, at every position.

    Deterministic, so a test can replay every step's raw logits from the table. A pytree
    (the table is a leaf: a new table of the same shape does not recompile).

    Attributes:
      table: float32 ``[V, V]``; row ``t`` is the logits after token ``t``.

    Shapes: ``init_cache(B, S)`` gives int32 ``[B]`` zeros, which every method passes through
    unchanged (any cache layout a test wraps it with survives); ``prefill(tokens [B, P],
    lengths [B], cache)`` and ``decode(tokens [B], positions [B], cache)`` give ``[B, V]``;
    ``prefill_all(tokens [B, P], cache)`` gives ``[B, P, V]``.
    """

    table: jax.Array

    @property
    def vocab_size(self) -> int:
        return self.table.shape[-1]

    def init_cache(self, batch_size, max_len):
        return jnp.zeros((batch_size,), jnp.int32)

    def prefill(self, tokens, lengths, cache):
        last = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
        return self.table[last], cache

    def prefill_all(self, tokens, cache):
        return self.table[tokens], cache

    def decode(self, tokens, positions, cache):
        return self.table[tokens], cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExtendTableModel(TableModel):
    """`TableModel` with ``extend(tokens [B, T], positions [B], cache) -> [B, T, V]`` (the
    speculative target that scores a whole draft in one call)."""

    def extend(self, tokens, positions, cache):
        return self.table[tokens], cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CountingTableModel(TableModel):
    """`TableModel` whose ``decode`` appends to the host list `calls` once per *executed*
    step (a ``jax.debug.callback``; call ``jax.effects_barrier()`` before reading it)."""

    calls: ClassVar[list] = []

    def decode(self, tokens, positions, cache):
        jax.debug.callback(lambda: CountingTableModel.calls.append(1))
        return self.table[tokens], cache


class StaticTableModel:
    """A hashable (static, not a pytree) bigram: logits of the next token given the last.

    ``table`` is float32 ``[V, V]``; the cache is int32 ``[B]``: the last token fed.
    """

    def __init__(self, table):
        self.table, self.vocab_size = jnp.asarray(table, jnp.float32), table.shape[0]

    def init_cache(self, batch_size, max_len):
        return jnp.zeros((batch_size,), jnp.int32)

    def prefill(self, tokens, lengths, cache):
        last = tokens[jnp.arange(tokens.shape[0]), lengths - 1]
        return self.table[last], last

    def decode(self, tokens, positions, cache):
        return self.table[tokens], tokens


def table_model(seed=0, vocab=TABLE_V):
    """`TableModel` with a NumPy ``normal(0, 1.5)`` table rounded to 0.01 (``[vocab, vocab]``)."""
    rng = np.random.default_rng(seed)
    return TableModel(jnp.asarray(np.round(rng.normal(0, 1.5, (vocab, vocab)), 2), jnp.float32))


def bigram(seed=0, vocab=BIGRAM_V):
    """`TableModel` with the table ``2 * jax.random.normal(key(seed), (vocab, vocab))``."""
    return TableModel(2.0 * jax.random.normal(jax.random.key(seed), (vocab, vocab)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PlusOneModel:
    """A fake model that always predicts (last token + 1) mod V, with margin `confidence`.

    Its "cache" (int32 ``[B, S]``, -1 where unwritten) records every token written, so tests
    can check what the loop fed it. ``vocab_size`` is static (16 by default).
    """

    confidence: jax.Array
    vocab_size: int = dataclasses.field(default=16, metadata=dict(static=True))

    def _logits(self, last):
        return self.confidence * jax.nn.one_hot((last + 1) % self.vocab_size, self.vocab_size)

    def init_cache(self, batch_size, max_len):
        return jnp.full((batch_size, max_len), -1, jnp.int32)

    def prefill(self, tokens, lengths, cache):
        cache = cache.at[:, : tokens.shape[1]].set(tokens)
        last = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
        return self._logits(last), cache

    def decode(self, tokens, positions, cache):
        cache = cache.at[jnp.arange(tokens.shape[0]), positions].set(tokens)
        return self._logits(tokens), cache


def make_hf_llama(hf, *, tie=True, kv_heads=2, rope_theta=10000.0, seed=0):
    """A small random float32 ``transformers.LlamaForCausalLM`` (vocab 300, 2 layers of
    width 64, 4 heads) with O(1) weights; ``hf`` is conftest.py's ``(torch, transformers)``."""
    torch, transformers = hf
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, intermediate_size=128, max_position_embeddings=128,
        rope_theta=rope_theta, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
    # Default init (std 0.02, norms = 1) gives near-zero logits; use O(1) weights so every
    # mapping (norm scales included) is exercised and errors are visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


def count_prefill_traces(model):
    """``(counting, traces)``: a copy of the pytree dataclass ``model`` whose ``prefill``
    appends to ``traces`` each time it is traced (= once per compilation, not per call)."""
    traces = []

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class Counting(type(model)):
        def prefill(self, tokens, lengths, cache):
            traces.append(1)
            return super().prefill(tokens, lengths, cache)

    return Counting(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)}), traces


# ----------------------------------------------------------------------------- speculative decoding

#: Ragged prompts ``[3, 8]`` for the byte-level tiny decoder (``<bos>`` = 256, pad 0); row 1
#: repeats itself so prompt lookup has something to find.
LOOKUP_PROMPTS = np.array([[256, 72, 105, 33, 72, 105, 0, 0],
                           [256, 65, 66, 67, 65, 66, 67, 65],
                           [256, 7, 0, 0, 0, 0, 0, 0]], np.int32)
LOOKUP_LENGTHS = np.array([6, 8, 2], np.int32)


def exact_distribution(model, sampler, prompt, steps):
    """P(t_1 .. t_steps) for every sequence, by running the chain's init/apply/update along
    all V**steps sequences (the distribution plain `generate` samples from).

    ``model`` is a toy model whose logits ignore the cache (a `TableModel`); ``prompt`` is
    int32 ``[P]``. Returns ``(seqs [V**steps, steps], prob [V**steps])``.
    """
    v = model.vocab_size
    seqs = np.array(list(itertools.product(range(v), repeat=steps)), np.int32)  # [V**steps, steps]
    n = len(seqs)
    prompts = jnp.asarray(np.repeat(prompt[None], n, 0))
    state = js.init_state(sampler, prompts, jnp.full((n,), prompt.size), v, max_new_tokens=steps)
    keys = row_keys(0, n)
    logits, _ = model.prefill(prompts, jnp.full((n,), prompt.size), None)
    prob = np.ones(n)
    for i in range(steps):
        processed = sampler.apply(logits, state, keys)
        prob *= np.asarray(jax.nn.softmax(processed, -1))[np.arange(n), seqs[:, i]]
        state = sampler.update(state, jnp.asarray(seqs[:, i]), processed)
        logits, _ = model.decode(jnp.asarray(seqs[:, i]), None, None)
    return seqs, prob


def chi_square(counts, expected, min_expected=5.0):
    """Pearson's statistic over cells with >= min_expected expected (the rest pooled), and df."""
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep])), int(keep.sum()) - 1


# ----------------------------------------------------------------------------- selection inputs

#: Rows whose float64 running mass passes within this relative distance of ``p * total``
#: may be decided differently by a float32 sum in another order: they are skipped.
REL_MARGIN = 1e-5


def grid(full, fast):
    """``full`` parameter tuples; those not in ``fast`` only run with ``-m slow``."""
    return [(v if len(v) > 1 else v[0]) if v in fast else pytest.param(*v, marks=pytest.mark.slow) for v in full]


def adversarial(rng, n, vocab, dtype=np.float32, subnormal=False):
    """``n`` rows of ``vocab`` logits (``[n, vocab]``), cycling through adversarial kinds.

    ``subnormal``: one kind is scaled into the subnormal range. XLA:CPU compares
    subnormals as zero (and so do the keys, and ``x >= threshold`` in the filters), the
    float64 reference does not; those rows are only compared with XLA's own sort.
    """
    rows = []
    for i in range(n):
        kind = i % 12
        x = rng.standard_normal(vocab)
        if kind == 1:
            x = x * 1e-3  # tiny spread
        elif kind == 2:
            x = x * 1e3  # huge spread: one token holds all the mass
        elif kind == 3:
            x = np.round(x * 2) / 2  # heavy ties
        elif kind == 4:
            x = np.full(vocab, 0.25)  # all equal
        elif kind == 5:
            x[rng.random(vocab) < 0.4] = -np.inf
        elif kind == 6:
            x = np.full(vocab, -np.inf)
            x[rng.integers(vocab)] = -2.0  # a single finite value
        elif kind == 7:
            x = rng.choice(np.array([-0.0, 0.0, 1.0, -1.0]), vocab)  # signed zeros, ties
        elif kind == 8:
            x = -2.0 * np.log(rng.permutation(vocab) + 1.0)  # peaked (Zipf-like)
        elif kind == 9:
            # subnormals, or a spread of 1e-6 (at 1e-30 the float64 reference's
            # probabilities tie where the logits do not)
            x = x * (1e-40 if subnormal else 1e-6)
        elif kind == 10:
            x = np.round(x * 3) * 4.0  # ties, wide
            x[rng.random(vocab) < 0.5] = -np.inf
        elif kind == 11:
            x = -1e30 + np.round(x) * 1e24  # large negative, ties
        if not np.isfinite(x).any():
            x[0] = 1.0
        rows.append(x)
    return np.stack(rows).astype(dtype)


def per_row_k(rng, n, vocab):
    """int32 ``[n]`` top-k values: the edges (0, 1, 2, vocab, > vocab, ...) every third row."""
    edges = [0, 1, 2, vocab, vocab + 3, max(vocab - 1, 1), 64, 65]
    return np.array([edges[i % len(edges)] if i % 3 == 0 else rng.integers(1, vocab + 1)
                     for i in range(n)], np.int32)


def per_row_p(rng, n):
    """float32 ``[n]`` top-p values: the edges (1, 0.01, ..., 1e-6) every third row."""
    edges = [1.0, 0.01, 0.5, 0.9, 0.99, 1e-6]
    return np.array([edges[i % len(edges)] if i % 3 == 0 else rng.uniform(0.05, 0.99)
                     for i in range(n)], np.float32)


def mass_margin(scores, weights, p):
    """Relative distance (float64) between p * total and the running mass at the end of
    each tie group of the descending scores, minimised over the groups up to the
    crossing; inf for p >= 1 or an empty row."""
    out = []
    for s, w, pp in zip(scores, weights, p):
        total = w.sum()
        if pp >= 1 or not total > 0:
            out.append(math.inf)
            continue
        order = np.argsort(-s, kind="stable")
        s_sorted, cum = s[order], np.cumsum(w[order])
        ends = np.flatnonzero(np.append(s_sorted[1:] != s_sorted[:-1], True))
        gaps = np.abs(cum[ends] - pp * total) / total
        cross = np.searchsorted(cum[ends], pp * total)
        out.append(float(gaps[: cross + 1].min()))
    return np.array(out)


def xla_equal(a, b):
    """Elementwise ``a == b`` as XLA compares (subnormals equal zero on XLA:CPU)."""
    return np.asarray(jnp.asarray(a).astype(jnp.float32) == jnp.asarray(b).astype(jnp.float32))


def assert_same_thresholds(got, want, rows=None):
    """Per-row thresholds equal (as XLA compares), on the rows selected by ``rows``."""
    same = xla_equal(got, want)
    if rows is not None:
        same = same[rows]
    assert same.all(), (np.flatnonzero(~same), np.asarray(got), np.asarray(want))


def assert_element_values(x, t):
    """Each threshold is a value of its row (as XLA compares), or -inf."""
    x = jnp.asarray(x).astype(jnp.float32)
    t = jnp.asarray(t).astype(jnp.float32)
    ok = np.asarray(jnp.any(x == t[..., None], axis=-1) | (t == -jnp.inf))
    assert ok.all(), np.flatnonzero(~ok)


def assert_filter_matches_reference(row_fn, logits, values, out, m=1, min_clear=0.75):
    """A filter's output ``out`` equals the float64 reference ``row_fn`` (tests/reference.py)
    on the rows decided clearly (margin > `REL_MARGIN`, at least ``min_clear`` of them): the
    same kept set, kept logits unchanged, at least ``m`` kept per row."""
    out = np.asarray(out)
    assert out.shape == logits.shape and out.dtype == logits.dtype
    x = np.asarray(logits).astype(np.float64)
    want, margin = ref.apply(row_fn, x, values, m=m)
    clear = margin > REL_MARGIN
    assert clear.mean() >= min_clear, clear.mean()
    got = out.astype(np.float64)
    np.testing.assert_array_equal(np.isfinite(got)[clear], np.isfinite(want)[clear])
    fin = np.isfinite(got)
    np.testing.assert_array_equal(got[fin], x[fin])  # kept logits unchanged
    assert np.all(np.isfinite(got).sum(-1) >= np.minimum(m, np.isfinite(x).sum(-1)))


#: The four set filters: ``name -> (filter, float64 reference row function (tests/reference.py),
#: values(rng, n, vocab) -> per-row values [n])``.
FILTER_CASES = {
    "top_k": (js.top_k, ref.top_k_row, per_row_k),
    "top_p": (js.top_p, ref.top_p_row, lambda rng, n, v: per_row_p(rng, n)),
    "typical_p": (js.typical_p, ref.typical_p_row, lambda rng, n, v: per_row_p(rng, n)),
    "min_p": (js.min_p, ref.min_p_row,
              lambda rng, n, v: np.where(np.arange(n) % 4 == 0, 0.0, rng.uniform(0, 0.5, n)).astype(np.float32)),
}


# ----------------------------------------------------------------------------- compiled programs


def compiles(fn):
    """A jitted ``fn`` and a list that grows by one at every trace (= compile)."""
    traces = []

    def traced(*args):
        traces.append(1)
        return fn(*args)

    return jax.jit(traced), traces


#: The GPU selection plan, run by the Pallas interpreter (on CPU).
INTERPRET_KERNEL_PLAN = dataclasses.replace(_select.KERNEL_PLAN, interpret=True)
#: Short names of the logits dtypes the kernels support.
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
#: The custom-call target of a Triton kernel in a CUDA lowering.
TRITON = "__gpu$xla.gpu.triton"


def export_cuda(fn, *shapes):
    """The MLIR text of ``jit(fn)`` lowered for ``platforms=["cuda"]`` (runs on CPU)."""
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*shapes)
    return exported.mlir_module()


def eqns(jaxpr, into_kernels=True):
    """Every equation of a jaxpr, those of sub-jaxprs (cond, pjit, ...) included; those
    inside Pallas kernels only with ``into_kernels``."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name == "pallas_call" and not into_kernels:
            continue
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else (param,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from eqns(sub.jaxpr, into_kernels)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from eqns(sub, into_kernels)


# ----------------------------------------------------------------------------- tokenizer files

BPE_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3 of the `tokenizer_file` fixture's BPE
BPE_TEXTS = ["To be, or not to be: that is the question.", "天气 nice 🙂", "a"]


def checkpoint_dir(tmp_path, tokenizer_file, config=None, tokenizer_config=None):
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    if tokenizer_config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return str(tmp_path)


def train_bpe(folder, texts, vocab_size: int) -> str:
    """A byte-level BPE `tokenizer.json` trained on ``texts`` in ``folder`` (ids 0..3:
    `BPE_SPECIALS`); returns its path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    path = os.path.join(str(folder), "tokenizer.json")
    tok.save(path)
    return path
