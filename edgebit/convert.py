"""Convert a Hugging Face BitNet checkpoint (safetensors) to a GGUF file with I2_S or TQ2_0 weights.

Input: a directory with `config.json`, `*.safetensors` and a tokenizer (`tokenizer.json`, or a
SentencePiece `tokenizer.model`). Three kinds of checkpoint are understood:

* packed (`microsoft/bitnet-b1.58-2B-4T`): each projection is uint8 (M/4, K), unpacked row
  r = i·(M/4) + p is bits 2i..2i+1 of packed row p (value = code − 1), plus a `weight_scale`;
* float weights that already hold {−1, 0, +1} plus a `weight_scale` (transformers' offline layout
  after unpacking);
* float master weights (`…-2B-4T-bf16`, 1bitLLM): ternarised here with BitNet's absmean rule,
  β = max(mean|W|, 1e-5), codes = clamp(round(W/β), −1, 1), scale β.

`weight_scale` direction (spec §4.9 calls it contested) follows what transformers computes,
checked against it in tests/test_convert.py: with `quantization_config.linear_class =
"autobitlinear"` (the 2B4T release) the layer output is multiplied by `weight_scale`, so the
GGUF scale is `weight_scale`; with `"bitlinear"` (transformers' default class) the output is
divided by it, so the GGUF scale is `1 / weight_scale`. `weight_scale="multiply"|"divide"`
overrides the choice.

Work is done tensor by tensor from memory-mapped files, so peak memory stays near the size of
the output file (which `GGUFWriter` assembles in memory) plus one float32 projection.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import quants
from .gguf_writer import ARRAY, STRING, GGUFWriter
from .safetensors import Checkpoint, SafetensorsError
from .spm_model import SpmError, parse_spm
from .transformer import Config

log = logging.getLogger(__name__)

WEIGHT_TYPES = ("I2_S", "TQ2_0")
SCALE_MODES = ("auto", "multiply", "divide")
# config.json architectures → the FFN activation they were trained with.
ARCHITECTURES = {"BitNetForCausalLM": "relu2", "BitnetForCausalLM": "silu"}
# FFN activation → GGUF architecture (spec §3: `bitnet-b1.58` runs relu², `bitnet` SiLU).
GGUF_ARCH = {"relu2": "bitnet-b1.58", "silu": "bitnet"}
PROJECTIONS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# HF norm names (2B4T spelling first, then 1bitLLM's) → GGUF name.
NORMS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.attn_sub_norm": "attn_sub_norm", "self_attn.inner_attn_ln": "attn_sub_norm",
    "mlp.ffn_sub_norm": "ffn_sub_norm", "mlp.ffn_layernorm": "ffn_sub_norm",
}
# Buffers some checkpoints carry that the model recomputes.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# GGUF token types (spec §5.1).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
EMBD_ROWS_PER_CHUNK = 4096

Tensor = tuple[tuple[int, ...], str, bytes]  # numpy shape, GGUF type name, payload
Job = Callable[[], "Tensor | None"]  # produces one output tensor (None: a check that writes nothing)


class ConvertError(ValueError):
    """The checkpoint cannot be converted; the message names the file, tensor or key and what to do."""


@dataclass
class ConvertResult:
    """What `convert` wrote."""

    path: str
    arch: str
    weight_type: str
    tensors: int
    tokenizer: str  # "gpt2" | "llama"
    scale_direction: str | None  # how weight_scale tensors were read; None if the checkpoint had none
    warnings: list[str]


def _load_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConvertError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


def read_hparams(config: dict[str, Any], source: str = "config.json") -> Config:
    """Validate config.json and pick the GGUF architecture from the FFN activation."""
    names = config.get("architectures") or []
    known = [a for a in names if a in ARCHITECTURES]
    if not known:
        raise ConvertError(f"{source}: architectures {names!r} is not a BitNet model; edgebit converts "
                           f"{', '.join(ARCHITECTURES)}")
    activation = config.get("hidden_act", ARCHITECTURES[known[0]])
    if activation not in GGUF_ARCH:
        raise ConvertError(f"{source}: hidden_act {activation!r} is not supported (relu2 or silu)")

    def need(key: str) -> int:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConvertError(f"{source}: {key} must be a positive integer, got {value!r}")
        return value

    n_embd, n_head = need("hidden_size"), need("num_attention_heads")
    n_head_kv = config.get("num_key_value_heads") or n_head
    if n_embd % n_head or n_head % n_head_kv:
        raise ConvertError(f"{source}: hidden_size {n_embd}, num_attention_heads {n_head}, num_key_value_heads "
                           f"{n_head_kv} do not divide evenly")
    head_dim = config.get("head_dim") or n_embd // n_head
    if head_dim != n_embd // n_head:
        raise ConvertError(f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads; not supported")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ConvertError(f"{source}: {key} = true; BitNet models have no biases and edgebit runs none")
    quant = config.get("quantization_config") or {}
    if quant.get("use_rms_norm"):
        raise ConvertError(f"{source}: quantization_config.use_rms_norm (an extra RMSNorm inside every linear) "
                           "is not part of the BitNet b1.58 models edgebit runs")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear") or float(rope.get("factor", 1.0)) != 1.0:
        raise ConvertError(f"{source}: RoPE scaling {rope!r} is not supported")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    return Config(
        arch=GGUF_ARCH[activation], activation=activation, n_vocab=need("vocab_size"), n_embd=n_embd,
        n_layer=need("num_hidden_layers"), n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        n_ff=need("intermediate_size"),
        n_ctx=int(config.get("max_position_embeddings") or 2048), rope_base=float(theta),
        eps=float(config.get("rms_norm_eps", 1e-5)),
    )


def scale_direction(config: dict[str, Any], mode: str) -> str:
    """How a checkpoint's `weight_scale` relates to the GGUF scale: "multiply" (s = ws) or "divide" (s = 1/ws)."""
    if mode not in SCALE_MODES:
        raise ValueError(f"weight_scale must be one of {SCALE_MODES}, not {mode!r}")
    if mode != "auto":
        return mode
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        raise ConvertError("the checkpoint has weight_scale tensors but no quantization_config saying how to "
                           "apply them; pass weight_scale='multiply' (AutoBitLinear) or 'divide' (BitLinear)")
    return "multiply" if quant.get("linear_class", "bitlinear") == "autobitlinear" else "divide"


