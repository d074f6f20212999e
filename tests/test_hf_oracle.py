"""edgebit against an independent oracle: Hugging Face transformers' `BitNetForCausalLM` (see hf_oracle.py).

Each model is built in code, written to GGUF and loaded with `edgebit.load`; logits of every prompt
position must agree within 1e-4 of the logit range, and 32 greedy tokens must be identical.

Why the seeds are fixed: edgebit computes BitLinear as (exact integer T·x_q)/γ·s, transformers as
F.linear(x_q/γ, codes/s) (and torch evaluates 127/max|x| as 127·(1/max|x|), one ulp off in a quarter
of the rows). These float32 differences of a few ulps now and then move one activation across an int8
rounding boundary (measured: ~1e-5 per quantised activation); from there on the logits of the sequence
differ by ~1e-3..1e-2 of their range. Of 19-26-token prompts, about 10% (rope10k), 20% (gqa8x2) and
25% (rope500k) contain such a flip. The seeds below are ones whose prompts and greedy runs contain none,
chosen for wide greedy top-2 margins (>= 0.017). Any error in the model's arithmetic (RoPE style, GQA
mapping, norm placement, activation, scales, rounding) moves the logits by far more than 1e-4 of their
range on every seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

# torch and transformers are test oracles only: without them these tests are skipped (README, "Tests").
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from hf_oracle import NORMS, PROJECTIONS, OracleShape, build_model, eager, greedy, logits, ternarize, write_gguf
from transformers import BitNetForCausalLM
from transformers.integrations.bitnet import ActQuant

import edgebit
from edgebit.engine import Model
from edgebit.transformer import Transformer
from edgebit.weights import load_ternary

RTOL = 1e-4  # of the logit range (max - min) of a prompt
N_GREEDY = 32
TEXTS = (b"the quick brown fox", b"sensor reading: 21.5 C", b"once upon a time there was")

MODELS = {
    # sharp, position-dependent attention (q/k init std 0.2), multi-head attention, head_dim 64
    "rope10k": OracleShape(n_vocab=300, n_embd=128, n_layer=2, n_head=2, n_head_kv=2, n_ff=256,
                           rope_base=10000.0, eps=1e-5, qk_std=0.2, seed=3),
    # grouped-query attention: 8 query heads share 2 kv heads
    "gqa8x2": OracleShape(n_vocab=300, n_embd=256, n_layer=2, n_head=8, n_head_kv=2, n_ff=256,
                          rope_base=10000.0, eps=1e-5, qk_std=0.1, seed=9),
    # BitNet-b1.58-2B4T's rope base, eps and head_dim 128, GQA 2:1
    "rope500k": OracleShape(n_vocab=300, n_embd=256, n_layer=2, n_head=2, n_head_kv=1, n_ff=512,
                            rope_base=500000.0, eps=1e-6, qk_std=0.1, seed=28),
}


@dataclass
class Pair:
    """One random model as the oracle sees it and as edgebit loads it from its GGUF file."""

    hf: BitNetForCausalLM
    edgebit: Model


PROMPTS = [list(text) for text in TEXTS]  # in a byte-level vocabulary, token b is byte b


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    shape = MODELS[request.param]
    hf = build_model(shape)
    path = write_gguf(hf, shape, tmp_path_factory.mktemp("oracle") / f"{request.param}.gguf")
    return Pair(hf, edgebit.load(path))


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| in units of the reference's logit range."""
    return float(np.abs(got - ref).max() / (ref.max() - ref.min()))


def test_gguf_round_trip(pair: Pair) -> None:
    """edgebit reads back exactly the codes, scales, embedding and norms transformers computes with."""
    t = pair.edgebit.transformer
    np.testing.assert_array_equal(t.lm_head.embedding, pair.hf.model.embed_tokens.weight.detach().numpy())
    for i, layer in enumerate(pair.hf.model.layers):
        for name, module in NORMS.items():
            expected = layer.get_submodule(module).weight.detach().numpy()
            np.testing.assert_array_equal(getattr(t.layers[i], name), expected)
        for name, module in PROJECTIONS.items():
            codes, scale = ternarize(layer.get_submodule(module).weight.detach())
            weight = load_ternary(pair.edgebit.gguf, f"blk.{i}.{name}.weight")
            assert np.float32(weight.scale) == scale
            np.testing.assert_array_equal(weight.codes(), codes)


def test_logits_match_transformers(pair: Pair) -> None:
    for ids in PROMPTS:
        ref = logits(pair.hf, ids)
        got = pair.edgebit.logits(ids)
        assert got.shape == ref.shape
        err = relative_error(got, ref)
        assert err <= RTOL, f"prompt {ids}: max |diff| = {err:.2e} of the logit range"


def test_oracle_is_position_sensitive(pair: Pair) -> None:
    """The same forward pass with every position 0 (RoPE disabled) is far outside the tolerance."""
    t = pair.edgebit.transformer
    for ids in PROMPTS:
        ref = logits(pair.hf, ids)
        hidden = t.forward(np.array(ids), pair.edgebit.new_cache(), positions=np.zeros(len(ids), dtype=np.int64))
        assert relative_error(t.logits(hidden), ref) > 100 * RTOL


def test_greedy_matches_transformers(pair: Pair) -> None:
    stop_ids = pair.edgebit.tokenizer.stop_ids
    for ids in PROMPTS:
        expected = greedy(pair.hf, ids, N_GREEDY)
        assert not stop_ids & set(expected), "fixture: the oracle's continuation should not contain a stop id"
        got = pair.edgebit.complete(prompt=ids, max_tokens=N_GREEDY, temperature=0)
        assert got.token_ids == expected
        assert got.finish_reason == "length"


def test_activation_quantization_matches_actquant() -> None:
    """The int8 codes equal transformers' ActQuant's, including ties (round half to even); x_q/γ agrees
    to 2 ulp (torch's γ = 127·(1/max|x|) can differ from edgebit's correctly rounded 127/max|x| by one)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 256)) * rng.uniform(0.01, 10.0, (64, 1))).astype(np.float32)
    ties = np.array([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5], np.float32)  # γ = 1: x itself is rounded
    x[0, : ties.size], x[0, ties.size :] = ties, 0.0
    xq, gamma = Transformer.quantize_activations(x)
    with eager():
        expected = ActQuant.apply(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(xq[0, : ties.size], [127, 0, 2, 2, 0, -2, -2, 126])
    np.testing.assert_array_equal(xq, np.rint(expected * gamma))
    np.testing.assert_allclose(xq / gamma, expected, rtol=2**-22, atol=0)
