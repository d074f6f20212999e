"""The compiled kernels on their own: exact integer products on any shape, the LM head, the JIT cache.

Small shapes only, so the same file runs under aarch64 emulation (.ci/aarch64.sh). Skipped where
numba is not installed (the numpy backends are tested without it in test_backends.py).
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgebit import quants
from edgebit.backends import fast
from edgebit.transformer import Transformer

nk = fast.kernels()
pytestmark = pytest.mark.skipif(nk is None, reason=fast.unavailable_reason())
EXAMPLES = int(os.environ.get("EDGEBIT_TEST_EXAMPLES", "60"))  # fewer under emulation


def _rows(codes: np.ndarray) -> np.ndarray:
    """I2_S rows of a (M, K) ternary matrix with K % 128 == 0, read-only like a memory map."""
    m, k = codes.shape
    rows = np.frombuffer(quants.i2s_encode(codes, 1.0), dtype=np.uint8)[: m * k // 4].reshape(m, k // 4)
    return rows  # frombuffer over bytes: already read-only


def _exact(codes: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (x.astype(np.int64) @ codes.T.astype(np.int64)).astype(np.float32)


def _unscaled(tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' γ and (s, s_out) arguments that leave the exact integer products: all ones."""
    return np.ones(tokens, dtype=np.float32), np.ones((3, 2), dtype=np.float32)


