"""JSON Schema -> a regular language of JSON texts (an AST of :mod:`.automaton`), exactly or not at all.

Every keyword is either enforced exactly (the texts of the language are valid instances;
some valid instances may be left out: properties are written in the schema's order,
strings are written as ``json.dumps(..., ensure_ascii=False)`` writes them, any-value
subschemas nest at most :data:`ANY_DEPTH` deep) or refused with :class:`Unsupported`
naming the keyword and its JSON path in the schema. A schema that is fine but not regular
(a recursive ``$ref``) raises :class:`NotRegular`, so that the caller can hand it to a
host-side grammar engine (docs/structured.md).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from fractions import Fraction
from typing import Any
from urllib.parse import unquote

from jaxsample._constraints import automaton as A

ANY_DEPTH = 2  # any-value subschemas ({} / true): nesting depth of the values written
EXTRA_DEPTH = 2  # likewise for the values of properties allowed by an unset additionalProperties
MAX_CASES = 64  # dependencies / uniqueItems enumerations beyond this are refused
ALL_TYPES = frozenset({"null", "boolean", "object", "array", "string", "number", "integer"})
_ANNOTATIONS = {"$schema", "$id", "id", "title", "description", "default", "examples", "$comment", "readOnly",
                "writeOnly", "deprecated", "contentMediaType", "contentEncoding", "contentSchema", "$anchor",
                "$defs", "definitions", "$vocabulary", "$dynamicAnchor", "$recursiveAnchor"}
# JSON Schema keywords this compiler does not enforce: refused (never ignored)
_REFUSED = {"contains", "minContains", "maxContains", "unevaluatedProperties", "unevaluatedItems", "if", "then",
            "else", "$dynamicRef", "$recursiveRef"}
_STANDARD_FORMATS = {"date-time", "date", "time", "duration", "email", "idn-email", "hostname", "idn-hostname",
                     "ipv4", "ipv6", "uri", "uri-reference", "iri", "iri-reference", "uuid", "uri-template",
                     "json-pointer", "relative-json-pointer", "regex"}
_OBJECT_KW = {"properties", "required", "additionalProperties", "patternProperties", "propertyNames",
              "minProperties", "maxProperties", "dependentRequired", "dependentSchemas", "dependencies", "__absent__"}
_ARRAY_KW = {"items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems"}
_STRING_KW = {"minLength", "maxLength", "pattern", "format"}
_NUMBER_KW = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}


_CONSTRAINING = _OBJECT_KW | _ARRAY_KW | _STRING_KW | _NUMBER_KW | {"type", "enum", "const", "not", "anyOf", "oneOf"}


class Unsupported(ValueError):
    """A keyword this compiler cannot enforce exactly (named with its JSON path)."""

    def __init__(self, path: str, why: str):
        self.path = path
        super().__init__(f"{path}: {why}")


class NotRegular(ValueError):
    """The schema is fine but its language is not regular (a recursive reference)."""


class TooBig(ValueError):
    """The schema's automaton would be too large for the device (an estimate, before any build)."""


#: Subschema compilations after which :func:`schema_node` gives up with :class:`TooBig`
#: when a budget is asked for (the schemas that stay on device need a few dozen).
MAX_SUBSCHEMAS = 2_000


