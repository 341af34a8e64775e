"""The ui blueprint through Flask's test client: the pages, the debug API's facts, the reports API, and replayed
editing sessions counted and judged through the real completion routes."""
from __future__ import annotations

import json

import pytest

from app import create_app
from app.usage import first_line, key_label

from .test_api import assert_envelope, pick_stops

KEY = "alpha-key-0123"
PROMPT = "def fibonacci(n):\n    "
NO_EOS = {"0": -100, "1": -100, "2": -100}  # the tiny model's special ids: completions run to max_tokens


def debug(http, body: dict, **fields):
    """POST the debug API (OpenAI shape unless ``client`` is given) and return the trace."""
    response = http.post("/ui/api/complete", json={"body": body, **fields})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


@pytest.fixture()
def fresh_app(tiny_settings, engines, tmp_path):
    """The app with a usage database of its own (an empty cache folder)."""
    return create_app(tiny_settings.replace(cache_dir=tmp_path), engines=engines.values())


@pytest.fixture()
def keyed_app(tiny_settings, engines, tmp_path):
    """The app with an API key and a usage database of its own."""
    return create_app(tiny_settings.replace(cache_dir=tmp_path, api_keys=(KEY,)), engines=engines.values())


# -- pages --------------------------------------------------------------------------------


@pytest.mark.parametrize("path, marker", [("/ui/", 'id="prompt-tokens"'), ("/ui/reports", 'id="chart-requests"')])
def test_pages_load_without_a_key_and_reference_only_local_files(keyed_app, path, marker):
    """The pages are public (they ask for the key themselves) and name no outside URL: they work offline."""
    client = keyed_app.test_client()
    response = client.get(path)
    assert response.status_code == 200 and response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert marker in html and "http://" not in html and "https://" not in html
    for asset in ("static/ui.css", "static/common.js"):
        assert asset in html
        assert client.get("/ui/" + asset).status_code == 200
    for script in ("debug.js", "reports.js", "common.js", "ui.css"):
        text = client.get(f"/ui/static/{script}").get_data(as_text=True)
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text


def test_ui_apis_obey_the_keys(keyed_app):
    """Without the key the APIs answer 401 envelopes; with it, 200."""
    client = keyed_app.test_client()
    body = {"body": {"prompt": PROMPT, "max_tokens": 2}}
    assert_envelope(client.post("/ui/api/complete", json=body), 401, "authentication_error")
    assert_envelope(client.get("/ui/api/usage"), 401, "authentication_error")
    headers = {"Authorization": f"Bearer {KEY}"}
    assert client.post("/ui/api/complete", json=body, headers=headers).status_code == 200
    assert client.get("/ui/api/usage", headers=headers).status_code == 200


# -- the debug API ---------------------------------------------------------------------------


def test_debug_completion_is_the_routes_completion(client):
    """The same greedy body gives the same text through the debug API as through /v1/completions."""
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    served = client.post("/v1/completions", json=body).get_json()
    trace = debug(client, body)
    (prompt,) = trace["prompts"]
    (choice,) = prompt["choices"]
    assert choice["text"] == served["choices"][0]["text"]
    assert choice["finish_reason"] == served["choices"][0]["finish_reason"]
    assert trace["route"] == "/v1/completions" and trace["model"] == "tiny" and trace["context_length"] == 256
    healed = 1 if prompt["healing"] else 0
    assert len(prompt["tokens"]) + healed == served["usage"]["prompt_tokens"]


