"""MaskBench scoring of JSON-schema constraints: jaxsample next to llguidance and outlines-core.

For every schema file of ``../shared/maskbench/data`` (relative to the repository root;
``--data`` to change): compile the schema, then feed each test instance,
``json.dumps(data, indent=None, ensure_ascii=False)`` tokenized, token by token through the
engine's mask, and end with end-of-sequence. A schema *passes* when it compiles, every valid
instance is accepted and every invalid one rejected; otherwise it is a *compile error*, a
*validation error* (a valid instance rejected), an *invalidation error* (an invalid instance
accepted: a wrong output could be generated) or a *timeout* (``--timeout`` seconds per schema
and engine, compile and tests together). Each engine runs in its own worker process, killed
and restarted on a timeout.

jaxsample is scored on the exact tables the device would run (the token automaton, walked on
the host here so that the benchmark does not need JAX), or, for schemas it routes to the host
engine, on that engine. Tokenizers: the byte tokenizer (default) or a ``tokenizer.json``
(``--tokenizer FILE``, or ``--train-bpe V`` to train a byte-level BPE of V tokens on the
instances). Prints a table and writes JSON (``--json-output``). docs/structured.md has the
figures and the command.

Compile time is the wall time of one schema's compilation in the engine's worker; each engine
is constructed (imports, tokenizer tables, for jaxsample one small schema compiled) before
the first schema is timed.

Usage:
  python scripts/bench_maskbench.py --every 7 --timeout 10 --json-output maskbench.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import _cli  # noqa: E402

def shared_dir() -> Path:
    """``../shared`` relative to the repository root (the main checkout's, from a git worktree)."""
    here = ROOT.parent / "shared"
    git = ROOT / ".git"
    if not here.is_dir() and git.is_file():  # a worktree: "gitdir: <main>/.git/worktrees/<name>"
        line = git.read_text().strip()
        if line.startswith("gitdir:"):
            main = Path(line.split(":", 1)[1].strip()).parent.parent.parent
            if (main.parent / "shared").is_dir():
                return main.parent / "shared"
    return here


STATUSES = ("passing", "compile_error", "validation_error", "invalidation_error", "timeout")


# ----------------------------------------------------------------------------- tokenizers


class ByteTok:
    """Ids 0..255 are bytes, 256 BOS, 257 EOS (as models.ByteTokenizer)."""

    vocab_size, eos_id, bos_id = 259, 257, 256

    def token_bytes(self):
        return [bytes([i]) for i in range(256)] + [None] * 3

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class BPETok:
    """A tokenizer.json (byte-level BPE or SentencePiece-style)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer
        self.path = path
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()
        specials = [t for t in json.loads(self._tok.to_str()).get("added_tokens", []) if t.get("special")]
        eos = [t["id"] for t in specials if "eos" in t["content"] or "end" in t["content"] or "/s" in t["content"]]
        self.eos_id = eos[0] if eos else specials[0]["id"]

    def token_bytes(self):
        import jaxsample as js
        return js.token_bytes(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


def train_bpe(texts: list[str], vocab: int, path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(path)


def make_tokenizer(spec: str | None):
    return ByteTok() if spec is None else BPETok(spec)


# ----------------------------------------------------------------------------- engines


class Ours:
    """jaxsample's JSONSchema (host="auto"): the device table walked on the host, or the host engine."""

    name = "jaxsample"

    def __init__(self, tok):
        import jaxsample as js
        self.js, self.tok = js, tok
        js.Regex("a", tok)  # the vocabulary's trie, once
        # the schema compiler's one-time imports (jsonschema: ~90 ms), as llguidance's are done by
        # its engine's construction, so that they do not land in the first schema's compile time
        js.JSONSchema({"type": "object", "properties": {"a": {"type": "string", "pattern": "^a$"}}}, tok)

    def compile(self, schema):
        c = self.js.JSONSchema(schema, self.tok)
        return ("host" if isinstance(c, self.js.HostJSONSchema) else "device", c)

    @staticmethod
    def accepts(compiled, ids) -> bool:
        return compiled[1].accepts(ids)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok):
        import llguidance
        self.llg = llguidance
        self.lltok = _lltokenizer(tok)
        self.eos = tok.eos_id

    def compile(self, schema, why=None):
        g = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        m = self.llg.LLMatcher(self.lltok, g)
        if m.is_error():
            raise ValueError(m.get_error() if why is None else f"{why}; llguidance: {m.get_error()}")
        return m

    @staticmethod
    def accepts(m, ids) -> bool:
        m.reset()
        n = m.try_consume_tokens(list(ids))
        return n == len(ids) and not m.is_error() and m.is_accepting()


