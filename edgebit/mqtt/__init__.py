"""edgebit over MQTT (protocol v1, see MQTT_PROTOCOL.md): `edgebit serve` runs a node.

protocol: topics and payload schemas · config: the TOML file and its precedence rules ·
service: broker connection, queue, worker, delivery · health: counters and machine readings ·
homeassistant: device discovery · sdnotify: systemd readiness and watchdog.
"""
