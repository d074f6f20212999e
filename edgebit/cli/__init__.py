"""The `edgebit` command: a click group whose commands are thin adapters over the engine API.

Each module below registers its commands on `main`; exit codes: 0 ok, 1 runtime failure,
2 usage error (click's convention).
"""

from __future__ import annotations

import logging

import click

from .. import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgebit")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def main(verbose: int) -> None:
    """Run BitNet b1.58 ternary language models on this CPU.

    \b
    Examples:
      edgebit info ggml-model-i2_s.gguf
      edgebit generate ggml-model-i2_s.gguf "The capital of France is" -n 16
      edgebit perplexity ggml-model-i2_s.gguf wiki.test.raw --ctx 512
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


from . import bench, chat, classify, convert, demo, doctor, models, run, serve, train  # noqa: E402,F401  (registers commands)
