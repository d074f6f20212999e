"""Options shared by the commands: which model to use, and progress bars on stderr.

A model argument is a path, a registry name or a file in the model store (`edgebit.store`); when
none is given the configured default is used (flag > `EDGEBIT_MODEL` > config.toml, see
`edgebit.config`). Progress bars go to stderr, only when it is a terminal unless `--progress`.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import click

from .. import config
from ..store import StoreError, resolve

model_option = click.option(
    "-m", "--model", "model_opt", default=None, metavar="NAME|PATH",
    help="Model file, registry name or stored model [env EDGEBIT_MODEL; default: `model` in config.toml].")
progress_option = click.option(
    "--progress/--no-progress", default=None,
    help="Show progress bars on stderr (default: only when stderr is a terminal).")


def resolve_model(model: str | None) -> str:
    """The GGUF path for a model argument, or for the configured default when it is None."""
    try:
        chosen = config.resolve("model", model)
        if chosen is None:
            raise click.UsageError("no model given: pass MODEL (or -m NAME|PATH), or set a default with "
                                   "EDGEBIT_MODEL or `model = \"...\"` in " + str(config.config_path()))
        return resolve(chosen)
    except (StoreError, config.ConfigError) as exc:
        raise click.ClickException(str(exc)) from None


def open_model(model: str | None, backend: str | None = None, threads: int | None = None, **kwargs: Any) -> Any:
    """Resolve the model argument and the backend/threads defaults, then load the model."""
    from .. import load

    path = resolve_model(model)
    try:
        with ProgressBar("compiling kernels", None) as kernels_bar, ProgressBar("loading", None) as bar:
            return load(path, backend=config.resolve("backend", backend), threads=config.resolve("threads", threads),
                        progress=bar, compile_progress=kernels_bar, **kwargs)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def one_model(positional: str | None, option: str | None) -> str | None:
    """MODEL given as a positional argument or with -m, not both."""
    if positional is not None and option is not None:
        raise click.UsageError("give the model either as MODEL or with -m/--model, not both")
    return positional if positional is not None else option


class _TTY:
    """stderr as seen by click.progressbar when `--progress` forces a bar onto a non-terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()


class ProgressBar:
    """A click.progressbar on stderr that opens when the first total is known, and a new one
    whenever the count starts over (the next file of a multi-file download)."""

    def __init__(self, label: str, enabled: bool | None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = None
        self._last = 0

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled or not total:
            return
        if self._bar is not None and (done < self._last or total != self._bar.length):
            self.close()
        if self._bar is None:
            stream = sys.stderr if sys.stderr.isatty() else _TTY(sys.stderr)
            self._bar = click.progressbar(length=total, label=self.label, file=stream)  # type: ignore[arg-type]
            self._bar.__enter__()
            self._last = 0
        self._bar.update(done - self._last)
        self._last = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
