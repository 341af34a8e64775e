"""The HTTP API through Flask's test client: routes, every request field, errors, auth, faults, back-pressure."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from app.engine.anchor import anchor_offsets

PROMPT = "def fibonacci(n):\n"
OTHER_PROMPT = "hello"
SERVED_NAMES = ("tiny", "codegen", "copilot-codex", "tiny-fim")

# What copilot-language-server 1.539.0 sends (../shared/copilot-requests.md).
COPILOT_BODY = json.loads((Path(__file__).parent / "data" / "copilot-request.json").read_text())
COPILOT_HEADERS = {
    "Authorization": "Bearer tid=0123456789abcdef;exp=1795526136;sku=free_limited_copilot;proxy-ep=proxy.local",
    "Openai-Organization": "github-copilot",
    "OpenAI-Intent": "copilot-ghost",
    "X-Request-Id": "8a3c1f0e-5b7d-4c2a-9e61-0d4f2b8c7a15",
    "X-Copilot-Async": "true",
    "X-Copilot-Speculative": "false",
    "X-GitHub-Api-Version": "2026-01-09",
    "VScode-SessionId": "session-1",
    "VScode-MachineId": "machine-1",
    "Editor-Version": "vscode/1.99.0",
    "Editor-Plugin-Version": "copilot/1.539.0",
    "Copilot-Language-Server-Version": "1.539.0",
    "User-Agent": "GithubCopilot/1.539.0",
    "Accept": "*/*",
    "Accept-Encoding": "gzip, deflate",
}


# -- helpers -------------------------------------------------------------------


def post(client, body, path="/v1/completions", **kwargs):
    """POST a JSON body."""
    return client.post(path, json=body, **kwargs)


def ok(client, body, path="/v1/completions", **kwargs) -> dict:
    """POST and return the JSON of a 200 reply."""
    response = post(client, body, path, **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    return response.get_json()


def greedy(client, prompt=PROMPT, **fields) -> dict:
    """A temperature-0 completion."""
    return ok(client, {"prompt": prompt, "temperature": 0, **fields})


def assert_envelope(response, status: int, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    """Check an OpenAI error envelope and return its ``error`` object."""
    text = response.get_data(as_text=True)
    assert response.status_code == status, text
    assert response.mimetype == "application/json", text
    body = response.get_json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == type_
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in text
    return error


def sse_payloads(response) -> list[str]:
    """The data of every server-sent event, checking the framing: ``data: <x>`` then a blank line.

    The response is closed afterwards, as a WSGI server does (that releases the worker's admission ticket).
    """
    try:
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.mimetype == "text/event-stream"
        raw = response.get_data(as_text=True)
    finally:
        response.close()
    assert raw.endswith("\n\n"), raw[-200:]
    events = raw[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
    payloads = [event[len("data: "):] for event in events]
    assert payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1]
    return payloads[:-1]


def sse_chunks(response) -> list[dict]:
    """The JSON chunks of an event stream (everything before ``[DONE]``)."""
    return [json.loads(payload) for payload in sse_payloads(response)]


def joined(chunks: list[dict]) -> dict[int, str]:
    """Each choice's streamed text, concatenated."""
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


def pick_stops(text: str, count: int = 1) -> list[str]:
    """Two-character ASCII stop strings taken from inside ``text`` (not at its start)."""
    stops = []
    for i in range(2, len(text) - 1):
        candidate = text[i:i + 2]
        if candidate.isascii() and candidate.isalnum() and candidate not in stops:
            stops.append(candidate)
            if len(stops) == count:
                return stops
    pytest.fail(f"no stop candidates in {text!r}")


def token_id(engine, text: str) -> int:
    """The id of a text that is exactly one token."""
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, ids
    return ids[0]


# -- service routes ------------------------------------------------------------


def test_health(client):
    """GET /health answers ok and names the served models."""
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "models": ["tiny", "tiny-fim"]}


@pytest.mark.parametrize("path", ["/v1/models", "/models"])
def test_model_list(client, path):
    """GET /v1/models and /models list both models with their aliases."""
    response = client.get(path)
    assert response.status_code == 200
    body = response.get_json()
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    assert list(models) == ["tiny", "tiny-fim"]
    assert models["tiny"]["aliases"] == ["codegen", "copilot-codex"]
    assert models["tiny-fim"]["aliases"] == []
    assert models["tiny"]["fill_in_the_middle"] is False
    assert models["tiny-fim"]["fill_in_the_middle"] is True
    for model in models.values():
        assert model["object"] == "model"
        assert isinstance(model["created"], int)


def test_copilot_model_probe(client):
    """Copilot's GET /models with its Bearer token and editor headers gets a model list."""
    response = client.get("/models", headers=COPILOT_HEADERS)
    assert response.status_code == 200
    assert [m["id"] for m in response.get_json()["data"]] == ["tiny", "tiny-fim"]


# -- routes and model selection ------------------------------------------------


def test_response_shape(client):
    """A completion is a text_completion object with choices and consistent usage."""
    body = ok(client, {"prompt": PROMPT, "max_tokens": 5})
    assert list(body) == ["id", "object", "created", "model", "choices", "usage"]
    assert body["object"] == "text_completion"
    assert isinstance(body["id"], str) and body["id"].startswith("cmpl-") and len(body["id"]) > 5
    assert isinstance(body["created"], int) and not isinstance(body["created"], bool)
    assert body["model"] == "tiny"
    [choice] = body["choices"]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    assert choice["index"] == 0
    assert isinstance(choice["text"], str)
    assert choice["logprobs"] is None
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_prompt_tokens_counted(client, engines):
    """usage.prompt_tokens is the prompt's token count."""
    body = greedy(client, max_tokens=1)
    assert body["usage"]["prompt_tokens"] == len(engines["tiny"].tokenizer(PROMPT)["input_ids"])


def test_request_id_round_trip(client):
    """X-Request-Id comes back as a header and in the completion id."""
    response = post(client, {"prompt": PROMPT, "max_tokens": 1}, headers={"X-Request-Id": "req-42"})
    assert response.status_code == 200
    assert response.headers["X-Request-Id"] == "req-42"
    assert response.get_json()["id"] == "cmpl-req-42"


def test_ids_differ_without_request_id(client):
    """Without X-Request-Id each completion gets its own id."""
    first = ok(client, {"prompt": PROMPT, "max_tokens": 1})["id"]
    second = ok(client, {"prompt": PROMPT, "max_tokens": 1})["id"]
    assert first != second


