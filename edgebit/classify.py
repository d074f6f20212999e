"""Classification by label scoring, with the task's prompt prefix prefilled once.

For a prompt template `prefix{text}suffix` and labels L_1..L_n, the score of L_j is the probability
of the token sequence S_j = encode(prefix + text + suffix + sep + L_j), normalised over the labels:
the model is asked about exactly the tokens it would see for the whole string, never about
fragments encoded apart (BPE merges across the `{text}` seams; SentencePiece would add a '▁' to
every fragment). Special-token texts are parsed in the template only, never in the text.

The sequences S_j of one text share a token prefix C (capped so every label keeps a token); only the
tails after C differ, and P(C) cancels in the normalisation. As llama-server's prompt cache does,
the longest common token prefix of C and the encoded template prefix is prefilled once and its KV
cache reused by every later message. The rest of each C and all label tails are evaluated in ONE
forward pass as a token tree on top of it: each message attends to the cached prefix and itself,
each label's tokens to the prefix, their message and their own earlier tokens. The LM head runs
only for the rows that predict label tokens, and for a message's last row only for the labels'
first tail tokens (single-token tails need no more).
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
# GGUF keys of a classifier trained by `edgebit train`: its prompt template and its labels.
TEMPLATE_KEY = "edgebit.classify.template"
LABELS_KEY = "edgebit.classify.labels"


@dataclass(frozen=True)
class _Template:
    before: tuple[str | int, ...]  # the prefix cut at special tokens (texts and ids), BOS first if added
    after: tuple[str | int, ...]  # the suffix, likewise
    label_sep: str  # put before each label when the suffix does not end in white space
    prefix_ids: tuple[int, ...]  # `before` encoded: where every filled prompt starts, up to the seam


@dataclass(frozen=True)
class _Plan:
    """One text's part of the token tree: its tokens after the cached prefix, and each label's tail."""

    message: list[int]  # C after the cached prefix (at least one token: its last row predicts the tails)
    tails: list[list[int]]  # per label: S_j after C (at least one token)


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
        before = tok.split_special(prefix)
        if tok.add_bos and tok.bos_id is not None and before[:1] != [tok.bos_id]:
            before.insert(0, tok.bos_id)
        sep = "" if not suffix or suffix[-1].isspace() else " "
        return _Template(tuple(before), tuple(tok.split_special(suffix)), sep, tuple(self._encode(before)))

    def _encode(self, pieces: Sequence[str | int]) -> list[int]:
        """Ids of texts and special ids in order: adjacent texts are encoded as ONE string, so the ids are
        those of encode(whole string, special=True) while the texts' own special-token texts stay text."""
        ids: list[int] = []
        run = ""
        for piece in [*pieces, None]:
            if isinstance(piece, str):
                run += piece
                continue
            if run:
                ids += self.tokenizer.encode(run)
                run = ""
            if piece is not None:
                ids.append(piece)
        return ids

    def _plan(self, tmpl: _Template, text: str, labels: list[str]) -> tuple[list[int], list[list[int]]]:
        """(C, tails) of one text: the common token prefix of its label sequences S_j, and each S_j after it."""
        seqs = [self._encode([*tmpl.before, text, *tmpl.after, tmpl.label_sep + label]) for label in labels]
        common = min(common_prefix(seqs[0], s) for s in seqs)
        common = min(common, min(len(s) for s in seqs) - 1)  # every label keeps at least one token
        if common < 1:
            raise ValueError("the prompt must give at least one token before the labels")
        return seqs[0][:common], [s[common:] for s in seqs]

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
        plans = [self._plan(tmpl, text, labels) for text in texts]
        longest = max(len(c) + max(len(t) for t in tails) for c, tails in plans)
        if n_ctx is not None and longest > n_ctx:
            raise ValueError(f"prompt, message and label need {longest} tokens; the context holds {n_ctx}")
        # The cached prefix: what every C shares with the encoded template prefix, leaving each message a row.
        shared = min(min(common_prefix(tmpl.prefix_ids, c), len(c) - 1) for c, _ in plans)
        prefix_ids = tmpl.prefix_ids[:shared]
        messages = [_Plan(c[shared:], tails) for c, tails in plans]
        with self._lock:
            if use_cache:
                cache = self._prefix_cache(prefix_ids)
            else:
                cache = self.transformer.new_cache(self.kv_dtype)
                if prefix_ids:
                    self.transformer.forward(np.asarray(prefix_ids), cache)
            past = cache.length
            try:
                logprobs = self._tree_logprobs(cache, messages)
            finally:
                cache.truncate(past)
        results = []
        for lp in logprobs:
            p = np.exp(lp - lp.max())
            p /= p.sum()
            best = int(np.argmax(p))
            results.append({"label": labels[best], "scores": {lab: float(s) for lab, s in zip(labels, p, strict=True)}})
        return results

    def _tree_logprobs(self, cache: KVCache, messages: list[_Plan]) -> list[np.ndarray]:
        """Log-probability of every label tail after every message, up to a per-message constant, in one
        forward pass."""
        past = cache.length
        # Layout: message 0, its label prefixes (each tail minus its last token), message 1, ...
        sizes = [len(plan.message) + sum(len(tail) - 1 for tail in plan.tails) for plan in messages]
        T = sum(sizes)
        ids = np.empty(T, dtype=np.int64)
        positions = np.empty(T, dtype=np.int64)
        mask = np.zeros((T, T), dtype=bool)
        # (message, label, row predicting it, token): first label tokens (predicted by the message's
        # last row) apart from the tokens inside multi-token labels
        firsts: list[tuple[int, int, int, int]] = []
        inners: list[tuple[int, int, int, int]] = []
        row = 0
        for m, plan in enumerate(messages):
            msg = plan.message
            n = len(msg)
            ids[row : row + n] = msg
            positions[row : row + n] = past + np.arange(n)
            mask[row : row + n, row : row + n] = np.tri(n, dtype=bool)
            msg_rows, last_msg_row = slice(row, row + n), row + n - 1
            row += n
            for j, lab in enumerate(plan.tails):
                k = len(lab) - 1
                ids[row : row + k] = lab[:-1]
                positions[row : row + k] = past + n + np.arange(k)
                mask[row : row + k, msg_rows] = True
                mask[row : row + k, row : row + k] = np.tri(k, dtype=bool)
                firsts.append((m, j, last_msg_row, lab[0]))
                inners.extend((m, j, row + t, lab[t + 1]) for t in range(k))
                row += k
        hidden = self.transformer.forward(ids, cache, positions=positions, mask=mask)
        out = [np.zeros(len(plan.tails)) for plan in messages]
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


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
