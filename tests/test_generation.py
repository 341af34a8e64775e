"""End-to-end generation with the tiny random-weights Llama: determinism, streaming, caching, options."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from app.engine import Request, SamplingParams, complete
from app.engine.engine import Engine
from app.engine.errors import InvalidParameter, PromptTooLong
from app.errors import reply_for
from tests.tiny_models import FIM_TOKENS, SAMPLE_CODE

PROMPT = "x = 1"  # greedy continues it with varied tokens


def greedy(max_tokens: int = 24, **settings) -> SamplingParams:
    """Greedy sampling parameters."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **settings)


def sampled(seed: int, max_tokens: int = 10, **settings) -> SamplingParams:
    """Seeded sampling parameters at temperature 1."""
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, **settings)


def run(engine, prompt: str, params: SamplingParams, **options) -> Request:
    """Prepare one request, run it to its end with engine.complete and return it."""
    request = engine.prepare(prompt, params, **options)
    engine.complete(request)
    return request


def test_greedy_is_deterministic(engine):
    """Greedy completions of the same prompt are identical, cold or warm."""
    engine.forget()
    first = complete(engine, PROMPT, params=greedy())
    second = complete(engine, PROMPT, params=greedy())
    assert len(first) == 1 and first[0].text
    assert first[0].text == second[0].text
    assert first[0].cumulative_logprob == pytest.approx(second[0].cumulative_logprob, abs=1e-4)
    assert first[0].completion_tokens == 24 or first[0].finish_reason == "stop"


def test_cached_decode_matches_full_recompute(engine):
    """The KV-cached decode loop picks the same greedy tokens as re-running the whole sequence."""
    prompt_ids = engine.tokenizer(PROMPT)["input_ids"]
    result = complete(engine, PROMPT, params=greedy(10))[0]
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(result.completion_tokens):
            logits = engine.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
    assert result.text == engine.decode(ids[len(prompt_ids):])


def test_stream_deltas_add_up_to_the_completion(engine):
    """Concatenated streamed deltas equal the non-streamed text, and only the last has a reason."""
    deltas = list(engine.stream(engine.prepare(PROMPT, greedy())))
    assert all(d.index == 0 for d in deltas)
    assert "".join(d.text for d in deltas) == engine.complete(engine.prepare(PROMPT, greedy()))[0].text
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason in ("length", "stop")


def test_stream_with_stop_and_n_matches_results(engine):
    """Per-index streamed text equals each sequence's result when stops and n > 1 are involved."""
    request = engine.prepare(PROMPT, sampled(seed=11, max_tokens=16, stop=("e",)), n=3)
    streamed = {i: "" for i in range(3)}
    for delta in engine.stream(request):
        streamed[delta.index] += delta.text
    results = request.results()
    assert [r.index for r in results] == [0, 1, 2]
    assert [streamed[i] for i in range(3)] == [r.text for r in results]
    assert all("e" not in r.text for r in results)


LONG_PROMPT = SAMPLE_CODE * 2  # 172 tokens with the tiny tokenizer: several prefill blocks


@pytest.fixture(scope="module")
def unspeculative(engine):
    """The tiny engine without speculation, for bit-for-bit comparisons of runs.

    With float32 weights the draft widths speculation picks (by measured step times) move
    logprobs in their last bits, text unchanged; with int8 runs stay bit-identical with it
    on (test_int8_cached_requests_match_cold_and_stream, tests/test_speculative.py).
    """
    return Engine(engine.config, engine.model, engine.tokenizer, engine.device,
                  dataclasses.replace(engine.options, speculative_tokens=0))


