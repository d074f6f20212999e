"""Random BitNet models of a given shape, written as real GGUF files.

For benchmarks (`edgebit bench --shape 2b4t` needs no 1.2 GB download) and for tests that need
a model. The weights are random, so the text is meaningless, but every byte follows the real
format: I2_S (or TQ1_0/TQ2_0) projections, an f16 tied embedding, f32 norms and a working
byte-level BPE tokenizer (bytes plus merged letter pairs) with the LLaMA-3 special tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from . import quants
from .gguf import GGUFFile
from .gguf_writer import GGUFWriter
from .transformer import ARCHITECTURES, Config

# Every byte whose four 2-bit fields are valid I2_S codes (0, 1 or 2; 3 never occurs).
_VALID_I2S_BYTES = np.array([b for b in range(256) if all((b >> s) & 3 != 3 for s in (0, 2, 4, 6))], np.uint8)

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"


@dataclass(frozen=True)
class Shape:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int
    rope_base: float


SHAPES = {
    "2b4t": Shape(128256, 2560, 30, 20, 5, 6912, 4096, 500000.0),
    "large": Shape(32002, 1536, 24, 16, 16, 4096, 2048, 10000.0),
    "small": Shape(8192, 512, 4, 8, 2, 1536, 1024, 500000.0),
    "tiny": Shape(512, 256, 2, 4, 2, 512, 256, 10000.0),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable code point table (spec §5.1)."""
    printable = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


def byte_vocab(n_vocab: int) -> tuple[list[str], np.ndarray]:
    """A byte-level BPE vocabulary of n_vocab tokens: (tokens, token types); see `byte_merges`.

    256 byte tokens, then merged pairs of letters and space ("Ġa", "th", ...) with their merges,
    then filler tokens, then the special tokens (CONTROL). A vocabulary of the LLaMA-3 size keeps
    the LLaMA-3 special ids (BOS 128000, EOS 128001, EOT 128009).
    """
    if n_vocab < 259:
        raise ValueError("a byte-level vocabulary needs at least 259 tokens")
    table = _bytes_to_unicode()
    if n_vocab >= 128256:
        specials = [BOS, EOS] + [f"<|reserved_special_token_{i}|>" for i in range(7)] + [EOT]
        specials += [f"<|reserved_special_token_{i}|>" for i in range(7, 7 + n_vocab - 128010)]
    else:
        specials = [BOS, EOS, EOT]
    n_plain = n_vocab - len(specials)
    tokens = [table[b] for b in range(256)] + [a + b for a, b in _pairs(n_plain - 256)]
    tokens += [f"<pad_{i}>" for i in range(n_plain - len(tokens))]
    token_type = np.array([1] * len(tokens) + [3] * len(specials), dtype=np.int32)
    return tokens + specials, token_type


def _pairs(limit: int) -> list[tuple[str, str]]:
    """Pairs of space ("Ġ") and lower-case letters, the merged tokens of `byte_vocab`."""
    alphabet = [_bytes_to_unicode()[0x20]] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    return [(a, b) for a in alphabet for b in alphabet][: max(limit, 0)]


def byte_merges(n_vocab: int) -> list[str]:
    """The BPE merges ("left right") that build the pair tokens of `byte_vocab(n_vocab)`."""
    present = set(byte_vocab(n_vocab)[0])
    return [f"{a} {b}" for a, b in _pairs(len(present)) if a + b in present]


def write_byte_tokenizer(w: GGUFWriter, n_vocab: int) -> None:
    """Add the `tokenizer.ggml.*` keys of `byte_vocab(n_vocab)` (LLaMA-3 split, BOS added)."""
    tokens, token_type = byte_vocab(n_vocab)
    w.add("tokenizer.ggml.model", "gpt2")
    w.add("tokenizer.ggml.pre", "llama-bpe")
    w.add("tokenizer.ggml.tokens", tokens)
    w.add("tokenizer.ggml.token_type", token_type)
    w.add("tokenizer.ggml.merges", byte_merges(n_vocab), elem_type=8)
    w.add("tokenizer.ggml.bos_token_id", tokens.index(BOS))
    w.add("tokenizer.ggml.eos_token_id", tokens.index(EOS))
    w.add("tokenizer.ggml.add_bos_token", True)


