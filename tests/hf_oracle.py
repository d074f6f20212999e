"""A Hugging Face transformers oracle for edgebit: small random `BitNetForCausalLM` models and their GGUF twins.

The oracle is transformers' own BitNet model in float32 on the CPU, loaded with the BitNet quantizer in
online mode (`AutoBitLinear`): every projection is ternarised on the fly by `WeightQuant`
(s = 1/mean|W|, codes = clamp(round(W·s), -1, 1), weight = codes/s) and every projection input is
quantised per token to int8 by `ActQuant` (γ = 127/max|x|, round half to even, clamp to [-128, 127],
then x_q/γ). The GGUF file stores exactly what transformers multiplies with: the int8 codes and the
float32 scale 1/s (taken from `WeightQuant`'s own output and checked to reproduce it bit for bit),
the f16 embedding (drawn pre-rounded to f16, so the copy is exact) and the f32 norm weights.

transformers decorates `WeightQuant`/`ActQuant` with `torch.compile`; the oracle runs them eagerly
(`torch.compiler.set_stance("force_eager")`): the Python code is the reference semantics, and compiling
costs ~30 s per shape on this machine. It also runs torch on one thread, so that its float32 sums do not
depend on the machine's core count.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest

# torch and transformers are test oracles only: without them these tests are skipped (README, "Tests").
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers import BitNetConfig, BitNetForCausalLM
from transformers.integrations.bitnet import AutoBitLinear, WeightQuant

from edgebit import quants
from edgebit.gguf_writer import GGUFWriter
from edgebit.synthetic import BOS, EOS, byte_vocab, write_byte_tokenizer

ARCH = "bitnet-b1.58"
QUANTIZATION = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
# GGUF projection name -> (transformers module path inside a decoder layer)
PROJECTIONS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
NORMS = {"attn_norm": "input_layernorm", "attn_sub_norm": "self_attn.attn_sub_norm",
         "ffn_norm": "post_attention_layernorm", "ffn_sub_norm": "mlp.ffn_sub_norm"}


@dataclass(frozen=True)
class OracleShape:
    """Hyper-parameters and init of one random oracle model."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    rope_base: float
    eps: float
    qk_std: float  # init std of q_proj/k_proj (large values make attention sharp and RoPE decisive)
    seed: int
    n_ctx: int = 256
    std: float = 0.02  # init std of the other projections (transformers' default initializer_range)
    embd_std: float = 0.05


@contextmanager
def eager() -> Iterator[None]:
    """Run transformers' `torch.compile`-decorated quantizers eagerly, without autograd, on one thread
    (torch's float32 sums depend on how they are split between threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            yield
    finally:
        torch.set_num_threads(threads)


def _float_weights(shape: OracleShape) -> dict[str, np.ndarray]:
    """Draw the float32 state dict (transformers names) from a numpy generator."""
    rng = np.random.default_rng(shape.seed)
    head_dim = shape.n_embd // shape.n_head
    kv = shape.n_head_kv * head_dim
    dims = {"attn_q": (shape.n_embd, shape.n_embd), "attn_k": (kv, shape.n_embd), "attn_v": (kv, shape.n_embd),
            "attn_output": (shape.n_embd, shape.n_embd), "ffn_gate": (shape.n_ff, shape.n_embd),
            "ffn_up": (shape.n_ff, shape.n_embd), "ffn_down": (shape.n_embd, shape.n_ff)}
    sizes = {"attn_norm": shape.n_embd, "attn_sub_norm": shape.n_embd, "ffn_norm": shape.n_embd,
             "ffn_sub_norm": shape.n_ff}
    embd = (rng.standard_normal((shape.n_vocab, shape.n_embd)) * shape.embd_std).astype(np.float16)
    state = {"model.embed_tokens.weight": embd.astype(np.float32),
             "model.norm.weight": rng.uniform(0.5, 1.5, shape.n_embd).astype(np.float32)}
    for i in range(shape.n_layer):
        for name, size in sizes.items():
            state[f"model.layers.{i}.{NORMS[name]}.weight"] = rng.uniform(0.5, 1.5, size).astype(np.float32)
        for name, (m, k) in dims.items():
            std = shape.qk_std if name in ("attn_q", "attn_k") else shape.std
            weight = rng.standard_normal((m, k)) * std
            state[f"model.layers.{i}.{PROJECTIONS[name]}.weight"] = weight.astype(np.float32)
    return state


def build_model(shape: OracleShape) -> BitNetForCausalLM:
    """A float32 `BitNetForCausalLM` with the online ternary quantizer, loaded through `from_pretrained`."""
    tokens, _ = byte_vocab(shape.n_vocab)
    config = BitNetConfig(
        vocab_size=shape.n_vocab, hidden_size=shape.n_embd, intermediate_size=shape.n_ff,
        num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head, num_key_value_heads=shape.n_head_kv,
        hidden_act="relu2", max_position_embeddings=shape.n_ctx, rms_norm_eps=shape.eps,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": shape.rope_base},
        bos_token_id=tokens.index(BOS), eos_token_id=tokens.index(EOS), pad_token_id=None,
    )
    float_model = BitNetForCausalLM(config)
    state = {k: torch.from_numpy(v) for k, v in _float_weights(shape).items()}
    missing, unexpected = float_model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    # BitNet's quantizer refuses to quantise at load time unless the checkpoint says it is quantised.
    float_model.config.quantization_config = dict(QUANTIZATION)
    with tempfile.TemporaryDirectory() as tmp:
        float_model.save_pretrained(tmp)
        model = BitNetForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    for i in range(shape.n_layer):
        for path in PROJECTIONS.values():
            module = model.model.layers[i].get_submodule(path)
            assert isinstance(module, AutoBitLinear) and module.online_quant, f"layer {i} {path} is not online"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "LM head not tied"
    return model


def ternarize(weight: torch.Tensor) -> tuple[np.ndarray, np.float32]:
    """The int8 codes and float32 scale whose product is exactly transformers' `WeightQuant` output."""
    with eager():
        effective = WeightQuant.apply(weight)
    scale = np.float32(effective.abs().max().item())
    codes = np.rint(effective.numpy() / scale).astype(np.int8)
    assert np.array_equal(codes.astype(np.float32) * scale, effective.numpy()), "codes·scale != WeightQuant(W)"
    mean_abs = float(weight.abs().mean())
    assert abs(scale - mean_abs) <= 1e-6 * mean_abs, "scale is not 1/s = mean|W|"
    return codes, scale


