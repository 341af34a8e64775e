"""The OpenAI completions wire format: one schema per shape, loaded into or dumped from plain objects.

A request body loads into a frozen :class:`CompletionRequest` (its sampling part a
:class:`SamplingParams`); the engine never sees a raw dict. The schema's fields carry the
dataclasses' field names (``data_key`` where the wire name differs), the defaults live only
in the dataclasses, unknown fields (Copilot sends ``nwo``, ``code_annotations``) are ignored,
and an explicit ``null`` means the field's default.

Every response body is dumped through its schema, the same one the OpenAPI document
(app.openapi) shows, so the document and the bytes sent cannot disagree on a key.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Iterable, Mapping, Sequence

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, pre_load, validate, validates_schema

from config import ModelConfig

from .engine.params import ContextChunk, PromptContext, SamplingParams, TokenLogprob

# OpenAI takes 4 stop strings; editors send more (Continue's autocomplete sends 12), and checking
# a few dozen costs nothing next to a decode step.
MAX_STOP_STRINGS = 64
MAX_LOGPROBS = 5
MAX_N = 128
# curl -d sends form-urlencoded by default; the body is still JSON, so accept it too.
JSON_CONTENT_TYPES = ("", "application/json", "application/x-www-form-urlencoded")


class InvalidRequestError(Exception):
    """A body that is not a valid completion request; ``param`` names the field at fault."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


# -- request fields ------------------------------------------------------------


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


class _StopStrings(_StringOrList):
    """Stop strings, without the empty ones: an empty string would end every completion before it starts."""

    def _deserialize(self, value, attr, data, **kwargs):
        return tuple(s for s in super()._deserialize(value, attr, data, **kwargs) if s)


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


@dataclasses.dataclass(frozen=True)
class CopilotExtra:
    """What the server uses of Copilot's ``extra``: the dedent stop, and the context to show before the prompt."""

    trim_by_indentation: bool = False
    context: tuple[str, ...] = ()  # [stable context, recent-edits context], each a block of text
    language: str | None = None  # the editor's language id of the file


class _CopilotHints(fields.Raw):
    """Copilot's ``extra`` hints: ``trim_by_indentation`` (only a real JSON true turns the dedent stop on),
    ``context`` (strings; others are skipped) and ``language``; anything else, malformed included, is ignored."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, dict):
            return CopilotExtra()
        context = value.get("context")
        texts = tuple(t for t in context if isinstance(t, str) and t.strip() and _valid_text(t)) \
            if isinstance(context, list) else ()
        language = value.get("language")
        return CopilotExtra(value.get("trim_by_indentation") is True, texts,
                            language if isinstance(language, str) and _valid_text(language) else None)


class StreamOptionsSchema(Schema):
    """``stream_options``: only ``include_usage`` is defined."""

    class Meta:
        unknown = EXCLUDE

    include_usage = _StrictBoolean(allow_none=True)


class _StreamOptions(fields.Nested):
    """``stream_options``, loaded as whether it asks for the usage chunk (``include_usage: true``)."""

    def __init__(self, **kwargs):
        super().__init__(StreamOptionsSchema, **kwargs)

    def _deserialize(self, value, attr, data, partial=None, **kwargs):
        # The nested schema checks it first, so a bad include_usage is named as stream_options.include_usage.
        options = super()._deserialize(value, attr, data, partial=partial, **kwargs)
        return options.get("include_usage") is True


# -- requests ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompletionRequest:
    """A parsed ``/v1/completions`` body; its defaults are the API's."""

    model: str | None = None
    prompts: tuple[str, ...]
    suffix: str | None = None
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    echo: bool = False
    include_usage: bool = False
    user: str | None = None
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    context: PromptContext | None = None  # repository context to put before the prompt
    language: str | None = None  # the editor's language id of the file (Copilot's extra.language)


_PARAM_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams))


