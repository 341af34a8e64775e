"""Plain parameter and result objects shared by the engine, the CLI and the web layer."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How to pick and when to stop tokens; neutral defaults add no work to the decode loop."""

    max_tokens: int | None = None  # None: the model's default (resolved when the request is prepared)
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    trim_by_indentation: bool = False  # end before a line indented less than the completion's block
    time_budget_ms: int | None = None  # decoding time after which the text ends at its next newline; None: server's


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a choice with its log-probability and the top alternatives."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...]
    offset: int


@dataclass(frozen=True)
class Delta:
    """New text (and its tokens) for one sequence; ``finish_reason`` is set on its last delta."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None


@dataclass(frozen=True)
class SequenceResult:
    """A whole generated sequence, as returned by non-streaming completion."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0
    cumulative_logprob: float = 0.0

    @property
    def mean_logprob(self) -> float:
        """Average log-probability per generated token (the best_of ranking key)."""
        return self.cumulative_logprob / max(self.completion_tokens, 1)
