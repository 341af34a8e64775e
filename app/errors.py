"""Exceptions that map to OpenAI error envelopes; plain Python so the engine can raise them too."""
from __future__ import annotations


class APIError(Exception):
    """An error the client caused or should know about; ``status`` is its HTTP code."""

    status = 500
    type = "server_error"
    default_code: str | None = None
    headers: dict[str, str] = {}

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code


class InvalidRequestError(APIError):
    """A malformed or out-of-range request (HTTP 400)."""

    status = 400
    type = "invalid_request_error"


class AuthenticationError(APIError):
    """A missing or wrong API key (HTTP 401)."""

    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class ModelNotFoundError(APIError):
    """An engine or model name that this server does not serve (HTTP 404)."""

    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class ServerBusyError(APIError):
    """Too many requests are already waiting for this worker (HTTP 429)."""

    status = 429
    type = "rate_limit_error"
    default_code = "server_busy"
    headers = {"Retry-After": "1"}


class ModelUnavailableError(APIError):
    """The model could not be loaded, so nothing can be served (HTTP 503)."""

    status = 503
    type = "server_error"
    default_code = "model_unavailable"


class RequestTimeoutError(APIError):
    """The request ran past the server's wall-clock limit and was stopped (HTTP 503, retry later)."""

    status = 503
    type = "server_error"
    default_code = "request_timeout"
    headers = {"Retry-After": "1"}