class CompletionRequestSchema(Schema):
    """Validates an OpenAI completions request body into a :class:`CompletionRequest`.

    Attribute names are CompletionRequest's or SamplingParams' field names; ``data_key`` gives
    the wire name where it differs. Declaration order decides which error is reported first.
    """

    class Meta:
        unknown = EXCLUDE

    model = _Text(allow_none=True)
    prompts = _StringOrList(data_key="prompt", min_items=1)
    suffix = _Text(allow_none=True)
    max_tokens = _StrictInteger(allow_none=True, validate=validate.Range(min=0))
    # OpenAI's newer name for max_tokens, used when max_tokens is not given; Continue's FIM requests send both.
    max_completion_tokens = _StrictInteger(allow_none=True, validate=validate.Range(min=0))
    temperature = _Number(allow_none=True, validate=validate.Range(min=0, max=2))
    top_p = _Number(allow_none=True, validate=validate.Range(min=0, max=1, min_inclusive=False))
    n = _StrictInteger(allow_none=True, validate=validate.Range(min=1, max=MAX_N))
    best_of = _StrictInteger(allow_none=True, validate=validate.Range(min=1, max=MAX_N))
    stream = _StrictBoolean(allow_none=True)
    include_usage = _StreamOptions(data_key="stream_options", allow_none=True)
    logprobs = _StrictInteger(allow_none=True, validate=validate.Range(min=0, max=MAX_LOGPROBS))
    echo = _StrictBoolean(allow_none=True)
    stop = _StopStrings(max_items=MAX_STOP_STRINGS, allow_none=True)
    presence_penalty = _Number(allow_none=True, validate=validate.Range(min=-2, max=2))
    frequency_penalty = _Number(allow_none=True, validate=validate.Range(min=-2, max=2))
    logit_bias = _LogitBias(allow_none=True)
    user = _Text(allow_none=True)
    # int64, as OpenAI documents it (torch's generator also refuses anything past 64 bits).
    seed = _StrictInteger(allow_none=True, validate=validate.Range(min=-(2**63), max=2**63 - 1))
    extra = _CopilotHints(allow_none=True, metadata={
        "description": "Copilot's hints: trim_by_indentation, and context (strings shown before the prompt, stable "
                       "context first) in the language of language"})
    nwo = _Text(allow_none=True, metadata={"description": "Copilot's repository (owner/name): named in the context"})

    @pre_load
    def _drop_nulls(self, data, **kwargs):
        # Clients send null to mean "not set", so a null field loads as the dataclass default.
        return {key: value for key, value in data.items() if value is not None}

    @validates_schema
    def _require_prompt(self, data, **kwargs):
        # Here rather than required=True: a missing prompt is reported only when every field is valid.
        if "prompts" not in data:
            raise ValidationError("prompt is required (a string or an array of strings)", "prompt")

    @post_load
    def _make_request(self, data, **kwargs) -> CompletionRequest:
        fallback = data.pop("max_completion_tokens", None)
        if fallback is not None:
            data.setdefault("max_tokens", fallback)
        extra: CopilotExtra = data.pop("extra", CopilotExtra())
        data["context"] = copilot_context(extra, data.pop("nwo", None))
        data["language"] = extra.language
        params = {name: data.pop(name) for name in _PARAM_NAMES & data.keys()}
        params["trim_by_indentation"] = extra.trim_by_indentation
        request = CompletionRequest(**data, params=SamplingParams(**params))
        _check_combinations(request)
        return request


def copilot_context(extra: CopilotExtra, repo: str | None) -> PromptContext | None:
    """Copilot's context as chunks: the first (stable) kept longest, the later ones (recent edits) dropped first."""
    if not extra.context:
        return None
    chunks = tuple(ContextChunk(text, stable=index == 0) for index, text in enumerate(extra.context))
    return PromptContext(chunks, repo=repo, language=extra.language)


def _check_combinations(request: CompletionRequest) -> None:
    """Refuse best_of values that contradict n or stream (after defaults are applied)."""
    n, best_of = request.n, request.best_of
    if best_of is not None and best_of < n:
        raise ValidationError(f"best_of ({best_of}) must be greater than or equal to n ({n})", "best_of")
    if request.stream and best_of is not None and best_of > n:
        raise ValidationError("best_of greater than n cannot be used with stream", "best_of")


_REQUEST = CompletionRequestSchema()


def _first_error(messages: Any, path: str = "") -> tuple[str, str]:
    """The first (field path, message) of marshmallow's nested error messages."""
    if isinstance(messages, dict):
        key, inner = next(iter(messages.items()))
        name = path if key == "_schema" else (f"{path}.{key}" if path else str(key))
        return _first_error(inner, name)
    if isinstance(messages, list) and messages:
        return _first_error(messages[0], path)
    return path, str(messages)


def decode_json_body(data: bytes, content_type: str) -> Any:
    """The decoded JSON of a request body (``content_type`` without parameters)."""
    if content_type not in JSON_CONTENT_TYPES:
        raise InvalidRequestError(f"Content-Type must be application/json, got {content_type!r}.",
                                  code="unsupported_content_type")
    try:
        return json.loads(data or b"null")
    except (ValueError, RecursionError):
        raise InvalidRequestError("The request body is not valid JSON.", code="invalid_json") from None


def parse_completion_request(body: Any) -> CompletionRequest:
    """Validate a decoded JSON body; raise InvalidRequestError naming the offending field."""
    return load_body(_REQUEST, body)


def load_body(schema: Schema, body: Any) -> Any:
    """A decoded JSON body loaded through ``schema``; InvalidRequestError naming the offending field."""
    if not isinstance(body, Mapping):
        raise InvalidRequestError("The request body must be a JSON object.")
    try:
        return schema.load(body)
    except ValidationError as exc:
        param, message = _first_error(exc.messages)
        raise InvalidRequestError(f"Invalid value for '{param}': {message}", param=param or None) from None


# -- response schemas: the builders below dump through these, and the OpenAPI document shows them --


