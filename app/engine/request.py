"""A request: one prompt's completion as it travels through admission, the scheduler and the runner.

:meth:`~app.engine.prepare.Preparer.prepare` builds it (tokens, sampling, stops,
sequences); the scheduler feeds its prompt, advances its live sequences one token per
step and finishes it; the request thread that submitted it reads its deltas from
:meth:`Request.deltas`. Like nano-vllm's ``Sequence``, nothing else carries a request.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .anchor import Realignment
from .errors import RequestTimedOut, ServerStopping
from .healing import Healing
from .params import Delta, SamplingParams, SequenceResult, TokenLogprob
from .prompts import Truncation
from .sampling import Picks, TokenChooser
from .sequence import SequenceState
from .speculative import DraftStats, PromptLookup, verify
from .stopping import StopDecision

log = logging.getLogger(__name__)
DONE = object()  # put on a request's queue after its last deltas


def merge_deltas(deltas: list[Delta]) -> Delta | None:
    """One sequence's deltas of one step as one (several tokens accepted at once arrive in one event)."""
    if len(deltas) <= 1:
        return deltas[0] if deltas else None
    return Delta(deltas[0].index, "".join(d.text for d in deltas),
                 tuple(entry for d in deltas for entry in d.logprobs), deltas[-1].finish_reason)


@dataclass(frozen=True)
class Watch:
    """What a waiting request thread checks: its client went away, its deadline (monotonic), the server stops."""

    client_gone: Callable[[], bool] | None = None
    deadline: float | None = None
    stopping: threading.Event | None = None
    poll_seconds: float = 0.05

    @property
    def idle(self) -> bool:
        """Whether there is nothing to check (then a reader just blocks on its queue)."""
        return self.client_gone is None and self.deadline is None and self.stopping is None


@dataclass(frozen=True)
class TimingBreakdown:
    """One request's timings in milliseconds (None: the step never happened, e.g. answered from the answer cache)."""

    queued_ms: float | None  # submitted until its prefill began
    prefill_ms: float | None  # its prefill began until the first token
    first_token_ms: float | None  # submitted until the first token
    total_ms: float
    tokens_per_second: float | None  # tokens after the first, over the time after it


@dataclass
class Timings:
    """perf_counter() marks of one request's way through the engine."""

    submitted: float = 0.0
    started: float | None = None  # its prefill began
    first_token: float | None = None
    finished: float | None = None

    def breakdown(self, generated: int, sequences: int) -> TimingBreakdown:
        """The marks as durations; ``generated`` tokens over ``sequences`` (each one's first came with the prefill)."""
        end = self.finished or time.perf_counter()
        submitted = self.submitted or end
        queued = ((self.started or end) - submitted) * 1000 if self.submitted else None
        first = self.first_token
        rate = (generated - sequences) / (end - first) if first and end > first else None
        return TimingBreakdown(queued, (first - self.started) * 1000 if first and self.started else None,
                               (first - submitted) * 1000 if first and self.submitted else None,
                               (end - submitted) * 1000, rate)