def test_debug_trace_tokens_logprobs_and_stop(client, engine):
    """Prompt tokens are the model prompt's (ids and text), scored after the first; generated tokens carry
    logprobs, alternatives, and join into the text; the stop names max_tokens."""
    trace = debug(client, {"prompt": "x = 1\ny = ", "max_tokens": 6, "temperature": 0, "logit_bias": NO_EOS})
    prompt = trace["prompts"][0]
    ids = [token["id"] for token in prompt["tokens"]]
    assert engine.decode(ids) + (prompt["healing"]["text"] if prompt["healing"] else "") == "x = 1\ny = "
    assert prompt["tokens"][0]["logprob"] is None
    assert all(t["logprob"] is not None and len(t["top"]) == 5 for t in prompt["tokens"][1:])
    assert not any(t["special"] for t in prompt["tokens"])
    (choice,) = prompt["choices"]
    assert len(choice["tokens"]) == 6
    for token in choice["tokens"]:
        assert token["logprob"] <= 0 and len(token["top"]) == 5
        assert token["top"][0]["logprob"] >= token["logprob"] - 1e-5  # greedy: the pick is the most likely
    assert choice["stop"] == {"rule": "max_tokens", "detail": "6", "after_tokens": 6, "cut_at": None}
    timings = prompt["timings"]
    assert timings["total_ms"] > 0 and timings["first_token_ms"] is not None and timings["queued_ms"] >= 0


def test_debug_stop_string_is_named_with_its_place(client):
    """A stop string that fired is named, with where the text was cut."""
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "logit_bias": NO_EOS}
    text = debug(client, body)["prompts"][0]["choices"][0]["text"]
    (stop,) = pick_stops(text)
    choice = debug(client, {**body, "stop": [stop]})["prompts"][0]["choices"][0]
    assert choice["stop"]["rule"] == "stop_string" and choice["stop"]["detail"] == stop
    assert choice["text"] == text[:text.index(stop)] and choice["stop"]["cut_at"] == text.index(stop)
    assert choice["finish_reason"] == "stop"


def test_debug_fim_layout_shows_special_tokens(client):
    """A FIM model's prompt shows its template's special tokens, flagged, around prefix and suffix."""
    trace = debug(client, {"model": "tiny-fim", "prompt": "def f(x):\n", "suffix": "\n    return y\n",
                           "max_tokens": 4, "temperature": 0})
    prompt = trace["prompts"][0]
    assert prompt["fim"] is True and "{prefix}" in prompt["fim_template"]
    specials = [t["text"] for t in prompt["tokens"] if t["special"]]
    assert len(specials) >= 3
    assert all(special in prompt["fim_template"] for special in specials)


def test_debug_reused_prefix_and_healing(client):
    """A second run of the same prompt reuses it from the prefix cache; a prompt ending mid-token is healed."""
    # Prefill blocks are 32 tokens at least (kvcache.block_bounds): a prompt of several blocks.
    body = {"prompt": "".join(f"import module_{i}\n" for i in range(20)) + "def main():\n", "max_tokens": 3,
            "temperature": 0}
    debug(client, body)
    again = debug(client, body)["prompts"][0]
    assert again["reused_tokens"] > 0
    if again["healing"]:
        assert again["healing"]["candidates"] >= 2
        assert again["choices"][0]["tokens"][0]["healed"] is True


def test_debug_truncation_is_reported(client):
    """A prompt longer than the window is cut at its start: the trace says by how many tokens."""
    long_prompt = "".join(f"value_{i} = {i}\n" for i in range(200))
    prompt = debug(client, {"prompt": long_prompt, "max_tokens": 4})["prompts"][0]
    assert prompt["truncation"]["prefix_tokens"] > 0
    assert len(prompt["tokens"]) <= 256


@pytest.mark.parametrize("client_name, body, route", [
    ("copilot", {"prompt": PROMPT, "suffix": "", "max_tokens": 3, "extra": {"language": "python"}},
     "/v1/engines/codegen/completions"),
    ("fauxpilot", {"model": "fastertransformer", "prompt": PROMPT, "max_tokens": 3},
     "/v1/engines/codegen/completions"),
    ("infill", {"input_prefix": "def f(x):\n", "input_suffix": "\n", "n_predict": 3}, "/infill"),
])
def test_debug_client_shapes(client, client_name, body, route):
    """Each client's body is read as its route reads it; the trace names that route."""
    trace = debug(client, body, client=client_name, engine="codegen")
    assert trace["route"] == route and trace["client"] == client_name
    assert trace["prompts"][0]["choices"][0]["stop"]["after_tokens"] <= 3


