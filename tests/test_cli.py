"""The commands of issue 5 (chat, classify, models/pull, convert, doctor) through click's CliRunner,
plus a few runs of the real `edgebit` executable to check exit codes and pipes end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from test_store import PAYLOAD, FileServer

import edgebit
from edgebit.backends import get_backend
from edgebit.cli import main
from edgebit.convert import convert

EDGEBIT = str(Path(sys.executable).parent / "edgebit")


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEBIT_HOME", str(tmp_path / "home"))
    for name in ("EDGEBIT_MODEL", "EDGEBIT_BACKEND", "EDGEBIT_THREADS", "EDGEBIT_MQTT_HOST", "EDGEBIT_MQTT_PORT"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> edgebit.engine.Model:
    return edgebit.load(tiny_model)


def run(*args: str, input: str | None = None):  # noqa: A002 (click's name)
    return CliRunner().invoke(main, list(args), input=input)


def _commands() -> list[list[str]]:
    """The commands this issue added (other modules test their own help)."""
    out = []
    for name in ("chat", "classify", "convert", "doctor", "models", "pull"):
        out.append([name])
        out += [[name, sub] for sub in getattr(main.commands[name], "commands", {})]
    return out


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_has_help_with_examples(command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Example" in result.output


def _all_commands(group: click.Group = main, path: tuple[str, ...] = ()) -> list[list[str]]:
    out = [list(path)]
    for name, command in getattr(group, "commands", {}).items():
        out += _all_commands(command, (*path, name))
    return out


@pytest.mark.parametrize("command", _all_commands(), ids=lambda c: " ".join(c) or "edgebit")
def test_help_sets_examples_apart_from_the_text_before(command):
    lines = run(*command, "--help").output.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("Example"):
            assert lines[i - 1].strip() == "", f"'{line.strip()}' is glued to {lines[i - 1]!r}"


# --- models / pull


def test_models_pull_list_path_rm(server, home):
    server.files["/m/tiny.gguf"] = PAYLOAD
    assert json.loads(run("models", "list", "--json").output) == []
    pulled = run("pull", f"{server.url}/m/tiny.gguf", "--json")
    assert pulled.exit_code == 0, pulled.output
    info = json.loads(pulled.output)
    assert info["name"] == "tiny" and info["verified"] is False and Path(info["path"]).read_bytes() == PAYLOAD
    listed = json.loads(run("models", "list", "--json").output)
    assert [(m["name"], m["size"], m["sha256"]) for m in listed] == [("tiny", len(PAYLOAD), info["sha256"])]
    assert "unverified" in run("models", "list").output
    everything = json.loads(run("models", "list", "--all", "--json").output)
    assert {"tiny", "bitnet-b1.58-2b-4t"} <= {m["name"] for m in everything}
    assert run("models", "path", "tiny").output.strip() == info["path"]
    assert run("models", "path").output.strip() == str(home / "models")
    assert run("models", "rm", "tiny").exit_code == 0 and not Path(info["path"]).exists()
    assert run("models", "path", "tiny").exit_code == 1
    assert run("models", "rm", "tiny").exit_code == 1


def test_pull_exit_codes(server):
    assert run("pull", "no-such-model").exit_code == 1
    assert run("pull", f"{server.url}/missing.gguf").exit_code == 1
    assert run("pull").exit_code == 2
    assert run("models", "pull", "x", "--retries", "-1").exit_code == 2


def test_pull_from_an_unreachable_host_says_so_and_what_to_do_offline():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # released: nothing listens there
    result = run("pull", f"http://127.0.0.1:{port}/m.gguf")
    assert result.exit_code == 1
    assert f"cannot reach 127.0.0.1:{port}: Connection refused" in result.stderr
    assert "edgebit models import FILE" in result.stderr and "resum" not in result.stderr


def test_models_import_random_list_and_rm(home, tmp_path):
    made = run("models", "random", str(tmp_path / "tiny.gguf"), "--seed", "1")
    assert made.exit_code == 0 and str(tmp_path / "tiny.gguf") in made.output
    assert run("models", "random", str(tmp_path / "tiny.gguf")).exit_code == 1  # no overwrite without --force
    assert json.loads(run("models", "list", "--json").output) == []  # a file given by path stays outside
    imported = run("models", "import", str(tmp_path / "tiny.gguf"), "--copy")
    assert imported.exit_code == 0, imported.output
    assert imported.output.startswith(f"copied {tmp_path / 'tiny.gguf'} -> {home / 'models' / 'tiny.gguf'}")
    bad = run("models", "import", str(tmp_path / "tiny.gguf"), "--name", "other", "--sha256", "0" * 64)
    assert bad.exit_code == 1 and "does not match the given digest" in bad.stderr
    generated = run("models", "random", "--shape", "tiny")
    assert generated.exit_code == 0 and str(home / "models" / "random-tiny-seed0.gguf") in generated.output
    again = run("models", "random")
    assert again.exit_code == 0 and again.output.startswith("already in the store:")
    table = run("models", "list").output
    assert "random-tiny-seed0" in table and "generated (random)" in table
    assert "tiny " in table and "unverified" in table
    assert run("generate", "random-tiny-seed0", "Hi", "-n", "2").exit_code == 0
    assert run("models", "rm", "random-tiny-seed0").exit_code == 0
    assert [m["name"] for m in json.loads(run("models", "list", "--json").output)] == ["tiny"]


def test_pull_progress_bar_only_when_asked(server):
    server.files["/a.gguf"] = PAYLOAD
    server.files["/b.gguf"] = PAYLOAD
    quiet = run("pull", f"{server.url}/a.gguf")
    assert quiet.exit_code == 0 and "downloading" not in quiet.stderr
    shown = run("pull", f"{server.url}/b.gguf", "--progress")
    assert shown.exit_code == 0 and "downloading" in shown.stderr and "100%" in shown.stderr
    assert "b.gguf" in shown.stdout and "downloading" not in shown.stdout


# --- convert


def test_convert_cli_round_trip(tmp_path, home):
    from test_convert import _random_dir, write_byte_tokenizer

    src = _random_dir(tmp_path / "ckpt", 300)
    write_byte_tokenizer(src, 300)
    convert(src, tmp_path / "api.gguf")
    result = run("convert", str(src), str(tmp_path / "cli.gguf"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tensors"] == 13
    assert (tmp_path / "cli.gguf").read_bytes() == (tmp_path / "api.gguf").read_bytes()
    ids = [256, 1, 2, 3, 100, 299]
    ref = edgebit.load(tmp_path / "api.gguf").logits(ids)
    assert np.array_equal(edgebit.load(tmp_path / "cli.gguf").logits(ids), ref)
    assert run("convert", str(src), str(tmp_path / "cli.gguf")).exit_code == 1  # exists, no --force
    assert run("convert", str(src), str(tmp_path / "cli.gguf"), "--force").exit_code == 0
    stored = run("convert", str(src))  # no OUTPUT: into the store, usable by name
    assert stored.exit_code == 0 and (home / "models" / "ckpt-i2_s.gguf").is_file()
    assert json.loads(run("info", "ckpt-i2_s", "--json").output)["block_count"] == 1
    listed = json.loads(run("models", "list", "--json").output)
    assert listed[0]["source"] == str(src.resolve()) and len(listed[0]["sha256"]) == 64
    (src / "tokenizer.json").unlink()
    failed = run("convert", str(src), str(tmp_path / "x.gguf"))
    assert failed.exit_code == 1 and "tokenizer" in failed.output
    assert run("convert", str(src), "--type", "q4_0").exit_code == 2


# --- classify


def test_classify_texts_and_json_lines(tiny_model, model):
    labels = ["ok", "fault", "unknown"]
    texts = ["boiler at 95 C", "all fine"]
    expected = [model.classify(t, labels) for t in texts]
    plain = run("classify", "-m", str(tiny_model), "--labels", "ok,fault", "-l", "unknown", *texts)
    assert plain.exit_code == 0
    assert plain.output.splitlines() == [f"{e['label']}\t{t}" for e, t in zip(expected, texts, strict=True)]
    as_json = [json.loads(line) for line in run("classify", "-m", str(tiny_model), "--labels", "ok,fault,unknown",
                                                "--json", *texts).output.splitlines()]
    assert [r["label"] for r in as_json] == [e["label"] for e in expected]
    assert as_json[0]["scores"] == pytest.approx(expected[0]["scores"])
    lines = json.dumps({"text": texts[0], "id": "a"}) + "\n\n" + json.dumps({"id": 7, "text": texts[1]}) + "\n"
    result = run("classify", "-m", str(tiny_model), "--labels", "ok,fault,unknown", input=lines)
    assert result.exit_code == 0
    out = [json.loads(line) for line in result.output.splitlines()]
    assert [(o["id"], o["label"]) for o in out] == [("a", expected[0]["label"]), (7, expected[1]["label"])]
    bad = run("classify", "-m", str(tiny_model), "--labels", "ok,fault", input='{"id": 1}\nnope\n{"text": "x"}\n')
    assert bad.exit_code == 1
    out = [json.loads(line) for line in bad.output.splitlines()]
    assert "error" in out[0] and out[0]["id"] == 1 and "error" in out[1] and "label" in out[2]


@pytest.mark.parametrize("args", [["--labels", "ok"], ["-l", "a", "-l", "a"], ["--labels", "a,b", "--prompt", "x"]])
def test_classify_usage_errors(tiny_model, args):
    assert run("classify", "-m", str(tiny_model), *args, "text").exit_code == 2


# --- chat


def test_chat_with_piped_input(tiny_model, model):
    first = model.generate(messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=6)
    result = run("chat", str(tiny_model), "--temp", "0", "-n", "6", input="Hi\n/reset\n\nHi\n/exit\nignored\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{first}\n{first}\n"  # /reset forgets the first turn; /exit stops reading
    assert "(conversation reset)" in result.stderr
    second = model.generate(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
                                      {"role": "user", "content": "Again"}], temperature=0, max_tokens=6)
    assert run("chat", str(tiny_model), "--temp", "0", "-n", "6", input="Hi\nAgain\n").stdout == (
        f"{first}\n{second}\n")


def test_chat_needs_a_model():
    assert run("chat", input="Hi\n").exit_code == 2
    assert run("chat", "no-such-model", input="Hi\n").exit_code == 1


# --- doctor


def test_doctor_reports_machine_model_and_broker(tiny_model):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        result = run("doctor", str(tiny_model), "--broker", f"127.0.0.1:{port}", "--json")
    finally:
        listener.close()
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["model"]["backend"] == get_backend(None).name and report["model"]["arch"] == "bitnet-b1.58"
    assert report["broker"]["reachable"] is True and report["problems"] == []
    assert report["memory"]["total"] and report["cpu"]["cores"] >= 1 and report["packages"]["numpy"]
    closed = run("doctor", "--broker", f"127.0.0.1:{port}")
    assert closed.exit_code == 1 and "not reachable" in closed.output
    assert run("doctor", "--broker", "nonsense").exit_code == 2
    assert run("doctor", "missing.gguf").exit_code == 1


def test_doctor_lists_what_is_missing_with_the_next_command(tiny_model, home, monkeypatch):
    bare = run("doctor")
    assert bare.exit_code == 0 and "all checks passed" not in bare.output
    assert "missing: no model: the store is empty" in bare.output
    assert "next: edgebit pull bitnet-b1.58-2b-4t" in bare.output
    assert "missing: no MQTT broker configured" in bare.output and "2 thing(s) are missing" in bare.output
    assert run("models", "random").exit_code == 0
    report = json.loads(run("doctor", "--json").output)
    assert [m["what"][:17] for m in report["missing"]] == ["no default model:", "no MQTT broker co"]
    listener = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setenv("EDGEBIT_MQTT_HOST", "127.0.0.1")
    monkeypatch.setenv("EDGEBIT_MQTT_PORT", str(listener.getsockname()[1]))
    monkeypatch.setenv("EDGEBIT_MODEL", str(tiny_model))
    try:
        ready = run("doctor")
    finally:
        listener.close()
    assert ready.exit_code == 0 and "missing" not in ready.output and "all checks passed" in ready.output


def test_doctor_checks_the_configured_broker(monkeypatch):
    listener = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setenv("EDGEBIT_MQTT_HOST", "127.0.0.1")
    monkeypatch.setenv("EDGEBIT_MQTT_PORT", str(listener.getsockname()[1]))
    try:
        report = json.loads(run("doctor", "--json").output)
    finally:
        listener.close()
    assert report["broker"]["reachable"] is True


# --- the real executable


def _edgebit(*args: str, input: str | None = None) -> subprocess.CompletedProcess:  # noqa: A002
    return subprocess.run([EDGEBIT, *args], input=input, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))


def test_executable_exit_codes_and_pipes(tiny_model, model):
    assert _edgebit("--version").stdout.startswith("edgebit")
    listed = _edgebit("models", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    assert _edgebit("classify", "--labels", "a").returncode == 2
    assert _edgebit("info", "no-such-model").returncode == 1
    piped = _edgebit("classify", "-m", str(tiny_model), "--labels", "ok,fault",
                     input=json.dumps({"text": "hello", "id": 1}) + "\n")
    assert piped.returncode == 0
    assert json.loads(piped.stdout)["label"] == model.classify("hello", ["ok", "fault"])["label"]
