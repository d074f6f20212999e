"""The `serve` command: run a model as an MQTT node (see edgebit.mqtt and MQTT_PROTOCOL.md)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import replace

import click

from .. import __version__, config, load
from ..mqtt.config import ConfigError, ServeConfig, load_config
from ..mqtt.service import Service
from . import main
from .options import model_option, one_model, resolve_model
from .run import backend_option, kv_option, threads_option

log = logging.getLogger("edgebit.mqtt")


def _stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM / SIGINT call `stop` (a clean stop); a second one quits at once.

    The signal handler itself only wakes a pipe (async-signal-safe); a thread calls `stop`, so no
    lock is ever taken inside a handler.
    """
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)

    def watch() -> None:
        assert wake_w.fileno() >= 0  # the write end lives as long as this thread (closing it would wake us)
        wake_r.recv(1)
        log.info("stopping: finishing the work in progress (signal again to quit at once)")
        stop()
        wake_r.recv(1)
        os._exit(130)

    threading.Thread(target=watch, name="edgebit-signals", daemon=True).start()


def _summary(cfg: ServeConfig) -> str:
    b, n = cfg.broker, cfg.node
    pool = f"shared group {n.group}" if n.shared else "not shared"
    lines = [f"broker  {'mqtts' if b.tls else 'mqtt'}://{b.host}:{b.port} (MQTT {b.protocol}, client id "
             f"{b.client_id}, user {b.username or '-'})",
             f"node    {n.id} under {n.prefix}/v1 ({pool})"]
    for t in cfg.tasks.values():
        detail = f"labels {', '.join(t.labels)}" if t.kind == "classify" else "generate"
        inputs = f"; inputs {', '.join(t.inputs)}" if t.inputs else ""
        lines.append(f"task    {t.name}: {detail}{inputs}")
    return "\n".join(lines)


FILE = click.Path(dir_okay=False)


@main.command()
@click.argument("model", required=False)
@model_option
@click.option("-c", "--config", "config_path", required=True, type=FILE,
              help="TOML file with [broker], [node], [limits] and [tasks.NAME] tables.")
@click.option("--host", help="Broker host [env EDGEBIT_MQTT_HOST].")
@click.option("--port", type=click.IntRange(1, 65535), help="Broker port [env EDGEBIT_MQTT_PORT].")
@click.option("--username", help="Broker user name [env EDGEBIT_MQTT_USERNAME].")
@click.option("--password-file", type=FILE,
              help="File with the broker password [env EDGEBIT_MQTT_PASSWORD_FILE or EDGEBIT_MQTT_PASSWORD]. "
                   "No --password: arguments are visible to every user.")
@click.option("--client-id", help="MQTT client id, default edgebit-NODE [env EDGEBIT_MQTT_CLIENT_ID].")
@click.option("--ca", type=FILE, help="CA bundle; enables TLS [env EDGEBIT_MQTT_CA].")
@click.option("--cert", type=FILE, help="TLS client certificate [env EDGEBIT_MQTT_CERT].")
@click.option("--key", type=FILE, help="TLS client key [env EDGEBIT_MQTT_KEY].")
@click.option("--insecure", is_flag=True, default=None,
              help="Skip TLS host-name verification, for test brokers [env EDGEBIT_MQTT_INSECURE].")
@click.option("--node-id", help="Node id in topics, default the host name [env EDGEBIT_NODE_ID].")
@click.option("--check", is_flag=True, help="Validate the configuration, print a summary and exit.")
@click.option("--broker", "broker_mode", type=click.Choice(["external", "embedded"]), default="external",
              show_default=True,
              help="embedded: run an MQTT broker (amqtt, MQTT 3.1.1) inside this process on the configured "
                   "host and port, for a single-box site; needs `pip install 'edgebit[broker]'`.")
@backend_option
@threads_option
@kv_option
def serve(model: str | None, model_opt: str | None, config_path: str, host: str | None, port: int | None,
          username: str | None, password_file: str | None, client_id: str | None, ca: str | None,
          cert: str | None, key: str | None, insecure: bool | None, node_id: str | None, check: bool,
          broker_mode: str, backend: str | None, threads: int | None, kv_dtype: str) -> None:
    """Serve MODEL over MQTT with the tasks of a configuration file.

    Settings precedence: flag > EDGEBIT_* environment > --config file > config.toml > default.
    Stops cleanly on SIGTERM (publishes `offline`, finishes the batch in progress, leaves queued
    requests to the broker for redelivery).

    With `--broker embedded` the node brings its own broker (amqtt) listening on the configured
    host and port (default localhost:1883): sensors and clients connect there with MQTT 3.1.1.

    \b
    Examples:
      edgebit serve ggml-model-i2_s.gguf --config /etc/edgebit/edgebit.toml --host mqtt.local
      edgebit serve edgebit-sensors --config site.toml --broker embedded
    """
    flags = {"broker.host": host, "broker.port": port, "broker.username": username,
             "broker.password_file": password_file, "broker.client_id": client_id, "broker.tls.ca": ca,
             "broker.tls.cert": cert, "broker.tls.key": key, "broker.tls.insecure": insecure,
             "node.id": node_id}
    try:
        user = config.load_file()
        defaults = {name: user[name] for name in ("broker.host", "broker.port") if name in user}
        cfg = load_config(config_path, flags, defaults=defaults)
        backend, threads = config.resolve("backend", backend), config.resolve("threads", threads)
    except (ConfigError, config.ConfigError) as exc:
        raise click.BadParameter(str(exc), param_hint="--config") from None
    path = resolve_model(one_model(model, model_opt))
    if broker_mode == "embedded":  # amqtt speaks MQTT 3.1.1 only, which has no shared subscriptions
        cfg = replace(cfg, broker=replace(cfg.broker, protocol="3.1.1"), node=replace(cfg.node, shared=False))
    if check:
        click.echo(f"model   {path}\n{_summary(cfg)}")
        return
    if log.getEffectiveLevel() > logging.INFO:  # a service reports its life cycle unless told otherwise
        log.setLevel(logging.INFO)
    embedded = None
    if broker_mode == "embedded":
        from ..broker import BrokerError, EmbeddedBroker

        try:
            embedded = EmbeddedBroker(cfg.broker.host, cfg.broker.port).start()
        except BrokerError as exc:
            raise click.ClickException(str(exc)) from None
    service = Service(cfg, lambda: load(path, backend=backend, threads=threads, kv_dtype=kv_dtype),
                      __version__, threads=threads)
    _stop_on_signals(service.stop)
    code = service.run()
    if embedded is not None:
        embedded.stop()
    sys.exit(code)
