"""edgebit: run BitNet b1.58 ternary language models on ordinary CPUs, in pure numpy."""

__version__ = "0.1.0"
