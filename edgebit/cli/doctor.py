"""`edgebit doctor`: what this machine offers edgebit, and whether a model and a broker are usable."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import click
import numpy as np

from .. import __version__, config, store
from ..backends import fast, get_backend
from ..backends.lm_head import LMHead
from ..backends.machine import detect
from ..backends.select import choose_backend, embedding_shape, model_shapes
from ..gguf import GGUFFile
from . import main
from .options import model_option, one_model
from .run import backend_option, threads_option

PACKAGES = ("numpy", "numexpr", "gguf", "tokenizers", "paho-mqtt", "click", "platformdirs")


def _gb(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _blas() -> str:
    """The BLAS numpy was built with (numpy >= 1.25 reports it as a dict)."""
    try:
        deps = np.show_config(mode="dicts").get("Build Dependencies", {})  # type: ignore[union-attr]
        blas = deps.get("blas", {})
        return " ".join(str(blas.get(k)) for k in ("name", "version") if blas.get(k)) or "unknown"
    except (TypeError, AttributeError):
        return "unknown"


def _board() -> str | None:
    """The board name on single-board computers (e.g. "Raspberry Pi 5 Model B Rev 1.0")."""
    try:
        return Path("/proc/device-tree/model").read_text(errors="replace").strip("\0\n ") or None
    except OSError:
        return None


def _broker_check(address: str, timeout: float) -> tuple[bool, str]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"{address!r} is not host:port", param_hint="--broker")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True, f"{address} accepts TCP connections"
    except OSError as exc:
        return False, f"{address} is not reachable: {exc.strerror or exc}"


def _backend_choice(backend: str | None, threads: int | None, shapes: list[tuple[int, int]] | None = None,
                    extra_bytes: int = 0) -> tuple[str, str]:
    """The backend a load would use, and why (a name given by flag, environment or config, or the
    automatic choice's reason)."""
    if backend or os.environ.get("EDGEBIT_BACKEND"):
        name = get_backend(backend, threads).name
        return name, "as configured" if backend else "from EDGEBIT_BACKEND"
    choice = choose_backend(shapes or [], threads, extra_bytes)
    get_backend(choice.backend, threads)  # raises if it cannot run here
    return choice.backend, choice.reason


def _model_check(model: str, backend: str | None, threads: int | None,
                 mem_available: int | None) -> dict[str, Any]:
    """Read the model's header (not its weights) and pick the backend a load would use."""
    path = store.resolve(model)
    f = GGUFFile(path)
    types: dict[str, int] = {}
    for t in f.tensors.values():
        types[t.type.name] = types.get(t.type.name, 0) + 1
    arch = f.metadata.get("general.architecture")
    head = LMHead.resident_bytes("float16", embedding_shape(f))
    name, reason = _backend_choice(backend, threads, model_shapes(f), head)
    out = {"path": path, "arch": arch, "name": f.metadata.get("general.name"), "file_bytes": f.size,
           "tensor_types": types, "backend": name, "backend_reason": reason}
    if mem_available is not None and f.size > mem_available:
        out["warning"] = (f"the file ({_gb(f.size)}) is larger than the available memory "
                          f"({_gb(mem_available)}); loading will swap or fail")
    return out


def _missing(model: str | None, broker: str | None, stored: int) -> list[dict[str, str]]:
    """What is not set up yet (no failure, but edgebit cannot do its work without it), each with
    the next command to run."""
    cfg = config.config_path()
    missing = []
    if model is None and stored == 0:
        missing.append({"what": "no model: the store is empty and no default model is set",
                        "next": "edgebit pull bitnet-b1.58-2b-4t   (offline: `edgebit models import FILE`; "
                                "a random test model: `edgebit models random`)"})
    elif model is None:
        missing.append({"what": "no default model: commands need MODEL or -m (see `edgebit models list`)",
                        "next": f"add `model = \"NAME\"` to {cfg}, or export EDGEBIT_MODEL=NAME"})
    if broker is None:
        missing.append({"what": "no MQTT broker configured (`edgebit serve` needs one)",
                        "next": f"edgebit doctor --broker HOST:1883, then add [broker] host = \"HOST\" to {cfg} "
                                "or export EDGEBIT_MQTT_HOST=HOST"})
    return missing


@main.command()
@click.argument("model", required=False)
@model_option
@click.option("--broker", default=None, metavar="HOST:PORT",
              help="Check that an MQTT broker accepts TCP connections (default: the configured broker, if any).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=3.0, show_default=True,
              help="Seconds to wait for the broker.")
@backend_option
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(model: str | None, model_opt: str | None, broker: str | None, timeout: float, backend: str | None,
           threads: int | None, as_json: bool) -> None:
    """Check this machine, a model and an MQTT broker for edgebit.

    Reports CPU, memory, Python and numpy, BLAS, the model store, and optionally a model (MODEL or
    the configured default) and a broker.

    Exit code 0 when every check passes, 1 when one fails (unreadable model, unusable backend,
    unreachable broker). What is not set up yet (no model, no broker) is listed with the next
    command to run; it does not fail the check.

    \b
    Examples:
      edgebit doctor
      edgebit doctor bitnet-b1.58-2b-4t --broker mqtt.local:1883
      edgebit doctor --json
    """
    machine = detect()
    report: dict[str, Any] = {
        "edgebit": __version__,
        "python": f"{platform.python_implementation()} {platform.python_version()} "
                  f"({sys.maxsize.bit_length() + 1}-bit)",
        "platform": f"{platform.system()} {platform.release()} {machine.arch}",
        "board": _board(),
        "cpu": {"model": machine.cpu_model, "cores": machine.cpus,
                "features": sorted(machine.features & {"avx", "avx2", "avx512f", "avx512_vnni", "avxvnni", "fma",
                                                       "f16c", "neon", "asimd", "asimddp", "fphp", "sve", "i8mm"})},
        "memory": {"total": machine.mem_total, "available": machine.mem_available},
        "blas": _blas(),
        "packages": {},
        "store": {"models": str(config.models_dir()), "count": len(store.list_models()),
                  "config": str(config.config_path()), "config_exists": config.config_path().exists()},
        "problems": [],
    }
    report["kernels"] = fast.status()
    for name in PACKAGES:
        try:
            report["packages"][name] = version(name)
        except PackageNotFoundError:
            report["packages"][name] = None
            report["problems"].append(f"package {name} is not installed")
    folder = config.models_dir()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    report["store"]["disk_free"] = shutil.disk_usage(existing).free
    try:
        settings = config.load_file()
    except config.ConfigError as exc:
        report["problems"].append(str(exc))
        settings = {}
    try:
        chosen_model = config.resolve("model", one_model(model, model_opt), file=settings)
        backend = config.resolve("backend", backend, file=settings)
        threads = config.resolve("threads", threads, file=settings)
        if broker is None and (os.environ.get("EDGEBIT_MQTT_HOST") or "broker.host" in settings):
            broker = f"{config.resolve('broker.host', file=settings)}:{config.resolve('broker.port', file=settings)}"
    except config.ConfigError as exc:
        report["problems"].append(str(exc))
        chosen_model = None
    if chosen_model:
        try:
            report["model"] = _model_check(chosen_model, backend, threads, machine.mem_available)
        except (OSError, ValueError, store.StoreError) as exc:
            report["model"] = {"error": str(exc)}
            report["problems"].append(f"model: {exc}")
    else:
        try:
            report["backend"], report["backend_reason"] = _backend_choice(backend, threads)
        except ValueError as exc:
            report["problems"].append(f"backend: {exc}")
    if broker is not None:
        ok, message = _broker_check(broker, timeout)
        report["broker"] = {"address": broker, "reachable": ok, "message": message}
        if not ok:
            report["problems"].append(f"broker: {message}")
    report["missing"] = _missing(chosen_model, broker, report["store"]["count"])
    _print(report, as_json)
    if report["problems"]:
        sys.exit(1)


def _kernels_line(kernels: dict[str, Any]) -> str:
    if not kernels["available"]:
        return (f"numpy only: {kernels['reason']} (several times faster generation; numpy stays the "
                "fallback)")
    cache = (f"cache warm ({kernels['cached']}/{kernels['kernels']} loaded in {kernels['seconds']:.1f} s)"
             if kernels["cached"] == kernels["kernels"] else
             f"compiled in {kernels['seconds']:.1f} s for this CPU (first run), now cached")
    target = f"LLVM target {kernels['llvm_cpu']}" + (", 512-bit vectors" if kernels["wide_vectors"] else "")
    return f"compiled (numba {kernels['numba']}, {target}): {cache} in {kernels['cache_dir']}"


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    cpu, mem, st = report["cpu"], report["memory"], report["store"]
    lines = [
        ("edgebit", report["edgebit"]),
        ("python", report["python"]),
        ("platform", report["platform"] + (f" ({report['board']})" if report["board"] else "")),
        ("cpu", f"{cpu['model']}, {cpu['cores']} cores, features: {' '.join(cpu['features']) or 'none of interest'}"),
        ("memory", f"{_gb(mem['total'])} total, {_gb(mem['available'])} available"),
        ("numpy", f"{report['packages'].get('numpy')}, BLAS: {report['blas']}"),
        ("packages", ", ".join(f"{k} {v or 'MISSING'}" for k, v in report["packages"].items() if k != "numpy")),
        ("models", f"{st['models']} ({st['count']} stored, {_gb(st['disk_free'])} free)"),
        ("config", st["config"] + ("" if st["config_exists"] else " (not present)")),
    ]
    lines.append(("kernels", _kernels_line(report["kernels"])))
    if "backend" in report:
        lines.append(("backend", f"{report['backend']} ({report['backend_reason']})"))
    model = report.get("model")
    if model and "error" not in model:
        types = ", ".join(f"{k} {v}" for k, v in sorted(model["tensor_types"].items()))
        lines.append(("model", f"{model['path']}: {model['arch']}, {_gb(model['file_bytes'])}, {types}"))
        lines.append(("backend", f"{model['backend']} for this model ({model['backend_reason']})"))
        if "warning" in model:
            lines.append(("warning", model["warning"]))
    if "broker" in report:
        lines.append(("broker", report["broker"]["message"]))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key:<{width}}  {value}")
    for item in report["missing"]:
        click.echo(f"missing: {item['what']}\n  next: {item['next']}")
    for problem in report["problems"]:
        click.echo(f"problem: {problem}", err=True)
    if report["problems"]:
        return
    if report["missing"]:
        click.echo(f"the checks passed, but {len(report['missing'])} thing(s) are missing (above)")
    else:
        click.echo("all checks passed")
