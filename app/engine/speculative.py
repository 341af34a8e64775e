"""Speculative decoding from the prompt: drafts copied from the context, verified in the batch's next forward.

Code completion copies: a call repeated from above, a closing structure, an identifier
from the suffix. When the last few tokens of a sequence occurred earlier in its context
(prompt, suffix, repository context, its own output), the tokens that followed them there
are a cheap guess of what comes next (prompt-lookup decoding). The scheduler feeds each
row its last token plus its draft in one forward; on a CPU, where a step is bound by
reading the weights, a few more tokens per row cost little, and every draft token the
model agrees with is a step saved.

Only greedy sequences speculate (and only without presence/frequency penalties, whose
counts change token by token): a draft token is accepted when it is the token the model's
argmax picks at that place, so the output is token for token what plain greedy decoding
gives. Sampled sequences decode one token per step as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

# n-gram sizes matched against the context, longest first: a longer match predicts better,
# a single token still finds a copy of a line when nothing longer does.
MAX_NGRAM = 3
MIN_NGRAM = 1
# A draft token costs a little even when rejected (a wider forward; see README "Speculative decoding"):
# a sequence whose recent drafts are mostly rejected stops drafting for a while, then tries again.
MIN_ACCEPTANCE = 0.2
PAUSE_TOKENS = 16


def ngram_index(ids: Sequence[int], max_ngram: int = MAX_NGRAM) -> dict[tuple[int, ...], int]:
    """For every n-gram (1..max_ngram tokens) of ``ids``: the position of the last token of its last occurrence."""
    index: dict[tuple[int, ...], int] = {}
    for end in range(len(ids)):
        for n in range(1, min(max_ngram, end + 1) + 1):
            index[tuple(ids[end - n + 1:end + 1])] = end
    return index


@dataclass
class DraftStats:
    """Counts of speculation (a request's, for its log line; a model's, for /metrics)."""

    drafted: int = 0  # draft tokens fed to the model
    accepted: int = 0  # of those, tokens the model agreed with
    steps: int = 0  # row-steps that carried a draft

    def record(self, drafted: int, accepted: int) -> None:
        """Count one row's verified draft."""
        self.drafted += drafted
        self.accepted += accepted
        self.steps += 1


class PromptLookup:
    """One sequence's drafter: its context, an index of where each n-gram last ended, and its draft length.

    The index over the prompt is built once per request (on the request's own thread) and
    shared by its sequences; tokens a sequence generates go into its own small index, which
    is looked up first (later occurrences are the better guess).
    """

    def __init__(self, prompt_ids: Sequence[int], shared: dict[tuple[int, ...], int], max_tokens: int):
        self.tokens = list(prompt_ids)
        self.shared = shared  # built over prompt_ids[:-1]: the last token is appended like a generated one
        self.own: dict[tuple[int, ...], int] = {}
        self.max_tokens = max_tokens
        self.length = max(1, max_tokens // 2)  # the next draft's length, adapted to acceptance
        self.acceptance = 1.0  # moving average of the share of draft tokens accepted
        self.paused = 0  # tokens to generate before drafting again
        self.match: int | None = None  # where the longest n-gram ending the context ended before
        if self.tokens:
            last = self.tokens.pop()
            self.push(last)

    def push(self, token_id: int) -> None:
        """Append a token to the context and find where its longest ending n-gram occurred before."""
        self.tokens.append(token_id)
        self.paused = max(0, self.paused - 1)
        end = len(self.tokens) - 1
        self.match = None
        for n in range(min(MAX_NGRAM, end + 1), MIN_NGRAM - 1, -1):
            gram = tuple(self.tokens[end - n + 1:])
            before = self.own.get(gram, self.shared.get(gram))
            if before is not None and self.match is None:
                self.match = before
            self.own[gram] = end

    def draft(self) -> list[int]:
        """The tokens that followed the last match, up to the current draft length (empty: none, or paused)."""
        if self.match is None or self.paused:
            return []
        start = self.match + 1
        return self.tokens[start:start + self.length]

    def record(self, drafted: int, accepted: int) -> None:
        """Adapt the draft length: longer while whole drafts are taken, shorter when they are not."""
        if not drafted:
            return
        self.acceptance = 0.7 * self.acceptance + 0.3 * accepted / drafted
        if self.acceptance < MIN_ACCEPTANCE:
            self.paused, self.acceptance = PAUSE_TOKENS, MIN_ACCEPTANCE * 2  # a fresh start after the pause
        if accepted == drafted:
            self.length = min(self.length + 2, self.max_tokens)
        else:
            self.length = max(1, min(self.length - 1, accepted + 1))


@dataclass
class Verdict:
    """The outcome of verifying one row's draft: the tokens it emits and how many fed columns stay."""

    tokens: list[int] = field(default_factory=list)  # accepted draft tokens, then the model's own next token
    positions: list[int] = field(default_factory=list)  # which fed position's logits picked each token

    @property
    def kept_columns(self) -> int:
        """Fed columns whose keys/values stay: the row's last token and every accepted draft token."""
        return len(self.tokens)


def verify(draft: Sequence[int], picked: Sequence[int]) -> Verdict:
    """Accept the longest prefix of ``draft`` equal to the model's picks; the first disagreement is its own pick.

    ``picked[i]`` is the greedy token after the row's i-th fed token (its last token, then the draft).
    """
    verdict = Verdict()
    for i, token in enumerate(picked[:len(draft) + 1]):
        verdict.tokens.append(token)
        verdict.positions.append(i)
        if i >= len(draft) or draft[i] != token:
            break
    return verdict


class StepCosts:
    """How long a decode step takes for each batch size and width (tokens per row), learned from the steps run.

    A step's time is far from flat in the tokens it feeds on a CPU (measured, SmolLM2-135M int8,
    1 thread: 1 row 32 ms, 8 rows 72 ms, 8 rows of 2 tokens 208 ms), so whether a draft pays
    depends on the batch: the scheduler feeds the width that gives the most expected tokens per
    second. An unmeasured width is estimated at the cost of the nearest narrower one measured for
    that many rows, optimistically, so it is tried once and then known; a moving average follows
    changes in context length and load.
    """

    def __init__(self) -> None:
        self.seconds: dict[tuple[int, int], float] = {}

    def observe(self, rows: int, width: int, seconds: float) -> None:
        """Record one step of ``rows`` rows feeding ``width`` tokens each."""
        old = self.seconds.get((rows, width))
        self.seconds[rows, width] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def estimate(self, rows: int, width: int) -> float | None:
        """Expected seconds for such a step (None: no step of that many rows measured yet)."""
        if (rows, width) in self.seconds:
            return self.seconds[rows, width]
        narrower = [w for r, w in self.seconds if r == rows and w < width]
        return self.seconds[rows, max(narrower)] if narrower else None

    def best_width(self, drafts: Sequence[Sequence[int]], acceptance: Sequence[float]) -> int:
        """The width (1 + draft tokens per row) with the most expected tokens per second."""
        longest = max((len(d) for d in drafts), default=0)
        rows = len(drafts)
        best, best_rate = 1, 0.0
        for width in range(1, longest + 2):
            cost = self.estimate(rows, width)
            if cost is None:
                return 1  # a plain step first: it is what every width is weighed against
            expected = rows + sum(rate * min(width - 1, len(d)) for d, rate in zip(drafts, acceptance))
            if expected / cost > best_rate:
                best, best_rate = width, expected / cost
        return best
