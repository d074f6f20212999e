"""The engine: a loaded model with sessions, generation, scoring and perplexity.

This is the public Python API (`edgebit.load` returns a `Model`); the CLI and the MQTT service
are thin adapters over it. All state of a conversation lives in a `KVCache`; the `Transformer`
itself is read-only after load, so one model serves many sequential requests.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends import get_backend
from .backends.fast import kernels
from .backends.lm_head import LMHead
from .backends.select import embedding_shape, model_shapes
from .chat import format_chat
from .classify import LABELS_KEY, TEMPLATE_KEY, LabelScorer, default_template
from .gguf import GGUFFile
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer
from .transformer import KVCache, Transformer

log = logging.getLogger(__name__)

DEFAULT_BATCH = 256  # prompt tokens per forward call: bounds the attention score memory


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
                all_logits: bool = False) -> np.ndarray:
        """Append `ids` to `cache` in batches; return logits of the last token (or of every token)."""
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
        return self.transformer.logits(hidden[-1:])[0]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits (len(ids), vocab) of every position, from an empty context."""
        return self.prefill(self.new_cache(), ids, all_logits=True)

    # --- generation

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
                 stop: str | Sequence[str] | None = None, stream: bool = False) -> str | Generation:
        """Continue a prompt (text or token ids) or a chat (`messages`). Returns the text, or with
        `stream=True` a `Generation` that yields text pieces as they are decoded.

        Stops at a stop token (the tokenizer's end-of-turn ids), at any of the `stop` strings (not
        included in the text), after `max_tokens`, or when the context is full.
        """
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=seed)
        ids = self._prompt_ids(prompt, messages)
        self._check_context(len(ids) + (1 if max_tokens else 0))
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        gen = Generation(iter(()), len(ids))
        gen._pieces = self._run(gen, ids, max_tokens, Sampler(params), stops)
        return gen if stream else gen.result().text

    def _run(self, gen: Generation, ids: list[int], max_tokens: int, sampler: Sampler,
             stops: list[str]) -> Iterator[str]:
        """The decode loop behind `generate`: sample, detokenize safely, hold back partial stop strings."""
        cache = self.new_cache()
        history = list(ids)
        decoder = self.tokenizer.stream_decoder()
        pending = ""  # decoded text not yet released (could be the start of a stop string)
        gen.finish_reason = "length"
        logits = self.prefill(cache, ids) if max_tokens else None
        for step in range(max_tokens):
            token = sampler(logits, history)
            if token in self.tokenizer.stop_ids:
                gen.finish_reason = "stop"
                break
            history.append(token)
            gen.token_ids.append(token)
            gen.completion_tokens += 1
            pending += decoder.push(token)
            cut = min((pending.find(s) for s in stops if s in pending), default=-1)
            if cut >= 0:
                gen.finish_reason = "stop"
                pending = pending[:cut]
                break
            hold = _stop_prefix_len(pending, stops)
            if len(pending) > hold:
                yield pending[: len(pending) - hold]
                pending = pending[len(pending) - hold :]
            if step + 1 == max_tokens or cache.length + 1 > self.config.n_ctx:
                break
            logits = self.prefill(cache, [token])
        if gen.finish_reason == "length":
            pending += decoder.flush()
        if pending:
            yield pending

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
