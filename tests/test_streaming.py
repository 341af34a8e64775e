"""Server-sent event streams: framing, equivalence with whole completions, usage, logprobs, faults, admission."""
from __future__ import annotations

import json

import pytest

from .test_api import OTHER_PROMPT, PROMPT, greedy, joined, ok, pick_stops, post, sse_chunks, sse_payloads


def stream(client, body, path="/v1/completions", **kwargs) -> list[dict]:
    """POST a streaming request and return its JSON chunks (none of them an error event)."""
    chunks = sse_chunks(post(client, {**body, "stream": True}, path, **kwargs))
    errors = [chunk["error"] for chunk in chunks if "error" in chunk]
    assert not errors, errors
    return chunks


def finishes(chunks: list[dict]) -> dict[int, list[str]]:
    """Every non-null finish_reason, per choice index."""
    found: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["finish_reason"] is not None:
                found.setdefault(choice["index"], []).append(choice["finish_reason"])
    return found


def test_stream_framing(client):
    """A stream is text/event-stream, `data: <json>` events each followed by a blank line, then [DONE]."""
    response = post(client, {"prompt": PROMPT, "max_tokens": 8, "stream": True}, headers={"X-Request-Id": "s-1"})
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Request-Id"] == "s-1"
    raw = response.get_data(as_text=True)
    assert raw.startswith("data: {")
    assert raw.endswith("\n\ndata: [DONE]\n\n")
    payloads = sse_payloads(response)
    assert len(payloads) >= 1
    for chunk in map(json.loads, payloads):
        assert list(chunk) == ["id", "object", "created", "model", "choices"]
        assert chunk["id"] == "cmpl-s-1"
        assert chunk["object"] == "text_completion"
        assert isinstance(chunk["created"], int)
        assert chunk["model"] == "tiny"
        [choice] = chunk["choices"]
        assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
        assert choice["index"] == 0
        assert isinstance(choice["text"], str)
        assert choice["logprobs"] is None


def test_stream_one_finish_per_choice_last(client):
    """Each choice has exactly one chunk with a finish_reason, and it is that choice's last chunk."""
    chunks = stream(client, {"prompt": [PROMPT, OTHER_PROMPT], "max_tokens": 6, "n": 2, "temperature": 1})
    assert {i: len(r) for i, r in finishes(chunks).items()} == {0: 1, 1: 1, 2: 1, 3: 1}
    last_seen: dict[int, dict] = {}
    for chunk in chunks:
        [choice] = chunk["choices"]
        assert choice["index"] not in last_seen or last_seen[choice["index"]]["finish_reason"] is None
        last_seen[choice["index"]] = choice
    assert all(c["finish_reason"] in {"stop", "length"} for c in last_seen.values())


@pytest.mark.parametrize("fields", [
    {},
    {"max_tokens": 30},
    {"n": 2},
    {"prompt": [OTHER_PROMPT, PROMPT], "n": 2},
    {"echo": True},
    {"suffix": "print(fibonacci(10))\n", "model": "tiny-fim"},
    {"max_tokens": 0},
    {"frequency_penalty": 1.5, "max_tokens": 30},
], ids=["plain", "long", "n2", "list-n2", "echo", "fim", "zero", "penalty"])
def test_stream_equals_whole(client, fields):
    """Concatenated stream texts equal the whole completion's texts, choice by choice, at temperature 0."""
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 16, **fields}
    whole = ok(client, body)
    chunks = stream(client, body)
    expected = {c["index"]: c["text"] for c in whole["choices"]}
    assert joined(chunks) == expected
    assert {i: r[0] for i, r in finishes(chunks).items()} == {c["index"]: c["finish_reason"] for c in whole["choices"]}


@pytest.mark.parametrize("n", [1, 2])
def test_stream_with_stop_equals_whole(client, n):
    """With stop strings the stream never sends a stop and equals the whole completion."""
    full = greedy(client, max_tokens=16)["choices"][0]["text"]
    stops = pick_stops(full, 2)
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 16, "n": n, "stop": ["@@never@@", *stops]}
    whole = ok(client, body)
    chunks = stream(client, body)
    texts = joined(chunks)
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert sorted(texts) == list(range(n))
    for text in texts.values():
        assert text == full[:min(full.find(s) for s in stops)]
        assert not any(stop in text for stop in stops)
    for chunk in chunks:
        for choice in chunk["choices"]:
            assert not any(stop in choice["text"] for stop in stops)
    assert {i: r for i, r in finishes(chunks).items()} == {i: ["stop"] for i in range(n)}


def test_stream_stop_across_chunks(client):
    """A stop string that spans several tokens is held back, never sent in part."""
    full = greedy(client, max_tokens=16)["choices"][0]["text"]
    start = full.find(pick_stops(full)[0])
    stop = full[start:start + 6]
    assert len(stop) == 6
    chunks = stream(client, {"prompt": PROMPT, "temperature": 0, "max_tokens": 16, "stop": stop})
    text = joined(chunks)[0]
    assert text == full[:full.find(stop)]
    assert finishes(chunks) == {0: ["stop"]}


def test_stream_include_usage(client):
    """stream_options.include_usage adds a last chunk with no choices and the whole request's usage."""
    body = {"prompt": [PROMPT, OTHER_PROMPT], "temperature": 0, "max_tokens": 5, "n": 2}
    whole = ok(client, body)
    chunks = stream(client, {**body, "stream_options": {"include_usage": True}})
    *content, last = chunks
    assert last["choices"] == []
    assert last["usage"] == whole["usage"]
    assert last["object"] == "text_completion" and last["id"] == content[0]["id"]
    assert all(chunk["choices"] and "usage" not in chunk for chunk in content)


