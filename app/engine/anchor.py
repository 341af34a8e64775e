"""Anchoring: a prompt whose start moved is made to begin the way a cached prompt began, so its cache is reused.

Editors cut the file above the cursor to a window that slides as the developer types
(FauxPilot: a fixed head and the last 119 lines; Copilot and Continue: a prefix cut from
the top a line at a time; llama.vscode: 256 lines above the cursor). Each new prompt then
shares only a few tokens at its start with the last one, and an exact prefix cache misses:
the whole window is computed again (1,500 tokens: ~1.3 s on an AVX-512 machine, ~6 s on an
AVX2 one, PERF-NOTES.md).

Here the far end of the new prompt is swapped for the far end of a cached prompt that
contains the rest: ``new = cached[:i + m] + ids[j + m:]`` where ``cached[i:i + m] ==
ids[j:j + m]`` is a long run shared by both. Everything up to ``i + m`` is then the cached
prompt's own tokens, whose keys and values are reused exactly (no position is shifted);
the prompt only gains or loses up to ``limit`` tokens of context at its far end, the part
that matters least to the next line. Once the window has moved further than that, the
client's own prompt is used again and becomes the next anchor.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

from .kvcache import common_prefix_length

GRAM = 16  # tokens that must agree to propose a run: about two lines of code, rarely repeated by chance
SEAM = 4  # tokens a cut may re-tokenize differently (a newline merged with the next line's indent)


@dataclass(frozen=True)
class Realignment:
    """A prompt rewritten to begin like a cached one: the new ids and what changed at the far end."""

    ids: tuple[int, ...]
    original: tuple[int, ...]
    reusable: int  # leading tokens of ``ids`` that are a cached prompt's own
    dropped: int   # tokens of the original's far end left out
    restored: int  # tokens of the cached prompt's far end put in their place


def realign(cached: Iterable[Sequence[int]], ids: Sequence[int], budget: int, limit: int,
            min_gain: int = 64) -> Realignment | None:
    """The best rewrite of ``ids`` onto one of the ``cached`` prompts, or None when none gains ``min_gain`` tokens.

    A rewrite keeps the request's tokens from the shared run to the end (the text near the
    cursor and the suffix), swaps at most ``limit`` tokens at each side of the far end, and
    stays within ``budget`` tokens.
    """
    cached = [tuple(c) for c in cached]
    exact = max((common_prefix_length(c, ids) for c in cached), default=0)
    best: Realignment | None = None
    for candidate in cached:
        found = _best_run(candidate, ids, limit)
        if found is None:
            continue
        i, j, m = found
        size = len(ids) + i - j
        if size > budget or i + m < exact + min_gain or (best is not None and i + m <= best.reusable):
            continue
        best = Realignment(tuple(candidate[:i + m]) + tuple(ids[j + m:]), tuple(ids), i + m, j, i)
    if best is not None:
        start = common_prefix_length(best.ids, ids)  # the shared start (a BOS, a fixed head) is neither
        best = Realignment(best.ids, best.original, best.reusable, best.dropped - start, best.restored - start)
    return best


def slid_seam(cached: Iterable[Sequence[int]], ids: Sequence[int], min_head: int = 0, limit: int = 1024) -> int | None:
    """Where ``ids`` parts from a cached prompt whose window slid down below a shared head, or None.

    Copilot, Continue and llama.vscode cut the file from the top, so their window's top moves
    (a head of 0 tokens, or a BOS); FauxPilot sends a fixed head (the file's first 31 lines)
    and then the last 119 lines, so its window's top moves under an unchanged head. The seam
    is the end of the longest shared head (at least ``min_head`` tokens) after which the new
    prompt's text reappears in the cached one a little further on, with lines gone on one side
    only (an edit changes both sides after a head, and is left alone). A prompt whose start
    has not moved (a file shorter than the client's budget) has no seam and is never cut.
    """
    best = None
    for candidate in cached:
        start = common_prefix_length(candidate, ids)
        if start >= min_head and (best is None or start > best) and _best_run(candidate, ids, limit):
            best = start
    return best


def _best_run(cached: Sequence[int], ids: Sequence[int], limit: int) -> tuple[int, int, int] | None:
    """(i, j, m) of the longest-reaching run ``cached[i:i+m] == ids[j:j+m]`` that starts within ``limit`` of the shared start.

    Only runs that reach either prompt's last differing token matter; the one whose
    cached end ``i + m`` is furthest wins, as it is what the cache holds.
    """
    start = common_prefix_length(cached, ids)
    if start >= len(ids) - GRAM or start >= len(cached) - GRAM:
        return None  # an exact extension (or nothing to find): the plain prefix cache handles it
    index: dict[tuple[int, ...], list[int]] = {}
    for i in range(start, min(len(cached) - GRAM, start + limit) + 1):
        index.setdefault(tuple(cached[i:i + GRAM]), []).append(i)
    best: tuple[int, int, int] | None = None
    for j in range(start, min(len(ids) - GRAM, start + limit) + 1):
        for i in index.get(tuple(ids[j:j + GRAM]), ()):
            if not _far_end_swap(start, i, j):
                continue
            m = GRAM + common_prefix_length(cached[i + GRAM:], ids[j + GRAM:])
            if best is None or i + m > best[0] + best[2]:
                best = (i, j, m)
        if best is not None and (best[0] + best[2] == len(cached) or best[1] + best[2] == len(ids)):
            break  # the run reaches an end: nothing later can reach further
    return best


def _far_end_swap(start: int, i: int, j: int) -> bool:
    """Whether swapping ``cached[start:i]`` for ``ids[start:j]`` only moves the window's far edge.

    A window that slid has lines only on the cached side (restore them) or only on the new
    side (leave them out); text on both sides after a long shared start is an edit the
    developer made, which must not be replaced by what the text was before. At the very
    start (Continue shuffles its snippets there) both sides are context.
    """
    if i == j:
        return False  # the same place: an in-place edit, not a move
    return i - start <= SEAM or j - start <= SEAM or start <= SEAM


def anchored_start(text: str, period: int, min_lines: int = 96) -> str:
    """``text`` from its first anchor line on: a line chosen by its own content, about one in ``period``.

    This is the exact kind of anchoring, on by default: the cut depends on the prompt alone,
    so a warm answer is always the cold answer to the same request. An editor's prefix is cut
    from the top a line at a time as the developer types (Copilot, Continue, llama.vscode's
    256 lines); the first anchor line at or below the client's cut stays the first line of the
    model's prompt until the client's cut passes it, so successive prompts share their whole
    start and the prefix cache reuses it, at the price of ~``period`` far lines of context.
    Short prompts (under ``min_lines`` lines, ~1,000 tokens of code) are cheap to compute again and
    are left whole: Continue's ~300-token prefix behind snippets it shuffles per request reused less
    anchored than as sent (17% of its prompt tokens against 28%, ``python -m bench.fidelity``).
    """
    if period <= 0:
        return text
    lines = text.splitlines(keepends=True)
    if len(lines) < max(min_lines, 4 * period):
        return text
    # Gaps between anchors are geometric: over 4 periods in e^-4 (2%) of places, where the prompt goes as sent.
    for index, line in enumerate(lines[:4 * period]):
        if _is_anchor(line, period):
            return "".join(lines[index:])
    return text


def anchor_offsets(text: str, period: int) -> list[int]:
    """Where ``text``'s anchor lines begin (character offsets), top to bottom."""
    offsets, position = [], 0
    for line in text.splitlines(keepends=True):
        if _is_anchor(line, period):
            offsets.append(position)
        position += len(line)
    return offsets


def _is_anchor(line: str, period: int) -> bool:
    """Whether a line starts anchored prompts: a stable hash of its text picks about one line in ``period``."""
    content = line.strip()
    # Short lines ("}", "else:", "return") recur everywhere; an anchor should be a line of its own.
    return len(content) >= 8 and zlib.crc32(content.encode()) % period == 0
