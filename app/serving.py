"""Serving one completion request: every prompt through the engine, as OpenAI choices whole or streamed.

:func:`start_completion` prepares and admits (raising before any byte is sent);
:class:`CompletionRun` yields ``(choice index, delta)`` for both shapes of reply;
:func:`whole_completion` gathers them, :class:`EventStream` sends them as they come.
"""
from __future__ import annotations

import logging
import select
import socket
import threading
import time
from contextlib import closing
from typing import Callable, Iterator

from config import Settings

from .engine import Delta, Engine, Request, Watch
from .engine.engine import Ticket
from .errors import reply_for
from .llamacpp import InfillChoice, InfillRequest, PromptFacts, infill_chunk, infill_result
from .metrics import RequestRecord
from .protocol import (ChoiceOut, CompletionRequest, InvalidRequestError, completion_response, sse_event, stream_chunk,
                       usage_chunk)

log = logging.getLogger(__name__)


class CompletionRun:
    """One admitted client request: its prompts run one after another; iterate for (choice index, delta)."""

    def __init__(self, engine: Engine, body: CompletionRequest, requests: list[Request], ticket: Ticket,
                 watch: Watch, record: RequestRecord):
        self.engine, self.body, self.requests = engine, body, requests
        self.ticket, self.watch, self.record = ticket, watch, record
        self.id = f"cmpl-{record.request_id}"
        self.created = int(time.time())
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache, over the prompts run so far

    def __iter__(self) -> Iterator[tuple[int, Delta]]:
        prompt_tokens = completion_tokens = 0
        for number, request in enumerate(self.requests):
            # Closed at once when the reader stops early, so the request leaves the batch at the next step.
            with closing(self.engine.stream(request, self.watch)) as deltas:
                for delta in deltas:
                    yield number * self.body.n + delta.index, delta
            if request.outcome == "gone":
                self.record.complete = False  # the client hung up: nothing more to serve
                return
            prompt_tokens += request.prompt_tokens
            completion_tokens += request.completion_tokens
            self.cached_tokens += request.reused
            self.record.usage = (prompt_tokens, completion_tokens)
            self.record.texts += tuple(seq.text for seq in request.returned())

    def close(self) -> None:
        """Give the engine's place back (however the reply ended)."""
        self.ticket.release()


def check_limits(body: CompletionRequest, settings: Settings) -> None:
    """Refuse a request bigger than this server allows: its max_tokens, or its sequences in all."""
    max_tokens = body.params.max_tokens
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise InvalidRequestError(f"max_tokens is {max_tokens}; this server allows at most "
                                  f"{settings.max_tokens_limit}.", param="max_tokens", code="max_tokens_too_large")
    runs = max(body.n, body.best_of or 1)
    if len(body.prompts) * runs > settings.max_sequences:
        raise InvalidRequestError(f"this request asks for {len(body.prompts) * runs} sequences (prompts × max(n, "
                                  f"best_of)); this server allows at most {settings.max_sequences}.",
                                  param="best_of" if runs > body.n else "n", code="too_many_sequences")


def start_completion(engine: Engine, body: CompletionRequest, settings: Settings, record: RequestRecord,
                     client_gone: Callable[[], bool] | None = None,
                     stopping: threading.Event | None = None, trace: bool = False) -> CompletionRun:
    """Check, prepare every prompt and take a place in the engine: every refusal is raised here, before any reply.

    ``trace`` (the debug page): every token's logprob and alternatives are noted on the requests.
    """
    check_limits(body, settings)
    record.engine = engine
    requests = [engine.prepare(prompt, body.params, suffix=body.suffix, n=body.n, best_of=body.best_of,
                               echo=body.echo, request_id=record.request_id, context=body.context, trace=trace)
                for prompt in body.prompts]
    timeout = settings.request_timeout
    watch = Watch(client_gone, time.monotonic() + timeout if timeout else None, stopping)
    ticket = engine.admit()
    try:
        engine.open(requests[0])  # an upstream engine's refusal is answered with its status, before the reply
    except BaseException:
        ticket.release()
        raise
    return CompletionRun(engine, body, requests, ticket, watch, record)


def gather(run: CompletionRun) -> list[ChoiceOut]:
    """Every choice of a run, its deltas joined (the run is released however it ends)."""
    texts: dict[int, list[str]] = {}
    logprobs: dict[int, list] = {}
    reasons: dict[int, str | None] = {}
    try:
        for index, delta in closing_iter(run):
            texts.setdefault(index, []).append(delta.text)
            logprobs.setdefault(index, []).extend(delta.logprobs)
            reasons[index] = delta.finish_reason or reasons.get(index)
    finally:
        run.close()
    return [ChoiceOut(i, "".join(texts[i]), tuple(logprobs[i]), reasons[i]) for i in sorted(texts)]


