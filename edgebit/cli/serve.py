"""The `serve` command: run a model as an MQTT node (see edgebit.mqtt and MQTT_PROTOCOL.md), an
OpenAI-compatible HTTP server (edgebit.http), or both in one process around one engine."""

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
from ..backends.fast import kernels
from ..backends.lm_head import MODES
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
@click.option("-c", "--config", "config_path", type=FILE,
              help="MQTT: TOML file with [broker], [node], [limits] and [tasks.NAME] tables.")
@click.option("--http", "http_listen", is_flag=False, flag_value="", default=None, metavar="HOST:PORT",
              help="Serve the OpenAI-compatible HTTP API on HOST:PORT (without a value: [http] listen in "
                   "config.toml, else 127.0.0.1:8080) [env EDGEBIT_HTTP].")
@click.option("--api-key-file", type=FILE,
              help="HTTP: file with the accepted API keys, one per line [env EDGEBIT_API_KEY_FILE; keys also "
                   "from EDGEBIT_API_KEYS]. No --api-key: arguments are visible to every user.")
@click.option("--parallel", type=click.IntRange(1, 64), default=4, show_default=True,
              help="HTTP: sequences decoded together (continuous batching).")
@click.option("--max-queue", type=click.IntRange(1, 10000), default=16, show_default=True,
              help="HTTP: requests allowed to wait; more are answered 429.")
@click.option("--max-body", type=click.IntRange(1024), default=1 << 20, show_default=True,
              help="HTTP: request body limit in bytes (413 beyond).")
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
@click.option("--lm-head", type=click.Choice(MODES), default=None,
              help="Resident form of the LM head. Default: float16 with --http (OpenAI-style requests sample "
                   "from every logit, which the screened head reads from the file at ~2x the cost), else "
                   "the loader's choice (screened with the compiled kernels: greedy and top-k tokens read "
                   "half the bytes, ~0.3 GB less memory).")
@backend_option
@threads_option
@kv_option
def serve(model: str | None, model_opt: str | None, config_path: str | None, http_listen: str | None,
          api_key_file: str | None, parallel: int, max_queue: int, max_body: int, host: str | None, port: int | None,
          username: str | None, password_file: str | None, client_id: str | None, ca: str | None,
          cert: str | None, key: str | None, insecure: bool | None, node_id: str | None, check: bool,
          broker_mode: str, lm_head: str | None, backend: str | None, threads: int | None,
          kv_dtype: str) -> None:
    """Serve MODEL over MQTT with the tasks of a configuration file, and/or over HTTP (--http).

    Settings precedence: flag > EDGEBIT_* environment > --config file > config.toml > default.
    Stops cleanly on SIGTERM (publishes `offline`, finishes the batch in progress, leaves queued
    requests to the broker for redelivery). With both faces, one engine and one scheduler serve both.

    With `--broker embedded` the node brings its own broker (amqtt) listening on the configured
    host and port (default localhost:1883): sensors and clients connect there with MQTT 3.1.1.

    \b
    Examples:
      edgebit serve ggml-model-i2_s.gguf --config /etc/edgebit/edgebit.toml --host mqtt.local
      edgebit serve ggml-model-i2_s.gguf --http 127.0.0.1:8080
      EDGEBIT_API_KEYS=secret edgebit serve bitnet-b1.58-2b-4t --http 0.0.0.0:8080 --config node.toml
      edgebit serve edgebit-sensors --config site.toml --broker embedded
    """
    flags = {"broker.host": host, "broker.port": port, "broker.username": username,
             "broker.password_file": password_file, "broker.client_id": client_id, "broker.tls.ca": ca,
             "broker.tls.cert": cert, "broker.tls.key": key, "broker.tls.insecure": insecure,
             "node.id": node_id}
    try:
        user = config.load_file()
        defaults = {name: user[name] for name in ("broker.host", "broker.port") if name in user}
        cfg = load_config(config_path, flags, defaults=defaults) if config_path is not None else None
        backend, threads = config.resolve("backend", backend), config.resolve("threads", threads)
        if http_listen is not None or "http.listen" in user or os.environ.get("EDGEBIT_HTTP"):
            http_listen = config.resolve("http.listen", http_listen or None, file=user)
            api_key_file = config.resolve("http.api_key_file", api_key_file, file=user)
    except (ConfigError, config.ConfigError) as exc:
        raise click.BadParameter(str(exc), param_hint="--config") from None
    if cfg is None and http_listen is None:
        raise click.UsageError("give --config FILE (the MQTT node), --http [HOST:PORT], or both")
    path = resolve_model(one_model(model, model_opt))
    http = _http_settings(http_listen, api_key_file) if http_listen is not None else None
    head = head_form(lm_head, http is not None)
    if broker_mode == "embedded":  # amqtt speaks MQTT 3.1.1 only, which has no shared subscriptions
        if cfg is None:
            raise click.UsageError("--broker embedded runs a broker for the MQTT node: give --config FILE too")
        cfg = replace(cfg, broker=replace(cfg.broker, protocol="3.1.1"), node=replace(cfg.node, shared=False))
    if check:
        lines = [f"model   {path}"] + ([_summary(cfg)] if cfg else [])
        if http:
            lines.append(f"http    http://{http[0]}:{http[1]}/v1 (API keys: {len(http[2]) or 'none'})")
        click.echo("\n".join(lines))
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
    try:
        if http is None:
            service = Service(cfg, lambda: load(path, backend=backend, threads=threads, kv_dtype=kv_dtype,
                                                lm_head=head), __version__, threads=threads)
            _stop_on_signals(service.stop)
            code = service.run()
        else:
            code = _serve_both(path, cfg, http, parallel, max_queue, max_body,
                               lambda: load(path, backend=backend, threads=threads, kv_dtype=kv_dtype,
                                            lm_head=head), threads)
    finally:
        if embedded is not None:
            embedded.stop()
    sys.exit(code)


