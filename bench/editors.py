"""What editor clients send at a keystroke: pure prompt builders over a document and its cursor.

Each builder follows its plugin's source (read at the commits named in bench/README.md) as far
as the prompt's text goes; where the bench simplifies, the docstring says how. Nothing here
touches the network, so tests/test_bench_sessions.py checks the rules offline.
"""
from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Callable

Count = Callable[[str], int]  # tokens in a text (the model's tokenizer, or a stand-in in tests)


@dataclass(frozen=True)
class Doc:
    """An open document and the cursor in it (an offset into ``text``)."""

    text: str
    offset: int
    path: str = "textwrap.py"

    @property
    def before(self) -> str:
        """The text before the cursor."""
        return self.text[:self.offset]

    @property
    def after(self) -> str:
        """The text after the cursor."""
        return self.text[self.offset:]

    @property
    def line(self) -> int:
        """The cursor's line, counted from 0 as VS Code does."""
        return self.before.count("\n")


class TypingScript:
    """Re-types a region of a source file from ``start_line``, ``chars_per_step`` characters a keystroke.

    The document at a step is the file up to the typed position, a line break, then the file
    from the line after the last one the whole session will type: the typist writes new code
    into the middle of a file, so the text after the cursor stays put and the cursor's line
    never has text to its right.
    """

    def __init__(self, source: str, start_line: int, chars_per_step: int, steps: int, path: str = "textwrap.py"):
        lines = source.split("\n")
        start_line = max(0, min(start_line, len(lines) - 2))
        self.source, self.path, self.chars_per_step = source, path, chars_per_step
        self.start = sum(len(line) + 1 for line in lines[:start_line])
        self.steps = max(0, min(steps, (len(source) - self.start) // max(1, chars_per_step)))
        last = self.start + self.steps * chars_per_step
        newline = source.find("\n", last)
        self.rest = source[newline + 1:] if newline >= 0 else ""

    def doc(self, step: int) -> Doc:
        """The document after keystroke ``step`` (0-based)."""
        typed = self.source[:self.start + (step + 1) * self.chars_per_step]
        return Doc(typed + "\n" + self.rest, len(typed), self.path)


def split_keep_ends(text: str) -> list[str]:
    """``text`` in lines that keep their newline (the last one may have none)."""
    return text.splitlines(keepends=True) if text else []


def _comment(text: str, mark: str = "#") -> str:
    """Every line of ``text`` (stripped first, as Continue does) behind a line-comment mark."""
    return "\n".join(f"{mark} {line}" for line in text.strip().split("\n"))


# --- VSCode FauxPilot (Venthe/vscode-fauxpilot, src/FauxpilotCompletionProvider.ts getPrompt) ---------------

FAUXPILOT_MAX_LINES = 150       # fauxpilot.maxLines default
FAUXPILOT_LEADING_SHARE = 0.21  # LEADING_LINES_PROP in src/Constants.ts


def fauxpilot_prompt(doc: Doc, max_lines: int = FAUXPILOT_MAX_LINES,
                     leading_share: float = FAUXPILOT_LEADING_SHARE) -> str:
    """The whole file to the cursor up to line ``max_lines``; past it a fixed head, "\\n", the last lines.

    The head is lines 0 to 30 and 200 characters of line 31 (VS Code's Range(0, 0, 31, 200));
    the window is the 119 lines above the cursor's and the cursor's line up to the cursor.
    """
    if doc.line <= max_lines:
        return doc.before
    leading = math.floor(leading_share * max_lines)
    first = max(doc.line - (max_lines - leading), 0)
    lines = doc.text.split("\n")
    head = "\n".join(lines[:leading] + [lines[leading][:200]])
    window = "\n".join(doc.before.split("\n")[first:])
    return f"{head}\n{window}"


def fauxpilot_body(doc: Doc) -> dict[str, Any]:
    """The plugin's request: no suffix, one line (``inlineCompletion``), 200 tokens, not streamed."""
    return {"prompt": fauxpilot_prompt(doc), "max_tokens": 200, "stop": ["\n"]}


# --- GitHub Copilot (microsoft/vscode-copilot-chat, src/extension/completions-core) ---------------------------

COPILOT_MAX_TOKENS = 500            # DEFAULT_MAX_COMPLETION_LENGTH
COPILOT_PROMPT_COMPLETION = 8192    # DEFAULT_MAX_PROMPT_LENGTH + DEFAULT_MAX_COMPLETION_LENGTH
COPILOT_SUFFIX_PERCENT = 15         # DEFAULT_PROMPT_ALLOCATION_PERCENT.suffix
COPILOT_SUFFIX_RESERVE = 5          # TOKENS_RESERVED_FOR_SUFFIX_ENCODING
COPILOT_PYTHON_STOPS = ("\ndef ", "\nclass ", "\nif ", "\n\n#")  # getStops("python")


@dataclass(frozen=True)
class CopilotPrompt:
    """The prompt Copilot's split-context renderer makes: document prefix, suffix, context blocks."""

    prefix: str
    suffix: str
    context: list[str]
    prefix_tokens: int
    suffix_tokens: int


def copilot_limits(window: int, max_tokens: int = COPILOT_MAX_TOKENS) -> tuple[int, int]:
    """(prefix + context budget, suffix budget) in tokens, with prompt + completion capped at the model's window."""
    available = min(COPILOT_PROMPT_COMPLETION, window) - max_tokens - COPILOT_SUFFIX_RESERVE
    suffix = math.ceil(available * COPILOT_SUFFIX_PERCENT / 100)
    return available - suffix, suffix


def copilot_suffix_text(doc: Doc) -> str:
    """The text after the cursor from the start of the next line, leading blank space dropped (AfterCursor)."""
    after = doc.after
    newline = after.find("\n")
    return after[newline:].lstrip() if newline >= 0 else ""


def take_lines(text: str, budget: int, count: Count) -> tuple[str, int]:
    """The longest run of whole lines from the top of ``text`` within ``budget`` tokens, and its tokens.

    Copilot cuts the suffix at a token; whole lines keep the bench's cut at a line end.
    """
    kept, used = [], 0
    for line in split_keep_ends(text):
        tokens = count(line)
        if used + tokens > budget:
            break
        kept.append(line)
        used += tokens
    return "".join(kept), used


def copilot_prompt(doc: Doc, context: list[tuple[float, str]], count: Count, window: int) -> CopilotPrompt:
    """Budget the document prefix and the weighted context blocks like Copilot's WishlistElision.

    When everything fits, the unused prefix budget goes to the suffix. Otherwise the
    lowest-weight context blocks go first, then prefix lines from the top, one at a time.
    """
    prefix_limit, suffix_limit = copilot_limits(window)
    lines = split_keep_ends(doc.before)
    line_tokens = [count(line) for line in lines]
    blocks = sorted(context, key=lambda block: block[0])  # lowest weight first
    block_tokens = [count(text) for _, text in blocks]
    total = sum(line_tokens) + sum(block_tokens)
    if total < prefix_limit:
        suffix_limit, prefix_limit = suffix_limit + prefix_limit - total, total
    while total > prefix_limit and blocks:
        blocks.pop(0)
        total -= block_tokens.pop(0)
    first = 0
    while total > prefix_limit and first < len(lines) - 1:
        total -= line_tokens[first]
        first += 1
    suffix, suffix_tokens = take_lines(copilot_suffix_text(doc), suffix_limit, count)
    kept = "\n".join(text.strip() for _, text in sorted(blocks, key=lambda block: context.index(block)))
    return CopilotPrompt("".join(lines[first:]), suffix, [kept] if kept else [], sum(line_tokens[first:]),
                         suffix_tokens)


def copilot_context(path: str, snippets: list[tuple[str, str]]) -> list[tuple[float, str]]:
    """The stable context: the path marker (weight 0.7) and similar-file snippets (0.8), as comments."""
    blocks = [(0.7, f"# Path: {path}")]
    for name, text in snippets:
        blocks.append((0.8, _comment(f"Compare this snippet from {name}:\n{text}")))
    return blocks


def next_indent(doc: Doc) -> int:
    """Leading spaces or tabs of the first non-blank line after the cursor's."""
    for line in doc.after.split("\n")[1:]:
        if line.strip():
            return len(line) - len(line.lstrip(" \t"))
    return 0


def copilot_body(prompt: CopilotPrompt, doc: Doc) -> dict[str, Any]:
    """The completions-core request: prefix as ``prompt``, ``suffix``, streamed, ``extra`` with the context."""
    extra: dict[str, Any] = {"language": "python", "next_indent": next_indent(doc), "trim_by_indentation": True,
                             "prompt_tokens": prompt.prefix_tokens, "suffix_tokens": prompt.suffix_tokens}
    if prompt.context:
        extra["context"] = prompt.context
    return {"prompt": prompt.prefix, "suffix": prompt.suffix, "max_tokens": COPILOT_MAX_TOKENS, "top_p": 1,
            "n": 1, "stop": list(COPILOT_PYTHON_STOPS), "extra": extra}


def copilot_headers(rng: random.Random) -> dict[str, str]:
    """The headers that name one Copilot editor session (docs: /work/shared/copilot-requests.md).

    copilot-language-server sends ``VScode-SessionId`` (the same for the whole editor session),
    ``VScode-MachineId`` (the same for the machine) and a short-lived token as the Bearer value
    (renewed about every 30 minutes, so it is no key to a session); the ids are made up here.
    """
    session = f"{uuid.UUID(int=rng.getrandbits(128), version=4)}{rng.randrange(10 ** 12, 10 ** 13)}"
    token = f"tid={rng.getrandbits(128):032x};exp={rng.randrange(10 ** 9, 2 * 10 ** 9)};sku=free_limited_copilot"
    return {"Authorization": f"Bearer {token}", "VScode-SessionId": session,
            "VScode-MachineId": f"{rng.getrandbits(256):064x}", "OpenAI-Intent": "copilot-ghost",
            "Editor-Version": "vscode/1.106.0", "User-Agent": "GithubCopilot/1.539.0"}


# --- Continue (continuedev/continue, core/autocomplete) ---------------------------------------------------------

CONTINUE_MAX_PROMPT = 1024    # DEFAULT_AUTOCOMPLETE_OPTS.maxPromptTokens
CONTINUE_PREFIX_SHARE = 0.3   # prefixPercentage
CONTINUE_SUFFIX_SHARE = 0.2   # maxSuffixPercentage
CONTINUE_SNIPPET_BUFFER = 10  # TOKEN_BUFFER in templating/filtering.ts
CONTINUE_STOPS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>", "</fim_middle>",
                  "</code>", "\n\n", "\r\n\r\n", "/src/", "#- coding: utf-8", "```")  # getStopTokens.ts


def prune_lines_from_top(text: str, max_tokens: float, count: Count) -> str:
    """Drop whole lines from the top until the rest, newlines counted as a token each, fits (pruneLinesFromTop)."""
    lines = text.split("\n")
    tokens = [count(line) for line in lines]
    total = sum(tokens) + max(0, len(lines) - 1)
    start = 0
    while total > max_tokens and start < len(lines):
        total -= tokens[start] + (1 if len(lines) - start > 1 else 0)
        start += 1
    return "\n".join(lines[start:])


def prune_lines_from_bottom(text: str, max_tokens: float, count: Count) -> str:
    """Drop whole lines from the bottom until the rest fits (pruneLinesFromBottom)."""
    lines = text.split("\n")
    tokens = [count(line) for line in lines]
    total = sum(tokens) + max(0, len(lines) - 1)
    end = len(lines)
    while total > max_tokens and end > 0:
        end -= 1
        total -= tokens[end] + (1 if end > 0 else 0)
    return "\n".join(lines[:end])


def last_parts(path: str, parts: int = 2) -> str:
    """The last ``parts`` components of a path (getLastNUriRelativePathParts)."""
    return "/".join(PurePath(path).parts[-parts:])


def continue_prompt(doc: Doc, snippets: list[tuple[str, str]], count: Count, rng: random.Random) -> tuple[str, str]:
    """(prompt, suffix): shuffled commented snippets that fit, the file's path, then the pruned prefix.

    The snippets stand for Continue's "base" ones (root-path, import-definition and static
    snippets), which it shuffles with Math.random() on every request; ``rng`` is seeded here.
    """
    prefix = prune_lines_from_top(doc.before, CONTINUE_MAX_PROMPT * CONTINUE_PREFIX_SHARE, count)
    suffix_budget = min(CONTINUE_MAX_PROMPT - count(prefix), CONTINUE_SUFFIX_SHARE * CONTINUE_MAX_PROMPT)
    suffix = prune_lines_from_bottom(doc.after, suffix_budget, count) or "\n"
    remaining = CONTINUE_MAX_PROMPT - count(prefix + suffix)
    chosen = []
    for path, text in rng.sample(snippets, len(snippets)):
        size = count(text) + CONTINUE_SNIPPET_BUFFER
        if text.strip() and text.strip() not in prefix + suffix and size <= remaining:
            chosen.append(_comment(f"Path: {last_parts(path)}\n{text}"))
            remaining -= size
    header = "\n".join(chosen) + "\n" + _comment(last_parts(doc.path))
    return header + "\n" + prefix, suffix


def continue_body(prompt: str, suffix: str) -> dict[str, Any]:
    """Continue's request with a FIM-capable provider: prompt and suffix, its stop list, streamed.

    Continue asks for the model's default maximum (4096 tokens for a model it does not know)
    and ends the stream itself once its filters finish the completion; the bench caps at 256.
    """
    return {"prompt": prompt, "suffix": suffix, "max_tokens": 256, "stop": list(CONTINUE_STOPS)}


# --- llama.vscode (ggml-org/llama.vscode, src/completion.ts, src/llama-server.ts, src/extra-context.ts) -------

LLAMA_N_PREFIX = 256         # llama-vscode.n_prefix (lines)
LLAMA_N_SUFFIX = 64          # llama-vscode.n_suffix (lines)
LLAMA_N_PREDICT = 128        # llama-vscode.n_predict
LLAMA_T_MAX_MS = 500         # t_max_prompt_ms and t_max_predict_ms
LLAMA_RING_CHUNKS = 16       # ring_n_chunks
LLAMA_CHUNK_LINES = 64       # ring_chunk_size
LLAMA_RING_SCOPE = 1024      # ring_scope
LLAMA_PICK_DISTANCE = 32     # MAX_LAST_PICK_LINE_DISTANCE
LLAMA_MAX_QUEUED = 16        # MAX_QUEUED_CHUNKS
LLAMA_RING_IDLE_S = 3.0      # RING_UPDATE_MIN_TIME_LAST_COMPL: the ring updates only after this long without a request


@dataclass(frozen=True)
class InfillFields:
    """The local context of one /infill request."""

    input_prefix: str
    input_suffix: str
    prompt: str
    n_indent: int


def infill_fields(doc: Doc, n_prefix: int = LLAMA_N_PREFIX, n_suffix: int = LLAMA_N_SUFFIX) -> InfillFields:
    """``n_prefix`` lines above the cursor's, the cursor's line so far, the rest of it and ``n_suffix`` lines after."""
    lines = doc.text.split("\n")
    line = doc.line
    text = lines[line]
    column = len(doc.before.split("\n")[-1])
    line_prefix, line_suffix = text[:column], text[column:]
    prefix_lines = lines[max(0, line - n_prefix):line]
    suffix_lines = lines[line + 1:min(len(lines) - 1, line + n_suffix) + 1]
    prompt = "" if not line_prefix.strip(" \t") else line_prefix  # only indentation: sent empty
    return InfillFields("\n".join(prefix_lines) + "\n", line_suffix + "\n" + "\n".join(suffix_lines) + "\n",
                        prompt, len(text) - len(text.lstrip()))


def infill_body(fields: InfillFields, chunks: list[dict[str, str]]) -> dict[str, Any]:
    """A completion request as llama.vscode posts it to /infill, but greedy (top_k 1; the plugin uses 40)."""
    body: dict[str, Any] = {"id_slot": 0, "input_prefix": fields.input_prefix, "input_suffix": fields.input_suffix,
                            "input_extra": chunks, "prompt": fields.prompt, "n_predict": LLAMA_N_PREDICT,
                            "top_k": 1, "top_p": 0.99, "samplers": ["top_k", "top_p", "infill"],
                            "cache_prompt": True, "t_max_prompt_ms": LLAMA_T_MAX_MS,
                            "t_max_predict_ms": LLAMA_T_MAX_MS}
    if fields.n_indent:
        body["n_indent"] = fields.n_indent
    return body


def warmup_body(chunks: list[dict[str, str]]) -> dict[str, Any]:
    """The ring-update request: the extra context alone, evaluated into the cache, nothing generated."""
    return {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": chunks, "prompt": "",
            "n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": LLAMA_T_MAX_MS,
            "t_max_predict_ms": 1}


def future_fields(fields: InfillFields, completion: str, n_prefix: int = LLAMA_N_PREFIX) -> InfillFields | None:
    """The speculative request llama.vscode sends after showing ``completion`` (cacheFutureSuggestion).

    It asks ahead for the position the user reaches by accepting the suggestion; None when
    the suggestion is empty.
    """
    lines = completion.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        return None
    if len(lines) == 1:
        return InfillFields(fields.input_prefix, fields.input_suffix, fields.prompt + lines[0], fields.n_indent)
    prefix = fields.input_prefix + fields.prompt + "\n".join(lines[:-1]) + "\n"
    prefix_lines = prefix[:-1].split("\n")
    if len(prefix_lines) > n_prefix:
        prefix = "\n".join(prefix_lines[-n_prefix:]) + "\n"
    return InfillFields(prefix, fields.input_suffix, lines[-1], fields.n_indent)


def jaccard(a: list[str], b: list[str]) -> float:
    """Jaccard similarity of two chunks' sets of lines."""
    union = set(a) | set(b)
    return 1.0 if not union else len(set(a) & set(b)) / len(union)


@dataclass
class Ring:
    """llama.vscode's ring buffer of extra-context chunks and the queue that feeds it."""

    chunks: list[dict[str, str]] = field(default_factory=list)
    queued: list[dict[str, str]] = field(default_factory=list)
    last_pick_line: int = -9999

    def pick(self, lines: list[str], filename: str, rng: random.Random, evict: bool = False) -> None:
        """Queue a chunk of ``lines`` (half a chunk's lines at a random place when longer), as pickChunk does."""
        if len(lines) < 3:
            return
        if len(lines) + 1 >= LLAMA_CHUNK_LINES:
            half = LLAMA_CHUNK_LINES // 2
            start = math.floor(rng.random() * max(0, len(lines) - half + 1))
            lines = lines[start:start + half]
        text = "\n".join(lines) + "\n"
        if evict:
            if any(c["text"] == text for c in self.chunks + self.queued):
                return
            self.chunks = [c for c in self.chunks if jaccard(c["text"].split("\n")[:-1], lines) <= 0.9]
            self.queued = [c for c in self.queued if jaccard(c["text"].split("\n")[:-1], lines) <= 0.9]
        if len(self.queued) >= LLAMA_MAX_QUEUED:
            self.queued.pop(0)
        self.queued.append({"filename": filename, "text": text})

    def pick_near(self, doc: Doc, rng: random.Random) -> None:
        """After a completion, when the cursor moved far: queue chunks from above the prefix and below the suffix."""
        line = doc.line
        if abs(line - self.last_pick_line) <= LLAMA_PICK_DISTANCE:
            return
        lines = doc.text.split("\n")
        above = lines[max(0, line - LLAMA_RING_SCOPE):max(0, line - LLAMA_N_PREFIX) + 1]
        low = min(len(lines) - 1, line + LLAMA_N_SUFFIX)
        below = lines[low:min(len(lines) - 1, low + LLAMA_CHUNK_LINES) + 1]
        self.pick(above, doc.path, rng)
        self.pick(below, doc.path, rng)
        self.last_pick_line = line

    def pick_around(self, lines: list[str], line: int, filename: str, rng: random.Random) -> None:
        """On a save or an editor switch: queue the chunk around a cursor line, evicting near-duplicates."""
        half = LLAMA_CHUNK_LINES // 2
        self.pick(lines[max(0, line - half):min(line + half, len(lines) - 1) + 1], filename, rng, evict=True)

    def update(self) -> bool:
        """The periodic ring update: move one queued chunk into the ring (oldest out past 16); True when moved."""
        if not self.queued:
            return False
        self.chunks.append(self.queued.pop(0))
        del self.chunks[:max(0, len(self.chunks) - LLAMA_RING_CHUNKS)]
        return True


# --- A plain OpenAI /v1/completions client re-typing code that repeats code above it ("edit") --------------------

# UserString in collections/__init__.py wraps every str method in a near-identical one-liner, and its
# r-methods (rfind, rindex, rjust, rpartition, rstrip, rsplit) mirror find, index, ljust, partition,
# lstrip and split a few dozen lines above them. Re-typing from rfind on, the right continuation is
# almost always a copy, with one letter changed, of text already in the prompt: the case that
# drafting from the prompt (speculative decoding) should speed up, in a real stdlib file.
EDIT_ANCHOR = "    def rfind(self, sub, start=0, end=_sys.maxsize):"
EDIT_MAX_TOKENS = 128    # one streamed answer; no stop sequences, so decode speed is measured over many tokens
EDIT_CONTEXT = 2048      # prompt budget in tokens: the file before the cursor, cut at a line fixed for the session
EDIT_SUFFIX_LINES = 40   # lines after the cursor sent as ``suffix`` (0: none)


def edit_start_line(source: str, anchor: str = EDIT_ANCHOR) -> int | None:
    """The 0-based line of ``source`` that is exactly ``anchor`` (the first such), or None."""
    for number, line in enumerate(source.split("\n")):
        if line == anchor:
            return number
    return None


def edit_body(doc: Doc, start: int, max_tokens: int = EDIT_MAX_TOKENS,
              suffix_lines: int = EDIT_SUFFIX_LINES) -> dict[str, Any]:
    """A plain client's request: the text from offset ``start`` to the cursor, the next lines as suffix.

    ``start`` stays put for the whole session (a plain client cut once to fit the window), so
    the prompt only grows at its end, as the file does. Greedy, no stop sequences; EOS may end it.
    """
    body: dict[str, Any] = {"prompt": doc.text[start:doc.offset], "max_tokens": max_tokens}
    if suffix_lines > 0:
        body["suffix"] = "\n".join(doc.after.split("\n")[:suffix_lines + 1])
    return body
