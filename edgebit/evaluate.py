"""Accuracy and confusion matrices of a classifier on labelled texts, through `Model.classify_batch`.

The number reported after `edgebit train` and in benchmarks/ is measured here, on the exported
GGUF through the normal engine path, not on the training framework's model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Report:
    """Accuracy plus a confusion matrix: `confusion[true][predicted]` counts."""

    labels: list[str]
    confusion: dict[str, dict[str, int]]
    predicted: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(sum(row.values()) for row in self.confusion.values())

    @property
    def correct(self) -> int:
        return sum(self.confusion[label][label] for label in self.labels)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def table(self) -> str:
        """The confusion matrix as a Markdown table (rows: true label, columns: predicted)."""
        head = "| true \\ predicted | " + " | ".join(self.labels) + " |"
        rule = "|---|" + "---|" * len(self.labels)
        rows = [f"| {t} | " + " | ".join(str(self.confusion[t][p]) for p in self.labels) + " |" for t in self.labels]
        return "\n".join([head, rule, *rows])


def evaluate(model: Any, rows: Sequence[tuple[str, str]], labels: Sequence[str] | None = None,
             prompt: str | None = None, batch: int = 32,
             progress: Callable[[int, int], None] | None = None) -> Report:
    """Classify every (text, label) row with `model` (an `edgebit.engine.Model`) and count."""
    labels = list(labels or model.classify_labels)
    confusion = {t: dict.fromkeys(labels, 0) for t in labels}
    predicted: list[str] = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        for (_, truth), result in zip(chunk, model.classify_batch([t for t, _ in chunk], labels, prompt), strict=True):
            confusion[truth][result["label"]] += 1
            predicted.append(result["label"])
        if progress is not None:
            progress(min(start + batch, len(rows)), len(rows))
    return Report(labels, confusion, predicted)


def breakdown(rows: Sequence[tuple[str, str]], predicted: Sequence[str], groups: Sequence[str],
              labels: Sequence[str]) -> dict[str, Report]:
    """Per-group reports (e.g. per format or per deciding quantity) from one run's predictions."""
    out: dict[str, Report] = {}
    for (_, truth), guess, group in zip(rows, predicted, groups, strict=True):
        report = out.setdefault(group, Report(list(labels), {t: dict.fromkeys(labels, 0) for t in labels}))
        report.confusion[truth][guess] += 1
    return dict(sorted(out.items()))
