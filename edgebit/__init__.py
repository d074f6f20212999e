"""edgebit: run BitNet b1.58 ternary language models on ordinary CPUs, in pure numpy.

    >>> import edgebit
    >>> model = edgebit.load("ggml-model-i2_s.gguf")
    >>> model.generate(messages=[{"role": "user", "content": "Hello"}], max_tokens=32)
"""

from __future__ import annotations

import os
from collections.abc import Callable

__version__ = "0.1.0"


def load(path: str | os.PathLike[str], backend: str | None = None, threads: int | None = None,
         kv_dtype: str = "float32", numerics: str = "reference", activation: str | None = None,
         progress: Callable[[int, int], None] | None = None, lm_head: str | None = None,
         compile_progress: Callable[[int, int], None] | None = None):
    """Open a BitNet GGUF file (or a bundled model by name, e.g. "edgebit-sensors") for inference.

    backend: a ternary kernel name (see `edgebit backends`); None picks one for this machine.
    threads: CPU threads for the kernels (None: all cores).
    kv_dtype: "float32" or "float16" (halves KV-cache memory).
    numerics: "reference" (plain float32, the model's math) or "ggml" (bitnet.cpp's f16 roundings).
    activation: override the FFN activation ("relu2" or "silu") for mislabelled files.
    progress: called as progress(layers_done, layers_total) while the weights are prepared.
    lm_head: "float32", "float16" or "screened" (exact), "int8" (approximate, opt-in); None:
        screened with the compiled kernels (greedy and top-k tokens read an int8 screen plus a few
        exact f16 rows; every logit costs ~2x there, so prefer float16 where most requests need
        all of them, e.g. sampling with top_k=0), else float32 if it fits.
    compile_progress: called as progress(kernels_done, kernels_total) while the compiled kernels are
        compiled for this CPU (first run, seconds) or loaded from the on-disk cache.
    """
    from .engine import Model
    from .registry import bundled

    if not os.path.exists(path):
        path = bundled(os.fspath(path)) or path
    return Model(path, backend=backend, threads=threads, kv_dtype=kv_dtype, numerics=numerics,
                 activation=activation, progress=progress, lm_head=lm_head, compile_progress=compile_progress)


def load_tokenizer(path: str | os.PathLike[str]):
    """The tokenizer of a GGUF file (model or vocab-only)."""
    from .tokenizer import Tokenizer

    return Tokenizer.from_gguf(path)


__all__ = ["load", "load_tokenizer", "__version__"]
