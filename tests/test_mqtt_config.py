"""The serve configuration: TOML schema, validation messages, and flag > env > file > default."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from edgebit.cli import main
from edgebit.mqtt import config as cfgmod
from edgebit.mqtt.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parent.parent / "firmware_scripts" / "edgebit.toml"

MINIMAL = {"tasks": {"mood": {"kind": "classify", "labels": ["calm", "alert"]}}}


def parse(doc: dict, flags: dict | None = None, env: dict | None = None):
    return parse_config(doc, "node.toml", flags or {}, env or {})


def with_task(**fields) -> dict:
    return {"tasks": {"t1": fields}}


def test_minimal_config_gets_the_documented_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfgmod.socket, "gethostname", lambda: "pi5-a.local")
    cfg = parse(MINIMAL)
    assert cfg.broker.host == "localhost" and cfg.broker.port == 1883 and cfg.broker.protocol == "5"
    assert cfg.node.id == "pi5-a" and cfg.broker.client_id == "edgebit-pi5-a"
    assert cfg.node.prefix == "edgebit" and cfg.node.group == "edgebit" and cfg.node.shared
    assert cfg.node.health_interval == 60 and not cfg.node.homeassistant
    assert cfg.broker.tls is None and cfg.broker.session_expiry > 0
    task = cfg.tasks["mood"]
    assert task.kind == "classify" and task.labels == ("calm", "alert") and task.prompt is None


def test_host_name_is_reduced_to_a_topic_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfgmod.socket, "gethostname", lambda: "my pi+#5")
    assert cfgmod.default_node_id() == "mypi5"
    monkeypatch.setattr(cfgmod.socket, "gethostname", lambda: "###")
    assert cfgmod.default_node_id() == "edgebit"


def test_shipped_example_config_is_valid(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE, environ={})
    assert set(cfg.tasks) == {"boiler", "summary"}
    assert cfg.tasks["boiler"].inputs == ("sensors/+/boiler",)
    assert cfg.tasks["summary"].generation == {"max_tokens": 48, "temperature": 0.2, "stop": ["\n\n"]}


def test_generate_task_defaults_and_limits() -> None:
    limits = {"max_tokens": 64}
    cfg = parse({"limits": limits, **with_task(kind="generate", max_tokens=64, seed=3, stop="END")})
    assert cfg.tasks["t1"].generation == {"max_tokens": 64, "seed": 3, "stop": ["END"]}
    with pytest.raises(ConfigError, match=r"tasks\.t1\.max_tokens: must be between 0 and 64"):
        parse({"limits": limits, **with_task(kind="generate", max_tokens=65)})


@pytest.mark.parametrize(("doc", "message"), [
    ({}, r"node\.toml: tasks: define at least one task"),
    (with_task(labels=["a", "b"]), r"tasks\.t1\.kind: required"),
    (with_task(kind="summarise"), r"tasks\.t1\.kind: must be \"classify\" or \"generate\""),
    (with_task(kind="classify"), r"tasks\.t1\.labels: required"),
    (with_task(kind="classify", labels=["only"]), r"tasks\.t1\.labels: needs 2 to 32 labels"),
    (with_task(kind="classify", labels=["a", "a"]), r"tasks\.t1\.labels: labels must be distinct"),
    (with_task(kind="classify", labels=["a", 3]), r"tasks\.t1\.labels: each label must be a non-empty"),
    (with_task(kind="classify", labels="a,b"), r"tasks\.t1\.labels: expected an array, got a string"),
    (with_task(kind="classify", labels=["a", "b"], prompt="no slot"), r"tasks\.t1\.prompt: must contain"),
    (with_task(kind="classify", labels=["a", "b"], temperature=0.5),
     r"tasks\.t1\.temperature: generation settings apply to generate tasks only"),
    (with_task(kind="generate", labels=["a", "b"]), r"tasks\.t1\.labels: labels apply to classify tasks"),
    (with_task(kind="generate", temperature="hot"), r"tasks\.t1\.temperature: must be a number"),
    (with_task(kind="generate", top_p=0.0), r"tasks\.t1\.top_p: must be between"),
    (with_task(kind="generate", lables=["x"]), r"tasks\.t1\.lables: unknown setting"),
    ({"tasks": {"bad/name": {"kind": "generate"}}}, r"tasks\.bad/name: a task name must be"),
    ({"tasks": {"t1": "classify"}}, r"tasks\.t1: must be a table"),
    (with_task(kind="generate", inputs=["sensors/#/x"]), r"tasks\.t1\.inputs: 'sensors/#/x' is not a valid"),
    (with_task(kind="generate", inputs=["edgebit/#"]), r"tasks\.t1\.inputs: 'edgebit/#' overlaps this node"),
    (with_task(kind="generate", inputs=["$SYS/#"]), r"tasks\.t1\.inputs: '\$SYS/#': \$-topics"),
    ({"broker": {"port": "1883"}, **MINIMAL}, r"broker\.port: expected an integer, got a string"),
    ({"broker": {"port": 70000}, **MINIMAL}, r"broker\.port: must be between 1 and 65535"),
    ({"broker": {"protocol": 4}, **MINIMAL}, r"broker\.protocol: must be 5 or \"3\.1\.1\""),
    ({"broker": {"hots": "x"}, **MINIMAL}, r"broker\.hots: unknown setting"),
    ({"broker": {"password": "x"}, **MINIMAL}, r"broker\.password: a password needs broker\.username"),
    ({"broker": {"username": "u", "password": "x", "password_file": "/nonexistent"}, **MINIMAL},
     r"broker\.password: give password or password_file, not both"),
    ({"broker": {"tls": {"cert": "/etc/hostname"}}, **MINIMAL}, r"broker\.tls: give both cert and key"),
    ({"broker": {"tls": {"ca": "/nonexistent/ca.pem"}}, **MINIMAL}, r"broker\.tls\.ca: cannot read file"),
    ({"node": {"id": "a/b"}, **MINIMAL}, r"node\.id: must be 1-64 characters"),
    ({"node": {"prefix": "$SYS"}, **MINIMAL}, r"node\.prefix: must be one or more"),
    ({"node": {"queue_size": 0}, **MINIMAL}, r"node\.queue_size: must be between 1"),
    ({"node": {"shared": "yes"}, **MINIMAL}, r"node\.shared: expected true or false"),
    ({"limits": {"payload_bytes": True}, **MINIMAL}, r"limits\.payload_bytes: expected an integer, got true"),
    ({"extra": {}, **MINIMAL}, r"extra: unknown setting"),
])
def test_errors_name_the_table_and_field(doc: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(doc)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker\nhost = 1")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(bad, environ={})
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read"):
        load_config(tmp_path / "missing.toml", environ={})


def test_precedence_flag_over_env_over_file_over_default() -> None:
    doc = {"broker": {"host": "file-host", "port": 1884}, **MINIMAL}
    assert parse(MINIMAL).broker.host == "localhost"
    assert parse(doc).broker.host == "file-host"
    env = {"EDGEBIT_MQTT_HOST": "env-host", "EDGEBIT_MQTT_PORT": "1885", "EDGEBIT_NODE_ID": "envnode"}
    cfg = parse(doc, env=env)
    assert (cfg.broker.host, cfg.broker.port, cfg.node.id) == ("env-host", 1885, "envnode")
    cfg = parse(doc, flags={"broker.host": "flag-host", "broker.port": None, "node.id": "flagnode"}, env=env)
    assert (cfg.broker.host, cfg.broker.port, cfg.node.id) == ("flag-host", 1885, "flagnode")
    assert cfg.broker.client_id == "edgebit-flagnode"


def test_user_defaults_fill_in_below_the_file() -> None:
    defaults = {"broker.host": "user-host", "broker.port": 1999}
    cfg = parse_config(MINIMAL, "node.toml", {}, {}, defaults)
    assert (cfg.broker.host, cfg.broker.port) == ("user-host", 1999)
    cfg = parse_config({"broker": {"host": "file-host"}, **MINIMAL}, "node.toml", {}, {}, defaults)
    assert (cfg.broker.host, cfg.broker.port) == ("file-host", 1999)
    cfg = parse_config(MINIMAL, "node.toml", {}, {"EDGEBIT_MQTT_HOST": "env-host"}, defaults)
    assert cfg.broker.host == "env-host"


def test_environment_values_are_checked() -> None:
    with pytest.raises(ConfigError, match="environment EDGEBIT_MQTT_PORT: expected an integer"):
        parse(MINIMAL, env={"EDGEBIT_MQTT_PORT": "mqtt"})
    with pytest.raises(ConfigError, match="environment EDGEBIT_MQTT_INSECURE: expected true or false"):
        parse(MINIMAL, env={"EDGEBIT_MQTT_INSECURE": "maybe"})


def test_passwords_from_file_environment_and_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    doc = {"broker": {"username": "edge", "password": "in-file"}, **MINIMAL}
    assert parse(doc).broker.password == "in-file"
    assert parse(doc, env={"EDGEBIT_MQTT_PASSWORD": "from-env"}).broker.password == "from-env"
    assert parse(doc, env={"EDGEBIT_MQTT_PASSWORD_FILE": str(secret)}).broker.password == "s3cret"
    env = {"EDGEBIT_MQTT_PASSWORD": "from-env"}
    flagged = parse(doc, flags={"broker.password_file": str(secret)}, env=env)
    assert flagged.broker.password == "s3cret"
    assert "s3cret" not in repr(flagged.broker)
    with pytest.raises(ConfigError, match="not both"):
        parse(doc, env={"EDGEBIT_MQTT_PASSWORD": "a", "EDGEBIT_MQTT_PASSWORD_FILE": str(secret)})


def test_tls_settings(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = parse({"broker": {"tls": {}}, **MINIMAL})
    assert cfg.broker.tls is not None and cfg.broker.port == 8883 and cfg.broker.tls.ca is None
    cfg = parse(MINIMAL, flags={"broker.tls.ca": str(ca)}, env={"EDGEBIT_MQTT_INSECURE": "true"})
    assert cfg.broker.tls is not None and cfg.broker.tls.ca == str(ca) and cfg.broker.tls.insecure
    assert parse(MINIMAL, env={"EDGEBIT_MQTT_INSECURE": "false"}).broker.tls is None


def test_mqtt_311_and_password_permissions_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[broker]\nprotocol = "3.1.1"\nusername = "u"\npassword = "p"\n'
                    '[tasks.t]\nkind = "generate"\n')
    path.chmod(0o644)
    cfg = load_config(path, environ={})
    assert cfg.broker.protocol == "3.1.1"
    assert "readable by every user" in caplog.text


def test_serve_check_validates_and_summarises(tiny_model: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"EDGEBIT_HOME": str(tmp_path), "EDGEBIT_MQTT_HOST": "mqtt.example"}
    result = runner.invoke(main, ["serve", str(tiny_model), "--config", str(EXAMPLE), "--node-id", "pi5-a",
                                  "--port", "1884", "--check"], env=env)
    assert result.exit_code == 0, result.output
    assert "mqtt://mqtt.example:1884 (MQTT 5, client id edgebit-pi5-a" in result.output
    assert "task    boiler: labels normal, warning, critical; inputs sensors/+/boiler" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text('[tasks.t]\nkind = "classify"\nlabels = ["one"]\n')
    result = runner.invoke(main, ["serve", str(tiny_model), "--config", str(bad), "--check"], env=env)
    assert result.exit_code == 2 and "tasks.t.labels: needs 2 to 32 labels" in result.output
