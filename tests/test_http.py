"""The OpenAI-compatible HTTP face against a real uvicorn server on a loopback port: the official
`openai` client and curl unchanged, equality with the engine, structured outputs that always
validate, errors in OpenAI's shape, limits, the queue, cancellation, fuzzed bodies and a load run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")
pytest.importorskip("llguidance")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import edgebit  # noqa: E402
from edgebit.engine import Model  # noqa: E402
from edgebit.http.scheduler import Scheduler  # noqa: E402
from edgebit.http.server import load_api_keys, make_server, parse_listen  # noqa: E402
from edgebit.synthetic import write_random_model  # noqa: E402

pytestmark = pytest.mark.timeout(300)
NAME = "tiny-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random model with room for tool instructions (a context of 2048)."""
    return Path(write_random_model(tmp_path_factory.mktemp("http") / "tiny.gguf", "tiny", seed=7, n_ctx=2048))


@pytest.fixture(scope="module")
def model(model_path: Path) -> Model:
    return edgebit.load(model_path, backend="reference")


@contextmanager
def running(model: Model, keys: list[str] | None = None, **limits: int) -> Iterator[tuple[str, Scheduler]]:
    """A server for `model` on a free loopback port; yields its base URL and scheduler."""
    sched_args = {k: limits.pop(k) for k in ("max_active", "max_queue") if k in limits}
    scheduler = Scheduler(model, **sched_args).start()
    port = free_port()
    server = make_server(scheduler, NAME, "127.0.0.1", port, keys or [], **limits)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", scheduler
    finally:
        server.should_exit = True
        thread.join(10)
        scheduler.close()


@pytest.fixture(scope="module")
def server(model: Model) -> Iterator[str]:
    with running(model) as (url, _):
        yield url


