"""The OpenAPI document of the API, generated from the marshmallow schemas of app.protocol."""
from __future__ import annotations

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from .protocol import (
    MAX_STOP_STRINGS,
    CompletionRequestSchema,
    CompletionSchema,
    ErrorEnvelopeSchema,
    ModelListSchema,
    _LogitBias,
    _StringOrList,
)
from .llamacpp import InfillChunkSchema, InfillRequestSchema, InfillResultSchema, _ExtraChunks
from .ui.trace import DebugRequestSchema, TraceSchema
from .usage import UsageReportSchema

ERRORS = {
    "400": "Invalid request: malformed body, a field out of range (`param` names it), context or server limits",
    "401": "Missing or wrong API key (when keys are configured)",
    "404": "Unknown model or engine",
    "408": "The request body did not arrive within the server's read timeout",
    "413": "Request body too large (chunked bodies included)",
    "429": "Too many requests in progress on this worker; see Retry-After",
    "503": "Model unavailable, the request ran past the server's time limit, or the server is shutting down; "
           "see Retry-After",
}


def _custom_fields(converter, field, **kwargs) -> dict:
    """OpenAPI properties of the protocol's own field types."""
    if isinstance(field, _StringOrList):
        array = {"type": "array", "items": {"type": "string"}}
        if field.max_items is not None:
            array["maxItems"] = field.max_items
        if field.min_items:
            array["minItems"] = field.min_items
        return {"oneOf": [{"type": "string"}, array]}
    if isinstance(field, _ExtraChunks):
        return {"type": "array", "items": {"type": "object", "required": ["text"], "properties": {
            "text": {"type": "string"}, "filename": {"type": "string"}}}}
    if isinstance(field, _LogitBias):
        return {"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                "description": "token id (as a string) -> bias added to its logit"}
    return {}


def _json(schema: str) -> dict:
    return {"application/json": {"schema": schema}}


def _completion_operation(summary: str, parameters: list | None = None) -> dict:
    responses = {"200": {"description": "The completion, or with `stream` server-sent events of chunks "
                                        "(each a CompletionSchema) ending with `data: [DONE]`",
                         "content": {**_json("Completion"), "text/event-stream": {"schema": {"type": "string"}}}}}
    responses.update({code: {"description": text, "content": _json("ErrorEnvelope")} for code, text in ERRORS.items()})
    operation = {"summary": summary, "requestBody": {"required": True, "content": _json("CompletionRequest")},
                 "responses": responses}
    if parameters:
        operation["parameters"] = parameters
    return operation


def _infill_operation() -> dict:
    results = {"oneOf": [{"$ref": "#/components/schemas/InfillResult"},
                         {"type": "array", "items": {"$ref": "#/components/schemas/InfillResult"}}]}
    responses = {"200": {"description": "The result (a list of them with `n_cmpl` > 1; with `response_fields` only "
                                        "those paths, as flat keys), or with `stream` server-sent events: "
                                        "InfillChunk pieces, then each result; no `[DONE]`",
                         "content": {"application/json": {"schema": results},
                                     "text/event-stream": {"schema": {"type": "string"}}}}}
    responses.update({code: {"description": text, "content": _json("ErrorEnvelope")} for code, text in ERRORS.items()
                      if code != "404"})
    return {"summary": "llama.cpp's fill-in-the-middle (llama.vscode, llama.vim): input_prefix + prompt before the "
                       "cursor, input_suffix after it, input_extra as repository context; unknown fields ignored",
            "requestBody": {"required": True, "content": _json("InfillRequest")}, "responses": responses}


def _debug_operation() -> dict:
    responses = {"200": {"description": "The trace, or with `stream` server-sent events: `{\"delta\": {index, text}}` "
                                        "as the completion comes, then `{\"trace\": Trace}` (an error envelope in "
                                        "their place when it fails after the first event)",
                         "content": {**_json("Trace"), "text/event-stream": {"schema": {"type": "string"}}}}}
    responses.update({code: {"description": text, "content": _json("ErrorEnvelope")} for code, text in ERRORS.items()})
    return {"summary": "The debug page's API: run one client request as its route would (`client` picks the body's "
                       "shape) and return what the server did: the model prompt's tokens (special ones flagged, "
                       "scored), FIM layout, truncation, healing, every generated token with its logprob and top "
                       "alternatives, the stop rule and place, the reused prefix and the timings. Not counted in "
                       "the usage reports",
            "requestBody": {"required": True, "content": _json("DebugRequest")}, "responses": responses}


def _usage_operation() -> dict:
    days = [{"name": "days", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 400, "default": 30},
             "description": "the period: this many days up to today (UTC)"}]
    return {"summary": "Usage reports: requests, completions shown and accepted (inferred), tokens and latency "
                       "percentiles per day, key, model and language",
            "parameters": days, "responses": {
                "200": {"description": "the figures", "content": _json("UsageReport")},
                "400": {"description": "`days` out of range", "content": _json("ErrorEnvelope")},
                "401": {"description": ERRORS["401"], "content": _json("ErrorEnvelope")},
                "404": {"description": "usage reports are off (`usage_reports = false`)",
                        "content": _json("ErrorEnvelope")}}}


