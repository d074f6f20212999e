"""edgebit.safetensors: values equal the reference implementation's; damaged files give clear errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from edgebit.safetensors import Checkpoint, SafetensorsError, SafetensorsFile, parse_header


def _raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_values_match_the_safetensors_package(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"f32": rng.standard_normal((3, 5)).astype(np.float32),
               "f16": rng.standard_normal(7).astype(np.float16),
               "u8": rng.integers(0, 256, (4, 2, 3), dtype=np.uint8),
               "i8": rng.integers(-128, 128, 9, dtype=np.int8),
               "empty": np.zeros((0, 4), np.float32)}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    with SafetensorsFile(tmp_path / "a.safetensors") as f:
        assert f.metadata == {"format": "pt"} and set(f.tensors) == set(tensors)
        for name, ref in tensors.items():
            got = f.array(name)
            assert got.dtype == ref.dtype and np.array_equal(got, ref), name
            assert not got.flags.writeable or got.size == 0
        assert np.array_equal(f.float32("f16"), tensors["f16"].astype(np.float32))


def test_bf16_widens_exactly(tmp_path):
    torch = pytest.importorskip("torch")  # a test oracle only (README, "Tests")
    from safetensors.torch import save_file as save_torch

    t = torch.randn(6, 4).to(torch.bfloat16)
    save_torch({"w": t}, str(tmp_path / "b.safetensors"))
    f = SafetensorsFile(tmp_path / "b.safetensors")
    assert f.info("w").dtype == "BF16" and f.array("w").dtype == np.uint16
    assert np.array_equal(f.float32("w"), t.float().numpy())
    f.release("w")  # dropping the pages must not change what a later read sees
    assert np.array_equal(f.float32("w"), t.float().numpy())


def test_sharded_checkpoint_follows_the_index(tmp_path):
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": np.zeros(3, np.float32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    ckpt = Checkpoint(tmp_path)
    assert sorted(ckpt) == ["a", "b"] and ckpt.float32("b").tolist() == [0, 0, 0]
    save_file({"a": np.ones(1, np.float32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    with pytest.raises(SafetensorsError, match="in both"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(SafetensorsError, match="gone.safetensors"):
        Checkpoint(tmp_path)


def test_unsupported_dtype_is_named_on_read(tmp_path):
    save_file({"d": np.ones(2, np.float64)}, str(tmp_path / "d.safetensors"))
    f = SafetensorsFile(tmp_path / "d.safetensors")
    with pytest.raises(SafetensorsError, match="'d' is F64"):
        f.array("d")
    with pytest.raises(SafetensorsError, match="no tensor 'x'"):
        f.array("x")


@pytest.mark.parametrize("header, data, message", [
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside the data section"),
    ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "do not hold shape"),
    ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, "unknown dtype"),
    ({"t": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, b"", "non-negative"),
    ({"t": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}, "u": {"dtype": "U8", "shape": [2],
      "data_offsets": [0, 2]}}, b"\0" * 3, "overlap"),
    ({"t": [1, 2]}, b"", "not an object"),
    ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
    ([1, 2], b"", "not a JSON object"),
])
def test_bad_headers_name_the_problem(tmp_path, header, data, message):
    with pytest.raises(SafetensorsError, match=message):
        SafetensorsFile(_raw_file(tmp_path / "x.safetensors", header, data))


@pytest.mark.parametrize("content, message", [
    (b"", "too short"),
    (struct.pack("<Q", 1 << 40) + b"{}", "does not fit"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid UTF-8 JSON"),
    (struct.pack("<Q", 2) + b"{", "does not fit"),
])
def test_bad_files_name_the_problem(tmp_path, content, message):
    (tmp_path / "x.safetensors").write_bytes(content)
    with pytest.raises(SafetensorsError, match=message):
        SafetensorsFile(tmp_path / "x.safetensors")


_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4), max_leaves=20)
_entry = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "U8", "I8", "F64", "X"]),
                                "shape": st.lists(st.integers(-1, 6), max_size=3),
                                "data_offsets": st.lists(st.integers(-2, 70), min_size=0, max_size=3)})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=6), _entry | _json, max_size=5), size=st.integers(0, 64))
def test_fuzzed_headers_never_crash(tmp_path, header, size):
    try:
        tensors, _ = parse_header(json.dumps(header).encode(), size)
    except SafetensorsError:
        return
    f = SafetensorsFile(_raw_file(tmp_path / "h.safetensors", header, bytes(range(size))))
    for name, info in tensors.items():  # anything accepted is consistent with the data section and readable
        assert 0 <= info.start <= info.end <= size
        if info.dtype in ("F32", "F16", "BF16", "U8", "I8"):
            assert f.array(name).shape == info.shape


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=200))
def test_fuzzed_files_never_crash(tmp_path, blob):
    path = tmp_path / "f.safetensors"
    path.write_bytes(blob)
    try:
        f = SafetensorsFile(path)
    except SafetensorsError:
        return
    for name, info in f.tensors.items():
        if info.dtype in ("F32", "F16", "BF16", "U8", "I8"):
            assert f.float32(name).size == info.n_elements
