"""`edgebit convert`: a Hugging Face BitNet checkpoint directory → GGUF."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import click

from ..config import models_dir
from ..convert import SCALE_MODES, WEIGHT_TYPES, ConvertError, convert
from ..store import record
from . import main
from .options import ProgressBar, progress_option


@main.command("convert")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.argument("output", type=click.Path(dir_okay=False), required=False)
@click.option("--type", "weight_type", type=click.Choice([t.lower() for t in WEIGHT_TYPES]), default="i2_s",
              show_default=True, help="Ternary storage: i2_s (bitnet.cpp) or tq2_0 (upstream llama.cpp).")
@click.option("--weight-scale", type=click.Choice(SCALE_MODES), default="auto", show_default=True,
              help="How packed checkpoints' weight_scale applies; auto follows quantization_config.linear_class.")
@click.option("--pre", default=None, help="Override tokenizer.ggml.pre (llama-bpe, gpt-2, default).")
@click.option("--name", default=None, help="general.name in the file (default: the directory name).")
@click.option("-f", "--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@progress_option
def convert_cmd(source: str, output: str | None, weight_type: str, weight_scale: str, pre: str | None,
                name: str | None, force: bool, as_json: bool, progress: bool | None) -> None:
    """Convert a Hugging Face BitNet checkpoint to GGUF.

    SOURCE holds config.json, *.safetensors and tokenizer.json or tokenizer.model; the GGUF file
    runs in edgebit and bitnet.cpp.

    Understands the packed microsoft/bitnet-b1.58-2B-4T checkpoint (uint8 + weight_scale), the bf16
    master and 1bitLLM checkpoints (float weights, ternarised with BitNet's absmean rule). Works
    tensor by tensor from memory-mapped files. Without OUTPUT the file goes into the model store as
    <directory name>-<type>.gguf, so it can be used by that name.

    \b
    Examples:
      edgebit convert ./bitnet-b1.58-2B-4T bitnet-2b.gguf
      edgebit convert ./bitnet_b1_58-large --type tq2_0
      edgebit generate bitnet_b1_58-large-i2_s "Hello"
    """
    into_store = output is None
    if output is None:
        models_dir().mkdir(parents=True, exist_ok=True)
        output = str(models_dir() / f"{Path(source).resolve().name}-{weight_type}.gguf")
    if os.path.exists(output) and not force:
        raise click.ClickException(f"{output} exists; pass --force to overwrite it")
    with ProgressBar("converting", progress) as bar:
        try:
            result = convert(source, output, weight_type=weight_type, weight_scale=weight_scale, name=name, pre=pre,
                             progress=bar)
        except ConvertError as exc:
            raise click.ClickException(str(exc)) from None
    if into_store:
        record(output, str(Path(source).resolve()))
    if as_json:
        click.echo(json.dumps(asdict(result), indent=2))
        return
    direction = {"multiply": ", weight_scale multiplied", "divide": ", weight_scale divided", None: ""}
    click.echo(f"wrote {result.path}: {result.arch}, {result.tensors} tensors, {result.weight_type}, "
               f"{result.tokenizer} tokenizer{direction[result.scale_direction]}")
