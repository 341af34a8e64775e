"""When a sequence stops, and how much of its text is safe to send before it does."""
from __future__ import annotations


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index of the earliest stop string in ``text[start:]`` (as an index into ``text``), or None."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class StopCondition:
    """Decides after each token whether a sequence is done: ``(done, reason)``.

    ``reason`` is ``"stop"`` for an end-of-sequence token or a stop string and
    ``"length"`` when ``max_tokens`` tokens have been generated.
    """

    def __init__(self, eos_ids: frozenset[int], max_tokens: int, stops: tuple[str, ...]):
        self.eos_ids = eos_ids
        self.max_tokens = max_tokens
        self.stops = stops

    def __call__(self, token_id: int, generated: int, text: str, start: int = 0) -> tuple[bool, str | None]:
        """Check the newest token; ``text`` is all text so far, searched for stops from ``start``."""
        if token_id in self.eos_ids:
            return True, "stop"
        if self.stops and find_stop(text, self.stops, start) is not None:
            return True, "stop"
        if generated >= self.max_tokens:
            return True, "length"
        return False, None
