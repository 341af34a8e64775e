"""app.protocol without the server: requests load into the dataclasses, responses dump through their schemas."""
from __future__ import annotations

import dataclasses
import json

import pytest

from app.engine.params import SamplingParams, TokenLogprob
from app.errors import InvalidRequestError
from app.protocol import (
    ChoiceOut,
    CompletionRequest,
    CompletionRequestSchema,
    CompletionSchema,
    ErrorEnvelopeSchema,
    LogprobsSchema,
    ModelListSchema,
    UsageSchema,
    completion_response,
    error_envelope,
    model_list,
    parse_completion_request,
    stream_chunk,
    usage_chunk,
)
from config import FimTemplate, ModelConfig

WIRE_FIELDS = sorted(field.data_key or name for name, field in CompletionRequestSchema().fields.items())
LOGPROBS = (TokenLogprob("foo", -0.5, (("foo", -0.5), ("bar", -1.25)), 3), TokenLogprob("<s>", None, (), 0),
            TokenLogprob("x", -0.1, (), 6))


def parse(**body) -> CompletionRequest:
    """The request a body with these fields loads into."""
    return parse_completion_request(body)


def error_of(**body) -> tuple[str, str | None]:
    """The (message, param) a body is refused with."""
    with pytest.raises(InvalidRequestError) as caught:
        parse_completion_request(body)
    return caught.value.message, caught.value.param


def same_bytes(got: dict, expected: dict) -> bool:
    """Whether two bodies serialise identically: keys, key order and values."""
    return json.dumps(got, ensure_ascii=False) == json.dumps(expected, ensure_ascii=False)


# -- requests ------------------------------------------------------------------


def test_every_schema_attribute_is_a_dataclass_field():
    """post_load splits the loaded dict by the dataclasses' fields, so every attribute must be one of them."""
    names = {f.name for cls in (CompletionRequest, SamplingParams) for f in dataclasses.fields(cls)}
    # Folded into max_tokens, and into trim_by_indentation and context.
    attributes = set(CompletionRequestSchema().fields) - {"max_completion_tokens", "extra", "nwo"}
    assert attributes <= names
    assert "prompt" in WIRE_FIELDS and "extra" in WIRE_FIELDS and "stream_options" in WIRE_FIELDS


def test_defaults_are_the_dataclasses():
    """A body with only a prompt loads as the dataclasses' defaults."""
    assert parse(prompt="x") == CompletionRequest(prompts=("x",))
    assert parse(prompt="x").params == SamplingParams() and SamplingParams().max_tokens is None


@pytest.mark.parametrize("key", [key for key in WIRE_FIELDS if key != "prompt"])
def test_explicit_null_is_the_default(key):
    """``null`` for any field loads exactly as leaving the field out."""
    assert parse(prompt="x", **{key: None}) == parse(prompt="x")


def test_all_nulls_at_once_are_the_defaults():
    """Every optional field null at once is still the default request."""
    body = {key: None for key in WIRE_FIELDS}
    assert parse_completion_request({**body, "prompt": ["a", ""]}) == CompletionRequest(prompts=("a", ""))


def test_null_or_missing_prompt_is_refused_as_today():
    """A null prompt is as missing; it is reported only when every other field is valid."""
    expected = ("Invalid value for 'prompt': prompt is required (a string or an array of strings)", "prompt")
    assert error_of(prompt=None) == error_of() == expected
    assert error_of(prompt=None, n=0)[1] == "n"


def test_values_load_into_their_dataclass():
    """Wire values land in CompletionRequest or SamplingParams under the dataclasses' names."""
    request = parse(prompt=["a", "b"], model="m", suffix="s", max_tokens=7, temperature=0, top_p=0.5, n=2,
                    best_of=3, echo=True, logprobs=2, stop="\n", presence_penalty=1, frequency_penalty=-1,
                    logit_bias={"9": 1, "2": -100}, user="u", seed=5, stream_options={"include_usage": True})
    assert request == CompletionRequest(
        model="m", prompts=("a", "b"), suffix="s", n=2, best_of=3, echo=True, include_usage=True, user="u",
        params=SamplingParams(max_tokens=7, temperature=0.0, top_p=0.5, presence_penalty=1.0, frequency_penalty=-1.0,
                              logit_bias=((2, -100.0), (9, 1.0)), stop=("\n",), seed=5, logprobs=2))
    assert isinstance(request.params.temperature, float)


