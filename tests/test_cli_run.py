"""`edgebit info`, `generate` and `perplexity`: the CLI prints what the Python API computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgebit
from edgebit.cli import main
from edgebit.engine import Model

BACKEND = "dense"  # the API and the CLI run the same kernel, not each its own probe's choice


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Model:
    return edgebit.load(tiny_model, backend=BACKEND)


@pytest.fixture()
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("EDGEBIT_HOME", str(tmp_path / "home"))
    return CliRunner()


def test_info(runner: CliRunner, tiny_model: Path, model: Model) -> None:
    result = runner.invoke(main, ["info", str(tiny_model), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["arch"] == "bitnet-b1.58" and info["parameters"] == model.info["parameters"]
    table = runner.invoke(main, ["info", str(tiny_model)])
    assert table.exit_code == 0 and "bitnet-b1.58" in table.output and "I2_S 14" in table.output
    threads = next(line for line in table.output.splitlines() if line.startswith("threads"))
    assert "None" not in threads and "all cores" in threads


def test_generate_greedy_matches_api(runner: CliRunner, tiny_model: Path, model: Model) -> None:
    expected = model.generate(prompt="the sensor says", max_tokens=12, temperature=0)
    result = runner.invoke(main, ["generate", str(tiny_model), "the sensor says", "-n", "12", "--temp", "0"])
    assert result.exit_code == 0, result.output
    assert result.output == expected + "\n"


def test_generate_chat_and_sampling_options(runner: CliRunner, tiny_model: Path, model: Model) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    expected = model.generate(messages=messages, max_tokens=8, temperature=0.7, seed=3, top_k=5)
    result = runner.invoke(main, ["generate", str(tiny_model), "hi", "--chat", "--system", "be brief", "-n", "8",
                                  "--temp", "0.7", "--seed", "3", "--top-k", "5"])
    assert result.exit_code == 0, result.output
    assert result.output == expected + "\n"


def test_generate_errors(runner: CliRunner, tiny_model: Path) -> None:
    too_long = runner.invoke(main, ["generate", str(tiny_model), "word " * 400])
    assert too_long.exit_code == 1 and "context length" in too_long.output
    assert runner.invoke(main, ["generate", str(tiny_model), "x", "--top-p", "0"]).exit_code == 2
    assert runner.invoke(main, ["generate", str(tiny_model), "x", "--system", "s"]).exit_code == 2


def test_perplexity_matches_api(runner: CliRunner, tiny_model: Path, model: Model, tmp_path: Path) -> None:
    text = "the quick brown fox jumps over the lazy dog\n" * 10
    path = tmp_path / "t.txt"
    path.write_text(text)
    result = runner.invoke(main, ["perplexity", str(tiny_model), str(path), "--ctx", "64", "--json",
                                  "--backend", BACKEND])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["perplexity"] == model.perplexity(text, ctx=64)


def test_perplexity_ctx_defaults_to_the_model_context_and_errors_name_ctx(runner: CliRunner, tiny_model: Path,
                                                                         model: Model, tmp_path: Path) -> None:
    assert model.config.n_ctx == 256  # below the default window of 512
    text = "the quick brown fox jumps over the lazy dog\n" * 40
    path = tmp_path / "t.txt"
    path.write_text(text)
    result = runner.invoke(main, ["perplexity", str(tiny_model), str(path), "--json", "--backend", BACKEND])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ctx"] == 256 and report["perplexity"] == model.perplexity(text, ctx=256)
    too_long = runner.invoke(main, ["perplexity", str(tiny_model), str(path), "--ctx", "4096"])
    assert too_long.exit_code == 2 and "--ctx" in too_long.output and "use --ctx 256 or less" in too_long.output
    path.write_text("short text")
    short = runner.invoke(main, ["perplexity", str(tiny_model), str(path)])
    assert short.exit_code == 1 and "--ctx 256" in short.output and "smaller --ctx" in short.output