@pytest.fixture()
def no_stop_tokens(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random weights may pick EOS at once; tests of length and cancellation need room."""
    monkeypatch.setattr(model.tokenizer, "stop_ids", frozenset())


def post(url: str, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """`response` is OpenAI's error object with `status` (and names `param`)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def sse_events(response: httpx.Response) -> list[Any]:
    """The data of every server-sent event; the last must be [DONE]."""
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


# --- endpoints and equality with the engine


def test_models_health_metrics_docs(server: str) -> None:
    assert httpx.get(server + "/health").json()["status"] == "ok"
    models = httpx.get(server + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == NAME
    assert httpx.get(server + "/docs").status_code == 200
    assert "/v1/chat/completions" in httpx.get(server + "/openapi.json").json()["paths"]
    post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    text = httpx.get(server + "/metrics").text
    for series in ("edgebit_requests_total{", "edgebit_tokens_total{kind=\"completion\"}", "edgebit_queue_depth ",
                   "edgebit_request_duration_seconds_bucket{", "edgebit_time_to_first_token_seconds_count "):
        assert series in text


def test_greedy_completion_equals_generate(server: str, model: Model, no_stop_tokens: None) -> None:
    prompt = "The boiler reports"
    expected = model.generate(prompt=prompt, max_tokens=12, temperature=0)
    body = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0}).json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected
    assert body["choices"][0]["finish_reason"] == "length"
    n_prompt = len(model.tokenizer.encode(prompt, bos=model.tokenizer.add_bos))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 12, "total_tokens": n_prompt + 12}
    with httpx.stream("POST", server + "/v1/completions", timeout=60,
                      json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = sse_events(r)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 12


def test_chat_uses_the_chat_template_and_stop(server: str, model: Model, no_stop_tokens: None) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Status?"}]
    full = model.generate(messages=messages, max_tokens=16, temperature=0)
    body = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 16, "temperature": 0}).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": full}
    stop = full[5:7]
    cut = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 16, "temperature": 0,
                                                "stop": [stop]}).json()["choices"][0]
    assert cut["message"]["content"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


def test_classify_equals_model_classify(server: str, model: Model) -> None:
    labels, prompt = ["normal", "warning", "critical"], "Report: {text}\nState:"
    texts = ["boiler 95C, pressure rising", "all quiet"]
    body = post(server, "/v1/classify", {"input": texts, "labels": labels, "prompt": prompt}).json()
    for i, text in enumerate(texts):
        expected = model.classify(text, labels, prompt)
        assert body["data"][i] == {"index": i, "label": expected["label"], "scores": expected["scores"]}
    one = post(server, "/v1/classify", {"input": texts[0], "labels": labels}).json()["data"]
    assert one[0]["scores"] == model.classify(texts[0], labels)["scores"]
    assert_error(post(server, "/v1/classify", {"input": "x", "labels": ["a", "a"]}), 400, "input")


# --- the official client and curl, unchanged


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def test_openai_client(server: str) -> None:
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [NAME]
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8
    done = client.completions.create(model=NAME, prompt="Once", max_tokens=4, seed=1)
    assert done.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                            stream=True)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                   "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    structured = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Answer"}], max_tokens=64, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(structured.choices[0].message.content), schema)
    called = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Weather in Oslo?"}], max_tokens=96, seed=5,
        tools=[WEATHER], tool_choice="required")
    assert called.choices[0].finish_reason == "tool_calls"
    call = called.choices[0].message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    deltas = list(client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Weather?"}], max_tokens=96, seed=5, tools=[WEATHER],
        tool_choice="required", stream=True))
    [streamed] = [d.choices[0].delta.tool_calls[0] for d in deltas if d.choices[0].delta.tool_calls]
    assert streamed.function.name == "get_weather" and deltas[-1].choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(streamed.function.arguments), WEATHER["function"]["parameters"])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], n=2)
    assert info.value.body["param"] == "n"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(server: str) -> None:
    out = subprocess.run(["curl", "-sS", server + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}'],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out)["choices"][0]["message"]["role"] == "assistant"
    streamed = subprocess.run(["curl", "-sSN", server + "/v1/completions", "-d",
                               '{"prompt": "Hi", "max_tokens": 3, "stream": true}'],
                              capture_output=True, text=True, timeout=60, check=True).stdout
    assert streamed.rstrip().endswith("data: [DONE]") and streamed.startswith("data: {")


# --- structured outputs


SCHEMAS = [
    {"type": "object", "properties": {  # nested objects
        "device": {"type": "object", "properties": {"id": {"type": "string", "maxLength": 8},
                                                    "zone": {"type": "integer", "minimum": 1, "maximum": 9}},
                   "required": ["id", "zone"], "additionalProperties": False},
        "ok": {"type": "boolean"}}, "required": ["device", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {  # arrays
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        "counts": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000}, "maxItems": 4}},
     "required": ["tags", "counts"], "additionalProperties": False},
    {"type": "object", "properties": {  # enums
        "category": {"enum": ["billing", "support", "spam", "other"]},
        "priority": {"type": "string", "enum": ["low", "high"]}},
     "required": ["category", "priority"], "additionalProperties": False},
    {"type": "object", "properties": {  # numbers
        "total": {"type": "number", "minimum": 0, "maximum": 100000},
        "vat": {"type": "number", "minimum": 0, "maximum": 1},
        "lines": {"type": "integer", "minimum": 1, "maximum": 50}},
     "required": ["total", "vat", "lines"], "additionalProperties": False},
    {"type": "object", "properties": {  # required and optional fields
        "invoice": {"type": "string", "maxLength": 10}, "currency": {"enum": ["EUR", "USD"]},
        "note": {"type": "string", "maxLength": 5}},
     "required": ["invoice", "currency"], "additionalProperties": False},
]


