"""Classification over MQTT, end to end: messages per second and round-trip latency percentiles.

A private Mosquitto, one `edgebit serve` node and a requester on this machine. The task has a
~250-token few-shot prompt (prefilled once, then reused from the prefix cache), 4 labels, and
each message is ~40 tokens. By default the model is a random model of the BitNet b1.58 2B4T
shape with the real LLaMA-3 vocabulary of ../shared/testdata (so prompt, message and label token
counts are the real model's: each label is one token), written once to /tmp (1.2 GB): the
numbers measure the runtime, not the answers.

    python benchmarks/mqtt_classify.py                      # 32 messages sent at once
    python benchmarks/mqtt_classify.py --rate 1 --count 20  # a steady 1 message/s
    python benchmarks/mqtt_classify.py --model ggml-model-i2_s.gguf --threads 2

Burst mode shows the throughput with micro-batching (queued requests with the same task and
labels are scored in one engine call); paced mode shows the latency of a node that keeps up.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import edgebit
from edgebit.synthetic import write_random_model

DEFAULT_MODEL = Path(tempfile.gettempdir()) / "edgebit-bench" / "2b4t-llama3.gguf"
VOCABULARY = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "derived" / "llama3-vocab-from-tiktoken.gguf"
LABELS = ["normal", "warning", "critical", "offline"]
EXAMPLES = [
    ("boiler 62C, pressure 1.4 bar, flame stable, circulation pump running quietly", "normal"),
    ("boiler 95C and climbing, pressure 2.9 bar, relief valve hissing", "critical"),
    ("boiler 74C, pressure 1.9 bar, pump louder than yesterday, small drip at the valve", "warning"),
    ("no flame, display shows E9, burner locked out, radiators cold", "offline"),
    ("boiler 58C, pressure 1.3 bar, night setback active, nothing unusual", "normal"),
    ("pressure dropped from 1.5 to 0.6 bar within an hour, boiler still firing", "warning"),
    ("smell of gas near the boiler, flame flickering orange, CO alarm chirping", "critical"),
    ("controller unreachable, no telemetry for 30 minutes, power LED off", "offline"),
]
MESSAGE_WORDS = ("boiler pressure bar flame pump valve radiator return flow temperature rising falling "
                 "stable noise drip alarm burner setpoint night mode sensor reading").split()


def token_count(tok: object, text: str) -> int:
    return len(tok.encode(text))  # type: ignore[attr-defined]


def _prefix(shots: list[str], notes: list[str]) -> str:
    note = f"Notes: {' '.join(notes)}.\n" if notes else ""
    return f"Classify each boiler report as one of: {', '.join(LABELS)}.\n{note}\n" + "".join(shots) + "Report: "


def few_shot_prompt(tok: object, target: int) -> str:
    """A few-shot template whose part before {text} is `target` tokens (or just over)."""
    shots: list[str] = []
    for report, label in itertools.cycle(EXAMPLES):
        shot = f"Report: {report}\nState: {label}\n\n"
        if token_count(tok, _prefix([*shots, shot], [])) > target:
            break
        shots.append(shot)
    notes: list[str] = []
    words = itertools.cycle(MESSAGE_WORDS)
    while token_count(tok, _prefix(shots, notes)) < target:
        notes.append(next(words))
    while token_count(tok, _prefix(shots, notes)) > target and len(notes[-1]) > 1:
        notes[-1] = notes[-1][:-1]  # trim the last word to land on the target
    return _prefix(shots, notes) + "{text}\nState:"


def message(tok: object, n: int, target: int) -> str:
    """A distinct sensor message of about `target` tokens."""
    words = [f"unit {n}:"]
    k = n
    while token_count(tok, " ".join(words)) < target:
        words.append(MESSAGE_WORDS[k % len(MESSAGE_WORDS)])
        k = k * 7 + 3
    while token_count(tok, " ".join(words)) > target and len(words[-1]) > 1:
        words[-1] = words[-1][:-1]
    return " ".join(words)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not start on port {port}")


class Requester:
    """An MQTT 5 client that timestamps each request and its answer (matched by correlation data)."""

    def __init__(self, port: int) -> None:
        self.sent: dict[str, float] = {}
        self.answers: dict[str, tuple[float, dict]] = {}
        self.info: dict = {}
        self.health: dict = {}
        self.cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([("bench/answers", 1), ("edgebit/v1/node/bench/info", 1),
                               ("edgebit/v1/node/bench/health", 0)])
        self.client.loop_start()

    def on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        payload = json.loads(msg.payload)
        with self.cond:
            if msg.topic.endswith("/info"):
                self.info = payload
            elif msg.topic.endswith("/health"):
                self.health = payload
            else:
                self.answers.setdefault(msg.properties.CorrelationData.decode(), (now, payload))
            self.cond.notify_all()

    def send(self, rid: str, text: str) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "bench/answers"
        props.CorrelationData = rid.encode()
        with self.cond:
            self.sent[rid] = time.perf_counter()
        self.client.publish("edgebit/v1/req/boiler", json.dumps({"v": 1, "id": rid, "text": text}), qos=1,
                            properties=props)

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF model (default: random 2B4T shape).")
    p.add_argument("--count", type=int, default=32, help="Messages to measure.")
    p.add_argument("--rate", type=float, default=0.0, help="Messages per second; 0 sends them all at once.")
    p.add_argument("--prompt-tokens", type=int, default=250)
    p.add_argument("--message-tokens", type=int, default=40)
    p.add_argument("--max-batch", type=int, default=8, help="Texts classified together (node setting).")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backend", default=None)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--vocabulary", type=Path, default=VOCABULARY,
                   help="GGUF whose tokenizer the random model gets (default: the LLaMA-3 vocabulary in testdata).")
    args = p.parse_args()

    if not args.model.exists():
        if args.model != DEFAULT_MODEL:
            sys.exit(f"{args.model}: no such file")
        print(f"writing a random 2B4T-shaped model to {args.model} (1.2 GB, once) ...", flush=True)
        args.model.parent.mkdir(parents=True, exist_ok=True)
        write_random_model(args.model, "2b4t", seed=1, tokenizer_from=args.vocabulary)
    tok = edgebit.load_tokenizer(args.model)
    prompt = few_shot_prompt(tok, args.prompt_tokens)
    texts = [message(tok, n, args.message_tokens) for n in range(args.count + 1)]
    prompt_tokens = token_count(tok, prompt.split("{text}")[0])
    message_tokens = statistics.mean(token_count(tok, t) for t in texts)

    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with tempfile.TemporaryDirectory(prefix="edgebit-bench-") as tmp:
        port = free_port()
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        config = Path(tmp) / "node.toml"
        config.write_text(
            f'[broker]\nhost = "127.0.0.1"\nport = {port}\nsession_expiry = 0\n'
            f'[node]\nid = "bench"\nqueue_size = {args.count + 8}\nmax_batch = {args.max_batch}\n'
            f"health_interval = 1\n[limits]\ntext_chars = 20000\n"
            f"[tasks.boiler]\nkind = \"classify\"\nprompt = {json.dumps(prompt)}\nlabels = {json.dumps(LABELS)}\n")
        node_cmd = [str(Path(sys.executable).with_name("edgebit")), "serve", str(args.model), "--config", str(config)]
        if args.threads:
            node_cmd += ["--threads", str(args.threads)]
        if args.backend:
            node_cmd += ["--backend", args.backend]
        broker = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        node = None
        try:
            wait_port(port)
            req = Requester(port)
            started = time.perf_counter()
            node = subprocess.Popen(node_cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr,
                                    env={**os.environ, "EDGEBIT_HOME": tmp})
            req.wait(lambda: req.info.get("state") == "ready", args.timeout, "the node to load the model")
            load_s = time.perf_counter() - started
            print(f"node ready in {load_s:.1f} s: {req.info['model']['name']}, backend {req.info['backend']}")
            label_tokens = [token_count(tok, " " + label) for label in LABELS]
            print(f"prompt {prompt_tokens} tokens before the message, messages {message_tokens:.1f} tokens, "
                  f"{len(LABELS)} labels ({'/'.join(map(str, label_tokens))} tokens), max batch {args.max_batch}")

            req.send("warmup", texts[-1])  # prefills the prompt prefix into the node's cache
            req.wait(lambda: "warmup" in req.answers, args.timeout, "the warm-up answer")
            warm = req.answers["warmup"][0] - req.sent["warmup"]
            print(f"first request (prefix prefill + message): {warm * 1000:.0f} ms")

            ids = [f"m{n:04d}" for n in range(args.count)]
            first = time.perf_counter()
            for n, rid in enumerate(ids):
                if args.rate > 0:
                    time.sleep(max(0.0, first + n / args.rate - time.perf_counter()))
                req.send(rid, texts[n])
            req.wait(lambda: all(r in req.answers for r in ids), args.timeout, "all answers")
            last = max(req.answers[r][0] for r in ids)
            rtt = [(req.answers[r][0] - req.sent[r]) * 1000 for r in ids]
            errors = [req.answers[r][1] for r in ids if req.answers[r][1]["status"] != "ok"]
            seen = req.health.get("uptime_s", 0)
            req.wait(lambda: req.health.get("uptime_s", 0) > seen, 30, "a health report")
            health = req.health
        finally:
            for proc in (node, broker):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=60)

    mode = f"paced at {args.rate:g}/s" if args.rate > 0 else "burst"
    print(f"\n{args.count} messages, {mode}: {args.count / (last - first):.2f} messages/s")
    print(f"round trip  p50 {percentile(rtt, 50):.0f} ms   p95 {percentile(rtt, 95):.0f} ms   "
          f"max {max(rtt):.0f} ms")
    print(f"node        compute p50 {health['latency_ms']['p50']} ms, queue p50 {health['queue_ms']['p50']} ms, "
          f"{health['batches']} engine calls for {health['computed']} requests")
    if errors:
        print(f"{len(errors)} errors, e.g. {errors[0]['error']}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
