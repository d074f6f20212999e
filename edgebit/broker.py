"""An MQTT broker inside the edgebit process (amqtt), for the demo and single-box sites.

Mosquitto stays the production broker; this one needs nothing but `pip install 'edgebit[broker]'`.
It runs amqtt's asyncio broker on its own thread and event loop, bound to the loopback address
by default, anonymous, MQTT 3.1.1 (amqtt speaks no MQTT 5, so a node connecting to it uses 3.1.1
and no shared subscriptions: see `node_settings`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker cannot start (amqtt missing, port taken)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the broker binds it right after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """`with EmbeddedBroker() as b:` → an MQTT broker on `b.host`:`b.port` until the block ends."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        """Start listening; raises BrokerError if amqtt is missing or the broker cannot bind."""
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise BrokerError(f"the embedded broker needs amqtt ({exc}); pip install 'edgebit[broker]'") from None
        for name in ("amqtt", "transitions"):  # their start-up chatter is not ours to show
            logging.getLogger(name).setLevel(max(logging.getLogger(name).getEffectiveLevel(), logging.WARNING))
        started: Future[None] = Future()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

        async def main() -> None:
            try:
                self._broker = Broker(config)
                await self._broker.start()
            except Exception as exc:  # amqtt wraps bind errors in its own BrokerError
                started.set_exception(BrokerError(f"embedded broker on {self.host}:{self.port}: {exc}"))
                return
            started.set_result(None)

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edgebit-broker", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(main(), self._loop)
        try:
            started.result(timeout)
        except BaseException:
            self._stop_loop()
            raise
        log.info("embedded MQTT broker listening on %s:%d", self.host, self.port)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect every client and stop the broker's thread."""
        if self._loop is None:
            return
        if self._broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout)
            except Exception as exc:  # a broker that fails to shut down cleanly is still abandoned below
                log.warning("embedded broker shutdown: %s", exc)
            self._broker = None
        self._stop_loop(timeout)

    def _stop_loop(self, timeout: float = 10.0) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def node_settings() -> dict[str, dict[str, Any]]:
    """`edgebit serve` configuration tables for a node connecting to this broker: MQTT 3.1.1, no
    shared subscription (an MQTT 5 feature)."""
    return {"broker": {"protocol": "3.1.1"}, "node": {"shared": False}}