@pytest.mark.parametrize("path", [
    "/v1/engines/tiny/completions",
    "/v1/engines/codegen/completions",
    "/v1/engines/copilot-codex/completions",
    "/v1/engines/codegen/completion",
])
def test_engine_routes(client, path):
    """/v1/engines/<name or alias>/completions serves the plain model, same text as /v1/completions."""
    expected = greedy(client, max_tokens=6)["choices"][0]["text"]
    body = ok(client, {"prompt": PROMPT, "temperature": 0, "max_tokens": 6}, path)
    assert body["model"] == "tiny"
    assert body["choices"][0]["text"] == expected


def test_engine_route_fim_model(client):
    """/v1/engines/tiny-fim/completions serves the FIM model."""
    body = ok(client, {"prompt": PROMPT, "max_tokens": 2}, "/v1/engines/tiny-fim/completions")
    assert body["model"] == "tiny-fim"


@pytest.mark.parametrize("model, served", [("tiny", "tiny"), ("tiny-fim", "tiny-fim"), ("codegen", "tiny"),
                                           ("copilot-codex", "tiny")])
def test_body_model_selects_model(client, model, served):
    """The body's model (name or alias) picks the model on /v1/completions."""
    assert ok(client, {"prompt": PROMPT, "model": model, "max_tokens": 2})["model"] == served


def test_engine_in_path_wins_over_body_model(client):
    """On /v1/engines/<engine>/completions the path names the model, not the body."""
    body = ok(client, {"prompt": PROMPT, "model": "tiny", "max_tokens": 2}, "/v1/engines/tiny-fim/completions")
    assert body["model"] == "tiny-fim"


def test_no_model_means_default(client):
    """Without a model the first configured model ("tiny") answers."""
    assert ok(client, {"prompt": PROMPT, "max_tokens": 2})["model"] == "tiny"


@pytest.mark.parametrize("path, body", [
    ("/v1/engines/nope/completions", {"prompt": PROMPT}),
    ("/v1/completions", {"prompt": PROMPT, "model": "nope"}),
])
def test_unknown_model_404(client, path, body):
    """An unknown engine or model is a 404 envelope whose message lists the served names."""
    error = assert_envelope(post(client, body, path), 404, param="model", code="model_not_found")
    assert "nope" in error["message"]
    for name in SERVED_NAMES:
        assert name in error["message"]


# -- every request field -------------------------------------------------------


