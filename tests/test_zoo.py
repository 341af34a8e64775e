"""The model zoo (config/zoo.toml) against tiny models of each family's real architecture and tokenizer.

Every entry is loaded as written, with only its ``source`` swapped for a tiny folder
of the same family (and float32 weights for determinism), through the real loader.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest
import torch

import config
from app import create_app
from app.engine import SamplingParams, complete
from app.engine.engine import Engine
from app.engine.loader import ModelLoadError, load_engine
from config import ConfigError, EngineOptions, FimTemplate, ModelConfig, Settings, settings_from_mapping

from .tiny_models import MORE_CODE, SAMPLE_CODE
from .tiny_zoo import (
    CODEGEN2_TOKENS, CODELLAMA_TOKENS, DEEPSEEK_BOS, DEEPSEEK_EOS, DEEPSEEK_TOKENS, ENDOFTEXT, FAMILIES, QWEN_TOKENS,
    SANTACODER_TOKENS, STARCODER2_TOKENS, STARCODERBASE_TOKENS, T5_SENTINELS, ZOO_FAMILY,
)

ZOO_FILE = Path(config.__file__).with_name("zoo.toml")
PREFIX = "def fibonacci(n):\n    if n < 2:\n        "
SUFFIX = "\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
SHORT_SUFFIX = "\nprint(x)\n"
PROMPT = "class Greeter:\n    def greet(self):\n        return"


def greedy(max_tokens: int = 12, **settings) -> SamplingParams:
    """Greedy sampling parameters."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **settings)


def zoo_raw() -> dict:
    """config/zoo.toml, parsed."""
    return tomllib.loads(ZOO_FILE.read_text(encoding="utf-8"))


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="session")
def zoo_folders(tmp_path_factory) -> dict[str, Path]:
    """One tiny model folder per family, built once per session."""
    root = tmp_path_factory.mktemp("zoo")
    return {family: build(root / family) for family, build in FAMILIES.items()}


@pytest.fixture(scope="session")
def zoo_entries(zoo_folders) -> dict[str, ModelConfig]:
    """The real zoo entries with only ``source`` (and dtype) replaced by their family's tiny folder."""
    settings = settings_from_mapping(zoo_raw())
    return {m.name: dataclasses.replace(m, source=str(zoo_folders[ZOO_FAMILY[m.name]]), dtype="float32")
            for m in settings.models}


@pytest.fixture(scope="session")
def zoo_settings(zoo_entries, tmp_path_factory) -> Settings:
    """Settings serving every zoo entry on the CPU."""
    return Settings(models=tuple(zoo_entries.values()), device="cpu", cache_dir=tmp_path_factory.mktemp("zoo-cache"),
                    answer_cache=0)  # repeats must reach the model: they check its prefix cache


@pytest.fixture(scope="session")
def zoo_engines(zoo_entries, zoo_settings) -> dict[str, Engine]:
    """Every zoo entry loaded through app.engine.loader.load_engine."""
    return {name: load_engine(entry, zoo_settings) for name, entry in zoo_entries.items()}


def variant(engine: Engine, healing: bool = True, **changes) -> Engine:
    """The same loaded model and tokenizer under a changed config entry (and token healing on or off)."""
    return Engine(dataclasses.replace(engine.config, **changes), engine.model, engine.tokenizer, engine.device,
                  EngineOptions(token_healing=healing, answer_cache=0))


# -- model card layouts, built by hand --------------------------------------------


def special(tokenizer, *tokens: str) -> list[int]:
    """Ids of single vocabulary tokens (checked to be single, known tokens)."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    assert tokenizer.convert_ids_to_tokens(ids) == list(tokens)
    return ids


def plain(tokenizer, text: str) -> list[int]:
    """Ids of text without any special tokens added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _psm(pre: str, suf: str, mid: str, bos: str | None = None):
    def layout(tok, p: list[int], s: list[int]) -> list[int]:
        head = special(tok, bos) if bos else []
        return head + special(tok, pre) + p + special(tok, suf) + s + special(tok, mid)
    return layout


def _codegen2(tok, p, s):
    # Card: prefix + "<mask_1>" + suffix + "<|endoftext|>" + "<sep>" + "<mask_1>"
    return p + special(tok, "<mask_1>") + s + special(tok, "<|endoftext|>", "<sep>", "<mask_1>")


def _codet5(tok, p, s):
    # Card: tokenizer("... <extra_id_0> ...") — a T5 tokenizer ends every encoding with </s>.
    return p + special(tok, "<extra_id_0>") + s + special(tok, "</s>")