@pytest.mark.parametrize("body, expected", [
    ({"max_completion_tokens": 5}, 5),
    ({"max_tokens": 2, "max_completion_tokens": 5}, 2),
    ({"max_tokens": None, "max_completion_tokens": 5}, 5),
    ({"max_tokens": 0, "max_completion_tokens": 5}, 0),
    ({"max_tokens": 3, "max_completion_tokens": None}, 3),
    ({}, None),
])
def test_max_completion_tokens_is_the_fallback(body, expected):
    """OpenAI's newer name applies when max_tokens is absent or null; max_tokens wins otherwise."""
    assert parse(prompt="x", **body).params.max_tokens == expected


def test_bad_max_completion_tokens_is_named():
    """An invalid max_completion_tokens is reported under its own name, even beside a valid max_tokens."""
    message, param = error_of(prompt="x", max_tokens=2, max_completion_tokens=-1)
    assert param == "max_completion_tokens" and message.startswith("Invalid value for 'max_completion_tokens'")


@pytest.mark.parametrize("stop, expected", [
    ("", ()), ([""], ()), (["a", "", "b"], ("a", "b")), ("\n\n", ("\n\n",)), ([], ()),
])
def test_empty_stop_strings_are_dropped(stop, expected):
    """Empty stop strings would end every completion at once, so they are dropped."""
    assert parse(prompt="x", stop=stop).params.stop == expected


def test_stop_limit_counts_what_was_sent():
    """The 64-string limit counts the strings as sent, empty ones included."""
    assert len(parse(prompt="x", stop=[f"s{i}" for i in range(64)]).params.stop) == 64
    assert error_of(prompt="x", stop=["", *[f"s{i}" for i in range(64)]])[1] == "stop"


@pytest.mark.parametrize("options, wanted", [
    ({"include_usage": True}, True), ({"include_usage": False}, False), ({"include_usage": None}, False),
    ({}, False), ({"other": 1}, False),
])
def test_stream_options_load_as_include_usage(options, wanted):
    """Only a real include_usage true asks for the usage chunk."""
    assert parse(prompt="x", stream=True, stream_options=options).include_usage is wanted


@pytest.mark.parametrize("options, expected", [
    ({"include_usage": "yes"}, ("Invalid value for 'stream_options.include_usage': Not a valid boolean.",
                                "stream_options.include_usage")),
    (5, ("Invalid value for 'stream_options': Invalid input type.", "stream_options")),
])
def test_bad_stream_options_are_named_by_their_wire_path(options, expected):
    """Errors inside stream_options name the wire path, not the attribute it loads into."""
    assert error_of(prompt="x", stream_options=options) == expected


def test_best_of_checks_use_the_defaults():
    """best_of is checked against n's default and stream once nulls are dropped."""
    assert error_of(prompt="x", best_of=2, n=None, stream=True) == (
        "Invalid value for 'best_of': best_of greater than n cannot be used with stream", "best_of")
    assert error_of(prompt="x", n=3, best_of=2) == (
        "Invalid value for 'best_of': best_of (2) must be greater than or equal to n (3)", "best_of")
    assert parse(prompt="x", best_of=1, stream=True).best_of == 1


# -- responses -----------------------------------------------------------------


def test_whole_completion_is_the_old_body():
    """A whole completion has usage, and logprobs only when asked for (null otherwise)."""
    choices = [ChoiceOut(0, "a\u00e9", LOGPROBS, "stop"), ChoiceOut(3, "", (), None)]
    plain = completion_response("cmpl-1", 17, "tiny", choices, 5, 4, with_logprobs=False)
    assert same_bytes(plain, {
        "id": "cmpl-1", "object": "text_completion", "created": 17, "model": "tiny",
        "choices": [{"index": 0, "text": "a\u00e9", "logprobs": None, "finish_reason": "stop"},
                    {"index": 3, "text": "", "logprobs": None, "finish_reason": None}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9,
                  "prompt_tokens_details": {"cached_tokens": 0}}})
    with_logprobs = completion_response("cmpl-1", 17, "tiny", choices, 5, 4, with_logprobs=True)
    assert same_bytes(with_logprobs["choices"][0]["logprobs"], {
        "tokens": ["foo", "<s>", "x"], "token_logprobs": [-0.5, None, -0.1],
        "top_logprobs": [{"foo": -0.5, "bar": -1.25}, None, {}], "text_offset": [3, 0, 6]})
    assert with_logprobs["choices"][1]["logprobs"] == {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                       "text_offset": []}
    for body in (plain, with_logprobs):
        assert CompletionSchema().validate(body) == {}
        assert list(body) == list(CompletionSchema().fields)  # every documented key, in the documented order


