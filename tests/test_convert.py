"""edgebit convert: Hugging Face BitNet checkpoints → GGUF, checked against transformers' BitNet as the oracle.

Every model here is a small random `BitNetForCausalLM` (tests/hf_oracle.py) saved the way its kind
is published: float weights as transformers saves them, the packed uint8 + `weight_scale` layout of
`microsoft/bitnet-b1.58-2B-4T` (packed here by spec §4.9, with numpy), a bf16 master, and a
1bitLLM-style checkpoint (SiLU, `inner_attn_ln`/`ffn_layernorm`, SentencePiece tokenizer.model).

Tolerance. edgebit and transformers do the same float32 math in a different order, so logits agree
to ~1e-6 of their range — until one activation lands within an ulp of an int8 rounding boundary
(x·γ = k + 0.5). Then the two sides round that element differently, and every later position that
attends to it shifts by ~0.05. `assert_logits_match` therefore demands 1e-4 of the logit range on the
first rows and on most rows, and the same argmax on every row that is within tolerance.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# torch and transformers are test oracles only: without them these tests are skipped (README, "Tests").
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from hf_oracle import OracleShape, build_model, eager, ternarize
from hf_oracle import logits as hf_logits
from transformers import BitNetForCausalLM
from transformers.activations import ACT2FN

import edgebit
from edgebit.convert import ConvertError, absmean_ternary, convert, unpack_rows
from edgebit.gguf import GGUFFile
from edgebit.spm_model import SpmError, parse_spm
from edgebit.synthetic import byte_merges, byte_vocab
from edgebit.tokenizer import LLAMA3_PATTERN, Tokenizer
from edgebit.weights import load_ternary

SHAPE = OracleShape(n_vocab=384, n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, rope_base=500000.0,
                    eps=1e-5, qk_std=0.2, seed=3)
IDS = [256, 72, 101, 108, 108, 111, 32, 66, 105, 116, 78, 101, 116, 33, 10, 300]
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")


def assert_logits_match(ours: np.ndarray, theirs: np.ndarray, first_rows: int = 4) -> None:
    """1e-4 of the logit range on the first rows and on >= 75% of rows; argmax equal where within tolerance."""
    tol = 1e-4 * float(np.ptp(theirs))
    diff = np.abs(ours - theirs).max(axis=1)
    close = diff <= tol
    assert close[:first_rows].all(), f"first rows differ: {diff[:first_rows]} (tolerance {tol:.2e})"
    assert close.mean() >= 0.75, f"too many rows differ: {diff} (tolerance {tol:.2e})"
    assert (ours.argmax(1) == theirs.argmax(1))[close].all()


def write_byte_tokenizer(directory: Path, n_vocab: int) -> None:
    """tokenizer.json of `byte_vocab(n_vocab)`: byte-level BPE with its merges, the LLaMA-3 split and
    the special tokens as added tokens — the layout of the 2B4T's tokenizer.json."""
    tokens, types = byte_vocab(n_vocab)
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty == 1}
    merges = [tuple(m.split(" ", 1)) for m in byte_merges(n_vocab)]
    tok = HFTokenizer(models.BPE(vocab=normal, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=True)
                            if ty == 3])
    tok.save(str(directory / "tokenizer.json"))


