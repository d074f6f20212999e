"""`edgebit classify`: pick one of a set of labels for each text, by the model's label probabilities."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import main
from .options import model_option, open_model
from .run import backend_option, threads_option


def _labels(label: tuple[str, ...], labels: str | None) -> list[str] | None:
    """The labels given, or None for the model's own (a classifier trained by `edgebit train`)."""
    out = list(label) + [s.strip() for s in (labels or "").split(",") if s.strip()]
    if not out:
        return None
    if len(out) < 2:
        raise click.UsageError("give at least two labels with --label (repeatable) or --labels a,b,c")
    if len(set(out)) != len(out):
        raise click.UsageError(f"duplicate labels in {out}")
    return out


def _jsonl_items(stream: Any) -> Any:
    """(id, text, error) per input line: {"text": ..., "id": ...} objects; blank lines are skipped."""
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            yield None, None, f"line {number}: not JSON ({exc})"
            continue
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            yield (item.get("id") if isinstance(item, dict) else None), None, \
                f"line {number}: expected an object with a string \"text\""
            continue
        yield item.get("id"), item["text"], None


@main.command()
@click.argument("texts", nargs=-1, metavar="[TEXT]...")
@model_option
@click.option("-l", "--label", multiple=True, help="A label (repeatable).")
@click.option("--labels", default=None,
              help="Comma-separated labels, e.g. normal,warning,critical [default: the model's own, if it has them].")
@click.option("--prompt", default=None,
              help="Template with {text} (and optionally {labels}); default: the model's classification prompt.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines out for TEXT arguments too.")
@backend_option
@threads_option
def classify(texts: tuple[str, ...], model_opt: str | None, label: tuple[str, ...], labels: str | None,
             prompt: str | None, as_json: bool, backend: str | None, threads: int | None) -> None:
    """Label texts with the most probable of a set of labels.

    Each TEXT (or each JSON line on stdin) gets the label the model finds most probable.

    Without TEXT arguments, reads JSON lines {"text": ..., "id": ...} from stdin and writes one JSON
    line {"id", "label", "scores"} per input, in order; a bad line gets {"id", "error"} and the exit
    code is 1 at the end. The model comes from -m or the configured default.

    \b
    Examples:
      edgebit classify -m 2b4t --labels positive,negative "I love it" "Broken on arrival"
      edgebit classify -m 2b4t -l normal -l warning -l critical --json "Boiler at 95 C"
      cat events.jsonl | edgebit classify -m 2b4t --labels ok,fault > labelled.jsonl
      edgebit classify -m edgebit-sensors "boiler 97C, pressure 2.1 bar"   # its own labels and prompt
    """
    names = _labels(label, labels)
    if prompt is not None and "{text}" not in prompt:
        raise click.UsageError("--prompt must contain {text}")
    m = open_model(model_opt, backend, threads)
    if names is None and not m.classify_labels:
        raise click.UsageError("give at least two labels with --label (repeatable) or --labels a,b,c "
                               "(this model stores none)")
    if texts:
        for text in texts:
            result = _classify(m, text, names, prompt)
            if as_json:
                click.echo(json.dumps({"text": text, **result}))
            else:
                click.echo(f"{result['label']}\t{text}")
        return
    failed = False
    for item_id, text, error in _jsonl_items(sys.stdin):
        if error is None:
            try:
                out = {"id": item_id, **_classify(m, text, names, prompt)}
            except click.ClickException as exc:
                error = exc.message
        if error is not None:
            failed = True
            out = {"id": item_id, "error": error}
        click.echo(json.dumps(out))
        sys.stdout.flush()
    if failed:
        sys.exit(1)


def _classify(m: Any, text: str, labels: list[str] | None, prompt: str | None) -> dict[str, Any]:
    try:
        result = m.classify(text, labels, prompt=prompt)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    return {"label": result["label"], "scores": {k: float(v) for k, v in result["scores"].items()}}
