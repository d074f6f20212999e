"""Compiled kernels: plain Python loops that numba compiles with LLVM for the machine it runs on.

No intrinsics and no model knowledge: each kernel is a short loop nest over typed arrays, written
so LLVM's vectorizer can see through it (SSE/AVX on x86, NEON on a Raspberry Pi). Importing this
module needs numba (`pip install 'edgebit[fast]'`); `fast.kernels()` is the guarded way in.

I2_S rows. A prepared weight is (M, K/4) uint8 with K % 128 == 0, one row of the matrix per row:
the file's own bytes when the I2_S tensor already has that shape (the memory map, never copied).
Block b of a row is bytes 32b .. 32b+31; byte j of the block holds the codes c = w + 1 ∈ {0, 1, 2}
of four weights at bit shifts 6, 4, 2, 0:

    byte 32b + j  =  c[128b + j] << 6 | c[128b + 32 + j] << 4 | c[128b + 64 + j] << 2 | c[128b + 96 + j]

Exactness. Activations are integers with |x| ≤ 128. The decode kernel multiplies the unsigned codes,
Σ c·x = Σ w·x + Σ x, and subtracts Σ x once per row. Per block and lane the four products sum to at
most 4·2·128 = 1024 in magnitude, so BLOCKS_PER_INT16 = 16 blocks are summed in int16 (≤ 16384)
before widening to int32; a row sum is bounded by 2·128·K, far below 2**31 and, for K < 65536,
below 2**24, so the float32 result is the exact integer. The prompt kernel decodes rows to
w ∈ {-1, 0, 1} in int16 and sums w·x in int32 (the multiply-add pattern LLVM turns into
`pmaddwd` / `smlal`).

LM head. f16 embedding rows arrive as their int16 bits; `_f16_bits_to_scaled_f32` rebuilds the
float32 bits of E·2^-112 with integer operations (exact, subnormals included: see lm_head.py) into
an L1-resident scratch row, and the activations carry the 2^112. A float32 embedding takes the
same dot loop without the conversion, so both forms give bit-identical logits. The dot product
uses 16 vertical lanes and a fixed-order final sum: no reassociation, no fused multiply-add, the
same numbers on every CPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numba
import numpy as np
from numba import prange, types

from .select import cache_dir

if not os.environ.get("NUMBA_CACHE_DIR"):
    # numba's default is __pycache__ beside this file, which may be read-only (site-packages).
    numba.config.CACHE_DIR = str(cache_dir() / "numba")

BLOCK = 128  # weights per I2_S block
BLOCK_BYTES = 32
BLOCKS_PER_INT16 = 16  # blocks summed in int16 lanes before widening (|sum| ≤ 16·1024)
DECODE_ROWS = 16  # rows per parallel work item of the decode kernel
PROMPT_ROWS = 8  # rows decoded together by the prompt kernel (8 × K int16 stay in L1/L2)
HEAD_ROWS = 64  # vocabulary rows per parallel work item of the LM head
LANES = 16  # vertical float32 lanes of the LM-head dot product

_i16 = np.int16
_i32 = np.int32

_U8_ROWS = types.Array(types.uint8, 2, "C", readonly=True)
_I16_ROWS_RO = types.Array(types.int16, 2, "C", readonly=True)
_F32_ROWS_RO = types.Array(types.float32, 2, "C", readonly=True)
_I16_VEC = types.Array(types.int16, 1, "C")
_I16_MAT = types.Array(types.int16, 2, "C")
_F32_VEC = types.Array(types.float32, 1, "C")
_F32_MAT = types.Array(types.float32, 2, "C")

_JIT = {"cache": True, "nogil": True}


@numba.njit(parallel=True, **_JIT)
def i2s_gemv(packed: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[m] = Σ_k w[m, k]·x[k] for one token; packed (M, K/4) I2_S rows, x int16 (K,)."""
    m_rows, quarter = packed.shape
    n_blocks = quarter // BLOCK_BYTES
    x_sum = 0
    for k in range(x.shape[0]):
        x_sum += x[k]
    for chunk in prange((m_rows + DECODE_ROWS - 1) // DECODE_ROWS):
        wide = np.zeros(BLOCK_BYTES, np.int32)
        narrow = np.zeros(BLOCK_BYTES, np.int16)
        for m in range(chunk * DECODE_ROWS, min(m_rows, (chunk + 1) * DECODE_ROWS)):
            row = packed[m]
            wide[:] = 0
            for first in range(0, n_blocks, BLOCKS_PER_INT16):
                narrow[:] = 0
                for b in range(first, min(n_blocks, first + BLOCKS_PER_INT16)):
                    xb = x[b * BLOCK: b * BLOCK + BLOCK]
                    rb = row[b * BLOCK_BYTES: b * BLOCK_BYTES + BLOCK_BYTES]
                    for j in range(BLOCK_BYTES):
                        byte = _i16(rb[j])
                        narrow[j] += _i16(_i16((byte >> 6) & 3) * xb[j] + _i16((byte >> 4) & 3) * xb[32 + j]
                                          + _i16((byte >> 2) & 3) * xb[64 + j] + _i16(byte & 3) * xb[96 + j])
                for j in range(BLOCK_BYTES):
                    wide[j] += narrow[j]
            total = 0
            for j in range(BLOCK_BYTES):
                total += wide[j]
            out[m] = total - x_sum


@numba.njit(inline="always")
def _decode_row(row: np.ndarray, w: np.ndarray) -> None:
    """Weights w ∈ {-1, 0, 1} (int16, natural order) of one I2_S row."""
    for b in range(row.shape[0] // BLOCK_BYTES):
        for j in range(BLOCK_BYTES):
            byte = _i16(row[b * BLOCK_BYTES + j])
            w[b * BLOCK + j] = ((byte >> 6) & 3) - 1
            w[b * BLOCK + 32 + j] = ((byte >> 4) & 3) - 1
            w[b * BLOCK + 64 + j] = ((byte >> 2) & 3) - 1
            w[b * BLOCK + 96 + j] = (byte & 3) - 1


@numba.njit(parallel=True, **_JIT)
def i2s_gemm(packed: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[t, m] = Σ_k w[m, k]·x[t, k] for many tokens; x int16 (T, K), out float32 (T, M).

    A tile of PROMPT_ROWS rows is decoded once to int16 and multiplied with every token, so the
    decoding is paid once per T tokens.
    """
    m_rows = packed.shape[0]
    tokens, k_len = x.shape
    for tile in prange((m_rows + PROMPT_ROWS - 1) // PROMPT_ROWS):
        first = tile * PROMPT_ROWS
        rows = min(PROMPT_ROWS, m_rows - first)
        w = np.empty((PROMPT_ROWS, k_len), np.int16)
        for r in range(rows):
            _decode_row(packed[first + r], w[r])
        for t in range(tokens):
            xt = x[t]
            for r in range(rows):
                wr = w[r]
                total = _i32(0)
                for k in range(k_len):
                    total = _i32(total + _i32(wr[k]) * _i32(xt[k]))
                out[t, first + r] = total


@numba.njit(inline="always")
def _f16_bits_to_scaled_f32(src: np.ndarray, bits: np.ndarray) -> None:
    """bits = float32 bit patterns of (f16 value)·2^-112, from the f16 bits in `src` (int16)."""
    for k in range(src.shape[0]):
        bits[k] = (_i32(src[k]) << 13) & _i32(-(2**31) | 0x0FFFE000)


@numba.njit(inline="always")
def _dot_lanes(e: np.ndarray, x: np.ndarray, acc: np.ndarray) -> np.float32:
    """Σ e·x in float32 over LANES vertical lanes, summed in lane order (the same on every CPU)."""
    n = e.shape[0]
    acc[:] = 0
    body = n - n % LANES
    for k0 in range(0, body, LANES):
        for j in range(LANES):
            acc[j] += e[k0 + j] * x[k0 + j]
    for k in range(body, n):
        acc[k - body] += e[k] * x[k]
    total = np.float32(0)
    for j in range(LANES):
        total += acc[j]
    return total


@numba.njit(parallel=True, **_JIT)
def head_f16(embedding: np.ndarray, x_scaled: np.ndarray, out: np.ndarray) -> None:
    """out[t, v] = Σ_d E[v, d]·x[t, d] for an f16 embedding given as int16 bits; x_scaled = x·2^112."""
    vocab, dim = embedding.shape
    for chunk in prange((vocab + HEAD_ROWS - 1) // HEAD_ROWS):
        bits = np.empty(dim, np.int32)
        row = bits.view(np.float32)
        acc = np.empty(LANES, np.float32)
        for v in range(chunk * HEAD_ROWS, min(vocab, (chunk + 1) * HEAD_ROWS)):
            _f16_bits_to_scaled_f32(embedding[v], bits)
            for t in range(x_scaled.shape[0]):
                out[t, v] = _dot_lanes(row, x_scaled[t], acc)


@numba.njit(parallel=True, **_JIT)
def head_f32(embedding: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[t, v] = Σ_d E[v, d]·x[t, d] for a float32 embedding (the same sums as `head_f16`)."""
    vocab = embedding.shape[0]
    for chunk in prange((vocab + HEAD_ROWS - 1) // HEAD_ROWS):
        acc = np.empty(LANES, np.float32)
        for v in range(chunk * HEAD_ROWS, min(vocab, (chunk + 1) * HEAD_ROWS)):
            for t in range(x.shape[0]):
                out[t, v] = _dot_lanes(embedding[v], x[t], acc)


# The one signature each kernel is used with (weights read-only: they are memory-mapped file pages).
SIGNATURES = {
    i2s_gemv: (_U8_ROWS, _I16_VEC, _F32_VEC),
    i2s_gemm: (_U8_ROWS, _I16_MAT, _F32_MAT),
    head_f16: (_I16_ROWS_RO, _F32_MAT, _F32_MAT),
    head_f32: (_F32_ROWS_RO, _F32_MAT, _F32_MAT),
}


def compile_all(progress: Callable[[int, int, str], None] | None = None) -> dict[str, float]:
    """Compile (or load from the on-disk cache) every kernel; returns seconds per kernel.

    `progress(done, total, name)` is called before each kernel and once at the end.
    """
    seconds = {}
    for i, (kernel, signature) in enumerate(SIGNATURES.items()):
        if progress is not None:
            progress(i, len(SIGNATURES), kernel.__name__)
        start = time.perf_counter()
        kernel.compile(signature)
        seconds[kernel.__name__] = time.perf_counter() - start
    if progress is not None:
        progress(len(SIGNATURES), len(SIGNATURES), "")
    return seconds


def cache_hits() -> int:
    """How many kernel signatures were loaded from the on-disk cache in this process."""
    return sum(sum(kernel.stats.cache_hits.values()) for kernel in SIGNATURES)


def set_threads(threads: int | None) -> None:
    """Use `threads` (None: all numba may use) for the parallel loops started from this thread."""
    limit = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(max(1, min(threads or limit, limit)))
