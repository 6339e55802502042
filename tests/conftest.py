"""Test setup: the repo root and ``tests/`` importable, one compilation cache per run."""

import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

# One XLA compilation cache for the whole run, shared by its processes (pytest-xdist's
# workers and the scripts the tests start): a program compiled once is loaded, not compiled
# again, when another module, worker or subprocess needs it (the in-memory jit caches are
# cleared after every module, below). Set before jax is imported, and inherited by every
# child process. A fresh directory each run (removed at the end), so every run compiles
# what it runs at least once; JAXSAMPLE_TEST_COMPILE_CACHE=DIR keeps one across runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _kept = os.environ.get("JAXSAMPLE_TEST_COMPILE_CACHE")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _kept or tempfile.mkdtemp(prefix="jaxsample-tests-xla-")
    os.environ["JAXSAMPLE_TEST_COMPILE_CACHE_OWNER"] = "" if _kept else str(os.getpid())
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The tests' programs are tiny, so their time is XLA's compile time, not the programs': run
# XLA:CPU's backend (LLVM) at optimisation level 0, which compiles about a third faster.
# The same HLO passes run (sharding, fusion), so the tests check the same programs; only
# the machine code is less optimised. Set before jax is imported; children inherit it.
# JAXSAMPLE_TEST_XLA_OPT=1 keeps XLA's default level.
if os.environ.get("JAXSAMPLE_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

_TESTS = os.path.dirname(os.path.abspath(__file__))
for _path in (_TESTS, os.path.dirname(_TESTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)


import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free each test module's compiled programs when it ends.

    XLA:CPU maps a few memory regions for every program it compiles; the whole suite in one
    process compiles enough of them to reach the kernel's limit (vm.max_map_count, 65530 by
    default), where the compiler segfaults. Clearing jit caches between modules keeps the
    process far below it.
    """
    yield
    jax.clear_caches()
    gc.collect()


def pytest_unconfigure(config):
    """The run's own compilation cache goes when the process that made it ends."""
    if os.environ.get("JAXSAMPLE_TEST_COMPILE_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_runtest_logreport(report):
    """JAXSAMPLE_TEST_TIMES=FILE appends each test phase's duration to FILE as it ends (a
    JSON line; readable while the run goes on, unlike --durations)."""
    path = os.environ.get("JAXSAMPLE_TEST_TIMES")
    if path and getattr(report, "node", None) is None:  # not the xdist controller's copy of a worker's report
        with open(path, "a") as fh:
            fh.write(json.dumps(dict(test=report.nodeid, when=report.when, seconds=round(report.duration, 3),
                                     outcome=report.outcome, end=time.time())) + "\n")


# ----------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def hf():
    """``(torch, transformers)``, single-threaded; skips the test when either is missing."""
    torch = pytest.importorskip("torch", reason="torch not installed (pip install '.[test]')")
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install '.[test]')")
    torch.set_num_threads(1)
    return torch, transformers


@pytest.fixture(scope="module")
def target():
    """The speculative-decoding target: a random tiny decoder with weights scaled by 3, so
    its greedy output varies with some repeats (an unscaled random model repeats one
    token: every draft would be accepted)."""
    from models import DecoderLM, preset

    lm = DecoderLM.random(preset("tiny"), jax.random.key(0))
    return DecoderLM(jax.tree.map(lambda x: x * 3.0, lm.params), lm.config)


_SLOW_LIST = os.path.join(_TESTS, "slow_tests.txt")


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the marks
def pytest_collection_modifyitems(config, items):
    """Marks `slow` the tests listed in tests/slow_tests.txt (measured costs, see its header)."""
    with open(_SLOW_LIST) as fh:
        listed = {line.strip() for line in fh if line.strip() and not line.startswith("#")}
    for item in items:
        if item.nodeid in listed:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A small byte-level BPE trained on a few lines; ids 0..3 are the special tokens."""
    pytest.importorskip("tokenizers")
    from helpers import BPE_TEXTS, train_bpe

    return pathlib.Path(train_bpe(tmp_path_factory.mktemp("hf"), BPE_TEXTS * 20, 400))
