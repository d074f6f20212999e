"""Shared fixtures: the third-party test data beside the repo, and small models built in code."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from edgebit.synthetic import write_random_model

TESTDATA = Path(__file__).resolve().parent.parent.parent / "shared" / "testdata"
REFERENCE_MODELS = TESTDATA / "reference-models"
_PRIVATE_HOME = pytest.StashKey[tuple[str, dict[str, str | None]]]()


def pytest_configure(config: pytest.Config) -> None:
    """Run the whole suite, and every process it starts, with a private EDGEBIT_HOME: the backend
    probe, models and config a test writes must never reach the user's home (nor their config the tests).

    The compiled kernels' cache (NUMBA_CACHE_DIR) is one folder for the whole run, so the many
    processes a test starts with a home of their own (CLI runs, MQTT nodes) compile the kernels once
    between them, not once each; tests of the cache itself unset it."""
    home = tempfile.mkdtemp(prefix="edgebit-tests-home-")
    saved = {name: os.environ.get(name) for name in ("EDGEBIT_HOME", "NUMBA_CACHE_DIR")}
    config.stash[_PRIVATE_HOME] = (home, saved)
    os.environ["EDGEBIT_HOME"] = home
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(home, "numba-cache")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Give the environment back and delete the private home."""
    home, saved = config.stash[_PRIVATE_HOME]
    for name, previous in saved.items():
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def testdata() -> Path:
    assert TESTDATA.is_dir(), f"test data not found at {TESTDATA} (clone ../shared beside the repo)"
    return TESTDATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer `bitnet-b1.58` I2_S model with a byte-level tokenizer (512 tokens)."""
    return Path(write_random_model(tmp_path_factory.mktemp("models") / "tiny.gguf", "tiny", seed=7))


@pytest.fixture(scope="session")
def micro_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A barely trained micro sensor classifier (edgebit/train.py): a real GGUF with the trained
    vocabulary and the template and labels in its metadata; its answers are not meant to be right."""
    pytest.importorskip("torch")
    from edgebit import train
    from edgebit.sensors_data import LABELS, TEMPLATE

    config = train.TrainConfig(n_vocab=384, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, n_ctx=160,
                               steps=5, batch=8, eval_every=0)
    model, meta, _ = train.train(config, train.sensors_rows(200, "train", 0), [], LABELS, TEMPLATE, log=lambda _: None)
    return Path(train.export(model, meta, tmp_path_factory.mktemp("micro") / "micro.gguf", LABELS, TEMPLATE))
