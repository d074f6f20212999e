"""The edgebit MQTT node: broker connection, bounded work queue, inference worker, delivery and acks.

Threads: paho's network loop (callbacks: parse, route, enqueue — never inference), one worker
(loads the model, then runs micro-batches), and the caller's thread in `run()` (health timer,
systemd watchdog, shutdown). Requests are acknowledged to the broker only once the broker has
acknowledged our response (`on_publish`), so a node that dies mid-request gets it redelivered
through its persistent session; a duplicate is answered from the replay cache, not recomputed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import homeassistant, protocol, sdnotify
from .config import ServeConfig, TaskSpec
from .health import Stats, system_metrics
from .protocol import Request, RequestError, Topics

log = logging.getLogger(__name__)

DedupeKey = tuple[str, str]  # (task, request id)
RECONNECT_MIN = 1  # seconds before the first retry; paho doubles it per failure up to [broker] reconnect_max


class _Client(mqtt.Client):
    """paho's client, keeping why the last connection attempt failed (paho's retry loop drops it)."""

    last_error: OSError | None = None

    def reconnect(self) -> MQTTErrorCode:
        try:
            return super().reconnect()
        except OSError as exc:
            self.last_error = exc
            raise


class _DropNotConnected(logging.Filter):
    """Drop paho's "Client is not connected. Socket: None" error, logged after every failed attempt:
    `Service._on_connect_fail` reports the same event with the broker's address and the reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Client is not connected")


@dataclass
class Delivery:
    """A received message until it is answered and acknowledged."""

    mid: int
    qos: int
    connection: int  # which connection delivered it: acks go only to that one (else the broker redelivers)
    received: float  # time.monotonic()
    correlation: bytes | None = None
    topic: str | None = None  # where the answer goes; None: nowhere (counted as dropped)
    deadline: float | None = None  # monotonic time after which it is not computed


@dataclass
class Job:
    request: Request
    delivery: Delivery
    key: DedupeKey | None


class WorkQueue:
    """A bounded FIFO whose consumer can take compatible classify jobs together (micro-batching)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._jobs)

    def put(self, job: Job) -> bool:
        """Queue a job; False when full or closed."""
        with self._cond:
            if self._closed or len(self._jobs) >= self.size:
                return False
            self._jobs.append(job)
            self._cond.notify()
            return True

    def take(self, max_items: int) -> list[Job]:
        """Block for the next job, plus queued jobs of the same batch key up to `max_items` items in all;
        [] once closed."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                return []
            first = self._jobs.popleft()
            batch, n = [first], len(first.request.items)
            key = first.request.batch_key
            if key is not None:
                for job in list(self._jobs):
                    if n >= max_items:
                        break
                    if job.request.batch_key == key and n + len(job.request.items) <= max_items:
                        self._jobs.remove(job)
                        batch.append(job)
                        n += len(job.request.items)
            return batch

    def close(self) -> list[Job]:
        """Stop handing out jobs; returns those never started."""
        with self._cond:
            self._closed = True
            left = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
            return left


class Replay:
    """Responses to recent request ids (LRU), and duplicates waiting for an original still in work.

    Each id is remembered with the fingerprint of its request (`Request.fingerprint`): only a request
    asking the same thing is a duplicate; a reused id with other content must never get the stored answer.
    """

    def __init__(self, size: int, max_waiting: int) -> None:
        self.size = size
        self.max_waiting = max_waiting
        self._done: OrderedDict[DedupeKey, tuple[str, bytes]] = OrderedDict()
        self._working: dict[DedupeKey, tuple[str, list[Delivery]]] = {}
        self._n_waiting = 0
        self._lock = threading.Lock()

    def claim(self, key: DedupeKey, fingerprint: str, delivery: Delivery) -> bytes | str:
        """The stored response of a duplicate; "wait" if the original is in work (the duplicate gets its
        answer); "full" if too many duplicates already wait; "conflict" if the id is remembered for a
        request with other content; "new" otherwise (now in work)."""
        with self._lock:
            if key in self._done:
                known, response = self._done[key]
                if known != fingerprint:
                    return "conflict"
                self._done.move_to_end(key)
                return response
            if key in self._working:
                known, waiters = self._working[key]
                if known != fingerprint:
                    return "conflict"
                if self._n_waiting >= self.max_waiting:
                    return "full"
                waiters.append(delivery)
                self._n_waiting += 1
                return "wait"
            self._working[key] = (fingerprint, [])
            return "new"

    def finish(self, key: DedupeKey, response: bytes | None) -> list[Delivery]:
        """Store the response (None: forget the request, e.g. a retryable error); returns the waiters."""
        with self._lock:
            entry = self._working.pop(key, None)
            if entry is None:  # not claimed: nothing to store, nobody waiting
                return []
            fingerprint, waiters = entry
            self._n_waiting -= len(waiters)
            if response is not None and self.size > 0:
                self._done[key] = (fingerprint, response)
                while len(self._done) > self.size:
                    self._done.popitem(last=False)
            return waiters


