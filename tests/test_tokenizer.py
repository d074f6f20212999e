"""Tokenizer conformance (spec §5, §10.8): llama.cpp's vocab test vectors, WikiText ids, the bitnet.cpp
reference prompt, the SentencePiece fixtures, special tokens, and streaming detokenisation."""

from __future__ import annotations

import heapq
import json
import logging
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgebit.gguf import GGUFFile
from edgebit.tokenizer import Tokenizer, TokenizerError

TESTDATA = Path(__file__).resolve().parent.parent.parent / "shared" / "testdata"
LLAMACPP = TESTDATA / "llamacpp"
LLAMA3_GGUF = TESTDATA / "derived" / "llama3-vocab-from-tiktoken.gguf"
REFERENCE_MODELS = TESTDATA / "reference-models"
DUMMY_GGUF = REFERENCE_MODELS / "bitnet-s512.i2_s.gguf"
SEPARATOR = "\n__ggml_vocab_test__\n"
PRE_KEY = "tokenizer.ggml.pre"

# Text pieces that stress byte-level and SentencePiece handling, mixed into hypothesis strings.
TRICKY = [
    "🦙",
    "👨‍👩‍👧‍👦",
    "中文字",
    "ខ្មែរ",
    "é",
    " ",
    "  ",
    "\n",
    "\r\n",
    "\t",
    "'s",
    "'LL",
    "2024",
    "▁",
    "\x00",
]
texts = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(TRICKY)), max_size=12).map("".join)


@cache
def vocab_cases(vocab: str) -> list[tuple[str, list[int]]]:
    """The (text, ids) cases of llama.cpp's `<vocab>.inp/.out` (testdata README §2)."""
    inp = (LLAMACPP / f"{vocab}.inp").read_bytes().decode("utf-8")
    out = (LLAMACPP / f"{vocab}.out").read_bytes().decode("utf-8")
    strings, pos = [], 0
    while pos < len(inp):
        end = inp.index(SEPARATOR, pos)
        strings.append(inp[pos:end])
        pos = end + len(SEPARATOR)
    lines = out.split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(strings)
    return [(s, [int(x) for x in line.split()]) for s, line in zip(strings, lines[:-1], strict=True)]


