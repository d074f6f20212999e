"""The benchmark helpers and the `edgebit bench` / `edgebit backends` commands, on tiny models (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgebit
from edgebit import bench, load_tokenizer, store
from edgebit.backends.select import projection_shapes
from edgebit.cli import main
from edgebit.synthetic import write_random_model


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private EDGEBIT_HOME: the probe cache and random models go there, not to the user's cache."""
    monkeypatch.setenv("EDGEBIT_HOME", str(tmp_path))
    return tmp_path


def test_random_model_is_written_once(home: Path) -> None:
    path = bench.random_model("tiny")
    assert path.parent == home / "models" and path.stat().st_size > 0
    stamp = path.stat().st_mtime_ns
    assert bench.random_model("tiny") == path and path.stat().st_mtime_ns == stamp
    assert not list(path.parent.glob("*.partial"))
    with pytest.raises(ValueError, match="unknown shape"):
        bench.random_model("huge")


def test_random_model_from_the_old_cache_location_moves_into_the_store(home: Path) -> None:
    old = home / "cache" / "models" / "random-tiny-seed0.gguf"
    old.parent.mkdir(parents=True)
    write_random_model(old, "tiny", seed=0)
    content = old.read_bytes()
    path = bench.random_model("tiny")
    assert path == home / "models" / "random-tiny-seed0.gguf" and path.read_bytes() == content and not old.exists()
    [listed] = store.list_models()
    assert listed.name == "random-tiny-seed0" and listed.generated


def test_peak_rss_is_measured() -> None:
    assert bench.peak_rss() > 10 * 2**20  # at least numpy's own footprint


def test_run_bench_reports_both_tests(home: Path) -> None:
    results = bench.run_bench(bench.random_model("tiny"), "dense", threads=1, n_prompt=8, n_gen=3, repetitions=2)
    assert [r.test for r in results] == ["pp8", "tg3"]
    for r in results:
        assert r.backend == "dense" and r.threads == 1 and len(r.samples_ts) == 2 and r.avg_ts > 0
        assert r.load_s > 0 and r.peak_rss_bytes > 0 and r.n_params > 0
        assert r.to_json()["avg_ts"] == r.avg_ts
    assert [r.test for r in bench.run_bench(bench.random_model("tiny"), "dense", 1, 0, 2, 1)] == ["tg2"]
    table = bench.format_table(results)
    assert table.splitlines()[0].startswith("| model") and "pp8" in table and "tg3" in table


def test_run_isolated_uses_a_fresh_process(home: Path) -> None:
    results = bench.run_isolated(bench.random_model("tiny"), "packed", threads=1, n_prompt=4, n_gen=2,
                                 repetitions=1)
    assert [(r.backend, r.test) for r in results] == [("packed", "pp4"), ("packed", "tg2")]
    with pytest.raises(RuntimeError, match="unknown backend"):
        bench.run_isolated(bench.random_model("tiny"), "no-such-backend", 1, 4, 2, 1)


def test_bench_command(home: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["bench", "--shape", "tiny", "-b", "dense,lut", "-t", "1", "-p", "4", "-n", "2",
                               "-r", "1", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert [(r["backend"], r["test"]) for r in rows] == [("dense", "pp4"), ("dense", "tg2"), ("lut", "pp4"),
                                                         ("lut", "tg2")]
    table = runner.invoke(main, ["bench", str(bench.random_model("tiny")), "-b", "packed", "-p", "4", "-n", "0",
                                 "-r", "1"])
    assert table.exit_code == 0 and "| packed" in table.stdout
    assert runner.invoke(main, ["bench", "--shape", "tiny", "model.gguf"]).exit_code == 2
    assert f"using the random tiny model {home / 'models' / 'random-tiny-seed0.gguf'}" in out.stderr
    assert "edgebit models rm random-tiny-seed0" in out.stderr


def test_backends_command(home: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["backends", "--shape", "2b4t", "--json", "-t", "1"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    sizes = {b["name"]: b["weights_bytes"] for b in report["backends"]}
    n_weights = sum(m * k for m, k in projection_shapes(30, 2560, 640, 6912))
    assert sizes["packed"] == n_weights // 4 and sizes["dense"] == n_weights
    assert report["choice"]["backend"] in sizes and report["lm_head_bytes"] == 128256 * 2560 * 2
    text = runner.invoke(main, ["backends", str(bench.random_model("tiny"))])
    assert text.exit_code == 0 and "automatic choice:" in text.stdout and "packed" in text.stdout
    bare = runner.invoke(main, ["backends"])
    assert bare.exit_code == 0 and "needs 0.00" not in bare.stdout and "give MODEL or --shape" in bare.stdout


def test_random_model_with_a_real_vocabulary(tmp_path: Path, testdata: Path) -> None:
    """`tokenizer_from` puts a real vocabulary in a random model (realistic label and prompt lengths)."""
    vocab = testdata / "derived" / "llama3-vocab-from-tiktoken.gguf"
    path = write_random_model(tmp_path / "m.gguf", "tiny", n_vocab=128256, n_layer=1, tokenizer_from=vocab)
    tok = edgebit.load_tokenizer(path)
    assert tok.encode("Hello world") == load_tokenizer(vocab).encode("Hello world") == [9906, 1917]
    with pytest.raises(ValueError, match="128256 tokens, the shape needs 512"):
        write_random_model(tmp_path / "n.gguf", "tiny", tokenizer_from=vocab)

