"""`edgebit train` and `edgebit distill`: make a micro BitNet classifier from labelled messages.

Thin adapters over `edgebit.train` (the recipe; needs torch: `pip install 'edgebit[train]'`). The
held-out accuracy printed at the end is measured on the written GGUF through `Model.classify`.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import click

from . import main
from .options import ProgressBar, open_model, progress_option

DEFAULT_TEMPLATE = "{text}\nlabel:"


def _require_torch() -> Any:
    try:
        from .. import train
    except ImportError as exc:  # torch is an optional extra; inference never needs it
        raise click.ClickException(f"training needs torch ({exc}); install it with: pip install 'edgebit[train]'") \
            from None
    return train


def _read_rows(path: str, text_only: bool = False) -> list[tuple[str, str]]:
    """(text, label) per JSON line {"text": ..., "label": ...}; with `text_only` the label may be absent
    and any other line (plain text, or a raw JSON payload without "text") is itself a message."""
    rows = []
    with click.open_file(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                item = None
                if not text_only:
                    raise click.ClickException(f"{path}:{number}: not JSON") from None
            if text_only and not (isinstance(item, dict) and isinstance(item.get("text"), str)):
                rows.append((line.rstrip("\n"), ""))
                continue
            if not isinstance(item, dict) or not isinstance(item.get("text"), str) or \
                    (not text_only and not isinstance(item.get("label"), str)):
                want = '{"text": ...}' if text_only else '{"text": ..., "label": ...}'
                raise click.ClickException(f"{path}:{number}: expected an object {want}")
            rows.append((item["text"], item.get("label", "")))
    if not rows:
        raise click.ClickException(f"{path}: no messages")
    return rows


def _labels(given: str | None, rows: Sequence[tuple[str, str]]) -> list[str]:
    found = list(dict.fromkeys(label for _, label in rows))
    if given is None:
        labels = found
    else:
        labels = [s.strip() for s in given.split(",") if s.strip()]
        unknown = sorted(set(found) - set(labels))
        if unknown:
            raise click.ClickException(f"labels in the data but not in --labels: {', '.join(unknown)}")
    if len(labels) < 2:
        raise click.UsageError("a classifier needs at least two labels")
    return labels


def _split(rows: list[tuple[str, str]], fraction: float, seed: int) -> tuple[list, list]:
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    n = int(round(len(shuffled) * fraction))
    return shuffled[n:], shuffled[:n]


def _fit(rows: list, held_out: list, labels: list[str], template: str, output: str, steps: int | None,
         seed: int, progress: bool | None, name: str) -> None:
    """Train, export, then report held-out accuracy measured with edgebit on the written file."""
    train = _require_torch()
    config = train.TrainConfig(seed=seed, **({"steps": steps} if steps else {}))
    bar = ProgressBar("training", progress)

    def step(done: int, total: int, loss: float) -> None:
        bar(done, total)

    started = time.monotonic()
    with bar:
        model, meta, report = train.train(config, rows, held_out, labels, template, progress=step,
                                          log=lambda line: click.echo(line, err=True))
    train.export(model, meta, output, labels, template, name=name)
    click.echo(f"wrote {output} in {time.monotonic() - started:.0f} s ({config.steps} steps)", err=True)
    if held_out:
        _report(output, held_out, labels)


def _report(path: str, held_out: list, labels: list[str]) -> None:
    from ..evaluate import evaluate

    m = open_model(path, threads=None)
    with ProgressBar("evaluating", None) as bar:
        result = evaluate(m, held_out, labels, progress=bar)
    click.echo(f"held-out accuracy: {result.accuracy:.4f} ({result.correct}/{result.total})")
    click.echo(result.table())


@main.command("train")
@click.argument("data", required=False, metavar="[DATA.jsonl]")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="GGUF file to write.")
@click.option("--labels", default=None, help="Comma-separated labels (default: those found in DATA).")
@click.option("--template", default=None,
              help="Prompt template with {text}, stored in the model [default: '{text}\\nlabel:'].")
@click.option("--held-out", type=click.FloatRange(0.0, 0.5), default=0.1, show_default=True,
              help="Fraction of DATA kept out of training for the accuracy report.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimiser steps [default: 6000].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sensors", is_flag=True,
              help="Train on the built-in sensor generator instead of DATA: rebuilds the bundled edgebit-sensors.")
@progress_option
def train_cmd(data: str | None, output: str, labels: str | None, template: str | None, held_out: float,
              steps: int | None, seed: int, sensors: bool, progress: bool | None) -> None:
    """Train a micro BitNet b1.58 classifier on labelled messages and write it as a GGUF file.

    DATA has one JSON object per line: {"text": "...", "label": "..."}. The model (about 2 MB, I2_S)
    is then used like any other: `edgebit classify -m OUT.gguf TEXT` or `Model.classify(text)`;
    its prompt template and labels are stored in the file. Needs `pip install 'edgebit[train]'`.

    \b
    Examples:
      edgebit train readings.jsonl --labels ok,fault -o my.gguf
      edgebit train --sensors -o edgebit-sensors.gguf     # the bundled model, fixed seed
    """
    if sensors == (data is not None):
        raise click.UsageError("give DATA.jsonl or --sensors (not both)")
    if sensors:
        from ..sensors_data import LABELS, TEMPLATE

        train = _require_torch()
        rows, test = train.sensors_data(60000, 2000, seed)
        _fit(rows, test, list(LABELS), TEMPLATE, output, steps, seed, progress, "edgebit-sensors")
        return
    rows = _read_rows(data)
    names = _labels(labels, rows)
    if template is not None and template.count("{text}") != 1:
        raise click.UsageError("--template must contain {text} exactly once")
    fit, test = _split(rows, held_out, seed)
    _fit(fit, test, names, template or DEFAULT_TEMPLATE, output, steps, seed, progress,
         "edgebit-micro")


@main.command()
@click.argument("data", metavar="MESSAGES")
@click.option("--teacher", required=True, metavar="NAME|PATH", help="The model that labels the messages (e.g. 2b4t).")
@click.option("--labels", required=True, help="Comma-separated labels.")
@click.option("--prompt", default=None, help="The teacher's prompt template with {text} [default: its own].")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="GGUF file to write.")
@click.option("--save-labels", type=click.Path(dir_okay=False), default=None,
              help="Also write the teacher's labels as JSON lines (to inspect or reuse with `edgebit train`).")
@click.option("--template", default=None, help="The student's prompt template [default: '{text}\\nlabel:'].")
@click.option("--held-out", type=click.FloatRange(0.0, 0.5), default=0.1, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimiser steps [default: 6000].")
@click.option("--seed", type=int, default=0, show_default=True)
@progress_option
def distill(data: str, teacher: str, labels: str, prompt: str | None, output: str, save_labels: str | None,
            template: str | None, held_out: float, steps: int | None, seed: int, progress: bool | None) -> None:
    """Label unlabelled messages with a bigger model, then train a micro model on its answers.

    MESSAGES: JSON lines {"text": ...} or plain text, one message per line. The held-out accuracy
    is agreement with the teacher.

    \b
    Example:
      edgebit distill events.txt --teacher 2b4t --labels normal,warning,critical -o site.gguf
    """
    names = [s.strip() for s in labels.split(",") if s.strip()]
    if len(names) < 2:
        raise click.UsageError("a classifier needs at least two labels")
    _require_torch()
    texts = [t for t, _ in _read_rows(data, text_only=True)]
    m = open_model(teacher)
    rows = []
    with ProgressBar("teacher labelling", progress) as bar:
        for start in range(0, len(texts), 8):
            chunk = texts[start : start + 8]
            rows += [(t, r["label"]) for t, r in zip(chunk, m.classify_batch(chunk, names, prompt), strict=True)]
            bar(len(rows), len(texts))
    del m
    if save_labels:
        with open(save_labels, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows)
    counts = {n: sum(1 for _, lab in rows if lab == n) for n in names}
    click.echo(f"teacher labels: {json.dumps(counts)}", err=True)
    fit, test = _split(rows, held_out, seed)
    _fit(fit, test, names, template or DEFAULT_TEMPLATE, output, steps, seed, progress, "edgebit-distilled")
    sys.stdout.flush()
