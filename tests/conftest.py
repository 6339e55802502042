"""Test setup: make ``tests/`` (for ``reference``) and the repo root importable."""

import os
import sys

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
