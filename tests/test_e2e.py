"""End to end: real gunicorn, the real default model (SmolLM2 from its pip package), the openai SDK."""
from __future__ import annotations

import http.client
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.gunicorn_server import ROOT, Server

# What copilot-language-server 1.539.0 sends (../shared/copilot-requests.md).
COPILOT_BODY = json.loads((Path(__file__).parent / "data" / "copilot-request.json").read_text())

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """gunicorn on the default configuration, converting the GGUF into a fresh cache folder."""
    tmp = tmp_path_factory.mktemp("e2e")
    srv = Server(tmp, {"FAUXPILOT_CACHE_DIR": str(tmp / "cache")})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def sdk(server):
    """The official openai client pointed at the server."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="not-needed", max_retries=0)


def test_default_model_converted_and_listed(server, sdk):
    """The GGUF was converted to safetensors once, and /v1/models names SmolLM2 and its aliases."""
    log = server.log_path.read_text()
    assert "converting" in log and "SmolLM2-135M-Instruct" in log
    ids = [m.id for m in sdk.models.list().data]
    assert ids == ["smollm2-135m"]


def test_sdk_completion_is_sensible(sdk):
    """completions.create returns code that continues the prompt."""
    result = sdk.completions.create(model="codegen", prompt="def fibonacci(n):\n    if n < 2:\n",
                                    max_tokens=48, temperature=0)
    choice = result.choices[0]
    assert result.object == "text_completion" and result.id.startswith("cmpl-")
    assert choice.finish_reason in ("stop", "length")
    assert "return" in choice.text, choice.text
    assert result.usage.completion_tokens <= 48 and result.usage.prompt_tokens > 5


def test_sdk_stream_matches_whole(sdk):
    """Streaming through the SDK yields many chunks whose text equals the non-streamed text."""
    kwargs = dict(model="codegen", prompt="import os\n\ndef list_files(path):\n", max_tokens=32, temperature=0)
    whole = sdk.completions.create(**kwargs).choices[0].text
    chunks = list(sdk.completions.create(stream=True, **kwargs))
    assert len(chunks) > 3
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_sdk_bad_request_is_400(sdk):
    """An out-of-range field becomes openai.BadRequestError carrying the envelope."""
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model="codegen", prompt="x", temperature=5)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "temperature"


def test_copilot_request(server):
    """Copilot's exact request (suffix, stop list, extra fields, no model) streams a completion."""
    headers = {"Authorization": "Bearer tid=abc;exp=1;sku=free;proxy-ep=x", "OpenAI-Intent": "copilot-ghost",
               "X-Request-Id": "5d7c1c4e-0000-4000-8000-000000000001", "X-Copilot-Async": "true"}
    status, content_type, body = server.request("POST", "/v1/engines/codegen/completions", COPILOT_BODY, headers)
    assert status == 200 and content_type.startswith("text/event-stream")
    events = [line[len("data: "):] for line in body.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text.strip() and not any(stop in text for stop in COPILOT_BODY["stop"])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_metrics_sum_the_workers(server):
    """/metrics under gunicorn (multiprocess mode) counts the completions this module has made."""
    status, content_type, text = server.request("GET", "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    counts = {}
    for line in text.splitlines():
        if line.startswith("fauxpilot_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels] = float(value)
    assert counts.get('fauxpilot_requests_total{model="smollm2-135m",status="200"}', 0) >= 4, counts
    assert counts.get('fauxpilot_requests_total{model="-",status="400"}', 0) >= 1, counts
    tokens = next(line for line in text.splitlines() if line.startswith('fauxpilot_completion_tokens_total{'))
    assert float(tokens.rsplit(" ", 1)[1]) > 48


def test_abandoned_request_is_cancelled(server):
    """A client that hangs up before its answer is noticed while it waits, and its work stops."""
    # End-of-sequence tokens banned: the answer takes seconds, far longer than the client waits.
    body = {"prompt": "def f():\n", "max_tokens": 300, "temperature": 0, "logit_bias": {"0": -100, "2": -100}}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    time.sleep(0.3)
    conn.close()
    deadline = time.monotonic() + 10
    while "client went away" not in server.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log_path.read_text()
    assert "client went away: request cancelled" in log
    line = next(l for l in log.splitlines() if "cancelled (batch" in l)
    assert int(line.split(" generated")[0].rsplit(" ", 1)[1]) < 300
    assert server.request("GET", "/health")[0] == 200


def test_killed_worker_is_replaced_on_the_same_slot(server, sdk):
    """gunicorn replaces a killed worker; the replacement takes slot 0 again and serves."""
    (old,) = server.worker_pids()
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.worker_pids() in (set(), {old}):
        assert server.proc.poll() is None, f"gunicorn exited:\n{server.log_path.read_text()}"
        time.sleep(0.2)
    server.wait_ready()
    result = sdk.completions.create(model="codegen", prompt="def add(a, b):\n", max_tokens=8, temperature=0)
    assert result.choices[0].text
    slots = [line for line in server.log_path.read_text().splitlines() if "takes slot" in line]
    assert len(slots) == 2 and all(line.endswith("takes slot 0") for line in slots)


def test_seed_request_json_as_curl_sends_it(server):
    """The seed's request.json, posted the way `curl -d @request.json` does, gets a completion."""
    body = (ROOT / "tests" / "data" / "request.json").read_text()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/v1/engines/codegen2/completions", body=body,
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    response = conn.getresponse()
    result = json.loads(response.read())
    assert response.status == 200, result
    choice = result["choices"][0]
    assert choice["text"] and "\n" not in choice["text"]  # stop ["\n"] honoured
    assert choice["finish_reason"] in ("stop", "length")
    assert result["usage"]["prompt_tokens"] == 11


def test_reload_hands_over_without_a_gap(server):
    """HUP (systemctl reload) under load: the old worker serves until the new one has loaded the model,
    so no request fails and none waits for a model load; then the old worker leaves."""
    import threading

    (old,) = server.worker_pids()
    stop, results = threading.Event(), []

    def keep_asking(method: str, path: str, body: dict | None) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status = server.request(method, path, body)[0]
            except OSError as exc:
                status = repr(exc)
            results.append((path, status, time.monotonic() - started))

    completion = {"prompt": "def add(a, b):\n", "max_tokens": 4, "temperature": 0}
    askers = [threading.Thread(target=keep_asking, args=("GET", "/health", None)),
              threading.Thread(target=keep_asking, args=("POST", "/v1/completions", completion))]
    for asker in askers:
        asker.start()
    time.sleep(1)
    os.kill(server.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (old in server.worker_pids() or not server.worker_pids()):
        time.sleep(0.2)
    time.sleep(1)
    stop.set()
    for asker in askers:
        asker.join(60)
    assert len(results) > 20 and all(status == 200 for _, status, _ in results), \
        [r for r in results if r[1] != 200][:5]
    worst = max(seconds for _, _, seconds in results)
    assert worst < 3, f"a request waited {worst:.1f} s during the reload"
    log = server.log_path.read_text()
    assert old not in server.worker_pids() and "hands over to generation 1 (1 ready)" in log, log[-3000:]