def test_stream_without_include_usage_has_no_usage(client):
    """Without include_usage no chunk carries usage."""
    for options in (None, {"include_usage": False}, {}):
        chunks = stream(client, {"prompt": PROMPT, "max_tokens": 3, "stream_options": options})
        assert all("usage" not in chunk and chunk["choices"] for chunk in chunks)


def test_stream_max_tokens_zero(client):
    """max_tokens 0 streams one empty chunk per choice with finish "length"."""
    chunks = stream(client, {"prompt": PROMPT, "max_tokens": 0, "n": 2})
    assert [(c["choices"][0]["index"], c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] \
        == [(0, "", "length"), (1, "", "length")]


def test_stream_logprobs(client):
    """With logprobs each chunk's lists are in step and all of them together match the whole completion."""
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 8, "logprobs": 2}
    whole = ok(client, body)["choices"][0]["logprobs"]
    chunks = stream(client, body)
    merged = {key: [] for key in whole}
    for chunk in chunks:
        lp = chunk["choices"][0]["logprobs"]
        assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
        assert all(isinstance(top, dict) and len(top) <= 2 for top in lp["top_logprobs"])
        for key in merged:
            merged[key] += lp[key]
    assert merged["tokens"] == whole["tokens"]
    assert merged["text_offset"] == whole["text_offset"]
    assert merged["token_logprobs"] == pytest.approx(whole["token_logprobs"], abs=1e-5)


def test_stream_echo_logprobs(client):
    """Streaming echo with logprobs starts with the prompt, whose first token has no logprob."""
    chunks = stream(client, {"prompt": PROMPT, "temperature": 0, "max_tokens": 4, "echo": True, "logprobs": 1})
    first = chunks[0]["choices"][0]
    assert first["text"] == PROMPT
    assert first["logprobs"]["token_logprobs"][0] is None
    assert first["logprobs"]["top_logprobs"][0] is None
    for chunk in chunks:
        lp = chunk["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])


def test_stream_sampled_with_seed_reproducible(client):
    """A seeded sampled stream repeats exactly and equals the seeded whole completion."""
    body = {"prompt": PROMPT, "temperature": 1, "max_tokens": 10, "n": 2, "seed": 99}
    first = joined(stream(client, body))
    assert joined(stream(client, body)) == first
    assert first == {c["index"]: c["text"] for c in ok(client, body)["choices"]}


def test_stream_releases_its_ticket(client, engines):
    """A stream holds its admission ticket until the response is closed, then releases it."""
    engine = engines["tiny"]
    assert engine.stats().requests == 0
    response = post(client, {"prompt": PROMPT, "max_tokens": 3, "stream": True})
    assert engine.stats().requests == 1
    response.get_data()
    response.close()
    assert engine.stats().requests == 0


def test_stream_closed_early_releases_its_ticket(client, engines):
    """A client that goes away mid-stream frees its ticket and the model for the next request."""
    engine = engines["tiny"]
    response = post(client, {"prompt": PROMPT, "max_tokens": 50, "stream": True})
    first = next(iter(response.response))
    first = first.decode() if isinstance(first, bytes) else first
    assert first.startswith("data: {")
    assert engine.stats().requests == 1
    response.close()
    assert engine.stats().requests == 0
    assert ok(client, {"prompt": PROMPT, "max_tokens": 2})["usage"]["completion_tokens"] == 2


def test_stream_fault_mid_stream(client, engines, monkeypatch):
    """A fault after some tokens ends the stream with an error event then [DONE]; the worker recovers."""
    engine = engines["tiny"]
    expected = greedy(client, max_tokens=8)["choices"][0]["text"]
    real_decode = engine.runner.batch.decode
    calls = []

    def failing_decode(token_ids):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("kaboom-secret-detail")
        return real_decode(token_ids)

    monkeypatch.setattr(engine.runner.batch, "decode", failing_decode)
    response = post(client, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True})
    raw = response.get_data(as_text=True)
    payloads = sse_payloads(response)
    assert "kaboom-secret-detail" not in raw and "Traceback" not in raw and "RuntimeError" not in raw
    *content, error = map(json.loads, payloads)
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "server_error"
    assert content, "the fault should come after some streamed text"
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert expected.startswith(joined(content)[0])
    assert engine.stats().requests == 0
    monkeypatch.undo()
    assert greedy(client, max_tokens=8)["choices"][0]["text"] == expected


def test_stream_fault_before_first_token(client, engines, monkeypatch):
    """A fault before anything was generated still gives a 200 stream with an error event and [DONE]."""
    def failing_start(prompt_ids):
        raise RuntimeError("kaboom-prefill")

    monkeypatch.setattr(engines["tiny"].runner, "start", failing_start)
    response = post(client, {"prompt": PROMPT, "max_tokens": 4, "stream": True})
    payloads = sse_payloads(response)
    assert len(payloads) == 1
    error = json.loads(payloads[0])["error"]
    assert error["type"] == "server_error"
    assert "kaboom-prefill" not in error["message"]


def test_stream_copilot_like_sampling(client):
    """Copilot's invoked-completion settings (n 3, temperature 0.2) with top_p < 1 stream three choices."""
    body = {"prompt": "def fibonacci(n):\n    ", "suffix": "", "max_tokens": 12, "temperature": 0.2, "top_p": 0.95,
            "n": 3, "stop": ["\n"], "extra": {"language": "python"}}
    for seed in range(3):
        chunks = stream(client, {**body, "seed": seed})
        assert sorted(finishes(chunks)) == [0, 1, 2]
        assert all("\n" not in text for text in joined(chunks).values())
