"""JSON schemas are enforced exactly or refused (jaxsample/_constraints/schema.py, docs/structured.md).

Each instance is fed byte by byte through the table the device runs (walked on the host), then
end-of-sequence, as MaskBench's runner does. The cases that let wrong outputs through before
(date-time without an offset, impossible dates, draft-7 ``dependencies``, ``anyOf`` of
required-only branches, required names missing from ``properties``, ``{}`` subschemas, anchors
in patterns) are rejected; a property test checks random small schemas against random
instances: accepted iff ``jsonschema`` validates (fixed seeds); MaskBench files (when
../shared/maskbench is there) never accept an invalid instance.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema")

import jaxsample as js  # noqa: E402
from models import ByteTokenizer  # noqa: E402

TOK = ByteTokenizer()


def walk(c, text: str) -> int:
    """The table state after ``text`` (0: dead), walked on the host like the device's update."""
    allowed = np.asarray(c.allowed)
    offsets, targets = np.asarray(c.offsets), np.asarray(c.targets)
    bits = np.unpackbits(allowed.view(np.uint8), axis=-1, bitorder="little")
    s = int(np.asarray(c.initial))
    for t in text.encode("utf-8"):
        if not bits[s, t]:
            return 0
        s = int(targets[offsets[s] + int(bits[s, :t].sum())])
    return s


def accepts(c, text: str) -> bool:
    s = walk(c, text)
    return s != 0 and bool(np.unpackbits(np.asarray(c.allowed)[s].view(np.uint8), bitorder="little")[TOK.eos_id])


def dumps(v) -> str:
    return json.dumps(v, indent=None, ensure_ascii=False)


def valid(schema, value) -> bool:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(value)


class Raw(str):
    """A JSON text as it is (other values are json.dumps'ed)."""


def check(schema, good, bad):
    c = js.JSONSchema(schema, TOK, host="never")
    for v in good:
        assert accepts(c, v if isinstance(v, Raw) else dumps(v)), (schema, v)
    for v in bad:
        assert not accepts(c, v if isinstance(v, Raw) else dumps(v)), (schema, v)


# ----------------------------------------------------------------------------- the wrong outputs of before


def test_date_time_needs_an_offset_and_dates_are_real():
    check({"type": "string", "format": "date-time"},
          ["2022-01-01T12:00:00Z", "2022-01-01T12:00:00+05:30", "2020-02-29T00:00:00.5-01:00"],
          ["2022-01-01T12:00:00", "2022-01-01T24:00:00Z", "2022-02-30T12:00:00Z", "2022-01-01 12:00:00Z"])
    check({"type": "string", "format": "date"},
          ["2020-02-29", "2000-02-29", "2021-12-31", "0001-01-01"],
          ["2020-02-31", "2021-02-29", "1900-02-29", "2021-04-31", "2021-13-01", "0000-01-01", "2021-1-01"])
    check({"type": "string", "format": "time"}, ["23:59:59Z", "00:00:00+01:00"], ["24:00:00Z", "12:00:00"])


def test_draft7_dependencies_are_enforced():
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
              "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}, "c": {"type": "string"}},
              "dependencies": {"a": ["b"], "c": {"required": ["a"]}}}
    check(schema, [{}, {"b": 1}, {"a": 1, "b": 2}, {"a": 1, "b": 2, "c": "x"}],
          [{"a": 1}, {"c": "x"}, {"b": 1, "c": "x"}])
    check({"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
           "dependentRequired": {"x": ["y"]}}, [{"x": 1, "y": 2}, {"y": 2}], [{"x": 1}])


def test_anyof_of_required_branches_beside_properties():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}
    check(schema, [{"a": 1}, {"b": 1}, {"a": 1, "b": 2}], [{}, {"c": 1}])


def test_required_names_missing_from_properties():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "z"]}
    check(schema, [{"a": 1, "z": [1, "x"]}, {"a": 1, "z": None}], [{"a": 1}, {"z": 1}])
    closed = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["z"],
              "additionalProperties": False}
    with pytest.raises(ValueError, match="language is empty"):
        js.JSONSchema(closed, TOK, host="never")


