"""The HTTP routes: thin translations between OpenAI's request/response bodies and the scheduler.

Nothing here computes: prompts are tokenized and grammars compiled by `prepare` callables that run
in the scheduler thread. Streaming is the scheduler's event queue turned into server-sent events
ending in `data: [DONE]`. Every failure is answered with OpenAI's error object; a client that goes
away cancels its sequence.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..engine import ContextLengthError, Generation, Model
from ..sampling import Constraint, SamplingParams
from ..structured import ANY_OBJECT, GrammarError, GrammarFactory
from . import protocol as p
from .protocol import APIError
from .scheduler import GenerateJob, QueueFull, Scheduler

DEFAULT_MAX_BODY = 1 << 20  # bytes
RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL = 0.25  # seconds between checks whether the client of a non-streaming request is still there
OPEN_PATHS = ("/health", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc")
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/models", "/health", "/metrics")


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class Guard:
    """ASGI middleware in front of the routes: API keys (401), the body size limit (413), and the
    request metrics. The body is read here, at most `max_body` bytes, before any route sees it, and
    always parsed as JSON (as llama-server does)."""

    def __init__(self, app: ASGIApp, keys: list[str], max_body: int, metrics: Any) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.max_body = max_body
        self.metrics = metrics

    def _authorized(self, scope: Scope) -> bool:
        if not self.keys or scope["path"] in OPEN_PATHS:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and any(hmac.compare_digest(token.strip(), k) for k in self.keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.request(route, status[0], time.monotonic() - started)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._authorized(scope):
            exc = APIError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", kind="authentication_error",
                           headers={"WWW-Authenticate": "Bearer"})
            await _error_response(exc)(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = APIError(413, f"the request body exceeds the limit of {self.max_body} bytes",
                             code="request_too_large")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _error_response(too_large)(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _error_response(too_large)(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False
        # Every body of this API is JSON, whatever the client declared (curl -d says form-urlencoded).
        headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _param(loc: tuple[Any, ...]) -> str | None:
    """A validation error location as OpenAI's `param`: messages[0].content (the body prefix dropped)."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[int]", "list[str]", "list[TextPart]") or "[" in str(part) or "-" in str(part):
            continue  # pydantic's name of the union member, not a field
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    param = _param(tuple(first.get("loc", ())))
    where = f"{param}: " if param else ""
    return APIError(400, f"{where}{first['msg']}", param=param)