def head_form(lm_head: str | None, http: bool) -> str | None:
    """The LM head to load: the user's choice; for the HTTP API the f16 head when the loader would
    pick the screened one, since OpenAI-style requests (top_k off) need every exact logit; else
    None (the loader's choice)."""
    if lm_head is not None or not http:
        return lm_head
    return "float16" if kernels() is not None else None


def _http_settings(listen: str, api_key_file: str | None) -> tuple[str, int, list[str]]:
    """(host, port, API keys), or a usage error naming the bad value; checks that the extra is installed."""
    try:
        from ..http.server import load_api_keys, parse_listen
    except ImportError:
        from ..http import INSTALL_HINT

        raise click.ClickException(INSTALL_HINT) from None
    try:
        host, port = parse_listen(listen)
        keys = load_api_keys(api_key_file)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--http / --api-key-file") from None
    return host, port, keys


def _serve_both(path: str, cfg: ServeConfig | None, http: tuple[str, int, list[str]], parallel: int,
                max_queue: int, max_body: int, load_model: Callable[[], object], threads: int | None) -> int:
    """One engine and one scheduler; the HTTP server in this thread, the MQTT node (if configured) in
    another, both stopped by one signal."""
    from ..http.scheduler import EngineProxy, Scheduler
    from ..http.server import make_server

    host, port, keys = http
    log.info("loading %s", path)
    try:
        model = load_model()
    except Exception as exc:  # reported like the MQTT node reports it
        log.error("could not load the model: %s", exc)
        return 1
    scheduler = Scheduler(model, max_active=parallel, max_queue=max_queue).start()
    server = make_server(scheduler, model.info["name"], host, port, keys, max_body)
    service = Service(cfg, lambda: EngineProxy(scheduler), __version__, threads=threads) if cfg else None
    mqtt_thread = threading.Thread(target=service.run, name="edgebit-mqtt") if service else None

    def stop() -> None:
        server.stop()
        if service is not None:
            service.stop()

    _stop_on_signals(stop)
    if mqtt_thread is not None:
        mqtt_thread.start()
    log.info("serving %s on http://%s:%d/v1 (API keys: %s)", model.info["name"], host, port,
             len(keys) if keys else "none")
    try:
        server.run()  # uvicorn exits the process (SystemExit) if it cannot bind: stop the rest first
    finally:
        if service is not None:
            service.stop()
            mqtt_thread.join()
        scheduler.close()
    return 0