def test_any_value_subschema_does_not_split_the_regex():
    schema = {"type": "object", "properties": {"x": {}, "y": {"type": "integer"}}, "required": ["x", "y"],
              "additionalProperties": False}
    check(schema, [{"x": True, "y": 1}, {"x": "s", "y": 1}, {"x": [1, {"k": None}], "y": 2}, {"x": None, "y": 0}],
          [{"x": True}, Raw('{"x": true, "y": 1'), Raw('{"x": 1'), {"y": 1, "x": 2}])
    c = js.JSONSchema(schema, TOK, host="never")
    assert walk(c, '{"x": 1') != 0 and not accepts(c, '{"x": 1')  # unfinished: EOS is not allowed


def test_anchors_inside_patterns():
    check({"type": "string", "pattern": "^allow|deny$"}, ["allow", "allowed", "deny", "xdeny"],
          ["xallow", "denyx", "maybe"])
    check({"type": "string", "pattern": "^[a-z]+$"}, ["abc"], ["ab1", ""])
    check({"type": "string", "pattern": "[0-9]{3}"}, ["x123y", "123"], ["12"])
    check({"type": "string", "pattern": "^$|^a[0-9]$"}, ["", "a1", "a5"], ["x", "a", "a12", "xa1"])
    check({"type": "string", "pattern": "[|]|^(b|c)$"}, ["|", "x|y", "b", "c"], ["bc", "a"])
    with pytest.raises(ValueError, match=r"#/properties/p/pattern.*anchor"):
        js.JSONSchema({"properties": {"p": {"type": "string", "pattern": "a(^b)"}}}, TOK, host="never")


# ----------------------------------------------------------------------------- coverage


def test_additional_properties_default_allows_unlisted_properties_after_the_listed():
    check({"type": "object", "properties": {"a": {"type": "integer"}}},
          [{"a": 1}, {"a": 1, "b": "x"}, {"b": [1, 2]}, {}], [{"a": "x"}, Raw('{"a": 1, "a": "x"}')])
    check({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "string"}},
          [{"a": 1, "b": "x"}], [{"a": 1, "b": 2}])


def test_allof_merging_and_properties_beside_oneof():
    check({"allOf": [{"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}, "required": ["a"]},
                     {"properties": {"a": {"maximum": 9}, "b": {"type": "string"}}}]},
          [{"a": 0}, {"a": 9, "b": "x"}], [{"a": 10}, {"a": -1}, {"b": "x"}])
    check({"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"],
           "oneOf": [{"properties": {"kind": {"const": "a"}, "x": {"type": "integer"}}, "required": ["kind"]},
                     {"properties": {"kind": {"const": "b"}, "y": {"type": "string"}}, "required": ["kind"]}]},
          [{"id": 1, "kind": "a", "x": 2}, {"id": 1, "kind": "b", "y": "s"}], [{"id": 1}, {"id": 1, "kind": "c"}])
    with pytest.raises(ValueError, match=r"#/oneOf.*may both match"):
        js.JSONSchema({"oneOf": [{"type": "integer"}, {"type": "number"}]}, TOK, host="never")


def test_integer_bounds_are_exact():
    rng = random.Random(0)
    for lo, hi, lx, hx in [(0, None, False, False), (-17, 305, False, True), (None, -3, False, False),
                           (10, 10, False, False), (-1000, 999, True, True)]:
        schema = {"type": "integer"}
        if lo is not None:
            schema["exclusiveMinimum" if lx else "minimum"] = lo
        if hi is not None:
            schema["exclusiveMaximum" if hx else "maximum"] = hi
        c = js.JSONSchema(schema, TOK, host="never")
        values = list(range(-1100, 1100, 7)) + [lo or 0, hi or 0, (lo or 0) - 1, (hi or 0) + 1] + \
            [rng.randint(-10**12, 10**12) for _ in range(20)]
        for v in values:
            assert accepts(c, str(v)) == valid(schema, v), (schema, v)
        assert not accepts(c, "-0") and not accepts(c, "01")


