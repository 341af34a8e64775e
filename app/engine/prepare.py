"""From a validated completion to :class:`~app.engine.request.Request` objects: the model prompt's tokens,
the checks against the model's window and the server's limits, the sampling chain and the stops."""
from __future__ import annotations

import bisect
import dataclasses
import logging
from typing import Any, Callable, Sequence

import torch

from config import EngineOptions, ModelConfig

from .anchor import SEAM, Realignment, anchor_offsets, anchored_start, realign, slid_seam
from .context import ContextPlacer
from .errors import InvalidParameter, PromptTooLong
from .healing import TokenHealer
from .params import PromptContext, SamplingParams
from .prompts import (
    SPECIAL_TOKEN, FimPrompt, TemplateError, Truncation, keep_last, leading_bos, special_token_id, token_strings,
    trailing_eos,
)
from .request import Request
from .sampling import TokenChooser
from .sequence import IncrementalDetokenizer, SequenceState
from .speculative import PromptLookup, ngram_index
from .stopping import DedentStop, IndentStop, StopCondition, TimeBudget

log = logging.getLogger(__name__)
TRACE_ALTERNATIVES = 5  # top alternatives a traced request notes per token (OpenAI's logprobs maximum)


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What preparing prompts needs of a model, weights or not: its config, generation config, logits width."""

    config: Any  # transformers' PretrainedConfig
    vocab_size: int
    generation_config: Any = None

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelFacts":
        """The facts of a loaded model (its output head's width is the logits' width)."""
        head = model.get_output_embeddings()
        return cls(model.config, getattr(head, "out_features", None) or model.config.vocab_size,
                   getattr(model, "generation_config", None))


class Preparer:
    """Everything about one model that turning text into a runnable request needs: tokenizer, window, stops."""

    def __init__(self, config: ModelConfig, model: ModelFacts, tokenizer, device: torch.device,
                 options: EngineOptions, cached_prompts: Callable[[], list[tuple[int, ...]]] | None = None):
        self.config, self.tokenizer, self.device, self.options = config, tokenizer, device, options
        # Anchoring only pays where a prefix cache reuses what it lines up (anchor.py).
        self.anchor_lines = options.anchor_lines if cached_prompts is not None else 0
        self.prefix_prompts = cached_prompts  # to find where a window slid, and to restore moved prompts onto
        self.restore_tokens = options.anchor_restore_tokens if cached_prompts is not None else 0
        self.is_seq2seq = config.kind == "seq2seq"
        self.fim = FimPrompt(tokenizer, config.fim.template, end_with_eos=self.is_seq2seq) if config.fim else None
        self.bos = leading_bos(tokenizer)
        self.context = ContextPlacer(tokenizer, config.repo, self.bos)
        self.vocab_size = model.vocab_size
        self.context_length = config.context_length or _window(model.config)
        self.eos_ids, self.stop_strings = self._stops(model)
        self.healer = TokenHealer(tokenizer, self.decode) if options.token_healing and not self.is_seq2seq else None
        log.info("model %s: %s", config.name, self.describe_prompts())

    def describe_prompts(self) -> str:
        """How this model's prompts begin (and end), as logged at start-up: its BOS, its FIM layout."""
        ends = trailing_eos(self.tokenizer) if self.is_seq2seq else []
        plain = "".join(token_strings(self.tokenizer, self.bos)) + "{prompt}" + \
            "".join(token_strings(self.tokenizer, ends))
        fim = self.fim.layout_text() if self.fim else "none (a suffix is ignored)"
        return f"plain prompt {plain!r}; fill-in-the-middle prompt {fim!r}"

    def _stops(self, model: ModelFacts) -> tuple[frozenset[int], tuple[str, ...]]:
        """End-of-sequence ids from the model and tokenizer, plus configured stops.

        A configured stop written like a special token (``<eom>``, ``▁<EOT>``) that the
        vocabulary has stops by id (its text never reaches the output); anything else
        is matched as a string.
        """
        eos = {self.tokenizer.eos_token_id} - {None}
        marked = set(self.tokenizer.all_special_ids) | set(getattr(self.tokenizer, "added_tokens_decoder", {}))
        for source in (model.generation_config, model.config):
            value = getattr(source, "eos_token_id", None)
            for token in value if isinstance(value, (list, tuple)) else [value] if value is not None else []:
                # CodeGen2's config names ids 1 and 2 as bos/eos: '"' and '#' in its tokenizer, so taking
                # them would end a completion at every comment. An end-of-sequence is a special token.
                if token in marked or token >= len(self.tokenizer):
                    eos.add(token)
                else:
                    log.warning("model %s: its config's eos_token_id %d is the ordinary token %r, not a stop",
                                self.config.name, token, self.token_text(token))
        strings = []
        for stop in self.config.stop:
            if SPECIAL_TOKEN.fullmatch(stop):
                try:
                    eos.add(special_token_id(self.tokenizer, stop))
                    continue
                except TemplateError:
                    log.warning("model %s: stop %r is not a token of its vocabulary; matching it as text",
                                self.config.name, stop)
            strings.append(stop)
        return frozenset(eos), tuple(strings)

    # -- text and tokens ------------------------------------------------------------

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a token sequence, special tokens dropped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str:
        """The text of one token, as shown in logprobs."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def prompt_budget(self, max_tokens: int, truncate: bool = False) -> int:
        """Prompt tokens allowed beside ``max_tokens`` (a seq2seq encoder has the window to itself).

        When prompts are truncated, a prompt keeps at least half the window: an editor's
        long file with a large max_tokens (Copilot asks for 500) then gets a shorter
        completion instead of an error.
        """
        if self.is_seq2seq:
            return self.context_length
        budget = self.context_length - max_tokens
        return max(budget, self.context_length // 2) if truncate else budget

    def encode(self, prompt: str, suffix: str | None = None, budget: int | None = None,
               truncate: bool = False, known_ids: list[int] | None = None) -> tuple[list[int], bool, Truncation]:
        """Token ids of the model prompt, whether the FIM template was used, and what was truncated.

        ``known_ids``: the prompt's own encoding when the caller already has it (not encoded twice).

        Models without FIM tokens complete from the prefix alone: Copilot sends a
        suffix with every request, and a plain continuation beats an error. Seq2seq
        models always use their template (its sentinel marks the span to generate).
        A FIM prompt always fits ``budget``; a plain one only with ``truncate``.
        """
        budget = self.context_length if budget is None else budget
        # A prompt cut to the window is cut deeper by a slack its next versions can grow into before their
        # start moves again (anchor.py restores the lines they cut): one cold prefill per slack, not per keystroke.
        slack = min(self.restore_tokens, budget // 8)
        if self.fim is None or not (suffix or self.is_seq2seq):
            ids = known_ids if known_ids is not None else self.tokenizer(prompt)["input_ids"]
            cut = Truncation()
            if truncate and len(ids) > budget:
                kept = self._cut_at_anchor(prompt, budget)
                ids, cut = keep_last(ids, budget - slack, self.bos) if kept is None else (
                    kept, Truncation(prefix_tokens=len(ids) - len(kept)))
            return ids, False, cut
        ids, cut = self.fim.build(prompt, suffix or "", budget, slack)
        return ids, True, cut

    def _cut_at_anchor(self, prompt: str, budget: int) -> list[int] | None:
        """The prompt from its first anchor line whose rest fits ``budget``, or None (no anchoring, none fits).

        A prompt cut token by token to the window starts one token later at every keystroke, and nothing of
        its cache is reused; cut at an anchor line, it starts at the same line for ~``anchor_lines`` lines.
        """
        if not self.anchor_lines or not self.tokenizer.is_fast:
            return None
        encoded = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        starts = [start for start, _ in encoded["offset_mapping"]]
        for offset in anchor_offsets(prompt, self.anchor_lines):
            if len(starts) - bisect.bisect_left(starts, offset) + len(self.bos) + SEAM > budget:
                continue  # the rest is still too long: a later anchor
            ids = self.tokenizer(prompt[offset:])["input_ids"]
            if len(ids) <= budget:
                return ids
        return None

    # -- requests -------------------------------------------------------------------

    def prepare(self, prompt: str, params: SamplingParams, *, suffix: str | None = None, n: int = 1,
                best_of: int | None = None, echo: bool = False, request_id: str = "local",
                context: PromptContext | None = None, trace: bool = False) -> Request:
        """Tokenize and check one prompt (with repository ``context`` in front) against this model; build its request.

        Raises an EngineError when it cannot run on this model. A ``trace`` request notes every token's
        logprob and alternatives without changing what is generated (healing stays on).
        """
        # An echoed prompt is the client's text back, so it is never cut.
        truncate = self.options.truncate_prompts and not echo
        params = self._with_max_tokens(params)
        # A window seen to slide starts at an anchor line; a prompt whose start stays put (a whole short
        # file, an API caller's prompt) is never cut: anchoring it would only lose context (on Copilot-shaped
        # prompts of files within its budget: 47% of answers changed, none more often right; bench.fidelity).
        text, known_ids = (prompt, None) if echo else self._anchor_below_head(prompt)
        ids, used_fim, cut, left_out = self._prompt_ids(text, suffix, params.max_tokens, truncate, request_id,
                                                        None if echo else context, known_ids)
        # An echoed prompt's logprobs are of the client's own tokens.
        realigned = None if echo else self._realign(ids, self.prompt_budget(params.max_tokens, truncate), request_id)
        ids = list(realigned.ids) if realigned else ids
        params = self._fit_max_tokens(params, len(ids), truncate, request_id)
        self._check_logit_bias(params)
        if suffix and not used_fim:
            log.debug("[%s] model %s has no fill-in-the-middle template: suffix ignored", request_id, self.config.name)
        healing = None
        # Healing changes which tokens are generated, so not when the client asked to see them.
        if self.healer and not used_fim and not echo and params.logprobs is None:
            ids, healing = self.healer.heal(ids)
        runs = max(n, best_of or 1)
        allowed = healing.allowed if healing else None
        sequences = [self._sequence(i, prompt, ids, params, healing.text if healing else "", trace)
                     for i in range(runs)]
        alternatives = max(params.logprobs or 0, TRACE_ALTERNATIVES) if trace else None
        chooser = TokenChooser(params, self.vocab_size, runs, self.device, first_allowed=allowed,
                               alternatives=alternatives)
        return Request(request_id, prompt, tuple(ids), params, sequences, chooser, n=n, echo=echo,
                       used_fim=used_fim, healing=healing, realigned=realigned, truncation=cut,
                       context_left_out=left_out, drafters=self._drafters(ids, chooser, runs), trace=trace)

    def _drafters(self, ids: list[int], chooser: TokenChooser, runs: int) -> list[PromptLookup] | None:
        """Prompt-lookup drafters for the sequences, when they speculate (greedy, decoder-only, enabled)."""
        if not self.options.speculative_tokens or self.is_seq2seq or not chooser.position_free or not ids:
            return None
        shared = ngram_index(ids[:-1])  # here, on the request's thread: ~3 ms per 2,000 prompt tokens
        return [PromptLookup(ids, shared, self.options.speculative_tokens) for _ in range(runs)]

    def _anchor_below_head(self, prompt: str) -> tuple[str, list[int] | None]:
        """A prompt whose window slid (under a fixed head like FauxPilot's, or none), starting at an anchor line.

        The slide is seen against a cached prompt: with nothing cached the prompt runs as sent,
        and the next one is anchored below the same head. Also the ids of the text returned when
        they are known (the prompt unchanged): encoding 10k tokens again costs ~30 ms.
        """
        if not self.anchor_lines or not self.tokenizer.is_fast:
            return prompt, None
        encoded = self.tokenizer(prompt, return_offsets_mapping=True)
        seam = slid_seam(self.prefix_prompts(), encoded["input_ids"])
        if seam is None:
            return prompt, encoded["input_ids"]
        # The window starts at the line of the seam's first character (that may be the newline before it).
        window = prompt.rfind("\n", 0, encoded["offset_mapping"][seam][0] + 1) + 1
        anchored = prompt[:window] + anchored_start(prompt[window:], self.anchor_lines)
        return anchored, encoded["input_ids"] if anchored == prompt else None

    def _realign(self, ids: list[int], budget: int, request_id: str) -> Realignment | None:
        """The prompt rewritten to begin like a cached one when its window moved (see anchor.py), else None."""
        if not self.restore_tokens:
            return None
        realigned = realign(self.prefix_prompts(), ids, budget, self.restore_tokens)
        if realigned is not None:
            log.info("[%s] prompt restored onto a cached prompt: %d far tokens left out, %d restored, %d reusable",
                     request_id, realigned.dropped, realigned.restored, realigned.reusable)
        return realigned

    def _with_max_tokens(self, params: SamplingParams) -> SamplingParams:
        """The params with the model's default max_tokens when the client named none."""
        if params.max_tokens is None:
            return dataclasses.replace(params, max_tokens=self.config.max_tokens)
        return params

    def _prompt_ids(self, prompt: str, suffix: str | None, max_tokens: int, truncate: bool, request_id: str,
                    context: PromptContext | None = None,
                    known_ids: list[int] | None = None) -> tuple[list[int], bool, Truncation, int]:
        """The model prompt's ids within the window (truncated when allowed), whether FIM was used, what was cut
        from the prompt's ends and how many context chunks were left out."""
        budget = self.prompt_budget(max_tokens, truncate)
        if budget < 1 or (max_tokens > self.context_length and not truncate):
            raise PromptTooLong(len(self.tokenizer(prompt)["input_ids"]), max_tokens, self.context_length)
        try:
            ids, used_fim, cut = self.encode(prompt, suffix, budget, truncate, known_ids)
        except TemplateError:
            raise PromptTooLong(self.fim.fixed_tokens, max_tokens, self.context_length) from None
        if cut:
            log.info("[%s] prompt truncated to fit %d tokens: %d prefix tokens cut at the start, %d suffix tokens "
                     "at the end", request_id, budget, cut.prefix_tokens, cut.suffix_tokens)
        # Context is cut before the prompt: it goes in only where the whole prompt leaves room.
        ids, left_out = self.context.place(ids, context, 0 if cut else budget - len(ids))
        if left_out:
            log.info("[%s] %d of %d context chunks left out to fit %d tokens", request_id, left_out,
                     len(context.chunks), budget)
        if not ids:
            # Nothing to condition on: start from the beginning-of-sequence token.
            bos = self.tokenizer.bos_token_id
            ids = [bos if bos is not None else min(self.eos_ids, default=0)]
        if len(ids) > budget:
            raise PromptTooLong(len(ids), max_tokens, self.context_length)
        return ids, used_fim, cut, left_out

    def _fit_max_tokens(self, params: SamplingParams, prompt_tokens: int, truncate: bool,
                        request_id: str) -> SamplingParams:
        """Lower max_tokens to the room the prompt leaves in the window (when prompts may be truncated)."""
        room = self.context_length - (0 if self.is_seq2seq else prompt_tokens)
        if params.max_tokens > room and truncate:
            log.info("[%s] max_tokens %d lowered to %d, the room left in the %d-token window", request_id,
                     params.max_tokens, room, self.context_length)
            return dataclasses.replace(params, max_tokens=room)
        return params

    def _check_logit_bias(self, params: SamplingParams) -> None:
        bad = [token for token, _ in params.logit_bias if not 0 <= token < self.vocab_size]
        if bad:
            raise InvalidParameter(
                f"logit_bias has token ids outside this model's vocabulary (0..{self.vocab_size - 1}): {bad[:5]}",
                param="logit_bias")

    def _sequence(self, index: int, prompt: str, ids: list[int], params: SamplingParams,
                  healed: str, trace: bool = False) -> SequenceState:
        """One sequence's state: its detokenizer, its stops, its logprob offsets."""
        # The decoder continues the prompt, except in seq2seq models where it starts afresh.
        context = ids if not self.is_seq2seq or self.config.decoder_prompt else ()
        dedent = None
        if params.trim_by_indentation:
            last_line = prompt.rpartition("\n")[2]
            dedent = DedentStop(last_line if not last_line.strip() else None)
        elif params.min_indent:
            dedent = IndentStop(params.min_indent)
        budget_ms = self.options.time_budget_ms if params.time_budget_ms is None else params.time_budget_ms
        budget = TimeBudget(budget_ms / 1000) if budget_ms > 0 else None
        stop = StopCondition(self.eos_ids, params.max_tokens, self.stop_strings + params.stop, dedent, budget)
        token_text = self.token_text if params.logprobs is not None or trace else None
        # text_offset counts from the start of the prompt, as OpenAI's does; the healed text is never sent.
        return SequenceState(index, IncrementalDetokenizer(self.decode, context), stop, token_text,
                             offset_base=len(prompt), skip=healed)


def _window(model_config) -> int:
    """The model's context window from its config (2048 when it names none)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
