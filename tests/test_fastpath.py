"""FastDecoder.step against Hugging Face's forward: logits, cache writes, greedy text, refusals, compile fallback."""
from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from transformers import (AutoModelForCausalLM, DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from app.engine import fastpath
from app.engine.fastpath import FastDecoder

WEIGHTS = ("float32", "int8", "ao-int8")
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def quantize_ao(model: torch.nn.Module) -> torch.nn.Module:
    """torch.ao's dynamic int8 Linears with a scale per output channel (the loader's original int8 format)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)


def with_weights(model: torch.nn.Module, weights: str) -> torch.nn.Module:
    """``model`` (float32) in ``weights``: as is, the loader's int8, or torch.ao dynamic int8."""
    from app.engine.loader import quantize_int8

    model.eval()
    if weights == "int8":
        return quantize_int8(model)
    return quantize_ao(model) if weights == "ao-int8" else model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second torch thread only waits (2 threads measured 4.4 ms per tiny step, 1 thread 0.3 ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=WEIGHTS)
def llama(request, tiny_model_dir):
    """The tiny test Llama in each weight format."""
    return with_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), request.param)


def random_model(config) -> torch.nn.Module:
    """A float32 model of ``config`` with weights large enough for decisive logits."""
    torch.manual_seed(0)
    model = (Qwen2ForCausalLM if isinstance(config, Qwen2Config) else LlamaForCausalLM)(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
    return model


def left_padded(lengths: list[int], width: int) -> torch.Tensor:
    """Bool mask [rows, width] with each row's real tokens at its right end."""
    columns = torch.arange(width)
    return columns >= width - torch.tensor(lengths)[:, None]


def positions_of(mask: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Rotary positions of left-padded rows: count of real tokens before each column (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0) + start


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
    """(HF's cache after the prompt, its last logits)."""
    cache = DynamicCache(config=model.config)
    logits = model(ids, attention_mask=mask.long(), position_ids=positions, cache=cache, use_cache=True).logits
    return cache, logits[:, -1]


def buffers(cache: DynamicCache, room: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) buffers holding the cache and ``room`` NaN columns after it (never to be read)."""
    result = []
    for layer in cache.layers:
        rows, heads, length, dim = layer.keys.shape
        keys, values = (torch.full((rows, heads, length + room, dim), float("nan")) for _ in range(2))
        keys[:, :, :length], values[:, :, :length] = layer.keys, layer.values
        result.append((keys, values))
    return result


def views(layers, length: int):
    """The first ``length`` columns of every buffer: what a caller passes to step."""
    return [(keys[:, :, :length], values[:, :, :length]) for keys, values in layers]


def compare_step(model, decoder: FastDecoder, q: int, lengths: list[int], start: int = 0, masked: bool = True):
    """Prefill left-padded rows with HF, then q new tokens per row through HF and through decoder.step."""
    rows, width = len(lengths), max(lengths)
    generator = torch.Generator().manual_seed(q)
    ids = torch.randint(0, model.config.vocab_size, (rows, width), generator=generator)
    mask = left_padded(lengths, width)
    positions = positions_of(mask, start)
    with torch.inference_mode():
        cache, _ = prefill(model, ids, mask, positions)
        layers = buffers(cache, q + 3)
        new = torch.randint(0, model.config.vocab_size, (rows, q), generator=generator)
        new_positions = positions[:, -1:] + 1 + torch.arange(q)
        full = torch.cat([mask, torch.ones(rows, q, dtype=torch.bool)], dim=1)
        reference = copy.deepcopy(cache)
        expected = model(new, attention_mask=full.long() if masked else None, position_ids=new_positions,
                         cache=reference).logits
        got = decoder.step(new, new_positions, views(layers, width + q), full if masked else None)
    return got, expected, layers, reference, width


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 1e-4 of the largest logit, and the same greedy choices."""
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


# -- logits and cache writes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("q", [1, 4])
def test_step_logits_equal_hf_for_left_padded_rows(llama, q, fuse):
    """Rows of different lengths, left-padded, with their own positions: HF's logits for 1 and 4 new tokens."""
    decoder = FastDecoder.for_model(llama, fuse=fuse)
    got, expected, _, _, _ = compare_step(llama, decoder, q, [7, 4, 2])
    assert_close(got, expected)
    if not fuse or decoder.kinds == ["float"]:
        assert not decoder.fused


@pytest.mark.parametrize("q", [1, 4])
def test_step_without_mask_equals_hf_without_mask(llama, q):
    """mask=None (every cached column visible) matches HF given no attention mask."""
    got, expected, _, _, _ = compare_step(llama, FastDecoder.for_model(llama), q, [6, 6], masked=False)
    assert_close(got, expected)


@pytest.mark.parametrize("q", [1, 4])
def test_new_keys_values_are_written_in_place_as_hf_caches_them(llama, q):
    """The last q columns of the caller's buffers get HF's rotated keys and values; nothing else changes."""
    decoder = FastDecoder.for_model(llama)
    _, _, layers, reference, width = compare_step(llama, decoder, q, [5, 3])
    for (keys, values), layer in zip(layers, reference.layers):
        torch.testing.assert_close(keys[:, :, width:width + q], layer.keys[:, :, width:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(values[:, :, width:width + q], layer.values[:, :, width:], rtol=1e-5, atol=1e-6)
        assert torch.equal(keys[:, :, :width], layer.keys[:, :, :width])  # the cached columns are untouched
        assert keys[:, :, width + q:].isnan().all() and values[:, :, width + q:].isnan().all()


@pytest.mark.parametrize("weights", ["int8", "ao-int8"])
def test_int8_logits_are_exactly_hf(tiny_model_dir, weights):
    """Both int8 formats, fused or not, compute each product bit for bit as the modules do, so the logits are HF's."""
    model = with_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), weights)
    for fuse in (True, False):
        decoder = FastDecoder.for_model(model, fuse=fuse)
        assert decoder.fused == fuse and decoder.kinds != ["float"]
        assert (decoder.fused_bytes > 0) == fuse
        got, expected, _, _, _ = compare_step(model, decoder, 4, [6, 2, 4])
        assert torch.equal(got, expected)


def test_positions_beyond_the_rotary_table_grow_it(tiny_model_dir):
    """Positions past the precomputed rotary table grow it, with HF's values."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    decoder = FastDecoder.for_model(model)
    size = decoder.rotary.table.shape[0]
    got, expected, _, _, _ = compare_step(model, decoder, 2, [4, 3], start=size + 40)
    assert_close(got, expected)
    assert decoder.rotary.table.shape[0] >= size + 48


def test_wrong_number_of_layers_is_refused(tiny_model_dir):
    """A layers list of the wrong length is a ValueError, not a silent partial step."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    decoder = FastDecoder.for_model(model)
    with pytest.raises(ValueError, match="layers"):
        decoder.step(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), [], None)


# -- greedy text -----------------------------------------------------------------------------------------------


def greedy(model, decoder: FastDecoder, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy tokens per row: HF fills the prompt's cache, FastDecoder.step does every token after."""
    rows, width = ids.shape
    positions = positions_of(mask)
    with torch.inference_mode():
        cache, logits = prefill(model, ids, mask, positions)
        layers = buffers(cache, steps)
        full = torch.cat([mask, torch.ones(rows, steps, dtype=torch.bool)], dim=1)
        position, tokens = positions[:, -1:] + 1, []
        for step in range(steps):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            length = width + step + 1
            logits = decoder.step(token, position, views(layers, length), full[:, :length])[:, -1]
            position = position + 1
    return torch.cat(tokens, dim=1)


def test_greedy_continuation_equals_generate(llama, tiny_model_dir):
    """20 greedy tokens through FastDecoder.step are generate(do_sample=False)'s."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = torch.tensor([tokenizer("def fibonacci(n):\n    ")["input_ids"]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.inference_mode():
        expected = llama.generate(ids, attention_mask=mask.long(), max_new_tokens=20, min_new_tokens=20,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    assert expected.shape[1] == 20
    assert torch.equal(greedy(llama, FastDecoder.for_model(llama), ids, mask, 20), expected)


def test_greedy_left_padded_batch_equals_generate(llama):
    """A left-padded batch of two prompts decodes greedily to generate's tokens, row by row."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, llama.config.vocab_size, (2, 9), generator=generator)
    mask = left_padded([9, 5], 9)
    ids = ids.masked_fill(~mask, 0)
    with torch.inference_mode():
        expected = llama.generate(ids, attention_mask=mask.long(), max_new_tokens=20, min_new_tokens=20,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)[:, 9:]
    assert torch.equal(greedy(llama, FastDecoder.for_model(llama), ids, mask, 20), expected)


# -- other supported variants ------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [1, 3])
def test_qwen2_with_qkv_biases(q):
    """Qwen2 (biases on q, k and v), float32 and int8, matches HF."""
    model = random_model(Qwen2Config(**TINY))
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.bias.normal_(0, 1.0)
    for weights in ("float32", "ao-int8"):
        model = with_weights(model, weights)
        got, expected, _, _, _ = compare_step(model, FastDecoder.for_model(model), q, [6, 3])
        assert_close(got, expected)


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 1e6},
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 500000.0},
    {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0},
])
def test_static_rotary_variants(rope):
    """Rotary variants with fixed frequencies (and Llama's optional biases) match HF."""
    model = random_model(LlamaConfig(**TINY, rope_parameters=rope, attention_bias=True, mlp_bias=True))
    got, expected, _, _, _ = compare_step(model, FastDecoder.for_model(model), 2, [5, 2], start=30)
    assert_close(got, expected)


