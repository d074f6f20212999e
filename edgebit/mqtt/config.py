"""The `edgebit serve` configuration: a TOML file of broker settings, node settings, limits and tasks.

Every value is validated once at start-up; an error names the file, the table and the field
(`node.toml: tasks.boiler.labels: ...`), so a typo never surfaces later as a strange answer.
Connection settings may also come from flags or `EDGEBIT_*` environment variables, with the
precedence flag > environment > file > the user's config.toml > built-in default (`resolve`).

    [broker]
    host = "mqtt.local"
    [tasks.boiler]
    kind = "classify"
    prompt = "Boiler report: {text}\\nState:"
    labels = ["normal", "warning", "critical"]
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paho.mqtt.client import topic_matches_sub

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a node id, task name or group: one topic level
MAX_LABELS = 32
MAX_LABEL_CHARS = 64
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64


class ConfigError(ValueError):
    """The configuration is invalid; the message names the source and the field."""


class FieldError(ValueError):
    """One field of a table or a request is unusable (`check_generation`)."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


@dataclass(frozen=True)
class TLSConfig:
    """TLS towards the broker; `ca` None means the system's trust store."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure: bool = False  # skip host-name verification (self-signed test brokers only)


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how the node connects."""

    host: str = "localhost"
    port: int = 1883
    protocol: str = "5"  # "5" (MQTT 5) or "3.1.1"
    client_id: str = ""  # empty: "edgebit-{node id}", stable so the persistent session survives restarts
    keepalive: int = 60
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TLSConfig | None = None
    session_expiry: int = 3600  # seconds the broker keeps the session (and its share of requests) while away
    reconnect_max: int = 30  # upper bound of the exponential reconnect back-off, seconds


@dataclass(frozen=True)
class NodeConfig:
    """This node's identity in the topic tree and its serving behaviour."""

    id: str
    prefix: str = "edgebit"
    shared: bool = True  # join the pool with a shared subscription (MQTT 5 only)
    group: str = "edgebit"
    queue_size: int = 64
    max_batch: int = 8  # texts classified together when requests queue up
    dedupe_size: int = 1024  # responses remembered for duplicate request ids
    health_interval: float = 60.0
    homeassistant: bool = False
    homeassistant_prefix: str = "homeassistant"


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for."""

    payload_bytes: int = 65536
    batch_items: int = 32
    text_chars: int = 4096
    max_tokens: int = 512


@dataclass(frozen=True)
class TaskSpec:
    """One named task: what kind of work, with which prompt, labels, defaults and input topics."""

    name: str
    kind: str  # "classify" | "generate"
    prompt: str | None = None  # template with "{text}" once; None: the engine's default / the bare text
    labels: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    generation: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServeConfig:
    """Everything `edgebit serve` needs besides the model."""

    broker: BrokerConfig
    node: NodeConfig
    limits: Limits
    tasks: Mapping[str, TaskSpec]


# Settings that flags and environment variables may override: dotted key → (environment variable, type).
OVERRIDABLE: dict[str, tuple[str, type]] = {
    "broker.host": ("EDGEBIT_MQTT_HOST", str),
    "broker.port": ("EDGEBIT_MQTT_PORT", int),
    "broker.username": ("EDGEBIT_MQTT_USERNAME", str),
    "broker.password": ("EDGEBIT_MQTT_PASSWORD", str),
    "broker.password_file": ("EDGEBIT_MQTT_PASSWORD_FILE", str),
    "broker.client_id": ("EDGEBIT_MQTT_CLIENT_ID", str),
    "broker.tls.ca": ("EDGEBIT_MQTT_CA", str),
    "broker.tls.cert": ("EDGEBIT_MQTT_CERT", str),
    "broker.tls.key": ("EDGEBIT_MQTT_KEY", str),
    "broker.tls.insecure": ("EDGEBIT_MQTT_INSECURE", bool),
    "node.id": ("EDGEBIT_NODE_ID", str),
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

# Generation settings a generate task may preset and a request may override (see check_generation).
GENERATION_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "stop")


def default_node_id() -> str:
    """The host name reduced to a valid topic level (`pi5-a.local` → `pi5-a`)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "", socket.gethostname().split(".")[0])[:64]
    return name or "edgebit"


