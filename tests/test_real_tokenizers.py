"""The zoo entries against the real tokenizers in ../shared/tokenizers (see its SOURCES.md).

Each real tokenizer is paired with a tiny random model of its entry's real architecture
class, its embedding sized as the real checkpoint's, its special-token ids as the real
config names them, and loaded through the real zoo entry and loader (only ``source``
changed). The checks are on what the server builds and reads back, token by token:
the FIM prompt against the model card's layout (the real ids written out), plain prompts
and their BOS, stops by id, token healing on real BPE merges, and streamed detokenization
of whole stdlib modules with non-ASCII text.
"""
from __future__ import annotations

import dataclasses
import inspect
import shutil
import shlex
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import (
    AutoTokenizer,
    CodeGenConfig,
    CodeGenForCausalLM,
    GPTBigCodeConfig,
    GPTBigCodeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import config
from app.engine import SamplingParams, complete
from app.engine.engine import Engine
from app.engine.loader import load_engine
from app.engine.prompts import match_prompt_edges
from app.engine.sequence import IncrementalDetokenizer
from config import ConfigError, EngineOptions, Settings, settings_from_mapping

SHARED_TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
pytestmark = pytest.mark.skipif(not SHARED_TOKENIZERS.is_dir(),
                                reason="../shared/tokenizers is absent (a user's clone): no real tokenizers to check")

PREFIX = "def fibonacci(n):\n    if n < 2:\n        "
SUFFIX = "\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
NON_ASCII = "# Grüße, naïve café — 日本語のコメント, emoji 🐍🎉 and ½ ≤ ∞\nπ = 3.14159  # ünïcödé identifier\n"


@dataclass(frozen=True)
class RealFamily:
    """A real tokenizer folder, the zoo entries it stands behind, and its model's architecture and token ids."""

    folder: str
    entries: tuple[str, ...]
    build: Callable[[dict], PreTrainedModel]
    ids: dict  # vocab_size and special-token ids as the real checkpoint's config.json names them


def _codegen(ids: dict) -> PreTrainedModel:
    return CodeGenForCausalLM(CodeGenConfig(n_positions=512, n_ctx=512, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                            n_inner=64, tie_word_embeddings=False, **ids))


def _t5(ids: dict) -> PreTrainedModel:
    return T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                               num_heads=4, **ids))


def _bigcode(ids: dict) -> PreTrainedModel:
    return GPTBigCodeForCausalLM(GPTBigCodeConfig(n_positions=512, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                                  multi_query=True, **ids))


def _llama(ids: dict) -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                        tie_word_embeddings=False, **ids))


def _qwen2(ids: dict) -> PreTrainedModel:
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                        tie_word_embeddings=True, **ids))


