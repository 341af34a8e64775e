"""Every failure as HTTP: the map from the protocol's, the web layer's and the engine's errors to status
codes and OpenAI error envelopes ``{"error": {message, type, param, code}}``."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from werkzeug.exceptions import HTTPException

from .engine import errors as engine
from .protocol import InvalidRequestError, error_envelope

log = logging.getLogger(__name__)

Reply = tuple[dict, int, dict[str, str]]  # envelope, status, headers


class AuthenticationError(Exception):
    """A missing or wrong API key (HTTP 401)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message, self.param, self.code = message, None, None


class BodyError(InvalidRequestError):
    """A request body that could not be read whole (HTTP 400 unless a subclass says otherwise); ``code`` says why."""


class ReadTimedOut(BodyError):
    """The client did not send its body within ``read_timeout`` (HTTP 408)."""


class ClientGone(BodyError):
    """The client hung up before the server answered (499, as nginx counts it; never seen by the client)."""


@dataclass(frozen=True)
class Answer:
    """How one kind of error is answered."""

    status: int | None  # None: the error's own ``status`` (an upstream's 4xx, passed on as it came)
    type: str = "invalid_request_error"
    code: str | None = None
    retry_after: bool = False  # clients should come back shortly

    def reply(self, exc: Exception) -> Reply:
        """The envelope, status and headers of ``exc`` (its own code, when it names one, wins)."""
        headers = {"Retry-After": "1"} if self.retry_after else {}
        code = getattr(exc, "code", None) or self.code
        status = exc.status if self.status is None else self.status
        return error_envelope(exc.message, self.type, exc.param, code), status, headers


# The errors a client causes or should know about; anything else is a server fault (500).
ANSWERS: dict[type[Exception], Answer] = {
    InvalidRequestError: Answer(400),
    AuthenticationError: Answer(401, "authentication_error", "invalid_api_key"),
    ReadTimedOut: Answer(408),
    ClientGone: Answer(499),
    engine.PromptTooLong: Answer(400, code="context_length_exceeded"),
    engine.InvalidParameter: Answer(400),
    engine.UnknownModel: Answer(404, code="model_not_found"),
    engine.EngineBusy: Answer(429, "rate_limit_error", "server_busy", retry_after=True),
    engine.RequestTimedOut: Answer(503, "server_error", "request_timeout", retry_after=True),
    engine.ServerStopping: Answer(503, "server_error", "server_shutting_down", retry_after=True),
    engine.ModelUnavailable: Answer(503, "server_error", "model_unavailable"),
    engine.UpstreamUnavailable: Answer(503, "server_error", "upstream_unavailable", retry_after=True),
    engine.UpstreamMisconfigured: Answer(502, "server_error", "upstream_misconfigured"),
    engine.UpstreamRejected: Answer(None),
}
SERVER_FAULT = Answer(500, "server_error")


def reply_for(exc: Exception, request_id: str) -> Reply:
    """The reply to any exception; an unexpected one is logged with its traceback and answered 500 without it."""
    answer = next((ANSWERS[cls] for cls in type(exc).__mro__ if cls in ANSWERS), None)
    if answer is not None:
        return answer.reply(exc)
    if isinstance(exc, HTTPException):
        return _http_reply(exc)
    log.error("[%s] unhandled error", request_id, exc_info=exc)
    message = f"The server had an error processing request {request_id}."
    return error_envelope(message, SERVER_FAULT.type), SERVER_FAULT.status, {}


def _http_reply(exc: HTTPException) -> Reply:
    """werkzeug's own errors (404 route, 405, 413) as envelopes, keeping their headers (Allow on 405)."""
    kind = "invalid_request_error" if (exc.code or 500) < 500 else "server_error"
    code = (exc.name or "error").lower().replace(" ", "_")
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    return error_envelope(exc.description or exc.name, kind, None, code), exc.code or 500, headers
