"""The prompt-processing ceiling of any float32-BLAS kernel on this machine, measured now.

    python benchmarks/blas_ceiling.py [--threads 2]

Every edgebit kernel ends in a float32 GEMM (numpy has no int8 one), and a 2B4T token costs
2 × 2.084 G multiply-adds = 4.17 GFLOP in the ternary products alone. So pp t/s can never exceed
(GEMM GFLOP/s) / 4.17. The host of a shared VM changes that rate from run to run (here 135–245
GFLOP/s on two threads), so run this beside `edgebit bench` to read its numbers as a fraction of
what the machine gave at the time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edgebit.backends.threads import blas_threads

GFLOP_PER_TOKEN = 2 * 2_084_044_800 / 1e9  # 2B4T ternary weights, one multiply-add each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    blas_threads().set(args.threads)
    rng = np.random.default_rng(0)
    weights = rng.integers(-1, 2, size=(6912, 2560)).astype(np.float32)  # the FFN shape
    x = rng.integers(-127, 128, size=(args.tokens, 2560)).astype(np.float32)
    best = 0.0
    for _ in range(6):
        start = time.perf_counter()
        weights @ x.T
        best = max(best, 2 * weights.size * args.tokens / (time.perf_counter() - start) / 1e9)
    print(f"float32 GEMM, {args.threads} threads, 6912x2560 by {args.tokens} tokens: {best:.0f} GFLOP/s "
          f"-> at most {best / GFLOP_PER_TOKEN:.0f} t/s of 2B4T prompt processing")


if __name__ == "__main__":
    main()
