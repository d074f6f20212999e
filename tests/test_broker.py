"""The embedded MQTT broker (edgebit/broker.py): paho clients and an edgebit node talk through it."""

from __future__ import annotations

import json
import queue
import socket
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

pytest.importorskip("amqtt")

from edgebit import __version__, load
from edgebit.broker import EmbeddedBroker, node_settings
from edgebit.mqtt.config import parse_config
from edgebit.mqtt.protocol import Topics
from edgebit.mqtt.service import Service

TIMEOUT = 30.0


def _client(port: int, name: str, received: queue.Queue, *topics: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
    subscribed = threading.Event()
    c.on_message = lambda _c, _u, msg: received.put((msg.topic, msg.payload, msg.retain))
    c.on_subscribe = lambda *_: subscribed.set()
    c.on_connect = lambda cl, *_: cl.subscribe([(t, 1) for t in topics]) if topics else subscribed.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert subscribed.wait(TIMEOUT)
    return c


def test_paho_clients_exchange_messages_and_the_port_closes_on_stop() -> None:
    broker = EmbeddedBroker().start()
    assert broker.host == "127.0.0.1"
    got: queue.Queue = queue.Queue()
    sub = _client(broker.port, "sub", got, "sensors/#")
    pub = _client(broker.port, "pub", queue.Queue())
    pub.publish("sensors/kitchen", b'{"temperature": 21.4}', qos=1).wait_for_publish(TIMEOUT)
    pub.publish("state/node", b"online", qos=1, retain=True).wait_for_publish(TIMEOUT)
    assert got.get(timeout=TIMEOUT) == ("sensors/kitchen", b'{"temperature": 21.4}', False)
    late: queue.Queue = queue.Queue()
    reader = _client(broker.port, "late", late, "state/#")  # a retained message reaches a later subscriber
    assert late.get(timeout=TIMEOUT) == ("state/node", b"online", True)
    for c in (sub, pub, reader):
        c.disconnect()
        c.loop_stop()
    broker.stop()
    with pytest.raises(OSError):
        socket.create_connection((broker.host, broker.port), timeout=2).close()


def test_a_taken_port_is_reported() -> None:
    with EmbeddedBroker() as first:
        with pytest.raises(Exception, match=str(first.port)):
            EmbeddedBroker(port=first.port).start()


def test_an_edgebit_node_serves_classify_through_it(micro_classifier: Path) -> None:
    """The production MQTT service (MQTT 3.1.1, no shared subscription) answers a classify request
    with the model's stored labels and no prompt in the task."""
    with EmbeddedBroker() as broker:
        settings = node_settings()
        cfg = parse_config({"broker": {**settings["broker"], "host": broker.host, "port": broker.port},
                            "node": {**settings["node"], "id": "n1"},
                            "tasks": {"sensors": {"kind": "classify", "labels": ["normal", "warning", "critical"]}}})
        service = Service(cfg, lambda: load(micro_classifier, backend="reference"), __version__, threads=1)
        node = threading.Thread(target=service.run, daemon=True)
        node.start()
        topics = Topics("edgebit", "n1")
        got: queue.Queue = queue.Queue()
        client = _client(broker.port, "asker", got, topics.response("sensors"), topics.info)
        while True:
            topic, payload, _ = got.get(timeout=TIMEOUT)
            if topic == topics.info and json.loads(payload)["state"] == "ready":
                break
        text = "boiler 97C, pressure 2.1 bar"
        client.publish(topics.request("sensors"), json.dumps({"v": 1, "id": "q1", "text": text}), qos=1)
        while True:
            topic, payload, _ = got.get(timeout=TIMEOUT)
            if topic == topics.response("sensors"):
                break
        answer = json.loads(payload)
        expected = load(micro_classifier, backend="reference").classify(text)
        assert answer["status"] == "ok" and answer["id"] == "q1" and answer["label"] == expected["label"]
        assert answer["scores"] == pytest.approx(expected["scores"], abs=1e-5)
        client.disconnect()
        client.loop_stop()
        service.stop()
        node.join(TIMEOUT)
        assert not node.is_alive()


def test_serve_with_an_embedded_broker_answers_and_stops_on_sigterm(micro_classifier: Path, tmp_path: Path) -> None:
    """`edgebit serve --broker embedded`: one process is broker and node; SIGTERM ends both (exit 0)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from edgebit.broker import free_port

    port = free_port()
    config = tmp_path / "site.toml"
    config.write_text(f'[broker]\nhost = "127.0.0.1"\nport = {port}\n[node]\nid = "solo"\n'
                      '[tasks.sensors]\nkind = "classify"\nlabels = ["normal", "warning", "critical"]\n')
    proc = subprocess.Popen([sys.executable, "-m", "edgebit", "serve", str(micro_classifier), "-c", str(config),
                             "--broker", "embedded", "--backend", "reference", "-t", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:  # the broker comes up with the process
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "serve did not start its broker"
                time.sleep(0.1)
        topics = Topics("edgebit", "solo")
        got: queue.Queue = queue.Queue()
        client = _client(port, "asker", got, topics.response("sensors"), topics.info)
        while True:
            topic, payload, _ = got.get(timeout=TIMEOUT)
            if topic == topics.info and json.loads(payload)["state"] == "ready":
                break
        client.publish(topics.request("sensors"), json.dumps({"v": 1, "id": "s1", "text": "CO2 2600 ppm"}), qos=1)
        while True:
            topic, payload, _ = got.get(timeout=TIMEOUT)
            if topic == topics.response("sensors"):
                break
        answer = json.loads(payload)
        assert answer["status"] == "ok" and answer["label"] in ("normal", "warning", "critical")
        client.disconnect()
        client.loop_stop()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
