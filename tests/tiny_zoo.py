"""Tiny random-weights models of each zoo family's real architecture, with family-shaped tokenizers.

Each builder saves (safetensors) a 2-layer model of the class the real checkpoint
uses, plus a byte-level BPE tokenizer trained on fixed local text that carries the
family's special tokens as single tokens, with the real tokenizer's habits: a
leading BOS (DeepSeek-Coder, Code Llama), a trailing EOS (T5 / CodeT5).  Every
build takes a fraction of a second and gives the same folder on every run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CodeGenConfig,
    CodeGenForCausalLM,
    GPTBigCodeConfig,
    GPTBigCodeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Starcoder2Config,
    Starcoder2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from .tiny_models import training_text

VOCAB_SIZE = 400
POSITIONS = 256
ENDOFTEXT = "<|endoftext|>"

# Special tokens as each family's real tokenizer spells them.
CODEGEN2_TOKENS = ("<mask_1>", "<sep>", "<eom>")
STARCODER2_TOKENS = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>", "<file_sep>")
# StarCoder(Base) 1 has no <file_sep>: that is StarCoder2's.  Its file marker is <filename>.
STARCODERBASE_TOKENS = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
                        "<reponame>")
SANTACODER_TOKENS = ("<fim-prefix>", "<fim-middle>", "<fim-suffix>", "<fim-pad>")
QWEN_TOKENS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
DEEPSEEK_BOS, DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
DEEPSEEK_TOKENS = ("<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<|EOT|>")
CODELLAMA_TOKENS = ("▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>")
T5_SENTINELS = tuple(f"<extra_id_{i}>" for i in range(10))


@dataclass(frozen=True)
class TokenizerSpec:
    """What a family's tokenizer carries: named special tokens, extra tokens, and what it adds to encodings."""

    bos: str | None = None
    eos: str | None = None
    unk: str | None = None
    pad: str | None = None
    extra: tuple[str, ...] = ()
    extra_special: bool = True  # Qwen2.5 marks its FIM tokens non-special (decode keeps their text)
    prepend_bos: bool = False
    append_eos: bool = False

    @property
    def named(self) -> list[str]:
        """The named special tokens, each once, in id order (pad first so T5's <pad> is id 0)."""
        order = [self.pad, self.eos, self.unk, self.bos]
        return list(dict.fromkeys(t for t in order if t is not None))


def build_tokenizer(spec: TokenizerSpec, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the fixed tiny corpus, carrying ``spec``'s tokens as single tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trained_in = spec.named + (list(spec.extra) if spec.extra_special else [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=trained_in,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(), trainer)
    if not spec.extra_special:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.extra])
    single = (["$A"] if not spec.prepend_bos else [spec.bos, "$A"]) + ([spec.eos] if spec.append_eos else [])
    if spec.prepend_bos or spec.append_eos:
        pair = single + ["$B:1"] + ([spec.eos + ":1"] if spec.append_eos else [])
        used = {t for t in (spec.bos if spec.prepend_bos else None, spec.eos if spec.append_eos else None) if t}
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair),
            special_tokens=[(t, tokenizer.token_to_id(t)) for t in sorted(used)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=spec.bos,
        eos_token=spec.eos,
        unk_token=spec.unk,
        pad_token=spec.pad,
        additional_special_tokens=list(spec.extra) if spec.extra_special else None,
    )


