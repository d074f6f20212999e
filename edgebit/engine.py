"""The engine: a loaded model with sessions, generation, scoring and perplexity.

This is the public Python API (`edgebit.load` returns a `Model`); the CLI and the MQTT service
are thin adapters over it. All state of a conversation lives in a `KVCache`; the `Transformer`
itself is read-only after load, so one model serves many sequential requests.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends import get_backend
from .backends.fast import kernels
from .backends.lm_head import LMHead, TopK
from .backends.select import embedding_shape, model_shapes
from .chat import format_chat
from .classify import LABELS_KEY, TEMPLATE_KEY, LabelScorer, common_prefix, default_template
from .gguf import GGUFFile
from .sampling import Constraint, Sampler, SamplingParams
from .tokenizer import Tokenizer
from .transformer import KVCache, Transformer

log = logging.getLogger(__name__)

DEFAULT_BATCH = 256  # prompt tokens per forward call: bounds the attention score memory
PROMPT_CACHE_BYTES = 256 << 20  # KV caches of recent prompts kept for reuse (LRU); 0 disables


class ContextLengthError(ValueError):
    """A request needs more positions than the model's context length."""


@dataclass
class Completion:
    """A finished generation: text, why it stopped, and token counts."""

    text: str
    finish_reason: str  # "stop" (stop token or string) | "length" (max_tokens or context full)
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Generation:
    """An in-progress generation: iterate for text pieces; `finish_reason` and counts fill in as it runs."""

    def __init__(self, pieces: Iterator[str], prompt_tokens: int) -> None:
        self._pieces = pieces
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces:
            self.text += piece
            yield piece

    def result(self) -> Completion:
        """Run to the end (if not yet) and return the whole completion."""
        for _ in self:
            pass
        return Completion(self.text, self.finish_reason or "length", self.prompt_tokens,
                          self.completion_tokens, self.token_ids)


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string (held back)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Model:
    """A BitNet model ready to run. Create with `edgebit.load(path)`."""

    def __init__(self, path: str | os.PathLike[str], backend: str | None = None, threads: int | None = None,
                 kv_dtype: str = "float32", numerics: str = "reference", activation: str | None = None,
                 progress: Callable[[int, int], None] | None = None, lm_head: str | None = None,
                 compile_progress: Callable[[int, int], None] | None = None) -> None:
        self.path = os.fspath(path)
        self.gguf = GGUFFile(self.path)
        compiled = kernels()
        if compiled is not None:  # before the backend probe, which would otherwise compile unannounced
            seconds = sum(compiled.compile_all(compile_progress).values())
            log.info("compiled kernels ready in %.1f s (%d of %d from the cache)", seconds, compiled.cache_hits(),
                     len(compiled.SIGNATURES))
        head_bytes = LMHead.resident_bytes("float16", embedding_shape(self.gguf))
        self.backend = get_backend(backend, threads, shapes=model_shapes(self.gguf), extra_bytes=head_bytes)
        self.transformer = Transformer(self.gguf, self.backend, numerics=numerics, activation=activation,
                                       progress=progress, lm_head=lm_head)
        self.tokenizer = Tokenizer.from_metadata(self.gguf.metadata, source=self.path)
        self.kv_dtype = kv_dtype
        self.transformer.new_cache(kv_dtype)  # validates kv_dtype now rather than at first use
        self.config = self.transformer.config
        self.scorer = LabelScorer(self.transformer, self.tokenizer, kv_dtype)
        # ggml numerics round a lone row differently from a prompt batch: a prompt whose last token alone
        # is left to evaluate would not give bitnet.cpp's numbers, so that parity mode does not reuse prompts
        self.prompt_cache = PromptCache(PROMPT_CACHE_BYTES if numerics == "reference" else 0)
        # A classifier trained by `edgebit train` carries the prompt and labels it was trained with.
        meta = self.gguf.metadata
        self.classify_template: str | None = meta.get(TEMPLATE_KEY)
        self.classify_labels: list[str] = list(meta.get(LABELS_KEY, ()))

    # --- description

    @property
    def info(self) -> dict[str, Any]:
        """Architecture, hyper-parameters, tensor types and parameter count of the loaded file."""
        cfg = self.config
        types = Counter(t.type.name for t in self.gguf.tensors.values())
        n_params = sum(t.n_elements for t in self.gguf.tensors.values())
        return {
            "path": self.path,
            "name": self.gguf.metadata.get("general.name", os.path.basename(self.path)),
            "arch": cfg.arch,
            "activation": cfg.activation,
            "vocab_size": cfg.n_vocab,
            "context_length": cfg.n_ctx,
            "embedding_length": cfg.n_embd,
            "block_count": cfg.n_layer,
            "feed_forward_length": cfg.n_ff,
            "head_count": cfg.n_head,
            "head_count_kv": cfg.n_head_kv,
            "head_dim": cfg.head_dim,
            "rope_freq_base": cfg.rope_base,
            "rms_eps": cfg.eps,
            "tensor_types": dict(sorted(types.items())),
            "parameters": n_params,
            "file_bytes": self.gguf.size,
            "backend": self.backend.name,
            "threads": self.backend.threads,
            "lm_head": self.transformer.lm_head.mode,
            "numerics": self.transformer.numerics,
            "kv_dtype": self.kv_dtype,
        }

    def sha256(self) -> str:
        """SHA-256 of the model file (reads the whole file; callers cache it)."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    # --- low level

    def new_cache(self) -> KVCache:
        return self.transformer.new_cache(self.kv_dtype)

    def _check_context(self, n: int) -> None:
        if n > self.config.n_ctx:
            raise ContextLengthError(
                f"{n} tokens do not fit in the context length of {self.config.n_ctx} tokens of {self.path}"
            )

    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.config.n_vocab):
            bad = int(arr[(arr < 0) | (arr >= self.config.n_vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.config.n_vocab - 1})")
        return arr

    def prefill(self, cache: KVCache, ids: Sequence[int], batch: int = DEFAULT_BATCH,
                all_logits: bool = False, top: TopK | None = None) -> np.ndarray:
        """Append `ids` to `cache` in batches; return logits of the last token (or of every token).
        With `top`, only what a sampler needs of the last token's logits is exact (`LMHead.top`)."""
        arr = self._check_ids(ids)
        self._check_context(cache.length + arr.size)
        if arr.size == 0:
            raise ValueError("no tokens to evaluate")
        rows = []
        for start in range(0, arr.size, batch):
            hidden = self.transformer.forward(arr[start : start + batch], cache)
            if all_logits:
                rows.append(self.transformer.logits(hidden))
        if all_logits:
            return np.concatenate(rows)
        return self.transformer.logits(hidden[-1:], top=None if top is None else [top])[0]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits (len(ids), vocab) of every position, from an empty context."""
        return self.prefill(self.new_cache(), ids, all_logits=True)

    # --- generation

    def prompt_ids(self, prompt: str | Sequence[int] | None = None, messages: list[dict] | None = None) -> list[int]:
        """The token ids `generate` would run for this prompt or chat; ContextLengthError if they do not fit."""
        ids = self._prompt_ids(prompt, messages)
        self._check_context(len(ids))
        return ids

    def _prompt_ids(self, prompt: str | Sequence[int] | None, messages: list[dict] | None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt= or messages=")
        if messages is not None:
            return format_chat(self.tokenizer, messages)
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos)
        return list(self._check_ids(prompt))

    def generate(self, prompt: str | Sequence[int] | None = None, messages: list[dict] | None = None,
                 max_tokens: int = 256, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, stream: bool = False,
                 constraint: Constraint | None = None) -> str | Generation:
        """Continue a prompt (text or token ids) or a chat (`messages`). Returns the text, or with
        `stream=True` a `Generation` that yields text pieces as they are decoded.

        Stops at a stop token (the tokenizer's end-of-turn ids), at any of the `stop` strings (not
        included in the text), after `max_tokens`, or when the context is full. A `constraint`
        (e.g. `edgebit.structured.Grammar`) limits every sampled token to those it allows, and ends
        the generation when it is complete.
        """
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=seed)
        ids = self._prompt_ids(prompt, messages)
        self._check_context(len(ids) + (1 if max_tokens else 0))
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        gen = Generation(iter(()), len(ids))
        gen._pieces = self._run(gen, ids, max_tokens, Sampler(params), stops, constraint)
        return gen if stream else gen.result().text

    def start(self, ids: Sequence[int], max_tokens: int, sampler: Sampler, stops: Sequence[str] = (),
              constraint: Constraint | None = None, gen: Generation | None = None) -> DecodeState:
        """Prefill a prompt (reusing the cached KV of its longest known prefix) and return the sequence,
        ready for `step`. The scheduler of the HTTP face runs many of these together."""
        ids = list(self._check_ids(ids))
        self._check_context(len(ids) + (1 if max_tokens else 0))
        gen = gen if gen is not None else Generation(iter(()), len(ids))
        seq = DecodeState(self, ids, max_tokens, sampler, [s for s in stops if s], constraint, gen)
        if max_tokens:
            seq.cache, seq.reused = self.prompt_cache.lookup(ids, self.new_cache)
            seq.logits = self.prefill(seq.cache, ids[seq.reused:], top=seq.needs())
            self.prompt_cache.store(ids, seq.cache)
        else:
            seq.done = True
        return seq

    def step(self, seqs: Sequence[DecodeState]) -> list[str]:
        """Advance every unfinished sequence by one token; returns the text each one released.

        Sampling uses the logits each holds; then the sampled tokens of all sequences that go on are
        evaluated in ONE forward call (one batched product per projection), each row against its own
        KV cache, which gives every sequence its next logits.
        """
        pieces = [seq.advance() if not seq.done else "" for seq in seqs]
        going = [seq for seq in seqs if not seq.done]
        if going:
            hidden = self.transformer.forward_rows(np.asarray([seq.last for seq in going]),
                                                   [seq.cache for seq in going])
            needs = [seq.needs() for seq in going]
            top = None if None in needs else needs
            if self.transformer.numerics == "ggml":  # ggml rounds a lone decode row to f16: keep rows apart
                rows = [self.transformer.logits(hidden[r : r + 1], top=top and top[r : r + 1])[0]
                        for r in range(len(going))]
            else:
                rows = list(self.transformer.logits(hidden, top=top))
            for seq, row in zip(going, rows, strict=True):
                seq.logits = row
        return pieces

    def _run(self, gen: Generation, ids: list[int], max_tokens: int, sampler: Sampler,
             stops: list[str], constraint: Constraint | None = None) -> Iterator[str]:
        """The decode loop behind `generate`: one sequence stepped until it is done."""
        seq = self.start(ids, max_tokens, sampler, stops, constraint, gen)
        while not seq.done:
            piece = self.step([seq])[0]
            if piece:
                yield piece

    def complete(self, prompt: str | Sequence[int] | None = None, messages: list[dict] | None = None,
                 **kwargs: Any) -> Completion:
        """Like `generate`, but returns a `Completion` with finish reason and token usage."""
        gen = self.generate(prompt=prompt, messages=messages, stream=True, **kwargs)
        assert isinstance(gen, Generation)
        return gen.result()

    # --- scoring

    def classify(self, text: str, labels: Sequence[str] | None = None, prompt: str | None = None) -> dict[str, Any]:
        """`{"label", "scores"}`: each label's probability after the prompt, normalised over the labels.

        `prompt` is a template containing `{text}` (and optionally `{labels}`); its part before `{text}`
        is prefilled once and reused from a cache for every later message with the same prefix.
        Without `prompt` (or `labels`), a trained classifier's own template (and labels) from its
        metadata are used, else a generic instruction.
        """
        return self.classify_batch([text], labels, prompt)[0]

    def classify_batch(self, texts: Sequence[str], labels: Sequence[str] | None = None, prompt: str | None = None,
                       use_prefix_cache: bool = True) -> list[dict[str, Any]]:
        """`classify` for several texts in one forward pass (same labels and prompt)."""
        if not texts:
            return []
        if labels is None:
            if not self.classify_labels:
                raise ValueError(f"{self.path} stores no classification labels; pass labels")
            labels = self.classify_labels
        template = prompt if prompt is not None else (self.classify_template or default_template(self.tokenizer))
        return self.scorer.score(list(texts), labels, template, use_cache=use_prefix_cache, n_ctx=self.config.n_ctx)

    def perplexity(self, text: str, ctx: int = 512, batch: int = DEFAULT_BATCH) -> float:
        """llama-perplexity's method: non-overlapping windows of `ctx` tokens, each from an empty cache
        with its first token replaced by BOS; the second half of each window is scored."""
        ids = self.tokenizer.encode(text, bos=self.tokenizer.add_bos)
        return float(np.exp(self.mean_nll(ids, ctx, batch)))

    def mean_nll(self, ids: Sequence[int], ctx: int = 512, batch: int = DEFAULT_BATCH) -> float:
        """Mean negative log-likelihood (nats) over the scored tokens of `perplexity`."""
        if ctx < 4:
            raise ValueError("ctx must be at least 4")
        self._check_context(ctx)
        ids = self._check_ids(ids)
        n_chunks = ids.size // ctx
        if n_chunks == 0:
            raise ValueError(f"the text has {ids.size} tokens; perplexity needs at least ctx = {ctx}")
        first, total, count = ctx // 2, 0.0, 0
        for k in range(n_chunks):
            chunk = ids[k * ctx : (k + 1) * ctx].copy()
            if self.tokenizer.add_bos and self.tokenizer.bos_id is not None:
                chunk[0] = self.tokenizer.bos_id
            logits = self.prefill(self.new_cache(), chunk, batch, all_logits=True).astype(np.float64)
            scored = logits[first : ctx - 1]
            targets = chunk[first + 1 : ctx]
            m = scored.max(axis=1)
            logz = m + np.log(np.exp(scored - m[:, None]).sum(axis=1))
            total += float((logz - scored[np.arange(targets.size), targets]).sum())
            count += targets.size
        return total / count


class PromptCache:
    """KV caches of recent prompts, so a prompt sharing a long token prefix with an earlier one (the
    same instruction before every item) prefills only its new tokens. As llama-server's prompt
    cache: the longest shared prefix wins; bounded by bytes; least recently used evicted first.
    Entries are private copies, so a sequence decoding on top of its copy never changes them."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._entries.values())

    def lookup(self, ids: Sequence[int], new_cache: Callable[[], KVCache]) -> tuple[KVCache, int]:
        """A cache holding the longest cached prefix of `ids` (always leaving one token to evaluate,
        whose logits start the generation), and that prefix's length (0: a fresh cache)."""
        best, best_key = 0, None
        with self._lock:
            for key in self._entries:
                n = min(common_prefix(key, ids), len(ids) - 1)
                if n > best:
                    best, best_key = n, key
            if best_key is None:
                self.misses += 1
                return new_cache(), 0
            self.hits += 1
            self._entries.move_to_end(best_key)
            cache = self._entries[best_key].copy()
        cache.truncate(best)
        return cache, best

    def store(self, ids: Sequence[int], cache: KVCache) -> None:
        """Keep a copy of the KV cache of a prefilled prompt (its `len(ids)` first positions)."""
        per_token = 2 * cache.n_layer * cache.n_head_kv * cache.head_dim * np.dtype(cache.dtype).itemsize
        if len(ids) * per_token > self.max_bytes:
            return
        entry = cache.copy()
        entry.truncate(len(ids))
        key = tuple(ids)
        with self._lock:
            self._entries.pop(key, None)
            for other in [k for k in self._entries if k == key[: len(k)]]:
                del self._entries[other]  # a prefix of the new prompt: the new entry serves it too
            self._entries[key] = entry
            total = self.nbytes
            while total > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                total -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class DecodeState:
    """One generation in progress: its KV cache, sampler, constraint, and the detokenized text not yet
    released (it could be the start of a stop string). `Model.step` advances it one token at a time."""

    def __init__(self, model: Model, ids: list[int], max_tokens: int, sampler: Sampler, stops: list[str],
                 constraint: Constraint | None, gen: Generation) -> None:
        self.model = model
        self.history = list(ids)
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.stops = stops
        self.constraint = constraint
        self.gen = gen
        self.cache: KVCache | None = None
        self.reused = 0  # prompt tokens whose KV came from the prompt cache
        self.logits: np.ndarray | None = None
        self.decoder = model.tokenizer.stream_decoder()
        self.pending = ""
        self.last = -1
        self.done = False
        gen.finish_reason = "length"

    def needs(self) -> TopK | None:
        """What sampling the next token reads of its logits (None: all; a constraint may rule out
        any token, so a constrained sequence always gets them all)."""
        return None if self.constraint is not None else self.sampler.needs(self.history)

    def advance(self) -> str:
        """Sample the next token from the held logits; returns the text now safe to release. Sets
        `done` (and the generation's finish_reason) when the sequence ends."""
        gen, tok = self.gen, self.model.tokenizer
        allowed = self.constraint.allowed() if self.constraint is not None else None
        token = self.sampler(self.logits, self.history, allowed)
        if token in tok.stop_ids:
            gen.finish_reason = "stop"
            return self._end()
        if self.constraint is not None:
            self.constraint.accept(token)
        self.history.append(token)
        gen.token_ids.append(token)
        gen.completion_tokens += 1
        self.last = token
        self.pending += self.decoder.push(token)
        cut = min((self.pending.find(s) for s in self.stops if s in self.pending), default=-1)
        if cut >= 0:
            gen.finish_reason = "stop"
            self.pending = self.pending[:cut]
            return self._end()
        if self.constraint is not None and self.constraint.finished():
            gen.finish_reason = "stop"
            self.pending += self.decoder.flush()
            return self._end()
        if gen.completion_tokens == self.max_tokens or self.cache.length + 1 > self.model.config.n_ctx:
            self.pending += self.decoder.flush()
            return self._end()
        hold = _stop_prefix_len(self.pending, self.stops)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def _end(self) -> str:
        """Finish: release everything held (a cut stop string is already removed)."""
        self.done = True
        out, self.pending = self.pending, ""
        return out