class LogprobsSchema(Schema):
    """``choices[].logprobs`` when requested: OpenAI's legacy columns, one entry per token in each."""

    tokens = fields.List(fields.String(), required=True)
    token_logprobs = fields.List(fields.Float(allow_none=True), required=True)
    # null for a token without a logprob (an echoed first token), so the entries, not the list, are nullable.
    top_logprobs = fields.List(fields.Dict(keys=fields.String(), values=fields.Float(), allow_none=True),
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


class PromptTokensDetailsSchema(Schema):
    """``usage.prompt_tokens_details``."""

    cached_tokens = fields.Integer(required=True, metadata={
        "description": "prompt tokens whose keys and values came from the prefix cache (not computed again)"})


class UsageSchema(Schema):
    """Token counts of a completion."""

    prompt_tokens = fields.Integer(required=True)
    completion_tokens = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)
    prompt_tokens_details = fields.Nested(PromptTokensDetailsSchema, required=True)


class CompletionSchema(Schema):
    """A ``text_completion`` object: the whole answer, or one chunk of a stream (no ``usage`` there)."""

    id = fields.String(required=True)
    object = fields.String(required=True, validate=validate.Equal("text_completion"), dump_default="text_completion")
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
    object = fields.String(required=True, validate=validate.Equal("model"), dump_default="model")
    created = fields.Integer(required=True)
    owned_by = fields.String(required=True, dump_default="fauxpilot-lite")
    aliases = fields.List(fields.String())
    fill_in_the_middle = fields.Boolean()


class ModelListSchema(Schema):
    """``GET /v1/models``."""

    object = fields.String(required=True, validate=validate.Equal("list"), dump_default="list")
    data = fields.List(fields.Nested(ModelSchema), required=True)


# Created once: a stream dumps one chunk per generated token.
_COMPLETION = CompletionSchema()
_ERROR_ENVELOPE = ErrorEnvelopeSchema()
_MODEL_LIST = ModelListSchema()


# -- response builders ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChoiceOut:
    """One finished choice of a whole completion, as the serving layer hands it over."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None


def _logprob_columns(entries: Iterable[TokenLogprob] | None) -> dict | None:
    """LogprobsSchema's source: the tokens' attributes as columns (None when logprobs were not asked for)."""
    if entries is None:
        return None
    entries = list(entries)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        # A token without a logprob (an echoed first token) has no alternatives either: null, as OpenAI sends.
        "top_logprobs": [dict(e.top) if e.top or e.logprob is not None else None for e in entries],
        "text_offset": [e.offset for e in entries],
    }


def _usage_source(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """UsageSchema's source."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_response(completion_id: str, created: int, model: str, choices: Sequence[ChoiceOut],
                        prompt_tokens: int, completion_tokens: int, with_logprobs: bool, cached_tokens: int = 0) -> dict:
    """A whole ``text_completion`` object with its usage; ``logprobs`` is null unless ``with_logprobs``."""
    return _COMPLETION.dump({
        "id": completion_id, "created": created, "model": model,
        "choices": [{"index": choice.index, "text": choice.text, "finish_reason": choice.finish_reason,
                     "logprobs": _logprob_columns(choice.logprobs if with_logprobs else None)}
                    for choice in choices],
        "usage": _usage_source(prompt_tokens, completion_tokens, cached_tokens),
    })


def stream_chunk(completion_id: str, created: int, model: str, index: int, text: str,
                 logprobs: Iterable[TokenLogprob] | None, finish_reason: str | None, chat_delta: bool = False) -> dict:
    """One streamed ``text_completion`` chunk for one choice (no ``usage`` key).

    With ``chat_delta`` the choice carries its text as ``delta.content`` too: Mistral's FIM API
    streams that shape, and Continue reads nothing else from ``/v1/fim/completions``.
    """
    choice = {"index": index, "text": text, "logprobs": _logprob_columns(logprobs), "finish_reason": finish_reason}
    if chat_delta:
        choice["delta"] = {"content": text}
    return _COMPLETION.dump({"id": completion_id, "created": created, "model": model, "choices": [choice]})


def usage_chunk(completion_id: str, created: int, model: str, prompt_tokens: int, completion_tokens: int,
                cached_tokens: int = 0) -> dict:
    """The final chunk of ``stream_options.include_usage``: no choices, only usage."""
    return _COMPLETION.dump({"id": completion_id, "created": created, "model": model, "choices": [],
                             "usage": _usage_source(prompt_tokens, completion_tokens, cached_tokens)})


def sse_event(payload: dict | str) -> str:
    """One server-sent event carrying a JSON payload (or a literal such as ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def error_envelope(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    """OpenAI's error body."""
    return _ERROR_ENVELOPE.dump({"error": {"message": message, "type": type_, "param": param, "code": code}})


def model_list(models: Iterable[ModelConfig], created: int) -> dict:
    """``GET /v1/models``: every served model, with its aliases."""
    return _MODEL_LIST.dump({"data": [
        {"id": model.name, "created": created, "aliases": model.aliases, "fill_in_the_middle": model.fim is not None}
        for model in models]})
