"""`edgebit demo`: the whole MQTT path on a bare machine, in one process.

An embedded broker (amqtt) on a free loopback port, an edgebit node serving the bundled micro model
(`edgebit-sensors`) over the normal MQTT service, and a simulated stream of sensor readings from
the held-out generator (edgebit/sensors_data.py): each reading is sent as a `classify` request and
its answer printed as a row (reading → label, probability, latency), then a summary. Ctrl-C stops
the stream, the node and the broker cleanly and still prints the summary.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from . import __version__
from .broker import EmbeddedBroker, node_settings
from .classify import LABELS_KEY
from .gguf import GGUFFile
from .mqtt.config import parse_config
from .mqtt.protocol import Topics
from .mqtt.service import Service
from .sensors_data import generate

TASK = "sensors"
NODE = "demo"


@dataclass
class Summary:
    """What the demo saw: answers, agreement with the generator's labels, latencies (ms)."""

    sent: int = 0
    answered: int = 0
    agreed: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        lat = sorted(self.latencies)

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))]

        rate = self.answered / self.seconds if self.seconds else 0.0
        lines = [f"summary: {self.answered}/{self.sent} readings answered in {self.seconds:.1f} s "
                 f"({rate:.1f} msg/s), {self.errors} errors"]
        if not self.answered:  # stopped before the first answer (e.g. while the kernels compiled)
            return lines
        return [*lines, f"agreement with the generator's labels: {self.agreed / self.answered:.1%}",
                f"latency ms: p50 {pct(0.5):.1f}, p95 {pct(0.95):.1f}, max {pct(1.0):.1f}"]


class Demo:
    """Broker, node and sensor stream; `run()` blocks until done or `stop()`."""

    def __init__(self, model_path: str, count: int = 100, rate: float = 10.0, threads: int | None = None,
                 seed: int = 0, out: Callable[[str], None] = print, backend: str | None = None) -> None:
        self.model_path = model_path
        self.count = count
        self.rate = rate
        self.threads = threads
        self.seed = seed
        self.out = out
        self.backend = backend
        labels = list(GGUFFile(model_path).metadata.get(LABELS_KEY, ()))
        if not labels:
            raise ValueError(f"{model_path} stores no classification labels (train it with `edgebit train`)")
        self.labels = labels
        self.summary = Summary()
        self.failure: str | None = None  # why the node could not load the model
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._sent: dict[str, tuple[float, str, str]] = {}  # id → (time sent, text, generator label)
        self._done = threading.Condition(self._lock)

    def stop(self) -> None:
        """Stop the stream (from any thread, e.g. on Ctrl-C); `run()` then shuts everything down."""
        self._stop.set()
        with self._done:
            self._done.notify_all()

    def run(self) -> Summary:
        with EmbeddedBroker() as broker:
            settings = node_settings()
            cfg = parse_config({"broker": {**settings["broker"], "host": broker.host, "port": broker.port},
                                # a queue for the whole burst, scored in batches of up to 64 (micro-batching)
                                "node": {**settings["node"], "id": NODE, "queue_size": min(max(self.count, 64), 100000),
                                         "max_batch": 64},
                                "tasks": {TASK: {"kind": "classify", "labels": self.labels}}}, "<demo>")
            from . import load

            service = Service(cfg, lambda: load(self.model_path, backend=self.backend, threads=self.threads),
                              __version__, threads=self.threads)
            node = threading.Thread(target=service.run, name="edgebit-demo-node", daemon=True)
            node.start()
            try:
                self._stream(broker, Topics(cfg.node.prefix, NODE))
            finally:
                service.stop()
                node.join(30)
        return self.summary

    def _stream(self, broker: EmbeddedBroker, topics: Topics) -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edgebit-demo-sensors", protocol=mqtt.MQTTv311)
        client.on_message = self._on_message
        client.on_connect = lambda c, *_: c.subscribe([(topics.response(TASK), 1), (topics.info, 1)])
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            self.out(f"broker  mqtt://{broker.host}:{broker.port} (embedded)")
            self.out(f"node    {NODE}: loading {self.model_path}")
            while not self._ready.wait(0.2):
                if self._stop.is_set():
                    return
            if self.failure:
                raise RuntimeError(self.failure)
            self.out(f"{'reading':<64} {'label':<9} {'prob':>5} {'ms':>7}  check")
            start = time.monotonic()
            period = 1.0 / self.rate if self.rate > 0 else 0.0
            for i, ex in enumerate(generate(self.count, "eval", self.seed)):
                if self._stop.is_set():
                    break
                rid = f"r{i}"
                with self._lock:
                    self._sent[rid] = (time.monotonic(), ex.text, ex.label)
                    self.summary.sent += 1
                client.publish(topics.request(TASK), json.dumps({"v": 1, "id": rid, "text": ex.text}), qos=1)
                wait = start + (i + 1) * period - time.monotonic()
                if wait > 0:
                    self._stop.wait(wait)
            with self._done:  # the answers still on their way
                self._done.wait_for(lambda: self._stop.is_set() or not self._sent, timeout=30)
            self.summary.seconds = time.monotonic() - start
        finally:
            client.disconnect()
            client.loop_stop()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        if msg.topic.endswith("/info"):
            if payload.get("state") in ("ready", "failed"):
                self.failure = payload.get("error") if payload.get("state") == "failed" else None
                self._ready.set()
            return
        now = time.monotonic()
        with self._lock:
            sent = self._sent.pop(payload.get("id"), None)
            if sent is None:
                return
            t0, text, expected = sent
            ms = (now - t0) * 1000
            if payload.get("status") != "ok":
                self.summary.errors += 1
                row = f"{_short(text):<64} error: {payload.get('error', payload)}"
            else:
                label, p = payload["label"], payload["scores"][payload["label"]]
                self.summary.answered += 1
                self.summary.agreed += label == expected
                self.summary.latencies.append(ms)
                check = "ok" if label == expected else f"generator says {expected}"
                row = f"{_short(text):<64} {label:<9} {p:5.2f} {ms:7.1f}  {check}"
            self._done.notify_all()
        self.out(row)


def _short(text: str, width: int = 64) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
