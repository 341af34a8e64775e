"""llama.cpp's ``/infill`` wire format, as the llama.vscode and llama.vim editor plugins use it.

A body loads into a frozen :class:`InfillRequest` (llama.cpp's field names and defaults),
which maps onto the :class:`~app.protocol.CompletionRequest` the serving layer runs:
``input_prefix + prompt`` before the cursor (llama.cpp appends ``prompt``, the cursor
line so far, to the prefix), ``input_suffix`` after it, ``input_extra`` as repository
context, ``n_cmpl`` as ``n``. Fields this server has no use for (``id_slot``,
``cache_prompt``, ``samplers``, ``t_max_prompt_ms``, ``lora``, ...) are ignored, as
llama.cpp ignores what it does not know.

Replies are llama.cpp's result objects, dumped through their schemas and written as
compact JSON: llama.vim only takes a reply that matches ``"content"\\s*:"``.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, pre_load, validate

from .engine.params import ContextChunk, PromptContext, SamplingParams
from .protocol import (MAX_N, MAX_STOP_STRINGS, CompletionRequest, _Number, _StopStrings, _StrictBoolean,
                       _StrictInteger, _Text, load_body)

# -- the request -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class InfillRequest:
    """A parsed ``/infill`` body; its defaults are llama.cpp's."""

    model: str | None = None  # a served model's name picks it; any other name is ignored, as llama.cpp does
    input_prefix: str = ""
    prompt: str = ""
    input_suffix: str = ""
    input_extra: tuple[ContextChunk, ...] = ()
    n_predict: int = -1  # -1: the model's default max_tokens
    n_indent: int = 0
    n_cmpl: int = 1
    t_max_predict_ms: int | None = None  # None: the server's time budget; 0 or less: none
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1  # -1: a random seed
    stop: tuple[str, ...] = ()
    stream: bool = False
    response_fields: tuple[str, ...] = ()  # when given, only these (slash-separated) paths, flattened

    def completion(self) -> CompletionRequest:
        """The completion this body asks for, as the serving layer runs it."""
        budget = None if self.t_max_predict_ms is None else max(self.t_max_predict_ms, 0)
        params = SamplingParams(
            max_tokens=None if self.n_predict < 0 else self.n_predict, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, stop=self.stop, seed=None if self.seed == -1 else self.seed,
            min_indent=self.n_indent, time_budget_ms=budget)
        context = PromptContext(self.input_extra) if self.input_extra else None
        return CompletionRequest(model=self.model, prompts=(self.input_prefix + self.prompt,), suffix=self.input_suffix,
                                 n=self.n_cmpl, stream=self.stream, params=params, context=context)


