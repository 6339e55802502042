"""Generate text with the shipped Shakespeare model (or any checkpoint) from the command line.

    python scripts/generate.py "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-p 0.9
    python scripts/generate.py --prompt-file prompts.txt --num-samples 3 --seed 1
    python scripts/generate.py "Hello" --checkpoint path/to/llama-dir --greedy
    python scripts/generate.py "Name three rivers." --checkpoint path/to/Qwen2-0.5B-Instruct --chat
    python scripts/generate.py "ROMEO:" --order llamacpp --top-k 40 --min-p 0.05 --repetition-penalty 1.1 \
        --penalty-window 64 --dry-multiplier 0.8 --xtc-probability 0.5 --top-logprobs 3
    python scripts/generate.py "ROMEO:" --greedy --prompt-lookup 3 --num-draft-tokens 4   # speculative
    python scripts/generate.py "ROMEO:" --greedy --ngram-draft --num-draft-tokens 5        # speculative
    python scripts/generate.py "ROMEO:" --num-beams 4 --num-return-sequences 2 --length-penalty 1.2
    python scripts/generate.py --prompt-file prompts.txt --batch-size 8 --output out.jsonl  # continuous batching

Every sampling method of jaxsample is a flag (see docs/methods.md); --order picks the chain
order: jaxsample's documented default (every method), or the default order of transformers,
vLLM or llama.cpp (only the methods that system has). Prints each continuation, then the
compile time and the decode speed.

Streaming (the default when stdout or stderr is a terminal; --stream forces it, --no-stream turns it
off): one prompt and one sample is printed while it is generated; several prompts or
samples run as one batch and each row is printed whole as soon as it finishes (a stop
id), in the order they finish, with progress on stderr. With --no-stream the batch is one
`generate` call: every row is printed at the end, in order (beam search, speculative
decoding and --json-output always run this way).

Many prompts: with --batch-size B and more rows (prompts x samples) than B, at most B rows
decode at a time and a finished row's slot takes the next prompt at once
(`jaxsample.generate_many`); each row is written as a JSON line (with its "index") as soon
as it finishes, to stdout or --output FILE, with a progress bar on stderr. Every row's
tokens are those the one-batch run gives it.

A Hugging Face checkpoint directory (Llama, Mistral, Qwen2, Gemma, Gemma 2; see
models/hf.py) brings its defaults: every end-of-sequence id of generation_config.json
stops a row, and its temperature, top_p and top_k are used unless the flag is given.
--chat wraps each prompt as a user message in the checkpoint's chat template.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import _cli  # noqa: E402
import jaxsample as js  # noqa: E402
from models import (MAX_CHAT_CHARS, CheckpointError, check_generation_config, is_hf_checkpoint,  # noqa: E402
                    load_ngram_draft, load_pretrained, read_generation_defaults)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", help="prompt texts (default: one prompt, 'ROMEO:')")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--checkpoint", help="jaxsample checkpoint or Hugging Face checkpoint directory "
                                        "(default: the shipped Shakespeare model)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt, each with its own key")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true",
                   help="temperature 0: the arg-max of the processed logits (penalties and masks still apply)")
    p.add_argument("--order", choices=js.ORDERS, default="default",
                   help="chain order: jaxsample's default (every method) or that of transformers, vLLM, llama.cpp")
    p.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="stop a row at the end-of-sequence token")
    g = p.add_argument_group("temperature and truncation")
    _cli.sampling_flags(g, temperature=None, top_k=None, top_p=None, seed_and_greedy=False,
                        temperature_help="0 is greedy (default: the checkpoint's generation_config.json, else 0.8)",
                        default_help=" (default: the checkpoint's, else {identity})")
    g.add_argument("--dynatemp-range", type=float, default=0.0, help="dynamic temperature range; 0 disables")
    g.add_argument("--dynatemp-exponent", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0, help="0 disables")
    g.add_argument("--typical-p", type=float, default=1.0, help="1 disables")
    g.add_argument("--epsilon-cutoff", type=float, default=0.0, help="0 disables")
    g.add_argument("--eta-cutoff", type=float, default=0.0, help="0 disables")
    g.add_argument("--top-n-sigma", type=float, default=float("inf"), help="inf disables")
    g.add_argument("--min-tokens-to-keep", type=int, default=1)
    g.add_argument("--xtc-probability", type=float, default=0.0, help="0 disables")
    g.add_argument("--xtc-threshold", type=float, default=0.1)
    g.add_argument("--mirostat-tau", type=float, default=None, help="mirostat v2 target surprise (bits); off if unset")
    g.add_argument("--mirostat-eta", type=float, default=0.1)
    g = p.add_argument_group("penalties and masks")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 disables (prompt + output)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="0 disables (output)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="0 disables (output)")
    g.add_argument("--penalty-window", type=int, default=0, help="penalise only the last N tokens; 0: all")
    g.add_argument("--no-repeat-ngram", type=int, default=0, help="n-gram size; 0 disables")
    g.add_argument("--bad-words", default=None, help='texts never to generate, separated by "|"')
    g.add_argument("--min-new-tokens", type=int, default=0, help="no end-of-sequence before this many tokens")
    g.add_argument("--allowed-tokens", default=None, help="comma-separated token ids: sample only these")
    g.add_argument("--logit-bias", default=None, help='comma-separated "id:bias" pairs')
    g.add_argument("--dry-multiplier", type=float, default=0.0, help="DRY penalty; 0 disables")
    g.add_argument("--dry-base", type=float, default=1.75)
    g.add_argument("--dry-allowed-length", type=int, default=2)
    g.add_argument("--dry-window", type=int, default=0, help="DRY looks at the last N tokens; 0: all")
    g.add_argument("--dry-breakers", default='\\n|:|"|*',
                   help='single-token texts that stop DRY matching, separated by "|" (default: llama.cpp\'s)')
    g = p.add_argument_group("streaming")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="one row: print the text while it is generated; several prompts/samples (one batch): "
                        "print each row as soon as it finishes, progress on stderr. --no-stream: one generate "
                        "call, every row printed at the end. Default: on when stdout or stderr is a terminal "
                        "(progress on stderr)")
    g.add_argument("--chunk-size", type=int, default=16, help="decode steps per streamed chunk")
    g = p.add_argument_group("many prompts (continuous batching)")
    g.add_argument("--batch-size", type=int, default=0,
                   help="decode at most this many rows at a time (0: every row in one batch); with more rows "
                        "(prompts x samples) than this, or with --output or --prefill-widths, a finished row's "
                        "slot takes the next prompt at once (jaxsample.generate_many) and each row is written "
                        "as a JSON line as soon as it finishes, with a progress bar on stderr")
    g.add_argument("--prefill-widths", type=int, nargs="+", default=None, metavar="W",
                   help="with --batch-size: the prompt widths a refill may prefill at (the padded width is "
                        "always one; fewer widths compile faster, default: powers of two from 16 and their "
                        "midpoints; docs/engine.md)")
    g.add_argument("--output", metavar="FILE",
                   help="with --batch-size: write the JSON lines to FILE (FILE.partial while running, renamed "
                        "to FILE once every row is written) instead of stdout")
    g = p.add_argument_group("Hugging Face checkpoints")
    g.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message in the checkpoint's chat template (jinja2)")
    g.add_argument("--max-chat-chars", type=int, default=MAX_CHAT_CHARS, metavar="N",
                   help=f"the longest text the chat template may render (default {MAX_CHAT_CHARS:,} characters; "
                        f"docs/limits.md)")
    g = p.add_argument_group("limits (docs/limits.md)")
    g.add_argument("--memory-limit-gb", type=float, default=None, metavar="GB",
                   help="refuse a run whose estimated memory (weights, KV cache, outputs) exceeds this, before "
                        "compiling (default: the device's memory)")
    g = p.add_argument_group("outputs")
    g.add_argument("--top-logprobs", type=int, default=0, help="print the N most likely tokens of each step")
    g.add_argument("--prompt-logprobs", action="store_true", help="print each prompt's log-likelihood")
    add_speculative_args(p)
    add_beam_arguments(p)
    add_structured_flags(p)
    return p


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (exact: same output distribution, fewer target calls)")
    g.add_argument("--draft-checkpoint", help="a small draft model checkpoint with the target's tokenizer")
    g.add_argument("--prompt-lookup", type=int, metavar="N",
                   help="draft by prompt lookup: match the last N tokens (down to 1) in the row's own context")
    g.add_argument("--ngram-draft", nargs="?", const="shipped", metavar="FILE",
                   help="draft with a corpus n-gram table (jaxsample.NGramDraft; no FILE: the shipped model's, "
                        "built by scripts/build_ngram_draft.py); with --prompt-lookup N a match of the last N "
                        "tokens in the row's own context comes first")
    g.add_argument("--num-draft-tokens", type=int, metavar="K", help="tokens drafted per round (default 4)")


def check_speculative_args(args) -> str | None:
    """The error message for a bad combination of the speculative flags, or None."""
    drafts = [f for f, v in (("--draft-checkpoint", args.draft_checkpoint), ("--ngram-draft", args.ngram_draft),
                             ("--prompt-lookup", args.prompt_lookup)) if v is not None]
    if drafts and getattr(args, "num_beams", None) is not None:
        return f"{drafts[0]} cannot be used with --num-beams: beam search does not draft"
    if args.draft_checkpoint is not None and len(drafts) > 1:
        return f"--draft-checkpoint and {drafts[1]} are two drafts: choose one"
    if not drafts:
        return "--num-draft-tokens needs a draft (--draft-checkpoint, --ngram-draft or --prompt-lookup)" \
            if args.num_draft_tokens is not None else None
    if args.prompt_lookup is not None and args.prompt_lookup < 1:
        return f"--prompt-lookup must be >= 1, got {args.prompt_lookup}"
    if args.num_draft_tokens is not None and args.num_draft_tokens < 1:
        return f"--num-draft-tokens must be >= 1, got {args.num_draft_tokens}"
    if args.num_draft_tokens is not None and args.num_draft_tokens > js.MAX_DRAFT_TOKENS:
        return (f"--num-draft-tokens {args.num_draft_tokens} exceeds the bound {js.MAX_DRAFT_TOKENS} "
                f"(docs/limits.md): larger k compiles longer and cannot emit more than 1 / (1 - acceptance) "
                f"tokens a round")
    return None


def speculative_runner(args, lm, ids, lengths, keys, sampler, stop_ids, pad_id, stats: list):
    """None without a draft flag; else a callable running `speculative_generate` that returns
    the `GenerateOutput` and appends the `SpeculativeStats` to `stats`."""
    if args.draft_checkpoint is None and args.prompt_lookup is None and args.ngram_draft is None:
        return None
    if args.ngram_draft is not None:
        try:
            draft = load_ngram_draft(None if args.ngram_draft == "shipped" else args.ngram_draft,
                                     prompt_lookup=args.prompt_lookup)
        except ValueError as e:
            hint = ""
            if not os.path.exists(args.ngram_draft) and args.ngram_draft != "shipped":
                hint = (" (--ngram-draft takes an optional FILE: a prompt right after it is read as one; "
                        "put the prompt first or write --ngram-draft=FILE)")
            raise ValueError(f"--ngram-draft: {e}{hint}") from None
        if draft.vocab_size != lm.vocab_size:
            raise ValueError(f"--ngram-draft: the table's vocab_size {draft.vocab_size} != the target's "
                             f"{lm.vocab_size}")
    elif args.prompt_lookup is not None:
        draft = js.PromptLookup(args.prompt_lookup)
    else:
        draft, _ = load_pretrained(args.draft_checkpoint)
        if draft.vocab_size != lm.vocab_size:
            raise ValueError(f"--draft-checkpoint: vocab_size {draft.vocab_size} != the target's {lm.vocab_size}")
    k = 4 if args.num_draft_tokens is None else args.num_draft_tokens

    def run():
        out, st = js.speculative_generate(lm, ids, lengths, keys, max_new_tokens=args.max_new_tokens, draft=draft,
                                          num_draft_tokens=k, sampler=sampler, stop_ids=stop_ids, pad_id=pad_id,
                                          n=args.num_samples, top_logprobs=args.top_logprobs,
                                          prompt_logprobs=args.prompt_logprobs, memory_limit=memory_limit(args))
        stats.append(st)
        return out
    return run


def add_structured_flags(p: argparse.ArgumentParser) -> None:
    """Constrained decoding (jaxsample.Regex / JSONSchema / Choice) and JSON-lines output."""
    g = p.add_argument_group("structured output (needs pip install '.[structured]')")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--regex", metavar="PATTERN", help="every completion fully matches this regular expression")
    x.add_argument("--json-schema", metavar="FILE", help="every completion is JSON valid under this schema file")
    x.add_argument("--choice", metavar="A,B,C", help='every completion is one of these comma-separated texts')
    g.add_argument("--max-states", type=int, metavar="N", default=None,
                   help="the most automaton states a --regex / --json-schema / --choice constraint may use "
                        "(default 65536; the build stops as soon as it needs more)")
    g.add_argument("--max-transitions", type=int, metavar="N", default=None,
                   help="likewise for (state, token) transitions (default 2**26)")
    g.add_argument("--json-output", action="store_true",
                   help="print one JSON object per sample (prompt, completion, token_ids, finish_reason)")


def read_schema(path: str | None) -> dict | bool | None:
    """The --json-schema file as a dict (a ValueError naming the flag and file if unreadable)."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"--json-schema: {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--json-schema: cannot read a JSON schema from {path!r}: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"--json-schema: {path!r} holds a JSON {type(schema).__name__}, not a schema "
                         f"(a JSON object or a boolean)")
    return schema


