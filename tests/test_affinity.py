"""Session affinity: the shipped nginx site in front of two instances (one worker each) serving the tiny model.

Each instance keeps its own prefix cache, so an editor's requests must all reach one instance. These
tests send what each client sends to tell itself apart (Copilot's VScode-SessionId, a key, an
address) and find the instance that served each request by its X-Request-Id in the instances' logs.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from bench.client import metric_sums
from tests.gunicorn_server import Server, serving_tiny_model
from tests.test_nginx import nginx_path, running_nginx  # noqa: F401 (nginx_path is a fixture)

pytestmark = pytest.mark.slow

# Two instances on a 2-core machine: a core each, as two workers would get.
INSTANCE_ENV = {"FAUXPILOT_TRUSTED_PROXIES": "1", "FAUXPILOT_TORCH_THREADS": "1"}
EOS_BANNED = {"0": -100, "1": -100, "2": -100}  # the tiny model's special tokens: answers run to max_tokens
LONG = 150  # tokens of a stream that is cut off: prompt and answer fit the tiny model's 256-token window


class Editor:
    """One developer's client: the headers and the address that name it to nginx."""

    def __init__(self, name: str, headers: dict[str, str], address: str = "127.0.0.1"):
        self.name, self.headers, self.address = name, headers, address

    def prompt(self, keystroke: int) -> str:
        """The file this developer types, after ``keystroke`` keystrokes: the last prompt plus a few characters."""
        lines = [f"# {self.name}\n", "def total(values):\n", "    result = 0\n"]
        lines += [f"    result += values[{k}] * {k + 3}\n" for k in range(5)]
        return "".join(lines) + "    check(" + "".join(f"c{k}, " for k in range(keystroke))


def copilot(number: int) -> Editor:
    """A Copilot editor: its session id and machine id, and a token renewed now and then (not its key)."""
    return Editor(f"copilot-{number}", {"VScode-SessionId": f"{uuid.UUID(int=number * 7919)}1764000000000",
                                        "VScode-MachineId": f"{number:064x}", "Authorization": "Bearer tid=1;exp=2"})


def keyed(number: int) -> Editor:
    """A Continue (or OpenAI SDK) editor: its own key, sent from one shared address (an office NAT)."""
    return Editor(f"continue-{number}", {"Authorization": f"Bearer sk-dev-{number}", "api-key": f"sk-dev-{number}"},
                  "127.0.0.30")


def keyless(number: int) -> Editor:
    """A VSCode FauxPilot editor (axios mode) or llama.vscode: no key, only its machine's address."""
    return Editor(f"fauxpilot-{number}", {"User-Agent": "axios/1.5.0"}, f"127.0.0.{40 + number}")


EDITORS = [copilot(n) for n in range(6)] + [keyed(n) for n in range(4)] + [keyless(n) for n in range(4)]


class Pair:
    """Two instances behind nginx, and the way to tell which one served a request."""

    def __init__(self, instances: list[Server], port: int):
        self.instances, self.port = instances, port

    def served_by(self, request_id: str, timeout: float = 5.0) -> int:
        """The index of the instance whose log names ``request_id`` (its log line is written as the request ends)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [i for i, server in enumerate(self.instances)
                     if f"request {request_id} " in server.log_path.read_text()]
            if found or time.monotonic() > deadline:
                assert len(found) == 1, f"request {request_id} logged by instances {found}"
                return found[0]
            time.sleep(0.05)

    def log_line(self, request_id: str) -> str:
        """The app's log line of ``request_id``, from whichever instance wrote it."""
        server = self.instances[self.served_by(request_id)]
        (line,) = [line for line in server.log_path.read_text().splitlines() if f"request {request_id} " in line]
        return line

    def counters(self) -> list[dict[str, float]]:
        """Each instance's /metrics sums, read directly (through nginx they would come from one instance)."""
        return [metric_sums(server.request("GET", "/metrics")[2]) for server in self.instances]

    def complete(self, editor: Editor, keystroke: int, **body) -> tuple[int, dict, str]:
        """One whole completion of ``editor`` at ``keystroke`` through nginx: status, JSON body, request id."""
        request_id = f"{editor.name}-{uuid.uuid4().hex[:12]}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60, source_address=(editor.address, 0))
        try:
            payload = {"prompt": editor.prompt(keystroke), "max_tokens": 4, **body}
            conn.request("POST", "/v1/completions", json.dumps(payload),
                         {"Content-Type": "application/json", "X-Request-Id": request_id, **editor.headers})
            response = conn.getresponse()
            text = response.read().decode()
        finally:
            conn.close()
        return response.status, (json.loads(text) if text.startswith("{") else {"raw": text}), request_id