def test_number_bounds_and_multiple_of():
    schema = {"type": "number", "exclusiveMinimum": 0, "maximum": 5}
    c = js.JSONSchema(schema, TOK, host="never")
    for text in ["0", "0.0", "0.5", "5", "5.0", "5.01", "4.999", "-1", "-0.5", "6", "0.000", "0.0001"]:
        assert accepts(c, text) == valid(schema, json.loads(text)), text
    m = {"type": "integer", "multipleOf": 7, "minimum": -30, "maximum": 100}
    c = js.JSONSchema(m, TOK, host="never")
    assert [v for v in range(-40, 120) if accepts(c, str(v))] == [v for v in range(-40, 120) if valid(m, v)]


def test_decimal_number_bounds_are_exact_and_exclusive_bounds_never_round_onto_the_bound():
    for schema in [{"type": "number", "minimum": 0.25}, {"type": "number", "exclusiveMinimum": 0.25, "maximum": 1.5},
                   {"type": "number", "minimum": -2.75, "exclusiveMaximum": -0.1},
                   {"type": "number", "exclusiveMinimum": 3.125, "exclusiveMaximum": 3.5}]:
        c = js.JSONSchema(schema, TOK, host="never")
        for i in ["0", "1", "3", "-0", "-2", "-3"]:
            for f in ["", ".1", ".099", ".25", ".250", ".2499", ".26", ".5", ".50001", ".125", ".1251", ".75", ".0"]:
                text = i + f
                if text.startswith("-0") and float(text) == 0:
                    continue  # "-0" is left out (never written), not wrong
                assert accepts(c, text) == valid(schema, json.loads(text)), (schema, text)
    c = js.JSONSchema({"type": "number", "exclusiveMinimum": 0}, TOK, host="never")
    assert accepts(c, "0.00000000000001") and not accepts(c, "0." + "0" * 400 + "1")  # that one is 0.0 as a float
    assert accepts(c, "1" + "0" * 40)  # integers are exact


def test_dependency_absent_key_is_not_written_as_an_extra_property():
    check({"type": "object", "dependentRequired": {"a": ["b"]}}, [{}, {"c": 1}, {"a": 1, "b": 2}], [{"a": 1}])


def test_one_of_exactly_one_branch_by_negation():
    check({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
           "oneOf": [{"required": ["a"]}, {"required": ["b"]}]},
          [{"a": 1}, {"b": 2}], [{}, {"a": 1, "b": 2}, {"a": "x"}])
    check({"oneOf": [{"type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"]},
                     {"type": "object", "properties": {"j": {"type": "object", "required": ["x"]}}, "required": ["j"]}]},
          [{"k": "s"}, {"j": {"x": 1}}, {"k": "s", "j": {}}, {"j": {"x": 1}, "k": 1}],  # listed order
          [{"k": "s", "j": {"x": 1}}, {}, {"k": 1}, 3, "s"])


def test_one_of_closed_branch_against_a_name_the_other_requires():
    schema = {"type": "object", "oneOf": [
        {"properties": {"e": {"type": "object"}}, "required": ["e"], "additionalProperties": False},
        {"properties": {"h": {"type": "string"}, "e": {}}, "required": ["h"], "additionalProperties": False}]}
    check(schema, [{"e": {}}, {"h": "x"}, {"h": "x", "e": 1}], [{}, {"e": 1}, {"h": 1, "e": {}}, {"h": 1}, 3])


def test_not_by_negation():
    check({"type": "object", "properties": {"a": {"type": "integer"}}, "not": {"required": ["a"]}},
          [{}, {"b": 1}], [{"a": 1}, 3])
    check({"not": {"not": {"type": "object", "properties": {"a": {"type": "string"}}}}},
          [{"a": "s"}, {}], [{"a": 1}, "s"])
    check({"type": "object", "properties": {"a": {}}, "not": {"properties": {"a": {"type": "string"}}}},
          [{"a": 1}, {"a": None}], [{"a": "s"}, {}])
    with pytest.raises(ValueError, match=r"#/not: only `not`"):
        js.JSONSchema({"type": "string", "not": {"pattern": "a"}}, TOK, host="never")


