"""`edgebit bench` (a llama-bench-style speed table) and `edgebit backends` (the kernels and what each needs)."""

from __future__ import annotations

import json

import click

from .. import bench as benchmark
from ..backends import available_backends
from ..backends.lm_head import MODES, LMHead
from ..backends.machine import detect
from ..backends.select import choose_backend, embedding_shape, footprint, model_shapes, projection_shapes
from ..gguf import GGUFFile
from ..synthetic import SHAPES
from . import main
from .options import model_option, one_model, resolve_model
from .run import threads_option

shape_option = click.option("--shape", type=click.Choice(sorted(SHAPES)), default=None,
                            help="A random model of this shape instead of MODEL (2b4t = BitNet b1.58 2B4T).")


def _model_path(model: str | None, model_opt: str | None, shape: str | None) -> str | None:
    chosen = one_model(model, model_opt)
    if chosen is not None and shape is not None:
        raise click.UsageError("give MODEL or --shape, not both")
    return resolve_model(chosen) if shape is None else None


@main.command()
@click.argument("model", required=False)
@model_option
@shape_option
@click.option("-b", "--backend", "backends", default=None, metavar="NAME[,NAME...]|all",
              help="Backends to measure, each in a fresh process (default: the automatic choice).")
@threads_option
@click.option("-p", "--n-prompt", type=click.IntRange(min=0), default=128, show_default=True,
              help="Prompt tokens of the pp test (0: skip it).")
@click.option("-n", "--n-gen", type=click.IntRange(min=0), default=64, show_default=True,
              help="Generated tokens of the tg test (0: skip it).")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--lm-head", type=click.Choice(MODES), default=None,
              help="Resident form of the LM head (default: screened with the compiled kernels, else "
                   "float32 if memory allows, else float16).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench(model: str | None, model_opt: str | None, shape: str | None, backends: str | None, threads: int | None,
          n_prompt: int, n_gen: int, repetitions: int, lm_head: str | None, as_json: bool) -> None:
    """Measure prompt processing (pp) and generation (tg) speed, load time and peak memory.

    \b
    Examples:
      edgebit bench ggml-model-i2_s.gguf
      edgebit bench --shape 2b4t -b dense,packed,lut -t 2 --json
    """
    path = _model_path(model, model_opt, shape)
    if path is None:
        if shape is None:
            raise click.UsageError("give MODEL or --shape")
        target = benchmark.random_model_path(shape)
        click.echo(f"using the random {shape} model {target} ({'already there' if target.exists() else 'writing it'}; "
                   f"in the model store, remove it with `edgebit models rm {target.stem}`)", err=True)
        path = str(benchmark.random_model(shape))
    if backends == "all":
        names: list[str | None] = sorted(available_backends())
    else:
        names = [b.strip() for b in backends.split(",") if b.strip()] if backends else [None]
    results = []
    for name in names:
        click.echo(f"benchmarking backend {name or '(automatic)'}...", err=True)
        try:
            results += benchmark.run_isolated(path, name, threads, n_prompt, n_gen, repetitions, lm_head)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(json.dumps([r.to_json() for r in results], indent=2) if as_json else benchmark.format_table(results))


@main.command()
@click.argument("model", required=False)
@model_option
@shape_option
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def backends(model: str | None, model_opt: str | None, shape: str | None, threads: int | None,
             as_json: bool) -> None:
    """List the installed ternary kernels: whether each runs here, the memory each needs for a model,
    and which one would be chosen automatically.

    \b
    Examples:
      edgebit backends
      edgebit backends --shape 2b4t
      edgebit backends ggml-model-i2_s.gguf --json
    """
    path = _model_path(model, model_opt, shape) if (model or model_opt) else None
    shapes: list[tuple[int, int]] = []
    extra = 0
    if path is not None:
        with GGUFFile(path) as gguf:
            shapes, embd = model_shapes(gguf), embedding_shape(gguf)
    elif shape is not None:
        dims = SHAPES[shape]
        shapes = projection_shapes(dims.n_layer, dims.n_embd, dims.n_embd // dims.n_head * dims.n_head_kv, dims.n_ff)
        embd = (dims.n_vocab, dims.n_embd)
    if shapes:
        extra = LMHead.resident_bytes("float16", embd)
    machine = detect()
    installed = available_backends()
    rows = []
    for name, cls in sorted(installed.items()):
        ok, why = cls.supported()
        rows.append({"name": name, "supported": ok, "why_not": why, "description": cls.description,
                     "weights_bytes": footprint(cls, shapes) if shapes else None})
    choice = choose_backend(shapes, threads, extra, machine=machine, backends=installed)
    report = {"machine": {"arch": machine.arch, "cpu": machine.cpu_model, "cores": machine.cpus,
                          "mem_available": machine.mem_available},
              "lm_head_bytes": extra or None, "backends": rows,
              "choice": {"backend": choice.backend, "reason": choice.reason}}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"machine: {machine.arch}, {machine.cpu_model or 'unknown CPU'}, {machine.cpus} cores, "
               f"{benchmark.format_bytes(machine.mem_available or 0)} available")
    for row in rows:
        mark = "*" if row["name"] == choice.backend else " "
        state = "ok" if row["supported"] else f"unsupported: {row['why_not']}"
        size = f"  weights {benchmark.format_bytes(row['weights_bytes'])}" if shapes else ""
        click.echo(f"{mark} {row['name']:<10} {state}{size}\n    {row['description']}")
    if shapes:
        click.echo(f"  (plus the LM head, {benchmark.format_bytes(extra)} as float16)")
    hint = "" if shapes else "; what fits in memory depends on the model: give MODEL or --shape"
    click.echo(f"automatic choice: {choice.backend} ({choice.reason}{hint})")
