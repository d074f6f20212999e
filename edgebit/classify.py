"""Classification by label scoring, with the task's prompt prefix prefilled once.

For a prompt template `prefix{text}suffix` and labels L_1..L_n, the score of L_j is the probability
of L_j's tokens after `prefix + text + suffix`, normalised over the labels. Messages and all label
continuations are evaluated in ONE forward pass as a token tree on top of the prefix's KV cache:
each message attends to the prefix and itself, each label's tokens to the prefix, their message
and their own earlier tokens. The LM head runs only for the rows that predict label tokens, and
for a message's last row only for the labels' first tokens (single-token labels need no more).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .tokenizer import Tokenizer
from .transformer import KVCache, Transformer

MAX_LABELS = 64
DEFAULT_CHAT_TEMPLATE = (
    "System: Classify the message into exactly one of these labels: {labels}. "
    "Answer with the label only.<|eot_id|>User: {text}<|eot_id|>Assistant: "
)
DEFAULT_PLAIN_TEMPLATE = "Labels: {labels}\nMessage: {text}\nLabel:"


@dataclass(frozen=True)
class _Template:
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    label_sep: str  # put before each label when the suffix does not end in white space


def default_template(tokenizer: Tokenizer) -> str:
    """A chat-style instruction for chat vocabularies (with <|eot_id|>), a plain one otherwise."""
    return DEFAULT_CHAT_TEMPLATE if tokenizer.eot_id is not None else DEFAULT_PLAIN_TEMPLATE


def validate_labels(labels: Sequence[str]) -> list[str]:
    labels = list(labels)
    if not labels or len(labels) > MAX_LABELS:
        raise ValueError(f"give between 1 and {MAX_LABELS} labels, not {len(labels)}")
    if any(not isinstance(label, str) or not label.strip() for label in labels):
        raise ValueError("labels must be non-empty strings")
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be distinct")
    return labels


class LabelScorer:
    """Scores labels for messages; keeps the KV caches of recently used prompt prefixes."""

    def __init__(self, transformer: Transformer, tokenizer: Tokenizer, kv_dtype: str, max_prefixes: int = 8) -> None:
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.kv_dtype = kv_dtype
        self.max_prefixes = max_prefixes
        self._prefixes: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()
        self._lock = threading.Lock()  # one cache is reused and truncated per call

    def _template(self, template: str, labels: list[str]) -> _Template:
        if template.count("{text}") != 1:
            raise ValueError("a classification prompt must contain '{text}' exactly once")
        prefix, suffix = template.replace("{labels}", ", ".join(labels)).split("{text}")
        tok = self.tokenizer
        prefix_ids = tok.encode(prefix, special=True) if prefix else []
        if tok.add_bos and tok.bos_id is not None and prefix_ids[:1] != [tok.bos_id]:
            prefix_ids.insert(0, tok.bos_id)
        suffix_ids = tok.encode(suffix, special=True) if suffix else []
        sep = "" if not suffix or suffix[-1].isspace() else " "
        return _Template(tuple(prefix_ids), tuple(suffix_ids), sep)

    def _prefix_cache(self, prefix_ids: tuple[int, ...]) -> KVCache:
        cache = self._prefixes.pop(prefix_ids, None)
        if cache is None:
            cache = self.transformer.new_cache(self.kv_dtype)
            if prefix_ids:
                self.transformer.forward(np.asarray(prefix_ids), cache)
            while len(self._prefixes) >= self.max_prefixes:
                self._prefixes.popitem(last=False)
        self._prefixes[prefix_ids] = cache
        return cache

    def score(self, texts: Sequence[str], labels: Sequence[str], template: str, use_cache: bool = True,
              n_ctx: int | None = None) -> list[dict]:
        """`[{"label", "scores"}]` for each text; `use_cache=False` recomputes the prefix (for checks)."""
        labels = validate_labels(labels)
        tmpl = self._template(template, labels)
        tok = self.tokenizer
        messages = [tok.encode(t, special=False) + list(tmpl.suffix_ids) for t in texts]
        label_ids = [tok.encode(tmpl.label_sep + label, special=False) for label in labels]
        if any(not m for m in messages):
            raise ValueError("a message and the prompt suffix must give at least one token")
        longest = len(tmpl.prefix_ids) + max(len(m) for m in messages) + max(len(ids) for ids in label_ids)
        if n_ctx is not None and longest > n_ctx:
            raise ValueError(f"prompt, message and label need {longest} tokens; the context holds {n_ctx}")
        with self._lock:
            if use_cache:
                cache = self._prefix_cache(tmpl.prefix_ids)
            else:
                cache = self.transformer.new_cache(self.kv_dtype)
                if tmpl.prefix_ids:
                    self.transformer.forward(np.asarray(tmpl.prefix_ids), cache)
            past = cache.length
            try:
                logprobs = self._tree_logprobs(cache, messages, label_ids)
            finally:
                cache.truncate(past)
        results = []
        for lp in logprobs:
            p = np.exp(lp - lp.max())
            p /= p.sum()
            best = int(np.argmax(p))
            results.append({"label": labels[best], "scores": {lab: float(s) for lab, s in zip(labels, p, strict=True)}})
        return results

    def _tree_logprobs(self, cache: KVCache, messages: list[list[int]], label_ids: list[list[int]]) -> list[np.ndarray]:
        """Log-probability of every label after every message, up to a per-message constant, in one forward pass."""
        past = cache.length
        # Layout: message 0, its label prefixes (each label minus its last token), message 1, ...
        sizes = [len(msg) + sum(len(lab) - 1 for lab in label_ids) for msg in messages]
        T = sum(sizes)
        ids = np.empty(T, dtype=np.int64)
        positions = np.empty(T, dtype=np.int64)
        mask = np.zeros((T, T), dtype=bool)
        # (message, label, row predicting it, token): first label tokens (predicted by the message's
        # last row) apart from the tokens inside multi-token labels
        firsts: list[tuple[int, int, int, int]] = []
        inners: list[tuple[int, int, int, int]] = []
        row = 0
        for m, msg in enumerate(messages):
            n = len(msg)
            ids[row : row + n] = msg
            positions[row : row + n] = past + np.arange(n)
            mask[row : row + n, row : row + n] = np.tri(n, dtype=bool)
            msg_rows, last_msg_row = slice(row, row + n), row + n - 1
            row += n
            for j, lab in enumerate(label_ids):
                k = len(lab) - 1
                ids[row : row + k] = lab[:-1]
                positions[row : row + k] = past + n + np.arange(k)
                mask[row : row + k, msg_rows] = True
                mask[row : row + k, row : row + k] = np.tri(k, dtype=bool)
                firsts.append((m, j, last_msg_row, lab[0]))
                inners.extend((m, j, row + t, lab[t + 1]) for t in range(k))
                row += k
        hidden = self.transformer.forward(ids, cache, positions=positions, mask=mask)
        out = [np.zeros(len(label_ids)) for _ in messages]
        # A message's first label tokens are all predicted by its last row, so that row's log-normaliser
        # is common to every label and cancels in the normalisation over labels: it needs only the
        # label tokens' columns of the LM head. Rows inside multi-token labels need the full head.
        rows = sorted({r for _, _, r, _ in firsts})
        tokens = sorted({token for _, _, _, token in firsts})
        partial = self.transformer.logits(hidden[rows], np.asarray(tokens)).astype(np.float64)
        row_at, col_at = {r: i for i, r in enumerate(rows)}, {t: i for i, t in enumerate(tokens)}
        for m, j, r, token in firsts:
            out[m][j] += partial[row_at[r], col_at[token]]
        if inners:
            rows = sorted({r for _, _, r, _ in inners})
            logits = self.transformer.logits(hidden[rows]).astype(np.float64)
            mx = logits.max(axis=1, keepdims=True)
            logz = mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=1))
            row_at = {r: i for i, r in enumerate(rows)}
            for m, j, r, token in inners:
                out[m][j] += logits[row_at[r], token] - logz[row_at[r]]
        return out
