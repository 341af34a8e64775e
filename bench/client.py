"""A minimal OpenAI completions client on http.client that can stream, time and abandon requests."""
from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

DONE = "done"            # the whole answer arrived
ABANDONED = "abandoned"  # the client closed the connection on purpose (the typist moved on)
TIMEOUT = "timeout"      # the answer did not arrive within the request's time cap
ERROR = "error"          # HTTP status other than 200, a broken stream or an in-band error


@dataclass
class Outcome:
    """What one completion request gave: its status, timings (seconds) and text."""

    status: str
    ttft: float | None = None
    latency: float | None = None
    completion_tokens: int | None = None
    text: str = ""
    error: str | None = None
    http_status: int | None = None    # the reply's status when it was not 200
    prompt_tokens: int | None = None  # the whole prompt as the server counted it
    cached_tokens: int | None = None  # prompt tokens the server took from its cache instead of computing them
    last: float | None = None         # streamed: when the last chunk with text came (decode ends there, not at [DONE])


def prompt_reuse(data: dict[str, Any]) -> tuple[int | None, int | None]:
    """(prompt tokens, reused prompt tokens) from one reply or stream chunk; None where it says nothing.

    llama.cpp's ``timings`` (prompt_n computed + cache_n reused) is read first, then OpenAI's
    ``usage.prompt_tokens_details.cached_tokens``, then llama.cpp /infill's ``tokens_cached``
    beside ``tokens_evaluated``.
    """
    timings = data.get("timings") or {}
    if isinstance(timings.get("cache_n"), int) and isinstance(timings.get("prompt_n"), int):
        return timings["prompt_n"] + timings["cache_n"], timings["cache_n"]
    usage = data.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    if isinstance(details.get("cached_tokens"), int):
        return usage.get("prompt_tokens"), details["cached_tokens"]
    if isinstance(data.get("tokens_cached"), int):
        return data.get("tokens_evaluated"), data["tokens_cached"]
    return usage.get("prompt_tokens"), None


def reply_text(data: dict[str, Any]) -> str:
    """The generated text of a reply or chunk: OpenAI's choices[].text or llama.cpp's ``content``."""
    if "choices" in data:
        return "".join(choice.get("text") or "" for choice in data.get("choices") or [])
    content = data.get("content")
    return content if isinstance(content, str) else ""


class _Deadline:
    """Gives each blocking socket operation the time left until a deadline."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def arm(self, conn: http.client.HTTPConnection) -> None:
        """Set the connection's socket timeout to the time left (raises socket.timeout when none)."""
        left = self.end - time.perf_counter()
        if left <= 0:
            raise socket.timeout("deadline passed")
        if conn.sock is not None:
            conn.sock.settimeout(left)


def _fetch(url: str, path: str, timeout: float) -> tuple[int | None, bytes]:
    """(status, body) of ``GET url+path``; (None, b"") when the server does not answer."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path.rstrip("/") + path)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        conn.close()


def get_status(url: str, path: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of ``GET url+path``, or None when the server does not answer."""
    return _fetch(url, path, timeout)[0]


def get_text(url: str, path: str, timeout: float = 10.0) -> str | None:
    """The body of ``GET url+path`` when it answers 200, else None."""
    status, body = _fetch(url, path, timeout)
    return body.decode("utf-8", "replace") if status == 200 else None


