"""The sampler chain: each filter against a hand computation, and seeded reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgebit.sampling import Sampler, SamplingParams

logit_arrays = hnp.arrays(np.float32, st.integers(2, 50), elements=st.floats(-20, 20, width=32), unique=True)


@settings(max_examples=100, deadline=None)
@given(logits=logit_arrays)
def test_greedy_is_argmax(logits: np.ndarray) -> None:
    assert Sampler(SamplingParams(temperature=0))(logits) == int(np.argmax(logits))


@settings(max_examples=60, deadline=None)
@given(logits=logit_arrays, k=st.integers(1, 5), seed=st.integers(0, 1000))
def test_top_k_only_draws_from_k_best(logits: np.ndarray, k: int, seed: int) -> None:
    s = Sampler(SamplingParams(temperature=5.0, top_k=k, top_p=1.0, min_p=0.0, seed=seed))
    best = set(np.argsort(-logits)[:k].tolist())
    assert all(s(logits) in best for _ in range(20))


def test_top_p_keeps_smallest_prefix_reaching_mass() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.75, min_p=0.0, seed=0))
    drawn = {s(np.log(probs)) for _ in range(300)}
    assert drawn == {0, 1}


def test_min_p_relative_to_best() -> None:
    probs = np.array([0.6, 0.3, 0.05, 0.05])
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=0))
    assert {s(np.log(probs)) for _ in range(300)} == {0, 1}


def test_repeat_penalty_like_llama_cpp() -> None:
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0))
    logits = np.array([4.0, 3.0, -1.0, 1.0])
    np.testing.assert_array_equal(s.penalize(logits, [0, 2]), [2.0, 3.0, -2.0, 1.0])
    assert s(logits, [0]) == 1


def test_temperature_distribution() -> None:
    """With no filters, draw frequencies follow softmax(logits / T)."""
    logits = np.array([1.0, 0.0, -1.0])
    s = Sampler(SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=123))
    counts = np.bincount([s(logits) for _ in range(6000)], minlength=3) / 6000
    expected = np.exp(logits / 2) / np.exp(logits / 2).sum()
    np.testing.assert_allclose(counts, expected, atol=0.03)


def test_seed_reproducible_and_params_validated() -> None:
    logits = np.random.default_rng(0).standard_normal(100)
    a = Sampler(SamplingParams(seed=42))
    b = Sampler(SamplingParams(seed=42))
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]
    for bad in ({"temperature": -1}, {"top_p": 0}, {"min_p": 1}, {"top_k": -1}, {"repeat_penalty": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
