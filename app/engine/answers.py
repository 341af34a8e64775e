"""Recent answers of deterministic requests, to answer an identical request again without the model.

Editors ask again for the same completion on cursor moves and undo. A greedy request (or
a sampled one with a seed) gives the same tokens every time: the prefix cache is exact and
batching changes no request's numbers (both tested), so its answer can be replayed as is.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

from .params import Delta
from .request import Request
from .sequence import SequenceState


@dataclass(frozen=True)
class Answer:
    """One finished request's deltas, in order, and each sequence's final state."""

    deltas: tuple[Delta, ...]
    sequences: tuple[dict, ...]


class AnswerCache:
    """A small LRU of answers keyed by everything that decides a request's tokens."""

    def __init__(self, entries: int = 64):
        self.entries = entries
        self.hits = 0
        self._answers: OrderedDict[Hashable, Answer] = OrderedDict()
        self._lock = threading.Lock()  # request threads read and write it

    def clear(self) -> None:
        """Forget every answer (the hit count stays)."""
        with self._lock:
            self._answers.clear()

    @staticmethod
    def key(request: Request) -> Hashable | None:
        """The request's key, or None when its tokens may differ from run to run."""
        params = request.params
        sampled_unseeded = params.temperature != 0.0 and params.seed is None
        timed = any(seq.stop.budget is not None for seq in request.sequences)  # ends by the clock
        # A traced request (the debug page) is run, not replayed: its trace is of this run.
        if sampled_unseeded or timed or request.echo or request.trace:
            return None
        # The client's prompt, not the anchored one: the same request is answered alike whatever the cache held.
        prompt = request.realigned.original if request.realigned else request.prompt_ids
        return prompt, params, request.n, len(request.sequences), request.healing

    def get(self, key: Hashable) -> Answer | None:
        """The answer stored under ``key`` (now the most recent), if any."""
        with self._lock:
            answer = self._answers.get(key)
            if answer is not None:
                self._answers.move_to_end(key)
                self.hits += 1
            return answer

    def put(self, key: Hashable, request: Request, deltas: list[Delta]) -> None:
        """Keep a finished request's answer, dropping the least recently used past ``entries``."""
        if self.entries <= 0:
            return
        answer = Answer(tuple(deltas), tuple(_snapshot(seq) for seq in request.sequences))
        with self._lock:
            self._answers[key] = answer
            self._answers.move_to_end(key)
            while len(self._answers) > self.entries:
                self._answers.popitem(last=False)


_FINAL_STATE = ("index", "text", "token_ids", "sent", "generated", "cumulative_logprob", "finish_reason", "stopped_by",
                "logprobs")


def _snapshot(seq: SequenceState) -> dict:
    """What a finished sequence's results are made of."""
    return {name: list(value) if isinstance(value, list) else value
            for name, value in ((n, getattr(seq, n)) for n in _FINAL_STATE)}


def replay(request: Request, answer: Answer) -> tuple[Delta, ...]:
    """Give ``request``'s sequences the stored final state; return the deltas to send."""
    for seq, state in zip(request.sequences, answer.sequences):
        for name, value in state.items():
            setattr(seq, name, list(value) if isinstance(value, list) else value)
    request.outcome = "done"
    return answer.deltas
