"""The debug API's wire format: what the debug page sends (a client's body and its shape) and the facts of a
finished completion it gets back (the model prompt's tokens, every generated token, stop decisions, timings).

The facts are read from the engine's :class:`~app.engine.request.Request` objects after they ran; nothing
here runs the model except scoring the prompt's own tokens when asked.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from marshmallow import EXCLUDE, Schema, fields, validate

from ..engine import Engine, Request
from ..engine.params import TokenLogprob
from ..engine.prepare import TRACE_ALTERNATIVES
from ..engine.stopping import STOP_RULES
from ..llamacpp import parse_infill_request
from ..protocol import CompletionRequest, load_body, parse_completion_request

# The request shapes of the clients an editor runs: the route each posts to and how its body reads.
CLIENTS = {
    "openai": "/v1/completions",  # OpenAI SDKs, Continue, curl: the body's model picks the model
    "copilot": "/v1/engines/{engine}/completions",  # Copilot clients: the engine in the path picks it
    "fauxpilot": "/v1/engines/{engine}/completions",  # the FauxPilot VS Code plugin (the seed's body)
    "infill": "/infill",  # llama.vscode, llama.vim: llama.cpp's body (input_prefix, input_suffix, ...)
}


class DebugRequestSchema(Schema):
    """``POST /ui/api/complete``: one editor request to run with its trace."""

    class Meta:
        unknown = EXCLUDE

    client = fields.String(load_default="openai", validate=validate.OneOf(list(CLIENTS)), metadata={
        "description": "the client whose request this is: how `body` is read and which route it names"})
    engine = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=200), metadata={
        "description": "copilot and fauxpilot: the engine of their route `/v1/engines/{engine}/completions`"})
    body = fields.Dict(required=True, metadata={"description": "the body the client would send to its route"})
    stream = fields.Boolean(load_default=False, metadata={
        "description": "server-sent events: each delta as `{\"delta\": {index, text}}`, then `{\"trace\": ...}`"})
    prompt_logprobs = fields.Boolean(load_default=True, metadata={
        "description": "also score the prompt's own tokens (one more pass over the prompt)"})


@dataclasses.dataclass(frozen=True)
class DebugRequest:
    """A parsed debug request: the client's shape, the completion it asks for, and the engine name it names."""

    client: str
    completion: CompletionRequest
    model: str | None  # the model or engine name the route or body names (None: the default model)
    infill: bool  # llama.cpp's /infill, where an unknown model falls back to the default
    stream: bool
    prompt_logprobs: bool


_DEBUG_REQUEST = DebugRequestSchema()


def parse_debug_request(raw: Any) -> DebugRequest:
    """Validate a debug request and the client body inside it (errors name the field, as the real routes do)."""
    debug = load_body(_DEBUG_REQUEST, raw)
    client, body = debug["client"], debug["body"]
    if client == "infill":
        infill = parse_infill_request(body)
        return DebugRequest(client, infill.completion(), infill.model, True, debug["stream"],
                            debug["prompt_logprobs"])
    completion = parse_completion_request(body)
    model = debug["engine"] if CLIENTS[client].startswith("/v1/engines") else completion.model
    return DebugRequest(client, completion, model, False, debug["stream"], debug["prompt_logprobs"])


# -- the facts ------------------------------------------------------------------------------


class AlternativeSchema(Schema):
    """One of a token's most likely alternatives."""

    text = fields.String(required=True)
    logprob = fields.Float(required=True)


class PromptTokenSchema(Schema):
    """One token of the model prompt, as the model saw it."""

    id = fields.Integer(required=True)
    text = fields.String(required=True)
    special = fields.Boolean(required=True, metadata={"description": "a special token (FIM markers, BOS, ...)"})
    logprob = fields.Float(allow_none=True, required=True, metadata={
        "description": "the model's log-probability of it after the tokens before (null: the first token, an "
                       "encoder's input, or prompt_logprobs off)"})
    top = fields.List(fields.Nested(AlternativeSchema), required=True)


class CompletionTokenSchema(Schema):
    """One generated token of a choice (the end-of-sequence token is named in `stop` instead)."""

    text = fields.String(required=True)
    logprob = fields.Float(required=True, metadata={"description": "under the model's own distribution"})
    top = fields.List(fields.Nested(AlternativeSchema), required=True)
    offset = fields.Integer(required=True, metadata={"description": "where its text starts, from the prompt's start"})
    healed = fields.Boolean(required=True, metadata={
        "description": "the first token, chosen among those that begin with the healed prompt text"})


class StopSchema(Schema):
    """Which rule ended a choice, and where."""

    rule = fields.String(allow_none=True, required=True, validate=validate.OneOf(STOP_RULES), metadata={
        "description": "null while it had not ended (the client went away)"})
    detail = fields.String(allow_none=True, required=True, metadata={
        "description": "the stop string, the end-of-sequence token, the max_tokens or time budget that fired"})
    after_tokens = fields.Integer(required=True, metadata={"description": "tokens generated when it ended"})
    cut_at = fields.Integer(allow_none=True, required=True, metadata={
        "description": "where the text was cut (a stop string or a dedent), in characters of the completion"})


