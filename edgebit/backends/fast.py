"""The optional compiled kernels (`pip install 'edgebit[fast]'`): imported once, and why not if they can't be.

numba is an optional extra: a machine without it (a 32-bit Pi, a minimal install) keeps the numpy
kernels, and everything that could use the compiled ones asks here first.
"""

from __future__ import annotations

import logging
from functools import cache
from types import ModuleType

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'edgebit[fast]'"


@cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        from . import numba_kernels
    except ImportError as exc:
        return None, f"numba is not installed ({exc.name or exc}); {INSTALL_HINT} adds compiled kernels"
    except Exception as exc:  # a broken numba/llvmlite install must not break edgebit
        log.warning("the compiled kernels could not be loaded: %s", exc)
        return None, f"numba failed to load: {exc}"
    return numba_kernels, ""


def kernels() -> ModuleType | None:
    """The `numba_kernels` module, or None when numba is missing or broken."""
    return _load()[0]


def unavailable_reason() -> str:
    """Why `kernels()` is None ("" when the kernels are available)."""
    return _load()[1]
