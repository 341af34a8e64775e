"""One generated sequence: token ids to text incrementally (whole characters only), its stop decision,
the text held back until it cannot become a stop, and its logprobs with their offsets."""
from __future__ import annotations

from typing import Callable, Sequence

from .params import Delta, SequenceResult, TokenLogprob
from .stopping import StopCondition, StopDecision


class IncrementalDetokenizer:
    """Decodes one token at a time; text waits until its characters are complete.

    A few context tokens (the end of the prompt) are decoded along with the new ones
    so tokenizers that treat a leading space specially (SentencePiece) stay right.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], context_ids: Sequence[int] = (), window: int = 6):
        self.decode = decode
        self.ids = list(context_ids[-window:]) if window else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _step(self, final: bool) -> str:
        prefix_text = self.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        # Slide the window forward so each step decodes only a handful of tokens.
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def add(self, token_id: int) -> str:
        """Feed one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        return self._step(final=False)

    def flush(self) -> str:
        """Return text still waiting for more bytes; used when no more tokens will come."""
        return self._step(final=True)


class SequenceState:
    """One generated sequence: its text, what has been sent, its stop decision and logprobs."""

    def __init__(
        self,
        index: int,
        detokenizer: IncrementalDetokenizer,
        stop: StopCondition,
        token_text: Callable[[int], str] | None = None,
        offset_base: int = 0,
        skip: str = "",
    ):
        self.index = index
        self.detokenizer = detokenizer
        self.stop = stop
        self.token_text = token_text  # set when logprobs are wanted
        self.offset_base = offset_base
        self.skip = skip  # healed prompt text that the first token repeats; never sent
        self.text = ""
        self.token_ids: list[int] = []
        self.sent = 0
        self.generated = 0
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stopped_by: StopDecision | None = None  # the decision that ended it: rule, what it matched, the cut
        self.pending: list[TokenLogprob] = []
        self.logprobs: list[TokenLogprob] = []

    @property
    def finished(self) -> bool:
        """Whether the sequence has stopped."""
        return self.finish_reason is not None

    def push(self, token_id: int, logprob: float, top: tuple[tuple[int, float], ...] = ()) -> Delta | None:
        """Add a generated token; return what can be sent now (None when nothing can)."""
        self.generated += 1
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        offset = len(self.text)
        if token_id in self.stop.eos_ids:
            self.text += self.detokenizer.flush()
        else:
            self.text += self.detokenizer.add(token_id)
            if self.stop.ends_with(token_id, self.generated):
                self.text += self.detokenizer.flush()
            if self.token_text is not None:
                self._note_logprob(token_id, logprob, top, offset)
        if self.skip and len(self.text) >= len(self.skip):
            self.text = self.text.removeprefix(self.skip)
            self.skip = ""
        decision = self.stop(token_id, self.generated, self.text, self.sent)
        if not decision.done:
            if self.skip:
                return None
            return self._emit(len(self.text) - self.stop.hold(self.text[self.sent:]), None)
        self.stopped_by = decision
        if decision.cut is not None:
            self.text = self.text[:decision.cut]
            self.pending = [e for e in self.pending if e.offset - self.offset_base < decision.cut]
        return self._emit(len(self.text), decision.reason, release_all=True)

    def end(self, reason: str) -> Delta | None:
        """End the sequence for a reason decided elsewhere (the upstream's own stop): all text goes out."""
        self.text += self.detokenizer.flush()
        return self._emit(len(self.text), reason, release_all=True)

    def _note_logprob(self, token_id: int, logprob: float, top: tuple[tuple[int, float], ...], offset: int) -> None:
        token = self.token_text(token_id)
        if len(self.text) > offset and self.text.endswith(token):
            # Text that waited for this token (a split character) came out with it: the
            # token itself starts where its own text does.
            offset = len(self.text) - len(token)
        alternatives = tuple((self.token_text(t), lp) for t, lp in top)
        self.pending.append(TokenLogprob(token, logprob, alternatives, self.offset_base + offset))

    def _emit(self, end: int, reason: str | None, release_all: bool = False) -> Delta | None:
        chunk = self.text[self.sent:end]
        self.sent = end
        self.finish_reason = reason
        if release_all:
            released, self.pending = self.pending, []
        else:
            limit = self.offset_base + end
            released = [e for e in self.pending if e.offset < limit]
            self.pending = self.pending[len(released):]
        self.logprobs.extend(released)
        if not chunk and not released and reason is None:
            return None
        return Delta(self.index, chunk, tuple(released), reason)

    def result(self, prefix: str = "", prefix_logprobs: Sequence[TokenLogprob] = ()) -> SequenceResult:
        """The whole sequence (with an optional echoed prompt in front)."""
        return SequenceResult(
            index=self.index,
            text=prefix + self.text,
            finish_reason=self.finish_reason,
            logprobs=[*prefix_logprobs, *self.logprobs],
            completion_tokens=self.generated,
            cumulative_logprob=self.cumulative_logprob,
        )