class ChoiceTraceSchema(Schema):
    """One returned choice."""

    index = fields.Integer(required=True)
    text = fields.String(required=True)
    finish_reason = fields.String(allow_none=True, required=True)
    stop = fields.Nested(StopSchema, required=True)
    tokens = fields.List(fields.Nested(CompletionTokenSchema), required=True)


class TruncationSchema(Schema):
    """What was cut for the prompt to fit the model's window."""

    prefix_tokens = fields.Integer(required=True, metadata={"description": "cut from the prompt's start"})
    suffix_tokens = fields.Integer(required=True, metadata={"description": "cut from the suffix's end"})
    context_chunks_left_out = fields.Integer(required=True)


class HealingSchema(Schema):
    """Token healing: the prompt's last token removed and chosen again by the model."""

    text = fields.String(required=True)
    candidates = fields.Integer(required=True)


class TraceTimingsSchema(Schema):
    """The request's way through the engine, in milliseconds (null: never happened, e.g. nothing generated)."""

    queued_ms = fields.Float(allow_none=True, required=True)
    prefill_ms = fields.Float(allow_none=True, required=True)
    first_token_ms = fields.Float(allow_none=True, required=True)
    total_ms = fields.Float(required=True)
    tokens_per_second = fields.Float(allow_none=True, required=True)


class PromptTraceSchema(Schema):
    """One prompt's run."""

    fim = fields.Boolean(required=True, metadata={"description": "the model's fill-in-the-middle template was used"})
    fim_template = fields.String(allow_none=True, required=True)
    tokens = fields.List(fields.Nested(PromptTokenSchema), required=True)
    truncation = fields.Nested(TruncationSchema, required=True)
    healing = fields.Nested(HealingSchema, allow_none=True, required=True)
    reused_tokens = fields.Integer(required=True, metadata={"description": "prompt tokens from the prefix cache"})
    timings = fields.Nested(TraceTimingsSchema, required=True)
    choices = fields.List(fields.Nested(ChoiceTraceSchema), required=True)


class TraceSchema(Schema):
    """The facts of one debug request."""

    id = fields.String(required=True)
    model = fields.String(required=True)
    client = fields.String(required=True)
    route = fields.String(required=True, metadata={"description": "the route this client posts this body to"})
    context_length = fields.Integer(required=True)
    prompts = fields.List(fields.Nested(PromptTraceSchema), required=True)


_TRACE = TraceSchema()


def _alternatives(top) -> list[dict]:
    return [{"text": text, "logprob": logprob} for text, logprob in top]


def prompt_tokens(engine: Engine, request: Request, with_logprobs: bool) -> list[dict]:
    """The model prompt's tokens, special ones flagged, with their logprobs when asked (scored on the model)."""
    special = set(engine.tokenizer.all_special_ids)
    ids = list(request.prompt_ids)
    scored: list[TokenLogprob | None] = [None] * len(ids)
    if with_logprobs and ids:
        scored = engine.score_prompt(request, TRACE_ALTERNATIVES) or scored
    text = engine.preparer.token_text
    return [{"id": token, "text": text(token), "special": token in special,
             "logprob": entry.logprob if entry else None, "top": _alternatives(entry.top) if entry else []}
            for token, entry in zip(ids, scored)]


def _choice(engine: Engine, request: Request, seq) -> dict:
    decision = seq.stopped_by
    detail = decision.detail if decision else None
    if decision is not None and decision.rule == "eos_token":
        detail = engine.preparer.token_text(int(detail))
    return {
        "index": seq.index, "text": seq.text, "finish_reason": seq.finish_reason,
        "stop": {"rule": decision.rule if decision else None, "detail": detail, "after_tokens": seq.generated,
                 "cut_at": decision.cut if decision else None},
        "tokens": [{"text": entry.token, "logprob": entry.logprob, "top": _alternatives(entry.top),
                    "offset": entry.offset, "healed": number == 0 and request.healing is not None}
                   for number, entry in enumerate(seq.logprobs)],
    }


def prompt_trace(engine: Engine, request: Request, with_logprobs: bool) -> dict:
    """Everything one finished request knows about itself."""
    timings = request.timings.breakdown(sum(seq.generated for seq in request.sequences), len(request.sequences))
    healing = request.healing
    return {
        "fim": request.used_fim,
        "fim_template": engine.config.fim.template if request.used_fim and engine.config.fim else None,
        "tokens": prompt_tokens(engine, request, with_logprobs),
        "truncation": {"prefix_tokens": request.truncation.prefix_tokens,
                       "suffix_tokens": request.truncation.suffix_tokens,
                       "context_chunks_left_out": request.context_left_out},
        "healing": {"text": healing.text, "candidates": len(healing.allowed)} if healing else None,
        "reused_tokens": request.reused,
        "timings": dataclasses.asdict(timings),
        "choices": [_choice(engine, request, seq) for seq in request.returned()],
    }


def trace(run_id: str, engine: Engine, debug: DebugRequest, requests: list[Request]) -> dict:
    """The debug API's answer: the facts of every prompt's run."""
    route = CLIENTS[debug.client].replace("{engine}", debug.model or engine.name)
    return _TRACE.dump({"id": run_id, "model": engine.name, "client": debug.client, "route": route,
                        "context_length": engine.preparer.context_length,
                        "prompts": [prompt_trace(engine, request, debug.prompt_logprobs) for request in requests]})
