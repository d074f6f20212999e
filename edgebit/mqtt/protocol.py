"""Protocol v1 of edgebit over MQTT: topic names, request parsing and validation, response payloads.

Pure functions over bytes and dicts, no I/O: the service decides when to call them, this module
decides what the messages look like (see the contract in MQTT_PROTOCOL.md). Every payload is
hostile until proven otherwise: sizes are checked before decoding, every field's type and range
is checked before use, and nothing here raises anything but `RequestError`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from paho.mqtt.client import topic_matches_sub

from ..chat import validate_messages
from .config import FieldError, Limits, TaskSpec, check_generation, check_labels, utf8_ok

VERSION = 1
CONTENT_TYPE = "application/json"
ONLINE, OFFLINE = "online", "offline"
MAX_ID_CHARS = 128
MAX_TOPIC_BYTES = 1024
MAX_DEADLINE_MS = 86_400_000
MAX_MESSAGES = 64
DEFAULT_MAX_TOKENS = 128  # when neither the request nor the task says (capped by limits.max_tokens)

# Error codes and whether the same request may succeed if sent again later.
RETRYABLE = {
    "bad_request": False,
    "payload_too_large": False,
    "unknown_task": False,
    "overloaded": True,
    "deadline_exceeded": True,
    "model_not_loaded": True,
    "internal": False,
}


class RequestError(Exception):
    """A request that cannot be served, with what is known of it for routing the error response.

    `routable`: the payload was a JSON object, so the default response topic applies even without
    a reply_to (for garbage, only an MQTT 5 Response Topic is a known route).
    """

    def __init__(self, code: str, message: str, request_id: str | None = None, reply_to: str | None = None,
                 routable: bool = False) -> None:
        assert code in RETRYABLE, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.reply_to = reply_to
        self.routable = routable


class _Invalid(Exception):
    """A field of a request that passed decoding is unusable (turned into a RequestError)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Topics:
    """The topic tree of one node: `{prefix}/v1/...`."""

    prefix: str
    node: str

    def request(self, task: str) -> str:
        return f"{self.prefix}/v1/req/{task}"

    def node_request(self, task: str) -> str:
        return f"{self.prefix}/v1/node/{self.node}/req/{task}"

    def response(self, task: str) -> str:
        """The response topic when a request names no route of its own."""
        return f"{self.prefix}/v1/res/{task}"

    def result(self, task: str) -> str:
        return f"{self.prefix}/v1/result/{task}"

    @property
    def status(self) -> str:
        return f"{self.prefix}/v1/node/{self.node}/status"

    @property
    def info(self) -> str:
        return f"{self.prefix}/v1/node/{self.node}/info"

    @property
    def health(self) -> str:
        return f"{self.prefix}/v1/node/{self.node}/health"

    def request_filters(self, shared_group: str | None) -> list[str]:
        """Subscriptions for requests: the pool (shared when a group is given) and this node's own."""
        pool = self.request("+")
        if shared_group:
            pool = f"$share/{shared_group}/{pool}"
        return [pool, self.node_request("+")]

    def task_of(self, topic: str) -> str | None:
        """The task name of a request topic (pool or node-addressed), None for any other topic."""
        for pattern in (self.request(""), self.node_request("")):
            if topic.startswith(pattern) and "/" not in topic[len(pattern):]:
                return topic[len(pattern):]
        return None


@dataclass(frozen=True)
class Item:
    """One unit of work: a text to classify or a prompt / chat to continue."""

    id: str | None
    text: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None


