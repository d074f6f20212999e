"""The training recipe (edgebit/train.py): the exported GGUF computes what the torch model computes,
and a trained classifier carries its prompt and labels to `Model.classify`."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import edgebit
from edgebit import train
from edgebit.sensors_data import LABELS, TEMPLATE, generate
from edgebit.tokenizer import Tokenizer

SMALL = train.TrainConfig(n_vocab=384, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, n_ctx=96, steps=30,
                          batch=16, eval_every=0, threads=1)


@pytest.fixture(scope="module")
def rows() -> list[tuple[str, str]]:
    return [(e.text, e.label) for e in generate(400, "train", seed=3)]


@pytest.fixture(scope="module")
def trained(rows: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    model, meta, report = train.train(SMALL, rows[:300], rows[300:340], LABELS, TEMPLATE, log=lambda _: None)
    path = train.export(model, meta, tmp_path_factory.mktemp("train") / "micro.gguf", LABELS, TEMPLATE)
    return model, meta, report, Path(path)


def test_exported_model_matches_the_torch_model(trained: tuple) -> None:
    """edgebit's forward pass on the GGUF equals the torch forward (eval mode) on the same weights:
    the ternary codes, scales, norms, RoPE, GQA and relu² agree; only the f16 embedding is rounded,
    so torch gets the rounded embedding too."""
    model, meta, _, path = trained
    m = edgebit.load(path, backend="reference")
    ids = m.tokenizer.encode('zigbee2mqtt/hall {"temperature": 21.4, "battery": 87}\nstatus: normal', bos=True)
    with torch.no_grad():
        model.token_embd.copy_(model.token_embd.half().float())
        expected = model(torch.tensor([ids]))[0].numpy()
    got = m.logits(ids)
    assert got.shape == expected.shape == (len(ids), SMALL.n_vocab)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=2e-3 * scale, rtol=0)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).mean() > 0.95


def test_classify_uses_the_stored_template_and_labels(trained: tuple) -> None:
    model, _, _, path = trained
    m = edgebit.load(path, backend="reference")
    assert m.classify_template == TEMPLATE and m.classify_labels == list(LABELS)
    text = "boiler temp 97C, pressure 2.1 bar"
    implicit = m.classify(text)
    explicit = m.classify(text, list(LABELS), prompt=TEMPLATE)
    assert implicit == explicit
    # the same ranking as the torch model's own label scoring
    tok = m.tokenizer
    best = train.predict(model, tok, TEMPLATE, [text], LABELS)[0]
    scores = implicit["scores"]
    assert max(scores, key=scores.get) == LABELS[best]


def test_vocabulary_is_byte_level_bpe_with_bos(trained: tuple) -> None:
    _, meta, _, path = trained
    tok = edgebit.load_tokenizer(path)
    assert tok.vocab_size == SMALL.n_vocab and tok.add_bos and tok.bos_id == SMALL.n_vocab - 2
    text = "tele/loft_tank/SENSOR {\"DS18B20\":{\"Temperature\":97.1}} ünïcode ✓"
    assert tok.decode(tok.encode(text)) == text


def test_label_sequence_starts_where_the_label_starts(trained: tuple) -> None:
    _, meta, _, _ = trained
    tok = edgebit.tokenizer.Tokenizer.from_metadata(meta)
    ids, start = train.label_sequence(tok, TEMPLATE, "co2 1450 ppm", "warning")
    assert ids[0] == tok.bos_id
    assert tok.decode(ids[start:]).strip() == "warning"
    assert tok.decode(ids[:start]).endswith("status:")


def test_training_reports_held_out_accuracy(trained: tuple) -> None:
    _, _, report, _ = trained
    assert 0.0 <= report["accuracy"] <= 1.0 and report["train_sequences"] == 300


def test_noise_tokens_go_inside_the_message_only(trained: tuple) -> None:
    """with_noise inserts 1-3 filler tokens (no digits, no control tokens) between BOS and the
    template's tail, moves the label start with them, keeps every label token, and never makes a
    sequence longer than n_ctx."""
    _, meta, _, _ = trained
    tok = Tokenizer.from_metadata(meta, source="test")
    fillers = train.filler_tokens(tok)
    assert fillers and not any(tok.is_special(i) or any(chr(b).isdigit() for b in tok.token_bytes(i))
                               for i in fillers)
    rows = [(e.text, e.label) for e in generate(40, "train", seed=5)]
    data = train.encode_dataset(tok, TEMPLATE, rows, LABELS, n_ctx=96)
    noisy = train.with_noise(data, range(len(data.ids)), fillers, 1.0, random.Random(0), n_ctx=96)
    grown = 0
    for r, ids in enumerate(noisy.ids):
        before, start = data.ids[r], data.starts[r]
        added = len(ids) - len(before)
        grown += added > 0
        assert 0 <= added <= 3 and len(ids) <= 96 and noisy.starts[r] == start + added
        assert ids[0] == before[0] and ids[-(len(before) - start + 4):] == before[start - 4:]  # tail + label
        assert noisy.label_ids[r] == data.label_ids[r]
    assert grown > len(noisy.ids) // 2


def test_training_is_reproducible_on_two_threads(rows: list[tuple[str, str]]) -> None:
    """Same data, seed and thread count: bit-identical weights (the bundled model's recipe trains on
    two threads; deterministic algorithms keep the embedding's backward in a fixed order)."""
    config = train.TrainConfig(**{**SMALL.__dict__, "threads": 2, "steps": 12})
    runs = [train.train(config, rows[:200], [], LABELS, TEMPLATE, log=lambda _: None)[0] for _ in range(2)]
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(a, b)
