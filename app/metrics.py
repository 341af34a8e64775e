"""Prometheus metrics: request counts and latencies, tokens, queue depth, batch size, prefix-cache hits.

Under gunicorn every worker writes its values to files in ``PROMETHEUS_MULTIPROC_DIR``
(gunicorn.conf.py sets it up) and ``/metrics`` sums all workers; without it (tests,
a single process) the app's own registry is exported.
"""
from __future__ import annotations

import logging
import re
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client import CONTENT_TYPE_LATEST

from .engine import EngineStats

request_log = logging.getLogger("app.requests")
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
        # Usage reports (app/usage.py): acceptance is inferred from the session's next prompts.
        self.completions_shown = Counter("fauxpilot_completions_shown", "Completions answered whole with some text "
                                         "(not cancelled).", ["model"], registry=registry)
        self.completions_accepted = Counter("fauxpilot_completions_accepted", "Shown completions a later prompt of "
                                            "the same session continued with (inferred): whole or first_line.",
                                            ["model", "part"], registry=registry)
        # Counts since each live worker started (gauges summed over workers, as the cache counts are).
        self.drafted = Gauge("fauxpilot_spec_drafted_tokens_total", "Draft tokens fed to the model (speculation).",
                             ["model"], multiprocess_mode="livesum", registry=registry)
        self.accepted = Gauge("fauxpilot_spec_accepted_tokens_total", "Draft tokens the model agreed with.",
                              ["model"], multiprocess_mode="livesum", registry=registry)
        self.draft_steps = Gauge("fauxpilot_spec_steps_total", "Decode row-steps that carried a draft.",
                                 ["model"], multiprocess_mode="livesum", registry=registry)

        self.upstream_calls = Gauge("fauxpilot_upstream_requests_total", "Requests sent to upstream servers.",
                                    ["model"], multiprocess_mode="livesum", registry=registry)
        self.upstream_errors = Gauge("fauxpilot_upstream_errors_total", "Upstream requests that failed (unreachable, "
                                     "refused, broken off).", ["model"], multiprocess_mode="livesum", registry=registry)
        self.upstream_wait = Gauge("fauxpilot_upstream_first_token_seconds_total", "Upstream time to first token, "
                                   "summed (divide by requests for the mean).", ["model"], multiprocess_mode="livesum",
                                   registry=registry)
        self.upstream_time = Gauge("fauxpilot_upstream_seconds_total", "Upstream request time, summed.", ["model"],
                                   multiprocess_mode="livesum", registry=registry)

    def record(self, model: str | None, status: int, started: float, usage: tuple[int, int]) -> None:
        """Count one finished request."""
        label = model or "-"
        self.requests.labels(label, str(status)).inc()
        self.latency.labels(label).observe(time.perf_counter() - started)
        if usage[0] or usage[1]:
            self.prompt_tokens.labels(label).inc(usage[0])
            self.completion_tokens.labels(label).inc(usage[1])

    def observe(self, model: str, stats: EngineStats) -> None:
        """Refresh the gauges of one engine: its batch, its queue and its prefix cache."""
        self.running.labels(model).set(stats.running)
        self.waiting.labels(model).set(stats.waiting)
        self.cache_hits.labels(model).set(stats.cache_hits)
        self.cache_misses.labels(model).set(stats.cache_misses)
        self.drafted.labels(model).set(stats.drafted)
        self.accepted.labels(model).set(stats.accepted)
        self.draft_steps.labels(model).set(stats.draft_steps)
        if stats.upstream_calls:
            self.upstream_calls.labels(model).set(stats.upstream_calls)
            self.upstream_errors.labels(model).set(stats.upstream_errors)
            self.upstream_wait.labels(model).set(stats.upstream_wait_seconds)
            self.upstream_time.labels(model).set(stats.upstream_seconds)

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format (every worker's, under gunicorn)."""
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry)
        return generate_latest(self.registry)


# A client's X-Request-Id is kept when it is a plain token (UUIDs, Copilot's ids); anything else
# (8,000 bytes, control characters) would be echoed into headers, bodies and the log.
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=/-]{0,127}")
MAX_ROUTE = 300


def request_id(presented: str | None) -> str:
    """The client's request id when it is a sane token, else a new one."""
    return presented if presented and REQUEST_ID.fullmatch(presented) else uuid.uuid4().hex


def printable(text: str, limit: int = MAX_ROUTE) -> str:
    """``text`` safe for one log line: control and other unprintable characters escaped, length capped."""
    if len(text) > limit:
        text = text[:limit] + "…"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class RequestRecord:
    """One request's log line and metrics: the serving layer fills it in, the blueprint's last hook writes it."""

    def __init__(self, request_id: str, route: str, metrics: Metrics, client: str | None = None):
        self.request_id, self.route, self.metrics = request_id, printable(route), metrics
        self.client = printable(client or "-", 64)
        self.started = time.perf_counter()
        self.engine = None  # the engine that served it, once known
        self.usage = (0, 0)  # prompt, completion tokens
        self.complete = True  # False while a stream has not reached its end
        self.texts: tuple[str, ...] = ()  # the completions' texts once served (for usage reports; never logged)
        self.counting = None  # its usage report (app.usage.Counting), when usage reports are on

    def finish(self, status: int) -> None:
        """Write the request's log line (never prompt text) and count it in the metrics.

        A request whose client went away is logged and counted as 499 (nginx's "client closed
        request"), whatever status line was sent: operators must tell abandonment from success.
        """
        note = ""
        if not self.complete:
            status, note = 499, " client went away"
        model = self.engine.name if self.engine is not None else None
        request_log.info("request %s %s status=%d model=%s prompt_tokens=%d completion_tokens=%d latency_ms=%.0f "
                         "client=%s%s", self.request_id, self.route, status, model or "-", self.usage[0],
                         self.usage[1], (time.perf_counter() - self.started) * 1000, self.client, note)
        self.metrics.record(model, status, self.started, self.usage)
        if self.counting is not None:
            self.counting.finish(status, self.complete, self.usage, (time.perf_counter() - self.started) * 1000,
                                 self.texts)
        if self.engine is not None:
            self.metrics.observe(model, self.engine.stats())
