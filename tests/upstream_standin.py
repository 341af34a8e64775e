"""A small OpenAI-compatible completions server for the upstream tests: it records what it receives and
streams a scripted list of token ids back, in llama.cpp's or vLLM's logprobs shape."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Script:
    """What the stand-in answers next: a status (and error body), or these tokens one event each."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    status: int = 200
    error: dict | None = None
    shape: str = "llama.cpp"  # or "vllm": logprobs as OpenAI's tokens/token_logprobs with "token_id:N"
    delay: float = 0.0  # seconds between events
    break_after: int | None = None  # drop the connection after this many tokens


class StandIn:
    """The stand-in server on a free loopback port; ``bodies`` holds every completions request it received."""

    def __init__(self):
        self.script = Script()
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.closed_early = threading.Event()  # the client closed a stream before its end
        self.sent: list[int] = []  # tokens of the last stream actually written
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                payload = json.dumps({"object": "list", "data": [{"id": "standin"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.bodies.append(body)
                stand_in.headers.append(dict(self.headers))
                stand_in.serve(self, stand_in.script)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        """The API root to configure as an entry's url."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()

    def serve(self, handler: BaseHTTPRequestHandler, script: Script) -> None:
        """Answer one completions request as scripted."""
        if script.status != 200:
            payload = json.dumps(script.error or {"error": {"message": "scripted failure"}}).encode()
            handler.send_response(script.status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Connection", "close")
        handler.end_headers()
        self.sent = []
        try:
            for number, token in enumerate(script.tokens):
                if script.break_after is not None and number == script.break_after:
                    handler.close_connection = True
                    return
                handler.wfile.write(self._event(token, script.shape))
                handler.wfile.flush()
                self.sent.append(token)
                time.sleep(script.delay)
            end = {"choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": script.finish_reason}]}
            handler.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.closed_early.set()

    @staticmethod
    def _event(token: int, shape: str) -> bytes:
        if shape == "vllm":
            logprobs = {"tokens": [f"token_id:{token}"], "token_logprobs": [-0.5], "text_offset": [0],
                        "top_logprobs": [{f"token_id:{token}": -0.5, "token_id:7": -1.5}]}
        else:
            logprobs = {"content": [{"id": token, "token": "?", "logprob": -0.5,
                                     "top_logprobs": [{"id": token, "token": "?", "logprob": -0.5},
                                                      {"id": 7, "token": "?", "logprob": -1.5}]}]}
        data = {"choices": [{"text": "?", "index": 0, "logprobs": logprobs, "finish_reason": None}]}
        return f"data: {json.dumps(data)}\n\n".encode()
