"""Benchmark every built-in backend on the 2B4T shape, each in a fresh process, and save the results.

    python benchmarks/bench_2b4t.py --threads 2 [--repetitions 2] [--wait-idle] [--out results.json]

The same measurements as `edgebit bench --shape 2b4t -b dense,packed,lut` (pp128, tg64, load time,
peak RSS), plus how busy the machine was around each run: on a shared box other processes'
load changes every number, so the share is recorded next to the result.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

from idle import busy_share, wait_until_idle

from edgebit.backends.machine import detect
from edgebit.bench import format_table, random_model, run_isolated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="dense,packed,lut")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--n-prompt", type=int, default=128)
    parser.add_argument("--n-gen", type=int, default=64)
    parser.add_argument("--shape", default="2b4t")
    parser.add_argument("--model", default=None,
                        help="a GGUF file instead of the random model of --shape, e.g. mqtt_classify.py's, which "
                             "carries the real Llama 3 vocabulary (its tokenizer is ~1 s of the load)")
    parser.add_argument("--lm-head", default=None,
                        help="float32 | float16 | int8 | screened (default: the loader's choice)")
    parser.add_argument("--wait-idle", action="store_true", help="wait for an idle machine before each backend")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    path = args.model or random_model(args.shape)
    machine = detect()
    results, records = [], []
    for name in args.backends.split(","):
        if args.wait_idle:
            wait_until_idle()
        before = busy_share()
        rows = run_isolated(path, name, args.threads, args.n_prompt, args.n_gen, args.repetitions, args.lm_head)
        after = busy_share()
        print(format_table(rows), f"\n(machine busy before/after: {before:.0%} / {after:.0%})", file=sys.stderr)
        results += rows
        records += [{**r.to_json(), "busy_before": before, "busy_after": after} for r in rows]
    print(format_table(results))
    report = {"machine": {"arch": machine.arch, "cpu": machine.cpu_model, "cores": machine.cpus,
                          "python": platform.python_version()}, "results": records}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