class Request:
    """One prompt to complete: what to do, its sequences while they run, and the queue of its deltas."""

    def __init__(self, request_id: str, prompt: str, prompt_ids: tuple[int, ...], params: SamplingParams,
                 sequences: list[SequenceState], chooser: TokenChooser, *, n: int, echo: bool = False,
                 used_fim: bool = False, healing: Healing | None = None, realigned: Realignment | None = None,
                 truncation: Truncation = Truncation(), context_left_out: int = 0,
                 drafters: list[PromptLookup] | None = None, trace: bool = False):
        self.id = request_id
        self.prompt, self.prompt_ids, self.params = prompt, prompt_ids, params
        self.n = n  # choices returned; more sequences than that run for best_of
        self.sequences, self.chooser = sequences, chooser
        self.echo, self.used_fim, self.healing = echo, used_fim, healing
        self.realigned = realigned  # when the prompt was made to begin like a cached one (see anchor.py)
        self.truncation = truncation  # tokens cut from the prompt's far ends to fit the window
        self.context_left_out = context_left_out  # repository context chunks left out to fit it
        self.trace = trace  # its sequences note every token's logprob and alternatives (the debug page)
        # One per sequence (same order) when its sequences speculate (greedy; see speculative.py), else None.
        self.drafters = drafters
        self.draft_stats = DraftStats()  # its drafts fed, and the tokens the model agreed with
        self.echo_logprobs: tuple[TokenLogprob, ...] = ()
        self.live: list[SequenceState] = []  # the sequences in the batch, in row order
        self.next_tokens: list[int] = []  # the token each live sequence feeds next
        self.reused = 0  # prompt tokens taken from the prefix cache
        self.timings = Timings()
        self.cancelled = threading.Event()
        self.outcome: str | None = None  # how its reader's wait ended: "done", "failed" or "gone"
        self._out: queue.SimpleQueue = queue.SimpleQueue()  # lists of deltas, then DONE or an exception
        self._claimed = False

    @property
    def truncated(self) -> bool:
        """Whether the prompt or its repository context was cut to fit the window."""
        return bool(self.truncation) or self.context_left_out > 0

    @property
    def prompt_tokens(self) -> int:
        """Prompt length as the client sees it (a healed token still counts)."""
        return len(self.prompt_ids) + (1 if self.healing else 0)

    @property
    def ranked(self) -> bool:
        """Whether more sequences run than are returned (best_of): the best are sent at the end."""
        return len(self.sequences) > self.n

    def returned(self) -> list[SequenceState]:
        """The sequences the client gets: all, or for best_of the ``n`` most likely per token."""
        if not self.ranked:
            return self.sequences
        return sorted(self.sequences, key=lambda s: s.cumulative_logprob / max(s.generated, 1), reverse=True)[:self.n]

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far by the returned sequences."""
        return sum(seq.generated for seq in self.returned())

    def results(self) -> list[SequenceResult]:
        """Each returned sequence whole, the echoed prompt in front, indexed 0..n-1."""
        prefix = self.prompt if self.echo else ""
        return [seq.result(prefix, self.echo_logprobs) for seq in self.returned()]

    def claim(self) -> None:
        """Mark the request as run; a request runs once (prepare the prompt again to rerun it)."""
        if self._claimed:
            raise ValueError(f"request {self.id} has already run; prepare it again to run it again")
        self._claimed = True

    # -- the scheduler's side ---------------------------------------------------

    def start(self, picks: Picks) -> list[int]:
        """Take the first tokens, chosen from the prompt's logits; return the rows that go on decoding."""
        self.timings.first_token = time.perf_counter()
        self.live = list(self.sequences)
        return self.advance(picks)

    def advance(self, picks: Picks) -> list[int]:
        """Push each live sequence's picked token; send what is ready; return the rows still running."""
        token_ids = picks.token_ids.tolist()
        logprobs = picks.logprobs.tolist()
        tops = picks.top_pairs() or [()] * len(token_ids)
        deltas = []
        for row, seq in enumerate(self.live):
            delta = self._push(seq, token_ids[row], logprobs[row], tops[row])
            if delta is not None:
                deltas.append(delta)
        return self._settle(deltas, token_ids)

    def drafts(self) -> list[list[int]]:
        """Each live sequence's draft of its next tokens (empty where it has none or does not speculate)."""
        if self.drafters is None:
            return [[] for _ in self.live]
        return [self.drafters[seq.index].draft() for seq in self.live]

    def acceptance(self) -> list[float]:
        """Each live sequence's recent share of draft tokens accepted (0 where it does not speculate)."""
        if self.drafters is None:
            return [0.0] * len(self.live)
        return [self.drafters[seq.index].acceptance for seq in self.live]

    def advance_drafts(self, picks: Picks, drafts: list[list[int]], width: int,
                       totals: DraftStats) -> tuple[list[int], list[int]]:
        """Push each live row's accepted draft tokens and the model's own next token.

        ``picks`` holds the greedy pick after each of a row's ``width`` fed tokens (its last
        token, then its draft, then padding), rows one after another. Each verified draft is
        counted in the request's stats and in ``totals``. Returns the rows still running and,
        for every row, how many fed columns hold tokens that stay in its context.
        """
        token_ids = picks.token_ids.tolist()
        logprobs = picks.logprobs.tolist()
        tops = picks.top_pairs() or [()] * len(token_ids)
        deltas, columns, last = [], [], []
        for row, (seq, draft) in enumerate(zip(self.live, drafts)):
            base = row * width
            verdict = verify(draft, token_ids[base:base + width])
            if draft:
                accepted = len(verdict.tokens) - 1
                for stats in (self.draft_stats, totals, self.drafters[seq.index]):
                    stats.record(len(draft), accepted)
            pushed = []
            for token, position in zip(verdict.tokens, verdict.positions):
                pushed.append(self._push(seq, token, logprobs[base + position], tops[base + position]))
                if seq.finished:
                    break
            merged = merge_deltas([d for d in pushed if d is not None])
            if merged is not None:
                deltas.append(merged)
            columns.append(verdict.kept_columns)
            last.append(verdict.tokens[-1])
        return self._settle(deltas, last), columns

    def _push(self, seq: SequenceState, token_id: int, logprob: float, top) -> Delta | None:
        """One token into a sequence (and its drafter's context)."""
        if self.drafters is not None:
            self.drafters[seq.index].push(token_id)
        return seq.push(token_id, logprob, top)

    def _settle(self, deltas: list[Delta], last_tokens: list[int]) -> list[int]:
        """Send the step's deltas; keep the rows still running and the token each feeds next."""
        keep = [row for row, seq in enumerate(self.live) if not seq.finished]
        if deltas and not self.ranked:
            self._out.put(deltas)
        if keep and len(keep) < len(self.live):
            self.chooser.keep_rows(torch.tensor(keep, device=self.chooser.device))
        self.live = [self.live[row] for row in keep]
        self.next_tokens = [last_tokens[row] for row in keep]
        return keep

    def deliver(self, deltas: list[Delta]) -> None:
        """Send deltas made outside the batch (an upstream engine's tokens); best_of's wait for the end."""
        if deltas and not self.ranked:
            self._out.put(deltas)

    def finish(self) -> None:
        """The request is over (done or dropped): send a best_of request's chosen sequences, then DONE."""
        self.timings.finished = time.perf_counter()
        if self.ranked and not self.cancelled.is_set():
            chosen = self.returned()
            for index, seq in enumerate(chosen):
                seq.index = index
            self._out.put([Delta(s.index, s.text, tuple(s.logprobs), s.finish_reason) for s in chosen])
        self._out.put(DONE)

    def skip(self) -> list[Delta]:
        """No tokens were asked for (max_tokens 0): every sequence ends at once, for "length"."""
        for seq in self.returned():
            seq.finish_reason = "length"
            seq.stopped_by = StopDecision(True, "length", rule="max_tokens", detail="0")
        return [Delta(seq.index, "", (), "length") for seq in self.returned()]

    def fail(self, exc: BaseException) -> None:
        """The request failed: its reader raises ``exc``."""
        self.timings.finished = time.perf_counter()
        self._out.put(exc)

    # -- the request thread's side ------------------------------------------------

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at its next step (a no-op once it is finished)."""
        self.cancelled.set()

    def deltas(self, watch: Watch = Watch()) -> Iterator[list[Delta]]:
        """The deltas as the scheduler sends them, until DONE; stops early when the client goes away.

        The client is polled while waiting (in the queue, during a long prefill): editors
        abandon a request at the next keystroke, and its work should stop before it takes
        the model's time, not when its first token fails to send.
        """
        next_check = 0.0
        while True:
            if watch.idle:
                item = self._out.get()
            else:
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + watch.poll_seconds
                    if self._abandoned(watch, now):
                        return
                try:
                    item = self._out.get(timeout=max(next_check - now, 0.001))
                except queue.Empty:
                    continue
            if item is DONE:
                self.outcome = "done"
                return
            if isinstance(item, BaseException):
                self.outcome = "failed"
                raise item
            yield item

    def _abandoned(self, watch: Watch, now: float) -> bool:
        """Whether the client went away; raises RequestTimedOut past the deadline."""
        if watch.client_gone is not None and watch.client_gone():
            log.info("[%s] client went away: request cancelled", self.id)
            self.outcome = "gone"
            self.cancel()
            return True
        if watch.deadline is not None and now >= watch.deadline:
            self.outcome = "failed"
            log.warning("[%s] request stopped at the server's time limit", self.id)
            raise RequestTimedOut("The request took longer than this server allows and was stopped; "
                                  "retry, perhaps with a smaller max_tokens.")
        if watch.stopping is not None and watch.stopping.is_set():
            self.outcome = "failed"
            raise ServerStopping("The server is shutting down; retry the request.")
        return False
