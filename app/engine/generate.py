"""The decode loop: prefill the prompt, decode one token at a time for every live sequence."""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache, EncoderDecoderCache

from .params import Delta
from .sampling import TokenChooser
from .text import SequenceState

log = logging.getLogger(__name__)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens two id sequences share."""
    size = 0
    for x, y in zip(a, b):
        if x != y:
            break
        size += 1
    return size


def block_bounds(length: int, big: int = 256, small: int = 32) -> list[int]:
    """Where prefill blocks start (and the prompt ends): big blocks first, small ones for the tail."""
    big_end = length - length % big
    return [*range(0, big_end, big), *range(big_end, length, small), length]


class CausalRunner:
    """Runs a decoder-only model with a KV cache; reuses the previous prompt's prefix when it can.

    Code completion requests arrive keystroke after keystroke with nearly the same
    prompt, so keeping the last cache and cropping it to the shared prefix turns a
    full prefill into a few tokens of work.

    Prompts are fed in blocks whose bounds depend only on the prompt's length (see
    :func:`block_bounds`), and a cached prefix is reused only up to a bound where the
    old and new prompts' blocks agree. A reused cache then holds exactly the numbers a
    cold run computes (same tokens, same shapes), so the output never depends on what
    the previous request was. Big blocks keep cold prefill fast; small tail blocks keep
    the recomputation after a keystroke short.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, reuse_prefix: bool = True,
                 big_block: int = 256, small_block: int = 32):
        self.model = model
        self.device = device
        self.reuse_prefix = reuse_prefix
        self.big_block, self.small_block = big_block, small_block
        self.cache: DynamicCache | None = None
        self.cached_ids: list[int] = []  # tokens whose keys/values are in self.cache
        self.bounds: list[int] = []  # block bounds of the cached prompt; empty: nothing reusable
        self.last_reused = 0

    def _forward(self, ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=logits_to_keep)
        return out.logits

    def _reusable(self, prompt_ids: Sequence[int], bounds: list[int]) -> int:
        """Index into ``bounds`` of the last block bound whose cached prefix can be kept."""
        if not (self.reuse_prefix and self.bounds and self.cache.is_croppable):
            return 0
        # At least one token must be fed to get logits for the next one.
        limit = min(common_prefix_length(self.cached_ids, prompt_ids), len(prompt_ids) - 1)
        index = 0
        for i, (old, new) in enumerate(zip(self.bounds, bounds)):
            if old != new or new > limit:
                break
            index = i
        return index

    def prefill(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Feed the prompt; return logits for the next token [1, vocab]."""
        bounds = block_bounds(len(prompt_ids), self.big_block, self.small_block)
        first = self._reusable(prompt_ids, bounds)
        reused = bounds[first]
        if reused > 0:
            if self.cache.get_seq_length() > reused:
                self.cache.crop(reused - self.cache.get_seq_length())
        else:
            self.cache = DynamicCache()
        self.cached_ids, self.bounds, self.last_reused = list(prompt_ids[:reused]), [], reused
        for start, end in zip(bounds[first:], bounds[first + 1:]):
            chunk = prompt_ids[start:end]
            logits = self._forward(torch.tensor([chunk], device=self.device), 1)[:, -1]
            self.cached_ids.extend(chunk)
        self.bounds = bounds
        return logits

    def expand(self, n: int) -> None:
        """Turn the batch-1 prompt cache into ``n`` sequences sharing that prompt."""
        if n > 1:
            self.cache.batch_repeat_interleave(n)
            self.bounds, self.cached_ids = [], []  # nothing to reuse next time

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished sequences from the cache."""
        self.cache.batch_select_indices(rows)
        self.bounds, self.cached_ids = [], []

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per live sequence; return next-token logits [batch, vocab]."""
        logits = self._forward(token_ids[:, None], 1)[:, -1]
        if self.bounds:
            self.cached_ids.append(int(token_ids[0]))
        return logits

    def score(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Log-probabilities of every prompt position's next token [len, vocab], without the cache."""
        ids = torch.tensor([prompt_ids], device=self.device)
        return self.model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(dim=-1)

    def forget(self) -> None:
        """Drop the cache (after an error, its contents are not known)."""
        self.cache = None
        self.bounds, self.cached_ids = [], []


class Seq2SeqRunner:
    """Runs an encoder-decoder model (T5, CodeT5): the prompt through the encoder once, then the decoder.

    With ``decoder_prompt`` the decoder gets the prompt too, after its start token, as
    CodeT5+ 2B+ model cards do; otherwise only the decoder start token.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, decoder_prompt: bool = False):
        self.model = model
        self.device = device
        self.decoder_prompt = decoder_prompt
        config = model.config
        self.start_id = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
        self.cache: EncoderDecoderCache | None = None
        self.encoded = None
        self.last_reused = 0

    def _forward(self, decoder_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(encoder_outputs=self.encoded, decoder_input_ids=decoder_ids, cache=self.cache, use_cache=True)
        return out.logits[:, -1]

    def prefill(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Encode the prompt and run the decoder's first step; return next-token logits [1, vocab]."""
        self.encoded = self.model.get_encoder()(input_ids=torch.tensor([prompt_ids], device=self.device))
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        start = [self.start_id]
        if self.decoder_prompt:
            # As generate(decoder_input_ids=prompt) does it (the CodeT5+ 2B+ cards): the start token, then the prompt.
            start = list(prompt_ids) if prompt_ids and prompt_ids[0] == self.start_id else [*start, *prompt_ids]
        return self._forward(torch.tensor([start], device=self.device))

    def expand(self, n: int) -> None:
        """Repeat the encoded prompt and the caches for ``n`` sequences."""
        if n > 1:
            self.cache.batch_repeat_interleave(n)
            self.encoded.last_hidden_state = self.encoded.last_hidden_state.repeat_interleave(n, dim=0)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished sequences."""
        self.cache.batch_select_indices(rows)
        self.encoded.last_hidden_state = self.encoded.last_hidden_state[rows]

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per live sequence; return next-token logits [batch, vocab]."""
        return self._forward(token_ids[:, None])

    def forget(self) -> None:
        """Drop the encoded prompt and the caches."""
        self.cache = self.encoded = None


@torch.inference_mode()
def generate(
    runner: CausalRunner | Seq2SeqRunner, prompt_ids: Sequence[int], chooser: TokenChooser, sequences: list[SequenceState]
) -> Iterator[list[Delta]]:
    """Yield the deltas of every live sequence after each decoding step until all have stopped."""
    logits = runner.prefill(prompt_ids)
    runner.expand(len(sequences))
    logits = logits.expand(len(sequences), -1)
    alive = list(range(len(sequences)))
    while alive:
        choice = chooser(logits)
        deltas, keep = step_sequences(choice, [sequences[i] for i in alive])
        yield deltas
        if not keep:
            return
        if len(keep) < len(alive):
            rows = torch.tensor(keep, device=runner.device)
            runner.keep_rows(rows)
            chooser.keep_rows(rows)
            alive = [alive[k] for k in keep]
            token_ids = choice.token_ids[rows]
        else:
            token_ids = choice.token_ids
        logits = runner.decode(token_ids)


def step_sequences(choice, live: list[SequenceState]) -> tuple[list[Delta], list[int]]:
    """Push each chosen token into its sequence; return the deltas and the rows still running."""
    token_ids = choice.token_ids.tolist()
    logprobs = choice.logprobs.tolist()
    tops = [()] * len(live)
    if choice.top_ids is not None:
        tops = [tuple(zip(i, lp)) for i, lp in zip(choice.top_ids.tolist(), choice.top_logprobs.tolist())]
    deltas, keep = [], []
    for row, seq in enumerate(live):
        delta = seq.push(token_ids[row], logprobs[row], tops[row])
        if delta is not None:
            deltas.append(delta)
        if not seq.finished:
            keep.append(row)
    return deltas, keep
