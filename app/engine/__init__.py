"""Generation without the web: load a model, turn a prompt into a completion.

Nothing in this package imports Flask; the CLI (``python -m app complete``) and the
server both call :func:`complete` or the :class:`Engine` methods it wraps.
"""
from __future__ import annotations

from .engine import Engine, Generation, Job
from .params import Delta, SamplingParams, SequenceResult, TokenLogprob

__all__ = ["Delta", "Engine", "Generation", "Job", "SamplingParams", "SequenceResult", "TokenLogprob", "complete"]


def complete(engine: Engine, prompt: str, suffix: str | None = None, params: SamplingParams = SamplingParams(),
             n: int = 1) -> list[SequenceResult]:
    """Complete ``prompt`` (optionally filling in before ``suffix``) and return each sequence."""
    return engine.complete(engine.prepare(prompt, params, suffix=suffix, n=n))
