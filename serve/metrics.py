"""Prometheus metrics of one server process (GET /metrics).

Counters and histograms are updated as requests run; the engine gauges (queue depth, active
sequences, KV usage) are read from each model at scrape time.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)


class Metrics:
    """One registry per app, so several apps in one process (tests) never collide."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("hearth_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("hearth_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("hearth_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("hearth_time_to_first_token_seconds", "Time from request to first token",
                              ["model"], buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("hearth_inter_token_latency_seconds", "Time between streamed tokens",
                             ["model"], buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("hearth_request_duration_seconds", "Time from request to last token",
                             ["model"], registry=r)
        self.queue_depth = Gauge("hearth_queue_depth", "Sequences waiting for a slot", ["model"], registry=r)
        self.active = Gauge("hearth_active_sequences", "Sequences holding KV memory", ["model"], registry=r)
        self.running = Gauge("hearth_running_sequences", "Sequences decoding", ["model"], registry=r)
        self.kv_usage = Gauge("hearth_kv_cache_usage_ratio", "KV memory in use, 0..1", ["model"], registry=r)
        self.in_flight = Gauge("hearth_http_requests_in_flight", "HTTP requests being served", registry=r)

    def set_engine(self, model: str, stats) -> None:
        self.queue_depth.labels(model).set(stats.waiting)
        self.active.labels(model).set(stats.kv_active_sequences)
        self.running.labels(model).set(stats.running)
        self.kv_usage.labels(model).set(stats.kv_usage)

    def render(self) -> bytes:
        return generate_latest(self.registry)
