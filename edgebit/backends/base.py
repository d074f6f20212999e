"""The small interface every ternary kernel implements.

A backend turns a `TernaryWeight` into a resident form once at load (`prepare`) and multiplies
it by int8 activations (`matmul`). The product must be the exact integer dot product
`T @ x_q`, returned as float32 (exact: |sum| < 2**24, spec §4.2). BitLinear's scaling of those
products (`bitlinear_group`) is numpy after the products unless a backend fuses it into its kernel,
which it may only do with numpy's float32 operations in numpy's order: every backend gives the same bits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from ..weights import TernaryWeight


class Backend(ABC):
    """A ternary matrix-multiplication kernel. Subclasses are registered as `edgebit.backends` entry points."""

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    @classmethod
    def supported(cls) -> tuple[bool, str]:
        """Whether this backend can run on this machine, and why not if it cannot."""
        return True, ""

    @classmethod
    @abstractmethod
    def resident_bytes(cls, shape: tuple[int, int]) -> int:
        """Bytes the prepared form of an (M, K) ternary weight occupies in memory."""

    @abstractmethod
    def prepare(self, weight: TernaryWeight) -> Any:
        """Build the resident form of a weight (called once per weight at load)."""

    @abstractmethod
    def matmul(self, prepared: Any, xq: np.ndarray) -> np.ndarray:
        """Exact integer products: xq int8 (T, K) → float32 (T, M) holding `xq @ T.T`."""

    def matmul_group(self, prepared: list[Any], xq: np.ndarray) -> list[np.ndarray]:
        """The products of several weights with the same activations (q/k/v, gate/up).

        A backend that splits work across cores overrides this to meet its helpers once per group.
        """
        return [self.matmul(p, xq) for p in prepared]

    def bitlinear_group(self, prepared: list[Any], xq: np.ndarray, gamma: np.ndarray,
                        scales: list[tuple[np.float32, np.float32 | None]]) -> list[np.ndarray]:
        """BitLinear's outputs y = ((T · x_q) / γ) · s [· s_out] for several weights with the same input.

        gamma float32 (T, 1): each token's activation scale; scales[i] = (s, s_out or None) of weight
        i. The results are row-major float32 whatever layout the products came in, so every later
        reduction (the next RMSNorm's mean) sums in the same order whichever kernel ran."""
        ys = []
        for product, (scale, out_scale) in zip(self.matmul_group(prepared, xq), scales, strict=True):
            y = np.divide(product, gamma, out=np.empty(product.shape, dtype=np.float32))
            y *= scale
            if out_scale is not None:
                y *= out_scale
            ys.append(y)
        return ys

