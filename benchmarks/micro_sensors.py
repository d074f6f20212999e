"""The bundled micro model `edgebit-sensors`: held-out accuracy with confusion matrices, and speed.

Accuracy is measured on the generator's held-out split (device names, phrasings and value draws
the training split never uses, values kept off the band boundaries; any text that also occurs in
the training set is dropped) through `Model.classify_batch` on the shipped GGUF. Speed: messages
per second through `Model.classify_batch` in batches, and end to end over MQTT (embedded amqtt
broker, the normal node, one request per message, all sent at once: the node micro-batches).

    python benchmarks/micro_sensors.py                       # writes benchmarks/micro_sensors.md
    python benchmarks/micro_sensors.py --eval 500 --no-write # a quicker look
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import edgebit
from edgebit.backends.machine import detect
from edgebit.demo import Demo
from edgebit.evaluate import Report, breakdown, evaluate
from edgebit.registry import bundled
from edgebit.sensors_data import generate

HERE = Path(__file__).resolve().parent


def held_out(n: int, n_train: int, seed: int) -> list:
    """The held-out examples, minus any text that the training split (as trained) also contains."""
    seen = {e.text for e in generate(n_train, "train", seed)}
    return [e for e in generate(n, "eval", seed) if e.text not in seen]


def throughput(model: edgebit.engine.Model, texts: list[str], batch: int) -> float:
    model.classify_batch(texts[:batch])  # the template prefix is prefilled once, outside the timing
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        model.classify_batch(texts[i : i + batch])
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the bundled edgebit-sensors)")
    parser.add_argument("--eval", type=int, default=2000, help="held-out messages")
    parser.add_argument("--train", type=int, default=60000, help="training messages the model saw (overlap filter)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mqtt", type=int, default=1000, help="messages sent over MQTT")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write micro_sensors.md")
    args = parser.parse_args()
    path = args.model or bundled("edgebit-sensors")
    model = edgebit.load(path, threads=args.threads)

    examples = held_out(args.eval, args.train, 0)
    rows = [(e.text, e.label) for e in examples]
    start = time.perf_counter()
    report = evaluate(model, rows, batch=64)
    seconds = time.perf_counter() - start
    by_format = breakdown(rows, report.predicted, [e.format for e in examples], report.labels)
    by_quantity = breakdown(rows, report.predicted, [e.worst for e in examples], report.labels)

    texts = [e.text for e in examples][:1024]
    speeds = {b: throughput(model, texts, b) for b in (1, 16, 64)}
    demo = Demo(path, count=args.mqtt, rate=0, threads=args.threads, out=lambda _: None).run()

    machine = detect()
    out = [f"# edgebit-sensors: accuracy and speed ({time.strftime('%Y-%m-%d')})", "",
           f"Machine: {machine.arch}, {machine.cpu_model}, {machine.cpus} cores, threads {args.threads}; "
           f"backend {model.info['backend']}; model {Path(path).name} ({Path(path).stat().st_size / 1e6:.2f} MB).",
           "Command: `python benchmarks/micro_sensors.py`", "",
           f"## Held-out accuracy: {report.accuracy:.4f} ({report.correct}/{report.total})", "",
           "Generator held-out split: device names, phrasings and value draws disjoint from training; values at "
           "least 3 % of the quantity's scale away from a band boundary. Rows: true label; columns: predicted.",
           "", report.table(), "", "### Per format", ""]
    out += _section(by_format)
    out += ["### Per deciding quantity (the reading whose severity is the message's label)", ""]
    out += _section(by_quantity)
    out += ["## Throughput", "",
            "| path | messages/s |", "|---|---|"]
    out += [f"| `Model.classify_batch`, batches of {b} | {v:.0f} |" for b, v in speeds.items()]
    out += [f"| evaluation run above (batches of 64) | {len(rows) / seconds:.0f} |",
            f"| MQTT end to end: {demo.sent} requests at once, embedded broker, one node | "
            f"{demo.answered / demo.seconds:.0f} |", "",
            f"MQTT round trip (ms): {demo.lines()[2].split(': ', 1)[1]}; answered {demo.answered}/{demo.sent}, "
            f"errors {demo.errors}.", ""]
    text = "\n".join(out)
    print(text)
    if not args.no_write:
        (HERE / "micro_sensors.md").write_text(text)


def _section(groups: dict[str, Report]) -> list[str]:
    lines = []
    for name, rep in groups.items():
        lines += [f"**{name}**: {rep.accuracy:.4f} ({rep.correct}/{rep.total})", "", rep.table(), ""]
    return lines


if __name__ == "__main__":
    main()
