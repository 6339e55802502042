"""Test setup: make ``tests/`` (for ``reference``) and the repo root importable."""

import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
for _path in (_TESTS, os.path.dirname(_TESTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
