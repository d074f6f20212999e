"""Fast decoding of I2_S rows (spec §2.2) for the kernels, in the order that is cheapest to produce.

Inside a 128-element block, byte i holds elements i, 32+i, 64+i, 96+i at shifts 6, 4, 2, 0. One
operation over a whole row of bytes therefore yields a quarter of every block at once: plane p
holds, at byte c, element k = 128·(c // 32) + 32·p + c % 32, and "plane-major" column order
q = p·K/4 + c lists the planes one after the other (`plane_order`). Kernels decode in that order
and permute the activations once per call instead of shuffling weights. `mask_planes` does not
even shift: plane p keeps its two bits in place, i.e. (value + 1)·4^(3 - p), and the kernel divides
the activations of that plane by 4^(3 - p) instead (`PLANE_SCALE`), which is exact. The bit
operations run on uint64 views, eight bytes per element. All this needs K % 128 == 0 (every row
made of whole blocks), true of all BitNet models; other shapes use `decode_blocks`, which keeps the
natural order (slower: short inner loops).
"""

from __future__ import annotations

from functools import cache

import numpy as np

BLOCK = 128
_LOW_PAIRS = np.uint64(0x0303030303030303)  # the low two bits of every byte
_SHIFTS = (6, 4, 2, 0)  # plane p sits at bit shift 6 - 2p
_PLANE_MASKS = np.array([int(_LOW_PAIRS) << s for s in _SHIFTS], dtype=np.uint64)[:, None]
PLANE_SCALE = np.array([4.0**3, 4.0**2, 4.0, 1.0], dtype=np.float32)  # mask_planes value / (value + 1)


def rows_decodable(shape: tuple[int, int]) -> bool:
    """Whether rows of an (M, K) I2_S tensor are whole blocks, so `decode_rows` applies."""
    return shape[1] % BLOCK == 0


@cache
def plane_order(k: int) -> np.ndarray:
    """perm with decoded column q holding original column perm[q] (K % 128 == 0); read-only."""
    q = np.arange(k)
    plane, c = q // (k // 4), q % (k // 4)
    perm = BLOCK * (c // 32) + 32 * plane + c % 32
    perm.flags.writeable = False
    return perm


def permute_columns(x: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
    """x[:, perm] for activations (T, K); the plane order is a block transpose, several times faster
    than fancy indexing, which only other orders fall back to."""
    if perm is None:
        return x
    t, k = x.shape
    if k % BLOCK == 0 and perm is plane_order(k):
        return np.ascontiguousarray(x.reshape(t, k // BLOCK, 4, 32).transpose(0, 2, 1, 3)).reshape(t, k)
    return x[:, perm]


def decode_rows(packed: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Codes 0..2 (value + 1) of packed rows (R, K/4) uint8 into out (R, K) uint8, plane-major order.

    Both arrays must be C-contiguous rows. Returns `out`.
    """
    rows, quarter = packed.shape
    src = packed.view(np.uint64)
    dst = out.view(np.uint64).reshape(rows, 4, quarter // 8)
    for p, shift in enumerate(_SHIFTS):
        np.right_shift(src, np.uint64(shift), out=dst[:, p])
        np.bitwise_and(dst[:, p], _LOW_PAIRS, out=dst[:, p])
    return out


def mask_planes(packed: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[p] = packed rows (R, K/4) with only plane p's bits kept: (value + 1)·PLANE_SCALE[p], uint8.

    `out` is (4, R, K/4) uint8; both arrays C-contiguous. Returns `out`.
    """
    np.bitwise_and(packed.reshape(1, -1).view(np.uint64), _PLANE_MASKS, out=out.reshape(4, -1).view(np.uint64))
    return out


def decode_blocks(packed: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Codes 0..2 of whole blocks (n/4 bytes) into out (n,) uint8, natural flat order. Returns `out`."""
    src = packed.reshape(-1, 32)
    dst = out.reshape(-1, 4, 32)
    for p, shift in enumerate(_SHIFTS):
        np.right_shift(src, shift, out=dst[:, p])
        np.bitwise_and(dst[:, p], 3, out=dst[:, p])
    return out


def packed_rows(weight_bytes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The I2_S payload (n/4 bytes) as (M, K/4) rows of packed bytes (a view)."""
    m, k = shape
    return weight_bytes[: m * k // 4].reshape(m, k // 4)
