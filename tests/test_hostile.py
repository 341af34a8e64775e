"""Hostile and malformed requests: every answer is a 4xx envelope or a 200, never a 5xx, and the app keeps serving."""
from __future__ import annotations

import json

import pytest

PROMPT = "def f(x):"

HOSTILE_BODIES = {
    "huge float": json.dumps({"prompt": PROMPT, "temperature": 1e308}).encode(),
    "huge integer": b'{"prompt": "x", "max_tokens": ' + b"9" * 400 + b"}",
    "negative huge n": b'{"prompt": "x", "n": -' + b"9" * 50 + b"}",
    "NaN": b'{"prompt": "x", "top_p": NaN}',
    "Infinity": b'{"prompt": "x", "presence_penalty": Infinity}',
    "deep JSON": b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "deep object": b'{"stream_options": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}",
    "invalid UTF-8": b'{"prompt": "\xff\xfe\xfa"}',
    "lone surrogate": b'{"prompt": "\\ud800"}',
    "NUL bytes": json.dumps({"prompt": "a\x00b\x00", "stop": ["\x00"], "max_tokens": 2}).encode(),
    "2 MB prompt": json.dumps({"prompt": "x = 1\n" * 350_000, "max_tokens": 1}).encode(),
    "10,000 prompts": json.dumps({"prompt": ["x"] * 10_000, "max_tokens": 1}).encode(),
    "10,000 stops": json.dumps({"prompt": PROMPT, "stop": ["a"] * 10_000}).encode(),
    "huge logit_bias": json.dumps({"prompt": PROMPT, "logit_bias": {str(i): 1 for i in range(100_000)}}).encode(),
    "logit_bias key overflow": json.dumps({"prompt": PROMPT, "logit_bias": {"9" * 40: 5}}).encode(),
    "array body": b"[1, 2, 3]",
    "string body": b'"hello"',
    "empty body": b"",
    "truncated JSON": b'{"prompt": "x", "max_tokens": ',
    "binary junk": bytes(range(256)) * 10,
    "prompt object": b'{"prompt": {"a": 1}}',
    "prompt of numbers": b'{"prompt": [1, 2, 3]}',
    "nested nulls": b'{"prompt": null, "stream_options": {"include_usage": null}}',
    "stream as string": b'{"prompt": "x", "stream": "true"}',
    "seed as float": b'{"prompt": "x", "seed": 1.5}',
    "echo with huge logprobs": json.dumps({"prompt": PROMPT, "echo": True, "logprobs": 10**9}).encode(),
    "suffix object": b'{"prompt": "x", "suffix": {"a": 1}}',
    "unicode model name": json.dumps({"prompt": "x", "model": "\u202e\U0001f600" * 1000}).encode(),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/engines/codegen/completions"])
def test_hostile_body_is_answered_without_a_5xx(client, name, path):
    """The body gets a JSON 4xx error envelope or a 200; the next normal request still works."""
    response = client.post(path, data=HOSTILE_BODIES[name], content_type="application/json")
    text = response.get_data(as_text=True)
    assert response.status_code < 500, text
    assert "Traceback" not in text
    if response.status_code != 200:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    ok = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
    assert ok.status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions/../../etc/passwd", "/v1/engines/%00/completions",
                                  "/v1/engines/" + "a" * 5000 + "/completions"])
def test_hostile_paths_are_4xx(client, path):
    """Odd paths get an error envelope, not a crash."""
    response = client.post(path, json={"prompt": PROMPT})
    assert 400 <= response.status_code < 500
    assert set(response.get_json()["error"]) == {"message", "type", "param", "code"}
