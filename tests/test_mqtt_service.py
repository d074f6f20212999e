"""The MQTT node against a real Mosquitto: every row of the protocol, delivery guarantees, hostile input.

Nodes whose death matters run as `edgebit serve` processes on the tiny random model; the edge cases
that need an exact interleaving (a full queue, a duplicate arriving mid-computation) run the
service in-process on a gated fake model. Every topic tree (prefix) is private to its test.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt_broker import Broker, Client, NodeProcess, free_port, unique_id, wait_until

from edgebit.engine import Completion
from edgebit.mqtt import sdnotify
from edgebit.mqtt.config import parse_config
from edgebit.mqtt.health import percentile
from edgebit.mqtt.service import Service

pytestmark = pytest.mark.timeout(180)

TASKS_TOML = '''
[tasks.mood]
kind = "classify"
prompt = "Message: {text}\\nMood:"
labels = ["calm", "alert", "panic"]
inputs = ["sensors/+/text"]

[tasks.echo]
kind = "generate"
max_tokens = 8
temperature = 0
'''


def node_config(path: Path, port: int, node: str, prefix: str, broker: str = "", extra: str = "") -> Path:
    """A TOML configuration for a test node (health every second, quick reconnects)."""
    path.write_text(f'[broker]\nhost = "127.0.0.1"\nport = {port}\nreconnect_max = 2\n{broker}\n'
                    f'[node]\nid = "{node}"\nprefix = "{prefix}"\nhealth_interval = 1\n{extra}\n' + TASKS_TOML)
    return path


def topics(prefix: str, node: str) -> dict[str, str]:
    base = f"{prefix}/v1/node/{node}"
    return {"status": f"{base}/status", "info": f"{base}/info", "health": f"{base}/health"}


def wait_ready(client: Client, prefix: str, node: str, count: int = 1) -> None:
    """Wait until the node has announced `count` times that its model is loaded."""
    t = topics(prefix, node)
    client.subscribe(t["info"], t["status"], t["health"])
    client.wait_json(t["info"], lambda p: p.get("state") == "ready", count=count)


def request(client: Client, topic: str, payload: dict | bytes, reply: str | None = None) -> dict:
    """An MQTT 5 request with its own response topic and correlation data; returns the response."""
    reply = reply or f"reply/{unique_id('c')}"
    corr = unique_id("corr").encode()
    client.subscribe(reply)
    client.publish(topic, payload, response_topic=reply, correlation=corr)
    msg = client.wait(lambda: next((m for m in client.on(reply) if correlation(m) == corr), None),
                      what=f"the response to {topic}")
    assert msg.properties.ContentType == "application/json" and msg.properties.PayloadFormatIndicator == 1
    return json.loads(msg.payload)


def correlation(msg: Any) -> bytes | None:
    return getattr(msg.properties, "CorrelationData", None)


def last_payload(client: Client, topic: str) -> bytes | None:
    messages = client.on(topic)
    return messages[-1].payload if messages else None


def latest_health(client: Client, prefix: str, node: str, newer_than: int = 0) -> dict:
    """The health report published after `newer_than` reports were seen (so it reflects everything before)."""
    topic = topics(prefix, node)["health"]
    client.subscribe(topic)
    return client.wait_json(topic, count=newer_than + 2)[-1]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture
def client(broker: Broker) -> Iterator[Client]:
    c = Client(broker.port)
    yield c
    c.close()


@pytest.fixture
def spawn(tmp_path: Path, tiny_model: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start `edgebit serve` processes; all are killed at the end of the test."""
    procs: list[NodeProcess] = []

    def start(config: Path, name: str, env: dict[str, str] | None = None) -> NodeProcess:
        proc = NodeProcess(tiny_model, config, tmp_path, name, env).start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()
        print(f"--- {proc.log_path.name}\n{proc.log()[-4000:]}")  # pytest shows it when the test failed


