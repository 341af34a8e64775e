"""Generation without the web: load a model, turn a prompt into a completion.

Nothing in this package imports Flask or marshmallow, or knows a status code; the
CLI (``python -m app complete``) and the server both call :func:`complete` or the
:class:`Engine` methods it wraps, and the web layer maps :mod:`.errors` to HTTP.
"""
from __future__ import annotations

from .engine import Engine, EngineStats
from .params import Delta, SamplingParams, SequenceResult, TokenLogprob
from .request import Request, Watch

__all__ = ["Delta", "Engine", "EngineStats", "Request", "SamplingParams", "SequenceResult", "TokenLogprob", "Watch",
           "complete"]


def complete(engine: Engine, prompt: str, suffix: str | None = None, params: SamplingParams = SamplingParams(),
             n: int = 1) -> list[SequenceResult]:
    """Complete ``prompt`` (optionally filling in before ``suffix``) and return each sequence."""
    return engine.complete(engine.prepare(prompt, params, suffix=suffix, n=n))