def test_structured_outputs_always_validate(server: str) -> None:
    """200 requests over 5 schemas on a random model: every reply parses and validates."""
    def one(i: int) -> tuple[str, dict[str, Any]]:
        schema = SCHEMAS[i % len(SCHEMAS)]
        body = post(server, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": f"Item {i}"}], "max_tokens": 400, "temperature": 1.0,
            "seed": i, "response_format": {"type": "json_schema",
                                           "json_schema": {"name": f"s{i % 5}", "schema": schema, "strict": True}}})
        assert body.status_code == 200, body.text
        choice = body.json()["choices"][0]
        return choice["finish_reason"], schema, choice["message"]["content"]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(200)))
    for finish, schema, content in results:
        assert finish == "stop", content
        jsonschema.validate(json.loads(content), schema)
    object_reply = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                         "max_tokens": 300, "seed": 1,
                                                         "response_format": {"type": "json_object"}}).json()
    choice = object_reply["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_tool_choice_auto_and_named(server: str) -> None:
    other = {"type": "function", "function": {"name": "set_alarm", "parameters": {
        "type": "object", "properties": {"minutes": {"type": "integer", "minimum": 0, "maximum": 600}},
        "required": ["minutes"], "additionalProperties": False}}}
    named = post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "wake me"}], "max_tokens": 96, "seed": 2, "tools": [WEATHER, other],
        "tool_choice": {"type": "function", "function": {"name": "set_alarm"}}}).json()["choices"][0]
    call = named["message"]["tool_calls"][0]["function"]
    assert named["finish_reason"] == "tool_calls" and call["name"] == "set_alarm"
    jsonschema.validate(json.loads(call["arguments"]), other["function"]["parameters"])
    for seed in range(4):
        auto = post(server, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "seed": seed,
            "tools": [WEATHER, other]}).json()["choices"][0]
        if auto["finish_reason"] == "tool_calls":
            fn = auto["message"]["tool_calls"][0]["function"]
            schema = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, other)}[fn["name"]]
            jsonschema.validate(json.loads(fn["arguments"]), schema)
        else:
            assert auto["finish_reason"] in ("stop", "length") and isinstance(auto["message"]["content"], str)
    cut = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 96,
                                                "tools": [WEATHER], "tool_choice": "required", "stop": ['"']})
    assert cut.status_code == 200 and cut.json()["choices"][0]["message"]["content"] == "{"  # cut: plain text
    assert_error(post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "nope"}}}), 400, "tool_choice")
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                      "response_format": bad_schema}), 400, "response_format")


# --- errors, limits, the queue, cancellation


def test_errors_are_openai_error_objects(server: str, model: Model) -> None:
    chat = "/v1/chat/completions"
    assert_error(post(server, chat, {"messages": []}), 400, "messages")
    assert_error(post(server, chat, {"messages": [{"role": "user", "content": "x"}], "temperature": 3}), 400,
                 "temperature")
    assert_error(post(server, chat, {"messages": [{"role": "bot", "content": "x"}]}), 400, "messages[0].role")
    assert_error(post(server, "/v1/completions", {"prompt": "x", "max_tokens": -1}), 400, "max_tokens")
    assert_error(post(server, "/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), 400, "stop")
    assert_error(post(server, "/v1/completions", {"prompt": [1, 10**9]}), 400, "prompt")
    assert_error(httpx.post(server + chat, content=b"{not json", timeout=30), 400)
    assert_error(httpx.post(server + chat, content=b"[1, 2]", timeout=30), 400)
    assert_error(httpx.post(server + chat, content=b"[" * 200_000, timeout=30), 400)  # deeper than the parser goes
    long = post(server, "/v1/completions", {"prompt": "a " * 3000, "max_tokens": 1})
    assert assert_error(long, 400, "prompt")["code"] == "context_length_exceeded"
    assert_error(httpx.get(server + "/v1/nothing", timeout=30), 404)
    assert_error(httpx.get(server + chat, timeout=30), 405)
    assert post(server, "/v1/completions", {"prompt": "still alive", "max_tokens": 1}).status_code == 200


def test_api_keys_and_body_limit(model: Model, tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# one key per line\nsecret-1\n")
    keys = load_api_keys(key_file, environ={"EDGEBIT_API_KEYS": "secret-2, secret-3"})
    assert keys == ["secret-2", "secret-3", "secret-1"]
    with running(model, keys=keys, max_body=2048) as (url, _):
        body = {"prompt": "x", "max_tokens": 1}
        assert assert_error(post(url, "/v1/completions", body), 401)["type"] == "authentication_error"
        assert_error(post(url, "/v1/completions", body, headers={"Authorization": "Bearer wrong"}), 401)
        for key in keys:
            assert post(url, "/v1/completions", body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        client = openai.OpenAI(base_url=url + "/v1", api_key="secret-1")
        assert client.completions.create(model=NAME, prompt="x", max_tokens=1).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope").models.list()
        big = {"prompt": "x" * 5000, "max_tokens": 1}
        assert_error(post(url, "/v1/completions", big, headers={"Authorization": "Bearer secret-1"}), 413)
        chunked = httpx.post(url + "/v1/completions", content=iter([b'{"prompt": "', b"x" * 4000, b'"}']),
                             headers={"Authorization": "Bearer secret-1"}, timeout=30)
        assert_error(chunked, 413)


def test_full_queue_answers_429_with_retry_after(model: Model) -> None:
    with running(model, max_active=1, max_queue=1) as (url, scheduler):
        gate = threading.Event()
        scheduler.call(lambda m: gate.wait(30))  # the worker is busy until the gate opens
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, url, "/v1/completions", {"prompt": "x", "max_tokens": 1})
            wait_for(lambda: scheduler.depth[0] == 1)
            refused = post(url, "/v1/completions", {"prompt": "y", "max_tokens": 1})
            assert assert_error(refused, 429)["type"] == "rate_limit_error"
            assert int(refused.headers["Retry-After"]) >= 1
            gate.set()
            assert first.result().status_code == 200
        assert post(url, "/v1/completions", {"prompt": "y", "max_tokens": 1}).status_code == 200


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_disconnect_cancels_the_sequence(model: Model, no_stop_tokens: None) -> None:
    with running(model) as (url, scheduler):
        before = scheduler.metrics._tokens["completion"]
        port = int(url.rsplit(":", 1)[1])
        for stream in (True, False):
            body = json.dumps({"prompt": "x", "max_tokens": 1500, "stream": stream}).encode()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                wait_for(lambda: scheduler.depth[1] == 1)  # decoding; now the client goes away
            wait_for(lambda: scheduler.depth == (0, 0))
        # cancelled sequences are dropped, not finished: no completion tokens were counted for them
        assert scheduler.metrics._tokens["completion"] == before
        assert post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


# --- hostile input


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                max_size=4), max_leaves=12)
FIELDS = {"prompt": JSON, "messages": JSON, "max_tokens": st.integers(-5, 8) | JSON, "temperature": JSON,
          "top_p": JSON, "stop": JSON, "seed": JSON, "n": JSON, "stream": JSON, "response_format": JSON,
          "tools": JSON, "tool_choice": JSON, "input": JSON, "labels": JSON}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/classify"]),
       body=st.fixed_dictionaries({}, optional=FIELDS) | JSON)
