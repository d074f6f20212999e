"""Simulated sensors asking an edgebit pool to classify their readings (MQTT 5 request/response).

Each reading is published to `{prefix}/v1/req/{task}` (or to one node with --node) with a Response
Topic and Correlation Data; the answers are printed as they arrive, then a latency summary.

    python examples/sensor_simulator.py --task boiler --count 20
    python examples/sensor_simulator.py --host mqtt.local --task boiler --node pi5-a \\
        --text "boiler 95C, pressure rising" --text "all quiet"

A careful requester also handles what MQTT can tell it: a PUBACK "No matching subscribers" (no
node is subscribed yet, e.g. just after a broker restart) and retryable errors such as
`overloaded` are sent again after a pause.

Request ids are unique across runs (`sim-<run>-<n>`, the run part random): a node answers a
repeated id from its store, so ids that restart at 0 on every run would collide with the last
run's. Exit codes: 0 all answered, 1 the broker cannot be reached or refuses us, 2 answers missing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

READINGS = [
    "boiler 62C, pressure 1.4 bar, flame stable",
    "boiler 95C, pressure rising fast, relief valve hissing",
    "boiler 71C, pressure 1.6 bar, pump noise slightly louder than usual",
    "boiler offline, no flame, error code E9",
    "boiler 55C, pressure 1.2 bar, nothing unusual",
]
NO_MATCHING_SUBSCRIBERS = 16
RETRY_PAUSE = 1.0


class Requester:
    """Sends requests and matches answers to them by correlation data."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.reply_topic = f"edgebit-sim/{uuid.uuid4().hex[:8]}/answers"
        self.pending: dict[bytes, tuple[dict, float]] = {}  # correlation → (request, time sent)
        self.by_mid: dict[int, bytes] = {}
        self.early: dict[int, int] = {}  # PUBACK reasons that arrived before publish() returned
        self.latencies: list[float] = []
        self.sent_all = False
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.connected = threading.Event()
        self.refused: str | None = None  # the CONNACK reason when the broker refuses us
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if args.username:
            self.client.username_pw_set(args.username, args.password)
        self.client.on_connect = self.on_connect
        self.client.on_message = self.on_message
        self.client.on_publish = self.on_publish

    def on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode,
                   props: object) -> None:
        if reason.is_failure:
            self.refused = str(reason)
        else:
            client.subscribe(self.reply_topic, qos=1)
        self.connected.set()

    def topic(self) -> str:
        a = self.args
        if a.node:
            return f"{a.prefix}/v1/node/{a.node}/req/{a.task}"
        return f"{a.prefix}/v1/req/{a.task}"

    def send(self, request: dict) -> None:
        correlation = request["id"].encode()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = correlation
        props.ContentType = "application/json"
        with self.lock:
            self.pending[correlation] = (request, time.monotonic())
        # never hold our lock inside publish(): paho calls on_publish with its own lock held
        info = self.client.publish(self.topic(), json.dumps(request), qos=1, properties=props)
        with self.lock:
            reason = self.early.pop(info.mid, None)
            if reason is None:
                self.by_mid[info.mid] = correlation
        if reason is not None:
            self.acknowledged(correlation, reason)

    def resend_later(self, correlation: bytes) -> None:
        with self.lock:
            request = self.pending[correlation][0] if correlation in self.pending else None
        if request is not None:
            threading.Timer(RETRY_PAUSE, self.send, (request,)).start()

    def on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: mqtt.ReasonCode,
                   props: object) -> None:
        with self.lock:
            correlation = self.by_mid.pop(mid, None)
            if correlation is None:
                self.early[mid] = reason.value
                return
        self.acknowledged(correlation, reason.value)

    def acknowledged(self, correlation: bytes, reason: int) -> None:
        """The broker's PUBACK for a request: resend it later if it reached no node."""
        if reason == NO_MATCHING_SUBSCRIBERS:
            print(f"  {correlation.decode()}: no node subscribed yet; sending again in {RETRY_PAUSE:.0f} s")
            self.resend_later(correlation)

    def on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        correlation = getattr(msg.properties, "CorrelationData", None)
        with self.lock:
            entry = self.pending.get(correlation)
        if entry is None:
            return  # a duplicate answer (at-least-once delivery) or not ours
        answer = json.loads(msg.payload)
        if answer.get("status") == "error" and answer["error"].get("retryable"):
            print(f"  {answer['id']}: {answer['error']['code']}; sending again in {RETRY_PAUSE:.0f} s")
            self.resend_later(correlation)
            return
        rtt = (time.monotonic() - entry[1]) * 1000
        with self.lock:
            self.pending.pop(correlation, None)
            self.latencies.append(rtt)
            left = len(self.pending)
        print(f"{answer['id']}  {describe(answer)}  [node {answer.get('node')}, {rtt:.0f} ms round trip]")
        if left == 0 and self.sent_all:
            self.done.set()

    def run(self) -> int:
        a = self.args
        broker = f"{a.host}:{a.port}"
        try:
            self.client.connect(a.host, a.port, keepalive=30)
        except OSError as exc:  # refused, unknown host, unreachable network, timeout
            print(f"cannot reach broker {broker}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        self.client.loop_start()
        if not self.connected.wait(10) or self.refused:
            self.client.loop_stop()
            why = f"it refused the connection: {self.refused}" if self.refused else "no answer to CONNECT in 10 s"
            print(f"cannot reach broker {broker}: {why}", file=sys.stderr)
            return 1
        texts = a.text or READINGS
        run = uuid.uuid4().hex[:8]  # ids unique across runs: a node answers a known id from its store
        for n, text in zip(range(a.count), itertools.cycle(texts), strict=False):
            request = {"v": 1, "id": f"sim-{run}-{n:04d}", "text": text}
            if a.labels:
                request["labels"] = a.labels.split(",")
            if a.deadline_ms:
                request["deadline_ms"] = a.deadline_ms
            self.send(request)
            time.sleep(1.0 / a.rate if a.rate > 0 else 0)
        self.sent_all = True
        with self.lock:
            if not self.pending:
                self.done.set()
        finished = self.done.wait(a.timeout)
        self.client.disconnect()
        self.client.loop_stop()
        if not finished:
            with self.lock:
                missing = len(self.pending)
            where = f"node {a.node!r}" if a.node else "a node"
            print(f"no answer within {a.timeout:g} s to {missing} of {a.count} requests — is {where} serving task "
                  f"{a.task!r} (prefix {a.prefix!r}) on broker {broker}?", file=sys.stderr)
        if self.latencies:
            q = statistics.quantiles(self.latencies, n=20) if len(self.latencies) > 1 else self.latencies * 19
            print(f"\n{len(self.latencies)}/{a.count} answered; round trip p50 {statistics.median(self.latencies):.0f}"
                  f" ms, p95 {q[18]:.0f} ms")
        return 0 if finished else 2


def describe(answer: dict) -> str:
    if answer.get("status") != "ok":
        return f"error {answer['error']['code']}: {answer['error']['message']}"
    if "label" in answer:
        scores = ", ".join(f"{k} {v:.2f}" for k, v in answer["scores"].items())
        return f"{answer['label']:<10} ({scores})"
    return repr(answer.get("text"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--prefix", default="edgebit")
    p.add_argument("--task", default="boiler", help="A classify task configured on the nodes.")
    p.add_argument("--node", help="Address one node instead of the pool.")
    p.add_argument("--labels", help="Comma-separated labels instead of the task's.")
    p.add_argument("--text", action="append", help="A reading to send (repeatable; default: built-in samples).")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--rate", type=float, default=2.0, help="Requests per second (0: all at once).")
    p.add_argument("--deadline-ms", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="Seconds to wait for the last answer.")
    return Requester(p.parse_args()).run()


if __name__ == "__main__":
    raise SystemExit(main())
