"""A minimal LSP client over stdio that drives GitHub Copilot's language server like an editor does."""
from __future__ import annotations

import itertools
import json
import subprocess
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any


class LspClient:
    """Speaks JSON-RPC with Content-Length framing to a language server process; answers its requests."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path, settings: dict, log_path: Path):
        self.settings = settings
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=env, cwd=cwd)
        self.ids = itertools.count(1)
        self.pending: dict[int, Future] = {}
        self.messages: list[dict] = []  # notifications from the server (log messages, status)
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _send(self, message: dict) -> None:
        body = json.dumps(message).encode()
        with self.lock:
            self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            self.proc.stdin.flush()

    def request(self, method: str, params: Any, timeout: float = 60) -> Any:
        """Send a request and wait for its result (raise on an error reply)."""
        request_id = next(self.ids)
        future: Future = Future()
        self.pending[request_id] = future
        self._send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        return future.result(timeout)

    def notify(self, method: str, params: Any) -> None:
        """Send a notification."""
        self._send({"jsonrpc": "2.0", "method": method, "params": params})

    def _setting(self, section: str | None) -> Any:
        value: Any = self.settings
        for part in (section or "").split("."):
            if not part:
                continue
            value = value.get(part) if isinstance(value, dict) else None
        return value

    def _answer(self, message: dict) -> None:
        method, params = message["method"], message.get("params") or {}
        result: Any = None
        if method == "workspace/configuration":
            result = [self._setting(item.get("section")) for item in params.get("items", [])]
        self._send({"jsonrpc": "2.0", "id": message["id"], "result": result})

    def _read(self) -> None:
        stream = self.proc.stdout
        while True:
            length = 0
            while True:
                line = stream.readline()
                if not line:
                    return
                if line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            message = json.loads(stream.read(length))
            if "method" in message and "id" in message:
                self._answer(message)
            elif "method" in message:
                self.messages.append(message)
            else:
                future = self.pending.pop(message["id"], None)
                if future is not None:
                    if "error" in message:
                        future.set_exception(RuntimeError(json.dumps(message["error"])))
                    else:
                        future.set_result(message.get("result"))

    def close(self) -> None:
        """Shut the server down (politely, then by force)."""
        try:
            self.request("shutdown", None, timeout=10)
            self.notify("exit", None)
            self.proc.wait(10)
        except Exception:  # noqa: BLE001 - a server that does not answer is killed below
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.log.close()
