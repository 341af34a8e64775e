"""The workloads replayed against every server: keystroke session, cold prompts, decode, concurrent load."""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

from .client import ABANDONED, DONE, ERROR, TIMEOUT, Outcome, complete, read_spec_counters, spec_delta
from .corpus import Corpus, keystroke_source
from .servers import Server
from .stats import decode_speed, median, percentile

MODEL = "codegen"  # an alias of our default model; the others ignore or alias it


def request_body(server: Server, prompt: str, max_tokens: int, *, stream: bool,
                 stop: list[str] | None = None, banned: list[int] | None = None) -> dict[str, Any]:
    """A greedy completion request for ``server`` (without the ``stream`` flag, which complete() adds)."""
    body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if stop:
        body["stop"] = stop
    if banned:
        body["logit_bias"] = {str(token): -100 for token in banned}
    body.update(server.extra_body)
    if stream:
        body.update(server.stream_body)
    return body


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def warm_up(server: Server, prompts: list[str], timeout: float) -> None:
    """Send each warm-up prompt once and wait (a fresh process is slow on its first requests)."""
    for prompt in prompts:
        outcome = complete(server.url, request_body(server, prompt, 16, stream=server.streams),
                           server.streams, limit=timeout)
        if outcome.status != DONE:
            raise RuntimeError(f"warm-up request failed: {outcome.status} {outcome.error}")


def drain(server: Server, timeout: float = 600.0) -> None:
    """Wait until requests queued by earlier (abandoned) calls are served: one tiny request, awaited."""
    complete(server.url, request_body(server, "import os\n", 1, stream=False), False, limit=timeout)


@dataclass(frozen=True)
class KeystrokeOptions:
    """How the simulated developer types."""

    awaited: int = 24            # answers the typist waits for (one per burst)
    chars_per_step: int = 6      # characters typed between two requests
    burst: int = 4               # steps per burst; the last one is awaited
    window_s: float = 0.1        # time between keystroke steps within a burst; unfinished requests are cancelled
    context_tokens: int = 1500   # prompt = the file so far, trimmed to its last lines within this many tokens
    context_slack: int = 0       # when trimming, trim this many tokens more (the prompt start then stays put longer)
    start_fraction: float = 0.4  # where in the file typing starts
    max_tokens: int = 48
    timeout_s: float = 60.0      # cap on each awaited request


def keystroke(server: Server, corpus: Corpus, options: KeystrokeOptions) -> dict[str, Any]:
    """Type through a stdlib file in bursts; cancel in-burst requests, await the one after each burst."""
    text = keystroke_source().read_text(encoding="utf-8")
    position = int(len(text) * options.start_fraction)
    start: int | None = None
    steps = []
    for step in range(options.awaited * options.burst):
        position = min(len(text), position + options.chars_per_step)
        if start is None or corpus.count(text[start:position]) > options.context_tokens:
            start = corpus.tail_start(text, position, options.context_tokens - options.context_slack)
        prompt = text[start:position]
        body = request_body(server, prompt, options.max_tokens, stream=server.streams, stop=["\n\n"])
        awaited = (step + 1) % options.burst == 0
        sent = time.perf_counter()
        if awaited:
            outcome = complete(server.url, body, server.streams, limit=options.timeout_s)
        else:
            outcome = complete(server.url, body, server.streams, limit=options.window_s, abandon=True)
            time.sleep(max(0.0, options.window_s - (time.perf_counter() - sent)))  # the typist's pace
        steps.append({"step": step, "awaited": awaited, "status": outcome.status, "prompt_chars": len(prompt),
                      "ttft_ms": _ms(outcome.ttft), "latency_ms": _ms(outcome.latency),
                      "completion": outcome.text if awaited else None, "error": outcome.error})
    return {"options": vars(options), "steps": steps, **_keystroke_summary(steps, options.timeout_s)}