def test_one_of_for_the_host_engine_becomes_any_of_where_exact():
    from jaxsample._constraints import schema as S
    disjoint: dict = {}
    schema = {"type": "object", "properties": {"d": {"oneOf": [{"type": "array"}, {"type": "null"}]}},
              "oneOf": [{"required": ["a"]}, {"required": ["b"]}]}
    S.schema_node(schema, js._constraints.automaton.parse_regex(r"[ ]?"), None, disjoint)
    out = S.one_of_as_any_of(schema, disjoint)
    assert "oneOf" not in json.dumps(out)
    assert out["properties"]["d"] == {"anyOf": [{"type": "array"}, {"type": "null"}]}
    for v in [{"a": 1}, {"b": 1}, {"a": 1, "b": 1}, {}, {"a": 1, "d": None}, {"b": 1, "d": 3}, 5]:
        assert valid(out, v) == valid(schema, v), v


def test_large_schema_goes_to_the_host_engine_before_any_build(monkeypatch):
    pytest.importorskip("llguidance")
    from jaxsample._constraints import structured as ST
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 40} for i in range(30)},
           "required": [f"p{i}" for i in range(30)], "additionalProperties": False}
    monkeypatch.setattr(ST, "_table", lambda *a, **k: pytest.fail("the device build ran"))
    c = js.JSONSchema(big, TOK)
    assert isinstance(c, js.HostJSONSchema)
    text = "{" + ", ".join(f'"p{i}": "x"' for i in range(30)) + "}"
    assert c.accepts(list(text.encode())) and not c.accepts(list(text.replace('"x"', "1", 1).encode()))


def test_build_deadline_sends_a_slow_build_to_the_host_engine(monkeypatch):
    pytest.importorskip("llguidance")
    from jaxsample._constraints import structured as ST
    schema = {"type": "object", "properties": {"deadline_probe": {"type": "string", "maxLength": 3}}}
    monkeypatch.setattr(ST, "AUTO_BUILD_SECONDS", 0.0)  # every DFA state is past the deadline
    assert isinstance(js.JSONSchema(schema, TOK), js.HostJSONSchema)
    assert isinstance(js.JSONSchema(schema, TOK, host="never"), js.Constraint)  # no deadline there


def test_min_max_properties_pattern_properties_unique_items_not():
    check({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
           "minProperties": 1, "maxProperties": 1, "additionalProperties": False},
          [{"a": 1}, {"b": 2}], [{}, {"a": 1, "b": 2}])
    check({"type": "object", "patternProperties": {"^x-": {"type": "integer"}, "^y-": {"type": "string"}},
           "additionalProperties": False},
          [{"x-a": 1}, {"y-b": "s"}, {"x-a": 1, "y-": "t"}], [{"x-a": "s"}, {"z": 1}, {"y-a": 1}])
    check({"type": "array", "items": {"enum": ["a", "b", "c"]}, "uniqueItems": True},
          [["a"], ["c", "a"], ["a", "b", "c"], []], [["a", "a"], ["b", "c", "b"]])
    check({"type": ["string", "null", "integer"], "not": {"type": "null"}}, ["x", 1], [None])
    check({"enum": ["a", "b", "c"], "not": {"const": "b"}}, ["a", "c"], ["b"])


def test_formats():
    check({"type": "string", "format": "uuid"}, ["123e4567-e89b-12d3-a456-426614174000"], ["123e4567e89b12d3"])
    check({"type": "string", "format": "ipv4"}, ["192.168.0.1", "0.0.0.0"], ["256.1.1.1", "01.2.3.4", "1.2.3"])
    check({"type": "string", "format": "ipv6"}, ["::1", "fe80::1:2", "1:2:3:4:5:6:7:8"], ["1:2:3", ":::"])
    check({"type": "string", "format": "email"}, ["a.b@example.com"], ["ab", "a@b"])
    check({"type": "string", "format": "uri"}, ["https://example.com/a?b=c#d"], ["example", "http//x"])


def test_pydantic_model_class():
    pydantic = pytest.importorskip("pydantic")

    class Item(pydantic.BaseModel):
        name: str
        count: pydantic.conint(ge=0)

    c = js.JSONSchema(Item, TOK, host="never")
    assert accepts(c, '{"name": "x", "count": 3}') and not accepts(c, '{"name": "x", "count": -3}')


