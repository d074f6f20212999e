"""The public engine API on a small random model: logits, generation, stops, perplexity, classify."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgebit
from edgebit.engine import ContextLengthError, Generation, Model
from edgebit.synthetic import write_random_model


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Model:
    return edgebit.load(tiny_model, backend="reference")


@pytest.fixture()
def no_stop_tokens(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random weights may well pick EOS early; tests of length and stop strings need room."""
    monkeypatch.setattr(model.tokenizer, "stop_ids", frozenset())


PROMPT = [509, 10, 20, 30, 40]  # BOS of the byte vocabulary, then byte tokens


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def test_info(model: Model) -> None:
    info = model.info
    assert info["arch"] == "bitnet-b1.58" and info["block_count"] == 2 and info["vocab_size"] == 512
    assert info["tensor_types"] == {"F16": 1, "F32": 9, "I2_S": 14}
    assert info["parameters"] == sum(t.n_elements for t in model.gguf.tensors.values())


def test_logits_batching_does_not_change_results(model: Model) -> None:
    ids = list(range(1, 60))
    full = model.logits(ids)
    assert full.dtype == np.float32 and full.shape == (59, 512)
    chunked = model.prefill(model.new_cache(), ids, batch=7, all_logits=True)
    np.testing.assert_array_equal(chunked, full)  # attention is computed per row: no batch effects


def test_greedy_generation_follows_argmax(model: Model, no_stop_tokens: None) -> None:
    out = model.complete(prompt=PROMPT, max_tokens=12, temperature=0)
    ids = list(PROMPT)
    for token in out.token_ids:
        assert token == int(np.argmax(model.logits(ids)[-1]))
        ids.append(token)
    assert out.finish_reason == "length" and out.completion_tokens == 12
    assert out.usage == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}


def test_streaming_equals_plain_and_seed_reproduces(model: Model, no_stop_tokens: None) -> None:
    kwargs = dict(prompt=PROMPT, max_tokens=20, temperature=1.0, seed=5)
    gen = model.generate(stream=True, **kwargs)
    assert isinstance(gen, Generation)
    pieces = list(gen)
    assert "".join(pieces) == model.generate(**kwargs) == gen.text
    assert model.complete(**kwargs).token_ids == gen.token_ids


def test_stop_string_cuts_text(model: Model, no_stop_tokens: None) -> None:
    text = model.complete(prompt="hello", max_tokens=30, temperature=0).text
    assert len(text) > 8
    stop = text[4:7]
    cut = model.complete(prompt="hello", max_tokens=30, temperature=0, stop=[stop])
    assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"
    streamed = "".join(model.generate(prompt="hello", max_tokens=30, temperature=0, stop=stop, stream=True))
    assert streamed == cut.text


def test_stop_token_ends_generation(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model.tokenizer, "stop_ids", frozenset())
    free = model.complete(prompt=PROMPT, max_tokens=10, temperature=0)
    monkeypatch.setattr(model.tokenizer, "stop_ids", frozenset({free.token_ids[3]}))
    stopped = model.complete(prompt=PROMPT, max_tokens=10, temperature=0)
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[3])]


def test_context_length(model: Model, no_stop_tokens: None) -> None:
    n_ctx = model.config.n_ctx
    with pytest.raises(ContextLengthError, match=str(n_ctx)):
        model.logits([1] * (n_ctx + 1))
    with pytest.raises(ContextLengthError):
        model.generate(prompt=[1] * n_ctx, max_tokens=5)
    out = model.complete(prompt=[1] * (n_ctx - 3), max_tokens=50, temperature=0)
    # 3 generated tokens fill the context; a 4th is sampled from the last position's logits
    assert out.finish_reason == "length" and out.completion_tokens == 4


def test_bad_token_ids_and_arguments(model: Model) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.logits([1, 9999])
    with pytest.raises(ValueError, match="exactly one"):
        model.generate()


