"""The ternary kernels: exact integer products on any shape, identical models, discovery and the automatic choice."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from math import gcd
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgebit
from edgebit import quants
from edgebit.backends import Backend, available_backends, get_backend, lanes, lm_head, select
from edgebit.backends.compiled import NumbaBackend
from edgebit.backends.dense import DenseBackend
from edgebit.backends.float32 import Float32Backend
from edgebit.backends.i2s import decode_blocks, decode_rows, packed_rows, plane_order
from edgebit.backends.lm_head import LMHead, f16_to_f32
from edgebit.backends.lut import LUTBackend
from edgebit.backends.machine import Machine, cgroup_headroom, read_cpuinfo, read_meminfo
from edgebit.backends.packed import PackedBackend
from edgebit.backends.reference import ReferenceBackend
from edgebit.backends.threads import Workers
from edgebit.weights import TernaryWeight

KERNELS = {"dense": DenseBackend, "packed": PackedBackend, "lut": LUTBackend, "float32": Float32Backend}
if NumbaBackend.supported()[0]:
    KERNELS["numba"] = NumbaBackend


@pytest.fixture(scope="module", params=[1, 2], ids=["1-lane", "2-lanes"])
def kernels(request: pytest.FixtureRequest) -> Iterator[dict[str, Backend]]:
    """Every built-in kernel, alone or with every weight split between this process and a helper."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lanes, "MIN_SPLIT", 0)
        yield {name: cls(threads=request.param) for name, cls in KERNELS.items()}


def _weight(codes: np.ndarray, source: str = "I2_S") -> TernaryWeight:
    """A TernaryWeight as the loader builds it: I2_S payload, or a TQ-style weight with decoded codes."""
    raw = np.frombuffer(quants.i2s_encode(codes, 0.5), dtype=np.uint8)
    return TernaryWeight("w", codes.shape, 0.5, source, raw, None if source == "I2_S" else codes)


def _exact(codes: np.ndarray, xq: np.ndarray) -> np.ndarray:
    return (xq.astype(np.int64) @ codes.T.astype(np.int64)).astype(np.float32)


def _check(kernels: dict[str, Backend], codes: np.ndarray, xq: np.ndarray, source: str = "I2_S") -> None:
    want = _exact(codes, xq)
    for name, kernel in kernels.items():
        got = kernel.matmul(kernel.prepare(_weight(codes, source)), xq)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=f"backend {name}")


