"""Model prompts: plain text, or a fill-in-the-middle template checked against the tokenizer."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

# A special token as model cards write them: <fim_prefix>, <|fim_middle|>, <｜fim▁hole｜>, ▁<PRE>, <extra_id_0>.
SPECIAL_TOKEN = re.compile(r"▁?<[^<>{}\s]+>")
PLACEHOLDER = re.compile(r"\{(prefix|suffix)\}")


class TemplateError(ValueError):
    """A FIM template that does not fit the model's tokenizer."""


@dataclass(frozen=True)
class Truncation:
    """How many tokens were cut from the far ends of the prefix and the suffix."""

    prefix_tokens: int = 0
    suffix_tokens: int = 0

    def __bool__(self) -> bool:
        return bool(self.prefix_tokens or self.suffix_tokens)


class Template:
    """A prompt template: literal parts resolved to token ids once (when the model loads), placeholders filled per use.

    A special token as model cards write them that the tokenizer does not have is a
    start-up error (TemplateError), never a silent fallback; each placeholder's text is
    tokenized on its own, so no merge crosses a boundary.
    """

    def __init__(self, tokenizer, text: str, placeholder: re.Pattern[str]):
        self.tokenizer = tokenizer
        self.parts: list[str | list[int]] = []  # a placeholder's name, or literal token ids
        position = 0
        for match in placeholder.finditer(text):
            self.parts += [self._literal(text[position:match.start()]), match.group(1)]
            position = match.end()
        self.parts = [part for part in [*self.parts, self._literal(text[position:])] if part != []]
        self.literal_tokens = sum(len(part) for part in self.parts if isinstance(part, list))

    def _literal(self, text: str) -> list[int]:
        """Token ids of literal text, its special tokens by id."""
        ids: list[int] = []
        position = 0
        for match in SPECIAL_TOKEN.finditer(text):
            ids += self.plain(text[position:match.start()])
            ids.append(special_token_id(self.tokenizer, match.group(0)))
            position = match.end()
        return ids + self.plain(text[position:])

    def plain(self, text: str) -> list[int]:
        """Token ids of plain text, nothing added."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def fill(self, **ids: list[int]) -> list[int]:
        """The template's ids with each placeholder's ids put in."""
        return [i for part in self.parts for i in (ids[part] if isinstance(part, str) else part)]

    def render(self, **values: str) -> list[int]:
        """The template's ids with each placeholder's text tokenized on its own."""
        return self.fill(**{name: self.plain(text) for name, text in values.items()})

    def layout_text(self) -> str:
        """The template as the model sees it: its literal tokens spelled out, placeholders as ``{name}``."""
        return "".join(f"{{{part}}}" if isinstance(part, str) else "".join(token_strings(self.tokenizer, part))
                       for part in self.parts)


class FimPrompt:
    """Builds fill-in-the-middle token ids from a template like ``<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>``.

    With ``end_with_eos`` (an encoder's input) the prompt also ends with the EOS the
    tokenizer appends to its encodings (T5, CodeT5), as the model was trained; a causal
    prompt never does, since the model would read it as the end of the text.
    """

    def __init__(self, tokenizer, template: str, end_with_eos: bool = False):
        self.template = template
        self.layout = Template(tokenizer, template, PLACEHOLDER)
        self.bos = leading_bos(tokenizer)
        self.eos = trailing_eos(tokenizer) if end_with_eos else []
        self.fixed_tokens = len(self.bos) + len(self.eos) + self.layout.literal_tokens

    def layout_text(self) -> str:
        """The whole FIM prompt as the model sees it, e.g. ``<s><PRE>{prefix}<SUF>{suffix}<MID>``."""
        tokenizer = self.layout.tokenizer
        return "".join(token_strings(tokenizer, self.bos)) + self.layout.layout_text() + \
            "".join(token_strings(tokenizer, self.eos))

    def build(self, prefix: str, suffix: str, budget: int, slack: int = 0) -> tuple[list[int], Truncation]:
        """Token ids for the model, at most ``budget`` long: the far ends of prefix and suffix go first.

        A prompt that must be cut is cut ``slack`` tokens deeper (room for its next versions to grow into).
        """
        room = budget - self.fixed_tokens
        if room < 1:
            raise TemplateError(f"no room for the prompt: {budget} tokens available, the template needs "
                                f"{self.fixed_tokens}")
        head, tail = self.layout.plain(prefix), self.layout.plain(suffix)
        cut = Truncation()
        if len(head) + len(tail) > room:
            room = max(room - slack, 1)
            # Text near the cursor matters most; the suffix keeps at least a quarter of the room.
            keep_tail = min(len(tail), max(room - len(head), room // 4))
            keep_head = min(len(head), room - keep_tail)
            cut = Truncation(len(head) - keep_head, len(tail) - keep_tail)
            head, tail = head[len(head) - keep_head:], tail[:keep_tail]
        return [*self.bos, *self.layout.fill(prefix=head, suffix=tail), *self.eos], cut


def keep_last(ids: list[int], budget: int, bos: list[int]) -> tuple[list[int], Truncation]:
    """At most ``budget`` ids of a plain prompt: its start goes first (a leading BOS stays)."""
    if len(ids) <= budget:
        return ids, Truncation()
    head = bos if bos and ids[:len(bos)] == bos else []
    kept = ids[len(ids) - (budget - len(head)):]
    return head + kept, Truncation(prefix_tokens=len(ids) - len(head) - len(kept))


def leading_bos(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer starts ordinary encodings with it (Llama-style), else ``[]``."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("x")["input_ids"]
    return [bos] if bos is not None and ids and ids[0] == bos else []


def trailing_eos(tokenizer) -> list[int]:
    """``[eos]`` when the tokenizer ends ordinary encodings with it (T5-style), else ``[]``."""
    eos = tokenizer.eos_token_id
    ids = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    return [eos] if eos is not None and len(ids) > len(plain) and ids[-1] == eos else []


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each id's vocabulary string (special tokens as written, byte-level marks kept)."""
    return [str(token) for token in tokenizer.convert_ids_to_tokens(list(ids))]


def tokenizer_flag(settings: dict, key: str) -> bool | None:
    """``add_bos_token``/``add_eos_token`` from a tokenizer_config.json, None when absent or not a boolean."""
    value = settings.get(key)
    return value if isinstance(value, bool) else None


def match_prompt_edges(tokenizer, bos: bool | None, eos: bool | None, causal: bool) -> tuple[bool, bool]:
    """Make ordinary encodings start with BOS and end with EOS as the model was trained; return (bos, eos).

    ``bos``/``eos`` None keep what the tokenizer does. A causal prompt never ends with EOS
    (the model would read the text as ended). transformers 5 loads some tokenizers without
    the BOS their config asks for (DeepSeek-Coder's ``add_bos_token: true`` on a plain
    ByteLevel post-processor), so the post-processor is rebuilt where the two disagree.
    """
    has_bos, has_eos = bool(leading_bos(tokenizer)), bool(trailing_eos(tokenizer))
    want_bos = has_bos if bos is None else bos
    want_eos = False if causal else (has_eos if eos is None else eos)
    if (want_bos, want_eos) == (has_bos, has_eos):
        return has_bos, has_eos
    for wanted, token in ((want_bos, tokenizer.bos_token), (want_eos, tokenizer.eos_token)):
        if wanted and token is None:
            raise TemplateError("the tokenizer has no BOS/EOS token to add to prompts")
    if not hasattr(type(tokenizer), "update_post_processor"):
        raise TemplateError(f"cannot change what {type(tokenizer).__name__} adds to encodings; set add_bos_token "
                            f"= {str(has_bos).lower()} in the model entry to serve its prompts as it encodes them")
    tokenizer.add_bos_token, tokenizer.add_eos_token = want_bos, want_eos
    got = bool(leading_bos(tokenizer)), bool(trailing_eos(tokenizer))
    if got != (want_bos, want_eos):
        raise TemplateError(f"asked the tokenizer for bos={want_bos} eos={want_eos}, its encodings give "
                            f"bos={got[0]} eos={got[1]}")
    return got


def special_token_id(tokenizer, token: str) -> int:
    """The id of a single vocabulary token, or TemplateError when the tokenizer lacks it."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    unk = tokenizer.unk_token_id
    if token_id is None or (token_id == unk and token != tokenizer.unk_token):
        raise TemplateError(f"token {token!r} is not in the tokenizer's vocabulary")
    return token_id
