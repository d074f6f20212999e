"""What a node reports about itself: request counters, recent latencies, and the machine's state.

Counters are updated from the MQTT thread and the worker; `snapshot()` is read by the health
timer. System readings come from /proc and /sys where the OS exposes them (Linux, Raspberry Pi)
and are simply left out elsewhere.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")
PI_THROTTLED = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")
# Raspberry Pi firmware flags (bits 0-3: now; bits 16-19: since boot).
THROTTLE_BITS = {0: "under_voltage", 1: "arm_frequency_capped", 2: "throttled", 3: "soft_temperature_limit"}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of the values, None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100.0 * len(ordered))))
    return ordered[rank - 1]


class Stats:
    """Thread-safe counters and a window of recent latencies."""

    def __init__(self, window: int = 1000) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._counts: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._latency: deque[float] = deque(maxlen=window)
        self._queue: deque[float] = deque(maxlen=window)
        self._generated: deque[tuple[int, float]] = deque(maxlen=window)  # (tokens, seconds)

    def count(self, name: str, n: int = 1) -> None:
        """Bump a named counter (requests, ok, duplicates, dropped, connects, ...)."""
        with self._lock:
            self._counts[name] += n

    def error(self, code: str) -> None:
        with self._lock:
            self._errors[code] += 1

    def observe(self, latency_ms: float, queue_ms: float) -> None:
        """Record one answered request's compute time and its time in the queue."""
        with self._lock:
            self._latency.append(latency_ms)
            self._queue.append(queue_ms)

    def generated(self, tokens: int, seconds: float) -> None:
        with self._lock:
            self._generated.append((tokens, seconds))

    def snapshot(self) -> dict[str, Any]:
        """Counters and latency percentiles as plain JSON-ready values."""
        with self._lock:
            counts, errors = dict(self._counts), dict(self._errors)
            latency, queue = list(self._latency), list(self._queue)
            tokens = sum(t for t, _ in self._generated)
            seconds = sum(s for _, s in self._generated)
        return {
            "uptime_s": round(time.monotonic() - self._started, 1),
            "requests": counts.get("requests", 0),
            "ok": counts.get("ok", 0),
            "errors": errors,
            "duplicates": counts.get("duplicates", 0),
            "id_conflicts": counts.get("id_conflicts", 0),
            "dropped": counts.get("dropped", 0),
            "computed": counts.get("computed", 0),
            "batches": counts.get("batches", 0),
            "reconnects": max(0, counts.get("connects", 0) - 1),
            "latency_ms": _percentiles(latency),
            "queue_ms": _percentiles(queue),
            "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
        }


def _percentiles(values: list[float]) -> dict[str, float | None]:
    p50, p95 = percentile(values, 50), percentile(values, 95)
    return {"p50": None if p50 is None else round(p50, 1), "p95": None if p95 is None else round(p95, 1)}


def system_metrics() -> dict[str, Any]:
    """Resident memory, CPU temperature and throttling state, each only where readable."""
    out: dict[str, Any] = {}
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        out["rss_bytes"] = pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        out["cpu_temp_c"] = round(int(THERMAL_ZONE.read_text().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        pass
    try:
        flags = int(PI_THROTTLED.read_text().strip(), 16)
        out["throttled"] = {name: bool(flags >> bit & 1) for bit, name in THROTTLE_BITS.items()}
        out["throttled"]["since_boot"] = bool(flags >> 16 & 0xF)
    except (OSError, ValueError):
        pass
    return out
