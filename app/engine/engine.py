"""One served model: the interface the web layer and the command line talk to.

prepare (text → :class:`Request`) → admit (a ticket, or :class:`EngineBusy`) → stream
(the request through the scheduler, its deltas back) → stats. An engine that forwards
to a remote inference server would offer the same few methods.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from config import EngineOptions, ModelConfig

from .answers import AnswerCache, replay
from .errors import EngineBusy
from .fastpath import fast_decoder
from .kvcache import PrefixCache
from .params import Delta, PromptContext, SamplingParams, SequenceResult, TokenLogprob
from .prepare import ModelFacts, Preparer
from .request import Request, Watch
from .runners import CausalRunner, Seq2SeqRunner
from .scheduler import Scheduler
from .threads import ThreadPlan

log = logging.getLogger(__name__)


class Ticket:
    """An admitted request's place in the engine; released once, however the request ends."""

    def __init__(self, admission: "Admission"):
        self._admission = admission
        self._released = False

    def release(self) -> None:
        """Give the place back (idempotent)."""
        with self._admission.mutex:
            if not self._released:
                self._released = True
                self._admission.count -= 1


class Admission:
    """Counts a model's requests in a worker and refuses new ones past a limit (running plus waiting)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self.mutex = threading.Lock()

    def enter(self) -> Ticket:
        """Admit a request or raise :class:`EngineBusy`."""
        with self.mutex:
            if self.count >= self.limit:
                raise EngineBusy(f"this worker already has {self.count} requests in progress; retry shortly")
            self.count += 1
        return Ticket(self)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's load and prefix cache, for metrics and benchmarks."""

    running: int  # sequences decoding
    waiting: int  # requests queued or prefilling
    requests: int  # admitted requests in progress
    cache_hits: int = 0
    cache_misses: int = 0
    cache_bytes: int = 0
    reused_tokens: int = 0  # prompt tokens taken from the prefix cache, in all
    answer_hits: int = 0  # requests answered again from the answer cache
    drafted: int = 0  # speculative draft tokens fed to the model
    accepted: int = 0  # of those, tokens the model agreed with
    draft_steps: int = 0  # decode row-steps that carried a draft
    upstream_calls: int = 0  # requests sent to an upstream server (backend "openai")
    upstream_errors: int = 0  # of those, the ones that failed
    upstream_wait_seconds: float = 0.0  # upstream time to first token, summed
    upstream_seconds: float = 0.0  # upstream time to the end, summed


