"""Ternary kernels, found through the `edgebit.backends` entry-point group.

A third-party package ships a faster kernel by subclassing `Backend` and declaring
`[project.entry-points."edgebit.backends"] myname = "mypkg.module:MyBackend"`.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points

from .base import Backend

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edgebit.backends"
_BUILTIN = {"reference": "edgebit.backends.reference:ReferenceBackend"}


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


def get_backend(name: str | None = None, threads: int | None = None) -> Backend:
    """Instantiate a backend by name (`None`: `EDGEBIT_BACKEND`, else the default)."""
    name = name or os.environ.get("EDGEBIT_BACKEND") or "reference"
    backends = available_backends()
    if name not in backends:
        raise ValueError(f"unknown backend {name!r}; installed backends: {', '.join(sorted(backends))}")
    cls = backends[name]
    ok, why = cls.supported()
    if not ok:
        raise ValueError(f"backend {name!r} cannot run on this machine: {why}")
    return cls(threads=threads)


__all__ = ["Backend", "available_backends", "get_backend", "ENTRY_POINT_GROUP"]
