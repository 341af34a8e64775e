"""Next-token choice as a chain of small logits processors (each added only when not neutral)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .params import SamplingParams

# (logits [batch, vocab], counts [batch, vocab] or None) -> logits
LogitsProcessor = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# Below this a temperature picks greedily: sampling at it differs from greedy in name only, and float32
# logits divided by a much smaller one (1e-225 passes the API's 0..2 check) overflow to inf and NaN.
MIN_TEMPERATURE = 1e-6


class LogitBias:
    """Adds a fixed bias to chosen token ids (OpenAI ``logit_bias``)."""

    def __init__(self, bias: tuple[tuple[int, float], ...], vocab_size: int, device: torch.device):
        self.bias = torch.zeros(vocab_size, device=device)
        ids = torch.tensor([i for i, _ in bias], dtype=torch.long, device=device)
        self.bias[ids] = torch.tensor([b for _, b in bias], device=device)

    def __call__(self, logits: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        return logits + self.bias.to(logits.dtype)


class Penalties:
    """OpenAI presence/frequency penalties over the tokens generated so far."""

    def __init__(self, presence: float, frequency: float):
        self.presence = presence
        self.frequency = frequency

    def __call__(self, logits: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        assert counts is not None, "penalties need token counts"
        return logits - self.frequency * counts - self.presence * (counts > 0).to(logits.dtype)


class Temperature:
    """Divides logits by the temperature (not added for 0 = greedy or 1 = identity)."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, logits: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        return logits / self.temperature


class TopK:
    """Keeps the ``top_k`` most likely tokens (llama.cpp's top_k; ties at the k-th logit stay)."""

    def __init__(self, top_k: int):
        self.top_k = top_k

    def __call__(self, logits: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        if self.top_k >= logits.shape[-1]:
            return logits
        kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, float("-inf"))


class TopP:
    """Nucleus filtering: keeps the smallest set of tokens whose probability reaches ``top_p``."""

    def __init__(self, top_p: float):
        self.top_p = top_p

    def __call__(self, logits: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays, also when
        # top_p is below float32's smallest value (1e-109 rounds to 0, and 0 >= 0 dropped every token).
        drop = (probs.cumsum(dim=-1) - probs) >= self.top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def build_processors(params: SamplingParams, vocab_size: int, device: torch.device) -> list[LogitsProcessor]:
    """The processors a request needs, in application order; neutral settings add nothing."""
    chain: list[LogitsProcessor] = []
    if params.logit_bias:
        chain.append(LogitBias(params.logit_bias, vocab_size, device))
    if params.presence_penalty or params.frequency_penalty:
        chain.append(Penalties(params.presence_penalty, params.frequency_penalty))
    sampled = params.temperature >= MIN_TEMPERATURE
    if sampled and params.temperature != 1.0:
        chain.append(Temperature(params.temperature))
    if sampled and params.top_k > 0:
        chain.append(TopK(params.top_k))
    if sampled and params.top_p < 1.0:
        chain.append(TopP(params.top_p))
    return chain


@dataclass
class Picks:
    """The token picked for each row and what logprobs reporting needs."""

    token_ids: torch.Tensor  # [batch]
    logprobs: torch.Tensor  # [batch], under the model's own distribution
    top_ids: torch.Tensor | None = None  # [batch, k]
    top_logprobs: torch.Tensor | None = None  # [batch, k]

    def top_pairs(self) -> list[tuple[tuple[int, float], ...]]:
        """Per row, the (token id, logprob) alternatives; empty when none were asked for."""
        if self.top_ids is None:
            return []
        return [tuple(zip(ids, lps)) for ids, lps in zip(self.top_ids.tolist(), self.top_logprobs.tolist())]


class TokenChooser:
    """Applies the processor chain, then picks greedily (temperature 0) or by seeded sampling."""

    def __init__(self, params: SamplingParams, vocab_size: int, batch: int, device: torch.device,
                 first_allowed: tuple[int, ...] | None = None, alternatives: int | None = None):
        self.greedy = params.temperature < MIN_TEMPERATURE
        self.device = device
        self.first_mask = None  # token healing: only these ids may come first
        if first_allowed is not None:
            self.first_mask = torch.full((vocab_size,), float("-inf"), device=device)
            self.first_mask[torch.tensor(first_allowed, dtype=torch.long, device=device)] = 0.0
        # Alternatives reported per token: the client's logprobs, or more for a traced request.
        self.top_k = (params.logprobs or 0) if alternatives is None else alternatives
        self.processors = build_processors(params, vocab_size, device)
        self.counts = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(batch, vocab_size, device=device)
        self.generator = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> Picks:
        """Pick one token per row of ``logits`` [batch, vocab]."""
        logits = logits.float()
        scores = logits
        if self.first_mask is not None:
            # Before the chain, so top_p picks its nucleus among the allowed tokens (after it,
            # the mask could remove every token top_p kept and leave nothing to sample).
            scores, self.first_mask = scores + self.first_mask, None
        for process in self.processors:
            scores = process(scores, self.counts)
        if self.greedy:
            token_ids = scores.argmax(dim=-1)
        else:
            probs = scores.softmax(dim=-1)
            token_ids = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        if self.counts is not None:
            self.counts.scatter_add_(1, token_ids[:, None], torch.ones_like(token_ids[:, None], dtype=self.counts.dtype))
        logprobs = logits.log_softmax(dim=-1)
        picks = Picks(token_ids, logprobs.gather(1, token_ids[:, None]).squeeze(-1))
        if self.top_k:
            picks.top_logprobs, picks.top_ids = logprobs.topk(self.top_k, dim=-1)
        return picks

    @property
    def position_free(self) -> bool:
        """Whether a pick depends only on its own logits (greedy, no token counts): drafts can then be verified."""
        return self.greedy and self.counts is None

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Forget the state of sequences that finished (rows are the survivors)."""
        if self.counts is not None:
            self.counts = self.counts[rows]
