"""The OpenAI completions wire format: request schemas, response and stream-chunk builders, errors.

Requests load into frozen dataclasses; the engine never sees a raw dict.  Unknown
fields (Copilot sends ``extra``, ``nwo``, ``code_annotations``) are ignored, and an
explicit ``null`` means the field's default.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate, validates_schema

from config import ModelConfig

from .engine.params import SamplingParams, SequenceResult, TokenLogprob
from .errors import APIError, InvalidRequestError

# OpenAI takes 4 stop strings; editors send more (Continue's autocomplete sends 12), and checking
# a few dozen costs nothing next to a decode step.
MAX_STOP_STRINGS = 64
MAX_LOGPROBS = 5
MAX_N = 128


class _StrictInteger(fields.Integer):
    """An integer that refuses booleans, fractions and numeric strings."""

    def _validated(self, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid")
        return super()._validated(value)


class _Number(fields.Float):
    """A finite JSON number (not a string, not a boolean)."""

    def _validated(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.make_error("invalid")
        return super()._validated(value)


class _StrictBoolean(fields.Boolean):
    """Only JSON true/false."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


def _valid_text(value: str) -> bool:
    """Whether a JSON string is real text (JSON can carry lone surrogates, which no tokenizer takes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Text(fields.String):
    """A string of real Unicode text."""

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        if not _valid_text(text):
            raise ValidationError("must be valid Unicode text (it contains a lone surrogate)")
        return text


class _StringOrList(fields.Field):
    """A string or a list of strings, loaded as a tuple of strings."""

    def __init__(self, *, max_items: int | None = None, min_items: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.max_items = max_items
        self.min_items = min_items

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValidationError("must be a string or an array of strings")
        if not all(_valid_text(v) for v in value):
            raise ValidationError("must be valid Unicode text (it contains a lone surrogate)")
        if len(value) < self.min_items:
            raise ValidationError(f"must have at least {self.min_items} item(s)")
        if self.max_items is not None and len(value) > self.max_items:
            raise ValidationError(f"must have at most {self.max_items} items, got {len(value)}")
        return tuple(value)


class _LogitBias(fields.Field):
    """``{"token id": bias}`` with biases in -100..100, loaded as sorted (id, bias) pairs."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, dict):
            raise ValidationError("must be an object mapping token ids to biases")
        pairs = []
        for key, bias in value.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise ValidationError(f"key {key!r} is not a token id") from None
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise ValidationError(f"bias for token {key} must be a number in -100..100, got {bias!r}")
            pairs.append((token, float(bias)))
        return tuple(sorted(pairs))


class StreamOptionsSchema(Schema):
    """``stream_options``: only ``include_usage`` is defined."""

    class Meta:
        unknown = EXCLUDE

    include_usage = _StrictBoolean(load_default=False, allow_none=True)


@dataclass(frozen=True)
class CompletionRequest:
    """A parsed ``/v1/completions`` body."""

    model: str | None
    prompts: tuple[str, ...]
    suffix: str | None
    max_tokens: int | None
    n: int
    best_of: int | None
    stream: bool
    echo: bool
    include_usage: bool
    user: str | None
    params: SamplingParams

    def sampling_params(self, model: ModelConfig) -> SamplingParams:
        """The sampling parameters with the model's default max_tokens filled in."""
        max_tokens = model.max_tokens if self.max_tokens is None else self.max_tokens
        return SamplingParams(**{**self.params.__dict__, "max_tokens": max_tokens})