def check_structured_flags(parser: argparse.ArgumentParser, args, beam) -> None:
    """Constraints and --json-output apply to sampling: with --num-beams they are an error (exit 2)."""
    given = [f for f in ("regex", "json_schema", "choice") if getattr(args, f) is not None]
    given += ["json_output"] if args.json_output else []
    if beam and given:
        parser.error(f"--{given[0].replace('_', '-')} cannot be used with --num-beams (beam search is not constrained)")


def build_constraint(args, tok) -> js.Constraint | None:
    """The constraint of --regex / --json-schema / --choice (None without one), built before tracing.

    Errors name the CLI flags (--max-states, not the Python argument max_states).
    """
    for flag in ("max_states", "max_transitions"):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    limits = dict(max_states=getattr(args, "max_states", None), max_transitions=getattr(args, "max_transitions", None))
    try:
        if args.regex is not None:
            return js.Regex(args.regex, tok, **limits)
        if args.json_schema is not None:
            return js.JSONSchema(read_schema(args.json_schema), tok, **limits)
        if args.choice is not None:
            return js.Choice(args.choice.split(","), tok, **limits)
    except ValueError as e:
        msg = str(e)
        for name in ("max_states", "max_transitions"):
            msg = msg.replace(f"pass a larger {name}", f"pass a larger --{name.replace('_', '-')}")
            msg = msg.replace(f"{name}=", f"--{name.replace('_', '-')} ")
        flag = "--regex" if args.regex is not None else "--json-schema" if args.json_schema is not None else "--choice"
        raise ValueError(f"{flag}: {msg}") from None
    return None


