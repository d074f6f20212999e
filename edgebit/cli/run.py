"""Commands that run a model: info, generate, perplexity."""

from __future__ import annotations

import json
import sys

import click

from ..backends.machine import detect
from . import main
from .options import model_option, one_model, open_model


def _shift(model: str | None, model_opt: str | None, arg: str | None, name: str) -> tuple[str | None, str]:
    """`[MODEL] ARG`: with one positional value it is ARG, and the model comes from -m or the config."""
    if arg is None:
        if model is None:
            raise click.UsageError(f"missing argument {name}")
        model, arg = None, model
    return one_model(model, model_opt), arg


backend_option = click.option("--backend", default=None, envvar="EDGEBIT_BACKEND",
                              help="Ternary kernel (see `edgebit backends`); default: chosen for this machine.")
threads_option = click.option("-t", "--threads", type=click.IntRange(min=1), default=None,
                              help="CPU threads (default: all cores).")
numerics_option = click.option("--numerics", type=click.Choice(["reference", "ggml"]), default="reference",
                               show_default=True, help="float32 reference math, or bitnet.cpp's f16 roundings.")
DEFAULT_CTX = 512  # llama-perplexity's default window
kv_option = click.option("--kv-dtype", type=click.Choice(["float32", "float16"]), default="float32",
                         show_default=True, help="KV-cache element type (float16 halves its memory).")


@main.command()
@click.argument("model", required=False)
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print the information as JSON.")
@backend_option
def info(model: str | None, model_opt: str | None, as_json: bool, backend: str | None) -> None:
    """Show a model's architecture, hyper-parameters and tensor types.

    \b
    Example:
      edgebit info ggml-model-i2_s.gguf --json
    """
    m = open_model(one_model(model, model_opt), backend, None)
    data = m.info
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    width = max(len(k) for k in data)
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif key == "threads" and value is None:  # the backend's default
            value = f"all cores ({detect().cpus})"
        click.echo(f"{key:<{width}}  {value}")


@main.command()
@click.argument("model", required=False)
@click.argument("prompt", required=False)
@model_option
@click.option("-n", "--max-tokens", type=click.IntRange(min=0), default=128, show_default=True)
@click.option("--temperature", "--temp", type=click.FloatRange(min=0), default=0.8, show_default=True,
              help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True)
@click.option("--min-p", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True)
@click.option("--repeat-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Random seed for reproducible sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--chat", is_flag=True, help="Send PROMPT as a user message in the model's chat format.")
@click.option("--system", default=None, help="System message (with --chat).")
@backend_option
@threads_option
@numerics_option
@kv_option
def generate(model: str | None, prompt: str | None, model_opt: str | None, max_tokens: int, temperature: float,
             top_k: int, top_p: float, min_p: float, repeat_penalty: float, seed: int | None, stop: tuple[str, ...],
             chat: bool, system: str | None, backend: str | None, threads: int | None, numerics: str,
             kv_dtype: str) -> None:
    """Continue PROMPT and stream the text to stdout.

    \b
    Examples:
      edgebit generate model.gguf "Once upon a time" -n 64 --temp 0
      edgebit generate model.gguf "Classify: boiler 95C" --chat --system "Answer in one word."
      edgebit generate "Once upon a time"    # the default model from config.toml / EDGEBIT_MODEL
    """
    model, prompt = _shift(model, model_opt, prompt, "PROMPT")
    m = open_model(model, backend, threads, numerics=numerics, kv_dtype=kv_dtype)
    if system and not chat:
        raise click.UsageError("--system needs --chat")
    messages = None
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        gen = m.generate(prompt=None if chat else prompt, messages=messages, max_tokens=max_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                         repeat_penalty=repeat_penalty, seed=seed, stop=list(stop), stream=True)
        for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    sys.stdout.write("\n")


@main.command()
@click.argument("model", required=False)
@click.argument("text_file", required=False)
@model_option
@click.option("-c", "--ctx", type=click.IntRange(min=4), default=None,
              help=f"Window size in tokens; the second half of each window is scored [default: {DEFAULT_CTX}, "
                   "or the model's context length if that is smaller].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@backend_option
@threads_option
@numerics_option
@kv_option
def perplexity(model: str | None, text_file: str | None, model_opt: str | None, ctx: int, as_json: bool,
               backend: str | None, threads: int | None, numerics: str, kv_dtype: str) -> None:
    """Perplexity of MODEL on TEXT_FILE, computed as llama-perplexity does.

    \b
    Example:
      edgebit perplexity ggml-model-i2_s.gguf wiki.test.raw --ctx 512
    """
    model, text_file = _shift(model, model_opt, text_file, "TEXT_FILE")
    m = open_model(model, backend, threads, numerics=numerics, kv_dtype=kv_dtype)
    n_ctx = m.config.n_ctx
    if ctx is None:
        ctx = min(DEFAULT_CTX, n_ctx)
    elif ctx > n_ctx:
        raise click.BadParameter(f"{ctx} is more than the context length of {m.path} ({n_ctx} tokens); "
                                 f"use --ctx {n_ctx} or less", param_hint="--ctx")
    try:
        with open(text_file, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {text_file}: {exc.strerror or exc}", param_hint="TEXT_FILE") from None
    try:
        ppl = m.perplexity(text, ctx=ctx)
    except ValueError as exc:
        raise click.ClickException(f"{exc} (--ctx {ctx}: use a longer text or a smaller --ctx)") from None
    if as_json:
        click.echo(json.dumps({"model": model, "file": text_file, "ctx": ctx, "perplexity": ppl}))
    else:
        click.echo(f"perplexity {ppl:.4f} ({text_file}, ctx {ctx})")