def test_refusals_name_the_keyword_and_path():
    for schema, match in [
        ({"type": "array", "contains": {"type": "integer"}}, r"#/contains"),
        ({"properties": {"a": {"type": "number", "multipleOf": 0.5}}}, r"#/properties/a/multipleOf"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, r"#/uniqueItems"),
        ({"$ref": "https://example.com/x.json"}, r"#/\$ref"),
        ({"type": "string", "format": "idn-hostname"}, r"#/format"),
        ({"properties": {"a": {"if": {"type": "string"}}}}, r"#/properties/a/if"),
    ]:
        with pytest.raises(ValueError, match=match):
            js.JSONSchema(schema, TOK, host="never")


def test_cache_returns_the_same_constraint():
    s = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert js.JSONSchema(s, TOK) is js.JSONSchema(json.dumps(s), TOK)


# ----------------------------------------------------------------------------- property test


def _random_schema(rng: random.Random, depth: int = 0):
    kinds = ["integer", "number", "string", "boolean", "null", "enum"] + (["array", "object", "oneOf"] if depth < 2 else [])
    k = rng.choice(kinds)
    if k == "integer":
        s = {"type": "integer"}
        if rng.random() < 0.6:
            s["minimum"] = rng.randint(-20, 20)
        if rng.random() < 0.6:
            s["maximum"] = rng.randint(-20, 40)
        return s
    if k == "string":
        s = {"type": "string"}
        r = rng.random()
        if r < 0.3:
            s["maxLength"] = rng.randint(0, 4)
        elif r < 0.5:
            s["minLength"] = rng.randint(1, 3)
        elif r < 0.7:
            s["pattern"] = rng.choice(["^a", "b$", "[0-9]", "^x[yz]*$"])
        elif r < 0.8:
            s["format"] = "date"
        return s
    if k == "number":
        s = {"type": "number"}
        for kw in rng.sample(["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"], rng.randint(1, 2)):
            s[kw] = rng.choice([0, 1, -1, 0.25, -0.5, 2.75, 0.1])
        return s
    if k == "oneOf":
        return {"type": "object", "properties": {"a": {"type": "integer"}, "b": {}, "c": {"type": "integer"}},
                "oneOf": [{"required": [n]} for n in rng.sample(["a", "b", "c"], 2)]}
    if k == "enum":
        return {"enum": rng.sample(["a", "b", 1, 2.5, None, True, [1], {"k": 1}], rng.randint(1, 3))}
    if k in ("boolean", "null"):
        return {"type": k}
    if k == "array":
        s = {"type": "array", "items": _random_schema(rng, depth + 1)}
        if rng.random() < 0.5:
            s["maxItems"] = rng.randint(0, 3)
        if rng.random() < 0.3:
            s["minItems"] = rng.randint(0, 2)
        return s
    names = rng.sample(["a", "b", "c", "d"], rng.randint(1, 3))
    s = {"type": "object", "properties": {n: _random_schema(rng, depth + 1) for n in names}}
    s["required"] = [n for n in names if rng.random() < 0.5]
    if rng.random() < 0.3:  # the trigger and the dependency may be unlisted
        s["dependentRequired"] = {rng.choice(["a", "e"]): [rng.choice(["b", "f"])]}
    r = rng.random()
    if r < 0.4:
        s["additionalProperties"] = False
    elif r < 0.6:
        s["additionalProperties"] = {"type": "integer"}
    return s