class _ExtraChunks(fields.Field):
    """``input_extra``: ``[{"filename": string, "text": string}, ...]`` (other keys, such as llama.vim's ``time``,
    ignored), loaded as context chunks."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, list):
            raise ValidationError('must be an array of {"filename": string, "text": string}')
        return tuple(self._chunk(item, number) for number, item in enumerate(value))

    @staticmethod
    def _chunk(item: Any, number: int) -> ContextChunk:
        """One chunk; a malformed one is named by its position."""
        if not isinstance(item, dict):
            raise ValidationError({number: ["must be an object"]})
        text, filename = item.get("text"), item.get("filename")
        if not isinstance(text, str):
            raise ValidationError({number: {"text": ["must be a string"]}})
        if filename is not None and not isinstance(filename, str):
            raise ValidationError({number: {"filename": ["must be a string"]}})
        for key, string in (("text", text), ("filename", filename or "")):
            try:
                string.encode("utf-8")
            except UnicodeEncodeError:
                raise ValidationError({number: {key: ["must be valid Unicode text"]}}) from None
        return ContextChunk(text, filename or None)


class InfillRequestSchema(Schema):
    """Validates a llama.cpp ``/infill`` body into an :class:`InfillRequest` (unknown fields ignored)."""

    class Meta:
        unknown = EXCLUDE

    model = _Text(allow_none=True)
    input_prefix = _Text(allow_none=True)
    prompt = _Text(allow_none=True)
    input_suffix = _Text(allow_none=True)
    input_extra = _ExtraChunks(allow_none=True)
    n_predict = _StrictInteger(allow_none=True, validate=validate.Range(min=-1))
    n_indent = _StrictInteger(allow_none=True, validate=validate.Range(min=0))
    n_cmpl = _StrictInteger(allow_none=True, validate=validate.Range(min=1, max=MAX_N))
    t_max_predict_ms = _StrictInteger(allow_none=True)
    temperature = _Number(allow_none=True, validate=validate.Range(min=0, max=2))
    top_k = _StrictInteger(allow_none=True, validate=validate.Range(min=0))
    top_p = _Number(allow_none=True, validate=validate.Range(min=0, max=1, min_inclusive=False))
    presence_penalty = _Number(allow_none=True, validate=validate.Range(min=-2, max=2))
    frequency_penalty = _Number(allow_none=True, validate=validate.Range(min=-2, max=2))
    seed = _StrictInteger(allow_none=True, validate=validate.Range(min=-1, max=2**63 - 1))
    stop = _StopStrings(max_items=MAX_STOP_STRINGS, allow_none=True)
    stream = _StrictBoolean(allow_none=True)
    response_fields = fields.List(_Text(), allow_none=True, validate=validate.Length(max=64))

    @pre_load
    def _drop_nulls(self, data, **kwargs):
        # llama.cpp reads a null field as its default.
        return {key: value for key, value in data.items() if value is not None}

    @post_load
    def _make_request(self, data, **kwargs) -> InfillRequest:
        if "response_fields" in data:
            data["response_fields"] = tuple(data["response_fields"])
        return InfillRequest(**data)


_REQUEST = InfillRequestSchema()


def parse_infill_request(body: Any) -> InfillRequest:
    """Validate a decoded ``/infill`` body; raise InvalidRequestError naming the offending field."""
    return load_body(_REQUEST, body)


# -- replies -----------------------------------------------------------------------


class TimingsSchema(Schema):
    """``timings``: the prompt's and the generation's token counts and times."""

    cache_n = fields.Integer(required=True, metadata={"description": "prompt tokens taken from the prefix cache"})
    prompt_n = fields.Integer(required=True, metadata={"description": "prompt tokens computed"})
    prompt_ms = fields.Float(required=True)
    prompt_per_token_ms = fields.Float(required=True)
    prompt_per_second = fields.Float(required=True)
    predicted_n = fields.Integer(required=True)
    predicted_ms = fields.Float(required=True)
    predicted_per_token_ms = fields.Float(required=True)
    predicted_per_second = fields.Float(required=True)


class GenerationSettingsSchema(Schema):
    """``generation_settings``: what the completion ran with (``n_ctx``: the model's window)."""

    n_ctx = fields.Integer(required=True)
    n_predict = fields.Integer(required=True)
    n_indent = fields.Integer(required=True)
    temperature = fields.Float(required=True)
    top_k = fields.Integer(required=True)
    top_p = fields.Float(required=True)
    seed = fields.Integer(required=True)
    stop = fields.List(fields.String(), required=True)
    t_max_predict_ms = fields.Integer(required=True)


class InfillResultSchema(Schema):
    """One completion's result: the whole reply (a list of them when ``n_cmpl`` > 1), or a stream's last event."""

    index = fields.Integer(required=True)
    content = fields.String(required=True, metadata={"description": "the text to insert (empty in a stream's "
                                                                    "last event: the chunks carried it)"})
    stop = fields.Boolean(required=True, validate=validate.Equal(True))
    model = fields.String(required=True)
    tokens_predicted = fields.Integer(required=True)
    tokens_evaluated = fields.Integer(required=True)
    generation_settings = fields.Nested(GenerationSettingsSchema, required=True)
    has_new_line = fields.Boolean(required=True)
    truncated = fields.Boolean(required=True, metadata={"description": "the prompt or its context was cut to fit"})
    tokens_cached = fields.Integer(required=True, metadata={
        "description": "prompt tokens taken from the prefix cache (usage.prompt_tokens_details.cached_tokens)"})
    timings = fields.Nested(TimingsSchema, required=True)


class InfillChunkSchema(Schema):
    """One streamed piece of a completion's text."""

    index = fields.Integer(required=True)
    content = fields.String(required=True)
    stop = fields.Boolean(required=True, validate=validate.Equal(False))


_RESULT = InfillResultSchema()
_CHUNK = InfillChunkSchema()


@dataclasses.dataclass(frozen=True)
class PromptFacts:
    """What every result of one ``/infill`` request reports about its prompt and run."""

    model: str
    n_ctx: int
    prompt_tokens: int
    cached_tokens: int
    truncated: bool
    prompt_ms: float
    predicted_ms: float
    max_tokens: int


@dataclasses.dataclass(frozen=True)
class InfillChoice:
    """One finished completion: its index, its text (empty in a stream) and its generated tokens."""

    index: int
    content: str
    predicted: int


def _rate(count: int, ms: float) -> tuple[float, float]:
    """(milliseconds per token, tokens per second), 0 where nothing was counted or timed."""
    return (ms / count if count else 0.0), (count * 1000 / ms if ms > 0 else 0.0)


def _timings(facts: PromptFacts, predicted: int) -> dict:
    """TimingsSchema's source."""
    prompt_n = facts.prompt_tokens - facts.cached_tokens
    prompt_per_token, prompt_per_second = _rate(prompt_n, facts.prompt_ms)
    predicted_per_token, predicted_per_second = _rate(predicted, facts.predicted_ms)
    return {"cache_n": facts.cached_tokens, "prompt_n": prompt_n, "prompt_ms": facts.prompt_ms,
            "prompt_per_token_ms": prompt_per_token, "prompt_per_second": prompt_per_second,
            "predicted_n": predicted, "predicted_ms": facts.predicted_ms,
            "predicted_per_token_ms": predicted_per_token, "predicted_per_second": predicted_per_second}


def infill_result(choice: InfillChoice, facts: PromptFacts, body: InfillRequest) -> dict:
    """One completion's result object, reduced to ``body.response_fields`` when it names any."""
    settings = {"n_ctx": facts.n_ctx, "n_predict": facts.max_tokens, "n_indent": body.n_indent,
                "temperature": body.temperature, "top_k": body.top_k, "top_p": body.top_p, "seed": body.seed,
                "stop": list(body.stop), "t_max_predict_ms": body.t_max_predict_ms or 0}
    result = _RESULT.dump({
        "index": choice.index, "content": choice.content, "stop": True, "model": facts.model,
        "tokens_predicted": choice.predicted, "tokens_evaluated": facts.prompt_tokens,
        "generation_settings": settings, "has_new_line": "\n" in choice.content, "truncated": facts.truncated,
        "tokens_cached": facts.cached_tokens, "timings": _timings(facts, choice.predicted)})
    return select_fields(result, body.response_fields) if body.response_fields else result


def select_fields(result: dict, paths: Sequence[str]) -> dict:
    """llama.cpp's ``response_fields``: each path (``timings/prompt_n``) that exists, as a flat key."""
    selected = {}
    for path in paths:
        value: Any = result
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            selected[path] = value
    return selected


def infill_chunk(index: int, content: str) -> dict:
    """A streamed piece of completion ``index``."""
    return _CHUNK.dump({"index": index, "content": content, "stop": False})


def compact_json(payload: Any) -> str:
    """JSON without spaces after separators, whatever the app's JSON settings (llama.vim matches ``"content":"``)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
