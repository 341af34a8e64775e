"""Continuous batching: one thread per model owns it, admits requests and advances them all together.

Request threads :meth:`Scheduler.submit` a :class:`~app.engine.request.Request` and read
its deltas from it. Each iteration reads: schedule (take new requests, drop cancelled
ones, admit the next waiting prompt) → run (one prompt block of the newcomer, then one
batched decode step) → postprocess (each request pushes its picked tokens into its
sequences; finished rows leave the batch). A long prompt thus stalls the others for one
block, not for its whole prefill.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from typing import Callable, TypeVar

import torch

from .request import Request
from .threads import ThreadPlan

log = logging.getLogger(__name__)

T = TypeVar("T")


class RowTable:
    """The decode batch's rows: each running request owns a run of consecutive rows, one per live sequence."""

    def __init__(self) -> None:
        self.requests: list[Request] = []  # in row order
        self.sizes: list[int] = []  # rows of each request

    def __len__(self) -> int:
        return sum(self.sizes)

    def add(self, request: Request, rows: int) -> None:
        """Rows for a request, after the existing ones (as the runner's batch appends them)."""
        self.requests.append(request)
        self.sizes.append(rows)

    def slices(self):
        """(request, its rows as a slice of the batch), in row order."""
        start = 0
        for request, size in zip(self.requests, self.sizes):
            yield request, slice(start, start + size)
            start += size

    def next_tokens(self) -> list[int]:
        """The token each row feeds next."""
        return [token for request in self.requests for token in request.next_tokens]

    def retain(self, kept: list[list[int]]) -> tuple[list[int], list[Request]]:
        """Keep, for each request in row order, the rows ``kept`` names (indexes into its own rows).

        Returns the surviving rows as indexes into the batch, and the requests left with none.
        """
        rows, requests, sizes, gone, start = [], [], [], [], 0
        for request, size, own in zip(self.requests, self.sizes, kept):
            rows.extend(start + row for row in own)
            if own:
                requests.append(request)
                sizes.append(len(own))
            else:
                gone.append(request)
            start += size
        self.requests, self.sizes = requests, sizes
        return rows, gone

    def without_cancelled(self) -> list[list[int]]:
        """The ``kept`` rows that drop every cancelled request and keep the rest whole."""
        return [[] if r.cancelled.is_set() else list(range(size)) for r, size in zip(self.requests, self.sizes)]

    def clear(self) -> list[Request]:
        """Drop every row; return their requests."""
        requests, self.requests, self.sizes = self.requests, [], []
        return requests


