"""First-run compile time and warm load time of the compiled kernels, each in a fresh process.

    python benchmarks/numba_compile.py [--model PATH] [--threads 2]

1. `compile_all()` with an empty kernel cache: what the first `edgebit.load` on a new CPU pays.
2. `compile_all()` again: the cache is warm (target: well under a second).
3. `edgebit.load(MODEL, backend="numba")` with the warm cache: the whole load (target ≤ 3 s for
   the 2B4T shape; without --model the random 2B4T-shaped model of `edgebit bench --shape 2b4t`).
Each step runs in its own process with a private EDGEBIT_HOME for the kernel cache, so nothing
here touches the user's cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

COMPILE = """
import json, time
start = time.perf_counter()
from edgebit.backends import numba_kernels as nk
imported = time.perf_counter()
seconds = nk.compile_all()
print(json.dumps({"import_s": imported - start, "compile_s": sum(seconds.values()), "per_kernel_s": seconds,
                  "from_cache": nk.cache_hits(), "kernels": len(nk.SIGNATURES)}))
"""

LOAD = """
import json, sys, time
start = time.perf_counter()
import edgebit
model = edgebit.load(sys.argv[1], backend="numba", threads=int(sys.argv[2]))
print(json.dumps({"load_s": time.perf_counter() - start, "backend": model.backend.name}))
"""


def run(code: str, env: dict[str, str], *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file to load (default: the random 2B4T shape)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = args.model
    if model is None:
        from edgebit.bench import random_model

        model = str(random_model("2b4t"))
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "EDGEBIT_HOME": home}
        env.pop("NUMBA_CACHE_DIR", None)
        cold = run(COMPILE, env)
        warm = run(COMPILE, env)
        load = run(LOAD, env, model, str(args.threads))
    print(json.dumps({"cold": cold, "warm": warm, "warm_load": load, "model": model}, indent=2))


if __name__ == "__main__":
    main()