@pytest.fixture(scope="module")
def node_a(broker: Broker, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One long-lived node, "a", with prefix "main" and Home Assistant discovery on."""
    directory = tmp_path_factory.mktemp("node_a")
    config = node_config(directory / "a.toml", broker.port, "a", "main", extra="homeassistant = true")
    proc = NodeProcess(tiny_model, config, directory, "a").start()
    try:
        c = Client(broker.port)
        try:
            wait_ready(c, "main", "a")
        finally:
            c.close()
        yield "main"
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
    finally:
        proc.stop()
        print(f"--- node a\n{proc.log()[-4000:]}")


# --- request / response


def test_mqtt5_request_response_with_correlation_data(node_a: str, client: Client) -> None:
    res = request(client, f"{node_a}/v1/req/mood", {"v": 1, "id": "q1", "text": "boiler 95C, pressure rising"})
    assert res["status"] == "ok" and res["id"] == "q1" and res["task"] == "mood" and res["node"] == "a"
    assert res["label"] in ("calm", "alert", "panic") and res["label"] == max(res["scores"], key=res["scores"].get)
    assert abs(sum(res["scores"].values()) - 1) < 1e-3
    assert res["model"].startswith("random-bitnet") and res["latency_ms"] >= 0 and res["queue_ms"] >= 0


def test_mqtt311_client_gets_the_answer_on_reply_to(node_a: str, broker: Broker) -> None:
    old = Client(broker.port, version=311)
    try:
        old.subscribe("legacy/answers")
        old.publish(f"{node_a}/v1/req/mood", {"v": 1, "id": "q311", "text": "hello", "reply_to": "legacy/answers"})
        res = old.wait_json("legacy/answers", lambda p: p["id"] == "q311")[0]
        assert res["status"] == "ok" and res["node"] == "a"
    finally:
        old.close()


def test_without_a_route_the_answer_goes_to_the_default_topic(node_a: str, client: Client) -> None:
    client.subscribe(f"{node_a}/v1/res/mood")
    client.publish(f"{node_a}/v1/req/mood", {"v": 1, "id": "q-default", "text": "hi"})
    res = client.wait_json(f"{node_a}/v1/res/mood", lambda p: p["id"] == "q-default")[0]
    assert res["status"] == "ok"


def test_generation_batch_and_chat_requests(node_a: str, client: Client) -> None:
    gen = request(client, f"{node_a}/v1/req/echo", {"v": 1, "id": "g1", "prompt": "Once", "max_tokens": 5})
    assert gen["status"] == "ok" and gen["finish_reason"] in ("stop", "length")
    assert gen["usage"]["completion_tokens"] <= 5 and isinstance(gen["text"], str)
    chat = request(client, f"{node_a}/v1/req/echo", {"v": 1, "messages": [{"role": "user", "content": "hi"}]})
    assert chat["status"] == "ok" and chat["usage"]["completion_tokens"] <= 8
    items = [{"id": "x", "text": "one"}, {"id": "y", "text": "two"}]
    batch = request(client, f"{node_a}/v1/req/mood", {"v": 1, "id": "b1", "labels": ["ok", "bad"], "items": items})
    assert batch["status"] == "ok" and [r["id"] for r in batch["results"]] == ["x", "y"]
    assert all(set(r["scores"]) == {"ok", "bad"} for r in batch["results"])


def test_node_addressed_request(node_a: str, client: Client) -> None:
    res = request(client, f"{node_a}/v1/node/a/req/mood", {"v": 1, "id": "direct", "text": "for a only"})
    assert res["status"] == "ok" and res["node"] == "a"


def test_tap_mode_publishes_results(node_a: str, client: Client) -> None:
    client.subscribe(f"{node_a}/v1/result/mood")
    client.publish("sensors/kitchen/text", b"smoke detected near the stove")
    client.publish("sensors/garage/text", b"\xff not utf-8")
    results = client.wait_json(f"{node_a}/v1/result/mood", count=2)
    ok = next(r for r in results if r["status"] == "ok")
    assert ok["source"] == "sensors/kitchen/text" and ok["label"] in ("calm", "alert", "panic")
    bad = next(r for r in results if r["status"] == "error")
    assert bad["source"] == "sensors/garage/text" and bad["error"]["code"] == "bad_request"


def test_status_and_info_are_retained(node_a: str, client: Client) -> None:
    t = topics(node_a, "a")
    client.subscribe(t["status"], t["info"])
    status = client.wait(lambda: client.on(t["status"]))[0]
    assert status.retain and status.payload == b"online"
    info_msg = client.wait(lambda: client.on(t["info"]))[0]
    info = json.loads(info_msg.payload)
    assert info_msg.retain and info["state"] == "ready" and info["node"] == "a" and info["version"]
    assert info["model"]["arch"] == "bitnet-b1.58" and len(info["model"]["sha256"]) == 64
    assert info["model"]["parameters"] > 0 and info["backend"] and info["threads"] == 1
    assert info["tasks"]["mood"]["labels"] == ["calm", "alert", "panic"] and info["limits"]["queue_size"] == 64


def test_health_is_published_periodically(node_a: str, client: Client) -> None:
    assert request(client, f"{node_a}/v1/req/mood", {"v": 1, "text": "for the latency figures"})["status"] == "ok"
    health = latest_health(client, node_a, "a")
    for key in ("uptime_s", "model", "backend", "threads", "rss_bytes", "queue_depth", "in_flight", "requests",
                "errors", "duplicates", "latency_ms", "tokens_per_s", "reconnects", "connected"):
        assert key in health, key
    assert health["connected"] and health["latency_ms"]["p50"] is not None


def test_home_assistant_discovery_is_resent_when_home_assistant_restarts(node_a: str, client: Client) -> None:
    topic = "homeassistant/device/edgebit_a/config"
    client.subscribe(topic)
    first = client.wait(lambda: client.on(topic))[0]
    config = json.loads(first.payload)
    assert first.retain and config["availability_topic"] == f"{node_a}/v1/node/a/status"
    event = config["components"]["mood_event"]
    assert event["platform"] == "event" and event["event_types"] == ["calm", "alert", "panic"]
    assert event["state_topic"] == f"{node_a}/v1/result/mood"
    assert {"mood_label", "latency", "queue_depth"} <= set(config["components"])
    client.publish("homeassistant/status", b"online")
    client.wait(lambda: len(client.on(topic)) >= 2, what="discovery re-sent")


# --- errors


def test_structured_errors(node_a: str, client: Client) -> None:
    unknown = request(client, f"{node_a}/v1/req/nosuch", {"v": 1, "id": "u1", "text": "x"})
    assert unknown["error"]["code"] == "unknown_task" and unknown["id"] == "u1" and not unknown["error"]["retryable"]
    missing = request(client, f"{node_a}/v1/req/mood", {"v": 1, "id": "m1"})
    assert missing["error"] == {"code": "bad_request", "message": "field 'text' is required", "retryable": False}
    big = request(client, f"{node_a}/v1/req/mood", {"v": 1, "text": "x" * 5000})
    assert big["error"]["code"] == "payload_too_large"
    expired = request(client, f"{node_a}/v1/req/mood", {"v": 1, "id": "d0", "text": "x", "deadline_ms": 0})
    assert expired["error"]["code"] == "deadline_exceeded" and expired["error"]["retryable"]
    long_prompt = request(client, f"{node_a}/v1/req/echo", {"v": 1, "prompt": "y" * 3000})
    assert long_prompt["error"]["code"] == "bad_request" and "context" in long_prompt["error"]["message"]
    client.subscribe(f"{node_a}/v1/res/mood")
    client.publish(f"{node_a}/v1/req/mood", {"v": 1, "id": "loop", "text": "x", "reply_to": f"{node_a}/v1/req/mood"})
    refused = client.wait_json(f"{node_a}/v1/res/mood", lambda p: p["id"] == "loop")[0]
    assert refused["error"]["code"] == "bad_request" and "refused" in refused["error"]["message"]


def test_duplicates_are_answered_identically_and_not_recomputed(node_a: str, client: Client) -> None:
    before = latest_health(client, node_a, "a")
    payload = {"v": 1, "id": "dup-1", "text": "same request twice"}
    reply = f"reply/{unique_id('dup')}"
    first = request(client, f"{node_a}/v1/req/mood", payload, reply)
    second = request(client, f"{node_a}/v1/node/a/req/mood", payload, reply)  # the same node, another topic
    raw = [m.payload for m in client.on(reply)]
    assert first == second and len(raw) == 2 and raw[0] == raw[1]
    after = latest_health(client, node_a, "a", len(client.json_on(topics(node_a, "a")["health"])))
    assert after["duplicates"] == before["duplicates"] + 1
    assert after["computed"] == before["computed"] + 1


# --- hostile input over the broker

hostile = st.one_of(
    st.binary(max_size=200),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                 max_leaves=10).map(lambda v: json.dumps(v).encode()),
    st.builds(lambda d: b"[" * d + b"]" * d, st.integers(1, 30000)),
    st.builds(lambda n: b'{"v":1,"text":"' + b"z" * n + b'"}', st.integers(60000, 70000)),
    st.sampled_from([b'{"v":1,"text":"\\ud800"}', b'{"v":1,"text":NaN}', b"\xc0\xaf", b""]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(payload=hostile)
def test_fuzzed_payloads_get_a_structured_answer(node_a: str, client: Client, payload: bytes) -> None:
    res = request(client, f"{node_a}/v1/req/mood", payload, reply="reply/fuzz")
    assert res["v"] == 1 and res["status"] in ("ok", "error")
    if res["status"] == "error":
        assert res["error"]["code"] in ("bad_request", "payload_too_large")


def test_node_still_serves_after_hostile_input_and_counts_drops(node_a: str, client: Client) -> None:
    before = latest_health(client, node_a, "a")
    client.publish(f"{node_a}/v1/req/mood", b"\x00garbage without any route")
    client.publish(f"{node_a}/v1/req/mood", b"[" * 20000)
    after = client.wait_json(topics(node_a, "a")["health"], lambda h: h["dropped"] >= before["dropped"] + 2)[0]
    assert after["errors"].get("bad_request", 0) >= before["errors"].get("bad_request", 0) + 2
    assert request(client, f"{node_a}/v1/req/mood", {"v": 1, "text": "still there?"})["status"] == "ok"


# --- pools, protocol versions, lifecycle


def test_pool_of_two_nodes_shares_the_work(broker: Broker, client: Client, spawn: Callable, tmp_path: Path) -> None:
    for name in ("p1", "p2"):
        spawn(node_config(tmp_path / f"{name}.toml", broker.port, name, "pool", broker="session_expiry = 0"), name)
    for name in ("p1", "p2"):
        wait_ready(client, "pool", name)
    client.subscribe("reply/pool")
    for i in range(20):
        client.publish("pool/v1/req/mood", {"v": 1, "id": f"p{i}", "text": f"message {i}"},
                       response_topic="reply/pool", correlation=b"%d" % i)
    answers = client.wait_json("reply/pool", count=20)
    assert {a["id"] for a in answers} == {f"p{i}" for i in range(20)}
    assert {a["node"] for a in answers} == {"p1", "p2"}


def test_mqtt311_node_serves_with_plain_subscriptions(broker: Broker, spawn: Callable, tmp_path: Path) -> None:
    old = Client(broker.port, version=311)
    try:
        old.subscribe("legacy-answers")
        # a retained request is stale state, replayed on every subscribe: it is dropped, never answered
        old.publish("legacy/v1/node/old/req/mood", {"v": 1, "id": "stale", "text": "x", "reply_to": "legacy-answers"},
                    retain=True)
        spawn(node_config(tmp_path / "old.toml", broker.port, "old", "legacy", broker='protocol = "3.1.1"'), "old")
        wait_ready(old, "legacy", "old")
        old.publish("legacy/v1/req/mood", {"v": 1, "id": "o1", "text": "hi", "reply_to": "legacy-answers"})
        old.publish("legacy/v1/node/old/req/echo", {"v": 1, "id": "o2", "prompt": "hi", "reply_to": "legacy-answers"})
        answers = old.wait_json("legacy-answers", count=2)
        assert {a["id"]: a["status"] for a in answers} == {"o1": "ok", "o2": "ok"}
        health = old.wait_json(topics("legacy", "old")["health"], lambda h: h["requests"] >= 3)[-1]
        assert health["dropped"] == 1 and "stale" not in {a["id"] for a in old.json_on("legacy-answers")}
    finally:
        old.close()


def test_last_will_on_sigkill_and_clean_stop_on_sigterm(broker: Broker, client: Client, spawn: Callable,
                                                        tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(sock_path))
        notify.settimeout(30)
        config = node_config(tmp_path / "life.toml", broker.port, "life", "life")
        env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}
        status = topics("life", "life")["status"]
        node = spawn(config, "life", env)
        wait_ready(client, "life", "life")
        _notifications(notify, "READY=1", "WATCHDOG=1", "STATUS=serving")
        node.signal(signal.SIGTERM)
        assert node.wait() == 0
        _notifications(notify, "STOPPING=1")
        client.wait(lambda: last_payload(client, status) == b"offline", what="offline after SIGTERM")

        node = spawn(config, "life-2", env)
        wait_ready(client, "life", "life", count=2)
        client.wait(lambda: last_payload(client, status) == b"online", what="online again")
        node.signal(signal.SIGKILL)
        node.wait()
        client.wait(lambda: last_payload(client, status) == b"offline", what="the Last Will after SIGKILL")


def _notifications(sock: socket.socket, *wanted: str) -> list[str]:
    """sd_notify datagrams received until a state starting with each wanted prefix has been seen."""
    states: list[str] = []
    while not all(any(s.startswith(w) for s in states) for w in wanted):
        states += sock.recv(4096).decode().split("\n")
    return states


def test_unreachable_broker_is_named_with_the_reason_and_serving_waits_for_it(spawn: Callable,
                                                                              tmp_path: Path) -> None:
    (tmp_path / "later").mkdir()
    absent = Broker(tmp_path / "later")  # its port has nothing listening until start()
    node = spawn(node_config(tmp_path / "n.toml", absent.port, "patient", "patient"), "patient")
    refused = f"cannot reach broker 127.0.0.1:{absent.port}: Connection refused; retrying in"
    wait_until(lambda: f"{refused} 1 s" in node.log() and f"{refused} 2 s" in node.log(),
               what="the unreachable broker to be reported with its address, reason and back-off")
    wait_until(lambda: "waiting for the broker" in node.log(), what="the model to load")
    assert "serving" not in node.log()
    assert "Client is not connected" not in node.log()
    absent.start()
    try:
        wait_until(lambda: re.search(rf"serving tasks .* on 127\.0\.0\.1:{absent.port}\n", node.log()),
                   what="serving once the broker accepts the connection")
        c = Client(absent.port)
        try:
            wait_ready(c, "patient", "patient")
        finally:
            c.close()
        absent.stop()  # a lost connection: the first retry comes after 1 s, the next one after 2 s
        wait_until(lambda: "lost the connection to broker" in node.log() and
                   f"{refused} 2 s" in node.log().split("lost the connection to broker")[-1],
                   what="the back-off after a lost connection")
        assert f"{refused} 1 s" not in node.log().split("lost the connection to broker")[-1]
    finally:
        node.stop()
        absent.stop()


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (50.0, 95.0, 100.0)
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0


def test_sd_notify_outside_systemd_is_a_no_op() -> None:
    assert not sdnotify.notify("READY=1", environ={})
    assert sdnotify.watchdog_period({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert sdnotify.watchdog_period({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_period({}) is None


# --- nothing lost: broker restart and node SIGKILL under load


def test_nothing_lost_across_broker_restart_and_node_kill(tmp_path: Path, spawn: Callable) -> None:
    directory = tmp_path / "broker"
    directory.mkdir()
    broker = Broker(directory).start()
    try:
        _chaos(broker, tmp_path, spawn)
    finally:
        broker.stop()


def _chaos(broker: Broker, tmp_path: Path, spawn: Callable) -> None:
    configs = {n: node_config(tmp_path / f"{n}.toml", broker.port, n, "chaos", extra="queue_size = 512")
               for n in ("k", "s")}  # k gets killed, s survives
    nodes = {n: spawn(configs[n], n) for n in configs}
    client = Client(broker.port, client_id="chaos-requester", persistent=True)
    try:
        for n in nodes:
            wait_ready(client, "chaos", n)
        client.subscribe("reply/chaos", "chaos/v1/node/+/health")
        ids = [f"c{i:03d}" for i in range(200)]

        def send(batch: list[str], topic: str = "chaos/v1/req/mood") -> None:
            for rid in batch:
                client.publish(topic, {"v": 1, "id": rid, "text": f"reading {rid}"}, response_topic="reply/chaos",
                               correlation=rid.encode())

        def answered() -> dict[str, list[bytes]]:
            out: dict[str, list[bytes]] = {}
            for m in client.on("reply/chaos"):
                out.setdefault(correlation(m).decode(), []).append(m.payload)
            return out

        send(ids[:50])
        client.wait(lambda: len(answered()) >= 25, what="25 answers")
        broker.restart()  # the requester, both nodes and their sessions must survive this
        send(ids[50:100])
        client.wait(lambda: len(answered()) >= 75, what="75 answers")
        nodes["k"].stop()  # SIGKILL: its unacknowledged requests wait in its session
        send(ids[100:150])
        nodes["k"] = spawn(configs["k"], "k-restarted")
        send(ids[150:])
        client.wait(lambda: set(ids) <= set(answered()), timeout=90, what="all 200 answers")
        first = {rid: json.loads(answered()[rid][0]) for rid in ids}
        assert all(r["status"] == "ok" and r["id"] == rid for rid, r in first.items())

        # duplicates: 20 ids the surviving node answered, sent to it again
        by_s = sorted(rid for rid, r in first.items() if r["node"] == "s")
        assert len(by_s) >= 20
        send(by_s[:20], "chaos/v1/node/s/req/mood")
        client.wait(lambda: all(len(answered()[rid]) >= 2 for rid in by_s[:20]), what="20 duplicate answers")
        for rid in by_s[:20]:
            assert len(set(answered()[rid])) == 1, f"{rid} answered differently"
        # the second health report from now on was surely made after the last duplicate was answered
        seen = len(client.json_on("chaos/v1/node/s/health"))
        health = client.wait_json("chaos/v1/node/s/health", count=seen + 2)[-1]
        assert health["duplicates"] >= 20 and health["reconnects"] >= 1
        computed_by_s = {rid for rid, payloads in answered().items()
                         for p in payloads if json.loads(p)["node"] == "s"}
        assert health["computed"] == len(computed_by_s)  # each request computed once by the survivor
    finally:
        client.close()


# --- in-process: exact interleavings on a gated fake model


class FakeModel:
    """Answers instantly once `gate` is open; records every engine call."""

    info = {"name": "fake-model", "arch": "fake", "parameters": 1, "context_length": 64, "backend": "fake"}

    def __init__(self, text: str = "y") -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls: list[list[str]] = []  # every classify_batch call
        self.batches: list[list[str]] = []  # the calls that succeeded
        self.text = text

    def sha256(self) -> str:
        return "0" * 64

    def classify_batch(self, texts: list[str], labels: list[str], prompt: str | None = None) -> list[dict]:
        self.entered.set()
        self.calls.append(list(texts))
        assert self.gate.wait(60)
        if any("boom" in t for t in texts):
            raise ValueError("cannot classify boom")
        self.batches.append(list(texts))
        return [{"label": labels[0], "scores": {label: 1 / len(labels) for label in labels}} for _ in texts]

    def complete(self, prompt: str | None = None, messages: list | None = None, **kw: Any) -> Completion:
        self.entered.set()
        assert self.gate.wait(60)
        return Completion(self.text, "length", 3, len(self.text))


@contextmanager
def in_process(broker: Broker, load: Callable[[], Any], prefix: str, connection: dict | None = None,
               **node: Any) -> Iterator[Service]:
    """A node in this process on a fake model; `connection` adds [broker] settings."""
    doc = {"broker": {"host": "127.0.0.1", "port": broker.port, "session_expiry": 0, **(connection or {})},
           "node": {"id": prefix, "prefix": prefix, "health_interval": 1, **node},
           "tasks": {"mood": {"kind": "classify", "labels": ["calm", "alert"]}, "echo": {"kind": "generate"}}}
    svc = Service(parse_config(doc, environ={}), load, "test")
    runner = threading.Thread(target=svc.run, daemon=True)
    runner.start()
    try:
        yield svc
    finally:
        svc.stop()
        runner.join(30)


def test_full_queue_answers_overloaded_and_queued_requests_are_micro_batched(broker: Broker,
                                                                              client: Client) -> None:
    model = FakeModel()
    model.gate.clear()
    with in_process(broker, lambda: model, "ovl", queue_size=4, max_batch=8):
        wait_ready(client, "ovl", "ovl")
        client.subscribe("reply/ovl")
        client.publish("ovl/v1/req/mood", {"v": 1, "id": "q0", "text": "t0"}, "reply/ovl", b"0")
        assert model.entered.wait(30)  # the worker is busy with q0; the next four fill the queue
        queued = [("t1", None), ("t2", None), ("boom", ["x", "y"]), ("t4", ["x", "y"]), ("t5", None)]
        for i, (text, labels) in enumerate(queued, start=1):
            body = {"v": 1, "id": f"q{i}", "text": text, **({"labels": labels} if labels else {})}
            client.publish("ovl/v1/req/mood", body, "reply/ovl", b"%d" % i)
        over = client.wait_json("reply/ovl")[0]
        assert over["id"] == "q5" and over["error"]["code"] == "overloaded" and over["error"]["retryable"]
        model.gate.set()
        answers = {a["id"]: a for a in client.wait_json("reply/ovl", count=6)}
    assert [answers[f"q{i}"]["status"] for i in (0, 1, 2, 4)] == ["ok"] * 4
    assert answers["q3"]["error"]["code"] == "bad_request"
    # q1 and q2 share task and labels: one engine call; the failing pair was retried job by job
    assert model.calls == [["t0"], ["t1", "t2"], ["boom", "t4"], ["boom"], ["t4"]]
    assert model.batches == [["t0"], ["t1", "t2"], ["t4"]]


def test_duplicate_arriving_mid_computation_waits_for_the_original(broker: Broker, client: Client) -> None:
    model = FakeModel()
    model.gate.clear()
    with in_process(broker, lambda: model, "midup"):
        wait_ready(client, "midup", "midup")
        client.subscribe("reply/midup")
        client.publish("midup/v1/req/mood", {"v": 1, "id": "same", "text": "t"}, "reply/midup", b"1")
        assert model.entered.wait(30)
        client.publish("midup/v1/req/mood", {"v": 1, "id": "same", "text": "t"}, "reply/midup", b"2")
        health = client.wait_json(topics("midup", "midup")["health"], lambda h: h["duplicates"] == 1)[0]
        assert health["busy"] == 1
        model.gate.set()
        client.wait(lambda: len(client.on("reply/midup")) == 2)
        client.publish("midup/v1/req/mood", {"v": 1, "id": "same", "text": "t"}, "reply/midup", b"3")
        client.wait(lambda: len(client.on("reply/midup")) == 3)
    payloads = {m.properties.CorrelationData: m.payload for m in client.on("reply/midup")}
    assert payloads[b"1"] == payloads[b"2"] == payloads[b"3"]
    assert model.batches == [["t"]]


def test_a_reused_id_with_other_content_is_refused_not_answered_from_the_store(broker: Broker,
                                                                              client: Client) -> None:
    """The store answers duplicates only: the same id with another text or labels (a requester that
    numbers every run from 0) gets a bad_request naming the id, counted, never the first answer; also
    while the first request is still in work (it must not wait for the first one's answer)."""
    model = FakeModel()
    with in_process(broker, lambda: model, "reuse"):
        wait_ready(client, "reuse", "reuse")
        client.subscribe("reply/reuse")
        client.publish("reuse/v1/req/mood", {"v": 1, "id": "sim-0000", "text": "first run"}, "reply/reuse", b"1")
        client.wait(lambda: len(client.on("reply/reuse")) == 1)
        client.publish("reuse/v1/req/mood", {"v": 1, "id": "sim-0000", "text": "second run", "labels": ["x", "y"]},
                       "reply/reuse", b"2")
        client.publish("reuse/v1/req/mood", {"v": 1, "id": "sim-0000", "text": "first run"}, "reply/reuse", b"3")
        client.wait(lambda: len(client.on("reply/reuse")) == 3)
        model.gate.clear()
        model.entered.clear()
        client.publish("reuse/v1/req/mood", {"v": 1, "id": "sim-0001", "text": "in work"}, "reply/reuse", b"4")
        assert model.entered.wait(30)
        client.publish("reuse/v1/req/mood", {"v": 1, "id": "sim-0001", "text": "other"}, "reply/reuse", b"5")
        client.wait(lambda: len(client.on("reply/reuse")) == 4)  # answered while the first one is held
        model.gate.set()
        client.wait(lambda: len(client.on("reply/reuse")) == 5)
        health = client.wait_json(topics("reuse", "reuse")["health"], lambda h: h["id_conflicts"] == 2)[0]
    answers = {m.properties.CorrelationData: json.loads(m.payload) for m in client.on("reply/reuse")}
    assert answers[b"1"]["status"] == "ok" and answers[b"3"] == answers[b"1"]  # a true duplicate
    refused = answers[b"2"]
    assert refused["status"] == "error" and refused["id"] == "sim-0000"
    assert refused["error"]["code"] == "bad_request" and not refused["error"]["retryable"]
    assert "'sim-0000' was already used" in refused["error"]["message"]
    assert answers[b"5"]["error"]["code"] == "bad_request" and answers[b"4"]["status"] == "ok"
    assert health["duplicates"] == 1 and health["errors"]["bad_request"] == 2
    assert model.batches == [["first run"], ["in work"]]


def test_message_expiry_is_honoured(broker: Broker, client: Client) -> None:
    model = FakeModel()
    model.gate.clear()
    with in_process(broker, lambda: model, "expiry"):
        wait_ready(client, "expiry", "expiry")
        client.subscribe("reply/expiry")
        client.publish("expiry/v1/req/mood", {"v": 1, "id": "busy", "text": "t"}, "reply/expiry", b"1")
        assert model.entered.wait(30)
        client.publish("expiry/v1/req/mood", {"v": 1, "id": "stale", "text": "t"}, "reply/expiry", b"2", expiry=1)
        client.wait_json(topics("expiry", "expiry")["health"], lambda h: h["queue_depth"] == 1)
        time.sleep(1.1)  # let the 1 s Message Expiry Interval run out while the request waits in the queue
        model.gate.set()
        stale = client.wait_json("reply/expiry", lambda p: p["id"] == "stale")[0]
    assert stale["error"]["code"] == "deadline_exceeded"
    assert model.batches == [["t"]]


def test_response_over_the_broker_maximum_packet_size_becomes_an_error(tmp_path: Path) -> None:
    small = Broker(tmp_path, extra="max_packet_size 4096\n").start()
    c = Client(small.port)
    try:
        with in_process(small, lambda: FakeModel(text="x" * 6000), "tiny-packets"):
            wait_ready(c, "tiny-packets", "tiny-packets")
            res = request(c, "tiny-packets/v1/req/echo", {"v": 1, "id": "huge", "prompt": "write a lot"})
            assert res["error"]["code"] == "payload_too_large" and "maximum packet size" in res["error"]["message"]
            assert request(c, "tiny-packets/v1/req/mood", {"v": 1, "text": "small"})["status"] == "ok"
    finally:
        c.close()
        small.stop()


def test_model_that_fails_to_load_answers_model_not_loaded(broker: Broker, client: Client) -> None:
    release = threading.Event()

    def broken() -> Any:
        assert release.wait(60)
        raise OSError("no such model file")

    doc = {"broker": {"host": "127.0.0.1", "port": broker.port, "session_expiry": 0},
           "node": {"id": "broken", "prefix": "broken", "health_interval": 1},
           "tasks": {"mood": {"kind": "classify", "labels": ["a", "b"]}}}
    svc = Service(parse_config(doc, environ={}), broken, "test")
    exit_code: list[int] = []
    runner = threading.Thread(target=lambda: exit_code.append(svc.run()), daemon=True)
    runner.start()
    t = topics("broken", "broken")
    client.subscribe(t["info"], t["health"], "reply/broken")
    client.wait_json(t["info"], lambda p: p["state"] == "loading")
    client.publish("broken/v1/req/mood", {"v": 1, "id": "early", "text": "x"}, "reply/broken", b"1")
    client.wait_json(t["health"], lambda h: h["queue_depth"] == 1)
    release.set()
    answer = client.wait_json("reply/broken")[0]
    assert answer["error"]["code"] == "model_not_loaded" and "no such model file" in answer["error"]["message"]
    runner.join(30)
    assert exit_code == [1]
    info = client.wait_json(t["info"], lambda p: p["state"] == "failed")[0]
    assert "no such model file" in info["error"]


def test_clean_stop_finishes_the_work_in_progress_and_leaves_the_queue_to_the_broker(broker: Broker,
                                                                                     client: Client) -> None:
    first, second = FakeModel(), FakeModel()
    first.gate.clear()
    persistent = {"session_expiry": 60}
    client.subscribe("reply/drain")
    with in_process(broker, lambda: first, "drain", persistent) as svc:
        wait_ready(client, "drain", "drain")
        client.publish("drain/v1/req/mood", {"v": 1, "id": "a", "text": "in progress"}, "reply/drain", b"a")
        assert first.entered.wait(30)
        client.publish("drain/v1/req/mood", {"v": 1, "id": "b", "text": "queued"}, "reply/drain", b"b")
        client.wait_json(topics("drain", "drain")["health"], lambda h: h["queue_depth"] == 1)
        svc.stop()  # what SIGTERM does
        wait_until(lambda: len(svc.queue) == 0, what="the queue to be handed back")
        first.gate.set()
        client.wait(lambda: last_payload(client, topics("drain", "drain")["status"]) == b"offline")
        answers = client.json_on("reply/drain")
        assert [a["id"] for a in answers] == ["a"] and first.calls == [["in progress"]]
    with in_process(broker, lambda: second, "drain", persistent):  # the same session: "b" comes again
        answer = client.wait_json("reply/drain", lambda p: p["id"] == "b")[0]
    assert answer["status"] == "ok" and second.calls == [["queued"]]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certificates(directory: Path) -> None:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate (EC keys: quick)."""
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=test-ca",
             cwd=directory)
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "1", "-extfile", "san.cnf", cwd=directory)


@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("mosquitto_passwd")),
                    reason="needs openssl and mosquitto_passwd")
def test_tls_with_client_certificate_and_password(tmp_path: Path) -> None:
    _certificates(tmp_path)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(tmp_path / "passwd"), "edge", "s3cret"], check=True)
    (tmp_path / "password").write_text("s3cret\n")
    secure = Broker(tmp_path, anonymous=False, extra=f"cafile {tmp_path}/ca.crt\ncertfile {tmp_path}/server.crt\n"
                    f"keyfile {tmp_path}/server.key\nrequire_certificate true\npassword_file {tmp_path}/passwd\n")
    secure.start()
    tls = {"ca": str(tmp_path / "ca.crt"), "cert": str(tmp_path / "client.crt"), "key": str(tmp_path / "client.key")}
    c = Client(secure.port, tls=tls, auth=("edge", "s3cret"))
    try:
        connection = {"tls": tls, "username": "edge", "password_file": str(tmp_path / "password")}
        with in_process(secure, FakeModel, "secure", connection):
            wait_ready(c, "secure", "secure")
            assert request(c, "secure/v1/req/mood", {"v": 1, "text": "over TLS"})["status"] == "ok"
    finally:
        c.close()
        secure.stop()


# --- the example requester (examples/sensor_simulator.py)

SIMULATOR = Path(__file__).resolve().parent.parent / "examples" / "sensor_simulator.py"


def simulate(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SIMULATOR), "--host", "127.0.0.1", "--port", str(port), "--rate", "0",
                           *args], capture_output=True, text=True, timeout=120)


def test_simulator_runs_never_get_each_others_answers(broker: Broker, client: Client) -> None:
    """Two runs with other texts and labels: the second gets answers to its own requests, not the
    first run's stored ones (its ids must not repeat the first run's)."""
    model = FakeModel()
    with in_process(broker, lambda: model, "simruns"):
        wait_ready(client, "simruns", "simruns")
        common = ["--prefix", "simruns", "--task", "mood", "--count", "2", "--timeout", "60"]
        first = simulate(broker.port, *common, "--text", "first run")
        second = simulate(broker.port, *common, "--text", "second run", "--labels", "x,y")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.count("(calm 0.50, alert 0.50)") == 2, first.stdout
    assert second.stdout.count("(x 0.50, y 0.50)") == 2, second.stdout
    ids = [line.split()[0] for run in (first, second) for line in run.stdout.splitlines() if line.startswith("sim-")]
    assert len(ids) == len(set(ids)) == 4
    assert sorted(t for batch in model.batches for t in batch) == ["first run"] * 2 + ["second run"] * 2


def test_simulator_says_why_nothing_was_answered(broker: Broker, tmp_path: Path) -> None:
    quiet = simulate(broker.port, "--prefix", "nobody-serves", "--task", "boiler", "--count", "1", "--timeout", "1")
    assert quiet.returncode == 2
    assert ("no answer within 1 s to 1 of 1 requests — is a node serving task 'boiler' (prefix 'nobody-serves') "
            f"on broker 127.0.0.1:{broker.port}?") in quiet.stderr
    closed = free_port()
    refused = simulate(closed, "--count", "1")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == f"cannot reach broker 127.0.0.1:{closed}: Connection refused"
    locked = Broker(tmp_path, anonymous=False).start()
    try:
        denied = simulate(locked.port, "--count", "1")
    finally:
        locked.stop()
    assert denied.returncode == 1
    assert denied.stderr.strip() == f"cannot reach broker 127.0.0.1:{locked.port}: it refused the connection: " \
                                    "Not authorized"