def unpack_rows(packed: np.ndarray) -> np.ndarray:
    """HF packed ternary (P, K) uint8 → int8 codes (4P, K): row i·P + p is bits 2i..2i+1 of packed row p."""
    q = np.concatenate([(packed >> (2 * i)) & 3 for i in range(4)], axis=0)
    if (q == 3).any():
        raise ConvertError("packed weight holds the 2-bit code 3, which is not a ternary value")
    return q.astype(np.int8) - np.int8(1)


def absmean_ternary(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """BitNet's weight quantiser, as transformers' WeightQuant computes it in float32:
    inv = 1/max(mean|W|, 1e-5), codes = clamp(round(W·inv), −1, 1); the scale is 1/inv."""
    beta = np.float32(max(float(np.abs(w).mean(dtype=np.float64)), 1e-5))
    inv = np.float32(1.0) / beta
    codes = np.clip(np.rint(w * inv), -1, 1).astype(np.int8)
    return codes, np.float32(1.0) / inv


def _encode(codes: np.ndarray, scale: np.float32, weight_type: str) -> bytes:
    if weight_type == "I2_S":
        return quants.i2s_encode(codes, float(scale))
    d = np.full(codes.size // quants.TQ_BLOCK, scale, dtype=np.float16)
    return quants.tq2_0_encode(codes, d)


class _Converter:
    """One conversion: the checkpoint, its config, and the decisions made on the way."""

    def __init__(self, directory: str, weight_type: str, weight_scale: str) -> None:
        if weight_type not in WEIGHT_TYPES:
            raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, not {weight_type!r}")
        self.directory = directory
        self.config = _load_json(os.path.join(directory, "config.json"))
        self.hp = read_hparams(self.config, os.path.join(directory, "config.json"))
        self.weight_type = weight_type
        self.scale_mode = weight_scale
        self.direction: str | None = None
        self.warnings: list[str] = []
        self._warned_rows: set[int] = set()
        try:
            self.ckpt = Checkpoint(directory)
        except (SafetensorsError, OSError) as exc:
            raise ConvertError(str(exc)) from None

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    # --- the tensor plan

    def plan(self) -> list[tuple[str, Job]]:
        """(GGUF name, producer) for every output tensor; checks names and shapes before any work."""
        hp, ckpt = self.hp, self.ckpt
        prefix = "model.layers."
        used: set[str] = set()

        def take(name: str) -> str:
            if name not in ckpt:
                raise ConvertError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
            used.add(name)
            return name

        jobs: list[tuple[str, Job]] = []
        embd = take("model.embed_tokens.weight")
        if ckpt.info(embd).shape[1:] != (hp.n_embd,):
            raise ConvertError(f"{embd}: shape {ckpt.info(embd).shape} does not match hidden_size {hp.n_embd}")
        jobs.append(("token_embd.weight", lambda: self._embedding(embd)))
        jobs.append(("output_norm.weight", self._norm_job(take("model.norm.weight"), hp.n_embd)))
        if "lm_head.weight" in ckpt:
            used.add("lm_head.weight")
            jobs.append(("lm_head.weight", lambda: self._check_lm_head(embd)))
        shapes, sizes = hp.projection_shapes(), hp.norm_sizes()
        for i in range(hp.n_layer):
            done: set[str] = set()
            for hf, gguf_name in NORMS.items():
                name = f"{prefix}{i}.{hf}.weight"
                if name in ckpt and gguf_name not in done:
                    done.add(gguf_name)
                    jobs.append((f"blk.{i}.{gguf_name}.weight", self._norm_job(take(name), sizes[gguf_name])))
            for gguf_name in sizes:
                if gguf_name not in done:
                    spellings = " or ".join(f"{prefix}{i}.{hf}.weight" for hf, g in NORMS.items() if g == gguf_name)
                    raise ConvertError(f"{self.directory}: tensor {spellings} is missing from the checkpoint")
            for hf, gguf_name in PROJECTIONS.items():
                name = take(f"{prefix}{i}.{hf}.weight")
                scale_name = f"{prefix}{i}.{hf}.weight_scale"
                if scale_name in ckpt:
                    used.add(scale_name)
                self._check_projection_shape(name, shapes[gguf_name])
                jobs.append((f"blk.{i}.{gguf_name}.weight",
                             self._projection_job(name, scale_name if scale_name in ckpt else None,
                                                  shapes[gguf_name])))
        extra = sorted(n for n in ckpt if n not in used and not n.endswith(IGNORED_SUFFIXES))
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise ConvertError(f"{self.directory}: unexpected tensors {shown}; edgebit would have to drop them "
                               "(biases, adapters or another architecture?)")
        return jobs

    def _check_projection_shape(self, name: str, shape: tuple[int, int]) -> None:
        info = self.ckpt.info(name)
        m, k = shape
        packed = info.dtype == "U8" and info.shape == (m // 4, k) and m % 4 == 0
        if not packed and info.shape != shape:
            raise ConvertError(f"{name}: shape {info.shape} {info.dtype}, expected {shape} (or packed uint8 "
                               f"{(m // 4, k)})")
        if self.weight_type == "I2_S" and (m * k) % quants.I2S_BLOCK:
            raise ConvertError(f"{name}: {m}×{k} elements is not a multiple of {quants.I2S_BLOCK}; "
                               "I2_S cannot store it")
        if self.weight_type == "TQ2_0" and k % quants.TQ_BLOCK:
            raise ConvertError(f"{name}: rows of {k} elements are not a multiple of {quants.TQ_BLOCK}; "
                               "TQ2_0 cannot store them (use I2_S)")
        if self.weight_type == "I2_S" and k % quants.I2S_BLOCK and k not in self._warned_rows:
            self._warned_rows.add(k)
            self.warn(f"rows of {k} elements are not a multiple of {quants.I2S_BLOCK}: edgebit runs this I2_S "
                      "file, but bitnet.cpp's kernels assume whole 128-element blocks per row")

    # --- producers

    def _norm_job(self, name: str, size: int) -> Job:
        info = self.ckpt.info(name)
        if info.n_elements != size:
            raise ConvertError(f"{name}: {info.n_elements} elements, expected {size}")
        return lambda: ((size,), "F32", self.ckpt.float32(name).reshape(size).tobytes())

    def _embedding(self, name: str) -> Tensor:
        """token_embd as F16, converted in row chunks so no full float32 copy is ever made."""
        info = self.ckpt.info(name)
        rows = info.shape[0]
        out = io.BytesIO()
        for start in range(0, rows, EMBD_ROWS_PER_CHUNK):
            chunk = self.ckpt.array(name)[start : start + EMBD_ROWS_PER_CHUNK]
            if info.dtype == "BF16":
                chunk = (chunk.astype(np.uint32) << 16).view(np.float32)
            f16 = chunk.astype("<f2")
            if not np.isfinite(f16).all():
                raise ConvertError(f"{name}: values overflow float16 (rows {start}..{start + len(chunk) - 1})")
            out.write(memoryview(f16).cast("B"))
            self.ckpt.release(name)  # keep resident memory at one chunk of the source
        return (rows, self.hp.n_embd), "F16", out.getvalue()

    def _check_lm_head(self, embd: str) -> None:
        """BitNet ties the LM head to token_embd (edgebit and bitnet.cpp use only that); warn if they differ."""
        a, b = self.ckpt.array("lm_head.weight"), self.ckpt.array(embd)
        same = a.shape == b.shape and a.dtype == b.dtype and all(
            np.array_equal(a[s : s + EMBD_ROWS_PER_CHUNK], b[s : s + EMBD_ROWS_PER_CHUNK])
            for s in range(0, a.shape[0], EMBD_ROWS_PER_CHUNK))
        self.ckpt.release("lm_head.weight")
        self.ckpt.release(embd)
        if not same:
            self.warn("lm_head.weight differs from model.embed_tokens.weight, but BitNet runtimes use the "
                      "embedding as the LM head; lm_head.weight is dropped and outputs will differ from the "
                      "checkpoint")

    def _projection_job(self, name: str, scale_name: str | None,
                        shape: tuple[int, int]) -> Job:
        def run() -> Tensor:
            codes, scale = self._ternary(name, scale_name, shape)
            if not np.isfinite(scale) or scale <= 0:
                raise ConvertError(f"{name}: scale {scale} is not a positive finite number")
            return shape, self.weight_type, _encode(codes, scale, self.weight_type)
        return run

    def _ternary(self, name: str, scale_name: str | None, shape: tuple[int, int]) -> tuple[np.ndarray, np.float32]:
        info = self.ckpt.info(name)
        if scale_name is None:
            if info.dtype == "U8":
                raise ConvertError(f"{name}: packed weight without {name}_scale")
            codes, scale = absmean_ternary(self.ckpt.float32(name))
            self.ckpt.release(name)
            return codes, scale
        if self.direction is None:
            self.direction = scale_direction(self.config, self.scale_mode)
            log.info("weight_scale tensors: GGUF scale = %s", "weight_scale" if self.direction == "multiply"
                     else "1 / weight_scale")
        ws = self.ckpt.float32(scale_name).reshape(-1)
        if ws.size == 0 or not np.all(ws == ws[0]):
            raise ConvertError(f"{scale_name}: expected one scale per tensor, got {ws.size} different values")
        scale = ws[0] if self.direction == "multiply" else np.float32(1.0) / ws[0]
        if info.dtype == "U8" and info.shape != shape:
            codes = unpack_rows(self.ckpt.array(name))
        else:
            values = self.ckpt.float32(name)
            codes = np.rint(values).astype(np.int8)
            if not np.array_equal(codes, values) or np.abs(codes).max(initial=0) > 1:
                raise ConvertError(f"{name}: has a weight_scale but its values are not all -1, 0 or +1")
        self.ckpt.release(name)
        return codes.reshape(shape), np.float32(scale)

    # --- tokenizer

    def tokenizer(self, pre: str | None) -> tuple[str, list[tuple[str, Any, int | None, int | None]]]:
        """("gpt2" | "llama", metadata entries) from tokenizer.json (byte-level BPE) or tokenizer.model."""
        tj_path = os.path.join(self.directory, "tokenizer.json")
        spm_path = os.path.join(self.directory, "tokenizer.model")
        reason = "it has neither tokenizer.json nor tokenizer.model"
        if os.path.exists(tj_path):
            tj = _load_json(tj_path)
            if _is_byte_level(tj):
                return "gpt2", self._bpe_metadata(tj, tj_path, pre)
            reason = "its tokenizer.json is not byte-level BPE and it has no tokenizer.model"
        if os.path.exists(spm_path):
            return "llama", self._spm_metadata(spm_path)
        raise ConvertError(f"{self.directory}: no usable tokenizer: {reason}. Copy the model's tokenizer.json "
                           "(byte-level BPE) or tokenizer.model (SentencePiece) into the directory")

    def _special_ids(self, n: int) -> list[tuple[str, Any, int | None, int | None]]:
        out = []
        for key, gguf_key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
            value = self.config.get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int) and 0 <= value < n:
                out.append((f"tokenizer.ggml.{gguf_key}_token_id", value, None, None))
            elif value is not None:
                self.warn(f"config.json {key} = {value!r} is outside the vocabulary; not written")
        return out

    def _pad(self, tokens: list[str | None], types: list[int]) -> None:
        """Fill holes and extend to the embedding's row count with unused placeholder tokens."""
        if len(tokens) > self.hp.n_vocab:
            raise ConvertError(f"the tokenizer has {len(tokens)} tokens but the embedding only "
                               f"{self.hp.n_vocab} rows")
        missing = self.hp.n_vocab - len(tokens)
        tokens.extend([None] * missing)
        types.extend([UNUSED] * missing)
        for i, t in enumerate(tokens):
            if t is None:
                tokens[i] = f"[PAD{i}]"
                types[i] = UNUSED

    def _bpe_metadata(self, tj: dict[str, Any], path: str,
                      pre: str | None) -> list[tuple[str, Any, int | None, int | None]]:
        model = tj.get("model") or {}
        vocab, merges = model.get("vocab"), model.get("merges", [])
        if not isinstance(vocab, dict) or not isinstance(merges, list):
            raise ConvertError(f"{path}: model.vocab / model.merges are missing")
        added = tj.get("added_tokens") or []
        size = max([int(i) for i in vocab.values()] + [int(t["id"]) for t in added] + [-1]) + 1
        tokens: list[str | None] = [None] * size
        types = [NORMAL] * size
        for text, i in vocab.items():
            tokens[int(i)] = text
        for t in added:
            tokens[int(t["id"])] = t["content"]
            types[int(t["id"])] = CONTROL if t.get("special") else USER_DEFINED
        self._pad(tokens, types)
        merge_strings = [m if isinstance(m, str) else " ".join(m) for m in merges]
        entries: list[tuple[str, Any, int | None, int | None]] = [
            ("tokenizer.ggml.model", "gpt2", None, None),
            ("tokenizer.ggml.pre", pre or _detect_pre(tj, path), None, None),
            ("tokenizer.ggml.tokens", tokens, ARRAY, STRING),
            ("tokenizer.ggml.token_type", np.array(types, dtype=np.int32), None, None),
            ("tokenizer.ggml.merges", merge_strings, ARRAY, STRING),
        ]
        entries += self._special_ids(len(tokens))
        if "<|eot_id|>" in vocab or any(t["content"] == "<|eot_id|>" for t in added):
            entries.append(("tokenizer.ggml.eot_token_id", tokens.index("<|eot_id|>"), None, None))
        entries += self._tokenizer_config()
        return entries

    def _spm_metadata(self, path: str) -> list[tuple[str, Any, int | None, int | None]]:
        try:
            with open(path, "rb") as fh:
                spm = parse_spm(fh.read(), path)
        except (OSError, SpmError) as exc:
            raise ConvertError(str(exc)) from None
        tokens: list[str | None] = list(spm.pieces)
        types = list(spm.types)
        self._pad(tokens, types)
        scores = np.zeros(len(tokens), dtype=np.float32)
        scores[: len(spm.scores)] = spm.scores
        entries: list[tuple[str, Any, int | None, int | None]] = [
            ("tokenizer.ggml.model", "llama", None, None),
            ("tokenizer.ggml.tokens", tokens, ARRAY, STRING),
            ("tokenizer.ggml.scores", scores, None, None),
            ("tokenizer.ggml.token_type", np.array(types, dtype=np.int32), None, None),
            ("tokenizer.ggml.add_space_prefix", spm.add_dummy_prefix, None, None),
        ]
        ids = self._special_ids(len(tokens))
        present = {key for key, *_ in ids}
        for key, value in (("bos", spm.bos_id), ("eos", spm.eos_id), ("padding", spm.pad_id)):
            if f"tokenizer.ggml.{key}_token_id" not in present and 0 <= value < len(tokens):
                ids.append((f"tokenizer.ggml.{key}_token_id", value, None, None))
        if 0 <= spm.unk_id < len(tokens):
            ids.append(("tokenizer.ggml.unknown_token_id", spm.unk_id, None, None))
        return entries + ids + self._tokenizer_config()

    def _tokenizer_config(self) -> list[tuple[str, Any, int | None, int | None]]:
        """add_bos/add_eos flags and the chat template from tokenizer_config.json, when present."""
        path = os.path.join(self.directory, "tokenizer_config.json")
        cfg = _load_json(path) if os.path.exists(path) else {}
        out: list[tuple[str, Any, int | None, int | None]] = [
            ("tokenizer.ggml.add_bos_token", bool(cfg.get("add_bos_token", True)), None, None),
            ("tokenizer.ggml.add_eos_token", bool(cfg.get("add_eos_token", False)), None, None),
        ]
        if isinstance(cfg.get("chat_template"), str):
            out.append(("tokenizer.chat_template", cfg["chat_template"], None, None))
        return out


def _is_byte_level(tj: dict[str, Any]) -> bool:
    model = tj.get("model") or {}
    if model.get("type", "BPE") != "BPE" or model.get("byte_fallback"):
        return False
    parts = [tj.get("pre_tokenizer") or {}, tj.get("decoder") or {}]
    found = []
    while parts:
        part = parts.pop()
        if isinstance(part, dict):
            found.append(part.get("type"))
            parts.extend(part.get("pretokenizers") or part.get("decoders") or [])
    return "ByteLevel" in found


def _detect_pre(tj: dict[str, Any], path: str) -> str:
    """`tokenizer.ggml.pre` from the pre-tokenizer: LLaMA-3's split → llama-bpe, GPT-2's → gpt-2."""
    from .tokenizer import LLAMA3_PATTERN

    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    patterns = [(p.get("pattern") or {}).get("Regex") for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if patterns == [LLAMA3_PATTERN]:
        return "llama-bpe"
    if not patterns and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"
    raise ConvertError(f"{path}: unknown pre-tokenizer {json.dumps(pre)[:200]}; pass pre='llama-bpe', 'gpt-2' "
                       "or 'default' if you know which split the model was trained with")


def convert(src: str | os.PathLike[str], out: str | os.PathLike[str], weight_type: str = "I2_S",
            weight_scale: str = "auto", name: str | None = None, pre: str | None = None,
            progress: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Convert the HF checkpoint directory `src` to the GGUF file `out` (written atomically).

    weight_type: "I2_S" (bitnet.cpp's format, the default) or "TQ2_0" (upstream llama.cpp's; its
    f16 block scale rounds the per-tensor scale). weight_scale: "auto" (from quantization_config),
    "multiply" or "divide" (see the module docstring). pre: override `tokenizer.ggml.pre` detection.
    progress(done, total) is called after each tensor.
    """
    src, out = os.fspath(src), os.fspath(out)
    conv = _Converter(src, weight_type.upper(), weight_scale)
    try:
        hp = conv.hp
        jobs = conv.plan()
        kind, tokenizer_entries = conv.tokenizer(pre)
        writer = GGUFWriter(out)
        writer.add("general.architecture", hp.arch)
        writer.add("general.name", name or os.path.basename(os.path.normpath(src)))
        writer.add("general.quantization_version", 2)
        for key, value in hp.metadata():
            writer.add(key, value)
        for key, value, vtype, elem_type in tokenizer_entries:
            writer.add(key, value, vtype, elem_type)
        count = 0
        for done, (gguf_name, produce) in enumerate(jobs, 1):
            tensor = produce()
            if tensor is not None:
                writer.add_tensor(gguf_name, *tensor)
                count += 1
            del tensor
            if progress is not None:
                progress(done, len(jobs))
        writer.write()
    except (SafetensorsError, quants.QuantError) as exc:
        raise ConvertError(str(exc)) from None
    finally:
        conv.ckpt.close()
    return ConvertResult(out, hp.arch, conv.weight_type, count, kind, conv.direction, conv.warnings)