def test_prefix_cache_gives_same_output_as_cold_run(unspeculative):
    """A warm run reusing whole cached blocks gives bit-identical logprobs and text to a cold run."""
    engine = unspeculative
    assert len(engine.tokenizer(LONG_PROMPT)["input_ids"]) > 2 * engine.runner.small_block
    engine.forget()
    complete(engine, LONG_PROMPT[:-20], params=greedy(8))
    warm_request = run(engine, LONG_PROMPT, greedy())
    warm = warm_request.results()[0]
    assert warm_request.reused > 0 and warm_request.reused % engine.runner.small_block == 0
    engine.forget()
    cold_request = run(engine, LONG_PROMPT, greedy())
    cold = cold_request.results()[0]
    assert cold_request.reused == 0
    assert warm.text == cold.text
    assert warm.cumulative_logprob == cold.cumulative_logprob


def test_same_request_twice_is_identical(unspeculative):
    """Repeating a request (which reuses its cache) gives the same text and logprobs as the first time."""
    engine = unspeculative
    engine.forget()
    first = complete(engine, LONG_PROMPT, params=greedy(logprobs=2))[0]
    second_request = run(engine, LONG_PROMPT, greedy(logprobs=2))
    second = second_request.results()[0]
    assert second_request.reused > 0
    assert second.text == first.text and second.logprobs == first.logprobs


def test_prefix_cache_shorter_prompt(unspeculative):
    """A prompt that is a prefix of the cached one (cache cropped) still matches a cold run exactly."""
    engine = unspeculative
    complete(engine, LONG_PROMPT, params=greedy(4))
    shorter = LONG_PROMPT[:-40]
    warm_request = run(engine, shorter, greedy())
    warm = warm_request.results()[0]
    assert warm_request.reused > 0
    engine.forget()
    cold = complete(engine, shorter, params=greedy())[0]
    assert (warm.text, warm.cumulative_logprob) == (cold.text, cold.cumulative_logprob)


def test_n_with_seed_is_reproducible(engine):
    """n=3 gives three sequences; the same seed repeats them, another seed changes them."""
    first = complete(engine, PROMPT, params=sampled(seed=7), n=3)
    assert [r.index for r in first] == [0, 1, 2]
    assert len({r.text for r in first}) > 1  # the sequences were sampled independently
    again = complete(engine, PROMPT, params=sampled(seed=7), n=3)
    assert [r.text for r in again] == [r.text for r in first]
    other = complete(engine, PROMPT, params=sampled(seed=8), n=3)
    assert [r.text for r in other] != [r.text for r in first]


def test_best_of_keeps_the_most_likely(engine):
    """best_of=4, n=2 returns the 2 of the 4 same-seed samples with the highest mean logprob."""
    params = sampled(seed=3)
    best = engine.complete(engine.prepare(PROMPT, params, n=2, best_of=4))
    assert [r.index for r in best] == [0, 1]
    assert best[0].mean_logprob >= best[1].mean_logprob
    all_four = complete(engine, PROMPT, params=params, n=4)
    assert len(all_four) == 4
    ranked = sorted(all_four, key=lambda r: r.mean_logprob, reverse=True)
    assert [r.text for r in best] == [r.text for r in ranked[:2]]
    assert [r.mean_logprob for r in best] == pytest.approx([r.mean_logprob for r in ranked[:2]])
    assert min(r.mean_logprob for r in best) >= max(r.mean_logprob for r in ranked[2:])


def spanning_stop(text: str, starts: list[int]) -> tuple[str, int]:
    """A stop string made of the end of one token and the start of the next, first found there."""
    bounds = [*starts, len(text)]
    for i in range(1, len(starts) - 1):
        left, right = text[bounds[i]:bounds[i + 1]], text[bounds[i + 1]:bounds[i + 2]]
        if left and right and (left + right).isprintable():
            stop = left[-2:] + right[:2]
            if text.index(stop) == bounds[i + 1] - len(left[-2:]):
                return stop, bounds[i + 1]
    pytest.fail(f"no printable token boundary in {text!r}")


