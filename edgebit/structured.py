"""Structured outputs: constrained decoding with llguidance, driven by the model's own tokenizer.

llguidance (the grammar engine llama.cpp uses) turns a JSON schema into a grammar and, at each step,
computes which tokens of the vocabulary can continue a valid document; `Grammar` hands that mask
to the sampler (`edgebit.sampling.Constraint`). Whatever the weights say, the text then parses and
validates against the schema once the grammar completes (a generation cut by `max_tokens` can
still be incomplete: its finish_reason is "length").

llguidance is an optional dependency (`pip install 'edgebit[http]'`); importing this module works
without it, building a grammar then says what to install.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from .tokenizer import Tokenizer

INSTALL_HINT = "structured outputs need llguidance: pip install 'edgebit[http]'"
# Any JSON object (response_format json_object): a schema llguidance compiles to an object grammar.
ANY_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarError(ValueError):
    """A schema llguidance cannot compile (the message says why)."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return llguidance


class _VocabularyAdapter:
    """What llguidance's TokenizerWrapper reads: token bytes, EOS/BOS, special ids, and encoding."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int) -> None:
        self._tokenizer = tokenizer
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.tokens += [b""] * (n_vocab - len(self.tokens))  # embedding rows beyond the vocabulary
        stops = sorted(tokenizer.stop_ids)
        self.eos_token_id = stops[0] if stops else tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)


class GrammarFactory:
    """Compiles schemas for one model's vocabulary (building llguidance's token index takes a while,
    so it is done once, on first use)."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int) -> None:
        self.tokenizer = tokenizer
        self.n_vocab = n_vocab
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()

    def _lltok(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                llg = _llguidance()
                adapter = _VocabularyAdapter(self.tokenizer, self.n_vocab)
                # every stop id ends a document, so the grammar allows them exactly where it may end
                self._ll_tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(adapter), n_vocab=self.n_vocab,
                                                     eos_token=sorted(self.tokenizer.stop_ids) or None)
            return self._ll_tokenizer

    def json_schema(self, schema: dict[str, Any]) -> Grammar:
        """A constraint producing one JSON document valid against `schema` (compact, no free white space)."""
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), overrides={"whitespace_flexible": False})
        except ValueError as exc:
            raise GrammarError(f"the JSON schema cannot be used: {exc}") from None
        tok = self._lltok()
        error = llg.LLMatcher.validate_grammar(grammar, tok)
        if error and not error.startswith("WARNING"):
            raise GrammarError(f"the JSON schema cannot be used: {error}")
        matcher = llg.LLMatcher(tok, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the JSON schema cannot be used: {matcher.get_error()}")
        return Grammar(matcher, self.n_vocab)


class Grammar:
    """A `Constraint` backed by an llguidance matcher (one per generation: it keeps the parse state)."""

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        self._matcher = matcher
        self.n_vocab = n_vocab
        self._words = (n_vocab + 31) // 32
        self._bits = np.arange(32, dtype=np.uint32)

    def allowed(self) -> np.ndarray:
        words = np.full(self._words, -1, dtype=np.int32)
        self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        self._check()
        bits = (words.view(np.uint32)[:, None] >> self._bits) & 1
        return bits.reshape(-1)[: self.n_vocab].astype(bool)

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)
        self._check()

    def finished(self) -> bool:
        return bool(self._matcher.is_stopped())

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GrammarError(f"structured output failed: {self._matcher.get_error()}")