def _byte_level(data: bytes) -> str:
    """GPT-2 byte-to-unicode form of `data`, written out independently of edgebit."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    others = [b for b in range(256) if b not in keep]
    return "".join(chr(b) if b in keep else chr(0x100 + others.index(b)) for b in data)


def tiny_bpe_meta(**changes: Any) -> dict[str, Any]:
    """A 261-token byte-level vocabulary: 256 bytes, 'hi', 'Ġhi', BOS, EOS, <|eot_id|>."""
    tokens = [_byte_level(bytes([b])) for b in range(256)] + ["hi", "Ġhi"]
    tokens += ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array([1] * 258 + [3] * 3, dtype=np.int32),
        "tokenizer.ggml.merges": ["h i", "Ġ hi"],
        "tokenizer.ggml.bos_token_id": 258,
        "tokenizer.ggml.eos_token_id": 259,
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def llamacpp_spm(tokens: list[str], scores: np.ndarray, text: str) -> list[int]:
    """Oracle: llama.cpp's SentencePiece loop (highest-scoring adjacent pair first, leftmost on ties,
    then byte pieces for what is not in the vocabulary), written directly from its description."""
    vocab = {t: i for i, t in enumerate(tokens)}
    symbols = list(("▁" + text).replace(" ", "▁")) if text else []
    nxt = list(range(1, len(symbols))) + [-1]
    prv = list(range(-1, len(symbols) - 1))
    queue: list[tuple[float, int, int, int]] = []

    def push(left: int, right: int) -> None:
        if left >= 0 and right >= 0 and (merged := symbols[left] + symbols[right]) in vocab:
            heapq.heappush(queue, (-float(scores[vocab[merged]]), left, right, len(merged)))

    for i in range(1, len(symbols)):
        push(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not symbols[left] or not symbols[right] or len(symbols[left]) + len(symbols[right]) != size:
            continue  # stale: one side was merged away since this pair was queued
        symbols[left] += symbols[right]
        symbols[right] = ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        push(prv[left], left)
        push(left, nxt[left])
    ids, i = [], 0 if symbols else -1
    while i >= 0:
        piece = symbols[i]
        ids += [vocab[piece]] if piece in vocab else [vocab[f"<0x{b:02X}>"] for b in piece.encode()]
        i = nxt[i]
    return ids


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def llama3_meta() -> dict[str, Any]:
    with GGUFFile(LLAMA3_GGUF) as f:
        return dict(f.metadata)


@pytest.fixture(scope="session")
def llama3(llama3_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_metadata(llama3_meta, source=str(LLAMA3_GGUF))


@pytest.fixture(scope="session")
def llama3_nopre(llama3_meta: dict[str, Any]) -> Tokenizer:
    """The LLaMA-3 vocabulary as the official 2B4T file stores it: without tokenizer.ggml.pre."""
    return Tokenizer.from_metadata({k: v for k, v in llama3_meta.items() if k != PRE_KEY})


@pytest.fixture(scope="session")
def llama3_default(llama3_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_metadata(llama3_meta, pre="llamacpp-default")


@pytest.fixture(scope="session")
def gpt2() -> Tokenizer:
    return Tokenizer.from_gguf(LLAMACPP / "ggml-vocab-gpt-2.gguf")


@pytest.fixture(scope="session")
def spm_meta() -> dict[str, Any]:
    with GGUFFile(LLAMACPP / "ggml-vocab-llama-spm.gguf") as f:
        return dict(f.metadata)


@pytest.fixture(scope="session")
def spm(spm_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_metadata(spm_meta)


@pytest.fixture(scope="session")
def dummy_meta() -> dict[str, Any]:
    with GGUFFile(DUMMY_GGUF) as f:
        return dict(f.metadata)


@pytest.fixture(scope="session")
def dummy(dummy_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_metadata(dummy_meta, source=str(DUMMY_GGUF))


# ----------------------------------------------------------------------------- llama.cpp test vectors

VECTOR_SETS = {
    "llama3": "ggml-vocab-llama-bpe.gguf",
    "llama3_nopre": "ggml-vocab-llama-bpe.gguf",
    "gpt2": "ggml-vocab-gpt-2.gguf",
    "spm": "ggml-vocab-llama-spm.gguf",
}


def test_vector_files_hold_46_cases() -> None:
    for vocab in set(VECTOR_SETS.values()):
        assert len(vocab_cases(vocab)) == 46
    assert ("\n", [198]) in vocab_cases("ggml-vocab-llama-bpe.gguf")


@pytest.mark.parametrize("index", range(46))
@pytest.mark.parametrize("name", VECTOR_SETS)
def test_llamacpp_vector(request: pytest.FixtureRequest, name: str, index: int) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    text, expected = vocab_cases(VECTOR_SETS[name])[index]
    assert tok.encode(text) == expected
    assert tok.decode(expected) == text


def test_pre_modes(llama3: Tokenizer, llama3_nopre: Tokenizer, gpt2: Tokenizer, spm: Tokenizer) -> None:
    assert (llama3.pre_mode, llama3_nopre.pre_mode, gpt2.pre_mode, spm.pre_mode) == (
        "llama3",
        "llama3",
        "gpt2",
        None,
    )
    assert (llama3.model, gpt2.model, spm.model) == ("gpt2", "gpt2", "llama")


def test_wikitext_ids_round_trip(llama3: Tokenizer) -> None:
    text = (TESTDATA / "wikitext-2" / "wiki.test.raw").read_bytes().decode("utf-8")
    expected = [int(x) for x in (TESTDATA / "derived" / "wiki.test.raw.llama3.ids").read_text().split()]
    assert len(expected) == 288_936
    ids = llama3.encode(text)
    assert ids == expected
    assert llama3.decode(ids) == text
    stream = llama3.stream_decoder()
    assert "".join([stream.push(i) for i in ids]) + stream.flush() == text


def test_bitnet_2b4t_reference_prompt_and_output(llama3_nopre: Tokenizer) -> None:
    ref = TESTDATA / "bitnet-2b4t-reference"
    prompt = (ref / "prompt.txt").read_text().rstrip("\n")
    assert llama3_nopre.encode(prompt, bos=True) == json.loads(
        (ref / "expected.i2s_2b.prompt_tokens.json").read_text()
    )
    generated = json.loads((ref / "expected.i2s_2b.tokens.json").read_text())
    assert llama3_nopre.decode(generated) == (
        "ters,\n\nI have a question about the use of the `__import__` function in Python. "
        "I understand that it is used to dynamically import a module,"
    )


# ------------------------------------------------------------------------------ pre-tokenizer modes

SPLIT_TABLE = [  # spec §5.3
    (
        "It's 2024, ok?",
        ["It", "'s", " ", "202", "4", ",", " ok", "?"],
        ["It", "'", "s", " ", "202", "4", ",", " ok", "?"],
    ),
    (
        "don't (yes) e.g.",
        ["don", "'t", " (", "yes", ")", " e", ".g", "."],
        ["don", "'", "t", " ", "(", "yes", ")", " e", ".", "g", "."],
    ),
]


@pytest.mark.parametrize(("text", "llama3_split", "default_split"), SPLIT_TABLE)
def test_split_table(
    llama3: Tokenizer,
    llama3_default: Tokenizer,
    text: str,
    llama3_split: list[str],
    default_split: list[str],
) -> None:
    assert llama3.pre_tokenize(text) == llama3_split
    assert llama3_default.pre_tokenize(text) == default_split
    assert llama3_default.pre_mode == "llamacpp-default"


def test_llamacpp_default_mode_runs_all_merges(llama3: Tokenizer, llama3_default: Tokenizer) -> None:
    # testdata README §3: without ignore_merges "Cửa Việt" takes the long merge path.
    assert llama3.encode("Cửa Việt") == [34, 91163, 101798]
    assert llama3_default.encode("Cửa Việt") == [34, 91163, 11655, 26298, 83]
    assert llama3_default.encode("It's") == [2181, 6, 82]
    assert llama3.encode("It's") == [2181, 596]


def test_missing_pre_key_uses_llama3_split_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="edgebit.tokenizer"):
        tok = Tokenizer.from_metadata(tiny_bpe_meta(), source="official.gguf")
    assert tok.pre_mode == "llama3"
    assert tok.add_bos  # llama.cpp's default for the LLaMA-3 pre-tokenizer family
    assert any("official.gguf" in r.getMessage() and "LLaMA-3" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("pre", "mode", "add_bos"),
    [
        ("llama-bpe", "llama3", True),
        ("llama3", "llama3", True),
        ("llama-v3", "llama3", True),
        ("gpt-2", "gpt2", False),
        ("default", "llamacpp-default", False),
    ],
)
def test_pre_key_values(pre: str, mode: str, add_bos: bool) -> None:
    tok = Tokenizer.from_metadata(tiny_bpe_meta(**{PRE_KEY: pre}))
    assert (tok.pre_mode, tok.add_bos) == (mode, add_bos)
    assert tok.encode("hi hi") == [256, 257]


def test_pre_override_and_add_bos_key() -> None:
    meta = tiny_bpe_meta(**{"tokenizer.ggml.add_bos_token": False})
    tok = Tokenizer.from_metadata(meta, pre="llamacpp-default")
    assert tok.pre_mode == "llamacpp-default" and not tok.add_bos
    assert Tokenizer.from_metadata(meta, pre="gpt2").pre_mode == "gpt2"


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"tokenizer.ggml.model": None}, ["tokenizer.ggml.model", "missing"]),
        ({"tokenizer.ggml.model": "bert"}, ["tokenizer.ggml.model", "'bert'", "gpt2", "llama"]),
        ({"tokenizer.ggml.tokens": None}, ["tokenizer.ggml.tokens", "missing"]),
        ({"tokenizer.ggml.tokens": "abc"}, ["tokenizer.ggml.tokens"]),
        ({"tokenizer.ggml.token_type": np.ones(5, np.int32)}, ["tokenizer.ggml.token_type", "5"]),
        ({"tokenizer.ggml.merges": None}, ["tokenizer.ggml.merges", "missing"]),
        ({"tokenizer.ggml.merges": ["h i", "hi"]}, ["tokenizer.ggml.merges", "entry 1"]),
        ({"tokenizer.ggml.merges": ["h q"]}, ["tokenizer.ggml.merges", "tokenizer.ggml.tokens"]),
        ({"tokenizer.ggml.bos_token_id": 999}, ["tokenizer.ggml.bos_token_id", "999"]),
        ({"tokenizer.ggml.add_bos_token": "yes"}, ["tokenizer.ggml.add_bos_token"]),
        ({PRE_KEY: "qwen2"}, [PRE_KEY, "'qwen2'", "llama-bpe", "gpt-2", "default"]),
    ],
)
def test_bad_metadata_is_named(changes: dict[str, Any], words: list[str]) -> None:
    meta = tiny_bpe_meta(**changes)  # a None value removes the key
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_metadata(meta, source="broken.gguf")
    message = str(err.value)
    assert "broken.gguf" in message
    for word in words:
        assert word in message


def test_bad_arguments(dummy_meta: dict[str, Any]) -> None:
    with pytest.raises(TokenizerError, match="llamacpp-default"):
        Tokenizer.from_metadata(tiny_bpe_meta(), pre="qwen2")
    with pytest.raises(TokenizerError, match="only to gpt2"):
        Tokenizer.from_metadata(dummy_meta, pre="llama3")
    no_scores = {k: v for k, v in dummy_meta.items() if k != "tokenizer.ggml.scores"}
    with pytest.raises(TokenizerError, match="tokenizer.ggml.scores"):
        Tokenizer.from_metadata(no_scores, source="x.gguf")
    tok = Tokenizer.from_metadata(tiny_bpe_meta(**{"tokenizer.ggml.bos_token_id": None}))
    assert tok.bos_id is None
    with pytest.raises(TokenizerError, match="bos"):
        tok.encode("hi", bos=True)
    with pytest.raises(TokenizerError):
        tok.encode(b"hi")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- special tokens


def test_llama3_special_ids(llama3: Tokenizer) -> None:
    assert (llama3.vocab_size, llama3.bos_id, llama3.eos_id, llama3.eot_id) == (
        128256,
        128000,
        128001,
        128009,
    )
    assert llama3.stop_ids == frozenset({128001, 128009})
    assert llama3.add_bos and not llama3.add_space_prefix
    assert llama3.is_special(128009) and llama3.is_special(128255) and not llama3.is_special(9906)
    assert llama3.token_bytes(128009) == b"<|eot_id|>"
    assert llama3.token_bytes(220) == b" " and llama3.token_text(220) == "Ġ"


def test_special_text_is_inert_unless_asked(llama3: Tokenizer) -> None:
    ids = llama3.encode("<|eot_id|>")
    assert 128009 not in ids and not any(llama3.is_special(i) for i in ids)
    assert llama3.decode(ids) == "<|eot_id|>"
    assert llama3.encode("<|eot_id|>", special=True) == [128009]
    assert llama3.encode("Hi<|eot_id|>there", special=True) == [
        *llama3.encode("Hi"),
        128009,
        *llama3.encode("there"),
    ]
    assert llama3.encode("<|eot_id|><|eot_id|>", special=True) == [128009, 128009]


def test_bos_is_added_once(llama3: Tokenizer) -> None:
    assert llama3.encode("Hello", bos=True) == [128000, 9906]
    assert llama3.encode("", bos=True) == [128000]
    assert llama3.encode("<|begin_of_text|>Hello", bos=True, special=True) == [128000, 9906]
    plain = llama3.encode("<|begin_of_text|>Hello", bos=True)
    assert plain[0] == 128000 and plain.count(128000) == 1 and len(plain) > 2


def test_decode_skips_control_tokens(llama3: Tokenizer) -> None:
    ids = [128000, 9906, 128009]
    assert llama3.decode(ids) == "Hello"
    assert llama3.decode(ids, skip_special=False) == "<|begin_of_text|>Hello<|eot_id|>"
    assert llama3.decode(np.array(ids)) == "Hello"
    assert llama3.decode([9468, 99]) == "\ufffd"  # the first two bytes of 🦙
    for bad in (-1, 128256):
        with pytest.raises(TokenizerError, match=str(bad)):
            llama3.decode([9906, bad])
        with pytest.raises(TokenizerError):
            llama3.token_bytes(bad)


def test_gpt2_vocab_specials(gpt2: Tokenizer) -> None:
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.eot_id) == (50256, 50256, None)
    assert gpt2.stop_ids == frozenset({50256})
    assert not gpt2.add_bos  # no add_bos_token key, pre "gpt-2": llama.cpp's default is False
    assert gpt2.encode("<|endoftext|>") != [50256]
    assert gpt2.encode("<|endoftext|>", special=True) == [50256]


def test_marked_specials_beyond_128000_are_special_whatever_their_type() -> None:
    filler = [f"<pad_{i}>" for i in range(128000 - 256)]
    tokens = [_byte_level(bytes([b])) for b in range(256)] + filler + ["<|begin_of_text|>", "<|eot_id|>"]
    tok = Tokenizer.from_metadata(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.ones(len(tokens), np.int32),  # all NORMAL
            "tokenizer.ggml.merges": [],
            "tokenizer.ggml.bos_token_id": 128000,
        }
    )
    assert tok.is_special(128001) and tok.eot_id == 128001 and tok.stop_ids == frozenset({128001})
    assert 128001 not in tok.encode("<|eot_id|>")
    assert tok.encode("a<|eot_id|>", special=True) == [ord("a"), 128001]
    assert tok.decode([128000, ord("a"), 128001]) == "a"
    assert not tok.is_special(300)


# ------------------------------------------------------------------------------------ SentencePiece

MANIFEST = json.loads((REFERENCE_MODELS / "manifest.json").read_text())
REFERENCE_PROMPTS = sorted(
    {(g["prompt"], tuple(g["prompt_ids"])) for m in MANIFEST["models"] for g in m.get("greedy", [])}
    | {
        (s["source_text"], tuple(s["ids"]))
        for m in MANIFEST["models"]
        for s in m.get("reference_outputs", {}).get("sequences", [])
    }
)


def test_spm_properties(dummy: Tokenizer, spm: Tokenizer) -> None:
    for tok in (dummy, spm):
        assert (tok.model, tok.bos_id, tok.eos_id, tok.eot_id) == ("llama", 1, 2, None)
        assert tok.stop_ids == frozenset({2}) and tok.add_bos and tok.add_space_prefix
    assert dummy.vocab_size == 1000 and spm.vocab_size == 32000


def test_ppl_text_tokens(dummy: Tokenizer) -> None:
    text = (REFERENCE_MODELS / "ppl_text.txt").read_bytes().decode("utf-8")
    expected = json.loads((REFERENCE_MODELS / "ppl_text.tokens.json").read_text())
    assert "\n" in text and len(expected) == 3952
    assert dummy.encode(text, bos=True) == expected
    assert dummy.decode(expected) == text


@pytest.mark.parametrize("model", [m["file"] for m in MANIFEST["models"]])
def test_reference_prompts(model: str) -> None:
    tok = Tokenizer.from_gguf(REFERENCE_MODELS / model)
    assert len(REFERENCE_PROMPTS) == 7
    for text, ids in REFERENCE_PROMPTS:
        assert tok.encode(text, bos=tok.add_bos) == list(ids), text


def test_spm_specials_bytes_and_spaces(dummy: Tokenizer, dummy_meta: dict[str, Any]) -> None:
    assert dummy.encode("\n") == [909, 13]  # "▁" then the byte piece <0x0A>
    assert dummy.token_bytes(13) == b"\n" and dummy.token_text(13) == "<0x0A>"
    assert dummy.decode(dummy.encode("é\tü")) == "é\tü"
    assert 1 not in dummy.encode("<s>")
    # After a special token llama.cpp starts a new text run, with its own "▁".
    assert dummy.encode("<s>hello", special=True) == [1, *dummy.encode("hello")]
    assert dummy.decode(dummy.encode("  two", bos=True)) == "  two"
    assert dummy.decode([1, *dummy.encode("hi")], skip_special=False) == "<s> hi"
    no_prefix = Tokenizer.from_metadata({**dummy_meta, "tokenizer.ggml.add_space_prefix": False})
    assert not no_prefix.add_space_prefix
    assert no_prefix.decode(no_prefix.encode(" hello")) == " hello"
    assert no_prefix.encode(" hello") == dummy.encode("hello")


@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_spm_matches_llamacpp_algorithm(
    dummy: Tokenizer, dummy_meta: dict[str, Any], spm: Tokenizer, spm_meta: dict[str, Any], text: str
) -> None:
    for tok, meta in ((dummy, dummy_meta), (spm, spm_meta)):
        expected = llamacpp_spm(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], text)
        assert tok.encode(text) == expected


@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_spm_round_trip(dummy: Tokenizer, spm: Tokenizer, text: str) -> None:
    # llama.cpp escapes spaces as ▁ and unescapes every ▁, so a typed ▁ comes back as a space.
    for tok in (dummy, spm):
        ids = tok.encode(text)
        assert not any(tok.is_special(i) for i in ids)
        assert tok.decode(ids) == text.replace("▁", " ")


# ------------------------------------------------------------------------------ byte-level round trip


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_byte_level_round_trip(llama3: Tokenizer, gpt2: Tokenizer, text: str) -> None:
    for tok in (llama3, gpt2):
        ids = tok.encode(text)
        assert not any(tok.is_special(i) for i in ids)
        assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.one_of(texts, st.sampled_from(["<|eot_id|>", "<|begin_of_text|>"])), max_size=5))
def test_special_parsing_round_trip(llama3: Tokenizer, parts: list[str]) -> None:
    text = "".join(parts)
    ids = llama3.encode(text, special=True)
    assert llama3.decode(ids, skip_special=False) == text
    assert ids.count(128009) == text.count("<|eot_id|>")


# ------------------------------------------------------------------------------------ stream decoder


def _stream(tok: Tokenizer, ids: list[int], **kwargs: bool) -> tuple[list[str], str]:
    decoder = tok.stream_decoder(**kwargs)
    return [decoder.push(i) for i in ids], decoder.flush()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_stream_equals_decode_for_any_ids(llama3: Tokenizer, dummy: Tokenizer, data: st.DataObject) -> None:
    for tok, kwargs in ((llama3, {}), (dummy, {"strip_leading_space": True})):
        ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
        pushes, tail = _stream(tok, ids, **kwargs)
        assert "".join(pushes) + tail == tok.decode(ids)
        pushes, tail = _stream(tok, ids, skip_special=False, **kwargs)
        assert "".join(pushes) + tail == tok.decode(ids, skip_special=False)


@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_stream_never_emits_partial_characters(llama3: Tokenizer, dummy: Tokenizer, text: str) -> None:
    for tok in (llama3, dummy):
        ids = tok.encode(text)
        expected = tok.decode(ids)
        pushes, tail = _stream(tok, ids, strip_leading_space=True)
        shown = ""
        for piece in pushes:
            shown += piece
            assert expected.startswith(shown)
        assert shown == expected and tail == ""


def test_stream_holds_back_split_emoji(llama3: Tokenizer) -> None:
    ids = llama3.encode("🦙!")
    assert [llama3.token_bytes(i) for i in ids] == [b"\xf0\x9f", b"\xa6", b"\x99", b"!"]
    assert _stream(llama3, ids) == (["", "", "🦙", "!"], "")
    assert _stream(llama3, ids[:2]) == (["", ""], "\ufffd")  # a truly broken tail
    assert _stream(llama3, [128000, 9906, 128009]) == (["", "Hello", ""], "")
    with pytest.raises(TokenizerError):
        llama3.stream_decoder().push(128256)


def test_spm_stream_keeps_the_continuation_space(dummy: Tokenizer) -> None:
    ids = dummy.encode("hello world")
    assert "".join(_stream(dummy, ids)[0]) == " hello world"  # generated text continues a prompt
    assert "".join(_stream(dummy, ids, strip_leading_space=True)[0]) == "hello world"