def whole_completion(run: CompletionRun) -> dict:
    """The whole ``text_completion``: every choice's deltas joined."""
    return completion_response(run.id, run.created, run.engine.name, gather(run), *run.record.usage,
                               run.body.params.logprobs is not None, run.cached_tokens)


def _prompt_facts(run: CompletionRun) -> PromptFacts:
    """What an /infill result reports of its (single) prompt's run: sizes, the prefix cache, times."""
    request = run.requests[0]
    t = request.timings
    end = t.finished or time.perf_counter()
    started = t.started or end  # never started: answered from the answer cache, or nothing to compute
    prompt_end = t.first_token or end
    return PromptFacts(run.engine.name, run.engine.preparer.context_length, request.prompt_tokens, request.reused,
                       request.truncated, (prompt_end - started) * 1000,
                       (end - t.first_token) * 1000 if t.first_token else 0.0, request.params.max_tokens)


def _infill_results(run: CompletionRun, body: InfillRequest, texts: dict[int, str]) -> list[dict]:
    """One llama.cpp result per completion, in index order."""
    facts = _prompt_facts(run)
    generated = {seq.index: seq.generated for seq in run.requests[0].returned()}
    return [infill_result(InfillChoice(index, texts.get(index, ""), generated.get(index, 0)), facts, body)
            for index in sorted(generated)]


def whole_infill(run: CompletionRun, body: InfillRequest) -> dict | list[dict]:
    """llama.cpp's /infill reply: the result, or a list of them when several completions were asked for."""
    texts = {choice.index: choice.text for choice in gather(run)}
    results = _infill_results(run, body, texts)
    return results[0] if body.n_cmpl == 1 else results


class EventStream:
    """The server-sent events of a streamed completion; an error after the status line is sent in-band."""

    def __init__(self, run: CompletionRun, chat_deltas: bool = False):
        self.run, self.chat_deltas = run, chat_deltas
        run.record.complete = False  # until the last event is out
        self._events = self._generate()

    def __iter__(self) -> Iterator[str]:
        return self._events

    def _generate(self) -> Iterator[str]:
        run, body = self.run, self.run.body
        with_logprobs = body.params.logprobs is not None
        try:
            for index, delta in closing_iter(run):
                yield sse_event(stream_chunk(run.id, run.created, run.engine.name, index, delta.text,
                                             delta.logprobs if with_logprobs else None, delta.finish_reason,
                                             chat_delta=self.chat_deltas))
            if body.include_usage:
                yield sse_event(usage_chunk(run.id, run.created, run.engine.name, *run.record.usage, run.cached_tokens))
        except Exception as exc:  # the status line is gone: report in-band, keep the worker serving
            yield sse_event(reply_for(exc, run.id)[0])
        yield sse_event("[DONE]")
        run.record.complete = True

    def close(self) -> None:
        """Stop the events and release the run (the server closes the body after its last byte, or on a hang-up)."""
        try:
            self._events.close()
        finally:
            self.run.close()


class InfillEventStream(EventStream):
    """llama.cpp's /infill stream: ``{index, content, stop: false}`` pieces, then each completion's result
    (``stop: true``, empty content, the timings); no ``[DONE]``. An error after the status line is sent in-band."""

    def __init__(self, run: CompletionRun, body: InfillRequest):
        self.body = body
        super().__init__(run)

    def _generate(self) -> Iterator[str]:
        run = self.run
        try:
            for index, delta in closing_iter(run):
                if delta.text:
                    yield sse_event(infill_chunk(index, delta.text))
            for result in _infill_results(run, self.body, {}):
                yield sse_event(result)
        except Exception as exc:  # the status line is gone: report in-band, keep the worker serving
            yield sse_event(reply_for(exc, run.id)[0])
        run.record.complete = True


def closing_iter(iterable) -> Iterator:
    """Iterate ``iterable``, closing its iterator however the loop ends."""
    with closing(iter(iterable)) as items:
        yield from items


def client_gone_probe(environ: dict) -> Callable[[], bool] | None:
    """A check that the client closed its connection (gunicorn gives views the socket); None elsewhere."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return None

    def client_gone() -> bool:
        """Whether the peer has closed the connection."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            # Readable with nothing to read is the peer's close; data would be a pipelined request.
            return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True

    return client_gone
