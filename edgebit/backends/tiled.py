"""The shared loop of the BLAS kernels: expand a tile of weight rows to float32, multiply, next tile.

A backend keeps its weights compact (int8 or 2-bit codes) and expands only a tile of rows at a
time into a scratch buffer that stays in cache, so memory holds the compact form and the float32
product still runs in BLAS. float32 is exact here (spec §4.2): every partial sum is an integer
below 2**24. Each process (lane, `lanes.SplitBackend`) runs this loop over its slice of rows.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import numpy as np

from .i2s import permute_columns
from .lanes import SplitBackend

# Elements per float32 tile: decode tiles stay in L2 (~640 KB); prompt tiles are larger so each
# BLAS call has enough work (the expansion is paid once per tile for all T tokens).
DECODE_TILE = 160 * 1024
PROMPT_TILE = 4 * 1024 * 1024
PROMPT_TOKENS = 8  # from this many tokens per call on, use the larger tiles
UNSIGNED_MAX_K = 65536  # tiles of value + 1 keep |Σ (w + 1)·x| ≤ 256·K below 2**24 up to this width


@dataclass(frozen=True)
class TiledWeight:
    """A prepared weight: compact rows plus how a float32 tile of them lines up with the input."""

    data: np.ndarray  # backend-specific compact rows
    shape: tuple[int, int]  # (M, columns of an expanded row): K, or more if the layout pads rows
    perm: np.ndarray | None  # tile column q multiplies input column perm[q] (None: the identity)
    unsigned: bool  # tiles hold (value + 1)·scale: subtract sum(x[perm]) from each product
    planes: int = 1  # a tile is (planes, rows, columns / planes): each plane a contiguous block
    column_scale: np.ndarray | None = None  # tile column q holds its value times 1 / column_scale[q]
    align: int = 1  # tiles start at multiples of this many rows


class TiledBackend(SplitBackend):
    """Base of kernels that expand row tiles into float32 scratch and multiply them with BLAS."""

    def __init__(self, threads: int | None = None) -> None:
        super().__init__(threads)
        self._scratch: dict[str, np.ndarray] = {}

    def scratch(self, kind: str, size: int, dtype: type) -> np.ndarray:
        """A reusable flat buffer of at least `size` elements."""
        buf = self._scratch.get(kind)
        if buf is None or buf.size < size:
            buf = self._scratch[kind] = np.empty(size, dtype=dtype)
        return buf[:size]

    @abstractmethod
    def expand(self, weight: TiledWeight, start: int, stop: int, tile: np.ndarray) -> None:
        """Write rows start:stop of `weight` into the float32 `tile` (planes, stop - start, columns / planes)."""

    def matmul_local(self, prepared: TiledWeight, xq: np.ndarray) -> np.ndarray:
        m, width = prepared.shape
        planes, t = prepared.planes, xq.shape[0]
        x = permute_columns(xq, prepared.perm).astype(np.float32)
        correction = x.sum(axis=1, keepdims=True) if prepared.unsigned else None
        if prepared.column_scale is not None:
            x *= prepared.column_scale
        xp = np.ascontiguousarray(x.reshape(t, planes, width // planes).transpose(1, 0, 2))
        # Prompts multiply each tile by all T tokens: tile @ x.T (rows × tokens) keeps the big operand
        # on BLAS's left and runs ~20 % faster than x @ tile.T; decode steps keep the (1, rows) form.
        prompt = t >= PROMPT_TOKENS
        out = np.empty((m, t) if prompt else (t, m), dtype=np.float32)
        budget = PROMPT_TILE if prompt else DECODE_TILE
        rows = max(budget // max(width, 1), 1)
        rows = -(-m // -(-m // rows))  # equal tiles: no small last tile
        rows = -(-rows // prepared.align) * prepared.align
        most = min(rows, m)
        buf = self.scratch("tile", most * width, np.float32)
        part = self.scratch("part", planes * t * most, np.float32)
        for r in range(0, m, rows):
            n = min(rows, m - r)
            tile = buf[: n * width].reshape(planes, n, width // planes)
            self.expand(prepared, r, r + n, tile)
            if prompt:
                if planes == 1:
                    np.matmul(tile[0], xp[0].T, out=out[r : r + n])
                else:
                    products = np.matmul(tile, xp.transpose(0, 2, 1), out=part[: planes * t * n].reshape(planes, n, t))
                    np.add.reduce(products, axis=0, out=out[r : r + n])
            elif planes == 1:
                np.matmul(xp[0], tile[0].T, out=out[:, r : r + n])
            else:
                products = np.matmul(xp, tile.transpose(0, 2, 1), out=part[: planes * t * n].reshape(planes, t, n))
                np.add.reduce(products, axis=0, out=out[:, r : r + n])
        if prompt:
            out = out.T
        if correction is not None:
            out -= correction
        return out
