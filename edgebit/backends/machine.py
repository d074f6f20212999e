"""What a kernel choice needs to know about this machine: CPU architecture and features, cores, memory.

Read from /proc, /sys/fs/cgroup and the `platform` module only (no extra dependency). Every reader
degrades to "unknown" (None / empty) off Linux, and callers treat unknown as "no constraint".
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Machine:
    """The facts backends and the automatic choice look at."""

    arch: str  # platform.machine(): x86_64, aarch64, armv7l, ...
    cpu_model: str
    features: frozenset[str]  # /proc/cpuinfo "flags" (x86) or "Features" (ARM), lower case
    cpus: int  # cores this process may run on
    mem_total: int | None  # bytes
    mem_available: int | None  # bytes a new allocation can get without swapping (MemAvailable, cgroup limit)

    @property
    def is_arm(self) -> bool:
        return self.arch.startswith(("arm", "aarch"))

    def has(self, *features: str) -> bool:
        """Whether the CPU reports every one of `features` (e.g. "avx2", "neon"/"asimd")."""
        return all(f.lower() in self.features for f in features)

    def fingerprint(self) -> str:
        """A short id of the CPU and numpy build: probe results are only valid on the same pair."""
        text = "|".join([self.arch, self.cpu_model, ",".join(sorted(self.features)), str(self.cpus),
                         np.__version__])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo as {key: bytes}; empty if unreadable."""
    info: dict[str, int] = {}
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if fields and fields[0].isdigit():
                    info[key] = int(fields[0]) * (1024 if fields[1:2] == ["kB"] else 1)
    except OSError:
        pass
    return info


def read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(model name, feature flags) of the first CPU in /proc/cpuinfo."""
    model, flags = "", frozenset()
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = frozenset(value.lower().split())
    except OSError:
        pass
    return model or platform.processor(), flags


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_headroom(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes left under this process's cgroup memory limit (containers), or None without a limit.

    cgroup v2 ("0::/path": memory.max, memory.current) and v1 ("N:memory:/path":
    memory.limit_in_bytes, memory.usage_in_bytes; "no limit" is a huge number) are both read.
    """
    try:
        with open(proc_cgroup, encoding="utf-8") as fh:
            lines = [line.strip().split(":", 2) for line in fh if line.count(":") >= 2]
    except OSError:
        return None
    for _, controllers, path in lines:
        if controllers == "memory":
            limit = _read_int(f"{root}/memory{path}/memory.limit_in_bytes")
            used = _read_int(f"{root}/memory{path}/memory.usage_in_bytes")
        elif controllers == "":
            bases = [f"{root}{sub}{path}" for sub in ("", "/unified")]
            base = next((b for b in bases if os.path.exists(f"{b}/memory.max")), None)
            if base is None:
                continue
            limit, used = _read_int(f"{base}/memory.max"), _read_int(f"{base}/memory.current")
        else:
            continue
        if limit is not None and used is not None and limit < 2**60:
            return max(limit - used, 0)
    return None


def available_cpus() -> int:
    """Cores this process may run on (affinity mask, else os.cpu_count())."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def detect() -> Machine:
    """Read the machine's facts now (memory figures change; call again when they matter)."""
    model, flags = read_cpuinfo()
    mem = read_meminfo()
    available = mem.get("MemAvailable")
    headroom = cgroup_headroom()
    if headroom is not None:
        available = headroom if available is None else min(available, headroom)
    return Machine(arch=platform.machine().lower(), cpu_model=model, features=flags, cpus=available_cpus(),
                   mem_total=mem.get("MemTotal"), mem_available=available)
