"""The automatic backend choice: what fits in this machine's memory, then what a short probe measured fastest.

The probe multiplies a random weight of a typical projection shape with each candidate backend, at
one token (generation) and at PROBE_PROMPT tokens (prompt processing). Results are cached per
machine fingerprint (CPU, features, cores, numpy) and thread count in `cache_dir()/probe.json`,
so a machine pays for the probe once. `backend=` / `--backend` / `EDGEBIT_BACKEND` bypass all this.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import platformdirs

from .. import quants
from ..gguf import GGUFFile
from ..weights import TernaryWeight
from .base import Backend
from .machine import Machine, detect

log = logging.getLogger(__name__)

PROBE_VERSION = 2  # 2: best of interleaved rounds
PROBE_SHAPE = (4096, 2560)  # rows × K of the probe weight (K as in the 2B4T)
PROBE_PROMPT = 64  # tokens of the prompt-processing probe
PROBE_ROUNDS = 3  # each backend's best of this many interleaved measurements
WORKLOAD = (128, 128)  # (prompt, generated) tokens of the request the choice is optimised for
MEMORY_SHARE = 0.85  # at most this share of the available memory goes to resident weights + extras
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Without a probe: fastest first (benchmarks/RESULTS.md); backends not listed come last.
STATIC_ORDER = ("numba", "dense", "float32", "packed", "lut")


def cache_dir() -> Path:
    """Where edgebit caches machine-specific results: $EDGEBIT_HOME/cache, else the platform cache dir."""
    home = os.environ.get("EDGEBIT_HOME")
    return Path(home) / "cache" if home else Path(platformdirs.user_cache_dir("edgebit"))


def model_shapes(gguf: GGUFFile) -> list[tuple[int, int]]:
    """(M, K) of every ternary projection of a model file, from its tensor table (nothing is read)."""
    shapes = []
    for name, info in gguf.tensors.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in PROJECTIONS and parts[3] == "weight":
            shapes.append((int(info.shape[0]), int(info.shape[1])))
    return shapes


def embedding_shape(gguf: GGUFFile) -> tuple[int, int]:
    """(vocab, dim) of the tied embedding / LM head, (0, 0) if the file has none (the loader reports that)."""
    info = gguf.tensors.get("token_embd.weight")
    return (int(info.shape[0]), int(info.shape[1])) if info is not None and len(info.shape) == 2 else (0, 0)


def projection_shapes(n_layer: int, n_embd: int, n_kv: int, n_ff: int) -> list[tuple[int, int]]:
    """(M, K) of every ternary projection of a BitNet model with these dimensions (n_kv = KV width)."""
    layer = [(n_embd, n_embd), (n_kv, n_embd), (n_kv, n_embd), (n_embd, n_embd),
             (n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff)]
    return layer * n_layer


def footprint(backend: type[Backend], shapes: list[tuple[int, int]]) -> int:
    """Resident bytes of all the model's ternary weights in this backend's form."""
    return sum(backend.resident_bytes(s) for s in shapes)


@dataclass(frozen=True)
class Speed:
    """Probe result: nanoseconds per weight for one token, and per weight·token for a prompt."""

    decode_ns: float
    prompt_ns: float

    def cost(self, prompt: int = WORKLOAD[0], generate: int = WORKLOAD[1]) -> float:
        """Relative time of a request with `prompt` prompt tokens and `generate` generated tokens."""
        return prompt * self.prompt_ns + generate * self.decode_ns


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up: scratch buffers, pages, BLAS
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(backend: type[Backend], threads: int | None, shape: tuple[int, int] = PROBE_SHAPE) -> Speed:
    """Time one backend on a random weight of `shape` (about a tenth of a second per backend)."""
    rng = np.random.default_rng(0)
    m, k = shape
    codes = rng.integers(-1, 2, size=shape, dtype=np.int8)
    raw = np.frombuffer(quants.i2s_encode(codes, 1.0), dtype=np.uint8)
    kernel = backend(threads=threads)
    prepared = kernel.prepare(TernaryWeight("probe", shape, 1.0, "I2_S", raw))
    one = rng.integers(-128, 128, size=(1, k), dtype=np.int8)
    many = rng.integers(-128, 128, size=(PROBE_PROMPT, k), dtype=np.int8)
    decode = _best_time(lambda: kernel.matmul(prepared, one), 5)
    prompt = _best_time(lambda: kernel.matmul(prepared, many), 2)
    return Speed(decode_ns=decode / (m * k) * 1e9, prompt_ns=prompt / (m * k * PROBE_PROMPT) * 1e9)


def read_cache(path: Path) -> dict:
    """A JSON object cached at `path`, or {} if it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, data: dict) -> None:
    """Replace `path` with `data` as JSON, atomically; a failure is only logged."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp",
                                         encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(fh.name, path)
    except OSError as exc:  # a read-only home must not stop a model from loading
        log.warning("could not write the cache %s: %s", path, exc)


def probe(backends: dict[str, type[Backend]], threads: int | None, machine: Machine) -> dict[str, Speed]:
    """Speeds of `backends` on this machine, measured once and cached per machine and thread count."""
    path = cache_dir() / "probe.json"
    data = read_cache(path)
    if data.get("version") != PROBE_VERSION:
        data = {"version": PROBE_VERSION, "machines": {}}
    key = f"threads={threads or machine.cpus}"
    entry = data["machines"].setdefault(machine.fingerprint(), {}).setdefault(key, {})
    missing = [name for name in backends if name not in entry]
    best: dict[str, Speed] = {}
    for _ in range(PROBE_ROUNDS):  # interleaved rounds: a burst of load elsewhere hits every backend alike
        for name in missing:
            log.info("probing backend %r (%s)", name, key)
            speed = measure(backends[name], threads)
            old = best.get(name, speed)
            best[name] = Speed(min(old.decode_ns, speed.decode_ns), min(old.prompt_ns, speed.prompt_ns))
    for name, speed in best.items():
        entry[name] = asdict(speed)
    if missing:
        write_cache(path, data)
    return {name: Speed(**entry[name]) for name in backends}


@dataclass(frozen=True)
class Choice:
    """The chosen backend and why."""

    backend: str
    reason: str


def choose_backend(shapes: list[tuple[int, int]], threads: int | None = None, extra_bytes: int = 0,
                   machine: Machine | None = None, backends: dict[str, type[Backend]] | None = None,
                   use_probe: bool = True) -> Choice:
    """Pick the fastest supported backend whose weights for `shapes` plus `extra_bytes` fit in memory.

    `shapes` are the model's ternary weight shapes (`model_shapes`); `extra_bytes` what else the
    model keeps resident (LM head, KV cache). The reference backend is only chosen if nothing else
    is installed. With `use_probe=False` the order is STATIC_ORDER.
    """
    from . import available_backends

    machine = machine or detect()
    installed = backends if backends is not None else available_backends()
    supported = {n: c for n, c in installed.items() if c.supported()[0]}
    candidates = {n: c for n, c in supported.items() if n != "reference"} or supported
    if not candidates:
        raise ValueError("no installed backend can run on this machine")
    budget = None if machine.mem_available is None else int(machine.mem_available * MEMORY_SHARE)
    need = {n: footprint(c, shapes) + extra_bytes for n, c in candidates.items()}
    fitting = [n for n in candidates if budget is None or need[n] <= budget]
    if not fitting:
        smallest = min(candidates, key=need.get)
        return Choice(smallest, f"nothing fits in {_gb(budget)} of available memory; {smallest!r} needs the "
                                f"least ({_gb(need[smallest])})")
    if use_probe:
        speeds = probe({n: candidates[n] for n in fitting}, threads, machine)
        best = min(fitting, key=lambda n: speeds[n].cost())
        how = f"fastest in the probe ({speeds[best].decode_ns:.3f} ns/weight per generated token)"
    else:
        best = min(fitting, key=lambda n: STATIC_ORDER.index(n) if n in STATIC_ORDER else len(STATIC_ORDER))
        how = "first in the static order"
    room = "" if budget is None else f" of those fitting in {_gb(budget)}"
    needs = f"; needs {_gb(need[best])}" if shapes else ""  # without a model there is nothing to size
    return Choice(best, f"{how}{room}{needs}")


def choose_lm_head(backend: type[Backend], shapes: list[tuple[int, int]], embedding_shape: tuple[int, int],
                   extra_bytes: int = 0, machine: Machine | None = None) -> str:
    """The exact LM-head form for a model: "float32" if it fits beside the backend's weights, else "float16".

    With the compiled kernels the head reads the file's f16 values directly, so a float32 copy would
    only cost memory, and the int8 screen halves what generating a token reads: "screened".
    """
    from .fast import kernels
    from .lm_head import LMHead

    if kernels() is not None:
        return "screened"
    machine = machine or detect()
    if machine.mem_available is None:
        return "float32"
    need = footprint(backend, shapes) + extra_bytes + LMHead.resident_bytes("float32", embedding_shape)
    return "float32" if need <= machine.mem_available * MEMORY_SHARE else "float16"


def _gb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e9:.2f} GB"
