"""The baseline: what FauxPilot's python backend does, as a tiny OpenAI-shaped HTTP server.

Every POST /v1/completions runs one ``model.generate`` (float32, greedy) over the
whole prompt, one request at a time in arrival order; no streaming, no KV cache
kept between requests, no cancellation (a closed connection is noticed only when
the answer is written).  Run: ``python -m bench.naive_server --model FOLDER --port N``.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FifoLock:
    """A lock granted in arrival order, like the request queue in front of a model."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._condition.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc: object) -> None:
        with self._condition:
            self._serving += 1
            self._condition.notify_all()


class NaiveModel:
    """A transformers causal LM answering completion requests with ``generate``."""

    def __init__(self, folder: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.eos_ids = {self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id} - {None}
        self.lock = FifoLock()

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer one OpenAI completions request body with a non-streaming response."""
        prompt = body.get("prompt") or ""
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt else ""
        max_tokens = int(body.get("max_tokens") or 16)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        options = _bias_options(body.get("logit_bias") or {})
        encoded = self.tokenizer(prompt, return_tensors="pt")
        prompt_tokens = encoded.input_ids.shape[1]
        with self.lock, self.torch.inference_mode():
            output = self.model.generate(encoded.input_ids, attention_mask=encoded.attention_mask,
                                         max_new_tokens=max_tokens, do_sample=False,
                                         pad_token_id=self.tokenizer.eos_token_id, **options)
        new_ids = output[0, prompt_tokens:].tolist()
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        finish = "stop" if new_ids and new_ids[-1] in self.eos_ids else "length"
        cuts = [text.find(s) for s in stop if s and s in text]
        if cuts:
            text, finish = text[:min(cuts)], "stop"
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.get("model") or "naive",
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(new_ids),
                      "total_tokens": prompt_tokens + len(new_ids)},
        }


def _bias_options(logit_bias: dict[str, float]) -> dict[str, Any]:
    """generate() options for an OpenAI logit_bias: -100 bans a token, other values shift its logit."""
    bias = {int(token): float(value) for token, value in logit_bias.items()}
    options: dict[str, Any] = {}
    banned = [token for token, value in bias.items() if value <= -100]
    if banned:
        options["suppress_tokens"] = banned
    shifted = {(token,): value for token, value in bias.items() if value > -100}
    if shifted:
        options["sequence_bias"] = shifted
    return options


class Handler(BaseHTTPRequestHandler):
    """GET /health and POST /v1/completions."""

    protocol_version = "HTTP/1.1"
    server: "NaiveServer"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        """Liveness and the model list."""
        if self.path in ("/health", "/v1/models"):
            self._send(200, {"status": "ok", "data": [{"id": "naive", "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

    def do_POST(self) -> None:  # noqa: N802
        """One completion, generated whole."""
        if self.path.rstrip("/") not in ("/v1/completions", "/v1/engines/codegen/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            answer = self.server.model.complete(body)
        except (ValueError, TypeError) as exc:
            self._send(400, {"error": {"message": str(exc), "type": "invalid_request_error"}})
            return
        except Exception as exc:  # a benchmark baseline: report and keep serving
            self._send(500, {"error": {"message": repr(exc), "type": "server_error"}})
            return
        self._send(200, answer)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up on this request


class NaiveServer(ThreadingHTTPServer):
    """A threaded HTTP server holding one NaiveModel."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], model: NaiveModel):
        super().__init__(address, Handler)
        self.model = model


def main(argv: list[str] | None = None) -> None:
    """Load the model and serve until terminated."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a transformers model folder (safetensors)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    model = NaiveModel(args.model, args.threads)
    print(f"naive server: loaded {args.model} in {time.perf_counter() - started:.1f} s; "
          f"listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
    with NaiveServer((args.host, args.port), model) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