def _engine_error(exc: BaseException, param: str) -> APIError:
    """What the engine said about a request, as a 4xx/5xx APIError."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=param, code="context_length_exceeded")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), param=param)
    return APIError(500, f"the server could not compute this request ({type(exc).__name__})", kind="server_error")


# --- prompts and constraints for chat


def _tool_schema(tools: list[p.Tool], names: list[str], allow_text: bool) -> dict[str, Any]:
    """The JSON schema of a reply calling one of `names` (or, with `allow_text`, answering in words)."""
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters},
              "required": ["name", "arguments"], "additionalProperties": False}
             for t in tools if t.function.name in names]
    if allow_text:
        calls.append({"type": "object", "properties": {"content": {"type": "string"}}, "required": ["content"],
                      "additionalProperties": False})
    return {"anyOf": calls} if len(calls) > 1 else calls[0]


def _tool_instruction(tools: list[p.Tool], allow_text: bool) -> str:
    specs = [{"name": t.function.name, "description": t.function.description or "",
              "parameters": t.function.parameters} for t in tools]
    text = ("You can call these functions:\n" + json.dumps(specs) + "\nTo call one, reply with only "
            '{"name": FUNCTION, "arguments": {...}}.')
    if allow_text:
        text += ' To answer without a call, reply with {"content": "your answer"}.'
    return text


class ChatPlan:
    """How one chat request is run: the messages given to the chat template, the schema that
    constrains the reply (if any), and whether the reply is a tool call."""

    def __init__(self, req: p.ChatCompletionRequest) -> None:
        self.req = req
        self.tools_active = bool(req.tools) and req.tool_choice != "none"
        self.schema: dict[str, Any] | None = None
        self.schema_param = "response_format"
        instruction = ""
        if self.tools_active:
            tools = req.tools or []
            names = [t.function.name for t in tools]
            choice = req.tool_choice
            if isinstance(choice, p.NamedToolChoice):
                if choice.function.name not in names:
                    raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                                   param="tool_choice")
                names = [choice.function.name]
            allow_text = choice in (None, "auto")
            self.schema, self.schema_param = _tool_schema(tools, names, allow_text), "tools"
            instruction = _tool_instruction([t for t in tools if t.function.name in names], allow_text)
        elif req.response_format is not None and req.response_format.type == "json_object":
            self.schema = ANY_OBJECT
        elif req.response_format is not None and req.response_format.type == "json_schema":
            if req.response_format.json_schema is None:
                raise APIError(400, "response_format.json_schema is required for type json_schema",
                               param="response_format.json_schema")
            self.schema = req.response_format.json_schema.schema_
        self.messages = self._messages(instruction)

    def _messages(self, instruction: str) -> list[dict[str, str]]:
        out = []
        for msg in self.req.messages:
            role, text = msg.role, msg.text()
            if role == "developer":
                role = "system"
            elif role == "tool":
                role, text = "user", f"Result of the function call {msg.tool_call_id or ''}: {text}"
            elif role == "assistant" and msg.tool_calls:
                call = msg.tool_calls[0].function
                text = json.dumps({"name": call.name, "arguments": _loads_or_text(call.arguments)})
            out.append({"role": role, "content": text})
        if instruction:
            if out[0]["role"] == "system":
                out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + instruction}
            else:
                out.insert(0, {"role": "system", "content": instruction})
        return out

    def prepare(self, grammars: GrammarFactory) -> Callable[[Model], tuple[list[int], Constraint | None]]:
        def run(model: Model) -> tuple[list[int], Constraint | None]:
            return model.prompt_ids(messages=self.messages), self._constraint(grammars)
        return run

    def _constraint(self, grammars: GrammarFactory) -> Constraint | None:
        if self.schema is None:
            return None
        try:
            return grammars.json_schema(self.schema)
        except (GrammarError, ImportError) as exc:
            raise APIError(400, str(exc), param=self.schema_param) from None

    def message(self, text: str, finish: str) -> tuple[dict[str, Any], str]:
        """The assistant message of a finished reply, and the finish_reason to report."""
        reply = _loads_or_text(text) if self.tools_active and finish == "stop" else None
        if isinstance(reply, dict):  # complete unless a `stop` string cut the document: then it is text
            if "name" in reply:
                call = {"id": p.new_id("call"), "type": "function",
                        "function": {"name": reply["name"], "arguments": json.dumps(reply["arguments"])}}
                return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
            return {"role": "assistant", "content": reply["content"]}, "stop"
        return {"role": "assistant", "content": text}, finish


def _loads_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# --- the app


def create_app(scheduler: Scheduler, model_name: str, api_keys: list[str] | None = None,
               max_body: int = DEFAULT_MAX_BODY) -> ASGIApp:
    """The FastAPI application serving `scheduler`'s model as `model_name`, behind the `Guard`."""
    model = scheduler.model
    grammars = GrammarFactory(model.tokenizer, model.config.n_vocab)
    created = int(time.time())
    app = FastAPI(title="edgebit", version=__version__,
                  description="OpenAI-compatible API for a BitNet b1.58 model, plus /v1/classify.")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                        kind=kind, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(APIError(500, f"internal error ({type(exc).__name__})", kind="server_error"))

    def submit(prepare: Callable[[Model], tuple[list[int], Constraint | None]], req: p._Sampling,
               max_tokens: int | None) -> GenerateJob:
        params = SamplingParams(temperature=req.temperature, top_k=0, top_p=req.top_p, min_p=0.0, seed=req.seed)
        job = GenerateJob(prepare, max_tokens, params, req.stops(), asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy ({exc}); retry later", code="rate_limit_exceeded",
                           kind="rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        return job

    async def started(job: GenerateJob, param: str) -> int:
        """Wait until the prompt is prefilled; the prompt's token count, or the APIError that stopped it."""
        try:
            kind, value = await job.events.get()
        except asyncio.CancelledError:
            job.cancel()
            raise
        if kind == "error":
            raise _engine_error(value, param)
        return value

    async def events(job: GenerateJob, request: Request | None, param: str) -> AsyncIterator[tuple[str, Any]]:
        """The job's text pieces and its end; cancels the job when the consumer stops early or the
        client disconnects (checked while waiting)."""
        checked = time.monotonic()
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL)
                except TimeoutError:
                    kind = None
                if request is not None and time.monotonic() - checked >= DISCONNECT_POLL:
                    if await request.is_disconnected():
                        return
                    checked = time.monotonic()
                if kind is None:
                    continue
                if kind == "error":
                    raise _engine_error(value, param)
                yield kind, value
                if kind == "done":
                    return
        finally:
            job.cancel()  # no effect on a finished job; stops a sequence nobody reads any more

    async def finish(job: GenerateJob, request: Request, param: str) -> tuple[str, Generation]:
        text = ""
        async for kind, value in events(job, request, param):
            if kind == "text":
                text += value
            elif kind == "done":
                return text, value
        raise APIError(499, "the client disconnected")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: the model is loaded and the scheduler runs."""
        waiting, active = scheduler.depth
        return {"status": "ok", "model": model_name, "queue_depth": waiting, "active": active}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text: requests, tokens, queue depth, latency histograms."""
        return PlainTextResponse(scheduler.metrics.render(lambda: scheduler.depth),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [p.model_card(model_name, created)]}

    @app.post("/v1/completions", response_model=None)
    async def completions(req: p.CompletionRequest, request: Request) -> Response | dict[str, Any]:
        """OpenAI text completions (one prompt: a string, one-string list, or token ids)."""
        prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) else req.prompt

        def prepare(m: Model) -> tuple[list[int], Constraint | None]:
            return m.prompt_ids(prompt=prompt), None

        job = submit(prepare, req, req.max_tokens)
        n_prompt = await started(job, "prompt")
        rid = p.new_id("cmpl")
        if not req.stream:
            text, gen = await finish(job, request, "prompt")
            return p.completion(rid, model_name, text, gen.finish_reason,
                                p.usage(n_prompt, gen.completion_tokens))

        async def stream() -> AsyncIterator[str]:
            async for kind, value in events(job, None, "prompt"):
                if kind == "text":
                    yield _sse(p.completion(rid, model_name, value, None, None))
                elif kind == "done":
                    use = p.usage(n_prompt, value.completion_tokens)
                    yield _sse(p.completion(rid, model_name, "", value.finish_reason, use))
            yield _sse("[DONE]")

        return _stream_response(stream())

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: p.ChatCompletionRequest, request: Request) -> Response | dict[str, Any]:
        """OpenAI chat completions in the model's chat template; response_format and tools constrain the
        reply with llguidance."""
        plan = ChatPlan(req)
        job = submit(plan.prepare(grammars), req, req.limit())
        n_prompt = await started(job, "messages")
        rid = p.new_id("chatcmpl")
        if not req.stream:
            text, gen = await finish(job, request, "messages")
            message, reason = plan.message(text, gen.finish_reason or "length")
            return p.chat_completion(rid, model_name, message, reason, p.usage(n_prompt, gen.completion_tokens))

        async def stream() -> AsyncIterator[str]:
            yield _sse(p.chat_chunk(rid, model_name, {"role": "assistant", "content": ""}, None))
            text = ""
            async for kind, value in events(job, None, "messages"):
                if kind == "text":
                    text += value
                    if not plan.tools_active:  # a tool call is sent whole, once it is complete
                        yield _sse(p.chat_chunk(rid, model_name, {"content": value}, None))
                elif kind == "done":
                    message, reason = plan.message(text, value.finish_reason or "length")
                    if plan.tools_active:
                        delta = ({"tool_calls": [{"index": 0, **c} for c in message["tool_calls"]]}
                                 if message.get("tool_calls") else {"content": message["content"]})
                        yield _sse(p.chat_chunk(rid, model_name, delta, None))
                    use = p.usage(n_prompt, value.completion_tokens)
                    yield _sse(p.chat_chunk(rid, model_name, {}, reason, use))
            yield _sse("[DONE]")

        return _stream_response(stream())

    @app.post("/v1/classify")
    async def classify(req: p.ClassifyRequest) -> dict[str, Any]:
        """edgebit's extension: probabilities over `labels` for each input, as `Model.classify`."""
        texts = [req.input] if isinstance(req.input, str) else req.input
        future = scheduler.call(lambda m: m.classify_batch(texts, req.labels, req.prompt))
        try:
            results = await asyncio.wrap_future(future)
        except Exception as exc:
            raise _engine_error(exc, "input") from None
        data = [{"index": i, "label": r["label"], "scores": r["scores"]} for i, r in enumerate(results)]
        return {"object": "list", "model": model_name, "data": data}

    return Guard(app, api_keys or [], max_body, scheduler.metrics)


def _stream_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    async def safe() -> AsyncIterator[str]:
        """Once streaming has begun the status is sent: an error becomes a last event in the stream."""
        try:
            async for chunk in chunks:
                yield chunk
        except APIError as exc:
            yield _sse(exc.body())
            yield _sse("[DONE]")

    return StreamingResponse(safe(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