def test_prompt_list_indexes_choices(client):
    """A prompt list gives n choices per prompt, indexed prompt_index * n + i, each its prompt's text."""
    first = greedy(client, OTHER_PROMPT, max_tokens=6)
    second = greedy(client, PROMPT, max_tokens=6)
    body = greedy(client, [OTHER_PROMPT, PROMPT], n=2, max_tokens=6)
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"] for c in choices] == [first["choices"][0]["text"]] * 2 + [second["choices"][0]["text"]] * 2
    usage = body["usage"]
    assert usage["prompt_tokens"] == first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == 2 * (first["usage"]["completion_tokens"]
                                              + second["usage"]["completion_tokens"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_single_item_prompt_list_is_the_string(client):
    """A one-item prompt list completes like the plain string."""
    assert greedy(client, [PROMPT], max_tokens=6)["choices"] == greedy(client, PROMPT, max_tokens=6)["choices"]


def test_suffix_ignored_by_plain_model(client):
    """The plain model ignores a suffix (no error, same text, same prompt tokens)."""
    plain = greedy(client, max_tokens=8)
    with_suffix = greedy(client, max_tokens=8, suffix="print(fibonacci(10))\n")
    assert with_suffix["choices"][0]["text"] == plain["choices"][0]["text"]
    assert with_suffix["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


def test_suffix_used_by_fim_model(client):
    """The FIM model builds a fill-in-the-middle prompt from the suffix."""
    plain = greedy(client, model="tiny-fim", max_tokens=12)
    fim = greedy(client, model="tiny-fim", max_tokens=12, suffix="print(fibonacci(10))\n")
    assert fim["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    assert fim["choices"][0]["text"] != plain["choices"][0]["text"]


def test_empty_suffix_on_fim_model_is_plain(client):
    """An empty suffix on the FIM model completes the plain prompt."""
    plain = greedy(client, model="tiny-fim", max_tokens=8)
    empty = greedy(client, model="tiny-fim", max_tokens=8, suffix="")
    assert empty["choices"] == plain["choices"]
    assert empty["usage"] == plain["usage"]


def test_max_tokens_reached_is_length(client):
    """max_tokens bounds completion_tokens; hitting it finishes with "length"."""
    body = greedy(client, max_tokens=5)
    [choice] = body["choices"]
    assert body["usage"]["completion_tokens"] <= 5
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_max_tokens_zero(client):
    """max_tokens 0 gives an empty text, no completion tokens, finish "length"."""
    body = greedy(client, max_tokens=0)
    assert body["choices"][0]["text"] == ""
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0


def test_default_max_tokens(client, tiny_settings):
    """Without max_tokens the model's default (16) applies."""
    body = greedy(client)
    assert tiny_settings.models[0].max_tokens == 16
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "length"


def test_max_completion_tokens_is_max_tokens(client):
    """OpenAI's newer name works alone; max_tokens wins when both are given."""
    assert greedy(client, max_completion_tokens=3)["usage"]["completion_tokens"] == 3
    assert greedy(client, max_tokens=2, max_completion_tokens=5)["usage"]["completion_tokens"] == 2
    assert_envelope(post(client, {"prompt": PROMPT, "max_completion_tokens": -1}), 400,
                    param="max_completion_tokens")


def test_longer_max_tokens_extends_text(client):
    """A larger max_tokens continues the same greedy text."""
    short = greedy(client, max_tokens=4)["choices"][0]["text"]
    longer = greedy(client, max_tokens=12)["choices"][0]["text"]
    assert longer.startswith(short) and len(longer) > len(short)


def test_temperature_zero_is_deterministic(client):
    """Temperature 0 gives the same text every time and in every choice."""
    first = greedy(client, max_tokens=10)["choices"][0]["text"]
    assert greedy(client, max_tokens=10)["choices"][0]["text"] == first
    body = greedy(client, max_tokens=10, n=3)
    assert [c["text"] for c in body["choices"]] == [first] * 3


def test_temperature_upper_bound_accepted(client):
    """Temperature 2 (the maximum) is accepted."""
    assert ok(client, {"prompt": PROMPT, "temperature": 2, "max_tokens": 3})["choices"]


def test_tiny_top_p_is_greedy(client):
    """At temperature 1 a tiny top_p keeps only the most likely token: the greedy text."""
    expected = greedy(client, max_tokens=10)["choices"][0]["text"]
    for _ in range(2):
        body = ok(client, {"prompt": PROMPT, "temperature": 1, "top_p": 1e-9, "max_tokens": 10})
        assert body["choices"][0]["text"] == expected


def test_n_choices(client):
    """n gives n choices indexed 0..n-1; usage counts all of them."""
    body = ok(client, {"prompt": PROMPT, "n": 3, "max_tokens": 4, "temperature": 1})
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] in {"stop", "length"} for c in body["choices"])
    assert body["usage"]["completion_tokens"] <= 12
    if all(c["finish_reason"] == "length" for c in body["choices"]):
        assert body["usage"]["completion_tokens"] == 12


def test_logprobs(client):
    """logprobs gives tokens, token_logprobs, top_logprobs (at most k each) and text_offset in step."""
    body = greedy(client, max_tokens=6, logprobs=3)
    [choice] = body["choices"]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    count = body["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == count
    assert all(isinstance(t, str) for t in lp["tokens"])
    for logprob, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert isinstance(logprob, float) and logprob <= 0
        assert isinstance(top, dict) and 1 <= len(top) <= 3
        assert all(v <= 0 for v in top.values())
        # Greedy picks the most likely token, so its logprob is the best of the top ones.
        assert logprob == pytest.approx(max(top.values()), abs=1e-4)
    offsets = lp["text_offset"]
    assert offsets[0] == len(PROMPT)
    assert offsets == sorted(offsets)
    assert all(len(PROMPT) <= o <= len(PROMPT) + len(choice["text"]) for o in offsets)


def test_logprobs_sampled(client):
    """Sampled logprobs lists stay in step; each top dict has at most k entries."""
    body = ok(client, {"prompt": PROMPT, "max_tokens": 6, "logprobs": 2, "n": 2, "temperature": 1})
    for choice in body["choices"]:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) > 0
        assert all(isinstance(top, dict) and 1 <= len(top) <= 2 for top in lp["top_logprobs"])


def test_logprobs_zero(client):
    """logprobs 0 gives the chosen tokens' logprobs with empty top dicts."""
    lp = greedy(client, max_tokens=3, logprobs=0)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3
    assert all(isinstance(v, float) for v in lp["token_logprobs"])
    assert lp["top_logprobs"] == [{}, {}, {}]


def test_no_logprobs_is_null(client):
    """Without logprobs every choice's logprobs is null."""
    body = greedy(client, max_tokens=3, n=2)
    assert [c["logprobs"] for c in body["choices"]] == [None, None]


def test_echo(client):
    """echo puts the prompt in front of the completion (token healing is off for both, as with logprobs)."""
    unhealed = greedy(client, max_tokens=6, logprobs=0)
    echoed = greedy(client, max_tokens=6, echo=True)
    assert echoed["choices"][0]["text"] == PROMPT + unhealed["choices"][0]["text"]
    assert echoed["usage"] == unhealed["usage"]


def test_echo_with_logprobs(client):
    """echo with logprobs covers the prompt tokens too; the first has no logprob."""
    body = greedy(client, max_tokens=4, echo=True, logprobs=2)
    [choice] = body["choices"]
    assert choice["text"].startswith(PROMPT)
    lp = choice["logprobs"]
    total = body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == total
    assert lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None
    assert lp["text_offset"][0] == 0
    assert all(isinstance(v, float) for v in lp["token_logprobs"][1:])
    assert all(isinstance(t, dict) and len(t) <= 2 for t in lp["top_logprobs"][1:])
    assert "".join(lp["tokens"][:body["usage"]["prompt_tokens"]]) == PROMPT


def test_echo_max_tokens_zero(client):
    """echo with max_tokens 0 returns exactly the prompt."""
    body = greedy(client, max_tokens=0, echo=True)
    assert body["choices"][0]["text"] == PROMPT
    assert body["choices"][0]["finish_reason"] == "length"


def test_echo_stop_in_prompt_does_not_cut(client):
    """A stop string that occurs in the echoed prompt does not cut the reply."""
    plain = greedy(client, max_tokens=6, logprobs=0)["choices"][0]["text"]
    body = greedy(client, max_tokens=6, echo=True, stop="fib")
    assert "fib" not in plain
    assert body["choices"][0]["text"] == PROMPT + plain


def test_stop_string(client):
    """A stop string from the greedy text cuts the reply before it, finish "stop"."""
    full = greedy(client, max_tokens=16)["choices"][0]["text"]
    [stop] = pick_stops(full)
    body = greedy(client, max_tokens=16, stop=stop)
    [choice] = body["choices"]
    assert choice["text"] == full[:full.find(stop)]
    assert stop not in choice["text"]
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 16


def test_stop_list(client):
    """With a stop list the earliest stop wins; stops that never occur are harmless."""
    full = greedy(client, max_tokens=16)["choices"][0]["text"]
    early, late = pick_stops(full, 2)
    body = greedy(client, max_tokens=16, stop=["@@never@@", late, early])
    [choice] = body["choices"]
    cut = min(full.find(early), full.find(late))
    assert choice["text"] == full[:cut]
    assert early not in choice["text"] and late not in choice["text"]
    assert choice["finish_reason"] == "stop"


def test_stop_never_matching(client):
    """A stop that never appears changes nothing."""
    full = greedy(client, max_tokens=10)
    assert greedy(client, max_tokens=10, stop=["@@never@@"])["choices"] == full["choices"]


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_penalties_change_output(client, penalty):
    """A positive presence/frequency penalty changes a repetitive greedy text."""
    plain = greedy(client, OTHER_PROMPT, max_tokens=40)["choices"][0]["text"]
    penalised = greedy(client, OTHER_PROMPT, max_tokens=40, **{penalty: 2})["choices"][0]["text"]
    assert penalised != plain


def test_zero_penalties_change_nothing(client):
    """Zero penalties give the plain greedy text."""
    plain = greedy(client, OTHER_PROMPT, max_tokens=20)["choices"]
    assert greedy(client, OTHER_PROMPT, max_tokens=20, presence_penalty=0, frequency_penalty=0)["choices"] == plain


def test_best_of_returns_n(client):
    """best_of > n samples more but returns n choices indexed 0..n-1."""
    body = ok(client, {"prompt": PROMPT, "n": 2, "best_of": 3, "max_tokens": 4, "temperature": 1})
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["finish_reason"] in {"stop", "length"} for c in body["choices"])


def test_best_of_greedy(client):
    """best_of at temperature 0 returns the greedy text."""
    expected = greedy(client, max_tokens=6)["choices"][0]["text"]
    body = greedy(client, max_tokens=6, best_of=2)
    assert [c["text"] for c in body["choices"]] == [expected]


def test_best_of_equal_n(client):
    """best_of == n is accepted."""
    assert len(ok(client, {"prompt": PROMPT, "n": 2, "best_of": 2, "max_tokens": 2})["choices"]) == 2


def test_logit_bias_forces_token(client, engines):
    """A +100 bias on one token makes every generated token that token."""
    forced = token_id(engines["tiny"], "def")
    body = ok(client, {"prompt": PROMPT, "max_tokens": 5, "temperature": 1, "logprobs": 1,
                       "logit_bias": {str(forced): 100}})
    [choice] = body["choices"]
    assert choice["text"] == "def" * 5
    assert choice["logprobs"]["tokens"] == ["def"] * 5


def test_logit_bias_bans_greedy_token(client, engines):
    """A -100 bias on the greedy first token makes the greedy text start differently."""
    tokenizer = engines["tiny"].tokenizer
    plain = greedy(client, OTHER_PROMPT, max_tokens=8, logprobs=1)["choices"][0]
    first = plain["logprobs"]["tokens"][0]
    banned = {str(i): -100 for i in range(len(tokenizer)) if tokenizer.decode([i]) == first}
    assert banned
    biased = greedy(client, OTHER_PROMPT, max_tokens=8, logprobs=1, logit_bias=banned)["choices"][0]
    assert biased["logprobs"]["tokens"][0] != first
    assert biased["text"] != plain["text"]


def test_user_accepted(client):
    """user is accepted and changes nothing."""
    plain = greedy(client, max_tokens=5)["choices"]
    assert greedy(client, max_tokens=5, user="user-1234")["choices"] == plain


def test_seed_reproducible(client):
    """The same seed at temperature 1 gives the same samples; other seeds give others."""
    body = {"prompt": PROMPT, "temperature": 1, "max_tokens": 12, "n": 2}
    first = ok(client, {**body, "seed": 1234})["choices"]
    assert ok(client, {**body, "seed": 1234})["choices"] == first
    others = [ok(client, {**body, "seed": seed})["choices"][0]["text"] for seed in (1, 2, 3)]
    assert len({first[0]["text"], *others}) > 1


def test_seed_accepts_int64_range(client):
    """Seeds at both ends of the int64 range are accepted."""
    for seed in (-(2**63), 2**63 - 1):
        assert ok(client, {"prompt": PROMPT, "temperature": 1, "max_tokens": 2, "seed": seed})["choices"]


def test_stream_options_without_stream_ignored(client):
    """stream_options on a non-streaming request changes nothing."""
    body = greedy(client, max_tokens=4, stream_options={"include_usage": True})
    assert body["object"] == "text_completion" and len(body["choices"]) == 1


def test_unknown_fields_ignored(client):
    """Copilot's extra, nwo, code_annotations and other unknown fields are ignored."""
    plain = greedy(client, max_tokens=6)["choices"]
    body = greedy(client, max_tokens=6, extra={"language": "python", "next_indent": 0}, nwo="octo/repo",
                  code_annotations=False, something_new=[1, {"x": None}])
    assert body["choices"] == plain


def test_explicit_nulls_mean_defaults(client, tiny_settings):
    """null for every optional field means its default."""
    fields = ["model", "suffix", "max_tokens", "temperature", "top_p", "n", "best_of", "stream", "stream_options",
              "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "user", "seed"]
    body = ok(client, {"prompt": PROMPT, **{f: None for f in fields}})
    assert body["model"] == "tiny"
    [choice] = body["choices"]
    assert choice["logprobs"] is None
    assert body["usage"]["completion_tokens"] <= tiny_settings.models[0].max_tokens
    if choice["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == tiny_settings.models[0].max_tokens


def test_null_stream_option(client):
    """stream_options.include_usage null means false."""
    chunks = sse_chunks(post(client, {"prompt": PROMPT, "stream": True, "max_tokens": 2,
                                      "stream_options": {"include_usage": None}}))
    assert all(chunk["choices"] for chunk in chunks)


# -- Copilot -------------------------------------------------------------------


@pytest.fixture(scope="module")
def copilot_client(tiny_settings):
    """The tiny model with room for Copilot's max_tokens 500 (the shared fixtures have 256 tokens)."""
    from app import create_app
    from app.engine.loader import load_engine

    roomy = dataclasses.replace(tiny_settings.models[0], context_length=600)
    return create_app(tiny_settings, engines=[load_engine(roomy, tiny_settings)]).test_client()


def test_copilot_request(copilot_client):
    """Copilot's exact body and headers on /v1/engines/codegen/completions get a proper event stream."""
    response = copilot_client.post("/v1/engines/codegen/completions", json=COPILOT_BODY, headers=COPILOT_HEADERS)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/event-stream"
    assert response.get_data(as_text=True).endswith("data: [DONE]\n\n")
    chunks = sse_chunks(response)
    assert chunks
    finishes = []
    for chunk in chunks:
        assert chunk["object"] == "text_completion"
        assert chunk["id"] == "cmpl-" + COPILOT_HEADERS["X-Request-Id"]
        assert chunk["model"] == "tiny"
        assert isinstance(chunk["created"], int)
        [choice] = chunk["choices"]
        assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
        assert choice["index"] == 0
        assert isinstance(choice["text"], str)
        assert choice["logprobs"] is None
        finishes.append(choice["finish_reason"])
    assert finishes[:-1] == [None] * (len(finishes) - 1)
    assert finishes[-1] in {"stop", "length"}
    text = joined(chunks)[0]
    assert not any(stop in text for stop in COPILOT_BODY["stop"])


def test_copilot_request_on_a_small_context_model(client, engines):
    """Copilot's max_tokens 500 exceeds the 256-token window: the answer is shorter, not an error."""
    body = {**COPILOT_BODY, "prompt": "# Path: long.py\n" + "x = 1\n" * 200}
    chunks = sse_chunks(client.post("/v1/engines/codegen/completions", json=body, headers=COPILOT_HEADERS))
    assert chunks and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "error" not in chunks[-1]


# -- bad input -----------------------------------------------------------------

BAD_FIELDS = [
    ({}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": ["ok", 3]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": PROMPT, "model": 5}, "model"),
    ({"prompt": PROMPT, "suffix": 3}, "suffix"),
    ({"prompt": PROMPT, "max_tokens": -1}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": "10"}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": True}, "max_tokens"),
    ({"prompt": PROMPT, "temperature": -0.1}, "temperature"),
    ({"prompt": PROMPT, "temperature": 2.1}, "temperature"),
    ({"prompt": PROMPT, "temperature": "0.5"}, "temperature"),
    ({"prompt": PROMPT, "temperature": True}, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": PROMPT, "top_p": 1.1}, "top_p"),
    ({"prompt": PROMPT, "n": 0}, "n"),
    ({"prompt": PROMPT, "n": 129}, "n"),
    ({"prompt": PROMPT, "n": 2.0}, "n"),
    ({"prompt": PROMPT, "n": 3, "best_of": 2}, "best_of"),
    ({"prompt": PROMPT, "best_of": 2, "stream": True}, "best_of"),
    ({"prompt": PROMPT, "logprobs": 6}, "logprobs"),
    ({"prompt": PROMPT, "logprobs": -1}, "logprobs"),
    ({"prompt": PROMPT, "logprobs": True}, "logprobs"),
    ({"prompt": PROMPT, "echo": "yes"}, "echo"),
    ({"prompt": PROMPT, "stop": [f"s{i}" for i in range(65)]}, "stop"),
    ({"prompt": PROMPT, "stop": 5}, "stop"),
    ({"prompt": PROMPT, "stop": ["a", None]}, "stop"),
    ({"prompt": PROMPT, "stop": {"a": 1}}, "stop"),
    ({"prompt": PROMPT, "presence_penalty": -2.1}, "presence_penalty"),
    ({"prompt": PROMPT, "presence_penalty": 2.1}, "presence_penalty"),
    ({"prompt": PROMPT, "frequency_penalty": -2.1}, "frequency_penalty"),
    ({"prompt": PROMPT, "frequency_penalty": 2.1}, "frequency_penalty"),
    ({"prompt": PROMPT, "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": PROMPT, "logit_bias": {"5": -101}}, "logit_bias"),
    ({"prompt": PROMPT, "logit_bias": {"5": "high"}}, "logit_bias"),
    ({"prompt": PROMPT, "logit_bias": {"abc": 5}}, "logit_bias"),
    ({"prompt": PROMPT, "logit_bias": {str(10**6): 5}}, "logit_bias"),
    ({"prompt": PROMPT, "logit_bias": {"-1": 5}}, "logit_bias"),
    ({"prompt": PROMPT, "logit_bias": [5]}, "logit_bias"),
    ({"prompt": PROMPT, "stream": "yes"}, "stream"),
    ({"prompt": PROMPT, "stream": 1}, "stream"),
    ({"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"prompt": PROMPT, "user": 7}, "user"),
    ({"prompt": PROMPT, "seed": 1.5}, "seed"),
    ({"prompt": PROMPT, "seed": 2**64}, "seed"),
    ({"prompt": PROMPT, "seed": -(2**63) - 1}, "seed"),
]


@pytest.mark.parametrize("body, param", BAD_FIELDS, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_FIELDS)])
def test_bad_field_400(client, body, param):
    """An invalid field is a 400 invalid_request_error naming the field."""
    error = assert_envelope(post(client, body), 400, param=param)
    assert param.split(".")[0] in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_huge_seed_is_400_not_500(client, stream):
    """A seed past 64 bits is refused up front (torch cannot take it), streaming or not."""
    response = post(client, {"prompt": PROMPT, "temperature": 1, "seed": 2**64, "stream": stream})
    assert_envelope(response, 400, param="seed")


@pytest.fixture()
def strict(tiny_settings, engines, monkeypatch):
    """A client of an app whose engines refuse prompts too long for the window (truncate_prompts off)."""
    from app import create_app

    for engine in engines.values():
        monkeypatch.setattr(engine.preparer, "options", dataclasses.replace(engine.options, truncate_prompts=False))
    return create_app(tiny_settings.replace(truncate_prompts=False), engines=engines.values()).test_client()


OVERSIZED = [
    {"prompt": "", "max_tokens": 300},
    {"prompt": PROMPT, "max_tokens": 257},
    {"prompt": PROMPT, "max_tokens": 255},
    {"prompt": "x " * 300, "max_tokens": 1},
]


@pytest.mark.parametrize("body", OVERSIZED)
def test_context_length_exceeded_when_not_truncating(strict, body):
    """With truncate_prompts off, prompt plus max_tokens beyond the 256-token context is a 400."""
    error = assert_envelope(post(strict, body), 400, param="max_tokens", code="context_length_exceeded")
    assert "256" in error["message"]


@pytest.mark.parametrize("body", OVERSIZED)
def test_oversized_requests_fit_the_window(client, body):
    """By default the prompt loses its start and max_tokens shrinks to the room left: a 200 within 256 tokens."""
    usage = ok(client, {**body, "temperature": 0})["usage"]
    assert usage["total_tokens"] <= 256 and usage["completion_tokens"] <= body["max_tokens"]


def test_truncated_prompt_keeps_its_end(client, engines):
    """A prompt cut to fit starts at its first anchor line whose rest fits, and completes exactly as that rest does."""
    engine = engines["tiny"]
    text = "".join(f"v{i} = {i}\n" for i in range(200))
    assert len(engine.tokenizer(text)["input_ids"]) > 256
    rest = next(text[offset:] for offset in anchor_offsets(text, engine.options.anchor_lines)
                if len(engine.tokenizer(text[offset:])["input_ids"]) <= 248)  # 256 - max_tokens
    body = {"max_tokens": 8, "temperature": 0}
    whole = ok(client, {**body, "prompt": text})
    kept = ok(client, {**body, "prompt": rest})
    assert whole["usage"]["prompt_tokens"] == kept["usage"]["prompt_tokens"] <= 248
    assert whole["choices"][0]["text"] == kept["choices"][0]["text"]


def test_truncated_prompt_without_anchors_keeps_its_last_tokens(tiny_settings, engines):
    """With anchor_lines 0 a prompt cut to fit keeps exactly its last tokens."""
    from app import create_app
    from app.engine import Engine

    tiny = engines["tiny"]
    options = dataclasses.replace(tiny.options, anchor_lines=0)
    unanchored = Engine(tiny.config, tiny.model, tiny.tokenizer, tiny.device, options)
    client = create_app(tiny_settings, engines=[unanchored]).test_client()
    ids = tiny.tokenizer("".join(f"v{i} = {i}\n" for i in range(200)))["input_ids"]
    body = {"max_tokens": 8, "temperature": 0}
    whole = ok(client, {**body, "prompt": tiny.tokenizer.decode(ids)})
    kept = ok(client, {**body, "prompt": tiny.tokenizer.decode(ids[len(ids) - 248:])})
    assert whole["usage"]["prompt_tokens"] == kept["usage"]["prompt_tokens"] == 248
    assert whole["choices"][0]["text"] == kept["choices"][0]["text"]


def test_echo_is_never_truncated(client):
    """An echoed prompt comes back whole or not at all: too long is a 400."""
    response = post(client, {"prompt": "x " * 300, "max_tokens": 1, "echo": True})
    assert_envelope(response, 400, param="max_tokens", code="context_length_exceeded")


def test_context_length_exactly_fits(strict, engines):
    """Prompt plus max_tokens equal to the context is allowed; one more token is not."""
    prompt = "x " * 250
    room = 256 - len(engines["tiny"].tokenizer(prompt)["input_ids"])
    assert 0 < room < 10
    body = ok(strict, {"prompt": prompt, "max_tokens": room, "temperature": 0})
    assert body["usage"]["total_tokens"] <= 256
    assert_envelope(post(strict, {"prompt": prompt, "max_tokens": room + 1}), 400, param="max_tokens",
                    code="context_length_exceeded")


def test_context_length_in_prompt_list(strict):
    """One prompt of a list that does not fit makes the whole request a 400."""
    response = post(strict, {"prompt": [PROMPT, "x " * 300], "max_tokens": 1})
    assert_envelope(response, 400, param="max_tokens", code="context_length_exceeded")


BAD_BODIES = [
    ("not json", "application/json", "invalid_json"),
    ('{"prompt": "x",', "application/json", "invalid_json"),
    (b"\xff\xfe\x00", "application/json", "invalid_json"),
    ("[" * 100_000, "application/json", "invalid_json"),
    ('["prompt", "x"]', "application/json", None),
    ('"just a string"', "application/json", None),
    ("42", "application/json", None),
    ("null", "application/json", None),
    ("", "application/json", None),
    ('{"prompt": "x"}', "text/plain", "unsupported_content_type"),
    ('{"prompt": "x"}', "application/xml", "unsupported_content_type"),
]


@pytest.mark.parametrize("data, content_type, code", BAD_BODIES)
def test_bad_body_400(client, data, content_type, code):
    """Non-JSON, non-object, empty bodies and wrong content types are 400 envelopes."""
    response = client.post("/v1/completions", data=data, content_type=content_type)
    error = assert_envelope(response, 400, code=code)
    if code is None:
        assert "JSON object" in error["message"]


def test_multipart_body_400(client):
    """A multipart form is a 400 unsupported_content_type."""
    response = client.post("/v1/completions", data={"prompt": "x"}, content_type="multipart/form-data")
    assert_envelope(response, 400, code="unsupported_content_type")


def test_form_urlencoded_json_accepted(client):
    """A JSON body sent as application/x-www-form-urlencoded (curl -d) is accepted."""
    data = json.dumps({"prompt": PROMPT, "max_tokens": 2})
    response = client.post("/v1/completions", data=data, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["usage"]["completion_tokens"] == 2


def test_json_with_charset_accepted(client):
    """application/json with a charset parameter is accepted."""
    data = json.dumps({"prompt": PROMPT, "max_tokens": 2})
    response = client.post("/v1/completions", data=data, content_type="application/json; charset=utf-8")
    assert response.status_code == 200, response.get_data(as_text=True)


def test_worker_keeps_serving_after_errors(client, engines):
    """After every kind of bad request the worker still answers, and no admission ticket leaked."""
    for body, _ in BAD_FIELDS:
        assert post(client, body).status_code == 400
    for data, content_type, _ in BAD_BODIES:
        assert client.post("/v1/completions", data=data, content_type=content_type).status_code == 400
    assert post(client, {"prompt": "x " * 300, "max_tokens": 1, "echo": True}).status_code == 400
    assert post(client, {"prompt": PROMPT, "model": "nope"}).status_code == 404
    assert engines["tiny"].stats().requests == 0
    body = greedy(client, max_tokens=3)
    assert body["usage"]["completion_tokens"] == 3


# -- protocol-level errors -----------------------------------------------------


def test_body_too_large_413(tiny_settings, engines):
    """A body over max_request_bytes is a 413 envelope; a small one still works."""
    from app import create_app

    client = create_app(tiny_settings.replace(max_request_bytes=1000), engines=engines.values()).test_client()
    error = assert_envelope(post(client, {"prompt": "x" * 2000}), 413, code="request_entity_too_large")
    assert "Traceback" not in error["message"]
    assert post(client, {"prompt": PROMPT, "max_tokens": 1}).status_code == 200


def test_unknown_route_404(client):
    """An unknown route is a 404 envelope."""
    assert_envelope(client.get("/v2/whatever"), 404, code="not_found")
    assert_envelope(client.post("/v1/chat/completions", json={"prompt": "x"}), 404, code="not_found")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/engines/codegen/completions"])
def test_get_on_completions_405(client, path):
    """GET on a completions route is a 405 envelope."""
    assert_envelope(client.get(path), 405, code="method_not_allowed")


def test_post_on_models_405(client):
    """POST on /v1/models is a 405 envelope."""
    assert_envelope(client.post("/v1/models", json={}), 405, code="method_not_allowed")


# -- API keys --------------------------------------------------------------------


@pytest.fixture()
def keyed_client(tiny_settings, engines):
    """A client of an app that requires the API key "secret"."""
    from app import create_app

    return create_app(tiny_settings.replace(api_keys=("secret",)), engines=engines.values()).test_client()


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": "Bearer secret2"},
    {"Authorization": "Bearer "},
    {"Authorization": "Basic secret"},
    {"Authorization": "secret"},
    {"Authorization": COPILOT_HEADERS["Authorization"]},
])
def test_missing_or_wrong_key_401(keyed_client, headers):
    """Without the right Bearer key completions and models are 401 authentication_error envelopes."""
    response = post(keyed_client, {"prompt": PROMPT, "max_tokens": 1}, headers=headers)
    assert_envelope(response, 401, type_="authentication_error", code="invalid_api_key")
    assert_envelope(keyed_client.get("/v1/models", headers=headers), 401, type_="authentication_error")


@pytest.mark.parametrize("authorization", ["Bearer secret", "bearer secret", "Bearer  secret "])
def test_right_key_200(keyed_client, authorization):
    """The right Bearer key gets completions and the model list."""
    headers = {"Authorization": authorization}
    assert ok(keyed_client, {"prompt": PROMPT, "max_tokens": 1}, headers=headers)["model"] == "tiny"
    assert keyed_client.get("/v1/models", headers=headers).status_code == 200


@pytest.mark.parametrize("headers", [{"api-key": "secret"}, {"x-api-key": "secret"}, {"X-Api-Key": " secret "}])
def test_key_headers_some_clients_send(keyed_client, headers):
    """The api-key / x-api-key headers carry the key too; a wrong one there is 401."""
    assert ok(keyed_client, {"prompt": PROMPT, "max_tokens": 1}, headers=headers)["model"] == "tiny"
    wrong = {name: "nope" for name in headers}
    assert_envelope(post(keyed_client, {"prompt": PROMPT, "max_tokens": 1}, headers=wrong), 401,
                    type_="authentication_error", code="invalid_api_key")


def test_ready_needs_no_key_and_reports_loading(keyed_client, tiny_settings, engines):
    """/ready is public; it is 503 while a served model is not loaded in the worker, then 200."""
    from app import create_app

    response = keyed_client.get("/ready")
    assert response.status_code == 200 and response.get_json() == {"status": "ready", "models": ["tiny", "tiny-fim"]}
    partial = create_app(tiny_settings, engines=[engines["tiny"]]).test_client()
    response = partial.get("/ready")
    assert response.status_code == 503 and response.get_json() == {"status": "loading", "loading": ["tiny-fim"]}


def test_health_needs_no_key(keyed_client):
    """/health answers without a key."""
    response = keyed_client.get("/health")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"


def test_no_keys_configured_accepts_any_bearer(client):
    """Without configured keys any Authorization (Copilot's token) is accepted."""
    headers = {"Authorization": COPILOT_HEADERS["Authorization"]}
    assert ok(client, {"prompt": PROMPT, "max_tokens": 1}, headers=headers)["model"] == "tiny"


# -- faults and back-pressure ------------------------------------------------------


def test_server_fault_500(client, engines, monkeypatch):
    """An engine fault is a 500 server_error envelope without traceback or exception text."""
    def broken(*args, **kwargs):
        raise RuntimeError("kaboom-internal-detail")

    monkeypatch.setattr(engines["tiny"], "stream", broken)
    response = post(client, {"prompt": PROMPT, "max_tokens": 2}, headers={"X-Request-Id": "fault-1"})
    error = assert_envelope(response, 500, type_="server_error")
    text = response.get_data(as_text=True)
    assert "kaboom-internal-detail" not in text and "RuntimeError" not in text and "Traceback" not in text
    assert "fault-1" in error["message"]
    assert engines["tiny"].stats().requests == 0
    monkeypatch.undo()
    assert greedy(client, max_tokens=2)["usage"]["completion_tokens"] == 2


def test_busy_429(tiny_settings):
    """With max_waiting 0 and the admission full, the next request is a 429; after release it is served."""
    from app import create_app

    app = create_app(tiny_settings.replace(max_batch=1, max_waiting=0))
    client = app.test_client()
    engine = app.extensions["fauxpilot"].get("tiny")
    ticket = engine.admit()
    try:
        error = assert_envelope(post(client, {"prompt": PROMPT, "max_tokens": 1}), 429, type_="rate_limit_error",
                                code="server_busy")
        assert error["message"]
        response = post(client, {"prompt": PROMPT, "max_tokens": 1, "stream": True})
        assert_envelope(response, 429, type_="rate_limit_error", code="server_busy")
        assert response.headers["Retry-After"] == "1"  # when to come back
    finally:
        ticket.release()
    assert ok(client, {"prompt": PROMPT, "max_tokens": 1})["model"] == "tiny"
    assert engine.stats().requests == 0


# -- request log -----------------------------------------------------------------------

def request_lines(caplog) -> list[str]:
    """The request log lines captured so far."""
    return [r.getMessage() for r in caplog.records if r.name == "app.requests"]


def test_one_log_line_per_request_without_prompt_text(client, caplog):
    """Each completion logs its id (the client's X-Request-Id), status, model, token counts and latency."""
    import logging

    caplog.set_level(logging.INFO, logger="app.requests")
    secret = "def secret_prompt_text():"
    ok(client, {"prompt": secret, "max_tokens": 2}, headers={"X-Request-Id": "req-123"})
    post(client, {"prompt": secret, "max_tokens": -1}, headers={"X-Request-Id": "req-400"})
    response = post(client, {"prompt": secret, "max_tokens": 2, "stream": True}, headers={"X-Request-Id": "req-sse"})
    response.get_data()
    response.close()
    lines = request_lines(caplog)
    assert len(lines) == 3, lines
    whole, bad, streamed = lines
    assert whole.startswith("request req-123 POST /v1/completions status=200 model=tiny prompt_tokens=")
    assert "completion_tokens=2 latency_ms=" in whole
    assert bad.startswith("request req-400 POST /v1/completions status=400 model=- ")
    assert streamed.startswith("request req-sse POST /v1/completions status=200 model=tiny")
    assert "completion_tokens=2" in streamed and "went away" not in streamed
    assert not any(secret in line for line in lines)
    assert client.get("/health").status_code == 200 and len(request_lines(caplog)) == 3  # probes stay quiet



# -- server limits ---------------------------------------------------------------------

def limited_client(tiny_settings, engines, **limits):
    """A client of an app with some limits changed."""
    from app import create_app

    return create_app(tiny_settings.replace(**limits), engines=engines.values()).test_client()


@pytest.mark.parametrize("body, param", [
    ({"prompt": PROMPT, "max_tokens": 10**30}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 9}, "max_tokens"),
    ({"prompt": PROMPT, "n": 5}, "n"),
    ({"prompt": PROMPT, "n": 2, "best_of": 5}, "best_of"),
    ({"prompt": [PROMPT] * 3, "n": 2}, "n"),
])
def test_limits_are_400(tiny_settings, engines, body, param):
    """max_tokens above max_tokens_limit, or more sequences than max_sequences, is refused up front."""
    client = limited_client(tiny_settings, engines, max_tokens_limit=8, max_sequences=4)
    error = assert_envelope(post(client, body), 400, param=param)
    assert error["code"] in ("max_tokens_too_large", "too_many_sequences")
    assert ok(client, {"prompt": [PROMPT] * 2, "n": 2, "max_tokens": 8})["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_request_past_time_limit_is_stopped(tiny_settings, engines, stream):
    """Past request_timeout a request stops: 503 with Retry-After, or an error event that ends the stream."""
    client = limited_client(tiny_settings, engines, request_timeout=1e-6)
    response = post(client, {"prompt": PROMPT, "max_tokens": 50, "stream": stream})
    if stream:
        payloads = sse_payloads(response)  # checks the stream still ends with [DONE]
        assert json.loads(payloads[-1])["error"]["code"] == "request_timeout"
    else:
        error = assert_envelope(response, 503, type_="server_error", code="request_timeout")
        assert response.headers["Retry-After"] == "1" and "longer than this server allows" in error["message"]
    response.close()
    assert engines["tiny"].stats().requests == 0
    # The scheduler drops the cancelled work at its next step, on its own thread.
    deadline = time.monotonic() + 10
    while engines["tiny"].stats().running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engines["tiny"].stats().running == 0


def test_metrics_count_requests_tokens_and_batch(client):
    """/metrics exports request counts by model and status, token counts, batch and cache gauges."""
    ok(client, {"prompt": PROMPT, "max_tokens": 3})
    post(client, {"prompt": PROMPT, "max_tokens": -1})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    assert 'fauxpilot_requests_total{model="tiny",status="200"} 1.0' in text
    assert 'fauxpilot_requests_total{model="-",status="400"} 1.0' in text
    assert 'fauxpilot_completion_tokens_total{model="tiny"} 3.0' in text
    assert 'fauxpilot_request_duration_seconds_count{model="tiny"} 1.0' in text
    assert 'fauxpilot_running_sequences{model="tiny"} 0.0' in text
    assert 'fauxpilot_prefix_cache_misses{model="tiny"}' in text
    for counter in ("drafted_tokens", "accepted_tokens", "steps"):
        assert f'fauxpilot_spec_{counter}_total{{model="tiny"}}' in text


# -- the OpenAPI document and the response schemas ------------------------------------------

OPENAI_FIELDS = {"model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
                 "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "user",
                 "seed", "extra", "max_completion_tokens", "nwo"}


def test_openapi_document_is_public_and_generated_from_the_schemas(keyed_client):
    """/openapi.json needs no key and describes every request field and every endpoint."""
    response = keyed_client.get("/openapi.json")
    assert response.status_code == 200
    document = response.get_json()
    assert document["openapi"] == "3.0.3"
    assert {"/v1/completions", "/v1/engines/{engine}/completions", "/v1/models", "/health", "/ready",
            "/metrics"} <= set(document["paths"])
    request = document["components"]["schemas"]["CompletionRequest"]["properties"]
    assert set(request) == OPENAI_FIELDS
    assert request["temperature"]["maximum"] == 2 and request["stop"]["oneOf"][1]["maxItems"] == 64
    post_op = document["paths"]["/v1/completions"]["post"]
    assert {"200", "400", "401", "404", "413", "429", "503"} <= set(post_op["responses"])


def test_responses_match_their_schemas(client):
    """Whole completions (with logprobs), stream chunks, errors and the model list fit the documented schemas."""
    from app.protocol import CompletionSchema, ErrorEnvelopeSchema, ModelListSchema

    body = ok(client, {"prompt": PROMPT, "max_tokens": 3, "logprobs": 2, "n": 2})
    assert CompletionSchema().validate(body) == {}
    response = post(client, {"prompt": PROMPT, "max_tokens": 3, "stream": True,
                             "stream_options": {"include_usage": True}})
    for payload in sse_payloads(response):
        assert CompletionSchema().validate(json.loads(payload)) == {}
    error = post(client, {"prompt": PROMPT, "temperature": 9}).get_json()
    assert ErrorEnvelopeSchema().validate(error) == {}
    assert ModelListSchema().validate(client.get("/v1/models").get_json()) == {}


@pytest.mark.parametrize("extra, wanted", [
    ({"language": "python", "next_indent": 0, "trim_by_indentation": True}, True),
    ({"trim_by_indentation": False}, False),
    ({"trim_by_indentation": "yes"}, False),
    ("not an object", False),
    (None, False),
])
def test_copilot_extra_trim_by_indentation_is_read(extra, wanted):
    """Copilot's extra.trim_by_indentation (only a real true) turns the dedent stop on; other extras are ignored."""
    from app.protocol import parse_completion_request

    request = parse_completion_request({"prompt": "def f(n):\n", "extra": extra})
    assert request.params.trim_by_indentation is wanted


@pytest.mark.parametrize("prompt, lead", [("def f(n):\n", ""), ("def f(n):\n    ", "    "), ("x = f(", None)])
def test_trim_by_indentation_measures_the_cursor_line(engine, prompt, lead):
    """The dedent stop starts from the cursor's line: whitespace before the cursor counts, code does not."""
    from app.engine import SamplingParams

    request = engine.prepare(prompt, SamplingParams(max_tokens=4, temperature=0.0, trim_by_indentation=True))
    stop = request.sequences[0].stop
    assert stop.dedent is not None and stop.dedent.lead == lead
    plain = engine.prepare(prompt, SamplingParams(max_tokens=4, temperature=0.0))
    assert plain.sequences[0].stop.dedent is None
