"""Codecs for the tensor types of BitNet GGUF files (spec §2).

Ternary types decode to int8 codes in {-1, 0, +1} (flat, row-major) plus their scale(s);
encoders exist for writing test models and converted checkpoints. Non-ternary types decode
to float32. All functions are vectorized numpy and take the raw payload bytes of one tensor.
"""

from __future__ import annotations

import numpy as np

I2S_BLOCK = 128  # elements per I2_S block (32 bytes)
TQ_BLOCK = 256  # elements per TQ1_0 / TQ2_0 block


class QuantError(ValueError):
    """Bytes that do not form a valid tensor of the given type and size."""


def _check_len(raw: np.ndarray, need: int, what: str) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size < need:
        raise QuantError(f"{what}: need {need} bytes, got {raw.size}")
    return raw


# --- I2_S (Microsoft bitnet.cpp, type 36): 128-element blocks, MSB pair first, fp32 scale in the tail


def i2s_decode(raw: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """Decode an I2_S payload of `n` elements to (int8 codes in {-1,0,1}, float32 scale)."""
    if n % I2S_BLOCK:
        raise QuantError(f"I2_S: {n} elements is not a multiple of {I2S_BLOCK}")
    raw = _check_len(raw, n // 4 + 4, "I2_S")
    packed = raw[: n // 4].reshape(-1, 1, 32)
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)
    codes = ((packed >> shifts) & 3).reshape(-1).view(np.int8) - np.int8(1)
    scale = float(raw[n // 4 : n // 4 + 4].view("<f4")[0])
    return codes, scale


def i2s_encode(codes: np.ndarray, scale: float) -> bytes:
    """Pack ternary codes (any shape, flattened row-major) and a scale as I2_S (n/4 + 32 bytes)."""
    flat = np.asarray(codes, dtype=np.int8).reshape(-1)
    if flat.size % I2S_BLOCK:
        raise QuantError(f"I2_S: {flat.size} elements is not a multiple of {I2S_BLOCK}")
    q = (flat + 1).astype(np.uint8).reshape(-1, 4, 32)
    packed = (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]
    tail = np.zeros(32, dtype=np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).tobytes(), dtype=np.uint8)
    return packed.astype(np.uint8).tobytes() + tail.tobytes()


# --- TQ2_0 (type 35): 256-element blocks, 64 bytes of 2-bit codes (LSB pair first) + f16 d


def tq2_0_decode(raw: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode TQ2_0 to (int8 codes, float16 block scales d of shape (n/256,))."""
    nb = n // TQ_BLOCK
    raw = _check_len(raw, nb * 66, "TQ2_0").reshape(-1)[: nb * 66].reshape(nb, 66)
    qs = raw[:, :64].reshape(nb, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    codes = ((qs >> shifts) & 3).reshape(-1).view(np.int8) - np.int8(1)
    d = np.ascontiguousarray(raw[:, 64:66]).view("<f2").reshape(nb)
    return codes, d


def tq2_0_encode(codes: np.ndarray, d: np.ndarray) -> bytes:
    """Pack ternary codes with one f16 scale per 256-element block as TQ2_0."""
    flat = np.asarray(codes, dtype=np.int8).reshape(-1)
    nb = flat.size // TQ_BLOCK
    q = (flat + 1).astype(np.uint8).reshape(nb, 2, 4, 32)
    qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    out = np.empty((nb, 66), dtype=np.uint8)
    out[:, :64] = qs.reshape(nb, 64)
    out[:, 64:] = np.asarray(d, dtype="<f2").reshape(nb, 1).view(np.uint8)
    return out.tobytes()


# --- TQ1_0 (type 34): 256-element blocks, base-3 packing: qs[48] (5 trits/byte), qh[4] (4 trits), f16 d

_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint16)


def _trits(b: np.ndarray, count: int) -> np.ndarray:
    """Trits 0..count-1 of each byte in b, as a new trailing-but-one axis: shape (..., count, len)."""
    t = (b[..., None, :].astype(np.uint16) * _POW3[:count, None]) & 0xFF
    return ((t * 3) >> 8).astype(np.uint8)


def tq1_0_decode(raw: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode TQ1_0 to (int8 codes, float16 block scales)."""
    nb = n // TQ_BLOCK
    raw = _check_len(raw, nb * 54, "TQ1_0").reshape(-1)[: nb * 54].reshape(nb, 54)
    first = _trits(raw[:, 0:32], 5).reshape(nb, 160)  # element 32n + m
    second = _trits(raw[:, 32:48], 5).reshape(nb, 80)  # element 160 + 16n + m
    third = _trits(raw[:, 48:52], 4).reshape(nb, 16)  # element 240 + 4n + j
    codes = np.concatenate([first, second, third], axis=1).reshape(-1).view(np.int8) - np.int8(1)
    d = np.ascontiguousarray(raw[:, 52:54]).view("<f2").reshape(nb)
    return codes, d


def _pack_trits(q: np.ndarray, count: int) -> np.ndarray:
    """q has shape (..., count, len) of trits 0..2; returns bytes ceil(v*256/243), trit 0 most significant."""
    weights = (3 ** np.arange(4, 4 - count, -1)).astype(np.uint32)
    v = (q.astype(np.uint32) * weights[:, None]).sum(axis=-2)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def tq1_0_encode(codes: np.ndarray, d: np.ndarray) -> bytes:
    """Pack ternary codes with one f16 scale per 256-element block as TQ1_0."""
    flat = np.asarray(codes, dtype=np.int8).reshape(-1)
    nb = flat.size // TQ_BLOCK
    q = (flat + 1).astype(np.uint8).reshape(nb, TQ_BLOCK)
    out = np.empty((nb, 54), dtype=np.uint8)
    out[:, 0:32] = _pack_trits(q[:, :160].reshape(nb, 5, 32), 5)
    out[:, 32:48] = _pack_trits(q[:, 160:240].reshape(nb, 5, 16), 5)
    out[:, 48:52] = _pack_trits(q[:, 240:].reshape(nb, 4, 4), 4)
    out[:, 52:] = np.asarray(d, dtype="<f2").reshape(nb, 1).view(np.uint8)
    return out.tobytes()


# --- float types


def dequantize(raw: np.ndarray, type_name: str, n: int) -> np.ndarray:
    """Decode a non-ternary tensor (F32, F16, BF16, Q8_0, Q6_K) to a flat float32 array."""
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if type_name == "F32":
        return _check_len(raw, 4 * n, "F32")[: 4 * n].view("<f4").astype(np.float32, copy=False)
    if type_name == "F16":
        return _check_len(raw, 2 * n, "F16")[: 2 * n].view("<f2").astype(np.float32)
    if type_name == "BF16":
        bits = _check_len(raw, 2 * n, "BF16")[: 2 * n].view("<u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    if type_name in ("Q8_0", "Q6_K"):
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        qtype = GGMLQuantizationType[type_name]
        block, size = (32, 34) if type_name == "Q8_0" else (256, 210)
        need = n // block * size
        return gguf_dequantize(_check_len(raw, need, type_name)[:need], qtype).reshape(-1).astype(np.float32)
    raise QuantError(f"cannot dequantize tensor type {type_name}")