class Service:
    """One edgebit node on one broker. `run()` serves until `stop()` is called, then shuts down cleanly."""

    def __init__(self, config: ServeConfig, load_model: Callable[[], Any], version: str,
                 threads: int | None = None) -> None:
        self.cfg = config
        self.version = version
        self.threads = threads or os.cpu_count()
        self._load_model = load_model
        node = config.node
        self.topics = Topics(node.prefix, node.id)
        self.mqtt5 = config.broker.protocol == "5"
        group = node.group if (self.mqtt5 and node.shared) else None
        self._taps = [(f, task) for task in config.tasks.values() for f in task.inputs]
        self._filters = self.topics.request_filters(group) + [f"$share/{group}/{f}" if group else f
                                                              for f, _ in self._taps]
        self._ha_status = f"{node.homeassistant_prefix}/status"
        self.stats = Stats()
        self.queue = WorkQueue(node.queue_size)
        self.replay = Replay(node.dedupe_size, max_waiting=node.queue_size)
        self.model: Any = None
        self.model_state = "loading"  # loading | ready | failed
        self.model_info: dict[str, Any] | None = None  # name, arch, parameters, context length, sha256
        self.backend: str | None = None
        self._model_error = ""
        self._lock = threading.Lock()
        self._acked = threading.Condition(self._lock)  # notified when a publish that carried acks completes
        self._connection = 0
        self._connected = False
        self._failures = 0  # connection attempts failed since the last accepted one
        self._announced = False  # "serving" was said for the current connection
        self._max_packet: int | None = None
        self._pending: dict[int, tuple[int, list[Delivery]]] = {}  # our publish mid → (qos, requests to ack)
        self._early: set[int] = set()  # mids whose PUBACK came before publish() returned
        self._unacked = 0
        self._busy = 0  # requests in the worker right now
        self._stop_requested = threading.Event()
        self._stopping = threading.Event()  # set once shutdown has begun: new deliveries stay unacknowledged
        self.client = self._make_client()
        self.worker = threading.Thread(target=self._work, name="edgebit-worker", daemon=True)

    # --- connection

    def _make_client(self) -> mqtt.Client:
        b = self.cfg.broker
        client = _Client(CallbackAPIVersion.VERSION2, client_id=b.client_id,
                             protocol=mqtt.MQTTv5 if self.mqtt5 else mqtt.MQTTv311,
                             clean_session=None if self.mqtt5 else False, manual_ack=True)
        client.suppress_exceptions = True
        paho_log = logging.getLogger("edgebit.mqtt.paho")
        if not any(isinstance(f, _DropNotConnected) for f in paho_log.filters):
            paho_log.addFilter(_DropNotConnected())
        client.enable_logger(paho_log)
        client.will_set(self.topics.status, protocol.OFFLINE, qos=1, retain=True)
        if b.tls is not None:
            client.tls_set(ca_certs=b.tls.ca, certfile=b.tls.cert, keyfile=b.tls.key)
            client.tls_insecure_set(b.tls.insecure)
        if b.username is not None:
            client.username_pw_set(b.username, b.password)
        client.reconnect_delay_set(RECONNECT_MIN, b.reconnect_max)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    def _connect(self) -> None:
        b = self.cfg.broker
        if self.mqtt5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = b.session_expiry
            self.client.connect_async(b.host, b.port, b.keepalive, clean_start=False, properties=props)
        else:
            self.client.connect_async(b.host, b.port, b.keepalive)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("broker %s:%s refused the connection: %s", self.cfg.broker.host, self.cfg.broker.port,
                      reason)
            self._status(f"broker refused the connection: {reason}")
            return
        with self._lock:
            self._connection += 1
            self._connected = True
            self._failures = 0
            # QoS 0 publishes not yet written died with the old socket: nothing will confirm them.
            self._pending = {mid: p for mid, p in self._pending.items() if p[0] > 0}
        self._max_packet = getattr(props, "MaximumPacketSize", None) if self.mqtt5 else None
        self.stats.count("connects")
        log.info("connected to %s:%s as %s (session present: %s)", self.cfg.broker.host, self.cfg.broker.port,
                 self.cfg.broker.client_id, flags.session_present)
        subs = [(f, 1) for f in self._filters]
        if self.cfg.node.homeassistant:
            subs.append((self._ha_status, 0))
        client.subscribe(subs)
        self._publish(self.topics.status, protocol.ONLINE.encode(), qos=1, retain=True, is_json=False)
        self._publish_info()
        if self.cfg.node.homeassistant:
            self._publish_discovery()
        self._status(f"{self.model_state}; connected to {self.cfg.broker.host}:{self.cfg.broker.port}")
        self._announce()

    def _on_connect_fail(self, client: _Client, userdata: Any) -> None:
        """A connection attempt failed before the broker answered: say where, why and when the next one is."""
        b = self.cfg.broker
        with self._lock:
            delay = min(RECONNECT_MIN * 2**self._failures, b.reconnect_max)  # paho's back-off, mirrored
            self._failures += 1
        exc = client.last_error
        reason = (exc.strerror or str(exc)) if exc is not None else "unknown error"
        log.warning("cannot reach broker %s:%s: %s; retrying in %d s", b.host, b.port, reason, delay)
        self._status(f"{self.model_state}; cannot reach broker {b.host}:{b.port}: {reason}")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        with self._lock:
            if self._connected:  # paho waits RECONNECT_MIN before its first retry, then doubles
                self._failures = 1
            self._connected = False
            self._announced = False
        if not self._stopping.is_set():
            log.warning("lost the connection to broker %s:%s (%s); reconnecting with back-off", self.cfg.broker.host,
                        self.cfg.broker.port, reason)
            self._status(f"{self.model_state}; broker unreachable, reconnecting")

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any],
                      props: Any) -> None:
        for topic_filter, reason in zip(self._filters, reasons, strict=False):  # + the HA status topic
            if reason.is_failure:
                log.error("the broker refused the subscription %s: %s", topic_filter, reason)

    # --- publishing and acknowledging

    def _too_large(self, topic: str, size: int, correlation: bytes | None) -> bool:
        """Whether a PUBLISH would exceed the Maximum Packet Size the broker announced (MQTT 5)."""
        limit = self._max_packet
        return limit is not None and protocol.publish_size(topic, size, correlation, self.mqtt5) > limit

    def _publish(self, topic: str, data: bytes, qos: int, retain: bool = False,
                 correlation: bytes | None = None, ack: Iterable[Delivery] = (),
                 is_json: bool = True) -> bool:
        """Publish, then acknowledge `ack` once the broker has the message. False if it cannot be sent."""
        if self._too_large(topic, len(data), correlation):
            log.warning("not publishing %d bytes to %s: over the broker's maximum packet size %d",
                        len(data), topic, self._max_packet)
            return False
        props = None
        if self.mqtt5:
            props = Properties(PacketTypes.PUBLISH)
            props.PayloadFormatIndicator = 1
            if is_json:
                props.ContentType = protocol.CONTENT_TYPE
            if correlation is not None:
                props.CorrelationData = correlation
        try:
            info = self.client.publish(topic, data, qos=qos, retain=retain, properties=props)
        except ValueError as exc:
            log.warning("cannot publish to %r: %s", topic, exc)
            return False
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN) or (
                qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS):
            return False  # QoS 0 without a connection is dropped; QoS 1 waits in paho for the reconnect
        deliveries = list(ack)
        with self._lock:
            done = info.mid in self._early
            if done:
                self._early.discard(info.mid)
            else:
                self._pending[info.mid] = (qos, deliveries)
        if done:
            self._ack(deliveries)
        return True

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("the broker refused publish %d: %s", mid, reason)
        with self._lock:
            entry = self._pending.pop(mid, None)
            if entry is None:
                self._early.add(mid)
                return
        self._ack(entry[1])
        if entry[1]:
            with self._acked:
                self._acked.notify_all()

    def _ack(self, deliveries: Iterable[Delivery]) -> None:
        """Acknowledge requests to the connection that delivered them (older ones come again)."""
        for d in deliveries:
            with self._lock:
                current = d.connection == self._connection
                if d.qos > 0:
                    self._unacked -= 1
            if d.qos > 0 and current:
                self.client.ack(d.mid, d.qos)

    def _awaiting_acks(self) -> bool:
        """Whether a published answer still waits for the broker (call with the lock held)."""
        return any(acks for _, acks in self._pending.values())

    def _status(self, text: str) -> None:
        sdnotify.notify(f"STATUS={text}")

    def _publish_info(self) -> None:
        info = protocol.info_payload(self.topics.node, self.version, self.model_state, self.model_info, self.backend,
                                     self.threads, self.cfg.tasks, self.cfg.limits, self.cfg.node.queue_size,
                                     self.topics, self._model_error or None)
        self._publish(self.topics.info, protocol.encode(info), qos=1, retain=True)

    def _publish_discovery(self) -> None:
        name = self.model_info["name"] if self.model_info else None
        payload = homeassistant.discovery_payload(self.topics, self.cfg.tasks, self.version, name)
        self._publish(homeassistant.discovery_topic(self.cfg.node.homeassistant_prefix, self.topics.node),
                      protocol.encode(payload), qos=1, retain=True)

    def _publish_health(self) -> None:
        with self._lock:
            unacked, connected, busy = self._unacked, self._connected, self._busy
        metrics = {
            "state": self.model_state,
            "model": self.model_info["name"] if self.model_info else None,
            "backend": self.backend,
            "threads": self.threads,
            **system_metrics(),
            "queue_depth": len(self.queue), "in_flight": unacked, "busy": busy, "connected": connected,
            **self.stats.snapshot(),
        }
        payload = protocol.health_payload(self.topics.node, metrics)
        self._publish(self.topics.health, protocol.encode(payload), qos=0)

    # --- receiving

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._stopping.is_set():
            return  # not acknowledged: the broker hands it to this session again after the restart
        with self._lock:
            delivery = Delivery(msg.mid, msg.qos, self._connection, time.monotonic())
            if msg.qos > 0:
                self._unacked += 1
        try:
            self._receive(msg, delivery)
        except Exception:  # a bug must cost one message, not the connection thread
            log.exception("internal error on a message (mid %d)", msg.mid)
            self.stats.error("internal")
            self._ack([delivery])

    def _receive(self, msg: mqtt.MQTTMessage, delivery: Delivery) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self._drop(delivery, "topic is not UTF-8")
            return
        if topic == self._ha_status and self.cfg.node.homeassistant:
            if msg.payload == protocol.ONLINE.encode():
                self._publish_discovery()
            self._ack([delivery])
            return
        self.stats.count("requests")
        if msg.retain:  # a stale retained message replayed on subscribe, not a live request or reading
            self._drop(delivery, f"retained message on {topic!r} ignored")
            return
        props = msg.properties if self.mqtt5 else None
        response_topic = getattr(props, "ResponseTopic", None)
        delivery.correlation = getattr(props, "CorrelationData", None)
        expiry = getattr(props, "MessageExpiryInterval", None)
        task_name = self.topics.task_of(topic)
        tap = None if task_name is not None else self._tap_task(topic)
        if task_name is None and tap is None:
            self._drop(delivery, f"no task for topic {topic!r}")
            return
        try:
            if tap is not None:
                delivery.topic = self.topics.result(tap.name)
                request = protocol.parse_tap(msg.payload, topic, tap, self.cfg.limits)
            else:
                request = protocol.parse_request(msg.payload, task_name, self.cfg.tasks, self.cfg.limits)
        except RequestError as err:
            if tap is None:
                delivery.topic, _ = self._route(response_topic, err.reply_to, task_name, err.routable)
            self._reply_error(delivery, err.code, err.message, err.request_id, tap.name if tap else task_name,
                              source=topic if tap else None)
            return
        task = request.task
        if tap is None:
            delivery.topic, complaint = self._route(response_topic, request.reply_to, task.name, True)
            if complaint:
                self._reply_error(delivery, "bad_request", complaint, request.id, task.name)
                return
        delivery.deadline = protocol.deadline_at(delivery.received, request.deadline_ms, expiry)
        key = (task.name, request.id) if request.id else None
        job = Job(request, delivery, key)
        if key is not None:
            claim = self.replay.claim(key, request.fingerprint, delivery)
            if isinstance(claim, bytes):
                self.stats.count("duplicates")
                self._send(delivery, claim)
                return
            if claim == "conflict":
                self.stats.count("id_conflicts")
                self._reply_error(delivery, "bad_request", f"request id {request.id!r} was already used for a "
                                  f"different request to task {task.name!r}; give every request its own id "
                                  "(e.g. a UUID)", request.id, task.name)
                return
            if claim == "wait":
                self.stats.count("duplicates")
                return
            if claim == "full":
                self._reply_error(delivery, "overloaded", "too many duplicates waiting", request.id,
                                  task.name)
                return
        if self.model_state == "failed":
            self._finish(job, protocol.error_response("model_not_loaded", self._model_error, request.id,
                                                      task.name, self.topics.node, request.source))
        elif not self.queue.put(job):
            self._finish(job, protocol.error_response(
                "overloaded", f"the queue is full ({self.queue.size} requests); retry later", request.id,
                task.name, self.topics.node, request.source))

    def _tap_task(self, topic: str) -> TaskSpec | None:
        """The first task (in configuration order) whose input filters match the topic."""
        for topic_filter, task in self._taps:
            if mqtt.topic_matches_sub(topic_filter, topic):
                return task
        return None

    def _route(self, response_topic: str | None, reply_to: str | None, task: str | None,
               routable: bool) -> tuple[str | None, str | None]:
        """Where a request's answer goes (MQTT 5 Response Topic > reply_to > the task's default topic),
        and a complaint when the requested topic is refused."""
        wanted = response_topic or reply_to
        default = self.topics.response(task) if task and (routable or wanted) else None
        if wanted is None:
            return default, None
        if protocol.valid_reply_topic(wanted, self._filters):
            return wanted, None
        return default, (f"response topic {wanted[:80]!r} is refused (wildcards, $-topics and topics this "
                         "node subscribes to cannot take answers)")

    def _drop(self, delivery: Delivery, why: str) -> None:
        log.debug("dropped a message: %s", why)
        self.stats.count("dropped")
        self._ack([delivery])

    # --- answering

    def _reply_error(self, delivery: Delivery, code: str, message: str, request_id: str | None,
                     task: str | None, source: str | None = None) -> None:
        payload = protocol.error_response(code, message, request_id, task, self.topics.node, source)
        self._send(delivery, self._encode_reply(delivery, payload))

    def _encode_reply(self, delivery: Delivery, payload: dict[str, Any]) -> bytes:
        """Encode a response, counted; one too large for the broker becomes a payload_too_large error."""
        data = protocol.encode(payload)
        if delivery.topic and self._too_large(delivery.topic, len(data), delivery.correlation):
            payload = protocol.error_response(
                "payload_too_large", f"the response of {len(data)} bytes exceeds the broker's maximum packet "
                f"size of {self._max_packet} bytes", payload.get("id"), payload.get("task"), self.topics.node)
            data = protocol.encode(payload)
        if payload["status"] == "ok":
            self.stats.count("ok")
        else:
            self.stats.error(payload["error"]["code"])
        return data

    def _send(self, delivery: Delivery, data: bytes) -> None:
        """Publish an encoded response on the delivery's route and acknowledge the request after it."""
        if delivery.topic is None:
            self._drop(delivery, "no response route")
        elif not self._publish(delivery.topic, data, qos=1, correlation=delivery.correlation, ack=[delivery]):
            self._drop(delivery, f"response to {delivery.topic!r} could not be published")

    def _finish(self, job: Job, payload: dict[str, Any]) -> None:
        """Answer a job and the duplicates that waited for it; remember the answer unless retryable."""
        data = self._encode_reply(job.delivery, payload)
        self._send(job.delivery, data)
        if job.key is not None:
            retryable = payload["status"] == "error" and protocol.RETRYABLE[payload["error"]["code"]]
            for waiter in self.replay.finish(job.key, None if retryable else data):
                self._send(waiter, data)

    # --- the worker

    def _work(self) -> None:
        if not self._load():
            for job in self.queue.close():
                req = job.request
                self._finish(job, protocol.error_response("model_not_loaded", self._model_error, req.id,
                                                          req.task.name, self.topics.node, req.source))
            self.stop()
            return
        while True:
            jobs = self.queue.take(self.cfg.node.max_batch)
            if not jobs:
                return
            with self._lock:
                self._busy = len(jobs)
            try:
                self._run(jobs)
            finally:
                with self._lock:
                    self._busy = 0

    def _load(self) -> bool:
        """Load the model; on failure every request is answered model_not_loaded and the node stops."""
        self._status("loading the model")
        try:
            model = self._load_model()
            info = model.info
            self.model_info = {"name": info["name"], "arch": info["arch"], "parameters": info["parameters"],
                               "context_length": info.get("context_length"), "sha256": model.sha256()}
            self.backend = info["backend"]
        except Exception as exc:  # any failure to load is reported the same way
            log.error("could not load the model: %s", exc)
            self._model_error = f"the model could not be loaded: {exc}"
            self.model_state = "failed"
            self._publish_info()
            return False
        self.model = model
        self.model_state = "ready"
        self._publish_info()
        if self.cfg.node.homeassistant:
            self._publish_discovery()
        # READY=1 means the process is up (systemd would kill a node that waits long for its broker);
        # "serving" is said only once the broker has accepted the connection.
        sdnotify.notify("READY=1")
        if not self._announce():
            b = self.cfg.broker
            log.info("loaded %s; waiting for the broker %s:%s", info["name"], b.host, b.port)
            self._status(f"model loaded; waiting for the broker {b.host}:{b.port}")
        return True

    def _announce(self) -> bool:
        """Say "serving" once per connection, when the model is loaded and the broker has accepted us;
        returns whether both hold."""
        with self._lock:
            if not self._connected or self.model_state != "ready":
                return False
            if self._announced:
                return True
            self._announced = True
        b, name = self.cfg.broker, self.model_info["name"] if self.model_info else "?"
        sdnotify.notify(f"STATUS=serving {len(self.cfg.tasks)} task(s) with {name} on {b.host}:{b.port}")
        log.info("serving tasks %s with %s on %s:%s", ", ".join(self.cfg.tasks), name, b.host, b.port)
        return True

    def _run(self, jobs: list[Job]) -> None:
        """Answer the expired jobs with deadline_exceeded and compute the rest in one engine call."""
        now = time.monotonic()
        live = []
        for job in jobs:
            if job.delivery.deadline is not None and now >= job.delivery.deadline:
                waited = (now - job.delivery.received) * 1000
                req = job.request
                self._finish(job, protocol.error_response(
                    "deadline_exceeded", f"the deadline passed after {waited:.0f} ms in the queue; not "
                    "computed", req.id, req.task.name, self.topics.node, req.source))
            else:
                live.append(job)
        if not live:
            return
        started = time.monotonic()
        outcomes = self._infer(live)
        latency = (time.monotonic() - started) * 1000
        self.stats.count("computed", len(live))
        self.stats.count("batches")
        name = self.model_info["name"] if self.model_info else ""
        for job, outcome in zip(live, outcomes, strict=True):
            req = job.request
            queue_ms = (started - job.delivery.received) * 1000
            if isinstance(outcome, tuple):
                payload = protocol.error_response(outcome[0], outcome[1], req.id, req.task.name,
                                                  self.topics.node, req.source)
            else:
                payload = protocol.ok_response(req, outcome, self.topics.node, name, latency, queue_ms)
                self.stats.observe(latency, queue_ms)
            self._finish(job, payload)

    def _infer(self, jobs: list[Job]) -> list[list[dict[str, Any]] | tuple[str, str]]:
        """Per job: its results in item order, or (code, message) when the engine refused it.
        A failing micro-batch is retried job by job so one bad request cannot fail its neighbours."""
        try:
            first = jobs[0].request
            if first.task.kind == "classify":
                texts = [item.text for job in jobs for item in job.request.items]
                flat = self.model.classify_batch(texts, list(first.labels), first.task.prompt)
                out, start = [], 0
                for job in jobs:
                    n = len(job.request.items)
                    out.append([protocol.classify_result(r) for r in flat[start:start + n]])
                    start += n
                return out
            return [[self._generate(job.request, item) for item in job.request.items] for job in jobs]
        except Exception as exc:
            if len(jobs) > 1:
                return [outcome for job in jobs for outcome in self._infer([job])]
            if isinstance(exc, ValueError):  # the engine's word for "this input cannot be run"
                return [("bad_request", str(exc))]
            log.exception("inference failed for request %r", jobs[0].request.id)
            return [("internal", f"inference failed: {type(exc).__name__}")]

    def _generate(self, request: Request, item: protocol.Item) -> dict[str, Any]:
        started = time.monotonic()
        if item.messages is not None:
            c = self.model.complete(messages=[dict(m) for m in item.messages], **request.generation)
        else:
            template = request.task.prompt
            prompt = template.replace("{text}", item.text) if template else item.text
            c = self.model.complete(prompt=prompt, **request.generation)
        self.stats.generated(c.completion_tokens, time.monotonic() - started)
        return protocol.generate_result(c.text, c.finish_reason, c.usage)

    # --- lifecycle

    def stop(self) -> None:
        """Ask `run()` to shut down cleanly; safe to call from any thread, more than once."""
        self._stop_requested.set()

    def run(self) -> int:
        """Serve until `stop()` (or a model that fails to load); returns the process exit code."""
        self._connect()
        self.worker.start()
        period = sdnotify.watchdog_period()
        interval = self.cfg.node.health_interval
        next_health = time.monotonic() + min(interval, 5.0)  # a first report soon after start
        while not self._stop_requested.is_set():
            now = time.monotonic()
            if now >= next_health:
                self._publish_health()
                next_health = now + interval
            if period:
                sdnotify.notify("WATCHDOG=1")
            wait = next_health - time.monotonic()
            self._stop_requested.wait(max(0.0, min(wait, period) if period else wait))
        failed = self.model_state == "failed"
        self._shutdown()
        return 1 if failed else 0

    def _shutdown(self, timeout: float = 10.0) -> None:
        """Finish the batch in work, leave queued requests unacknowledged (the broker redelivers them),
        publish `offline` and disconnect (a clean disconnect: no Last Will)."""
        sdnotify.notify("STOPPING=1", "STATUS=stopping")
        self._stopping.set()
        left = self.queue.close()
        if left:
            log.info("%d queued request(s) left unacknowledged for redelivery", len(left))
        self.worker.join()
        deadline = time.monotonic() + timeout
        with self._acked:  # let the answers already sent reach the broker, so their requests get acked
            self._acked.wait_for(lambda: not self._connected or not self._awaiting_acks(), timeout)
            connected = self._connected
        if connected:
            info = self.client.publish(self.topics.status, protocol.OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish offline: %s", exc)
        self.client.disable_logger()  # paho reports its own loop noticing the closed socket as an error
        self.client.disconnect()
        self.client.loop_stop()
        log.info("stopped")
