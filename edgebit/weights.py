"""Ternary weights as they come out of a GGUF file, before a backend chooses their resident form.

A `TernaryWeight` is `W = scale · T` with `T` in {-1, 0, +1}^(M×K). It keeps a zero-copy view
of the file's payload and decodes on demand, so a backend can keep the 2-bit I2_S codes as they
are (the `packed` backend) or expand them once (int8, float32) at load time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from . import quants
from .gguf import GGUFError, GGUFFile

log = logging.getLogger(__name__)

TERNARY_TYPES = ("I2_S", "TQ1_0", "TQ2_0")
# Float storage of an already-ternarised weight (upstream converter output): values are ±s or 0.
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass
class TernaryWeight:
    """One projection matrix: shape (M out, K in), per-tensor scale, and its payload in the file."""

    name: str
    shape: tuple[int, int]
    scale: float
    source_type: str
    raw: np.ndarray  # uint8 view of the GGUF payload
    _codes: np.ndarray | None = None

    @property
    def n_elements(self) -> int:
        return self.shape[0] * self.shape[1]

    def codes(self) -> np.ndarray:
        """The ternary matrix as int8 (M, K). Decoded on every call unless cached by `from_file`."""
        if self._codes is not None:
            return self._codes
        n = self.n_elements
        if self.source_type == "I2_S":
            flat, _ = quants.i2s_decode(self.raw, n)
        elif self.source_type == "TQ2_0":
            flat, _ = quants.tq2_0_decode(self.raw, n)
        elif self.source_type == "TQ1_0":
            flat, _ = quants.tq1_0_decode(self.raw, n)
        else:
            values = quants.dequantize(self.raw, self.source_type, n)
            flat = np.rint(values / np.float32(self.scale)).astype(np.int8) if self.scale else np.zeros(n, np.int8)
        return flat.reshape(self.shape)

    def i2s_bytes(self) -> np.ndarray:
        """The 2-bit codes in I2_S layout (n/4 bytes): a view for I2_S files, encoded otherwise."""
        n = self.n_elements
        if self.source_type == "I2_S":
            return self.raw[: n // 4]
        return np.frombuffer(quants.i2s_encode(self.codes(), self.scale), dtype=np.uint8)[: n // 4]


def _uniform_scale(name: str, d: np.ndarray, path: str) -> float:
    """The one scale of a TQ tensor whose non-empty blocks all carry the same d (BitNet weights do)."""
    d = d.astype(np.float32)
    nonzero = d[d != 0]
    if nonzero.size == 0:
        return 0.0
    if not np.all(nonzero == nonzero[0]):
        raise GGUFError(
            f"{path}: tensor {name!r} has different scales per block ({nonzero.min()}..{nonzero.max()}); "
            "it was not ternarised with one per-tensor scale (BitNet absmean), so edgebit cannot run it exactly"
        )
    return float(nonzero[0])


def load_ternary(gguf: GGUFFile, name: str) -> TernaryWeight:
    """Read a projection weight and its scale, checking that it really is ternary."""
    info = gguf.tensors.get(name)
    if info is None:
        raise GGUFError(f"{gguf.path}: required tensor {name!r} is missing")
    if len(info.shape) != 2:
        raise GGUFError(f"{gguf.path}: tensor {name!r} should be 2-D, has shape {info.shape}")
    raw = gguf.tensor_bytes(name)
    shape = (int(info.shape[0]), int(info.shape[1]))
    n = shape[0] * shape[1]
    tname = info.type.name
    if tname == "I2_S":
        scale = float(raw[n // 4 : n // 4 + 4].view("<f4")[0])
        if not np.isfinite(scale):
            raise GGUFError(f"{gguf.path}: tensor {name!r} has a non-finite I2_S scale {scale}")
        return TernaryWeight(name, shape, scale, tname, raw)
    if tname in ("TQ1_0", "TQ2_0"):
        decode = quants.tq1_0_decode if tname == "TQ1_0" else quants.tq2_0_decode
        codes, d = decode(raw, n)
        scale = _uniform_scale(name, d, gguf.path)
        return TernaryWeight(name, shape, scale, tname, raw, codes.reshape(shape))
    if tname in FLOAT_TYPES:
        values = quants.dequantize(raw, tname, n)
        scale = float(np.abs(values).max()) if n else 0.0
        codes = np.rint(values / np.float32(scale)).astype(np.int8) if scale else np.zeros(n, np.int8)
        err = np.abs(values - codes * np.float32(scale)).max() if scale else 0.0
        if err > 1e-3 * scale:
            log.warning(
                "%s: tensor %r (%s) is not ternary (max deviation %.3g of scale %.3g); rounding it to "
                "{-1,0,+1} × %.3g as BitNet does", gguf.path, name, tname, err, scale, scale,
            )
            scale = float(max(np.abs(values).mean(), 1e-5))  # BitNet's absmean β
            codes = np.clip(np.rint(values / np.float32(scale)), -1, 1).astype(np.int8)
        return TernaryWeight(name, shape, scale, tname, raw, codes.reshape(shape))
    raise GGUFError(
        f"{gguf.path}: tensor {name!r} is {tname}; a BitNet projection must be I2_S, TQ1_0, TQ2_0 or a "
        "float type holding ternary values"
    )