class ServedModel:
    """What every engine offers the web layer beside generation: its names, its text, whole completions.

    Subclasses set ``config`` and ``preparer`` and implement prepare, admit and stream.
    """

    config: ModelConfig
    preparer: Preparer

    @property
    def name(self) -> str:
        """The model's primary name."""
        return self.config.name

    @property
    def supports_fim(self) -> bool:
        """Whether a request's suffix is used for fill-in-the-middle."""
        return self.config.fim is not None

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a token sequence, special tokens dropped."""
        return self.preparer.decode(ids)

    def stream(self, request: Request, watch: Watch = Watch()) -> Iterator[Delta]:
        """Run a prepared request; yield its deltas as they come."""
        raise NotImplementedError

    def complete(self, request: Request, watch: Watch = Watch()) -> list[SequenceResult]:
        """Run a prepared request to its end and return each returned sequence whole."""
        for _ in self.stream(request, watch):
            pass
        return request.results()

    def open(self, request: Request) -> None:
        """Start what could still refuse the request before any reply is sent (nothing, in-process)."""

    def health(self) -> str | None:
        """None when the engine can serve (an in-process model always can once loaded), else why not."""
        return None


class Engine(ServedModel):
    """A loaded model and tokenizer, completing the prompts of many requests in one batch."""

    def __init__(self, config: ModelConfig, model: torch.nn.Module, tokenizer, device: torch.device,
                 options: EngineOptions = EngineOptions(), threads: ThreadPlan | None = None):
        self.config = config
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.options = options
        cache = None
        if config.kind == "seq2seq":
            self.runner = Seq2SeqRunner(self.model, device, decoder_prompt=config.decoder_prompt)
        else:
            cache = PrefixCache(options.prefix_cache_mb * 2**20) if options.prefix_cache else None
            self.runner = CausalRunner(self.model, device, cache,
                                       fast=fast_decoder(self.model, options.decode_step, device))
        self.preparer = Preparer(config, ModelFacts.of(self.model), tokenizer, device, options,
                                 cache.prompts if cache is not None else None)
        self.scheduler = Scheduler(self.runner, options.max_batch, threads, config.name)
        self.admission = Admission(options.max_batch + options.max_waiting)
        self.answers = AnswerCache(options.answer_cache)

    # -- the interface ---------------------------------------------------------------

    def prepare(self, prompt: str, params: SamplingParams, *, suffix: str | None = None, n: int = 1,
                best_of: int | None = None, echo: bool = False, request_id: str = "local",
                context: PromptContext | None = None, trace: bool = False) -> Request:
        """One prompt (with repository context) as a runnable request (raises an EngineError when it cannot run).

        ``trace``: every generated token's logprob and top alternatives are noted, whatever ``params`` ask.
        """
        return self.preparer.prepare(prompt, params, suffix=suffix, n=n, best_of=best_of, echo=echo,
                                     request_id=request_id, context=context, trace=trace)

    def admit(self) -> Ticket:
        """A place for one client request, or :class:`EngineBusy` when running and waiting are full."""
        return self.admission.enter()

    def stream(self, request: Request, watch: Watch = Watch()) -> Iterator[Delta]:
        """Run a prepared request; yield its deltas as they come (the echoed prompt first).

        Closing the iterator early cancels the request: it leaves the batch at the next step.
        """
        request.claim()
        if self.options.debug:
            self._log_prompt(request)
        if request.echo:
            yield from self._echo(request)
        if request.params.max_tokens == 0:
            if not request.echo and getattr(self.runner, "prefix_cache", None) is not None:
                # Nothing to generate, but the prompt is fed into the prefix cache: an editor's warm-up request.
                yield from self._generate(request, watch, None)
            yield from request.skip()
            return
        key = self.answers.key(request)
        answer = self.answers.get(key) if key is not None else None
        if answer is not None:
            log.info("[%s] %s: the same request was answered lately: its answer is sent again", request.id, self.name)
            yield from replay(request, answer)
            return
        yield from self._generate(request, watch, key)

    def _generate(self, request: Request, watch: Watch, key) -> Iterator[Delta]:
        """The request through the scheduler; a finished deterministic one is kept in the answer cache."""
        sent: list[Delta] = []
        self.scheduler.submit(request)
        try:
            for deltas in request.deltas(watch):
                sent.extend(deltas)
                yield from deltas
        finally:
            request.cancel()  # a no-op once it is finished
            self._log_timing(request)
        if key is not None and request.outcome == "done":
            self.answers.put(key, request, sent)

    def stats(self) -> EngineStats:
        """Load and prefix-cache figures right now."""
        running, waiting = self.scheduler.load
        cache = getattr(self.runner, "prefix_cache", None)
        cached = (cache.hits, cache.misses, cache.nbytes) if cache is not None else (0, 0, 0)
        drafts = self.scheduler.drafts
        return EngineStats(running, waiting, self.admission.count, *cached, self.scheduler.reused_tokens,
                           self.answers.hits, drafts.drafted, drafts.accepted, drafts.steps)

    # -- upkeep ------------------------------------------------------------------------

    def warmup(self, rounds: int = 2) -> None:
        """Run short greedy completions so the first real request does not pay first-touch costs."""
        for _ in range(rounds):
            self.forget()
            self.complete(self.prepare("def hello():\n", SamplingParams(max_tokens=8, temperature=0.0),
                                       request_id="warmup"))
        self.forget()

    def forget(self) -> None:
        """Drop the cached prompts and answers (between requests, on the scheduler's thread)."""
        self.scheduler.call(self.runner.forget)
        self.answers.clear()

    # -- echo and logs -------------------------------------------------------------------

    def _echo(self, request: Request) -> Iterator[Delta]:
        """The prompt itself as each returned choice's first delta (with its logprobs when asked)."""
        if request.params.logprobs is not None:
            request.echo_logprobs = tuple(self.scheduler.call(lambda: self.prompt_logprobs(request)))
        for index in range(request.n):
            yield Delta(index, request.prompt, request.echo_logprobs)

    def score_prompt(self, request: Request, alternatives: int) -> list[TokenLogprob] | None:
        """The prompt's own tokens' logprobs (with ``alternatives`` each), computed on the scheduler's thread."""
        return self.scheduler.call(lambda: self.prompt_logprobs(request, alternatives))

    def prompt_logprobs(self, request: Request, alternatives: int | None = None) -> list[TokenLogprob]:
        """Logprobs of the prompt's own tokens, for ``echo`` with ``logprobs`` (run it on the scheduler's thread).

        ``alternatives``: how many top alternatives per token (default: the request's ``logprobs``).
        """
        ids, text = list(request.prompt_ids), self.preparer.token_text
        offsets = [len(self.decode(ids[:i])) for i in range(len(ids))]
        entries = [TokenLogprob(text(ids[0]), None, (), offsets[0])]
        if self.preparer.is_seq2seq:  # encoder input: the model gives it no probabilities
            return entries + [TokenLogprob(text(t), None, (), o) for t, o in zip(ids[1:], offsets[1:])]
        scores = self.runner.score(ids)
        k = (request.params.logprobs or 0) if alternatives is None else alternatives
        for pos in range(1, len(ids)):
            row = scores[pos - 1]
            top = ()
            if k:
                values, top_ids = row.topk(k)
                top = tuple((text(t), v) for t, v in zip(top_ids.tolist(), values.tolist()))
            entries.append(TokenLogprob(text(ids[pos]), float(row[ids[pos]]), top, offsets[pos]))
        return entries

    def _log_prompt(self, request: Request) -> None:
        log.info("[%s] model prompt (fim=%s): %r", request.id, request.used_fim,
                 self.tokenizer.decode(request.prompt_ids, skip_special_tokens=False))
        log.info("[%s] prompt ids: %s", request.id, list(request.prompt_ids))
        if request.healing:
            log.info("[%s] token healing: last prompt token %r removed; first token from %d candidates",
                     request.id, request.healing.text, len(request.healing.allowed))

    def _log_timing(self, request: Request) -> None:
        generated = sum(seq.generated for seq in request.sequences)
        t = request.timings.breakdown(generated, len(request.sequences))
        nan = float("nan")
        running, waiting = self.scheduler.load
        cancelled = request.outcome not in ("done", "failed")
        spec = request.draft_stats
        drafts = f", drafts {spec.accepted}/{spec.drafted} tokens accepted" if spec.drafted else ""
        log.info("[%s] %s: %d prompt tokens (%d reused), %d generated, queued %.0f ms, first token %.0f ms, "
                 "%.1f tok/s, total %.0f ms%s%s (batch: %d running, %d waiting)", request.id, self.name,
                 len(request.prompt_ids), request.reused, generated, t.queued_ms or 0.0,
                 nan if t.first_token_ms is None else t.first_token_ms,
                 nan if t.tokens_per_second is None else t.tokens_per_second, t.total_ms, drafts,
                 ", cancelled" if cancelled else "", running, waiting)
        if self.options.debug:
            log_sequences(request)


def log_sequences(request: Request) -> None:
    """The debug log's line per sequence: how it ended, its ids and its text."""
    for seq in request.sequences:
        rule = seq.stopped_by.rule if seq.stopped_by else None
        log.info("[%s] sequence %d: finish_reason=%s (rule %s) after %d tokens, stops=%r, ids=%s, text=%r",
                 request.id, seq.index, seq.finish_reason, rule, seq.generated, seq.stop.stops, seq.token_ids,
                 seq.text)
