"""The completions blueprint: OpenAI/FauxPilot/Copilot endpoints over the worker's engines."""
from __future__ import annotations

import hmac
import logging
import time

from flask import Blueprint, Response, current_app, g, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from . import copilot_token
from .engine.registry import EngineRegistry
from .errors import AuthenticationError, BodyError, ClientGone, ReadTimedOut
from .llamacpp import compact_json, parse_infill_request
from .metrics import RequestRecord, request_id
from .openapi import openapi_document
from .protocol import CompletionRequest, decode_json_body, model_list, parse_completion_request
from .serving import (EventStream, InfillEventStream, client_gone_probe, start_completion, whole_completion,
                      whole_infill)
from .usage import UsageLabels, key_label, language_of
from .workers import request_read

log = logging.getLogger(__name__)
bp = Blueprint("completions", __name__)


def get_engines() -> EngineRegistry:
    """The worker's engine registry (set up by the application factory)."""
    return current_app.extensions["fauxpilot"]


PUBLIC_ENDPOINTS = ("completions.health", "completions.ready", "completions.openapi")
QUIET_ENDPOINTS = (*PUBLIC_ENDPOINTS, "completions.metrics", "completions.copilot_token_endpoint",
                   "completions.copilot_user")  # probes and scrapes: no log line unless refused


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


def open_request_record() -> None:
    """Give the request its id and its record (log line, metrics); every blueprint's first hook."""
    g.request_id = request_id(request.headers.get("X-Request-Id"))
    route = f"{request.method} {request.script_root}{request.path}"  # as the client sent it, prefix included
    g.record = RequestRecord(g.request_id, route, current_app.extensions["metrics"], request.remote_addr)


def check_api_key() -> None:
    """Refuse a request without one of the server's keys (or a Copilot token minted with one); note which key."""
    keys = current_app.config["FAUXPILOT"].api_keys
    g.api_key = None
    if not keys:
        return
    presented = _presented_key()
    if _is_key(presented, keys):
        g.api_key = presented
        return
    g.api_key = copilot_token.minting_key(presented, keys)
    if g.api_key is None:
        raise AuthenticationError("Incorrect or missing API key: send 'Authorization: Bearer <key>'.")


@bp.before_request
def _authenticate() -> None:
    open_request_record()
    if request.endpoint not in PUBLIC_ENDPOINTS:
        check_api_key()


@bp.after_request
def _tag(response: Response) -> Response:
    response.headers["X-Request-Id"] = g.get("request_id", "")
    # Copilot clients refuse GitHub API replies without it.
    response.headers["X-GitHub-Request-Id"] = g.get("request_id", "")
    if not (request.endpoint in QUIET_ENDPOINTS and response.status_code < 400):
        finish_record(response)
    return response


def finish_record(response: Response) -> None:
    """Write the request's record (log line, metrics, usage) once its reply is done."""
    record = g.get("record")
    if record is None:
        return
    if response.is_streamed:  # written when the server closes the stream: after its last byte, or a hang-up
        response.call_on_close(lambda status=response.status_code: record.finish(status))
    else:
        record.finish(response.status_code)


@bp.get("/health")
def health():
    """Liveness: the worker answers; lists the served models."""
    return jsonify(status="ok", models=[m.name for m in get_engines().models])


@bp.get("/ready")
def ready():
    """Readiness: 200 once every served model is loaded in this worker and its upstream (if any) answers, else 503."""
    registry = get_engines()
    loading = registry.not_loaded()
    if loading:
        return jsonify(status="loading", loading=loading), 503
    unreachable = {engine.name: problem for engine in registry.loaded() if (problem := engine.health())}
    if unreachable:
        return jsonify(status="upstream_unreachable", upstreams=unreachable), 503, {"Retry-After": "5"}
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
        registry.observe(engine.name, engine.stats())
    return Response(registry.exposition(), content_type=registry.content_type)


@bp.get("/v1/models")
@bp.get("/models")
def list_models():
    """The served models and their aliases (Copilot probes ``/models``)."""
    return jsonify(model_list(get_engines().models, int(time.time())))


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


@bp.post("/infill")
def infill():
    """llama.cpp's fill-in-the-middle endpoint (llama.vscode, llama.vim): whole or streamed, as llama.cpp answers.

    A ``model`` that names no served model is ignored, as a one-model llama.cpp server ignores it
    (llama.vscode sends its own setting's model name).
    """
    body = parse_infill_request(decode_json_body(read_body(), request.mimetype or ""))
    engines = get_engines()
    engine = engines.get(body.model if body.model in engines.configs else None)
    completion = body.completion()
    _count_usage(completion, engine.name)
    run = start_completion(engine, completion, current_app.config["FAUXPILOT"], g.record,
                           client_gone_probe(request.environ), engines.stopping)
    if not body.stream:
        return Response(compact_json(whole_infill(run, body)), mimetype="application/json")
    return event_stream(InfillEventStream(run, body))


def event_stream(events) -> Response:
    """A server-sent event response that proxies pass through as it is written."""
    response = Response(events, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # let nginx pass events through at once
    return response


def read_body() -> bytes:
    """The whole request body, or the error that says why there is none (413, 408, 499, 400).

    Read from the WSGI input itself: under gunicorn, werkzeug hands back a body cut short by a
    hang-up (or a chunked one cut at max_request_bytes) as if it were whole.
    """
    limit, declared = current_app.config["MAX_CONTENT_LENGTH"], request.content_length
    if declared is not None and declared > limit:
        request_read()
        raise RequestEntityTooLarge()
    malformed = None
    try:  # a chunked body declares no length: read one byte past the limit to see whether it is over
        data = request.environ["wsgi.input"].read(limit + 1 if declared is None else declared)
    except OSError:  # gunicorn's reader when the connection ends inside a chunked body
        data = None
    except Exception as exc:  # gunicorn's chunk parser: not valid chunked encoding
        data, malformed = b"", exc
    if request_read():
        raise ReadTimedOut("The request body did not arrive in time.", code="request_read_timeout")
    if malformed is not None:
        raise BodyError("The request body is not valid chunked encoding.", code="invalid_body") from malformed
    if data is None or (declared is not None and len(data) < declared):
        raise ClientGone("The client closed the connection while sending its body.", code="client_closed_request")
    if len(data) > limit:
        raise RequestEntityTooLarge()
    return data


def _complete(engine_name: str | None, chat_deltas: bool = False):
    body = parse_completion_request(decode_json_body(read_body(), request.mimetype or ""))
    engines = get_engines()
    engine = engines.get(engine_name or body.model)
    _count_usage(body, engine.name)
    run = start_completion(engine, body, current_app.config["FAUXPILOT"], g.record, client_gone_probe(request.environ),
                           engines.stopping)
    if not body.stream:
        return jsonify(whole_completion(run))
    return event_stream(EventStream(run, chat_deltas))


# Headers editors send that name one editing session (Copilot's VS Code client sends the first).
SESSION_HEADERS = ("VScode-SessionId", "X-Session-Id")


def _count_usage(body: CompletionRequest, model: str) -> None:
    """Count this completion request in the usage reports (when they are on) and resolve its session's last one."""
    reports = current_app.extensions.get("usage")
    if reports is None:
        return
    prompt = body.prompts[0]
    labels = UsageLabels(key_label(g.get("api_key")), model,
                         language_of(body.language, prompt, body.context.path if body.context else None))
    session = next((request.headers[name][:128] for name in SESSION_HEADERS if request.headers.get(name)),
                   f"address {request.remote_addr}")
    g.record.counting = reports.begin(f"{labels.key} {session}", labels, prompt)