def test_stop_string_spanning_tokens_cuts_before_first_occurrence(engine):
    """A stop made of the end of one generated token and the start of the next cuts the text there."""
    full = complete(engine, PROMPT, params=greedy(logprobs=0))[0]
    starts = [e.offset - len(PROMPT) for e in full.logprobs]  # where each token's text begins
    stop, boundary = spanning_stop(full.text, starts)
    first = full.text.index(stop)
    assert 0 < first < boundary < first + len(stop)  # the stop really spans the token boundary
    result = complete(engine, PROMPT, params=greedy(stop=(stop,)))[0]
    assert result.text == full.text[:first]
    assert result.finish_reason == "stop"
    assert result.completion_tokens < full.completion_tokens


def test_max_tokens_zero(engine):
    """max_tokens=0 returns empty text with finish_reason "length" and generates nothing."""
    result = complete(engine, PROMPT, params=greedy(0))
    assert [(r.text, r.finish_reason, r.completion_tokens) for r in result] == [("", "length", 0)]


def test_echo_prepends_prompt_with_prompt_logprobs(engine):
    """echo puts the prompt in front; its first token has no logprob and offsets start at 0."""
    plain = complete(engine, PROMPT, params=greedy(8, logprobs=0))[0]
    request = engine.prepare(PROMPT, greedy(8, logprobs=2), echo=True)
    result = engine.complete(request)[0]
    assert result.text == PROMPT + plain.text
    prompt_len = len(request.prompt_ids)
    assert len(result.logprobs) == prompt_len + len(plain.logprobs)
    first = result.logprobs[0]
    assert first.logprob is None and first.offset == 0 and first.top == ()
    assert [e.offset for e in result.logprobs[:prompt_len]] == \
        [len(engine.decode(request.prompt_ids[:i])) for i in range(prompt_len)]
    assert result.logprobs[prompt_len].offset == len(PROMPT)
    for entry in result.logprobs:
        if "\ufffd" not in entry.token:  # a token holding part of a character has no exact text
            assert result.text[entry.offset:].startswith(entry.token)
    for entry in result.logprobs[1:prompt_len]:
        assert entry.logprob is not None and entry.logprob < 0
        assert len(entry.top) == 2 and entry.logprob <= entry.top[0][1]


def test_logprobs_k_alternatives(engine):
    """logprobs=k reports k sorted alternatives per generated token; greedy's pick is the top one."""
    result = complete(engine, PROMPT, params=greedy(8, logprobs=3))[0]
    eos_generated = result.finish_reason == "stop"  # an eos token has no entry
    assert len(result.logprobs) == result.completion_tokens - eos_generated > 0
    for entry in result.logprobs:
        assert len(entry.top) == 3
        values = [lp for _, lp in entry.top]
        assert values == sorted(values, reverse=True)
        assert entry.top[0] == (entry.token, pytest.approx(entry.logprob))
    if not eos_generated:
        assert result.cumulative_logprob == pytest.approx(sum(e.logprob for e in result.logprobs), abs=1e-4)


def test_logprobs_none_reports_nothing(engine):
    """Without logprobs no entries are collected."""
    assert complete(engine, PROMPT, params=greedy(4))[0].logprobs == []


def reference_greedy(engine, prompt: str, steps: int, presence: float, frequency: float, bias: dict) -> list[int]:
    """Greedy decoding the slow, obvious way: full forward each step, OpenAI's penalty formula."""
    ids = engine.tokenizer(prompt)["input_ids"]
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = engine.model(input_ids=torch.tensor([ids + out])).logits[0, -1].float()
            for token, value in bias.items():
                logits[token] += value
            for token in set(out):
                logits[token] -= frequency * out.count(token) + presence
            out.append(int(logits.argmax()))
            if out[-1] in engine.preparer.eos_ids:
                break
    return out