def load_config(path: str | os.PathLike[str], flags: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None, defaults: Mapping[str, Any] | None = None) -> ServeConfig:
    """Read and validate a TOML file; `flags` (dotted keys of OVERRIDABLE, None = not given) and
    `environ` (default: os.environ) override its connection settings; `defaults` (same keys, e.g.
    the user's config.toml) fill in what the file leaves out."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    broker = data.get("broker")
    if isinstance(broker, dict) and "password" in broker and os.stat(source).st_mode & stat.S_IROTH:
        log.warning(
            "%s holds broker.password and is readable by every user; prefer password_file or "
            "EDGEBIT_MQTT_PASSWORD, or chmod o-r it", source)
    return parse_config(data, source, flags or {}, os.environ if environ is None else environ, defaults)


def parse_config(data: Mapping[str, Any], source: str = "<config>", flags: Mapping[str, Any] | None = None,
                 environ: Mapping[str, str] | None = None, defaults: Mapping[str, Any] | None = None) -> ServeConfig:
    """Validate a parsed TOML document (see `load_config`)."""
    r = _Reader(source)
    r.known(data, "", {"broker", "node", "limits", "tasks"})
    merged = resolve(data, flags or {}, environ or {}, source, defaults or {})
    limits = _limits(r, _table(r, data, "limits"))
    node = _node(r, _table(r, merged, "node"))
    broker = _broker(r, _table(r, merged, "broker"), node.id)
    tasks_table = _table(r, data, "tasks")
    if not tasks_table:
        raise ConfigError(f"{source}: tasks: define at least one task, e.g. [tasks.boiler]")
    tasks = {name: _task(r, name, spec, limits, node) for name, spec in tasks_table.items()}
    return ServeConfig(broker=broker, node=node, limits=limits, tasks=tasks)


def resolve(data: Mapping[str, Any], flags: Mapping[str, Any], environ: Mapping[str, str],
            source: str = "<config>", defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The document with OVERRIDABLE settings replaced by flags, else environment values, and filled
    in from `defaults` where the document leaves them out."""
    if environ.get("EDGEBIT_MQTT_PASSWORD") and environ.get("EDGEBIT_MQTT_PASSWORD_FILE"):
        raise ConfigError("environment: set EDGEBIT_MQTT_PASSWORD or EDGEBIT_MQTT_PASSWORD_FILE, not both")
    merged = _deep_copy_tables(data)
    for key, (env, kind) in OVERRIDABLE.items():
        value = flags.get(key)
        if value is None and environ.get(env):
            value = _from_env(env, environ[env], kind)
        *tables, leaf = key.split(".")
        if value is None:
            value = (defaults or {}).get(key)
            if value is None or leaf in _lookup(merged, tables):
                continue
        node = merged
        for t in tables:
            if value is False and t not in node:  # "insecure = false" alone must not switch TLS on
                break
            node = node.setdefault(t, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {t} must be a table")
        else:
            if leaf in ("password", "password_file"):  # a higher-precedence source replaces both forms
                node.pop("password", None)
                node.pop("password_file", None)
            node[leaf] = value
    return merged


def _lookup(data: Mapping[str, Any], tables: list[str]) -> Mapping[str, Any]:
    """The nested table at `tables` ({} when absent or not a table)."""
    for t in tables:
        data = data.get(t, {})
        if not isinstance(data, Mapping):
            return {}
    return data


def _deep_copy_tables(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy_tables(v) if isinstance(v, dict) else v for k, v in data.items()}


def _from_env(env: str, raw: str, kind: type) -> Any:
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"environment {env}: expected an integer, got {raw!r}") from None
    if kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigError(f"environment {env}: expected true or false, got {raw!r}")
    return raw


