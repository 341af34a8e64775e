"""When a sequence stops, and how much of its text is safe to send before it does."""
from __future__ import annotations

import time
from typing import Callable, NamedTuple


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index of the earliest stop string in ``text[start:]`` (as an index into ``text``), or None."""
    found = first_stop(text, stops, start)
    return found[0] if found else None


def first_stop(text: str, stops: tuple[str, ...], start: int = 0) -> tuple[int, str] | None:
    """The earliest stop string in ``text[start:]``: its index into ``text`` and the string itself; None: none."""
    hits = [(i, s) for i, s in ((text.find(s, start), s) for s in stops if s) if i >= 0]
    return min(hits, key=lambda hit: hit[0]) if hits else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def indentation(line: str) -> int:
    """Columns of leading whitespace (a tab counts 4)."""
    expanded = line.expandtabs(4)
    return len(expanded) - len(expanded.lstrip())


class DedentStop:
    """Copilot's ``trim_by_indentation``: the completion ends before a line indented less than its block.

    The block's indentation is that of the first non-blank line starting at or after the
    cursor; the cursor's own line counts when the prompt's last line holds only whitespace
    (``lead``), and is skipped when the cursor is in the middle of code (``lead`` None).
    """

    def __init__(self, lead: str | None):
        self.lead = lead

    def _lines(self, text: str):
        """(index in text where the line starts, the line, whether it is complete) after the cursor."""
        if self.lead is not None:
            start, first = -len(self.lead), self.lead + text
        else:
            cut = text.find("\n")
            if cut < 0:
                return
            start, first = cut + 1, text[cut + 1:]
        for line in first.split("\n"):
            complete = start + len(line) < len(text)
            yield start, line, complete
            start += len(line) + 1

    def find(self, text: str) -> int | None:
        """Where the completion ends (trailing blank lines dropped), or None while no line dedents."""
        base = None
        for start, line, complete in self._lines(text):
            if not line.strip():
                continue
            if base is None:
                base = indentation(line)
            elif indentation(line) < base:
                return len(text[:max(start, 0)].rstrip())
        return None

    def held_back(self, text: str) -> int:
        """Text to hold: whitespace after the last code that spans a line end could still precede a dedent
        (and would then be dropped with the trailing blank lines)."""
        tail = len(text) - len(text.rstrip())
        return tail if "\n" in text[len(text) - tail:] else 0


class IndentStop:
    """llama.cpp's ``n_indent``: the completion ends before a later line indented by fewer than ``minimum`` characters.

    The editor plugins send the cursor line's indentation, so a completion that leaves the
    cursor's block stops there. As in llama.cpp, indentation is counted in characters (a tab
    is one), the completion's first line (the rest of the cursor's line) is never checked, and
    the text ends at the start of the offending line. Unlike llama.cpp, a blank line does not
    end it: blank lines inside a block are common.
    """

    def __init__(self, minimum: int):
        self.minimum = minimum

    def find(self, text: str) -> int | None:
        """Where the completion ends (the start of the first under-indented line), or None while none is."""
        start = text.find("\n") + 1
        while 0 < start < len(text):
            end = text.find("\n", start)
            line = text[start:] if end < 0 else text[start:end]
            code = line.lstrip(" \t")
            if code and len(line) - len(code) < self.minimum:
                return start
            start = end + 1 if end >= 0 else 0
        return None

    def held_back(self, text: str) -> int:
        """Text to hold: a line begun with only whitespace (and its line end) may still turn out to be under-indented."""
        newline = text.rfind("\n")
        return len(text) - newline if newline >= 0 and not text[newline + 1:].strip(" \t") else 0


class TimeBudget:
    """llama.cpp's ``t_max_predict_ms``: once ``seconds`` of decoding have passed, end at the next newline.

    Editors show nothing until a completion is done, and a small model rarely stops early
    when asked for 500 tokens (Copilot's default): a line-complete answer on time beats a
    long one late. The clock starts at the first generated token, as llama.cpp's does.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.started: float | None = None
        self.seen = 0  # text length at the previous token: the next newline is searched after it

    def cut(self, text: str) -> int | None:
        """After the budget, where the text ends: just past the first newline of the newest text; else None."""
        now = self.clock()
        if self.started is None:
            self.started = now
        seen, self.seen = self.seen, len(text)
        if now - self.started < self.seconds:
            return None
        newline = text.find("\n", seen)
        return newline + 1 if newline >= 0 else None


class StopDecision(NamedTuple):
    """After one token: whether the sequence is done, why (``"stop"`` or ``"length"``), and where its text ends.

    ``rule`` names the rule that ended it (one of :data:`STOP_RULES`) and ``detail`` what it matched
    (the stop string, the end-of-sequence token's id), for the debug log and the debug page.
    """

    done: bool
    reason: str | None = None
    cut: int | None = None  # the text's end when a stop string or a dedent cuts it
    rule: str | None = None
    detail: str | None = None


# eos_token: an end-of-sequence id (the model's, or a configured stop written as a special token);
# stop_string: a client's or the model's stop text; trim_by_indentation: Copilot's dedent stop; n_indent:
# llama.cpp's; max_tokens: the token limit; time_budget: a line ended after the time budget.
STOP_RULES = ("eos_token", "stop_string", "trim_by_indentation", "n_indent", "max_tokens", "time_budget")


GO_ON = StopDecision(False)


class StopCondition:
    """Decides once per token whether a sequence is done.

    ``"stop"`` is an end-of-sequence token, a stop string or a dedent (then the text is
    cut where it starts); ``"length"`` is ``max_tokens`` tokens generated, or a line ended
    after the time budget (cut after its newline).
    """

    def __init__(self, eos_ids: frozenset[int], max_tokens: int, stops: tuple[str, ...],
                 dedent: DedentStop | IndentStop | None = None, budget: TimeBudget | None = None):
        self.eos_ids = eos_ids
        self.max_tokens = max_tokens
        self.stops = stops
        self.dedent = dedent
        self.budget = budget

    def ends_with(self, token_id: int, generated: int) -> bool:
        """Whether this token ends the sequence whatever its text (so held-back bytes must come out)."""
        return token_id in self.eos_ids or generated >= self.max_tokens

    def __call__(self, token_id: int, generated: int, text: str, start: int = 0) -> StopDecision:
        """Check the newest token; ``text`` is all text so far, searched for stops from ``start``."""
        cut = self._cut(text, start)
        if token_id in self.eos_ids:
            return StopDecision(True, "stop", cut[0] if cut else None, "eos_token", str(token_id))
        if cut is not None:
            return StopDecision(True, "stop", *cut)
        if generated >= self.max_tokens:
            return StopDecision(True, "length", rule="max_tokens", detail=str(self.max_tokens))
        line_end = self.budget.cut(text) if self.budget else None
        if line_end is not None:
            return StopDecision(True, "length", line_end, "time_budget", f"{self.budget.seconds * 1000:.0f} ms")
        return GO_ON

    def _cut(self, text: str, start: int) -> tuple[int, str, str | None] | None:
        """Where the text ends because of a stop string (searched from ``start``) or a dedent, with the rule
        and what it matched; None: nowhere."""
        cuts = []
        found = first_stop(text, self.stops, start) if self.stops else None
        if found is not None:
            cuts.append((found[0], "stop_string", found[1]))
        dedent = self.dedent.find(text) if self.dedent else None
        if dedent is not None:
            rule = "trim_by_indentation" if isinstance(self.dedent, DedentStop) else "n_indent"
            cuts.append((dedent, rule, None))
        return min(cuts, key=lambda cut: cut[0], default=None)

    def hold(self, unsent: str) -> int:
        """How much of the unsent text's tail to hold back: it could still become a stop."""
        return max(held_back(unsent, self.stops), self.dedent.held_back(unsent) if self.dedent else 0)
