"""Continuous batching: one thread per model owns it and advances every running sequence together.

Request threads :meth:`Scheduler.submit` a :class:`Work` and read its deltas from
``work.out``. Between decode steps the scheduler admits waiting work, feeds one
prompt block of a newcomer (so a long prompt stalls the others for one block, not
for its whole prefill), drops work whose client went away, and runs one batched
forward for all running sequences.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Callable, Sequence, TypeVar

import torch

from .params import Delta
from .sampling import Choice, TokenChooser
from .text import SequenceState

log = logging.getLogger(__name__)

T = TypeVar("T")
DONE = object()  # put on ``work.out`` after the last deltas


class Work:
    """One job inside the scheduler: its sequences, its token chooser, and the queue of its deltas."""

    def __init__(self, request_id: str, prompt_ids: Sequence[int], sequences: list[SequenceState],
                 chooser: TokenChooser):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.sequences = sequences
        self.chooser = chooser
        self.out: queue.SimpleQueue = queue.SimpleQueue()  # lists of deltas, then DONE or an exception
        self.alive: list[int] = []  # indexes of sequences in the batch, in row order
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.started = self.first_token = self.finished = None
        self.reused = 0

    def cancel(self) -> None:
        """Ask the scheduler to drop this work at its next step (the client went away)."""
        self.cancelled.set()


def step_sequences(choice: Choice, live: list[SequenceState]) -> tuple[list[Delta], list[int]]:
    """Push each chosen token into its sequence; return the deltas and the rows still running."""
    token_ids = choice.token_ids.tolist()
    logprobs = choice.logprobs.tolist()
    tops = [()] * len(live)
    if choice.top_ids is not None:
        tops = [tuple(zip(i, lp)) for i, lp in zip(choice.top_ids.tolist(), choice.top_logprobs.tolist())]
    deltas, keep = [], []
    for row, seq in enumerate(live):
        delta = seq.push(token_ids[row], logprobs[row], tops[row])
        if delta is not None:
            deltas.append(delta)
        if not seq.finished:
            keep.append(row)
    return deltas, keep


class Scheduler:
    """Owns a runner's model in one thread; decodes the sequences of all admitted work in one batch."""

    def __init__(self, runner, max_rows: int = 8, threads: tuple[int, int] | None = None, name: str = "model"):
        self.runner = runner
        self.max_rows = max_rows
        self.threads = threads  # CPU threads for (prefill, decode); None leaves torch's setting
        self.name = name
        self._cv = threading.Condition()
        self._inbox: collections.deque = collections.deque()  # Work, or (callable, future)
        self._waiting: collections.deque[Work] = collections.deque()
        self._prefilling: tuple[Work, object] | None = None
        self._running: list[Work] = []  # in batch row order
        self._tokens: list[int] = []  # the next token to feed, per batch row
        self._thread: threading.Thread | None = None
        # With cores to spare beyond the decode threads, a newcomer's prompt blocks run on
        # a helper thread while decode steps go on (on 2 cores a 256-token block no longer
        # stops 8 running sequences for 150 ms: they slow from 26 to 30 ms per step instead).
        self._beside = max(0, threads[0] - threads[1]) if threads else 0
        self._helper = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"prefill-{name}")
                        if self._beside else None)
        self._block: concurrent.futures.Future | None = None  # a prompt block running on the helper

    # -- the request threads' side --------------------------------------------

    def submit(self, work: Work) -> None:
        """Queue work; its deltas arrive on ``work.out``."""
        self._post(work)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the scheduler's thread between steps (for other uses of the model) and return its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._post((fn, future))
        return future.result()

    @property
    def load(self) -> tuple[int, int]:
        """(sequences decoding, jobs waiting or prefilling): a snapshot for logs and metrics."""
        return len(self._tokens), len(self._waiting) + len(self._inbox) + (self._prefilling is not None)

    def _post(self, item) -> None:
        with self._cv:
            self._inbox.append(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"scheduler-{self.name}", daemon=True)
                self._thread.start()
            self._cv.notify()

    # -- the scheduler thread ----------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    self._iterate()
                except Exception as exc:  # a fault here must not leave requests waiting forever
                    log.exception("%s: scheduler fault; failing the work in hand", self.name)
                    self._fail_all(exc)

    def _iterate(self) -> None:
        self._collect()
        self._drop_cancelled()
        self._admit()
        if self._prefilling is not None:
            self._prefill_step()
        if self._running:
            self._decode_step()

    def _fail_all(self, exc: Exception) -> None:
        works = [*self._running, *self._waiting, *([self._prefilling[0]] if self._prefilling else [])]
        self._running, self._tokens, self._waiting, self._prefilling = [], [], collections.deque(), None
        if self._block is not None:
            self._block.cancel()
            self._block = None
        self.runner.batch.reset()
        self._fail(works, exc)

    def _busy(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    def _collect(self) -> None:
        """Take new work and calls from the inbox; sleep while there is nothing at all to do."""
        with self._cv:
            while not self._inbox and not self._busy():
                self._cv.wait()
            items = list(self._inbox)
            self._inbox.clear()
        for item in items:
            if isinstance(item, Work):
                self._waiting.append(item)
            else:
                fn, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        self._set_threads(0)
                        future.set_result(fn())
                    except Exception as exc:  # handed to the caller's thread
                        future.set_exception(exc)

    def _drop_cancelled(self) -> None:
        for work in [w for w in self._waiting if w.cancelled.is_set()]:
            self._waiting.remove(work)
            self._finish(work)
        if self._prefilling and self._prefilling[0].cancelled.is_set() and self._block is None:
            work, prefill = self._prefilling
            self._prefilling = None
            prefill.abandon()
            self._finish(work)
        if not any(w.cancelled.is_set() for w in self._running):
            return
        rows, tokens, running, offset = [], [], [], 0
        for work in self._running:
            size = len(work.alive)
            if work.cancelled.is_set():
                self._finish(work)
            else:
                rows.extend(range(offset, offset + size))
                tokens.extend(self._tokens[offset:offset + size])
                running.append(work)
            offset += size
        self._shrink(rows, tokens, running)

    def _admit(self) -> None:
        """Start the next waiting prompt when its sequences fit in the batch."""
        if self._prefilling is not None or not self._waiting:
            return
        work = self._waiting[0]
        rows = len(self._tokens)
        fits = rows == 0 or (rows + len(work.sequences) <= self.max_rows and self.runner.batch.can_join())
        if fits:
            self._waiting.popleft()
            work.started = time.perf_counter()
            try:
                prefill = self.runner.start(work.prompt_ids)
            except Exception as exc:
                self._fail([work], exc)
                return
            work.reused = prefill.reused
            self._prefilling = (work, prefill)

    def _prefill_step(self) -> None:
        """Feed the newcomer's next prompt block; once its prompt is all in, start decoding it."""
        work, prefill = self._prefilling
        try:
            done = self._feed_block(prefill)
        except Exception as exc:
            self._prefilling, self._block = None, None
            self._fail([work], exc)
            return
        if done:
            self._prefilling = None
            self._start_decoding(work, prefill)

    def _feed_block(self, prefill) -> bool:
        """Feed one block, beside the decode steps when cores are spare; return whether the prompt is in."""
        if self._block is not None:
            if self._running and not self._block.done():
                return False  # decode meanwhile
            done, self._block = self._block.result(), None
            return done
        if self._running and self._helper is not None:
            self._block = self._helper.submit(self._step_beside, prefill)
            return False
        # Two threads pay off for big blocks only (measured on 2 cores: a 256-token block 150 ms
        # with 2 threads, 195 ms with 1; a 32-token block 33 ms with 2, 26 ms with 1).
        self._set_threads(0 if prefill.next_block_size >= 128 else 1)
        return prefill.step()

    def _start_decoding(self, work: Work, prefill) -> None:
        """Choose the newcomer's first tokens from its prompt's logits; its live sequences join the batch."""
        try:
            choice = work.chooser(prefill.logits.expand(len(work.sequences), -1))
            work.first_token = time.perf_counter()
            deltas, keep = step_sequences(choice, work.sequences)
            if deltas:
                work.out.put(deltas)
            if not keep:
                self._finish(work)
                return
            if len(keep) < len(work.sequences):
                work.chooser.keep_rows(torch.tensor(keep, device=self.runner.device))
            work.alive = keep
            self.runner.batch.join(prefill, len(keep))
        except Exception as exc:
            self._fail([work], exc)
            return
        self._running.append(work)
        self._tokens.extend(choice.token_ids[keep].tolist())

    def _step_beside(self, prefill) -> bool:
        """One prompt block on the helper thread, with the cores the decode steps leave free."""
        with torch.inference_mode():
            if torch.get_num_threads() != self._beside:
                torch.set_num_threads(self._beside)
            return prefill.step()

    def _decode_step(self) -> None:
        """One forward for every running sequence; each work's chooser picks its own rows' tokens."""
        try:
            # One thread decodes fastest at every batch size here (2 cores: batch 1 11 vs 26 ms per step,
            # batch 8 16 vs 23 ms): a step is hundreds of small ops, and a second thread mostly waits.
            self._set_threads(1)
            logits = self.runner.batch.decode(torch.tensor(self._tokens, device=self.runner.device))
            rows, tokens, running, finished, offset = [], [], [], [], 0
            for work in self._running:
                size = len(work.alive)
                choice = work.chooser(logits[offset:offset + size])
                deltas, keep = step_sequences(choice, [work.sequences[i] for i in work.alive])
                if deltas:
                    work.out.put(deltas)
                if keep:
                    if len(keep) < size:
                        work.chooser.keep_rows(torch.tensor(keep, device=self.runner.device))
                        work.alive = [work.alive[k] for k in keep]
                    rows.extend(offset + k for k in keep)
                    tokens.extend(choice.token_ids[keep].tolist())
                    running.append(work)
                else:
                    finished.append(work)
                offset += size
            self._shrink(rows, tokens, running)
        except Exception as exc:
            running, self._running, self._tokens = self._running, [], []
            self.runner.batch.reset()
            self._fail(running, exc)
            return
        for work in finished:
            self._finish(work)

    def _shrink(self, rows: list[int], tokens: list[int], running: list[Work]) -> None:
        """Keep only the given batch rows, with their next tokens and their work."""
        if len(rows) < len(self._tokens):
            self.runner.batch.keep(rows)
        self._running, self._tokens = running, tokens

    def _finish(self, work: Work) -> None:
        work.finished = time.perf_counter()
        work.out.put(DONE)

    def _fail(self, works: list[Work], exc: Exception) -> None:
        log.error("%s: generation failed for %s: %r", self.name, ", ".join(w.request_id for w in works), exc)
        for work in works:
            work.finished = time.perf_counter()
            work.out.put(exc)

    def _set_threads(self, phase: int) -> None:
        if self.threads and torch.get_num_threads() != self.threads[phase]:
            torch.set_num_threads(self.threads[phase])