def _emphasize(model: torch.nn.Module) -> None:
    """Default init gives near-uniform logits; larger embedding and head weights make greedy text varied."""
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings.normal_(0, 1.0)
        head = model.get_output_embeddings()
        if head is not None and head.weight is not embeddings:
            head.weight.normal_(0, 0.5)


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, folder: Path) -> Path:
    _emphasize(model)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _ids(tokenizer, *tokens: str | None) -> list[int | None]:
    return [None if t is None else tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _causal_ids(tokenizer) -> dict:
    bos, eos, pad = _ids(tokenizer, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    return {"vocab_size": len(tokenizer), "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


# -- families ------------------------------------------------------------------


def build_codegen(folder: Path, codegen2: bool = False, seed: int = 1) -> Path:
    """CodeGenForCausalLM; CodeGen (mono) knows only <|endoftext|>, CodeGen2 adds <mask_1>, <sep>, <eom>."""
    extra = CODEGEN2_TOKENS if codegen2 else ()
    tokenizer = build_tokenizer(TokenizerSpec(bos=ENDOFTEXT, eos=ENDOFTEXT, unk=ENDOFTEXT, extra=extra))
    torch.manual_seed(seed)
    config = CodeGenConfig(n_positions=POSITIONS, n_ctx=POSITIONS, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                           n_inner=128, tie_word_embeddings=False, **_causal_ids(tokenizer))
    return _save(CodeGenForCausalLM(config), tokenizer, folder)


def build_starcoder2(folder: Path, seed: int = 2) -> Path:
    """Starcoder2ForCausalLM with StarCoder2's FIM and repository tokens."""
    tokenizer = build_tokenizer(TokenizerSpec(bos=ENDOFTEXT, eos=ENDOFTEXT, unk=ENDOFTEXT, extra=STARCODER2_TOKENS))
    torch.manual_seed(seed)
    config = Starcoder2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=POSITIONS, sliding_window=None,
                              tie_word_embeddings=False, **_causal_ids(tokenizer))
    return _save(Starcoder2ForCausalLM(config), tokenizer, folder)


def build_gpt_bigcode(folder: Path, santacoder: bool = False, seed: int = 3) -> Path:
    """GPTBigCodeForCausalLM (multi-query attention): StarCoderBase's tokens, or SantaCoder's dashed ones."""
    extra = SANTACODER_TOKENS if santacoder else STARCODERBASE_TOKENS
    tokenizer = build_tokenizer(TokenizerSpec(bos=ENDOFTEXT, eos=ENDOFTEXT, unk=ENDOFTEXT, extra=extra))
    torch.manual_seed(seed)
    config = GPTBigCodeConfig(n_positions=POSITIONS, n_embd=64, n_layer=2, n_head=4, n_inner=128, multi_query=True,
                              tie_word_embeddings=False, **_causal_ids(tokenizer))
    return _save(GPTBigCodeForCausalLM(config), tokenizer, folder)


def build_qwen2(folder: Path, seed: int = 4) -> Path:
    """Qwen2ForCausalLM with Qwen2.5-Coder's <|fim_*|> and repository tokens (no BOS, like the real one)."""
    tokenizer = build_tokenizer(TokenizerSpec(eos=ENDOFTEXT, pad=ENDOFTEXT, extra=QWEN_TOKENS, extra_special=False))
    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=POSITIONS, tie_word_embeddings=False,
                         **_causal_ids(tokenizer))
    return _save(Qwen2ForCausalLM(config), tokenizer, folder)


def _llama(folder: Path, spec: TokenizerSpec, seed: int) -> Path:
    tokenizer = build_tokenizer(spec)
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=POSITIONS, tie_word_embeddings=False,
                         **_causal_ids(tokenizer))
    return _save(LlamaForCausalLM(config), tokenizer, folder)


def build_deepseek(folder: Path, seed: int = 5) -> Path:
    """LlamaForCausalLM with DeepSeek-Coder's full-width-bar tokens; encodings start with its BOS."""
    return _llama(folder, TokenizerSpec(bos=DEEPSEEK_BOS, eos=DEEPSEEK_EOS, extra=DEEPSEEK_TOKENS, prepend_bos=True),
                  seed)


def build_codellama(folder: Path, seed: int = 6) -> Path:
    """LlamaForCausalLM with Code Llama's <s>, </s>, <unk> and ▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>; encodings start with <s>."""
    spec = TokenizerSpec(bos="<s>", eos="</s>", unk="<unk>", extra=CODELLAMA_TOKENS, prepend_bos=True)
    return _llama(folder, spec, seed)


def build_t5(folder: Path, seed: int = 7) -> Path:
    """T5ForConditionalGeneration (CodeT5, CodeT5+ 220M/770M): <pad>=0 starts the decoder, encodings end with </s>."""
    tokenizer = build_tokenizer(TokenizerSpec(eos="</s>", unk="<unk>", pad="<pad>", extra=T5_SENTINELS,
                                              append_eos=True))
    return _t5(folder, tokenizer, seed)


def build_codet5p_decoder(folder: Path, seed: int = 8) -> Path:
    """An encoder-decoder for CodeT5+ 2B+: a CodeGen-style tokenizer (<|endoftext|> only, nothing appended)."""
    tokenizer = build_tokenizer(TokenizerSpec(bos=ENDOFTEXT, eos=ENDOFTEXT, unk=ENDOFTEXT, pad=ENDOFTEXT))
    return _t5(folder, tokenizer, seed)


def _t5(folder: Path, tokenizer, seed: int) -> Path:
    torch.manual_seed(seed)
    # T5 always ties its head to the embeddings, so the decoder tends to echo its input token; gated-GELU
    # feed-forward layers with larger weights make greedy output varied.
    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
                module.weight.normal_(0, 0.3)
    return _save(model, tokenizer, folder)


# family -> builder; each folder is built once per test session
FAMILIES: dict[str, Callable[[Path], Path]] = {
    "codegen": build_codegen,
    "codegen2": lambda folder: build_codegen(folder, codegen2=True),
    "codet5": build_t5,
    "codet5p-decoder": build_codet5p_decoder,
    "starcoder2": build_starcoder2,
    "starcoderbase": build_gpt_bigcode,
    "santacoder": lambda folder: build_gpt_bigcode(folder, santacoder=True),
    "qwen2": build_qwen2,
    "deepseek": build_deepseek,
    "codellama": build_codellama,
}

# config/zoo.toml entry -> the family whose tiny model stands in for it
ZOO_FAMILY = {
    "codegen-2b-mono": "codegen",
    "codegen2-1b": "codegen2",
    "codet5-base": "codet5",
    "codet5p-770m": "codet5",
    "codet5p-2b": "codet5p-decoder",
    "starcoder2-3b": "starcoder2",
    "starcoderbase-1b": "starcoderbase",
    "santacoder": "santacoder",
    "qwen2.5-coder-1.5b": "qwen2",
    "deepseek-coder-1.3b-base": "deepseek",
    "codellama-7b": "codellama",
}
