"""A model served by another inference server: an OpenAI-compatible completions API (vLLM, SGLang,
llama.cpp's llama-server) behind this one.

Everything above the model stays here. The same :class:`~app.engine.prepare.Preparer` builds the
prompt (FIM layout, repository context, truncation) and it goes upstream as token ids; each token
that comes back (its id read from the logprobs the upstream returns with it) goes through the same
sequence state as a local one — detokenizer, stops by id and by text, max_tokens, logprobs,
Copilot's indentation stop — and a sequence that ends here, or whose client goes away, closes its
upstream request at once, which makes the upstream stop generating. What needs the logits in this
process (token healing, speculative drafts, echo's prompt logprobs) is off for these entries.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

import torch

from config import EngineOptions, ModelConfig

from .engine import Admission, EngineStats, ServedModel, Ticket, log_sequences
from .errors import (InvalidParameter, UpstreamBusy, UpstreamMisconfigured, UpstreamRejected, UpstreamUnavailable)
from .params import Delta, PromptContext, SamplingParams
from .prepare import TRACE_ALTERNATIVES, ModelFacts, Preparer
from .request import Request, Watch
from .sequence import SequenceState

log = logging.getLogger(__name__)

CONNECT_SECONDS = 5.0
PROBE_SECONDS = 2.0
PROBE_EVERY = 5.0  # a readiness probe's answer is reused this long (load balancers poll every second or two)
MAX_ERROR_BYTES = 64 * 1024


@dataclass(frozen=True)
class UpstreamToken:
    """One generated token as the upstream reports it: its id, log-probability and top alternatives."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class UpstreamChunk:
    """One server-sent event of the upstream's stream: the tokens it carries and, on the last, why it ended."""

    tokens: tuple[UpstreamToken, ...]
    finish_reason: str | None = None


def _token_id(token: object) -> int:
    """An id from vLLM's ``return_tokens_as_token_ids`` spelling ``token_id:123``."""
    if isinstance(token, str) and token.startswith("token_id:") and token[9:].isdigit():
        return int(token[9:])
    raise UpstreamMisconfigured(f"the upstream server returns tokens as text ({token!r}), not ids; it must return "
                                "token ids with logprobs (llama-server does; vLLM with return_tokens_as_token_ids)")


def parse_chunk(data: dict) -> UpstreamChunk:
    """The tokens of one completions stream event, in llama.cpp's or the OpenAI/vLLM logprobs shape."""
    if "error" in data:
        error = data["error"] if isinstance(data["error"], dict) else {"message": str(data["error"])}
        raise UpstreamUnavailable(f"the upstream server failed mid-stream: {error.get('message', error)}")
    choices = data.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    logprobs = choice.get("logprobs") or {}
    tokens: list[UpstreamToken] = []
    if isinstance(logprobs.get("content"), list):  # llama.cpp: {"content": [{"id", "logprob", "top_logprobs"}]}
        for entry in logprobs["content"]:
            top = tuple((int(t["id"]), float(t["logprob"])) for t in entry.get("top_logprobs") or () if "id" in t)
            tokens.append(UpstreamToken(int(entry["id"]), float(entry.get("logprob", 0.0)), top))
    elif isinstance(logprobs.get("tokens"), list):  # OpenAI's completions shape: tokens, token_logprobs, top_logprobs
        values = logprobs.get("token_logprobs") or [0.0] * len(logprobs["tokens"])
        tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
        for token, value, top in zip(logprobs["tokens"], values, tops):
            alternatives = tuple((_token_id(t), float(v)) for t, v in (top or {}).items())
            tokens.append(UpstreamToken(_token_id(token), float(value or 0.0), alternatives))
    elif choice.get("text"):
        raise UpstreamMisconfigured("the upstream server sent text without token ids; it must return logprobs")
    return UpstreamChunk(tuple(tokens), choice.get("finish_reason"))


