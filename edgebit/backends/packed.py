"""The small-memory backend: weights stay the file's 2-bit I2_S codes, decoded a tile of rows per use.

Resident cost is n/4 bytes (0.52 GB for the 2B4T), and for I2_S files those bytes are the memory
map itself, so nothing is copied at load. Each product expands row tiles into per-core scratch
with one AND per bit plane (`i2s.mask_planes`: no shifts, the activations carry the plane scale),
casts them to float32 and multiplies each plane with BLAS. The tiles hold value + 1 (0, 1, 2
times the plane scale); subtracting sum(x) from each product restores the ternary result and
saves a pass over the tile (exact up to K = 65536, `tiled.UNSIGNED_MAX_K`; wider matrices
subtract the offset from the tile instead).
"""

from __future__ import annotations

from math import gcd

import numpy as np

from ..weights import TernaryWeight
from .i2s import BLOCK, PLANE_SCALE, decode_blocks, mask_planes, packed_rows, plane_order, rows_decodable
from .tiled import UNSIGNED_MAX_K, TiledBackend, TiledWeight


class PackedBackend(TiledBackend):
    name = "packed"
    description = "2-bit I2_S codes in memory (0.25 byte/weight, the file itself), decoded per tile, BLAS product"

    @classmethod
    def resident_bytes(cls, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1] // 4

    def prepare_local(self, weight: TernaryWeight) -> TiledWeight:
        m, k = weight.shape
        unsigned = k < UNSIGNED_MAX_K
        if rows_decodable(weight.shape):
            scale = np.repeat(1.0 / PLANE_SCALE, k // 4).astype(np.float32)
            return TiledWeight(packed_rows(weight.i2s_bytes(), weight.shape), weight.shape, plane_order(k),
                               unsigned, planes=4, column_scale=scale)
        # Rows are not whole blocks: tiles must start on a block boundary, decoded in natural order.
        return TiledWeight(weight.i2s_bytes(), weight.shape, None, unsigned, align=BLOCK // gcd(k, BLOCK))

    def expand(self, weight: TiledWeight, start: int, stop: int, tile: np.ndarray) -> None:
        planes, n, width = tile.shape
        codes = self.scratch("codes", tile.size, np.uint8)
        if planes == 4:
            np.copyto(tile, mask_planes(weight.data[start:stop], codes.reshape(tile.shape)), casting="unsafe")
            if not weight.unsigned:
                tile -= PLANE_SCALE[:, None, None]  # (value + 1)·scale → value·scale
        else:
            decode_blocks(weight.data[start * width // 4 : stop * width // 4], codes)
            np.copyto(tile, codes.reshape(tile.shape), casting="unsafe")
            if not weight.unsigned:
                tile -= 1
