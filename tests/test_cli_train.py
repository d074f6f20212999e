"""`edgebit train` and `edgebit distill` (edgebit/cli/train.py) on small data; few steps, so the
numbers are not the point: the files, labels, reports and errors are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

import edgebit
from edgebit.cli import main
from edgebit.sensors_data import generate


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_train_writes_a_classifier_and_reports_held_out_accuracy(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": e.text, "label": "alarm" if e.label == "critical" else "ok"}) + "\n"
                            for e in generate(120, "train", seed=5)))
    out = tmp_path / "mine.gguf"
    result = run("train", str(data), "--labels", "ok,alarm", "-o", str(out), "--steps", "3", "--template",
                 "Reading: {text}\nVerdict:")
    assert result.exit_code == 0, result.output
    assert "held-out accuracy:" in result.output and "| true \\ predicted | ok | alarm |" in result.output
    m = edgebit.load(out)
    assert m.classify_labels == ["ok", "alarm"] and m.classify_template == "Reading: {text}\nVerdict:"
    assert set(m.classify("smoke detected")["scores"]) == {"ok", "alarm"}


def test_train_rejects_labels_missing_from_the_list(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    result = run("train", str(data), "--labels", "x,z", "-o", str(tmp_path / "o.gguf"))
    assert result.exit_code == 1 and "labels in the data but not in --labels: y" in result.output
    assert run("train", "-o", str(tmp_path / "o.gguf")).exit_code == 2  # neither DATA nor --sensors


def test_distill_labels_with_the_teacher_then_trains(tmp_path: Path, micro_classifier: Path) -> None:
    messages = tmp_path / "messages.txt"
    texts = [e.text.replace("\n", " ") for e in generate(40, "train", seed=9)]
    messages.write_text("\n".join(texts) + "\n")
    saved, out = tmp_path / "teacher.jsonl", tmp_path / "student.gguf"
    result = run("distill", str(messages), "--teacher", str(micro_classifier), "--labels", "normal,warning,critical",
                 "-o", str(out), "--save-labels", str(saved), "--steps", "3")
    assert result.exit_code == 0, result.output
    teacher = edgebit.load(micro_classifier)
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [r["text"] for r in rows] == texts
    assert [r["label"] for r in rows] == [r["label"] for r in teacher.classify_batch(texts)]
    assert edgebit.load(out).classify_labels == ["normal", "warning", "critical"]
