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
Σ c·x = Σ w·x + Σ x, and subtracts Σ x once per row. It leaves each code where it lies in its byte,
c·4^j for a code under shift 2j, and meets it with the activation times 4^(3-j), so every product
is 64·c·x (|64·c·x| ≤ 24576: int16 × int16 products, LLVM's pmaddwd) and one int32 sum, divided by
64 at the end, is exact: 64·3·128·K < 2**31 for K < 87381 (split into four partial sums where the
CPU has VNNI, `SPLIT_DOT_SUMS`: each holds a subset of the terms, so the same bound holds).
A row's result is at most 3·128·K in size, below 2**24 for K < 43690, so its float32 value is
the exact integer.
The prompt kernel adds table entries instead of
multiplying: an entry is a sum of four int8 activations with signs (|entry| ≤ 512, int16), a block's
32 entries per row sum to at most 16384 in size (int16), and blocks are added up in int32. A code
3 (weight +2, only in a damaged file) is looked up as a 2 and its activation added once more.

LM head. f16 embedding rows arrive as their int16 bits and are widened exactly to float32 as they
are read (`_half_to_float`: LLVM's portable half → float conversion). The float32 dot product may
be reassociated so LLVM can vectorize it: its rounding then depends on the CPU's vector width, as
BLAS's does, but not on the ternary backend, the batch or the thread count.

RMSNorm + quantisation (`rmsnorm_quantize`) repeats numpy's operations in numpy's order, pairwise
summation included, so it gives the numpy forward pass's numbers exactly.

Four generic LLVM operations are emitted directly (`_prefetch`, `_half_to_float`,
`_float_from_bits`, `_stack_int16`): none is specific to a CPU; LLVM lowers them for x86 and ARM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .select import cache_dir

# LLVM's loop vectorizer sizes its vectors by a loop's widest type unless told to fill the registers
# with its narrowest: an int16 dot product summed in int32 then runs on half-width pmaddwd (8 lanes
# on AVX2). clang's `-mllvm -vectorizer-maximize-bandwidth`, set before anything here is compiled:
# the decode kernel on Zen 3, one core, 24 → 43 G MAC/s.
llvm.set_option("edgebit", "-vectorizer-maximize-bandwidth")
# LLVM tunes Intel's AVX-512 CPUs to prefer 256-bit vectors (the 512-bit clock penalty of older
# parts). On a Sapphire Rapids-class Xeon VM, 512-bit vectors take a 2B4T token's ternary products
# from 45.5 to ~39.5 ms on 2 threads (tg32 13.1 → 14.8 tok/s; pp128 3-8 % slower), so where the CPU
# has AVX-512BW the tuning is turned off, unless NUMBA_CPU_NAME or NUMBA_CPU_FEATURES chose a target.
# numba reads this when it first compiles in the process; cached code is keyed by these features.


def _host_features() -> str:
    """The host CPU's LLVM features ("+avx2,-avx512f,..."), or "" where LLVM cannot read them."""
    try:
        return llvm.get_host_cpu_features().flatten()
    except RuntimeError:  # some hosts (numba then uses none either)
        return ""


_HOST_FEATURES = _host_features()
if numba.config.CPU_FEATURES is None and numba.config.CPU_NAME is None \
        and "+avx512bw" in _HOST_FEATURES.split(","):
    numba.config.CPU_FEATURES = _HOST_FEATURES + ",-prefer-256-bit"
WIDE_VECTORS = "-prefer-256-bit" in (numba.config.CPU_FEATURES or "")  # 512-bit vectors in use
# What numba compiles for: NUMBA_CPU_FEATURES when set, else the host's (also under NUMBA_CPU_NAME).
_TARGET_FEATURES = set((_HOST_FEATURES if numba.config.CPU_FEATURES is None else numba.config.CPU_FEATURES).split(","))
# With a fused int16 multiply-add (AVX-512 VNNI or AVX-VNNI: vpdpwssd) each vector of products
# waits for the one before it (its latency: LLVM kept two accumulators), so the decode kernel keeps
# four sums there, eight chains in flight: Zen 5, the 2B4T's 30 layers from DRAM, 1 thread 31-34 →
# 22-28 ms, 2 threads 17-20 → 14-16 ms. Without one (AVX2's pmaddwd + paddd) the single sum stays:
# four made LLVM unroll the loop once instead of twice (AVX2 code on the same CPU: 3-8 % slower).
SPLIT_DOT_SUMS = "+avx512vnni" in _TARGET_FEATURES or "+avxvnni" in _TARGET_FEATURES
if not os.environ.get("NUMBA_CACHE_DIR"):
    # numba's default is __pycache__ beside this file, which may be read-only (site-packages).
    numba.config.CACHE_DIR = str(cache_dir() / "numba")
# A generated token starts ~120 parallel loops. numba's default threading layer (GNU OpenMP here)
# starts them in microseconds: 9.5-10 tokens/s on the 2B4T shape against 7.3-7.5 with numba's
# workqueue pool, measured back to back on the idle 2-core VM, and about the same beside niced busy
# loops. But when several processes spin-wait for cores (two edgebit processes, a torch training
# run) OpenMP's wake-ups took 0.1-16 ms each here; NUMBA_THREADING_LAYER=workqueue is then the
# robust choice (README, Performance). The workqueue must not be entered from two threads at once,
# so callers start kernels inside `launch()`, which holds LAUNCH whichever layer runs.
LAUNCH = threading.Lock()  # one parallel kernel at a time in this process
_THREAD_SETTING = threading.local()  # the thread count set_threads last gave numba, per thread

BLOCK = 128  # weights per I2_S block
BLOCK_BYTES = 32
DECODE_ROWS = 16  # rows per parallel work item of the decode kernel
PROMPT_TOKENS = 128  # tokens per set of block tables in the prompt kernel
# The prompt kernel's token lanes come in multiples of this: a whole number of its lane loops' vector
# passes (16 int16 lanes twice with 256-bit vectors; twice that with 512), so no lane falls to a
# scalar remainder loop. Zen 3, 2 threads, a layer: 32 tokens 54 → 34-37 ms, 88 tokens 88-101 →
# 70-75 ms with 32 instead of 64 (16 was slower: a 48-lane loop leaves a scalar remainder).
TOKEN_STEP = 64 if WIDE_VECTORS else 32
PART_ROWS = 4096  # at most this many rows per parallel part of the prompt kernel
OUT_TILE = 16  # rows of the prompt kernel's output written together: a 64-byte line of float32 per token
HEAD_ROWS = 64  # vocabulary rows per parallel work item of the LM head
# rows ahead that the decode kernel asks the memory system for (Xeon VM, 512-bit vectors, a token's
# ternary products: 4 rows 52 ms, 16 rows 40 ms, 64 rows 41-43 ms)
PREFETCH_ROWS = 16

_i16 = np.int16
_i32 = np.int32

_U8_ROWS = types.Array(types.uint8, 2, "C", readonly=True)
_I16_MAT = types.Array(types.int16, 2, "C")
_I16_ROWS_RO = types.Array(types.int16, 2, "C", readonly=True)
_F32_ROWS_RO = types.Array(types.float32, 2, "C", readonly=True)
_I8_MAT = types.Array(types.int8, 2, "C")
_I8_ROWS_RO = types.Array(types.int8, 2, "C", readonly=True)
_F32_VEC = types.Array(types.float32, 1, "C")
_F32_VEC_RO = types.Array(types.float32, 1, "C", readonly=True)
_F32_MAT = types.Array(types.float32, 2, "C")
_F32_CUBE = types.Array(types.float32, 3, "C")

_JIT = {"cache": True, "nogil": True}


@intrinsic
def _prefetch(typingctx, array, index):  # noqa: ARG001 (numba's signature)
    """Hint that array[index] will be read soon: LLVM's target-independent `llvm.prefetch`
    (prefetcht0 on x86, prfm on ARM). This VM's hardware prefetcher does not keep a streaming
    kernel fed (measured: 9 → 19 G MAC/s for a DRAM-resident decode)."""
    if not isinstance(array, types.Array) or array.ndim != 1 or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = builder.module.globals.get("llvm.prefetch.p0")
        if fn is None:
            fn = ir.Function(builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]),
                             "llvm.prefetch.p0")
        address = builder.bitcast(builder.gep(data, [args[1]]), byte_ptr)
        builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(array, index), codegen