@dataclass(frozen=True)
class Request:
    """A validated request, ready for the engine."""

    task: TaskSpec
    id: str | None
    items: tuple[Item, ...]
    batch: bool = False  # answered with "results" (it came with "items")
    labels: tuple[str, ...] = ()
    generation: Mapping[str, Any] = field(default_factory=dict)
    deadline_ms: int | None = None
    reply_to: str | None = None
    source: str | None = None  # the input topic of a tap message

    @property
    def fingerprint(self) -> str:
        """A digest of what the request asks (task, id, items, labels, generation settings), not of how
        it travels (deadline, reply route): two requests with one id are duplicates only if these agree."""
        content = [self.task.name, self.id, self.batch, list(self.labels), dict(self.generation),
                   [[item.id, item.text, [dict(m) for m in item.messages or ()]] for item in self.items]]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    @property
    def batch_key(self) -> tuple[str, tuple[str, ...]] | None:
        """Requests with equal keys may be classified in one engine call."""
        return (self.task.name, self.labels) if self.task.kind == "classify" else None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(payload: bytes, limits: Limits) -> Any:
    """The JSON value of a payload, after the size check; RequestError (unroutable) otherwise."""
    if len(payload) > limits.payload_bytes:
        raise RequestError("payload_too_large", f"payload of {len(payload)} bytes exceeds the limit of "
                                                f"{limits.payload_bytes} bytes")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError("bad_request", f"payload is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError("bad_request", "payload JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers beyond the digit limit
        raise RequestError("bad_request", f"payload is not valid JSON: {exc}") from None


def parse_request(payload: bytes, task_name: str, tasks: Mapping[str, TaskSpec], limits: Limits) -> Request:
    """Validate a request payload sent to task `task_name`; raises RequestError."""
    obj = decode_json(payload, limits)
    if not isinstance(obj, dict):
        raise RequestError("bad_request", f"payload must be a JSON object, got {_json_type(obj)}")
    reply_to = obj.get("reply_to")
    if not (isinstance(reply_to, str) and 0 < len(reply_to) <= MAX_TOPIC_BYTES and utf8_ok(reply_to)):
        reply_to = None  # an unusable reply_to is reported below, answered on the default topic
    request_id = obj.get("id")
    if "id" in obj and not _valid_id(request_id):
        raise RequestError("bad_request", f"field 'id' must be a string of 1 to {MAX_ID_CHARS} characters",
                           reply_to=reply_to, routable=True)

    def fail(code: str, message: str) -> RequestError:
        return RequestError(code, message, request_id, reply_to, routable=True)

    if "reply_to" in obj and reply_to is None:
        raise fail("bad_request", f"field 'reply_to' must be a topic of 1 to {MAX_TOPIC_BYTES} characters")
    v = obj.get("v")
    if type(v) is not int or v != VERSION:
        raise fail("bad_request", f"field 'v' must be {VERSION} (protocol version)"
                   if "v" in obj else f"field 'v' is required (protocol version {VERSION})")
    task = tasks.get(task_name)
    if task is None:
        known = ", ".join(sorted(tasks)) or "none"
        raise fail("unknown_task", f"no task {task_name!r} on this node (tasks: {known})")
    deadline = obj.get("deadline_ms")
    if "deadline_ms" in obj and not (type(deadline) is int and 0 <= deadline <= MAX_DEADLINE_MS):
        raise fail("bad_request", f"field 'deadline_ms' must be an integer from 0 to {MAX_DEADLINE_MS}")
    try:
        if "items" in obj:
            items = _items(obj["items"], task, limits)
        else:
            items = (_item(obj, task, limits, request_id),)
        labels = _labels(obj, task)
        generation = _generation(obj, task, limits)
    except _Invalid as exc:
        raise fail(exc.code, exc.message) from None
    return Request(task=task, id=request_id, items=items, batch="items" in obj, labels=labels,
                   generation=generation, deadline_ms=deadline, reply_to=reply_to)


def parse_tap(payload: bytes, source: str, task: TaskSpec, limits: Limits) -> Request:
    """A message from a tap input topic: plain UTF-8 text, or a JSON object with "text" (and "id")."""
    if len(payload) > limits.payload_bytes:
        raise RequestError("payload_too_large", f"payload of {len(payload)} bytes exceeds the limit of "
                                                f"{limits.payload_bytes} bytes", routable=True)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError("bad_request", f"payload is not valid UTF-8 (byte {exc.start})",
                           routable=True) from None
    obj: Any = None
    if text.lstrip().startswith("{"):
        try:
            obj = decode_json(payload, limits)
        except RequestError:
            obj = None  # not JSON after all: the text itself is the message
    request_id = None
    if isinstance(obj, dict) and "text" in obj:
        request_id = obj["id"] if _valid_id(obj.get("id")) else None
        text = obj["text"]
    try:
        item = _item({"text": text}, task, limits, request_id)
        generation = _generation({}, task, limits)
    except _Invalid as exc:
        raise RequestError(exc.code, exc.message, request_id, routable=True) from None
    return Request(task=task, id=request_id, items=(item,), labels=task.labels, generation=generation,
                   source=source)


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and utf8_ok(value)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _text(value: Any, name: str, limits: Limits) -> str:
    if not isinstance(value, str):
        raise _Invalid("bad_request", f"field '{name}' must be a string, got {_json_type(value)}")
    if not value.strip():
        raise _Invalid("bad_request", f"field '{name}' must not be empty")
    if len(value) > limits.text_chars:
        raise _Invalid("payload_too_large", f"field '{name}' has {len(value)} characters; the limit is "
                                              f"{limits.text_chars}")
    if not utf8_ok(value):
        raise _Invalid("bad_request", f"field '{name}' holds a lone surrogate (not Unicode text)")
    return value


def _item(obj: Mapping[str, Any], task: TaskSpec, limits: Limits, item_id: str | None,
          where: str = "") -> Item:
    if task.kind == "classify":
        if "text" not in obj:
            raise _Invalid("bad_request", f"field '{where}text' is required")
        return Item(id=item_id, text=_text(obj["text"], f"{where}text", limits))
    given = [k for k in ("prompt", "text", "messages") if k in obj]
    if len(given) != 1:
        raise _Invalid("bad_request", f"give exactly one of '{where}prompt' (or '{where}text') and "
                                        f"'{where}messages'")
    if given[0] != "messages":
        return Item(id=item_id, text=_text(obj[given[0]], where + given[0], limits))
    messages = obj["messages"]
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES:
        raise _Invalid("bad_request", f"field '{where}messages' must be an array of 1 to {MAX_MESSAGES} "
                                        "messages")
    try:
        pairs = validate_messages(messages)
    except ValueError as exc:  # chat.validate_messages says what is wrong
        raise _Invalid("bad_request", f"field '{where}messages': {exc}") from None
    if not all(utf8_ok(content) for _, content in pairs):
        raise _Invalid("bad_request", f"field '{where}messages' holds a lone surrogate (not Unicode text)")
    total = sum(len(content) for _, content in pairs)
    if total > limits.text_chars:
        raise _Invalid("payload_too_large", f"field '{where}messages' has {total} characters of content; "
                                              f"the limit is {limits.text_chars}")
    return Item(id=item_id, messages=tuple({"role": r, "content": c} for r, c in pairs))


def _items(items: Any, task: TaskSpec, limits: Limits) -> tuple[Item, ...]:
    if not isinstance(items, list) or not items:
        raise _Invalid("bad_request", "field 'items' must be a non-empty array")
    if len(items) > limits.batch_items:
        raise _Invalid("payload_too_large", f"{len(items)} items; the limit is {limits.batch_items}")
    out = []
    for i, it in enumerate(items):
        where = f"items[{i}]."
        if not isinstance(it, dict):
            raise _Invalid("bad_request", f"'items[{i}]' must be an object, got {_json_type(it)}")
        item_id = it.get("id")
        if "id" in it and not _valid_id(item_id):
            raise _Invalid("bad_request", f"field '{where}id' must be a string of 1 to {MAX_ID_CHARS} "
                                            "characters")
        out.append(_item(it, task, limits, item_id, where))
    return tuple(out)


def _labels(obj: Mapping[str, Any], task: TaskSpec) -> tuple[str, ...]:
    if task.kind != "classify":
        return ()
    if "labels" not in obj:
        return task.labels
    labels = obj["labels"]
    problem = check_labels(labels) if isinstance(labels, list) else "must be an array of strings"
    if problem:
        raise _Invalid("bad_request", f"field 'labels' {problem}")
    return tuple(labels)


def _generation(obj: Mapping[str, Any], task: TaskSpec, limits: Limits) -> dict[str, Any]:
    if task.kind != "generate":
        return {}
    try:
        given = check_generation(obj, limits)
    except FieldError as exc:
        raise _Invalid("bad_request", f"field '{exc.name}' {exc.problem}") from None
    merged = {"max_tokens": min(DEFAULT_MAX_TOKENS, limits.max_tokens), **task.generation, **given}
    merged["max_tokens"] = min(merged["max_tokens"], limits.max_tokens)
    return merged


def valid_reply_topic(topic: str, own_filters: Sequence[str]) -> bool:
    """A topic a response may be published to: no wildcards, no $-topic, none this node listens to
    (a request must not make the node answer itself)."""
    if not topic or topic.startswith("$") or "+" in topic or "#" in topic or "\0" in topic:
        return False
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        return False
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(topic_matches_sub(_unshared(f), topic) for f in own_filters)


def _unshared(topic_filter: str) -> str:
    """`$share/group/a/+` → `a/+` (the filter a shared subscription matches with)."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def deadline_at(received: float, deadline_ms: int | None, expiry_s: int | None) -> float | None:
    """The monotonic time after which a request is not worth computing: its `deadline_ms` counted
    from reception, or the remaining MQTT 5 Message Expiry Interval, whichever comes first."""
    ends = []
    if deadline_ms is not None:
        ends.append(received + deadline_ms / 1000.0)
    if expiry_s is not None:
        ends.append(received + expiry_s)
    return min(ends) if ends else None


# --- responses


def classify_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a classification answer; scores rounded to 6 decimals."""
    scores = {label: round(float(p), 6) for label, p in result["scores"].items()}
    return {"label": result["label"], "scores": scores}


def generate_result(text: str, finish_reason: str, usage: Mapping[str, int]) -> dict[str, Any]:
    """The fields of a generation answer."""
    return {"text": text, "finish_reason": finish_reason, "usage": dict(usage)}


def ok_response(request: Request, results: Sequence[Mapping[str, Any]], node: str, model: str,
                latency_ms: float, queue_ms: float) -> dict[str, Any]:
    """A success response; batch requests get "results" in item order, single ones the fields inline."""
    body: dict[str, Any] = {"v": VERSION, "id": request.id, "status": "ok", "task": request.task.name}
    if request.batch:
        body["results"] = [{"id": item.id, **res} for item, res in zip(request.items, results, strict=True)]
    else:
        body.update(results[0])
    if request.source is not None:
        body["source"] = request.source
    body.update(model=model, node=node, latency_ms=round(latency_ms), queue_ms=round(queue_ms))
    return body


def error_response(code: str, message: str, request_id: str | None = None, task: str | None = None,
                   node: str | None = None, source: str | None = None) -> dict[str, Any]:
    """An error response with one of the protocol's codes."""
    body: dict[str, Any] = {"v": VERSION, "id": request_id, "status": "error"}
    if task is not None:
        body["task"] = task
    if source is not None:
        body["source"] = source
    if node is not None:
        body["node"] = node
    body["error"] = {"code": code, "message": message, "retryable": RETRYABLE[code]}
    return body


def info_payload(node: str, version: str, state: str, model: Mapping[str, Any] | None, backend: str | None,
                 threads: int | None, tasks: Mapping[str, TaskSpec], limits: Limits, queue_size: int,
                 topics: Topics, error: str | None = None) -> dict[str, Any]:
    """The retained description of a node: software, model, backend, tasks with their labels, limits."""
    described = {}
    for name, t in tasks.items():
        described[name] = {"kind": t.kind, "topic": topics.request(name), "inputs": list(t.inputs)}
        if t.kind == "classify":
            described[name]["labels"] = list(t.labels)
    body: dict[str, Any] = {
        "v": VERSION, "node": node, "version": version, "state": state, "model": model, "backend": backend,
        "threads": threads, "tasks": described,
        "limits": {"payload_bytes": limits.payload_bytes, "batch_items": limits.batch_items,
                   "text_chars": limits.text_chars, "max_tokens": limits.max_tokens,
                   "queue_size": queue_size},
    }
    if error is not None:
        body["error"] = error
    return body


def health_payload(node: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The periodic health message."""
    return {"v": VERSION, "node": node, **metrics}


def encode(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON (non-finite floats become null: the output stays valid JSON)."""
    return json.dumps(_finite(payload), ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8", "replace")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def publish_size(topic: str, payload_bytes: int, correlation: bytes | None, mqtt5: bool) -> int:
    """An upper bound of the PUBLISH packet size (QoS 1), to compare with the broker's Maximum Packet Size."""
    props = 0
    if mqtt5:
        props = 2 + (3 + len(CONTENT_TYPE)) + (3 + len(correlation) if correlation else 0) + 4
    body = 2 + len(topic.encode("utf-8", "replace")) + 2 + props + payload_bytes
    return 1 + 4 + body
