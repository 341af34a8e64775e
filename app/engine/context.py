"""Repository context in front of a prompt: other files' code, in the model's repo-level format or as comments.

Editors send code from elsewhere in the repository (llama.vscode and llama.vim: a ring of
chunks from recently seen files; Copilot: its stable and recent-edit context). A model
whose card gives a repo-level format (Qwen2.5-Coder, StarCoder2: the ``repo`` entry of its
config) reads it in that format; any other model gets it as comment lines headed by the
file's path, in the language of the file being edited. Either way it goes before the
prompt (after a leading BOS), stable chunks first, so consecutive requests share it as a
prefix and its keys and values come from the prefix cache.

The prompt itself has priority: context fills only the room the whole prompt leaves in the
window (the least stable and, among equals, the earliest chunks are left out first), and
none is added to a prompt that had to be cut.
"""
from __future__ import annotations

import re
from types import MappingProxyType
from typing import Sequence

from config import RepoTemplate

from .params import ContextChunk, PromptContext
from .prompts import Template, TemplateError

REPO_NAME = "project"  # the repository's name when the client gives none
UNNAMED = "snippet"  # the path of a chunk from no named file
CURRENT = "current"  # the path of the file being edited, which no client names
PLACEHOLDER = re.compile(r"\{(repo|path|code)\}")

# Line comments (start, end) by language: an editor's language id or a file extension.
_HASH, _SLASHES, _DASHES, _SEMICOLON, _PERCENT = ("#", ""), ("//", ""), ("--", ""), (";", ""), ("%", "")
COMMENTS = MappingProxyType({
    **dict.fromkeys(("python", "py", "shellscript", "sh", "bash", "zsh", "ruby", "rb", "perl", "pl", "r", "yaml",
                     "yml", "toml", "julia", "jl", "elixir", "ex", "exs", "powershell", "ps1", "dockerfile",
                     "makefile", "mk", "cmake", "nim", "coffeescript", "coffee", "gdscript", "gd"), _HASH),
    **dict.fromkeys(("c", "h", "cpp", "cc", "cxx", "hpp", "hh", "csharp", "cs", "java", "javascript", "js", "mjs",
                     "cjs", "javascriptreact", "jsx", "typescript", "ts", "mts", "typescriptreact", "tsx", "go", "rust",
                     "rs", "swift", "kotlin", "kt", "kts", "scala", "dart", "php", "objective-c", "objective-cpp", "m",
                     "mm", "groovy", "zig", "solidity", "sol", "proto", "jsonc", "glsl", "cuda", "cu", "fsharp",
                     "fs", "verilog", "v", "sv"), _SLASHES),
    **dict.fromkeys(("sql", "lua", "haskell", "hs", "elm", "ada", "adb", "vhdl", "vhd"), _DASHES),
    **dict.fromkeys(("clojure", "clj", "cljs", "lisp", "el", "scheme", "scm", "ini", "asm", "s"), _SEMICOLON),
    **dict.fromkeys(("latex", "tex", "erlang", "erl", "matlab"), _PERCENT),
    **dict.fromkeys(("css", "scss", "less"), ("/*", "*/")),
    **dict.fromkeys(("html", "htm", "xml", "svg", "vue", "svelte", "markdown", "md"), ("<!--", "-->")),
})


class RepoTemplateError(TemplateError):
    """A repo template that does not fit the model's tokenizer."""


def comment_style(language: str | None, path: str | None) -> tuple[str, str]:
    """How to comment a line: by the edited file's language, else by the chunk's extension, else ``#``."""
    extension = path.rpartition(".")[2].lower() if path and "." in path else None
    for key in (language, extension):
        if key and key.lower() in COMMENTS:
            return COMMENTS[key.lower()]
    return _HASH


def commented(chunk: ContextChunk, style: tuple[str, str]) -> str:
    """The chunk as comment lines, headed by its path when it has one, and a blank line after it."""
    start, end = style
    lines = ([f"Path: {chunk.path}"] if chunk.path else []) + chunk.text.rstrip("\n").split("\n")
    return "".join(f"{start} {line}".rstrip() + (f" {end}" if end else "") + "\n" for line in lines) + "\n"


class RepoLayout:
    """A model card's repo-level format: a repository header, one block per other file, the edited file's header."""

    def __init__(self, tokenizer, template: RepoTemplate):
        try:
            self.name, self.file, self.current = (Template(tokenizer, t, PLACEHOLDER) for t in
                                                  (template.name, template.file, template.current))
        except TemplateError as exc:
            raise RepoTemplateError(f"repo template {template}: {exc}") from None

    def frame(self, context: PromptContext) -> tuple[list[int], list[int]]:
        """The ids before the first chunk and after the last one."""
        return self.name.render(repo=context.repo or REPO_NAME), self.current.render(path=context.path or CURRENT)

    def chunk(self, chunk: ContextChunk, context: PromptContext) -> list[int]:
        """One chunk's ids: a file block."""
        return self.file.render(path=chunk.path or UNNAMED, code=_line_ended(chunk.text))


class CommentLayout:
    """For models without a repo-level format: each chunk as comment lines in the edited file's language."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def frame(self, context: PromptContext) -> tuple[list[int], list[int]]:
        """Nothing around the chunks."""
        return [], []

    def chunk(self, chunk: ContextChunk, context: PromptContext) -> list[int]:
        """One chunk's ids: its comment lines."""
        text = commented(chunk, comment_style(context.language, chunk.path))
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class ContextPlacer:
    """Puts a request's repository context in front of its prompt ids, as much as the window allows."""

    def __init__(self, tokenizer, template: RepoTemplate | None, bos: Sequence[int]):
        self.layout = RepoLayout(tokenizer, template) if template else CommentLayout(tokenizer)
        self.bos = list(bos)

    def place(self, ids: list[int], context: PromptContext | None, room: int) -> tuple[list[int], int]:
        """``ids`` with the chunks that fit in ``room`` more tokens in front, and how many chunks were left out."""
        if context is None or not context.chunks:
            return ids, 0
        head, tail = self.layout.frame(context)
        blocks = [self.layout.chunk(chunk, context) for chunk in context.chunks] if room > 0 else []
        kept = fit(blocks, context.chunks, room - len(head) - len(tail))
        if not kept:
            return ids, len(context.chunks)
        bos = self.bos if self.bos and ids[:len(self.bos)] == self.bos else []
        placed = [*bos, *head, *(i for block in kept for i in block), *tail, *ids[len(bos):]]
        return placed, len(context.chunks) - len(kept)


def fit(blocks: list[list[int]], chunks: Sequence[ContextChunk], room: int) -> list[list[int]]:
    """The blocks that fit in ``room`` tokens, in order; volatile chunks go first, then the earliest."""
    total = sum(len(block) for block in blocks)
    left_out: set[int] = set()
    for index in sorted(range(len(blocks)), key=lambda i: (chunks[i].stable, i)):
        if total <= room:
            break
        left_out.add(index)
        total -= len(blocks[index])
    return [block for index, block in enumerate(blocks) if index not in left_out]


def _line_ended(text: str) -> str:
    """``text`` ending with a line end (chunks are whole lines)."""
    return text if text.endswith("\n") else text + "\n"
