"""Soak a running server: streaming clients for a while, some hanging up mid-stream; print a summary.

``python -m bench.soak --url http://127.0.0.1:5000 --seconds 600 --clients 8``

Every client sends streamed completions back to back; every ``--hang-up-every``-th
request is abandoned after its first event, as an editor does at the next keystroke.
The summary counts outcomes and HTTP statuses, latency percentiles, and, when the
server exports /metrics, how many requests it counted meanwhile (they should match).

Hostile phases run beside the clients when asked for: ``--slow-clients N`` connections
that trickle their headers a byte a second; ``--long-prompt-tokens T`` one client sending
a prompt of about T tokens again and again (the summary gives the worst latency of the
short requests that ran meanwhile); ``--reload-pid PID --reload-at S`` a SIGHUP to the
gunicorn master S seconds in (the summary gives the slowest /health answer around it);
``--server-pid PID`` samples the resident memory of that process and its children.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .stats import percentile

PROMPTS = ["def fibonacci(n):\n", "import os\n\ndef list_files(path):\n", "class Stack:\n    def __init__(self):\n",
           "# read a CSV file and sum a column\n", "def is_prime(n: int) -> bool:\n"]


@dataclass
class SoakResult:
    """What the soak saw."""

    outcomes: collections.Counter = field(default_factory=collections.Counter)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # (start, end) perf_counter() of each completed short request, and of each long-prompt request
    spans: list[tuple[float, float]] = field(default_factory=list)
    long_spans: list[tuple[float, float]] = field(default_factory=list)
    health_ms: list[float] = field(default_factory=list)  # /health answers (failures count as the timeout)
    rss_mb: list[float] = field(default_factory=list)  # resident memory of the server's processes over time

    def worst_short_during_long_ms(self) -> float | None:
        """The slowest short request that overlapped a long-prompt request."""
        overlapping = [(end - start) * 1000 for start, end in self.spans
                       if any(start < long_end and end > long_start for long_start, long_end in self.long_spans)]
        return max(overlapping, default=None)

    @property
    def requests(self) -> int:
        """Requests sent."""
        return sum(self.outcomes.values())


def _stream_once(url: str, body: dict, hang_up: bool, timeout: float) -> tuple[str, int | None, float]:
    """One streamed request: (outcome, HTTP status, seconds)."""
    parts = urlsplit(url)
    started = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            response.read()
            return "refused", response.status, time.perf_counter() - started
        while True:
            line = response.readline()
            if not line:
                return "cut short", 200, time.perf_counter() - started
            if line.startswith(b"data: "):
                if hang_up:
                    return "hung up", 200, time.perf_counter() - started
                data = line[len(b"data: "):].strip()
                if data == b"[DONE]":
                    return "completed", 200, time.perf_counter() - started
                if "error" in json.loads(data):
                    return "error event", 200, time.perf_counter() - started
    finally:
        conn.close()


def run_soak(url: str, seconds: float, clients: int = 8, max_tokens: int = 32, hang_up_every: int = 4,
             timeout: float = 120.0, model: str | None = None, hostile: "Hostile | None" = None) -> SoakResult:
    """Run ``clients`` streaming clients against ``url`` for ``seconds``; return what they saw."""
    result = SoakResult()
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(number: int) -> None:
        sent = 0
        while time.perf_counter() < deadline:
            body = {"prompt": PROMPTS[(number + sent) % len(PROMPTS)], "max_tokens": max_tokens, "stream": True,
                    "temperature": 0.7, "seed": number * 1000 + sent}
            if model:
                body["model"] = model
            hang_up = hang_up_every > 0 and sent % hang_up_every == hang_up_every - 1
            sent += 1
            try:
                outcome, status, took = _stream_once(url, body, hang_up, timeout)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                with lock:
                    result.outcomes["exception"] += 1
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                result.outcomes[outcome] += 1
                result.statuses[status] += 1
                if outcome == "completed":
                    result.latencies_ms.append(took * 1000)
                    result.spans.append((time.perf_counter() - took, time.perf_counter()))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    phases = hostile_phases(url, hostile or Hostile(), result, deadline)
    threads += [threading.Thread(target=phase, daemon=True) for phase in phases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    return result


@dataclass(frozen=True)
class Hostile:
    """The hostile phases of a soak (all off by default)."""

    slow_clients: int = 0
    long_prompt_tokens: int = 0
    reload_pid: int | None = None
    reload_at: float = 10.0
    server_pid: int | None = None


def hostile_phases(url: str, plan: Hostile, result: SoakResult, deadline: float) -> list:
    """The callables of the hostile phases asked for, each running until ``deadline``."""
    phases = []
    phases += [lambda: _slow_client(url, deadline)] * plan.slow_clients
    if plan.long_prompt_tokens:
        phases.append(lambda: _long_prompts(url, plan.long_prompt_tokens, result, deadline))
    if plan.reload_pid:
        phases.append(lambda: _reload(plan.reload_pid, plan.reload_at))
    if plan.reload_pid or plan.slow_clients:
        phases.append(lambda: _probe_health(url, result, deadline))
    if plan.server_pid:
        phases.append(lambda: _sample_rss(plan.server_pid, result, deadline))
    return phases


def _slow_client(url: str, deadline: float) -> None:
    """Trickle a request's headers a byte a second, reconnecting whenever the server cuts it off."""
    parts = urlsplit(url)
    while time.perf_counter() < deadline:
        try:
            with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
                for byte in b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"a" * 1000:
                    if time.perf_counter() >= deadline:
                        return
                    sock.sendall(bytes([byte]))
                    time.sleep(1.0)
        except OSError:  # cut off: connect again
            time.sleep(0.1)


