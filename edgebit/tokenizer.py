"""Text ↔ token ids for GGUF models, built on Hugging Face `tokenizers` (spec §5).

Two vocabulary kinds are supported, chosen by `tokenizer.ggml.model`:

* ``"gpt2"``: byte-level BPE (BitNet b1.58 2B4T, LLaMA-3 vocabulary). The pre-tokenizer comes from
  `tokenizer.ggml.pre`, or from the ``pre=`` override (see `PRE_MODES`).
* ``"llama"``: SentencePiece-style BPE as llama.cpp runs it (1bitLLM models, the test vocabularies):
  one "▁" is prepended, spaces become "▁", pieces merge in score order, characters outside the
  vocabulary fall back to ``<0xXX>`` byte pieces.

Special tokens (CONTROL, USER_DEFINED and UNKNOWN entries, and in gpt2 vocabularies every ``<|…|>``
entry at id >= 128000) are kept out of the `tokenizers` model, so user text can never turn into
them; ``encode(..., special=True)`` splits their texts out first, the way llama.cpp does. Decoding
works on a per-token byte table, which makes it exact for byte tokens and cheap to stream.
"""

from __future__ import annotations

import codecs
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import Regex, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .gguf import GGUFFile

log = logging.getLogger(__name__)

# llama.cpp token types (spec §5.1).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer patterns (spec §5.3). These are regular expressions for `tokenizers`, not code.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMACPP_DEFAULT_PATTERNS = (
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)

# Pre-tokenizer modes: the LLaMA-3 split the 2B4T model was trained with, GPT-2's own split, and the
# four sequential regexes llama.cpp/bitnet.cpp fall back to ("default"), for bit-exact comparisons.
PRE_MODES = ("llama3", "gpt2", "llamacpp-default")
# `tokenizer.ggml.pre` values (and `pre=` spellings) → mode. Names follow llama.cpp's loader.
PRE_ALIASES = {
    "llama3": "llama3",
    "llama-v3": "llama3",
    "llama-bpe": "llama3",
    "gpt-2": "gpt2",
    "gpt2": "gpt2",
    "default": "llamacpp-default",
    "llamacpp-default": "llamacpp-default",
}

