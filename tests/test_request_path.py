"""The seams of the request path: the scheduler's row table, the error map, the serving function, the layers."""
from __future__ import annotations

import ast
import json
import threading
from pathlib import Path

import pytest

from app.engine import SamplingParams
from app.engine import errors as engine_errors
from app.engine.scheduler import RowTable
from app.errors import AuthenticationError, reply_for
from app.metrics import Metrics, RequestRecord
from app.protocol import InvalidRequestError, parse_completion_request
from app.serving import EventStream, start_completion, whole_completion

PROMPT = "def fibonacci(n):\n"


# -- the row table -------------------------------------------------------------------


class FakeRequest:
    """Just what the row table reads of a request."""

    def __init__(self, name: str, next_tokens: list[int]):
        self.name, self.next_tokens = name, next_tokens
        self.cancelled = threading.Event()


def table_of(*sizes: int) -> tuple[RowTable, list[FakeRequest]]:
    """A table holding one fake request per size, its rows' next tokens numbered in batch order."""
    table, requests, token = RowTable(), [], 0
    for number, size in enumerate(sizes):
        request = FakeRequest(f"r{number}", list(range(token, token + size)))
        table.add(request, size)
        requests.append(request)
        token += size
    return table, requests


def test_row_table_slices_follow_the_batch_order():
    """Each request owns consecutive rows in the order it joined; next tokens line up with them."""
    table, (a, b, c) = table_of(2, 1, 3)
    assert len(table) == 6
    assert [(r.name, s.start, s.stop) for r, s in table.slices()] == [("r0", 0, 2), ("r1", 2, 3), ("r2", 3, 6)]
    assert table.next_tokens() == [0, 1, 2, 3, 4, 5]


def test_row_table_retain_keeps_named_rows_and_reports_emptied_requests():
    """Kept rows become batch indexes in order; a request left with no row is returned as gone."""
    table, (a, b, c) = table_of(2, 1, 3)
    rows, gone = table.retain([[1], [], [0, 2]])
    assert rows == [1, 3, 5]
    assert gone == [b]
    assert table.requests == [a, c] and table.sizes == [1, 2] and len(table) == 3
    # A second step sees the shrunk layout.
    rows, gone = table.retain([[0], [1]])
    assert rows == [0, 2] and gone == [] and table.sizes == [1, 1]


def test_row_table_drops_cancelled_requests_whole():
    """without_cancelled keeps every row of live requests and none of a cancelled one."""
    table, (a, b, c) = table_of(2, 1, 3)
    b.cancelled.set()
    rows, gone = table.retain(table.without_cancelled())
    assert rows == [0, 1, 3, 4, 5] and gone == [b]
    assert table.clear() == [a, c] and len(table) == 0


# -- the error map ---------------------------------------------------------------------


@pytest.mark.parametrize("exc, status, type_, code, retry", [
    (engine_errors.PromptTooLong(300, 16, 256), 400, "invalid_request_error", "context_length_exceeded", False),
    (engine_errors.InvalidParameter("bad id", param="logit_bias"), 400, "invalid_request_error", None, False),
    (engine_errors.UnknownModel("no such model", param="model"), 404, "invalid_request_error", "model_not_found",
     False),
    (engine_errors.EngineBusy("full"), 429, "rate_limit_error", "server_busy", True),
    (engine_errors.RequestTimedOut("too slow"), 503, "server_error", "request_timeout", True),
    (engine_errors.ModelUnavailable("not loaded"), 503, "server_error", "model_unavailable", False),
    (engine_errors.ServerStopping("bye"), 503, "server_error", "server_shutting_down", True),
    (InvalidRequestError("bad", param="n", code="too_many_sequences"), 400, "invalid_request_error",
     "too_many_sequences", False),
    (AuthenticationError("who are you"), 401, "authentication_error", "invalid_api_key", False),
])
def test_every_error_class_has_its_status_and_envelope(exc, status, type_, code, retry):
    """Engine, protocol and auth errors map to their status, type, code, param and Retry-After."""
    envelope, got_status, headers = reply_for(exc, "req-1")
    assert got_status == status
    assert envelope == {"error": {"message": exc.message, "type": type_, "param": exc.param, "code": code}}
    assert (headers.get("Retry-After") == "1") is retry


def test_prompt_too_long_names_its_numbers():
    """The context error carries the numbers the client needs, in OpenAI's wording."""
    exc = engine_errors.PromptTooLong(300, 16, 256)
    assert "maximum context length is 256 tokens" in exc.message and "316 tokens (300 in your prompt; 16" in exc.message
    assert exc.param == "max_tokens"


def test_unexpected_error_is_a_500_without_its_text():
    """A fault that is nobody's error is a 500 naming the request, never the exception."""
    envelope, status, headers = reply_for(RuntimeError("secret-detail"), "req-9")
    assert status == 500 and headers == {}
    assert envelope["error"]["type"] == "server_error" and "req-9" in envelope["error"]["message"]
    assert "secret-detail" not in str(envelope)


def test_engine_package_knows_no_web():
    """Nothing in app/engine imports Flask, werkzeug, marshmallow or the web layer's modules."""
    web = {"flask", "werkzeug", "marshmallow", "apispec", "prometheus_client"}
    for path in Path(__file__).parent.parent.joinpath("app", "engine").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in web, f"{path.name} imports {name}"
                assert not name.startswith(".."), f"{path.name} reaches out of the engine: {name}"


# -- the serving function ------------------------------------------------------------


def record() -> RequestRecord:
    """A record for one request, with metrics of its own."""
    return RequestRecord("req-path", "POST /v1/completions", Metrics())


