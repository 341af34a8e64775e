"""The completions blueprint: OpenAI/FauxPilot/Copilot endpoints over the worker's engines."""
from __future__ import annotations

import hmac
import json
import logging
import select
import socket
import time
import uuid
from contextlib import closing
from dataclasses import dataclass
from typing import Callable, Iterator

from flask import Blueprint, Response, current_app, g, jsonify, request

from . import copilot_token
from .engine import Engine, Generation, Job
from .engine.registry import EngineRegistry
from .errors import APIError, AuthenticationError, InvalidRequestError
from .metrics import Metrics
from .openapi import openapi_document
from .protocol import (
    CompletionRequest,
    api_error_envelope,
    completion_response,
    error_envelope,
    model_list,
    parse_completion_request,
    sse_event,
    stream_chunk,
    usage_chunk,
    usage_object,
)

log = logging.getLogger(__name__)
bp = Blueprint("completions", __name__)

# curl -d sends form-urlencoded by default; the body is still JSON, so accept it too.
JSON_CONTENT_TYPES = ("", "application/json", "application/x-www-form-urlencoded")


def get_engines() -> EngineRegistry:
    """The worker's engine registry (set up by the application factory)."""
    return current_app.extensions["fauxpilot"]


PUBLIC_ENDPOINTS = ("completions.health", "completions.ready", "completions.openapi")
QUIET_ENDPOINTS = (*PUBLIC_ENDPOINTS, "completions.metrics", "completions.copilot_token_endpoint",
                   "completions.copilot_user")  # probes and scrapes: no log line


def _presented_key() -> str:
    """The key a client sent: ``Authorization: Bearer``, or the ``api-key`` / ``x-api-key`` header."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    return (request.headers.get("api-key") or request.headers.get("x-api-key") or "").strip()


def _is_key(presented: str, keys: tuple[str, ...]) -> bool:
    """Whether ``presented`` is one of ``keys``.

    It is compared with every key, so the time taken says nothing about which one almost matched.
    """
    matches = [hmac.compare_digest(presented.encode(), key.encode()) for key in keys]
    return bool(presented) and any(matches)


@bp.before_request
def _authenticate() -> None:
    g.request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    route = f"{request.method} {request.script_root}{request.path}"  # as the client sent it, prefix included
    g.record = RequestRecord(g.request_id, route, time.perf_counter(), current_app.extensions["metrics"])
    keys = current_app.config["FAUXPILOT"].api_keys
    if not keys or request.endpoint in PUBLIC_ENDPOINTS:
        return
    presented = _presented_key()
    if _is_key(presented, keys) or copilot_token.verify(presented, keys):
        return
    raise AuthenticationError("Incorrect or missing API key: send 'Authorization: Bearer <key>'.")


request_log = logging.getLogger("app.requests")


@dataclass
class RequestRecord:
    """What one request's log line and metrics say: filled in as the request goes, written when it ends."""

    request_id: str
    route: str
    started: float
    metrics: Metrics
    engine: Engine | None = None
    usage: tuple[int, int] = (0, 0)

    def finish(self, status: int, note: str = "") -> None:
        """Write the request's log line (no prompt text) and count it in the metrics."""
        model = self.engine.name if self.engine else None
        request_log.info("request %s %s status=%d model=%s prompt_tokens=%d completion_tokens=%d latency_ms=%.0f%s",
                         self.request_id, self.route, status, model or "-", self.usage[0], self.usage[1],
                         (time.perf_counter() - self.started) * 1000, f" {note}" if note else "")
        self.metrics.record(model, status, self.started, self.usage)
        if self.engine is not None:
            self.metrics.observe_engine(self.engine)


@bp.after_request
def _tag(response: Response) -> Response:
    response.headers["X-Request-Id"] = g.get("request_id", "")
    # Copilot clients refuse GitHub API replies without it.
    response.headers["X-GitHub-Request-Id"] = g.get("request_id", "")
    record = g.get("record")
    if record is not None and response.mimetype != "text/event-stream" and request.endpoint not in QUIET_ENDPOINTS:
        record.finish(response.status_code)
    return response