CARD_LAYOUTS = {
    "codegen2-1b": _codegen2,
    "codet5-base": _codet5,
    "codet5p-770m": _codet5,
    "starcoder2-3b": _psm("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    "starcoderbase-1b": _psm("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    "santacoder": _psm("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),
    "qwen2.5-coder-1.5b": _psm("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    "deepseek-coder-1.3b-base": _psm("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>",
                                     bos="<｜begin▁of▁sentence｜>"),
    "codellama-7b": _psm("▁<PRE>", "▁<SUF>", "▁<MID>", bos="<s>"),
}
FIM_ENTRIES = sorted(CARD_LAYOUTS)
CAUSAL_ENTRIES = ["codegen-2b-mono", "codegen2-1b", "starcoder2-3b", "starcoderbase-1b", "santacoder",
                  "qwen2.5-coder-1.5b", "deepseek-coder-1.3b-base", "codellama-7b"]
SPAN_ENTRIES = ["codet5-base", "codet5p-770m"]  # seq2seq, sentinel span infilling


# -- the zoo loads ----------------------------------------------------------------


def test_every_zoo_entry_has_a_tiny_family_and_the_expected_shape(zoo_entries):
    """zoo.toml validates, every entry has a stand-in family, and kinds and FIM flags are as the cards say."""
    assert set(zoo_entries) == set(ZOO_FAMILY)
    assert {n for n, m in zoo_entries.items() if m.fim is not None} == set(FIM_ENTRIES)
    assert {n for n, m in zoo_entries.items() if m.kind == "seq2seq"} == {*SPAN_ENTRIES, "codet5p-2b"}
    assert [n for n, m in zoo_entries.items() if m.decoder_prompt] == ["codet5p-2b"]


def test_each_entry_loads_its_families_real_architecture(zoo_engines):
    """load_engine builds each entry's model with the architecture class its checkpoint uses."""
    expected = {
        "codegen": "CodeGenForCausalLM", "codegen2": "CodeGenForCausalLM", "codet5": "T5ForConditionalGeneration",
        "codet5p-decoder": "T5ForConditionalGeneration", "starcoder2": "Starcoder2ForCausalLM",
        "starcoderbase": "GPTBigCodeForCausalLM", "santacoder": "GPTBigCodeForCausalLM",
        "qwen2": "Qwen2ForCausalLM", "deepseek": "LlamaForCausalLM", "codellama": "LlamaForCausalLM",
    }
    for name, engine in zoo_engines.items():
        assert type(engine.model).__name__ == expected[ZOO_FAMILY[name]], name
        assert engine.preparer.is_seq2seq == (engine.config.kind == "seq2seq")
        assert engine.supports_fim == (name in CARD_LAYOUTS)
        assert next(engine.model.parameters()).dtype == torch.float32


FAMILY_TOKENS = {
    "codegen": (ENDOFTEXT,), "codegen2": (ENDOFTEXT, *CODEGEN2_TOKENS),
    "codet5": ("<pad>", "</s>", "<unk>", *T5_SENTINELS), "codet5p-decoder": (ENDOFTEXT,),
    "starcoder2": (ENDOFTEXT, *STARCODER2_TOKENS), "starcoderbase": (ENDOFTEXT, *STARCODERBASE_TOKENS),
    "santacoder": (ENDOFTEXT, *SANTACODER_TOKENS), "qwen2": (ENDOFTEXT, *QWEN_TOKENS),
    "deepseek": (DEEPSEEK_BOS, DEEPSEEK_EOS, *DEEPSEEK_TOKENS), "codellama": ("<s>", "</s>", "<unk>", *CODELLAMA_TOKENS),
}


def test_tiny_tokenizers_carry_each_familys_special_tokens_as_single_tokens(zoo_engines):
    """Every family token encodes to one id and back; BOS/EOS are added to encodings as the real tokenizers do."""
    for name, engine in zoo_engines.items():
        family = ZOO_FAMILY[name]
        tok = engine.tokenizer
        for token in FAMILY_TOKENS[family]:
            ids = tok(token, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [token], (name, token)
        plain_ids = tok("x = 1", add_special_tokens=False)["input_ids"]
        bos = [tok.bos_token_id] if family in ("deepseek", "codellama") else []
        eos = [tok.eos_token_id] if family == "codet5" else []
        assert tok("x = 1")["input_ids"] == bos + plain_ids + eos, name
    assert zoo_engines["codet5-base"].model.config.decoder_start_token_id == 0
    assert zoo_engines["codet5-base"].tokenizer.convert_ids_to_tokens(0) == "<pad>"


# -- FIM prompt assembly ----------------------------------------------------------


@pytest.mark.parametrize("name", FIM_ENTRIES)
def test_fim_prompt_matches_the_model_card_token_by_token(zoo_engines, name):
    """prepare() with a suffix builds exactly the card's layout: special ids, prefix ids, suffix ids, BOS/EOS."""
    engine = zoo_engines[name]
    tok = engine.tokenizer
    request = engine.prepare(PREFIX, greedy(8), suffix=SUFFIX)
    expected = CARD_LAYOUTS[name](tok, plain(tok, PREFIX), plain(tok, SUFFIX))
    assert request.used_fim is True
    assert list(request.prompt_ids) == expected
    # The card's own way: the whole prompt string through the tokenizer, its usual specials included.
    card_text = engine.config.fim.template.replace("{prefix}", PREFIX).replace("{suffix}", SUFFIX)
    assert list(request.prompt_ids) == tok(card_text)["input_ids"]


@pytest.mark.parametrize("name", ["codegen-2b-mono", "codet5p-2b"])
def test_entries_without_fim_ignore_the_suffix(zoo_engines, name):
    """A model without a fim template completes the prefix alone: used_fim False, ids == tokenizer(prefix)."""
    engine = variant(zoo_engines[name], healing=False)
    request = engine.prepare(PREFIX, greedy(8), suffix=SUFFIX)
    assert request.used_fim is False and request.healing is None
    assert list(request.prompt_ids) == engine.tokenizer(PREFIX)["input_ids"]
    # As served (token healing on), a causal prompt's last token is re-chosen; the suffix is still ignored.
    served = zoo_engines[name].prepare(PREFIX, greedy(8), suffix=SUFFIX)
    full = engine.tokenizer(PREFIX)["input_ids"]
    assert served.used_fim is False
    if zoo_engines[name].preparer.is_seq2seq:
        assert served.healing is None and list(served.prompt_ids) == full
    else:
        assert list(served.prompt_ids) == full[:-1]
        assert served.healing.text == engine.decode(full[-2:])[len(engine.decode(full[-2:-1])):]


@pytest.mark.parametrize("name, tokens, bos", [
    ("starcoder2-3b", ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), None),
    ("codellama-7b", ("▁<PRE>", "▁<SUF>", "▁<MID>"), "<s>"),
])
def test_psm_and_spm_orders(zoo_engines, name, tokens, bos):
    """FimTemplate.from_tokens gives PSM (prefix first) and SPM (suffix first, prefix after the middle token)."""
    base = zoo_engines[name]
    tok = base.tokenizer
    p, s = plain(tok, PREFIX), plain(tok, SUFFIX)
    pre, suf, mid = special(tok, *tokens)
    head = special(tok, bos) if bos else []
    psm = variant(base, fim=FimTemplate.from_tokens(*tokens)).prepare(PREFIX, greedy(8), suffix=SUFFIX)
    spm = variant(base, fim=FimTemplate.from_tokens(*tokens, order="spm")).prepare(PREFIX, greedy(8), suffix=SUFFIX)
    assert list(psm.prompt_ids) == head + [pre] + p + [suf] + s + [mid]
    assert list(spm.prompt_ids) == head + [pre, suf] + s + [mid] + p
    assert psm.used_fim and spm.used_fim


def test_seq2seq_fim_entry_uses_its_template_even_without_a_suffix(zoo_engines):
    """CodeT5's sentinel marks the span to write, so a prompt alone still goes through the template."""
    engine = zoo_engines["codet5-base"]
    tok = engine.tokenizer
    request = engine.prepare(PREFIX, greedy(8))
    assert request.used_fim is True
    assert list(request.prompt_ids) == _codet5(tok, plain(tok, PREFIX), [])


# -- truncation ---------------------------------------------------------------------


def _find_cut(layout, tok, ids: list[int], head: list[int], tail: list[int]) -> tuple[int, int] | None:
    """(kept prefix, kept suffix) sizes for which the layout of head's end and tail's start gives ``ids``."""
    fixed = len(layout(tok, [], []))
    for keep_head in range(len(head) + 1):
        keep_tail = len(ids) - fixed - keep_head
        if 0 <= keep_tail <= len(tail) and layout(tok, head[len(head) - keep_head:], tail[:keep_tail]) == ids:
            return keep_head, keep_tail
    return None


@pytest.mark.parametrize("name", ["starcoder2-3b", "codegen2-1b", "deepseek-coder-1.3b-base", "codellama-7b",
                                  "qwen2.5-coder-1.5b", "codet5-base"])
@pytest.mark.parametrize("suffix", [MORE_CODE * 2, SHORT_SUFFIX], ids=["long-suffix", "short-suffix"])
def test_truncation_keeps_the_tokens_nearest_the_cursor(zoo_engines, name, suffix):
    """With prefix and suffix past a 64-token window, the end of the prefix and the start of the suffix are kept."""
    engine = variant(zoo_engines[name], context_length=64)
    tok = engine.tokenizer
    prefix = SAMPLE_CODE * 3 + PREFIX
    max_tokens = 8
    request = engine.prepare(prefix, greedy(max_tokens), suffix=suffix)
    ids = list(request.prompt_ids)
    budget = 64 if engine.preparer.is_seq2seq else 64 - max_tokens
    head, tail = plain(tok, prefix), plain(tok, suffix)
    assert len(head) + len(tail) > budget  # truncation is really needed
    assert len(ids) == budget  # and the window is used to the last token
    cut = _find_cut(CARD_LAYOUTS[name], tok, ids, head, tail)
    assert cut is not None, "prompt is not the card layout of the prefix's end and the suffix's start"
    keep_head, keep_tail = cut
    assert 0 < keep_head < len(head)
    if suffix == SHORT_SUFFIX:
        assert keep_tail == len(tail)  # a few-token suffix survives whole
    else:
        assert 0 < keep_tail < len(tail)
    assert all(token in ids for token in CARD_LAYOUTS[name](tok, [], []))  # every template token is there
    _, used_fim, truncation = engine.preparer.encode(prefix, suffix, budget)
    assert used_fim and (truncation.prefix_tokens, truncation.suffix_tokens) == (len(head) - keep_head,
                                                                               len(tail) - keep_tail)


# -- stops ----------------------------------------------------------------------------


def test_every_configured_stop_is_kept_as_a_token_or_as_text(zoo_engines):
    """A stop that is a vocabulary token stops by id; one the vocabulary lacks is matched as text, never dropped."""
    for name, engine in zoo_engines.items():
        tok = engine.tokenizer
        assert tok.eos_token_id in engine.preparer.eos_ids, name
        for stop in engine.config.stop:
            token_id = tok.convert_tokens_to_ids(stop)
            known = token_id is not None and token_id != tok.unk_token_id and tok.convert_ids_to_tokens(token_id) == stop
            if known:
                assert token_id in engine.preparer.eos_ids and stop not in engine.preparer.stop_strings, (name, stop)
            else:
                assert stop in engine.preparer.stop_strings, (name, stop)


STOP_TOKENS = [
    ("codegen2-1b", "<eom>"),
    ("codet5-base", "<extra_id_1>"),
    ("codet5p-770m", "<extra_id_1>"),
    ("starcoder2-3b", "<file_sep>"),
    ("qwen2.5-coder-1.5b", "<|fim_pad|>"),
    ("qwen2.5-coder-1.5b", "<|file_sep|>"),
    ("qwen2.5-coder-1.5b", "<|repo_name|>"),
    ("qwen2.5-coder-1.5b", "<|fim_prefix|>"),
    ("deepseek-coder-1.3b-base", "<|EOT|>"),
    ("codellama-7b", "▁<EOT>"),
]


@pytest.mark.parametrize("name, stop", STOP_TOKENS)
def test_special_token_stop_ends_generation_by_id(zoo_engines, name, stop):
    """The entry's special-token stop is an eos id: forcing it ends with "stop" and none of its text."""
    engine = zoo_engines[name]
    token_id = special(engine.tokenizer, stop)[0]
    assert stop in engine.config.stop and token_id in engine.preparer.eos_ids
    params = greedy(6, logit_bias=((token_id, 100.0),))
    result = complete(engine, PREFIX, suffix=SUFFIX, params=params)[0]
    assert (result.finish_reason, result.completion_tokens, result.text) == ("stop", 1, "")
    # Without the configured stop the same forced token is just another token: the run goes to its length.
    unstopped = variant(engine, stop=())
    assert token_id not in unstopped.preparer.eos_ids
    other = complete(unstopped, PREFIX, suffix=SUFFIX, params=params)[0]
    assert (other.finish_reason, other.completion_tokens) == ("length", 6)


def test_non_special_stop_token_text_never_reaches_the_output(zoo_engines):
    """Qwen2.5's FIM tokens are not special (decode keeps their text), yet a forced <|fim_pad|> stop adds none."""
    engine = zoo_engines["qwen2.5-coder-1.5b"]
    pad = special(engine.tokenizer, "<|fim_pad|>")[0]
    params = greedy(5, logit_bias=((pad, 100.0),))
    unstopped = complete(variant(engine, stop=()), PREFIX, suffix=SUFFIX, params=params)[0]
    assert unstopped.text == "<|fim_pad|>" * 5
    stopped = complete(engine, PREFIX, suffix=SUFFIX, params=params)[0]
    assert (stopped.text, stopped.finish_reason) == ("", "stop")


# -- our decode loop against transformers' generate --------------------------------------


def run(engine: Engine, prompt: str, suffix: str | None = None, params: SamplingParams = greedy(), n: int = 1):
    """Run a completion; return the request, each sequence's generated ids, and the results."""
    request = engine.prepare(prompt, params, suffix=suffix, n=n)
    for _ in engine.stream(request):
        pass
    return request, [seq.token_ids for seq in request.sequences], request.results()


def reference_ids(engine: Engine, output: torch.Tensor, start: int) -> list[int]:
    """transformers' new tokens (from ``start``), up to and including the first eos id."""
    new = output[0, start:].tolist()
    for i, token in enumerate(new):
        if token in engine.preparer.eos_ids:
            return new[:i + 1]
    return new


def generate_causal(engine: Engine, prompt_ids, max_new_tokens: int = 12, first_allowed=None) -> list[int]:
    """model.generate(do_sample=False) on ``prompt_ids``, stopping at the engine's eos ids; the new ids."""
    ids = torch.tensor([list(prompt_ids)])
    constrain = None
    if first_allowed is not None:  # token healing: only these may come first
        everything = list(range(engine.preparer.vocab_size))
        constrain = lambda batch, seen: list(first_allowed) if seen.shape[-1] == ids.shape[1] else everything  # noqa: E731
    with torch.inference_mode():
        output = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                       do_sample=False, eos_token_id=sorted(engine.preparer.eos_ids),
                                       pad_token_id=min(engine.preparer.eos_ids), prefix_allowed_tokens_fn=constrain)
    return reference_ids(engine, output, ids.shape[1])


def expected_text(engine: Engine, ids: list[int]) -> str:
    """Text of generated ids without a final eos, cut at a configured text stop."""
    text = engine.decode(ids[:-1] if ids and ids[-1] in engine.preparer.eos_ids else ids)
    for stop in engine.preparer.stop_strings:
        text = text.split(stop)[0]
    return text


def finish_reason(engine: Engine, ids: list[int], max_tokens: int = 12) -> str:
    """The finish reason generate()'s ids imply."""
    return "stop" if ids[-1] in engine.preparer.eos_ids or len(ids) < max_tokens else "length"


@pytest.mark.parametrize("name", CAUSAL_ENTRIES)
@pytest.mark.parametrize("with_suffix", [False, True], ids=["plain", "fim"])
def test_causal_greedy_matches_transformers_generate(zoo_engines, name, with_suffix):
    """Greedy ids, text and finish reason from our decode loop equal model.generate(do_sample=False)'s."""
    engine = variant(zoo_engines[name], healing=False)
    suffix = SUFFIX if with_suffix else None
    request, (ours,), (result,) = run(engine, PROMPT, suffix)
    assert request.used_fim == (with_suffix and engine.supports_fim)
    expected = generate_causal(engine, request.prompt_ids)
    assert ours == expected
    assert result.text == expected_text(engine, expected)
    assert result.finish_reason == finish_reason(engine, expected)


@pytest.mark.parametrize("name", CAUSAL_ENTRIES)
def test_causal_token_healing_matches_constrained_generate(zoo_engines, name):
    """As served (healing on), the output is generate() on the healed prompt with the first token constrained."""
    engine = zoo_engines[name]
    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fib"
    request, (ours,), (result,) = run(engine, prompt)
    full = engine.tokenizer(prompt)["input_ids"]
    assert request.healing is not None and list(request.prompt_ids) == full[:-1]
    assert full[-1] in request.healing.allowed and len(request.healing.allowed) > 1
    expected = generate_causal(engine, request.prompt_ids, first_allowed=request.healing.allowed)
    assert ours == expected and ours[0] in request.healing.allowed
    text = expected_text(engine, expected)
    assert text.startswith(request.healing.text)
    assert result.text == text[len(request.healing.text):]


@pytest.mark.parametrize("name", CAUSAL_ENTRIES)
def test_causal_reused_prefix_matches_generate(zoo_engines, name):
    """A long prompt run cold, then again with its cached prefix reused, gives generate()'s tokens both times."""
    engine = variant(zoo_engines[name], healing=False)
    prompt = SAMPLE_CODE + PROMPT
    request, (cold,), _ = run(engine, prompt)
    assert request.reused == 0 and len(request.prompt_ids) > 64
    again, (warm,), _ = run(engine, prompt)
    assert again.reused > 0
    assert cold == warm == generate_causal(engine, request.prompt_ids)


def test_causal_output_is_varied(zoo_engines):
    """The tiny weights give varied greedy text, so the agreement tests compare something."""
    for name in CAUSAL_ENTRIES:
        _, (ids,), _ = run(zoo_engines[name], PROMPT)
        assert len(set(ids)) >= 3, name


@pytest.mark.parametrize("name", SPAN_ENTRIES)
@pytest.mark.parametrize("prefix, suffix", [(PREFIX, SUFFIX), ("import os\n\n\ndef list_files(path):\n", "")])
def test_seq2seq_span_matches_transformers_generate(zoo_engines, name, prefix, suffix):
    """The encoder-decoder path writes the tokens generate() writes from the template ids, sentinels stripped."""
    engine = zoo_engines[name]
    request, (ours,), (result,) = run(engine, prefix, suffix)
    ids = torch.tensor([request.prompt_ids])
    with torch.inference_mode():
        output = engine.model.generate(input_ids=ids, max_new_tokens=12, do_sample=False,
                                       eos_token_id=sorted(engine.preparer.eos_ids))
    start = engine.model.config.decoder_start_token_id
    assert output[0, 0].item() == start
    expected = reference_ids(engine, output, 1)
    assert ours == expected
    span = expected[:-1] if expected[-1] in engine.preparer.eos_ids else expected  # cut at <extra_id_1> (or </s>)
    assert result.text == engine.tokenizer.decode(span, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert not any(f"<extra_id_{i}>" in result.text for i in range(10))


def test_codet5p_decoder_is_fed_the_prompt(zoo_engines):
    """codet5p-2b (decoder_prompt) continues the prompt in the decoder, as generate(decoder_input_ids=ids) does."""
    engine = zoo_engines["codet5p-2b"]
    request, (ours,), (result,) = run(engine, PROMPT)
    ids = torch.tensor([request.prompt_ids])
    start = engine.model.config.decoder_start_token_id
    assert request.prompt_ids[0] != start
    with torch.inference_mode():
        fed = engine.model.generate(input_ids=ids, decoder_input_ids=ids, max_new_tokens=12, do_sample=False,
                                    eos_token_id=sorted(engine.preparer.eos_ids))
        unfed = engine.model.generate(input_ids=ids, max_new_tokens=12, do_sample=False,
                                      eos_token_id=sorted(engine.preparer.eos_ids))
    # generate() puts the decoder start token before the prompt; the continuation follows the prompt.
    assert fed[0, :1 + ids.shape[1]].tolist() == [start, *request.prompt_ids]
    expected = reference_ids(engine, fed, 1 + ids.shape[1])
    assert ours == expected
    assert ours != reference_ids(engine, unfed, 1)
    assert result.text == expected_text(engine, expected)
    # The first step's logits are the model's after [start] + prompt in the decoder.
    with torch.inference_mode():
        prefill = engine.runner.start(request.prompt_ids)
        prefill.step()
        logits = prefill.logits
        decoder_ids = torch.tensor([[start, *request.prompt_ids]])
        direct = engine.model(input_ids=ids, decoder_input_ids=decoder_ids).logits[:, -1]
    assert torch.allclose(logits, direct, atol=1e-5)


@pytest.mark.parametrize("name", SPAN_ENTRIES + ["codet5p-2b"])
def test_seq2seq_n2_greedy_rows_equal_n1(zoo_engines, name):
    """Two greedy sequences through the encoder-decoder path are both the single greedy sequence."""
    engine = zoo_engines[name]
    _, (single,), (one,) = run(engine, PREFIX, SUFFIX, greedy(10))
    _, pair, results = run(engine, PREFIX, SUFFIX, greedy(10), n=2)
    assert pair == [single, single]
    assert [r.text for r in results] == [one.text, one.text]


@pytest.mark.parametrize("name", SPAN_ENTRIES + ["codet5p-2b"])
def test_seq2seq_sampling_with_n_seed_and_best_of(zoo_engines, name):
    """n=2 with a seed samples 2 reproducible choices; best_of=4 keeps the 2 most likely, re-indexed."""
    engine = zoo_engines[name]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1234)
    first = complete(engine, PREFIX, suffix=SUFFIX, params=params, n=2)
    again = complete(engine, PREFIX, suffix=SUFFIX, params=params, n=2)
    assert [r.index for r in first] == [0, 1]
    assert [(r.text, r.completion_tokens) for r in first] == [(r.text, r.completion_tokens) for r in again]
    assert all(r.finish_reason in ("stop", "length") and 1 <= r.completion_tokens <= 10 for r in first)
    seeded = dataclasses.replace(params, seed=99)
    all_four = engine.complete(engine.prepare(PREFIX, seeded, suffix=SUFFIX, n=4))
    best = engine.complete(engine.prepare(PREFIX, seeded, suffix=SUFFIX, n=2, best_of=4))
    assert [r.index for r in best] == [0, 1]
    ranked = sorted(all_four, key=lambda r: r.mean_logprob, reverse=True)[:2]
    assert [(r.text, r.completion_tokens) for r in best] == [(r.text, r.completion_tokens) for r in ranked]


# -- validation at start-up ------------------------------------------------------------


def test_template_token_missing_from_the_tokenizer_fails_at_load(zoo_entries, zoo_settings):
    """A fim template naming a token the tokenizer lacks is a ModelLoadError naming that token."""
    entry = dataclasses.replace(zoo_entries["starcoder2-3b"],
                                fim=FimTemplate("<fim_prefix>{prefix}<nope>{suffix}<fim_middle>"))
    with pytest.raises(ModelLoadError, match="<nope>") as info:
        load_engine(entry, zoo_settings)
    assert "starcoder2-3b" in str(info.value)


def test_dashed_santacoder_tokens_are_not_starcoders(zoo_entries, zoo_settings):
    """StarCoder's underscore template on SantaCoder's tokenizer (dashes) is refused at load."""
    entry = dataclasses.replace(zoo_entries["santacoder"], fim=zoo_entries["starcoderbase-1b"].fim)
    with pytest.raises(ModelLoadError, match="<fim_prefix>"):
        load_engine(entry, zoo_settings)


def _zoo_with(change) -> dict:
    raw = zoo_raw()
    change(raw["models"])
    return raw


@pytest.mark.parametrize("change, message", [
    (lambda models: models[0].update(kind="encoder"), "kind"),
    (lambda models: models[2].update(dtype="float8"), "dtype"),
    (lambda models: models[5].update(aliases=["codegen-350m-mono"]), "codegen-350m-mono"),
    (lambda models: models[1].update(name="codet5-base"), "codet5-base"),
    (lambda models: models[3].update(fim="<fim_prefix>{prefix}<fim_middle>"), "suffix"),
])
def test_bad_zoo_entries_are_config_errors(change, message):
    """Unknown kind or dtype, a name used twice, or a template without {suffix} is a ConfigError."""
    settings_from_mapping(zoo_raw())  # the zoo as shipped is valid
    with pytest.raises(ConfigError, match=message):
        settings_from_mapping(_zoo_with(change))


def test_missing_source_folder_fails_at_load(zoo_entries, zoo_settings, tmp_path):
    """An entry whose source folder does not exist is a ModelLoadError, not a hub download."""
    entry = dataclasses.replace(zoo_entries["qwen2.5-coder-1.5b"], source=str(tmp_path / "no-such-model"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_engine(entry, zoo_settings)


# -- several models in one app -------------------------------------------------------------

SERVED = ("qwen2.5-coder-1.5b", "codegen-2b-mono", "codet5p-770m")


@pytest.fixture()
def zoo_client(zoo_entries, zoo_engines, tmp_path):
    """A test client of an app serving three zoo entries (FIM causal, plain causal, seq2seq)."""
    settings = Settings(models=tuple(zoo_entries[n] for n in SERVED), device="cpu", cache_dir=tmp_path)
    app = create_app(settings, engines=[zoo_engines[n] for n in SERVED])
    return app.test_client()


@pytest.mark.parametrize("path, body_model, served", [
    ("/v1/engines/qwen-coder/completions", None, "qwen2.5-coder-1.5b"),
    ("/v1/engines/codegen-350m-mono/completions", None, "codegen-2b-mono"),
    ("/v1/completions", "codet5p-220m", "codet5p-770m"),
    ("/v1/completions", "codegen-2b-mono", "codegen-2b-mono"),
    ("/v1/completions", "qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b"),
])
def test_names_and_aliases_route_to_the_right_model(zoo_client, zoo_engines, path, body_model, served):
    """Engine paths and body models (names or aliases) reach their model; "model" is the entry's name."""
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    if body_model:
        body["model"] = body_model
    response = zoo_client.post(path, json=body)
    assert response.status_code == 200, response.get_json()
    data = response.get_json()
    assert data["model"] == served
    assert data["choices"][0]["text"] == complete(zoo_engines[served], PROMPT, params=greedy(6))[0].text
    assert data["usage"]["prompt_tokens"] == len(zoo_engines[served].prepare(PROMPT, greedy(6)).prompt_ids)


def test_model_list_shows_aliases_and_fim(zoo_client):
    """GET /v1/models lists each served entry once with its aliases and fill_in_the_middle flag."""
    response = zoo_client.get("/v1/models")
    assert response.status_code == 200
    rows = {row["id"]: row for row in response.get_json()["data"]}
    assert list(rows) == list(SERVED)
    assert rows["qwen2.5-coder-1.5b"]["aliases"] == ["qwen-coder"]
    assert rows["codegen-2b-mono"]["aliases"] == ["codegen-350m-mono"]
    assert rows["codet5p-770m"]["aliases"] == ["codet5p-220m"]
    assert {n: r["fill_in_the_middle"] for n, r in rows.items()} == {
        "qwen2.5-coder-1.5b": True, "codegen-2b-mono": False, "codet5p-770m": True}


@pytest.mark.parametrize("path, body", [
    ("/v1/engines/starcoder2-3b/completions", {"prompt": "x"}),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}),
])
def test_unknown_model_is_404_listing_every_served_name(zoo_client, path, body):
    """A name that is not served (even one in the zoo) is a 404 envelope naming all served names and aliases."""
    response = zoo_client.post(path, json=body)
    assert response.status_code == 404
    error = response.get_json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "model_not_found"
    for name in ("qwen2.5-coder-1.5b", "qwen-coder", "codegen-2b-mono", "codegen-350m-mono", "codet5p-770m",
                 "codet5p-220m"):
        assert name in error["message"]


COPILOT_STYLE = {
    "prompt": "# Path: fibonacci.py\n" + PREFIX, "suffix": SUFFIX,
    "max_tokens": 12, "temperature": 0, "top_p": 1, "n": 1,
    "stop": ["\ndef ", "\nclass ", "\nif ", "\n\n#"], "stream": True,
    "extra": {"language": "python", "next_indent": 0, "trim_by_indentation": True},
    "code_annotations": False,
}


@pytest.mark.parametrize("alias, served, fim", [("qwen-coder", "qwen2.5-coder-1.5b", True),
                                                ("codegen-350m-mono", "codegen-2b-mono", False)])
def test_copilot_body_with_suffix_on_fim_and_plain_models(zoo_client, zoo_engines, alias, served, fim):
    """Copilot's streamed body with a suffix is 200 on both; the FIM model fills in, the plain one continues."""
    response = zoo_client.post(f"/v1/engines/{alias}/completions", json=COPILOT_STYLE,
                               headers={"Openai-Organization": "github-copilot", "OpenAI-Intent": "copilot-ghost"})
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    events = [line[len("data: "):] for line in response.get_data(as_text=True).split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c and c["model"] == served for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    engine = zoo_engines[served]
    params = greedy(12, stop=tuple(COPILOT_STYLE["stop"]))
    request = engine.prepare(COPILOT_STYLE["prompt"], params, suffix=SUFFIX)
    assert request.used_fim is fim
    assert text == engine.complete(request)[0].text


def test_seq2seq_n_and_best_of_over_http(zoo_client, zoo_engines):
    """n=2 with best_of=3 and a seed on the seq2seq alias returns 2 reproducible choices from codet5p-770m."""
    body = {"model": "codet5p-220m", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8, "temperature": 1.0,
            "n": 2, "best_of": 3, "seed": 5}
    first = zoo_client.post("/v1/completions", json=body)
    again = zoo_client.post("/v1/completions", json=body)
    assert first.status_code == 200, first.get_json()
    data = first.get_json()
    assert data["model"] == "codet5p-770m"
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert data["choices"] == again.get_json()["choices"]
    request = zoo_engines["codet5p-770m"].prepare(PREFIX, SamplingParams(max_tokens=8, seed=5), suffix=SUFFIX)
    assert data["usage"]["prompt_tokens"] == len(request.prompt_ids)
    assert 0 < data["usage"]["completion_tokens"] <= 3 * 8
