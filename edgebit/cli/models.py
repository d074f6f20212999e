"""`edgebit models list|pull|import|random|rm|path` and `edgebit pull`: the local model store."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import click

from .. import registry, store
from ..bench import random_model, random_model_path
from ..config import models_dir
from ..synthetic import SHAPES, write_random_model
from . import main
from .options import ProgressBar, progress_option


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


@main.group()
def models() -> None:
    """Models on this machine: list, download, import, generate, remove, locate.

    Models live in the store (see `edgebit models path`); set EDGEBIT_HOME to move it.

    \b
    Examples:
      edgebit models list
      edgebit models pull bitnet-b1.58-2b-4t
      edgebit models import ./ggml-model-i2_s.gguf
      edgebit models random tiny.gguf --shape tiny
      edgebit models path bitnet-b1.58-2b-4t
      edgebit models rm bitnet-b1.58-2b-4t
    """


@models.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also list known models that are not downloaded.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_(show_all: bool, as_json: bool) -> None:
    """Show stored models: name, size, SHA-256 (verified or not) and path.

    Generated random models (`edgebit models random`, `edgebit bench --shape`) are marked
    "generated": their text is meaningless.

    \b
    Examples:
      edgebit models list
      edgebit models list --all --json
    """
    rows = [dict(asdict(m), stored=True) for m in store.list_models()]
    if show_all:
        have = {r["name"] for r in rows}
        rows += [{"name": m.name, "path": None, "size": m.size, "sha256": m.sha256, "verified": False,
                  "source": f"{registry.HF_ENDPOINT}/{m.repo}", "generated": None, "stored": False}
                 for m in registry.MODELS if m.name not in have]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no models in {models_dir()}; download one with `edgebit pull bitnet-b1.58-2b-4t`", err=True)
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        if not r["stored"]:
            state = "not downloaded"
        elif r.get("generated"):
            state = "generated (random)"
        else:
            state = ("verified " if r["verified"] else "unverified ") + (r["sha256"] or "?")[:12]
        click.echo(f"{r['name']:<{width}}  {_size(r['size']):>8}  {state:<23}  {r['path'] or r['source']}")


def _check(stored: store.StoredModel, why_not: str) -> str:
    return "verified" if stored.verified else f"NOT verified ({why_not})"


def _report(stored: store.StoredModel, as_json: bool, line: str) -> None:
    """A stored model as JSON, or the command's one-line summary."""
    click.echo(json.dumps(asdict(stored), indent=2) if as_json else line)


def _pull(spec: str, name: str | None, sha256: str | None, progress: bool | None, retries: int,
          as_json: bool) -> None:
    with ProgressBar("downloading", progress) as bar, ProgressBar("converting", progress) as steps:
        try:
            stored = store.pull(spec, name=name, sha256=sha256, progress=bar, convert_progress=steps,
                                retries=retries)
        except store.StoreError as exc:
            raise click.ClickException(str(exc)) from None
    _report(stored, as_json, f"{stored.name}  {stored.path}  sha256 {stored.sha256} "
                             f"{_check(stored, 'no published digest')}")


_pull_options = [
    click.argument("spec", metavar="NAME|URL"),
    click.option("--name", default=None, help="File name in the store (default: the registry name or URL's)."),
    click.option("--sha256", default=None, help="Expected SHA-256 of a URL download."),
    click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
                 help="Resume attempts after a dropped connection."),
    click.option("--json", "as_json", is_flag=True, help="Print the stored model as JSON."),
    progress_option,
]


def _with_pull_options(f: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_pull_options):
        f = option(f)
    return f


@models.command("pull")
@_with_pull_options
def models_pull(spec: str, name: str | None, sha256: str | None, retries: int, as_json: bool,
                progress: bool | None) -> None:
    """Download a model by registry name or URL into the store (resumable, checksummed).

    A broken download resumes from where it stopped when the command is run again; a file whose
    SHA-256 does not match the published one is deleted. Known names: see `edgebit models list --all`.
    Offline, or when the host cannot be reached: set HF_ENDPOINT to a mirror, or download the file
    elsewhere and use `edgebit models import FILE`.

    \b
    Examples:
      edgebit models pull bitnet-b1.58-2b-4t
      edgebit models pull https://example.org/my-model.gguf --sha256 4221b2...
    """
    _pull(spec, name, sha256, progress, retries, as_json)