def _keystroke_summary(steps: list[dict[str, Any]], cap_s: float) -> dict[str, Any]:
    """Percentiles over awaited answers; a timed-out one counts as the cap (so they are lower bounds)."""
    awaited = [s for s in steps if s["awaited"]]
    measured = [s for s in awaited if s["status"] in (DONE, TIMEOUT)]
    cap = cap_s * 1000
    latency = [s["latency_ms"] if s["status"] == DONE else cap for s in measured]
    ttft = [s["ttft_ms"] if s["status"] == DONE else cap for s in measured]
    in_burst = [s for s in steps if not s["awaited"]]
    return {
        "awaited": len(awaited),
        "timeouts": sum(s["status"] == TIMEOUT for s in awaited),
        "errors": sum(s["status"] == ERROR for s in steps),
        "abandoned": sum(s["status"] == ABANDONED for s in in_burst),
        "done_in_window": sum(s["status"] == DONE for s in in_burst),
        "latency_p50_ms": percentile(latency, 50), "latency_p95_ms": percentile(latency, 95),
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
    }


def cold(server: Server, prompts: list[str], corpus: Corpus, max_tokens: int, banned: list[int],
         timeout: float) -> dict[str, Any]:
    """Unrelated ~1000-token prompts, exactly ``max_tokens`` tokens each; the first is a warm-up run.

    A non-streaming server is also asked for 1 token on the same prompt, which
    estimates its prompt time, so that its decode speed can be separated out.
    """
    runs = []
    for number, prompt in enumerate(prompts):
        body = request_body(server, prompt, max_tokens, stream=server.streams, banned=banned)
        outcome = complete(server.url, body, server.streams, limit=timeout)
        run: dict[str, Any] = {"prompt_tokens": corpus.count(prompt), "status": outcome.status,
                               "error": outcome.error, "warm_up": number == 0,
                               "ttft_ms": _ms(outcome.ttft), "total_ms": _ms(outcome.latency),
                               "last_ms": _ms(outcome.last), "tokens": outcome.completion_tokens or max_tokens}
        if outcome.status == DONE and not server.streams:
            one = complete(server.url, request_body(server, prompt, 1, stream=False, banned=banned), False,
                           limit=timeout)
            run["one_token_ms"] = _ms(one.latency) if one.status == DONE else None
        runs.append(run)
    return {"runs": runs, **_cold_summary([r for r in runs if not r["warm_up"]], server.streams)}


def _cold_summary(runs: list[dict[str, Any]], streams: bool) -> dict[str, Any]:
    """Medians of TTFT, total time, decode tok/s (first to last token) and tokens/s over the total.

    Streamed, decode ends at the last chunk with text (a usage chunk may follow it); not
    streamed, the 1-token request's time stands in for the first token's.
    """
    done = [r for r in runs if r["status"] == DONE]
    speeds = []
    for r in done:
        first = r["ttft_ms"] if streams else r.get("one_token_ms")
        last = (r.get("last_ms") or r["total_ms"]) if streams else r["total_ms"]
        speed = decode_speed(r["tokens"], first, last)
        if speed is not None:
            speeds.append(speed)
    return {
        "runs_ok": len(done), "runs_failed": len(runs) - len(done),
        "prompt_tokens": median([r["prompt_tokens"] for r in runs]),
        "ttft_ms": median([r["ttft_ms"] for r in done]), "total_ms": median([r["total_ms"] for r in done]),
        "decode_tok_s": median(speeds), "decode_estimated": not streams,
        "total_tok_s": median([r["tokens"] / (r["total_ms"] / 1000) for r in done]),
    }


def decode(server: Server, prompt: str, corpus: Corpus, levels: list[int], runs: int, max_tokens: int,
           banned: list[int], timeout: float) -> dict[str, Any]:
    """One fixed prompt, ``max_tokens`` tokens each (EOS banned), at each number of concurrent streams.

    One stream is the cold workload on that prompt again and again: the first run (a warm-up)
    caches it, so the others measure decode. N streams send N requests at once per round, one
    warm-up round then ``runs``. Every request ends with a comment line of its own, so none is
    identical to an earlier one: our server answers a repeated greedy request from its answer
    cache without running the model, and the shared prompt before that line stays cached. The
    server's speculation counters are read around each level.
    """
    result: dict[str, Any] = {"prompt_tokens": corpus.count(prompt), "max_tokens": max_tokens, "runs": runs}
    for clients in levels:
        before = read_spec_counters(server.url)
        if clients == 1:
            prompts = [tagged(prompt, f"{clients}.{number}") for number in range(runs + 1)]
            level = cold(server, prompts, corpus, max_tokens, banned, timeout)
            level["tok_s"] = level["total_tok_s"]  # one stream's tokens over its whole time, as the rounds count
        else:
            rounds = []
            for number in range(runs + 1):
                bodies = [request_body(server, tagged(prompt, f"{clients}.{number}.{stream}"), max_tokens,
                                       stream=server.streams, banned=banned) for stream in range(clients)]
                rounds.append({**_round(server, bodies, max_tokens, timeout), "warm_up": number == 0})
            level = {"rounds": rounds, **_rounds_summary([r for r in rounds if not r["warm_up"]])}
        level["clients"] = clients
        level["spec"] = spec_delta(before, read_spec_counters(server.url))
        result[str(clients)] = level
    return result