@pytest.mark.parametrize("chat_delta", [False, True])
def test_stream_chunk_is_the_old_chunk(chat_delta):
    """A chunk has no usage key; its choice gains delta.content only for the FIM route's clients."""
    chunk = stream_chunk("cmpl-2", 18, "m", 3, "t\n", None, "stop", chat_delta=chat_delta)
    choice = {"index": 3, "text": "t\n", "logprobs": None, "finish_reason": "stop"}
    if chat_delta:
        choice["delta"] = {"content": "t\n"}
    assert same_bytes(chunk, {"id": "cmpl-2", "object": "text_completion", "created": 18, "model": "m",
                              "choices": [choice]})
    assert CompletionSchema().validate(chunk) == {}


def test_stream_chunk_logprobs_take_any_iterable():
    """Streamed logprobs may come as a generator; they dump like a whole completion's."""
    chunk = stream_chunk("c", 1, "m", 0, "x", iter(LOGPROBS), None)
    logprobs = chunk["choices"][0]["logprobs"]
    assert logprobs == stream_chunk("c", 1, "m", 0, "x", LOGPROBS, None)["choices"][0]["logprobs"]
    assert logprobs == {"tokens": ["foo", "<s>", "x"], "token_logprobs": [-0.5, None, -0.1],
                        "top_logprobs": [{"foo": -0.5, "bar": -1.25}, None, {}], "text_offset": [3, 0, 6]}
    assert LogprobsSchema().validate(logprobs) == {}
    assert stream_chunk("c", 1, "m", 0, "x", None, None)["choices"][0]["logprobs"] is None
    assert CompletionSchema().validate(chunk) == {}


def test_usage_chunk():
    """The include_usage chunk has no choices and the usage block; usage adds up the total."""
    chunk = usage_chunk("cmpl-3", 19, "m", 7, 2)
    assert same_bytes(chunk, {"id": "cmpl-3", "object": "text_completion", "created": 19, "model": "m",
                              "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9,
                                                       "prompt_tokens_details": {"cached_tokens": 0}}})
    assert CompletionSchema().validate(chunk) == {}
    usage = usage_chunk("c", 1, "m", 1, 2, cached_tokens=1)["usage"]
    assert UsageSchema().validate(usage) == {} and usage["total_tokens"] == 3
    assert usage["prompt_tokens_details"] == {"cached_tokens": 1}


@pytest.mark.parametrize("args, error", [
    (("bad", "invalid_request_error"), {"message": "bad", "type": "invalid_request_error", "param": None,
                                        "code": None}),
    (("bad", "invalid_request_error", "stop", "x"), {"message": "bad", "type": "invalid_request_error",
                                                     "param": "stop", "code": "x"}),
    (("slow", "rate_limit_error", None, 429), {"message": "slow", "type": "rate_limit_error", "param": None,
                                               "code": 429}),
])
def test_error_envelope_is_the_old_envelope(args, error):
    """Every key of the error object is always there, null when unset."""
    envelope = error_envelope(*args)
    assert same_bytes(envelope, {"error": error})
    assert ErrorEnvelopeSchema().validate(envelope) == {}


def test_model_list_is_the_old_list():
    """Each model with its constant object and owner, aliases as a list, and whether it fills in the middle."""
    fim = FimTemplate("<p>{prefix}<s>{suffix}<m>")
    models = [ModelConfig("a", "src"), ModelConfig("b", "s", aliases=("c", "d"), fim=fim)]
    body = model_list(models, 5)
    assert same_bytes(body, {"object": "list", "data": [
        {"id": "a", "object": "model", "created": 5, "owned_by": "fauxpilot-lite", "aliases": [],
         "fill_in_the_middle": False},
        {"id": "b", "object": "model", "created": 5, "owned_by": "fauxpilot-lite", "aliases": ["c", "d"],
         "fill_in_the_middle": True}]})
    assert ModelListSchema().validate(body) == {}
    assert model_list([], 5) == {"object": "list", "data": []}
