"""`edgebit demo`: broker, node and simulated stream in one process; it ends by itself or on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("amqtt")

from edgebit.demo import Demo

TIMEOUT = 120.0


def test_demo_answers_every_reading_and_summarises(micro_classifier: Path) -> None:
    lines: list[str] = []
    summary = Demo(str(micro_classifier), count=6, rate=0, threads=1, backend="reference", out=lines.append).run()
    assert summary.sent == summary.answered == 6 and summary.errors == 0
    assert len(summary.latencies) == 6 and all(ms > 0 for ms in summary.latencies)
    rows = [line for line in lines if line.split()[-1] == "ok" or "generator says" in line]
    assert len(rows) == 6
    assert summary.agreed == sum(1 for r in rows if r.endswith("ok"))
    assert summary.lines()[0].startswith("summary: 6/6 readings answered")
    assert not any(t.name.startswith("edgebit-broker") and t.is_alive() for t in threading.enumerate())


def test_demo_stops_cleanly_on_ctrl_c(micro_classifier: Path) -> None:
    """SIGINT during the stream: the node and broker shut down, the summary is printed, exit code 130."""
    proc = subprocess.Popen([sys.executable, "-m", "edgebit", "demo", "-m", str(micro_classifier), "-n", "100000",
                             "--rate", "20", "--backend", "reference", "-t", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None
        seen = []
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:  # wait for the table to start filling
            line = proc.stdout.readline()
            assert line, f"demo ended early: {proc.stderr.read() if proc.stderr else ''}"
            seen.append(line)
            if len(seen) > 5 and "reading" in seen[2]:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "summary:" in out and "Traceback" not in err
    assert "stopped (interrupted)" in err


def test_summary_of_a_run_stopped_before_any_answer_has_no_empty_statistics() -> None:
    from edgebit.demo import Summary

    lines = Summary(sent=3).lines()
    assert lines == ["summary: 0/3 readings answered in 0.0 s (0.0 msg/s), 0 errors"]
    answered = Summary(sent=2, answered=2, agreed=1, latencies=[5.0, 7.0], seconds=1.0).lines()
    assert answered[1:] == ["agreement with the generator's labels: 50.0%", "latency ms: p50 7.0, p95 7.0, max 7.0"]
