"""The GGUF reader: layout, metadata types, I2_S tensors, and hostile files (spec §1, §10.1)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgebit import quants
from edgebit.gguf import GGUFError, GGUFFile
from edgebit.gguf_writer import GGUFWriter


def _small_file(path: Path, alignment: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, size=(4, 256), dtype=np.int8)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    w = GGUFWriter(path, alignment=alignment)
    w.add("general.architecture", "bitnet-b1.58")
    w.add("some.u8", 7, vtype=0)
    w.add("some.i64", -(2**40))
    w.add("some.f64", 1.5, vtype=12)
    w.add("some.bool", True)
    w.add("some.strings", ["a", "ß", ""])
    w.add("some.ints", np.arange(5, dtype=np.int32))
    w.add("some.nested", [[1, 2], [3]], elem_type=9)
    w.add_array("small.weight", f32)
    w.add_tensor("ternary.weight", codes.shape, "I2_S", quants.i2s_encode(codes, 0.25))
    w.write()
    return codes, f32


def test_reads_metadata_tensors_and_i2s(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    codes, f32 = _small_file(path)
    with GGUFFile(path) as g:
        meta = g.metadata
        assert meta["general.architecture"] == "bitnet-b1.58"
        assert meta["some.u8"] == 7 and meta["some.i64"] == -(2**40) and meta["some.f64"] == 1.5
        assert meta["some.bool"] is True and meta["some.strings"] == ["a", "ß", ""]
        assert meta["some.ints"].tolist() == [0, 1, 2, 3, 4]
        assert [a.tolist() for a in meta["some.nested"]] == [[1, 2], [3]]
        assert g.tensors["small.weight"].shape == (3, 5)
        np.testing.assert_array_equal(g.tensor_array("small.weight"), f32)
        info = g.tensors["ternary.weight"]
        assert info.type.name == "I2_S" and info.shape == (4, 256) and info.nbytes == 4 * 256 // 4 + 32
        assert info.offset % 32 == 0
        decoded, scale = quants.i2s_decode(g.tensor_bytes("ternary.weight"), codes.size)
        np.testing.assert_array_equal(decoded.reshape(codes.shape), codes)
        assert scale == 0.25


def test_tensor_rows_are_copied_from_the_file(tmp_path: Path) -> None:
    """`tensor_rows` reads rows by index (repeats and any order) as the memory map holds them, and
    refuses ids outside the table, tensors that are not 2-D float tables, and a replaced file."""
    path = tmp_path / "m.gguf"
    _, f32 = _small_file(path)
    g = GGUFFile(path)
    rows = g.tensor_rows("small.weight")
    ids = np.array([2, 0, 2, 1])
    np.testing.assert_array_equal(rows(ids), f32[ids])
    assert rows(np.array([], dtype=np.intp)).shape == (0, 5)
    for bad in ([3], [-1], [[0]]):
        with pytest.raises(IndexError, match="0..2"):
            rows(np.array(bad))
    with pytest.raises(GGUFError, match="ternary.weight"):
        g.tensor_rows("ternary.weight")
    path.rename(tmp_path / "old.gguf")
    _small_file(path)
    with pytest.raises(GGUFError, match="replaced"):
        g.tensor_rows("small.weight")
    np.testing.assert_array_equal(rows(ids), f32[ids])  # a reader keeps the file it opened


def test_tensor_rows_of_a_file_cut_short_say_so(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _small_file(path)
    g = GGUFFile(path)
    rows = g.tensor_rows("small.weight")
    end = g.tensors["small.weight"].offset + 2 * 5 * 4
    with open(path, "r+b") as fh:
        fh.truncate(end)
    np.testing.assert_array_equal(rows(np.array([1])).shape, (1, 5))
    with pytest.raises(GGUFError, match="row 2 is cut short"):
        rows(np.array([2]))


def test_custom_alignment(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _small_file(path, alignment=64)
    with GGUFFile(path) as g:
        assert g.alignment == 64 and all(t.offset % 64 == 0 for t in g.tensors.values())


def test_gguf_package_cannot_read_i2s_but_we_can(tmp_path: Path) -> None:
    """Documents why edgebit has its own reader (spec §1.2)."""
    import gguf

    path = tmp_path / "m.gguf"
    _small_file(path)
    with pytest.raises(ValueError):
        gguf.GGUFReader(path)
    with GGUFFile(path) as g:
        assert "ternary.weight" in g.tensors


def test_reference_files_match_manifest(testdata: Path) -> None:
    """Every tensor of the reference tools' files: type, shape, offset and size as recorded."""
    manifest = json.loads((testdata / "reference-models" / "manifest.json").read_text())
    assert len(manifest["models"]) == 6
    for model in manifest["models"]:
        with GGUFFile(testdata / "reference-models" / model["file"]) as g:
            assert g.metadata["general.architecture"] == model["arch"]
            assert g.data_offset == model["tensor_data_start"]
            assert len(g.tensors) == len(model["tensors"])
            for t in model["tensors"]:
                info = g.tensors[t["name"]]
                assert info.type.name == t["type"] and list(info.shape) == t["numpy_shape"]
                assert info.offset == g.data_offset + t["data_offset"] and info.nbytes == t["nbytes"]


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt) :]


