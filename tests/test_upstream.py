"""Entries with ``backend = "openai"``: prompts built here and sent as ids, tokens from a stand-in upstream.

The stand-in (tests/upstream_standin.py) records every request and streams scripted token ids
back; the server's reply is checked against what its own tokenizer, stops and limits make of them.
"""
from __future__ import annotations

import dataclasses
import json
import time

import pytest

from app import create_app
from app.engine import SamplingParams
from app.engine.errors import UpstreamMisconfigured, UpstreamUnavailable
from app.engine.loader import load_engine
from app.engine.upstream import parse_chunk
from config import ConfigError, FimTemplate, ModelConfig, Settings, settings_from_mapping

from .test_api import COPILOT_BODY, COPILOT_HEADERS, joined, sse_chunks
from .tiny_models import FIM_TOKENS
from .upstream_standin import Script, StandIn

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def stand_in():
    """One stand-in upstream for the module; each test scripts it afresh."""
    server = StandIn()
    yield server
    server.close()


@pytest.fixture()
def upstream(stand_in):
    """The stand-in with an empty record and a default script."""
    stand_in.bodies.clear()
    stand_in.headers.clear()
    stand_in.closed_early.clear()
    stand_in.script = Script()
    return stand_in


@pytest.fixture(scope="module")
def up_settings(tiny_model_dir, stand_in, tmp_path_factory) -> Settings:
    """`up` (plain) and `up-fim` served by the stand-in, the tiny model's tokenizer building their prompts."""
    plain = ModelConfig(name="up", source=str(tiny_model_dir), aliases=("codegen",), context_length=256,
                        max_tokens=16, backend="openai", url=stand_in.url, upstream_model="standin-model",
                        upstream_api_key="secret-upstream-key")
    fim = dataclasses.replace(plain, name="up-fim", aliases=(), fim=FimTemplate.from_tokens(*FIM_TOKENS))
    return Settings(models=(plain, fim), cache_dir=tmp_path_factory.mktemp("up-cache"), device="cpu")


@pytest.fixture(scope="module")
def up_engines(up_settings):
    """The upstream engines, built by the real loader (tokenizer and config only)."""
    return {m.name: load_engine(m, up_settings) for m in up_settings.models}


@pytest.fixture()
def up_client(up_settings, up_engines):
    """A test client of the app serving the upstream entries."""
    return create_app(up_settings, engines=up_engines.values()).test_client()


def ids_of(engine, text: str) -> list[int]:
    """The tiny tokenizer's ids of text."""
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


# -- what goes upstream -----------------------------------------------------------------


def test_fim_prompt_goes_upstream_as_token_ids(up_client, up_engines, upstream):
    """The FIM layout is built here from the entry's template and sent as ids, with the sampling settings."""
    engine = up_engines["up-fim"]
    upstream.script = Script(tokens=ids_of(engine, "return a + b"))
    body = {"model": "up-fim", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 40, "temperature": 0.2,
            "top_p": 0.9, "seed": 5}
    response = up_client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["choices"][0]["text"] == "return a + b"
    [sent] = upstream.bodies
    expected, used_fim, _ = engine.preparer.encode(PREFIX, SUFFIX)
    assert used_fim and sent["prompt"] == expected
    assert {k: sent[k] for k in ("model", "max_tokens", "temperature", "top_p", "seed", "stream")} == {
        "model": "standin-model", "max_tokens": 40, "temperature": 0.2, "top_p": 0.9, "seed": 5, "stream": True}
    assert sent["logprobs"] >= 1 and "suffix" not in sent  # ids come back with logprobs; vLLM refuses suffix
    assert upstream.headers[0]["Authorization"] == "Bearer secret-upstream-key"


def test_suffix_on_a_model_without_fim_sends_the_prefix_only(up_client, up_engines, upstream):
    """Copilot's suffix on a plain entry: 200, the prompt alone goes upstream."""
    upstream.script = Script(tokens=ids_of(up_engines["up"], "x = 1"))
    response = up_client.post("/v1/completions", json={"model": "up", "prompt": PREFIX, "suffix": SUFFIX})
    assert response.status_code == 200
    assert upstream.bodies[0]["prompt"] == up_engines["up"].tokenizer(PREFIX)["input_ids"]


def test_no_token_healing_upstream(up_engines):
    """Healing needs this process's logits: a prompt ending in a newline goes upstream whole."""
    request = up_engines["up"].prepare("def f():\n", SamplingParams(max_tokens=4))
    assert request.healing is None and not request.drafters


