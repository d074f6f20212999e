"""systemd's notify protocol (sd_notify) with the standard library only.

Under `Type=notify`, systemd passes a datagram socket in NOTIFY_SOCKET; the service reports
READY=1 once it serves, WATCHDOG=1 at least every WatchdogSec, STATUS=... for `systemctl status`
and STOPPING=1 when it begins a clean stop. Outside systemd every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def notify(*states: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `KEY=value` lines to systemd; False when not run by systemd (or the send failed)."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address or not states:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(states).encode("utf-8", "replace"), address)
        return True
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", env.get("NOTIFY_SOCKET"), exc)
        return False


def watchdog_period(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), None when no watchdog is set for us."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6
