"""`edgebit chat`: an interactive, streaming conversation in the model's chat format."""

from __future__ import annotations

import sys

import click

from ..engine import ContextLengthError, Model
from . import main
from .options import model_option, one_model, open_model
from .run import backend_option, threads_option

HELP = "commands: /reset (forget the conversation), /exit (quit), /help"


@main.command()
@click.argument("model", required=False)
@model_option
@click.option("--system", default=None, help="System message that starts the conversation.")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Longest reply in tokens.")
@click.option("--temperature", "--temp", type=click.FloatRange(min=0), default=0.8, show_default=True,
              help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True)
@click.option("--seed", type=int, default=None, help="Random seed for reproducible replies.")
@backend_option
@threads_option
def chat(model: str | None, model_opt: str | None, system: str | None, max_tokens: int, temperature: float,
         top_k: int, top_p: float, seed: int | None, backend: str | None, threads: int | None) -> None:
    """Chat with a model; replies stream as they are generated.

    Each line you type is a user turn.

    Type /reset to start over and /exit (or Ctrl-D) to quit; Ctrl-C stops a reply. With piped
    input every line is one user turn and only the replies are printed, one per line group.
    When the conversation outgrows the context, the oldest turns are dropped (with a note on stderr).

    \b
    Examples:
      edgebit chat bitnet-b1.58-2b-4t --system "You are a terse assistant."
      printf 'Hi\\nWhat is 2+2?\\n' | edgebit chat model.gguf --temp 0
    """
    m = open_model(one_model(model, model_opt), backend, threads)
    interactive = sys.stdin.isatty()
    base = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, str]] = []
    if interactive:
        click.echo(f"{m.info['name']} — {HELP}", err=True)
    while True:
        try:
            line = click.prompt(">>>", prompt_suffix=" ", default="", show_default=False, err=True) \
                if interactive else sys.stdin.readline()
        except (EOFError, click.Abort):
            break
        if not interactive and line == "":
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            click.echo("(conversation reset)", err=True)
            continue
        if text == "/help":
            click.echo(HELP, err=True)
            continue
        history.append({"role": "user", "content": text})
        reply = _reply(m, base, history, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed)
        history.append({"role": "assistant", "content": reply})


def _reply(m: Model, base: list[dict[str, str]], history: list[dict[str, str]], **sampling: object) -> str:
    """Stream one reply to stdout; forget the oldest turns while the conversation does not fit."""
    while True:
        try:
            gen = m.generate(messages=base + history, stream=True, **sampling)  # type: ignore[arg-type]
            break
        except ContextLengthError:
            if len(history) <= 1:
                raise click.ClickException("the message alone does not fit in the model's context") from None
            del history[:2]
            click.echo("(context full: forgot the oldest turn)", err=True)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    text = ""
    try:
        for piece in gen:
            text += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        click.echo("\n(stopped)", err=True)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return text