# -- what comes back ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["llama.cpp", "vllm"])
def test_stops_by_id_end_the_text_and_the_upstream_call(up_client, up_engines, upstream, shape):
    """An end-of-sequence id from upstream ends the completion ("stop"), its text never shown; the call is closed."""
    engine = up_engines["up"]
    eos = engine.tokenizer.eos_token_id
    upstream.script = Script(tokens=ids_of(engine, "y = 2") + [eos] + ids_of(engine, "z = 3") * 50, shape=shape,
                             delay=0.01)
    response = up_client.post("/v1/completions", json={"model": "up", "prompt": "x = 1\n", "max_tokens": 100})
    choice = response.get_json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("y = 2", "stop")
    assert upstream.closed_early.wait(5)
    assert len(upstream.sent) < 100


def test_stop_strings_and_max_tokens_are_decided_here(up_client, up_engines, upstream):
    """A stop string cuts the text where it starts; max_tokens counts the tokens received."""
    engine = up_engines["up"]
    tokens = ids_of(engine, "a = 1\n\nb = 2\n")
    upstream.script = Script(tokens=tokens)
    stopped = up_client.post("/v1/completions", json={"model": "up", "prompt": "#", "stop": ["\n\n"],
                                                      "max_tokens": 50}).get_json()["choices"][0]
    assert (stopped["text"], stopped["finish_reason"]) == ("a = 1", "stop")
    upstream.script = Script(tokens=tokens)
    limited = up_client.post("/v1/completions", json={"model": "up", "prompt": "#", "max_tokens": 2}).get_json()
    assert limited["choices"][0]["finish_reason"] == "length"
    assert limited["usage"]["completion_tokens"] == 2
    assert limited["choices"][0]["text"] == engine.decode(tokens[:2])