@main.command("pull")
@_with_pull_options
def pull(spec: str, name: str | None, sha256: str | None, retries: int, as_json: bool,
         progress: bool | None) -> None:
    """Download a model into the store (same as `edgebit models pull`).

    \b
    Examples:
      edgebit pull bitnet-b1.58-2b-4t
      edgebit pull 2b4t --json
    """
    _pull(spec, name, sha256, progress, retries, as_json)


@models.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", default=None,
              help="Name in the store: a registry name checks the file against its published size and SHA-256 "
                   "(default: the registry model with this file's SHA-256, else the file name).")
@click.option("--sha256", default=None, help="Expected SHA-256 of the file.")
@click.option("--copy", is_flag=True, help="Always copy (default: hard-link when FILE is on the same file system).")
@click.option("--json", "as_json", is_flag=True, help="Print the stored model as JSON.")
def import_(file: str, name: str | None, sha256: str | None, copy: bool, as_json: bool) -> None:
    """Put a GGUF file you already have into the store, checked like a download.

    For machines without network access: download the model elsewhere, copy it over, import it.
    A file that does not match the known size or SHA-256 is not stored.

    \b
    Examples:
      edgebit models import ./ggml-model-i2_s.gguf
      edgebit models import /media/usb/model.gguf --name bitnet-b1.58-2b-4t --copy
    """
    try:
        stored, how = store.import_file(file, name=name, sha256=sha256, copy=copy)
    except store.StoreError as exc:
        raise click.ClickException(str(exc)) from None
    _report(stored, as_json, f"{how} {file} -> {stored.path}\n{stored.name}  sha256 {stored.sha256} "
                             f"{_check(stored, 'no known digest')}")


@models.command("random")
@click.argument("output", type=click.Path(dir_okay=False), required=False)
@click.option("--shape", type=click.Choice(list(SHAPES)), default="tiny", show_default=True,
              help="Dimensions: tiny (2 layers, ~0.6 MB) to 2b4t (the 1.2 GB BitNet b1.58 2B4T shape).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("-f", "--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def random_(output: str | None, shape: str, seed: int, force: bool) -> None:
    """Write a model with random weights, for trying commands and benchmarks without a download.

    Its text is gibberish, but the file is a real BitNet GGUF (I2_S weights, byte-level tokenizer).
    Without OUTPUT it goes into the store as random-SHAPE-seedN, listed as generated by
    `edgebit models list` and removed by `edgebit models rm`.

    \b
    Examples:
      edgebit models random tiny.gguf
      edgebit generate tiny.gguf "Hello" -n 16
      edgebit models random --shape 2b4t
    """
    if output is None:
        if random_model_path(shape, seed=seed).exists():
            path = random_model_path(shape, seed=seed)
            click.echo(f"already in the store: {path} (remove it with `edgebit models rm {path.stem}`)")
            return
        path = random_model(shape, seed=seed)
    else:
        path = Path(output)
        if path.exists() and not force:
            raise click.ClickException(f"{output} exists; pass --force to overwrite it")
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        try:
            write_random_model(partial, shape, seed=seed)
            os.replace(partial, path)
        except OSError as exc:
            raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None
        finally:
            partial.unlink(missing_ok=True)
    click.echo(f"wrote a random {shape} model (seed {seed}): {path} ({_size(path.stat().st_size)})")


@models.command("rm")
@click.argument("name")
def rm(name: str) -> None:
    """Delete a model from the store (never files outside it), generated random models included.

    \b
    Example:
      edgebit models rm bitnet-b1.58-2b-4t
    """
    try:
        removed = store.remove(name)
    except store.StoreError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"removed {removed.path} ({_size(removed.size)})")


@models.command("path")
@click.argument("name", required=False)
def path(name: str | None) -> None:
    """Print the file of a stored model, or the store folder when NAME is omitted.

    \b
    Examples:
      edgebit models path bitnet-b1.58-2b-4t
      ls "$(edgebit models path)"
    """
    if name is None:
        click.echo(str(models_dir()))
        return
    stored = store.find(name)
    if stored is None:
        raise click.ClickException(f"no model {name!r} in the store; see `edgebit models list`")
    click.echo(stored.path)