class CompletionRequestSchema(Schema):
    """Validates an OpenAI completions request body."""

    class Meta:
        unknown = EXCLUDE

    model = _Text(allow_none=True)
    prompt = _StringOrList(min_items=1, allow_none=True)
    suffix = _Text(allow_none=True)
    max_tokens = _StrictInteger(allow_none=True, validate=validate.Range(min=0))
    # OpenAI's newer name for it; Continue's FIM requests send both.
    max_completion_tokens = _StrictInteger(allow_none=True, validate=validate.Range(min=0))
    temperature = _Number(allow_none=True, validate=validate.Range(min=0, max=2))
    top_p = _Number(allow_none=True, validate=validate.Range(min=0, max=1, min_inclusive=False))
    n = _StrictInteger(allow_none=True, validate=validate.Range(min=1, max=MAX_N))
    best_of = _StrictInteger(allow_none=True, validate=validate.Range(min=1, max=MAX_N))
    stream = _StrictBoolean(allow_none=True)
    stream_options = fields.Nested(StreamOptionsSchema, allow_none=True)
    logprobs = _StrictInteger(allow_none=True, validate=validate.Range(min=0, max=MAX_LOGPROBS))
    echo = _StrictBoolean(allow_none=True)
    stop = _StringOrList(max_items=MAX_STOP_STRINGS, allow_none=True)
    presence_penalty = _Number(allow_none=True, validate=validate.Range(min=-2, max=2))
    frequency_penalty = _Number(allow_none=True, validate=validate.Range(min=-2, max=2))
    logit_bias = _LogitBias(allow_none=True)
    user = _Text(allow_none=True)
    # int64, as OpenAI documents it (torch's generator also refuses anything past 64 bits).
    seed = _StrictInteger(allow_none=True, validate=validate.Range(min=-(2**63), max=2**63 - 1))
    # Copilot's hints; only {"trim_by_indentation": true} is used, anything else is ignored.
    extra = fields.Raw(allow_none=True, metadata={"description": "Copilot's hints (trim_by_indentation)"})

    @validates_schema
    def _check_combinations(self, data, **kwargs):
        if data.get("prompt") is None:
            raise ValidationError("prompt is required (a string or an array of strings)", "prompt")
        n, best_of = data.get("n") or 1, data.get("best_of")
        if best_of is not None and best_of < n:
            raise ValidationError(f"best_of ({best_of}) must be greater than or equal to n ({n})", "best_of")
        if data.get("stream") and best_of is not None and best_of > n:
            raise ValidationError("best_of greater than n cannot be used with stream", "best_of")

    @post_load
    def _make_request(self, data, **kwargs) -> CompletionRequest:
        def value(key, default):
            return default if data.get(key) is None else data[key]

        params = SamplingParams(
            temperature=float(value("temperature", 1.0)),
            top_p=float(value("top_p", 1.0)),
            presence_penalty=float(value("presence_penalty", 0.0)),
            frequency_penalty=float(value("frequency_penalty", 0.0)),
            logit_bias=value("logit_bias", ()),
            stop=tuple(s for s in value("stop", ()) if s),
            seed=data.get("seed"),
            logprobs=data.get("logprobs"),
            trim_by_indentation=isinstance(data.get("extra"), dict) and data["extra"].get("trim_by_indentation") is True,
        )
        return CompletionRequest(
            model=data.get("model"),
            prompts=data["prompt"],
            suffix=data.get("suffix"),
            max_tokens=value("max_tokens", data.get("max_completion_tokens")),
            n=value("n", 1),
            best_of=data.get("best_of"),
            stream=value("stream", False),
            echo=value("echo", False),
            include_usage=bool((data.get("stream_options") or {}).get("include_usage")),
            user=data.get("user"),
            params=params,
        )


_SCHEMA = CompletionRequestSchema()


def _first_error(messages: Any, path: str = "") -> tuple[str, str]:
    """The first (field path, message) of marshmallow's nested error messages."""
    if isinstance(messages, dict):
        key, inner = next(iter(messages.items()))
        name = path if key == "_schema" else (f"{path}.{key}" if path else str(key))
        return _first_error(inner, name)
    if isinstance(messages, list) and messages:
        return _first_error(messages[0], path)
    return path, str(messages)


def parse_completion_request(body: Any) -> CompletionRequest:
    """Validate a decoded JSON body; raise InvalidRequestError naming the offending field."""
    if not isinstance(body, Mapping):
        raise InvalidRequestError("The request body must be a JSON object.")
    try:
        return _SCHEMA.load(body)
    except ValidationError as exc:
        param, message = _first_error(exc.messages)
        raise InvalidRequestError(f"Invalid value for '{param}': {message}", param=param or None) from None


# -- responses -----------------------------------------------------------------


def logprobs_object(entries: Iterable[TokenLogprob] | None) -> dict | None:
    """OpenAI's legacy logprobs object (tokens, token_logprobs, top_logprobs, text_offset)."""
    if entries is None:
        return None
    entries = list(entries)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) if e.top or e.logprob is not None else None for e in entries],
        "text_offset": [e.offset for e in entries],
    }


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    """The ``usage`` block."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(completion_id: str, created: int, model: str, choices: list[tuple[int, SequenceResult]],
                        usage: dict, with_logprobs: bool) -> dict:
    """A whole ``text_completion`` object; ``choices`` pairs each result with its choice index."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "text": result.text,
                "logprobs": logprobs_object(result.logprobs) if with_logprobs else None,
                "finish_reason": result.finish_reason,
            }
            for index, result in choices
        ],
        "usage": usage,
    }


