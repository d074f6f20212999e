"""Protocol v1: topics, request validation (fuzzed with hypothesis), and response payloads."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgebit.mqtt import protocol
from edgebit.mqtt.config import Limits, TaskSpec
from edgebit.mqtt.protocol import Request, RequestError, Topics

LIMITS = Limits(payload_bytes=4096, batch_items=4, text_chars=200, max_tokens=64)
TASKS = {
    "mood": TaskSpec("mood", "classify", prompt="Message: {text}\nMood:", labels=("calm", "alert", "panic")),
    "echo": TaskSpec("echo", "generate", generation={"temperature": 0.0, "max_tokens": 16}),
}
TOPICS = Topics("edgebit", "pi5-a")


def parse(obj: object, task: str = "mood", limits: Limits = LIMITS) -> Request:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return protocol.parse_request(data, task, TASKS, limits)


def error_of(obj: object, task: str = "mood", limits: Limits = LIMITS) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(obj, task, limits)
    return info.value


# --- topics


def test_topic_tree() -> None:
    assert TOPICS.request("mood") == "edgebit/v1/req/mood"
    assert TOPICS.node_request("mood") == "edgebit/v1/node/pi5-a/req/mood"
    assert TOPICS.response("mood") == "edgebit/v1/res/mood"
    assert TOPICS.result("mood") == "edgebit/v1/result/mood"
    assert (TOPICS.status, TOPICS.info, TOPICS.health) == (
        "edgebit/v1/node/pi5-a/status", "edgebit/v1/node/pi5-a/info", "edgebit/v1/node/pi5-a/health")
    assert TOPICS.request_filters("edgebit") == ["$share/edgebit/edgebit/v1/req/+", "edgebit/v1/node/pi5-a/req/+"]
    assert TOPICS.request_filters(None) == ["edgebit/v1/req/+", "edgebit/v1/node/pi5-a/req/+"]


@pytest.mark.parametrize(("topic", "task"), [
    ("edgebit/v1/req/mood", "mood"),
    ("edgebit/v1/node/pi5-a/req/echo", "echo"),
    ("edgebit/v1/node/other/req/echo", None),
    ("edgebit/v1/req/mood/extra", None),
    ("edgebit/v1/res/mood", None),
    ("sensors/kitchen/text", None),
])
def test_task_of_request_topics(topic: str, task: str | None) -> None:
    assert TOPICS.task_of(topic) == task


@pytest.mark.parametrize(("topic", "ok"), [
    ("reply/sensor-7", True),
    ("reply/+", False),
    ("reply/#", False),
    ("$SYS/broker", False),
    ("", False),
    ("edgebit/v1/req/mood", False),  # this node's own request topic: it would answer itself
    ("edgebit/v1/node/pi5-a/req/mood", False),
    ("edgebit/v1/res/mood", True),
    ("x" * 2000, False),
])
def test_reply_topics_that_could_loop_or_are_invalid_are_refused(topic: str, ok: bool) -> None:
    assert protocol.valid_reply_topic(topic, TOPICS.request_filters("edgebit")) is ok


# --- valid requests


def test_classification_request() -> None:
    req = parse({"v": 1, "id": "r1", "text": "boiler 95C", "deadline_ms": 5000, "extra": {"ignored": True}})
    assert req.task.name == "mood" and req.id == "r1" and not req.batch
    assert [i.text for i in req.items] == ["boiler 95C"]
    assert req.labels == ("calm", "alert", "panic") and req.deadline_ms == 5000
    assert req.batch_key == ("mood", ("calm", "alert", "panic"))


def test_request_labels_override_the_task_labels() -> None:
    req = parse({"v": 1, "text": "x", "labels": ["normal", "critical"]})
    assert req.labels == ("normal", "critical") and req.id is None
    assert req.batch_key == ("mood", ("normal", "critical"))


def test_batch_request_keeps_item_order_and_ids() -> None:
    req = parse({"v": 1, "id": "b", "items": [{"id": "a", "text": "one"}, {"text": "two"}]})
    assert req.batch and [(i.id, i.text) for i in req.items] == [("a", "one"), (None, "two")]


def test_generation_request_merges_task_defaults_and_caps_tokens() -> None:
    req = parse({"v": 1, "prompt": "hello", "temperature": 0.7, "stop": "\n"}, "echo")
    assert req.items[0].text == "hello"
    assert req.generation == {"max_tokens": 16, "temperature": 0.7, "stop": ["\n"]}
    assert req.batch_key is None
    chat = parse({"v": 1, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}, "echo")
    assert chat.items[0].messages == ({"role": "user", "content": "hi"},)
    assert chat.generation["max_tokens"] == 64


def test_reply_to_is_kept_for_mqtt_311_clients() -> None:
    assert parse({"v": 1, "text": "x", "reply_to": "sensors/7/answer"}).reply_to == "sensors/7/answer"


# --- invalid requests


@pytest.mark.parametrize(("payload", "code", "routable", "message"), [
    (b"\xff\xfe", "bad_request", False, "not valid UTF-8"),
    (b"{not json", "bad_request", False, "not valid JSON"),
    (b'{"v": 1, "text": NaN}', "bad_request", False, "not valid JSON"),
    (b"[" * 3000 + b"]" * 3000, "payload_too_large", False, "exceeds the limit"),
    (b"[1, 2]", "bad_request", False, "must be a JSON object, got an array"),
    (b'"text"', "bad_request", False, "must be a JSON object, got a string"),
    (b"x" * 5000, "payload_too_large", False, "5000 bytes exceeds the limit of 4096"),
])
def test_undecodable_payloads(payload: bytes, code: str, routable: bool, message: str) -> None:
    err = error_of(payload)
    assert (err.code, err.routable) == (code, routable) and message in err.message


def test_deep_nesting_within_the_size_limit_is_a_bad_request() -> None:
    deep = b"[" * 2000 + b"]" * 2000
    err = error_of(deep, limits=Limits(payload_bytes=8192))
    assert err.code == "bad_request" and "nested too deeply" in err.message


@pytest.mark.parametrize(("obj", "code", "message"), [
    ({"text": "x"}, "bad_request", "field 'v' is required"),
    ({"v": 2, "text": "x"}, "bad_request", "field 'v' must be 1"),
    ({"v": True, "text": "x"}, "bad_request", "field 'v' must be 1"),
    ({"v": 1}, "bad_request", "field 'text' is required"),
    ({"v": 1, "text": 42}, "bad_request", "field 'text' must be a string, got a number"),
    ({"v": 1, "text": "  "}, "bad_request", "field 'text' must not be empty"),
    ({"v": 1, "text": "x" * 201}, "payload_too_large", "201 characters; the limit is 200"),
    ({"v": 1, "text": "\ud800"}, "bad_request", "lone surrogate"),
    ({"v": 1, "id": 7, "text": "x"}, "bad_request", "field 'id' must be a string"),
    ({"v": 1, "id": "x" * 129, "text": "x"}, "bad_request", "field 'id' must be a string"),
    ({"v": 1, "text": "x", "labels": ["one"]}, "bad_request", "field 'labels' needs 2 to 32"),
    ({"v": 1, "text": "x", "labels": "a,b"}, "bad_request", "field 'labels' must be an array"),
    ({"v": 1, "text": "x", "deadline_ms": -1}, "bad_request", "field 'deadline_ms'"),
    ({"v": 1, "text": "x", "deadline_ms": 1.5}, "bad_request", "field 'deadline_ms'"),
    ({"v": 1, "text": "x", "reply_to": 5}, "bad_request", "field 'reply_to'"),
    ({"v": 1, "items": []}, "bad_request", "field 'items' must be a non-empty array"),
    ({"v": 1, "items": [{"text": "a"}] * 5}, "payload_too_large", "5 items; the limit is 4"),
    ({"v": 1, "items": [{"text": "a"}, "b"]}, "bad_request", "'items[1]' must be an object"),
    ({"v": 1, "items": [{"text": "a"}, {"txt": "b"}]}, "bad_request", "field 'items[1].text' is required"),
])
def test_invalid_classification_requests(obj: dict, code: str, message: str) -> None:
    err = error_of(obj)
    assert err.code == code and message in err.message and err.routable


@pytest.mark.parametrize(("obj", "message"), [
    ({"v": 1}, "give exactly one of 'prompt'"),
    ({"v": 1, "prompt": "a", "messages": []}, "give exactly one of 'prompt'"),
    ({"v": 1, "messages": []}, "field 'messages' must be an array of 1 to 64"),
    ({"v": 1, "messages": [{"role": "robot", "content": "x"}]}, "messages[0]['role'] is 'robot'"),
    ({"v": 1, "messages": [{"role": "user", "content": 1}]}, "messages[0]['content'] must be a str"),
    ({"v": 1, "prompt": "a", "max_tokens": 65}, "field 'max_tokens' must be between 0 and 64"),
    ({"v": 1, "prompt": "a", "max_tokens": True}, "field 'max_tokens' must be an integer"),
    ({"v": 1, "prompt": "a", "temperature": "hot"}, "field 'temperature' must be a number"),
    ({"v": 1, "prompt": "a", "stop": ["x"] * 9}, "field 'stop' must be a string or up to 8"),
])
def test_invalid_generation_requests(obj: dict, message: str) -> None:
    err = error_of(obj, "echo")
    assert err.code == "bad_request" and message in err.message


def test_errors_keep_what_is_known_for_routing() -> None:
    err = error_of({"v": 1, "id": "r9", "reply_to": "back/here"}, "nosuch")
    assert (err.code, err.request_id, err.reply_to, err.routable) == ("unknown_task", "r9", "back/here", True)
    assert "no task 'nosuch'" in err.message and "echo, mood" in err.message


# --- tap mode


def test_tap_messages_are_plain_text_or_json_with_text() -> None:
    task = TASKS["mood"]
    req = protocol.parse_tap(b"kitchen smoke", "sensors/k/text", task, LIMITS)
    assert req.items[0].text == "kitchen smoke" and req.source == "sensors/k/text" and req.id is None
    req = protocol.parse_tap(b'{"id": "t1", "text": "hot"}', "sensors/k/text", task, LIMITS)
    assert (req.id, req.items[0].text) == ("t1", "hot")
    req = protocol.parse_tap(b'{"temp": 95}', "sensors/k/text", task, LIMITS)
    assert req.items[0].text == '{"temp": 95}'
    with pytest.raises(RequestError, match="not valid UTF-8") as info:
        protocol.parse_tap(b"\xc3\x28", "sensors/k/text", task, LIMITS)
    assert info.value.routable


# --- fuzzing: every input ends in a Request or a RequestError, never anything else

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
field_values = json_values | st.sampled_from([1, "x", "", "\ud800", ["a", "b"], [{"text": "a"}], 10**400])
request_objects = st.fixed_dictionaries({}, optional={
    "v": st.sampled_from([1, 1, 1, 2, "1", True, None]),
    "id": field_values, "text": field_values, "prompt": field_values, "messages": field_values,
    "labels": field_values, "items": field_values, "deadline_ms": field_values, "reply_to": field_values,
    "max_tokens": field_values, "temperature": field_values, "stop": field_values,
})


def _check(payload: bytes, task: str) -> None:
    try:
        req = protocol.parse_request(payload, task, TASKS, LIMITS)
    except RequestError as err:
        assert err.code in protocol.RETRYABLE and err.message
        body = protocol.error_response(err.code, err.message, err.request_id, task, "n")
        assert json.loads(protocol.encode(body))["error"]["code"] == err.code
        return
    assert isinstance(req, Request) and req.items and all(len(i.text or "") <= LIMITS.text_chars for i in req.items)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.sampled_from(["mood", "echo", "nosuch"]))
def test_fuzz_arbitrary_bytes(payload: bytes, task: str) -> None:
    _check(payload, task)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.sampled_from(["mood", "echo"]))
def test_fuzz_arbitrary_json(value: object, task: str) -> None:
    _check(json.dumps(value).encode(), task)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(request_objects, st.sampled_from(["mood", "echo"]))
def test_fuzz_request_shaped_objects(obj: dict, task: str) -> None:
    try:
        payload = json.dumps(obj).encode("utf-8", "surrogatepass")
    except ValueError:  # integers too large for str(): still a payload to parse
        payload = repr(obj).encode("utf-8", "surrogatepass")
    _check(payload, task)


@settings(max_examples=50, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=1, max_value=20000), st.sampled_from([b"[", b"{\"a\":", b"[{\"x\":"]))
def test_fuzz_deep_nesting_and_huge_strings(depth: int, opener: bytes) -> None:
    _check(opener * depth, "mood")
    _check(b'{"v":1,"text":"' + b"a" * depth + b'"}', "mood")


# --- deadlines and responses


def test_deadline_is_the_earlier_of_deadline_ms_and_message_expiry() -> None:
    assert protocol.deadline_at(100.0, None, None) is None
    assert protocol.deadline_at(100.0, 2500, None) == 102.5
    assert protocol.deadline_at(100.0, None, 3) == 103.0
    assert protocol.deadline_at(100.0, 5000, 3) == 103.0
    assert protocol.deadline_at(100.0, 0, None) == 100.0


def test_success_responses() -> None:
    req = parse({"v": 1, "id": "r1", "text": "x"})
    result = protocol.classify_result({"label": "calm", "scores": {"calm": 0.9000004, "alert": 0.05, "panic": 0.05}})
    body = protocol.ok_response(req, [result], "pi5-a", "bitnet", 840.4, 12.2)
    assert body == {"v": 1, "id": "r1", "status": "ok", "task": "mood", "label": "calm",
                    "scores": {"calm": 0.9, "alert": 0.05, "panic": 0.05}, "model": "bitnet", "node": "pi5-a",
                    "latency_ms": 840, "queue_ms": 12}
    batch = parse({"v": 1, "id": "b", "items": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]})
    body = protocol.ok_response(batch, [result, result], "n", "m", 1, 1)
    assert [r["id"] for r in body["results"]] == ["a", "b"] and "label" not in body
    gen = protocol.generate_result("hi", "stop", {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
    assert gen == {"text": "hi", "finish_reason": "stop",
                   "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def test_error_responses_carry_code_and_retryability() -> None:
    body = protocol.error_response("overloaded", "queue full", "r1", "mood", "pi5-a")
    assert body["status"] == "error" and body["error"] == {"code": "overloaded", "message": "queue full",
                                                           "retryable": True}
    assert not protocol.error_response("bad_request", "x")["error"]["retryable"]
    assert set(protocol.RETRYABLE) == {"bad_request", "payload_too_large", "unknown_task", "overloaded",
                                       "deadline_exceeded", "model_not_loaded", "internal"}


def test_encoding_is_compact_utf8_json_without_nan() -> None:
    data = protocol.encode({"v": 1, "text": "Grüße \ud800", "x": float("nan")})
    assert json.loads(data) == {"v": 1, "text": "Grüße ?", "x": None}
    assert "Grüße".encode() in data


def test_publish_size_bounds_the_packet() -> None:
    small = protocol.publish_size("a/b", 100, None, mqtt5=False)
    assert small >= 100 + 3 + 2
    assert protocol.publish_size("a/b", 100, b"corr", mqtt5=True) > small


def test_info_payload_lists_tasks_labels_and_limits() -> None:
    info = protocol.info_payload("pi5-a", "0.1.0", "ready", {"name": "m", "sha256": "ab"}, "dense", 4, TASKS, LIMITS,
                                 8, TOPICS)
    assert info["tasks"]["mood"]["labels"] == ["calm", "alert", "panic"] and "error" not in info
    assert (info["backend"], info["threads"]) == ("dense", 4)
    assert info["tasks"]["echo"] == {"kind": "generate", "topic": "edgebit/v1/req/echo", "inputs": []}
    assert info["limits"]["queue_size"] == 8 and info["model"]["sha256"] == "ab" and info["v"] == 1


def test_fingerprint_tells_duplicates_from_reused_ids() -> None:
    """A duplicate asks the same thing (whatever its deadline or route); another text, labels or
    generation setting under the same id is another request."""
    base = {"v": 1, "id": "r1", "text": "boiler 95C"}
    same = parse(base).fingerprint
    assert parse({**base, "deadline_ms": 500, "reply_to": "answers/x"}).fingerprint == same
    assert parse(dict(reversed(base.items()))).fingerprint == same
    others = [{**base, "text": "boiler 20C"}, {**base, "labels": ["calm", "alert"]},
              {"v": 1, "id": "r1", "items": [{"text": "boiler 95C"}]}]
    assert len({same} | {parse(o).fingerprint for o in others}) == 4
    echo = {"v": 1, "id": "g", "prompt": "hi"}
    assert parse(echo, "echo").fingerprint != parse({**echo, "temperature": 0.5}, "echo").fingerprint
    assert parse(echo, "echo").fingerprint != parse({**echo, "id": "h"}, "echo").fingerprint  # the id is part of it
