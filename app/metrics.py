"""Prometheus metrics: request counts and latencies, tokens, queue depth, batch size, prefix-cache hits.

Under gunicorn every worker writes its values to files in ``PROMETHEUS_MULTIPROC_DIR``
(gunicorn.conf.py sets it up) and ``/metrics`` sums all workers; without it (tests,
a single process) the app's own registry is exported.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


class Metrics:
    """The server's metrics, registered in a registry of their own (one per app)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: str | None = None):
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        registry = None if multiprocess_dir else self.registry  # multiprocess values live in files
        self.requests = Counter("fauxpilot_requests", "Completion and model-list requests by model and status.",
                                ["model", "status"], registry=registry)
        self.latency = Histogram("fauxpilot_request_duration_seconds", "Time from request to its last byte.",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("fauxpilot_prompt_tokens", "Prompt tokens of served completions.", ["model"],
                                     registry=registry)
        self.completion_tokens = Counter("fauxpilot_completion_tokens", "Generated tokens.", ["model"],
                                         registry=registry)
        self.running = Gauge("fauxpilot_running_sequences", "Sequences decoding now.", ["model"],
                             multiprocess_mode="livesum", registry=registry)
        self.waiting = Gauge("fauxpilot_waiting_requests", "Requests queued or prefilling.", ["model"],
                             multiprocess_mode="livesum", registry=registry)
        self.cache_hits = Gauge("fauxpilot_prefix_cache_hits", "Prompts that started from a cached prefix.",
                                ["model"], multiprocess_mode="livesum", registry=registry)
        self.cache_misses = Gauge("fauxpilot_prefix_cache_misses", "Prompts with no cached prefix to start from.",
                                  ["model"], multiprocess_mode="livesum", registry=registry)

    def record(self, model: str | None, status: int, started: float, usage: tuple[int, int]) -> None:
        """Count one finished request."""
        label = model or "-"
        self.requests.labels(label, str(status)).inc()
        self.latency.labels(label).observe(time.perf_counter() - started)
        if usage[0] or usage[1]:
            self.prompt_tokens.labels(label).inc(usage[0])
            self.completion_tokens.labels(label).inc(usage[1])

    def observe_engine(self, engine) -> None:
        """Refresh the gauges of one engine: its batch, its queue and its prefix cache."""
        running, waiting = engine.scheduler.load
        self.running.labels(engine.name).set(running)
        self.waiting.labels(engine.name).set(waiting)
        cache = getattr(engine.runner, "prefix_cache", None)
        if cache is not None:
            self.cache_hits.labels(engine.name).set(cache.hits)
            self.cache_misses.labels(engine.name).set(cache.misses)

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format (every worker's, under gunicorn)."""
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry)
        return generate_latest(self.registry)