def stream_chunk(completion_id: str, created: int, model: str, index: int, text: str,
                 logprobs: Iterable[TokenLogprob] | None, finish_reason: str | None, chat_delta: bool = False) -> dict:
    """One streamed ``text_completion`` chunk for one choice.

    With ``chat_delta`` the choice carries its text as ``delta.content`` too: Mistral's FIM API
    streams that shape, and Continue reads nothing else from ``/v1/fim/completions``.
    """
    choice = {"index": index, "text": text, "logprobs": logprobs_object(logprobs), "finish_reason": finish_reason}
    if chat_delta:
        choice["delta"] = {"content": text}
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(completion_id: str, created: int, model: str, usage: dict) -> dict:
    """The final chunk of ``stream_options.include_usage``: no choices, only usage."""
    return {"id": completion_id, "object": "text_completion", "created": created, "model": model,
            "choices": [], "usage": usage}


def sse_event(payload: dict | str) -> str:
    """One server-sent event carrying a JSON payload (or a literal such as ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def error_envelope(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def api_error_envelope(error: APIError) -> dict:
    """The envelope of an :class:`APIError`."""
    return error_envelope(error.message, error.type, error.param, error.code)


def model_list(models: Iterable[ModelConfig], created: int) -> dict:
    """``GET /v1/models``: every served model, with its aliases."""
    data = []
    for model in models:
        data.append({"id": model.name, "object": "model", "created": created, "owned_by": "fauxpilot-lite",
                     "aliases": list(model.aliases), "fill_in_the_middle": model.fim is not None})
    return {"object": "list", "data": data}


# -- response schemas: the OpenAPI document is generated from these, and tests check the builders
# -- against them ------------------------------------------------------------------------------


class LogprobsSchema(Schema):
    """``choices[].logprobs`` when requested."""

    tokens = fields.List(fields.String(), required=True)
    token_logprobs = fields.List(fields.Float(allow_none=True), required=True)
    top_logprobs = fields.List(fields.Dict(keys=fields.String(), values=fields.Float()), allow_none=True,
                               required=True)
    text_offset = fields.List(fields.Integer(), required=True)


class ChoiceSchema(Schema):
    """One generated choice."""

    index = fields.Integer(required=True)
    text = fields.String(required=True)
    logprobs = fields.Nested(LogprobsSchema, allow_none=True, required=True)
    finish_reason = fields.String(allow_none=True, required=True, validate=validate.OneOf(["stop", "length"]))
    delta = fields.Dict(keys=fields.String(), values=fields.String(), metadata={
        "description": "stream chunks of /v1/fim/completions only: {\"content\": text}, as Mistral's FIM API "
                       "streams it (Continue reads it)"})


class UsageSchema(Schema):
    """Token counts of a completion."""

    prompt_tokens = fields.Integer(required=True)
    completion_tokens = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)


class CompletionSchema(Schema):
    """A ``text_completion`` object: the whole answer, or one chunk of a stream (``usage`` null there)."""

    id = fields.String(required=True)
    object = fields.String(required=True, validate=validate.Equal("text_completion"))
    created = fields.Integer(required=True)
    model = fields.String(required=True)
    choices = fields.List(fields.Nested(ChoiceSchema), required=True)
    usage = fields.Nested(UsageSchema, allow_none=True)


class ErrorSchema(Schema):
    """The ``error`` object of an error envelope."""

    message = fields.String(required=True)
    type = fields.String(required=True)
    param = fields.String(allow_none=True, required=True)
    code = fields.Raw(allow_none=True, required=True)


class ErrorEnvelopeSchema(Schema):
    """Every failure: ``{"error": {message, type, param, code}}``."""

    error = fields.Nested(ErrorSchema, required=True)


class ModelSchema(Schema):
    """One served model."""

    id = fields.String(required=True)
    object = fields.String(required=True)
    created = fields.Integer(required=True)
    owned_by = fields.String(required=True)
    aliases = fields.List(fields.String())
    fill_in_the_middle = fields.Boolean()


class ModelListSchema(Schema):
    """``GET /v1/models``."""

    object = fields.String(required=True)
    data = fields.List(fields.Nested(ModelSchema), required=True)
