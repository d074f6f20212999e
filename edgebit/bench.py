"""llama-bench-style measurements: prompt processing (pp N) and generation (tg N) in tokens/s, load time, peak RSS.

`pp N` evaluates N random prompt tokens in one batch from an empty context (logits of the last
one included); `tg N` generates N tokens one at a time from an empty context, greedy, computing
what greedy generation computes (the arg-max's exact logit: with a screened LM head, not every
logit, `LMHead.top`). Each test
is repeated and reported as mean ± standard deviation, after a short warm-up. Peak RSS is the
high-water mark (VmHWM) of the process plus its helper lanes, so each backend is measured in a
fresh process (`run_isolated`): one backend's arrays would otherwise count against the next.
`random_model` writes (once) a random model of a real shape into the model store, marked as
generated, so anyone can benchmark the 2B4T shape without downloading it; `edgebit models list`
shows it and `edgebit models rm` removes it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .backends.lm_head import TopK
from .backends.machine import detect
from .config import cache_dir, models_dir
from .store import record_generated
from .synthetic import SHAPES, write_random_model


@dataclass
class BenchResult:
    """One test (pp N or tg N) of one model with one backend."""

    model: str
    model_bytes: int
    n_params: int
    backend: str
    threads: int
    test: str  # "pp128", "tg64"
    n_tokens: int
    samples_ts: list[float]  # tokens/s of each repetition
    load_s: float
    peak_rss_bytes: int
    cpu: str
    lm_head: str  # the LM head's resident form (lm_head.MODES)

    @property
    def avg_ts(self) -> float:
        return statistics.fmean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        return statistics.stdev(self.samples_ts) if len(self.samples_ts) > 1 else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "avg_ts": self.avg_ts, "stddev_ts": self.stddev_ts}


def _hwm(pid: int | str) -> int | None:
    """VmHWM (peak resident set) of a process in bytes, from /proc."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _children() -> list[int]:
    """Live child processes of this one (the backend's helper lanes)."""
    me, kids = os.getpid(), []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == me:
                        kids.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return kids


def peak_rss() -> int:
    """Peak resident set size in bytes of this process plus its live children (helper lanes hold
    part of the weights), each process's high-water mark summed; getrusage where /proc is missing."""
    own = _hwm("self")
    if own is None:
        scale = 1 if platform.system() == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return own + sum(_hwm(pid) or 0 for pid in _children())


def random_model_path(shape: str, directory: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """Where `random_model` keeps the model of this shape and seed (the store unless `directory`)."""
    return (Path(directory) if directory is not None else models_dir()) / f"random-{shape}-seed{seed}.gguf"


def random_model(shape: str, directory: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """A random I2_S model of a named shape (synthetic.SHAPES), written only if missing: by default
    into the model store as `random-SHAPE-seedN` (marked generated), else into `directory`."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    path = random_model_path(shape, directory, seed)
    folder = path.parent
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        earlier = cache_dir() / "models" / path.name  # where earlier versions kept it, unlisted
        if directory is None and earlier.is_file():
            shutil.move(earlier, path)
        else:
            partial = path.with_suffix(f".{os.getpid()}.partial")
            try:
                write_random_model(partial, shape, seed=seed)
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
        if directory is None:
            record_generated(path, f"random {shape} model, seed {seed} (edgebit.synthetic)")
    return path


GREEDY = TopK(1)


def _rates(fn, n_tokens: int, repetitions: int) -> list[float]:
    rates = []
    for _ in range(repetitions):
        start = time.perf_counter()
        fn()
        rates.append(n_tokens / (time.perf_counter() - start))
    return rates


def run_bench(path: str | os.PathLike[str], backend: str | None = None, threads: int | None = None,
              n_prompt: int = 128, n_gen: int = 64, repetitions: int = 3, seed: int = 0,
              lm_head: str | None = None) -> list[BenchResult]:
    """Load the model, then run pp `n_prompt` and tg `n_gen` (either may be 0) in this process.
    `lm_head` forces the LM head's form (default: the loader's choice)."""
    from . import load

    start = time.perf_counter()
    model = load(path, backend=backend, threads=threads, **({"lm_head": lm_head} if lm_head else {}))
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    vocab = model.config.n_vocab
    prompt = rng.integers(0, vocab, size=n_prompt).tolist()

    def pp() -> None:
        model.prefill(model.new_cache(), prompt)

    def tg() -> None:
        cache = model.new_cache()
        token = int(rng.integers(0, vocab))
        for _ in range(n_gen):
            token = int(np.argmax(model.prefill(cache, [token], top=GREEDY)))

    model.prefill(model.new_cache(), prompt[:8] or [0])  # warm-up: scratch buffers, BLAS, page faults
    tests = [(name, n, fn) for name, n, fn in ((f"pp{n_prompt}", n_prompt, pp), (f"tg{n_gen}", n_gen, tg)) if n > 0]
    samples = [_rates(fn, n, repetitions) for _, n, fn in tests]
    info, machine = model.info, detect()
    rss = peak_rss()
    head = getattr(model.transformer.lm_head, "mode", "float32")
    return [BenchResult(os.path.basename(os.fspath(path)), info["file_bytes"], info["parameters"],
                        model.backend.name, model.backend.threads or machine.cpus, name, n, rates, load_s, rss,
                        machine.cpu_model, head)
            for (name, n, _), rates in zip(tests, samples, strict=True)]


def run_isolated(path: str | os.PathLike[str], backend: str | None = None, threads: int | None = None,
                 n_prompt: int = 128, n_gen: int = 64, repetitions: int = 3,
                 lm_head: str | None = None) -> list[BenchResult]:
    """`run_bench` in a fresh Python process, so its peak RSS is this backend's alone."""
    spec = {"path": os.fspath(path), "backend": backend, "threads": threads, "n_prompt": n_prompt,
            "n_gen": n_gen, "repetitions": repetitions, "lm_head": lm_head}
    proc = subprocess.run([sys.executable, "-m", "edgebit.bench", json.dumps(spec)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark of backend {backend!r} failed:\n{proc.stderr.strip()}")
    return [BenchResult(**{k: v for k, v in row.items() if k not in ("avg_ts", "stddev_ts")})
            for row in json.loads(proc.stdout)]


def format_bytes(n: int) -> str:
    """Bytes as GiB or MiB, as llama-bench prints sizes."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_table(results: list[BenchResult]) -> str:
    """A markdown table in the style of llama-bench."""
    head = ["model", "size", "params", "backend", "LM head", "threads", "load s", "peak RSS", "test", "t/s"]
    rows = [[r.model, format_bytes(r.model_bytes), f"{r.n_params / 1e9:.2f} B" if r.n_params >= 1e8 else
             f"{r.n_params / 1e6:.2f} M", r.backend, r.lm_head, str(r.threads), f"{r.load_s:.2f}",
             format_bytes(r.peak_rss_bytes), r.test,
             f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}"] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    right = {1, 2, 5, 6, 7, 8, 9}

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    return "\n".join([line(head), rule, *(line(r) for r in rows)])


if __name__ == "__main__":  # the child process of run_isolated
    args = json.loads(sys.argv[1])
    print(json.dumps([r.to_json() for r in run_bench(**args)]))