@bp.get("/health")
def health():
    """Liveness: the worker answers; lists the served models."""
    return jsonify(status="ok", models=[m.name for m in get_engines().models])


@bp.get("/ready")
def ready():
    """Readiness: 200 once every served model is loaded in this worker, else 503."""
    registry = get_engines()
    loading = registry.not_loaded()
    if loading:
        return jsonify(status="loading", loading=loading), 503
    return jsonify(status="ready", models=[m.name for m in registry.models])


@bp.get("/api/copilot_internal/v2/token")
@bp.get("/copilot_internal/v2/token")
def copilot_token_endpoint():
    """A Copilot token from this server (for clients whose GitHub API URL points here)."""
    keys = current_app.config["FAUXPILOT"].api_keys
    presented = _presented_key()
    if keys and not _is_key(presented, keys):  # a token cannot buy another token: a key must
        raise AuthenticationError("Fetching a Copilot token needs an API key: set GH_COPILOT_TOKEN to one.")
    token, expires_at = copilot_token.mint(presented if keys else None, request.host)
    return jsonify(copilot_token.token_reply(token, expires_at, request.url_root))


@bp.get("/api/copilot_internal/user")
@bp.get("/copilot_internal/user")
def copilot_user():
    """The Copilot user record a client checks before completing."""
    return jsonify(copilot_token.user_reply(request.url_root))


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI document of this API (generated from the protocol's schemas)."""
    return jsonify(openapi_document())


@bp.get("/metrics")
def metrics():
    """Prometheus metrics (all workers' under gunicorn)."""
    registry = current_app.extensions["metrics"]
    for engine in get_engines().loaded():
        registry.observe_engine(engine)
    return Response(registry.exposition(), content_type=registry.content_type)


@bp.get("/v1/models")
@bp.get("/models")
def list_models():
    """The served models and their aliases (Copilot probes ``/models``)."""
    return jsonify(model_list(get_engines().models, int(time.time())))


def _client_gone_probe() -> Callable[[], bool] | None:
    """A check that the client closed its connection (gunicorn gives views the socket); None elsewhere."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return None

    def client_gone() -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            # Readable with nothing to read is the peer's close; data would be a pipelined request.
            return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True

    return client_gone


# What a request's generation watches: the client-gone probe and the wall-clock deadline.
Watch = tuple["Callable[[], bool] | None", "float | None"]


def _check_limits(req: CompletionRequest, settings) -> None:
    """Refuse requests bigger than the server allows (400)."""
    if req.max_tokens is not None and req.max_tokens > settings.max_tokens_limit:
        raise InvalidRequestError(f"max_tokens is {req.max_tokens}; this server allows at most "
                                  f"{settings.max_tokens_limit}.", param="max_tokens", code="max_tokens_too_large")
    sequences = len(req.prompts) * max(req.n, req.best_of or 1)
    if sequences > settings.max_sequences:
        raise InvalidRequestError(f"this request asks for {sequences} sequences (prompts × max(n, best_of)); this "
                                  f"server allows at most {settings.max_sequences}.",
                                  param="best_of" if (req.best_of or 1) > req.n else "n", code="too_many_sequences")


def _json_body() -> object:
    content_type = request.mimetype or ""
    if content_type not in JSON_CONTENT_TYPES:
        raise InvalidRequestError(f"Content-Type must be application/json, got {content_type!r}.",
                                  code="unsupported_content_type")
    try:
        return json.loads(request.get_data(cache=False) or b"null")
    except (ValueError, RecursionError):
        raise InvalidRequestError("The request body is not valid JSON.", code="invalid_json") from None


@bp.post("/v1/completions")
@bp.post("/v1/engines/<path:engine>/completions")
@bp.post("/v1/engines/<path:engine>/completion")
def create_completion(engine: str | None = None):
    """Complete one or more prompts, whole or as a server-sent event stream."""
    return _complete(engine)


@bp.post("/v1/fim/completions")
def create_fim_completion():
    """The fill-in-the-middle route of Mistral's API (Continue's FIM providers): the same body, prompt + suffix.

    Its stream chunks also carry each text as ``delta.content``, the only field those clients read.
    """
    return _complete(None, chat_deltas=True)


def _complete(engine: str | None, chat_deltas: bool = False):
    settings = current_app.config["FAUXPILOT"]
    req = parse_completion_request(_json_body())
    _check_limits(req, settings)
    model = get_engines().get(engine or req.model)
    g.record.engine = model
    completion_id = f"cmpl-{g.request_id}"
    params = req.sampling_params(model.config)
    jobs = [model.prepare(prompt, params, suffix=req.suffix, n=req.n, echo=req.echo, request_id=g.request_id)
            for prompt in req.prompts]
    release = model.gate.enter()
    client_gone = _client_gone_probe()
    deadline = time.monotonic() + settings.request_timeout if settings.request_timeout else None
    if req.stream:
        response = Response(_event_stream(model, jobs, req, completion_id, (client_gone, deadline), g.record,
                                          chat_deltas), mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"  # let nginx pass events through at once
        response.call_on_close(release)
        return response
    try:
        body = _whole_completion(model, jobs, req, completion_id, (client_gone, deadline))
        g.record.usage = (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
        return jsonify(body)
    finally:
        release()


def _whole_completion(model: Engine, jobs: list[Job], req: CompletionRequest, completion_id: str,
                      watch: Watch) -> dict:
    choices, completion_tokens = [], 0
    client_gone, deadline = watch
    for number, job in enumerate(jobs):
        for result in model.complete(job, best_of=req.best_of, client_gone=client_gone, deadline=deadline):
            choices.append((number * req.n + result.index, result))
            completion_tokens += result.completion_tokens
    prompt_tokens = sum(job.prompt_tokens for job in jobs)
    return completion_response(completion_id, int(time.time()), model.name, choices,
                               usage_object(prompt_tokens, completion_tokens), req.params.logprobs is not None)


def _event_stream(model: Engine, jobs: list[Job], req: CompletionRequest, completion_id: str,
                  watch: Watch, record: RequestRecord, chat_deltas: bool = False) -> Iterator[str]:
    """The server-sent events of a streamed completion, then its request log line however it ended."""
    usage = [0, 0]
    finished = False
    try:
        yield from _stream_events(model, jobs, req, completion_id, watch, usage, chat_deltas)
        finished = True
    finally:
        record.usage = tuple(usage)
        record.finish(200, "" if finished else "client went away")


def _stream_events(model: Engine, jobs: list[Job], req: CompletionRequest, completion_id: str,
                   watch: Watch, usage: list[int], chat_deltas: bool = False) -> Iterator[str]:
    """The chunks, then the usage chunk if asked for; ``usage`` counts [prompt, completion] tokens as jobs end."""
    created = int(time.time())
    with_logprobs = req.params.logprobs is not None
    try:
        for number, job in enumerate(jobs):
            generation = Generation(model, job, *watch)
            with closing(iter(generation)) as deltas:
                for delta in deltas:
                    yield sse_event(stream_chunk(completion_id, created, model.name, number * req.n + delta.index,
                                                 delta.text, delta.logprobs if with_logprobs else None,
                                                 delta.finish_reason, chat_delta=chat_deltas))
            usage[0] += generation.prompt_tokens
            usage[1] += generation.completion_tokens
        if req.include_usage:
            yield sse_event(usage_chunk(completion_id, created, model.name, usage_object(*usage)))
    except APIError as exc:
        yield sse_event(api_error_envelope(exc))
    except Exception:  # the status line is gone: report in-band, keep the worker serving
        log.exception("[%s] stream failed", completion_id)
        yield sse_event(error_envelope(f"internal server error (request {completion_id})", "server_error"))
    yield sse_event("[DONE]")
