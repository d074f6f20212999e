"""The lookup-table backend: five ternary weights per byte (base 3), multiplied by table lookups.

Weights are grouped five at a time along K and stored as one base-3 code per group
(c = Σ (w_i + 1)·3^i < 243), 1.6 bits per weight: the smallest resident form (0.42 GB for the
2B4T). For one token, the 243 possible partial sums of every group are computed at once
(`tables`: a (G, 5) × (5, 243) product) and each output is the sum over groups of
`table[g, code[m, g]]`, one `np.take` per tile of rows: one lookup replaces five multiply-adds.
For several tokens (prompt processing) a lookup per token loses to BLAS, so the codes are
expanded into base-3 digit planes (`expand`) and multiplied like the other tiled kernels.
Groups run along the plane-major I2_S column order (`i2s.plane_order`) so loading needs no
shuffle; the activations are permuted once per call. All sums are integers below 2**24: exact.
"""

from __future__ import annotations

import numpy as np

from ..weights import TernaryWeight
from .i2s import decode_rows, packed_rows, plane_order, rows_decodable
from .memory import release_file_pages
from .tiled import UNSIGNED_MAX_K, TiledBackend, TiledWeight

GROUP = 5  # weights per code
ENTRIES = 3**GROUP  # 243 codes, one byte
LOOKUP_TILE = 128 * 1024  # codes per lookup tile (index + gathered buffers stay in L2)
PACK_ROWS = 256  # rows decoded per step at load


def _digit_values() -> np.ndarray:
    """(GROUP, ENTRIES) float32: the ternary value (digit - 1) of position i in code c."""
    codes = np.arange(ENTRIES)
    return np.stack([(codes // 3**i) % 3 - 1 for i in range(GROUP)]).astype(np.float32)


DIGIT_VALUES = _digit_values()


class LUTBackend(TiledBackend):
    name = "lut"
    description = ("base-3 codes, 5 weights per byte (1.6 bits/weight); one token: per-token tables of "
                   "partial sums indexed by the codes; more tokens: digits expanded for BLAS")

    @classmethod
    def resident_bytes(cls, shape: tuple[int, int]) -> int:
        return shape[0] * -(-shape[1] // GROUP)

    def prepare_local(self, weight: TernaryWeight) -> TiledWeight:
        m, k = weight.shape
        groups = -(-k // GROUP)
        width = groups * GROUP
        decodable = weight.source_type == "I2_S" and rows_decodable(weight.shape)
        values = None if decodable else weight.codes()
        order = np.zeros(width, dtype=np.intp)  # pad positions read column 0; their weight is 0
        order[:k] = plane_order(k) if decodable else np.arange(k)
        codes = np.empty((m, groups), dtype=np.uint8)
        digits = np.ones((min(PACK_ROWS, m), width), dtype=np.uint8)  # pad columns keep digit 1 = value 0
        decoded = np.empty((min(PACK_ROWS, m), k), dtype=np.uint8)
        for r in range(0, m, PACK_ROWS):
            n = min(PACK_ROWS, m - r)
            d = digits[:n]
            if decodable:  # decode_rows needs whole contiguous rows, hence the copy
                d[:, :k] = decode_rows(packed_rows(weight.raw, weight.shape)[r : r + n], decoded[:n])
            else:
                np.add(values[r : r + n], 1, out=d[:, :k], casting="unsafe")
            d3 = d.reshape(n, groups, GROUP)
            c = codes[r : r + n]
            np.copyto(c, d3[:, :, GROUP - 1])
            for i in range(GROUP - 2, -1, -1):  # Horner: c = ((d4·3 + d3)·3 + ...)
                np.multiply(c, 3, out=c)
                np.add(c, d3[:, :, i], out=c)
        release_file_pages(weight.raw)
        digit_order = order.reshape(groups, GROUP).T.reshape(-1)  # tile column i·G + g ↔ group g, digit i
        return TiledWeight(codes, (m, width), digit_order, unsigned=width < UNSIGNED_MAX_K, planes=GROUP)

    def expand(self, weight: TiledWeight, start: int, stop: int, tile: np.ndarray) -> None:
        """Digit planes d_i = q_i - 3·q_(i+1) of the codes, q_i = code // 3^i (floor_divide is fast in
        numpy, remainder is not), cast to the float32 tile (GROUP, rows, groups)."""
        codes = weight.data[start:stop]
        digits = self.scratch("digits", tile.size, np.uint8).reshape(tile.shape)
        triple = self.scratch("triple", codes.size, np.uint8).reshape(codes.shape)
        np.copyto(digits[0], codes)
        for i in range(1, GROUP):
            np.floor_divide(codes, 3**i, out=digits[i])
        for i in range(GROUP - 1):
            np.multiply(digits[i + 1], 3, out=triple)
            np.subtract(digits[i], triple, out=digits[i])
        np.copyto(tile, digits, casting="unsafe")
        if not weight.unsigned:
            tile -= 1

    def matmul_local(self, prepared: TiledWeight, xq: np.ndarray) -> np.ndarray:
        if xq.shape[0] != 1:
            return super().matmul_local(prepared, xq)
        return self._lookup(prepared, xq[0].astype(np.float32))[None, :]

    def _lookup(self, weight: TiledWeight, x: np.ndarray) -> np.ndarray:
        """One token: y[m] = Σ_g table[g, code[m, g]] with table = partial sums of x per group."""
        codes = weight.data
        m, groups = codes.shape
        group_order = weight.perm.reshape(GROUP, groups).T.reshape(-1)
        tables = (x[group_order].reshape(groups, GROUP) @ DIGIT_VALUES).reshape(-1)
        offsets = np.arange(groups, dtype=np.intp) * ENTRIES
        ones = np.ones(groups, dtype=np.float32)
        out = np.empty(m, dtype=np.float32)
        rows = max(LOOKUP_TILE // groups, 1)
        most = min(rows, m)
        index = self.scratch("index", most * groups, np.intp)
        picked = self.scratch("picked", most * groups, np.float32)
        for r in range(0, m, rows):
            n = min(rows, m - r)
            i2, p2 = index[: n * groups].reshape(n, groups), picked[: n * groups].reshape(n, groups)
            np.add(codes[r : r + n], offsets, out=i2)
            np.take(tables, i2, out=p2, mode="wrap")  # indices are valid; "wrap" skips the check
            np.matmul(p2, ones, out=out[r : r + n])
        return out
