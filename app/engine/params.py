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
    min_indent: int = 0  # llama.cpp's n_indent: end before a later line indented by fewer characters (0: off)
    top_k: int = 0  # sample among the k most likely tokens only (0: all)
    time_budget_ms: int | None = None  # decoding time after which the text ends at its next newline; None: server's


@dataclass(frozen=True)
class ContextChunk:
    """Code from elsewhere in the repository, shown to the model before the prompt."""

    text: str
    path: str | None = None  # the file it comes from, when the client names one
    stable: bool = True  # False: likely to change by the next request, so left out first when room is short


@dataclass(frozen=True)
class PromptContext:
    """A request's repository context: chunks in prompt order, and what the client tells of the repository."""

    chunks: tuple[ContextChunk, ...] = ()
    repo: str | None = None  # the repository's name (Copilot's ``nwo``)
    path: str | None = None  # the path of the file being edited
    language: str | None = None  # its language (an editor's language id or an extension): the comment syntax


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