# Token ids: from the folder's own config.json where it has one (codegen2-1B, codet5-base, deepseek), else the
# tokenizer's (its end-of-text token); vocab sizes are the real checkpoints' embedding rows.
FAMILIES = {
    "codegen": RealFamily("codegen-350M-mono", ("codegen-2b-mono",), _codegen,
                          {"vocab_size": 51200, "bos_token_id": 50256, "eos_token_id": 50256}),
    # CodeGen2's real config.json says bos 1 and eos 2: '"' and '#' in its tokenizer (see test_stops_by_id).
    "codegen2": RealFamily("codegen2-1B", ("codegen2-1b",), _codegen,
                           {"vocab_size": 51200, "bos_token_id": 1, "eos_token_id": 2}),
    # CodeT5+ 220M/770M use CodeT5's tokenizer (their card says so); no codet5p folder exists here.
    "codet5": RealFamily("codet5-base", ("codet5-base", "codet5p-770m"), _t5,
                         {"vocab_size": 32100, "pad_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 0}),
    "starcoder": RealFamily("starcoder", ("starcoderbase-1b",), _bigcode,
                            {"vocab_size": 49152, "bos_token_id": 0, "eos_token_id": 0}),
    # The 6.7b-instruct folder: every DeepSeek-Coder v1 model shares its tokenizer.json (base: eos 32014).
    "deepseek": RealFamily("deepseek-coder-6.7b-instruct", ("deepseek-coder-1.3b-base",), _llama,
                           {"vocab_size": 32256, "bos_token_id": 32013, "eos_token_id": 32014}),
    "qwen2": RealFamily("qwen2.5-3b-instruct-lora-tokenizer", ("qwen2.5-coder-1.5b",), _qwen2,
                        {"vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151643}),
}
ENTRY_FAMILY = {entry: family for family, real in FAMILIES.items() for entry in real.entries}

# The model cards' prompt layouts with the real ids written out (from SOURCES.md, checked there one by one).
CARD_FIM = {
    "codegen2-1b": lambda p, s: p + [51199] + s + [50256, 50299, 51199],  # p <mask_1> s <|endoftext|> <sep> <mask_1>
    "codet5-base": lambda p, s: [1] + p + [32099] + s + [2],  # <s> p <extra_id_0> s </s>
    "codet5p-770m": lambda p, s: [1] + p + [32099] + s + [2],
    "starcoderbase-1b": lambda p, s: [1] + p + [3] + s + [2],  # <fim_prefix> p <fim_suffix> s <fim_middle>
    "deepseek-coder-1.3b-base": lambda p, s: [32013, 32016] + p + [32015] + s + [32017],  # BOS, begin, hole, end
    "qwen2.5-coder-1.5b": lambda p, s: [151659] + p + [151661] + s + [151660],
}
# Ids a completion must stop at (end of text, and the entry's special stops), from the same table.
STOP_IDS = {
    "codegen-2b-mono": {50256},
    "codegen2-1b": {50256, 50300},  # <|endoftext|>, <eom>
    "codet5-base": {2, 32098},  # </s>, <extra_id_1>
    "codet5p-770m": {2, 32098},
    "starcoderbase-1b": {0},
    "deepseek-coder-1.3b-base": {32014, 32021},  # <｜end▁of▁sentence｜>, <|EOT|>
    "qwen2.5-coder-1.5b": {151643, 151645, 151662, 151664, 151663, 151659},
}
BOS = {"deepseek-coder-1.3b-base": [32013], "codet5-base": [1], "codet5p-770m": [1]}


def _zoo_entries() -> dict:
    raw = tomllib.loads(Path(config.__file__).with_name("zoo.toml").read_text(encoding="utf-8"))
    return {m.name: m for m in settings_from_mapping(raw).models}


def _model_folder(family: RealFamily, target: Path) -> Path:
    """The real tokenizer's files beside a tiny random model saved as safetensors."""
    target.mkdir(parents=True)
    for path in (SHARED_TOKENIZERS / family.folder).iterdir():
        if path.name not in ("config.json", "generation_config.json"):  # the real model's, not the tiny one's
            shutil.copy(path, target / path.name)
    torch.manual_seed(0)
    family.build(dict(family.ids)).save_pretrained(target, safe_serialization=True)
    return target


@pytest.fixture(scope="module")
def real_folders(tmp_path_factory) -> dict[str, Path]:
    """One tiny model folder per real tokenizer, built once for this module."""
    root = tmp_path_factory.mktemp("real-tokenizers")
    return {name: _model_folder(family, root / name) for name, family in FAMILIES.items()}


@pytest.fixture(scope="module")
def real_engines(real_folders, tmp_path_factory) -> dict[str, Engine]:
    """Each zoo entry with a real tokenizer, loaded by app.engine.loader with only its source replaced."""
    entries = {name: dataclasses.replace(entry, source=str(real_folders[ENTRY_FAMILY[name]]), dtype="float32")
               for name, entry in _zoo_entries().items() if name in ENTRY_FAMILY}
    settings = Settings(models=tuple(entries.values()), device="cpu", answer_cache=0,
                        cache_dir=tmp_path_factory.mktemp("real-cache"))
    return {name: load_engine(entry, settings) for name, entry in entries.items()}


@pytest.fixture(scope="module")
def unhealed(real_engines) -> dict[str, Engine]:
    """The same loaded models with token healing off, so a completion's first token is the model's free choice."""
    return {name: Engine(engine.config, engine.model, engine.tokenizer, engine.device,
                         EngineOptions(token_healing=False, answer_cache=0))
            for name, engine in real_engines.items()}


def plain(engine: Engine, text: str) -> list[int]:
    """Ids of text with nothing added."""
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy(max_tokens: int = 8, **settings) -> SamplingParams:
    """Greedy sampling parameters."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **settings)


# -- prompts as the models were trained ---------------------------------------------


def test_every_real_tokenizer_is_checked_against_an_entry():
    """Every folder in ../shared/tokenizers backs a zoo entry here, and every such entry exists in zoo.toml."""
    folders = {path.name for path in SHARED_TOKENIZERS.iterdir() if path.is_dir()}
    assert folders == {family.folder for family in FAMILIES.values()}
    assert set(ENTRY_FAMILY) <= set(_zoo_entries())


@pytest.mark.parametrize("entry", sorted(CARD_FIM))
def test_fim_prompt_is_the_cards_layout_token_by_token(real_engines, entry):
    """The FIM prompt is the card's layout: the real special ids around prefix and suffix, each tokenized alone."""
    engine = real_engines[entry]
    ids, used_fim, cut = engine.preparer.encode(PREFIX, SUFFIX)
    assert used_fim and not cut
    assert ids == CARD_FIM[entry](plain(engine, PREFIX), plain(engine, SUFFIX))


@pytest.mark.parametrize("entry", ["codegen2-1b", "starcoderbase-1b", "deepseek-coder-1.3b-base", "qwen2.5-coder-1.5b"])
def test_fim_prompt_equals_the_cards_own_encoding(real_engines, entry):
    """The card's example (the template filled in as one string, encoded with its BOS) gives the same ids."""
    engine = real_engines[entry]
    card = engine.config.fim.template.replace("{prefix}", PREFIX).replace("{suffix}", SUFFIX)
    ids, _, _ = engine.preparer.encode(PREFIX, SUFFIX)
    assert ids == BOS.get(entry, []) + plain(engine, card)


def test_deepseek_prompts_start_with_bos_although_transformers_drops_it(real_folders, real_engines):
    """tokenizer_config's add_bos_token is honoured: DeepSeek plain and FIM prompts begin with id 32013."""
    raw = AutoTokenizer.from_pretrained(real_folders["deepseek"])
    engine = real_engines["deepseek-coder-1.3b-base"]
    if raw("x")["input_ids"][0] == 32013:
        pytest.skip("this transformers adds DeepSeek's BOS itself; the server then changes nothing")
    plain_ids, used_fim, _ = engine.preparer.encode("import os\n")
    assert not used_fim and plain_ids == [32013, *plain(engine, "import os\n")]
    assert engine.preparer.encode(PREFIX, SUFFIX)[0][:2] == [32013, 32016]
    assert "<｜begin▁of▁sentence｜>" in engine.preparer.describe_prompts()


@pytest.mark.parametrize("entry", sorted(ENTRY_FAMILY))
def test_plain_prompt_begins_as_trained(real_engines, entry):
    """Without a suffix, causal prompts are the text's tokens after the model's BOS (if any), nothing after."""
    engine = real_engines[entry]
    prompt = "import os\n\ndef main():\n    "
    ids, used_fim, _ = engine.preparer.encode(prompt)
    if engine.config.kind == "seq2seq":
        assert used_fim and ids == CARD_FIM[entry](plain(engine, prompt), [])
    else:
        assert not used_fim and ids == BOS.get(entry, []) + plain(engine, prompt)


def test_an_entry_can_say_otherwise_than_the_tokenizer_config(real_folders):
    """An entry's add_bos_token overrides tokenizer_config.json; add_eos_token on a causal model is refused."""
    tokenizer = AutoTokenizer.from_pretrained(real_folders["deepseek"])
    assert match_prompt_edges(tokenizer, True, None, causal=True) == (True, False)
    assert tokenizer("x")["input_ids"] == [32013, 87]
    assert match_prompt_edges(tokenizer, False, None, causal=True) == (False, False)
    assert tokenizer("x")["input_ids"] == [87]
    with pytest.raises(ConfigError, match="add_eos_token"):
        settings_from_mapping({"models": [{"name": "m", "source": "x", "add_eos_token": True}]})


def test_codet5_keeps_the_indentation_before_the_sentinel(real_engines):
    """<extra_id_0> strips the whitespace before it in one-string encodings; prefix and suffix apart keep it."""
    engine = real_engines["codet5-base"]
    ids, _, _ = engine.preparer.encode(PREFIX, SUFFIX)
    shown = engine.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert shown == f"<s>{PREFIX}<extra_id_0>{SUFFIX}</s>"
    # The card's one-string form loses the newline and 8 spaces of indentation before the cursor:
    one_string = engine.tokenizer(f"{PREFIX}<extra_id_0>{SUFFIX}")["input_ids"]
    assert engine.tokenizer.decode(one_string, skip_special_tokens=False, clean_up_tokenization_spaces=False) == \
        f"<s>{PREFIX.rstrip()}<extra_id_0>{SUFFIX}</s>"


# -- stops ---------------------------------------------------------------------------


@pytest.mark.parametrize("entry", sorted(ENTRY_FAMILY))
def test_stops_by_id(unhealed, entry):
    """End-of-text and the entry's special stops are stop ids; a model that emits one ends with nothing shown."""
    engine = unhealed[entry]
    assert STOP_IDS[entry] <= engine.preparer.eos_ids
    for stop in sorted(STOP_IDS[entry]):
        result = complete(engine, "def main():\n", params=greedy(logit_bias=((stop, 100.0),)))[0]
        assert (result.finish_reason, result.text, result.completion_tokens) == ("stop", "", 1), stop


def test_codegen2_config_eos_that_is_ordinary_text_is_not_a_stop(unhealed):
    """CodeGen2's config.json says eos 2, which its tokenizer spells '#': comments must not end completions."""
    engine = unhealed["codegen2-1b"]
    assert engine.tokenizer.convert_ids_to_tokens(2) == "#"
    assert 2 not in engine.preparer.eos_ids
    result = complete(engine, "def main():\n    ", params=greedy(max_tokens=3, logit_bias=((2, 100.0),)))[0]
    assert (result.text, result.finish_reason) == ("###", "length")


# -- token healing on real merges --------------------------------------------------


@pytest.mark.parametrize("entry, prompt, merged_token, shown", [
    # StarCoder merges "\n" with the next line's indentation: 'ĊĠĠĠ'.
    ("starcoderbase-1b", "def f(x):\n", "ĊĠĠĠ", "   "),
    # CodeGen's whitespace tokens: a prompt ending in 2 spaces may become the 4-space token.
    ("codegen-2b-mono", "def f(x):\n  ", "    ", "  "),
    ("codegen2-1b", "def f(x):\n  ", "    ", "  "),
    # DeepSeek and Qwen merge runs of spaces ('ĠĠĠ').
    ("deepseek-coder-1.3b-base", "def f(x):\n  ", "ĠĠĠ", " "),
    ("qwen2.5-coder-1.5b", "def f(x):\n  ", "ĠĠĠ", " "),
])
def test_token_healing_on_real_merges(real_engines, entry, prompt, merged_token, shown):
    """The prompt's last token is re-chosen among real tokens extending it; the client sees only the new text."""
    engine = real_engines[entry]
    merged = engine.tokenizer.convert_tokens_to_ids(merged_token)
    request = engine.prepare(prompt, greedy(max_tokens=1, logit_bias=((merged, 100.0),)))
    assert request.healing is not None and merged in request.healing.allowed
    assert request.prompt_ids == tuple(BOS.get(entry, []) + plain(engine, prompt)[:-1])
    assert all(engine.tokenizer.convert_ids_to_tokens(i).startswith(
        engine.tokenizer.convert_ids_to_tokens(plain(engine, prompt)[-1])) for i in request.healing.allowed)
    result = engine.complete(request)[0]
    assert result.text == shown
    assert prompt + result.text == engine.preparer.decode([*request.prompt_ids, merged])


# -- detokenization ------------------------------------------------------------------

SOURCES = {"textwrap": inspect.getsource(textwrap), "shlex": inspect.getsource(shlex), "non-ascii": NON_ASCII * 3}
# DeepSeek-Coder's tokenizer.json adds 13 Latin-1 letters as tokens 32000-32012 (the bytes 0xC0, 0xC1, 0xF5-0xFF
# that its BPE lacks), matched in raw text before the byte-level step: "ü" encodes as 32009, which its own
# decoder reads back as the lone byte 0xFC. No streaming can bring those letters back.
DEEPSEEK_BYTE_LETTERS = "õ÷ÁýÀÿøúþüùöû"


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_streamed_detokenization_round_trips(real_engines, family, source):
    """Whole modules (shlex has Latin-1 letters; emoji and CJK split across byte tokens) stream back exactly."""
    engine = real_engines[FAMILIES[family].entries[0]]
    text = SOURCES[source]
    if family == "deepseek":
        text = text.translate({ord(letter): "?" for letter in DEEPSEEK_BYTE_LETTERS})
    ids = plain(engine, text)
    detokenizer = IncrementalDetokenizer(engine.preparer.decode)
    pieces = [detokenizer.add(token) for token in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_deepseek_byte_letters_stream_as_the_tokenizer_decodes_them(real_engines):
    """The 13 letters DeepSeek's tokenizer cannot round-trip stream out exactly as its own decode gives them."""
    engine = real_engines["deepseek-coder-1.3b-base"]
    text = f"# {DEEPSEEK_BYTE_LETTERS} Grüße\n"
    ids = plain(engine, text)
    assert set(range(32000, 32013)) <= set(ids)
    detokenizer = IncrementalDetokenizer(engine.preparer.decode)
    streamed = "".join([detokenizer.add(token) for token in ids] + [detokenizer.flush()])
    assert streamed == engine.preparer.decode(ids) != text