def cost(node: tuple) -> int:
    """Estimated NFA states of an AST (linear in its distinct nodes; shared nodes counted once each use).

    An upper-side estimate of the DFA the build will make, cheap enough to decide before
    building: literals cost their length, sets 2, repetitions their body times the bound,
    a product (``and`` / ``diff``) the product of its sides over 4, JSON object members
    their items times the counting phases (docs/structured.md, MaskBench).
    """
    memo: dict[int, int] = {}

    def go(n: tuple) -> int:
        got = memo.get(id(n))
        if got is not None:
            return got
        kind = n[0]
        if kind == "lit":
            r = len(n[1]) + 1
        elif kind in ("set", "bytes"):
            r = 2
        elif kind in ("cat", "alt"):
            r = sum(go(x) for x in n[1]) + 1
        elif kind == "rep":
            _, x, lo, hi = n
            r = go(x) * max(1, hi if hi is not None else lo + 1) + 1
        elif kind in ("and", "diff"):
            r = go(n[1]) * max(1, go(n[2]) // 4)
        elif kind == "dfa":
            r = len(n[1][0])
        elif kind == "det":
            r = go(n[1])
        elif kind == "seq":
            _, items, sep, lo, hi = n
            phases = (hi if hi is not None else lo) + 1
            r = min(phases, len(items) + 1) * sum(go(x) + go(sep) for x, _, _ in items) + 2
        else:
            raise ValueError(f"cost: unknown node {kind!r}")
        memo[id(n)] = r
        return r

    return go(node)


# ----------------------------------------------------------------------------- JSON text pieces

_ESC = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}
_SPECIAL = [(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]


def json_char(ranges) -> tuple:
    """One character of a JSON string, spelled as json.dumps(ensure_ascii=False) spells it."""
    plain = A.intersect_ranges(ranges, A.complement_ranges(_SPECIAL))
    parts = [A.cset(plain)] if plain else []
    for lo, hi in A.intersect_ranges(ranges, _SPECIAL):
        for c in range(lo, hi + 1):
            parts.append(A.lit(_ESC.get(c, "\\u%04x" % c)))
    return A.alt(*parts)


CHAR = json_char([(0, A.MAX_CP)])
QUOTE = A.lit('"')
STRING = A.det(A.cat(QUOTE, A.rep(CHAR, 0, None), QUOTE))
DIGIT = A.cset([(48, 57)])
DIGIT19 = A.cset([(49, 57)])
FRAC_ANY = A.opt(A.cat(A.lit("."), A.rep(DIGIT, 1, None)))
EXP = A.opt(A.cat(A.cset([(69, 69), (101, 101)]), A.opt(A.cset([(43, 43), (45, 45)])), A.rep(DIGIT, 1, None)))
NATURAL = A.alt(A.lit("0"), A.cat(DIGIT19, A.rep(DIGIT, 0, None)))
INTEGER = A.cat(A.opt(A.lit("-")), NATURAL)
NUMBER = A.det(A.cat(INTEGER, FRAC_ANY, EXP))
INTEGER = A.det(INTEGER)
BOOLEAN = A.alt(A.lit("true"), A.lit("false"))
NULL = A.lit("null")


def literal(value: Any) -> tuple:
    """The text of one JSON value as json.dumps(ensure_ascii=False) writes it (with ws between)."""
    return A.lit(json.dumps(value, ensure_ascii=False))


def _d(s: str) -> tuple:
    return A.cset([(ord(s[0]), ord(s[-1]))]) if len(s) == 3 and s[1] == "-" else A.lit(s)


def _digits_same_len(a: str, b: str) -> tuple:
    """Decimal strings of len(a) == len(b) digits between a and b (inclusive)."""
    if not a:
        return A.EMPTY
    if a == b:
        return A.lit(a)
    if a[0] == b[0]:
        return A.cat(A.lit(a[0]), _digits_same_len(a[1:], b[1:]))
    n = len(a) - 1
    if a[1:] == "0" * n and b[1:] == "9" * n:
        return A.cat(A.cset([(ord(a[0]), ord(b[0]))]), A.rep(DIGIT, n, n))
    parts = [A.cat(A.lit(a[0]), _digits_same_len(a[1:], "9" * n))]
    if ord(b[0]) - ord(a[0]) > 1:
        parts.append(A.cat(A.cset([(ord(a[0]) + 1, ord(b[0]) - 1)]), A.rep(DIGIT, n, n)))
    parts.append(A.cat(A.lit(b[0]), _digits_same_len("0" * n, b[1:])))
    return A.alt(*parts)


def natural_range(lo: int, hi: int | None) -> tuple:
    """Canonical decimal naturals (no leading zeros) in [lo, hi] (hi None: unbounded); lo >= 0."""
    if hi is not None and hi < lo:
        return A.NOTHING
    parts = []
    la = len(str(lo))
    lb = len(str(hi)) if hi is not None else la
    for n in range(la, lb + 1):
        a = str(lo) if n == la else "1" + "0" * (n - 1)
        b = str(hi) if (hi is not None and n == lb) else "9" * n
        parts.append(_digits_same_len(a, b))
    if hi is None:
        parts.append(A.cat(DIGIT19, A.rep(DIGIT, la, None)))
    return A.alt(*parts)


def integer_range(lo: int | None, hi: int | None) -> tuple:
    """Canonical integers in [lo, hi] (None: unbounded); never ``-0``."""
    parts = []
    if hi is None or hi >= 0:
        parts.append(natural_range(max(lo, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:
        n_lo = max(-hi, 1) if hi is not None else 1
        parts.append(A.cat(A.lit("-"), natural_range(n_lo, -lo if lo is not None else None)))
    return A.alt(*parts)


def _frac_digits(x: Fraction) -> str:
    """The decimal digits of ``x - floor(x)`` without trailing zeros (x a finite decimal)."""
    f = x - math.floor(x)
    out = ""
    while f:
        f *= 10
        d = math.floor(f)
        out += str(d)
        f -= d
    return out


def _frac_ge(s: str, strict: bool) -> tuple[tuple, bool]:
    """Digit strings D with 0.D >= 0.s (> when strict): (the non-empty ones, whether "" is one)."""
    if not s:
        return (A.rep(DIGIT, 1, None), True) if not strict else (A.cat(A.rep(DIGIT, 0, None), DIGIT19,
                                                                         A.rep(DIGIT, 0, None)), False)
    ne, empty = _frac_ge(s[1:], strict)
    parts = [A.cat(A.lit(s[0]), A.opt(ne) if empty else ne)]
    if s[0] < "9":
        parts.append(A.cat(A.cset([(ord(s[0]) + 1, 57)]), A.rep(DIGIT, 0, None)))
    return A.alt(*parts), False


def _frac_le(s: str, strict: bool) -> tuple[tuple, bool]:
    """Digit strings D with 0.D <= 0.s (< when strict): (the non-empty ones, whether "" is one)."""
    if not s:
        return (A.rep(A.lit("0"), 1, None), True) if not strict else (A.NOTHING, False)
    ne, empty = _frac_le(s[1:], strict)
    parts = [A.cat(A.lit(s[0]), A.opt(ne) if empty else ne)]
    if s[0] > "0":
        parts.append(A.cat(A.cset([(48, ord(s[0]) - 1)]), A.rep(DIGIT, 0, None)))
    return A.alt(*parts), True


def _frac(ne: tuple, empty: bool) -> tuple:
    """The optional fraction part ``.D`` of a number text, D from one of the digit-string sets."""
    dotted = A.cat(A.lit("."), ne)
    return A.alt(A.EMPTY, dotted) if empty else dotted


def _nonneg_number(low: Fraction, low_strict: bool, up: Fraction | None, up_strict: bool) -> tuple:
    """Decimals y >= 0 (no exponent) with low <(=) y <(=) up; low >= 0, both finite decimals.

    The integer part decides but at the bounds' own integer parts, where the fraction
    digits are compared as digit strings (``_frac_ge`` / ``_frac_le``).
    """
    a, s = math.floor(low), _frac_digits(low)
    if up is not None and up < low or (up == low and (low_strict or up_strict)):
        return A.NOTHING
    if up is None:
        return A.alt(A.cat(natural_range(a, a), _frac(*_frac_ge(s, low_strict))),
                     A.cat(natural_range(a + 1, None), FRAC_ANY))
    b, t = math.floor(up), _frac_digits(up)
    if a == b:
        (g, ge), (l_, le) = _frac_ge(s, low_strict), _frac_le(t, up_strict)
        return A.cat(natural_range(a, a), _frac(("and", A.det(g), A.det(l_)), ge and le))
    return A.alt(A.cat(natural_range(a, a), _frac(*_frac_ge(s, low_strict))),
                 A.cat(natural_range(a + 1, b - 1), FRAC_ANY),
                 A.cat(natural_range(b, b), _frac(*_frac_le(t, up_strict))))


#: With an exclusive bound, number texts with a fraction have at most this many digits:
#: distinct decimals of at most 15 significant digits are distinct doubles, so a text
#: strictly inside the bound in decimal is strictly inside it as ``jsonschema`` compares
#: (a float), too (``0.000...01`` would round to the bound).
STRICT_DIGITS = 15


def _digits_cap() -> tuple:
    """Integer texts, and fraction texts of at most STRICT_DIGITS digits in all."""
    fracs = [A.cat(A.rep(DIGIT, k, k), A.lit("."), A.rep(DIGIT, 1, STRICT_DIGITS - k)) for k in range(1, STRICT_DIGITS)]
    return A.cat(A.opt(A.lit("-")), A.alt(A.rep(DIGIT, 1, None), *fracs))


def number_range(lo: Fraction | None, lo_x: bool, hi: Fraction | None, hi_x: bool) -> tuple:
    """Decimal numbers (no exponent) within finite-decimal bounds (``*_x``: exclusive)."""
    zero = Fraction(0)
    parts = []
    if hi is None or hi > 0 or (hi == 0 and not hi_x):
        if lo is None or lo < 0:
            parts.append(_nonneg_number(zero, False, hi, hi_x))
        else:
            parts.append(_nonneg_number(lo, lo_x, hi, hi_x))
    if lo is None or lo < 0:  # x = -y, y > 0
        if hi is None or hi >= 0:
            y_low, y_strict = zero, True
        else:
            y_low, y_strict = -hi, hi_x
        parts.append(A.cat(A.lit("-"), _nonneg_number(y_low, y_strict, None if lo is None else -lo, lo_x)))
    node = A.alt(*parts)
    return ("and", A.det(node), A.det(_digits_cap())) if lo_x or hi_x else node


def multiple_of(m: int) -> tuple:
    """Canonical integers divisible by m (a residue automaton as a product-ready node)."""
    # states: residues 0..m-1 after the first nonzero digit; built as nested DFA via 'dfa' rows
    # expressed with alternation: r -> r*10+d mod m. As a regex this is the state elimination of
    # an m-state DFA; for the small m that schemas use, spell it as a product with a cyclic NFA.
    return ("modulo", m)


# ----------------------------------------------------------------------------- formats


def _formats() -> dict[str, tuple]:
    d2 = lambda a, b: _digits_same_len(a, b)  # noqa: E731
    year = A.alt(A.cat(A.rep(DIGIT, 3, 3), DIGIT19), A.cat(A.rep(DIGIT, 2, 2), DIGIT19, A.lit("0")),
                 A.cat(DIGIT, DIGIT19, A.lit("00")), A.cat(DIGIT19, A.lit("000")))  # 0001..9999
    leap = A.alt(A.cat(A.rep(DIGIT, 2, 2), A.alt(A.cat(A.lit("0"), A.cset([(52, 52), (56, 56)])),
                                                 A.cat(A.cset([(50, 50), (52, 52), (54, 54), (56, 56)]), A.cset([(48, 48), (52, 52), (56, 56)])),
                                                 A.cat(A.cset([(49, 49), (51, 51), (53, 53), (55, 55), (57, 57)]), A.cset([(50, 50), (54, 54)])))),
                 A.cat(A.alt(A.cat(A.lit("0"), A.cset([(52, 52), (56, 56)])),
                             A.cat(A.cset([(50, 50), (52, 52), (54, 54), (56, 56)]), A.cset([(48, 48), (52, 52), (56, 56)])),
                             A.cat(A.cset([(49, 49), (51, 51), (53, 53), (55, 55), (57, 57)]), A.cset([(50, 50), (54, 54)]))),
                       A.lit("00")))
    day31, day30, day28 = d2("01", "31"), d2("01", "30"), d2("01", "28")
    month_day = A.alt(A.cat(A.alt(*(A.lit(m) for m in ("01", "03", "05", "07", "08", "10", "12"))), A.lit("-"), day31),
                      A.cat(A.alt(*(A.lit(m) for m in ("04", "06", "09", "11"))), A.lit("-"), day30),
                      A.cat(A.lit("02-"), day28))
    date = A.alt(A.cat(year, A.lit("-"), month_day), A.cat(leap, A.lit("-02-29")))
    hms = A.cat(d2("00", "23"), A.lit(":"), d2("00", "59"), A.lit(":"), d2("00", "59"),
                A.opt(A.cat(A.lit("."), A.rep(DIGIT, 1, 9))))
    offset = A.alt(A.lit("Z"), A.cat(A.cset([(43, 43), (45, 45)]), d2("00", "23"), A.lit(":"), d2("00", "59")))
    time = A.cat(hms, offset)
    hexd = A.cset([(48, 57), (65, 70), (97, 102)])
    uuid = A.cat(*(x for i, n in enumerate((8, 4, 4, 4, 12)) for x in ((A.lit("-"),) if i else ()) + (A.rep(hexd, n, n),)))
    octet = natural_range(0, 255)
    ipv4 = A.cat(octet, *(A.cat(A.lit("."), octet) for _ in range(3)))
    h16 = A.rep(hexd, 1, 4)
    colon_h16 = A.cat(A.lit(":"), h16)
    forms = [A.cat(h16, A.rep(colon_h16, 7, 7))]
    for left in range(0, 8):  # "::" with `left` groups before and up to 7 - left after
        before = A.EMPTY if left == 0 else A.cat(h16, A.rep(colon_h16, left - 1, left - 1))
        after = A.opt(A.cat(h16, A.rep(colon_h16, 0, 6 - left))) if left < 7 else A.EMPTY
        forms.append(A.cat(before, A.lit("::"), after))
    ipv6 = A.alt(*forms)
    atext = A.cset([(48, 57), (65, 90), (97, 122), (45, 45), (95, 95), (43, 43)])
    label = A.cat(A.cset([(48, 57), (65, 90), (97, 122)]),
                  A.opt(A.cat(A.rep(A.cset([(48, 57), (65, 90), (97, 122), (45, 45)]), 0, 61),
                              A.cset([(48, 57), (65, 90), (97, 122)]))))
    email = A.cat(A.rep(atext, 1, 64), A.rep(A.cat(A.lit("."), A.rep(atext, 1, 64)), 0, 3), A.lit("@"),
                  label, A.rep(A.cat(A.lit("."), label), 1, 4))
    unreserved = [(48, 57), (65, 90), (97, 122), (45, 46), (95, 95), (126, 126)]
    pchar = A.alt(A.cset(unreserved + [(33, 33), (36, 36), (38, 44), (59, 59), (61, 61), (58, 58), (64, 64)]),
                  A.cat(A.lit("%"), hexd, hexd))
    scheme = A.cat(A.cset([(65, 90), (97, 122)]), A.rep(A.cset([(48, 57), (65, 90), (97, 122), (43, 43), (45, 46)]), 0, 15))
    host = A.cat(label, A.rep(A.cat(A.lit("."), label), 0, 8))
    uri = A.cat(scheme, A.lit("://"), host, A.opt(A.cat(A.lit(":"), A.rep(DIGIT, 1, 5))),
                A.rep(A.cat(A.lit("/"), A.rep(pchar, 0, None)), 0, None),
                A.opt(A.cat(A.lit("?"), A.rep(A.alt(pchar, A.lit("/"), A.lit("?")), 0, None))),
                A.opt(A.cat(A.lit("#"), A.rep(A.alt(pchar, A.lit("/"), A.lit("?")), 0, None))))
    hostname = A.cat(label, A.rep(A.cat(A.lit("."), label), 0, 3))
    return {"date": date, "time": time, "date-time": A.cat(date, A.lit("T"), time), "uuid": uuid, "ipv4": ipv4,
            "ipv6": ipv6, "email": email, "uri": uri, "hostname": hostname}


_FORMATS: dict[str, tuple] = {}


def format_node(name: str) -> tuple | None:
    if not _FORMATS:
        _FORMATS.update(_formats())
    return _FORMATS.get(name)


# ----------------------------------------------------------------------------- compiler


def search_pattern(p: str) -> tuple:
    """The strings in which JSON Schema's ``pattern`` ``p`` finds a match, as JSON string content.

    Anchored alternatives such as ``^$|^a$`` are read one by one (`automaton.parse_regex`).
    """
    return A.parse_regex(p, search=True, char=json_char)



def _num(x: Any, path: str, kw: str, decimal: bool = False) -> Fraction:
    """A schema number as a Fraction: a float's binary value, or (``decimal``) the decimal it is written as."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and not math.isfinite(x)):
        raise Unsupported(f"{path}/{kw}", f"{kw} must be a finite number, got {x!r}")
    return Fraction(repr(x)) if decimal and isinstance(x, float) else Fraction(x)


def _sig_digits(x: Fraction) -> int:
    """Significant decimal digits of a finite decimal."""
    x = abs(x)
    whole = math.floor(x)
    return len(((str(whole) if whole else "") + _frac_digits(x)).lstrip("0"))


def _pointer(root: Any, ref: str, path: str) -> Any:
    if not ref.startswith("#"):
        raise Unsupported(path, f"$ref {ref!r}: only references inside the schema (#/...) are supported")
    node = root
    frag = ref[1:]
    if frag and not frag.startswith("/"):
        raise Unsupported(path, f"$ref {ref!r}: anchors are not supported; use a JSON pointer (#/$defs/...)")
    for raw in frag.split("/")[1:]:
        key = raw.replace("~1", "/").replace("~0", "~")
        key = unquote(key)
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            raise Unsupported(path, f"$ref {ref!r} does not resolve inside the schema")
    return node


class Compiler:
    """One schema's compiler (see the module docstring)."""

    def __init__(self, root: Any, ws: tuple, check_only: bool = False, budget: int | None = None):
        import jsonschema
        self.root, self.ws = root, ws
        cls = jsonschema.validators.validator_for(root if isinstance(root, dict) else {},
                                                  default=jsonschema.Draft202012Validator)
        self.validator = cls(root if isinstance(root, (dict, bool)) else {},
                             format_checker=cls.FORMAT_CHECKER)
        self.old_draft = cls.__name__ in ("Draft3Validator", "Draft4Validator", "Draft6Validator", "Draft7Validator")
        self.draft4 = cls.__name__ in ("Draft3Validator", "Draft4Validator")
        self.active: list[str] = []
        self._any: dict[int, tuple] = {}
        self.check_only = check_only  # a recursive $ref stands for any value: only the keywords are checked
        self.budget = budget  # subschema compilations left before TooBig (None: no limit)
        self.checked: set[str] = set()  # check_only: the $ref targets already checked
        self.proving = 0  # inside a disjointness proof: expand every reference
        self.disjoint: dict[int, tuple] = {}  # id -> (subschema, anyOf branches equivalent to its oneOf)
        self.sep = A.cat(ws, A.lit(","), ws)
        self.colon = A.cat(ws, A.lit(":"), ws)

    def compile(self) -> tuple:
        return self.conj([(self.root, "#")])

    # -- conjunctions ---------------------------------------------------------------

    def expand(self, parts: list, refs: list) -> list | None:
        """$ref and allOf inlined; None when a part is false."""
        out, todo = [], list(parts)
        while todo:
            s, path = todo.pop(0)
            if s is True or s == {}:
                continue
            if s is False:
                return None
            if not isinstance(s, dict):
                raise Unsupported(path, f"a schema must be an object or a boolean, got {type(s).__name__}")
            if "$ref" in s:
                ref = s["$ref"]
                if not isinstance(ref, str):
                    raise Unsupported(f"{path}/$ref", "$ref must be a string")
                if ref in self.active or ref in refs:
                    if self.check_only:
                        continue
                    raise NotRegular(f"{path}/$ref: recursive reference {ref!r}")
                if self.check_only and not self.proving:  # each target's keywords are checked once
                    if ref in self.checked:
                        continue
                    self.checked.add(ref)
                refs.append(ref)
                target = _pointer(self.root, ref, f"{path}/$ref")
                rest = {k: v for k, v in s.items() if k != "$ref"}
                todo.insert(0, (target, ref))
                if not self.old_draft and rest:
                    todo.insert(1, (rest, path))
                continue
            if "allOf" in s:
                subs = s["allOf"]
                if not isinstance(subs, list):
                    raise Unsupported(f"{path}/allOf", "allOf must be a list")
                rest = {k: v for k, v in s.items() if k != "allOf"}
                todo[:0] = [(b, f"{path}/allOf/{i}") for i, b in enumerate(subs)] + [(rest, path)]
                continue
            for k in s:
                if k in _REFUSED:
                    raise Unsupported(f"{path}/{k}", f"the keyword {k!r} is not supported")
            out.append((s, path))
        return out

    def conj(self, parts: list) -> tuple:
        if self.budget is not None:
            self.budget -= 1
            if self.budget < 0:
                raise TooBig(f"the schema needs more than {MAX_SUBSCHEMAS} subschema compilations")
        refs: list[str] = []
        parts = self.expand(parts, refs)
        if parts is None:
            return A.NOTHING
        self.active.extend(refs)
        try:
            return self._conj(parts)
        finally:
            del self.active[len(self.active) - len(refs):]

    def _conj(self, parts: list) -> tuple:
        if not any(set(s) & _CONSTRAINING for s, _ in parts):
            return self.any_value(ANY_DEPTH)
        for i, (s, path) in enumerate(parts):
            for kw in ("anyOf", "oneOf"):
                if kw in s:
                    branches = s[kw]
                    if not isinstance(branches, list) or not branches:
                        raise Unsupported(f"{path}/{kw}", f"{kw} must be a non-empty list")
                    rest = parts[:i] + [({k: v for k, v in s.items() if k != kw}, path)] + parts[i + 1:]
                    cases = [rest + [(b, f"{path}/{kw}/{j}")] for j, b in enumerate(branches)]
                    if kw == "oneOf" and len(cases) > 1:
                        try:
                            self._check_disjoint(cases, f"{path}/oneOf")
                        except Unsupported as e:  # exactly one: each branch beside the others' negations
                            exact = self._exactly_one(branches, f"{path}/oneOf", e)
                            self.disjoint.setdefault(id(s), (s, exact))
                            cases = [rest + [(b, f"{path}/oneOf/{j}")] for j, b in enumerate(exact)]
                        else:
                            self._prove_alone(s, path, branches)
                    return A.alt(*(self.conj(c) for c in cases))
        for i, (s, path) in enumerate(parts):
            dep = self._dependency(s, path)
            if dep is not None:
                key, extra_part, rest = dep
                others = parts[:i] + [(rest, path)] + parts[i + 1:]
                present = others + [({"required": [key]}, path), extra_part]
                absent = others + [({"__absent__": [key]}, path)]
                return A.alt(self.conj(present), self.conj(absent))
        finite = self.finite(parts)
        if finite is not None:
            return A.alt(*(literal(v) for v in finite))
        for i, (s, path) in enumerate(parts):
            n = s.get("not")
            if "not" in s and not (isinstance(n, bool) or n == {} or (isinstance(n, dict) and "type" in n and
                                                                      set(n) <= {"type"} | _ANNOTATIONS)):
                neg = self._negate(n, f"{path}/not")  # not X: the schema of what X rejects
                if neg is None:
                    raise Unsupported(f"{path}/not", "only `not` of types, required, properties, allOf/anyOf/not of "
                                                     "those, or of an enum/const beside a finite schema, is supported")
                rest = ({k: v for k, v in s.items() if k != "not"}, path)
                return self.conj(parts[:i] + [rest, (neg, f"{path}/not")] + parts[i + 1:])
        types = self.types(parts)
        nots = [(s["not"], f"{path}/not") for s, path in parts if "not" in s]
        for n, npath in nots:
            types = self._apply_not(n, npath, types)
        out = []
        for t in sorted(types):
            if t == "integer" and "number" in types:
                continue
            out.append(getattr(self, "t_" + t)(parts))
        return A.alt(*out)

    def _dependency(self, s: dict, path: str):
        for kw in ("dependentRequired", "dependentSchemas", "dependencies"):
            d = s.get(kw)
            if d is None:
                continue
            if not isinstance(d, dict):
                raise Unsupported(f"{path}/{kw}", f"{kw} must be an object")
            if not d:
                continue
            key = next(iter(d))
            val = d[key]
            rest = dict(s)
            rest[kw] = {k: v for k, v in d.items() if k != key}
            if isinstance(val, list):
                extra = ({"required": val}, f"{path}/{kw}/{key}")
            else:
                extra = (val, f"{path}/{kw}/{key}")
            return key, extra, rest
        return None

    def _check_disjoint(self, cases: list, path: str) -> None:
        self.proving += 1
        try:
            self._check_disjoint_(cases, path)
        finally:
            self.proving -= 1

    def _check_disjoint_(self, cases: list, path: str) -> None:
        infos = []
        for c in cases:
            exp = self.expand(c, [])
            if exp is None:
                infos.append((frozenset(), None))
                continue
            fin = None
            try:
                fin = self.finite(exp)
            except Unsupported:
                pass
            infos.append((self.types(exp, infer=False), fin, exp))
        for a, b in itertools.combinations(range(len(cases)), 2):
            ta, tb = infos[a][0], infos[b][0]
            if not infos[a][1:] or not infos[b][1:]:
                continue
            if not (_widen(ta) & _widen(tb)):
                continue
            fa, fb = infos[a][1], infos[b][1]
            if fa is not None and fb is not None and not any(_same(x, y) for x in fa for y in fb):
                continue
            if self._discriminated(infos[a][2], infos[b][2]) or self._closed_apart(infos[a][2], infos[b][2]) \
                    or self._closed_apart(infos[b][2], infos[a][2]):
                continue
            raise Unsupported(path, f"oneOf branches {a} and {b} may both match one value (only oneOf with "
                                    f"branches of different types, consts or a required discriminator property "
                                    f"is supported)")

    def _exactly_one(self, branches: list, path: str, why: Unsupported) -> list:
        """``oneOf`` as ``anyOf`` of each branch with the negations of the others (raises ``why`` if not expressible)."""
        negs = [self._negate(b, f"{path}/{j}") for j, b in enumerate(branches)]
        if any(n is None for n in negs):
            raise why
        width = [len(n["anyOf"]) if isinstance(n, dict) and set(n) == {"anyOf"} else 1 for n in negs]
        if sum(math.prod(width[:i] + width[i + 1:]) for i in range(len(branches))) > MAX_CASES:
            raise why
        return [{"allOf": [b] + [n for j, n in enumerate(negs) if j != i]} for i, b in enumerate(branches)]

    def _negate(self, x: Any, path: str, depth: int = 0) -> Any:
        """A schema of exactly the values ``x`` rejects, or None where this cannot say.

        Types, ``required`` (some name absent), ``properties`` (some listed value
        rejected), ``allOf`` / ``anyOf`` (De Morgan), ``not`` and ``$ref``; other keywords: None.
        """
        if x is True or x == {}:
            return False
        if x is False:
            return True
        if not isinstance(x, dict) or depth > 8:
            return None
        if "$ref" in x:
            ref = x["$ref"]
            if not isinstance(ref, str):
                return None
            rest = {} if self.old_draft else {k: v for k, v in x.items() if k != "$ref"}
            return self._negate({"allOf": [_pointer(self.root, ref, f"{path}/$ref")] + ([rest] if rest else [])},
                                path, depth + 1)
        alts: list = []
        for k, v in x.items():
            if k in _ANNOTATIONS or (k not in _CONSTRAINING and k != "allOf" and k not in _REFUSED):
                continue  # annotations and unknown keywords assert nothing
            if k == "type":
                ts = {v} if isinstance(v, str) else set(v) if isinstance(v, list) else None
                if ts is None or not ts <= ALL_TYPES or ("integer" in ts and "number" not in ts):
                    return None
                others = sorted(ALL_TYPES - ts - ({"integer"} if "number" in ts else set()))
                if others:
                    alts.append({"type": others})
            elif k == "required" and isinstance(v, list) and all(isinstance(n, str) for n in v):
                if v:
                    alts.append({"type": "object", "anyOf": [{"properties": {n: False}} for n in v]})
            elif k == "properties" and isinstance(v, dict):
                for n, sub in v.items():
                    neg = self._negate(sub, f"{path}/properties/{n}", depth + 1)
                    if neg is None:
                        return None
                    if neg is not False:
                        alts.append({"type": "object", "required": [n], "properties": {n: neg}})
            elif k == "not":
                alts.append(v)  # not (not v) = v
            elif k in ("allOf", "anyOf") and isinstance(v, list) and v:
                negs = [self._negate(b, f"{path}/{k}/{j}", depth + 1) for j, b in enumerate(v)]
                if any(n is None for n in negs):
                    return None
                if k == "allOf":
                    alts += [n for n in negs if n is not False]
                elif all(n is not False for n in negs):
                    alts.append({"allOf": negs})
            else:
                return None
        if not alts:
            return False
        return alts[0] if len(alts) == 1 else {"anyOf": alts}

    def _prove_alone(self, s: dict, path: str, branches: list) -> None:
        """Records ``s`` in :attr:`disjoint` when its oneOf branches are disjoint next to its own keywords only."""
        if id(s) in self.disjoint:
            return
        rest = ({k: v for k, v in s.items() if k != "oneOf"}, path)
        try:
            self._check_disjoint([[rest, (b, f"{path}/oneOf/{j}")] for j, b in enumerate(branches)], path)
        except (Unsupported, NotRegular, TooBig):
            return
        self.disjoint[id(s)] = (s, branches)

    def _closed_apart(self, pa: list, pb: list) -> bool:
        """Both branches take objects only, and ``pb`` requires a name that ``pa`` forbids.

        ``pa`` forbids a name with ``properties: {name: false}``, or where a part with
        ``additionalProperties: false`` neither lists it nor matches it by a pattern.
        """
        if _widen(self.types(pa, infer=False)) & _widen(self.types(pb, infer=False)) - {"object"}:
            return False
        needed = set().union(*(set(s.get("required", [])) for s, _ in pb if isinstance(s.get("required"), list)))
        for s, _ in pa:
            props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
            pats = s.get("patternProperties") if isinstance(s.get("patternProperties"), dict) else {}
            for k in needed:
                if props.get(k) is False:
                    return True
                if s.get("additionalProperties") is False and k not in props:
                    try:
                        if not any(re.search(p, k) for p in pats):
                            return True
                    except re.error:
                        return False
        return False

    def _discriminated(self, pa: list, pb: list) -> bool:
        """Both branches are objects with a required property whose allowed values are disjoint."""
        def props(parts):
            req, vals = set(), {}
            for s, path in parts:
                req |= set(s.get("required", []))
                for k, sub in (s.get("properties") or {}).items():
                    try:
                        exp = self.expand([(sub, path)], [])
                        f = self.finite(exp) if exp is not None else []
                    except (Unsupported, NotRegular):
                        f = None
                    if f is not None:
                        vals[k] = f if k not in vals else [v for v in vals[k] if any(_same(v, w) for w in f)]
            ta = self.types(parts, infer=False)
            return req, vals, ta
        ra, va, ta = props(pa)
        rb, vb, tb = props(pb)
        if _widen(ta) & _widen(tb) - {"object"}:
            return False
        for k in ra & rb:
            if k in va and k in vb and not any(_same(x, y) for x in va[k] for y in vb[k]):
                return True
        return False

    def _apply_not(self, n: Any, path: str, types: frozenset) -> frozenset:
        if n is False or n == {}:
            return types if n is False else frozenset()
        if n is True:
            return frozenset()
        if isinstance(n, dict) and set(n) <= {"type"} | _ANNOTATIONS:
            nt = n["type"]
            nt = {nt} if isinstance(nt, str) else set(nt)
            if "number" in nt:
                nt.add("integer")
            if "integer" in nt and "number" in types and "number" not in nt:
                raise Unsupported(path, "not {type: integer} beside type number is not supported")
            return frozenset(t for t in types if t not in nt)
        raise Unsupported(path, "only `not` of a type, or of an enum/const beside a finite schema, is supported")

    def finite(self, parts: list) -> list | None:
        """The allowed values when the schema is an enum / const / only booleans / null (validated)."""
        cands = None
        for s, path in parts:
            for kw in ("enum", "const"):
                if kw in s:
                    vals = s[kw] if kw == "enum" else [s[kw]]
                    if kw == "enum" and not isinstance(vals, list):
                        raise Unsupported(f"{path}/enum", "enum must be a list")
                    if cands is None:
                        cands = list(vals)
                    else:
                        allowed = {_json_key(w) for w in vals}
                        cands = [v for v in cands if _json_key(v) in allowed]
        if cands is None:
            types = self.types(parts)
            if types and types <= {"null", "boolean"}:
                cands = ([None] if "null" in types else []) + ([True, False] if "boolean" in types else [])
            else:
                return None
        checks = [self.validator.evolve(schema=s) for s, _ in parts if not _only(s, {"__absent__"})]
        absent = [set(s["__absent__"]) for s, _ in parts if s.get("__absent__")]
        out, seen = [], set()
        for v in cands:
            key = _json_key(v)
            if key in seen:
                continue
            if all(c.is_valid(v) for c in checks) and not (isinstance(v, dict) and any(a & set(v) for a in absent)):
                seen.add(key)
                out.append(v)
        return out

    def types(self, parts: list, infer: bool = True) -> frozenset:
        types = ALL_TYPES
        declared = False
        for s, path in parts:
            t = s.get("type")
            if t is None:
                continue
            declared = True
            ts = {t} if isinstance(t, str) else set(t) if isinstance(t, list) else None
            if ts is None or not ts <= ALL_TYPES:
                raise Unsupported(f"{path}/type", f"unknown type {t!r}")
            if "number" in ts:
                ts.add("integer")
            types = types & frozenset(ts)
        if not declared and infer:
            kws = set().union(*(set(s) for s, _ in parts)) if parts else set()
            implied = set()
            if kws & _OBJECT_KW - {"__absent__"}:
                implied.add("object")
            if kws & _ARRAY_KW:
                implied.add("array")
            if kws & _STRING_KW:
                implied.add("string")
            if kws & _NUMBER_KW:
                implied |= {"number", "integer"}
            if implied:
                types = frozenset(implied)
        return types

    # -- types -------------------------------------------------------------------------

    def t_null(self, parts):
        return NULL

    def t_boolean(self, parts):
        return BOOLEAN

    def _bounds(self, parts, integer: bool):
        lo, lo_x, hi, hi_x, mult = None, False, None, False, []
        for s, path in parts:
            for kw in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
                if kw not in s:
                    continue
                v = s[kw]
                if isinstance(v, bool):  # draft 4: a flag on minimum / maximum
                    continue
                x = _num(v, path, kw, decimal=True)  # compared with the decimal texts (number_range)
                excl = kw.startswith("exclusive") or (self.draft4 and s.get("exclusive" + kw[0].upper() + kw[1:]) is True)
                if "inimum" in kw:
                    if lo is None or x > lo or (x == lo and excl):
                        lo, lo_x = x, excl
                else:
                    if hi is None or x < hi or (x == hi and excl):
                        hi, hi_x = x, excl
            if "multipleOf" in s:
                m = _num(s["multipleOf"], path, "multipleOf")
                if m <= 0:
                    raise Unsupported(f"{path}/multipleOf", "multipleOf must be > 0")
                mult.append((m, f"{path}/multipleOf"))
        return lo, lo_x, hi, hi_x, mult

    def t_integer(self, parts, mult_ok: bool = True):
        lo, lo_x, hi, hi_x, mult = self._bounds(parts, True)
        ilo = None if lo is None else (math.floor(lo) + 1 if lo_x else math.ceil(lo))
        ihi = None if hi is None else (math.ceil(hi) - 1 if hi_x else math.floor(hi))
        node = integer_range(ilo, ihi) if (ilo, ihi) != (None, None) else INTEGER
        ms = []
        for m, path in mult:
            if m.denominator != 1:
                if (1 / m).denominator == 1:  # 1/k: every integer qualifies
                    continue
                raise Unsupported(path, f"multipleOf {float(m)} for integers is supported when it is an integer or 1/k")
            if m != 1:
                ms.append(int(m))
        if ms:
            m = math.lcm(*ms)
            if m > 10_000:
                raise Unsupported(mult[0][1], f"multipleOf {m} is larger than 10000")
            node = ("and", node, _modulo(m))
        return node

    def t_number(self, parts):
        lo, lo_x, hi, hi_x, mult = self._bounds(parts, False)
        if mult:
            if all(m.denominator == 1 for m, _ in mult):
                return self.t_integer(parts)
            raise Unsupported(mult[0][1], "multipleOf for non-integer numbers is not supported")
        if lo is None and hi is None:
            return NUMBER
        for b, x in ((lo, lo_x), (hi, hi_x)):
            if b is not None and x and b.denominator != 1 and _sig_digits(b) > STRICT_DIGITS:
                raise Unsupported(self._bound_path(parts), f"an exclusive bound {float(b)!r} with more than "
                                                           f"{STRICT_DIGITS} significant digits is not supported")
        return number_range(lo, lo_x, hi, hi_x)

    @staticmethod
    def _bound_path(parts) -> str:
        for s, path in parts:
            for kw in ("exclusiveMinimum", "exclusiveMaximum", "minimum", "maximum"):
                if kw in s:
                    return f"{path}/{kw}"
        return parts[0][1] if parts else "#"

    def t_string(self, parts):
        lo, hi, pats = 0, None, []
        for s, path in parts:
            lo, hi = _count_bounds(lo, hi, s, path, "minLength", "maxLength")
            if "pattern" in s:
                p = s["pattern"]
                if not isinstance(p, str):
                    raise Unsupported(f"{path}/pattern", "pattern must be a string")
                try:
                    pats.append(A.det(search_pattern(p)))
                except A.RegexError as e:
                    raise Unsupported(f"{path}/pattern", f"pattern {p!r}: {e}") from None
            if "format" in s:
                f = s["format"]
                node = format_node(f) if isinstance(f, str) else None
                if node is None and f in _STANDARD_FORMATS:
                    raise Unsupported(f"{path}/format", f"format {f!r} is not supported")
                if node is not None:
                    pats.append(A.det(node))
        if hi is not None and hi < lo:
            return A.NOTHING
        content = A.det(A.rep(CHAR, lo, hi))
        if pats:
            body = pats[0]
            for p in pats[1:]:
                body = ("and", body, p)
            content = body if (lo, hi) == (0, None) else ("and", content, body)
        return A.cat(QUOTE, content, QUOTE)

    def t_array(self, parts):
        prefix: list | None = None
        rest_all: list = []  # conjuncts on every item
        rest_after: list = []  # conjuncts on items after the prefix
        closed_after = False
        lo, hi, unique = 0, None, False
        for s, path in parts:
            items, pre = s.get("items"), s.get("prefixItems")
            ipath = f"{path}/items"
            if isinstance(items, list):  # draft 4..2019 tuple form
                pre, items, ipath = items, s.get("additionalItems"), f"{path}/additionalItems"
            if pre is not None:
                if not isinstance(pre, list):
                    raise Unsupported(f"{path}/prefixItems", "prefixItems must be a list")
                if prefix is not None:
                    raise Unsupported(f"{path}/prefixItems", "prefixItems in more than one allOf branch is not supported")
                prefix = [[(p, f"{path}/prefixItems/{i}")] for i, p in enumerate(pre)]
                if items is False:
                    closed_after = True
                elif items is not None:
                    rest_after.append((items, ipath))
            elif items is False:
                hi = 0
            elif items is not None:
                rest_all.append((items, ipath))
            lo, hi = _count_bounds(lo, hi, s, path, "minItems", "maxItems")
            if s.get("uniqueItems") is True:
                unique = True
                upath = f"{path}/uniqueItems"
        prefix = [p + rest_all for p in (prefix or [])]
        rest = None if closed_after else rest_all + rest_after
        if rest is None:
            hi = len(prefix) if hi is None else min(hi, len(prefix))
        if hi is not None and hi < lo:
            return A.NOTHING
        if unique and (hi is None or hi > 1):
            if prefix:
                raise Unsupported(upath, "uniqueItems with prefixItems is not supported")
            vals = self.finite(self.expand(rest, []) or []) if rest is not None else []
            if vals is None:
                raise Unsupported(upath, "uniqueItems is supported for items with finitely many values (enum, const, "
                                         "boolean) or at most one item")
            top = len(vals) if hi is None else min(hi, len(vals))
            total = sum(math.perm(len(vals), k) for k in range(lo, top + 1))
            if total > MAX_CASES * 64:
                raise Unsupported(upath, f"uniqueItems over {len(vals)} values gives {total} arrays (more than "
                                         f"{MAX_CASES * 64})")
            arrays = [list(p) for k in range(lo, top + 1) for p in itertools.permutations(vals, k)]
            return A.alt(*(self._array_text([literal(v) for v in a]) for a in arrays))
        elems = [self.conj(p) for p in prefix]
        rest_node = self.conj(rest) if rest is not None else A.NOTHING
        k = len(elems)
        # tail after the prefix: (sep R){max(0, lo-k), hi-k}
        tail_lo = max(0, lo - k)
        tail_hi = None if hi is None else hi - k
        inner = A.NOTHING
        if k == 0:
            if tail_hi is None or tail_hi >= 1:
                first = A.cat(rest_node, A.rep(A.cat(self.sep, rest_node), max(0, tail_lo - 1),
                                                 None if tail_hi is None else tail_hi - 1))
                inner = first if tail_lo >= 1 else A.opt(first)
            else:
                inner = A.EMPTY
        else:
            tail = A.rep(A.cat(self.sep, rest_node), tail_lo, tail_hi) if (tail_hi is None or tail_hi >= 0) else A.NOTHING
            if rest_node == A.NOTHING:
                tail = A.EMPTY if tail_lo == 0 else A.NOTHING
            node = tail
            for i in range(k - 1, -1, -1):
                head = elems[i] if i == 0 else A.cat(self.sep, elems[i])
                node = A.cat(head, node)
                if i >= lo and (hi is None or i <= hi):  # the array may stop before element i
                    node = A.opt(node)
            inner = node
        return A.cat(A.lit("["), self.ws, inner, self.ws, A.lit("]"))

    def _array_text(self, elems):
        inner = A.EMPTY
        for i, e in enumerate(elems):
            inner = A.cat(inner, e) if i == 0 else A.cat(inner, self.sep, e)
        return A.cat(A.lit("["), self.ws, inner, self.ws, A.lit("]"))

    def t_object(self, parts):
        obj = [(s, p) for s, p in parts if set(s) & _OBJECT_KW]
        names: list[str] = []
        required: set = set()
        absent: set = set()
        lo, hi = 0, None
        pnames = []
        for s, path in obj:
            props = s.get("properties") or {}
            if not isinstance(props, dict):
                raise Unsupported(f"{path}/properties", "properties must be an object")
            for k in props:
                if k not in names:
                    names.append(k)
            req = s.get("required", [])
            if isinstance(req, bool):  # draft 3
                raise Unsupported(f"{path}/required", "draft-3 boolean required is not supported")
            for k in req:
                if k not in names:
                    names.append(k)
                required.add(k)
            absent |= set(s.get("__absent__", ()))
            lo, hi = _count_bounds(lo, hi, s, path, "minProperties", "maxProperties")
            if "propertyNames" in s:
                pnames.append((s["propertyNames"], f"{path}/propertyNames"))
            pp = s.get("patternProperties")
            if pp is not None and not isinstance(pp, dict):
                raise Unsupported(f"{path}/patternProperties", "patternProperties must be an object")
        if required & absent:
            return A.NOTHING
        names += [k for k in sorted(absent) if k not in names]  # never written, neither as an extra
        members = []
        for k in names:
            if k in absent:
                continue
            if pnames and not all(self.validator.evolve(schema=ps).is_valid(k) for ps, _ in pnames):
                if k in required:
                    return A.NOTHING
                continue
            sub = []
            for s, path in obj:
                sub += self._key_schemas(s, path, k)
            value = self.conj(sub)
            if value == A.NOTHING:
                if k in required:
                    return A.NOTHING
                continue
            members.append((A.cat(literal(k), self.colon, value), k in required, False))
        if hi is not None and len(required) > hi:
            return A.NOTHING
        # members not listed: keys by pattern (each pattern's keys that no other pattern matches), then the rest
        listed = A.alt(*(literal(k) for k in names)) if names else A.NOTHING
        patterns = []
        for s, path in obj:
            for p, ps in (s.get("patternProperties") or {}).items():
                try:
                    key = A.cat(QUOTE, search_pattern(p), QUOTE)
                except A.RegexError as e:
                    raise Unsupported(f"{path}/patternProperties/{p}", f"pattern {p!r}: {e}") from None
                patterns.append((p, key, ps, f"{path}/patternProperties/{p}", s, path))
        extras = []
        allow_dup_count = lo <= 1
        key_filter = [self.conj([(ps, pth)]) for ps, pth in pnames]
        for i, (p, key, ps, ppath, s0, path0) in enumerate(patterns):
            lang = key
            for j, other in enumerate(patterns):
                if j != i:
                    lang = ("diff", lang, other[1])
            if names:
                lang = ("diff", lang, listed)
            for f in key_filter:
                lang = ("and", lang, f)
            sub = [(ps, ppath)]
            for s, path in obj:
                if s is not s0:
                    sub += self._extra_schemas(s, path)
            value = self.conj(sub)
            if value != A.NOTHING:
                extras.append(A.cat(lang, self.colon, value))
        sub = []
        closed = False
        for s, path in obj:
            e = self._extra_schemas(s, path)
            if e is None:
                closed = True
                break
            sub += e
        if not closed:
            lang = STRING
            for _, key, *_ in patterns:
                lang = ("diff", lang, key)
            if names:
                lang = ("diff", lang, listed)
            for f in key_filter:
                lang = ("and", lang, f)
            value = self.conj(sub) if sub else self.any_value(EXTRA_DEPTH)
            if value != A.NOTHING:
                extras.append(A.cat(lang, self.colon, value))
        if extras and allow_dup_count and (hi is None or hi > len(required)):
            members.append((A.alt(*extras), False, True))
        body = A.seq(members, self.sep, lo, hi)
        return A.cat(A.lit("{"), self.ws, body, self.ws, A.lit("}"))

    def _key_schemas(self, s: dict, path: str, k: str) -> list:
        """The conjuncts one object part puts on the value of property ``k``."""
        out = []
        props = s.get("properties") or {}
        if k in props:
            out.append((props[k], f"{path}/properties/{k}"))
        matched = False
        for p, ps in (s.get("patternProperties") or {}).items():
            try:
                hit = re.search(p, k) is not None
            except re.error as e:
                raise Unsupported(f"{path}/patternProperties/{p}", f"pattern {p!r}: {e}") from None
            if hit:
                matched = True
                out.append((ps, f"{path}/patternProperties/{p}"))
        if k not in props and not matched and "additionalProperties" in s:
            out.append((s["additionalProperties"], f"{path}/additionalProperties"))
        return out

    def _extra_schemas(self, s: dict, path: str) -> list | None:
        """Conjuncts on a property this part neither lists nor matches by pattern (None: forbidden)."""
        ap = s.get("additionalProperties", True)
        if ap is False:
            return None
        return [] if ap is True else [(ap, f"{path}/additionalProperties")]

    def any_value(self, depth: int) -> tuple:
        got = self._any.get(depth)
        if got is None:
            got = self._any[depth] = A.det(self._any_value(depth))
        return got

    def _any_value(self, depth: int) -> tuple:
        scalars = A.alt(NULL, BOOLEAN, NUMBER, STRING)
        if depth <= 0:
            return scalars
        inner = self.any_value(depth - 1)
        arr = A.cat(A.lit("["), self.ws, A.opt(A.cat(inner, A.rep(A.cat(self.sep, inner), 0, None))), self.ws, A.lit("]"))
        member = A.cat(STRING, self.colon, inner)
        obj = A.cat(A.lit("{"), self.ws, A.opt(A.cat(member, A.rep(A.cat(self.sep, member), 0, None))), self.ws,
                    A.lit("}"))
        return A.alt(scalars, arr, obj)


def _modulo(m: int) -> tuple:
    """Canonical integers divisible by m as a DFA node (residue after each digit)."""
    return ("dfa", _modulo_dfa(m))


def _modulo_dfa(m: int):
    # states: 0 start, 1 after '-', 2 after a lone '0' (accepting), 3 + r: residue r after a nonzero lead
    n = 3 + m
    table = [[-1] * 256 for _ in range(n)]
    table[0][45] = 1
    table[0][48] = 2
    table[1][48] = -1
    for d in range(1, 10):
        table[0][48 + d] = 3 + d % m
        table[1][48 + d] = 3 + d % m
    for r in range(m):
        for d in range(10):
            table[3 + r][48 + d] = 3 + (r * 10 + d) % m
    accept = [False, False, True] + [r == 0 for r in range(m)]
    return table, accept


def _count_bounds(lo: int, hi: int | None, s: dict, path: str, low: str, high: str) -> tuple[int, int | None]:
    """(lo, hi) tightened by subschema `s`'s `low` / `high` counts (allOf parts intersect)."""
    if low in s:
        lo = max(lo, _count(s[low], path, low))
    if high in s:
        v = _count(s[high], path, high)
        hi = v if hi is None else min(hi, v)
    return lo, hi


def _count(v: Any, path: str, kw: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (isinstance(v, float) and not v.is_integer()):
        raise Unsupported(f"{path}/{kw}", f"{kw} must be a non-negative integer, got {v!r}")
    return int(v)


def _widen(types: frozenset) -> frozenset:
    return types | {"number"} if "integer" in types else types | ({"integer"} if "number" in types else set())


def _only(s: dict, kws: set) -> bool:
    return bool(s) and set(s) <= kws


def _json_key(v: Any) -> Any:
    """A hashable key of a JSON value: equal keys exactly when `_same` (1 and 1.0 alike,
    True and 1 not)."""
    if isinstance(v, bool):
        return ("b", v)
    if isinstance(v, (int, float)):
        return ("n", v)  # 1 == 1.0 and hash(1) == hash(1.0)
    if isinstance(v, str):
        return ("s", v)
    if v is None:
        return ("z",)
    if isinstance(v, list):
        return ("l", tuple(_json_key(x) for x in v))
    if isinstance(v, dict):
        return ("d", frozenset((k, _json_key(x)) for k, x in v.items()))
    return ("o", type(v).__name__, repr(v))


def _same(a: Any, b: Any) -> bool:
    """JSON Schema equality (1 == 1.0, True != 1, objects and arrays by value)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def schema_node(schema: Any, ws: tuple, max_subschemas: int | None = None, disjoint: dict | None = None) -> tuple:
    """The AST of a schema's JSON texts (see the module docstring).

    Args:
      schema: the schema (a dict or a boolean).
      ws: the whitespace AST between JSON tokens.
      max_subschemas: stop with :class:`TooBig` after this many subschema compilations
        (None: no limit).
      disjoint: filled with ``id -> (subschema, branches)`` for the subschemas whose ``oneOf``
        is the ``anyOf`` of ``branches`` (:func:`one_of_as_any_of`).

    Raises:
      Unsupported: a keyword that cannot be enforced exactly (anywhere in the schema, also
        beyond a recursive reference).
      NotRegular: a recursive ``$ref`` (every keyword is supported).
      TooBig: ``max_subschemas`` crossed.
    """
    c = Compiler(schema, ws, budget=max_subschemas)
    try:
        return c.compile()
    except (NotRegular, TooBig):
        if disjoint is not None:
            disjoint.update(c.disjoint)
        c = Compiler(schema, ws, check_only=True)
        c.compile()  # Unsupported wins over NotRegular / TooBig
        raise
    except RecursionError:
        raise NotRegular("the schema nests too deeply for the regex compiler") from None
    finally:
        if disjoint is not None:
            disjoint.update(c.disjoint)


def one_of_as_any_of(schema: Any, disjoint: dict) -> Any:
    """A copy of ``schema`` where each subschema of ``disjoint`` says ``anyOf`` for its ``oneOf``.

    ``disjoint`` maps ids of subschemas to ``(subschema, branches)``: their ``oneOf`` has
    disjoint branches, or ``branches`` are each branch beside the others' negations (in
    plain JSON Schema). The same language, for engines without ``oneOf``.
    """
    def go(x):
        if isinstance(x, dict):
            out = {k: go(v) for k, v in x.items() if not (id(x) in disjoint and k == "oneOf")}
            if id(x) in disjoint and "oneOf" in x:
                branches = {"anyOf": [go(b) for b in disjoint[id(x)][1]]}
                if "anyOf" in out:
                    out["allOf"] = list(out.get("allOf", [])) + [branches]
                else:
                    out.update(branches)
            return out
        if isinstance(x, list):
            return [go(v) for v in x]
        return x
    return go(schema)
