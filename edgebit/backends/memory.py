"""Giving back the file pages a backend has copied out of the memory-mapped model.

Reading a tensor through the GGUF memory map makes its pages part of the process's resident set.
A backend that expands the weights into its own arrays (dense int8, LUT codes) no longer needs
those pages, and keeping them would count the model twice against a small device's RAM. For a
read-only file mapping MADV_DONTNEED only drops the page-table entries: the data stays in the
page cache and is faulted back in if anything reads it again, so this is safe to do.
"""

from __future__ import annotations

import mmap

import numpy as np


def _mapping_of(array: np.ndarray) -> mmap.mmap | None:
    """The mmap object an array is a view of, if any."""
    base: object = array
    while True:
        if isinstance(base, mmap.mmap):
            return base
        if isinstance(base, np.ndarray):
            base = base.base
        elif isinstance(base, memoryview):
            base = base.obj
        else:
            return None


def release_file_pages(array: np.ndarray) -> int:
    """Drop this view's whole pages of a read-only file mapping from the resident set; bytes released.

    Arrays that are not views of an mmap are left alone (advising anonymous memory would zero it).
    """
    mapping = _mapping_of(array)
    if mapping is None or not hasattr(mapping, "madvise") or array.nbytes == 0:
        return 0
    start = array.ctypes.data - np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data
    page = mmap.PAGESIZE
    lo = -(-start // page) * page
    hi = (start + array.nbytes) // page * page
    if hi <= lo:
        return 0
    mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    return hi - lo
