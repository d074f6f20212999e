"""Ternary codecs: the spec's worked examples, round trips, and agreement with gguf.quants (spec §2, §10.2-3)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgebit import quants

WORKED = ((np.arange(256) % 3) - 1).astype(np.int8)


def test_i2s_worked_example() -> None:
    raw = quants.i2s_encode(WORKED[:128], 1.0)
    assert raw[:8] == bytes.fromhex("2449922449922449")
    assert raw[0] == 0b00_10_01_00  # codes of elements 0, 32, 64, 96
    assert len(raw) == 128 // 4 + 32


def test_i2s_reads_only_first_four_tail_bytes() -> None:
    raw = bytearray(quants.i2s_encode(WORKED[:128], 0.75))
    raw[36:] = b"\xab" * 28  # llama-quantize leaves garbage here
    codes, scale = quants.i2s_decode(np.frombuffer(bytes(raw), np.uint8), 128)
    np.testing.assert_array_equal(codes, WORKED[:128])
    assert scale == 0.75


def test_tq_worked_examples() -> None:
    d = np.array([0.5], np.float16)
    tq2 = quants.tq2_0_encode(WORKED, d)
    assert tq2[:6] == bytes.fromhex("186186186186")
    assert tq2[64:] == bytes.fromhex("0038")
    tq1 = quants.tq1_0_encode(WORKED, d)
    assert tq1[:6] == bytes.fromhex("456ccf456ccf")
    assert tq1[48:52] == bytes.fromhex("3092bb30") and tq1[52:] == bytes.fromhex("0038")


ternary_blocks = st.integers(1, 6).flatmap(
    lambda nb: hnp.arrays(np.int8, nb * 256, elements=st.integers(-1, 1))
)


@settings(max_examples=100, deadline=None)
@given(codes=ternary_blocks, scale=st.floats(2.0**-12, 1024.0, width=32))
def test_round_trips(codes: np.ndarray, scale: float) -> None:
    out, s = quants.i2s_decode(np.frombuffer(quants.i2s_encode(codes, scale), np.uint8), codes.size)
    np.testing.assert_array_equal(out, codes)
    assert s == np.float32(scale)
    d = np.full(codes.size // 256, scale, np.float16)
    for enc, dec in ((quants.tq2_0_encode, quants.tq2_0_decode), (quants.tq1_0_encode, quants.tq1_0_decode)):
        out, dd = dec(np.frombuffer(enc(codes, d), np.uint8), codes.size)
        np.testing.assert_array_equal(out, codes)
        np.testing.assert_array_equal(dd, d)


@settings(max_examples=50, deadline=None)
@given(x=st.integers(1, 4).flatmap(lambda nb: hnp.arrays(np.float32, (2, nb * 256),
                                                         elements=st.floats(-8, 8, width=32))))
def test_tq_codecs_agree_with_gguf_quants(x: np.ndarray) -> None:
    """Our decoders reproduce gguf.quants' dequantization, and our encoders its bytes."""
    for qtype, dec, enc in ((QT.TQ2_0, quants.tq2_0_decode, quants.tq2_0_encode),
                            (QT.TQ1_0, quants.tq1_0_decode, quants.tq1_0_encode)):
        packed = gguf_quantize(x, qtype)
        codes, d = dec(packed.reshape(-1), x.size)
        mine = (codes.reshape(-1, 256).astype(np.float32) * d.astype(np.float32)[:, None]).reshape(x.shape)
        np.testing.assert_array_equal(mine, gguf_dequantize(packed, qtype))
        assert enc(codes, d) == packed.tobytes()


def test_float_types() -> None:
    x = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    np.testing.assert_array_equal(quants.dequantize(x.view(np.uint8), "F32", 64), x)
    h = x.astype(np.float16)
    np.testing.assert_array_equal(quants.dequantize(h.view(np.uint8), "F16", 64), h.astype(np.float32))
    bf = (x.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(quants.dequantize(bf.view(np.uint8), "BF16", 64),
                                  (bf.astype(np.uint32) << 16).view(np.float32))
    rng = np.random.default_rng(2)
    q8 = gguf_quantize(rng.standard_normal(512).astype(np.float32), QT.Q8_0).reshape(-1)
    np.testing.assert_array_equal(quants.dequantize(q8, "Q8_0", 512), gguf_dequantize(q8, QT.Q8_0).reshape(-1))
    q6 = rng.integers(0, 256, size=(2, 210), dtype=np.uint8)  # random Q6_K blocks with a sane f16 d
    q6[:, 208:] = np.array([0.5, 0.25], np.float16).reshape(2, 1).view(np.uint8)
    np.testing.assert_array_equal(quants.dequantize(q6, "Q6_K", 512), gguf_dequantize(q6, QT.Q6_K).reshape(-1))


def test_short_payloads_raise() -> None:
    with pytest.raises(quants.QuantError, match="I2_S"):
        quants.i2s_decode(np.zeros(10, np.uint8), 128)
    with pytest.raises(quants.QuantError, match="TQ2_0"):
        quants.tq2_0_decode(np.zeros(10, np.uint8), 256)
    with pytest.raises(quants.QuantError, match="cannot dequantize"):
        quants.dequantize(np.zeros(4, np.uint8), "Q4_K", 1)