def _error_of(status: int, payload: bytes) -> Exception:
    """The engine error for an upstream's refusal: its message, and the field it names."""
    try:
        data = json.loads(payload)
        error = data.get("error", data) if isinstance(data, dict) else {}
        error = error if isinstance(error, dict) else {"message": str(error)}
    except ValueError:
        error = {"message": payload.decode("utf-8", "replace")[:500]}
    message = f"upstream server: {error.get('message') or http.client.responses.get(status, status)}"
    if status == 429:
        return UpstreamBusy(message)
    if status in (401, 403, 404):  # a key or model name this server was configured with
        return UpstreamMisconfigured(f"{message} (HTTP {status}: check the entry's url, upstream_model and key)")
    if 400 <= status < 500:
        param = error.get("param")
        # A validation 422 (TGI's) is what this server answers 400 for.
        return UpstreamRejected(message, param=param if isinstance(param, str) else None,
                                status=400 if status == 422 else status)
    return UpstreamUnavailable(f"{message} (HTTP {status})")


class UpstreamCall:
    """One streamed completions request to the upstream; closing it (from any thread) ends it there too."""

    def __init__(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse):
        self.connection, self.response = connection, response
        self.started = time.perf_counter()
        self._closed = threading.Event()

    def chunks(self) -> Iterator[UpstreamChunk]:
        """The stream's events, until ``[DONE]`` or the end of the body."""
        while not self._closed.is_set():
            try:
                line = self.response.readline()
            except (OSError, http.client.HTTPException) as exc:
                if self._closed.is_set():
                    return
                raise UpstreamUnavailable(f"the upstream server's stream broke: {exc}") from None
            if not line:
                if self._closed.is_set():
                    return
                raise UpstreamUnavailable("the upstream server closed its stream before it ended")
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event names
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            try:
                yield parse_chunk(json.loads(payload))
            except (ValueError, KeyError, TypeError) as exc:
                raise UpstreamUnavailable(f"the upstream server sent an event this server cannot read: {exc}") \
                    from None

    def close(self) -> None:
        """End the request: the socket is shut so the upstream sees the client leave and stops generating."""
        if self._closed.is_set():
            return
        self._closed.set()
        sock = self.connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the other side
        self.connection.close()


class UpstreamClient:
    """HTTP to one OpenAI-compatible server (``url`` is its API root, e.g. ``http://10.0.0.5:8000/v1``)."""

    def __init__(self, url: str, api_key: str | None = None, read_timeout: float = 600.0):
        parts = urlsplit(url.rstrip("/"))
        self.url, self.https = url, parts.scheme == "https"
        self.host, self.port = parts.hostname or "localhost", parts.port
        self.root = parts.path
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.read_timeout = read_timeout

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=timeout)

    def open(self, body: dict) -> UpstreamCall:
        """POST a streamed completion; raises the engine's error when the upstream cannot be reached or refuses."""
        connection = self._connection(CONNECT_SECONDS)
        try:
            connection.request("POST", f"{self.root}/completions", body=json.dumps(body), headers=self.headers)
            connection.sock.settimeout(self.read_timeout)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise UpstreamUnavailable(f"the upstream server at {self.url} cannot be reached: {exc}") from None
        if response.status != 200:
            payload = response.read(MAX_ERROR_BYTES)
            connection.close()
            raise _error_of(response.status, payload)
        return UpstreamCall(connection, response)

    def probe(self) -> str | None:
        """None when the upstream answers ``GET /models``; else what is wrong."""
        connection = self._connection(PROBE_SECONDS)
        try:
            connection.request("GET", f"{self.root}/models", headers=self.headers)
            response = connection.getresponse()
            response.read(MAX_ERROR_BYTES)
            return None if response.status == 200 else f"GET {self.url}/models answered HTTP {response.status}"
        except (OSError, http.client.HTTPException) as exc:
            return f"{self.url} cannot be reached: {exc}"
        finally:
            connection.close()


@dataclass
class UpstreamCounters:
    """Calls to the upstream since this worker started: how many, how many failed, the time they took."""

    calls: int = 0
    errors: int = 0
    wait_seconds: float = 0.0  # request sent to first token, summed
    seconds: float = 0.0  # request sent to its end, summed
    live: int = 0  # sequences generating upstream now


