"""Model runners: prompt prefill in blocks (from a cached prefix when one fits) and batched decode steps.

A runner knows one architecture family's forward pass and nothing about requests:
the scheduler starts a :class:`CausalPrefill` per prompt, feeds it block by block
between decode steps, then moves its cache into the runner's batch, where every
running sequence advances one token per forward.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from transformers import DynamicCache, EncoderDecoderCache

from .fastpath import FastDecoder
from .kvcache import BatchLayer, PrefixCache, block_bounds, layer_tensors

log = logging.getLogger(__name__)


def left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """``tensor`` grown to ``length`` along ``dim`` by zeros in front."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class CausalPrefill:
    """One prompt's way into a decoder-only model, a block at a time.

    Prompts are fed in blocks whose bounds depend only on the prompt's length (see
    :func:`~app.engine.kvcache.block_bounds`), and a cached prefix is reused only up to
    a bound where the old and new prompts' blocks agree. A reused cache then holds
    exactly the numbers a cold run computes, so a prompt's logits never depend on
    which requests came before it. Big blocks keep cold prefill fast; small tail
    blocks keep the recomputation after a keystroke short.
    """

    def __init__(self, runner: "CausalRunner", prompt_ids: Sequence[int]):
        self.runner = runner
        self.prompt_ids = list(prompt_ids)
        self.bounds = block_bounds(len(self.prompt_ids), runner.big_block, runner.small_block)
        first, cache = 0, None
        if runner.prefix_cache is not None:
            first, cache = runner.prefix_cache.lookup(self.prompt_ids, self.bounds)
        self.cache = cache if cache is not None else DynamicCache()
        self.reused = self.bounds[first]
        self.fed = first  # index into bounds: the prompt is in the cache up to bounds[fed]
        self.blocks = list(zip(self.bounds[first:], self.bounds[first + 1:]))
        self.logits: torch.Tensor | None = None  # next-token logits [1, vocab] once done

    @property
    def done(self) -> bool:
        """Whether the whole prompt has been fed."""
        return not self.blocks

    @property
    def next_block_size(self) -> int:
        """Tokens the next step feeds."""
        return self.blocks[0][1] - self.blocks[0][0] if self.blocks else 0

    def step(self) -> bool:
        """Feed the next block; return whether the prompt is done (then ``logits`` are set)."""
        start, end = self.blocks.pop(0)
        ids = torch.tensor([self.prompt_ids[start:end]], device=self.runner.device)
        out = self.runner.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.logits = out.logits[:, -1]
        self.fed += 1
        if self.done:
            self._keep()
        return self.done

    def abandon(self) -> None:
        """Stop here, keeping the blocks fed so far for later prompts.

        An editor abandons a request at the next keystroke, and the next prompt
        begins with this one: its blocks are that request's head start.
        """
        if self.reused < self.bounds[self.fed]:
            self._keep()

    def _keep(self) -> None:
        if self.runner.prefix_cache is not None:
            end = self.bounds[self.fed]
            self.runner.prefix_cache.store(self.prompt_ids[:end], self.bounds[:self.fed + 1], self.cache)


