"""Labelled sensor messages for the bundled micro model `edgebit-sensors` (issue #11).

Each message is what a real sensor publishes: short text ("boiler 97C, pressure 2.1 bar"), a
Zigbee2MQTT JSON payload, a Tasmota `tele/.../SENSOR` payload or ESPHome state topics, optionally
prefixed by the topic, with unrelated fields (linkquality, voltage, DewPoint...) and Fahrenheit
where the device says so. The label is the worst reading's: `normal`, `warning` or `critical`,
by the table in `severity`.

Honesty of the held-out set: `generate(..., split="eval")` draws from device names (sites and
numbering styles) and text phrasings that `split="train"` never uses, from its own random stream,
and keeps every value at least `EVAL_MARGIN` of its quantity's scale away from a band boundary
(a value on a boundary may take either label). Quantity words and units are shared: they are the
domain's vocabulary, not phrasing.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

LABELS = ("normal", "warning", "critical")
TEMPLATE = "{text}\nstatus:"  # the prompt stored in the bundled model; the label follows after a space
FORMATS = ("text", "zigbee2mqtt", "tasmota", "esphome")
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Quantity:
    """A measured quantity: its severity bands (in its own unit) and the range values are drawn from."""

    name: str
    unit: str
    low: float  # plausible drawing range
    high: float
    decimals: int
    bands: tuple[tuple[float, float, int], ...]  # [lo, hi) → 0 normal, 1 warning, 2 critical

    def severity(self, value: float) -> int:
        for lo, hi, sev in self.bands:
            if lo <= value < hi:
                return sev
        raise ValueError(f"{self.name}: {value} outside every band")

    def boundaries(self) -> list[float]:
        return sorted({b for lo, hi, _ in self.bands for b in (lo, hi) if abs(b) != float("inf")})


INF = float("inf")
QUANTITIES = {
    "room_temp": Quantity("room_temp", "C", -10, 45, 1, ((-INF, 5, 2), (5, 15, 1), (15, 28, 0), (28, 35, 1),
                                                          (35, INF, 2))),
    "water_temp": Quantity("water_temp", "C", 30, 110, 1, ((-INF, 80, 0), (80, 95, 1), (95, INF, 2))),
    "pressure": Quantity("pressure", "bar", 0.1, 4.0, 2, ((-INF, 0.5, 2), (0.5, 1.0, 1), (1.0, 2.5, 0), (2.5, 3.0, 1),
                                                           (3.0, INF, 2))),
    "humidity": Quantity("humidity", "%", 5, 95, 1, ((-INF, 20, 2), (20, 30, 1), (30, 60, 0), (60, 75, 1),
                                                     (75, INF, 2))),
    "co2": Quantity("co2", "ppm", 400, 4000, 0, ((-INF, 1000, 0), (1000, 2000, 1), (2000, INF, 2))),
    "battery": Quantity("battery", "%", 0, 100, 0, ((-INF, 10, 2), (10, 30, 1), (30, INF, 0))),
    "vibration": Quantity("vibration", "mm/s", 0.2, 25, 1, ((-INF, 4.5, 0), (4.5, 11, 1), (11, INF, 2))),
    "smoke": Quantity("smoke", "", 0, 1, 0, ((-INF, 0.5, 0), (0.5, INF, 2))),
    "water_leak": Quantity("water_leak", "", 0, 1, 0, ((-INF, 0.5, 0), (0.5, INF, 2))),
    "gas": Quantity("gas", "", 0, 1, 0, ((-INF, 0.5, 0), (0.5, INF, 2))),
}
ALARMS = ("smoke", "water_leak", "gas")
EVAL_MARGIN = 0.03  # held-out values stay this fraction of (high - low) away from every boundary


def c_to_f(c: float) -> float:
    return c * 9 / 5 + 32


def f_to_c(f: float) -> float:
    return (f - 32) * 5 / 9


# --- device names: sites and numbering styles differ between the splits; device kinds are shared

SITES = {
    "train": ["kitchen", "basement", "office", "lab", "garage", "attic", "hall", "bedroom", "workshop", "store",
              "north_wing", "unit_a", "floor1", "server_room", "lobby", "shed", "plant", "cellar", "studio", "depot"],
    "eval": ["annex", "loft", "canteen", "east_block", "unit_c", "floor3", "pantry", "library", "gym", "barn",
             "wing_b", "suite"],
}
KINDS = {  # words that tell which quantity a device measures
    "room_temp": ["thermostat", "room", "climate", "ambient", "air", "th_sensor", "trv"],
    "water_temp": ["boiler", "dhw", "flow_pipe", "return_pipe", "hot_water", "tank", "heating_loop"],
    "pressure": ["boiler", "heating_loop", "expansion", "pump", "system"],
    "humidity": ["climate", "room", "air", "th_sensor", "hygro"],
    "co2": ["co2", "air_quality", "iaq", "climate"],
    "battery": ["door", "window", "motion", "button", "th_sensor", "leak"],
    "vibration": ["pump", "motor", "fan", "compressor", "chiller"],
    "smoke": ["smoke", "fire_alarm", "detector"],
    "water_leak": ["leak", "flood", "water_sensor"],
    "gas": ["gas", "gas_alarm", "co_detector"],
}
NUMBERING = {
    "train": [lambda r: "", lambda r: f"_{r.randint(1, 9)}", lambda r: f"{r.randint(1, 20)}",
              lambda r: f"_{r.choice('abcd')}"],
    "eval": [lambda r: f"-{r.randint(10, 99)}", lambda r: f"_0{r.randint(1, 9)}", lambda r: f"_{r.choice('xyz')}"],
}


def device_name(rng: random.Random, split: str, quantity: str, style: str = "_") -> str:
    """e.g. `kitchen_boiler_2` (train) or `annex_boiler-17` (eval); `style` joins the parts."""
    site = rng.choice(SITES[split])
    kind = rng.choice(KINDS[quantity])
    if rng.random() < 0.8:
        name = f"{site}_{kind}{rng.choice(NUMBERING[split])(rng)}"
    else:
        name = f"{kind}{rng.choice(NUMBERING[split])(rng)}"
    return name.replace("_", style)


# --- values


def draw_value(rng: random.Random, q: Quantity, target: int, split: str) -> float | None:
    """A value of severity `target` for `q` (None if `q` has no such band), rounded as sensors show it."""
    spans = [(max(lo, q.low), min(hi, q.high)) for lo, hi, sev in q.bands if sev == target]
    spans = [(lo, hi) for lo, hi in spans if hi > lo]
    if not spans:
        return None
    margin = EVAL_MARGIN * (q.high - q.low) if split == "eval" else 0.0
    for _ in range(100):
        lo, hi = rng.choices(spans, weights=[hi - lo for lo, hi in spans])[0]
        value = round(rng.uniform(lo, hi), q.decimals)
        if q.name in ALARMS:
            return float(target == 2)
        if q.severity(value) == target and all(abs(value - b) >= margin for b in q.boundaries()):
            return value
    return None


@dataclass
class Reading:
    quantity: str
    value: float  # in the quantity's unit (°C for temperatures)
    fahrenheit: bool = False

    @property
    def severity(self) -> int:
        return QUANTITIES[self.quantity].severity(self.value)

    def shown(self) -> float | int | bool:
        """The number the device prints (°F if it says so), rounded as a device would."""
        q = QUANTITIES[self.quantity]
        if q.name in ALARMS:
            return self.value > 0.5
        if self.fahrenheit:
            return round(c_to_f(self.value), 1)
        return int(self.value) if q.decimals == 0 else round(self.value, q.decimals)


def _readings(rng: random.Random, quantities: list[str], split: str, fahrenheit: bool) -> list[Reading] | None:
    """Readings of the given quantities whose worst severity is a uniformly drawn label."""
    target = rng.randrange(3)
    able = [q for q in quantities if draw_value(rng, QUANTITIES[q], target, split) is not None]
    if not able:
        return None
    carrier = rng.choice(able)
    readings = []
    for name in quantities:
        q = QUANTITIES[name]
        sev = target if name == carrier else rng.choice([s for s in range(target + 1)])
        value = draw_value(rng, q, sev, split)
        if value is None:
            value = draw_value(rng, q, 0, split)
        if value is None:
            return None
        readings.append(Reading(name, value, fahrenheit and name in ("room_temp", "water_temp")))
    if fahrenheit:  # label from the value as shown in °F, converted back
        for r in readings:
            if r.fahrenheit:
                r.value = f_to_c(float(r.shown()))
                if split == "eval" and draw_margin_violated(r):
                    return None
    return readings


def draw_margin_violated(r: Reading) -> bool:
    q = QUANTITIES[r.quantity]
    return any(abs(r.value - b) < EVAL_MARGIN * (q.high - q.low) for b in q.boundaries())


# --- formats

TEXT_WORDS = {  # quantity words, shared by both splits
    "room_temp": ["temp", "temperature", "room temp", "air temp", "indoor temp"],
    "water_temp": ["water temp", "flow temp", "boiler temp", "pipe temp", "tank temp", "supply temp"],
    "pressure": ["pressure", "system pressure", "water pressure"],
    "humidity": ["humidity", "RH", "rel. humidity"],
    "co2": ["CO2", "co2", "carbon dioxide"],
    "battery": ["battery", "batt", "battery level"],
    "vibration": ["vibration", "vib", "vibration velocity"],
}
ALARM_TEXT = {
    "smoke": (["no smoke", "smoke: clear", "smoke alarm off"], ["SMOKE DETECTED", "smoke: yes", "smoke alarm on"]),
    "water_leak": (["no leak", "leak: dry", "water leak: none"], ["LEAK DETECTED", "leak: yes", "water leak: wet"]),
    "gas": (["no gas", "gas: clear", "gas level ok"], ["GAS DETECTED", "gas: yes", "gas alarm triggered"]),
}


def _unit_text(r: Reading, rng: random.Random) -> str:
    q = QUANTITIES[r.quantity]
    if q.unit == "C":
        return rng.choice(["F", " F", "°F", " °F"]) if r.fahrenheit else rng.choice(["C", " C", "°C", " °C"])
    if q.unit == "%":
        return rng.choice(["%", " %"])
    return " " + q.unit if rng.random() < 0.8 else q.unit


# Phrasings of one reading: (word, number+unit) → text. Disjoint between the splits. The training
# split has many, word-first and value-first, so the model learns that the connecting words do not
# matter, and " - " as a separator as well as a minus sign; the held-out phrasings, joiners and
# leads are none of them.
PHRASES: dict[str, list[Callable[[str, str], str]]] = {
    "train": [lambda w, v: f"{w} {v}", lambda w, v: f"{w}: {v}", lambda w, v: f"{w}={v}",
              lambda w, v: f"{w} is {v}", lambda w, v: f"{w} now {v}", lambda w, v: f"{w} was {v}",
              lambda w, v: f"{w} of {v}", lambda w, v: f"{w} ~ {v}", lambda w, v: f"{w} measured {v}",
              lambda w, v: f"{w} currently {v}", lambda w, v: f"{w} => {v}", lambda w, v: f"{w} ({v})",
              lambda w, v: f"{w} value {v}", lambda w, v: f"{w} showing {v}", lambda w, v: f"{w} hit {v}",
              lambda w, v: f"{v} for {w}", lambda w, v: f"{v} ({w})", lambda w, v: f"{v}, {w}",
              lambda w, v: f"{v} on {w}", lambda w, v: f"{v} is the {w}", lambda w, v: f"{v} measured {w}",
              lambda w, v: f"{w} \u2013 {v}", lambda w, v: f"{w} -- {v}"],
    "eval": [lambda w, v: f"{w} at {v}", lambda w, v: f"{w} reads {v}", lambda w, v: f"{w} - {v}",
             lambda w, v: f"{v} {w}"],
}
JOINERS = {"train": [", ", "; ", " and ", " | ", " & ", ". ", " also ", " with ", " ;; ", " plus ", " - "],
           "eval": [" / ", ", then ", " + "]}
LEADS = {"train": ["{dev} ", "{dev}: ", "", "[{dev}] ", "{dev} says ", "{dev} update: ", "<{dev}> ", "{dev} >> ",
                   "{dev} sent ", "{dev}, ", "msg {dev}: ", "{dev} status ", "{dev} - ", "{dev} => "],
         "eval": ["from {dev}: ", "{dev} reports ", "{dev} -> "]}


def _text(rng: random.Random, readings: list[Reading], dev: str, split: str) -> str:
    room_device = readings[0].quantity == "room_temp"
    parts = []
    for r in readings:
        if r.quantity in ALARMS:
            parts.append(rng.choice(ALARM_TEXT[r.quantity][int(r.value > 0.5)]))
            continue
        word = rng.choice(TEXT_WORDS[r.quantity])
        if r.quantity == "room_temp" and not room_device:  # a bare "temp" of a boiler would be its water
            word = rng.choice(["room temp", "air temp", "indoor temp"])
        if r.quantity == "water_temp" and rng.random() < 0.3:
            word = rng.choice(["boiler", "flow", "dhw", "return"])
        parts.append(rng.choice(PHRASES[split])(word, f"{r.shown()}{_unit_text(r, rng)}"))
    lead = rng.choice(LEADS[split]).format(dev=dev.replace("_", " ") if rng.random() < 0.5 else dev)
    return lead + rng.choice(JOINERS[split]).join(parts)


Z2M_DEVICES = [  # (quantities, unrelated fields)
    (["room_temp", "humidity", "battery"], ["linkquality", "voltage"]),
    (["room_temp", "humidity"], ["linkquality", "pressure_hpa"]),
    (["co2", "room_temp", "humidity"], ["linkquality", "voc"]),
    (["smoke", "battery"], ["linkquality", "tamper", "battery_low"]),
    (["water_leak", "battery"], ["linkquality", "voltage", "battery_low"]),
    (["gas"], ["linkquality", "sensitivity"]),
    (["battery"], ["linkquality", "contact", "voltage"]),
    (["room_temp", "battery"], ["linkquality", "current_heating_setpoint", "position"]),
]
Z2M_KEYS = {"room_temp": "temperature", "humidity": "humidity", "battery": "battery", "co2": "co2",
            "smoke": "smoke", "water_leak": "water_leak", "gas": "gas"}


def _unrelated(rng: random.Random, field: str) -> tuple[str, object]:
    return {
        "linkquality": ("linkquality", rng.randint(0, 255)),
        "voltage": ("voltage", rng.randint(2500, 3300)),
        "pressure_hpa": ("pressure", round(rng.uniform(960, 1045), 1)),
        "voc": ("voc", rng.randint(0, 500)),
        "tamper": ("tamper", rng.random() < 0.1),
        "battery_low": ("battery_low", rng.random() < 0.2),
        "sensitivity": ("sensitivity", rng.choice(["low", "medium", "high"])),
        "contact": ("contact", rng.random() < 0.5),
        "current_heating_setpoint": ("current_heating_setpoint", rng.choice([17, 19.5, 21, 22, 23.5])),
        "position": ("position", rng.randint(0, 100)),
    }[field]


def _zigbee2mqtt(rng: random.Random, split: str) -> tuple[str, list[Reading]] | None:
    quantities, extra = rng.choice(Z2M_DEVICES)
    readings = _readings(rng, quantities, split, fahrenheit=False)
    if readings is None:
        return None
    fields = [(Z2M_KEYS[r.quantity], r.shown()) for r in readings] + [_unrelated(rng, f) for f in extra]
    rng.shuffle(fields)
    separators = (",", ":") if rng.random() < 0.5 else (", ", ": ")
    payload = json.dumps(dict(fields), ensure_ascii=False, separators=separators)
    dev = device_name(rng, split, quantities[0], style=rng.choice(["_", " "]))
    if rng.random() < 0.7:
        return f"zigbee2mqtt/{dev} {payload}", readings
    return payload, readings


TASMOTA_SENSORS = [  # (sensor name, quantities, unrelated fields inside the sensor object)
    ("DS18B20", ["water_temp"], ["Id"]),
    ("AM2301", ["room_temp", "humidity"], ["DewPoint"]),
    ("SHT3X", ["room_temp", "humidity"], ["DewPoint"]),
    ("BME280", ["room_temp", "humidity"], ["DewPoint", "Pressure"]),
    ("SCD30", ["co2", "room_temp", "humidity"], ["eCO2"]),
    ("ANALOG", ["pressure"], ["A0"]),
]
TASMOTA_KEYS = {"room_temp": "Temperature", "water_temp": "Temperature", "humidity": "Humidity",
                "co2": "CarbonDioxide", "pressure": "Pressure"}


def _tasmota(rng: random.Random, split: str) -> tuple[str, list[Reading]] | None:
    name, quantities, extra = rng.choice(TASMOTA_SENSORS)
    fahrenheit = "room_temp" in quantities or "water_temp" in quantities
    fahrenheit = fahrenheit and rng.random() < 0.3
    readings = _readings(rng, quantities, split, fahrenheit)
    if readings is None:
        return None
    sensor: dict[str, object] = {}
    for r in readings:
        sensor[TASMOTA_KEYS[r.quantity]] = r.shown()
    for f in extra:
        sensor[f] = {"Id": f"{rng.getrandbits(48):012X}", "DewPoint": round(rng.uniform(-5, 20), 1),
                     "Pressure": round(rng.uniform(960, 1045), 1), "eCO2": rng.randint(400, 900),
                     "A0": rng.randint(0, 1023)}[f]
    payload: dict[str, object] = {"Time": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
                                          f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
                                  name: sensor}
    if "pressure" in quantities:
        payload["PressureUnit"] = "bar"
    if fahrenheit or rng.random() < 0.5:
        payload["TempUnit"] = "F" if fahrenheit else "C"
    dev = device_name(rng, split, quantities[0])
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return (f"tele/{dev}/SENSOR {text}" if rng.random() < 0.8 else text), readings


ESPHOME_IDS = {"room_temp": ["temperature", "room_temperature", "air_temp"], "water_temp":
               ["boiler_temperature", "flow_temperature", "dhw_temperature", "pipe_temperature"],
               "pressure": ["system_pressure", "boiler_pressure", "water_pressure"], "humidity": ["humidity"],
               "co2": ["co2", "co2_level"], "battery": ["battery_level", "battery"],
               "vibration": ["vibration", "vibration_velocity", "pump_vibration"], "smoke": ["smoke"],
               "water_leak": ["leak", "water_leak"], "gas": ["gas", "gas_alarm"]}
ESPHOME_DEVICES = [["water_temp", "pressure"], ["room_temp", "humidity"], ["vibration"], ["co2"], ["water_temp"],
                   ["pressure"], ["room_temp"], ["smoke"], ["water_leak"], ["gas"], ["battery"],
                   ["vibration", "room_temp"]]


def _esphome(rng: random.Random, split: str) -> tuple[str, list[Reading]] | None:
    quantities = rng.choice(ESPHOME_DEVICES)
    readings = _readings(rng, quantities, split, fahrenheit=rng.random() < 0.2)
    if readings is None:
        return None
    node = device_name(rng, split, quantities[0], style="-")
    parts = []
    for r in readings:
        sid = rng.choice(ESPHOME_IDS[r.quantity])
        if r.quantity == "room_temp" and quantities[0] != "room_temp":  # a pump's "temperature" is ambiguous
            sid = "room_temperature"
        binary = r.quantity in ALARMS
        if binary:
            state = "ON" if r.value > 0.5 else "OFF"
            value: object = r.value > 0.5
        else:
            unit = _unit_text(r, rng).strip()
            unit = {"C": "°C", "F": "°F"}.get(unit, unit)
            state, value = f"{r.shown()}", r.shown()
        kind = "binary_sensor" if binary else "sensor"
        if rng.random() < 0.5:
            parts.append(f"{node}/{kind}/{sid}/state {state}" + ("" if binary else f" {unit}" * (rng.random() < 0.5)))
        else:
            shown = state if binary else f"{state} {unit}"
            parts.append(json.dumps({"id": f"{kind}-{sid}", "value": value, "state": shown}, ensure_ascii=False))
    return "\n".join(parts), readings


MAKERS = {"zigbee2mqtt": _zigbee2mqtt, "tasmota": _tasmota, "esphome": _esphome}


def _text_message(rng: random.Random, split: str) -> tuple[str, list[Reading]] | None:
    pool = list(TEXT_WORDS) + list(ALARMS)
    n = rng.choice([1, 1, 2, 2, 3])
    quantities = rng.sample(pool, n)
    readings = _readings(rng, quantities, split, fahrenheit=rng.random() < 0.15)
    if readings is None:
        return None
    return _text(rng, readings, device_name(rng, split, quantities[0]), split), readings


MAKERS["text"] = _text_message


@dataclass(frozen=True)
class Example:
    """A generated message with its label and what produced it (for per-quantity / per-format reports)."""

    text: str
    label: str
    format: str
    quantities: tuple[str, ...]
    worst: str  # the quantity that decided the label (first of the worst)


def generate(n: int, split: str = "train", seed: int = 0, formats: tuple[str, ...] = FORMATS) -> Iterator[Example]:
    """`n` labelled messages of the split, balanced over labels and formats; deterministic for a seed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    rng = random.Random(f"{split}-{seed}")  # the splits never share a random stream
    made = 0
    while made < n:
        fmt = formats[made % len(formats)]
        out = MAKERS[fmt](rng, split)
        if out is None:
            continue
        text, readings = out
        worst = max(readings, key=lambda r: r.severity)
        yield Example(text, LABELS[worst.severity], fmt, tuple(r.quantity for r in readings), worst.quantity)
        made += 1
