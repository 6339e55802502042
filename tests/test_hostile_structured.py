"""Hostile inputs to structured output (issue 24): bounds before allocation, no tracebacks, no silent drops.

- a regex whose DFA explodes (``(a|b)*a(a|b){20}``: 2**21 states) stops as soon as the state
  bound is crossed, with an error naming ``max_states`` (``--max-states`` in the CLI), its value
  and the device cost; a memory budget is asserted in a subprocess;
- a schema of 60,000 required properties is answered (an error naming the bound), and the
  liveness / reachability searches are linear (a chain of 10**6 states);
- ``Choice`` refuses, naming it, a choice the vocabulary cannot spell;
- the CLI names ``--json-schema`` and the file for a JSON array or a non-UTF-8 file, and names
  ``--max-states`` (a flag it has) in size errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jaxsample as js
from jaxsample._constraints import automaton as A
from models import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()


def test_exploding_regex_stops_at_the_state_bound_with_the_bound_named():
    with pytest.raises(ValueError, match=r"needs more than max_states=2000 states .*MiB.*pass a larger max_states"):
        js.Regex("(a|b)*a(a|b){20}", TOK, max_states=2000)
    with pytest.raises(ValueError, match=r"max_transitions=20"):
        js.Regex("[0-9]{4}", TOK, max_transitions=20)


def _budget(code: str, timeout: float = 240) -> dict:
    """Runs code in a fresh interpreter; returns its last stdout line (JSON) with its peak RSS in MiB."""
    wrapper = code + "\nimport resource, json as _j\nprint(_j.dumps(dict(OUT, rss_mib=resource.getrusage(" \
                     "resource.RUSAGE_SELF).ru_maxrss / 1024)))\n"
    r = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_exploding_regex_at_the_default_bound_fits_a_memory_budget():
    out = _budget("import jaxsample as js\nfrom models import ByteTokenizer\ntry:\n"
                  "    js.Regex('(a|b)*a(a|b){20}', ByteTokenizer())\n    OUT = dict(msg='built')\n"
                  "except ValueError as e:\n    OUT = dict(msg=str(e))\n")
    assert "max_states=65536" in out["msg"], out
    assert out["rss_mib"] < 2048, out  # was 5.1 GB


@pytest.mark.slow
def test_sixty_thousand_required_properties_are_answered_within_a_budget():
    out = _budget("import jaxsample as js\nfrom models import ByteTokenizer\n"
                  "s = {'type': 'object', 'properties': {f'p{i}': {'type': 'integer'} for i in range(60000)},\n"
                  "     'required': [f'p{i}' for i in range(60000)], 'additionalProperties': False}\ntry:\n"
                  "    js.JSONSchema(s, ByteTokenizer(), host='never')\n    OUT = dict(msg='built')\n"
                  "except ValueError as e:\n    OUT = dict(msg=str(e))\n")
    assert "max_states" in out["msg"], out
    assert out["rss_mib"] < 3072, out


def test_many_required_properties_build_and_the_searches_are_linear():
    s = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(300)},
         "required": [f"p{i}" for i in range(300)], "additionalProperties": False}
    c = js.JSONSchema(s, TOK, host="never")
    assert c.sizes()["states"] > 300 * 6
    # a chain of 10**6 states: reachability in one pass (the old liveness loop was quadratic)
    n = 10**6
    src, dst = np.arange(n - 1), np.arange(1, n)
    live = A._co_reachable(src, dst, np.array([n - 1]), n)
    assert live.all()
    live = A._co_reachable(src, dst, np.array([n // 2]), n)
    assert live[: n // 2 + 1].all() and not live[n // 2 + 1:].any()


def test_choice_the_vocabulary_cannot_spell_is_an_error_naming_it():
    class Letters:  # a vocabulary of y, e, s, n, o only
        vocab_size, eos_id = 6, 5

        def token_bytes(self):
            return [b"y", b"e", b"s", b"n", b"o", None]

    with pytest.raises(ValueError, match=r"Choice: the choice 'QZ' cannot be spelled"):
        js.Choice(["yes", "QZ"], Letters())
    assert js.Choice(["yes", "no"], Letters()).sizes()["states"] > 2


def test_regex_syntax_errors_name_the_pattern():
    for pattern, match in [("a(", "invalid regular expression"), ("(?=a)b", "look-around"),
                           (r"(a)\1", "back-references"), ("(?i)a", "flags"), ("a^b", "anchor")]:
        with pytest.raises(ValueError, match=match):
            js.Regex(pattern, TOK)


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.mark.parametrize("content, match", [
    (b"[1, 2]", "holds a JSON list, not a schema"),
    (b'{"type": "string", "title": "\xff\xfe"}', "is not UTF-8"),
    (b"{nope", "cannot read a JSON schema"),
])
def test_cli_schema_file_errors_name_the_flag_and_file(tmp_path, content, match):
    f = tmp_path / "schema.json"
    f.write_bytes(content)
    r = _cli("--json-schema", str(f), "--max-new-tokens", "4")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--json-schema" in r.stderr and str(f) in r.stderr and match in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_size_errors_name_the_cli_flag():
    r = _cli("--regex", "(a|b)*a(a|b){20}", "--max-states", "1000", "--max-new-tokens", "4")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--max-states 1000" in r.stderr and "pass a larger --max-states" in r.stderr
    assert "strict=False" not in r.stderr and "Traceback" not in r.stderr
    r = _cli("--choice", "yes,QZ", "--max-states", "0", "--max-new-tokens", "4")
    assert r.returncode == 2 and "--max-states must be >= 1" in r.stderr