def _lltokenizer(tok):
    import llguidance
    pieces = tok.token_bytes()
    names = [p if p is not None else f"<special_{i}>".encode() for i, p in enumerate(pieces)]

    class Wrap:
        eos_token_id = tok.eos_id
        bos_token_id = None
        tokens = names
        special_token_ids = [i for i, p in enumerate(pieces) if p is None]
        is_tokenizer_wrapper = True

        def __call__(self, s):
            return tok.encode(s if isinstance(s, str) else s.decode("utf-8", "replace"))

    return llguidance.LLTokenizer(Wrap(), n_vocab=tok.vocab_size, eos_token=tok.eos_id)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok):
        import outlines_core
        self.oc = outlines_core
        pieces = tok.token_bytes()
        by = {}
        for i, b in enumerate(pieces):
            if b and i != tok.eos_id:
                by.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(tok.eos_id, by)
        self.eos = tok.eos_id

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), r"[ ]?")
        return self.oc.Index(regex, self.vocab), self.eos

    @staticmethod
    def accepts(compiled, ids) -> bool:
        index, eos = compiled
        s = index.get_initial_state()
        for t in ids:
            s = index.get_next_state(s, t)
            if s is None:
                return False
        return bool(index.is_final_state(s))


ENGINES = {"jaxsample": Ours, "llguidance": LLGuidance, "outlines-core": OutlinesCore}


# ----------------------------------------------------------------------------- scoring