def test_stream_passes_tokens_through(up_client, up_engines, upstream):
    """A streamed completion arrives in several events whose text joins to the whole."""
    engine = up_engines["up"]
    upstream.script = Script(tokens=ids_of(engine, "for i in range(10):\n    print(i)"), finish_reason="stop")
    response = up_client.post("/v1/completions", json={"model": "up", "prompt": "#", "stream": True,
                                                       "max_tokens": 50})
    chunks = sse_chunks(response)
    assert len(chunks) > 3
    assert joined(chunks) == {0: "for i in range(10):\n    print(i)"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"  # the upstream's own end


def test_logprobs_come_from_upstream(up_client, up_engines, upstream):
    """logprobs are the upstream's values, named by this server's tokenizer."""
    engine = up_engines["up"]
    tokens = ids_of(engine, "abc")
    upstream.script = Script(tokens=tokens)
    body = {"model": "up", "prompt": "#", "max_tokens": len(tokens), "logprobs": 2}
    logprobs = up_client.post("/v1/completions", json=body).get_json()["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"] == [-0.5] * len(tokens)
    assert logprobs["tokens"] == [engine.preparer.token_text(t) for t in tokens]
    assert upstream.bodies[0]["logprobs"] == 2


def test_copilot_request_trims_by_indentation(up_client, up_engines, upstream):
    """Copilot's body on an upstream entry: its dedent stop ends the block the cursor is in."""
    engine = up_engines["up"]
    upstream.script = Script(tokens=ids_of(engine, "return a + b\n\ndef sub(a, b):\n    return a - b"))
    body = {**COPILOT_BODY, "prompt": PREFIX, "suffix": "", "max_tokens": 60}
    response = up_client.post("/v1/engines/codegen/completions", json=body, headers=COPILOT_HEADERS)
    assert response.status_code == 200
    assert joined(sse_chunks(response))[0].rstrip() == "return a + b"


def test_n_sequences_each_get_their_own_upstream_call(up_client, up_engines, upstream):
    """n = 2: two upstream calls (seeds apart), two choices."""
    upstream.script = Script(tokens=ids_of(up_engines["up"], "q"))
    body = {"model": "up", "prompt": "#", "n": 2, "seed": 10, "max_tokens": 4}
    choices = up_client.post("/v1/completions", json=body).get_json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert [b["seed"] for b in upstream.bodies] == [10, 11]


def test_closing_a_stream_closes_the_upstream_call_at_once(up_engines, upstream):
    """A reader that stops early (the client went away) closes the upstream connection before its next token."""
    engine = up_engines["up"]
    upstream.script = Script(tokens=ids_of(engine, "x = 1\n") * 100, delay=0.02)
    request = engine.prepare("#", SamplingParams(max_tokens=500))
    stream = engine.stream(request)
    next(stream)
    stream.close()
    started = time.monotonic()
    assert upstream.closed_early.wait(5)
    assert time.monotonic() - started < 1.0
    assert len(upstream.sent) < 50


# -- failures ----------------------------------------------------------------------------


def test_unreachable_upstream_is_503_with_retry_after(tiny_model_dir, tmp_path):
    """Nothing listening: 503 with Retry-After and an envelope; /ready says which upstream is down."""
    from .gunicorn_server import free_port

    entry = ModelConfig(name="down", source=str(tiny_model_dir), context_length=256, backend="openai",
                        url=f"http://127.0.0.1:{free_port()}/v1")
    settings = Settings(models=(entry,), cache_dir=tmp_path, device="cpu")
    client = create_app(settings, engines=[load_engine(entry, settings)]).test_client()
    response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert response.status_code == 503 and response.headers["Retry-After"]
    error = response.get_json()["error"]
    assert error["code"] == "upstream_unavailable" and "Traceback" not in error["message"]
    ready = client.get("/ready")
    assert ready.status_code == 503 and "down" in ready.get_json()["upstreams"]


@pytest.mark.parametrize("status, error, expected_status, expected_param", [
    (400, {"error": {"message": "max_tokens is too large", "param": "max_tokens"}}, 400, "max_tokens"),
    (422, {"error": "Input validation error: temperature must be positive"}, 400, None),  # TGI's shape
    (413, {"error": {"message": "prompt too long"}}, 413, None),
    (429, {"error": {"message": "busy"}}, 429, None),
    (401, {"error": {"message": "bad key"}}, 502, None),
    (500, {"error": {"message": "CUDA out of memory"}}, 503, None),
])
def test_upstream_refusals_map_to_clean_envelopes(up_client, upstream, status, error, expected_status,
                                                  expected_param):
    """Upstream 4xx → the matching 4xx naming the field; 5xx → 503 (retry); its key or model wrong → 502."""
    upstream.script = Script(status=status, error=error)
    response = up_client.post("/v1/completions", json={"model": "up", "prompt": "#", "max_tokens": 4})
    assert response.status_code == expected_status
    envelope = response.get_json()["error"]
    assert set(envelope) == {"message", "type", "param", "code"} and envelope["param"] == expected_param
    assert envelope["message"].startswith("upstream server:")
    assert ("Retry-After" in response.headers) == (expected_status in (429, 503))


def test_upstream_breaking_off_mid_stream_is_reported_in_band(up_client, up_engines, upstream):
    """The upstream drops the connection after 3 tokens: the stream ends with an error event and [DONE]."""
    upstream.script = Script(tokens=ids_of(up_engines["up"], "x = 1\n") * 5, break_after=3)
    response = up_client.post("/v1/completions", json={"model": "up", "prompt": "#", "max_tokens": 50,
                                                       "stream": True})
    assert response.status_code == 200
    chunks = sse_chunks(response)
    assert chunks[-1]["error"]["code"] == "upstream_unavailable"
    assert response.get_data(as_text=True).endswith("data: [DONE]\n\n")
    upstream.script = Script(tokens=ids_of(up_engines["up"], "x = 1\n") * 5, break_after=3)
    whole = up_client.post("/v1/completions", json={"model": "up", "prompt": "#", "max_tokens": 50})
    assert whole.status_code == 503


def test_metrics_show_upstream_calls_and_errors(up_client, upstream):
    """/metrics counts upstream requests, failures and their time."""
    upstream.script = Script(tokens=[5, 6])
    up_client.post("/v1/completions", json={"model": "up", "prompt": "#", "max_tokens": 2})
    upstream.script = Script(status=500)
    up_client.post("/v1/completions", json={"model": "up", "prompt": "#", "max_tokens": 2})
    text = up_client.get("/metrics").get_data(as_text=True)
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("fauxpilot_upstream") and 'model="up"' in line}
    assert values['fauxpilot_upstream_requests_total{model="up"}'] >= 2
    assert values['fauxpilot_upstream_errors_total{model="up"}'] >= 1
    assert values['fauxpilot_upstream_seconds_total{model="up"}'] > 0


# -- the parts --------------------------------------------------------------------------


