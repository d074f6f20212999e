"""Choosing the next token from logits: llama.cpp's sampler chain in numpy.

Order (as llama.cpp's server): repetition penalty → top-k → top-p → min-p → temperature → draw.
A temperature of 0 (or below) means greedy: the arg-max after the penalty. A `Constraint`
(structured outputs) first removes every token it does not allow, as llama.cpp's grammar sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .backends.lm_head import TopK


@dataclass(frozen=True)
class SamplingParams:
    """Sampler settings; the defaults are llama.cpp's."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0 (1.0 disables it)"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class Constraint(Protocol):
    """Limits which tokens may come next (a grammar); see `edgebit.structured.Grammar`."""

    def allowed(self) -> np.ndarray:
        """Boolean mask over the vocabulary: the tokens that may come next."""
        ...

    def accept(self, token: int) -> None:
        """Advance past a sampled (allowed) token."""
        ...

    def finished(self) -> bool:
        """True when nothing may follow (the generation ends here)."""
        ...


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


class Sampler:
    """Stateful only in its random generator, so a seed makes a whole generation reproducible."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def _penalized(self, history: Sequence[int]) -> np.ndarray:
        """The tokens whose logits the repetition penalty changes (sorted, none when it is off)."""
        p = self.params
        if p.repeat_penalty == 1.0 or p.repeat_last_n == 0 or not history:
            return np.empty(0, dtype=np.int64)
        return np.unique(np.asarray(history[-p.repeat_last_n :], dtype=np.int64))

    def needs(self, history: Sequence[int] = ()) -> TopK | None:
        """What this sampler reads of the next logits, for a head that can compute just that: the
        exact values of the top k (1 when greedy) and of the penalised tokens; None: all of them."""
        p = self.params
        k = 1 if p.temperature <= 0 else p.top_k
        return TopK(k, tuple(self._penalized(history).tolist())) if k > 0 else None

    def penalize(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """llama.cpp's repetition penalty: divide positive logits, multiply negative ones."""
        p = self.params
        recent = self._penalized(history)
        if not recent.size:
            return logits
        logits = logits.astype(np.float64)
        values = logits[recent]
        logits[recent] = np.where(values > 0, values / p.repeat_penalty, values * p.repeat_penalty)
        return logits

    def __call__(self, logits: np.ndarray, history: Sequence[int] = (), allowed: np.ndarray | None = None) -> int:
        """The next token; `allowed` (bool per vocabulary entry) removes every other token first."""
        p = self.params
        logits = self.penalize(np.asarray(logits, dtype=np.float64), history)
        if allowed is not None:
            if not allowed[: logits.size].any():
                raise ValueError("the constraint allows no token of the vocabulary")
            logits = np.where(allowed[: logits.size], logits, -np.inf)
        if p.temperature <= 0:
            return int(np.argmax(logits))
        ids = np.arange(logits.size)
        if 0 < p.top_k < logits.size:
            keep = np.argpartition(-logits, p.top_k - 1)[: p.top_k]
            ids, logits = ids[keep], logits[keep]
        order = np.argsort(-logits, kind="stable")
        ids, logits = ids[order], logits[order]
        if p.top_p < 1.0:
            cum = np.cumsum(_softmax(logits))
            n = int(np.searchsorted(cum, p.top_p) + 1)  # smallest prefix whose mass reaches top_p
            ids, logits = ids[:n], logits[:n]
        if p.min_p > 0:
            probs = _softmax(logits)
            keep = probs >= p.min_p * probs[0]
            ids, logits = ids[keep], logits[keep]
        probs = _softmax(logits / p.temperature)
        return int(ids[self.rng.choice(len(ids), p=probs)])
