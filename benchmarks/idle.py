"""Wait for a quiet machine before timing: on a shared box other processes' load skews every number.

Used by the scripts in this folder (`--wait-idle`); it only reads /proc/stat.
"""

from __future__ import annotations

import sys
import time


def busy_share(seconds: float = 2.0) -> float:
    """Share of all CPU time spent busy over the next `seconds` (0..1)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_until_idle(max_busy: float = 0.1, timeout: float = 3600.0) -> float:
    """Block until the machine is at most `max_busy` busy for a 2-second sample; returns the last share."""
    deadline = time.monotonic() + timeout
    share = busy_share()
    while share > max_busy and time.monotonic() < deadline:
        print(f"waiting for an idle machine ({share:.0%} busy)...", file=sys.stderr, flush=True)
        time.sleep(10)
        share = busy_share()
    return share


def settle(wait: bool) -> None:
    """Wait for an idle machine if asked (`--wait-idle`), then print how busy it is before timing."""
    if wait:
        wait_until_idle()
    print(f"busy before: {busy_share():.0%}")