def test_parse_chunk_reads_both_logprob_shapes():
    """llama.cpp's content list and vLLM's token_id:N strings give the same tokens; text without ids is refused."""
    llama = {"choices": [{"text": "a", "logprobs": {"content": [
        {"id": 64, "logprob": -0.1, "top_logprobs": [{"id": 64, "logprob": -0.1}, {"id": 65, "logprob": -2.0}]}]},
        "finish_reason": None}]}
    vllm = {"choices": [{"text": "a", "logprobs": {"tokens": ["token_id:64"], "token_logprobs": [-0.1],
                                                   "top_logprobs": [{"token_id:64": -0.1, "token_id:65": -2.0}]},
                         "finish_reason": None}]}
    assert parse_chunk(llama) == parse_chunk(vllm)
    assert parse_chunk(llama).tokens[0].top == ((64, -0.1), (65, -2.0))
    with pytest.raises(UpstreamMisconfigured):
        parse_chunk({"choices": [{"text": "a", "logprobs": None}]})
    with pytest.raises(UpstreamMisconfigured):
        parse_chunk({"choices": [{"text": "a", "logprobs": {"tokens": ["a"], "token_logprobs": [0.0]}}]})
    with pytest.raises(UpstreamUnavailable):
        parse_chunk({"error": {"message": "boom"}})
    assert parse_chunk({"choices": [{"text": "", "finish_reason": "stop"}]}).finish_reason == "stop"


@pytest.mark.parametrize("entry, message", [
    ({"backend": "openai"}, "needs url"),
    ({"backend": "openai", "url": "localhost:8000"}, "needs url"),
    ({"backend": "openai", "url": "http://h:1/v1", "kind": "seq2seq"}, "only causal"),
    ({"url": "http://h:1/v1"}, 'need backend = "openai"'),
    ({"backend": "triton"}, "backend must be one of"),
])
def test_upstream_entries_are_validated(entry, message):
    """A bad upstream entry is a start-up error naming the model."""
    with pytest.raises(ConfigError, match=message):
        settings_from_mapping({"models": [{"name": "m", "source": "x", **entry}]})


def test_echo_with_logprobs_is_refused_upstream(up_client, upstream):
    """echo with logprobs needs the prompt's logprobs from local logits: 400 naming echo."""
    response = up_client.post("/v1/completions", json={"model": "up", "prompt": "#", "echo": True, "logprobs": 1})
    assert response.status_code == 400 and response.get_json()["error"]["param"] == "echo"
    upstream.script = Script(tokens=[5])
    echoed = up_client.post("/v1/completions", json={"model": "up", "prompt": "#", "echo": True, "max_tokens": 1})
    assert echoed.get_json()["choices"][0]["text"].startswith("#")
    assert json.dumps(upstream.bodies[-1]["prompt"])  # the echo request went upstream too


def test_llama_vscode_infill_on_an_upstream_entry(up_client, up_engines, upstream):
    """llama.vscode's /infill (FIM layout, its ring chunks as context) runs upstream; the reply is llama.cpp's shape."""
    engine = up_engines["up-fim"]
    upstream.script = Script(tokens=ids_of(engine, "return a + b"))
    body = {"model": "up-fim", "input_prefix": "def add(a, b):\n", "prompt": "    ", "input_suffix": "\n",
            "input_extra": [{"text": "import math\n", "filename": "util.py", "time": 1718000000000}],
            "n_predict": 16, "stream": False}
    response = up_client.post("/infill", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["content"] == "return a + b"
    sent = upstream.bodies[0]["prompt"]
    assert engine.tokenizer.decode(sent, skip_special_tokens=False).count("import math") == 1


def test_debug_page_api_on_an_upstream_entry(up_client, up_engines, upstream):
    """The debug API traces an upstream completion: its tokens with the upstream's logprobs and alternatives,
    the stop rule, the prompt's tokens unscored (no local logits)."""
    engine = up_engines["up"]
    tokens = ids_of(engine, "x = 1")
    upstream.script = Script(tokens=tokens)
    response = up_client.post("/ui/api/complete", json={"body": {"model": "up", "prompt": "#", "max_tokens": 3}})
    assert response.status_code == 200, response.get_data(as_text=True)
    (prompt,) = response.get_json()["prompts"]
    assert all(token["logprob"] is None for token in prompt["tokens"])
    (choice,) = prompt["choices"]
    assert [token["logprob"] for token in choice["tokens"]] == [-0.5] * 3
    assert choice["stop"]["rule"] == "max_tokens"
    assert upstream.bodies[0]["logprobs"] == 5
