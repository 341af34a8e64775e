"""Continuous batching: one thread per model owns it, admits requests and advances them all together.

Request threads :meth:`Scheduler.submit` a :class:`~app.engine.request.Request` and read
its deltas from it. Each iteration reads: schedule (take new requests, drop cancelled
ones, admit the next waiting prompt) → run (one block of one prompt being fed, then one
batched decode step) → postprocess (each request pushes its picked tokens into its
sequences; finished rows leave the batch). A long prompt thus stalls the running
sequences for one block, not for its whole prefill, and several prompts are fed at once
(see :data:`PATIENCE`), so a short prompt is not stuck behind a long one either.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from .kvcache import common_prefix_length
from .request import Request
from .speculative import DraftStats, StepCosts
from .threads import ThreadPlan

log = logging.getLogger(__name__)

T = TypeVar("T")

# Which prompt gets the next block. Shortest remaining first: a prompt with few tokens left
# (a short request, or a keystroke's prompt that the prefix cache mostly covers) gets its
# first token after its own few blocks instead of after every block of a long prompt
# admitted earlier (a tester's 8-token request waited 69 s behind a 60 KB prompt); on one
# server this order gives the least mean wait for a first token. Shortest-first alone would
# starve a long prompt while short ones keep coming (a team's editors), so a prompt passed
# over for PATIENCE blocks in a row is due and gets the next block (the longest-waiting
# first). With k prompts being fed, each thus gets at least one block in every PATIENCE + k,
# and a newcomer's first block comes within about k blocks. 4 lets a short newcomer of up to 4
# blocks through in one go, while a long prompt beside one newcomer keeps at least 1 block
# in 5. Round robin would bound both too, but would make every short prompt wait one block
# per long prompt for each of its own blocks.
PATIENCE = 4
# A plain (draftless) decode step every this many, to keep its measured cost current: a width that is
# not fed is never timed again, so one dear first measurement of the plain step (beside a prompt block,
# say) would keep drafts fed that do not pay; 8 streams decoded 81 tok/s with drafts, 97 without.
REFRESH_STEPS = 8
# Drafts are fed only while this few sequences decode. On these CPUs a step's time grows steeply with the
# tokens it feeds once there are several rows (SmolLM2-135M int8, 1000-token context: 1 row 32 ms, 1 row of
# 2 tokens 33 ms; 4 rows 50 ms, 4 rows of 2 tokens 127 ms), and with 8 streams speculation measured 72-81
# tok/s in all against 83-97 without, the learned costs notwithstanding (step times beside prompt blocks
# are too noisy to learn from).
MAX_DRAFT_ROWS = 2


@dataclass(eq=False)
class Prefilling:
    """A prompt being fed: its request, the runner's prefill, the tokens left to feed and the blocks it waited."""

    request: Request
    prefill: object
    left: int  # prompt tokens still to feed
    waited: int = 0  # blocks fed to other prompts since this one's last block


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
        self.drafts = DraftStats()  # speculation over all requests
        self.step_costs = StepCosts()  # decode step times by batch size and width, to decide how far drafts go
        self._steps = 0
        self._cv = threading.Condition()
        self._inbox: collections.deque = collections.deque()  # Request, or (callable, future)
        self._waiting: collections.deque[Request] = collections.deque()
        self._prefilling: list[Prefilling] = []  # in admission order
        self._thread: threading.Thread | None = None
        self._helper = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"prefill-{name}")
                        if self.threads.beside else None)
        # A prompt block running on the helper, and whose it is: one block at a time, on the spare cores.
        self._block: tuple[Prefilling, concurrent.futures.Future] | None = None

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
        return len(self.rows), len(self._waiting) + len(self._inbox) + len(self._prefilling)

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
        if self._prefilling:
            self._prefill_step()
            self._join_ready()
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
        """Requests whose client went away leave the queue, the prefill (their blocks kept) and the batch."""
        for request in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(request)
            request.finish()
        # A prompt whose block runs on the helper is dropped once that block is done, at a later iteration.
        for entry in [e for e in self._prefilling if e.request.cancelled.is_set() and not self._in_flight(e)]:
            self._prefilling.remove(entry)
            entry.prefill.abandon()
            entry.request.finish()
        if any(request.cancelled.is_set() for request in self.rows.requests):
            self._retain(self.rows.without_cancelled())

    def _admit(self) -> None:
        """Start feeding the first waiting prompt that may start now (one per iteration, see :meth:`_fits`)."""
        request = next((r for r in self._waiting if not self._awaits_prefix(r)), None)
        if request is None or not self._fits(request):
            return  # in order: a request with many sequences is not passed by smaller ones forever
        self._waiting.remove(request)
        request.timings.started = time.perf_counter()
        try:
            prefill = self.runner.start(request.prompt_ids)
        except Exception as exc:
            self._fail([request], exc)
            return
        request.reused = prefill.reused
        self.reused_tokens += prefill.reused
        self._prefilling.append(Prefilling(request, prefill, len(request.prompt_ids) - prefill.reused))
        log.debug("%s: prefilling %d prompts (%s joined, %d tokens to feed)", self.name, len(self._prefilling),
                  request.id, self._prefilling[-1].left)

    def _fits(self, request: Request) -> bool:
        """Whether the request's sequences fit beside the rows decoding and those promised to prompts being fed.

        Rows are promised when a prompt starts, so every prompt being fed can join the batch as
        soon as it is in; this also bounds the prompts fed at once by max_rows, so their caches
        never take more memory than the full batch they are about to join. With nothing in hand
        any request starts (even one with more sequences than max_rows, as before). A
        seq2seq batch takes one group at a time (``can_join``).
        """
        promised = len(self.rows) + sum(len(entry.request.sequences) for entry in self._prefilling)
        if not promised:
            return True
        return promised + len(request.sequences) <= self.max_rows and self.runner.batch.can_join()

    def _awaits_prefix(self, request: Request) -> bool:
        """Whether a prompt being fed computes this one's beginning and waiting for it is cheaper than recomputing.

        Its blocks enter the prefix cache when it is in or abandoned (an editor abandons the
        previous keystroke's request), and this prompt then starts from them. Waiting costs at
        most the tokens it has left to feed; starting now costs recomputing the shared tokens it
        did not take from the cache. Without this, the next keystroke's prompt would start cold
        beside the one it extends.
        """
        if getattr(self.runner, "prefix_cache", None) is None:
            return False
        for entry in self._prefilling:
            shared = common_prefix_length(entry.request.prompt_ids, request.prompt_ids) - entry.prefill.reused
            if shared > 0 and shared >= entry.left:
                return True
        return False

    def _next_prefill(self) -> Prefilling | None:
        """The prompt to feed next (see :data:`PATIENCE`), its counts updated for the block it gets."""
        ready = [entry for entry in self._prefilling if not entry.prefill.done]
        if not ready:
            return None
        longest_waiting = max(ready, key=lambda entry: entry.waited)  # the first, the oldest, on ties
        chosen = longest_waiting if longest_waiting.waited >= PATIENCE else min(ready, key=lambda e: e.left)
        for entry in ready:
            entry.waited += 1
        chosen.waited = 0
        chosen.left -= chosen.prefill.next_block_size
        return chosen

    def _prefill_step(self) -> None:
        """Feed one block of one prompt, or collect the block the helper ran."""
        entry, future = self._block or (self._next_prefill(), None)
        if entry is None:
            return
        try:
            self._feed_block(entry, future)
        except Exception as exc:
            self._block = None
            self._prefilling.remove(entry)
            self._fail([entry.request], exc)

    def _feed_block(self, entry: Prefilling, future: concurrent.futures.Future | None) -> None:
        """Feed ``entry``'s next block, beside the decode steps when cores are spare (or collect the helper's)."""
        if future is not None:
            if self.rows.requests and not future.done():
                return  # decode meanwhile
            self._block = None
            future.result()
        elif self.rows.requests and self._helper is not None:
            self._block = (entry, self._helper.submit(self._step_beside, entry.prefill))
        else:
            self.threads.prompt_block(entry.prefill.next_block_size)
            entry.prefill.step()

    def _in_flight(self, entry: Prefilling) -> bool:
        """Whether ``entry``'s block runs on the helper now (its prefill is then the helper's to touch)."""
        return self._block is not None and self._block[0] is entry

    def _join_ready(self) -> None:
        """Prompts that are all in start decoding, in admission order, as the batch takes them."""
        # A cancelled one is left for the next iteration's _drop_cancelled: it never takes a row.
        ready = [e for e in self._prefilling if e.prefill.done and not self._in_flight(e)]
        for entry in [e for e in ready if not e.request.cancelled.is_set()]:
            if self.rows.requests and not self.runner.batch.can_join():
                return  # a seq2seq batch takes one group at a time: the next waits for it to empty
            self._prefilling.remove(entry)
            if entry.request.params.max_tokens == 0:
                entry.request.finish()  # a warm-up: its prompt is in the prefix cache now, nothing to decode
                continue
            self._start_decoding(entry.request, entry.prefill)

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
        """One forward for every row (with its draft, when drafts pay); each request picks its own rows' tokens."""
        try:
            self.threads.decode_step()
            width, drafts = 1, []
            self._steps += 1
            # Every REFRESH_STEPS-th step is a plain one, so the cost drafts are weighed against stays current.
            if len(self.rows) <= MAX_DRAFT_ROWS and self._steps % REFRESH_STEPS:
                drafts = [request.drafts() for request in self.rows.requests]
                flat = [draft for own in drafts for draft in own]
                if any(flat):
                    rates = [rate for request in self.rows.requests for rate in request.acceptance()]
                    width = self.step_costs.best_width(flat, rates)
            started = time.perf_counter()
            if width == 1:
                tokens = torch.tensor(self.rows.next_tokens(), device=self.runner.device)
                logits = self.runner.batch.decode(tokens)
                kept = [request.advance(request.chooser(logits[rows])) for request, rows in self.rows.slices()]
            else:
                kept = self._verify_step([[draft[:width - 1] for draft in own] for own in drafts], width)
            self.step_costs.observe(len(self.rows), width, time.perf_counter() - started)
        except Exception as exc:
            self.runner.batch.reset()
            self._fail(self.rows.clear(), exc)
            return
        self._retain(kept)

    def _verify_step(self, drafts: list[list[list[int]]], width: int) -> list[list[int]]:
        """Feed every row its last token and its draft (padded to ``width``); keep what the model agrees with."""
        fed = []
        for token, draft in zip(self.rows.next_tokens(), (draft for own in drafts for draft in own)):
            # Padding repeats the last token: its columns are hidden by accept() like a rejected draft's.
            fed.append([token, *draft, *[token] * (width - 1 - len(draft))])
        logits = self.runner.batch.verify(torch.tensor(fed, device=self.runner.device))
        kept, columns = [], []
        for (request, rows), own in zip(self.rows.slices(), drafts):
            if any(own):
                still, used = request.advance_drafts(request.chooser(logits[rows].flatten(0, 1)), own, width,
                                                     self.drafts)
            else:  # picks only where it feeds (a sampled request must not draw from its generator more often)
                still, used = request.advance(request.chooser(logits[rows, 0])), [1] * len(own)
            kept.append(still)
            columns.extend(used)
        self.runner.batch.accept(columns, width)
        return kept

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
        requests = [*self.rows.clear(), *self._waiting, *(entry.request for entry in self._prefilling)]
        self._waiting, self._prefilling = collections.deque(), []
        if self._block is not None:
            self._block[1].cancel()
            self._block = None
        self.runner.batch.reset()
        self._fail(requests, exc)

    def _fail(self, requests: list[Request], exc: Exception) -> None:
        log.error("%s: generation failed for %s: %r", self.name, ", ".join(r.id for r in requests), exc)
        for request in requests:
            request.fail(exc)