def score(engine, schema, tests, tok) -> dict:
    t0 = time.perf_counter()
    try:
        compiled = engine.compile(schema)
    except Exception as e:  # noqa: BLE001 - any refusal is a compile error
        return dict(status="compile_error", compile_s=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"[:300])
    compile_s = time.perf_counter() - t0
    route = compiled[0] if isinstance(compiled, tuple) and compiled and compiled[0] in ("device", "host") else None
    status, detail = "passing", None
    for i, test in enumerate(tests):
        ids = tok.encode(json.dumps(test["data"], indent=None, ensure_ascii=False))
        ok = engine.accepts(compiled, ids)
        if test["valid"] and not ok:
            status, detail = "validation_error", i
        elif not test["valid"] and ok:
            status, detail = "invalidation_error", i
            break
    return dict(status=status, compile_s=compile_s, route=route, test=detail)


def _worker(name, tok_spec, conn):
    tok = make_tokenizer(tok_spec)
    engine = ENGINES[name](tok)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        schema, tests = msg
        conn.send(score(engine, schema, tests, tok))


class Worker:
    def __init__(self, name, tok_spec):
        self.name, self.tok_spec = name, tok_spec
        self.start()

    def start(self):
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(self.name, self.tok_spec, child), daemon=True)
        self.proc.start()
        if not self.conn.poll(120):
            raise RuntimeError(f"{self.name}: the worker did not start")
        self.conn.recv()

    def run(self, schema, tests, timeout):
        self.conn.send((schema, tests))
        if self.conn.poll(timeout):
            return self.conn.recv()
        self.proc.kill()
        self.proc.join()
        self.start()
        return dict(status="timeout", compile_s=None)

    def close(self):
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(shared_dir() / "maskbench" / "data"),
                   help="folder of MaskBench schema files (default: ../shared/maskbench/data)")
    p.add_argument("--limit", type=int, default=None, help="only the first N files (after --every)")
    p.add_argument("--every", type=int, default=1, help="every K-th file sorted by name (a spread-out sample)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per schema and engine (default 10)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated engines (default: all installed)")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--tokenizer", metavar="FILE", help="a tokenizer.json (default: the byte tokenizer)")
    t.add_argument("--train-bpe", type=int, metavar="V", help="train a byte-level BPE of V tokens on the instances")
    p.add_argument("--json-output", metavar="FILE", help="write the per-schema results and the summary here")
    p.add_argument("--show", type=int, default=0, help="print up to N failures per engine")
    p.add_argument("--progress", action="store_true", help="print every schema's result to stderr as it finishes")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1, got {args.limit}")
    if args.timeout <= 0:
        p.error(f"--timeout must be > 0, got {args.timeout}")
    data = Path(args.data)
    if not data.is_dir():
        p.error(f"--data: {str(data)!r} is not a folder (MaskBench's data)")
    if args.every < 1:
        p.error(f"--every must be >= 1, got {args.every}")
    files = sorted(data.glob("*.json"))[:: args.every][: args.limit]
    cases = []
    for f in files:
        d = json.loads(f.read_text(encoding="utf-8"))
        cases.append((f.name, d["schema"], d["tests"]))
    tok_spec, tok_name = args.tokenizer, "byte"
    if args.train_bpe:
        tmp = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
        texts = [json.dumps(t["data"], ensure_ascii=False) for _, _, tests in cases for t in tests]
        train_bpe(texts, args.train_bpe, tmp.name)
        tok_spec, tok_name = tmp.name, f"BPE {args.train_bpe} (trained on the instances)"
    elif args.tokenizer:
        tok_name = args.tokenizer
    names = []
    for n in args.engines.split(","):
        if n not in ENGINES:
            p.error(f"--engines: unknown engine {n!r}; choose from {', '.join(ENGINES)}")
        mod = {"jaxsample": "numpy", "llguidance": "llguidance", "outlines-core": "outlines_core"}[n]
        try:
            __import__(mod)
        except ImportError:
            print(f"{n}: not installed, skipped", file=sys.stderr)
            continue
        names.append(n)
    results = {n: [] for n in names}
    for n in names:
        w = Worker(n, tok_spec)
        t0 = time.time()
        for i, (fname, schema, tests) in enumerate(cases):
            r = w.run(schema, tests, args.timeout)
            r["file"] = fname
            results[n].append(r)
            if args.progress:
                print(f"{n} {i + 1}/{len(cases)} {fname}: {r['status']} "
                      f"{'' if r.get('compile_s') is None else round(r['compile_s'], 3)}", file=sys.stderr, flush=True)
        w.close()
        print(f"{n}: {len(cases)} schemas in {time.time() - t0:.0f} s", file=sys.stderr)
    summary = {}
    for n in names:
        rs = results[n]
        counts = {s: sum(r["status"] == s for r in rs) for s in STATUSES}
        ct = np.array([r["compile_s"] for r in rs if r.get("compile_s") is not None and r["status"] != "compile_error"])
        summary[n] = dict(counts, schemas=len(rs), passing_pct=100.0 * counts["passing"] / max(1, len(rs)),
                          compile_p50_ms=float(np.percentile(ct, 50) * 1e3) if ct.size else None,
                          compile_p90_ms=float(np.percentile(ct, 90) * 1e3) if ct.size else None,
                          compile_max_ms=float(ct.max() * 1e3) if ct.size else None,
                          host_routed=sum(r.get("route") == "host" for r in rs))
        for route in ("device", "host"):  # jaxsample: compile times by where the schema went
            rt = np.array([r["compile_s"] for r in rs if r.get("route") == route])
            if rt.size:
                summary[n][f"compile_{route}_p50_p90_max_ms"] = [float(np.percentile(rt, q) * 1e3) for q in (50, 90, 100)]
    print(f"\nMaskBench sample: {len(cases)} schemas (every {args.every}th file), tokenizer {tok_name}, "
          f"timeout {args.timeout:g} s\n")
    print("| engine | passing | compile errors | timeouts | valid rejected | invalid accepted | compile p50 / p90 / max |")
    print("|---|---|---|---|---|---|---|")
    for n, s in summary.items():
        fmt = lambda v: "-" if v is None else (f"{v:.1f} ms" if v < 1000 else f"{v / 1e3:.2f} s")  # noqa: E731
        extra = f" ({s['host_routed']} on the host)" if n == "jaxsample" else ""
        print(f"| {n} | {s['passing']} ({s['passing_pct']:.0f}%){extra} | {s['compile_error']} | {s['timeout']} | "
              f"{s['validation_error']} | **{s['invalidation_error']}** | {fmt(s['compile_p50_ms'])} / "
              f"{fmt(s['compile_p90_ms'])} / {fmt(s['compile_max_ms'])} |")
    for route in ("device", "host"):
        got = summary.get("jaxsample", {}).get(f"compile_{route}_p50_p90_max_ms")
        if got:
            print(f"\njaxsample compile on the {route}: p50 / p90 / max "
                  f"{' / '.join(f'{v:.1f} ms' for v in got)}", end="")
    print()
    for n in names:
        shown = [r for r in results[n] if r["status"] != "passing"][: args.show]
        for r in shown:
            print(f"  {n} {r['file']}: {r['status']} {r.get('error') or r.get('test') or ''}")
    if args.json_output:
        out = dict(tokenizer=tok_name, timeout_s=args.timeout, schemas=len(cases), summary=summary, results=results,
                   date=time.strftime("%Y-%m-%d"))
        _cli.write_json(args.json_output, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