def write_random_model(path: str | os.PathLike[str], shape: str | Shape = "tiny", arch: str = "bitnet-b1.58",
                       weight_type: str = "I2_S", seed: int = 0, tokenizer_from: str | os.PathLike[str] | None = None,
                       **overrides: int | float) -> str:
    """Write a random model; `overrides` replace fields of the shape (e.g. n_layer=2). Returns the path.

    tokenizer_from: a GGUF file whose `tokenizer.*` keys (a real vocabulary) replace the byte-level
    test tokenizer; its vocabulary size must equal the shape's n_vocab.
    """
    dims = SHAPES[shape] if isinstance(shape, str) else shape
    dims = replace(dims, **overrides)
    vocabulary = None
    if tokenizer_from is not None:
        vocabulary = {k: v for k, v in GGUFFile(tokenizer_from).metadata.items() if k.startswith("tokenizer.")}
        size = len(vocabulary.get("tokenizer.ggml.tokens", ()))
        if size != dims.n_vocab:
            raise ValueError(f"{tokenizer_from}: the vocabulary has {size} tokens, the shape needs {dims.n_vocab}")
    rng = np.random.default_rng(seed)
    path = os.fspath(path)
    w = GGUFWriter(path)
    config = Config(arch=arch, n_vocab=dims.n_vocab, n_embd=dims.n_embd, n_layer=dims.n_layer, n_head=dims.n_head,
                    n_head_kv=dims.n_head_kv, head_dim=dims.n_embd // dims.n_head, n_ff=dims.n_ff, n_ctx=dims.n_ctx,
                    rope_base=dims.rope_base, eps=1e-5, activation=ARCHITECTURES.get(arch, "relu2"))
    w.add("general.architecture", arch)
    w.add("general.name", f"random-{arch}-{dims.n_embd}x{dims.n_layer}")
    for key, value in config.metadata():
        w.add(key, value)
    if vocabulary is None:
        write_byte_tokenizer(w, dims.n_vocab)
    else:
        for key, value in vocabulary.items():
            w.add(key, value)

    embd = (rng.standard_normal((dims.n_vocab, dims.n_embd), dtype=np.float32) * 0.05).astype(np.float16)
    w.add_array("token_embd.weight", embd)
    del embd
    w.add_array("output_norm.weight", rng.uniform(0.5, 1.5, dims.n_embd).astype(np.float32))
    shapes = config.projection_shapes()
    for i in range(dims.n_layer):
        for norm, size in config.norm_sizes().items():
            w.add_array(f"blk.{i}.{norm}.weight", rng.uniform(0.5, 1.5, size).astype(np.float32))
        for name, (m, k) in shapes.items():
            # like a trained model: outputs of order one for inputs of order one (2/3 of codes are ±1)
            scale = float(rng.uniform(0.5, 2.0) / np.sqrt(k * 2 / 3))
            w.add_tensor(f"blk.{i}.{name}.weight", (m, k), weight_type,
                         _random_ternary(rng, m * k, scale, weight_type))
    w.write()
    return path


def _random_ternary(rng: np.random.Generator, n: int, scale: float, weight_type: str) -> bytes:
    """Uniform random ternary codes of n elements in the given storage type."""
    if weight_type == "I2_S":
        packed = rng.choice(_VALID_I2S_BYTES, size=n // 4)
        tail = np.zeros(32, np.uint8)
        tail[:4] = np.frombuffer(np.float32(scale).tobytes(), np.uint8)
        return packed.tobytes() + tail.tobytes()
    codes = rng.integers(-1, 2, size=n, dtype=np.int8)
    d = np.full(n // quants.TQ_BLOCK, scale, dtype=np.float16)
    if weight_type == "TQ2_0":
        return quants.tq2_0_encode(codes, d)
    if weight_type == "TQ1_0":
        return quants.tq1_0_encode(codes, d)
    raise ValueError(f"weight_type must be I2_S, TQ1_0 or TQ2_0, not {weight_type!r}")