def complete(url: str, body: dict[str, Any], stream: bool, *, limit: float, abandon: bool = False,
             path: str = "/v1/completions", headers: dict[str, str] | None = None,
             source: str | None = None) -> Outcome:
    """POST one completion to ``url`` + ``path`` (/v1/completions, or llama.cpp's /infill); give up after ``limit`` s.

    Giving up closes the connection, which is how an editor cancels a request; the
    outcome is ABANDONED when ``abandon`` (a planned cancel), else TIMEOUT. ``headers`` are the
    client's own (its key, Copilot's session ids); ``source`` is the local address to send from
    (a loopback address per simulated developer machine, so a proxy sees them apart).
    """
    parts = urlsplit(url)
    deadline = _Deadline(limit)
    started = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=limit,
                                      source_address=(source, 0) if source else None)
    try:
        payload = json.dumps({**body, "stream": stream}).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json",
                   **(headers or {})}
        conn.request("POST", parts.path.rstrip("/") + path, payload, headers)
        deadline.arm(conn)
        response = conn.getresponse()
        if response.status != 200:
            detail = response.read(500).decode("utf-8", "replace")
            return Outcome(ERROR, error=f"HTTP {response.status}: {detail}", http_status=response.status)
        if stream:
            return _read_stream(conn, response, deadline, started)
        data = json.loads(response.read())
        latency = time.perf_counter() - started
        tokens = (data.get("usage") or {}).get("completion_tokens", data.get("tokens_predicted"))
        prompt, cached = prompt_reuse(data)
        return Outcome(DONE, ttft=latency, latency=latency, completion_tokens=tokens, text=reply_text(data),
                       prompt_tokens=prompt, cached_tokens=cached)
    except (socket.timeout, TimeoutError):
        return Outcome(ABANDONED if abandon else TIMEOUT, error=f"no answer within {limit:g} s")
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return Outcome(ERROR, error=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def _read_stream(conn: http.client.HTTPConnection, response: http.client.HTTPResponse,
                 deadline: _Deadline, started: float) -> Outcome:
    """Read server-sent events until ``data: [DONE]``; time the first chunk that carries text."""
    ttft = last = None
    tokens = None
    prompt = cached = None
    pieces: list[str] = []
    while True:
        deadline.arm(conn)
        line = response.readline()
        if not line:
            return Outcome(ERROR, ttft=ttft, text="".join(pieces), error="stream ended without [DONE]")
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            latency = time.perf_counter() - started
            return Outcome(DONE, ttft=ttft if ttft is not None else latency, latency=latency,
                           completion_tokens=tokens, text="".join(pieces), prompt_tokens=prompt, cached_tokens=cached,
                           last=last)
        chunk = json.loads(data)
        if "error" in chunk:
            return Outcome(ERROR, ttft=ttft, text="".join(pieces), error=json.dumps(chunk["error"])[:500])
        if chunk.get("usage"):
            tokens = chunk["usage"].get("completion_tokens")
        elif tokens is None and isinstance((chunk.get("timings") or {}).get("predicted_n"), int):
            tokens = chunk["timings"]["predicted_n"]  # llama.cpp's count, when it sends no usage
        chunk_prompt, chunk_cached = prompt_reuse(chunk)
        if chunk_cached is not None:  # the last chunk (with usage or timings) carries the figures
            prompt, cached = chunk_prompt, chunk_cached
        text = reply_text(chunk)
        if text:
            last = time.perf_counter() - started
            if ttft is None:
                ttft = last
        pieces.append(text)


# The speculative-decoding counters of our server's /metrics (summed over its workers and models):
# draft tokens proposed, draft tokens the model accepted, and row-steps that carried a draft.
SPEC_METRICS = {"drafted": "fauxpilot_spec_drafted_tokens_total", "accepted": "fauxpilot_spec_accepted_tokens_total",
                "steps": "fauxpilot_spec_steps_total"}


def metric_sums(text: str) -> dict[str, float]:
    """Each sample name in a Prometheus text exposition -> the sum of its values over all label sets."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # "name{labels} value [timestamp]": label values may hold spaces, so split after the closing brace.
        brace = line.find("{")
        if brace >= 0:
            name, rest = line[:brace], line[line.rfind("}") + 1:]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        sums[name] = sums.get(name, 0.0) + value
    return sums


def spec_counters(text: str | None) -> dict[str, float | None]:
    """The speculation counters (drafted, accepted, steps) from a /metrics text; None for each one absent."""
    sums = metric_sums(text) if text else {}
    # A gauge exported under the name without "_total" counts too (the server's metric types may change).
    return {key: sums.get(name, sums.get(name.removesuffix("_total"))) for key, name in SPEC_METRICS.items()}


def read_spec_counters(urls: str | list[str]) -> dict[str, float | None]:
    """The server's speculation counters now, summed over its instances (None where one lacks a counter)."""
    readings = [spec_counters(get_text(url, "/metrics")) for url in ([urls] if isinstance(urls, str) else urls)]
    return {key: None if any(r[key] is None for r in readings) else sum(r[key] for r in readings)
            for key in SPEC_METRICS}


def spec_delta(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, Any]:
    """Counter growth between two readings, with accepted per step and the acceptance rate; None where unknown."""
    delta: dict[str, Any] = {}
    for key in SPEC_METRICS:
        b, a = before.get(key), after.get(key)
        delta[key] = None if a is None else int(round(a - (b or 0)))
    accepted, drafted, steps = delta["accepted"], delta["drafted"], delta["steps"]
    delta["accepted_per_step"] = accepted / steps if accepted is not None and steps else None
    delta["acceptance"] = accepted / drafted if accepted is not None and drafted else None
    return delta


# The prefix-cache counters of our server's /metrics (prompts that started from a cached prefix, and those
# that found none), and its finished requests: summed over a server's workers, and here over its instances.
CACHE_METRICS = {"hits": "fauxpilot_prefix_cache_hits", "misses": "fauxpilot_prefix_cache_misses",
                 "requests": "fauxpilot_requests_total"}


def cache_counters(text: str | None) -> dict[str, float | None]:
    """Prefix-cache hits, misses and finished requests from one /metrics text; None for each one absent."""
    sums = metric_sums(text) if text else {}
    counters = {key: sums.get(name) for key, name in CACHE_METRICS.items()}
    if counters["requests"] is None and counters["hits"] is not None:  # ours before its first finished request
        counters["requests"] = 0.0
    return counters


def read_cache_counters(urls: list[str]) -> list[dict[str, float | None]]:
    """The cache counters of each instance in ``urls`` now (all None for one without /metrics or the counters)."""
    return [cache_counters(get_text(url, "/metrics")) for url in urls]


def cache_delta(before: list[dict[str, float | None]], after: list[dict[str, float | None]]) -> dict[str, Any]:
    """Growth of the cache counters, summed and per instance, with the hit rate; None where unknown."""
    per_instance = []
    for b, a in zip(before, after):
        per_instance.append({key: None if a.get(key) is None else int(round(a[key] - (b.get(key) or 0)))
                             for key in CACHE_METRICS})
    total: dict[str, Any] = {}
    for key in CACHE_METRICS:
        values = [p[key] for p in per_instance]
        total[key] = None if not values or any(v is None for v in values) else sum(values)
    looked_up = (total["hits"] or 0) + (total["misses"] or 0)
    total["hit_rate"] = total["hits"] / looked_up if total["hits"] is not None and looked_up else None
    total["per_instance"] = per_instance
    return total
