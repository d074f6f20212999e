"""The optional compiled kernels (`pip install 'edgebit[fast]'`): imported once, and why not if they can't be.

numba is an optional extra: a machine without it (a 32-bit Pi, a minimal install) keeps the numpy
kernels, and everything that could use the compiled ones asks here first.
"""

from __future__ import annotations

import logging
import time
from functools import cache
from types import ModuleType
from typing import Any

import numpy as np

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


def read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view: the kernels are compiled for read-only inputs (memory-mapped file pages), so
    every array they read is passed this way and no second signature gets compiled."""
    view = a.view()
    view.flags.writeable = False
    return view


def status() -> dict[str, Any]:
    """What `edgebit doctor` reports: whether the kernels are installed, and whether their compiled
    code was already cached for this CPU (this call compiles what was not, so the next load is fast)."""
    fast = kernels()
    if fast is None:
        return {"available": False, "reason": unavailable_reason(), "install": INSTALL_HINT}
    import numba
    from llvmlite.binding import get_host_cpu_name

    start = time.perf_counter()
    fast.compile_all()
    return {"available": True, "numba": numba.__version__, "cache_dir": str(numba.config.CACHE_DIR),
            "kernels": len(fast.SIGNATURES), "cached": fast.cache_hits(), "seconds": time.perf_counter() - start,
            "threading_layer": numba.config.THREADING_LAYER,
            "llvm_cpu": numba.config.CPU_NAME or get_host_cpu_name(),
            "wide_vectors": fast.WIDE_VECTORS}
