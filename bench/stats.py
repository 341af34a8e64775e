"""Small statistics helpers."""
from __future__ import annotations

from typing import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values`` by linear interpolation; None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float | None:
    """The median of ``values``; None when empty."""
    return percentile(values, 50)


def decode_speed(tokens: int | None, first_ms: float | None, last_ms: float | None) -> float | None:
    """Tokens/s after the first token: (tokens - 1) / (last - first), times in ms; None when it cannot be told.

    The first token's own time is the TTFT (prefill), so n tokens span n - 1 decode steps.
    """
    if not tokens or tokens < 2 or first_ms is None or last_ms is None or last_ms <= first_ms:
        return None
    return (tokens - 1) / ((last_ms - first_ms) / 1000)
