"""Chat prompts as token ids for BitNet b1.58 2B4T (spec §6).

Three styles:

* ``"bitnet"`` (default, §6.1, Microsoft's own `ChatFormat`): ``[BOS]``, then per message
  ``encode("Role: ") + encode(content.strip()) + [<|eot_id|>]``, then ``encode("Assistant: ")``.
  Header and content are tokenised separately, so "User: Hello" gives ``User`` ``:`` `` `` ``Hello``.
* ``"joined"`` (§6.2, the HF template): the same text rendered as one string,
  ``<|begin_of_text|>User: Hello<|eot_id|>Assistant: ``, tokenised in one go, so header and content
  share tokens (``User`` ``:`` `` Hello``).
* ``"bitnetcpp"`` (§6.3, bitnet.cpp's built-in formatter, for parity tests): ``System: content``
  and assistant content get no terminator, a user turn is ``User: content<|eot_id|>Assistant: ``,
  and the whole string is tokenised in one go. Contents are not stripped.

In every style the special tokens come from the format itself; message contents are tokenised with
special parsing off, so a user typing ``<|eot_id|>`` cannot end a turn (no prompt injection).
BOS is added when the vocabulary asks for it (`Tokenizer.add_bos`).

SentencePiece vocabularies (1bitLLM models, the test vocabularies) have no ``<|eot_id|>``: EOS ends
each turn instead. Their encoder puts a space before every separately encoded text, as llama.cpp
does, so in the "bitnet" style the headers lose their trailing space (``System:`` + `` You…``),
which keeps the text identical to the other styles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .tokenizer import Tokenizer

ROLE_HEADERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
STYLES = ("bitnet", "joined", "bitnetcpp")
GENERATION_PROMPT = "Assistant: "


def validate_messages(messages: Any) -> list[tuple[str, str]]:
    """Check a chat transcript and return it as (role, content) pairs; ValueError says what is wrong."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages is empty")
    pairs = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(msg).__name__}"
            )
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLE_HEADERS:
            raise ValueError(f"messages[{i}]['role'] is {role!r}; expected one of {', '.join(ROLE_HEADERS)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be a str, got {type(content).__name__}")
        pairs.append((role, content))
    return pairs


def _segments(
    pairs: list[tuple[str, str]],
    style: str,
    add_generation_prompt: bool,
    bos: int | None,
    end: int,
    space_prefix: bool,
) -> list[str | int]:
    """The prompt as a list of text pieces and special-token ids, before tokenisation."""
    out: list[str | int] = [] if bos is None else [bos]
    if style == "bitnetcpp":
        for k, (role, content) in enumerate(pairs):
            if role == "system":
                out.append(ROLE_HEADERS[role] + content)
            elif role == "user":
                out += [ROLE_HEADERS[role] + content, end]
                if add_generation_prompt or k < len(pairs) - 1:
                    out.append(GENERATION_PROMPT)
            else:
                out.append(content)
        return out
    trim = style == "bitnet" and space_prefix
    for role, content in pairs:
        header = ROLE_HEADERS[role]
        out += [header.rstrip() if trim else header, content.strip(), end]
    if add_generation_prompt:
        out.append(GENERATION_PROMPT.rstrip() if trim else GENERATION_PROMPT)
    return out


def format_chat(
    tokenizer: Tokenizer,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = True,
    style: str = "bitnet",
) -> list[int]:
    """Token ids of a chat prompt in `style` (see the module docstring), ready for the model.

    In the "bitnetcpp" style the ``Assistant: `` after a user turn is part of bitnet.cpp's user
    format; add_generation_prompt=False leaves it out only after the last message.
    """
    if style not in STYLES:
        raise ValueError(f"unknown chat style {style!r}; expected one of {', '.join(STYLES)}")
    pairs = validate_messages(messages)
    end = tokenizer.eot_id if tokenizer.eot_id is not None else tokenizer.eos_id
    if end is None:
        raise ValueError("the vocabulary has neither <|eot_id|> nor an EOS token to end a chat turn")
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    segments = _segments(pairs, style, add_generation_prompt, bos, end, tokenizer.add_space_prefix)

    ids: list[int] = []
    pending: list[str] = []  # text runs between special tokens ("joined"/"bitnetcpp" encode each run once)
    for seg in segments:
        if isinstance(seg, int):
            if pending:
                ids += tokenizer.encode("".join(pending))
                pending = []
            ids.append(seg)
        elif style == "bitnet":
            ids += tokenizer.encode(seg)
        else:
            pending.append(seg)
    if pending:
        ids += tokenizer.encode("".join(pending))
    return ids
