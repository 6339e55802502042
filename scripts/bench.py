"""Benchmark: jaxsample's sort-free filters and sampler against the full sort, lax.top_k,
jax.random.categorical and transformers (torch), and decode speed of `generate`.

    python scripts/bench.py                      # full run on whatever backend jax has
    python scripts/bench.py --quick              # fewer repeats, smaller generate run
    python scripts/bench.py --json out.json      # also write the results as JSON
    python scripts/bench.py --skip-generate      # sampling tables only
    python scripts/bench.py --generate-preset tiny --new-tokens 32   # a quick CPU generate
    python scripts/bench.py --gpu-check          # issue 11's GPU table in one run (JSON too)

Method (sampling): every case is one jitted `lax.fori_loop` of `iters` calls; iteration
`i` adds `i * 1e-6` to the logits and folds `i` into the key, so XLA cannot hoist the
work out of the loop, and the tokens are summed into the carry so nothing is dead code.
The time per call is (loop time) / iters, median over `repeats` runs; the cases of one
shape are compiled first and then timed in interleaved rounds (fair under background
load). Rows:

* ours: `jaxsample.top_p` / `top_k` (a traced per-row k) / `min_p` followed by
  `jaxsample.sample`; `default_chain(temperature=0.8, top_p=0.9)` through
  `sample_step` (filters, draw and both log-probs); `sample` alone; `greedy`.
* full-sort reference: what common JAX samplers do for top-p: sort the vocabulary,
  softmax, cumsum, mask below the cutoff, `jax.random.categorical`.
* `lax.top_k(50)` + `jax.random.categorical` over the 50 (gemma / MaxText top-k),
  `jax.random.categorical` over the whole vocabulary, `jnp.argmax`.
* torch (when installed): transformers' `TopPLogitsWarper(0.9)` / `TopKLogitsWarper(50)`,
  softmax, `torch.multinomial`, on float32 scores as transformers' generate uses them
  (bf16 logits are converted first), eager, timed from Python.

Logits: "flat" = N(0, 1) i.i.d. (top-p 0.9 keeps most of the vocabulary: the radix path);
"peaked" = Zipf-like, logit = -1.7 ln(rank) over a random permutation plus N(0, 0.1)
noise (top-p 0.9 keeps ~16 tokens: the candidate-window path on CPU).

Generate: `jaxsample.generate` with `models.DecoderLM.random(preset)` (default
`llama-110m`, bf16, random weights), prompt 128 random tokens, 256 new tokens, batch 1
and 32, greedy and top-p 0.9; tokens/s (end to end) = batch * new tokens / (steady wall
time, prefill included); decode ms/step = (t(N new tokens) - t(1 new token)) / (N - 1),
the decode loop alone; compile time = first call - steady call. transformers'
`LlamaForCausalLM.generate` with the same shapes (tied embeddings, bf16, eager
attention, random weights, `do_sample=True, top_p=0.9, top_k=0` or greedy, EOS off)
when torch is installed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cli  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import jaxsample as js  # noqa: E402
from models.config import PRESETS  # noqa: E402

CPU_SHAPES = [(1, 32000), (8, 131072), (32, 32000)]
GPU_SHAPES = [(1, 32000), (64, 131072), (256, 262144)]
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
DISTRIBUTIONS = ("flat", "peaked")
REF = "full-sort top-p + categorical (reference)"
BELOW_RESOLUTION = "below timer resolution"  # a difference of timings within their run-to-run spread


# ----------------------------------------------------------------------------- logits


def make_logits(shape: tuple[int, int], dist: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    b, v = shape
    if dist == "flat":
        return rng.standard_normal((b, v), dtype=np.float32)
    ranks = np.stack([rng.permutation(v) for _ in range(b)]) + 1
    x = -1.7 * np.log(ranks) + 0.1 * rng.standard_normal((b, v))
    return x.astype(np.float32)


# ----------------------------------------------------------------------------- JAX cases


def reference_top_p_sample(key, x, p):
    """The full-sort top-p of common JAX samplers, then jax.random.categorical."""
    x = x.astype(jnp.float32)
    desc = -jnp.sort(-x, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    cut = jnp.minimum(jnp.sum(cum < p[..., None], axis=-1, keepdims=True), x.shape[-1] - 1)
    threshold = jnp.take_along_axis(desc, cut, axis=-1)
    return jax.random.categorical(key, jnp.where(x >= threshold, x, -jnp.inf), axis=-1)


def lax_top_k_sample(key, x, k=50):
    values, index = lax.top_k(x.astype(jnp.float32), k)
    pick = jax.random.categorical(key, values, axis=-1)
    return jnp.take_along_axis(index, pick[..., None], axis=-1)[..., 0]


def jax_cases(batch: int) -> dict[str, Callable]:
    """name -> f(key, keys, x, k, p) -> int tokens [B]; key: one key, keys: one per row."""
    chain = js.default_chain(temperature=0.8, top_p=0.9)

    def default_chain(key, keys, x, k, p):
        state = chain.init(None, None, x.shape[-1])
        token, _, out = js.sample_step(chain, x, state, keys)
        # consume the log-probs too, so they are not dead code
        return token + (out.token_logprob_processed + out.token_logprob_raw > 0)

    return {
        "ours: top-p(0.9) + sample": lambda key, keys, x, k, p: js.sample(keys, js.top_p(x, p)),
        "ours: top-k(50, traced) + sample": lambda key, keys, x, k, p: js.sample(keys, js.top_k(x, k)),
        "ours: min-p(0.05) + sample": lambda key, keys, x, k, p: js.sample(keys, js.min_p(x, 0.05)),
        "ours: default chain step (T=0.8, top-p 0.9, log-probs)": default_chain,
        "ours: sample (no filter)": lambda key, keys, x, k, p: js.sample(keys, x),
        "ours: greedy": lambda key, keys, x, k, p: js.greedy(x),
        REF: lambda key, keys, x, k, p: reference_top_p_sample(key, x, p),
        "lax.top_k(50) + categorical": lambda key, keys, x, k, p: lax_top_k_sample(key, x),
        "jax.random.categorical": lambda key, keys, x, k, p: jax.random.categorical(key, x.astype(jnp.float32), axis=-1),
        "jnp.argmax": lambda key, keys, x, k, p: jnp.argmax(x, axis=-1),
    }


def build_loop(fn: Callable, iters: int) -> Callable:
    @jax.jit
    def loop(x, key, k, p):
        batch = x.shape[0]

        def body(i, acc):
            xi = (x.astype(jnp.float32) + i.astype(jnp.float32) * 1e-6).astype(x.dtype)
            ki = jax.random.fold_in(key, i)
            keys = jax.random.split(ki, batch)
            tokens = fn(ki, keys, xi, k, p)
            return acc + jnp.sum(tokens.astype(jnp.int32))

        return lax.fori_loop(0, iters, body, jnp.int32(0))

    return loop


def time_call(f: Callable, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t0


def bench_jax_shape(shape, dtype_name, dist, repeats, target_s, only=None) -> dict[str, float]:
    """Median seconds per call of every JAX case at one shape / dtype / distribution."""
    batch = shape[0]
    x = jnp.asarray(make_logits(shape, dist), DTYPES[dtype_name])
    key = jax.random.key(0)
    k = jnp.full((batch,), 50, jnp.int32)
    p = jnp.full((batch,), 0.9, jnp.float32)
    cases = jax_cases(batch)
    if only:
        cases = {n: f for n, f in cases.items() if any(o in n for o in only) or n == REF}
    loops = {}
    for name, fn in cases.items():  # compile, then size the loop to ~target_s
        probe = build_loop(fn, 2)
        time_call(probe, x, key, k, p)
        per_call = max(min(time_call(probe, x, key, k, p), time_call(probe, x, key, k, p)) / 2, 1e-6)
        iters = int(np.clip(target_s / per_call, 2, 500))
        loops[name] = (build_loop(fn, iters), iters)
        time_call(loops[name][0], x, key, k, p)
    samples = {name: [] for name in loops}
    for _ in range(repeats):  # interleaved rounds
        for name, (loop, iters) in loops.items():
            samples[name].append(time_call(loop, x, key, k, p) / iters)
    return {name: float(np.median(v)) for name, v in samples.items()}


# ----------------------------------------------------------------------------- torch cases


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception:
        return False
    return True


def bench_torch_shape(shape, dtype_name, dist, repeats, target_s) -> dict[str, float]:
    import torch
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    x = make_logits(shape, dist)
    if dtype_name == "bf16":  # bf16 logits, then float32 as transformers' generate does
        scores = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32)
    else:
        scores = torch.from_numpy(x)
    ids = torch.zeros((shape[0], 1), dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    warpers = {"torch: transformers TopPLogitsWarper(0.9) + multinomial": TopPLogitsWarper(top_p=0.9),
               "torch: transformers TopKLogitsWarper(50) + multinomial": TopKLogitsWarper(top_k=50)}
    out = {}
    for name, warper in warpers.items():
        def call():
            s = warper(ids, scores)
            return torch.multinomial(torch.softmax(s, dim=-1), 1, generator=gen)

        call()
        t0 = time.perf_counter()
        call()
        per_call = max(time.perf_counter() - t0, 1e-6)
        iters = int(np.clip(target_s / per_call, 2, 500))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                call()
            times.append((time.perf_counter() - t0) / iters)
        out[name] = float(np.median(times))
    return out


# ----------------------------------------------------------------------------- generate


_MODEL_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def bench_generate_jax(preset_name, prompt_len, new_tokens, batch, mode, repeats, dtype="bf16") -> dict[str, float]:
    from models import DecoderLM, preset

    config = preset(preset_name).replace(dtype=_MODEL_DTYPES[dtype])
    model = DecoderLM.random(config, jax.random.key(0))
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(0, config.vocab_size, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    keys = jax.random.split(jax.random.key(2), batch)
    sampler = None if mode == "greedy" else js.default_chain(top_p=0.9)

    def run(n=new_tokens):
        return js.generate(model, prompts, lengths, keys, max_new_tokens=n, sampler=sampler)

    first = time_call(run)
    samples = [time_call(run) for _ in range(repeats)]
    out = _rates(batch, new_tokens, samples, lambda: time_call(run, 1), repeats)
    compile_s = first - out["seconds"]  # None (and the flag) when within the timings' spread, as for decode
    out.update(compile_below_resolution=compile_s <= out.get("noise_s", 0.0))
    out.update(compile_s=None if out["compile_below_resolution"] else compile_s)
    return out


def _rates(batch, new_tokens, samples, run_one, repeats) -> dict[str, Any]:
    """End-to-end rate (prefill included) and the decode step alone, from the difference
    with a 1-token run: (t(N) - t(1)) / (N - 1), medians of `samples` (the t(N) runs) and
    of at least 3 t(1) runs.

    The difference resolves nothing when it is not above the run-to-run spread (max - min)
    of those timings, `noise_s`: then the decode figures are None and
    `decode_below_resolution` is True (printed "below timer resolution"; more new tokens
    fix it), never a clamped number.
    """
    steady = float(np.median(samples))
    out: dict[str, Any] = {"tokens_per_s": batch * new_tokens / steady, "seconds": steady}
    if new_tokens > 1:
        run_one()  # compile / warm up
        ones = [run_one() for _ in range(max(repeats, 3))]
        one = float(np.median(ones))
        noise = float(max(np.ptp(ones), np.ptp(samples)))
        out.update(prefill_s=one, noise_s=noise, decode_below_resolution=steady - one <= noise,
                   decode_ms_per_step=None, decode_tokens_per_s=None)
        if not out["decode_below_resolution"]:
            step = (steady - one) / (new_tokens - 1)
            out.update(decode_ms_per_step=step * 1e3, decode_tokens_per_s=batch / step)
    return out


def bench_generate_torch(preset_name, prompt_len, new_tokens, batch, mode, repeats, dtype="bf16") -> dict[str, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models import preset

    c = preset(preset_name)
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                         num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
                         max_position_embeddings=max(c.max_seq_len, prompt_len + new_tokens),
                         rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0,
                         attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    rng = np.random.default_rng(1)
    ids = torch.from_numpy(rng.integers(0, c.vocab_size, (batch, prompt_len))).long()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
    if mode == "greedy":
        kwargs.update(do_sample=False)
    else:
        kwargs.update(do_sample=True, top_p=0.9, top_k=0, temperature=1.0)

    def timed(n=new_tokens):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, **{**kwargs, "max_new_tokens": n, "min_new_tokens": n})
        assert out.shape == (batch, prompt_len + n), out.shape
        return time.perf_counter() - t0

    timed()
    return _rates(batch, new_tokens, [timed() for _ in range(repeats)], lambda: timed(1), repeats)


# ----------------------------------------------------------------------------- --gpu-check

#: The shapes of issue 11's table: (shape, dtypes).
GPU_CHECK_SHAPES = [((64, 131072), ("bf16", "fp32")), ((256, 262144), ("bf16", "fp32")),
                    ((1, 32000), ("fp32",)), ((1, 131072), ("fp32",))]
#: --gpu-check-smoke (hidden, for CI on CPU): the same code on tiny shapes.
GPU_CHECK_SMOKE_SHAPES = [((2, 256), ("bf16",))]
ONE_READ = "one read (row max)"
MIN_P = "min_p(0.05) + sample"
SORT = "full-sort top-p + categorical"


def gpu_check_cases(batch: int) -> dict[str, Callable]:
    """name -> f(keys, x, k, p) -> a value per row (summed into the loop's carry)."""
    chain = js.default_chain(temperature=0.8, top_p=0.9)
    # The same processors nested one level deeper: not the default chain's structure,
    # so `sample_step` applies them one by one (the unfused baseline on a GPU).
    unfused = js.chain(js.chain(*chain.processors))
    with_top_k = js.default_chain(temperature=0.8, top_k=50, top_p=0.9)

    def step(c):
        def run(keys, x, k, p):
            token, _, out = js.sample_step(c, x, None, keys)
            return token + (out.token_logprob_processed + out.token_logprob_raw > 0)
        return run

    return {
        ONE_READ: lambda keys, x, k, p: jnp.max(x, axis=-1).astype(jnp.float32) > 0,
        MIN_P: lambda keys, x, k, p: js.sample(keys, js.min_p(x, 0.05)),
        "top_p(0.9) + sample": lambda keys, x, k, p: js.sample(keys, js.top_p(x, p)),
        "top_k(50, traced) + sample": lambda keys, x, k, p: js.sample(keys, js.top_k(x, k)),
        "typical_p(0.9) + sample": lambda keys, x, k, p: js.sample(keys, js.typical_p(x, p)),
        "default_chain(T=0.8, top_p=0.9) step": step(chain),
        "same chain, unfused step": step(unfused),
        "default_chain(T=0.8, top_k=50, top_p=0.9) step": step(with_top_k),
        SORT: lambda keys, x, k, p: reference_top_p_sample(keys[0], x, p),
    }


def build_pick_loop(fn: Callable, iters: int) -> Callable:
    """ANCHORS' method: iteration i uses the (i mod 4)-th of 4 precomputed logits tensors
    and folds i into the keys; the per-row outputs are summed into the carry."""

    @jax.jit
    def loop(xs, key, k, p):
        batch = xs.shape[1]

        def body(i, acc):
            x = lax.dynamic_index_in_dim(xs, i % xs.shape[0], keepdims=False)
            keys = jax.random.split(jax.random.fold_in(key, i), batch)
            return acc + jnp.sum(fn(keys, x, k, p).astype(jnp.int32))

        return lax.fori_loop(0, iters, body, jnp.int32(0))

    return loop


def gpu_check(json_path: str | None, smoke: bool) -> dict[str, Any]:
    """Issue 11's GPU check in one run: per-call times inside one jitted loop, ratios to
    one read, to min_p + sample and to the full sort; generate's top-p cost per step."""
    env = environment()
    shapes = GPU_CHECK_SMOKE_SHAPES if smoke else GPU_CHECK_SHAPES
    iters, repeats = (1, 1) if smoke else (20, 5)
    print(f"# jaxsample --gpu-check: {env['device']} ({env['backend']}), {env['date']}, jax {env['jax']}",
          flush=True)
    rows = []
    for shape, dtypes in shapes:
        batch = shape[0]
        k = jnp.full((batch,), 50, jnp.int32)
        p = jnp.full((batch,), 0.9, jnp.float32)
        for d in dtypes:
            t0 = time.perf_counter()
            xs = jnp.stack([jnp.asarray(make_logits(shape, "flat", seed) * 2.0, DTYPES[d])
                            for seed in range(4)])  # N(0, 2), as ANCHORS
            loops = {name: build_pick_loop(fn, iters) for name, fn in gpu_check_cases(batch).items()}
            for loop in loops.values():  # compile + warm up
                time_call(loop, xs, jax.random.key(0), k, p)
            samples = {name: [] for name in loops}
            for _ in range(repeats):  # interleaved rounds
                for name, loop in loops.items():
                    samples[name].append(time_call(loop, xs, jax.random.key(0), k, p) / iters)
            times = {name: float(np.median(v)) for name, v in samples.items()}
            for name, sec in times.items():
                rows.append({"shape": list(shape), "dtype": d, "case": name, "seconds": sec,
                             "x_one_read": sec / times[ONE_READ], "x_min_p": sec / times[MIN_P],
                             "x_full_sort": sec / times[SORT]})
            del xs
            print(f"  [{shape[0]}, {shape[1]}] {d}: {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n| shape | dtype | case | µs per call | x one read | x min_p + sample | x full sort |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| [{r['shape'][0]}, {r['shape'][1]}] | {r['dtype']} | {r['case']} | {r['seconds'] * 1e6:.1f} "
              f"| {r['x_one_read']:.2f} | {r['x_min_p']:.2f} | {r['x_full_sort']:.3f} |", flush=True)

    preset_name, new_tokens = ("tiny", 3) if smoke else ("llama-110m", 64)
    gen = []
    for batch in (1,) if smoke else (1, 32):
        steps = {}
        for mode in ("greedy", "top-p 0.9"):
            r = bench_generate_jax(preset_name, 8 if smoke else 128, new_tokens, batch, mode,
                                   1 if smoke else 2, "bf16")
            steps[mode] = r["decode_ms_per_step"]
        gen.append({"preset": preset_name, "dtype": "bf16", "batch": batch, "new_tokens": new_tokens,
                    "greedy_ms_per_step": steps["greedy"], "top_p_ms_per_step": steps["top-p 0.9"],
                    # None: below timer resolution (bench_generate_jax's rule)
                    "top_p_cost": None if None in steps.values() else steps["top-p 0.9"] / steps["greedy"] - 1.0})
    print(f"\n| generate {preset_name} bf16 | greedy ms/step | top-p 0.9 ms/step | top-p cost per step |")
    print("|---|---|---|---|")
    def ms(v):
        return "below timer resolution" if v is None else f"{v:.3f}"

    for g in gen:
        cost = "–" if g["top_p_cost"] is None else f"{100 * g['top_p_cost']:+.1f}%"
        print(f"| batch {g['batch']} | {ms(g['greedy_ms_per_step'])} | {ms(g['top_p_ms_per_step'])} "
              f"| {cost} |", flush=True)
    report = {"environment": env, "gpu_check": rows, "generate": gen,
              "method": "per call inside one jitted fori_loop over 4 precomputed N(0, 2) logits "
                        f"tensors, {iters} iterations, median of {repeats}"}
    print()
    _cli.write_json(json_path or "bench_gpu_check.json", report, sort_keys=True)
    return report


# ----------------------------------------------------------------------------- report


def fmt_time(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def environment() -> dict[str, Any]:
    dev = jax.devices()[0]
    env = {
        "date": datetime.date.today().isoformat(),
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
        "numpy": np.__version__,
    }
    try:
        import torch
        import transformers
        env.update(torch=torch.__version__, transformers=transformers.__version__,
                   torch_threads=torch.get_num_threads())
    except Exception:
        env.update(torch=None, transformers=None)
    return env


def sampling_tables(results: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = []
    for shape in dict.fromkeys(tuple(r["shape"]) for r in results):
        rows = [r for r in results if tuple(r["shape"]) == shape]
        names = list(dict.fromkeys(r["case"] for r in rows))
        lines.append(f"\n#### [{shape[0]}, {shape[1]}]: time per call (speed-up vs the full-sort reference)\n")
        lines.append("| case | " + " | ".join(f"{d} {dist}" for d, dist in columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        for name in names:
            cells = []
            for d, dist in columns:
                hit = [r for r in rows if r["case"] == name and r["dtype"] == d and r["dist"] == dist]
                ref = [r for r in rows if r["case"] == REF and r["dtype"] == d and r["dist"] == dist]
                if not hit:
                    cells.append("–")
                    continue
                t = hit[0]["seconds"]
                ratio = f" ({ref[0]['seconds'] / t:.1f}x)" if ref and name != REF else ""
                cells.append(fmt_time(t) + ratio)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generate_table(results: list[dict]) -> str:
    lines = ["| system | dtype | batch | mode | tokens/s (end to end) | decode ms/step | decode tokens/s "
             "| compile s |", "|---|---|---|---|---|---|---|---|"]

    def cell(r, field, digits):  # absent: not measured; None: measured, below what the method resolves
        if field not in r:
            return "–"
        return BELOW_RESOLUTION if r[field] is None else f"{r[field]:.{digits}f}"

    for r in results:
        compile_s, step, rate = cell(r, "compile_s", 1), cell(r, "decode_ms_per_step", 2), cell(r, "decode_tokens_per_s", 1)
        lines.append(f"| {r['system']} | {r.get('dtype', 'bf16')} | {r['batch']} | {r['mode']} | {r['tokens_per_s']:.1f} | "
                     f"{step} | {rate} | {compile_s} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, shorter loops, small generate run")
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--repeats", type=int, help="timed runs per case (median); default 7, quick 3")
    ap.add_argument("--target-ms", type=float, help="wall time per timed run; default 300, quick 100")
    ap.add_argument("--shapes", help="override the shape list, e.g. '8x131072,1x32000'")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--dists", default="flat,peaked")
    ap.add_argument("--cases", help="comma-separated substrings: only the JAX cases whose name contains one")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-sampling", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--generate-preset", default="llama-110m", choices=sorted(PRESETS))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, help="default 256 (quick: 32)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--generate-repeats", type=int, help="default 3 (quick: 1)")
    ap.add_argument("--generate-dtypes",
                    help="weights/activations dtypes of the generate rows, e.g. 'bf16,fp32' "
                         "(default: the preset's own, bf16 for llama-110m)")
    ap.add_argument("--gpu-check", action="store_true",
                    help="issue 11's GPU check in one run (< 4 min on one GPU): filter + sample "
                         "times and ratios at its shapes, generate's top-p cost; writes JSON "
                         "(--json, default bench_gpu_check.json)")
    ap.add_argument("--gpu-check-smoke", action="store_true", help=argparse.SUPPRESS)  # CI: tiny shapes
    args = ap.parse_args(argv)
    if args.json:  # its folder exists before the run (a documented --json runs/x.json once failed at the end)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    if args.gpu_check or args.gpu_check_smoke:
        gpu_check(args.json, smoke=args.gpu_check_smoke)
        return 0

    quick = args.quick
    repeats = args.repeats or (3 if quick else 7)
    target_s = (args.target_ms or (100 if quick else 300)) / 1e3
    env = environment()
    backend = env["backend"]
    if args.shapes:
        pairs = [s.split("x") for s in args.shapes.split(",")]
        if not all(len(pq) == 2 and all(n.isdigit() and int(n) > 0 for n in pq) for pq in pairs):
            ap.error(f"--shapes: expected BxV pairs like 8x131072, got {args.shapes!r}")
        shapes = [(int(b), int(v)) for b, v in pairs]
    else:
        shapes = CPU_SHAPES if backend == "cpu" else GPU_SHAPES
    dtypes = args.dtypes.split(",")
    dists = args.dists.split(",")
    for flag, values, allowed in (("--dtypes", dtypes, DTYPES), ("--dists", dists, DISTRIBUTIONS),
                                  ("--generate-dtypes", (args.generate_dtypes or "bf16").split(","),
                                   _MODEL_DTYPES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            ap.error(f"{flag}: unknown value {bad[0]!r} (choose from {', '.join(allowed)})")
    only = args.cases.split(",") if args.cases else None
    use_torch = torch_available() and not args.skip_torch
    print(f"# jaxsample benchmark: {env['device']} ({backend}, {env['cpu_count']} CPUs), {env['date']}, "
          f"jax {env['jax']}, torch {env['torch']}, transformers {env['transformers']}", flush=True)

    report: dict[str, Any] = {"environment": env, "args": vars(args), "sampling": [], "generate": []}
    if not args.skip_sampling:
        for shape in shapes:
            for d in dtypes:
                for dist in dists:
                    t0 = time.perf_counter()
                    res = bench_jax_shape(shape, d, dist, repeats, target_s, only)
                    if use_torch:
                        res.update(bench_torch_shape(shape, d, dist, repeats, target_s))
                    for name, sec in res.items():
                        report["sampling"].append({"shape": list(shape), "dtype": d, "dist": dist,
                                                   "case": name, "seconds": sec})
                    print(f"  [{shape[0]}, {shape[1]}] {d} {dist}: {time.perf_counter() - t0:.0f} s", flush=True)
        print(sampling_tables(report["sampling"], [(d, dist) for d in dtypes for dist in dists]), flush=True)

    if not args.skip_generate:
        new_tokens = args.new_tokens or (32 if quick else 256)
        g_repeats = args.generate_repeats or (1 if quick else 3)
        batches = [int(b) for b in args.batches.split(",")]
        if args.generate_dtypes:
            g_dtypes = args.generate_dtypes.split(",")
        else:
            from models import preset

            native = preset(args.generate_preset).dtype
            g_dtypes = [short for short, name in _MODEL_DTYPES.items() if name == native]
        report["generate_config"] = {"preset": args.generate_preset, "prompt_len": args.prompt_len,
                                     "new_tokens": new_tokens, "batches": batches, "repeats": g_repeats,
                                     "dtypes": g_dtypes}
        for dtype in g_dtypes:
            for batch in batches:
                for mode in ("greedy", "top-p 0.9"):
                    row = {"dtype": dtype, "batch": batch, "mode": mode}
                    r = bench_generate_jax(args.generate_preset, args.prompt_len, new_tokens, batch, mode,
                                           g_repeats, dtype)
                    report["generate"].append({"system": "jaxsample.generate", **row, **r})
                    print(f"  generate jax {dtype} b={batch} {mode}: {r['tokens_per_s']:.1f} tok/s", flush=True)
                    if use_torch:
                        r = bench_generate_torch(args.generate_preset, args.prompt_len, new_tokens, batch, mode,
                                                 g_repeats, dtype)
                        report["generate"].append({"system": "transformers LlamaForCausalLM.generate (eager)",
                                                   **row, **r})
                        print(f"  generate torch {dtype} b={batch} {mode}: {r['tokens_per_s']:.1f} tok/s",
                              flush=True)
        print(f"\n#### generate: preset {args.generate_preset}, prompt {args.prompt_len}, "
              f"{new_tokens} new tokens\n", flush=True)
        print(generate_table(report["generate"]), flush=True)

    if args.json:
        print()
        _cli.write_json(args.json, report, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