@st.composite
def problems(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Random ternary (M, K) with M·K a multiple of 128 (I2_S), K anything, and int8 activations
    mixing the extremes -128 / 127 with random values."""
    k = draw(st.one_of(st.sampled_from([128, 256, 640, 2560]), st.integers(1, 700)))
    m = draw(st.integers(1, 6)) * (128 // gcd(k, 128)) * draw(st.sampled_from([1, 1, 3]))
    t = draw(st.sampled_from([1, 1, 2, 5, 9]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    codes = rng.integers(-1, 2, size=(m, k), dtype=np.int8)
    codes[rng.random(m) < 0.2] = 0  # some all-zero rows
    xq = rng.integers(-128, 128, size=(t, k), dtype=np.int8)
    extreme = rng.random((t, k)) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    xq[extreme] = rng.choice(np.array([-128, 127], dtype=np.int8), size=int(extreme.sum()))
    return codes, xq


@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_products_are_exact_on_any_shape(kernels: dict[str, Backend], problem: tuple[np.ndarray, np.ndarray]) -> None:
    codes, xq = problem
    _check(kernels, codes, xq)


@pytest.mark.parametrize("k", [2560, 6912, 65408, 70016])  # 2B4T widths; around the unsigned-code limit
@pytest.mark.parametrize("value", [-1, 1])
def test_extreme_sums_stay_exact(kernels: dict[str, Backend], k: int, value: int) -> None:
    codes = np.full((2, k), value, dtype=np.int8)
    codes[1] = 0
    for x in (-128, 127):
        _check(kernels, codes, np.full((1, k), x, dtype=np.int8))
        _check(kernels, codes, np.full((3, k), x, dtype=np.int8))


@pytest.mark.parametrize("source", ["TQ2_0", "TQ1_0"])
def test_weights_from_other_file_types(kernels: dict[str, Backend], source: str) -> None:
    rng = np.random.default_rng(3)
    codes = rng.integers(-1, 2, size=(64, 384), dtype=np.int8)
    _check(kernels, codes, rng.integers(-128, 128, size=(3, 384), dtype=np.int8), source)
    _check(kernels, codes, rng.integers(-128, 128, size=(1, 384), dtype=np.int8), source)


def test_large_products_split_over_lanes_and_tiles() -> None:
    """Big enough (default thresholds) to be split over two processes and over several tiles in each."""
    rng = np.random.default_rng(4)
    codes = rng.integers(-1, 2, size=(1000, 2560), dtype=np.int8)
    kernels = {name: cls(threads=2) for name, cls in KERNELS.items()}
    _check(kernels, codes, rng.integers(-128, 128, size=(1, 2560), dtype=np.int8))
    _check(kernels, codes, rng.integers(-128, 128, size=(12, 2560), dtype=np.int8))
    assert all(len(k.helper_pids) == 1 for k in kernels.values() if isinstance(k, lanes.SplitBackend))


@pytest.mark.parametrize("tokens", [1, 9])
def test_group_products_equal_single_products(monkeypatch: pytest.MonkeyPatch, tokens: int) -> None:
    """One helper request per group: weights split over 3, 2 or 1 lanes (and one kept local) in one group."""
    monkeypatch.setattr(lanes, "MIN_SPLIT", 500)
    rng = np.random.default_rng(5)
    shapes = [(12, 256), (1, 256), (2, 256), (30, 256)]  # 3072 → 3 lanes, 256 → local, 512 → 2 lanes
    codes = [rng.integers(-1, 2, size=shape, dtype=np.int8) for shape in shapes]
    x = rng.integers(-128, 128, size=(tokens, 256), dtype=np.int8)
    for name in ("dense", "packed", "lut"):
        backend = KERNELS[name](threads=3)
        prepared = [backend.prepare(_weight(c)) for c in codes]
        assert [len(p.keys) if isinstance(p, lanes.SplitWeight) else 0 for p in prepared] == [2, 0, 1, 2]
        for got, c in zip(backend.matmul_group(prepared, x), codes, strict=True):
            np.testing.assert_array_equal(got, _exact(c, x))


@pytest.mark.parametrize("tokens", [1, 9, 40, 70])  # 40: either kernel, by the crossover; 70: the prompt kernel
def test_bitlinear_groups_give_the_same_bits_on_every_backend(tokens: int) -> None:
    """BitLinear's scaling ((p / γ) · s) · s_out, fused into a kernel or done in numpy after it
    (Backend.bitlinear_group), gives the same float32 bits; widths that are not whole blocks too."""
    rng = np.random.default_rng(tokens)
    shapes = [(40, 384), (24, 384), (8, 384)]
    codes = [rng.integers(-1, 2, size=shape, dtype=np.int8) for shape in shapes]
    x = rng.integers(-128, 128, size=(tokens, 384), dtype=np.int8)
    gamma = (127.0 / rng.uniform(0.01, 40.0, size=(tokens, 1))).astype(np.float32)
    scales = [(np.float32(0.37), None), (np.float32(1.9), np.float32(0.61)), (np.float32(2.3), None)]
    reference = ReferenceBackend()
    want = reference.bitlinear_group([reference.prepare(_weight(c)) for c in codes], x, gamma, scales)
    for name, cls in KERNELS.items():
        backend = cls(threads=2)
        got = backend.bitlinear_group([backend.prepare(_weight(c)) for c in codes], x, gamma, scales)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.view(np.uint32), w.view(np.uint32), err_msg=name)
    narrow = rng.integers(-1, 2, size=(16, 200), dtype=np.int8)
    for name, cls in KERNELS.items():
        backend = cls(threads=1)
        got = backend.bitlinear_group([backend.prepare(_weight(narrow))], x[:, :200].copy(), gamma, scales[1:2])[0]
        want = np.divide(_exact(narrow, x[:, :200]), gamma) * scales[1][0] * scales[1][1]
        np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32), err_msg=name)


def test_slices_start_on_block_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lanes, "MIN_SPLIT", 0)
    backend = DenseBackend(threads=3)
    for m, k in [(30, 2560), (16, 200), (9, 128), (256, 96)]:
        bounds = backend._bounds(_weight(np.zeros((m, k), dtype=np.int8)))
        assert bounds[0][0] == 0 and bounds[-1][1] == m and len(bounds) <= 3
        assert all(a * k % 128 == 0 and b > a for a, b in bounds)
        assert all(b0 == a1 for (_, b0), (a1, _) in zip(bounds, bounds[1:], strict=False))


def test_helper_failures_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lanes, "MIN_SPLIT", 0)
    backend = DenseBackend(threads=2)
    codes = np.ones((8, 128), dtype=np.int8)
    prepared = backend.prepare(_weight(codes))
    backend._lanes.send_matmul(0, [12345], np.ones((1, 128), dtype=np.int8))
    with pytest.raises(RuntimeError, match="helper process .*KeyError"):
        backend._lanes.receive_matmul(0, np.empty((1, 4), dtype=np.float32))
    with pytest.raises(IndexError):  # wrong width: both lanes fail, the local error wins
        backend.matmul(prepared, np.ones((1, 64), dtype=np.int8))
    x = np.full((1, 128), 3, dtype=np.int8)
    np.testing.assert_array_equal(backend.matmul(prepared, x), _exact(codes, x))  # still in step
    backend._lanes._procs[0].kill()
    backend._lanes._procs[0].wait()
    with pytest.raises(RuntimeError, match="died"):
        backend.matmul(prepared, np.ones((1, 128), dtype=np.int8))


def test_resident_bytes() -> None:
    assert DenseBackend.resident_bytes((2560, 6912)) == 2560 * 6912
    assert PackedBackend.resident_bytes((2560, 6912)) == 2560 * 6912 // 4
    assert LUTBackend.resident_bytes((2560, 6912)) == 2560 * 1383  # ceil(6912 / 5) bytes per row
    packed = PackedBackend(threads=1).prepare(_weight(np.zeros((8, 256), dtype=np.int8)))
    assert packed.data.nbytes == PackedBackend.resident_bytes((8, 256))


def test_i2s_row_decoding_matches_the_flat_decoder() -> None:
    rng = np.random.default_rng(5)
    codes = rng.integers(-1, 2, size=(6, 384), dtype=np.int8)
    raw = np.frombuffer(quants.i2s_encode(codes, 1.0), dtype=np.uint8)
    rows = decode_rows(packed_rows(raw, codes.shape), np.empty(codes.shape, dtype=np.uint8))
    natural = np.empty_like(rows)
    natural[:, plane_order(384)] = rows
    np.testing.assert_array_equal(natural.view(np.int8) - 1, codes)
    flat = decode_blocks(raw[: codes.size // 4], np.empty(codes.size, dtype=np.uint8))
    np.testing.assert_array_equal(flat.view(np.int8) - 1, codes.reshape(-1))


# --- whole models


@pytest.fixture(scope="module")
def reference_model(tiny_model: Path) -> edgebit.engine.Model:
    return edgebit.load(tiny_model, backend="reference")


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_models_give_identical_logits_and_greedy_text(tiny_model: Path, reference_model: edgebit.engine.Model,
                                                      name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lanes, "MIN_SPLIT", 0)  # every weight split between this process and a helper
    model = edgebit.load(tiny_model, backend=name, threads=2)
    assert model.backend.name == name
    ids = [509, 10, 20, 30, 40, 50]
    np.testing.assert_array_equal(model.logits(ids), reference_model.logits(ids))
    for m in (model, reference_model):
        monkeypatch.setattr(m.tokenizer, "stop_ids", frozenset())
    want = reference_model.complete(prompt=[1, 2, 3], max_tokens=16, temperature=0).token_ids
    assert model.complete(prompt=[1, 2, 3], max_tokens=16, temperature=0).token_ids == want


@pytest.mark.parametrize("threads", [1, 2], ids=["1-lane", "2-lanes"])
def test_every_backend_gives_the_same_logits_and_perplexity(tiny_model: Path, threads: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every installed backend (plugins too) with either exact LM-head form, whole or split over lanes,
    computes the same bits: the products are exact integers, so nothing after them may depend on
    which kernel made them. Prompts are long enough for the kernels' multi-token paths."""
    if threads == 2:
        monkeypatch.setattr(lanes, "MIN_SPLIT", 0)
    text = "the quick brown fox jumps over the lazy dog\n" * 10
    ids = list(range(1, 200, 5))
    results = {}
    for name, cls in sorted(available_backends().items()):
        if not cls.supported()[0]:
            continue
        for head in ("float32", "float16"):
            model = edgebit.load(tiny_model, backend=name, threads=threads, lm_head=head)
            assert model.info["lm_head"] == head
            results[name, head] = model.logits(ids), model.perplexity(text, ctx=64)
    want_logits, want_ppl = results["reference", "float32"]
    for key, (logits, ppl) in results.items():
        np.testing.assert_array_equal(logits, want_logits, err_msg=f"backend {key[0]}, LM head {key[1]}")
        assert ppl == want_ppl, f"backend {key[0]}, LM head {key[1]}"


# --- LM head


def test_f16_conversion_is_exact() -> None:
    rng = np.random.default_rng(6)
    values = np.concatenate([rng.standard_normal(5000) * 0.02, [0.0, -0.0, 6e-8, -6e-8, 3e-5, 65504, -65504]])
    half = values.astype(np.float16)
    out = f16_to_f32(half, np.empty(half.shape, dtype=np.float32))
    np.testing.assert_array_equal(out.view(np.uint32), half.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("mode", ["float16", "float32"])
def test_lm_head_exact_modes(mode: str) -> None:
    rng = np.random.default_rng(7)
    embedding = (rng.standard_normal((3000, 64)) * 0.05).astype(np.float16)
    embedding[0, :5] = np.float16(1e-7)  # f16 subnormals
    head = LMHead(embedding, mode, threads=2)
    for scale in (1.0, 1e6):  # 1e6: |x| too large for the 2^112 shortcut
        x = (rng.standard_normal((3, 64)) * scale).astype(np.float32)
        want = x.astype(np.float64) @ embedding.astype(np.float64).T
        np.testing.assert_allclose(head(x), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("tokens", [1, 3, 12])
def test_lm_head_forms_and_lanes_give_the_same_bits(monkeypatch: pytest.MonkeyPatch, tokens: int) -> None:
    """The exact forms (chosen per machine and backend footprint) and the number of lanes must not change
    a single logit: BLAS's summation order depends on the shape of each call, so every form and lane
    count must make the same calls. A 2B4T-wide row with an odd vocabulary exposes any difference."""
    monkeypatch.setattr(lm_head, "MIN_SPLIT", 0)
    rng = np.random.default_rng(10)
    embedding = (rng.standard_normal((1001, 2560)) * 0.05).astype(np.float16)
    x = rng.standard_normal((tokens, 2560)).astype(np.float32)
    want = LMHead(embedding, "float32", threads=1)(x)
    for mode in ("float16", "float32"):
        for threads in (1, 2, 3):
            np.testing.assert_array_equal(LMHead(embedding, mode, threads)(x), want, err_msg=f"{mode}, {threads} lanes")


@pytest.mark.parametrize("mode", ["float16", "float32", "int8"])
def test_lm_head_columns_are_the_full_heads_columns(mode: str) -> None:
    rng = np.random.default_rng(9)
    embedding = (rng.standard_normal((3000, 64)) * 0.05).astype(np.float16)
    head = LMHead(embedding, mode, threads=2)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    ids = np.array([2999, 0, 17, 1500])
    full = head(x)
    np.testing.assert_allclose(head.columns(x, ids), full[:, ids], rtol=1e-6, atol=1e-6 * np.abs(full).max())


@pytest.mark.parametrize("mode", ["float16", "float32", "int8", "screened"])
def test_lm_head_columns_refuse_ids_outside_the_vocabulary(mode: str) -> None:
    embedding = np.zeros((50, 64), dtype=np.float16)
    head, x = LMHead(embedding, mode, threads=1), np.ones((1, 64), dtype=np.float32)
    for ids in ([50], [-1], [3, 1 << 40]):
        with pytest.raises(IndexError, match="0..49"):
            head.columns(x, ids)


def test_lm_head_int8_is_close_and_smaller() -> None:
    rng = np.random.default_rng(8)
    embedding = (rng.standard_normal((2000, 64)) * 0.05).astype(np.float16)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    want = x @ embedding.astype(np.float32).T
    head = LMHead(embedding, "int8", threads=1)
    assert head.weight.dtype == np.int8
    assert np.abs(head(x) - want).max() < 0.02 * np.abs(want).max()
    assert LMHead.resident_bytes("int8", (2000, 64)) < LMHead.resident_bytes("float16", (2000, 64))


# --- discovery and choice


class PluginBackend(ReferenceBackend):
    name = "plugin"
    description = "a third-party kernel"


def test_entry_point_discovery(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    module = types.ModuleType("fake_edgebit_plugin")
    module.Good, module.NotABackend = PluginBackend, dict
    monkeypatch.setitem(sys.modules, "fake_edgebit_plugin", module)
    group = "edgebit.backends"
    eps = [EntryPoint("plugin", "fake_edgebit_plugin:Good", group),
           EntryPoint("wrong", "fake_edgebit_plugin:NotABackend", group),
           EntryPoint("broken", "no_such_module_xyz:Backend", group)]
    monkeypatch.setattr("edgebit.backends.entry_points", lambda group: eps)
    found = available_backends()
    assert found["plugin"] is PluginBackend
    assert {"dense", "packed", "lut", "float32", "reference"} <= set(found)
    assert "wrong" not in found and "broken" not in found
    assert "could not be loaded" in caplog.text and "not a subclass" in caplog.text
    assert isinstance(get_backend("plugin"), PluginBackend)


def _machine(available: int | None) -> Machine:
    return Machine("x86_64", "test CPU", frozenset({"avx2"}), 2, 8 * 10**9, available)


TWO_B = select.projection_shapes(30, 2560, 640, 6912)
HEAD_F16 = LMHead.resident_bytes("float16", (128256, 2560))


def test_choice_by_memory() -> None:
    roomy = select.choose_backend(TWO_B, extra_bytes=HEAD_F16, machine=_machine(16 * 10**9), use_probe=False)
    assert roomy.backend == ("numba" if "numba" in KERNELS else "dense")
    two_gb = select.choose_backend(TWO_B, extra_bytes=HEAD_F16, machine=_machine(int(1.5e9)), use_probe=False)
    # the compiled backend keeps the same 2-bit codes as packed, so it fits wherever packed does
    assert two_gb.backend == ("numba" if "numba" in KERNELS else "packed") and "1.18 GB" in two_gb.reason
    tiny = select.choose_backend(TWO_B, extra_bytes=HEAD_F16, machine=_machine(10**8), use_probe=False)
    assert tiny.backend == "lut" and "nothing fits" in tiny.reason


def test_probe_is_measured_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEBIT_HOME", str(tmp_path))
    monkeypatch.setattr(select, "PROBE_SHAPE", (256, 256))
    calls = []
    real = select.measure
    monkeypatch.setattr(select, "measure", lambda cls, threads: calls.append(cls.name) or real(cls, threads))
    first = select.choose_backend(TWO_B, 1, HEAD_F16, machine=_machine(16 * 10**9))
    assert sorted(calls) == sorted(list(KERNELS) * select.PROBE_ROUNDS)
    assert (tmp_path / "cache" / "probe.json").is_file()
    again = select.choose_backend(TWO_B, 1, HEAD_F16, machine=_machine(16 * 10**9))
    assert again == first and len(calls) == select.PROBE_ROUNDS * len(KERNELS)
    select.choose_backend(TWO_B, 1, HEAD_F16, machine=_machine(int(1.5e9)))
    assert len(calls) == select.PROBE_ROUNDS * len(KERNELS)  # cached backends need no new measurement


def test_the_probe_cache_stays_out_of_the_real_home(tmp_path: Path, tiny_model: Path) -> None:
    """The suite runs with a private EDGEBIT_HOME (tests/conftest.py) that the processes it starts inherit:
    an automatic backend choice, which caches its probe, in a child whose HOME is a fresh folder leaves
    that folder empty."""
    private = Path(os.environ["EDGEBIT_HOME"])
    user = tmp_path / "user"
    user.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_") and k != "EDGEBIT_BACKEND"}
    code = "import edgebit, sys; print(edgebit.load(sys.argv[1], threads=1).backend.name)"
    subprocess.run([sys.executable, "-c", code, str(tiny_model)], env={**env, "HOME": str(user)}, check=True,
                   capture_output=True)
    assert [p.relative_to(user) for p in user.rglob("*")] == []
    assert (private / "cache" / "probe.json").is_file()


def test_get_backend_override_and_auto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEBIT_HOME", str(tmp_path))
    monkeypatch.setenv("EDGEBIT_BACKEND", "lut")
    assert get_backend(None).name == "lut"
    assert get_backend("packed").name == "packed"  # an explicit name beats the environment
    monkeypatch.delenv("EDGEBIT_BACKEND")
    monkeypatch.setattr(select, "detect", lambda: _machine(int(1.5e9)))
    monkeypatch.setattr(select, "PROBE_SHAPE", (128, 256))
    assert get_backend(None, 1, TWO_B, HEAD_F16).name in ("packed", "lut", "numba")
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("nope")


def test_model_shapes_from_a_file(tiny_model: Path) -> None:
    with edgebit.gguf.GGUFFile(tiny_model) as gguf:
        shapes = select.model_shapes(gguf)
    assert sorted(shapes) == sorted(select.projection_shapes(2, 256, 128, 512))


# --- machine facts and threads


def test_proc_readers(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text("MemTotal:       24684092 kB\nMemAvailable:    1000 kB\nHugePages_Total: 0\n")
    assert read_meminfo(str(tmp_path / "meminfo")) == {"MemTotal": 24684092 * 1024, "MemAvailable": 1024000,
                                                       "HugePages_Total": 0}
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Cortex\nFeatures\t: fp asimd crc32\n")
    assert read_cpuinfo(str(tmp_path / "cpuinfo")) == ("Cortex", frozenset({"fp", "asimd", "crc32"}))
    assert read_meminfo(str(tmp_path / "missing")) == {}
    machine = _machine(None)
    assert machine.has("AVX2") and not machine.has("avx2", "neon") and not machine.is_arm
    assert len(machine.fingerprint()) == 16


def test_cgroup_limits(tmp_path: Path) -> None:
    v1 = tmp_path / "memory" / "box"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("2000000000\n")
    (v1 / "memory.usage_in_bytes").write_text("500000000\n")
    (tmp_path / "v1").write_text("4:memory:/box\n1:cpu:/\n0::/\n")
    assert cgroup_headroom(str(tmp_path / "v1"), str(tmp_path)) == 1_500_000_000
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert cgroup_headroom(str(tmp_path / "v1"), str(tmp_path)) is None
    v2 = tmp_path / "unified" / "svc"
    v2.mkdir(parents=True)
    (v2 / "memory.max").write_text("1000\n")
    (v2 / "memory.current").write_text("1500\n")
    (tmp_path / "v2").write_text("0::/svc\n")
    assert cgroup_headroom(str(tmp_path / "v2"), str(tmp_path)) == 0
    (v2 / "memory.max").write_text("max\n")
    assert cgroup_headroom(str(tmp_path / "v2"), str(tmp_path)) is None


@given(n=st.integers(0, 5000), threads=st.integers(1, 4), align=st.sampled_from([1, 16, 128]),
       min_rows=st.integers(1, 300))
def test_split_covers_the_rows_once(n: int, threads: int, align: int, min_rows: int) -> None:
    parts = Workers(threads).split(n, align, min_rows)
    covered = [i for a, b in parts for i in range(a, b)]
    assert covered == list(range(n))
    assert len(parts) <= threads and all(a % align == 0 and b > a for a, b in parts)