def test_clear_errors_for_corrupt_headers(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _small_file(path)
    good = path.read_bytes()
    cases = {
        b"GGUX" + good[4:]: "not a GGUF file",
        _patch(good, 4, "<I", 9): "version 9",
        _patch(good, 8, "<Q", 2**60): "more than",
        _patch(good, 16, "<Q", 2**62): "more than",
        good[:100]: "more than a 100-byte file",
        good[:300]: "truncated or corrupt",
        good[: len(good) - 40]: "truncated download",
    }
    for i, (data, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.gguf"
        bad.write_bytes(data)
        with pytest.raises(GGUFError, match=message):
            GGUFFile(bad)


def test_a_bad_string_array_element_is_named(tmp_path: Path) -> None:
    """String arrays (a vocabulary) are read in one fast loop; a bad element still gets an error
    naming it, as a lone string does."""
    path = tmp_path / "m.gguf"
    _small_file(path)
    good = path.read_bytes()
    sharp_s = good.index(struct.pack("<Q", 2) + "ß".encode())  # element 1 of some.strings
    cases = {
        good[: sharp_s + 8] + b"\xc3\x28" + good[sharp_s + 10 :]: "element 1 of 'some.strings' is not valid UTF-8",
        _patch(good, sharp_s, "<Q", 2**40): "element 1 of 'some.strings' needs 1099511627776 bytes",
        _patch(good, sharp_s + 10, "<Q", 2**40): "element 2 of 'some.strings' needs 1099511627776 bytes",
    }
    for i, (data, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.gguf"
        bad.write_bytes(data)
        with pytest.raises(GGUFError, match=message):
            GGUFFile(bad)


def test_unknown_and_tl_types_name_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _small_file(path)
    data = path.read_bytes()
    name = b"ternary.weight"
    pos = data.index(name) + len(name) + 4 + 2 * 8  # after n_dims and two dims
    for type_id, words in ((38, "TL1"), (39, "TL2"), (99, "type id 99")):
        bad = tmp_path / f"t{type_id}.gguf"
        bad.write_bytes(_patch(data, pos, "<I", type_id))
        with pytest.raises(GGUFError, match=words) as err:
            GGUFFile(bad)
        assert "ternary.weight" in str(err.value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_files_fail_cleanly(tmp_path: Path, data: st.DataObject) -> None:
    """Truncations, byte flips and random insertions give GGUFError (or a valid file), never a crash."""
    path = tmp_path / "fuzz-src.gguf"
    if not path.exists():
        _small_file(path)
    good = bytearray(path.read_bytes())
    action = data.draw(st.sampled_from(["truncate", "flip", "overwrite"]))
    if action == "truncate":
        blob = bytes(good[: data.draw(st.integers(0, len(good) - 1))])
    elif action == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, 400))
            good[i] ^= data.draw(st.integers(1, 255))
        blob = bytes(good)
    else:
        i = data.draw(st.integers(0, 300))
        chunk = data.draw(st.binary(min_size=1, max_size=16))
        blob = bytes(good[:i]) + chunk + bytes(good[i + len(chunk) :])
    bad = tmp_path / "fuzz.gguf"
    bad.write_bytes(blob)
    try:
        with GGUFFile(bad) as g:
            for name in g.tensors:
                g.tensor_bytes(name)  # every listed tensor lies inside the file
    except GGUFError:
        pass


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(min_size=0, max_size=200))
def test_random_bytes_after_magic(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> None:
    path = tmp_path_factory.mktemp("rand") / "r.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + blob)
    try:
        GGUFFile(path).close()
    except GGUFError:
        pass
