"""The compiled backend: the file's 2-bit I2_S codes used in place by numba kernels.

Resident memory is the memory map itself (n/4 bytes, 0.52 GB for the 2B4T): I2_S rows whose width
is a multiple of 128 are passed to the kernels as they lie in the file. Other layouts (TQ1_0,
TQ2_0, float weights, rows that are not whole blocks) are re-encoded once at load into the same
row layout, rows padded with zero weights to whole blocks. One token or a few use the decode kernel
(`i2s_gemv`, int16 products summed in int32), more the prompt kernel (`i2s_gemm`, lookups in
tables of activation sums); where one hands over to the other is timed once per machine
(`NumbaBackend.few_tokens`). Both return exact integer products
(numba_kernels' docstring has the argument) and run on numba's threads, not helper processes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import quants
from ..weights import TernaryWeight
from .base import Backend
from .fast import kernels, read_only, unavailable_reason
from .i2s import BLOCK
from .machine import detect
from .select import cache_dir, read_cache, write_cache

log = logging.getLogger(__name__)

# Up to how many tokens the decode kernel beats the prompt kernel depends on the CPU (Zen 3: 64;
# a Xeon with 512-bit vectors: ~28, where a 40-token message then takes 26 instead of 39 ms a
# layer). Below the first candidate the decode kernel always wins; past the last the prompt kernel.
# Measured once per machine, thread count, numba version and kernel source, cached in crossover.json.
FEW_TOKENS_CANDIDATES = (16, 32, 48, 64)
CROSSOVER_SHAPE = (2048, 2560)  # rows × K of the random weight the crossover is measured on
CROSSOVER_ROUNDS = 3  # best of this many interleaved timings per kernel and token count


@dataclass(frozen=True)
class PackedRows:
    """I2_S rows (M, K'/4) uint8, read-only, with K' = K rounded up to whole blocks."""

    rows: np.ndarray
    k: int  # the matrix's real width; columns k..K' hold zero weights

    @property
    def width(self) -> int:
        return self.rows.shape[1] * 4


class NumbaBackend(Backend):
    name = "numba"
    description = "compiled kernels (numba): the file's 2-bit I2_S codes used in place, exact integer products"

    def __init__(self, threads: int | None = None) -> None:
        super().__init__(threads)
        self._few_tokens: int | None = None

    @classmethod
    def supported(cls) -> tuple[bool, str]:
        return (True, "") if kernels() is not None else (False, unavailable_reason())

    @classmethod
    def resident_bytes(cls, shape: tuple[int, int]) -> int:
        m, k = shape
        return m * (-(-k // BLOCK) * BLOCK) // 4

    def prepare(self, weight: TernaryWeight) -> PackedRows:
        m, k = weight.shape
        if k % BLOCK == 0:
            rows = weight.i2s_bytes()[: m * k // 4].reshape(m, k // 4)  # a view of the file for I2_S
        else:
            width = -(-k // BLOCK) * BLOCK
            codes = np.zeros((m, width), dtype=np.int8)
            codes[:, :k] = weight.codes()
            rows = np.frombuffer(quants.i2s_encode(codes, 1.0), dtype=np.uint8)[: m * width // 4].reshape(m, -1)
        return PackedRows(read_only(np.ascontiguousarray(rows)), k)

    def matmul(self, prepared: PackedRows, xq: np.ndarray) -> np.ndarray:
        return self.matmul_group([prepared], xq)[0]

    def matmul_group(self, prepared: list[PackedRows], xq: np.ndarray) -> list[np.ndarray]:
        """The exact products: the kernels' scaling with γ = s = s_out = 1 (x / 1 · 1 is x)."""
        return self._run(prepared, xq, np.ones((xq.shape[0], 1), dtype=np.float32), [_NO_SCALE] * len(prepared))

    def bitlinear_group(self, prepared: list[PackedRows], xq: np.ndarray, gamma: np.ndarray,
                        scales: list[tuple[np.float32, np.float32 | None]]) -> list[np.ndarray]:
        """The kernels scale each result as they store it (`numba_kernels._scaled`: numpy's float32
        operations in numpy's order), so a generated token makes no pass over the outputs in numpy."""
        return self._run(prepared, xq, gamma, [(s, 1.0 if o is None else o) for s, o in scales])

    def _run(self, prepared: list[PackedRows], xq: np.ndarray, gamma: np.ndarray,
             scales: list[tuple[float, float]]) -> list[np.ndarray]:
        """Up to three weights per kernel call (q/k/v, gate/up): one parallel region for the group.

        A generated token makes 120 of these calls, so nothing is copied or allocated here that the
        kernels do not need: int8 activations go in as they are unless the rows were padded."""
        fast = kernels()
        tokens, width, k = xq.shape[0], prepared[0].width, prepared[0].k
        if k == width and xq.dtype == np.int8 and xq.flags.c_contiguous:
            x = xq
        else:
            x = np.zeros((tokens, width), dtype=np.int8)
            x[:, :k] = xq
        outs = [np.empty((tokens, p.rows.shape[0]), dtype=np.float32) for p in prepared]
        if tokens == 0:
            return outs
        if tokens <= FEW_TOKENS_CANDIDATES[0]:
            run = fast.i2s_gemv
        elif tokens > FEW_TOKENS_CANDIDATES[-1]:
            run = fast.i2s_gemm
        else:
            run = fast.i2s_gemv if tokens <= self.few_tokens() else fast.i2s_gemm
        gamma = np.ascontiguousarray(gamma.reshape(tokens), dtype=np.float32)
        unused_rows, unused_out = _unused_rows(width), np.empty((tokens, 0), dtype=np.float32)
        for first in range(0, len(prepared), 3):
            rows = [p.rows for p in prepared[first : first + 3]]
            dest = outs[first : first + 3]
            factors = _factors(tuple(scales[first : first + 3]))
            rows += [unused_rows] * (3 - len(rows))
            dest += [unused_out] * (3 - len(dest))
            with fast.launch(self.threads):
                run(*rows, x, gamma, factors, *dest)
        return outs

    def few_tokens(self) -> int:
        """Up to how many tokens the decode kernel is the faster one on this machine (cached)."""
        if self._few_tokens is None:
            self._few_tokens = _crossover(self.threads)
        return self._few_tokens


_NO_SCALE = (1.0, 1.0)


@functools.cache
def kernels_fingerprint() -> str:
    """A short hash of the compiled kernels' source: a cached measurement of them is stale once it changes."""
    return hashlib.sha256(Path(kernels().__file__).read_bytes()).hexdigest()[:12]


def _crossover(threads: int | None) -> int:
    """The largest candidate token count at which the decode kernel still beats the prompt kernel,
    measured on a random weight once per machine, thread count, numba version and kernel source
    (~0.2 s)."""
    import numba

    fast = kernels()
    machine = detect()
    key = (f"{machine.fingerprint()}|threads={threads or machine.cpus}|numba={numba.__version__}"
           f"|kernels={kernels_fingerprint()}")
    path = cache_dir() / "crossover.json"
    cached = read_cache(path)
    if cached.get(key) in FEW_TOKENS_CANDIDATES:
        return cached[key]
    rng = np.random.default_rng(0)
    m, k = CROSSOVER_SHAPE
    rows = np.frombuffer(quants.i2s_encode(rng.integers(-1, 2, size=(m, k), dtype=np.int8), 1.0), np.uint8)
    rows = read_only(rows[: m * k // 4].reshape(m, k // 4))
    unused, factors = _unused_rows(k), np.ones((3, 2), dtype=np.float32)
    best = {}
    for _ in range(CROSSOVER_ROUNDS):
        for tokens in FEW_TOKENS_CANDIDATES:
            x = rng.integers(-128, 128, size=(tokens, k), dtype=np.int8)
            gamma, out = np.ones(tokens, np.float32), np.empty((tokens, m), np.float32)
            none = np.empty((tokens, 0), np.float32)
            for run in (fast.i2s_gemv, fast.i2s_gemm):
                with fast.launch(threads):
                    run(rows, unused, unused, x, gamma, factors, out, none, none)  # compiled / loaded, warm
                    start = time.perf_counter()
                    run(rows, unused, unused, x, gamma, factors, out, none, none)
                    seconds = time.perf_counter() - start
                best[run, tokens] = min(best.get((run, tokens), seconds), seconds)
    few = FEW_TOKENS_CANDIDATES[0]
    for tokens in FEW_TOKENS_CANDIDATES[1:]:
        if best[fast.i2s_gemv, tokens] >= best[fast.i2s_gemm, tokens]:
            break
        few = tokens
    cached[key] = few
    write_cache(path, cached)
    log.info("decode kernel up to %d tokens, prompt kernel past it (%s)", few, key)
    return few


@functools.lru_cache(maxsize=4096)
def _factors(scales: tuple[tuple[float, float], ...]) -> np.ndarray:
    """The kernels' (3, 2) float32 (s, s') table for up to three weights, unused slots (1, 1). Cached:
    a weight group's scales never change, and a token makes 120 kernel calls. The kernels only read it."""
    factors = np.ones((3, 2), dtype=np.float32)
    factors[: len(scales)] = scales
    return factors


@functools.cache
def _unused_rows(width: int) -> np.ndarray:
    """The (0, width/4) weight that fills an unused slot of a kernel call."""
    return read_only(np.empty((0, width // 4), dtype=np.uint8))
