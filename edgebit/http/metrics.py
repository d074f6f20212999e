"""Counters and histograms for `GET /metrics`, in Prometheus' text exposition format (version 0.0.4).

A few dozen lines instead of a dependency: the server exports a fixed, small set of series.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{bound}"}} {n}' for bound, n in zip(self.buckets, self.counts,
                                                                                      strict=True)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.total}"]
        return out


class Metrics:
    """The server's series: requests by route and status, tokens, prompt-cache reuse, latencies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self._tokens: defaultdict[str, int] = defaultdict(int)
        self._latency: dict[str, _Histogram] = {}
        self._ttft = _Histogram(LATENCY_BUCKETS)

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(route, status)] += 1
            self._latency.setdefault(route, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def prompt_tokens(self, n: int, reused: int) -> None:
        with self._lock:
            self._tokens["prompt"] += n
            self._tokens["prompt_cached"] += reused

    def completion_tokens(self, n: int) -> None:
        with self._lock:
            self._tokens["completion"] += n

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self._ttft.observe(seconds)

    def render(self, depth: Callable[[], tuple[int, int]]) -> str:
        """The exposition text; `depth()` gives the (waiting, active) requests at this moment."""
        waiting, active = depth()
        with self._lock:
            lines = ["# HELP edgebit_requests_total HTTP requests answered, by route and status.",
                     "# TYPE edgebit_requests_total counter"]
            lines += [f'edgebit_requests_total{{route="{r}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self._requests.items())]
            lines += ["# HELP edgebit_tokens_total Tokens processed: prompt (of which prompt_cached came from "
                      "the prompt cache) and completion.", "# TYPE edgebit_tokens_total counter"]
            lines += [f'edgebit_tokens_total{{kind="{k}"}} {self._tokens[k]}'
                      for k in ("prompt", "prompt_cached", "completion")]
            lines += ["# HELP edgebit_queue_depth Generation requests waiting for a slot.",
                      "# TYPE edgebit_queue_depth gauge", f"edgebit_queue_depth {waiting}",
                      "# HELP edgebit_active_sequences Sequences decoding together.",
                      "# TYPE edgebit_active_sequences gauge", f"edgebit_active_sequences {active}",
                      "# HELP edgebit_request_duration_seconds Time from request to last byte, by route.",
                      "# TYPE edgebit_request_duration_seconds histogram"]
            for route, hist in sorted(self._latency.items()):
                lines += hist.lines("edgebit_request_duration_seconds", f'route="{route}"')
            lines += ["# HELP edgebit_time_to_first_token_seconds Time from submission to the first token.",
                      "# TYPE edgebit_time_to_first_token_seconds histogram"]
            lines += self._ttft.lines("edgebit_time_to_first_token_seconds", "")
        return "\n".join(lines) + "\n"