def tagged(prompt: str, tag: str) -> str:
    """``prompt`` with a last line of its own (``# request <tag>``), so that no two requests are the same."""
    if prompt and not prompt.endswith("\n"):
        prompt += "\n"
    return f"{prompt}# request {tag}\n"


def _round(server: Server, bodies: list[dict[str, Any]], max_tokens: int, timeout: float) -> dict[str, Any]:
    """The requests sent together, one per stream; the round's total tok/s, decode-only and over the wall.

    Decode tok/s is (all tokens - 1) / (the last token of any stream - the first token of any
    stream), the batch-1 formula over the streams together; tok/s counts from the first send to
    the last answer. Not streamed, only the second can be told.
    """
    clients = len(bodies)
    barrier = threading.Barrier(clients)
    sent: list[tuple[float, Outcome] | None] = [None] * clients

    def client(index: int) -> None:
        barrier.wait()  # all requests leave together
        started = time.perf_counter()
        sent[index] = (started, complete(server.url, bodies[index], server.streams, limit=timeout))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answered = [(t, o) for t, o in (x for x in sent if x) if o.status == DONE]
    tokens = sum(o.completion_tokens or max_tokens for _, o in answered)
    summary: dict[str, Any] = {"ok": len(answered), "errors": clients - len(answered), "tokens": tokens,
                               "error_samples": [o.error for _, o in (x for x in sent if x) if o.status != DONE][:3]}
    if not answered:
        return {**summary, "wall_ms": None, "tok_s": None, "decode_tok_s": None, "ttft_ms": None}
    begin = min(t for t, _ in answered)
    end = max(t + o.latency for t, o in answered)
    first = min(t + o.ttft for t, o in answered)
    last = max(t + (o.last or o.latency) for t, o in answered)
    decode_rate = decode_speed(tokens, first * 1000, last * 1000) if server.streams else None
    return {**summary, "wall_ms": _ms(end - begin), "tok_s": tokens / (end - begin), "decode_tok_s": decode_rate,
            "ttft_ms": _ms(median([o.ttft for _, o in answered]))}


def _rounds_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the measured rounds."""
    return {"runs_ok": sum(r["errors"] == 0 for r in rounds), "runs_failed": sum(r["errors"] > 0 for r in rounds),
            "tok_s": median([r["tok_s"] for r in rounds if r["tok_s"] is not None]),
            "decode_tok_s": median([r["decode_tok_s"] for r in rounds if r["decode_tok_s"] is not None]),
            "ttft_ms": median([r["ttft_ms"] for r in rounds if r["ttft_ms"] is not None])}


class PromptFeed:
    """Hands out prompts in turn to concurrent clients, cycling when the pool runs out."""

    def __init__(self, prompts: list[str]):
        self._cycle: Iterator[str] = itertools.cycle(prompts)
        self._lock = threading.Lock()

    def next(self) -> str:
        """The next prompt (thread-safe)."""
        with self._lock:
            return next(self._cycle)


def load(server: Server, feed: PromptFeed, clients: int, seconds: float, max_tokens: int, banned: list[int],
         timeout: float) -> dict[str, Any]:
    """``clients`` threads send non-streaming requests back to back for ``seconds``; total tok/s over all."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            body = request_body(server, feed.next(), max_tokens, stream=False, banned=banned)
            outcome = complete(server.url, body, False, limit=timeout)
            with lock:
                outcomes.append(outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started  # until the last request started before the deadline ends
    done = [o for o in outcomes if o.status == DONE]
    latency = [o.latency * 1000 for o in done]
    tokens = sum(o.completion_tokens or 0 for o in done)
    errors = [o.error for o in outcomes if o.status != DONE]
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": len(done), "errors": len(errors),
            "error_samples": errors[:3], "completion_tokens": tokens, "tok_s": tokens / elapsed,
            "latency_p50_ms": percentile(latency, 50), "latency_p95_ms": percentile(latency, 95)}
