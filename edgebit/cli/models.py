"""`edgebit models list|pull|rm|path` and `edgebit pull`: the local model store."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict

import click

from .. import registry, store
from ..config import models_dir
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
    """Models on this machine: list, download, remove, locate.

    \b
    Models live in the store (see `edgebit models path`); set EDGEBIT_HOME to move it.
    Examples:
      edgebit models list
      edgebit models pull bitnet-b1.58-2b-4t
      edgebit models path bitnet-b1.58-2b-4t
      edgebit models rm bitnet-b1.58-2b-4t
    """


@models.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also list known models that are not downloaded.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_(show_all: bool, as_json: bool) -> None:
    """Show stored models: name, size, SHA-256 (verified or not) and path.

    \b
    Examples:
      edgebit models list
      edgebit models list --all --json
    """
    rows = [dict(asdict(m), stored=True) for m in store.list_models()]
    if show_all:
        have = {r["name"] for r in rows}
        rows += [{"name": m.name, "path": None, "size": m.size, "sha256": m.sha256, "verified": False,
                  "source": f"{registry.HF_ENDPOINT}/{m.repo}", "stored": False}
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
        else:
            state = ("verified " if r["verified"] else "unverified ") + (r["sha256"] or "?")[:12]
        click.echo(f"{r['name']:<{width}}  {_size(r['size']):>8}  {state:<23}  {r['path'] or r['source']}")


def _pull(spec: str, name: str | None, sha256: str | None, progress: bool | None, retries: int,
          as_json: bool) -> None:
    with ProgressBar("downloading", progress) as bar, ProgressBar("converting", progress) as steps:
        try:
            stored = store.pull(spec, name=name, sha256=sha256, progress=bar, convert_progress=steps,
                                retries=retries)
        except store.StoreError as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(asdict(stored), indent=2))
        return
    check = "verified" if stored.verified else "NOT verified (no published digest)"
    click.echo(f"{stored.name}  {stored.path}  sha256 {stored.sha256} {check}")


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

    \b
    A broken download resumes from where it stopped when the command is run again; a file whose
    SHA-256 does not match the published one is deleted. Known names: see `edgebit models list --all`.
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


@models.command("rm")
@click.argument("name")
def rm(name: str) -> None:
    """Delete a model from the store (never files outside it).

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
