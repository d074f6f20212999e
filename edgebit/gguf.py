"""A memory-mapped GGUF reader that also understands Microsoft's I2_S tensors.

The `gguf` package cannot open bitnet.cpp files (type id 36 raises), so edgebit parses the
container itself (spec §1). Every count, length and offset is checked against the file size
before anything is allocated: a hostile or truncated file produces a `GGUFError` that names
the key or tensor, never a crash, a hang or a huge allocation. Tensor payloads are numpy views
into the memory map; nothing is copied at open.
"""

from __future__ import annotations

import mmap
import os
import struct
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# A key or tensor name longer than this is not a GGUF file we want to read.
MAX_NAME_BYTES = 1 << 16
_LENGTH = struct.Struct("<Q")  # the length before every GGUF string
# Tensor types whose payload numpy reads as it is.
_FLOAT_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16)}


class GGUFError(ValueError):
    """The file is not a GGUF file edgebit can read; the message says where and why."""


# Metadata value types (spec §1.1).
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "uint8"),
    1: ("<b", "int8"),
    2: ("<H", "uint16"),
    3: ("<h", "int16"),
    4: ("<I", "uint32"),
    5: ("<i", "int32"),
    6: ("<f", "float32"),
    7: ("<?", "bool"),
    10: ("<Q", "uint64"),
    11: ("<q", "int64"),
    12: ("<d", "float64"),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorType:
    """Storage rule of a ggml tensor type: `block` elements take `block_bytes` bytes."""

    id: int
    name: str
    block: int
    block_bytes: int

    def nbytes(self, n_elements: int) -> int:
        if self.name in ("I2_S", "TL1"):
            return n_elements // 4 + 32
        return n_elements // self.block * self.block_bytes