class UpstreamEngine(ServedModel):
    """The engine interface (prepare, admit, open, stream, stats) for a model that runs on another server."""

    def __init__(self, config: ModelConfig, facts: ModelFacts, tokenizer, options: EngineOptions,
                 client: UpstreamClient):
        self.config, self.tokenizer, self.client = config, tokenizer, client
        # Healing needs this process's logits, drafts its forward passes; no local prefix cache to anchor to.
        self.options = dataclasses.replace(options, token_healing=False, speculative_tokens=0, answer_cache=0)
        self.device = torch.device("cpu")
        self.preparer = Preparer(config, facts, tokenizer, self.device, self.options)
        self.admission = Admission(options.max_batch + options.max_waiting)
        self.counters = UpstreamCounters()
        self._mutex = threading.Lock()
        self._opened: dict[int, UpstreamCall] = {}  # id(request) -> its first call, made before the reply
        self._probed: tuple[float, str | None] = (0.0, None)

    # -- the interface ---------------------------------------------------------------

    def prepare(self, prompt: str, params: SamplingParams, *, suffix: str | None = None, n: int = 1,
                best_of: int | None = None, echo: bool = False, request_id: str = "local",
                context: PromptContext | None = None, trace: bool = False) -> Request:
        """One prompt as a request; echo with logprobs is refused (the prompt's logprobs need local logits).

        ``trace`` (the debug page) asks the upstream for each token's top alternatives too.
        """
        if echo and params.logprobs is not None:
            raise InvalidParameter(f"model {self.name!r} runs on an upstream server: echo with logprobs is not "
                                   "available for it", param="echo")
        return self.preparer.prepare(prompt, params, suffix=suffix, n=n, best_of=best_of, echo=echo,
                                     request_id=request_id, context=context, trace=trace)

    def admit(self) -> Ticket:
        """A place for one client request, or EngineBusy when this worker holds enough for this model."""
        return self.admission.enter()

    def open(self, request: Request) -> None:
        """Send the request's first sequence upstream now, so that a refusal is answered before any reply."""
        if request.params.max_tokens == 0 or not request.sequences:
            return
        call = self._call(request, request.sequences[0])
        with self._mutex:
            self._opened[id(request)] = call

    def stream(self, request: Request, watch: Watch = Watch()) -> Iterator[Delta]:
        """Run a prepared request upstream; yield its deltas as they come. Closing early closes the upstream call."""
        request.claim()
        request.timings.submitted = time.perf_counter()
        if self.options.debug:
            log.info("[%s] model prompt (fim=%s) sent upstream as ids: %r", request.id, request.used_fim,
                     self.tokenizer.decode(request.prompt_ids, skip_special_tokens=False))
        if request.echo:
            for index in range(request.n):
                yield Delta(index, request.prompt)
        if request.params.max_tokens == 0:
            self._take_opened(request)
            yield from request.skip()
            return
        calls: list[UpstreamCall] = []
        worker = threading.Thread(target=self._run, args=(request, calls), name=f"upstream-{request.id}", daemon=True)
        worker.start()
        try:
            for deltas in request.deltas(watch):
                yield from deltas
        finally:
            request.cancel()
            with self._mutex:
                for call in calls:
                    call.close()  # the upstream stops at once, not at its next token
            self._take_opened(request)
            self._log_timing(request)

    def score_prompt(self, request: Request, alternatives: int) -> None:
        """None: scoring the prompt needs this process's logits (the upstream's are not asked for)."""
        return None

    def stats(self) -> EngineStats:
        """Load figures and the upstream's calls, errors and times since this worker started."""
        c = self.counters
        return EngineStats(c.live, 0, self.admission.count, upstream_calls=c.calls, upstream_errors=c.errors,
                           upstream_wait_seconds=c.wait_seconds, upstream_seconds=c.seconds)

    def health(self) -> str | None:
        """None when the upstream answers; else why not (probed at most every few seconds)."""
        checked, problem = self._probed
        if time.monotonic() - checked > PROBE_EVERY:
            problem = self.client.probe()
            self._probed = (time.monotonic(), problem)
        return problem

    def warmup(self, rounds: int = 2) -> None:
        """Nothing to warm here; say at start-up whether the upstream answers."""
        problem = self.health()
        if problem:
            log.warning("model %s: upstream not reachable yet (%s); /ready answers 503 until it is", self.name, problem)
        else:
            log.info("model %s: served by %s", self.name, self.client.url)

    def forget(self) -> None:
        """No cache is kept here (the upstream keeps its own)."""

    # -- the upstream side ---------------------------------------------------------------

    def _take_opened(self, request: Request) -> UpstreamCall | None:
        with self._mutex:
            return self._opened.pop(id(request), None)

    def _body(self, request: Request, seq: SequenceState) -> dict:
        """The upstream completions request for one sequence: the prompt as ids, the sampling settings."""
        params = request.params
        body: dict = {"prompt": list(request.prompt_ids), "max_tokens": params.max_tokens, "stream": True,
                      "temperature": params.temperature, "top_p": params.top_p,
                      # ids come back with the logprobs (llama-server: always; vLLM: as "token_id:N").
                      "logprobs": max(params.logprobs or 0, TRACE_ALTERNATIVES if request.trace else 1),
                      "return_tokens_as_token_ids": True,
                      # vLLM ends at these ids itself; stops are decided here in any case.
                      "stop_token_ids": sorted(self.preparer.eos_ids), "skip_special_tokens": False}
        if self.config.upstream_model:
            body["model"] = self.config.upstream_model
        if params.seed is not None:
            body["seed"] = params.seed + seq.index
        if params.top_k:
            body["top_k"] = params.top_k
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if params.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
        return body

    def _count(self, **changes: float) -> None:
        """Add to the counters (request threads and upstream readers update them together)."""
        with self._mutex:
            for name, change in changes.items():
                setattr(self.counters, name, getattr(self.counters, name) + change)

    def _call(self, request: Request, seq: SequenceState) -> UpstreamCall:
        """Open one sequence's upstream call, counting it (and its failure)."""
        self._count(calls=1)
        try:
            return self.client.open(self._body(request, seq))
        except Exception:
            self._count(errors=1)
            raise

    def _run(self, request: Request, calls: list[UpstreamCall]) -> None:
        """The request's sequences one after another, each token through its sequence state (a thread's work)."""
        request.timings.started = time.perf_counter()
        try:
            for seq in request.sequences:
                call = (self._take_opened(request) if seq is request.sequences[0] else None) or \
                    self._call(request, seq)
                with self._mutex:
                    calls.append(call)
                if request.cancelled.is_set():
                    break
                self._follow(request, seq, call)
                if request.cancelled.is_set():
                    break
            request.finish()
        except Exception as exc:  # any failure reaches the reader, which maps it to an envelope
            self._count(errors=1)
            if not request.cancelled.is_set():
                log.warning("[%s] %s: upstream failed: %s", request.id, self.name, exc)
            request.fail(exc)

    def _follow(self, request: Request, seq: SequenceState, call: UpstreamCall) -> None:
        """One sequence's tokens from its call until a stop here, the upstream's end, or a cancel."""
        self._count(live=1)
        try:
            for chunk in call.chunks():
                if request.cancelled.is_set():
                    return
                deltas = [delta for token in chunk.tokens if not seq.finished
                          for delta in [seq.push(token.id, token.logprob, token.top)] if delta is not None]
                if chunk.tokens and request.timings.first_token is None:
                    request.timings.first_token = time.perf_counter()
                    self._count(wait_seconds=request.timings.first_token - call.started)
                if not seq.finished and chunk.finish_reason:
                    # Its own stop (an end-of-sequence it does not return as a token) or its max_tokens.
                    last = seq.end("length" if chunk.finish_reason == "length" else "stop")
                    deltas += [last] if last is not None else []
                request.deliver(deltas)
                if seq.finished:
                    return
            if not seq.finished:
                request.deliver([d for d in [seq.end("stop")] if d is not None])
        finally:
            self._count(live=-1, seconds=time.perf_counter() - call.started)
            call.close()  # a stop decided here ends the upstream's generation too

    def _log_timing(self, request: Request) -> None:
        generated = sum(seq.generated for seq in request.sequences)
        t = request.timings.breakdown(generated, len(request.sequences))
        log.info("[%s] %s: %d prompt tokens, %d generated upstream, first token %.0f ms, total %.0f ms%s",
                 request.id, self.name, len(request.prompt_ids), generated,
                 float("nan") if t.first_token_ms is None else t.first_token_ms, t.total_ms,
                 "" if request.outcome == "done" else f", {request.outcome or 'cancelled'}")
        if self.options.debug:
            log_sequences(request)
