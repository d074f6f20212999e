"""`python -m edgebit` runs the `edgebit` command."""

from .cli import main

main(prog_name="edgebit")
