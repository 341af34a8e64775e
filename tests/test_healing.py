"""Token healing: the prompt's last token is re-chosen by the model, and the client sees a pure continuation."""
from __future__ import annotations

import pytest

from app.engine import SamplingParams, complete
from app.engine.healing import TokenHealer
from config import EngineOptions


def greedy(max_tokens: int = 12, **settings) -> SamplingParams:
    """Greedy sampling parameters."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **settings)


def _prompt_with_extensible_last_token(engine) -> str:
    """A prompt whose last token is a prefix of longer vocabulary tokens (so healing applies)."""
    for prompt in ("def fibonacci(n):\n", "x = 1\n", "import os\n", "class Greeter:\n    def"):
        ids = engine.tokenizer(prompt)["input_ids"]
        if len(engine.preparer.healer.extensions(ids[-1])) > 1:
            return prompt
    pytest.fail("no candidate prompt ends in an extensible token")


def test_extensions_are_tokens_starting_with_the_last_token(engine):
    """extensions() lists exactly the non-special tokens whose raw text starts with the token's raw text."""
    healer = engine.preparer.healer
    newline = engine.tokenizer("\n")["input_ids"][-1]
    raw = healer.tokens[newline]
    found = healer.extensions(newline)
    assert newline in found
    expected = [i for i, t in enumerate(healer.tokens) if t.startswith(raw) and i not in healer.special]
    assert list(found) == expected


def test_heal_removes_last_token_and_remembers_its_text(engine):
    """heal() drops the last token, keeps the rest, and records the text it stood for."""
    prompt = _prompt_with_extensible_last_token(engine)
    ids = engine.tokenizer(prompt)["input_ids"]
    healed, healing = engine.preparer.healer.heal(ids)
    assert healed == ids[:-1]
    assert engine.decode(healed) + healing.text == engine.decode(ids) == prompt
    assert ids[-1] in healing.allowed


def test_heal_leaves_special_and_unextendable_tokens(engine):
    """A prompt ending in a special token, or a one-token prompt, is not healed."""
    eos = engine.tokenizer.eos_token_id
    ids = engine.tokenizer("x = 1")["input_ids"] + [eos]
    assert engine.preparer.healer.heal(ids) == (ids, None)
    single = engine.tokenizer("x")["input_ids"][:1]
    assert engine.preparer.healer.heal(single) == (single, None)


def test_healed_completion_continues_the_prompt(engine):
    """With healing, text is a continuation of the prompt: prompt + text re-tokenizes to what the model chose."""
    prompt = _prompt_with_extensible_last_token(engine)
    request = engine.prepare(prompt, greedy())
    assert request.healing is not None and request.prompt_tokens == len(request.prompt_ids) + 1
    result = engine.complete(request)[0]
    generated = request.prompt_ids + tuple(generated_ids(engine, request))
    assert engine.decode(generated) == prompt + result.text
    assert result.completion_tokens >= 1


def generated_ids(engine, request) -> list[int]:
    """The token ids the run of ``request`` generated (eos excluded)."""
    return [t for t in request.sequences[0].token_ids if t not in engine.preparer.eos_ids]


def test_first_token_is_restricted_to_extensions(engine):
    """The first generated token is always one whose text extends the removed token."""
    prompt = _prompt_with_extensible_last_token(engine)
    for seed in range(5):
        request = engine.prepare(prompt, SamplingParams(max_tokens=3, temperature=1.5, seed=seed))
        for _ in engine.stream(request):
            pass
        assert request.sequences[0].token_ids[0] in request.healing.allowed


def test_stream_and_whole_agree_with_healing(engine):
    """Streaming deltas and the whole result are identical when healing applies."""
    prompt = _prompt_with_extensible_last_token(engine)
    whole = complete(engine, prompt, params=greedy(16))[0].text
    engine.forget()
    streamed = "".join(d.text for d in engine.stream(engine.prepare(prompt, greedy(16))))
    assert streamed == whole


def test_no_healing_with_logprobs_echo_or_disabled(engine, tiny_settings):
    """Logprobs and echo show real prompt tokens, so healing is off for them; the setting turns it off."""
    prompt = _prompt_with_extensible_last_token(engine)
    assert engine.prepare(prompt, greedy(logprobs=1)).healing is None
    assert engine.prepare(prompt, greedy(), echo=True).healing is None
    plain = TokenHealer(engine.tokenizer, engine.decode)
    assert plain.heal(engine.tokenizer(prompt)["input_ids"])[1] is not None
    from app.engine.engine import Engine

    off = Engine(engine.config, engine.model, engine.tokenizer, engine.device, EngineOptions(token_healing=False))
    assert off.prepare(prompt, greedy()).healing is None
