"""Files written whole or not at all (layer 0: no other part of the library).

:func:`atomic_file` is the one way the library writes a file (`jaxsample.NGramDraft.save`);
the example models (``models/checkpoint.py``) use it through its public name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

__all__ = ["atomic_file"]


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yields a temporary path next to ``path`` to write: the file appears whole or not at all.

    On a clean exit the temporary file is given the usual permissions (``0o666`` less the
    process umask; ``mkstemp`` makes ``0o600`` files), fsynced and renamed to ``path``
    (replacing it); on any error it is removed and ``path`` is left as it was.

    Example:
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "out.txt")
      >>> with atomic_file(path) as tmp, open(tmp, "w") as f:
      ...     _ = f.write("all or nothing")
      >>> open(path).read()
      'all or nothing'
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0o022)  # read the umask (it can only be read by setting it)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
