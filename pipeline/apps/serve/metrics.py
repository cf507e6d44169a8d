"""`GET /metrics` in Prometheus' text format (prometheus_client, one registry per server):
queue depth, running sequences, generated tokens (a counter, and tokens/s over the last
10 seconds), requests by finish reason, and histograms of time to first token and latency."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServeMetrics:
    def __init__(self, window: float = 10.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue = Gauge("pipeline_serve_queue_depth", "requests waiting for a slot", registry=r)
        self.running = Gauge("pipeline_serve_running_sequences", "requests being decoded", registry=r)
        self.generated = Counter("pipeline_serve_generated_tokens", "tokens generated", registry=r)
        self.rate = Gauge("pipeline_serve_tokens_per_second", "generated tokens per second, last 10 s", registry=r)
        self.requests = Counter("pipeline_serve_requests", "finished requests", ["finish_reason"], registry=r)
        self.ttft = Histogram("pipeline_serve_time_to_first_token_seconds", "from arrival to the first token",
                              buckets=BUCKETS, registry=r)
        self.latency = Histogram("pipeline_serve_request_latency_seconds", "from arrival to the last token",
                                 buckets=BUCKETS, registry=r)
        self._window = window
        self._recent: collections.deque = collections.deque()
        self._lock = threading.Lock()

    def gauges(self, queued: int, running: int) -> None:
        self.queue.set(queued)
        self.running.set(running)

    def tokens(self, n: int) -> None:
        self.generated.inc(n)
        with self._lock:
            self._recent.append((time.monotonic(), n))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, seconds: float, reason: str | None) -> None:
        self.latency.observe(seconds)
        self.requests.labels(finish_reason=reason or "unknown").inc()

    def render(self) -> bytes:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self._window:
                self._recent.popleft()
            self.rate.set(sum(n for _, n in self._recent) / self._window)
        return generate_latest(self.registry)
