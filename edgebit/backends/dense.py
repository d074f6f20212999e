"""The backend for moderate memory: int8 codes resident, cast to float32 a cache-sized tile at a time.

One byte per weight (2.1 GB for the 2B4T) instead of four: with the LM head it fits a 4 GB
machine, where float32-resident weights (`float32`, 8.4 GB) do not. Per call, each tile of rows
is cast into a scratch buffer that stays in L2 and multiplied there with BLAS (benchmarks/RESULTS.md
has the costs). The codes are stored in the I2_S plane-major column order (`i2s.decode_rows`) so
loading is a few bit operations per row; the activations are permuted to match once per call.
The pages of the file are released after decoding.
"""

from __future__ import annotations

import numpy as np

from ..weights import TernaryWeight
from .i2s import decode_rows, packed_rows, plane_order, rows_decodable
from .memory import release_file_pages
from .tiled import TiledBackend, TiledWeight


class DenseBackend(TiledBackend):
    name = "dense"
    description = "int8 codes in memory (1 byte/weight), cast to float32 per cache-sized tile, BLAS product"

    @classmethod
    def resident_bytes(cls, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1]

    def prepare_local(self, weight: TernaryWeight) -> TiledWeight:
        m, k = weight.shape
        if weight.source_type == "I2_S" and rows_decodable(weight.shape):
            codes = decode_rows(packed_rows(weight.raw, weight.shape), np.empty((m, k), dtype=np.uint8))
            np.subtract(codes, 1, out=codes)  # code - 1, wrapping 0 to 255 = int8 -1
            prepared = TiledWeight(codes.view(np.int8), weight.shape, plane_order(k), unsigned=False)
        else:
            codes = np.ascontiguousarray(weight.codes(), dtype=np.int8)
            prepared = TiledWeight(codes, weight.shape, None, unsigned=False)
        release_file_pages(weight.raw)
        return prepared

    def expand(self, weight: TiledWeight, start: int, stop: int, tile: np.ndarray) -> None:
        np.copyto(tile[0], weight.data[start:stop], casting="unsafe")
