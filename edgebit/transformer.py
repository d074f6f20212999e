"""The BitNet b1.58 forward pass (spec §4), in one file that reads top to bottom.

    h = token_embd[ids]
    per layer:  a = rmsnorm(h)·attn_norm;  q,k,v = BitLinear(a);  rope(q,k);  store k,v
                o = attention(q, K, V);    h += BitLinear(rmsnorm(o)·attn_sub_norm; attn_output)
                f = rmsnorm(h)·ffn_norm;   z = act(BitLinear(f; gate)) · BitLinear(f; up)
                h += BitLinear(rmsnorm(z)·ffn_sub_norm; ffn_down)
    logits = (rmsnorm(h)·output_norm) @ token_embdᵀ

The architectures differ only in data (`Config`): FFN activation (relu² for `bitnet-b1.58`,
SiLU for `bitnet`), RoPE base, optional per-projection output scales. The ternary products, and
BitLinear's scaling of them, are one call per group of projections that share an input,
`backend.bitlinear_group(weights, x_q, γ, scales)`.
`numerics="ggml"` adds the reference C++ tool's f16 rounding points (reference-models README,
"Numerics"); the default is plain float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends import Backend
from .backends.fast import kernels
from .backends.lm_head import LMHead, TopK
from .backends.select import choose_lm_head, model_shapes
from .gguf import GGUFError, GGUFFile
from .quants import dequantize
from .weights import load_ternary

log = logging.getLogger(__name__)

ARCHITECTURES = {"bitnet-b1.58": "relu2", "bitnet-25": "relu2", "bitnet": "silu"}
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NUMERICS = ("reference", "ggml")
KV_DTYPES = {"float32": np.float32, "float16": np.float16}
# From this many rows the compiled norm and activation share the rows among the backend's threads;
# fewer (a generated token) stay on the calling thread, which finishes before threads would start.
PARALLEL_ROWS = 8


@dataclass(frozen=True)
class Config:
    """Hyper-parameters read from GGUF metadata (spec §3)."""

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx: int
    rope_base: float
    eps: float
    activation: str  # "relu2" | "silu"

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, activation: str | None = None) -> Config:
        meta = gguf.metadata
        arch = meta.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise GGUFError(
                f"{gguf.path}: general.architecture = {arch!r}; edgebit runs {', '.join(ARCHITECTURES)}"
            )

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise GGUFError(f"{gguf.path}: required metadata key {arch}.{key} is missing")
            return value

        n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
        if "token_embd.weight" not in gguf.tensors:
            raise GGUFError(f"{gguf.path}: required tensor 'token_embd.weight' is missing")
        n_vocab = gguf.tensors["token_embd.weight"].shape[0]
        head_dim = int(meta.get(f"{arch}.attention.key_length", n_embd // max(n_head, 1)))
        n_rot = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
        if n_head <= 0 or head_dim * n_head != n_embd or n_rot != head_dim or head_dim % 2:
            raise GGUFError(
                f"{gguf.path}: inconsistent attention shape: embedding_length {n_embd}, head_count {n_head}, "
                f"head_dim {head_dim}, rope.dimension_count {n_rot} (all dims must be rotated, head_dim even)"
            )
        n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
        if n_head_kv <= 0 or n_head % n_head_kv:
            raise GGUFError(f"{gguf.path}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        scaling = meta.get(f"{arch}.rope.scaling.type", "none")
        factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
        if scaling not in ("none", "linear") or factor not in (0.0, 1.0):
            raise GGUFError(f"{gguf.path}: RoPE scaling {scaling!r} × {factor} is not supported")
        act = activation or ARCHITECTURES[arch]
        if act not in ("relu2", "silu"):
            raise ValueError(f"activation must be 'relu2' or 'silu', not {act!r}")
        config = cls(
            arch=arch, n_vocab=n_vocab, n_embd=n_embd, n_layer=int(get("block_count")), n_head=n_head,
            n_head_kv=n_head_kv, head_dim=head_dim, n_ff=int(get("feed_forward_length")),
            n_ctx=int(get("context_length", 4096)), rope_base=float(get("rope.freq_base", 10000.0)),
            eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), activation=act,
        )
        if arch == "bitnet" and activation is None and (config.n_embd, config.n_layer, n_head_kv) == (2560, 30, 5):
            log.warning("%s: arch 'bitnet' with 2B4T dimensions: 2B4T was trained with relu² — "
                        "pass activation='relu2' if this is BitNet-b1.58-2B-4T", gguf.path)
        return config

    def metadata(self) -> list[tuple[str, int | float]]:
        """The GGUF keys `from_gguf` reads, for writers (convert, random models); floats are float32."""
        a = self.arch
        return [(f"{a}.vocab_size", self.n_vocab), (f"{a}.context_length", self.n_ctx),
                (f"{a}.embedding_length", self.n_embd), (f"{a}.block_count", self.n_layer),
                (f"{a}.feed_forward_length", self.n_ff), (f"{a}.rope.dimension_count", self.head_dim),
                (f"{a}.attention.head_count", self.n_head), (f"{a}.attention.head_count_kv", self.n_head_kv),
                (f"{a}.attention.layer_norm_rms_epsilon", float(self.eps)),
                (f"{a}.rope.freq_base", float(self.rope_base))]

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every ternary projection of a block."""
        kv = self.n_head_kv * self.head_dim
        return {"attn_q": (self.n_embd, self.n_embd), "attn_k": (kv, self.n_embd), "attn_v": (kv, self.n_embd),
                "attn_output": (self.n_embd, self.n_embd), "ffn_gate": (self.n_ff, self.n_embd),
                "ffn_up": (self.n_ff, self.n_embd), "ffn_down": (self.n_embd, self.n_ff)}

    def norm_sizes(self) -> dict[str, int]:
        """Length of every norm vector of a block."""
        return {"attn_norm": self.n_embd, "attn_sub_norm": self.n_embd, "ffn_norm": self.n_embd,
                "ffn_sub_norm": self.n_ff}


