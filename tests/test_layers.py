"""The library's layers import one way only (README "Code layout", docs/architecture.md).

Read from the source with `ast` (nothing is imported): every `import` in `jaxsample/`,
at module level or inside a function, is an edge of the import graph. The same reading
checks the test suite's own rule: test modules share code through tests/helpers.py, never
by importing each other.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIB = ROOT / "jaxsample"

#: Layer of each part of the library: a module may import its own layer or lower ones.
LAYERS = {
    "jaxsample._validation": 0,
    "jaxsample._files": 0,
    "jaxsample._selection": 1,
    "jaxsample._filters": 2,
    "jaxsample._processors": 3,
    "jaxsample._constraints": 3,
    "jaxsample._step": 4,
    "jaxsample._decoding": 5,
    "jaxsample._sharding": 6,
    "jaxsample": 7,  # __init__.py: the public API
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def imports(path: pathlib.Path):
    """(imported module, line, nested in a function) for every import of a file."""
    tree = ast.parse(path.read_text())
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in nested
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            for alias in node.names:  # `from jaxsample._x import y` may name a submodule y
                full = f"{base}.{alias.name}"
                yield (full if (ROOT / (full.replace(".", "/") + ".py")).exists() else base), node.lineno, \
                    id(node) in nested


FILES = sorted(LIB.rglob("*.py"))
GRAPH = {module_name(f): [(m, line, lazy) for m, line, lazy in imports(f)] for f in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_goes_to_the_same_or_a_lower_layer(path):
    me = module_name(path)
    for target, line, _ in GRAPH[me]:
        if target.startswith("jaxsample.") or target == "jaxsample":
            if target == "jaxsample" and me != "jaxsample":
                pytest.fail(f"{path.name}:{line} imports the public package from inside the library")
            assert layer(target) <= layer(me), f"{me}:{line} (layer {layer(me)}) imports {target} " \
                                               f"(layer {layer(target)})"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_lazy_library_import_and_never_models(path):
    me = module_name(path)
    for target, line, lazy in GRAPH[me]:
        assert target.split(".")[0] != "models", f"{me}:{line}: the library never imports models ({target})"
        assert not (lazy and target.startswith("jaxsample")), \
            f"{me}:{line}: a function-level import of {target} (imports are module-level, one way)"


def test_the_import_graph_has_no_cycle():
    edges = {m: {t for t, _, _ in deps if t in GRAPH and t != m} for m, deps in GRAPH.items()}
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = "closed"

    for m in sorted(edges):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("folder", ["models", "scripts"])
def test_models_and_scripts_use_only_public_names(folder):
    import jaxsample

    public = set(jaxsample.__all__)
    for path in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxsample"):
                assert node.module == "jaxsample", f"{where}: imports {node.module} (private)"
                assert {a.name for a in node.names} <= public, f"{where}: not in jaxsample.__all__"
            elif isinstance(node, ast.Import):
                assert all(a.name == "jaxsample" for a in node.names if a.name.startswith("jaxsample")), where


def test_test_modules_never_import_each_other():
    """Shared test code lives in tests/helpers.py (and the reference implementation in
    tests/reference.py), shared fixtures in tests/conftest.py: no file of tests/ imports a
    test module or conftest, at module level or inside a function."""
    tests = ROOT / "tests"
    forbidden = {p.stem for p in tests.glob("*.py") if p.stem.startswith("test_") or p.stem == "conftest"}
    found = {f"tests/{path.name}:{line} imports {target}"
             for path in tests.glob("*.py") for target, line, _ in imports(path)
             if target.removeprefix("tests.").split(".")[0] in forbidden}
    assert not found, "move what they share into tests/helpers.py or conftest.py:\n" + "\n".join(sorted(found))