def json_row(tok, text: str, ids, finish_reason: int, top=None, prompt_lp=None, scored: int | None = None) -> str:
    """One JSON line: prompt, completion, token ids and finish reason (with --top-logprobs:
    [id, log-prob] pairs per step, top = (ids [L, K], log-probs [L, K]); with
    --prompt-logprobs: the prompt's log-likelihood and how many tokens it scores)."""
    ids = np.asarray(ids)
    row = dict(prompt=text, completion=tok.decode(ids), token_ids=ids.tolist(),
               finish_reason=js.FinishReason(int(finish_reason)).name.lower())
    if top is not None:
        row["top_logprobs"] = [[[int(k), float(v)] for k, v in zip(top[0][t], top[1][t])] for t in range(len(ids))]
    if prompt_lp is not None:
        row["prompt_logprob"] = float(np.asarray(prompt_lp).sum())
        row["prompt_tokens_scored"] = int(scored)
    return json.dumps(row, ensure_ascii=False)


def json_lines(out, texts, tok, top_logprobs: int, n: int = 1, prompt_lengths=None) -> list[str]:
    """--json-output: one JSON line per sample (`json_row`)."""
    tokens, gen_lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    lines = []
    for i, text in enumerate(texts):
        length = gen_lengths[i]
        top = (out.top_token_ids[i, :length], out.top_logprobs[i, :length]) if top_logprobs else None
        plp = None if out.prompt_logprobs is None else out.prompt_logprobs[i // n]
        scored = None if plp is None else int(prompt_lengths[i // n]) - 1
        lines.append(json_row(tok, text, tokens[i, :length], out.finish_reason[i], top, plp, scored))
    return lines


def run_many(parser, lm, tok, ids, lengths, keys, sampler, stop_ids, texts: list[str], args) -> int:
    """--batch-size with more rows than slots (or with --output, --prefill-widths):
    `jaxsample.generate_many_stream`, a JSON line per row as it finishes (its "index" is the
    row: prompt i's sample j is i * n + j), progress on stderr (prompts done / total,
    tokens/s, ETA)."""
    try:
        from tqdm import tqdm
    except ImportError:
        parser.error("--batch-size: the progress bar needs tqdm (pip install tqdm, or the '[cli]' extra)")
    n = args.num_samples
    try:
        rows = js.generate_many_stream(lm, ids, lengths, keys, slots=args.batch_size,
                                       max_new_tokens=args.max_new_tokens, sampler=sampler, stop_ids=stop_ids,
                                       pad_id=tok.pad_id, n=n, top_logprobs=args.top_logprobs,
                                       prompt_logprobs=args.prompt_logprobs, chunk_size=args.chunk_size,
                                       memory_limit=memory_limit(args), prefill_widths=args.prefill_widths)
    except ValueError as e:
        parser.error(error_text(e))
    partial = None if args.output is None else args.output + ".partial"
    try:
        sink = sys.stdout if partial is None else open(partial, "w", encoding="utf-8")
    except OSError as e:
        parser.error(f"--output: {e}")
    t0, tokens = time.perf_counter(), 0
    with tqdm(total=len(texts), unit="prompt", file=sys.stderr, dynamic_ncols=True) as bar:
        for c in rows:
            top = (c.top_token_ids[:c.length], c.top_logprobs[:c.length]) if args.top_logprobs else None
            scored = int(lengths[c.prompt_index]) - 1
            line = json.loads(json_row(tok, texts[c.index], c.tokens[:c.length], c.finish_reason, top,
                                       c.prompt_logprobs, scored))
            print(json.dumps({"index": c.index, **line}, ensure_ascii=False), file=sink, flush=True)
            tokens += c.length
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):,.0f} tokens/s", refresh=False)
            bar.update(1)
    if partial is not None:
        sink.flush()
        os.fsync(sink.fileno())
        sink.close()
        os.replace(partial, args.output)
    elapsed = time.perf_counter() - t0
    print(f"{len(texts)} rows, {tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:,.0f} tokens/s with compile), "
          f"{rows.steps} decode steps of {min(args.batch_size, len(texts))} slots, {rows.chunks} chunks, "
          f"{jax.default_backend()}",
          file=sys.stderr)
    return 0


# Flag -> (preset keyword, identity value). Only flags set away from their identity value
# reach the preset, so an order that lacks a method complains only when it is asked for.
_VALUES = {
    "temperature": 1.0, "dynatemp_range": 0.0, "dynatemp_exponent": 1.0, "top_k": 0, "top_p": 1.0,
    "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_n_sigma": float("inf"),
    "min_tokens_to_keep": 1, "xtc_probability": 0.0, "xtc_threshold": 0.1, "mirostat_tau": None,
    "mirostat_eta": 0.1, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "penalty_window": 0, "no_repeat_ngram": 0, "min_new_tokens": 0, "dry_multiplier": 0.0, "dry_base": 1.75,
    "dry_allowed_length": 2, "dry_window": 0,
}


# Flags whose default comes from the checkpoint's generation_config.json, else from here.
_CHECKPOINT_DEFAULTS = {"temperature": 0.8, "top_p": 1.0, "top_k": 0}


def _parse_ids(flag: str, text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated token ids, got {text!r}") from None


def _parse_bias(text: str) -> dict[int, float]:
    try:
        return {int(k): float(v) for k, v in (pair.split(":") for pair in text.split(",") if pair.strip())}
    except ValueError:
        raise ValueError(f'--logit-bias: expected comma-separated "id:bias" pairs, got {text!r}') from None


def _single_tokens(tok, texts: list[str]) -> list[int]:
    ids = []
    for text in texts:
        t = tok.encode(text, add_bos=False)
        if len(t) != 1:
            raise ValueError(f"--dry-breakers: {text!r} is {len(t)} tokens; each breaker must be one token")
        ids += t
    return ids


def build_sampler(args, tok: Any = None) -> js.Chain:
    """The chain of --order from the flags, through `jaxsample.preset_chain`.

    Without a tokenizer (``tok=None``) only the numeric values are built and checked (a
    fast failure before the model loads); the token-dependent ones (bad words, DRY
    breakers, the end-of-sequence id for --min-new-tokens) need ``tok``. Stages left at
    their identity value are pruned (fewer passes over the vocabulary).
    """
    flags = {name: getattr(args, name) for name in _VALUES}
    flags.update({name: fallback for name, fallback in _CHECKPOINT_DEFAULTS.items() if flags[name] is None})
    values = {name: value for name, value in flags.items() if value != _VALUES[name]}
    if args.greedy:
        values["temperature"] = 0.0
    if args.allowed_tokens:
        values["allowed_tokens"] = _parse_ids("--allowed-tokens", args.allowed_tokens)
    if args.logit_bias:
        values["logit_bias"] = _parse_bias(args.logit_bias)
    if tok is not None:
        if args.bad_words:
            values["bad_words"] = [tok.encode(w, add_bos=False) for w in args.bad_words.split("|") if w]
        if args.min_new_tokens:
            values["stop_ids"] = list(tok.eos_ids)
        if args.dry_multiplier and args.dry_breakers:
            texts = [b.replace("\\n", "\n") for b in args.dry_breakers.split("|") if b]
            values["dry_sequence_breakers"] = _single_tokens(tok, texts)
    elif args.min_new_tokens:
        values["stop_ids"] = [0]  # placeholder: the end-of-sequence id is known after loading
    return js.preset_chain(args.order, prune=True, **values)


def prompt_keys(seed: int, num_prompts: int, num_samples: int) -> jax.Array:
    """One key per prompt for `generate(..., n=num_samples)`.

    Sample j of prompt i uses fold_in(fold_in(key(seed), i), j) (generate folds j in when
    n > 1; with one sample the j = 0 key is passed), so a sample's text does not depend on
    --num-samples.
    """
    base = jax.random.key(seed)
    keys = jnp.stack([jax.random.fold_in(base, i) for i in range(num_prompts)])
    if num_samples == 1:
        keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    return keys


def apply_checkpoint_defaults(args) -> None:
    """Fills --temperature/--top-p/--top-k left unset: the checkpoint's value, else the CLI's."""
    defaults = None
    if args.checkpoint and os.path.isdir(args.checkpoint) and is_hf_checkpoint(args.checkpoint):
        check_generation_config(args.checkpoint)  # names the field and the file (ValueError)
        defaults = read_generation_defaults(args.checkpoint)
    if (defaults is not None and defaults.temperature == 0.0 and args.temperature is None
            and (args.top_p is not None or args.top_k is not None)):
        # The checkpoint asks for greedy (do_sample: false), but a sampling flag was given:
        # sample with the CLI's temperature rather than silently ignore the flag.
        print(f"note: the checkpoint's generation_config is greedy; sampling at --temperature "
              f"{_CHECKPOINT_DEFAULTS['temperature']} because --top-p/--top-k was given", file=sys.stderr)
        args.temperature = _CHECKPOINT_DEFAULTS["temperature"]
    for name, fallback in _CHECKPOINT_DEFAULTS.items():
        if getattr(args, name) is None:
            value = None if defaults is None else getattr(defaults, name)
            setattr(args, name, fallback if value is None else value)


def memory_limit(args) -> float | None:
    """--memory-limit-gb in bytes (None: the library's default, the device's memory)."""
    return None if args.memory_limit_gb is None else args.memory_limit_gb * 1e9


def error_text(e: ValueError) -> str:
    """A library error as the CLI reports it: a memory refusal names the CLI flags."""
    if not isinstance(e, js.MemoryLimitError):
        return str(e)
    parts = ", ".join(f"{name} {b / 1e9:.2f} GB" for name, b in e.parts.items())
    return (f"--max-new-tokens {e.max_new_tokens} ({e.rows} rows) needs an estimated {e.estimate / 1e9:.2f} GB "
            f"({parts}), above the memory limit {e.limit / 1e9:.2f} GB; lower --max-new-tokens (or the number "
            f"of prompts x --num-samples), or raise the limit with --memory-limit-gb (docs/limits.md)")


def _show(tok, token: int) -> str:
    return repr(tok.decode([int(token)]))


def timed_run(parser: argparse.ArgumentParser, run):
    """(output, seconds of the first call (compile + run), seconds of a second call);
    a ValueError from the library exits with status 2 and its message."""
    try:
        t0 = time.perf_counter()
        out = jax.block_until_ready(run())  # compiles, then runs
        first = time.perf_counter() - t0
    except ValueError as e:
        parser.error(error_text(e))
    t0 = time.perf_counter()
    jax.block_until_ready(run())  # steady state
    return out, first, time.perf_counter() - t0


# --- beam search (jaxsample.beam_search) ----------------------------------------------

# Flags that shape sampling or its outputs, which beam search (deterministic, raw log-probs) does not use.
_NOT_WITH_BEAMS = (*_VALUES, "greedy", "order", "num_samples", "allowed_tokens", "logit_bias", "bad_words",
                   "dry_breakers", "top_logprobs", "prompt_logprobs")


def add_beam_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("beam search", "deterministic: replaces sampling (transformers' semantics)")
    g.add_argument("--num-beams", type=int, default=None, help="beam search with N beams (off if unset)")
    g.add_argument("--length-penalty", type=float, default=None,
                   help="score = log-prob / length ** X (default 1; > 0 favours longer outputs)")
    g.add_argument("--early-stopping", choices=("false", "true", "never"), default=None,
                   help="when a prompt's search ends (transformers' early_stopping; default false)")
    g.add_argument("--num-return-sequences", type=int, default=None,
                   help="print the best N hypotheses of each prompt (default 1, at most --num-beams)")


def beam_settings(parser: argparse.ArgumentParser, args) -> dict | None:
    """`jaxsample.beam_search` keywords from the flags, or None without --num-beams.

    Beam-only flags without --num-beams, and sampling flags with it, are errors (exit 2).
    """
    beam_flags = ("length_penalty", "early_stopping", "num_return_sequences")
    if args.num_beams is None:
        given = [f for f in beam_flags if getattr(args, f) is not None]
        if given:
            parser.error(f"--{given[0].replace('_', '-')} needs --num-beams")
        return None
    sampling = [name for name in _NOT_WITH_BEAMS if getattr(args, name) != parser.get_default(name)]
    if sampling:
        flag = "--" + sampling[0].replace("_", "-")
        parser.error(f"{flag}={getattr(args, sampling[0])!r} cannot be used with --num-beams: beam search is "
                     f"deterministic and scores the model's raw log-probs (no sampling flags)")
    settings = dict(num_beams=args.num_beams,
                    length_penalty=1.0 if args.length_penalty is None else args.length_penalty,
                    early_stopping={"false": False, "true": True, "never": "never"}[args.early_stopping or "false"],
                    num_return_sequences=1 if args.num_return_sequences is None else args.num_return_sequences)
    if settings["num_beams"] < 1:
        parser.error(f"--num-beams must be >= 1, got {args.num_beams}")
    if not 1 <= settings["num_return_sequences"] <= settings["num_beams"]:
        parser.error(f"--num-return-sequences must be in [1, --num-beams={args.num_beams}], "
                     f"got {args.num_return_sequences}")
    if not np.isfinite(settings["length_penalty"]):
        parser.error(f"--length-penalty must be finite, got {args.length_penalty}")
    return settings


def streams(flag: bool | None, unstreamed: list[str]) -> bool:
    """--stream / --no-stream, else streamed when someone watches: the text on a terminal,
    or the progress on stderr when stdout goes to a file; never with an unstreamed mode."""
    if flag is not None:
        return flag
    return not unstreamed and (sys.stdout.isatty() or sys.stderr.isatty())


def encode_prompts(parser, tok, prompts: list[str], chat: bool, max_chars: int = MAX_CHAT_CHARS):
    """Right-padded ids [B, P] and lengths [B]; with --chat each prompt becomes a user message
    in the checkpoint's chat template (which writes its own BOS)."""
    if not chat:  # a BOS where the checkpoint's tokenizer adds one (Qwen2's adds none)
        try:
            return tok.encode_batch(prompts)
        except ValueError as e:
            parser.error(str(e))
    if getattr(tok, "chat_template", None) is None:
        parser.error("--chat: this checkpoint has no chat template")
    try:
        chats = [tok.apply_chat_template([{"role": "user", "content": p}], max_chars=max_chars) for p in prompts]
    except Exception as e:  # a template's raise_exception, a jinja2 error, a render bound
        parser.error(f"--chat: the chat template failed: {e}")
    try:
        return tok.encode_batch(chats, add_bos=False)
    except ValueError as e:
        parser.error(f"--chat: {e}")


def run_beam_search(parser, lm, tok, prompts: list[str], args, settings: dict) -> int:
    """Beam search over the prompts; prints every returned hypothesis with its score."""
    ids, lengths = encode_prompts(parser, tok, prompts, args.chat, args.max_chat_chars)
    stop_ids = list(tok.eos_ids) if args.stop_at_eos else []
    run = lambda: js.beam_search(lm, ids, lengths, max_new_tokens=args.max_new_tokens, stop_ids=stop_ids,
                                 pad_id=tok.pad_id, memory_limit=memory_limit(args), **settings)
    out, first, steady = timed_run(parser, run)
    seqs, lens, scores = np.asarray(out.sequences), np.asarray(out.lengths), np.asarray(out.scores)
    valid = np.asarray(out.valid)
    for i, text in enumerate(prompts):
        for r in np.flatnonzero(valid[i]):  # filler slots (fewer real hypotheses than asked for) are not printed
            tag = f"[{i}.{r}]" if seqs.shape[1] > 1 else f"[{i}]"
            print(f"{tag} score {scores[i, r]:.4f} | {text}{tok.decode(seqs[i, r, :lens[i, r]])}")
        if not valid[i].all():
            print(f"note: prompt {i} has only {int(valid[i].sum())} distinct hypotheses of the "
                  f"--num-return-sequences {seqs.shape[1]} asked for", file=sys.stderr)
        print()
    print(f"compile {max(first - steady, 0.0):.2f} s | beam search {steady * 1e3:.0f} ms "
          f"({settings['num_beams']} beams, {len(prompts)} prompts, {jax.default_backend()})", file=sys.stderr)
    return 0


class Progress:
    """Prints `done/total tokens, tokens/s` on stderr every `every` seconds (when enabled)."""

    def __init__(self, total: int, enabled: bool, every: float = 2.0):
        self.total, self.enabled, self.every = total, enabled, every
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            print(f"[{done}/{self.total} tokens, {done / (now - self.start):,.0f} tokens/s]", file=sys.stderr,
                  flush=True)


class StreamedRows:
    """`generate_stream`'s chunks gathered on the host, with the fields of a `GenerateOutput`
    that `print_row` reads (rows are complete once `add` reports them finished)."""

    def __init__(self, batch: int, max_new_tokens: int, top_logprobs: int, pad_id: int):
        self.tokens = np.full((batch, max_new_tokens), pad_id, np.int32)
        self.logprobs_raw = np.zeros((batch, max_new_tokens), np.float32)
        self.top_token_ids = np.full((batch, max_new_tokens, top_logprobs), pad_id, np.int32) if top_logprobs else None
        self.top_logprobs = np.zeros((batch, max_new_tokens, top_logprobs), np.float32) if top_logprobs else None
        self.lengths = np.zeros(batch, np.int32)
        self.prompt_logprobs = None
        self.finished = np.zeros(batch, bool)

    def add(self, chunk) -> list[int]:
        """Stores a chunk; returns the rows that finished in it, in row order."""
        cols = slice(chunk.start, chunk.start + chunk.tokens.shape[1])
        self.tokens[:, cols] = np.asarray(chunk.tokens)
        self.logprobs_raw[:, cols] = np.asarray(chunk.logprobs_raw)
        if self.top_token_ids is not None:
            self.top_token_ids[:, cols] = np.asarray(chunk.top_token_ids)
            self.top_logprobs[:, cols] = np.asarray(chunk.top_logprobs)
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = np.asarray(chunk.prompt_logprobs)
        self.lengths = np.asarray(chunk.lengths)
        new = np.asarray(chunk.done) & ~self.finished
        self.finished |= new
        return np.flatnonzero(new).tolist()


def print_row(tok, out, i: int, text: str, n: int, args, prompt_lengths, header: bool = True) -> None:
    """Prints row i of a `GenerateOutput` (or `StreamedRows`): its tag, prompt and completion
    (unless `header` is False: already printed while streaming), then the prompt
    log-likelihood (once per prompt) and the top-N log-probs of each step when asked for."""
    tokens = np.asarray(out.tokens[i, : int(out.lengths[i])])
    if header:
        tag = f"[{i // n}.{i % n}]" if n > 1 else f"[{i}]"
        print(f"{tag} {text}{tok.decode(tokens)}")
    if args.prompt_logprobs and i % n == 0:
        lp = np.asarray(out.prompt_logprobs[i // n])
        print(f"  prompt log-likelihood {lp.sum():.3f} over {int(prompt_lengths[i // n]) - 1} tokens")
    if args.top_logprobs:
        for t, token in enumerate(tokens):
            top = ", ".join(f"{_show(tok, k)} {v:.2f}" for k, v in zip(out.top_token_ids[i, t], out.top_logprobs[i, t]))
            print(f"  {_show(tok, token)} {float(out.logprobs_raw[i, t]):.2f} | {top}")
    print(flush=True)


def stream_batch(lm, tok, ids, lengths, keys, sampler, stop_ids, texts: list[str], args) -> int:
    """Runs `jaxsample.generate_stream` over the whole batch. One row: its text is printed
    while it is generated. Several rows: each row is printed whole as soon as it finishes,
    in the order they finish, with progress on stderr every few seconds."""
    t0 = time.perf_counter()
    n, single = args.num_samples, len(texts) == 1
    chunks = js.generate_stream(lm, ids, lengths, keys, max_new_tokens=args.max_new_tokens,
                                chunk_size=args.chunk_size, sampler=sampler, stop_ids=stop_ids, pad_id=tok.pad_id,
                                n=n, top_logprobs=args.top_logprobs, prompt_logprobs=args.prompt_logprobs,
                                memory_limit=memory_limit(args))
    rows = StreamedRows(len(texts), args.max_new_tokens, args.top_logprobs, tok.pad_id)
    # One row on a terminal shows its own progress; otherwise report it on stderr.
    progress = Progress(len(texts) * args.max_new_tokens, enabled=not (single and sys.stdout.isatty()))
    if single:
        print(f"[0] {texts[0]}", end="", flush=True)
    shown = ""
    marks = []  # (seconds since start, tokens so far) after each chunk
    for chunk in chunks:
        finished = rows.add(chunk)
        if single:
            text = tok.decode(rows.tokens[0, : rows.lengths[0]])
            ready = text.rstrip("\ufffd")  # hold back a multi-byte character cut by the chunk
            print(ready[len(shown):], end="", flush=True)
            shown = ready
        else:
            for i in finished:
                print_row(tok, rows, i, texts[i], n, args, lengths)
        marks.append((time.perf_counter() - t0, int(rows.lengths.sum())))
        progress.update(marks[-1][1])
    if single:
        print(tok.decode(rows.tokens[0, : rows.lengths[0]])[len(shown):], flush=True)
        print_row(tok, rows, 0, texts[0], n, args, lengths, header=False)
    # Chunk 0 is the prefill (compiled first), chunk 1 compiles the chunk program; the
    # decode speed is measured over the chunks after it when there are any.
    (t_a, n_a), (t_b, n_b) = (marks[1], marks[-1]) if len(marks) > 2 else (marks[0], marks[-1])
    speed = f"{(n_b - n_a) / (t_b - t_a):,.0f} tokens/s" if n_b > n_a else "too short to time"
    print(f"first token {marks[0][0]:.2f} s (compile and prefill) | {marks[-1][1]} tokens in {marks[-1][0]:.2f} s | "
          f"decode {speed} (chunks of {args.chunk_size}, {'after compiling' if len(marks) > 2 else 'with compile'}, "
          f"batch {len(texts)}, {jax.default_backend()})", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts = list(args.prompts)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            parser.error(f"--prompt-file: {e}")
    prompts = prompts or ["ROMEO:"]
    _cli.check_minimums(parser, args, {"--max-new-tokens": 1, "--num-samples": 1, "--top-logprobs": 0})
    if (spec_error := check_speculative_args(args)) is not None:
        parser.error(spec_error)
    beam = beam_settings(parser, args)
    check_structured_flags(parser, args, beam)
    _cli.check_minimums(parser, args, {"--chunk-size": 1, "--max-chat-chars": 1, "--prefill-widths": 1,
                                       "--batch-size": (0, " (0: one batch)")})
    if args.memory_limit_gb is not None and not args.memory_limit_gb > 0:
        parser.error(f"--memory-limit-gb must be > 0, got {args.memory_limit_gb}")
    if args.output is not None and not args.batch_size:
        parser.error("--output needs --batch-size (the rows are written as JSON lines as they finish)")
    if args.prefill_widths is not None and not args.batch_size:
        parser.error("--prefill-widths needs --batch-size (the widths of continuous batching's refills)")
    # continuous batching: more rows than --batch-size, or a flag of its own (--output, --prefill-widths)
    many = 0 < args.batch_size and (args.batch_size < len(prompts) * args.num_samples or args.output is not None
                                    or args.prefill_widths is not None)
    if many:
        for flag, given in (("--num-beams", beam), ("--draft-checkpoint", args.draft_checkpoint is not None),
                            ("--ngram-draft", args.ngram_draft is not None),
                            ("--prompt-lookup", args.prompt_lookup is not None), ("--stream", args.stream)):
            if given:
                parser.error(f"--batch-size (continuous batching) cannot be used with {flag}")
    unstreamed = [flag for flag, given in (("--num-beams", beam), ("--json-output", args.json_output),
                                           ("--draft-checkpoint", args.draft_checkpoint is not None),
                                           ("--ngram-draft", args.ngram_draft is not None),
                                           ("--prompt-lookup", args.prompt_lookup is not None)) if given]
    if args.stream and unstreamed:
        parser.error(f"--stream cannot be used with {unstreamed[0]}, which returns every row at the end "
                     f"(use --no-stream)")
    stream = streams(args.stream, unstreamed + (["--batch-size"] if many else []))
    try:
        apply_checkpoint_defaults(args)
        build_sampler(args)  # checks every value before the model loads
        read_schema(args.json_schema)
    except ValueError as e:
        parser.error(str(e))
    try:
        lm, tok = load_pretrained(args.checkpoint)
    except (CheckpointError, OSError, ValueError, ImportError) as e:
        parser.error(f"--checkpoint: {e}")
    if beam:
        return run_beam_search(parser, lm, tok, prompts, args, beam)
    try:
        sampler = build_sampler(args, tok)
        for flag, ids in (("--allowed-tokens", _parse_ids("", args.allowed_tokens or "")),
                          ("--logit-bias", list(_parse_bias(args.logit_bias or "")))):
            if any(not 0 <= i < lm.vocab_size for i in ids):
                raise ValueError(f"{flag}: token ids must be in [0, {lm.vocab_size}), got {ids}")
        constraint = build_constraint(args, tok)
        if constraint is not None:
            sampler = js.chain(constraint, sampler)  # the mask first, then the sampling chain
    except (ValueError, ImportError) as e:
        parser.error(str(e))

    n = args.num_samples
    texts = [p for p in prompts for _ in range(n)]
    ids, lengths = encode_prompts(parser, tok, prompts, args.chat, args.max_chat_chars)
    keys = prompt_keys(args.seed, len(prompts), n)
    stop_ids = list(tok.eos_ids) if args.stop_at_eos else []
    if many:
        return run_many(parser, lm, tok, ids, lengths, keys, sampler, stop_ids, texts, args)
    if stream:
        try:
            return stream_batch(lm, tok, ids, lengths, keys, sampler, stop_ids, texts, args)
        except ValueError as e:
            parser.error(error_text(e))
    run = lambda: js.generate(lm, ids, lengths, keys, max_new_tokens=args.max_new_tokens, sampler=sampler,
                              stop_ids=stop_ids, pad_id=tok.pad_id, n=n, top_logprobs=args.top_logprobs,
                              prompt_logprobs=args.prompt_logprobs, memory_limit=memory_limit(args))
    spec_stats: list = []
    try:
        run = speculative_runner(args, lm, ids, lengths, keys, sampler, stop_ids, tok.pad_id, spec_stats) or run
    except (CheckpointError, OSError, ValueError) as e:
        parser.error(str(e) if str(e).startswith("--") else f"--draft-checkpoint: {e}")
    out, first, steady = timed_run(parser, run)

    out = jax.tree.map(np.asarray, out)  # one transfer, then host indexing
    if args.json_output:
        print("\n".join(json_lines(out, texts, tok, args.top_logprobs, n, np.asarray(lengths))))
    for i, text in enumerate([] if args.json_output else texts):
        print_row(tok, out, i, text, n, args, lengths)
    n_tokens = int(out.lengths.sum())
    print(f"compile {max(first - steady, 0.0):.2f} s | generate {steady * 1e3:.0f} ms for {n_tokens} tokens "
          f"({n_tokens / steady:,.0f} tokens/s, batch {len(texts)}, {jax.default_backend()})", file=sys.stderr)
    if spec_stats:
        st = spec_stats[-1]
        print(f"speculative: acceptance {st.acceptance_rate:.2f} ({int(np.sum(st.accepted))} of "
              f"{int(np.sum(st.drafted))} drafted tokens), {st.tokens_per_round:.2f} tokens per target call",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