def _products(codes: np.ndarray, x: np.ndarray, gamma: np.ndarray | None = None,
              scales: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(decode kernel token by token, decode kernel on all tokens, prompt kernel) for int8
    activations x (T, K), the weight in the middle slot; exact products unless γ, scales are given."""
    ones = _unscaled(x.shape[0])
    gamma, scales = ones[0] if gamma is None else gamma, ones[1] if scales is None else scales
    rows = _rows(codes)
    none = _rows(np.zeros((0, codes.shape[1]), dtype=np.int8))
    one = np.empty((x.shape[0], codes.shape[0]), dtype=np.float32)
    unused = np.empty((x.shape[0], 0), dtype=np.float32)
    for t in range(x.shape[0]):
        nk.i2s_gemv(none, rows, none, x[t : t + 1], gamma[t : t + 1], scales, unused[t : t + 1], one[t : t + 1],
                    unused[t : t + 1])
    few, many = np.empty_like(one), np.empty_like(one)
    nk.i2s_gemv(none, rows, none, x, gamma, scales, unused, few, unused)
    nk.i2s_gemm(none, rows, none, x, gamma, scales, unused, many, unused)
    return one, few, many


@st.composite
def problems(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Ternary (M, K), K whole blocks, M anything (not a multiple of the kernels' row tiles), and
    int8 activations mixing the extremes -128 / 127 with random values."""
    k = 128 * draw(st.integers(1, 24))
    m = draw(st.integers(1, 70))
    t = draw(st.integers(1, 11))  # the prompt kernel works in blocks of 4 tokens × 4 rows
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    codes = rng.integers(-1, 2, size=(m, k), dtype=np.int8)
    codes[rng.random(m) < 0.2] = draw(st.sampled_from([-1, 0, 1]))  # some constant rows
    x = rng.integers(-128, 128, size=(t, k), dtype=np.int8)
    extreme = rng.random((t, k)) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    x[extreme] = rng.choice(np.array([-128, 127], dtype=np.int8), size=int(extreme.sum()))
    return codes, x


@settings(max_examples=EXAMPLES, deadline=None)
@given(problem=problems(), threads=st.sampled_from([1, 2]))
def test_decode_and_prompt_kernels_are_exact(problem: tuple[np.ndarray, np.ndarray], threads: int) -> None:
    codes, x = problem
    nk.set_threads(threads)
    want = _exact(codes, x)
    for product in _products(codes, x):
        np.testing.assert_array_equal(product, want)


@settings(max_examples=max(EXAMPLES // 2, 5), deadline=None)
@given(problem=problems(), seed=st.integers(0, 2**32 - 1), with_out_scale=st.booleans())
def test_kernels_scale_as_numpy_does(problem: tuple[np.ndarray, np.ndarray], seed: int, with_out_scale: bool) -> None:
    """The kernels' BitLinear scaling gives the bits of Backend.bitlinear_group's numpy operations:
    ((p / γ) · s) · s_out in float32, an absent s_out passed as 1."""
    codes, x = problem
    rng = np.random.default_rng(seed)
    gamma = (127.0 / rng.uniform(1e-3, 50.0, size=(x.shape[0], 1))).astype(np.float32)
    scale = np.float32(rng.uniform(0.01, 5.0))
    out_scale = np.float32(rng.uniform(0.1, 3.0)) if with_out_scale else None
    want = np.divide(_exact(codes, x), gamma, out=np.empty((x.shape[0], codes.shape[0]), dtype=np.float32))
    want *= scale
    if out_scale is not None:
        want *= out_scale
    scales = np.ones((3, 2), dtype=np.float32)
    scales[1] = scale, 1.0 if out_scale is None else out_scale
    for product in _products(codes, x, gamma[:, 0].copy(), scales):
        np.testing.assert_array_equal(product.view(np.uint32), want.view(np.uint32))


def test_a_group_of_three_weights_equals_each_alone() -> None:
    """q/k/v-like groups: three weights of different heights (not multiples of the row tiles) in one call."""
    rng = np.random.default_rng(11)
    heights = (37, 5, 70), (nk.PART_ROWS + 21, 5, 37)  # the second: parts that cross weights
    for (m0, m1, m2), tokens in itertools.product(heights, (1, 3)):
        codes = [rng.integers(-1, 2, size=(m, 384), dtype=np.int8) for m in (m0, m1, m2)]
        x = rng.integers(-128, 128, size=(tokens, 384), dtype=np.int8)
        outs = [np.empty((tokens, c.shape[0]), dtype=np.float32) for c in codes]
        if tokens == 1:
            nk.i2s_gemv(*(_rows(c) for c in codes), x, *_unscaled(tokens), *outs)
        else:
            nk.i2s_gemm(*(_rows(c) for c in codes), x, *_unscaled(tokens), *outs)
        for c, o in zip(codes, outs, strict=True):
            np.testing.assert_array_equal(o, _exact(c, x))


@settings(max_examples=max(EXAMPLES // 4, 5), deadline=None)
@given(seed=st.integers(0, 2**32 - 1), tokens=st.sampled_from([2, 5, 131]))  # 131 > PROMPT_TOKENS
def test_any_byte_multiplies_as_the_reference_decodes_it(seed: int, tokens: int) -> None:
    """Rows of arbitrary bytes (codes 3, weight +2, appear only in a damaged file) against
    quants.i2s_decode, with more tokens than one set of the prompt kernel's tables holds."""
    rng = np.random.default_rng(seed)
    m, k = 19, 256
    rows = rng.integers(0, 256, size=(m, k // 4), dtype=np.uint8)
    rows[rng.random(rows.shape) < 0.9] &= 0b10101010  # mostly valid codes, some threes left
    codes = quants.i2s_decode(np.concatenate([rows.reshape(-1), np.zeros(32, np.uint8)]), m * k)[0]
    x = rng.integers(-128, 128, size=(tokens, k), dtype=np.int8)
    none = _rows(np.zeros((0, k), dtype=np.int8))
    out = np.empty((tokens, m), dtype=np.float32)
    unused = np.empty((tokens, 0), dtype=np.float32)
    nk.i2s_gemm(none, np.frombuffer(rows.tobytes(), np.uint8).reshape(m, -1), none, x, *_unscaled(tokens),
                unused, out, unused)
    np.testing.assert_array_equal(out, _exact(codes.reshape(m, k), x))


@pytest.mark.parametrize("k", [128, 2048, 6912])  # one block, a long row, the 2B4T down projection
@pytest.mark.parametrize("value", [-1, 1])
def test_extreme_sums(k: int, value: int) -> None:
    """Every weight and activation at its extreme: the largest sums the kernels' lanes must hold."""
    codes = np.full((3, k), value, dtype=np.int8)
    codes[1] = 0
    codes[2] = -value
    for x in (-128, 127):
        xs = np.full((2, k), x, dtype=np.int8)
        for product in _products(codes, xs):
            np.testing.assert_array_equal(product, _exact(codes, xs))


def test_head_widens_f16_exactly() -> None:
    """One-hot activations pick single embedding values: the f16 → f32 widening must be exact,
    subnormals and extremes included (a sum starts at +0, so -0 cannot come back as -0)."""
    values = np.array([0.0, 2.0, 6e-8, -6e-8, 3e-5, 1e-4, 0.3333, -2.5, 65504, -65504, 7.0, 1.0],
                      dtype=np.float16)
    embedding = np.tile(values, (16, 1))  # (16, 12): row v, column d holds values[d]
    embedding.flags.writeable = False
    x = np.eye(12, dtype=np.float32)
    out = np.empty((12, 16), dtype=np.float32)
    nk.head_f16(embedding.view(np.int16), x, out)
    np.testing.assert_array_equal(out.view(np.uint32), np.repeat(values.astype(np.float32)[:, None], 16, 1)
                                  .view(np.uint32))


@pytest.mark.parametrize("dim", [64, 100, 2560])
def test_head_kernels_are_accurate_and_independent_of_batch_and_threads(dim: int) -> None:
    """Both head kernels agree with float64; a row's logits are the same bits alone or in a batch and
    on 1 or 2 threads (the LM head's float16 and float32 modes both read the file's own embedding
    through one kernel, so they agree too; the two kernels' summation orders may differ by CPU:
    aarch64 vectorizes them differently)."""
    rng = np.random.default_rng(dim)
    embedding = (rng.standard_normal((300, dim)) * 0.05).astype(np.float16)
    embedding.flags.writeable = False
    widened = embedding.astype(np.float32)
    widened.flags.writeable = False
    x = rng.standard_normal((3, dim)).astype(np.float32)
    want = x.astype(np.float64) @ embedding.astype(np.float64).T
    tol = 1e-5 * np.abs(want).max()
    for kernel, weight in ((nk.head_f16, embedding.view(np.int16)), (nk.head_f32, widened)):
        results = []
        for threads in (1, 2):
            nk.set_threads(threads)
            batch = np.empty((3, 300), dtype=np.float32)
            kernel(weight, x, batch)
            np.testing.assert_allclose(batch, want, rtol=0, atol=tol)
            for t in range(3):
                alone = np.empty((1, 300), dtype=np.float32)
                kernel(weight, x[t : t + 1].copy(), alone)
                np.testing.assert_array_equal(alone[0], batch[t])
            results.append(batch)
        np.testing.assert_array_equal(results[0], results[1])


def test_compiled_code_is_cached_under_edgebit_home(tmp_path: Path) -> None:
    """A fresh process compiles into $EDGEBIT_HOME/cache/numba; a second one loads every kernel from it."""
    script = ("from edgebit.backends import numba_kernels as nk; nk.compile_all(); "
              "print(nk.cache_hits(), len(nk.SIGNATURES))")
    env = {**os.environ, "EDGEBIT_HOME": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert first.stdout.split() == ["0", str(len(nk.SIGNATURES))]
    assert any((tmp_path / "cache" / "numba").rglob("*.nbi"))
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    hits, total = second.stdout.split()
    assert hits == total


@settings(max_examples=EXAMPLES, deadline=None)
@given(dim=st.one_of(st.integers(1, 3000), st.sampled_from([6912, 20000, 65537])), tokens=st.integers(1, 4),
       scale=st.sampled_from([1e-4, 1.0, 300.0]), seed=st.integers(0, 2**32 - 1))
def test_rmsnorm_quantize_equals_the_numpy_forward_pass(dim: int, tokens: int, scale: float, seed: int) -> None:
    """The compiled RMSNorm + quantisation is bit-identical to transformer.py's numpy path (numpy's
    pairwise summation order included), so installing numba changes no number of the model."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((tokens, dim)) * scale).astype(np.float32)
    x[0, 0] = 0 if dim > 1 else x[0, 0]
    weight = rng.standard_normal(dim).astype(np.float32)
    model = SimpleNamespace(numerics="reference", config=SimpleNamespace(eps=1e-5))
    want_q, want_gamma = Transformer.quantize_activations(Transformer.rmsnorm(model, x, weight))
    for kernel in (nk.rmsnorm_quantize, nk.rmsnorm_quantize_rows):  # on the calling thread, rows shared
        xq, gamma = np.empty((tokens, dim), dtype=np.int8), np.empty(tokens, dtype=np.float32)
        kernel(x, weight, np.float32(1e-5), xq, gamma)
        np.testing.assert_array_equal(xq, want_q)
        np.testing.assert_array_equal(gamma, want_gamma[:, 0])


@settings(max_examples=EXAMPLES, deadline=None)
@given(tokens=st.integers(1, 9), width=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       special=st.lists(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e-45]), max_size=6))
def test_relu2_product_equals_numpy(tokens: int, width: int, seed: int, special: list[float]) -> None:
    """The compiled FFN activation gives numpy's max(gate, 0)² · up bit for bit, NaN, infinities,
    signed zeros and overflow included."""
    rng = np.random.default_rng(seed)
    gate, up = (rng.standard_normal((2, tokens, width)) * 10).astype(np.float32)
    flat_gate, flat_up = gate.reshape(-1), up.reshape(-1)
    for i, value in enumerate(special):
        flat_gate[(7 * i) % flat_gate.size] = value
        flat_up[(5 * i + 3) % flat_up.size] = value
    out = np.empty_like(gate)
    with np.errstate(all="ignore"):
        nk.relu2_product(gate, up, out)
        want = np.square(np.maximum(gate, 0)) * up
    np.testing.assert_array_equal(out.view(np.int32), want.view(np.int32))


@settings(max_examples=EXAMPLES, deadline=None)
@given(heads=st.integers(1, 5), tokens=st.integers(1, 6), half=st.integers(1, 70), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-30, 1.0, 1e4, 1e30]))
def test_rope_equals_numpy(heads: int, tokens: int, half: int, seed: int, scale: float) -> None:
    """The compiled RoPE gives numpy's bits (no fused multiply-add), on a strided view as the
    forward pass gives it (q and k are transposed views of the projections' outputs)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((tokens, heads, 2 * half)) * scale).astype(np.float32).transpose(1, 0, 2)
    angles = rng.uniform(0, 4000, (tokens, half)).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    out = np.empty(x.shape, dtype=np.float32)
    nk.rope(x, cos, sin, out)
    np.testing.assert_array_equal(out, Transformer.rotate_half(x, cos, sin))


@settings(max_examples=EXAMPLES, deadline=None)
@given(xs=st.lists(st.floats(-120.0, 0.0, width=32), min_size=1, max_size=40))
def test_softmax_exp_is_within_an_ulp(xs: list[float]) -> None:
    """The attention's vectorizable exp against float64 exp: within 1 ulp down to -87, and a
    negligible value (below 2e-38) beyond, where softmax terms vanish next to the maximum's 1."""
    for x in np.array(xs, dtype=np.float32):
        got, want = nk._exp_nonpositive(x), np.exp(np.float64(x))
        if x >= -87:
            assert abs(np.float64(got) - want) <= np.spacing(np.float32(want)), (x, got, want)
        else:
            assert 0 <= got < 2e-38


@settings(max_examples=EXAMPLES, deadline=None)
@given(n_kv=st.integers(1, 3), n_rep=st.sampled_from([1, 2, 4, 5]), dim=st.sampled_from([4, 24, 128]),
       tokens=st.integers(1, 7), past=st.integers(0, 41), seed=st.integers(0, 2**32 - 1),
       spread=st.sampled_from([0.1, 3.0, 30.0]))
def test_attention_agrees_with_float64_and_each_row_alone(n_kv: int, n_rep: int, dim: int, tokens: int, past: int,
                                                          seed: int, spread: float) -> None:
    """The compiled attention against float64 softmax attention, with grouped heads and a token
    tree's mask (any visible key counts, so four-key passes leave every remainder); and a row's
    output is the same bits computed alone, in the batch, on 1 or 2 threads."""
    rng = np.random.default_rng(seed)
    n_head, length = n_kv * n_rep, past + tokens
    q = (rng.standard_normal((n_head, tokens, dim)) * spread).astype(np.float32)
    keys = rng.standard_normal((n_kv, length + 3, dim)).astype(np.float32)  # cache capacity beyond L
    values = rng.standard_normal((n_kv, length + 3, dim)).astype(np.float32)
    tree = np.tri(tokens, dtype=bool) & (rng.random((tokens, tokens)) < 0.7)
    mask = np.concatenate([np.ones((tokens, past), bool), tree], axis=1)
    mask[np.arange(tokens), past + np.arange(tokens)] = True  # each row sees itself
    scale = np.float32(1 / np.sqrt(dim))
    results = []
    for threads in (1, 2):
        nk.set_threads(threads)
        out = np.empty((tokens, n_head, dim), np.float32)
        nk.attention(q, keys, values, mask, scale, out)
        for t in range(tokens):
            alone = np.empty((1, n_head, dim), np.float32)
            nk.attention(q[:, t : t + 1].copy(), keys, values, mask[t : t + 1].copy(), scale, alone)
            np.testing.assert_array_equal(alone[0], out[t])
        results.append(out)
    np.testing.assert_array_equal(results[0], results[1])
    for h in range(n_head):
        kv = h // n_rep
        scores = q[h].astype(np.float64) @ keys[kv, :length].T.astype(np.float64) * float(scale)
        scores = np.where(mask, scores, -np.inf)
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        want = (p / p.sum(axis=1, keepdims=True)) @ values[kv, :length].astype(np.float64)
        np.testing.assert_allclose(results[0][:, h], want, rtol=0, atol=2e-5)


def _embedding(rng: np.random.Generator, vocab: int, dim: int, kind: str) -> np.ndarray:
    """f16 embeddings that stress the screen: ordinary rows, exact duplicates (tied logits), rows with
    one outlier (a loose bound), subnormal and zero rows, and rows holding inf or NaN."""
    e = (rng.standard_normal((vocab, dim)) * 0.05).astype(np.float16)
    if kind == "ties":
        e[1::2] = e[0::2][: vocab // 2]
    elif kind == "outliers":
        e[np.arange(vocab), rng.integers(0, dim, vocab)] = np.float16(60000)
    elif kind == "tiny":
        e[: vocab // 2] = np.float16(6e-8)
        e[-1] = 0
    elif kind == "non-finite":
        e[rng.integers(0, vocab, 3), rng.integers(0, dim, 3)] = [np.inf, -np.inf, np.nan]
    return e


def test_screen_codes_are_rounded_row_absmax() -> None:
    rng = np.random.default_rng(3)
    e = _embedding(rng, 40, 70, "tiny")
    e[3, 5], e[7, 0] = np.inf, np.nan
    e[9] = rng.integers(-127, 128, 70) * 2.0**-8  # every value on the grid of scale 2⁻⁸: residual 0
    e[9, 0] = 127 * 2.0**-8
    codes = np.empty(e.shape, dtype=np.int8)
    scale, residual, code_norm = (np.empty(40, dtype=np.float32) for _ in range(3))
    bits = e.view(np.int16)
    bits.flags.writeable = False
    nk.screen_codes(bits, codes, scale, residual, code_norm)
    wide = e.astype(np.float32)
    finite = np.isfinite(wide).all(axis=1)
    top = np.abs(wide).max(axis=1)
    want_scale = np.where(top > 0, top / np.float32(127), np.float32(1)).astype(np.float32)
    np.testing.assert_array_equal(scale[finite], want_scale[finite])
    assert np.isnan(scale[~finite]).all() and not codes[~finite].any()
    assert np.isnan(residual[~finite]).all() and np.isnan(code_norm[~finite]).all()
    np.testing.assert_array_equal(codes[finite], np.rint(wide[finite] / want_scale[finite, None]))
    # the second bound's norms: never below the exact ones (fractions: no rounding), at most 2⁻¹⁹ above
    for v in np.flatnonzero(finite):
        s = Fraction(float(scale[v]))
        miss = sum((Fraction(float(value)) - s * int(c)) ** 2 for value, c in zip(wide[v], codes[v], strict=True))
        squares = sum(int(c) ** 2 for c in codes[v])
        for got, exact in ((residual[v], miss), (code_norm[v], squares)):
            assert Fraction(float(got)) ** 2 >= exact and float(got) <= math.sqrt(exact) * (1 + 2.0**-19)
    assert residual[9] == 0 and code_norm[9] > 0


@settings(max_examples=max(EXAMPLES // 2, 5), deadline=None)
@given(vocab=st.integers(1, 700), dim=st.sampled_from([1, 7, 64, 300, 2560]), tokens=st.integers(1, 3),
       kind=st.sampled_from(["normal", "ties", "outliers", "tiny", "non-finite"]),
       x_scale=st.sampled_from([0.0, 1e-30, 1e-12, 1.0, 1e4, 1e36, np.inf]), spike=st.sampled_from([1.0, 1e3, 1e6]),
       k=st.integers(1, 50), penalised=st.lists(st.integers(0, 699), max_size=5), seed=st.integers(0, 2**32 - 1))
def test_screened_top_is_the_exact_heads_top(vocab: int, dim: int, tokens: int, kind: str, x_scale: float,
                                             spike: float, k: int, penalised: list[int], seed: int) -> None:
    """What the screened head keeps of a row is the full exact head's values, bit for bit, and it
    keeps every token of the exact top k (so the arg-max and the top-k sampler see the same), on
    embeddings and activations made to break its error bound (one activation `spike` times the
    others: most of a row then rounds to zero in the screen's int16 activations)."""
    from edgebit.backends.lm_head import LMHead, TopK

    rng = np.random.default_rng(seed)
    e = _embedding(rng, vocab, dim, kind)
    with np.errstate(all="ignore"):
        x = rng.standard_normal((tokens, dim)) * x_scale
        x[:, rng.integers(0, dim)] *= spike
        x = x.astype(np.float32)
    include = tuple(i for i in penalised if i < vocab)
    wants = [TopK(k, include if t == 0 else ()) for t in range(tokens)]
    full = LMHead(e, "float16", threads=2)(x)
    screened = LMHead(e, "screened", threads=2)
    got = screened.top(x, wants)
    for t, want in enumerate(wants):
        exact = got[t].view(np.int32) == full[t].view(np.int32)
        assert (exact | (got[t] == -np.inf)).all()  # a value it keeps is the exact head's
        assert exact[list(want.include)].all()
        ranked = np.nan_to_num(full[t], nan=np.inf)  # NaN ranks first, as it does for np.argmax
        kth = np.sort(ranked)[::-1][min(want.k, vocab) - 1]
        assert exact[ranked >= kth].all()  # the top k, and every token tied with the k-th
        assert np.argmax(got[t]) == np.argmax(full[t])


@pytest.mark.parametrize("k", [1, 2])
def test_screen_keeps_a_top_token_its_activation_rounding_hid(k: int) -> None:
    """x is one activation at the int16 limit (σ = 1) and 2558 of 0.49, which the screen rounds to 0.
    Tokens 1 and 2 estimate 2·32767·s above token 0, beyond what the embedding's rounding (s/2·‖x‖₁
    each, 17 010·s) allows, but token 0's 127·0.49 on each of those 2558 activations makes it the
    top token: the bounds must count the activations' rounding (127·D·σ/2 in the first; in the
    second, used for top-k, s·‖q‖₂·‖x − σ·x̂‖₂, which this row's codes, parallel to x − σ·x̂, reach)."""
    from edgebit.backends.lm_head import LMHead, TopK

    rng = np.random.default_rng(6)
    dim, step = 2560, 2.0**-10  # every value below is exact in f16, and every row's scale is `step`
    top, rival = np.full(dim, 127.0), np.zeros(dim)
    top[0], top[1], rival[0], rival[1] = 100, 127, 102, 127
    e = np.concatenate([np.stack([top, rival, rival]) * step, rng.standard_normal((500, dim)) * 0.01])
    e = e.astype(np.float16)
    x = np.full((1, dim), 0.49, dtype=np.float32)
    x[0, :2] = 32767, 0
    full = LMHead(e, "float16", threads=2)(x)
    assert np.argmax(full[0]) == 0
    got = LMHead(e, "screened", threads=2).top(x, [TopK(k)])
    assert np.argmax(got[0]) == 0 and got[0, 0] == full[0, 0]


def test_screen_keeps_a_top_token_its_rounding_hid() -> None:
    """The screen's bound is nearly reached: token 0 is every code plus 31/64 of a step (rounded
    down), token 1 is those codes plus one on 95 % of the row, minus 31/64 (rounded up). With x all
    ones token 1's estimate is 0.95·s·‖x‖₁ higher, but token 0's exact logit is the larger: a bound
    below 0.475·s·‖x‖₁ would rule the top token out."""
    from edgebit.backends.lm_head import LMHead, TopK

    rng = np.random.default_rng(5)
    dim, step, offset = 2560, 2.0**-10, 31 / 64  # every value below is exact in f16
    q = rng.integers(0, 30, dim)
    up = (np.arange(dim) < dim * 95 // 100).astype(int)
    rows = np.stack([(q + offset) * step, (q + up - offset) * step])
    rows[:, 0] = 127 * step  # fixes both rows' scale at exactly `step`
    e = np.concatenate([rows, rng.standard_normal((500, dim)) * 0.02]).astype(np.float16)
    assert np.array_equal(e[:2].astype(np.float64), rows)
    x = np.ones((1, dim), dtype=np.float32)
    full = LMHead(e, "float16", threads=2)(x)
    assert np.argmax(full[0]) == 0
    got = LMHead(e, "screened", threads=2).top(x, [TopK(1)])
    assert np.argmax(got[0]) == 0 and got[0, 0] == full[0, 0]
