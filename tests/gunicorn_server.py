"""A real gunicorn server started from the project's gunicorn.conf.py, for the slow tests."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A gunicorn process started from the project's gunicorn.conf.py."""

    def __init__(self, tmp_path: Path, env: dict[str, str]):
        self.port = free_port()
        self.log_path = tmp_path / "gunicorn.log"
        environ = {**os.environ, "FAUXPILOT_BIND": f"127.0.0.1:{self.port}", **env}
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT, env=environ, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode()

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"gunicorn exited:\n{self.log_path.read_text()}"
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"server not ready in {timeout}s:\n{self.log_path.read_text()}")

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> set[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return {int(pid) for pid in out.split()}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@contextmanager
def serving(tmp: Path, model_entry: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """gunicorn serving one model, described by a ``[[models]]`` entry, from a config file of its own."""
    config = tmp / "models.toml"
    config.write_text(f"[[models]]\n{model_entry}")
    server = Server(tmp, {"FAUXPILOT_CONFIG": str(config), "FAUXPILOT_CACHE_DIR": str(tmp / "cache"), **(env or {})})
    try:
        server.wait_ready(120)
        yield server
    finally:
        server.stop()


def serving_tiny_model(model_dir: Path, tmp: Path, env: dict[str, str] | None = None):
    """gunicorn serving the tiny model as `tiny` (aliases codegen, copilot-codex); ``env`` adds settings."""
    return serving(tmp, f'name = "tiny"\naliases = ["codegen", "copilot-codex"]\nsource = "{model_dir}"\n'
                        'dtype = "float32"\ncontext_length = 256\n', env)
