"""Ternary kernels, found through the `edgebit.backends` entry-point group.

A third-party package ships a faster kernel by subclassing `Backend` and declaring
`[project.entry-points."edgebit.backends"] myname = "mypkg.module:MyBackend"`. Built in:
`float32` (4 bytes/weight, fastest with plenty of memory), `dense` (int8, 1 byte/weight),
`packed` (the file's 2-bit codes, for small memory), `lut` (base-3 codes and lookup tables, the
smallest form), `reference`, and `numba` (compiled kernels over the file's 2-bit codes, the fastest,
with the optional `fast` extra). Without a name, `get_backend` chooses for this machine
(`select.choose_backend`).
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points

from .base import Backend

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edgebit.backends"
_BUILTIN = {
    "reference": "edgebit.backends.reference:ReferenceBackend",
    "dense": "edgebit.backends.dense:DenseBackend",
    "packed": "edgebit.backends.packed:PackedBackend",
    "lut": "edgebit.backends.lut:LUTBackend",
    "float32": "edgebit.backends.float32:Float32Backend",
    "numba": "edgebit.backends.compiled:NumbaBackend",
}


def available_backends() -> dict[str, type[Backend]]:
    """All installed backends by name; a plugin that fails to import is logged and skipped."""
    found: dict[str, type[Backend]] = {}
    specs = dict(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        specs[ep.name] = ep.value
    for name, spec in specs.items():
        module, _, attr = spec.partition(":")
        try:
            mod = __import__(module, fromlist=[attr])
            cls = getattr(mod, attr)
        except Exception as exc:  # a broken plugin must not break edgebit
            log.warning("backend %r (%s) could not be loaded: %s", name, spec, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            log.warning("backend %r (%s) is not a subclass of edgebit.backends.Backend; ignored", name, spec)
            continue
        found[name] = cls
    return found


def get_backend(name: str | None = None, threads: int | None = None,
                shapes: list[tuple[int, int]] | None = None, extra_bytes: int = 0) -> Backend:
    """Instantiate a backend by name; `None` (or "auto"): `EDGEBIT_BACKEND`, else the automatic choice
    for this machine and a model with ternary weights of `shapes` plus `extra_bytes` of other memory."""
    name = name or os.environ.get("EDGEBIT_BACKEND") or "auto"
    backends = available_backends()
    if name == "auto":
        from .select import choose_backend

        choice = choose_backend(shapes or [], threads, extra_bytes, backends=backends)
        log.info("backend %r: %s", choice.backend, choice.reason)
        name = choice.backend
    if name not in backends:
        raise ValueError(f"unknown backend {name!r}; installed backends: {', '.join(sorted(backends))}")
    cls = backends[name]
    ok, why = cls.supported()
    if not ok:
        raise ValueError(f"backend {name!r} cannot run on this machine: {why}")
    return cls(threads=threads)


__all__ = ["Backend", "available_backends", "get_backend", "ENTRY_POINT_GROUP"]