@pytest.mark.parametrize("presence, frequency", [(2.0, 0.0), (0.0, 2.0), (-1.0, 1.5)])
def test_penalties_follow_openai_formula(engine, presence, frequency):
    """Penalised greedy tokens equal a from-scratch reference, and the penalties change a repetitive run."""
    (token,) = reference_greedy(engine, PROMPT, 1, 0.0, 0.0, {})
    bias = {token: 10.0}  # makes the unpenalised run repeat one token, so penalties have work to do
    base = reference_greedy(engine, PROMPT, 24, 0.0, 0.0, bias)
    assert base.count(token) >= 12  # precondition: repetitive
    expected = reference_greedy(engine, PROMPT, 24, presence, frequency, bias)
    params = greedy(24, presence_penalty=presence, frequency_penalty=frequency, logit_bias=tuple(bias.items()))
    engine.forget()
    result = complete(engine, PROMPT, params=params)[0]
    assert result.text == engine.decode(expected)
    assert expected != base  # the penalties changed the repetitive run


def test_logit_bias_forces_a_token(engine):
    """A +100 logit bias makes greedy repeat that token."""
    token_id = engine.tokenizer("x")["input_ids"][0]
    result = complete(engine, PROMPT, params=greedy(5, logit_bias=((token_id, 100.0),)))[0]
    assert result.text == "x" * 5


def test_prepare_rejects_context_overflow(engine, monkeypatch):
    """Without truncation, prompt + max_tokens past the 256-token context is a context_length_exceeded error."""
    options = dataclasses.replace(engine.preparer.options, truncate_prompts=False)
    monkeypatch.setattr(engine.preparer, "options", options)
    ids = engine.tokenizer(PROMPT)["input_ids"]
    engine.prepare(PROMPT, greedy(256 - len(ids)))  # exactly fits
    with pytest.raises(PromptTooLong) as info:
        engine.prepare(PROMPT, greedy(257 - len(ids)))
    assert info.value.param == "max_tokens"
    too_long = info.value
    assert (too_long.prompt_tokens, too_long.max_tokens, too_long.context_length) == (len(ids), 257 - len(ids), 256)
    envelope, status, _ = reply_for(info.value, "-")  # how the web layer answers it
    assert envelope["error"]["code"] == "context_length_exceeded"
    assert status == 400


def test_prepare_fits_a_long_prompt_to_the_window(engine, monkeypatch):
    """With truncation, a long prompt keeps its last tokens and max_tokens shrinks to the room left."""
    monkeypatch.setattr(engine.preparer, "healer", None)  # healing would hold back the last prompt token
    ids = engine.tokenizer("x " * 300)["input_ids"]
    request = engine.prepare("x " * 300, greedy(100))
    assert list(request.prompt_ids) == ids[len(ids) - 156:] and request.params.max_tokens == 100
    request = engine.prepare(PROMPT, greedy(300))  # more than the window: the prompt fits, max_tokens shrinks
    assert len(request.prompt_ids) + request.params.max_tokens == 256


@pytest.mark.parametrize("beyond", [0, 10_000, "negative"])
def test_prepare_rejects_out_of_vocabulary_bias(engine, beyond):
    """logit_bias ids outside the vocabulary are rejected with param "logit_bias"."""
    vocab_size = engine.preparer.vocab_size
    bad_id = -1 if beyond == "negative" else vocab_size + beyond
    engine.prepare(PROMPT, greedy(logit_bias=((vocab_size - 1, 1.0),)))  # the last id is fine
    with pytest.raises(InvalidParameter) as info:
        engine.prepare(PROMPT, greedy(logit_bias=((5, 1.0), (bad_id, 1.0))))
    assert info.value.param == "logit_bias"


def test_suffix_ignored_without_fim(engine):
    """A plain model completes from the prefix alone: suffix ignored, same ids as without it."""
    request = engine.prepare("def f(", greedy(logprobs=0), suffix="):\n    pass\n")  # logprobs: no healing
    assert request.used_fim is False and request.healing is None
    assert list(request.prompt_ids) == engine.tokenizer("def f(")["input_ids"]


