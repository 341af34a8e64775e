"""deploy/nginx/fauxpilot-lite.conf: real nginx in front of real gunicorn serving the tiny model."""
from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from bench.nginx import SITE, command, nginx_binary, write_config
from tests.gunicorn_server import Server, free_port, serving_tiny_model

pytestmark = pytest.mark.slow

MAX_BODY = 4 * 1024 * 1024  # the app's max_request_bytes default
HEADER_TIMEOUT = 10  # the config's client_header_timeout and client_body_timeout, in seconds
CONN_LIMIT = 8  # the config's limit_conn per client address
CLIENT = "127.0.0.3"  # requests through nginx come from here, so the forwarded address differs from nginx's own
STREAM_BODY = {"prompt": "x = 1", "max_tokens": 200, "stream": True, "logit_bias": {"0": -100, "1": -100, "2": -100}}


class Nginx:
    """nginx in the foreground, as the current user, with all its files in a temporary folder."""

    def __init__(self, binary: str, tmp: Path, upstream_ports: list[int]):
        self.port = free_port()
        self.tmp = tmp
        write_config(tmp, self.port, upstream_ports)
        self.error_log = tmp / "error.log"
        self.output = open(tmp / "nginx.out", "w")
        self.proc = subprocess.Popen(command(binary, tmp, "-g", "daemon off;"),
                                     stdout=self.output, stderr=subprocess.STDOUT)

    def logs(self) -> str:
        """nginx's output and error log, for failure messages."""
        return "".join(p.read_text() for p in (self.tmp / "nginx.out", self.error_log) if p.exists())

    def wait_ready(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"nginx exited:\n{self.logs()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"nginx not listening in {timeout}s:\n{self.logs()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.output.close()


@contextmanager
def running_nginx(binary: str, tmp: Path, *upstream_ports: int) -> Iterator[Nginx]:
    """nginx with the shipped config in front of ``upstream_ports``."""
    nginx = Nginx(binary, tmp, list(upstream_ports))
    try:
        nginx.wait_ready()
        yield nginx
    finally:
        nginx.stop()


@pytest.fixture(scope="module")
def nginx_path() -> str:
    """The nginx executable; the tests that need it are skipped when it is not installed."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx; .ci/run installs it)")
    return binary


@pytest.fixture(scope="module")
def upstream(nginx_path, tiny_model_dir, tmp_path_factory) -> Iterator[Server]:
    """gunicorn serving the tiny model, believing one proxy's X-Forwarded-* headers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FAUXPILOT_TRUSTED_PROXIES", "1")
        with serving_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("upstream")) as server:
            yield server


@pytest.fixture(scope="module")
def proxy(nginx_path, upstream, tmp_path_factory) -> Iterator[Nginx]:
    """nginx with the shipped config in front of that gunicorn."""
    with running_nginx(nginx_path, tmp_path_factory.mktemp("nginx"), upstream.port) as nginx:
        yield nginx


def request(port: int, method: str, path: str, body: bytes | dict | None = None,
            headers: dict | None = None, timeout: float = 30):
    """One request from CLIENT: status, headers, body text."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(CLIENT, 0))
    payload = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.headers, response.read().decode()
    finally:
        conn.close()


def timed(port: int, method: str, path: str, body: dict | None = None, timeout: float = 10):
    """A request's status and how long its answer took, in seconds."""
    started = time.monotonic()
    status, _, _ = request(port, method, path, body, timeout=timeout)
    return status, time.monotonic() - started


def envelope(headers, text: str) -> dict:
    """The `error` object of an OpenAI error envelope sent as JSON."""
    assert headers.get_content_type() == "application/json", headers
    body = json.loads(text)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def app_log_lines(server: Server, request_id: str) -> list[str]:
    """The app's log lines naming ``request_id``."""
    return [line for line in server.log_path.read_text().splitlines() if request_id in line]


def raw_connection(port: int, timeout: float = 5) -> socket.socket:
    """A plain TCP connection to nginx from CLIENT."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(CLIENT, 0))


def is_closed(sock: socket.socket) -> bool:
    """Whether the peer has closed ``sock`` (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(1024) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def wait_closed(sock: socket.socket, timeout: float) -> bytes:
    """What the peer sends until it closes ``sock`` (fails if it is still open after ``timeout``)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"still open after {timeout}s") from None
    return received


# -- 1. completions pass through, streams unbuffered, forwarded headers believed --------------


def test_whole_completion_and_forwarded_headers(proxy, upstream):
    """A completion through nginx works; the app sees the client's address and host as nginx saw them."""
    request_id = f"nginx-whole-{uuid.uuid4().hex}"
    spoofed = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Prefix": "/spoofed"}  # a client's own claims
    status, headers, text = request(proxy.port, "POST", "/v1/completions", {"prompt": "x = 1", "max_tokens": 4},
                                    {"X-Request-Id": request_id, **spoofed})
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 4, text
    assert headers["X-Request-Id"] == request_id
    (line,) = [line for line in app_log_lines(upstream, request_id) if f"request {request_id} " in line]
    addresses = re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", line)
    if addresses:  # the log line names the client: the one nginx forwarded, not nginx itself
        assert addresses == [CLIENT], line
    status, _, text = request(proxy.port, "GET", "/copilot_internal/user", headers=spoofed)
    assert status == 200 and json.loads(text)["endpoints"]["api"] == f"http://127.0.0.1:{proxy.port}", text


def test_stream_is_not_buffered(proxy):
    """Server-sent events arrive one by one: the first long before the last."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60, source_address=(CLIENT, 0))
    started = time.monotonic()
    conn.request("POST", "/v1/completions", json.dumps(STREAM_BODY), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    arrivals = []
    for _ in range(1000):  # 200 token events and [DONE], with blank lines between
        line = response.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            arrivals.append(time.monotonic() - started)
    conn.close()
    assert len(arrivals) > 100, f"{len(arrivals)} events"
    first, last = arrivals[0], arrivals[-1]
    assert first < last / 4, f"first event at {first:.3f}s, last at {last:.3f}s"
    early = sum(t < (first + last) / 2 for t in arrivals)
    assert early > len(arrivals) / 4, f"only {early} of {len(arrivals)} events in the first half of the stream"


# -- 2. slow and idle clients stay in nginx -----------------------------------------------------


def test_slowloris_does_not_block_the_server(proxy):
    """40 clients trickling headers and 10 silent ones: /health and completions still answer at once."""
    slow = [raw_connection(proxy.port) for _ in range(40)]
    idle = [raw_connection(proxy.port) for _ in range(10)]
    partial = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 64
    started, latencies = time.monotonic(), []
    try:
        for byte in range(8):  # a byte on each slow connection every 2 s, 16 s at most
            round_started = time.monotonic()
            for sock in slow:
                try:
                    sock.send(partial[byte:byte + 1])
                except OSError:
                    pass  # nginx closed it: counted below
            if byte < 4:  # all 50 still open: nginx gives up on them only after its header timeout
                latencies.append(timed(proxy.port, "GET", "/health"))
                latencies.append(timed(proxy.port, "POST", "/v1/completions", {"prompt": "x = 1", "max_tokens": 4}))
            elif all(is_closed(sock) for sock in slow + idle):
                break
            time.sleep(max(0.0, 2 - (time.monotonic() - round_started)))
        elapsed = time.monotonic() - started
        still_open = sum(not is_closed(sock) for sock in slow + idle)
    finally:
        for sock in slow + idle:
            sock.close()
    assert all(status == 200 for status, _ in latencies), latencies
    assert max(seconds for _, seconds in latencies) < 2, latencies
    assert still_open == 0 and elapsed < HEADER_TIMEOUT + 5, f"{still_open} open after {elapsed:.1f}s"


# -- 3. bodies: too large, too slow -----------------------------------------------------------


def test_body_over_limit_is_413_envelope(proxy, upstream):
    """A body over 4 MiB gets nginx's 413 envelope without reaching the app; 4 MiB exactly gets through."""
    request_id = f"nginx-large-{uuid.uuid4().hex}"
    with raw_connection(proxy.port, timeout=10) as sock:  # headers only: nginx answers before any body
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"X-Request-Id: {request_id}\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        text = response.read().decode()
    assert response.status == 413, text
    assert envelope(response.headers, text)["code"] == "request_entity_too_large"
    assert "X-Request-Id" not in response.headers and not app_log_lines(upstream, request_id)
    exact = json.dumps({"prompt": "x = 1", "max_tokens": 1}).encode().ljust(MAX_BODY)
    status, _, text = request(proxy.port, "POST", "/v1/completions", exact)
    assert status == 200, text


def test_slow_body_is_dropped_by_nginx(proxy, upstream):
    """A body trickling in is held by nginx, never the app, and dropped once it stalls for client_body_timeout."""
    request_id = f"nginx-slow-body-{uuid.uuid4().hex}"
    with raw_connection(proxy.port) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"X-Request-Id: {request_id}\r\nContent-Length: 100\r\n\r\n".encode())
        for byte in b'{"pr':  # 1 byte every 2 s: each within the timeout, so nginx keeps reading
            time.sleep(2)
            assert not is_closed(sock)
            sock.sendall(bytes([byte]))
            last_sent = time.monotonic()
        sock.setblocking(True)
        received = wait_closed(sock, HEADER_TIMEOUT + 10)
        stalled = time.monotonic() - last_sent
    assert HEADER_TIMEOUT - 2 < stalled < HEADER_TIMEOUT + 3, f"closed {stalled:.1f}s after the last byte"
    assert received == b"", received  # nginx logs a 408 but answers nothing
    assert not app_log_lines(upstream, request_id)


def test_connection_limit_per_address(proxy):
    """A ninth request in progress from one address gets nginx's 429 envelope; freed slots serve again."""
    held = []
    try:
        for _ in range(CONN_LIMIT):  # headers in, body pending: counted, and held by nginx (not gunicorn)
            sock = raw_connection(proxy.port)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n")
            held.append(sock)
        time.sleep(0.5)
        status, headers, text = request(proxy.port, "GET", "/health", timeout=5)
        assert status == 429 and headers["Retry-After"] == "1", (status, text)
        assert envelope(headers, text)["type"] == "rate_limit_error"
    finally:
        for sock in held:
            sock.close()
    statuses = []
    for _ in range(20):  # nginx frees the slots as it sees the connections close
        statuses.append(request(proxy.port, "GET", "/health", timeout=5)[0])
        if statuses[-1] == 200:
            break
        time.sleep(0.1)
    assert statuses[-1] == 200, statuses


# -- 4. upstream down ----------------------------------------------------------------------------


def test_upstream_down_is_502_envelope(nginx_path, tmp_path):
    """With nothing listening behind it, nginx answers 502 in the envelope, at once."""
    with running_nginx(nginx_path, tmp_path, free_port()) as nginx:
        for method, path, body in (("GET", "/health", None), ("POST", "/v1/completions", {"prompt": "x"})):
            started = time.monotonic()
            status, headers, text = request(nginx.port, method, path, body, timeout=10)
            assert status == 502 and time.monotonic() - started < 5, (status, text)
            error = envelope(headers, text)
            assert error["type"] == "server_error" and error["code"] == "bad_gateway"


def test_every_error_page_is_an_envelope():
    """Each error page in the config is valid JSON in OpenAI's envelope, returned with its own status."""
    text = SITE.read_text()
    pages = re.findall(r"location @fauxpilot_(\d+) \{[^}]*?return (\d+) '([^']*?)(?:\\n)?';", text)
    declared = re.findall(r"error_page (\d+) @fauxpilot_(\d+);", text)
    assert {code for code, _ in declared} == {"413", "429", "502", "503", "504"}
    assert all(code == page for code, page in declared)
    assert {page for page, _, _ in pages} == {code for code, _ in declared}
    for page, status, body in pages:
        assert page == status
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] is None
        assert error["type"] == ("server_error" if status.startswith("5") else
                                 "rate_limit_error" if status == "429" else "invalid_request_error")
