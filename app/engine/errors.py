"""What the engine refuses or fails at, in its own words: no HTTP status, no wire format.

The web layer (``app/errors.py``) maps each class to a status code and an OpenAI
error envelope; the command line prints the message.
"""
from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's errors; ``param`` names the request field at fault, when one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class PromptTooLong(EngineError):
    """Prompt plus completion do not fit the model's context window."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int):
        super().__init__(
            f"This model's maximum context length is {context_length} tokens, however you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in your prompt; {max_tokens} for the "
            "completion). Please reduce your prompt or max_tokens.", param="max_tokens")
        self.prompt_tokens, self.max_tokens, self.context_length = prompt_tokens, max_tokens, context_length


class InvalidParameter(EngineError):
    """A sampling parameter this model cannot honour (a logit_bias id outside its vocabulary)."""


class EngineBusy(EngineError):
    """The engine already holds as many requests as it admits; retry shortly."""


class RequestTimedOut(EngineError):
    """The request ran past its deadline and was stopped."""


class ServerStopping(EngineError):
    """The server is shutting down and stopped the request before its end."""


class UnknownModel(EngineError):
    """A model name or alias that nothing serves."""


class ModelUnavailable(EngineError):
    """A served model that could not be loaded."""


class UpstreamUnavailable(EngineError):
    """The upstream server of a model cannot be reached, failed, or broke off its stream; retry later."""


class UpstreamMisconfigured(EngineError):
    """The upstream server refuses this server itself (its key, the model name) or does not return token ids."""


class UpstreamRejected(EngineError):
    """The upstream server refused the request's content (a 4xx other than auth or busy); ``status`` is its code."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message, param)
        self.status = status


class UpstreamBusy(EngineBusy):
    """The upstream server is at its limit (it answered 429)."""