def state_of(model: BitNetForCausalLM) -> dict[str, np.ndarray]:
    """The float32 state dict as a checkpoint stores it (tied LM head left out)."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def save_dir(directory: Path, tensors: dict[str, np.ndarray], config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def pack_rows(codes: np.ndarray) -> np.ndarray:
    """Spec §4.9: row r = i·(M/4) + p goes to bits 2i..2i+1 of packed row p (code = value + 1)."""
    q = (codes.astype(np.int16) + 1).astype(np.uint8)
    p = q.shape[0] // 4
    return q[:p] | (q[p : 2 * p] << 2) | (q[2 * p : 3 * p] << 4) | (q[3 * p :] << 6)


def gguf_logits(path: Path, ids: list[int] = IDS) -> np.ndarray:
    return edgebit.load(path).logits(ids)


@pytest.fixture(scope="module")
def oracle() -> BitNetForCausalLM:
    return build_model(SHAPE)


@pytest.fixture(scope="module")
def config(oracle: BitNetForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("cfg")
    oracle.save_pretrained(d)
    return json.loads((d / "config.json").read_text())


@pytest.fixture(scope="module")
def float_dir(oracle: BitNetForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint exactly as transformers saves it (online quantisation, float32 weights)."""
    d = tmp_path_factory.mktemp("hf-float")
    oracle.save_pretrained(d)
    write_byte_tokenizer(d, SHAPE.n_vocab)
    return d


