"""Soak a running server: streaming clients for a while, some hanging up mid-stream; print a summary.

``python -m bench.soak --url http://127.0.0.1:5000 --seconds 600 --clients 8``

Every client sends streamed completions back to back; every ``--hang-up-every``-th
request is abandoned after its first event, as an editor does at the next keystroke.
The summary counts outcomes and HTTP statuses, latency percentiles, and, when the
server exports /metrics, how many requests it counted meanwhile (they should match).
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import threading
import time
from dataclasses import dataclass, field
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
             timeout: float = 120.0, model: str | None = None) -> SoakResult:
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

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    return result


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
    args = parser.parse_args(argv)
    before = counted_requests(args.url)
    result = run_soak(args.url, args.seconds, args.clients, args.max_tokens, args.hang_up_every, model=args.model)
    time.sleep(1.0)  # abandoned streams are counted when the server notices the hang-up
    after = counted_requests(args.url)
    print(summary(result, None if before is None or after is None else after - before))
    bad = sum(n for status, n in result.statuses.items() if status and status >= 500) + result.outcomes["exception"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
