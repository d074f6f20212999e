"""The sensor message generator behind edgebit-sensors: labels follow the issue's table, and the
held-out split shares no device site, phrasing or boundary value with the training split."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from edgebit.sensors_data import (
    EVAL_MARGIN,
    FORMATS,
    JOINERS,
    LABELS,
    LEADS,
    PHRASES,
    QUANTITIES,
    SITES,
    Reading,
    c_to_f,
    generate,
)

# (quantity, value, severity) straight from the issue's table, away from the boundaries
TABLE = [("room_temp", 21, 0), ("room_temp", 10, 1), ("room_temp", 31, 1), ("room_temp", 2, 2), ("room_temp", 38, 2),
         ("water_temp", 60, 0), ("water_temp", 88, 1), ("water_temp", 99, 2),
         ("pressure", 1.8, 0), ("pressure", 0.7, 1), ("pressure", 2.8, 1), ("pressure", 0.3, 2), ("pressure", 3.4, 2),
         ("humidity", 45, 0), ("humidity", 25, 1), ("humidity", 70, 1), ("humidity", 15, 2), ("humidity", 80, 2),
         ("co2", 700, 0), ("co2", 1500, 1), ("co2", 2500, 2), ("battery", 80, 0), ("battery", 20, 1),
         ("battery", 5, 2), ("vibration", 2.0, 0), ("vibration", 7.0, 1), ("vibration", 15.0, 2),
         ("smoke", 0, 0), ("smoke", 1, 2), ("water_leak", 1, 2), ("gas", 0, 0), ("gas", 1, 2)]


@pytest.mark.parametrize(("quantity", "value", "severity"), TABLE)
def test_severity_follows_the_issue_table(quantity: str, value: float, severity: int) -> None:
    assert QUANTITIES[quantity].severity(value) == severity


def test_fahrenheit_readings_are_labelled_by_their_celsius_value() -> None:
    r = Reading("water_temp", 97.0, fahrenheit=True)
    assert r.shown() == pytest.approx(c_to_f(97.0), abs=0.05) and r.severity == 2


def test_deterministic_balanced_and_all_formats() -> None:
    a, b = list(generate(600, "train", seed=1)), list(generate(600, "train", seed=1))
    assert a == b
    assert Counter(e.format for e in a) == dict.fromkeys(FORMATS, 150)
    counts = Counter(e.label for e in a)
    assert set(counts) == set(LABELS) and min(counts.values()) > 150


def test_held_out_split_shares_no_site_or_phrasing_and_keeps_off_boundaries() -> None:
    assert not set(SITES["train"]) & set(SITES["eval"])
    assert not set(JOINERS["train"]) & set(JOINERS["eval"]) and not set(LEADS["train"]) & set(LEADS["eval"])
    samples = {split: [f("W", "V") for f in PHRASES[split]] for split in PHRASES}
    assert not set(samples["train"]) & set(samples["eval"])
    train_sites = "|".join(sorted(SITES["train"], key=len, reverse=True))
    held = list(generate(400, "eval", seed=0))
    assert not any(re.search(rf"\b({train_sites})[_ -]", e.text) for e in held)
    train_texts = {e.text for e in generate(4000, "train", seed=0)}
    assert sum(e.text in train_texts for e in held) < len(held) * 0.05  # only bare one-field payloads repeat


def test_held_out_values_keep_the_margin() -> None:
    """Every number a held-out ESPHome state or Zigbee2MQTT field shows is EVAL_MARGIN away from the
    boundaries of its quantity (the label of a boundary value is undefined)."""
    keys = {"temperature": "room_temp", "humidity": "humidity", "co2": "co2", "battery": "battery"}
    checked = 0
    for e in generate(400, "eval", seed=2, formats=("zigbee2mqtt",)):
        payload = json.loads(e.text[e.text.index("{"):])
        for key, quantity in keys.items():
            if key in payload:
                q = QUANTITIES[quantity]
                assert all(abs(payload[key] - b) >= EVAL_MARGIN * (q.high - q.low) - 1e-9 for b in q.boundaries())
                checked += 1
    assert checked > 400
