"""Cores for the kernels: each weight's rows are split over this process and helper processes.

Why processes and not threads: numpy releases the GIL inside each call, but a decode-step kernel
makes thousands of calls of 10–40 µs each (cache-sized tiles), and every GIL hand-over between
two busy threads costs a wake-up of about that size. Measured on the 2-core machine of
benchmarks/RESULTS.md, splitting over two threads made `dense` 1.6× and `packed` 1.0× faster;
over two processes 1.95× and 1.85×. A helper process holds its slice of every weight in its own
backend instance (so memory is not duplicated) and answers over a socket pair: a fixed header
plus raw array bytes, no pickling. Helpers are plain `python -m edgebit.backends.lanes` children;
they exit when the socket closes, i.e. with their backend or with this process.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import weakref
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import quants
from ..weights import TernaryWeight
from .base import Backend
from .machine import available_cpus
from .memory import release_file_pages
from .threads import blas_threads

PREPARE, MATMUL = 1, 2
REQUEST = struct.Struct("<BIIIQf")  # op, key|count of keys, rows|tokens, columns, payload bytes, scale
REPLY = struct.Struct("<BQ")  # ok (1) / error (0), payload bytes
MIN_SPLIT = 1 << 20  # weights below which a matrix stays in this process (helpers would only add latency)


def _recv_exact(sock: socket.socket, n: int, into: memoryview | None = None) -> memoryview:
    buf = into if into is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        k = sock.recv_into(buf[got:], n - got)
        if k == 0:
            raise EOFError("the other end closed the connection")
        got += k
    return buf


class Lanes:
    """Helper processes running backend `name`, each holding row slices of the weights it was sent."""

    def __init__(self, name: str, helpers: int) -> None:
        self.name = name
        self._socks: list[socket.socket] = []
        self._procs: list[subprocess.Popen] = []
        self._keys = 0
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        for _ in range(helpers):
            mine, theirs = socket.socketpair()
            cmd = [sys.executable, "-m", "edgebit.backends.lanes", str(theirs.fileno()), name]
            self._procs.append(subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL, env=env))
            theirs.close()
            self._socks.append(mine)
        weakref.finalize(self, Lanes._stop, self._socks, self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @staticmethod
    def _stop(socks: list[socket.socket], procs: list[subprocess.Popen]) -> None:
        for sock in socks:
            sock.close()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()

    def _died(self, lane: int) -> RuntimeError:
        return RuntimeError(f"backend helper process {self._procs[lane].pid} ({self.name}) died")

    def _send(self, lane: int, header: bytes, payload: np.ndarray) -> None:
        try:
            self._socks[lane].sendall(header)
            self._socks[lane].sendall(memoryview(np.ascontiguousarray(payload)).cast("B"))
        except OSError:
            raise self._died(lane) from None

    def _reply(self, lane: int, into: np.ndarray | None = None) -> memoryview:
        sock = self._socks[lane]
        try:
            ok, n = REPLY.unpack(_recv_exact(sock, REPLY.size))
            payload = _recv_exact(sock, n, memoryview(into).cast("B") if ok and into is not None else None)
        except (EOFError, OSError):
            raise self._died(lane) from None
        if not ok:
            raise RuntimeError(f"backend helper process ({self.name}): {bytes(payload).decode(errors='replace')}")
        return payload

    def send_prepare(self, lane: int, codes_i2s: np.ndarray, shape: tuple[int, int], scale: float) -> int:
        """Send a row slice (its I2_S code bytes); the helper prepares it. Returns its key."""
        self._keys += 1
        self._send(lane, REQUEST.pack(PREPARE, self._keys, shape[0], shape[1], codes_i2s.nbytes, scale), codes_i2s)
        return self._keys

    def wait_prepared(self, lane: int) -> None:
        self._reply(lane)

    def send_matmul(self, lane: int, keys: list[int], xq: np.ndarray) -> None:
        """Ask for the products of several weights with the same input (payload: uint32 keys, then xq)."""
        payload = np.concatenate([np.asarray(keys, dtype="<u4").view(np.uint8),
                                  np.ascontiguousarray(xq).view(np.uint8).ravel()])
        self._send(lane, REQUEST.pack(MATMUL, len(keys), xq.shape[0], xq.shape[1], payload.nbytes, 0.0), payload)

    def receive_matmul(self, lane: int, out: np.ndarray) -> None:
        """Read a helper's reply into `out`: one uint32 per product (1: sent as (rows, tokens)), then the
        float32 products one after the other."""
        self._reply(lane, out)


def serve(fd: int, name: str) -> None:
    """The helper's loop: prepare and multiply row slices until the socket closes."""
    from . import available_backends

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; we follow the socket
    sock = socket.socket(fileno=fd)
    backend = available_backends()[name](threads=1)
    weights: dict[int, Any] = {}
    while True:
        try:
            op, key, a, b, n, scale = REQUEST.unpack(_recv_exact(sock, REQUEST.size))
            payload = _recv_exact(sock, n)
        except EOFError:
            return
        try:
            if op == PREPARE:
                raw = np.frombuffer(bytes(payload) + bytes(4), dtype=np.uint8)  # + the scale slot I2_S ends with
                weights[key] = backend.prepare(TernaryWeight(f"slice{key}", (a, b), scale, "I2_S", raw))
                chunks: list[np.ndarray] = []
            else:
                keys = np.frombuffer(payload, dtype="<u4", count=key)
                xq = np.frombuffer(payload, dtype=np.int8, offset=4 * key).reshape(a, b)
                parts = [_layout(backend.matmul(weights[k], xq)) for k in keys]
                chunks = [np.array([transposed for transposed, _ in parts], dtype=np.uint32)]
                chunks += [part for _, part in parts]
            sock.sendall(REPLY.pack(1, sum(chunk.nbytes for chunk in chunks)))
            for chunk in chunks:
                sock.sendall(memoryview(chunk).cast("B"))
        except Exception as exc:  # report to the caller instead of dying silently
            message = f"{type(exc).__name__}: {exc}".encode()
            sock.sendall(REPLY.pack(0, len(message)) + message)


