"""Where the time of one decode step goes, and what the LM-head forms cost.

    python benchmarks/profile_decode.py --backend dense --threads 2 [--model PATH] [--wait-idle]
    python benchmarks/profile_decode.py --backend numba --threads 2 --prompt 128   # a prompt instead

Without --model it uses the random 2B4T-shaped model that `edgebit bench --shape 2b4t` writes to
the cache. The transformer's building blocks are wrapped with timers for `--steps` generated
tokens after a `--context`-token prompt; "other" is what the forward pass spends outside them
(residual adds, reshapes, the KV-cache copy). Then each LM-head form of
`edgebit.backends.lm_head` is timed on the same model's embedding.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
from idle import wait_until_idle

import edgebit
from edgebit.backends.lm_head import LMHead, TopK
from edgebit.bench import random_model

BLOCKS = ("norm_quantize", "rmsnorm", "quantize_activations", "rope", "attention", "ffn_activation", "logits")


def timed(totals: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    return wrapper


def best_ms(fn: Callable[[], Any], repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--backend", default="dense")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=0,
                        help="profile prefilling a prompt of this many tokens instead of decode steps")
    parser.add_argument("--wait-idle", action="store_true")
    args = parser.parse_args()
    path = args.model or str(random_model("2b4t"))
    model = edgebit.load(path, backend=args.backend, threads=args.threads)
    tr = model.transformer
    cache = model.new_cache()
    rng = np.random.default_rng(0)
    model.prefill(cache, rng.integers(0, model.config.n_vocab, args.context).tolist())
    if args.wait_idle:
        wait_until_idle()

    totals: dict[str, float] = defaultdict(float)
    tr.backend.bitlinear_group = timed(totals, "bitlinear (backend)", tr.backend.bitlinear_group)
    for name in BLOCKS:
        setattr(tr, name, timed(totals, name, getattr(tr, name)))
    token = 1
    start = time.perf_counter()
    if args.prompt:
        args.steps = 1
        model.prefill(cache, rng.integers(0, model.config.n_vocab, args.prompt).tolist())
    for _ in range(0 if args.prompt else args.steps):
        token = int(np.argmax(model.prefill(cache, [token], top=TopK(1))))  # as greedy generation does
    step = (time.perf_counter() - start) / args.steps * 1e3
    print(f"{path}: backend {tr.backend.name}, threads {args.threads or 'all'}, context {args.context}")
    if args.prompt:
        print(f"prompt of {args.prompt} tokens {step:.1f} ms ({args.prompt * 1e3 / step:.2f} tok/s)")
    else:
        print(f"decode step {step:.1f} ms ({1e3 / step:.2f} tok/s)")
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    rows.append(("other", args.steps * step / 1e3 - sum(totals.values())))
    for name, total in rows:
        ms = total / args.steps * 1e3
        print(f"  {name:<28} {ms:8.2f} ms  {ms / step:6.1%}")

    x = rng.standard_normal((1, model.config.n_embd)).astype(np.float32)
    print("LM head forms (one token; screened: the greedy arg-max, as generation computes it):")
    print(f"  Transformer.logits (final norm + its head)  {best_ms(lambda: tr.logits(x)):8.2f} ms")
    for mode in ("float32", "float16", "int8", "screened"):
        start = time.perf_counter()
        head = LMHead(tr.lm_head.embedding, mode, threads=args.threads)
        built = time.perf_counter() - start
        call = (lambda h=head: h.top(x, [TopK(1)])) if head.mode == "screened" else (lambda h=head: h(x))
        print(f"  LMHead {head.mode:<8} {best_ms(call):8.2f} ms   (built in {built:.2f} s, "
              f"{LMHead.resident_bytes(head.mode, head.shape) / 1e9:.2f} GB)")
        del head

if __name__ == "__main__":
    main()
