"""How far generation is from the memory system's limit: the decode kernel, the same weight stream
with almost no arithmetic, and the LM head, each read from DRAM.

    python benchmarks/decode_ceiling.py [--threads 2,1] [--repetitions 5] [--wait-idle]

A generated 2B4T token reads 30 layers of I2_S rows (520 MB) and the LM head: the f16 table
(657 MB) for every logit, or its int8 screen (328 MB) for a greedy or top-k token. Here 30
distinct random layers go through the decode kernel (`i2s_gemv`, one token), then through a
"stream" kernel that walks the same rows in the same work items with the same prefetching but
only adds up the bytes: the difference is the arithmetic that the memory traffic does not hide.
A 700 MB buffer is read between passes, as the head evicts the layers in the model, so every
pass starts from DRAM. The head kernels (`head_f16`, `head_i8`) are timed on a random 128256 × 2560
table.
Needs the compiled kernels (`pip install 'edgebit[fast]'`).
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from idle import busy_share, settle
from kernels import LAYER, layer_weights, slots_of
from numba import prange

from edgebit.backends import numba_kernels as nk
from edgebit.backends.machine import detect

LAYERS = 30
HEAD_SHAPE = (128256, 2560)
EVICT_BYTES = 700 * 2**20


@numba.njit(parallel=True, nogil=True)
def evict(buffer: np.ndarray) -> int:
    """Read one byte per 64-byte line of `buffer`, so the caches hold it instead of the weights."""
    total = 0
    for line in prange(buffer.shape[0] // 64):
        total += buffer[line * 64]
    return total


@numba.njit(inline="always")
def _row_sum(row: np.ndarray) -> np.uint16:
    total = np.uint16(0)
    for i in range(row.shape[0]):
        total = np.uint16(total + row[i])
    return total


@numba.njit(parallel=True, nogil=True)
def stream(w0: np.ndarray, w1: np.ndarray, w2: np.ndarray, out0: np.ndarray, out1: np.ndarray,
           out2: np.ndarray) -> None:
    """The decode kernel's walk over up to three weights (its work items, its prefetching), adding
    up each row's 16-bit words instead of multiplying them with activations."""
    w0, w1, w2 = w0.view(np.uint16), w1.view(np.uint16), w2.view(np.uint16)
    c0, c1, c2 = nk.decode_items(w0, w1, w2)
    for chunk in prange(c0 + c1 + c2):
        _, w, out, start, stop = nk._decode_chunk(chunk, c0, c1, w0, w1, w2, out0, out1, out2)
        flat = w.reshape(-1)
        for m in range(start, stop):
            nk._prefetch_row(flat, m + nk.PREFETCH_ROWS, w.shape[1])
            out[0, m] = _row_sum(w[m])


def prepared_layers(rng: np.random.Generator) -> list[list[tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]]]:
    """LAYERS layers of (weight slots, one token's int8 activations, outputs) per kernel call."""
    layers = []
    for _ in range(LAYERS):
        calls = []
        for rows, k in layer_weights(rng):
            slots = slots_of(rows, k)
            x = rng.integers(-127, 128, size=(1, k)).astype(np.int8)
            calls.append((slots, x, [np.empty((1, r.shape[0]), np.float32) for r in slots]))
        layers.append(calls)
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--wait-idle", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    layers = prepared_layers(rng)
    head = (rng.standard_normal(HEAD_SHAPE, dtype=np.float32) * 0.02).astype(np.float16).view(np.int16)
    hidden = rng.standard_normal((1, HEAD_SHAPE[1]), dtype=np.float32)
    logits = np.empty((1, HEAD_SHAPE[0]), np.float32)
    hidden_q = np.rint(hidden / np.abs(hidden).max() * 32767).astype(np.int16)  # the screen's int16 activations
    step = np.ones(1, np.float32)
    screen = np.empty(HEAD_SHAPE, np.int8)
    screen_scale, residual, code_norm = (np.empty(HEAD_SHAPE[0], np.float32) for _ in range(3))
    head.flags.writeable = False  # as the file's pages are: the signature the kernels are compiled for
    nk.screen_codes(head, screen, screen_scale, residual, code_norm)
    screen.flags.writeable = False
    buffer = np.ones(EVICT_BYTES, np.uint8)
    gamma, scales = np.ones(1, np.float32), np.ones((3, 2), np.float32)
    weight_bytes = sum(sum(outs) * k for outs, k in LAYER) * LAYERS // 4

    def decode() -> None:
        for calls in layers:
            for slots, x, outs in calls:
                nk.i2s_gemv(*slots, x, gamma, scales, *outs)

    def walk() -> None:
        for calls in layers:
            for slots, _, outs in calls:
                stream(*slots, *outs)

    def lm_head() -> None:
        nk.head_f16(head, hidden, logits)

    def lm_screen() -> None:
        nk.head_i8(screen, screen_scale, hidden_q, step, logits)

    runs = {"decode kernel": (decode, weight_bytes), "stream, same walk": (walk, weight_bytes),
            "LM head (f16)": (lm_head, head.nbytes), "LM head screen (i8)": (lm_screen, screen.nbytes)}
    machine = detect()
    print(f"{machine.cpu_model}, {machine.cpus} cores; {weight_bytes / 1e6:.0f} MB of ternary rows, "
          f"{head.nbytes / 1e6:.0f} MB of head")
    settle(args.wait_idle)
    for threads in (int(t) for t in args.threads.split(",")):
        nk.set_threads(threads)
        best = {name: float("inf") for name in runs}
        for _ in range(args.repetitions + 1):  # the first round compiles
            for name, (run, _) in runs.items():  # interleaved, so a drifting host affects all alike
                evict(buffer)
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
        for name, (_, nbytes) in runs.items():
            print(f"{threads} threads  {name:<19} {best[name] * 1e3:7.1f} ms  {nbytes / best[name] / 1e9:5.1f} GB/s")
    print(f"busy after: {busy_share():.0%}")


if __name__ == "__main__":
    main()
