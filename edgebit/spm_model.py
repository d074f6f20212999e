"""Read a SentencePiece `tokenizer.model` (a protobuf `ModelProto`) without the sentencepiece package.

`edgebit convert` needs only the vocabulary of a SentencePiece model (the 1bitLLM checkpoints
ship one): each piece's text, score and type, plus the special ids and the dummy-prefix flag.
Those sit in three messages of `ModelProto`, which a ~60-line protobuf wire-format reader
handles; every length is bounds-checked and unknown fields are skipped, as protobuf requires.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

# ModelProto field numbers (sentencepiece_model.proto).
_PIECES, _TRAINER_SPEC, _NORMALIZER_SPEC = 1, 2, 3
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER_MODEL_TYPE, _TRAINER_BYTE_FALLBACK = 3, 35
_TRAINER_UNK, _TRAINER_BOS, _TRAINER_EOS, _TRAINER_PAD = 40, 41, 42, 43
_NORMALIZER_ADD_DUMMY_PREFIX = 3
# The first line of a tiktoken file (LLaMA-3's original tokenizer.model), which is not protobuf.
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* [0-9]+\r?$")
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
# SentencePiece piece types; the numbers are the same as GGUF's tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class SpmError(ValueError):
    """The file is not a SentencePiece model edgebit can read; the message says why."""


@dataclass
class SpmModel:
    """The vocabulary part of a SentencePiece model."""

    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    model_type: str = "unigram"
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    byte_fallback: bool = False
    add_dummy_prefix: bool = True


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise SpmError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise SpmError("varint longer than 10 bytes")


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """The (field number, value) pairs of one message; LEN values are bytes, fixed32 values raw ints."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise SpmError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((number, value))
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > len(buf):
                raise SpmError("truncated fixed-size field")
            out.append((number, int.from_bytes(buf[pos : pos + size], "little")))
            pos += size
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise SpmError(f"field {number}: length {length} runs past the end of its message")
            out.append((number, buf[pos : pos + length]))
            pos += length
        else:
            raise SpmError(f"field {number}: unsupported wire type {wire}")
    return out


def _int32(value: int) -> int:
    """A protobuf int32 varint (negative numbers are sent as 64-bit two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def parse_spm(data: bytes, source: str = "tokenizer.model") -> SpmModel:
    """Parse the bytes of a SentencePiece model file."""
    if _TIKTOKEN_LINE.match(data.split(b"\n", 1)[0]):
        raise SpmError(f"{source} is a tiktoken rank file (base64 token and rank per line), not a SentencePiece "
                       "model; convert from the checkpoint's tokenizer.json instead")
    model = SpmModel()
    try:
        for number, value in _fields(data):
            if number == _PIECES and isinstance(value, bytes):
                text, score, kind = None, 0.0, NORMAL
                for n, v in _fields(value):
                    if n == _PIECE_TEXT and isinstance(v, bytes):
                        text = v.decode("utf-8")
                    elif n == _PIECE_SCORE and isinstance(v, int):
                        score = struct.unpack("<f", v.to_bytes(4, "little"))[0]
                    elif n == _PIECE_TYPE and isinstance(v, int):
                        kind = v
                if text is None:
                    raise SpmError(f"piece {len(model.pieces)} has no text")
                if not NORMAL <= kind <= BYTE:
                    raise SpmError(f"piece {len(model.pieces)} ({text!r}) has unknown type {kind}")
                model.pieces.append(text)
                model.scores.append(score)
                model.types.append(kind)
            elif number == _TRAINER_SPEC and isinstance(value, bytes):
                for n, v in _fields(value):
                    if not isinstance(v, int):
                        continue
                    if n == _TRAINER_MODEL_TYPE:
                        model.model_type = MODEL_TYPES.get(v, f"unknown({v})")
                    elif n == _TRAINER_BYTE_FALLBACK:
                        model.byte_fallback = bool(v)
                    elif n in (_TRAINER_UNK, _TRAINER_BOS, _TRAINER_EOS, _TRAINER_PAD):
                        name = {_TRAINER_UNK: "unk_id", _TRAINER_BOS: "bos_id", _TRAINER_EOS: "eos_id",
                                _TRAINER_PAD: "pad_id"}[n]
                        setattr(model, name, _int32(v))
            elif number == _NORMALIZER_SPEC and isinstance(value, bytes):
                for n, v in _fields(value):
                    if n == _NORMALIZER_ADD_DUMMY_PREFIX and isinstance(v, int):
                        model.add_dummy_prefix = bool(v)
    except UnicodeDecodeError as exc:
        raise SpmError(f"{source}: a piece is not valid UTF-8 ({exc})") from None
    except SpmError as exc:
        raise SpmError(f"{source}: not a SentencePiece model: {exc}") from None
    if not model.pieces:
        raise SpmError(f"{source}: not a SentencePiece model: it has no pieces")
    return model
