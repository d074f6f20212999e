"""The scheduler: one thread owns the engine and runs every request, from any face.

HTTP generation requests wait in a bounded queue (full: the route answers 429); up to `max_active`
of them decode together, one token of every active sequence per `Model.step` (continuous
batching, as llama-server: a new request joins at the next step, a finished one leaves). Other
work (classification, the MQTT face's micro-batches) runs between two steps through `call`. Events
of a generation go to the asyncio loop of its request; a cancelled sequence (the client went away)
leaves at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..engine import DecodeState, Generation, Model
from ..sampling import Constraint, Sampler, SamplingParams
from .metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` requests already; try again later."""


@dataclass
class GenerateJob:
    """One generation request. `prepare(model)` runs in the scheduler thread and gives the prompt ids
    and an optional constraint (tokenizing a large prompt or compiling a grammar never blocks the
    event loop); `max_tokens` None means the rest of the context."""

    prepare: Callable[[Model], tuple[list[int], Constraint | None]]
    max_tokens: int | None
    params: SamplingParams
    stops: Sequence[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    gen: Generation | None = None
    seq: DecodeState | None = None

    def emit(self, kind: str, value: Any = None) -> None:
        """Hand an event to the request's loop: ("started", prompt_tokens), ("text", piece),
        ("done", Generation) or ("error", exception)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    """Owns the model; `submit` generation jobs, `call` anything else that needs the engine."""

    def __init__(self, model: Model, max_active: int = 4, max_queue: int = 16, metrics: Metrics | None = None) -> None:
        self.model = model
        self.max_active = max_active
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._waiting: deque[GenerateJob] = deque()
        self._calls: deque[tuple[Callable[[Model], Any], Future]] = deque()
        self._active: list[GenerateJob] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="edgebit-scheduler", daemon=True)

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop after the current step; waiting and active generations get an error event."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def depth(self) -> tuple[int, int]:
        """(waiting, active) generation requests."""
        with self._cond:
            return len(self._waiting), len(self._active)

    def submit(self, job: GenerateJob) -> None:
        """Queue a generation; QueueFull when `max_queue` requests already wait."""
        with self._cond:
            if self._closed or len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            self._waiting.append(job)
            self._cond.notify()

    def call(self, fn: Callable[[Model], Any]) -> Future:
        """Run `fn(model)` in the scheduler thread between two decode steps; its Future has the result."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                future.set_exception(RuntimeError("the scheduler is stopped"))
                return future
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    # --- the worker thread

    def _work(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._calls or self._active):
                    self._cond.wait()
                if self._closed:
                    break
                calls, self._calls = list(self._calls), deque()
                admit = []
                while self._waiting and len(self._active) + len(admit) < self.max_active:
                    admit.append(self._waiting.popleft())
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.model))
                    except Exception as exc:  # handed to the caller, who answers for it
                        future.set_exception(exc)
            for job in admit:
                self._admit(job)
            self._step()
        with self._cond:
            left = list(self._waiting) + self._active
            self._waiting.clear()
            self._active = []
        for job in left:
            job.emit("error", RuntimeError("the server is shutting down"))

    def _admit(self, job: GenerateJob) -> None:
        """Prefill a waiting job's prompt and make it active (or report why it cannot run)."""
        if job.cancelled.is_set():
            return
        try:
            ids, constraint = job.prepare(self.model)
            limit = job.max_tokens if job.max_tokens is not None else max(self.model.config.n_ctx - len(ids), 0)
            job.gen = Generation(iter(()), len(ids))
            job.seq = self.model.start(ids, limit, Sampler(job.params), job.stops, constraint, job.gen)
        except Exception as exc:  # the route turns it into a 400 (ValueError) or a 500
            job.emit("error", exc)
            return
        self.metrics.prompt_tokens(len(ids), job.seq.reused)
        job.emit("started", len(ids))
        with self._cond:
            self._active.append(job)

    def _step(self) -> None:
        """One token for every active sequence, in one batched forward call."""
        with self._cond:
            jobs = [job for job in self._active if not job.cancelled.is_set()]
            self._active = jobs
        running = [job for job in jobs if not job.seq.done]
        if running:
            try:
                pieces = self.model.step([job.seq for job in running])
            except Exception as exc:  # e.g. a grammar error: every sequence of the step reports it
                log.exception("decode step failed")
                for job in running:
                    job.emit("error", exc)
                with self._cond:
                    self._active = [job for job in self._active if job not in running]
                return
            now = time.monotonic()
            for job, piece in zip(running, pieces, strict=True):
                if job.first_token is None:
                    job.first_token = now
                    self.metrics.first_token(now - job.submitted)
                if piece:
                    job.emit("text", piece)
        finished = [job for job in jobs if job.seq.done]
        for job in finished:
            self.metrics.completion_tokens(job.gen.completion_tokens)
            job.emit("done", job.gen)
        if finished:
            with self._cond:
                self._active = [job for job in self._active if not job.seq.done]


class EngineProxy:
    """The model as another face (MQTT) sees it: engine calls run in the scheduler thread, so both faces
    share one engine without ever computing at the same time."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._model = scheduler.model

    @property
    def info(self) -> dict[str, Any]:
        return self._model.info

    def sha256(self) -> str:
        return self._model.sha256()

    def classify_batch(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return self._scheduler.call(lambda m: m.classify_batch(*args, **kwargs)).result()

    def complete(self, *args: Any, **kwargs: Any) -> Any:
        return self._scheduler.call(lambda m: m.complete(*args, **kwargs)).result()
