"""Running the HTTP face: API keys, the uvicorn server, and the scheduler that owns the model."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import uvicorn

from .app import DEFAULT_MAX_BODY, create_app
from .scheduler import Scheduler

KEYS_ENV = "EDGEBIT_API_KEYS"  # comma-separated keys; or a file with one key per line (--api-key-file)
DEFAULT_LISTEN = "127.0.0.1:8080"


def parse_listen(value: str) -> tuple[str, int]:
    """'HOST:PORT' (or ':PORT', or '[v6]:PORT') → (host, port); ValueError names the value."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--http {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or "127.0.0.1", int(port)


def load_api_keys(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> list[str]:
    """Keys from a file (one per line, # comments) and from EDGEBIT_API_KEYS; [] means no authentication."""
    environ = os.environ if environ is None else environ
    keys = [k.strip() for k in environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if path is not None:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the API key file: {exc.strerror or exc}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return keys


class HTTPServer(uvicorn.Server):
    """uvicorn without its own signal handling: the `serve` command stops both faces on one signal."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def stop(self) -> None:
        self.should_exit = True


def make_server(scheduler: Scheduler, model_name: str, host: str, port: int, api_keys: list[str],
                max_body: int = DEFAULT_MAX_BODY) -> HTTPServer:
    app = create_app(scheduler, model_name, api_keys, max_body)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                            access_log=False)
    return HTTPServer(config)
