"""The plain, obviously-correct backend: int8 codes resident, float32 BLAS product per call.

float32 is exact here (all partial sums are integers below 2**24), so this is the reference
the other kernels are checked against.
"""

from __future__ import annotations

import numpy as np

from ..weights import TernaryWeight
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    description = "int8 codes in memory, converted to float32 for a BLAS product on every call (simple, slow)"

    @classmethod
    def resident_bytes(cls, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1]

    def prepare(self, weight: TernaryWeight) -> np.ndarray:
        return np.ascontiguousarray(weight.codes(), dtype=np.int8)

    def matmul(self, prepared: np.ndarray, xq: np.ndarray) -> np.ndarray:
        return xq.astype(np.float32) @ prepared.astype(np.float32).T