# -- refusals --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, reason", [
    (lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=96)), "architecture"),
    (lambda: random_model(LlamaConfig(**TINY, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                              "rope_theta": 10000.0})), "rotary"),
    (lambda: random_model(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=8, max_window_layers=0)),
     "sliding"),
    (lambda: random_model(LlamaConfig(**TINY, hidden_act="gelu")), "activation"),
])
def test_unsupported_models_give_none_and_a_debug_reason(model, reason, caplog):
    """Other architectures, dynamic rotary, sliding windows and other activations: None, reason at debug."""
    with caplog.at_level(logging.DEBUG, logger="app.engine.fastpath"):
        assert FastDecoder.for_model(model()) is None
    assert any(reason in record.getMessage() and record.levelno == logging.DEBUG for record in caplog.records)


def test_products_that_differ_from_the_modules_are_refused(tiny_model_dir, monkeypatch, caplog):
    """The construction check refuses Linears the step would compute differently from the modules."""
    model = with_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), "ao-int8")
    real = fastpath._LINEAR_DYNAMIC
    monkeypatch.setattr(fastpath, "_LINEAR_DYNAMIC", lambda x, packed, reduce_range: real(x, packed, reduce_range) * 2)
    with caplog.at_level(logging.WARNING, logger="app.engine.fastpath"):
        assert FastDecoder.for_model(model) is None
    assert "differ" in caplog.text