def openapi_document(version: str = "1") -> dict:
    """The API as an OpenAPI 3 document."""
    plugin = MarshmallowPlugin()
    spec = APISpec(title="FauxPilot Lite", version=version, openapi_version="3.0.3", plugins=[plugin],
                   info={"description": "OpenAI / Copilot completions served from a Hugging Face model. "
                                        f"`stop` takes at most {MAX_STOP_STRINGS} strings."})
    plugin.converter.add_attribute_function(_custom_fields)
    spec.components.schema("CompletionRequest", schema=CompletionRequestSchema)
    spec.components.schema("Completion", schema=CompletionSchema)
    spec.components.schema("ErrorEnvelope", schema=ErrorEnvelopeSchema)
    spec.components.schema("ModelList", schema=ModelListSchema)
    spec.components.schema("InfillRequest", schema=InfillRequestSchema)
    spec.components.schema("InfillResult", schema=InfillResultSchema)
    spec.components.schema("InfillChunk", schema=InfillChunkSchema)
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    engine = [{"name": "engine", "in": "path", "required": True, "schema": {"type": "string"},
               "description": "a served model's name or alias (FauxPilot clients use e.g. `codegen`)"}]
    spec.path("/v1/completions", operations={"post": _completion_operation("Complete a prompt")})
    spec.path("/v1/engines/{engine}/completions",
              operations={"post": _completion_operation("Complete a prompt with the named engine", engine)})
    spec.path("/v1/fim/completions", operations={"post": _completion_operation(
        "Fill in the middle between prompt and suffix (Mistral's FIM route; stream chunks add delta.content)")})
    spec.path("/infill", operations={"post": _infill_operation()})
    spec.path("/v1/models", operations={"get": {"summary": "The served models and their aliases", "responses": {
        "200": {"description": "model list", "content": _json("ModelList")}}}})
    for path, summary in (("/health", "Liveness"), ("/ready", "Readiness: every model loaded in this worker")):
        spec.path(path, operations={"get": {"summary": summary, "security": [], "responses": {
            "200": {"description": "yes"}, **({"503": {"description": "still loading"}} if path == "/ready" else {})}}})
    spec.components.schema("DebugRequest", schema=DebugRequestSchema)
    spec.components.schema("Trace", schema=TraceSchema)
    spec.components.schema("UsageReport", schema=UsageReportSchema)
    spec.path("/ui/api/complete", operations={"post": _debug_operation()})
    spec.path("/ui/api/usage", operations={"get": _usage_operation()})
    spec.path("/metrics", operations={"get": {"summary": "Prometheus metrics", "responses": {
        "200": {"description": "text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}})
    document = spec.to_dict()
    document["security"] = [{"bearer": []}, {}]  # a key only when the server has keys
    return document
