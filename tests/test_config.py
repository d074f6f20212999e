"""edgebit.config: directories, config.toml, and the precedence flag > environment > file > default."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from edgebit import config
from edgebit.cli import main


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEBIT_HOME", str(tmp_path / "home"))
    for s in config.SETTINGS.values():
        monkeypatch.delenv(s.env, raising=False)
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def write(home: Path, text: str) -> None:
    (home / "config.toml").write_text(text)


def test_platform_dirs_without_edgebit_home(monkeypatch):
    monkeypatch.delenv("EDGEBIT_HOME")
    for path in (config.models_dir().parent, config.cache_dir(), config.config_path().parent):
        assert "edgebit" in path.parts[-1].lower() or "edgebit" in str(path).lower()
    assert config.models_dir().name == "models" and config.config_path().name == "config.toml"


def test_precedence_flag_env_file_default(home):
    assert config.resolve("model") is None and config.resolve("broker.port") == 1883
    write(home, 'model = "from-file"\nthreads = 2\n[broker]\nhost = "mqtt.local"\nport = 8883\n')
    assert config.resolve("model") == "from-file" and config.resolve("threads") == 2
    assert (config.resolve("broker.host"), config.resolve("broker.port")) == ("mqtt.local", 8883)
    env = {"EDGEBIT_MODEL": "from-env", "EDGEBIT_THREADS": "3", "EDGEBIT_MQTT_PORT": "1884"}
    assert config.resolve("model", environ=env) == "from-env"
    assert config.resolve("threads", environ=env) == 3 and config.resolve("broker.port", environ=env) == 1884
    assert config.resolve("model", "from-flag", environ=env) == "from-flag"
    assert config.resolve("threads", 1, environ=env) == 1
    assert config.resolve("backend", environ={"EDGEBIT_BACKEND": ""}) is None  # empty = not set


@pytest.mark.parametrize("text, message", [
    ("model = ", "not valid TOML"),
    ("modle = 'x'", "unknown setting 'modle'"),
    ("threads = 'four'", "threads must be an integer"),
    ("threads = true", "threads must be an integer"),
    ("[broker]\nport = '1883'", "broker.port must be an integer"),
    ("model = 3", "model must be a string"),
])
def test_bad_files_are_named(home, text, message):
    write(home, text)
    with pytest.raises(config.ConfigError, match=message):
        config.resolve("model")


def test_bad_environment_value():
    with pytest.raises(config.ConfigError, match="EDGEBIT_THREADS='x'"):
        config.resolve("threads", environ={"EDGEBIT_THREADS": "x"})


def test_cli_uses_the_configured_model(home, tiny_model, tmp_path, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(main, ["info", "--json"])
    assert result.exit_code == 2 and "no model given" in result.output
    write(home, f'model = "{tiny_model}"\n')
    assert f'"path": "{tiny_model}"' in runner.invoke(main, ["info", "--json"]).output
    other = tmp_path / "other.gguf"
    other.write_bytes(tiny_model.read_bytes())
    monkeypatch.setenv("EDGEBIT_MODEL", str(other))
    assert f'"path": "{other}"' in runner.invoke(main, ["info", "--json"]).output  # env beats file
    assert f'"path": "{tiny_model}"' in runner.invoke(main, ["info", "-m", str(tiny_model), "--json"]).output
    greedy = ["-n", "3", "--temp", "0"]
    implicit = runner.invoke(main, ["generate", "Hello", *greedy])
    explicit = runner.invoke(main, ["generate", str(other), "Hello", *greedy])
    assert implicit.exit_code == explicit.exit_code == 0 and implicit.output == explicit.output
    both = runner.invoke(main, ["generate", str(other), "Hello", "-m", str(other)])
    assert both.exit_code == 2 and "not both" in both.output
    write(home, "threads = 'x'\n")
    monkeypatch.delenv("EDGEBIT_MODEL")
    bad = runner.invoke(main, ["info"])
    assert bad.exit_code == 1 and "threads must be an integer" in bad.output