@pytest.fixture(scope="module")
def float_logits(float_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    out = tmp_path_factory.mktemp("out") / "float.gguf"
    convert(float_dir, out)
    return gguf_logits(out)


def test_transformers_checkpoint_matches_transformers(oracle, float_logits):
    names = set(state_of(oracle))
    assert "model.layers.0.self_attn.attn_sub_norm.weight" in names and "lm_head.weight" not in names
    assert_logits_match(float_logits, hf_logits(oracle, IDS))


def test_metadata_and_tensor_types(float_dir, tmp_path):
    out = tmp_path / "m.gguf"
    result = convert(float_dir, out, name="tiny")
    assert (result.arch, result.weight_type, result.tokenizer, result.scale_direction) == (
        "bitnet-b1.58", "I2_S", "gpt2", None)
    f = GGUFFile(out)
    meta = f.metadata
    assert meta["general.architecture"] == "bitnet-b1.58" and meta["general.name"] == "tiny"
    expect = {"embedding_length": 256, "block_count": 2, "feed_forward_length": 512, "attention.head_count": 4,
              "attention.head_count_kv": 2, "context_length": 256, "vocab_size": 384, "rope.dimension_count": 64}
    assert {k: meta[f"bitnet-b1.58.{k}"] for k in expect} == expect
    assert meta["bitnet-b1.58.rope.freq_base"] == 500000.0
    assert abs(meta["bitnet-b1.58.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-12
    assert meta["tokenizer.ggml.pre"] == "llama-bpe" and meta["tokenizer.ggml.model"] == "gpt2"
    tokens, types = byte_vocab(SHAPE.n_vocab)
    assert list(meta["tokenizer.ggml.tokens"]) == tokens
    assert list(meta["tokenizer.ggml.token_type"]) == list(types)
    assert list(meta["tokenizer.ggml.merges"]) == byte_merges(SHAPE.n_vocab) != []
    assert meta["tokenizer.ggml.eot_token_id"] == tokens.index("<|eot_id|>")
    assert len(f.tensors) == 2 + 2 * 11
    assert f.tensors["token_embd.weight"].type.name == "F16"
    assert f.tensors["blk.1.ffn_down.weight"].type.name == "I2_S"
    assert f.tensors["blk.1.ffn_sub_norm.weight"].type.name == "F32"


def test_tq2_0_holds_the_same_codes_with_f16_scales(float_dir, float_logits, tmp_path):
    """TQ2_0 keeps the ternary codes and rounds each scale to f16. That rounding moves activations by
    ~5e-4 relative, enough to flip int8 roundings, so the weights are compared exactly, not the logits."""
    convert(float_dir, tmp_path / "i2s.gguf")
    convert(float_dir, tmp_path / "tq.gguf", weight_type="tq2_0")
    i2s, tq = GGUFFile(tmp_path / "i2s.gguf"), GGUFFile(tmp_path / "tq.gguf")
    for name, info in i2s.tensors.items():
        if info.type.name != "I2_S":
            assert np.array_equal(tq.tensor_bytes(name), i2s.tensor_bytes(name)), name
            continue
        assert tq.tensors[name].type.name == "TQ2_0"
        a, b = load_ternary(i2s, name), load_ternary(tq, name)
        assert np.array_equal(a.codes(), b.codes()), name
        assert b.scale == float(np.float16(a.scale)), name
    ours = gguf_logits(tmp_path / "tq.gguf")
    assert np.corrcoef(ours.ravel(), float_logits.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
def test_packed_checkpoint_weight_scale_direction(oracle, config, tmp_path, linear_class):
    """The 2B4T layout: uint8 (M/4, K) + weight_scale. transformers multiplies by weight_scale in
    AutoBitLinear and divides by it in BitLinear; edgebit's "auto" must pick what transformers does."""
    tensors = state_of(oracle)
    for i in range(SHAPE.n_layer):
        for p in PROJ:
            name = f"model.layers.{i}.{p}.weight"
            codes, beta = ternarize(torch.from_numpy(tensors[name]))
            tensors[name] = pack_rows(codes)
            stored = beta if linear_class == "autobitlinear" else np.float32(1) / beta
            tensors[f"model.layers.{i}.{p}.weight_scale"] = np.array([stored], dtype=np.float32)
    cfg = dict(config, quantization_config={"quant_method": "bitnet", "linear_class": linear_class,
                                            "quantization_mode": "offline"})
    d = save_dir(tmp_path / "packed", tensors, cfg)
    write_byte_tokenizer(d, SHAPE.n_vocab)
    with eager():
        packed_model = BitNetForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    theirs = hf_logits(packed_model, IDS)
    assert_logits_match(theirs, hf_logits(oracle, IDS))  # transformers reads the packed file as intended

    result = convert(d, tmp_path / "auto.gguf")
    assert result.scale_direction == ("multiply" if linear_class == "autobitlinear" else "divide")
    assert_logits_match(gguf_logits(tmp_path / "auto.gguf"), theirs)
    wrong = "divide" if linear_class == "autobitlinear" else "multiply"
    convert(d, tmp_path / "wrong.gguf", weight_scale=wrong)
    assert np.abs(gguf_logits(tmp_path / "wrong.gguf") - theirs).max() > 0.05 * np.ptp(theirs)


def test_bf16_master_checkpoint(oracle, config, tmp_path):
    """bf16 weights everywhere (the -bf16 master): absmean ternarisation of the bf16 values."""
    from safetensors.torch import save_file as save_torch

    d = tmp_path / "bf16"
    d.mkdir()
    save_torch({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state_of(oracle).items()},
               str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config))
    write_byte_tokenizer(d, SHAPE.n_vocab)
    with eager():
        theirs = hf_logits(BitNetForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), IDS)
    convert(d, tmp_path / "bf16.gguf")
    assert_logits_match(gguf_logits(tmp_path / "bf16.gguf"), theirs)


# --- SentencePiece tokenizer.model (protobuf written here by hand, read by edgebit.spm_model)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes | float) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(value)


def spm_bytes(pieces: list[str], scores: list[float], types: list[int], bos: int = 1, eos: int = 2,
              pad: int = -1, dummy_prefix: bool = True) -> bytes:
    """A ModelProto: pieces (1), trainer_spec (2: model_type 3, unk 40, bos 41, eos 42, pad 43),
    normalizer_spec (3: add_dummy_prefix 3)."""
    out = b"".join(_field(1, _field(1, p.encode()) + _field(2, float(s)) + (_field(3, t) if t != 1 else b""))
                   for p, s, t in zip(pieces, scores, types, strict=True))
    out += _field(2, _field(3, 2) + _field(40, 0) + _field(41, bos) + _field(42, eos) + _field(43, pad))
    return out + _field(3, _field(1, b"identity") + _field(3, int(dummy_prefix)))


def small_spm() -> tuple[list[str], list[float], list[int]]:
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    normal = ["\u2581", "t", "h", "e", "a", "i", "n", "\u2581t", "he", "\u2581the", "\u2581a", "in", "\u2581in"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(normal)
    scores = [0.0] * 259 + [-float(i) for i in range(1, len(normal) + 1)]
    pieces += normal
    return pieces, scores, types


def test_spm_parser_reads_llama_vocab(testdata):
    src = GGUFFile(testdata / "llamacpp" / "ggml-vocab-llama-spm.gguf").metadata
    tokens = list(src["tokenizer.ggml.tokens"])
    scores = [float(s) for s in src["tokenizer.ggml.scores"]]
    types = [int(t) for t in src["tokenizer.ggml.token_type"]]
    spm = parse_spm(spm_bytes(tokens, scores, types, pad=-1))
    assert spm.pieces == tokens and spm.types == types
    assert np.array_equal(np.float32(spm.scores), np.float32(scores))
    assert (spm.bos_id, spm.eos_id, spm.pad_id, spm.unk_id, spm.model_type) == (1, 2, -1, 0, "bpe")


@pytest.mark.parametrize("data", [b"", b"\x0a\x05ab", b"\x0a\x02\x0a\xff", b"\x0b\x00", b"\xff" * 12])
def test_spm_parser_rejects_garbage(data):
    with pytest.raises(SpmError):
        parse_spm(data)


def test_spm_parser_names_tiktoken_files(testdata):
    with pytest.raises(SpmError, match="tiktoken"):
        parse_spm((testdata / "llama3" / "tokenizer.model").read_bytes())


def test_1bitllm_style_checkpoint(tmp_path):
    """Arch `bitnet`: BitnetForCausalLM, SiLU, 1bitLLM norm names, rope_theta 10000, tokenizer.model."""
    shape = OracleShape(n_vocab=384, n_embd=128, n_layer=2, n_head=4, n_head_kv=4, n_ff=256, rope_base=10000.0,
                        eps=1e-5, qk_std=0.2, seed=11)
    model = build_model(shape)
    model.config.hidden_act = "silu"
    for layer in model.model.layers:
        layer.mlp.act_fn = ACT2FN["silu"]
    renames = {"self_attn.attn_sub_norm": "self_attn.inner_attn_ln", "mlp.ffn_sub_norm": "mlp.ffn_layernorm"}
    tensors = {}
    for k, v in state_of(model).items():
        for old, new in renames.items():
            k = k.replace(old, new)
        tensors[k] = v
    cfg = {"architectures": ["BitnetForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "rope_scaling": None, "vocab_size": 384, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 383,
           "tie_word_embeddings": True}
    d = save_dir(tmp_path / "1bit", tensors, cfg)
    pieces, scores, types = small_spm()
    (d / "tokenizer.model").write_bytes(spm_bytes(pieces, scores, types))
    result = convert(d, tmp_path / "bitnet.gguf")
    assert (result.arch, result.tokenizer) == ("bitnet", "llama")
    meta = GGUFFile(tmp_path / "bitnet.gguf").metadata
    assert meta["bitnet.rope.freq_base"] == 10000.0 and meta["tokenizer.ggml.model"] == "llama"
    assert list(meta["tokenizer.ggml.tokens"])[: len(pieces)] == pieces
    assert list(meta["tokenizer.ggml.tokens"])[len(pieces):] == [f"[PAD{i}]" for i in range(len(pieces), 384)]
    assert list(meta["tokenizer.ggml.token_type"])[len(pieces):] == [5] * (384 - len(pieces))
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.padding_token_id"], meta["tokenizer.ggml.unknown_token_id"]) == (1, 2, 383, 0)
    ours = edgebit.load(tmp_path / "bitnet.gguf")
    assert ours.config.activation == "silu"
    ids = [1, 260, 262, 40, 41, 263, 100, 300, 301, 7, 8, 9]
    assert_logits_match(ours.logits(ids), hf_logits(model, ids))
    assert ours.tokenizer.encode("the in") == [pieces.index("\u2581the"), pieces.index("\u2581in")]


def _random_dir(directory: Path, n_vocab: int) -> Path:
    """A 1-layer float checkpoint with a given vocabulary size, for tokenizer conversions."""
    rng = np.random.default_rng(0)
    e, f = 128, 256
    t = {"model.embed_tokens.weight": (rng.standard_normal((n_vocab, e)) * 0.05).astype(np.float16),
         "model.norm.weight": np.ones(e, np.float32)}
    for name, size in (("input_layernorm", e), ("post_attention_layernorm", e), ("self_attn.attn_sub_norm", e),
                       ("mlp.ffn_sub_norm", f)):
        t[f"model.layers.0.{name}.weight"] = np.ones(size, np.float32)
    for name, shape in zip(PROJ, [(e, e)] * 4 + [(f, e), (f, e), (e, f)], strict=True):
        t[f"model.layers.0.{name}.weight"] = rng.standard_normal(shape).astype(np.float32)
    cfg = {"architectures": ["BitNetForCausalLM"], "hidden_size": e, "intermediate_size": f, "num_hidden_layers": 1,
           "num_attention_heads": 2, "vocab_size": n_vocab, "bos_token_id": 1, "eos_token_id": 2}
    return save_dir(directory, t, cfg)


def test_llama_spm_tokenizer_round_trip(testdata, tmp_path):
    """tokenizer.model → GGUF gives the same tokenizer as llama.cpp's own llama-spm vocabulary."""
    ref_path = testdata / "llamacpp" / "ggml-vocab-llama-spm.gguf"
    src = GGUFFile(ref_path).metadata
    d = _random_dir(tmp_path / "spm", len(src["tokenizer.ggml.tokens"]))
    (d / "tokenizer.model").write_bytes(spm_bytes(list(src["tokenizer.ggml.tokens"]),
                                                  [float(s) for s in src["tokenizer.ggml.scores"]],
                                                  [int(t) for t in src["tokenizer.ggml.token_type"]]))
    convert(d, tmp_path / "spm.gguf")
    ours, ref = Tokenizer.from_gguf(str(tmp_path / "spm.gguf")), Tokenizer.from_gguf(str(ref_path))
    cases = (testdata / "llamacpp" / "ggml-vocab-llama-spm.gguf.inp").read_bytes().decode().split(
        "\n__ggml_vocab_test__\n")[:-1]
    assert len(cases) == 46
    for text in cases:
        assert ours.encode(text) == ref.encode(text), text


def test_llama3_tokenizer_json(testdata, tmp_path):
    """A LLaMA-3 tokenizer.json (as the 2B4T ships) → the same vocabulary, merges and split as llama.cpp's."""
    ref_path = testdata / "derived" / "llama3-vocab-from-tiktoken.gguf"
    ref = GGUFFile(ref_path).metadata
    tokens, types = list(ref["tokenizer.ggml.tokens"]), list(ref["tokenizer.ggml.token_type"])
    merges = [tuple(m.split(" ", 1)) for m in ref["tokenizer.ggml.merges"]]
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens[:128000])}, merges=merges,
                                 ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens[128000:]])
    d = _random_dir(tmp_path / "l3", len(tokens))
    tok.save(str(d / "tokenizer.json"))
    json.dump({"add_bos_token": True, "chat_template": "{{ bos_token }}"}, open(d / "tokenizer_config.json", "w"))
    convert(d, tmp_path / "l3.gguf")
    meta = GGUFFile(tmp_path / "l3.gguf").metadata
    assert list(meta["tokenizer.ggml.tokens"]) == tokens
    assert list(meta["tokenizer.ggml.merges"]) == list(ref["tokenizer.ggml.merges"])
    assert list(meta["tokenizer.ggml.token_type"]) == types
    assert meta["tokenizer.ggml.pre"] == "llama-bpe" and meta["tokenizer.ggml.eot_token_id"] == 128009
    assert meta["tokenizer.chat_template"] == "{{ bos_token }}"
    ours, theirs = Tokenizer.from_gguf(str(tmp_path / "l3.gguf")), Tokenizer.from_gguf(str(ref_path))
    for text in (testdata / "llamacpp" / "ggml-vocab-llama-bpe.gguf.inp").read_bytes().decode().split(
            "\n__ggml_vocab_test__\n")[:-1]:
        assert ours.encode(text) == theirs.encode(text), text