def write_gguf(model: BitNetForCausalLM, shape: OracleShape, path: str | os.PathLike[str]) -> str:
    """Write the model as an `bitnet-b1.58` GGUF: I2_S projections, tied f16 embedding, f32 norms."""
    path = os.fspath(path)
    w = GGUFWriter(path)
    w.add("general.architecture", ARCH)
    w.add("general.name", f"hf-oracle-{shape.seed}")
    head_dim = shape.n_embd // shape.n_head
    for key, value in (("vocab_size", shape.n_vocab), ("context_length", shape.n_ctx),
                       ("embedding_length", shape.n_embd), ("block_count", shape.n_layer),
                       ("feed_forward_length", shape.n_ff), ("rope.dimension_count", head_dim),
                       ("attention.head_count", shape.n_head), ("attention.head_count_kv", shape.n_head_kv)):
        w.add(f"{ARCH}.{key}", int(value))
    w.add(f"{ARCH}.attention.layer_norm_rms_epsilon", float(shape.eps))
    w.add(f"{ARCH}.rope.freq_base", float(shape.rope_base))
    write_byte_tokenizer(w, shape.n_vocab)

    embd = model.model.embed_tokens.weight.detach().numpy()
    embd16 = embd.astype(np.float16)
    assert np.array_equal(embd16.astype(np.float32), embd), "embedding is not exactly representable in f16"
    w.add_array("token_embd.weight", embd16)
    w.add_array("output_norm.weight", model.model.norm.weight.detach().numpy().astype(np.float32))
    for i, layer in enumerate(model.model.layers):
        for name, module_path in NORMS.items():
            w.add_array(f"blk.{i}.{name}.weight", layer.get_submodule(module_path).weight.detach().numpy())
        for name, module_path in PROJECTIONS.items():
            codes, scale = ternarize(layer.get_submodule(module_path).weight.detach())
            w.add_tensor(f"blk.{i}.{name}.weight", codes.shape, "I2_S", quants.i2s_encode(codes, float(scale)))
    w.write()
    return path


def logits(model: BitNetForCausalLM, ids: Sequence[int]) -> np.ndarray:
    """float32 logits (len(ids), vocab) of one forward pass over `ids`."""
    with eager():
        out = model(torch.tensor([list(ids)], dtype=torch.long), use_cache=False).logits
    return out[0].numpy()


def greedy(model: BitNetForCausalLM, ids: Sequence[int], n: int) -> list[int]:
    """n greedy tokens after `ids`, each from a full recompute of the whole sequence (no KV cache)."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(np.argmax(logits(model, seq)[-1])))
    return seq[len(ids):]