def test_fim_prompt_layout(engines):
    """With FIM tokens the prompt is <prefix> prefix <suffix> suffix <middle>, token by token."""
    fim = engines["tiny-fim"]
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    request = fim.prepare(prefix, greedy(), suffix=suffix)
    assert request.used_fim is True
    pre, suf, mid = (fim.tokenizer.convert_tokens_to_ids(t) for t in FIM_TOKENS)
    piece = lambda text: fim.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = [pre, *piece(prefix), suf, *piece(suffix), mid]
    assert len(request.prompt_ids) == len(expected)
    for position, (got, want) in enumerate(zip(request.prompt_ids, expected)):
        assert got == want, f"token {position}: {got} != {want}"
    assert len({pre, suf, mid}) == 3 and all(i not in piece(prefix + suffix) for i in (pre, suf, mid))
    result = fim.complete(request)[0]
    assert result.completion_tokens == 24 or result.finish_reason == "stop"


def test_fim_engine_without_suffix_is_plain(engines):
    """The FIM model with no suffix encodes the prompt plainly."""
    fim = engines["tiny-fim"]
    request = fim.prepare("def f(", greedy(logprobs=0))  # logprobs: no token healing
    assert request.used_fim is False and request.healing is None
    assert list(request.prompt_ids) == fim.tokenizer("def f(")["input_ids"]


@pytest.fixture(scope="module")
def int8_engine(tiny_settings):
    """The tiny model with int8 weights (dynamic activation scales: chunking would show)."""
    from app.engine import loader

    if not loader.int8_supported():
        pytest.skip("no quantized engine in this torch build")
    return loader.load_engine(dataclasses.replace(tiny_settings.models[0], dtype="int8"), tiny_settings)


def test_int8_cached_requests_match_cold_and_stream(int8_engine):
    """With int8 weights too, a cached repeat, a cold run and a streamed run all give the same text."""
    engine = int8_engine
    engine.forget()
    cold = complete(engine, LONG_PROMPT, params=greedy(logprobs=1))[0]
    again_request = run(engine, LONG_PROMPT, greedy(logprobs=1))
    again = again_request.results()[0]
    assert again_request.reused > 0
    streamed = "".join(d.text for d in engine.stream(engine.prepare(LONG_PROMPT, greedy(logprobs=1))))
    assert again.logprobs == cold.logprobs
    assert again.text == cold.text == streamed


def test_block_bounds_layout():
    """Big blocks cover whole multiples of the big size; the tail goes in small blocks."""
    from app.engine.kvcache import block_bounds

    assert block_bounds(1) == [0, 1]
    assert block_bounds(10) == [0, 10]
    assert block_bounds(300) == [0, 256, 288, 300]
    assert block_bounds(512) == [0, 256, 512]
    assert block_bounds(100, big=64, small=16) == [0, 64, 80, 96, 100]


def run_prefill(runner, ids):
    """Feed a whole prompt through ``runner``; return the finished prefill."""
    prefill = runner.start(ids)
    while not prefill.step():
        pass
    return prefill


@pytest.mark.parametrize("lengths", [(70, 75, 140, 130, 64, 200), (30, 100, 100, 65, 129)])
def test_prefix_reuse_is_bit_identical_across_block_sizes(engine, lengths):
    """Growing, shrinking and crossing big-block bounds, a warm prefill equals a cold one bit for bit."""
    from app.engine.runners import CausalRunner
    from app.engine.kvcache import PrefixCache

    ids = engine.tokenizer(SAMPLE_CODE * 3)["input_ids"]
    warm = CausalRunner(engine.model, engine.device, PrefixCache(2**30), big_block=64, small_block=16)
    reused_any = False
    with torch.inference_mode():
        for length in lengths:
            got = run_prefill(warm, ids[:length])
            reused_any |= got.reused > 0
            cold = run_prefill(CausalRunner(engine.model, engine.device, big_block=64, small_block=16), ids[:length])
            assert torch.equal(got.logits, cold.logits), f"prompt of {length} tokens"
            assert got.cache.get_seq_length() == length
    assert reused_any