@contextmanager
def two_instances_behind_nginx(binary: str, tiny_model_dir: Path, tmp_factory) -> Iterator[Pair]:
    """Two gunicorn instances of the tiny model on their own ports, and the shipped nginx site in front."""
    with ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for name, value in INSTANCE_ENV.items():
            patch.setenv(name, value)
        instances = [stack.enter_context(serving_tiny_model(tiny_model_dir, tmp_factory.mktemp(f"instance{i}")))
                     for i in range(2)]
        nginx = stack.enter_context(running_nginx(binary, tmp_factory.mktemp("nginx"),
                                                  *(server.port for server in instances)))
        yield Pair(instances, nginx.port)


@pytest.fixture(scope="module")
def pair(nginx_path, tiny_model_dir, tmp_path_factory) -> Iterator[Pair]:  # noqa: F811 (the fixture above)
    """Two instances behind nginx, for the tests that leave both running."""
    with two_instances_behind_nginx(nginx_path, tiny_model_dir, tmp_path_factory) as running:
        yield running


def home(pair: Pair, editor: Editor) -> int:
    """The instance an editor's requests go to now (one probe request)."""
    status, _, request_id = pair.complete(editor, 0)
    assert status == 200
    return pair.served_by(request_id)


# -- an editor stays on one instance, and its keystrokes hit that instance's cache ------------------------


def test_one_editors_session_stays_on_one_instance_and_hits_its_cache(pair):
    """Eight keystrokes of one Copilot editor: one instance serves them all, from its cache after the first."""
    editor = copilot(100)
    before = pair.counters()
    served, cached = [], []
    for keystroke in range(8):
        status, body, request_id = pair.complete(editor, keystroke)
        assert status == 200, body
        served.append(pair.served_by(request_id))
        cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert len(set(served)) == 1, served
    assert all(tokens > 0 for tokens in cached[1:]), cached  # every keystroke after the first reused the last one
    after = pair.counters()
    mine, other = served[0], 1 - served[0]
    hits = after[mine]["fauxpilot_prefix_cache_hits"] - before[mine]["fauxpilot_prefix_cache_hits"]
    assert hits >= 7, (before[mine], after[mine])
    assert after[other].get("fauxpilot_requests_total") == before[other].get("fauxpilot_requests_total")
    assert after[other]["fauxpilot_prefix_cache_hits"] == before[other]["fauxpilot_prefix_cache_hits"]


def test_a_renewed_copilot_token_keeps_the_editor_on_its_instance(pair):
    """Copilot's Bearer token changes every ~30 min; its session id, hence its instance, does not."""
    editor = copilot(3)
    first = home(pair, editor)
    renewed = Editor(editor.name, {**editor.headers, "Authorization": "Bearer tid=2;exp=3;sku=free_limited_copilot"})
    assert [home(pair, renewed) for _ in range(3)] == [first] * 3


def test_several_editors_spread_over_both_instances_each_staying_on_one(pair):
    """Copilot sessions, keyed clients sharing an address and keyless clients: each sticks, together they spread."""
    homes: dict[str, set[int]] = {}
    for keystroke in range(3):
        for editor in EDITORS:
            status, body, request_id = pair.complete(editor, keystroke)
            assert status == 200, body
            homes.setdefault(editor.name, set()).add(pair.served_by(request_id))
    assert all(len(where) == 1 for where in homes.values()), homes
    used = [next(iter(where)) for where in homes.values()]
    assert set(used) == {0, 1}, homes
    for kind in ("copilot", "continue", "fauxpilot"):  # each kind of key spreads on its own too
        assert {home for name, home in zip(homes, used) if name.startswith(kind)} == {0, 1}, (kind, homes)


# -- streams and cancellation pass through ------------------------------------------------------------------


