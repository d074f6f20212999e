"""`edgebit demo`: broker, node and a simulated sensor stream in one process (see edgebit.demo)."""

from __future__ import annotations

import signal
import sys
import threading

import click

from . import main
from .options import resolve_model
from .run import backend_option, threads_option


@main.command()
@click.option("-m", "--model", "model_opt", default="edgebit-sensors", show_default=True, metavar="NAME|PATH",
              help="A classifier with its labels in the file (trained by `edgebit train`).")
@click.option("-n", "--count", type=click.IntRange(min=1), default=60, show_default=True,
              help="Simulated readings to send.")
@click.option("--rate", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Readings per second (0: as fast as possible).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the simulated readings.")
@backend_option
@threads_option
def demo(model_opt: str, count: int, rate: float, seed: int, backend: str | None, threads: int | None) -> None:
    """Run the whole MQTT path on this machine: no broker, no download needed.

    Starts an embedded MQTT broker on a free loopback port (amqtt; Mosquitto stays the production
    broker), an edgebit node serving the bundled edgebit-sensors model, and a stream of simulated
    sensor readings (Zigbee2MQTT, Tasmota, ESPHome, text); prints each reading with its label,
    probability and round-trip latency, then a summary. Ctrl-C stops cleanly.

    \b
    Examples:
      edgebit demo
      edgebit demo -n 500 --rate 0
    """
    from ..broker import BrokerError
    from ..demo import Demo

    path = resolve_model(model_opt)
    try:
        run = Demo(path, count=count, rate=rate, threads=threads, seed=seed, backend=backend,
                   out=lambda line: click.echo(line))
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    interrupted = threading.Event()

    def on_signal(*_: object) -> None:
        interrupted.set()
        run.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        summary = run.run()
    except (BrokerError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    for line in summary.lines():
        click.echo(line)
    if interrupted.is_set():
        click.echo("stopped (interrupted)", err=True)
        sys.exit(130)