TENSOR_TYPES: dict[int, TensorType] = {
    t.id: t
    for t in (
        TensorType(0, "F32", 1, 4),
        TensorType(1, "F16", 1, 2),
        TensorType(8, "Q8_0", 32, 34),
        TensorType(14, "Q6_K", 256, 210),
        TensorType(30, "BF16", 1, 2),
        TensorType(34, "TQ1_0", 256, 54),
        TensorType(35, "TQ2_0", 256, 66),
        TensorType(36, "I2_S", 128, 32),
    )
}
_UNSUPPORTED_HINTS = {
    38: "TL1 (bitnet.cpp's ARM lookup-table layout, build-specific); re-convert the model to I2_S",
    39: "TL2 (bitnet.cpp's x86 lookup-table layout) or MXFP4; re-convert the model to I2_S",
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. `shape` is numpy order (rows last-dimension-first), `offset` absolute."""

    name: str
    shape: tuple[int, ...]
    type: TensorType
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Bounds-checked little-endian reads over a buffer; errors say what was being read."""

    def __init__(self, buf: memoryview, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(
                f"{self.path}: truncated or corrupt file: {what} needs {n} bytes at offset "
                f"{self.pos}, but the file has {len(self.buf)} bytes"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.scalar("<Q", f"length of {what}")
        if limit is not None and length > limit:
            raise GGUFError(f"{self.path}: {what} is {length} bytes long (limit {limit}); corrupt file?")
        self.need(length, what)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def strings(self, count: int, key: str) -> list[str]:
        """`count` strings of the array `key`: what `string` reads, element by element, in one tight
        loop: a vocabulary is 128 256 tokens and 280 147 merges."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = _LENGTH.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                if pos + 8 > end:
                    break
                stop = pos + 8 + unpack(buf, pos)[0]
                if stop > end:
                    break
                append(str(buf[pos + 8 : stop], "utf-8"))
                pos = stop
        except UnicodeDecodeError:
            pass
        self.pos = pos
        # from a bad element on, `string` reads again, and its error names the element and the offset
        out.extend(self.string(f"element {j} of {key!r}") for j in range(len(out), count))
        return out


def _read_value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> Any:
    if vtype in _SCALARS:
        fmt, _ = _SCALARS[vtype]
        return cur.scalar(fmt, f"value of {key!r}")
    if vtype == _STRING:
        return cur.string(f"value of {key!r}")
    if vtype == _ARRAY:
        if depth > 2:
            raise GGUFError(f"{cur.path}: metadata {key!r} nests arrays more than 3 deep")
        etype = cur.scalar("<I", f"element type of {key!r}")
        count = cur.scalar("<Q", f"element count of {key!r}")
        if etype in _SCALARS:
            fmt, dtype = _SCALARS[etype]
            size = struct.calcsize(fmt)
            cur.need(count * size, f"{count} elements of {key!r}")
            arr = np.frombuffer(cur.buf, dtype=np.dtype(fmt), count=count, offset=cur.pos).copy()
            cur.pos += count * size
            return arr.astype(bool) if dtype == "bool" else arr
        if etype == _STRING:
            # Each string takes at least 8 bytes: a cheap sanity check before looping.
            cur.need(count * 8, f"{count} strings of {key!r}")
            return cur.strings(count, key)
        if etype == _ARRAY:
            cur.need(count * 12, f"{count} nested arrays of {key!r}")
            return [_read_value(cur, _ARRAY, key, depth + 1) for _ in range(count)]
        raise GGUFError(f"{cur.path}: metadata {key!r} has unknown array element type {etype}")
    raise GGUFError(f"{cur.path}: metadata {key!r} has unknown value type {vtype}")


class GGUFFile:
    """An open GGUF file: `metadata` (key → Python value), `tensors` (name → TensorInfo).

    Numeric arrays come back as numpy arrays, string arrays as lists of str. Use `tensor_bytes`
    or `tensor_array` to get zero-copy views of payloads.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as fh:
            stat = os.fstat(fh.fileno())
            size = stat.st_size
            if size < 24:
                raise GGUFError(f"{self.path}: not a GGUF file (only {size} bytes)")
            self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._identity = (stat.st_dev, stat.st_ino)  # `tensor_rows` reopens this file, not a replacement
        self.size = size
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self) -> None:
        cur = _Cursor(memoryview(self._mmap), self.path)
        magic = bytes(cur.buf[:4])
        if magic != MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        cur.pos = 4
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (only 2 and 3)")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        # Each record needs at least 12 (KV) or 28 (tensor) bytes: reject absurd counts early.
        if n_kv * 12 + n_tensors * 28 > self.size:
            raise GGUFError(
                f"{self.path}: header claims {n_kv} metadata entries and {n_tensors} tensors, "
                f"more than a {self.size}-byte file can hold"
            )
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"name of metadata entry {i}", MAX_NAME_BYTES)
            vtype = cur.scalar("<I", f"type of {key!r}")
            self.metadata[key] = _read_value(cur, vtype, key)
        self.alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment = {self.alignment} is not a power of two")

        infos = []
        for i in range(n_tensors):
            name = cur.string(f"name of tensor {i}", MAX_NAME_BYTES)
            n_dims = cur.scalar("<I", f"dimension count of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (1..4 allowed)")
            ne = [cur.scalar("<Q", f"dimension {d} of {name!r}") for d in range(n_dims)]
            type_id = cur.scalar("<I", f"type of {name!r}")
            offset = cur.scalar("<Q", f"offset of {name!r}")
            infos.append((name, ne, type_id, offset))
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment

        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, type_id, offset in infos:
            self.tensors[name] = self._check_tensor(name, ne, type_id, offset)

    def _check_tensor(self, name: str, ne: list[int], type_id: int, offset: int) -> TensorInfo:
        if name in self.tensors:
            raise GGUFError(f"{self.path}: tensor {name!r} appears twice")
        ttype = TENSOR_TYPES.get(type_id)
        if ttype is None:
            hint = _UNSUPPORTED_HINTS.get(type_id, "not a type edgebit reads; re-convert to I2_S, TQ2_0 or F16")
            raise GGUFError(f"{self.path}: tensor {name!r} has ggml type id {type_id}: {hint}")
        if any(d <= 0 for d in ne):
            raise GGUFError(f"{self.path}: tensor {name!r} has a zero or negative dimension {ne}")
        n = 1
        for d in ne:
            n *= d
            if n > self.size * 8:  # no type stores more than 8 elements per byte
                raise GGUFError(f"{self.path}: tensor {name!r} with dimensions {ne} cannot fit in the file")
        if n % ttype.block:
            raise GGUFError(
                f"{self.path}: tensor {name!r} ({ttype.name}) has {n} elements, "
                f"not a multiple of its block size {ttype.block}"
            )
        if ttype.block > 1 and ne[0] % ttype.block and ttype.name != "I2_S":
            raise GGUFError(
                f"{self.path}: tensor {name!r} ({ttype.name}) has rows of {ne[0]} elements, "
                f"not a multiple of its block size {ttype.block}"
            )
        if offset % self.alignment:
            raise GGUFError(f"{self.path}: tensor {name!r} offset {offset} is not aligned to {self.alignment}")
        nbytes = ttype.nbytes(n)
        start = self.data_offset + offset
        if start + nbytes > self.size:
            raise GGUFError(
                f"{self.path}: tensor {name!r} needs bytes {start}..{start + nbytes} but the file ends at "
                f"{self.size} (truncated download?)"
            )
        return TensorInfo(name, tuple(reversed(ne)), ttype, start, nbytes)

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw payload of a tensor as a read-only uint8 view of the memory map."""
        info = self.tensors[name]
        return np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def tensor_array(self, name: str) -> np.ndarray:
        """An F32/F16 tensor as a zero-copy numpy view in its numpy shape."""
        info = self.tensors[name]
        dtype = _FLOAT_DTYPES.get(info.type.name)
        if dtype is None:
            raise GGUFError(f"{self.path}: tensor {name!r} is {info.type.name}, not F32/F16")
        return self.tensor_bytes(name).view(dtype).reshape(info.shape)

    def tensor_rows(self, name: str) -> TensorRows | None:
        """A reader of rows of a 2-D F32/F16 tensor by index that copies them from the file
        (None where the platform has no `os.preadv`)."""
        info = self.tensors[name]
        if info.type.name not in _FLOAT_DTYPES or len(info.shape) != 2:
            raise GGUFError(f"{self.path}: tensor {name!r} is {info.type.name} {info.shape}, not a 2-D F32/F16 table")
        return TensorRows(self.path, self._identity, info) if hasattr(os, "preadv") else None

    def close(self) -> None:
        mm = getattr(self, "_mmap", None)
        if mm is not None and not mm.closed:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views still reference the map; it closes when they are gone

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorRows:
    """Rows of a 2-D F32/F16 tensor read by index with `pread`, into memory of the caller's own.

    Reading a few scattered rows through the memory map instead puts whole page-cache folios in
    the resident set: recent kernels (6.18 here) map a folio of up to 2 MB at each fault, so the
    ~220 rows a greedy token reads from the 2B4T's 128 256-row embedding made ~300 MB resident
    until they were given back. A copy moves 5 KB a row, at ~3 µs a row here.
    """

    def __init__(self, path: str, identity: tuple[int, int], info: TensorInfo) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        stat = os.fstat(fd)
        if (stat.st_dev, stat.st_ino) != identity:
            os.close(fd)
            raise GGUFError(f"{path}: the file was replaced after it was opened; load it again")
        weakref.finalize(self, os.close, fd)
        self._fd = fd
        self.path = path
        self.info = info
        self.dtype = _FLOAT_DTYPES[info.type.name]
        self.row_bytes = info.shape[1] * self.dtype.itemsize

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """The rows `ids` (1-D ints, each in 0..rows-1), as a new (len(ids), columns) array."""
        ids = np.asarray(ids, dtype=np.intp)
        rows, columns = self.info.shape
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= rows)):
            raise IndexError(f"{self.info.name}: row ids must be a 1-D array of ints in 0..{rows - 1}")
        out = np.empty((ids.size, columns), dtype=self.dtype)
        buffer, size = memoryview(out.reshape(-1).view(np.uint8)), self.row_bytes
        for i, row in enumerate(ids.tolist()):
            got = os.preadv(self._fd, [buffer[i * size : (i + 1) * size]], self.info.offset + row * size)
            if got != size:
                raise GGUFError(f"{self.path}: tensor {self.info.name!r} row {row} is cut short "
                                f"({got} of {size} bytes): the file changed after it was opened")
        return out
