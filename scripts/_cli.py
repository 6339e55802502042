"""Shared command-line pieces of scripts/*.py (a helper module, not a script).

* :func:`sampling_flags`: ``--temperature``, ``--top-k``, ``--top-p``, ``--greedy`` and
  ``--seed``, with each script's defaults and the identity values of the library's
  processor table in their help (``js.TopK.spec``: the value that disables a filter).
* :func:`check_minimums`: every "``--flag`` must be >= N, got V" check of a script, as
  one table (``{"--flag": N}``), each a ``parser.error`` (status 2, before any work).
* :func:`write_json`: results as JSON through a temporary file and a rename (never a
  half-written file), and a line saying where.

Scripts import it as ``import _cli`` after putting ``scripts/`` on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def sampling_flags(parser: Any, *, temperature: float | None, top_k: int | None,
                   top_p: float | None, temperature_help: str | None = None, default_help: str = "",
                   seed_and_greedy: Any = None) -> None:
    """Adds the sampling flags shared by the generating scripts (generate.py,
    generate_sharded.py), each script with its own defaults.

    Args:
      parser: an ``ArgumentParser`` or an argument group: ``--temperature``, ``--top-k``,
        ``--top-p``.
      temperature, top_k, top_p: the script's defaults (``None``: decided later, e.g.
        from a checkpoint's generation config).
      temperature_help: the help of ``--temperature`` (default: the table's).
      default_help: appended to the help of ``--top-k`` / ``--top-p``, formatted with
        the flag's ``identity`` (e.g. ``" (default: the checkpoint's, else {identity})"``).
      seed_and_greedy: where to add ``--seed`` (default 0) and ``--greedy`` (default:
        ``parser``; ``False``: the script adds them itself).
    """
    import jaxsample as js  # here: the other helpers import nothing heavy

    where = parser if seed_and_greedy is None else seed_and_greedy
    if where is not False:
        where.add_argument("--seed", type=int, default=0)
        where.add_argument("--greedy", action="store_true",
                           help="temperature 0: the arg-max of the processed logits (penalties and "
                                "masks still apply)")
    parser.add_argument("--temperature", type=float, default=temperature,
                        help=temperature_help or js.Temperature.spec.help)
    for flag, processor, kind, default in (("--top-k", js.TopK, int, top_k), ("--top-p", js.TopP, float, top_p)):
        spec = processor.spec  # the library's row for the filter: its identity value
        assert spec.flag == flag, (spec.flag, flag)
        parser.add_argument(flag, type=kind, default=default,
                            help=spec.help + default_help.format(identity=f"{spec.identity:g}"))


def check_minimums(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   minimums: dict[str, int | float | tuple[int | float, str]]) -> None:
    """``parser.error(f"{flag} must be >= {low}{note}, got {value}")`` for the first flag
    below its minimum, in the table's order.

    Args:
      minimums: ``{"--flag": low}`` or ``{"--flag": (low, note)}``; a flag whose value is
        ``None`` (not given) is skipped; a list (``nargs``) is checked element-wise and
        shown whole; a NaN float fails.
    """
    for flag, low in minimums.items():
        low, note = low if isinstance(low, tuple) else (low, "")
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(v >= low for v in values):
            parser.error(f"{flag} must be >= {low}{note}, got {value}")


def write_json(path: str, obj: Any, **dump: Any) -> None:
    """Writes ``obj`` as JSON (``indent=2`` unless ``dump`` says otherwise, a final
    newline) to ``path``, whole or not at all (``jaxsample.atomic_file``), and prints
    ``wrote <path>``."""
    import jaxsample as js  # here: the other helpers import nothing heavy

    with js.atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, **{"indent": 2, **dump})
        f.write("\n")
    print(f"wrote {path}")