# --- unit checks and errors


def test_unpack_rows_inverts_spec_packing():
    rng = np.random.default_rng(1)
    codes = rng.integers(-1, 2, size=(16, 8), dtype=np.int8)
    assert np.array_equal(unpack_rows(pack_rows(codes)), codes)
    with pytest.raises(ConvertError, match="code 3"):
        unpack_rows(np.full((1, 4), 0xFF, np.uint8))


def test_absmean_matches_transformers_weight_quant():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 128)) * 0.02).astype(np.float32)
    codes, scale = absmean_ternary(w)
    ref_codes, ref_scale = ternarize(torch.from_numpy(w))
    assert np.array_equal(codes, ref_codes) and scale == ref_scale
    assert absmean_ternary(np.zeros((2, 2), np.float32))[1] == np.float32(1e-5)


def _edit(d: Path, tensors: dict | None = None, config: dict | None = None, drop: tuple[str, ...] = ()) -> None:
    from safetensors.numpy import load_file

    t = load_file(str(d / "model.safetensors"))
    t.update(tensors or {})
    for name in drop:
        t.pop(name)
    save_file(t, str(d / "model.safetensors"))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))


@pytest.fixture
def small_dir(tmp_path: Path) -> Path:
    d = _random_dir(tmp_path / "m", 300)
    write_byte_tokenizer(d, 300)
    return d