def test_fuzzed_bodies_get_valid_answers(server: str, path: str, body: Any) -> None:
    r = httpx.post(server + path, content=json.dumps(body), timeout=60)  # Infinity included
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert_error(r, 400)
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert "choices" in r.json() or "data" in r.json()


def test_load_run_every_request_answered(model: Model) -> None:
    """500 requests from 8 clients, mixed endpoints and bad bodies, against a small queue: each gets a
    valid status, nothing hangs, the server serves on afterwards."""
    bodies = [("/v1/completions", {"prompt": "load", "max_tokens": 3}),
              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                        "stream": True}),
              ("/v1/classify", {"input": "x", "labels": ["a", "b"]}),
              ("/v1/completions", {"prompt": "x", "max_tokens": "many"})]
    with running(model, max_active=4, max_queue=4) as (url, scheduler), httpx.Client(timeout=60) as client:
        def one(i: int) -> int:
            path, body = bodies[i % len(bodies)]
            return client.post(url + path, json=body).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(500)))
        assert set(statuses) <= {200, 400, 429}
        assert statuses.count(400) == 125 and statuses.count(200) > 0
        wait_for(lambda: scheduler.depth == (0, 0))
        assert httpx.get(url + "/health").json()["status"] == "ok"


# --- the command


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:80") == ("0.0.0.0", 80) and parse_listen(":9000") == ("127.0.0.1", 9000)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    for bad in ("8080", "host:", "host:0", "host:99999", "host:x"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)


def test_serve_command_http(model_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "EDGEBIT_API_KEYS": "k1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgebit", "serve", str(model_path), "--http",
                             f"127.0.0.1:{port}", "--backend", "reference"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read()
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 120)
        assert post(url, "/v1/models", {}).status_code in (401, 405)
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k1"}).json()["data"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_needs_a_face_and_reads_http_settings(model_path: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from edgebit.cli import main

    result = CliRunner().invoke(main, ["serve", str(model_path)])
    assert result.exit_code == 2 and "--http" in result.output
    monkeypatch.setenv("EDGEBIT_HOME", str(tmp_path))
    (tmp_path / "keys").write_text("k1\nk2\n")
    (tmp_path / "config.toml").write_text(f'[http]\nlisten = "127.0.0.1:9123"\napi_key_file = "{tmp_path}/keys"\n')
    result = CliRunner().invoke(main, ["serve", str(model_path), "--check"])  # the config file enables HTTP
    assert result.exit_code == 0 and "http    http://127.0.0.1:9123/v1 (API keys: 2)" in result.output
    result = CliRunner().invoke(main, ["serve", str(model_path), "--check", "--http", "127.0.0.1:9"])
    assert "http://127.0.0.1:9/v1" in result.output  # the flag wins
    result = CliRunner().invoke(main, ["serve", str(model_path), "--check", "--http", "nowhere"])
    assert result.exit_code == 2 and "HOST:PORT" in result.output


@pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                    reason="mosquitto is not installed")
def test_one_process_serves_mqtt_and_http(model_path: Path, tmp_path: Path) -> None:
    """--config and --http together: one engine behind both faces, giving the same numbers."""
    from mqtt_broker import Broker, Client, unique_id

    broker = Broker(tmp_path).start()
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\n[node]\nid = "both"\nprefix = "tboth"\n'
                      '[tasks.mood]\nkind = "classify"\nprompt = "Message: {text}\\nMood:"\n'
                      'labels = ["calm", "alert", "panic"]\n')
    proc = subprocess.Popen([sys.executable, "-m", "edgebit", "serve", str(model_path), "--config", str(config),
                             "--http", f"127.0.0.1:{port}", "--backend", "reference"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "EDGEBIT_HOME": str(tmp_path)})
    client = Client(broker.port)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, "the server exited"
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 120)
        client.subscribe("tboth/v1/node/both/info")
        client.wait_json("tboth/v1/node/both/info", lambda info: info.get("state") == "ready")
        client.subscribe("answers")
        client.publish("tboth/v1/req/mood", {"v": 1, "id": unique_id(), "text": "boiler 95C"},
                       response_topic="answers", correlation=b"c1")
        [answer] = client.wait_json("answers")
        over_http = post(url, "/v1/classify", {"input": "boiler 95C", "labels": ["calm", "alert", "panic"],
                                               "prompt": "Message: {text}\nMood:"}).json()["data"][0]
        assert answer["status"] == "ok", answer
        assert answer["scores"] == pytest.approx(over_http["scores"], abs=1e-6)  # MQTT rounds to 6 places
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        broker.stop()


# --- the n8n examples


N8N = Path(__file__).resolve().parent.parent / "examples" / "n8n"


def _render(template: str, item: dict[str, str]) -> str:
    """n8n's `={{ JSON.stringify(a + '\\n' + $json.b) }}` bodies, for the expressions the examples use:
    `$json.NAME` fields and single-quoted literals joined by `+`."""
    def expression(match: Any) -> str:
        parts = [part.strip() for part in match.group(1).split("+")]
        values = [item[part[6:]] if part.startswith("$json.") else json.loads('"' + part[1:-1] + '"')
                  for part in parts]
        return json.dumps("".join(values))

    return re.sub(r"\{\{ JSON\.stringify\((.*?)\) \}\}", expression, template.removeprefix("="))


@pytest.mark.parametrize("name", ["email-triage.json", "invoice-extraction.json"])
def test_n8n_workflows_call_the_server(server: str, name: str) -> None:
    """Each workflow imports as n8n JSON (nodes, connections), and its HTTP Request node's body, filled
    with the sample node's values, is answered in the shape the next node reads."""
    flow = json.loads((N8N / name).read_text())
    nodes = {node["name"]: node for node in flow["nodes"]}
    for source, outputs in flow["connections"].items():
        assert source in nodes and all(link["node"] in nodes for out in outputs["main"] for link in out)
    [http] = [n for n in flow["nodes"] if n["type"] == "n8n-nodes-base.httpRequest"]
    [sample] = [n for n in flow["nodes"] if n["name"].startswith("Sample")]
    item = {a["name"]: a["value"] for a in sample["parameters"]["assignments"]["assignments"]}
    params = http["parameters"]
    assert params["method"] == "POST" and params["url"].startswith("http://127.0.0.1:8080/v1/")
    body = json.loads(_render(params["jsonBody"], item))
    reply = post(server, params["url"].removeprefix("http://127.0.0.1:8080"), body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    if "classify" in params["url"]:
        assert data["data"][0]["label"] in body["labels"]
    else:
        choice = data["choices"][0]
        if choice["finish_reason"] == "stop":
            schema = body["response_format"]["json_schema"]["schema"]
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