def _long_prompts(url: str, tokens: int, result: SoakResult, deadline: float) -> None:
    """Send a prompt of about ``tokens`` tokens (varied, so no cache helps) again and again."""
    sent = 0
    while time.perf_counter() < deadline:
        prompt = f"# file {sent}\n" + "".join(f"value_{sent}_{i} = {i} * {i}\n" for i in range(tokens // 12))
        started = time.perf_counter()
        try:
            _stream_once(url, {"prompt": prompt, "max_tokens": 8, "stream": True}, False, 600)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            result.errors.append(f"long prompt: {type(exc).__name__}: {exc}")
        result.long_spans.append((started, time.perf_counter()))
        sent += 1


def _reload(pid: int, at: float) -> None:
    """SIGHUP to the gunicorn master ``at`` seconds in."""
    time.sleep(at)
    os.kill(pid, signal.SIGHUP)


def _probe_health(url: str, result: SoakResult, deadline: float, timeout: float = 30.0) -> None:
    """GET /health ten times a second; a failure counts as the timeout."""
    parts = urlsplit(url)
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
        except (OSError, http.client.HTTPException):
            ok = False
        result.health_ms.append((time.perf_counter() - started) * 1000 if ok else timeout * 1000)
        time.sleep(0.1)


def _sample_rss(pid: int, result: SoakResult, deadline: float) -> None:
    """Resident memory of ``pid`` and its children, every half second."""
    while time.perf_counter() < deadline:
        pids = [pid, *_children(pid)]
        result.rss_mb.append(sum(_rss_kb(p) for p in pids) / 1024)
        time.sleep(0.5)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def counted_requests(url: str) -> float | None:
    """The server's total of fauxpilot_requests_total over models and statuses (None without /metrics)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode()
        if response.status != 200:
            return None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("fauxpilot_requests_total{"))


def summary(result: SoakResult, counted: float | None = None) -> str:
    """The soak's figures as text."""
    lines = [f"{result.requests} requests in {result.seconds:.0f} s: {dict(result.outcomes)}",
             f"HTTP statuses: {dict(result.statuses)}",
             f"completed latency p50 {percentile(result.latencies_ms, 50) or 0:.0f} ms, "
             f"p95 {percentile(result.latencies_ms, 95) or 0:.0f} ms"]
    if counted is not None:
        lines.append(f"the server counted {counted:.0f} requests meanwhile (/metrics)")
    worst = result.worst_short_during_long_ms()
    if result.long_spans:
        lines.append(f"long prompts: {len(result.long_spans)}, slowest {max(e - s for s, e in result.long_spans):.1f} s; "
                     f"worst short request meanwhile {worst or 0:.0f} ms")
    if result.health_ms:
        lines.append(f"/health: {len(result.health_ms)} probes, slowest {max(result.health_ms):.0f} ms")
    if result.rss_mb:
        lines.append(f"server RSS: steady (median) {percentile(result.rss_mb, 50):.0f} MB, "
                     f"peak {max(result.rss_mb):.0f} MB")
    lines.extend(f"error: {e}" for e in result.errors[:5])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: soak a URL and print the summary; exit 1 on any 5xx or exception."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:5000")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hang-up-every", type=int, default=4, help="abandon every Nth request (0: never)")
    parser.add_argument("--model", help="model name to request (default: the server's)")
    parser.add_argument("--slow-clients", type=int, default=0, help="connections trickling their headers")
    parser.add_argument("--long-prompt-tokens", type=int, default=0, help="one client sending prompts this long")
    parser.add_argument("--reload-pid", type=int, help="gunicorn master to SIGHUP during the soak")
    parser.add_argument("--reload-at", type=float, default=10.0, help="seconds into the soak for the SIGHUP")
    parser.add_argument("--server-pid", type=int, help="process whose RSS (with its children) to sample")
    args = parser.parse_args(argv)
    hostile = Hostile(args.slow_clients, args.long_prompt_tokens, args.reload_pid, args.reload_at, args.server_pid)
    before = counted_requests(args.url)
    result = run_soak(args.url, args.seconds, args.clients, args.max_tokens, args.hang_up_every, model=args.model,
                      hostile=hostile)
    time.sleep(1.0)  # abandoned streams are counted when the server notices the hang-up
    after = counted_requests(args.url)
    print(summary(result, None if before is None or after is None else after - before))
    bad = sum(n for status, n in result.statuses.items() if status and status >= 500) + result.outcomes["exception"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
