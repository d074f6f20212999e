"""Shared fixtures: the third-party test data beside the repo, and small models built in code."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgebit.synthetic import write_random_model

TESTDATA = Path(__file__).resolve().parent.parent.parent / "shared" / "testdata"
REFERENCE_MODELS = TESTDATA / "reference-models"


@pytest.fixture(scope="session")
def testdata() -> Path:
    assert TESTDATA.is_dir(), f"test data not found at {TESTDATA} (clone ../shared beside the repo)"
    return TESTDATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer `bitnet-b1.58` I2_S model with a byte-level tokenizer (512 tokens)."""
    return Path(write_random_model(tmp_path_factory.mktemp("models") / "tiny.gguf", "tiny", seed=7))