def test_closing_a_stream_through_nginx_cancels_it_on_the_instance(pair):
    """A client closing its stream makes nginx close the upstream connection: the instance logs 499, early."""
    editor = copilot(7)
    request_id = f"cancel-{uuid.uuid4().hex[:12]}"
    conn = http.client.HTTPConnection("127.0.0.1", pair.port, timeout=60)
    body = {"prompt": editor.prompt(1), "max_tokens": LONG, "stream": True, "logit_bias": EOS_BANNED}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", "X-Request-Id": request_id, **editor.headers})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = 0
    while events < 3:  # events arrive one by one (no buffering), so three come long before the last
        line = response.readline()
        assert line, "stream ended early"
        events += line.startswith(b"data: ")
    conn.sock.close()  # as an editor does on the next keystroke
    conn.close()
    line = pair.log_line(request_id)
    assert "status=499" in line and "client went away" in line, line
    generated = int(line.split("completion_tokens=")[1].split()[0])
    assert generated < LONG, line


# -- one instance reloaded, or killed ------------------------------------------------------------------------


def keep_sending(pair: Pair, editors: list[Editor], stop: threading.Event, results: list) -> None:
    """Send the editors' requests one after another until ``stop``; record (status, request id, body)."""
    keystroke = 0
    while not stop.is_set():
        for editor in editors:
            try:
                results.append(pair.complete(editor, keystroke % 8))
            except (OSError, http.client.HTTPException) as exc:
                results.append((None, {"exception": repr(exc)}, None))
        keystroke += 1


def test_reloading_one_instance_loses_no_request(pair):
    """HUP to one instance (systemctl reload) while its editors type through nginx: every request answers 200."""
    homes = {editor.name: home(pair, editor) for editor in EDITORS}
    target = 0
    theirs = [editor for editor in EDITORS if homes[editor.name] == target]
    server = pair.instances[target]
    old_workers = server.worker_pids()
    stop, results = threading.Event(), []
    sender = threading.Thread(target=keep_sending, args=(pair, theirs, stop, results))
    sender.start()
    try:
        time.sleep(1)
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the new worker serves once the old one has handed over and gone
            workers = server.worker_pids()
            if workers and not workers & old_workers:
                break
            time.sleep(0.2)
        time.sleep(2)  # and a few more requests to the new worker
    finally:
        stop.set()
        sender.join(60)
    assert workers and not workers & old_workers, (old_workers, workers)
    failed = [(status, body) for status, body, _ in results if status != 200]
    assert not failed and len(results) > 10, (failed, len(results))
    assert {pair.served_by(request_id) for _, _, request_id in results} == {target}


def test_killing_one_instance_moves_its_editors_with_only_the_request_in_flight_lost(nginx_path, tiny_model_dir,
                                                                                     tmp_path_factory):
    """SIGKILL one instance mid-stream: that stream fails, every later request of every editor answers 200."""
    with two_instances_behind_nginx(nginx_path, tiny_model_dir, tmp_path_factory) as doomed:
        homes = {editor.name: home(doomed, editor) for editor in EDITORS}
        victim = homes[EDITORS[0].name]
        in_flight: list = []

        def stream() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", doomed.port, timeout=60)
            body = {"prompt": EDITORS[0].prompt(2), "max_tokens": LONG, "stream": True, "logit_bias": EOS_BANNED}
            conn.request("POST", "/v1/completions", json.dumps(body),
                         {"Content-Type": "application/json", **EDITORS[0].headers})
            response = conn.getresponse()
            lines = []
            try:
                while line := response.readline():
                    lines.append(line)
                    if len(lines) == 2:
                        started.set()
            except (OSError, http.client.HTTPException) as exc:
                lines.append(repr(exc).encode())
            in_flight.append(b"".join(lines))

        started = threading.Event()
        thread = threading.Thread(target=stream)
        thread.start()
        assert started.wait(30)
        server = doomed.instances[victim]
        for pid in server.worker_pids() | {server.proc.pid}:  # the whole instance, as the OOM killer or a crash would
            os.kill(pid, signal.SIGKILL)
        thread.join(30)
        assert in_flight and b"data: [DONE]" not in in_flight[0]  # the request in flight was lost, visibly

        results = []
        for keystroke in range(3):
            for editor in EDITORS:
                results.append((editor.name, *doomed.complete(editor, keystroke)))
        failed = [(name, status, body) for name, status, body, _ in results if status != 200]
        assert not failed, failed
        survivor = 1 - victim
        assert {doomed.served_by(request_id) for *_, request_id in results} == {survivor}
        moved = [name for name, where in homes.items() if where == victim]
        assert moved, homes  # some editors did live on the killed instance
