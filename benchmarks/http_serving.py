"""The HTTP face, end to end: prompt-cache time-to-first-token and continuous-batching throughput.

Starts `edgebit serve MODEL --http` as a child process on a loopback port and measures with httpx:

* cache: two streamed completions sharing a ~250-token instruction (what an automation sends with
  every item); the second one's time to first token against the first one's (target <= 25 %).
* batching: aggregate completion tokens/s of 4 concurrent streams against one stream alone
  (target >= 2.5x); every stream asks for the same number of tokens at temperature 0.

By default the model is a random model of the "small" shape written once to /tmp; pass --model
for another (e.g. the 2B4T-shaped file benchmarks/mqtt_classify.py writes). Random weights: the
numbers measure the runtime, not the answers.

    python benchmarks/http_serving.py
    python benchmarks/http_serving.py --model /tmp/edgebit-bench/2b4t-llama3.gguf --tokens 16
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

import edgebit
from edgebit.synthetic import write_random_model

DEFAULT_MODEL = Path(tempfile.gettempdir()) / "edgebit-bench" / "small.gguf"
INSTRUCTION_WORDS = ("You triage incoming email for a small company. Read the message and answer with one "
                     "label: billing, support, sales, spam or other. Billing covers invoices, payments and "
                     "refunds; support covers broken products and questions about using them; sales covers "
                     "quotes and orders; spam is unsolicited advertising. ").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def instruction(model: Path, tokens: int) -> str:
    """Repeat the instruction text until it is `tokens` tokens long in this model's vocabulary."""
    tok = edgebit.load_tokenizer(model)
    words: list[str] = []
    while len(tok.encode(" ".join(words))) < tokens:
        words.append(INSTRUCTION_WORDS[len(words) % len(INSTRUCTION_WORDS)])
    return " ".join(words)


def stream(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total time, completion tokens) of one streamed completion."""
    started = time.perf_counter()
    first, tokens = None, 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None:
                first = time.perf_counter() - started
            tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
    return first or 0.0, time.perf_counter() - started, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--prefix", type=int, default=250, help="tokens of the shared instruction")
    ap.add_argument("--tokens", type=int, default=48, help="completion tokens per stream (batching)")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="repetitions; the medians are reported")
    args = ap.parse_args()
    if not args.model.exists():
        args.model.parent.mkdir(parents=True, exist_ok=True)
        write_random_model(args.model, "small", seed=1)
    port = free_port()
    cmd = [sys.executable, "-m", "edgebit", "serve", str(args.model), "--http", f"127.0.0.1:{port}",
           "--threads", str(args.threads), "--parallel", str(args.streams)]
    if args.backend:
        cmd += ["--backend", args.backend]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=600) as client:
            while True:
                if proc.poll() is not None:
                    sys.exit("the server exited during start-up")
                try:
                    if client.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.5)
            info = client.get(url + "/v1/models").json()["data"][0]["id"]
            print(f"model {info} ({args.model}), {args.threads} threads")
            stream(client, url, "warm-up", 2)
            text = instruction(args.model, args.prefix)
            ratios, singles, aggregates = [], [], []
            for rep in range(args.repeat):
                # a new instruction each repetition, so the first request of each pair is really cold
                cold, _, _ = stream(client, url, f"[{rep}] {text}\nMessage: my invoice is wrong\nLabel:", 1)
                warm, _, _ = stream(client, url, f"[{rep}] {text}\nMessage: the printer is broken\nLabel:", 1)
                ratios.append(warm / cold)
                print(f"cache: time to first token {cold * 1000:.0f} ms cold, {warm * 1000:.0f} ms with the "
                      f"{args.prefix}-token prefix cached: {warm / cold:.1%}")
                _, alone, n = stream(client, url, f"[{rep}] Once upon a time", args.tokens)
                singles.append(n / alone)
                prompts = [f"[{rep}] Story {i}: once upon a time" for i in range(args.streams)]
                started = time.perf_counter()
                with ThreadPoolExecutor(args.streams) as pool:
                    results = list(pool.map(lambda p: stream(client, url, p, args.tokens), prompts))
                wall = time.perf_counter() - started
                aggregates.append(sum(r[2] for r in results) / wall)
                print(f"batching: 1 stream {singles[-1]:.1f} tok/s; {args.streams} streams {aggregates[-1]:.1f} "
                      f"tok/s aggregate: {aggregates[-1] / singles[-1]:.2f}x")
            print(f"median of {args.repeat}: cache {statistics.median(ratios):.1%} of cold (target <= 25 %); "
                  f"batching {statistics.median(aggregates) / statistics.median(singles):.2f}x (target >= 2.5x)")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