def test_debug_stream_sends_deltas_then_the_trace(client):
    """Streamed: each delta as it comes, then the trace, whose text is the deltas joined."""
    response = client.post("/ui/api/complete", json={"stream": True, "body": {
        "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logit_bias": NO_EOS}})
    events = [json.loads(payload) for payload in sse_payloads_without_done(response)]
    deltas = [e["delta"]["text"] for e in events if "delta" in e]
    (trace,) = [e["trace"] for e in events if "trace" in e]
    assert "trace" in events[-1] and deltas
    assert "".join(deltas) == trace["prompts"][0]["choices"][0]["text"]


def sse_payloads_without_done(response) -> list[str]:
    """The data of every event (the debug stream ends with its trace, not with [DONE])."""
    try:
        raw = response.get_data(as_text=True)
    finally:
        response.close()
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = raw[:-2].split("\n\n")
    assert all(event.startswith("data: ") for event in events)
    return [event[len("data: "):] for event in events]


@pytest.mark.parametrize("body, param", [
    ({"client": "emacs", "body": {"prompt": "x"}}, "client"),
    ({"body": "not an object"}, "body"),
    ({}, "body"),
    ({"body": {"prompt": "x", "max_tokens": -1}}, "max_tokens"),
    ({"client": "infill", "body": {"input_prefix": 3}}, "input_prefix"),
])
def test_debug_bad_requests_are_400_envelopes(client, body, param):
    """A bad debug body, or a bad client body inside it, is a 400 naming the field."""
    assert_envelope(client.post("/ui/api/complete", json=body), 400, param=param)


def test_debug_unknown_model_is_404(client):
    """An unknown model is a 404, as on the real routes."""
    assert_envelope(client.post("/ui/api/complete", json={"body": {"prompt": "x", "model": "nope"}}), 404,
                    param="model", code="model_not_found")


def test_openapi_documents_the_ui_apis(client):
    """/openapi.json has both ui APIs and their schemas."""
    document = client.get("/openapi.json").get_json()
    assert "post" in document["paths"]["/ui/api/complete"]
    assert "get" in document["paths"]["/ui/api/usage"]
    assert {"DebugRequest", "Trace", "UsageReport"} <= set(document["components"]["schemas"])


# -- usage reports through the routes -------------------------------------------------------------


def test_usage_reports_off_answer_404(tiny_settings, engines, tmp_path):
    """With usage_reports off nothing is written and the reports API is a 404."""
    app = create_app(tiny_settings.replace(cache_dir=tmp_path, usage_reports=False), engines=engines.values())
    client = app.test_client()
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
    assert_envelope(client.get("/ui/api/usage"), 404)
    assert not (tmp_path / "usage.sqlite3").exists()


@pytest.mark.parametrize("days", ["0", "401", "x", "²", "-1"])
def test_usage_days_are_checked(fresh_app, days):
    """days outside 1..400, or not a plain number, is a 400 naming it."""
    assert_envelope(fresh_app.test_client().get(f"/ui/api/usage?days={days}"), 400, param="days")