class Scheduler:
    """Owns a runner's model in one thread; decides who runs and advances every running request together."""

    def __init__(self, runner, max_rows: int, threads: ThreadPlan | None = None, name: str = "model"):
        self.runner = runner
        self.max_rows = max_rows
        self.threads = threads or ThreadPlan()
        self.name = name
        self.rows = RowTable()
        self.reused_tokens = 0  # prompt tokens taken from the prefix cache, over all requests
        self._cv = threading.Condition()
        self._inbox: collections.deque = collections.deque()  # Request, or (callable, future)
        self._waiting: collections.deque[Request] = collections.deque()
        self._prefilling: tuple[Request, object] | None = None
        self._thread: threading.Thread | None = None
        self._helper = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"prefill-{name}")
                        if self.threads.beside else None)
        self._block: concurrent.futures.Future | None = None  # a prompt block running on the helper

    # -- the request threads' side --------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request; its deltas arrive through the request itself."""
        request.timings.submitted = time.perf_counter()
        self._post(request)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the scheduler's thread between steps (for other uses of the model) and return its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._post((fn, future))
        return future.result()

    @property
    def load(self) -> tuple[int, int]:
        """(sequences decoding, requests waiting or prefilling): a snapshot for logs and stats."""
        return len(self.rows), len(self._waiting) + len(self._inbox) + (self._prefilling is not None)

    def _post(self, item) -> None:
        with self._cv:
            self._inbox.append(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"scheduler-{self.name}", daemon=True)
                self._thread.start()
            self._cv.notify()

    # -- the scheduler thread: schedule, run, postprocess ---------------------------

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
        if self.rows.requests:
            self._decode_step()

    def _collect(self) -> None:
        """Take new requests and calls from the inbox; sleep while there is nothing at all to do."""
        with self._cv:
            while not self._inbox and not (self._waiting or self._prefilling or self.rows.requests):
                self._cv.wait()
            items = list(self._inbox)
            self._inbox.clear()
        for item in items:
            if isinstance(item, Request):
                self._waiting.append(item)
            elif item[1].set_running_or_notify_cancel():
                fn, future = item
                try:
                    self.threads.other_work()
                    future.set_result(fn())
                except Exception as exc:  # handed to the caller's thread
                    future.set_exception(exc)

    def _drop_cancelled(self) -> None:
        """Requests whose client went away leave the queue, the prefill (its blocks kept) and the batch."""
        for request in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(request)
            request.finish()
        if self._prefilling and self._prefilling[0].cancelled.is_set() and self._block is None:
            (request, prefill), self._prefilling = self._prefilling, None
            prefill.abandon()
            request.finish()
        if any(request.cancelled.is_set() for request in self.rows.requests):
            self._retain(self.rows.without_cancelled())

    def _admit(self) -> None:
        """Start the next waiting prompt when its sequences fit in the batch."""
        if self._prefilling is not None or not self._waiting:
            return
        request, rows = self._waiting[0], len(self.rows)
        if rows and (rows + len(request.sequences) > self.max_rows or not self.runner.batch.can_join()):
            return
        self._waiting.popleft()
        request.timings.started = time.perf_counter()
        try:
            prefill = self.runner.start(request.prompt_ids)
        except Exception as exc:
            self._fail([request], exc)
            return
        request.reused = prefill.reused
        self.reused_tokens += prefill.reused
        self._prefilling = (request, prefill)

    def _prefill_step(self) -> None:
        """Feed the newcomer's next prompt block; once its prompt is all in, start decoding it."""
        request, prefill = self._prefilling
        try:
            done = self._feed_block(prefill)
        except Exception as exc:
            self._prefilling, self._block = None, None
            self._fail([request], exc)
            return
        if done:
            self._prefilling = None
            self._start_decoding(request, prefill)

    def _feed_block(self, prefill) -> bool:
        """Feed one block, beside the decode steps when cores are spare; return whether the prompt is in."""
        if self._block is not None:
            if self.rows.requests and not self._block.done():
                return False  # decode meanwhile
            done, self._block = self._block.result(), None
            return done
        if self.rows.requests and self._helper is not None:
            self._block = self._helper.submit(self._step_beside, prefill)
            return False
        self.threads.prompt_block(prefill.next_block_size)
        return prefill.step()

    def _step_beside(self, prefill) -> bool:
        """One prompt block on the helper thread."""
        with torch.inference_mode():
            self.threads.beside_block()
            return prefill.step()

    def _start_decoding(self, request: Request, prefill) -> None:
        """Pick the newcomer's first tokens from its prompt's logits; its live sequences join the batch."""
        try:
            keep = request.start(request.chooser(prefill.logits.expand(len(request.sequences), -1)))
            if keep:
                self.runner.batch.join(prefill, len(keep))
        except Exception as exc:
            self._fail([request], exc)
            return
        if keep:
            self.rows.add(request, len(keep))
        else:
            request.finish()

    def _decode_step(self) -> None:
        """One forward for every row; each request's chooser picks its own rows' tokens."""
        try:
            self.threads.decode_step()
            tokens = torch.tensor(self.rows.next_tokens(), device=self.runner.device)
            logits = self.runner.batch.decode(tokens)
            kept = [request.advance(request.chooser(logits[rows])) for request, rows in self.rows.slices()]
        except Exception as exc:
            self.runner.batch.reset()
            self._fail(self.rows.clear(), exc)
            return
        self._retain(kept)

    def _retain(self, kept: list[list[int]]) -> None:
        """Keep the given rows of each request in the batch; requests left with none are finished."""
        total = len(self.rows)
        rows, gone = self.rows.retain(kept)
        if len(rows) < total:
            self.runner.batch.keep(rows)
        for request in gone:
            request.finish()

    # -- failures ----------------------------------------------------------------------

    def _fail_all(self, exc: Exception) -> None:
        requests = [*self.rows.clear(), *self._waiting, *([self._prefilling[0]] if self._prefilling else [])]
        self._waiting, self._prefilling = collections.deque(), None
        if self._block is not None:
            self._block.cancel()
            self._block = None
        self.runner.batch.reset()
        self._fail(requests, exc)

    def _fail(self, requests: list[Request], exc: Exception) -> None:
        log.error("%s: generation failed for %s: %r", self.name, ", ".join(r.id for r in requests), exc)
        for request in requests:
            request.fail(exc)
