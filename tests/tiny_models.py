"""Tiny real-architecture models with locally trained tokenizers, built in seconds for tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")

SAMPLE_CODE = '''
def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)


class Greeter:
    def __init__(self, name):
        self.name = name

    def greet(self):
        print(f"Hello, {self.name}!")
        return "héllo wörld ☃ 🙂"
'''


MORE_CODE = '''
import os
import math
from dataclasses import dataclass


@dataclass
class Point:
    x: float
    y: float

    def distance(self, other: "Point") -> float:
        return math.sqrt((self.x - other.x) ** 2 + (self.y - other.y) ** 2)


def list_files(path):
    result = []
    for name in sorted(os.listdir(path)):
        if name.endswith(".py") and not name.startswith("_"):
            result.append(os.path.join(path, name))
    return result


def black_scholes(spot, strike, rate, sigma, time):
    d1 = (math.log(spot / strike) + (rate + sigma ** 2 / 2) * time) / (sigma * math.sqrt(time))
    d2 = d1 - sigma * math.sqrt(time)
    return d1, d2


for i in range(10):
    while i < 5:
        i += 1
    try:
        value = {"key": [1, 2, 3], "other": None, "flag": True}
    except (KeyError, ValueError) as error:
        raise RuntimeError(error) from None
'''


def training_text() -> list[str]:
    """Fixed local text to learn merges from, so the tiny model is the same on every run."""
    return [SAMPLE_CODE, MORE_CODE] * 10


def build_tokenizer(vocab_size: int = 600, texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) with an end-of-text and FIM special tokens, learnt from ``texts``
    (default: the fixed sample code above)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, *FIM_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text() if texts is None else texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   additional_special_tokens=list(FIM_TOKENS))


TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
# SmolLM2-135M's config.json (the default model): the same tensors, hence the same work per token.
SMOLLM2_135M_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
                          rope_theta=100000.0, rms_norm_eps=1e-5)


def build_llama(folder: Path, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None,
                shape: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Save a Llama with random weights (default: 2 layers, TINY_SHAPE) and its tokenizer into ``folder``."""
    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **(shape or TINY_SHAPE),
    )
    model = LlamaForCausalLM(config)
    # Default init gives near-uniform logits; larger weights make greedy text varied and decisive.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
        if not config.tie_word_embeddings:
            model.lm_head.weight.normal_(0, 0.5)
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
