"""Building blocks of the forward pass, checked against spec §4 and §10.4-7."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgebit.backends import get_backend
from edgebit.gguf import GGUFError, GGUFFile
from edgebit.synthetic import write_random_model
from edgebit.transformer import Transformer


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Transformer:
    return Transformer(GGUFFile(tiny_model), get_backend("reference"))


def test_activation_quantization_worked_example() -> None:
    x = np.array([[0.5, -1.25, 2.0, 0.0, -0.004, 1.0]], np.float32)
    xq, gamma = Transformer.quantize_activations(x)
    assert gamma[0, 0] == np.float32(63.5)
    assert xq.tolist() == [[32, -79, 127, 0, 0, 64]]  # 63.5 -> 64: half to even


def test_activation_quantization_zero_row_and_half_even() -> None:
    xq, gamma = Transformer.quantize_activations(np.zeros((1, 8), np.float32))
    assert gamma[0, 0] == np.float32(127 / 1e-5) and not xq.any()
    # with max 127, gamma = 1 and x itself is rounded: half-way values go to the even neighbour
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -126.5]], np.float32)
    xq, _ = Transformer.quantize_activations(x)
    assert xq.tolist() == [[127, 0, 2, 2, 0, -2, -126]]


@settings(max_examples=30, deadline=None)
@given(xq=hnp.arrays(np.int8, (3, 6912), elements=st.sampled_from([-128, 127, -1, 0, 1, 99])),
       seed=st.integers(0, 2**31))
def test_float32_blas_product_is_exact(xq: np.ndarray, seed: int) -> None:
    """|sum| < 2^24, so float32 matmul of ternary x int8 equals the int64 dot product (spec §4.2)."""
    t = np.random.default_rng(seed).integers(-1, 2, size=(64, 6912), dtype=np.int8)
    exact = xq.astype(np.int64) @ t.astype(np.int64).T
    np.testing.assert_array_equal(xq.astype(np.float32) @ t.astype(np.float32).T, exact)


def test_rope_is_neox_rotate_half(model: Transformer) -> None:
    d = model.config.head_dim
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, d)).astype(np.float32)
    pos = np.arange(5)
    got = model.rope(x, pos)
    # rotate-half with cat(freqs, freqs) tables (HF formulation)
    inv = 1.0 / (model.config.rope_base ** (np.arange(0, d, 2) / d))
    ang = np.concatenate([pos[:, None] * inv, pos[:, None] * inv], axis=1)
    rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    np.testing.assert_allclose(got, x * np.cos(ang) + rot * np.sin(ang), atol=1e-5)
    # and it is not the adjacent-pair (NORM) variant
    pairs = x.reshape(2, 5, d // 2, 2)
    c, s = np.cos(pos[:, None] * inv), np.sin(pos[:, None] * inv)
    norm = np.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], -1)
    assert np.abs(got - norm.reshape(x.shape)).max() > 0.1
    np.testing.assert_array_equal(model.rope(x, np.zeros(5, int)), x)


def test_gqa_head_mapping(model: Transformer) -> None:
    """Query head h uses kv head h // (n_head / n_head_kv)."""
    cfg = model.config
    rng = np.random.default_rng(1)
    q = rng.standard_normal((cfg.n_head, 3, cfg.head_dim)).astype(np.float32)
    k = rng.standard_normal((cfg.n_head_kv, 3, cfg.head_dim)).astype(np.float32)
    v = rng.standard_normal((cfg.n_head_kv, 3, cfg.head_dim)).astype(np.float32)
    mask = np.tri(3, dtype=bool)
    out = model.attention(q, k, v, mask).reshape(3, cfg.n_head, cfg.head_dim)
    group = cfg.n_head // cfg.n_head_kv
    for h in range(cfg.n_head):
        kv = h // group
        scores = q[h] @ k[kv].T / np.sqrt(cfg.head_dim)
        scores = np.where(mask, scores, -np.inf)
        p = np.exp(scores - scores.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        np.testing.assert_allclose(out[:, h], p @ v[kv], atol=1e-5)


def test_incremental_decode_equals_batch(model: Transformer) -> None:
    ids = np.array([5, 17, 300, 2, 99, 45, 46, 47])
    full = model.logits(model.forward(ids, model.new_cache()))
    cache = model.new_cache()
    first = model.logits(model.forward(ids[:3], cache))
    rest = [model.logits(model.forward(ids[i : i + 1], cache)) for i in range(3, len(ids))]
    np.testing.assert_allclose(np.concatenate([first, *rest]), full, atol=1e-4)
    assert cache.length == len(ids)


def test_custom_mask_and_positions_match_separate_runs(model: Transformer) -> None:
    """Two continuations packed in one call with a tree mask equal two separate runs."""
    prefix, a, b = [1, 2, 3], [10, 11], [20, 21, 22]
    cache = model.new_cache()
    model.forward(np.array(prefix), cache)
    mask = np.zeros((5, 5), bool)
    mask[:2, :2] = np.tri(2, dtype=bool)
    mask[2:, 2:] = np.tri(3, dtype=bool)
    pos = np.array([3, 4, 3, 4, 5])
    packed = model.logits(model.forward(np.array(a + b), cache, positions=pos, mask=mask))
    sep_a = model.logits(model.forward(np.array(prefix + a), model.new_cache()))[3:]
    sep_b = model.logits(model.forward(np.array(prefix + b), model.new_cache()))[3:]
    np.testing.assert_allclose(packed, np.concatenate([sep_a, sep_b]), atol=1e-4)


def test_kv_cache_float16_halves_memory(model: Transformer) -> None:
    ids = np.arange(1, 40)
    c32, c16 = model.new_cache("float32"), model.new_cache("float16")
    model.forward(ids, c32)
    model.forward(ids, c16)
    assert c16.nbytes * 2 == c32.nbytes and c16.k[0].dtype == np.float16
    # layer 0's keys/values do not depend on the cache type: the f16 cache holds them rounded
    n = len(ids)
    np.testing.assert_array_equal(c16.k[0][:, :n], c32.k[0][:, :n].astype(np.float16))
    np.testing.assert_array_equal(c16.v[0][:, :n], c32.v[0][:, :n].astype(np.float16))


def test_activation_is_data(tmp_path: Path) -> None:
    """bitnet uses SiLU, bitnet-b1.58 relu²; the same weights give different logits."""
    p1 = write_random_model(tmp_path / "a.gguf", "tiny", arch="bitnet-b1.58", seed=3)
    p2 = write_random_model(tmp_path / "b.gguf", "tiny", arch="bitnet", seed=3)
    t1, t2 = Transformer(GGUFFile(p1), get_backend()), Transformer(GGUFFile(p2), get_backend())
    assert (t1.config.activation, t2.config.activation) == ("relu2", "silu")
    ids = np.array([1, 2, 3])

    def run(t: Transformer) -> np.ndarray:
        return t.logits(t.forward(ids, t.new_cache()))

    assert np.abs(run(t1) - run(t2)).max() > 1e-3
    np.testing.assert_array_equal(run(Transformer(GGUFFile(p2), get_backend(), activation="relu2")), run(t1))


def test_missing_tensor_and_bad_arch_are_named(tmp_path: Path) -> None:
    from edgebit.gguf_writer import GGUFWriter

    src = GGUFFile(write_random_model(tmp_path / "ok.gguf", "tiny", seed=1))
    w = GGUFWriter(tmp_path / "missing.gguf")
    for key, value in src.metadata.items():
        w.add(key, value, elem_type=8 if isinstance(value, list) else None)
    for name, info in src.tensors.items():
        if name != "blk.1.ffn_up.weight":
            w.add_tensor(name, info.shape, info.type.name, src.tensor_bytes(name).tobytes())
    w.write()
    with pytest.raises(GGUFError, match="blk.1.ffn_up.weight"):
        Transformer(GGUFFile(tmp_path / "missing.gguf"), get_backend())
    llama = write_random_model(tmp_path / "llama.gguf", "tiny", arch="llama", seed=1)
    with pytest.raises(GGUFError, match="'llama'"):
        Transformer(GGUFFile(llama), get_backend())


def test_token_tree_rows_equal_separate_runs(model: Transformer) -> None:
    """Two branches after a shared cached prefix, evaluated as one tree (as classification does), give
    bit-identical hidden states to evaluating each branch on its own."""
    prefix, branches = [5, 9, 2, 7], [[11, 12, 13], [21, 22, 23, 24]]
    cache = model.new_cache()
    model.forward(np.array(prefix), cache)
    past = cache.length
    ids = np.array(branches[0] + branches[1])
    positions = np.array([past + i for b in branches for i in range(len(b))])
    mask = np.zeros((len(ids), len(ids)), dtype=bool)
    mask[:3, :3] = np.tri(3, dtype=bool)
    mask[3:, 3:] = np.tri(4, dtype=bool)
    tree = model.forward(ids, cache, positions=positions, mask=mask)
    cache.truncate(past)
    for start, branch in ((0, branches[0]), (3, branches[1])):
        alone = model.forward(np.array(branch), cache)
        cache.truncate(past)
        np.testing.assert_array_equal(tree[start : start + len(branch)], alone)

