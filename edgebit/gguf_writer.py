"""Write GGUF v3 files, including I2_S tensors (which the `gguf` package cannot write).

Used by `edgebit convert`, by the benchmark's random-model generator and by the tests that build
small models. Metadata types are inferred from Python values unless given explicitly.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from .gguf import DEFAULT_ALIGNMENT, TENSOR_TYPES

_TYPE_IDS = {t.name: t.id for t in TENSOR_TYPES.values()}
# Value type codes (spec §1.1).
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
        U64: "<Q", I64: "<q", F64: "<d"}
_NP_TYPES = {np.dtype("uint8"): U8, np.dtype("int8"): I8, np.dtype("uint16"): U16, np.dtype("int16"): I16,
             np.dtype("uint32"): U32, np.dtype("int32"): I32, np.dtype("float32"): F32, np.dtype("bool"): BOOL,
             np.dtype("uint64"): U64, np.dtype("int64"): I64, np.dtype("float64"): F64}


def _infer_type(value: Any) -> int:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return U32 if 0 <= value < 2**32 else I64
    if isinstance(value, float):
        return F32
    if isinstance(value, str):
        return STRING
    if isinstance(value, (list, tuple, np.ndarray)):
        return ARRAY
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value: Any, elem_type: int | None = None) -> bytes:
    if vtype == STRING:
        return _string(value)
    if vtype == ARRAY:
        if isinstance(value, np.ndarray) and value.dtype in _NP_TYPES:
            et = _NP_TYPES[value.dtype]
            return struct.pack("<IQ", et, value.size) + value.astype(value.dtype.newbyteorder("<")).tobytes()
        items = list(value)
        et = elem_type if elem_type is not None else (_infer_type(items[0]) if items else U32)
        if et == STRING:
            return struct.pack("<IQ", et, len(items)) + b"".join(_string(s) for s in items)
        if et == ARRAY:
            return struct.pack("<IQ", et, len(items)) + b"".join(_value(ARRAY, item) for item in items)
        return struct.pack("<IQ", et, len(items)) + b"".join(struct.pack(_FMT[et], v) for v in items)
    return struct.pack(_FMT[vtype], value)


class GGUFWriter:
    """Collect metadata and tensors, then `write()` them in one pass."""

    def __init__(self, path: str | os.PathLike[str], alignment: int = DEFAULT_ALIGNMENT) -> None:
        self.path = os.fspath(path)
        self.alignment = alignment
        self._kv: list[bytes] = []
        self._tensors: list[tuple[str, tuple[int, ...], int, bytes]] = []

    def add(self, key: str, value: Any, vtype: int | None = None, elem_type: int | None = None) -> None:
        """Add a metadata entry; `vtype` (and `elem_type` for arrays) override inference."""
        vtype = _infer_type(value) if vtype is None else vtype
        self._kv.append(_string(key) + struct.pack("<I", vtype) + _value(vtype, value, elem_type))

    def add_tensor(self, name: str, shape: Sequence[int], type_name: str, payload: bytes) -> None:
        """Add a tensor given its numpy shape (rows, cols), ggml type name and raw payload bytes."""
        self._tensors.append((name, tuple(int(d) for d in shape), _TYPE_IDS[type_name], bytes(payload)))

    def add_array(self, name: str, array: np.ndarray) -> None:
        """Add an F32 or F16 numpy array."""
        type_name = {np.dtype("float32"): "F32", np.dtype("float16"): "F16"}[array.dtype]
        self.add_tensor(name, array.shape, type_name, np.ascontiguousarray(array).tobytes())

    def write(self) -> None:
        if self.alignment != DEFAULT_ALIGNMENT:
            self.add("general.alignment", self.alignment, U32)
        infos, offset = [], 0
        for name, shape, type_id, payload in self._tensors:
            ne = tuple(reversed(shape))
            infos.append(_string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
                         + struct.pack("<IQ", type_id, offset))
            offset += -(-len(payload) // self.alignment) * self.alignment
        header = b"GGUF" + struct.pack("<IQQ", 3, len(self._tensors), len(self._kv)) + b"".join(self._kv)
        header += b"".join(infos)
        tmp = self.path + ".part"
        with open(tmp, "wb") as fh:
            fh.write(header + b"\0" * (-len(header) % self.alignment))
            for _, _, _, payload in self._tensors:
                fh.write(payload + b"\0" * (-len(payload) % self.alignment))
        os.replace(tmp, self.path)