@dataclass
class Layer:
    """One decoder block: norm vectors (float32) and prepared ternary projections."""

    attn_norm: np.ndarray
    attn_sub_norm: np.ndarray
    ffn_norm: np.ndarray
    ffn_sub_norm: np.ndarray
    proj: dict[str, Any]  # backend-prepared weights by projection name
    scale: dict[str, np.float32]  # per-tensor weight scale s
    out_scale: dict[str, np.float32]  # optional `*.scale` tensor (arch bitnet), else absent


@dataclass
class KVCache:
    """Keys and values of every layer, (n_head_kv, capacity, head_dim) each; grows by doubling."""

    n_layer: int
    n_head_kv: int
    head_dim: int
    dtype: type
    length: int = 0
    k: list[np.ndarray] = field(default_factory=list)
    v: list[np.ndarray] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1] if self.k else 0

    def reserve(self, n: int) -> None:
        if n <= self.capacity:
            return
        cap = max(n, 2 * self.capacity, 64)
        shape = (self.n_head_kv, cap, self.head_dim)
        for store in (self.k, self.v):
            for i in range(self.n_layer):
                grown = np.zeros(shape, dtype=self.dtype)
                if store and i < len(store):
                    grown[:, : self.length] = store[i][:, : self.length]
                if i < len(store):
                    store[i] = grown
                else:
                    store.append(grown)

    def truncate(self, n: int) -> None:
        """Forget everything after the first n positions (the slots are reused)."""
        self.length = min(self.length, n)

    def copy(self) -> KVCache:
        clone = KVCache(self.n_layer, self.n_head_kv, self.head_dim, self.dtype, self.length)
        clone.k = [a[:, : self.length].copy() for a in self.k]
        clone.v = [a[:, : self.length].copy() for a in self.v]
        return clone

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)


@dataclass
class _Segment:
    """Rows start:stop of a forward call that continue one KV cache, at `positions`, seeing `mask`
    (rows × cached + new keys)."""

    cache: KVCache
    start: int
    stop: int
    positions: np.ndarray
    mask: np.ndarray


