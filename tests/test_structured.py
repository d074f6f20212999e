"""Constrained decoding with llguidance: the mask the sampler sees, and outputs that always validate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

import edgebit  # noqa: E402
from edgebit.engine import Model  # noqa: E402
from edgebit.structured import GrammarError, GrammarFactory  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Model:
    return edgebit.load(tiny_model, backend="reference")


@pytest.fixture(scope="module")
def grammars(model: Model) -> GrammarFactory:
    return GrammarFactory(model.tokenizer, model.config.n_vocab)


SCHEMA = {"type": "object", "properties": {"level": {"enum": ["low", "high"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["level", "n"], "additionalProperties": False}


def test_mask_allows_exactly_the_grammar(model: Model, grammars: GrammarFactory) -> None:
    g = grammars.json_schema(SCHEMA)
    allowed = g.allowed()
    assert allowed.shape == (model.config.n_vocab,) and allowed.dtype == bool
    assert {model.tokenizer.token_bytes(int(i)) for i in np.flatnonzero(allowed)} == {b"{"}
    assert not g.finished()


@pytest.mark.parametrize("seed", range(20))
def test_sampled_output_validates(model: Model, grammars: GrammarFactory, seed: int) -> None:
    out = model.complete(prompt="State:", max_tokens=100, temperature=1.5, seed=seed,
                         constraint=grammars.json_schema(SCHEMA))
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), SCHEMA)


def test_greedy_constrained_picks_the_best_allowed_token(model: Model, grammars: GrammarFactory) -> None:
    """The constraint removes tokens; among the rest, greedy still takes the arg-max."""
    out = model.complete(prompt="x", max_tokens=60, temperature=0, constraint=grammars.json_schema(SCHEMA))
    g = grammars.json_schema(SCHEMA)
    ids = model.tokenizer.encode("x", bos=True)
    for token in out.token_ids:
        logits = model.logits(ids)[-1]
        assert token == int(np.argmax(np.where(g.allowed(), logits, -np.inf)))
        g.accept(token)
        ids.append(token)
    assert out.finish_reason == "stop" and g.finished()
    jsonschema.validate(json.loads(out.text), SCHEMA)


def test_bad_schema_names_the_problem(grammars: GrammarFactory) -> None:
    with pytest.raises(GrammarError, match="JSON schema"):
        grammars.json_schema({"type": "no-such-type"})