class _Reader:
    """Typed access to TOML tables whose errors name the source and the dotted field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {message}")

    def known(self, table: Mapping[str, Any], where: str, allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                place = f"{where}.{key}" if where else key
                raise self.fail(place, f"unknown setting (expected one of: {', '.join(sorted(allowed))})")

    def get(self, table: Mapping[str, Any], where: str, key: str, kind: type | tuple[type, ...], default: Any,
            check: Callable[[Any], str | None] | None = None) -> Any:
        if key not in table:
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            got = _TYPE_NAMES.get(type(value), type(value).__name__)
            raise self.fail(f"{where}.{key}", f"expected {names}, got {got}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(f"{where}.{key}", "must be a finite number")
        problem = check(value) if check else None
        if problem:
            raise self.fail(f"{where}.{key}", problem)
        return value


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "an array",
               dict: "a table"}


def _table(r: _Reader, data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise r.fail(key, "must be a table")
    return value


def _range(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}, got {v}"


def _topic_level(v: str) -> str | None:
    return None if NAME_RE.match(v) else "must be 1-64 characters from A-Z, a-z, 0-9, '_' and '-'"


def _topic_prefix(v: str) -> str | None:
    levels = v.split("/")
    if not v or v.startswith("$") or any(not NAME_RE.match(level) for level in levels):
        return "must be one or more '/'-separated levels of A-Z, a-z, 0-9, '_' and '-'"
    return None


def _limits(r: _Reader, t: dict[str, Any]) -> Limits:
    r.known(t, "limits", {"payload_bytes", "batch_items", "text_chars", "max_tokens"})
    return Limits(
        payload_bytes=r.get(t, "limits", "payload_bytes", int, Limits.payload_bytes, _range(64, 16 << 20)),
        batch_items=r.get(t, "limits", "batch_items", int, Limits.batch_items, _range(1, 1024)),
        text_chars=r.get(t, "limits", "text_chars", int, Limits.text_chars, _range(1, 1 << 20)),
        max_tokens=r.get(t, "limits", "max_tokens", int, Limits.max_tokens, _range(1, 1 << 16)),
    )


def _node(r: _Reader, t: dict[str, Any]) -> NodeConfig:
    w = "node"
    r.known(t, w, {"id", "prefix", "shared", "group", "queue_size", "max_batch", "dedupe_size",
                   "health_interval", "homeassistant", "homeassistant_prefix"})
    return NodeConfig(
        id=r.get(t, w, "id", str, None, _topic_level) or default_node_id(),
        prefix=r.get(t, w, "prefix", str, NodeConfig.prefix, _topic_prefix),
        shared=r.get(t, w, "shared", bool, NodeConfig.shared),
        group=r.get(t, w, "group", str, NodeConfig.group, _topic_level),
        queue_size=r.get(t, w, "queue_size", int, NodeConfig.queue_size, _range(1, 100000)),
        max_batch=r.get(t, w, "max_batch", int, NodeConfig.max_batch, _range(1, 256)),
        dedupe_size=r.get(t, w, "dedupe_size", int, NodeConfig.dedupe_size, _range(0, 1000000)),
        health_interval=float(r.get(t, w, "health_interval", (int, float), NodeConfig.health_interval,
                                    _range(0.1, 86400))),
        homeassistant=r.get(t, w, "homeassistant", bool, NodeConfig.homeassistant),
        homeassistant_prefix=r.get(t, w, "homeassistant_prefix", str, NodeConfig.homeassistant_prefix,
                                   _topic_prefix),
    )


def _broker(r: _Reader, t: dict[str, Any], node_id: str) -> BrokerConfig:
    w = "broker"
    r.known(t, w, {"host", "port", "protocol", "client_id", "keepalive", "username", "password",
                   "password_file", "tls", "session_expiry", "reconnect_max"})
    tls = None
    if "tls" in t:
        tt = t["tls"]
        if not isinstance(tt, dict):
            raise r.fail("broker.tls", "must be a table ([broker.tls])")
        r.known(tt, "broker.tls", {"ca", "cert", "key", "insecure"})
        tls = TLSConfig(ca=r.get(tt, "broker.tls", "ca", str, None, _readable_file),
                        cert=r.get(tt, "broker.tls", "cert", str, None, _readable_file),
                        key=r.get(tt, "broker.tls", "key", str, None, _readable_file),
                        insecure=r.get(tt, "broker.tls", "insecure", bool, False))
        if (tls.cert is None) != (tls.key is None):
            raise r.fail("broker.tls", "give both cert and key for a client certificate, or neither")
    if "password" in t and "password_file" in t:
        raise r.fail("broker.password", "give password or password_file, not both")
    password = r.get(t, w, "password", str, None)
    if "password_file" in t:
        path = r.get(t, w, "password_file", str, None, _readable_file)
        password = Path(path).read_text(encoding="utf-8").strip("\r\n")
    username = r.get(t, w, "username", str, None)
    if password is not None and username is None:
        raise r.fail("broker.password", "a password needs broker.username")
    client_id = r.get(t, w, "client_id", str, "",
                      lambda v: None if len(v) <= 128 else "at most 128 characters")
    return BrokerConfig(
        host=r.get(t, w, "host", str, BrokerConfig.host, lambda v: None if v else "must not be empty"),
        port=r.get(t, w, "port", int, 8883 if tls else BrokerConfig.port, _range(1, 65535)),
        protocol=str(r.get(t, w, "protocol", (int, str), BrokerConfig.protocol,
                           lambda v: None if str(v) in ("5", "3.1.1") else 'must be 5 or "3.1.1"')),
        client_id=client_id or f"edgebit-{node_id}",
        keepalive=r.get(t, w, "keepalive", int, BrokerConfig.keepalive, _range(5, 65535)),
        username=username,
        password=password,
        tls=tls,
        session_expiry=r.get(t, w, "session_expiry", int, BrokerConfig.session_expiry, _range(0, 0xFFFFFFFF)),
        reconnect_max=r.get(t, w, "reconnect_max", int, BrokerConfig.reconnect_max, _range(1, 3600)),
    )


def _readable_file(v: str) -> str | None:
    return None if os.access(v, os.R_OK) and os.path.isfile(v) else f"cannot read file {v!r}"


def _task(r: _Reader, name: str, t: Any, limits: Limits, node: NodeConfig) -> TaskSpec:
    w = f"tasks.{name}"
    if not NAME_RE.match(name):
        raise r.fail(w, "a task name must be 1-64 characters from A-Z, a-z, 0-9, '_' and '-'")
    if not isinstance(t, dict):
        raise r.fail(w, "must be a table ([tasks.NAME])")
    r.known(t, w, {"kind", "prompt", "labels", "inputs", *GENERATION_FIELDS})
    if "kind" not in t:
        raise r.fail(f"{w}.kind", "required: \"classify\" or \"generate\"")
    kind = r.get(t, w, "kind", str, None,
                 lambda v: None if v in ("classify", "generate") else "must be \"classify\" or \"generate\"")
    prompt = r.get(t, w, "prompt", str, None,
                   lambda v: None if v.count("{text}") == 1 else "must contain {text} exactly once")
    inputs = tuple(r.get(t, w, "inputs", list, [], _input_filters(node)))
    if kind == "classify":
        extra = [k for k in GENERATION_FIELDS if k in t]
        if extra:
            raise r.fail(f"{w}.{extra[0]}", "generation settings apply to generate tasks only")
        if "labels" not in t:
            raise r.fail(f"{w}.labels", "required for a classify task: an array of at least two labels")
        labels = tuple(r.get(t, w, "labels", list, [], check_labels))
        return TaskSpec(name=name, kind=kind, prompt=prompt, labels=labels, inputs=inputs)
    if "labels" in t:
        raise r.fail(f"{w}.labels", "labels apply to classify tasks only")
    try:
        generation = check_generation(t, limits)
    except FieldError as exc:
        raise r.fail(f"{w}.{exc.name}", exc.problem) from None
    return TaskSpec(name=name, kind=kind, prompt=prompt, inputs=inputs, generation=generation)


def utf8_ok(text: str) -> bool:
    """Whether a str can be encoded (JSON may carry lone surrogates such as "\\ud800"; text must not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_labels(labels: list[Any]) -> str | None:
    """Why a label list is unusable, or None: 2..32 distinct non-empty strings of at most 64 characters."""
    if not 2 <= len(labels) <= MAX_LABELS:
        return f"needs 2 to {MAX_LABELS} labels, got {len(labels)}"
    for label in labels:
        if not (isinstance(label, str) and label.strip() and len(label) <= MAX_LABEL_CHARS
                and utf8_ok(label)):
            return f"each label must be a non-empty string of at most {MAX_LABEL_CHARS} characters"
    if len(set(labels)) != len(labels):
        return "labels must be distinct"
    return None


def _input_filters(node: NodeConfig) -> Callable[[list[Any]], str | None]:
    own = [f"{node.prefix}/v1/result/x", f"{node.prefix}/v1/req/x", f"{node.prefix}/v1/res/x",
           f"{node.prefix}/v1/node/{node.id}/req/x"]

    def check(filters: list[Any]) -> str | None:
        for f in filters:
            if not isinstance(f, str) or not valid_filter(f):
                return f"{f!r} is not a valid MQTT topic filter"
            if f.startswith("$"):
                return f"{f!r}: $-topics cannot be inputs"
            if any(topic_matches_sub(f, t) for t in own):
                return f"{f!r} overlaps this node's own topics under {node.prefix}/v1 (a feedback loop)"
        return None

    return check


def valid_filter(f: str) -> bool:
    """An MQTT topic filter: '+' and '#' only as whole levels, '#' only last, no NUL, 1..1024 bytes."""
    if not f or "\0" in f or len(f.encode("utf-8", "surrogatepass")) > 1024:
        return False
    levels = f.split("/")
    for i, level in enumerate(levels):
        if ("+" in level or "#" in level) and level not in ("+", "#"):
            return False
        if level == "#" and i != len(levels) - 1:
            return False
    return True


def check_generation(t: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """Validated generation settings from a task table or a request; raises FieldError."""
    out: dict[str, Any] = {}
    for key in GENERATION_FIELDS:
        if key not in t:
            continue
        value = t[key]
        if key == "stop":
            stops = [value] if isinstance(value, str) else value
            if not (isinstance(stops, list) and len(stops) <= MAX_STOP_STRINGS
                    and all(_stop_string(s) for s in stops)):
                raise FieldError(key, f"must be a string or up to {MAX_STOP_STRINGS} non-empty strings of at "
                                      f"most {MAX_STOP_CHARS} characters")
            out[key] = list(stops)
            continue
        integer = key in ("max_tokens", "top_k", "seed")
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise FieldError(key, "must be an integer" if integer else "must be a number")
        if not integer and not math.isfinite(value):
            raise FieldError(key, "must be a finite number")
        lo, hi = (0, limits.max_tokens) if key == "max_tokens" else _GENERATION_RANGES[key]
        if not lo <= value <= hi:
            raise FieldError(key, f"must be between {lo} and {hi}, got {value}")
        out[key] = value if integer else float(value)
    return out


def _stop_string(s: Any) -> bool:
    return isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS and utf8_ok(s)


_GENERATION_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 10.0),
    "top_k": (0, 1 << 20),
    "top_p": (1e-6, 1.0),
    "min_p": (0.0, 0.999),
    "repeat_penalty": (1e-3, 10.0),
    "seed": (0, (1 << 63) - 1),
}