def test_replayed_sessions_are_counted_and_judged(keyed_app, tmp_path):
    """Two editors replayed through the real routes: one accepts a completion whole, one its first line, one is
    ignored, one request is abandoned mid-stream; the reports, /metrics and the database agree."""
    client = keyed_app.test_client()
    auth = {"Authorization": f"Bearer {KEY}"}
    copilot = {**auth, "VScode-SessionId": "vscode-session-1"}
    newline = {**NO_EOS, "263": 8}  # the tiny tokenizer's "\n   ": completions of several lines

    def complete(prompt, headers, path="/v1/engines/codegen/completions", **fields):
        body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "logit_bias": newline,
                "extra": {"language": "python"}, **fields}
        response = client.post(path, json=body, headers=headers)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()["choices"][0]["text"]

    # Copilot session: accept whole, then accept only the first line, then ignore.
    first = "# Path: zebra_marker_91.py\ndef fib(n):\n"
    shown = complete(first, copilot)
    assert shown.strip()
    second = first + shown + "\n"
    shown_again = complete(second, copilot)  # accepts `shown` whole
    line = first_line(shown_again)
    assert line.strip() and shown_again.rstrip() != line, shown_again
    third = second + line + "\n    return 0\n"
    shown_third = complete(third, copilot)  # accepts the first line of `shown_again`
    complete(third + "# something else entirely\n", copilot)  # ignores `shown_third`
    # An OpenAI client elsewhere (no session header: its address is the session): one request abandoned.
    stream = client.post("/v1/completions", json={"prompt": "package main\n", "max_tokens": 50, "stream": True,
                                                   "logit_bias": NO_EOS}, headers=auth, buffered=False)
    assert stream.status_code == 200
    stream.close()  # the editor moved on before the end
    complete("// Path: main.go\npackage main\n", auth, "/v1/completions", model="tiny", extra=None)

    report = client.get("/ui/api/usage?days=7", headers=auth).get_json()
    totals = report["totals"]
    assert totals["requests"] == 6
    assert totals["shown"] == 5  # the abandoned stream was not shown
    assert totals["accepted"] == 2 and totals["accepted_whole"] == 1
    assert totals["acceptance_rate"] == pytest.approx(2 / 5)
    assert [k["key"] for k in report["keys"]] == [key_label(KEY)]
    languages = {entry["language"]: entry for entry in report["languages"]}
    assert languages["python"]["requests"] == 4 and languages["python"]["accepted"] == 2
    assert languages["go"]["requests"] == 1 and languages["unknown"]["requests"] == 1
    assert report["days"][-1]["requests"] == 6 and len(report["days"]) == 7
    assert report["totals"]["latency_ms"]["p50"] > 0
    assert totals["completion_tokens"] >= 50

    metrics = client.get("/metrics", headers=auth).get_data(as_text=True)
    assert 'fauxpilot_completions_accepted_total{model="tiny",part="whole"} 1.0' in metrics
    assert 'fauxpilot_completions_accepted_total{model="tiny",part="first_line"} 1.0' in metrics
    assert 'fauxpilot_completions_shown_total{model="tiny"} 5.0' in metrics

    stored = b"".join(path.read_bytes() for path in tmp_path.glob("usage.sqlite3*"))
    assert b"zebra_marker_91" not in stored and KEY.encode() not in stored
    assert shown_again.strip().encode() not in stored


def test_usage_report_days_have_no_gaps(fresh_app):
    """Every day of the period is listed, empty ones with zeros and no percentiles."""
    report = fresh_app.test_client().get("/ui/api/usage?days=3").get_json()
    assert [d["requests"] for d in report["days"]] == [0, 0, 0]
    assert report["days"][0]["latency_ms"]["p50"] is None and report["totals"]["acceptance_rate"] is None
    assert len(report["latency_buckets_ms"]) == 13


def test_grafana_dashboard_queries_metrics_the_server_exports(client):
    """Every fauxpilot_* series the dashboard queries is in /metrics once a completion was shown and accepted."""
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parents[1] / "deploy" / "grafana" / "fauxpilot-lite.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"fauxpilot_[a-z_]+", target["expr"])}
    assert "fauxpilot_completions_accepted_total" in queried and "fauxpilot_completions_shown_total" in queried
    prompt = "def zebra(n):\n"
    shown = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                 "logit_bias": NO_EOS}).get_json()["choices"][0]["text"]
    client.post("/v1/completions", json={"prompt": prompt + shown + "\n", "max_tokens": 1})
    exported = client.get("/metrics").get_data(as_text=True)
    missing = sorted(name for name in queried if not re.search(rf"^{name}[{{ ]", exported, re.MULTILINE))
    assert not missing, missing


def test_copilot_token_counts_under_the_key_that_fetched_it(keyed_app):
    """A Copilot token minted here is reported under its key's label, not as another key."""
    client = keyed_app.test_client()
    token = client.get("/copilot_internal/v2/token", headers={"Authorization": f"token {KEY}",
                                                              "api-key": KEY}).get_json()["token"]
    response = client.post("/v1/engines/codegen/completions", json={"prompt": "x = ", "max_tokens": 2},
                           headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    report = client.get("/ui/api/usage?days=1", headers={"Authorization": f"Bearer {KEY}"}).get_json()
    assert [(k["key"], k["requests"]) for k in report["keys"]] == [(key_label(KEY), 1)]
