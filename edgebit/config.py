"""Where edgebit keeps its files, and the user's defaults from `config.toml`.

Directories come from platformdirs (`~/.local/share/edgebit`, `~/.cache/edgebit`,
`~/.config/edgebit` on Linux); setting `EDGEBIT_HOME` moves all of them under one folder:
`$EDGEBIT_HOME/models`, `$EDGEBIT_HOME/cache`, `$EDGEBIT_HOME/config.toml`.

`config.toml` holds defaults for the commands:

    model = "bitnet-b1.58-2b-4t"     # name, stored file or path (see `edgebit models`)
    backend = "reference"
    threads = 4
    [broker]
    host = "mqtt.local"
    port = 1883
    [http]
    listen = "127.0.0.1:8080"        # `edgebit serve --http` without an address uses this
    api_key_file = "/etc/edgebit/keys"

Each setting is resolved as command-line flag > environment variable > config file > built-in
default. The environment variables are `EDGEBIT_MODEL`, `EDGEBIT_BACKEND`, `EDGEBIT_THREADS`,
`EDGEBIT_MQTT_HOST`, `EDGEBIT_MQTT_PORT`, `EDGEBIT_HTTP` and `EDGEBIT_API_KEY_FILE` (the names
`edgebit serve` uses too).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

APP = "edgebit"
HOME_ENV = "EDGEBIT_HOME"


class ConfigError(ValueError):
    """config.toml or an environment variable holds an unusable value; the message names which."""


@dataclass(frozen=True)
class Setting:
    """One overridable default: its dotted key in config.toml, environment variable, type and default."""

    key: str
    env: str
    kind: type
    default: Any


SETTINGS = {
    s.key: s
    for s in (
        Setting("model", "EDGEBIT_MODEL", str, None),
        Setting("backend", "EDGEBIT_BACKEND", str, None),
        Setting("threads", "EDGEBIT_THREADS", int, None),
        Setting("broker.host", "EDGEBIT_MQTT_HOST", str, "localhost"),
        Setting("broker.port", "EDGEBIT_MQTT_PORT", int, 1883),
        Setting("http.listen", "EDGEBIT_HTTP", str, "127.0.0.1:8080"),
        Setting("http.api_key_file", "EDGEBIT_API_KEY_FILE", str, None),
    )
}


def _home() -> Path | None:
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else None


def models_dir() -> Path:
    """Where pulled and converted models live."""
    home = _home()
    return home / "models" if home else Path(platformdirs.user_data_dir(APP)) / "models"


def cache_dir() -> Path:
    """Downloads that are not models themselves (checkpoints waiting for conversion)."""
    home = _home()
    return home / "cache" if home else Path(platformdirs.user_cache_dir(APP))


def config_path() -> Path:
    """The config file: `$EDGEBIT_HOME/config.toml`, else `config.toml` in the platform config dir."""
    home = _home()
    return home / "config.toml" if home else Path(platformdirs.user_config_dir(APP)) / "config.toml"


def load_file(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The settings in config.toml as {dotted key: value}, checked; {} if there is no file."""
    path = Path(path) if path is not None else config_path()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    for key, value in flat.items():
        if key not in SETTINGS:
            raise ConfigError(f"{path}: unknown setting {key!r}; known: {', '.join(SETTINGS)}")
        kind = SETTINGS[key].kind
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{path}: {key} must be {'an integer' if kind is int else 'a string'}, "
                              f"got {value!r}")
    return flat


def resolve(key: str, flag: Any = None, environ: Mapping[str, str] | None = None,
            file: Mapping[str, Any] | None = None) -> Any:
    """A setting by precedence: `flag` (None = not given) > environment > config file > default."""
    setting = SETTINGS[key]
    if flag is not None:
        return flag
    environ = os.environ if environ is None else environ
    raw = environ.get(setting.env)
    if raw:
        if setting.kind is int:
            try:
                return int(raw)
            except ValueError:
                raise ConfigError(f"environment: {setting.env}={raw!r} is not an integer") from None
        return raw
    file = load_file() if file is None else file
    if key in file:
        return file[key]
    return setting.default
