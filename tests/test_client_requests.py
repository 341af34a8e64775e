"""What the other clients send, replayed with their headers: VSCode FauxPilot, Continue, LangChain."""
from __future__ import annotations

import json

import pytest

from app.engine.stopping import find_stop

# VSCode FauxPilot plugin (Venthe.fauxpilot 1.1.8+, settings at their defaults) in its "axios" mode:
# POST {server}/{engine}/completions with axios 1.5.0, no Authorization header at all, no streaming; it
# reads only choices[0].text. tests/test_clients.py::test_vscode_fauxpilot_plugin makes the same request
# (and its "openai" modes') with the pinned libraries against gunicorn.
FAUXPILOT_PLUGIN = {
    "path": "/v1/engines/codegen/completions",
    "headers": {"Accept": "application/json, text/plain, */*", "Content-Type": "application/json",
                "User-Agent": "axios/1.5.0", "Accept-Encoding": "gzip, compress, deflate, br"},
    "body": {"model": "fastertransformer", "prompt": "def hello_world():\n    ", "max_tokens": 200,
             "temperature": 0.1, "stop": ["\n"]},
}
# The stops Continue's autocomplete sends for a model on its default FIM template (getStopTokens.ts).
CONTINUE_STOPS = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>", "</fim_middle>",
                  "</code>", "\n\n", "\r\n\r\n", "/src/", "#- coding: utf-8", "```"]
# Continue's autocomplete with provider "openai": the FIM tokens already in the prompt, no suffix,
# streamed to /v1/completions (temperature 0.01 when none is configured).
CONTINUE_PLAIN = {
    "path": "/v1/completions",
    "headers": {"Content-Type": "application/json", "Authorization": "Bearer sk-continue", "api-key": "sk-continue"},
    "body": {"model": "tiny-fim", "prompt": "<fim_prefix>def add(a, b):\n    <fim_suffix>\n<fim_middle>",
             "max_tokens": 32, "temperature": 0.01, "stop": CONTINUE_STOPS, "stream": True},
}
# Continue with a FIM provider (provider "mistral", @continuedev/openai-adapters' fimStream): prefix and
# suffix streamed to /v1/fim/completions.
CONTINUE_FIM = {
    "path": "/v1/fim/completions",
    "headers": {"Content-Type": "application/json", "Accept": "application/json", "x-api-key": "sk-continue",
                "Authorization": "Bearer sk-continue", "User-Agent": "node-fetch"},
    "body": {"model": "tiny-fim", "prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))\n",
             "max_tokens": 32, "max_completion_tokens": 32, "temperature": 0.01, "stop": CONTINUE_STOPS,
             "stream": True},
}
# LangChain's OpenAI LLM (langchain-openai 1.7.4 over openai 3.57.0) with max_tokens=16 and its default
# temperature, asked for two prompts by batch() or generate(): one request, the prompts as a list, an
# explicit null for logprobs and seed. invoke() sends the same with a one-prompt list. Recorded from the
# real client; tests/test_clients.py::test_langchain_openai_llm drives it against gunicorn.
LANGCHAIN = {
    "path": "/v1/completions",
    "headers": {"Content-Type": "application/json", "Accept": "application/json",
                "Authorization": "Bearer sk-langchain", "User-Agent": "OpenAI/Python 3.57.0",
                "X-Stainless-Lang": "python", "X-Stainless-Retry-Count": "0"},
    "body": {"model": "codegen", "prompt": ["def add(a, b):\n", "class Stack:\n"], "frequency_penalty": 0,
             "logprobs": None, "max_tokens": 16, "n": 1, "presence_penalty": 0, "seed": None,
             "temperature": 0.7, "top_p": 1},
}


def replay(client, recorded: dict):
    """Send a recorded request as the client does (exact headers, body bytes)."""
    return client.post(recorded["path"], data=json.dumps(recorded["body"]), headers=recorded["headers"])


def stream_text(response) -> tuple[str, list[dict]]:
    """The concatenated text of an event stream and its chunks."""
    raw = response.get_data(as_text=True)
    events = [e[len("data: "):] for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]", raw[-200:]
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks), chunks


def test_vscode_fauxpilot_plugin(client):
    """No Authorization, engine in the path, `model: fastertransformer`: choices[0].text, one line."""
    response = replay(client, FAUXPILOT_PLUGIN)
    assert response.status_code == 200
    body = response.get_json()
    assert isinstance(body["choices"][0]["text"], str) and "\n" not in body["choices"][0]["text"]
    assert body["model"] == "tiny"  # the engine picked the model, not the body's "fastertransformer"


@pytest.mark.parametrize("recorded", [CONTINUE_PLAIN, CONTINUE_FIM], ids=["fim-in-prompt", "fim-route"])
def test_continue_autocomplete(client, recorded):
    """Continue's two autocomplete requests stream text that honours its stops."""
    response = replay(client, recorded)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    text, chunks = stream_text(response)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert find_stop(text, tuple(recorded["body"]["stop"])) is None


def test_continue_fim_route_fills_the_middle(client, engines, monkeypatch):
    """Through /v1/fim/completions the suffix reaches the model's FIM template (it is not ignored)."""
    engine = engines["tiny-fim"]
    requests = []
    real_prepare = engine.preparer.prepare  # behind both engine.prepare and engine.prepare_all

    def recording_prepare(*args, **kwargs):
        requests.append(real_prepare(*args, **kwargs))
        return requests[-1]

    monkeypatch.setattr(engine.preparer, "prepare", recording_prepare)
    response = replay(client, CONTINUE_FIM)
    assert response.status_code == 200
    (request,) = requests
    assert request.used_fim
    prompt_text = engine.tokenizer.decode(request.prompt_ids)
    assert CONTINUE_FIM["body"]["suffix"].strip() in prompt_text and "<fim_middle>" in prompt_text


def test_langchain_prompt_list_with_nulls(client):
    """A list of prompts with explicit nulls: one choice per prompt, in order."""
    response = replay(client, LANGCHAIN)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in body["choices"])
    assert body["usage"]["completion_tokens"] >= 2
