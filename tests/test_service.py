"""The service under real gunicorn with the tiny model: a soak with hang-ups, and a worker killed mid-stream."""
from __future__ import annotations

import http.client
import json
import os
import signal
import time
from pathlib import Path

import pytest

from bench.soak import counted_requests, run_soak, summary
from tests.gunicorn_server import serving_tiny_model

pytestmark = pytest.mark.slow

SOAK_SECONDS = 60


def rss_kb(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """gunicorn serving the tiny model (one worker)."""
    with serving_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("service")) as server:
        yield server


def test_soak_with_hang_ups(tiny_server):
    """8 streaming clients for a minute, every 4th hanging up: no 5xx, no exception, RSS stable, all counted."""
    (worker,) = tiny_server.worker_pids()
    run_soak(tiny_server.url, 5, clients=8)  # warm up: first-touch memory, caches, metric files
    time.sleep(1)
    rss_before, counted_before = rss_kb(worker), counted_requests(tiny_server.url)
    result = run_soak(tiny_server.url, SOAK_SECONDS, clients=8)
    time.sleep(2)  # hang-ups are counted once the worker notices them
    rss_after, counted_after = rss_kb(worker), counted_requests(tiny_server.url)
    print(f"\nsoak: {summary(result, counted_after - counted_before)}\n"
          f"worker RSS {rss_before / 1024:.0f} MiB -> {rss_after / 1024:.0f} MiB "
          f"({(rss_after - rss_before) / 1024:+.0f} MiB)")
    assert result.requests > 100 and result.outcomes["completed"] > 50 and result.outcomes["hung up"] > 10
    assert set(result.statuses) == {200} and not result.errors
    assert not result.outcomes["cut short"] and not result.outcomes["error event"]
    assert counted_after - counted_before == result.requests
    assert rss_after - rss_before < 100 * 1024, "the worker's memory grew by more than 100 MiB"
    assert tiny_server.worker_pids() == {worker}


def test_worker_killed_mid_stream(tiny_server):
    """SIGKILL during a stream: the client's stream ends at once, a new worker takes slot 0 and serves."""
    (old,) = tiny_server.worker_pids()
    body = {"prompt": "x = 1", "max_tokens": 200, "stream": True, "logit_bias": {"0": -100, "1": -100, "2": -100}}
    conn = http.client.HTTPConnection("127.0.0.1", tiny_server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: {")
    os.kill(old, signal.SIGKILL)
    started = time.monotonic()
    try:
        while response.readline():
            pass
    except (OSError, http.client.HTTPException):
        pass  # a reset connection also ends it
    assert time.monotonic() - started < 10, "the stream hung after its worker died"
    conn.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and tiny_server.worker_pids() in (set(), {old}):
        assert tiny_server.proc.poll() is None, tiny_server.log_path.read_text()
        time.sleep(0.2)
    tiny_server.wait_ready(120)
    status, _, text = tiny_server.request("POST", "/v1/completions", {"prompt": "x = 1", "max_tokens": 4})
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 4
    slots = [line for line in tiny_server.log_path.read_text().splitlines() if "takes slot" in line]
    assert len(slots) == 2 and all(line.endswith("takes slot 0") for line in slots)