def _layout(product: np.ndarray) -> tuple[bool, np.ndarray]:
    """A product (tokens, rows) as contiguous bytes without a transposing copy: prompt products are
    computed rows-major (`tiled`), so they travel as (rows, tokens) and the caller transposes once."""
    if product.ndim == 2 and product.shape[0] > 1 and product.T.flags.c_contiguous and product.dtype == np.float32:
        return True, product.T
    return False, np.ascontiguousarray(product, dtype=np.float32)


@dataclass
class SplitWeight:
    """A weight whose first row slice is prepared here and the others in helper lanes."""

    local: Any
    keys: list[int]  # helper key of each further slice, lane i holding slice i + 1
    bounds: list[tuple[int, int]]  # row range of every slice, this process's first


def row_slice(weight: TernaryWeight, start: int, stop: int) -> TernaryWeight:
    """Rows start:stop of a weight (start·K must be a multiple of 128 for I2_S payloads)."""
    m, k = weight.shape
    if weight.source_type == "I2_S":
        raw = weight.raw[start * k // 4 : stop * k // 4 + 4]  # 4 more bytes: the decoder expects a scale slot
        return TernaryWeight(weight.name, (stop - start, k), weight.scale, "I2_S", raw)
    codes = weight.codes()[start:stop]
    return TernaryWeight(weight.name, (stop - start, k), weight.scale, weight.source_type, weight.raw, codes)


class SplitBackend(Backend):
    """Base of backends that split every large weight's rows over `threads` lanes (processes).

    Subclasses implement `prepare_local` / `matmul_local` for one slice in one process.
    """

    def __init__(self, threads: int | None = None) -> None:
        super().__init__(threads)
        self.lanes_wanted = max(1, threads or available_cpus())
        self._lanes: Lanes | None = None
        blas_threads().set(1)  # each lane is one core; a threaded BLAS would oversubscribe them

    @property
    def helper_pids(self) -> list[int]:
        return self._lanes.pids if self._lanes is not None else []

    @abstractmethod
    def prepare_local(self, weight: TernaryWeight) -> Any:
        """Prepare a weight (or a row slice of one) in this process."""

    @abstractmethod
    def matmul_local(self, prepared: Any, xq: np.ndarray) -> np.ndarray:
        """The exact product of a locally prepared weight: xq int8 (T, K) → float32 (T, M)."""

    def _bounds(self, weight: TernaryWeight) -> list[tuple[int, int]]:
        m, k = weight.shape
        if self.lanes_wanted == 1 or m * k < MIN_SPLIT or (m * k) % quants.I2S_BLOCK:
            return [(0, m)]
        align = quants.I2S_BLOCK // np.gcd(k, quants.I2S_BLOCK)  # slices start on I2_S block boundaries
        cuts = sorted({m * i // self.lanes_wanted // align * align for i in range(self.lanes_wanted)} | {m})
        return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]

    def prepare(self, weight: TernaryWeight) -> Any:
        bounds = self._bounds(weight)
        if len(bounds) == 1:
            return self.prepare_local(weight)
        if self._lanes is None:
            self._lanes = Lanes(self.name, self.lanes_wanted - 1)
        lanes, keys = self._lanes, []
        for lane, (a, b) in enumerate(bounds[1:]):
            part = row_slice(weight, a, b)
            keys.append(lanes.send_prepare(lane, part.i2s_bytes(), part.shape, weight.scale))
            if part.source_type == "I2_S":
                release_file_pages(part.raw)  # the helper keeps its own copy
        with _draining(len(keys), lanes.wait_prepared):
            local = self.prepare_local(row_slice(weight, *bounds[0]))
        return SplitWeight(local, keys, bounds)

    def matmul(self, prepared: Any, xq: np.ndarray) -> np.ndarray:
        return self.matmul_group([prepared], xq)[0]

    def matmul_group(self, prepared: list[Any], xq: np.ndarray) -> list[np.ndarray]:
        """Products of several weights with one input: one request per helper for the whole group,
        so the lanes meet once per group instead of once per weight."""
        t = xq.shape[0]
        outs = [np.empty((t, p.bounds[-1][1]), dtype=np.float32) if isinstance(p, SplitWeight) else None
                for p in prepared]
        asked: list[list[int]] = []  # per lane: which group members it computes
        for lane in range(len(self._lanes.pids) if self._lanes is not None else 0):
            members = [i for i, p in enumerate(prepared) if isinstance(p, SplitWeight) and lane < len(p.keys)]
            if not members:
                break
            self._lanes.send_matmul(lane, [prepared[i].keys[lane] for i in members], xq)
            asked.append(members)

        def receive(lane: int) -> None:
            members = asked[lane]
            spans = [prepared[i].bounds[lane + 1] for i in members]
            flat = np.empty(len(members) + sum(t * (b - a) for a, b in spans), dtype=np.float32)
            self._lanes.receive_matmul(lane, flat)
            transposed, at = flat[: len(members)].view(np.uint32), len(members)
            for i, flip, (a, b) in zip(members, transposed, spans, strict=True):
                part = flat[at : at + t * (b - a)]
                outs[i][:, a:b] = part.reshape(b - a, t).T if flip else part.reshape(t, b - a)
                at += t * (b - a)

        with _draining(len(asked), receive):
            for i, p in enumerate(prepared):
                if isinstance(p, SplitWeight):
                    a, b = p.bounds[0]
                    outs[i][:, a:b] = self.matmul_local(p.local, xq)
                else:
                    outs[i] = self.matmul_local(p, xq)
        return outs


@contextmanager
def _draining(count: int, receive: Callable[[int], None]) -> Iterator[None]:
    """Run the local share, then collect every helper's reply even if something failed, so the
    sockets stay in step; the first error is raised (the local one first)."""
    errors: list[Exception] = []
    try:
        yield
    finally:
        for lane in range(count):
            try:
                receive(lane)
            except RuntimeError as exc:
                errors.append(exc)
    if errors:
        raise errors[0]

if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