def _f16_round(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


class Transformer:
    """Weights plus the forward pass. Stateless between calls: all state lives in a `KVCache`."""

    def __init__(self, gguf: GGUFFile, backend: Backend, numerics: str = "reference",
                 activation: str | None = None, progress: Callable[[int, int], None] | None = None,
                 lm_head: str | None = None) -> None:
        """Read and prepare every weight; `progress(done, total)` is called after each layer.

        lm_head: resident form of the tied head, "float32", "float16" or "screened" (exact) or "int8"
        (approximate, opt-in); None: `select.choose_lm_head`.
        """
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, not {numerics!r}")
        self.config = cfg = Config.from_gguf(gguf, activation)
        self.backend = backend
        self.numerics = numerics
        self._check_tensors(gguf)
        embedding = self._embedding(gguf)  # (n_vocab, n_embd), f16 view of the file or float32
        mode = lm_head or choose_lm_head(type(backend), model_shapes(gguf), embedding.shape)
        screened = mode == "screened" and embedding.dtype == np.float16
        file_rows = gguf.tensor_rows("token_embd.weight") if screened else None  # the rows it copies
        self.lm_head = LMHead(embedding, mode, backend.threads, file_rows)  # tied to token_embd, which it looks up
        self.output_norm = self._vector(gguf, "output_norm.weight", cfg.n_embd)
        self.layers = []
        for i in range(cfg.n_layer):
            self.layers.append(self._layer(gguf, i))
            if progress is not None:
                progress(i + 1, cfg.n_layer)
        self._inv_freq = self._rope_frequencies()

    # --- loading

    def _check_tensors(self, gguf: GGUFFile) -> None:
        for name in gguf.tensors:
            if name.endswith(".bias") or name == "rope_freqs.weight":
                raise GGUFError(f"{gguf.path}: tensor {name!r} (biases / rope_freqs) is not supported by edgebit")
            if name == "output.weight":
                log.info("%s: ignoring output.weight; the BitNet LM head is token_embd (tied)", gguf.path)

    def _vector(self, gguf: GGUFFile, name: str, size: int) -> np.ndarray:
        info = gguf.tensors.get(name)
        if info is None:
            raise GGUFError(f"{gguf.path}: required tensor {name!r} is missing")
        if info.n_elements != size:
            raise GGUFError(f"{gguf.path}: tensor {name!r} has {info.n_elements} elements, expected {size}")
        return dequantize(gguf.tensor_bytes(name), info.type.name, size).copy()

    def _embedding(self, gguf: GGUFFile) -> np.ndarray:
        info = gguf.tensors["token_embd.weight"]
        if info.shape[1:] != (self.config.n_embd,):
            raise GGUFError(f"{gguf.path}: token_embd.weight has shape {info.shape}, "
                            f"expected (n_vocab, {self.config.n_embd})")
        if info.type.name in ("F16", "F32"):
            return gguf.tensor_array("token_embd.weight")
        flat = dequantize(gguf.tensor_bytes("token_embd.weight"), info.type.name, info.n_elements)
        return flat.reshape(info.shape)

    def _layer(self, gguf: GGUFFile, i: int) -> Layer:
        cfg = self.config
        shapes = cfg.projection_shapes()
        proj, scale, out_scale = {}, {}, {}
        for p in PROJECTIONS:
            w = load_ternary(gguf, f"blk.{i}.{p}.weight")
            if w.shape != shapes[p]:
                raise GGUFError(f"{gguf.path}: tensor 'blk.{i}.{p}.weight' has shape {w.shape}, expected {shapes[p]}")
            proj[p] = self.backend.prepare(w)
            scale[p] = np.float32(w.scale)
            if f"blk.{i}.{p}.scale" in gguf.tensors:
                out_scale[p] = np.float32(self._vector(gguf, f"blk.{i}.{p}.scale", 1)[0])
        norms = {name: self._vector(gguf, f"blk.{i}.{name}.weight", size) for name, size in cfg.norm_sizes().items()}
        return Layer(**norms, proj=proj, scale=scale, out_scale=out_scale)

    def _rope_frequencies(self) -> np.ndarray:
        """θ_i = base^(-2i/d) in float32 (HF's inv_freq)."""
        d, base = self.config.head_dim, self.config.rope_base
        return (1.0 / (np.float32(base) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))).astype(np.float32)

    # --- building blocks

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """y = x / sqrt(mean(x²) + ε) · w, per row (ggml: float32 squares summed in double)."""
        if self.numerics == "ggml":
            mean = (np.square(x).sum(axis=-1, keepdims=True, dtype=np.float64) / x.shape[-1]).astype(np.float32)
            return x * (np.float32(1.0) / np.sqrt(mean + np.float32(self.config.eps))) * weight
        mean = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
        return x * (np.float32(1.0) / np.sqrt(mean + np.float32(self.config.eps))) * weight

    @staticmethod
    def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-token absmax int8 (spec §4.2): γ = 127/max(|x|, 1e-5), x_q = clamp(rint(x·γ), -128, 127)."""
        amax = np.maximum(np.abs(x).max(axis=-1, keepdims=True).astype(np.float64), 1e-5)
        gamma = (127.0 / amax).astype(np.float32)
        scaled = x * gamma  # |x·γ| ≤ 127 (+ rounding), so rint stays in int8 range: no clamp pass needed
        return np.rint(scaled, out=scaled).astype(np.int8), gamma

    def norm_quantize(self, x: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """quantize_activations(rmsnorm(x, weight)): one compiled pass over each row when the kernels
        are installed (the same operations in the same order, so identical numbers), numpy otherwise."""
        fast = kernels()
        if fast is None or self.numerics == "ggml":
            return self.quantize_activations(self.rmsnorm(x, weight))
        x = np.ascontiguousarray(x, dtype=np.float32)
        xq, gamma = np.empty(x.shape, dtype=np.int8), np.empty(x.shape[0], dtype=np.float32)
        if x.shape[0] < PARALLEL_ROWS:
            fast.rmsnorm_quantize(x, weight, np.float32(self.config.eps), xq, gamma)
        else:
            with fast.launch(self.backend.threads):
                fast.rmsnorm_quantize_rows(x, weight, np.float32(self.config.eps), xq, gamma)
        return xq, gamma[:, None]

    def bitlinear(self, layer: Layer, names: tuple[str, ...], xq: np.ndarray, gamma: np.ndarray) -> list[np.ndarray]:
        """y = (T · x_q) / γ · s  [· optional output scale] for each named projection of the same input,
        in one backend call for the group (`Backend.bitlinear_group` has the float32 operations)."""
        return self.backend.bitlinear_group([layer.proj[name] for name in names], xq, gamma,
                                            [(layer.scale[name], layer.out_scale.get(name)) for name in names])

    def rope_tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of the RoPE angles (T, d/2) at `positions`: the same for q, k and every layer."""
        if self.numerics == "ggml":  # ggml's rope cache: angle = pos, then ·= base^(-2/d) per pair, in float32
            step = np.float32(self.config.rope_base) ** np.float32(-2.0 / self.config.head_dim)
            angles = np.empty((len(positions), self.config.head_dim // 2), dtype=np.float32)
            theta = np.asarray(positions, dtype=np.float32)
            for i in range(angles.shape[1]):
                angles[:, i] = theta
                theta = theta * step
        else:
            angles = positions.astype(np.float32)[:, None] * self._inv_freq[None, :]  # (T, d/2)
        return np.cos(angles), np.sin(angles)

    def rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """NEOX rotate-half RoPE on (heads, T, head_dim): pairs (i, i + d/2), angle pos·θ_i."""
        return self._rotate(x, *self.rope_tables(positions))

    @staticmethod
    def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """RoPE with the angles' cos and sin given (rope_tables): one compiled pass when the kernels
        are installed (the same float32 operations, so identical numbers), numpy otherwise."""
        fast = kernels()
        if fast is None or x.dtype != np.float32:
            return Transformer.rotate_half(x, cos, sin)
        out = np.empty(x.shape, dtype=np.float32)
        fast.rope(x, cos, sin, out)
        return out

    @staticmethod
    def rotate_half(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """NEOX rotate-half in numpy: (x1·cos − x2·sin, x1·sin + x2·cos) for the halves x1, x2 of each head."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Causal GQA attention. q (n_head, T, d); k, v (n_head_kv, ≥ L, d), of which the first
        L = mask.shape[1] positions are the keys; mask (T, L) bool → (T, n_head·d).

        Each query row is computed on its own against exactly the keys it may see, in position order.
        A row's numbers therefore do not depend on how many rows share the call: a prompt gives the
        same logits whether it is evaluated at once, in chunks or token by token, and a token tree
        (classification) gives the same numbers as running each branch separately. With the
        compiled kernels installed one compiled call does this for all rows and heads (float32
        caches); the numpy loop below is the reference and the fallback.
        """
        cfg = self.config
        n_rep, T, d = cfg.n_head // cfg.n_head_kv, q.shape[1], cfg.head_dim
        scale = np.float32(1.0 / np.sqrt(d))
        fast = kernels()
        if fast is not None and self.numerics != "ggml" and k.dtype == v.dtype == np.float32 \
                and k.flags.c_contiguous and v.flags.c_contiguous:
            out = np.empty((T, cfg.n_head, d), dtype=np.float32)
            with fast.launch(self.backend.threads):
                fast.attention(np.ascontiguousarray(q, dtype=np.float32), k, v,
                               np.ascontiguousarray(mask, dtype=bool), scale, out)
            return out.reshape(T, cfg.n_embd)
        if self.numerics == "ggml":
            q = _f16_round(q)
        qg = q.reshape(cfg.n_head_kv, n_rep, T, d)  # query head h uses kv head h // n_rep
        round_probs = self.numerics == "ggml" and T == 1  # ggml rounds probabilities only in decode
        out = np.empty((T, cfg.n_head_kv, n_rep, d), dtype=np.float32)
        gathered = np.empty(0, dtype=np.intp)  # which keys k_rows / v_rows hold (tree rows only)
        k_rows = v_rows = None
        for t in range(T):
            visible = np.flatnonzero(mask[t])
            n = visible.size
            if n and visible[-1] == n - 1:  # a prefix of the keys: a view, no copy
                keys, values = k[:, :n], v[:, :n]
            else:  # gather the visible keys; a row that sees its predecessor's keys plus itself adds one
                if k_rows is None:
                    k_rows, v_rows = np.empty_like(k), np.empty_like(v)
                if n == gathered.size + 1 and np.array_equal(visible[:-1], gathered):
                    k_rows[:, n - 1], v_rows[:, n - 1] = k[:, visible[-1]], v[:, visible[-1]]
                else:
                    k_rows[:, :n], v_rows[:, :n] = k[:, visible], v[:, visible]
                gathered = visible
                keys, values = k_rows[:, :n], v_rows[:, :n]
            scores = np.matmul(qg[:, :, t], keys.transpose(0, 2, 1)) * scale  # (n_kv, n_rep, n)
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            if round_probs:
                probs = _f16_round(probs)
            out[t] = np.matmul(probs, values)
        return out.reshape(T, cfg.n_embd)

    def ffn_activation(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """relu²(gate)·up (BitNet b1.58) or silu(gate)·up; relu² compiled for many rows when the
        kernels are installed (numpy's operations in numpy's order: the same numbers)."""
        if self.config.activation == "relu2":
            fast = kernels()
            if fast is not None and gate.shape[0] >= PARALLEL_ROWS and gate.dtype == up.dtype == np.float32 \
                    and gate.flags.c_contiguous and up.flags.c_contiguous:
                out = np.empty(gate.shape, dtype=np.float32)
                with fast.launch(self.backend.threads):
                    fast.relu2_product(gate, up, out)
                return out
            return np.square(np.maximum(gate, 0)) * up
        return gate / (1 + np.exp(-gate)) * up

    def new_cache(self, kv_dtype: str = "float32") -> KVCache:
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {tuple(KV_DTYPES)}, not {kv_dtype!r}")
        cfg = self.config
        return KVCache(cfg.n_layer, cfg.n_head_kv, cfg.head_dim, KV_DTYPES[kv_dtype])

    # --- the forward pass

    def forward(self, ids: np.ndarray, cache: KVCache, positions: np.ndarray | None = None,
                mask: np.ndarray | None = None) -> np.ndarray:
        """Run tokens `ids` after the `cache.length` tokens already in `cache`; returns hidden states (T, n_embd).

        `positions` default to cache.length + arange(T). `mask` (T, T) says which new tokens each new
        token may attend to (default causal); every cached token is visible. The new keys and values
        are appended to the cache (callers may `truncate` afterwards to discard them).
        """
        ids = np.asarray(ids, dtype=np.int64)
        T, past = len(ids), cache.length
        positions = past + np.arange(T) if positions is None else np.asarray(positions)
        new_mask = np.tril(np.ones((T, T), dtype=bool)) if mask is None else mask
        full_mask = np.concatenate([np.ones((T, past), dtype=bool), new_mask], axis=1)
        return self._layers(ids, [_Segment(cache, 0, T, positions, full_mask)])

    def forward_rows(self, ids: np.ndarray, caches: list[KVCache]) -> np.ndarray:
        """One new token for each of several sequences, row r continuing `caches[r]` (continuous
        batching): the projections run once for all rows, attention per row against its own cache.
        Each row gives the numbers `forward(ids[r:r+1], caches[r])` gives."""
        ids = np.asarray(ids, dtype=np.int64)
        segments = [_Segment(c, r, r + 1, np.array([c.length]), np.ones((1, c.length + 1), dtype=bool))
                    for r, c in enumerate(caches)]
        return self._layers(ids, segments)

    def _layers(self, ids: np.ndarray, segments: list[_Segment]) -> np.ndarray:
        """The decoder blocks over all rows of `ids`; each segment's rows extend its own KV cache."""
        cfg = self.config
        T = len(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.n_vocab):
            raise ValueError(f"token id out of range 0..{cfg.n_vocab - 1}")
        for seg in segments:
            seg.cache.reserve(seg.cache.length + seg.stop - seg.start)

        h = self.lm_head.lookup(ids)
        tables = [self.rope_tables(seg.positions) for seg in segments]
        for i, layer in enumerate(self.layers):
            # attention block
            xq, gamma = self.norm_quantize(h, layer.attn_norm)
            q, k, v = self.bitlinear(layer, ("attn_q", "attn_k", "attn_v"), xq, gamma)
            q = q.reshape(T, cfg.n_head, cfg.head_dim).transpose(1, 0, 2)
            k = k.reshape(T, cfg.n_head_kv, cfg.head_dim).transpose(1, 0, 2)
            v = v.reshape(T, cfg.n_head_kv, cfg.head_dim).transpose(1, 0, 2)
            o = np.empty((T, cfg.n_embd), dtype=np.float32)
            for seg, table in zip(segments, tables, strict=True):
                rows, cache, past = slice(seg.start, seg.stop), seg.cache, seg.cache.length
                end = past + seg.stop - seg.start
                sq, sk = self._rotate(q[:, rows], *table), self._rotate(k[:, rows], *table)
                cache.k[i][:, past:end] = sk
                cache.v[i][:, past:end] = v[:, rows]
                keys, values = cache.k[i], cache.v[i]  # attention reads the first `end` positions
                if keys.dtype != np.float32:
                    keys, values = keys[:, :end].astype(np.float32), values[:, :end].astype(np.float32)
                o[rows] = self.attention(sq, keys, values, seg.mask)
            xq, gamma = self.norm_quantize(o, layer.attn_sub_norm)
            h = h + self.bitlinear(layer, ("attn_output",), xq, gamma)[0]
            # feed-forward block
            xq, gamma = self.norm_quantize(h, layer.ffn_norm)
            z = self.ffn_activation(*self.bitlinear(layer, ("ffn_gate", "ffn_up"), xq, gamma))
            xq, gamma = self.norm_quantize(z, layer.ffn_sub_norm)
            h = h + self.bitlinear(layer, ("ffn_down",), xq, gamma)[0]
        for seg in segments:
            seg.cache.length += seg.stop - seg.start
        return h

    def logits(self, hidden: np.ndarray, ids: np.ndarray | None = None,
               top: Sequence[TopK] | None = None) -> np.ndarray:
        """Final norm and the tied LM head for the given hidden rows → float32 (rows, n_vocab),
        or (rows, len(ids)) for only the vocabulary entries `ids`; with `top` (one per row), only the
        entries each row's sampler looks at are exact, the rest may be -inf (`LMHead.top`)."""
        x = self.rmsnorm(hidden, self.output_norm)
        if self.numerics == "ggml" and x.shape[0] == 1:
            x = _f16_round(x)  # ggml rounds a single row to f16 before an f16 mat-vec
        if ids is not None:
            return self.lm_head.columns(x, ids)
        return self.lm_head(x) if top is None else self.lm_head.top(x, top)