@intrinsic
def _half_to_float(typingctx, bits):  # noqa: ARG001
    """The float32 value of IEEE half-precision bits (int16), exactly: LLVM's `fpext half → float`
    (vcvtph2ps with F16C, fcvtl on ARM). numba has no float16 type on the CPU."""
    if bits != types.int16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _float_from_bits(typingctx, bits):  # noqa: ARG001
    """The float32 whose IEEE bits are `bits` (int32): LLVM's `bitcast`, no conversion."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _stack_int16(typingctx, count):  # noqa: ARG001
    """A pointer to `count` (a constant) int16 in the calling function's stack frame: LLVM's `alloca`.
    numba allocates arrays on the heap, and LLVM must then assume a heap scratch row may overlap
    the arrays a loop reads, so it checks for overlap at run time before every vectorized pass. A
    stack row cannot overlap them, and those checks go (`numba.carray` makes it an array)."""
    if not isinstance(count, types.IntegerLiteral):
        return None

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, ir.IntType(16), size=count.literal_value)

    return types.CPointer(types.int16)(count), codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_HIGH = np.float32(0.693359375)  # ln 2 in two parts: n · high is exact for |n| < 2**11
_LN2_LOW = np.float32(-2.12194440e-4)


@numba.njit
def _exp_nonpositive(x: np.float32) -> np.float32:
    """exp(x) for x ≤ 0 within 1 ulp (x < -87 gives exp(-87) ≈ 1.6e-38 instead of smaller): a
    softmax numerator. Plain float arithmetic and a bit cast, so LLVM vectorizes a loop of them
    (numba's np.exp is a scalar library call). Range reduction x = n·ln2 + r, |r| ≤ ln2/2, a
    degree-7 polynomial for exp(r) (Cephes' expf coefficients), and 2**n from its exponent bits.
    Compiled on its own, without fast-math, so the reduction's two steps keep their order."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = (x - n * _LN2_HIGH) - n * _LN2_LOW
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    return p * _float_from_bits(_i32((_i32(n) + _i32(127)) << 23))


@numba.njit(inline="always")
def _prefetch_row(flat: np.ndarray, row: int, row_elements: int) -> None:
    """Prefetch every 64-byte line of row `row` of a row-major array (nothing past the end)."""
    start = row * row_elements
    if start + row_elements <= flat.shape[0]:
        step = 64 // flat.itemsize
        for offset in range(0, row_elements, step):
            _prefetch(flat, start + offset)


@numba.njit(inline="always")
def _planes(x: np.ndarray, x_sums: np.ndarray) -> np.ndarray:
    """Each token's int8 activations as int16 planes in the order the decode kernel meets the
    codes, eight planes of K/8, and their sums (x_sums[t] = Σ_k x[t, k]).

    The kernel reads a row as little-endian 16-bit words (word 16b + i = bytes 32b + 2i and
    32b + 2i + 1 of block b) and masks eight codes out of each word, leaving them in place: the
    low byte's codes under shifts 6, 4, 2, 0, then the high byte's. Plane p = 4h + s holds, at word
    n = 16b + i, the activation of the code under shift 6 - 2s of byte 32b + 2i + h, times 4^s
    (at most 128·64 = 8192): 4^s·x[t, 128b + 32s + 2i + h]. Each product is then 64·c·x."""
    tokens, k_len = x.shape
    eighth = k_len // 8
    half = BLOCK_BYTES // 2
    planes = np.empty((tokens, k_len), np.int16)
    for t in range(tokens):
        total = 0
        for b in range(k_len // BLOCK):
            for h in range(2):
                for s in range(4):
                    for i in range(half):
                        value = x[t, b * BLOCK + s * BLOCK_BYTES + 2 * i + h]
                        planes[t, (4 * h + s) * eighth + b * half + i] = value << (2 * s)
                        total += value
        x_sums[t] = total
    return planes


@numba.njit(inline="always")
def _row_dot(row: np.ndarray, plane: np.ndarray) -> np.int32:
    """Σ c·x over one I2_S row given as 16-bit words (codes c = w + 1) against one token's planes.

    One int32 sum of int16 × int16 products: LLVM turns it into pmaddwd/vpdpwssd (NEON: smlal).
    Masking each code where it lies, against planes scaled to match, needs one shift per word
    instead of one per code (Zen 3, one core: 33-41 → 43-48 G MAC/s on the 2B4T shapes); shifted
    codes from bytes had to be widened to 16 bits first (17 → 25 G MAC/s on 6912×2560). Products
    widened to 32 bits first, or numba's default int64 sums, vectorize at half the rate or worse.
    """
    n_words = row.shape[0]
    p0, p1, p2, p3 = plane[:n_words], plane[n_words : 2 * n_words], plane[2 * n_words : 3 * n_words], \
        plane[3 * n_words : 4 * n_words]
    p4, p5, p6, p7 = plane[4 * n_words : 5 * n_words], plane[5 * n_words : 6 * n_words], \
        plane[6 * n_words : 7 * n_words], plane[7 * n_words :]
    if SPLIT_DOT_SUMS:  # four independent sums: four fused multiply-adds in flight, not one
        t0 = t1 = t2 = t3 = _i32(0)
        for n in range(n_words):
            low, high = row[n], row[n] >> 8
            t0 = _i32(t0 + _i32(_i16(low & 0xC0)) * _i32(p0[n]) + _i32(_i16(low & 0x30)) * _i32(p1[n]))
            t1 = _i32(t1 + _i32(_i16(low & 0x0C)) * _i32(p2[n]) + _i32(_i16(low & 0x03)) * _i32(p3[n]))
            t2 = _i32(t2 + _i32(_i16(high & 0xC0)) * _i32(p4[n]) + _i32(_i16(high & 0x30)) * _i32(p5[n]))
            t3 = _i32(t3 + _i32(_i16(high & 0x0C)) * _i32(p6[n]) + _i32(_i16(high & 0x03)) * _i32(p7[n]))
        return _i32(_i32(t0 + t1) + _i32(t2 + t3)) >> 6  # every product was 64·c·x
    total = _i32(0)
    for n in range(n_words):
        low, high = row[n], row[n] >> 8
        total = _i32(total + _i32(_i16(low & 0xC0)) * _i32(p0[n]) + _i32(_i16(low & 0x30)) * _i32(p1[n])
                     + _i32(_i16(low & 0x0C)) * _i32(p2[n]) + _i32(_i16(low & 0x03)) * _i32(p3[n])
                     + _i32(_i16(high & 0xC0)) * _i32(p4[n]) + _i32(_i16(high & 0x30)) * _i32(p5[n])
                     + _i32(_i16(high & 0x0C)) * _i32(p6[n]) + _i32(_i16(high & 0x03)) * _i32(p7[n]))
    return total >> 6  # every product was 64·c·x


@numba.njit(inline="always")
def _row_codes(row: np.ndarray, codes: np.ndarray) -> None:
    """One I2_S row (16-bit words) unpacked to int16 codes in the planes' order, each left at its
    place in the byte (c·4^(3-s)), as `_row_dot` meets them."""
    n = row.shape[0]
    # eight slices, not eight offsets into one array: only then does LLVM vectorize the loop (5x here)
    c0, c1, c2, c3 = codes[:n], codes[n : 2 * n], codes[2 * n : 3 * n], codes[3 * n : 4 * n]
    c4, c5, c6, c7 = codes[4 * n : 5 * n], codes[5 * n : 6 * n], codes[6 * n : 7 * n], codes[7 * n :]
    for i in range(n):
        low, high = row[i], row[i] >> 8
        c0[i], c1[i], c2[i], c3[i] = low & 0xC0, low & 0x30, low & 0x0C, low & 0x03
        c4[i], c5[i], c6[i], c7[i] = high & 0xC0, high & 0x30, high & 0x0C, high & 0x03


@numba.njit(inline="always")
def _codes_dot(codes: np.ndarray, plane: np.ndarray) -> np.int32:
    """Σ c·x of unpacked codes and one token's planes: a plain int16 dot (pmaddwd), then / 64."""
    total = _i32(0)
    for n in range(codes.shape[0]):
        total = _i32(total + _i32(codes[n]) * _i32(plane[n]))
    return total >> 6


@numba.njit(inline="always")
def _scaled(product: int, gamma: np.float32, scale: np.ndarray) -> np.float32:
    """BitLinear's output from an exact product: ((p / γ) · s) · s_out in float32, numpy's operations
    in numpy's order (scale = (s, s_out), s_out 1 when the weight has none: x · 1 is x)."""
    return np.float32(np.float32(np.float32(product) / gamma) * scale[0]) * scale[1]


@numba.njit(inline="always")
def _gemv_rows(packed: np.ndarray, plane: np.ndarray, x_sum: int, gamma: np.float32, scale: np.ndarray,
               out: np.ndarray, start: int, stop: int) -> None:
    """out[m] = Σ_k w[m, k]·x[k], scaled, for rows start..stop of one weight (16-bit words) and one token."""
    flat = packed.reshape(-1)
    for m in range(start, stop):
        _prefetch_row(flat, m + PREFETCH_ROWS, packed.shape[1])
        out[m] = _scaled(_row_dot(packed[m], plane) - x_sum, gamma, scale)


@numba.njit(inline="always")
def _gemv_rows_unpacked(packed: np.ndarray, planes: np.ndarray, x_sums: np.ndarray, gamma: np.ndarray,
                        scale: np.ndarray, out: np.ndarray, start: int, stop: int, codes: np.ndarray) -> None:
    """out[t, m] for rows start..stop and several tokens: each row is read from memory once and
    unpacked once to int16 codes (in L1), which every token then meets in a plain dot product
    (6912×2560, 40 tokens, 2 threads: 47 against 35 G MAC/s per core for _row_dot per token)."""
    for m in range(start, stop):
        _row_codes(packed[m], codes)
        for t in range(planes.shape[0]):
            out[t, m] = _scaled(_codes_dot(codes, planes[t]) - x_sums[t], gamma[t], scale)


@numba.njit(inline="always")
def decode_items(w0: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> tuple:
    """How many parallel work items of DECODE_ROWS rows each weight slot of `i2s_gemv` makes."""
    return ((w0.shape[0] + DECODE_ROWS - 1) // DECODE_ROWS, (w1.shape[0] + DECODE_ROWS - 1) // DECODE_ROWS,
            (w2.shape[0] + DECODE_ROWS - 1) // DECODE_ROWS)


@numba.njit(inline="always")
def _decode_chunk(chunk: int, c0: int, c1: int, w0: np.ndarray, w1: np.ndarray, w2: np.ndarray, out0: np.ndarray,
                  out1: np.ndarray, out2: np.ndarray) -> tuple:
    """Which weight slot work item `chunk` of `i2s_gemv` falls in (c0, c1: items of slots 0 and 1),
    that weight and its output, and the item's rows start..stop."""
    slot = 0 if chunk < c0 else 1 if chunk < c0 + c1 else 2
    w, out, first = (w0, out0, 0) if slot == 0 else (w1, out1, c0) if slot == 1 else (w2, out2, c0 + c1)
    start = (chunk - first) * DECODE_ROWS
    return slot, w, out, start, min(w.shape[0], start + DECODE_ROWS)


@numba.njit(parallel=True, **_JIT)
def i2s_gemv(w0: np.ndarray, w1: np.ndarray, w2: np.ndarray, x: np.ndarray, gamma: np.ndarray, scales: np.ndarray,
             out0: np.ndarray, out1: np.ndarray, out2: np.ndarray) -> None:
    """out_i[t, m] = ((Σ_k w_i[m, k]·x[t, k]) / γ[t] · s_i) · s'_i (`_scaled`) for one token or a few
    (x int8 (T, K), γ float32 (T,), out_i float32 (T, M_i)) and up to three weights that share them
    (q/k/v, gate/up) in one parallel region; w_i (M_i, K/4) I2_S rows, (s_i, s'_i) = scales[i]; an
    unused slot is a (0, K/4) weight. γ = s = s' = 1 gives the exact integer products. Every weight
    byte is read once whatever the number of tokens; past a few dozen tokens the prompt kernel
    (`i2s_gemm`) is faster."""
    tokens = x.shape[0]
    x_sums = np.empty(tokens, np.int64)
    planes = _planes(x, x_sums)
    w0, w1, w2 = w0.view(np.uint16), w1.view(np.uint16), w2.view(np.uint16)  # rows as 16-bit words
    c0, c1, c2 = decode_items(w0, w1, w2)
    if tokens == 1:
        for chunk in prange(c0 + c1 + c2):
            slot, w, out, start, stop = _decode_chunk(chunk, c0, c1, w0, w1, w2, out0, out1, out2)
            _gemv_rows(w, planes[0], x_sums[0], gamma[0], scales[slot], out[0], start, stop)
    else:
        for chunk in prange(c0 + c1 + c2):
            slot, w, out, start, stop = _decode_chunk(chunk, c0, c1, w0, w1, w2, out0, out1, out2)
            _gemv_rows_unpacked(w, planes, x_sums, gamma, scales[slot], out, start, stop,
                                np.empty(x.shape[1], np.int16))


@numba.njit(inline="always")
def _group_index() -> np.ndarray:
    """For each byte value: the index c0·27 + c1·9 + c2·3 + c3 of its four codes (shifts 6, 4, 2, 0)
    in a group's table of 81 sums. A code 3 (weight +2: only a damaged file has one) counts as 2
    here; `_table_rows` adds its activation a second time. (Built per call: numba does not cache
    code that reads a global array.)"""
    index = np.empty(256, np.uint8)
    for byte in range(256):
        i = 0
        for shift in (6, 4, 2, 0):
            i = i * 3 + min((byte >> shift) & 3, 2)
        index[byte] = i
    return index


@numba.njit(inline="always")
def _group_table(x: np.ndarray, t0: int, tokens: int, lanes: int, block: int, j: int, xs: np.ndarray,
                 pairs: np.ndarray, table: np.ndarray) -> None:
    """table[i, t] = Σ_s (c_s - 1)·x[t0 + t, 128·block + 32s + j] for the 81 code combinations i of
    byte j of the block, t < lanes (activations past `tokens` taken as 0): two 9-entry tables of
    pairs, then every pair of pairs added."""
    k = block * BLOCK + j
    for s in range(4):
        for t in range(tokens):
            xs[s, t] = x[t0 + t, k + BLOCK_BYTES * s]
        for t in range(tokens, lanes):
            xs[s, t] = 0
    for c0 in range(3):
        for c1 in range(3):
            high, low = pairs[c0 * 3 + c1], pairs[9 + c0 * 3 + c1]
            for t in range(lanes):
                high[t] = _i16((c0 - 1) * xs[0, t] + (c1 - 1) * xs[1, t])
                low[t] = _i16((c0 - 1) * xs[2, t] + (c1 - 1) * xs[3, t])
    for h in range(9):
        high = pairs[h]
        for lo in range(9):
            low, entry = pairs[9 + lo], table[h * 9 + lo]
            for t in range(lanes):
                entry[t] = _i16(high[t] + low[t])


@numba.njit(inline="always")
def _eight_entries(tables: np.ndarray, index: np.ndarray, row: np.ndarray, offset: int, j: int) -> tuple:
    """The table rows that bytes j..j+7 of the block at `offset` of a row select."""
    return (tables[j, index[row[offset + j]]], tables[j + 1, index[row[offset + j + 1]]],
            tables[j + 2, index[row[offset + j + 2]]], tables[j + 3, index[row[offset + j + 3]]],
            tables[j + 4, index[row[offset + j + 4]]], tables[j + 5, index[row[offset + j + 5]]],
            tables[j + 6, index[row[offset + j + 6]]], tables[j + 7, index[row[offset + j + 7]]])


@numba.njit(inline="always")
def _table_rows(packed: np.ndarray, block: int, tables: np.ndarray, index: np.ndarray, x: np.ndarray, t0: int,
                tokens: int, lanes: int, acc: np.ndarray, first: int, start: int, stop: int,
                partial: np.ndarray) -> None:
    """acc[first + m, :lanes] += Σ over block `block` of row m, for rows start..stop of one weight:
    each byte of the row picks one entry of its group's table, eight bytes per pass over the lanes;
    the first pass writes the int16 partial sum, the last adds it into the int32 totals. (Four
    passes of eight, not eight of four plus a zeroing and a totalling loop: Zen 3, one core, 128
    tokens, 44-50 → 76-80 G MAC/s. `partial` on the stack, not the heap: Xeon VM, 2 threads, 44
    tokens 51 → 60 G MAC/s per core, 320 tokens 93 → 100.) Each row also asks for its bytes two
    blocks on, the next 64-byte line: the rows lie a row's width apart, a pattern the hardware
    prefetcher does not follow (Xeon VM, 2 threads, 30 layers from DRAM: 44 tokens 67 → 74 G MAC/s
    per core, 64 tokens 94 → 103). The partial sum of a block is at most 32 · 4 · 128 = 16384 in size."""
    offset = block * BLOCK_BYTES
    ahead = offset + 2 * BLOCK_BYTES
    flat = packed.reshape(-1)
    for m in range(start, stop):
        row = packed[m]
        if ahead < packed.shape[1]:
            _prefetch(flat, m * packed.shape[1] + ahead)
        e0, e1, e2, e3, e4, e5, e6, e7 = _eight_entries(tables, index, row, offset, 0)
        for t in range(lanes):
            partial[t] = _i16(e0[t] + e1[t] + e2[t] + e3[t] + e4[t] + e5[t] + e6[t] + e7[t])
        for j in range(8, BLOCK_BYTES - 8, 8):
            e0, e1, e2, e3, e4, e5, e6, e7 = _eight_entries(tables, index, row, offset, j)
            for t in range(lanes):
                partial[t] = _i16(partial[t] + e0[t] + e1[t] + e2[t] + e3[t] + e4[t] + e5[t] + e6[t] + e7[t])
        e0, e1, e2, e3, e4, e5, e6, e7 = _eight_entries(tables, index, row, offset, BLOCK_BYTES - 8)
        total = acc[first + m]
        for t in range(lanes):
            total[t] += _i16(partial[t] + e0[t] + e1[t] + e2[t] + e3[t] + e4[t] + e5[t] + e6[t] + e7[t])
        threes = 0
        for j in range(BLOCK_BYTES):
            byte = row[offset + j]
            threes |= byte & (byte >> 1)
        if threes & 0x55:  # a code 3 somewhere in this block of the row: weight 2, its activation once more
            for j in range(BLOCK_BYTES):
                for s in range(4):
                    if (row[offset + j] >> (6 - 2 * s)) & 3 == 3:
                        k = block * BLOCK + BLOCK_BYTES * s + j
                        for t in range(tokens):
                            total[t] += x[t0 + t, k]


@numba.njit(inline="always")
def _write_out(acc: np.ndarray, first: int, gamma: np.ndarray, scale: np.ndarray, out: np.ndarray, t0: int,
               tokens: int, start: int, stop: int) -> None:
    """out[t0 + t, m] = the scaled acc[first + m, t] for rows start..stop, OUT_TILE rows at a time,
    so each token's row of `out` gets whole 64-byte lines: row by row, every token's value went to a
    different line, M floats apart (Xeon VM, 2 threads, 30 layers, 44 tokens: 620 → 594 ms)."""
    for tile in range(start, stop, OUT_TILE):
        for t in range(tokens):
            for m in range(tile, min(stop, tile + OUT_TILE)):
                out[t0 + t, m] = _scaled(acc[first + m, t], gamma[t0 + t], scale)


def i2s_gemm(w0: np.ndarray, w1: np.ndarray, w2: np.ndarray, x: np.ndarray, gamma: np.ndarray, scales: np.ndarray,
             out0: np.ndarray, out1: np.ndarray, out2: np.ndarray) -> None:
    """`i2s_gemv`'s results for many tokens x (T, K) int8 and up to three weights.

    Table lookups instead of multiplications: for each block of 128 weights, each of its 32 byte
    positions gets a table of the 81 sums ±x ± x ± x ± x its four codes can select, for up to
    PROMPT_TOKENS tokens side by side (int16). A row then costs one table row per byte: four weights
    times every token in a few vector adds. The three weights' rows, stacked, are split into equal
    parts, at least one per thread; each part builds its own tables block by block (663 KB for 128
    tokens: they stay in its core's L2 cache) and keeps int32 totals for its rows, so threads never
    wait for each other inside the call.
    """
    stacked = w0.shape[0] + w1.shape[0] + w2.shape[0]
    threads = numba.get_num_threads()
    _i2s_gemm(w0, w1, w2, x, gamma, scales, out0, out1, out2, threads * max(1, -(-stacked // (threads * PART_ROWS))))


@numba.njit(parallel=True, **_JIT)
def _i2s_gemm(w0: np.ndarray, w1: np.ndarray, w2: np.ndarray, x: np.ndarray, gamma: np.ndarray, scales: np.ndarray,
              out0: np.ndarray, out1: np.ndarray, out2: np.ndarray, parts: int) -> None:
    """i2s_gemm with the stacked rows split into `parts` equal parts."""
    m0, m1, m2 = w0.shape[0], w1.shape[0], w2.shape[0]
    stacked = m0 + m1 + m2
    n_tokens = x.shape[0]
    width = min(PROMPT_TOKENS, max(1, -(-n_tokens // TOKEN_STEP)) * TOKEN_STEP)
    index = _group_index()
    for part in prange(parts):
        lo, hi = part * stacked // parts, (part + 1) * stacked // parts
        tables = np.empty((BLOCK_BYTES, 81, width), np.int16)
        xs, pairs = np.empty((4, width), np.int16), np.empty((18, width), np.int16)
        acc = np.empty((hi - lo, width), np.int32)
        partial = numba.carray(_stack_int16(PROMPT_TOKENS), (PROMPT_TOKENS,))  # no overlap checks
        for t0 in range(0, n_tokens, PROMPT_TOKENS):
            tokens = min(PROMPT_TOKENS, n_tokens - t0)
            lanes = -(-tokens // TOKEN_STEP) * TOKEN_STEP  # tokens past the last one are zeros
            acc[:] = 0
            for block in range(x.shape[1] // BLOCK):
                for j in range(BLOCK_BYTES):
                    _group_table(x, t0, tokens, lanes, block, j, xs, pairs, tables[j])
                for slot in range(3):
                    w, base = (w0, 0) if slot == 0 else (w1, m0) if slot == 1 else (w2, m0 + m1)
                    start, stop = max(lo, base) - base, min(hi, base + w.shape[0]) - base
                    _table_rows(w, block, tables, index, x, t0, tokens, lanes, acc, base - lo, start, stop, partial)
            for slot in range(3):
                out, base = (out0, 0) if slot == 0 else (out1, m0) if slot == 1 else (out2, m0 + m1)
                _write_out(acc, base - lo, gamma, scales[slot], out, t0, tokens,
                           max(lo, base) - base, min(hi, base + out.shape[1]) - base)


@numba.njit(inline="always", fastmath={"reassoc"})
def _dot_f16(e_bits: np.ndarray, x: np.ndarray) -> np.float32:
    """Σ E·x in float32 for one f16 row given as int16 bits (the sum's order is LLVM's choice)."""
    total = np.float32(0)
    for k in range(e_bits.shape[0]):
        total += _half_to_float(e_bits[k]) * x[k]
    return total


@numba.njit(inline="always", fastmath={"reassoc"})
def _dot_f32(e: np.ndarray, x: np.ndarray) -> np.float32:
    total = np.float32(0)
    for k in range(e.shape[0]):
        total += e[k] * x[k]
    return total


@numba.njit(parallel=True, fastmath={"reassoc"}, **_JIT)
def head_f16(embedding: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[t, v] = Σ_d E[v, d]·x[t, d] for an f16 embedding given as int16 bits (V, D); x float32 (T, D)."""
    vocab = embedding.shape[0]
    for chunk in prange((vocab + HEAD_ROWS - 1) // HEAD_ROWS):
        for v in range(chunk * HEAD_ROWS, min(vocab, (chunk + 1) * HEAD_ROWS)):
            for t in range(x.shape[0]):
                out[t, v] = _dot_f16(embedding[v], x[t])


@numba.njit(parallel=True, fastmath={"reassoc"}, **_JIT)
def head_f16_rows(embedding: np.ndarray, ids: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[t, i] = Σ_d E[ids[i], d]·x[t, d]: `head_f16`'s logits of the vocabulary entries `ids`
    only, read where they lie (the same per-row loop, so the same bits)."""
    for chunk in prange((ids.shape[0] + HEAD_ROWS - 1) // HEAD_ROWS):
        for i in range(chunk * HEAD_ROWS, min(ids.shape[0], (chunk + 1) * HEAD_ROWS)):
            for t in range(x.shape[0]):
                out[t, i] = _dot_f16(embedding[ids[i]], x[t])


@numba.njit(parallel=True, fastmath={"reassoc"}, **_JIT)
def head_f32(embedding: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[t, v] = Σ_d E[v, d]·x[t, d] for a float32 embedding (V, D)."""
    vocab = embedding.shape[0]
    for chunk in prange((vocab + HEAD_ROWS - 1) // HEAD_ROWS):
        for v in range(chunk * HEAD_ROWS, min(vocab, (chunk + 1) * HEAD_ROWS)):
            for t in range(x.shape[0]):
                out[t, v] = _dot_f32(embedding[v], x[t])


@numba.njit(parallel=True, fastmath={"reassoc"}, **_JIT)
def screen_codes(embedding: np.ndarray, codes: np.ndarray, scale: np.ndarray, residual: np.ndarray,
                 code_norm: np.ndarray) -> None:
    """The int8 screen of an f16 embedding (int16 bits, V × D): per row scale = max|E| / 127 (1 for a
    zero row) and codes = rint(E / scale); a row holding a non-finite value gets scale NaN, codes 0.
    Also per row, for the screen's second bound: residual ≥ ‖E − scale·codes‖₂ and code_norm ≥
    ‖codes‖₂ (NaN for a non-finite row), both summed in float64 and rounded up by 2⁻²⁰ (a float64
    sum of D squares is within D·2⁻⁵³ of its value, whatever its order: `reassoc` lets it vectorize;
    the norms take the 2B4T's build from 0.05 to 0.12 s on 2 threads).

    The row's largest |E| is found on the bits: for f16, |E| orders as its low 15 bits do, and a
    value is infinite or NaN exactly when they are ≥ 0x7C00. An int16 max vectorizes; a float max
    with a finiteness test did not (2B4T embedding, Zen 3, 2 threads: 0.52 → 0.08 s)."""
    vocab, dim = embedding.shape
    up = 1.0 + 2.0**-20
    for chunk in prange((vocab + HEAD_ROWS - 1) // HEAD_ROWS):
        for v in range(chunk * HEAD_ROWS, min(vocab, (chunk + 1) * HEAD_ROWS)):
            row = embedding[v]
            top_bits = _i16(0)
            for d in range(dim):
                top_bits = max(top_bits, _i16(row[d] & _i16(0x7FFF)))
            if top_bits >= 0x7C00:
                scale[v] = residual[v] = code_norm[v] = np.float32(np.nan)
                codes[v, :] = 0
                continue
            top = _half_to_float(top_bits)
            s = top / np.float32(127) if top > 0 else np.float32(1)
            scale[v] = s
            out = codes[v]
            squares, misses = 0.0, 0.0
            for d in range(dim):
                value = _half_to_float(row[d])
                code = np.rint(value / s)
                out[d] = np.int8(code)
                miss = np.float64(value) - np.float64(s) * np.float64(code)
                squares += np.float64(code) * np.float64(code)
                misses += miss * miss
            residual[v] = np.float32(np.sqrt(misses) * up)
            code_norm[v] = np.float32(np.sqrt(squares) * up)


@numba.njit(inline="always")
def _dot_i8(codes: np.ndarray, x: np.ndarray) -> np.int32:
    """Σ codes·x of int8 codes and int16 activations, int16 products summed in int32 (pmaddwd):
    exact while Σ|codes·x| < 2**31, in any order."""
    total = _i32(0)
    for k in range(codes.shape[0]):
        total = _i32(total + _i32(_i16(codes[k])) * _i32(x[k]))
    return total


@numba.njit(parallel=True, **_JIT)
def head_i8(codes: np.ndarray, scale: np.ndarray, x: np.ndarray, sigma: np.ndarray, out: np.ndarray) -> None:
    """out[t, v] = (Σ_d codes[v, d]·x[t, d]) · (scale[v]·sigma[t]): the screen's estimate of every
    logit (half the bytes of the f16 head) from int16 activations x ≈ x_float / sigma, whose
    caller keeps 127·Σ_d |x[t, d]| < 2**31 so the integer sums are exact. Integer products cost
    less than widening the codes to float32: 17 → 14-15.6 ms on the 2B4T's screen, 2 threads
    (Zen 3 VM; a plain byte sum over it took 15-16 ms)."""
    vocab = codes.shape[0]
    for chunk in prange((vocab + HEAD_ROWS - 1) // HEAD_ROWS):
        for v in range(chunk * HEAD_ROWS, min(vocab, (chunk + 1) * HEAD_ROWS)):
            for t in range(x.shape[0]):
                out[t, v] = np.float32(_dot_i8(codes[v], x[t])) * (scale[v] * sigma[t])


@numba.njit(**_JIT)
def screen_top1(estimate: np.ndarray, scale: np.ndarray, slack: np.float32, include: np.ndarray) -> np.ndarray:
    """The rows whose exact logit may be the largest, as `LMHead._candidates` finds them for k = 1 in
    two passes instead of numpy's eight: with bounds b = scale·slack, every row whose e + b is not
    below the largest e − b of the rows outside `include` (sorted), NaN rows and `include` itself."""
    n = estimate.shape[0]
    floor = np.float32(-np.inf)
    j = 0
    for v in range(n):
        if j < include.shape[0] and include[j] == v:
            j += 1
            continue
        low = estimate[v] - scale[v] * slack
        if low > floor:  # a NaN never is
            floor = low
    keep = np.empty(n, np.intp)
    count = 0
    j = 0
    for v in range(n):
        listed = j < include.shape[0] and include[j] == v
        if listed:
            j += 1
        if listed or not estimate[v] + scale[v] * slack < floor:
            keep[count] = v
            count += 1
    return keep[:count]


@numba.njit(inline="always")
def _block_sum(a: np.ndarray, lo: int, n: int) -> np.float32:
    """numpy's float32 sum of a[lo:lo+n] for n ≤ 128: 8 accumulators, then a fixed tree."""
    if n < 8:
        total = np.float32(0)
        for i in range(n):
            total += a[lo + i]
        return total
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        total += a[lo + i]
        i += 1
    return total


@numba.njit
def _pairwise_sum(a: np.ndarray) -> np.float32:
    """Σ a in float32 in exactly numpy's order, so the compiled RMSNorm equals numpy's bit for bit.

    numpy halves the range (the first half a multiple of 8) until a part has ≤ 128 elements and adds
    the two halves' sums; this walks the same tree with an explicit stack (numba cannot cache
    recursive functions).
    """
    depth = 64
    lo, size, state = np.empty(depth, np.int64), np.empty(depth, np.int64), np.zeros(depth, np.int8)
    sums = np.empty(depth, np.float32)
    top, n_sums = 0, 0
    lo[0], size[0], state[0] = 0, a.shape[0], 0
    while top >= 0:
        n = size[top]
        half = n // 2 - (n // 2) % 8
        if n <= 128:
            sums[n_sums] = _block_sum(a, lo[top], n)
            n_sums += 1
            top -= 1
        elif state[top] < 2:  # push the left half, later the right half
            child_lo = lo[top] + (half if state[top] == 1 else 0)
            state[top] += 1
            top += 1
            lo[top], size[top], state[top] = child_lo, half if state[top - 1] == 1 else n - half, 0
        else:
            sums[n_sums - 2] = sums[n_sums - 2] + sums[n_sums - 1]
            n_sums -= 1
            top -= 1
    return sums[0]


@numba.njit(inline="always")
def _norm_quantize_row(row: np.ndarray, weight: np.ndarray, eps: np.float32, xq_row: np.ndarray,
                       squares: np.ndarray, y: np.ndarray) -> np.float32:
    """One row of `rmsnorm_quantize`; returns its γ (squares, y: scratch rows of the row's size)."""
    dim = row.shape[0]
    for d in range(dim):
        squares[d] = row[d] * row[d]
    mean = np.float32(np.float64(_pairwise_sum(squares)) / dim)
    inv = np.float32(1.0) / np.sqrt(mean + eps)
    amax = np.float32(0)
    for d in range(dim):
        y[d] = row[d] * inv * weight[d]
        amax = max(amax, abs(y[d]))
    g = np.float32(127.0 / max(np.float64(amax), 1e-5))
    for d in range(dim):
        xq_row[d] = np.int8(np.rint(y[d] * g))
    return g


@numba.njit(**_JIT)
def rmsnorm_quantize(x: np.ndarray, weight: np.ndarray, eps: np.float32, xq: np.ndarray, gamma: np.ndarray) -> None:
    """Per row of x (T, D): y = x / sqrt(mean(x²) + ε) · w, then γ = 127 / max(|y|, 1e-5) and
    xq = rint(y·γ) as int8 — the same operations, in the same order and precision, as the
    numpy RMSNorm and activation quantisation of transformer.py, so the results are identical.
    On the calling thread: a generated token's row is done before numba's threads would start."""
    dim = x.shape[1]
    squares, y = np.empty(dim, np.float32), np.empty(dim, np.float32)
    for t in range(x.shape[0]):
        gamma[t] = _norm_quantize_row(x[t], weight, eps, xq[t], squares, y)


@numba.njit(parallel=True, **_JIT)
def rmsnorm_quantize_rows(x: np.ndarray, weight: np.ndarray, eps: np.float32, xq: np.ndarray,
                          gamma: np.ndarray) -> None:
    """`rmsnorm_quantize` with the rows shared among numba's threads (a prompt's or a batch's rows)."""
    dim = x.shape[1]
    for t in prange(x.shape[0]):
        gamma[t] = _norm_quantize_row(x[t], weight, eps, xq[t], np.empty(dim, np.float32), np.empty(dim, np.float32))


@numba.njit(parallel=True, **_JIT)
def relu2_product(gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> None:
    """out = max(gate, 0)² · up elementwise (T, F), numpy's operations in numpy's order, rows shared
    among numba's threads: BitNet's FFN activation in one pass instead of three."""
    for t in prange(gate.shape[0]):
        g, u, o = gate[t], up[t], out[t]
        for f in range(g.shape[0]):
            v = g[f]
            r = v if v >= 0 or v != v else np.float32(0)  # np.maximum: a NaN passes through
            o[f] = (r * r) * u[f]


@numba.njit(**_JIT)
def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, out: np.ndarray) -> None:
    """NEOX rotate-half RoPE of x (heads, T, d), any strides, into out (heads, T, d): pairs
    (i, i + d/2) at angles whose cos and sin are (T, d/2). numpy's float32 operations exactly
    (x1·cos − x2·sin, x1·sin + x2·cos: no fast-math, so no fused multiply-add), in one pass
    instead of eight numpy calls. One thread: a token's q and k are a few thousand numbers."""
    half = x.shape[2] // 2
    for h in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(half):
                x1, x2 = x[h, t, i], x[h, t, half + i]
                out[h, t, i] = x1 * cos[t, i] - x2 * sin[t, i]
                out[h, t, half + i] = x1 * sin[t, i] + x2 * cos[t, i]


@numba.njit(inline="always", fastmath={"reassoc"})
def _group_scores(q: np.ndarray, t: int, first: int, keys: np.ndarray, visible: np.ndarray, n: int,
                  scale: np.float32, scores: np.ndarray) -> None:
    """scores[r, i] = scale · q[first + r, t] · keys[visible[i]] for the query heads r of one kv
    group and i < n: four keys a pass, each key read once for all the group's heads."""
    for i in range(0, n - 3, 4):
        k0, k1, k2, k3 = keys[visible[i]], keys[visible[i + 1]], keys[visible[i + 2]], keys[visible[i + 3]]
        for r in range(scores.shape[0]):
            query = q[first + r, t]
            s0 = s1 = s2 = s3 = np.float32(0)
            for d in range(query.shape[0]):
                s0 += query[d] * k0[d]
                s1 += query[d] * k1[d]
                s2 += query[d] * k2[d]
                s3 += query[d] * k3[d]
            scores[r, i], scores[r, i + 1], scores[r, i + 2], scores[r, i + 3] = (
                s0 * scale, s1 * scale, s2 * scale, s3 * scale)
    for i in range(n - n % 4, n):
        key = keys[visible[i]]
        for r in range(scores.shape[0]):
            query = q[first + r, t]
            s0 = np.float32(0)
            for d in range(query.shape[0]):
                s0 += query[d] * key[d]
            scores[r, i] = s0 * scale


@numba.njit(inline="always", fastmath={"reassoc"})
def _group_sums(weights: np.ndarray, values: np.ndarray, visible: np.ndarray, n: int, out: np.ndarray,
                t: int, first: int) -> None:
    """out[t, first + r] = Σ_i weights[r, i] · values[visible[i]] for the query heads r of one kv
    group: four values a pass, in position order, each value read once for all the group's heads."""
    for r in range(weights.shape[0]):
        out[t, first + r] = 0
    for i in range(0, n - 3, 4):
        v0, v1, v2, v3 = values[visible[i]], values[visible[i + 1]], values[visible[i + 2]], values[visible[i + 3]]
        for r in range(weights.shape[0]):
            p0, p1, p2, p3 = weights[r, i], weights[r, i + 1], weights[r, i + 2], weights[r, i + 3]
            row = out[t, first + r]
            for d in range(row.shape[0]):
                row[d] += (p0 * v0[d] + p1 * v1[d]) + (p2 * v2[d] + p3 * v3[d])
    for i in range(n - n % 4, n):
        v0 = values[visible[i]]
        for r in range(weights.shape[0]):
            p0, row = weights[r, i], out[t, first + r]
            for d in range(row.shape[0]):
                row[d] += p0 * v0[d]


@numba.njit(parallel=True, fastmath={"reassoc"}, **_JIT)
def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, mask: np.ndarray, scale: np.float32,
              out: np.ndarray) -> None:
    """Causal GQA attention, each query row with the query heads that share its kv head: q
    (n_head, T, d); keys, values (n_kv, ≥ L, d), of which the first L = mask.shape[1] positions
    are used (a KV cache as it is stored); mask (T, L) says which keys row t sees; out (T, n_head, d).

    A row's scores, softmax and weighted sum visit its visible keys in position order, so its
    numbers do not depend on which other rows share the call (prompt, token by token, token tree).
    The dot products over d may be reassociated (vectorized), as the LM head's are; the softmax's
    exp is `_exp_nonpositive` (within an ulp, vectorized). A kv group's heads are done together so
    each key and value is read once for all of them: one head at a time, a 2B4T prompt's keys
    and values came from L3 four times over.
    """
    n_head, tokens = q.shape[0], q.shape[1]
    n_kv = keys.shape[0]
    n_rep = n_head // n_kv
    length = mask.shape[1]
    for item in prange(n_kv * tokens):
        kv, t = item // tokens, item % tokens
        visible = np.empty(length, np.intp)
        n = 0
        for j in range(length):
            if mask[t, j]:
                visible[n] = j
                n += 1
        weights = np.empty((n_rep, n), np.float32)
        _group_scores(q, t, kv * n_rep, keys[kv], visible, n, scale, weights)
        for r in range(n_rep):
            scores = weights[r]
            best = np.float32(-np.inf)
            for i in range(n):
                best = max(best, scores[i])
            norm = np.float32(0)
            for i in range(n):
                scores[i] = _exp_nonpositive(scores[i] - best)
                norm += scores[i]
            # The weights are divided here, in a loop of their own: divided inside the loop over d,
            # reassociation lets LLVM compute (s·v)/norm there, a vector division per element
            # (2B4T shape, 320 queries over 580 keys: 57 → 37 ms a layer when it cannot).
            for i in range(n):
                scores[i] = scores[i] / norm
        _group_sums(weights, values[kv], visible, n, out, t, kv * n_rep)


# The one signature each kernel is used with (weights read-only: they are memory-mapped file pages),
# in the order `compile_all` takes them: a quick one first, which tells whether the cache is cold,
# and last the two that a helper process compiles meanwhile (HELPER_KERNELS).
SIGNATURES = {
    rope: (types.Array(types.float32, 3, "A"), _F32_MAT, _F32_MAT, _F32_CUBE),
    i2s_gemv: (_U8_ROWS, _U8_ROWS, _U8_ROWS, _I8_MAT, _F32_VEC, _F32_MAT, _F32_MAT, _F32_MAT, _F32_MAT),
    head_f16: (_I16_ROWS_RO, _F32_MAT, _F32_MAT),
    head_f16_rows: (_I16_ROWS_RO, types.Array(types.intp, 1, "C"), _F32_MAT, _F32_MAT),
    head_f32: (_F32_ROWS_RO, _F32_MAT, _F32_MAT),
    screen_codes: (_I16_ROWS_RO, _I8_MAT, _F32_VEC, _F32_VEC, _F32_VEC),
    head_i8: (_I8_ROWS_RO, _F32_VEC, _I16_MAT, _F32_VEC, _F32_MAT),
    screen_top1: (_F32_VEC_RO, _F32_VEC, types.float32, types.Array(types.intp, 1, "C")),
    rmsnorm_quantize: (_F32_MAT, _F32_VEC, types.float32, _I8_MAT, _F32_VEC),
    rmsnorm_quantize_rows: (_F32_MAT, _F32_VEC, types.float32, _I8_MAT, _F32_VEC),
    relu2_product: (_F32_MAT, _F32_MAT, _F32_MAT),
    _i2s_gemm: (_U8_ROWS, _U8_ROWS, _U8_ROWS, _I8_MAT, _F32_VEC, _F32_MAT, _F32_MAT, _F32_MAT, _F32_MAT, types.intp),
    attention: (_F32_CUBE, _F32_CUBE, _F32_CUBE, types.Array(types.boolean, 2, "C"), types.float32, _F32_CUBE),
}
# Compiled by a second process on a cold cache, into the same on-disk cache: the prompt kernel alone
# is 40 % of a first compile (Zen 3 VM: 15.3 of 38.5 s), and LLVM compiles on one core at a time.
HELPER_KERNELS = ("_i2s_gemm", "attention")
HELPER_TIMEOUT_S = 600
_COMPILED_BY_HELPER: set[str] = set()  # kernels this process loaded from a cache its helper filled


def compile_all(progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Compile every kernel for this CPU, or load it from the on-disk cache; seconds per kernel.

    `progress(done, total)` is called after each kernel (the first run on a CPU takes seconds per
    kernel, later runs load the cache in well under a second). On a cold cache with more than one
    core, a helper process compiles HELPER_KERNELS at the same time; if it fails, they are compiled here.
    """
    seconds: dict[str, float] = {}
    helper = None
    try:
        for i, (kernel, signature) in enumerate(SIGNATURES.items()):
            start = time.perf_counter()
            misses = sum(kernel.stats.cache_misses.values())
            helped = helper is not None and kernel.__name__ in HELPER_KERNELS and _finished(helper)
            kernel.compile(signature)
            seconds[kernel.__name__] = time.perf_counter() - start
            if helped and sum(kernel.stats.cache_hits.values()):
                _COMPILED_BY_HELPER.add(kernel.__name__)
            if i == 0 and sum(kernel.stats.cache_misses.values()) > misses:  # compiled now: the cache is cold
                helper = _start_helper(HELPER_KERNELS)
            if progress is not None:
                progress(i + 1, len(SIGNATURES))
    finally:
        if helper is not None and helper.poll() is None:
            helper.kill()
            helper.wait()
    return seconds


def _start_helper(names: tuple[str, ...]) -> subprocess.Popen | None:
    """A Python process compiling the kernels `names` into this process's kernel cache, or None where
    it would not help (one core) or cannot start (a frozen application)."""
    if (os.cpu_count() or 1) < 2 or getattr(sys, "frozen", False) or not sys.executable:
        return None
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(numba.config.CACHE_DIR),
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    code = "import sys; from edgebit.backends.numba_kernels import compile_named; compile_named(sys.argv[1:])"
    try:
        return subprocess.Popen([sys.executable, "-c", code, *names], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None


def _finished(helper: subprocess.Popen) -> bool:
    """Wait for the helper; whether it compiled everything it was given."""
    try:
        return helper.wait(timeout=HELPER_TIMEOUT_S) == 0
    except subprocess.TimeoutExpired:
        helper.kill()
        helper.wait()
        return False


def compile_named(names: list[str]) -> None:
    """Compile the kernels `names` into the on-disk cache (what the helper process runs)."""
    for kernel, signature in SIGNATURES.items():
        if kernel.__name__ in names:
            kernel.compile(signature)


def cache_hits() -> int:
    """How many kernel signatures were loaded from the on-disk cache as it was before this process's
    `compile_all` (a helper's fresh work counts as compiled)."""
    return sum(sum(kernel.stats.cache_hits.values()) for kernel in SIGNATURES
               if kernel.__name__ not in _COMPILED_BY_HELPER)


def set_threads(threads: int | None) -> None:
    """Use `threads` (None: all numba may use) for the parallel loops started from this thread
    (numba's setting is per thread; it is only changed when it differs: a token makes ~150 launches)."""
    limit = numba.config.NUMBA_NUM_THREADS
    wanted = max(1, min(threads or limit, limit))
    if getattr(_THREAD_SETTING, "threads", None) != wanted:
        numba.set_num_threads(wanted)
        _THREAD_SETTING.threads = wanted


class _Launch:
    """What `launch` returns: a plain context manager class, not a generator one (a token enters ~160
    of these; the generator form cost ~3 µs more each on the Zen 3 VM)."""

    __slots__ = ("threads",)

    def __init__(self, threads: int | None) -> None:
        self.threads = threads

    def __enter__(self) -> None:
        LAUNCH.acquire()
        try:
            set_threads(self.threads)
        except BaseException:
            LAUNCH.release()
            raise

    def __exit__(self, *exc: object) -> None:
        LAUNCH.release()


def launch(threads: int | None) -> _Launch:
    """`with launch(threads):` holds LAUNCH and runs the parallel kernels started inside on `threads` threads."""
    return _Launch(threads)
