"""G MAC/s per core of the compiled ternary kernels on the 2B4T layer shapes, by token count.

    python benchmarks/kernels.py [--threads 1,2] [--tokens 1,8,16,32,40,48,64,128,320] [--wait-idle]

One "layer" is the model's four kernel calls (q/k/v, o, gate/up, down: 69.5 M weights): the
decode kernel (`i2s_gemv`) up to the crossover the backend measured for this machine and the prompt
kernel (`i2s_gemm`) past it, both measured at every token count so the crossover can be checked. Random
weights (speed does not depend on their values) and random int8 activations; the best of several
repetitions, with the machine's busy share before the run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from idle import busy_share, settle
from llvmlite.binding import get_host_cpu_name

from edgebit.backends.compiled import NumbaBackend
from edgebit.backends.fast import kernels, read_only
from edgebit.backends.machine import detect

# (outputs of each weight in one call, input width): q/k/v, o, gate/up, down of the 2B4T
LAYER = [((2560, 640, 640), 2560), ((2560,), 2560), ((6912, 6912), 2560), ((2560,), 6912)]


def layer_weights(rng: np.random.Generator) -> list[tuple[list[np.ndarray], int]]:
    """Random I2_S rows (codes 0..2 only, as a converter writes them) for one layer's calls."""
    calls = []
    for outs, k in LAYER:
        rows = []
        for m in outs:
            codes = rng.integers(0, 3, size=(m, k // 4, 4), dtype=np.uint8)
            rows.append(read_only(codes[..., 0] << 6 | codes[..., 1] << 4 | codes[..., 2] << 2 | codes[..., 3]))
        calls.append((rows, k))
    return calls


def slots_of(rows: list[np.ndarray], k: int) -> list[np.ndarray]:
    """A call's weights padded to the kernels' three slots with (0, K/4) weights."""
    none = read_only(np.empty((0, k // 4), np.uint8))
    return [*rows, *[none] * (3 - len(rows))]


def time_layer(kernel: str, calls: list, tokens: int, rng: np.random.Generator, repetitions: int) -> float:
    """Best wall time of one layer's four calls of `kernel` ("gemv" or "gemm") at `tokens` tokens."""
    fast = kernels()
    prepared = []
    for rows, k in calls:
        x = rng.integers(-127, 128, size=(tokens, k)).astype(np.int8)
        slots = slots_of(rows, k)
        outs = [np.empty((tokens, r.shape[0]), np.float32) for r in slots]
        prepared.append((slots, x, outs))
    gamma, scales = np.ones(tokens, np.float32), np.ones((3, 2), np.float32)
    run = fast.i2s_gemv if kernel == "gemv" else fast.i2s_gemm
    best = float("inf")
    for _ in range(repetitions + 1):  # the first call also compiles or loads from the cache
        start = time.perf_counter()
        for slots, x, outs in prepared:
            run(*slots, x, gamma, scales, *outs)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--tokens", default="1,8,16,32,40,48,64,128,320")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--wait-idle", action="store_true")
    args = parser.parse_args()
    fast = kernels()
    if fast is None:
        raise SystemExit("numba is not installed: pip install 'edgebit[fast]'")
    rng = np.random.default_rng(0)
    calls = layer_weights(rng)
    macs = sum(sum(outs) * k for outs, k in LAYER)
    machine = detect()
    print(f"{machine.arch}, {machine.cpu_model} (LLVM: {get_host_cpu_name()}), {machine.cpus} cores; "
          f"{macs / 1e6:.1f} M weights a layer")
    settle(args.wait_idle)
    for threads in (int(t) for t in args.threads.split(",")):
        print(f"{threads} threads: the backend uses the decode kernel up to "
              f"{NumbaBackend(threads=threads).few_tokens()} tokens (its measured crossover, cached)")
    print(f"{'threads':>7} {'tokens':>6} {'gemv ms':>8} {'G MAC/s/core':>12} {'gemm ms':>8} {'G MAC/s/core':>12}")
    for threads in (int(t) for t in args.threads.split(",")):
        fast.set_threads(threads)
        for tokens in (int(t) for t in args.tokens.split(",")):
            cells = []
            for kernel in ("gemv", "gemm"):
                if kernel == "gemm" and tokens == 1:
                    cells.append(f"{'':>8} {'':>12}")
                    continue
                seconds = time_layer(kernel, calls, tokens, rng, args.repetitions)
                cells.append(f"{seconds * 1e3:8.2f} {macs * tokens / seconds / threads / 1e9:12.1f}")
            print(f"{threads:>7} {tokens:>6} {' '.join(cells)}")
    print(f"busy after: {busy_share():.0%}")


if __name__ == "__main__":
    main()