class CausalBatch:
    """Every running sequence of a decoder-only model: one left-padded KV cache, one forward per step.

    Sequences join with their prompt's cache and leave when done; rows shorter than
    the longest are padded on the left and masked, and columns no row uses any more
    are cut off when sequences leave.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, fast: FastDecoder | None = None):
        self.model = model
        self.device = device
        self.fast = fast  # the lean decode step (fastpath.py); None: the model's own forward
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, length]: 1 where a row has a real token

    @property
    def rows(self) -> int:
        """Number of sequences decoding."""
        return 0 if self.mask is None else self.mask.shape[0]

    def can_join(self) -> bool:
        """Whether another sequence group may join now (always, for decoder-only models)."""
        return True

    def join(self, prefill: CausalPrefill, rows: int) -> None:
        """Add ``rows`` sequences that continue ``prefill``'s prompt (only their own cache is copied)."""
        # expand() is a view: the prompt's cache is copied once per row, into the batch's buffers.
        new = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in layer_tensors(prefill.cache)]
        new_mask = torch.ones(rows, new[0][0].shape[2], dtype=torch.long, device=self.device)
        if self.mask is None:
            self.cache, self.mask = DynamicCache(), new_mask
            self.cache.layers.extend(BatchLayer(k, v) for k, v in new)
            return
        for layer, (k, v) in zip(self.cache.layers, new):
            layer.add_rows(k, v)
        length = max(self.mask.shape[1], new_mask.shape[1])
        self.mask = torch.cat([left_pad(self.mask, length, 1), left_pad(new_mask, length, 1)])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only the given rows (ascending, as the scheduler gives them); drop columns only padding uses."""
        if not rows:
            self.reset()
            return
        mask = self.mask[torch.tensor(rows, device=self.device)]
        start = int(mask.any(0).nonzero()[0])
        for layer in self.cache.layers:
            layer.keep_rows(rows, drop_columns=start)
        self.mask = mask[:, start:]

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return next-token logits [rows, vocab]."""
        return self.verify(token_ids[:, None])[:, -1]

    def verify(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed ``width`` tokens per row ([rows, width]: a row's last token, then its draft); logits [rows, width, vocab].

        Every fed column enters the cache; :meth:`accept` then hides the columns of draft
        tokens the model did not agree with.
        """
        width = token_ids.shape[1]
        mask = torch.cat([self.mask, self.mask.new_ones(self.rows, width)], dim=1)
        padded = not bool(self.mask.all())
        positions = self.mask.sum(-1, keepdim=True) + torch.arange(width, device=self.device) if padded else None
        if self.fast is not None:
            if positions is None:
                positions = torch.arange(self.mask.shape[1], self.mask.shape[1] + width, device=self.device)
                positions = positions.expand(self.rows, -1)
            layers = [layer.extend(width) for layer in self.cache.layers]
            logits = self.fast.step(token_ids, positions, layers, mask.bool() if padded else None)
        else:
            # Without padding or hidden columns, positions and the causal mask are the model's defaults.
            logits = self.model(input_ids=token_ids, cache=self.cache, use_cache=True,
                                logits_to_keep=1 if width == 1 else 0,
                                attention_mask=mask if padded else None, position_ids=positions).logits
        self.mask = mask
        return logits

    def accept(self, columns: Sequence[int], width: int) -> None:
        """Keep the first ``columns[row]`` of each row's last ``width`` fed columns; forget or hide the rest.

        Columns no row keeps are cut off, so a lone sequence's cache is exactly what plain
        decoding builds. Others are hidden: they stay in the buffers (every row writes the same
        column) but no later token attends to them, and positions count only visible columns, so
        the row's context is its accepted tokens, as if the rejected drafts had never been fed.
        """
        unused = width - max(columns)
        if unused:
            for layer in self.cache.layers:
                layer.drop_last(unused)
            self.mask = self.mask[:, :self.mask.shape[1] - unused]
        end = self.mask.shape[1]
        for row, kept in enumerate(columns):
            if kept < width - unused:
                self.mask[row, end - (width - unused) + kept:] = 0

    def reset(self) -> None:
        """Drop every row."""
        self.cache = self.mask = None


class CausalRunner:
    """A decoder-only model: starts prompt prefills (from the prefix cache) and holds the decode batch."""

    def __init__(self, model: torch.nn.Module, device: torch.device, prefix_cache: PrefixCache | None = None,
                 big_block: int = 256, small_block: int = 32, fast: FastDecoder | None = None):
        self.model = model
        self.device = device
        self.prefix_cache = prefix_cache
        self.big_block, self.small_block = big_block, small_block
        self.batch = CausalBatch(model, device, fast)

    def start(self, prompt_ids: Sequence[int]) -> CausalPrefill:
        """Begin feeding a prompt."""
        return CausalPrefill(self, prompt_ids)

    def score(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Log-probabilities of every prompt position's next token [len, vocab], without any cache."""
        ids = torch.tensor([prompt_ids], device=self.device)
        return self.model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(dim=-1)

    def forget(self) -> None:
        """Drop the cached prompts."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()


class Seq2SeqPrefill:
    """An encoder-decoder model's start: the prompt through the encoder, then the decoder's first step.

    With ``decoder_prompt`` the decoder gets the prompt too, after its start token, as
    the CodeT5+ 2B+ model cards do; otherwise only the decoder start token.
    """

    reused = 0

    def __init__(self, runner: "Seq2SeqRunner", prompt_ids: Sequence[int]):
        self.runner = runner
        self.prompt_ids = list(prompt_ids)
        self.next_block_size = len(self.prompt_ids)
        self.encoded = None
        self.cache: EncoderDecoderCache | None = None
        self.logits: torch.Tensor | None = None
        self.done = False

    def abandon(self) -> None:
        """Nothing to keep."""

    def step(self) -> bool:
        """Encode and take the decoder's first step (one step does it all)."""
        runner = self.runner
        self.encoded = runner.model.get_encoder()(input_ids=torch.tensor([self.prompt_ids], device=runner.device))
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        start = [runner.start_id]
        if runner.decoder_prompt:
            # As generate(decoder_input_ids=prompt) does it: the start token, then the prompt.
            ids = self.prompt_ids
            start = ids if ids and ids[0] == runner.start_id else [*start, *ids]
        out = runner.model(encoder_outputs=self.encoded, decoder_input_ids=torch.tensor([start], device=runner.device),
                           cache=self.cache, use_cache=True)
        self.logits = out.logits[:, -1]
        self.done = True
        return True


class Seq2SeqBatch:
    """The running sequences of one encoder-decoder prompt (one group at a time: encoder outputs differ)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.encoded = None
        self.cache: EncoderDecoderCache | None = None
        self.rows = 0

    def can_join(self) -> bool:
        """Whether a new group may join: only when the batch is empty."""
        return self.rows == 0

    def join(self, prefill: Seq2SeqPrefill, rows: int) -> None:
        """Take over ``prefill``'s encoder output and decoder cache for ``rows`` sequences."""
        self.encoded, self.cache, self.rows = prefill.encoded, prefill.cache, rows
        if rows > 1:
            self.cache.batch_repeat_interleave(rows)
            self.encoded.last_hidden_state = self.encoded.last_hidden_state.repeat_interleave(rows, dim=0)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only the given rows."""
        if not rows:
            self.reset()
            return
        index = torch.tensor(rows, device=self.device)
        self.cache.batch_select_indices(index)
        self.encoded.last_hidden_state = self.encoded.last_hidden_state[index]
        self.rows = len(rows)

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return next-token logits [rows, vocab]."""
        out = self.model(encoder_outputs=self.encoded, decoder_input_ids=token_ids[:, None], cache=self.cache,
                         use_cache=True)
        return out.logits[:, -1]

    def reset(self) -> None:
        """Drop every row."""
        self.encoded = self.cache = None
        self.rows = 0


class Seq2SeqRunner:
    """An encoder-decoder model (T5, CodeT5): starts prompts and holds the decode batch."""

    def __init__(self, model: torch.nn.Module, device: torch.device, decoder_prompt: bool = False):
        self.model = model
        self.device = device
        self.decoder_prompt = decoder_prompt
        config = model.config
        self.start_id = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
        self.batch = Seq2SeqBatch(model, device)

    def start(self, prompt_ids: Sequence[int]) -> Seq2SeqPrefill:
        """Begin a prompt."""
        return Seq2SeqPrefill(self, prompt_ids)

    def forget(self) -> None:
        """Nothing is cached across prompts."""