def test_small_dir_converts(small_dir, tmp_path):
    assert convert(small_dir, tmp_path / "ok.gguf").tensors == 13


@pytest.mark.parametrize("change, message", [
    (lambda d: os.remove(d / "tokenizer.json"), "tokenizer.json.*tokenizer.model"),
    (lambda d: _edit(d, {"model.layers.0.self_attn.q_proj.bias": np.zeros(128, np.float32)}), "unexpected tensors"),
    (lambda d: _edit(d, drop=("model.layers.0.mlp.ffn_sub_norm.weight",)), "ffn_sub_norm.*missing"),
    (lambda d: _edit(d, {"model.layers.0.self_attn.q_proj.weight": np.ones((32, 128), np.uint8)}),
     "packed weight without"),
    (lambda d: _edit(d, {"model.layers.0.self_attn.q_proj.weight_scale": np.ones(1, np.float32)}),
     "no quantization_config"),
    (lambda d: _edit(d, {"model.layers.0.self_attn.q_proj.weight": np.ones((128, 64), np.float32)}),
     r"shape \(128, 64\)"),
    (lambda d: (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}'), "not a BitNet model"),
    (lambda d: (d / "config.json").write_text("{"), "config.json"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{}"), "safetensors"),
])
def test_errors_name_the_problem(small_dir, tmp_path, change, message):
    change(small_dir)
    with pytest.raises(ConvertError, match=message):
        convert(small_dir, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.gguf.part").exists()


def test_weight_scale_on_non_ternary_float_weight_is_rejected(small_dir, tmp_path):
    _edit(small_dir, {"model.layers.0.self_attn.q_proj.weight_scale": np.ones(1, np.float32)})
    with pytest.raises(ConvertError, match="not all -1, 0 or \\+1"):
        convert(small_dir, tmp_path / "bad.gguf", weight_scale="multiply")


def test_tq2_0_needs_rows_of_256(small_dir, tmp_path):
    with pytest.raises(ConvertError, match="multiple of 256"):
        convert(small_dir, tmp_path / "bad.gguf", weight_type="TQ2_0")