def test_whole_and_streamed_replies_come_from_one_run(engine, tiny_settings):
    """The same body served whole and streamed gives the same choices, indexed prompt number × n + index."""
    body = parse_completion_request({"prompt": [PROMPT, "x = 1"], "n": 2, "max_tokens": 5, "temperature": 0})
    whole_record = record()
    whole = whole_completion(start_completion(engine, body, tiny_settings, whole_record))
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2, 3]
    assert whole["usage"]["completion_tokens"] == whole_record.usage[1] > 0
    assert whole["usage"]["prompt_tokens"] == whole_record.usage[0] > 0
    assert engine.stats().requests == 0  # the whole reply released its ticket

    stream_record = record()
    events = EventStream(start_completion(engine, body, tiny_settings, stream_record))
    assert engine.stats().requests == 1
    texts: dict[int, str] = {}
    for event in events:
        payload = event.removeprefix("data: ").strip()
        if payload != "[DONE]":
            choice = json.loads(payload)["choices"][0]
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    events.close()
    assert engine.stats().requests == 0
    assert stream_record.complete and stream_record.usage == whole_record.usage
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}


def test_a_stream_closed_before_its_first_event_releases_its_ticket(engine, tiny_settings):
    """A server that closes an unread stream (the client left at once) still frees the engine's place."""
    body = parse_completion_request({"prompt": PROMPT, "max_tokens": 5, "stream": True})
    stream_record = record()
    events = EventStream(start_completion(engine, body, tiny_settings, stream_record))
    assert engine.stats().requests == 1
    events.close()
    assert engine.stats().requests == 0 and not stream_record.complete


@pytest.mark.parametrize("fields, code, param", [
    ({"max_tokens": 9}, "max_tokens_too_large", "max_tokens"),
    ({"n": 3, "prompt": [PROMPT, PROMPT]}, "too_many_sequences", "n"),
    ({"n": 1, "best_of": 5}, "too_many_sequences", "best_of"),
])
def test_server_limits_are_checked_before_any_work(engine, tiny_settings, fields, code, param):
    """Requests past the server's limits are refused before a prompt is tokenized or a ticket taken."""
    limited = tiny_settings.replace(max_tokens_limit=8, max_sequences=4)
    body = parse_completion_request({"prompt": PROMPT, **fields})
    with pytest.raises(InvalidRequestError) as caught:
        start_completion(engine, body, limited, record())
    assert (caught.value.code, caught.value.param) == (code, param)
    assert engine.stats().requests == 0


def test_busy_engine_refuses_before_any_reply(engine, tiny_settings):
    """With every place taken, start_completion raises EngineBusy (a 429 before the status line)."""
    tickets = []
    try:
        with pytest.raises(engine_errors.EngineBusy):
            for _ in range(engine.admission.limit + 1):
                tickets.append(engine.admit())
        body = parse_completion_request({"prompt": PROMPT, "max_tokens": 1})
        with pytest.raises(engine_errors.EngineBusy):
            start_completion(engine, body, tiny_settings, record())
    finally:
        for ticket in tickets:
            ticket.release()
    assert engine.stats().requests == 0
    assert engine.complete(engine.prepare(PROMPT, SamplingParams(max_tokens=1)))[0].completion_tokens == 1


def test_a_request_runs_once(engine):
    """Running a request a second time is an error, not a silent replay of its first results."""
    request = engine.prepare(PROMPT, SamplingParams(max_tokens=2, temperature=0.0))
    assert engine.complete(request)[0].completion_tokens == 2
    with pytest.raises(ValueError, match="already run"):
        engine.complete(request)


def test_a_stopping_server_ends_running_requests_with_an_error(engine):
    """Once the worker's stopping event is set, a running request raises ServerStopping and leaves the batch."""
    from app.engine import Watch

    stopping = threading.Event()
    bias = tuple((token, -100.0) for token in sorted(engine.preparer.eos_ids))
    request = engine.prepare(PROMPT, SamplingParams(max_tokens=200, temperature=0.0, logit_bias=bias))
    deltas = engine.stream(request, Watch(stopping=stopping))
    next(deltas)
    stopping.set()
    with pytest.raises(engine_errors.ServerStopping):
        for _ in deltas:
            pass
    assert request.completion_tokens < 200


def test_refused_probes_and_token_requests_are_logged(tiny_settings, engines, caplog):
    """Probes and scrapes stay quiet when served, but a 401 on /metrics or the token endpoint is logged."""
    import logging

    from app import create_app

    client = create_app(tiny_settings.replace(api_keys=("secret",)), engines=engines.values()).test_client()
    caplog.set_level(logging.INFO, logger="app.requests")
    assert client.get("/metrics").status_code == 401
    assert client.get("/copilot_internal/v2/token").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer secret"}).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "app.requests"]
    assert len(lines) == 2, lines
    assert "GET /metrics status=401" in lines[0] and "GET /copilot_internal/v2/token status=401" in lines[1]
    assert all("secret" not in line for line in lines)


def test_request_ids_are_kept_only_when_sane(client):
    """A client's plain request id is echoed; an oversized or odd one is replaced by a fresh one."""
    kept = client.get("/v1/models", headers={"X-Request-Id": "8a3c1f0e-5b7d-4c2a-9e61-0d4f2b8c7a15"})
    assert kept.headers["X-Request-Id"] == "8a3c1f0e-5b7d-4c2a-9e61-0d4f2b8c7a15"
    for odd in ("a" * 8000, "id with spaces", "\x1b[31mred"):
        replaced = client.get("/v1/models", headers={"X-Request-Id": odd}).headers["X-Request-Id"]
        assert replaced != odd and len(replaced) == 32
