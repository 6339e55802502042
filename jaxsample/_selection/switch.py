"""The kernel switch: whether the sampling path uses the Pallas GPU kernels (docs/kernels.md).

Two ways to set it, the second winning over the first:

* the environment variable ``JAXSAMPLE_KERNELS``: ``auto`` (the default: the kernels on
  a GPU, the pure-JAX path elsewhere), ``0`` / ``off`` (never: the pure-JAX path on
  every backend) or ``1`` / ``on`` (always: on a GPU the kernels, elsewhere the same
  kernels in the Pallas interpreter, slow, for tests);
* :class:`use_kernels` (``True`` / ``False`` / ``"auto"``): a process-wide setting, or
  a ``with`` block that restores the previous one.

The setting is read when a function is traced. :class:`use_kernels` is part of
``jax.jit``'s cache key (``jax.make_user_context``), so a jitted function traces again
when it changes; the environment variable is meant to be set before the process starts.
"""

from __future__ import annotations

import os
from typing import Any

import jax

__all__ = ["ENV", "HINT", "KernelError", "kernels_mode", "use_kernels"]

#: The environment variable of the switch.
ENV = "JAXSAMPLE_KERNELS"
#: What every kernel failure says.
HINT = (f"to run the pure-JAX path instead, set {ENV}=0 in the environment or call "
        f"jaxsample.use_kernels(False) (docs/kernels.md)")

_MODES = {"auto": "auto", "1": "on", "on": "on", "true": "on", "0": "off", "off": "off",
          "false": "off"}


class KernelError(RuntimeError):
    """A Pallas GPU kernel of jaxsample failed (tracing, lowering, compiling, running or its
    self-check); the message says how to turn the kernels off."""


def _parse(value: Any, where: str) -> str:
    if value is None or value is True or value is False:
        return {None: "auto", True: "on", False: "off"}[value]
    mode = _MODES.get(str(value).strip().lower()) if isinstance(value, str) else None
    if mode is None:
        raise ValueError(f"{where} must be one of 0/off, 1/on, auto (or True/False/None for "
                         f"use_kernels), got {value!r}")
    return mode


# None: follow the environment variable. Part of jax.jit's cache key where jax has it.
_make = getattr(jax, "make_user_context", None)
_CONTEXT = _make(None) if _make is not None else None
_GLOBAL: list[str | None] = [None]  # (jax without make_user_context)


def _get() -> str | None:
    return _CONTEXT.value if _CONTEXT is not None else _GLOBAL[0]


def _set(mode: str | None) -> None:
    if _CONTEXT is not None:
        _CONTEXT.set_global(mode)
    else:
        _GLOBAL[0] = mode


def kernels_mode() -> str:
    """The switch now: ``"on"``, ``"off"`` or ``"auto"`` (:class:`use_kernels` if set,
    else ``JAXSAMPLE_KERNELS``, else ``"auto"``)."""
    mode = _get()
    return mode if mode is not None else _parse(os.environ.get(ENV, "auto"), ENV)


class use_kernels:
    """Turns jaxsample's Pallas GPU kernels on or off, for the process or for a block.

    Off, every filter and the sampling step run the pure-JAX path (XLA compare-and-count
    radix selection, no Pallas), which is what a TPU runs; on, a GPU runs the kernels
    (and the fused default-chain step) and any other backend runs them in the Pallas
    interpreter. Overrides the ``JAXSAMPLE_KERNELS`` environment variable.

    Args:
      enabled: ``True`` (on), ``False`` (off) or ``"auto"`` / ``None`` (the kernels on a
        GPU only; with ``None`` the environment variable decides again).

    Example:
      >>> import jax.numpy as jnp, jaxsample as js
      >>> with js.use_kernels(False):  # this block: the pure-JAX path
      ...     out = js.top_p(jnp.array([[1.0, 2.0, 3.0]]), 0.5)
      >>> _ = js.use_kernels(None)     # process-wide: back to JAXSAMPLE_KERNELS
    """

    def __init__(self, enabled: Any = True):
        mode = None if enabled is None else _parse(enabled, "use_kernels(enabled)")
        self._previous = _get()
        _set(mode)

    def __enter__(self) -> "use_kernels":
        return self

    def __exit__(self, *exc: Any) -> None:
        _set(self._previous)
