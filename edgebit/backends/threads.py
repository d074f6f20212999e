"""Threads for long products (the LM head) and the thread count of the BLAS library.

numpy releases the GIL inside casts and BLAS calls, so Python threads that each work on their own
slice of rows run on separate cores — efficiently only when each call is long (milliseconds), as
in the LM head; the ternary kernels' cache-sized calls use processes instead (`lanes`). Either
way the BLAS library is kept single-threaded: an OpenBLAS that threads each call on its own would
oversubscribe the cores, and its idle threads spin for a while after every call, stealing cycles
from the next kernel. The library is found among the shared objects this process has loaded and
driven through ctypes (no extra dependency).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache

from .machine import available_cpus

log = logging.getLogger(__name__)

# (setter, getter) symbol names of the thread count, for the OpenBLAS builds numpy ships with.
_OPENBLAS_SYMBOLS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)


def _loaded_libraries(maps: str = "/proc/self/maps") -> list[str]:
    """Paths of the shared objects mapped into this process."""
    paths: list[str] = []
    try:
        with open(maps, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ""
                if ".so" in path and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    return paths


class BlasThreads:
    """Get and set the thread count of the BLAS library numpy uses (OpenBLAS), if it can be found."""

    def __init__(self) -> None:
        self._set: Callable[[int], object] | None = None
        self._get: Callable[[], int] | None = None
        self.library = ""
        for path in _loaded_libraries():
            if "blas" not in path.lower():
                continue
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for setter, getter in _OPENBLAS_SYMBOLS:
                if hasattr(lib, setter) and hasattr(lib, getter):
                    self._set, self._get, self.library = getattr(lib, setter), getattr(lib, getter), path
                    self._set.argtypes, self._get.restype = [ctypes.c_int], ctypes.c_int
                    return

    @property
    def found(self) -> bool:
        return self._set is not None

    def get(self) -> int | None:
        return int(self._get()) if self._get is not None else None

    def set(self, n: int) -> bool:
        """Set the library's thread count; False if no controllable library was found."""
        if self._set is None:
            return False
        if self.get() != n:
            self._set(int(n))
        return True


@cache
def blas_threads() -> BlasThreads:
    """The process's BLAS thread control (looked up once; numpy must already be imported)."""
    control = BlasThreads()
    if not control.found:
        log.info("no OpenBLAS thread control found; BLAS calls use the library's own thread count")
    return control


class Workers:
    """`threads` lanes that run one function over disjoint row ranges; the calling thread is one lane."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = max(1, threads or available_cpus())
        self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="edgebit") if self.threads > 1 else None
        self._lock = threading.Lock()  # one parallel section at a time (the pool is shared)
        blas_threads().set(1)

    def split(self, n: int, align: int = 1, min_rows: int = 1) -> list[tuple[int, int]]:
        """Cut range(n) into at most `threads` contiguous parts, inner boundaries multiples of `align`,
        none smaller than `min_rows` (so small products are not split at all)."""
        parts = max(1, min(self.threads, n // max(min_rows, 1)))
        cuts = [0]
        for i in range(1, parts):
            cut = (n * i // parts) // align * align
            if cut > cuts[-1]:
                cuts.append(cut)
        cuts.append(n)
        return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]

    def run(self, fn: Callable[[int, int, int], None], n: int, align: int = 1, min_rows: int = 1) -> None:
        """Call fn(lane, start, stop) on each part of range(n), in parallel; exceptions propagate."""
        parts = self.split(n, align, min_rows)
        if len(parts) == 1 or self._pool is None:
            for lane, (a, b) in enumerate(parts):
                fn(lane, a, b)
            return
        with self._lock:
            futures = [self._pool.submit(fn, lane, a, b) for lane, (a, b) in enumerate(parts) if lane]
            try:
                fn(0, *parts[0])
            finally:
                for future in futures:
                    future.result()