# -- torch.compile ---------------------------------------------------------------------------------------------


def float_llama(tiny_model_dir) -> torch.nn.Module:
    """The tiny test Llama in float32."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_compile_failure_falls_back_to_eager(tiny_model_dir, monkeypatch, caplog):
    """torch.compile raising at setup leaves a working eager step and a warning."""
    model = float_llama(tiny_model_dir)

    def broken(*args, **kwargs):
        """torch.compile that cannot compile anything."""
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="app.engine.fastpath"):
        decoder = FastDecoder.for_model(model, compile=True)
    assert decoder is not None and "no compiler here" in caplog.text
    got, expected, _, _, _ = compare_step(model, decoder, 1, [4, 2])
    assert_close(got, expected)


def test_compiled_step_that_raises_runs_eager_and_warns_once(tiny_model_dir, monkeypatch, caplog):
    """A compiled step raising at its first call is answered eagerly, warned once and never retried."""
    model = float_llama(tiny_model_dir)
    calls = []

    def compiled_badly(fn, **kwargs):
        """torch.compile whose compiled function fails when called."""
        def run(*args):
            """The failing compiled function."""
            calls.append(kwargs)
            raise RuntimeError("inductor failed")
        return run
    monkeypatch.setattr(torch, "compile", compiled_badly)
    decoder = FastDecoder.for_model(model, compile=True)
    with caplog.at_level(logging.WARNING, logger="app.engine.fastpath"):
        for q in (1, 3):
            got, expected, _, _, _ = compare_step(model, decoder, q, [4, 2])
            assert_close(got, expected)
    assert calls == [{"mode": None}]  # CPU: default mode, and never tried again after failing
    assert sum("inductor failed" in record.getMessage() for record in caplog.records) == 1


def test_caller_errors_under_compile_raise_and_keep_compile_on(tiny_model_dir, monkeypatch):
    """An error the eager step raises too is the caller's: it propagates and compile stays on."""
    model = float_llama(tiny_model_dir)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # "compiled" is the eager function itself
    decoder = FastDecoder.for_model(model, compile=True)
    layers = [(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16)) for _ in range(2)]
    with pytest.raises(RuntimeError):  # 5 new tokens in a cache of 3 columns
        decoder.step(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long), layers)
    assert decoder._run == decoder._run_compiled


def test_compile_is_refused_for_int8(tiny_model_dir, monkeypatch, caplog):
    """Int8 Linears are never handed to torch.compile; the eager step answers."""
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: pytest.fail("compiled an int8 model"))
    for weights in ("int8", "ao-int8"):
        model = with_weights(float_llama(tiny_model_dir), weights)
        with caplog.at_level(logging.INFO, logger="app.engine.fastpath"):
            decoder = FastDecoder.for_model(model, compile=True)
        assert decoder is not None and not decoder.compile()
        assert "refused" in caplog.text
        got, expected, _, _, _ = compare_step(model, decoder, 1, [3])
        assert_close(got, expected)


@pytest.mark.slow
def test_compiled_step_equals_hf(tiny_model_dir):
    """A real torch.compile on the CPU (tens of seconds)."""
    model = float_llama(tiny_model_dir)
    decoder = FastDecoder.for_model(model, compile=True)
    for q, lengths in ((1, [4, 2]), (1, [5, 2]), (2, [6, 2])):
        got, expected, _, _, _ = compare_step(model, decoder, q, lengths)
        assert_close(got, expected)
    assert decoder._run == decoder._run_compiled  # no fallback happened
