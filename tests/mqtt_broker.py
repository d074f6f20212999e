"""Test helpers for the MQTT tests: a private Mosquitto broker, an edgebit node process, a recording client.

The broker listens on a free 127.0.0.1 port with persistence in a temporary directory, so a restart
keeps sessions and queued messages. Waiting is always on a condition with a timeout, never a sleep.
"""

from __future__ import annotations

import getpass
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    """Poll a cheap predicate (a process state or a port) until truthy; AssertionError on timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Broker:
    """A Mosquitto process with a generated configuration in `directory`."""

    def __init__(self, directory: Path, extra: str = "", anonymous: bool = True) -> None:
        self.directory = directory
        self.port = free_port()
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous {str(anonymous).lower()}\npersistence true\n"
            f"user {getpass.getuser()}\n"  # run as root, Mosquitto would switch to a user who cannot write here
            f"persistence_location {directory}/\nlog_dest file {directory}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\nmax_queued_messages 10000\n" + extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(self._accepting, what=f"mosquitto on port {self.port}")
        return self

    def _accepting(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "mosquitto exited; see mosquitto.log"
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM: Mosquitto saves its persistence file, so sessions survive a restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=TIMEOUT)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def edgebit_command() -> list[str]:
    """The `edgebit` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("edgebit")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from edgebit.cli import main; main()"]


class NodeProcess:
    """`edgebit serve MODEL --config FILE` as a child process, its log in `directory`."""

    def __init__(self, model: Path, config: Path, directory: Path, name: str,
                 env: dict[str, str] | None = None) -> None:
        self.args = [*edgebit_command(), "-v", "serve", str(model), "--config", str(config), "--threads", "1"]
        self.log_path = directory / f"{name}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "EDGEBIT_HOME": str(directory), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = TIMEOUT) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=TIMEOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


NO_MATCHING_SUBSCRIBERS = 16  # MQTT 5 PUBACK reason: nobody subscribed, the broker dropped the message


class Client:
    """A recording MQTT client: every message received is kept; waits are on a condition.

    Like a careful sensor, it publishes again what the broker acknowledged with "No matching
    subscribers" (Mosquitto 2.0 does not restore shared subscriptions after a restart, so a pool
    request sent before the nodes have reconnected and re-subscribed reaches nobody).
    """

    def __init__(self, port: int, version: int = 5, client_id: str | None = None, persistent: bool = False,
                 tls: dict[str, str] | None = None, auth: tuple[str, str] | None = None) -> None:
        self.version = version
        self.client_id = client_id or f"test-{uuid.uuid4().hex[:10]}"
        proto = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto,
                                  clean_session=None if version == 5 else not persistent)
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self._subscribed: set[int] = set()
        self._connects = 0
        self._sent: dict[int, tuple[str, bytes, Any]] = {}  # mid → what to publish again if it reached nobody
        self._early: dict[int, int] = {}  # PUBACK reasons that came before publish() returned
        self.republished = 0
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_connect = self._on_connect
        self.client.reconnect_delay_set(1, 2)
        if tls:
            self.client.tls_set(ca_certs=tls["ca"], certfile=tls.get("cert"), keyfile=tls.get("key"))
        if auth:
            self.client.username_pw_set(*auth)
        if version == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600 if persistent else 0
            self.client.connect_async("127.0.0.1", port, 30, clean_start=not persistent, properties=props)
        else:
            self.client.connect_async("127.0.0.1", port, 30)
        self.client.loop_start()
        self.wait(lambda: self._connects > 0, what="the test client to connect")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        with self._cond:
            self._connects += 1
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._cond:
            self._subscribed.add(mid)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "messages") -> Any:
        with self._cond:
            value = self._cond.wait_for(predicate, timeout)
        assert value, f"timed out after {timeout:.0f} s waiting for {what}"
        return value

    def subscribe(self, *filters: str) -> None:
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        self.wait(lambda: mid in self._subscribed, what=f"SUBACK for {filters}")

    def publish(self, topic: str, payload: bytes | str | dict, response_topic: str | None = None,
                correlation: bytes | None = None, expiry: int | None = None, retain: bool = False) -> None:
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        props = None
        if self.version == 5 and (response_topic or correlation or expiry):
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
            if expiry:
                props.MessageExpiryInterval = expiry
        self._send(topic, data, props, retain)

    def _send(self, topic: str, data: bytes, props: Any, retain: bool = False) -> None:
        info = self.client.publish(topic, data, qos=1, retain=retain, properties=props)
        with self._cond:
            reason = self._early.pop(info.mid, None)
            if reason is None:
                self._sent[info.mid] = (topic, data, props)
        if reason == NO_MATCHING_SUBSCRIBERS:
            self._again(topic, data, props)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._cond:
            sent = self._sent.pop(mid, None)
            if sent is None:
                self._early[mid] = reason.value
                return
        if reason.value == NO_MATCHING_SUBSCRIBERS:
            self._again(*sent)

    def _again(self, topic: str, data: bytes, props: Any) -> None:
        with self._cond:
            self.republished += 1
        threading.Timer(0.2, self._send, (topic, data, props)).start()

    def on(self, topic: str) -> list[mqtt.MQTTMessage]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def json_on(self, topic: str) -> list[dict]:
        return [json.loads(m.payload) for m in self.on(topic)]

    def wait_json(self, topic: str, predicate: Callable[[dict], bool] = lambda _: True,
                  timeout: float = TIMEOUT, count: int = 1) -> list[dict]:
        """Wait until `count` JSON messages on `topic` satisfy the predicate; returns them."""
        def found() -> list[dict] | None:
            hits = [p for p in (_loads(m.payload) for m in self.messages if m.topic == topic)
                    if p is not None and predicate(p)]
            return hits if len(hits) >= count else None
        return self.wait(found, timeout, what=f"{count} message(s) on {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _loads(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None


_counter = itertools.count()


def unique_id(prefix: str = "r") -> str:
    return f"{prefix}{next(_counter):05d}-{uuid.uuid4().hex[:6]}"