def test_perplexity_by_hand(model: Model) -> None:
    """llama-perplexity: windows of ctx, first token -> BOS, second half scored."""
    text = "The quick brown fox jumps over the lazy dog. " * 6
    ctx = 32
    ids = model.tokenizer.encode(text, bos=True)
    nll = []
    for k in range(len(ids) // ctx):
        chunk = ids[k * ctx : (k + 1) * ctx]
        chunk[0] = model.tokenizer.bos_id
        lp = _log_softmax(model.logits(chunk))
        nll += [-lp[i, chunk[i + 1]] for i in range(ctx // 2, ctx - 1)]
    assert model.perplexity(text, ctx=ctx) == pytest.approx(np.exp(np.mean(nll)), rel=1e-6)
    with pytest.raises(ValueError, match="at least ctx"):
        model.perplexity("short", ctx=128)


@pytest.fixture(scope="module", params=["bytes", "llama3", "spm"])
def vocab_model(request: pytest.FixtureRequest, model: Model, testdata: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Model:
    """A random model with the test byte-level vocabulary, LLaMA-3's (BPE) or LLaMA's (SentencePiece)."""
    if request.param == "bytes":
        return model
    vocab, size = {"llama3": ("derived/llama3-vocab-from-tiktoken.gguf", 128256),
                   "spm": ("llamacpp/ggml-vocab-llama-spm.gguf", 32000)}[request.param]
    path = write_random_model(tmp_path_factory.mktemp("vocab") / f"{request.param}.gguf", "tiny", n_vocab=size,
                              n_layer=1, tokenizer_from=testdata / vocab)
    return edgebit.load(path, backend="reference")


def _hand_scores(model: Model, prompt: str, labels: list[str], sep: str) -> dict[str, float]:
    """Each label's probability from Model.logits of the canonical encoding encode(prompt + sep + label),
    normalised over the labels (the tokens before the labels differ are common and cancel)."""
    tok = model.tokenizer
    logp = []
    for label in labels:
        ids = tok.encode(prompt + sep + label, bos=tok.add_bos, special=True)
        lp = _log_softmax(model.logits(ids))
        logp.append(sum(lp[i - 1, ids[i]] for i in range(1, len(ids))))
    p = np.exp(np.array(logp) - max(logp))
    return dict(zip(labels, p / p.sum(), strict=True))


@pytest.mark.parametrize("template, labels", [
    ("Report: {text}\nState:", ["normal", "warning", "critical"]),
    ("Report: {text}\nState: ", ["warn", "warning", "critical failure"]),  # labels merge with the space
    (None, ["normal", "warning", "critical"]),  # the default template, with {labels}
])
def test_classify_scores_the_canonical_tokens(vocab_model: Model, template: str | None, labels: list[str]) -> None:
    """The tokens scored are exactly those of encode(filled prompt + sep + label), whatever the vocabulary
    (fragments encoded apart give other tokens: LLaMA-3 merges across the {text} seams, SentencePiece
    adds a '▁' to every fragment). Identical texts in one batch share nothing they should not."""
    texts = ["boiler 95C", "boiler 95C", "all quiet, 21C"]
    results = vocab_model.classify_batch(texts, labels, template)
    filled = template or edgebit.classify.default_template(vocab_model.tokenizer)
    sep = "" if filled[-1].isspace() else " "  # a space before the label unless the prompt ends in one
    for text, result in zip(texts, results, strict=True):
        want = _hand_scores(vocab_model, filled.replace("{labels}", ", ".join(labels)).replace("{text}", text),
                            labels, sep)
        assert result["scores"] == pytest.approx(want, abs=1e-5)
        assert result["label"] == max(want, key=want.get)
    uncached = vocab_model.classify_batch(texts, labels, template, use_prefix_cache=False)
    assert [r["label"] for r in uncached] == [r["label"] for r in results]


def test_llama3_prompt_tokens_cross_the_template_seams(testdata: Path) -> None:
    """The issue's example: the filled prompt is one token sequence, not the fragments' concatenation."""
    tok = edgebit.tokenizer.Tokenizer.from_gguf(testdata / "derived" / "llama3-vocab-from-tiktoken.gguf")
    whole = tok.encode("Report: boiler 95C\nState: critical")
    assert whole == [10577, 25, 28725, 220, 2721, 34, 198, 1423, 25, 9200]
    assert tok.encode("Report: ") + tok.encode("boiler 95C") + tok.encode("\nState:") + tok.encode(" critical") != whole


def test_classify_prefix_cache_and_batching(model: Model) -> None:
    labels = ["ok", "bad news", "x"]
    texts = ["first message", "a second, longer message here", "3"]
    template = "Some fixed instructions and examples. {text} =>"
    cached = model.classify_batch(texts, labels, template)
    uncached = model.classify_batch(texts, labels, template, use_prefix_cache=False)
    singles = [model.classify(t, labels, template) for t in texts]
    for a, b, c in zip(cached, uncached, singles, strict=True):
        assert a["label"] == b["label"] == c["label"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
        assert a["scores"] == pytest.approx(c["scores"], abs=1e-5)
        assert sum(a["scores"].values()) == pytest.approx(1.0)


def test_classify_validates(model: Model) -> None:
    with pytest.raises(ValueError, match="labels"):
        model.classify("x", [])
    with pytest.raises(ValueError, match="distinct"):
        model.classify("x", ["a", "a"])
    with pytest.raises(ValueError, match=r"\{text\}"):
        model.classify("x", ["a", "b"], prompt="no placeholder")


def test_load_reports_progress_per_layer(tiny_model: Path) -> None:
    seen: list[tuple[int, int]] = []
    edgebit.load(tiny_model, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]


def test_lm_head_forms(tiny_model: Path) -> None:
    """float16 and float32 heads are exact (identical logits); int8 is an opt-in approximation."""
    ids = [509, 1, 2, 3, 4]
    f32 = edgebit.load(tiny_model, lm_head="float32", backend="reference").logits(ids)
    f16 = edgebit.load(tiny_model, lm_head="float16", backend="reference")
    assert f16.info["lm_head"] == "float16"
    np.testing.assert_array_equal(f16.logits(ids), f32)
    i8 = edgebit.load(tiny_model, lm_head="int8", backend="reference").logits(ids)
    assert 0 < np.abs(i8 - f32).max() < 0.05 * (f32.max() - f32.min())
