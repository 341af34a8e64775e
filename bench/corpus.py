"""Prompt material: real Python standard-library source, cut to token budgets with the model's tokenizer."""
from __future__ import annotations

import collections
import inspect
import sysconfig
import textwrap
from pathlib import Path


def stdlib_files(min_bytes: int = 12_000) -> list[Path]:
    """The standard library's top-level .py files of at least ``min_bytes``, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.stat().st_size >= min_bytes)


def keystroke_source() -> Path:
    """The file the keystroke session types through: textwrap.py of this Python."""
    return Path(inspect.getsourcefile(textwrap))


def edit_source() -> Path:
    """The file the edit session re-types code in: collections/__init__.py of this Python (UserString)."""
    return Path(inspect.getsourcefile(collections))


class Corpus:
    """Cuts source text into prompts of a given number of tokens, at line boundaries."""

    def __init__(self, model_folder: Path):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_folder))
        self.files = stdlib_files()

    def count(self, text: str) -> int:
        """Number of tokens in ``text`` (no special tokens added)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def eos_ids(self) -> list[int]:
        """The model's end-of-sequence token ids (to ban with logit_bias)."""
        ids = {self.tokenizer.eos_token_id}
        try:
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(self.tokenizer.name_or_path).eos_token_id
            ids.update(eos if isinstance(eos, list) else [eos])
        except (OSError, ValueError):
            pass
        return sorted(i for i in ids if i is not None)

    def _offsets(self, text: str) -> list[tuple[int, int]]:
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    def head(self, text: str, start: int, tokens: int) -> str:
        """The text from ``start`` (moved to a line start) up to a line end, at most ``tokens`` tokens."""
        if start > 0 and text[start - 1] != "\n":
            newline = text.find("\n", start)
            start = newline + 1 if newline >= 0 else len(text)
        window = text[start:start + tokens * 8]
        offsets = self._offsets(window)
        if len(offsets) <= tokens:
            return window
        cut = offsets[tokens][0]
        line_end = window.rfind("\n", 0, cut)
        return window[:line_end + 1 if line_end > 0 else cut]

    def tail_start(self, text: str, end: int, tokens: int) -> int:
        """The first line start from which ``text[start:end]`` is at most ``tokens`` tokens."""
        base = max(0, end - tokens * 8)
        offsets = self._offsets(text[base:end])
        if len(offsets) <= tokens:
            if base == 0:
                return 0
            cut = base
        else:
            cut = base + offsets[len(offsets) - tokens][0]
        if cut == 0 or text[cut - 1] == "\n":
            return cut
        newline = text.find("\n", cut, end)
        return newline + 1 if newline >= 0 else cut

    def prompts(self, count: int, tokens: int, offset: float, reverse: bool = False) -> list[str]:
        """``count`` prompts of about ``tokens`` tokens, each from a different file, starting at ``offset`` of it.

        Cycles through the files again (at other offsets) when there are fewer files than prompts.
        """
        files = list(reversed(self.files)) if reverse else list(self.files)
        result: list[str] = []
        round_ = 0
        while len(result) < count and round_ < 10:
            at = (offset + 0.37 * round_) % 0.9
            for path in files:
                text = path.read_text(encoding="utf-8", errors="replace")
                prompt = self.head(text, int(len(text) * at), tokens)
                if self.count(prompt) >= tokens // 2:
                    result.append(prompt)
                if len(result) == count:
                    break
            round_ += 1
        return result
