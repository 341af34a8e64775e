"""Token healing: the model re-chooses the prompt's last token, constrained to what the prompt says.

A prompt that ends in the middle of what would normally be one token (the newline
before an indented line is the everyday case: "):\n" then "    if") leaves the model
continuing an unusual tokenization, and small models then drop the indentation or
wander. Removing the last token and letting the first generated token be any token
whose text starts with it lets the model pick the natural one ("\n   "); the removed
text is not sent back, so the client still receives a pure continuation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Healing:
    """What the engine removed from the prompt and what the first token may be."""

    text: str  # prompt text of the removed token, cut from the front of the output
    allowed: tuple[int, ...]  # token ids whose text starts with the removed token's


class TokenHealer:
    """Finds, for a prompt's last token, the vocabulary tokens that extend it."""

    def __init__(self, tokenizer, decode: Callable[[Sequence[int]], str], max_cached: int = 4096):
        self.decode = decode
        # Raw token strings (byte-level or SentencePiece marks) so prefixes compare exactly.
        self.tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.special = set(tokenizer.all_special_ids)
        self.max_cached = max_cached
        self._extensions: dict[str, tuple[int, ...]] = {}

    def extensions(self, token_id: int) -> tuple[int, ...]:
        """Ids of every token whose raw text starts with that of ``token_id`` (itself included)."""
        raw = self.tokens[token_id]
        found = self._extensions.get(raw)
        if found is None:
            found = tuple(i for i, text in enumerate(self.tokens) if text and text.startswith(raw)
                          and i not in self.special)
            if len(self._extensions) >= self.max_cached:
                self._extensions.clear()
            self._extensions[raw] = found
        return found

    def heal(self, ids: Sequence[int]) -> tuple[list[int], Healing | None]:
        """The prompt without its last token and the healing to apply, or the prompt unchanged."""
        if len(ids) < 2 or ids[-1] in self.special or ids[-1] >= len(self.tokens) or not self.tokens[ids[-1]]:
            return list(ids), None
        allowed = self.extensions(ids[-1])
        if len(allowed) < 2:
            return list(ids), None  # nothing longer to choose: healing cannot change anything
        window = list(ids[-8:])
        before, after = self.decode(window[:-1]), self.decode(window)
        text = after[len(before):]
        if not text or "\ufffd" in text or before + text != after:
            return list(ids), None
        return list(ids[:-1]), Healing(text, allowed)
