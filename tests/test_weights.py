"""Every storage of a ternary weight (I2_S, TQ1_0, TQ2_0, F16/F32 values ±s) means the same model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgebit import quants
from edgebit.backends import get_backend
from edgebit.gguf import GGUFError, GGUFFile
from edgebit.gguf_writer import GGUFWriter
from edgebit.synthetic import write_random_model
from edgebit.transformer import Transformer
from edgebit.weights import load_ternary

IDS = np.array([509, 5, 80, 81, 300, 7])

# (name, shape, type, payload) -> replacement tensors; returning [] drops the tensor
Rewrite = Callable[[str, tuple, str, bytes], list[tuple[str, tuple, str, bytes]]]


def _rewrite(src: Path, dst: Path, rewrite: Rewrite) -> Path:
    g = GGUFFile(src)
    w = GGUFWriter(dst)
    for key, value in g.metadata.items():
        w.add(key, value, elem_type=8 if isinstance(value, list) else None)
    for name, info in g.tensors.items():
        for new in rewrite(name, info.shape, info.type.name, g.tensor_bytes(name).tobytes()):
            w.add_tensor(*new)
    w.write()
    return dst


def _logits(path: Path, **kwargs: str) -> np.ndarray:
    t = Transformer(GGUFFile(path), get_backend("reference"), **kwargs)
    return t.logits(t.forward(IDS, t.new_cache()))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # scales drawn by the writer are arbitrary floats; round them to f16 so TQ files can hold them exactly
    src = Path(write_random_model(tmp_path_factory.mktemp("w") / "src.gguf", "tiny", seed=11))

    def f16_scales(name: str, shape: tuple, tname: str, raw: bytes) -> list:
        if tname != "I2_S":
            return [(name, shape, tname, raw)]
        codes, scale = quants.i2s_decode(np.frombuffer(raw, np.uint8), shape[0] * shape[1])
        return [(name, shape, tname, quants.i2s_encode(codes, float(np.float16(scale))))]

    return _rewrite(src, src.with_name("base.gguf"), f16_scales)


def _as(kind: str) -> Rewrite:
    def rewrite(name: str, shape: tuple, tname: str, raw: bytes) -> list:
        if tname != "I2_S":
            return [(name, shape, tname, raw)]
        n = shape[0] * shape[1]
        codes, scale = quants.i2s_decode(np.frombuffer(raw, np.uint8), n)
        if kind in ("F16", "F32"):
            values = (codes.astype(np.float32) * np.float32(scale)).astype(kind.lower().replace("f", "float"))
            return [(name, shape, kind, values.tobytes())]
        d = np.full(n // 256, scale, np.float16)
        encode = quants.tq2_0_encode if kind == "TQ2_0" else quants.tq1_0_encode
        return [(name, shape, kind, encode(codes, d))]

    return rewrite


@pytest.mark.parametrize("kind", ["F16", "F32", "TQ2_0", "TQ1_0"])
def test_storage_types_give_identical_logits(base: Path, tmp_path: Path, kind: str) -> None:
    other = _rewrite(base, tmp_path / f"{kind}.gguf", _as(kind))
    g = GGUFFile(other)
    w = load_ternary(g, "blk.0.attn_q.weight")
    assert w.source_type == kind
    np.testing.assert_array_equal(w.codes(), load_ternary(GGUFFile(base), "blk.0.attn_q.weight").codes())
    np.testing.assert_array_equal(_logits(other), _logits(base))


def test_output_scale_tensors_multiply_the_projection(base: Path, tmp_path: Path) -> None:
    """arch `bitnet`: `blk.N.attn_q.scale` = 2 equals doubling the I2_S scale of attn_q."""
    def add_scale(name: str, shape: tuple, tname: str, raw: bytes) -> list:
        out = [(name, shape, tname, raw)]
        if name == "blk.0.attn_q.weight":
            out.append(("blk.0.attn_q.scale", (1,), "F32", np.float32(2.0).tobytes()))
        return out

    def double(name: str, shape: tuple, tname: str, raw: bytes) -> list:
        if name != "blk.0.attn_q.weight":
            return [(name, shape, tname, raw)]
        codes, scale = quants.i2s_decode(np.frombuffer(raw, np.uint8), shape[0] * shape[1])
        return [(name, shape, tname, quants.i2s_encode(codes, 2 * scale))]

    scaled = _rewrite(base, tmp_path / "scaled.gguf", add_scale)
    doubled = _rewrite(base, tmp_path / "doubled.gguf", double)
    np.testing.assert_array_equal(_logits(scaled), _logits(doubled))
    assert np.abs(_logits(scaled) - _logits(base)).max() > 1e-3


def test_tq_with_different_block_scales_is_refused(base: Path, tmp_path: Path) -> None:
    def mixed(name: str, shape: tuple, tname: str, raw: bytes) -> list:
        if name != "blk.1.ffn_up.weight":
            return _as("TQ2_0")(name, shape, tname, raw)
        n = shape[0] * shape[1]
        codes, _ = quants.i2s_decode(np.frombuffer(raw, np.uint8), n)
        d = np.where(np.arange(n // 256) % 2, 0.5, 0.25).astype(np.float16)
        return [(name, shape, "TQ2_0", quants.tq2_0_encode(codes, d))]

    bad = _rewrite(base, tmp_path / "mixed.gguf", mixed)
    with pytest.raises(GGUFError, match="blk.1.ffn_up.weight.*different scales"):
        Transformer(GGUFFile(bad), get_backend())


def test_non_projection_type_is_refused(base: Path, tmp_path: Path) -> None:
    def q8(name: str, shape: tuple, tname: str, raw: bytes) -> list:
        if name != "blk.0.ffn_down.weight":
            return [(name, shape, tname, raw)]
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        values = np.ones(shape, np.float32)
        return [(name, shape, "Q8_0", quantize(values, GGMLQuantizationType.Q8_0).tobytes())]

    bad = _rewrite(base, tmp_path / "q8.gguf", q8)
    with pytest.raises(GGUFError, match="blk.0.ffn_down.weight.*Q8_0"):
        Transformer(GGUFFile(bad), get_backend())
