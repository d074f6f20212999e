"""The bundled micro model `edgebit-sensors`: found by name without a download, small, and
classifying held-out generator messages through the normal engine path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import edgebit
from edgebit import store
from edgebit.evaluate import evaluate
from edgebit.registry import bundled
from edgebit.sensors_data import LABELS, TEMPLATE, generate


def test_resolves_by_name_without_the_store_or_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "download", lambda *a, **k: pytest.fail("no download may happen"))
    path = store.resolve("edgebit-sensors")
    assert path == bundled("EDGEBIT-SENSORS")
    assert Path(path).parent == Path(edgebit.__file__).parent / "models"
    assert os.path.getsize(path) <= 8 * 1024 * 1024


def test_loads_by_name_with_its_template_and_labels() -> None:
    m = edgebit.load("edgebit-sensors")
    assert m.info["arch"] == "bitnet-b1.58" and m.info["tensor_types"]["I2_S"] == 7 * m.info["block_count"]
    assert m.classify_template == TEMPLATE and m.classify_labels == list(LABELS)
    result = m.classify("zigbee2mqtt/kitchen {\"temperature\": 21.4, \"humidity\": 48, \"battery\": 87}")
    assert set(result["scores"]) == set(LABELS) and abs(sum(result["scores"].values()) - 1) < 1e-6


def test_held_out_accuracy_does_not_regress() -> None:
    """A guard on the shipped file (the full measurement, 1894 messages, is benchmarks/micro_sensors.md):
    200 held-out messages, disjoint names and phrasings, through Model.classify_batch."""
    rows = [(e.text, e.label) for e in generate(200, "eval", seed=0)]
    report = evaluate(edgebit.load("edgebit-sensors"), rows, batch=50)
    assert report.accuracy >= 0.8, report.table()
