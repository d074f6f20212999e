"""A memory-mapped reader for Hugging Face safetensors files, in numpy only.

Format: an 8-byte little-endian header length N, N bytes of JSON
(`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the
raw tensor bytes; offsets are relative to the end of the header. `edgebit convert` reads
checkpoints with it tensor by tensor, so a 2B model never has to fit in RAM. Every length, shape
and offset is checked against the file before use: a damaged or hostile file raises
`SafetensorsError` with the file and tensor named, never a crash or a huge allocation.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# A header larger than this is not a checkpoint we want to parse (the reference implementation's limit).
MAX_HEADER_BYTES = 100 << 20
MAX_DIMS = 8
# Element sizes of every safetensors dtype, for validating offsets; only READABLE ones can be read.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
READABLE = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "U8": "u1", "I8": "i1"}


class SafetensorsError(ValueError):
    """The file is not a safetensors file edgebit can read; the message says where and why."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's dtype, shape and byte range [start, end) relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_header(raw: bytes, data_size: int, source: str = "<bytes>") -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a JSON header against a data section of `data_size` bytes → (tensors, metadata)."""

    def fail(problem: str) -> SafetensorsError:
        return SafetensorsError(f"{source}: {problem}")

    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise fail(f"header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise fail("__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise fail(f"tensor {name!r}: entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise fail(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_int(d) and d >= 0 for d in shape):
            raise fail(f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise fail(f"tensor {name!r}: data_offsets {offsets!r} are outside the data section "
                       f"of {data_size} bytes")
        info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
        if info.end - info.start != info.n_elements * DTYPE_SIZES[dtype]:
            raise fail(f"tensor {name!r}: {info.end - info.start} bytes do not hold shape {info.shape} of {dtype}")
        tensors[name] = info
    previous: TensorInfo | None = None
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if previous is not None and info.start < previous.end:
            raise fail(f"tensors {previous.name!r} and {info.name!r} overlap")
        previous = info
    return tensors, metadata


class SafetensorsFile:
    """One memory-mapped .safetensors file; tensors are read-only numpy views (nothing copied at open)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise SafetensorsError(f"{self.path}: {size} bytes is too short for a safetensors file")
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SafetensorsError(f"{self.path}: header length {n} does not fit the file of {size} bytes")
            raw = fh.read(n)
            self.data_offset = 8 + n
            self.tensors, self.metadata = parse_header(raw, size - self.data_offset, self.path)
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size > self.data_offset else None

    def close(self) -> None:
        """Drop the memory map (views handed out earlier keep it alive until they are gone)."""
        self._map = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise SafetensorsError(f"{self.path}: no tensor {name!r}")
        return self.tensors[name]

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only view in its stored type (BF16 comes back as its uint16 bit patterns)."""
        info = self.info(name)
        if info.dtype not in READABLE:
            raise SafetensorsError(f"{self.path}: tensor {name!r} is {info.dtype}; edgebit reads "
                                   f"{', '.join(READABLE)}")
        dtype = np.dtype(READABLE[info.dtype])
        if info.n_elements == 0 or self._map is None:
            return np.zeros(info.shape, dtype=dtype)
        return np.frombuffer(self._map, dtype=dtype, count=info.n_elements,
                             offset=self.data_offset + info.start).reshape(info.shape)

    def release(self, name: str) -> None:
        """Tell the OS the tensor's pages are no longer needed, so a large conversion's resident memory
        does not grow with the file (they are read again from disk if used later)."""
        info = self.info(name)
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if self._map is None or advice is None or info.end == info.start:
            return
        start = (self.data_offset + info.start) // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(self._map), self.data_offset + info.end)
        self._map.madvise(advice, start, end - start)

    def float32(self, name: str) -> np.ndarray:
        """The tensor converted to float32 (a new array; BF16 is widened exactly)."""
        info = self.info(name)
        data = self.array(name)
        if info.dtype == "BF16":
            return (data.astype(np.uint32) << 16).view(np.float32)
        return data.astype(np.float32)


class Checkpoint:
    """All tensors of a model directory: one `model.safetensors`, or shards listed by an index or glob."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        files = sorted(f for f in os.listdir(self.directory) if f.endswith(".safetensors"))
        if not files:
            raise SafetensorsError(f"{self.directory}: no *.safetensors files")
        index = os.path.join(self.directory, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
                listed = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise SafetensorsError(f"{index}: not a safetensors index ({exc})") from None
            missing = [f for f in listed if f not in files]
            if missing:
                raise SafetensorsError(f"{index}: lists shards that are not there: {', '.join(missing)}")
            files = listed
        self.files = [SafetensorsFile(os.path.join(self.directory, f)) for f in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.tensors:
                if name in self._where:
                    raise SafetensorsError(f"{self.directory}: tensor {name!r} is in both "
                                           f"{self._where[name].path} and {f.path}")
                self._where[name] = f

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise SafetensorsError(f"{self.directory}: the checkpoint has no tensor {name!r}")
        return self._where[name]

    def info(self, name: str) -> TensorInfo:
        return self.file(name).info(name)

    def array(self, name: str) -> np.ndarray:
        return self.file(name).array(name)

    def float32(self, name: str) -> np.ndarray:
        return self.file(name).float32(name)

    def release(self, name: str) -> None:
        self.file(name).release(name)

    def close(self) -> None:
        for f in self.files:
            f.close()
