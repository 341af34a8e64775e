"""How many CPU threads each phase of the work gets: the plan the scheduler follows."""
from __future__ import annotations

import os

import torch

from config import EngineOptions

# Two threads pay off for big prompt blocks only (measured on 2 cores: a 256-token block
# 150 ms with 2 threads, 195 ms with 1; a 32-token block 33 ms with 2, 26 ms with 1).
MANY_THREADS_FROM = 128


def cpu_threads(options: EngineOptions, workers: int = 1, cores: int | None = None) -> tuple[int, int]:
    """Intra-op threads for (prefill, decode) on a CPU.

    Prefill is compute-bound and uses the worker's share of the cores. Decoding one
    token is bound by memory and barely gains from the last core, while an OpenMP
    team that owns every core stalls whenever anything else runs (the HTTP thread,
    an editor on the same machine): with 2 cores, streaming over HTTP measured 47
    tok/s with 2 decode threads and 83 tok/s with 1.
    """
    share = max(1, (cores or os.cpu_count() or 1) // max(workers, 1))
    prefill = options.torch_threads or share
    return prefill, options.decode_threads or max(1, prefill - 1)


class ThreadPlan:
    """Sets torch's intra-op threads for each kind of step; with no counts (a GPU) it leaves them alone."""

    def __init__(self, prefill: int | None = None, decode: int | None = None):
        self.prefill, self.decode = prefill, decode
        # With cores to spare beyond the decode threads, prompt blocks run on a helper thread
        # beside the decode steps (on 2 cores a 256-token block no longer stops 8 running
        # sequences for 150 ms: they slow from 26 to 30 ms per step instead).
        self.beside = max(0, prefill - decode) if prefill and decode else 0

    @classmethod
    def for_cpu(cls, options: EngineOptions, workers: int = 1, cores: int | None = None) -> "ThreadPlan":
        """The plan of a CPU worker (see :func:`cpu_threads`)."""
        return cls(*cpu_threads(options, workers, cores))

    def __repr__(self) -> str:
        return f"{self.prefill}/{self.decode} prefill/decode threads" if self.prefill else "torch's threads"

    def decode_step(self) -> None:
        """Threads for a batched decode step (see :func:`cpu_threads`).

        Fewer threads than cores decode fastest at every batch size here (2 cores, 1 thread: batch 1
        11 vs 26 ms per step, batch 8 16 vs 23 ms): a step is hundreds of small ops, and a second
        thread mostly waits.
        """
        self._use(self.decode)

    def prompt_block(self, size: int) -> None:
        """Threads for a prompt block of ``size`` tokens on the scheduler's thread."""
        self._use(self.prefill if size >= MANY_THREADS_FROM else self.decode)

    def beside_block(self) -> None:
        """Threads for a prompt block on the helper thread, with the cores the decode steps leave."""
        self._use(self.beside or None)

    def other_work(self) -> None:
        """Threads for whole-prompt work between steps (scoring an echoed prompt)."""
        self._use(self.prefill)

    @staticmethod
    def _use(count: int | None) -> None:
        if count and torch.get_num_threads() != count:
            torch.set_num_threads(count)