# Texts llama.cpp treats as end-of-generation besides EOS (spec §5.2).
STOP_TEXTS = frozenset(
    {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>"}
)

_KEY = "tokenizer.ggml."
# Entries of these types are never produced from user text and are parsed only with special=True.
_PARSED_TYPES = frozenset({UNKNOWN, CONTROL, USER_DEFINED})
# Entries of these types print nothing when decoding with skip_special (USER_DEFINED text always prints).
_HIDDEN_TYPES = frozenset({UNKNOWN, CONTROL, UNUSED})
_SPM_SPACE = "\u2581"
_Fail = Callable[[str, str], "TokenizerError"]


class TokenizerError(ValueError):
    """The tokenizer metadata or a call argument is unusable; the message names the file and key."""


def _gpt2_char_to_byte() -> dict[int, int]:
    """GPT-2's byte-level alphabet, inverted: code point → byte (spec §5.1)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    code_point = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in code_point:
            code_point[b] = 0x100 + extra
            extra += 1
    return {cp: b for b, cp in code_point.items()}


_CHAR_TO_BYTE = _gpt2_char_to_byte()
# str.translate table for the fast path; characters outside the alphabet become U+FFFF, which
# cannot be encoded as Latin-1 and so sends the token down the slow path.
_TRANSLATE = {cp: chr(b) for cp, b in _CHAR_TO_BYTE.items()} | {
    c: "\uffff" for c in range(256) if c not in _CHAR_TO_BYTE
}


def _byte_level_bytes(text: str) -> bytes:
    """The bytes a byte-level BPE token stands for. Stray characters keep their UTF-8 form."""
    try:
        return text.translate(_TRANSLATE).encode("latin-1")
    except UnicodeEncodeError:
        return b"".join(
            bytes([_CHAR_TO_BYTE[ord(c)]]) if ord(c) in _CHAR_TO_BYTE else c.encode() for c in text
        )


def _spm_bytes(text: str, token_type: int) -> bytes:
    """The bytes a SentencePiece token stands for: ``<0xXX>`` pieces are one byte, ▁ is a space."""
    if token_type == BYTE and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        try:
            return bytes([int(text[3:5], 16)])
        except ValueError:
            pass
    if token_type == NORMAL:
        return text.replace(_SPM_SPACE, " ").encode()
    return text.encode()


def _split_pre_tokenizers(mode: str) -> list[pre_tokenizers.PreTokenizer]:
    """The regex splits of a pre-tokenizer mode, applied in sequence (each re-splits every piece)."""
    patterns = {
        "llama3": (LLAMA3_PATTERN,),
        "gpt2": (GPT2_PATTERN,),
        "llamacpp-default": LLAMACPP_DEFAULT_PATTERNS,
    }[mode]
    return [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in patterns]


class Tokenizer:
    """Encoder/decoder for one GGUF vocabulary. Build it with `from_gguf` or `from_metadata`.

    Thread-safe: it never changes itself after construction (stream decoders carry their own state).
    """

    model: str
    """`tokenizer.ggml.model`: ``"gpt2"`` or ``"llama"``."""
    pre_mode: str | None
    """The pre-tokenizer in use (one of `PRE_MODES`); None for SentencePiece vocabularies."""
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    """The ``<|eot_id|>`` token (end of a chat turn), or None if the vocabulary has none."""
    stop_ids: frozenset[int]
    """End-of-generation ids: EOS plus the tokens llama.cpp recognises by text (spec §5.2)."""
    add_bos: bool
    """Whether prompts for this model start with BOS (`tokenizer.ggml.add_bos_token`)."""
    add_space_prefix: bool
    """True if encoding puts a space before each text run (SentencePiece vocabularies)."""

    def __init__(
        self,
        *,
        model: str,
        pre_mode: str | None,
        tokens: list[str],
        token_types: list[int],
        hf: HFTokenizer,
        splitter: pre_tokenizers.PreTokenizer | None,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        add_space_prefix: bool,
        parsed: frozenset[int],
        hidden: frozenset[int],
    ) -> None:
        """Internal: use `from_gguf` / `from_metadata`, which validate the metadata."""
        self.model = model
        self.pre_mode = pre_mode
        self.vocab_size = len(tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.add_space_prefix = add_space_prefix
        self._tokens = tokens
        self._hf = hf
        self._splitter = splitter
        self._special = parsed | hidden

        if model == "gpt2":
            raw = [t.encode() if i in self._special else _byte_level_bytes(t) for i, t in enumerate(tokens)]
        else:
            raw = [_spm_bytes(t, ty) for t, ty in zip(tokens, token_types, strict=True)]
        self._raw = raw
        self._visible = [b"" if i in hidden else piece for i, piece in enumerate(raw)]
        by_special_text = {tokens[i]: i for i in sorted(parsed) if tokens[i]}
        # llama.cpp splits out the longest special texts first.
        self._parsed_specials = sorted(by_special_text.items(), key=lambda kv: -len(kv[0]))

        by_text = {t: i for i, t in enumerate(tokens)}
        self.eot_id = by_text.get("<|eot_id|>")
        stops = {by_text[t] for t in STOP_TEXTS if t in by_text}
        if eos_id is not None:
            stops.add(eos_id)
        self.stop_ids = frozenset(stops)

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], pre: str | None = None) -> Tokenizer:
        """Read the vocabulary of a GGUF file (model file or vocab-only file)."""
        with GGUFFile(path) as f:
            return cls.from_metadata(f.metadata, source=os.fspath(path), pre=pre)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str = "", pre: str | None = None) -> Tokenizer:
        """Build from GGUF metadata (`tokenizer.ggml.*` keys).

        `pre` overrides the pre-tokenizer of a gpt2 vocabulary: one of `PRE_MODES` or a
        `tokenizer.ggml.pre` spelling. ``pre="llamacpp-default"`` reproduces bitnet.cpp on the
        official 2B4T file, which lacks `tokenizer.ggml.pre`.
        """
        src = source or "<metadata>"

        def fail(key: str, problem: str) -> TokenizerError:
            return TokenizerError(f"{src}: {_KEY}{key} {problem}")

        model = meta.get(_KEY + "model")
        if model is None:
            raise fail("model", "is missing: the file has no tokenizer")
        if not isinstance(model, str) or model not in ("gpt2", "llama"):
            raise fail("model", f"is {model!r}; supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece)")

        tokens = meta.get(_KEY + "tokens")
        if tokens is None:
            raise fail("tokens", "is missing")
        if isinstance(tokens, str) or not isinstance(tokens, Sequence) or not tokens:
            raise fail("tokens", "must be a non-empty array of strings")
        tokens = list(tokens)
        if not all(isinstance(t, str) for t in tokens):
            raise fail("tokens", "must be an array of strings")
        n = len(tokens)

        raw_types = meta.get(_KEY + "token_type")
        if raw_types is None:
            token_types = [NORMAL] * n
        else:
            try:
                if isinstance(raw_types, np.ndarray) and np.issubdtype(raw_types.dtype, np.integer):
                    token_types = raw_types.tolist()  # a GGUF int32 array: 128 256 int() calls saved
                else:
                    token_types = [int(t) for t in raw_types]
            except (TypeError, ValueError):
                raise fail("token_type", "must be an array of integers") from None
            if len(token_types) != n:
                raise fail("token_type", f"has {len(token_types)} entries but there are {n} tokens")

        def token_id(key: str) -> int | None:
            value = meta.get(_KEY + key)
            if value is None:
                return None
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise fail(key, f"must be an integer, got {value!r}") from None
            if not 0 <= value < n:
                raise fail(key, f"= {value} is outside the vocabulary (0..{n - 1})")
            return value

        bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")

        def flag(key: str, default: bool) -> bool:
            value = meta.get(_KEY + key, default)
            if not isinstance(value, (bool, int, np.bool_, np.integer)):
                raise fail(key, f"must be a boolean, got {value!r}")
            return bool(value)

        types = np.asarray(token_types)  # int64 (float64 or object past its range: never a listed type)
        parsed = set(np.flatnonzero(np.isin(types, tuple(_PARSED_TYPES))).tolist())
        hidden = set(np.flatnonzero(np.isin(types, tuple(_HIDDEN_TYPES))).tolist())
        if model == "gpt2":
            declared = meta.get(_KEY + "pre")
            if declared is not None and (not isinstance(declared, str) or declared not in PRE_ALIASES):
                raise fail(
                    "pre", f"is {declared!r}; supported: {', '.join(sorted(PRE_ALIASES))} (or pass pre=)"
                )
            if declared is None:
                # The official 2B4T file has no pre key; its model was trained with the LLaMA-3 split.
                log.debug("%s: no %spre; using the LLaMA-3 split (the 2B4T training split)", src, _KEY)
                file_mode = "llama3"
            else:
                file_mode = PRE_ALIASES[declared]
            if pre is not None and (not isinstance(pre, str) or pre not in PRE_ALIASES):
                raise TokenizerError(f"pre={pre!r} is not supported; use one of {', '.join(PRE_MODES)}")
            mode = PRE_ALIASES[pre] if pre is not None else file_mode
            # The type array alone is not trusted for LLaMA-3 style specials (spec §5.1).
            marked = {i for i, t in enumerate(tokens[128000:], 128000) if t.startswith("<|") and t.endswith("|>")}
            parsed |= marked
            hidden |= marked
            # llama.cpp adds BOS by default only for the LLaMA-3 family of BPE pre-tokenizers.
            add_bos = flag("add_bos_token", file_mode == "llama3")
            hf, splitter = cls._build_bpe(meta, tokens, parsed, mode, fail)
            add_space_prefix = False
        else:
            if pre is not None:
                raise TokenizerError(f"{src}: pre= applies only to gpt2 vocabularies, this one is 'llama'")
            mode = None
            add_bos = flag("add_bos_token", True)
            add_space_prefix = flag("add_space_prefix", True)
            hf = cls._build_spm(meta, tokens, token_types, parsed, add_space_prefix, fail)
            splitter = None

        return cls(
            model=model,
            pre_mode=mode,
            tokens=tokens,
            token_types=token_types,
            hf=hf,
            splitter=splitter,
            bos_id=bos_id,
            eos_id=eos_id,
            add_bos=add_bos,
            add_space_prefix=add_space_prefix,
            parsed=frozenset(parsed),
            hidden=frozenset(hidden),
        )

    @staticmethod
    def _build_bpe(
        meta: Mapping[str, Any], tokens: list[str], parsed: set[int], mode: str, fail: _Fail
    ) -> tuple[HFTokenizer, pre_tokenizers.PreTokenizer]:
        """Byte-level BPE over the non-special tokens, with the pre-tokenizer of `mode`."""
        merges_raw = meta.get(_KEY + "merges")
        if merges_raw is None:
            raise fail("merges", "is missing (required for a gpt2 vocabulary)")
        if isinstance(merges_raw, str) or not isinstance(merges_raw, Sequence):
            raise fail("merges", "must be an array of strings")
        merges = []
        for rank, m in enumerate(merges_raw):
            parts = m.split(" ", 1) if isinstance(m, str) else ()
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise fail("merges", f"entry {rank} is {m!r}, not 'left right'")
            merges.append((parts[0], parts[1]))
        vocab = {t: i for i, t in enumerate(tokens) if i not in parsed}
        try:
            bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=mode == "llama3")
        except Exception as exc:  # tokenizers raises a bare Exception for inconsistent merges
            raise fail("merges", f"does not fit tokenizer.ggml.tokens: {exc}") from None
        hf = HFTokenizer(bpe)
        splits = _split_pre_tokenizers(mode)
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        return hf, pre_tokenizers.Sequence(_split_pre_tokenizers(mode))

    @staticmethod
    def _build_spm(
        meta: Mapping[str, Any],
        tokens: list[str],
        token_types: list[int],
        parsed: set[int],
        add_space_prefix: bool,
        fail: _Fail,
    ) -> HFTokenizer:
        """llama.cpp's SentencePiece algorithm expressed as a byte-fallback BPE (spec §5.7)."""
        scores_raw = meta.get(_KEY + "scores")
        if scores_raw is None:
            raise fail("scores", "is missing (required for a 'llama' vocabulary)")
        try:
            scores = [float(s) for s in scores_raw]
        except (TypeError, ValueError):
            raise fail("scores", "must be an array of numbers") from None
        if len(scores) != len(tokens):
            raise fail("scores", f"has {len(scores)} entries but there are {len(tokens)} tokens")
        unk = next((i for i, ty in enumerate(token_types) if ty == UNKNOWN), None)
        vocab = {t: i for i, t in enumerate(tokens) if i not in parsed or i == unk}
        # llama.cpp merges the adjacent pair whose concatenation is the highest-scoring piece. As a
        # ranked merge list: every split of every normal piece into two pieces, best score first
        # (ties by id, matching llama.cpp on the shipped vocabularies).
        ranked = []
        for i, text in enumerate(tokens):
            if token_types[i] != NORMAL or len(text) < 2 or vocab.get(text) != i:
                continue
            for k in range(1, len(text)):
                left, right = text[:k], text[k:]
                if left in vocab and right in vocab:
                    ranked.append((-scores[i], i, k, left, right))
        ranked.sort(key=lambda r: r[:3])
        try:
            bpe = models.BPE(
                vocab=vocab,
                merges=[(left, right) for *_, left, right in ranked],
                byte_fallback=True,
                unk_token=tokens[unk] if unk is not None else None,
                fuse_unk=True,
            )
        except Exception as exc:  # tokenizers raises a bare Exception for inconsistent input
            raise fail("tokens", f"cannot form a SentencePiece model: {exc}") from None
        hf = HFTokenizer(bpe)
        steps = [normalizers.Replace(" ", _SPM_SPACE)]
        if add_space_prefix:
            steps.insert(0, normalizers.Prepend(_SPM_SPACE))
        hf.normalizer = normalizers.Sequence(steps)
        return hf

    # ------------------------------------------------------------------------------- token lookup

    def is_special(self, token_id: int) -> bool:
        """True for CONTROL/USER_DEFINED/UNKNOWN/UNUSED entries and gpt2 ``<|…|>`` ids >= 128000."""
        self._check_id(token_id)
        return token_id in self._special

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry as stored in the file (byte-level or ▁ form for normal tokens)."""
        self._check_id(token_id)
        return self._tokens[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for; special tokens give their text in UTF-8."""
        self._check_id(token_id)
        return self._raw[token_id]

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")

    # ---------------------------------------------------------------------------------- encoding

    def encode(self, text: str, bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of `text`.

        special=False (the default, for anything a user typed) never yields special ids: the text
        ``<|eot_id|>`` is tokenised as ordinary characters. special=True turns special-token texts
        into their ids first. bos=True prepends BOS unless the ids already start with it.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() needs a str, got {type(text).__name__}")
        ids: list[int] = []
        for part in self.split_special(text) if special else (text,):
            if isinstance(part, int):
                ids.append(part)
            elif part:
                ids.extend(self._hf.encode(part, add_special_tokens=False).ids)
        if bos:
            if self.bos_id is None:
                raise TokenizerError("bos=True, but the vocabulary has no tokenizer.ggml.bos_token_id")
            if not ids or ids[0] != self.bos_id:
                ids.insert(0, self.bos_id)
        return ids

    def split_special(self, text: str) -> list[str | int]:
        """Cut special-token texts out of `text`, longest first (llama.cpp's partition order)."""
        parts: list[str | int] = [text]
        for piece, token_id in self._parsed_specials:
            if piece not in text:
                continue
            cut: list[str | int] = []
            for part in parts:
                if isinstance(part, int) or piece not in part:
                    cut.append(part)
                    continue
                for k, chunk in enumerate(part.split(piece)):
                    if k:
                        cut.append(token_id)
                    if chunk:
                        cut.append(chunk)
            parts = cut
        return parts

    def pre_tokenize(self, text: str) -> list[str]:
        """The pieces the pre-tokenizer cuts `text` into (SentencePiece vocabularies: one piece)."""
        if self._splitter is None:
            return [text] if text else []
        return [piece for piece, _ in self._splitter.pre_tokenize_str(text)]

    # ---------------------------------------------------------------------------------- decoding

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`. Control tokens are dropped unless skip_special=False; bytes that are not
        valid UTF-8 become U+FFFD. For SentencePiece vocabularies the one space that encoding
        prepended is removed (from the start of the text, after dropped tokens)."""
        table = self._visible if skip_special else self._raw
        ids = list(ids)
        n = len(table)
        if ids and not (0 <= min(ids) and max(ids) < n):
            bad = next(i for i in ids if not 0 <= i < n)
            raise TokenizerError(f"token id {bad} is outside the vocabulary (0..{n - 1})")
        data = b"".join([table[i] for i in ids])
        if self.add_space_prefix and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True, strip_leading_space: bool = False) -> StreamDecoder:
        """A fresh incremental decoder for generated tokens (see `StreamDecoder`)."""
        return StreamDecoder(self, skip_special=skip_special, strip_leading_space=strip_leading_space)


class StreamDecoder:
    """Turns a stream of token ids into text without ever emitting half a character.

    `push` returns the text completed by one more token; an incomplete UTF-8 sequence at the end is
    held back until a later token completes it, and `flush` returns what is left (U+FFFD for a
    broken tail). Pushes + flush equal `Tokenizer.decode` of the same ids. Works on token bytes
    with an incremental UTF-8 decoder, so each push costs O(token length).

    The leading space of a SentencePiece text is kept by default, because generated tokens continue
    a prompt; pass strip_leading_space=True to decode a whole text the way `decode` does.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True, strip_leading_space: bool = False):
        self._table = tokenizer._visible if skip_special else tokenizer._raw
        self._strip = strip_leading_space and tokenizer.add_space_prefix
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        if not 0 <= token_id < len(self._table):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{len(self._table) - 1})")
        data = self._table[token_id]
        if self._strip and data:
            self._strip = False
            if data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Return the held-back tail (as U+FFFD if it never became a complete character)."""
        return self._utf8.decode(b"", final=True)
