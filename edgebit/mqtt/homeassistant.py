"""Home Assistant MQTT device discovery for a node (`homeassistant = true`).

One retained device config on `{discovery prefix}/device/edgebit_{node}/config`: an `event`
entity per classify task (its labels are the event types, fired by tap results), a sensor with
each classify task's last label, and sensors for latency and queue depth from the health topic.
All share the node's status topic as availability, so the device goes unavailable with the node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import TaskSpec
from .protocol import OFFLINE, ONLINE, Topics

# Renders the event only for successful results; HA ignores the empty output of errors.
EVENT_TEMPLATE = ("{% if value_json.status == 'ok' %}{{ {'event_type': value_json.label} | to_json }}"
                  "{% endif %}")
LABEL_TEMPLATE = "{% if value_json.status == 'ok' %}{{ value_json.label }}{% endif %}"


def object_id(node: str) -> str:
    return f"edgebit_{node}"


def discovery_topic(prefix: str, node: str) -> str:
    return f"{prefix}/device/{object_id(node)}/config"


def discovery_payload(topics: Topics, tasks: Mapping[str, TaskSpec], version: str,
                      model_name: str | None) -> dict[str, Any]:
    """The device config with its components."""
    uid = object_id(topics.node)
    components: dict[str, dict[str, Any]] = {}
    for name, task in tasks.items():
        if task.kind != "classify":
            continue
        components[f"{name}_event"] = {
            "platform": "event", "name": name, "unique_id": f"{uid}_{name}_event",
            "event_types": list(task.labels), "state_topic": topics.result(name),
            "value_template": EVENT_TEMPLATE,
        }
        components[f"{name}_label"] = {
            "platform": "sensor", "name": f"{name} last label", "unique_id": f"{uid}_{name}_label",
            "state_topic": topics.result(name), "value_template": LABEL_TEMPLATE, "icon": "mdi:label-outline",
        }
    components["latency"] = {
        "platform": "sensor", "name": "latency p50", "unique_id": f"{uid}_latency",
        "state_topic": topics.health, "value_template": "{{ value_json.latency_ms.p50 }}",
        "unit_of_measurement": "ms", "device_class": "duration", "state_class": "measurement",
        "entity_category": "diagnostic",
    }
    components["queue_depth"] = {
        "platform": "sensor", "name": "queue depth", "unique_id": f"{uid}_queue_depth",
        "state_topic": topics.health, "value_template": "{{ value_json.queue_depth }}",
        "state_class": "measurement", "entity_category": "diagnostic", "icon": "mdi:tray-full",
    }
    return {
        "device": {"identifiers": [uid], "name": f"edgebit {topics.node}", "manufacturer": "edgebit",
                   "model": model_name or "BitNet b1.58", "sw_version": version},
        "origin": {"name": "edgebit", "sw_version": version},
        "availability_topic": topics.status, "payload_available": ONLINE, "payload_not_available": OFFLINE,
        "components": components,
        "qos": 1,
    }