def _random_value(rng: random.Random, schema, depth: int = 0):
    """Usually close to the schema (so that both valid and invalid instances come up)."""
    if rng.random() < 0.15 or depth > 3:
        return rng.choice([0, -3, 17, "a", "", "2020-02-29", "x1z", None, True, [], {}, 2.5, "b"])
    if "enum" in schema:
        return rng.choice(schema["enum"])
    t = schema.get("type")
    if t == "integer":
        return rng.randint(-25, 45)
    if t == "number":
        return rng.choice([0, 1, -1, 0.25, 0.26, 0.24, -0.5, -0.49, 2.75, 2.7501, 0.1, 0.10001, 3, -2])
    if "oneOf" in schema:
        return {n: rng.choice([1, "x"]) for n in ["a", "b", "c"] if rng.random() < 0.5}
    if t == "string":
        return rng.choice(["", "a", "ab", "abc1", "b", "xyz", "x", "2021-02-29", "2020-02-29", "1999-12-31", "zzzzz"])
    if t == "boolean":
        return rng.random() < 0.5
    if t == "null":
        return None
    if t == "array":
        return [_random_value(rng, schema["items"], depth + 1) for _ in range(rng.randint(0, 4))]
    out = {}
    for n, sub in schema["properties"].items():
        if n in schema.get("required", []) or rng.random() < 0.6:
            out[n] = _random_value(rng, sub, depth + 1)
    if rng.random() < 0.3:
        out[rng.choice(["e", "f"])] = rng.choice([1, "s", None])
    return out


@pytest.mark.parametrize("seed", range(4))
def test_random_schemas_accept_exactly_the_valid_instances(seed):
    rng = random.Random(seed)
    for _ in range(6):
        schema = _random_schema(rng)
        c = js.JSONSchema(schema, TOK, host="never")
        for _ in range(25):
            v = _random_value(rng, schema)
            assert accepts(c, dumps(v)) == valid(schema, v), (schema, v)


# ----------------------------------------------------------------------------- MaskBench sample

def _maskbench() -> Path:
    """../shared/maskbench/data from the repository root (the main checkout's, in a git worktree)."""
    root = Path(__file__).resolve().parent.parent
    here = root.parent / "shared" / "maskbench" / "data"
    git = root / ".git"
    if not here.is_dir() and git.is_file() and git.read_text().startswith("gitdir:"):
        main = Path(git.read_text().split(":", 1)[1].strip()).parent.parent.parent
        return main.parent / "shared" / "maskbench" / "data"
    return here


MASKBENCH = _maskbench()


@pytest.mark.skipif(not MASKBENCH.is_dir(), reason="../shared/maskbench is not there")
def test_maskbench_sample_never_accepts_an_invalid_instance():
    files = sorted(MASKBENCH.glob("*.json"))[::40][:12]
    for f in files:
        d = json.loads(f.read_text(encoding="utf-8"))
        try:
            c = js.JSONSchema(d["schema"], TOK, host="never")
        except ValueError:
            continue  # refused (named) is allowed; accepting an invalid instance is not
        for t in d["tests"]:
            if not t["valid"]:
                assert not accepts(c, dumps(t["data"])), (f.name, t["data"])


# ----------------------------------------------------------------------------- host engine


def test_recursive_schema_goes_to_the_host_engine_and_still_refuses_keywords():
    pytest.importorskip("llguidance")
    tree = {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                               "required": ["v"], "additionalProperties": False}}, "$ref": "#/$defs/node"}
    c = js.JSONSchema(tree, TOK)
    assert isinstance(c, js.HostJSONSchema)
    assert c.accepts(list(b'{"v": 1, "kids": [{"v": 2, "kids": []}]}'))
    assert not c.accepts(list(b'{"v": 1, "kids": [{"w": 2}]}')) and not c.accepts(list(b'{"v": 1'))
    with pytest.raises(ValueError, match="not regular"):
        js.JSONSchema(tree, TOK, host="never")
    bad = json.loads(json.dumps(tree))
    bad["$defs"]["node"]["properties"]["v"]["multipleOf"] = 0.3
    with pytest.raises(ValueError, match=r"properties/v/multipleOf"):  # checked beyond the recursion too
        js.JSONSchema(bad, TOK)


def test_json_key_is_equal_exactly_when_json_values_are_the_same():
    import itertools

    from jaxsample._constraints.schema import _json_key, _same

    values = [1, 1.0, True, False, 0, 0.0, -0.0, 1.5, None, "1", "a", [], [1], [1.0], [True], [1, 2], [2, 1],
              {}, {"a": 1}, {"a": 1.0}, {"a": True}, {"b": 1}, {"a": [1, {"b": None}]}, {"a": [1.0, {"b": None}]}]
    for a, b in itertools.product(values, values):
        assert (_json_key(a) == _json_key(b)) == _same(a, b), (a, b)
