"""The most-memory backend: weights resident as float32 {-1, 0, +1}, one BLAS product per call.

Four bytes per weight (8.4 GB for the 2B4T, plus the LM head), but nothing to expand per call: a
decode step is a pure memory stream, which on a machine with fast memory and slow per-element
numpy work beats expanding int8 or 2-bit codes (benchmarks/RESULTS.md). The automatic choice
picks it only when it fits in memory and the probe measures it fastest.
"""

from __future__ import annotations

import numpy as np

from ..weights import TernaryWeight
from .i2s import decode_rows, packed_rows, permute_columns, plane_order, rows_decodable
from .lanes import SplitBackend
from .memory import release_file_pages


class Float32Backend(SplitBackend):
    name = "float32"
    description = "float32 values in memory (4 bytes/weight), plain BLAS product (fastest if memory is plentiful)"

    @classmethod
    def resident_bytes(cls, shape: tuple[int, int]) -> int:
        return 4 * shape[0] * shape[1]

    def prepare_local(self, weight: TernaryWeight) -> tuple[np.ndarray, np.ndarray | None]:
        m, k = weight.shape
        if weight.source_type == "I2_S" and rows_decodable(weight.shape):
            codes = decode_rows(packed_rows(weight.raw, weight.shape), np.empty((m, k), dtype=np.uint8))
            values, perm = codes.astype(np.float32), plane_order(k)
            values -= 1  # codes are value + 1
        else:
            values, perm = weight.codes().astype(np.float32), None
        release_file_pages(weight.raw)
        return values, perm

    def matmul_local(self, prepared: tuple[np.ndarray, np.ndarray | None], xq: np.ndarray) -> np.ndarray:
        values, perm = prepared
        x = permute_columns(xq, perm).astype(np.float32)
        return x @ values.T
