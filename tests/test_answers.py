"""The answer cache: an identical deterministic request is answered again without the model, exactly."""
from __future__ import annotations

import dataclasses

import pytest

from app.engine import SamplingParams
from app.engine.engine import Engine
from config import EngineOptions

PROMPT = "def fibonacci(n):\n"


@pytest.fixture(scope="module")
def cached(engine) -> Engine:
    """The tiny model in an engine of its own with the answer cache on (4 answers)."""
    return Engine(engine.config, engine.model, engine.tokenizer, engine.device, EngineOptions(answer_cache=4))


def run(engine: Engine, params: SamplingParams, prompt: str = PROMPT, **options):
    """Prepare and run one request; return it with the deltas it streamed."""
    request = engine.prepare(prompt, params, **options)
    return request, list(engine.stream(request))


def test_identical_greedy_request_is_answered_again_exactly(cached):
    """The repeat streams the same deltas and gives the same results, without reaching the scheduler."""
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2)
    first, first_deltas = run(cached, params)
    hits = cached.stats().answer_hits
    again, again_deltas = run(cached, params)
    assert cached.stats().answer_hits == hits + 1
    assert again.timings.submitted == 0.0 and again.reused == 0  # never queued
    assert again_deltas == first_deltas
    assert again.results() == first.results() and again.completion_tokens == first.completion_tokens > 0


def test_a_seeded_sample_is_answered_again_an_unseeded_one_is_not(cached):
    """Seeded sampling repeats itself (n and best_of included); unseeded sampling must vary, so it runs again."""
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=5)
    first, _ = run(cached, seeded, n=2, best_of=3)
    hits = cached.stats().answer_hits
    again, _ = run(cached, seeded, n=2, best_of=3)
    assert cached.stats().answer_hits == hits + 1 and again.results() == first.results()
    unseeded = SamplingParams(max_tokens=8, temperature=1.0)
    run(cached, unseeded)
    run(cached, unseeded)
    assert cached.stats().answer_hits == hits + 1


@pytest.mark.parametrize("change", [{"echo": True}, {"params": {"time_budget_ms": 5000}}])
def test_echo_and_timed_requests_are_not_kept(cached, change):
    """An echoed prompt or a time budget (whose end depends on the clock) always runs."""
    params = SamplingParams(max_tokens=4, temperature=0.0, **change.get("params", {}))
    options = {key: value for key, value in change.items() if key != "params"}
    run(cached, params, prompt="x = 2", **options)
    hits = cached.stats().answer_hits
    run(cached, params, prompt="x = 2", **options)
    assert cached.stats().answer_hits == hits


def test_an_abandoned_request_is_not_kept(cached):
    """A request whose reader stopped early left no answer: the same request runs in full next time."""
    params = SamplingParams(max_tokens=30, temperature=0.0, logit_bias=((0, -100.0), (1, -100.0), (2, -100.0)))
    request = cached.prepare("y = 3", params)
    deltas = cached.stream(request)
    next(deltas)
    deltas.close()
    hits = cached.stats().answer_hits
    whole, _ = run(cached, params, prompt="y = 3")
    assert cached.stats().answer_hits == hits and whole.completion_tokens == 30


def test_the_cache_keeps_only_the_most_recent_answers(cached):
    """Past its size the least recently used answer goes; forget() empties it."""
    cached.forget()
    params = SamplingParams(max_tokens=2, temperature=0.0)
    for number in range(5):  # one more than the cache holds
        run(cached, params, prompt=f"v{number} = ")
    hits = cached.stats().answer_hits
    run(cached, params, prompt="v4 = ")
    run(cached, params, prompt="v0 = ")  # evicted: runs again
    assert cached.stats().answer_hits == hits + 1
    cached.forget()
    run(cached, params, prompt="v4 = ")
    assert cached.stats().answer_hits == hits + 1


def test_http_repeat_gets_the_same_completion(tiny_settings, engines):
    """Through the API, a repeated greedy request gets the same choices and usage (its own id)."""
    from app import create_app

    settings = dataclasses.replace(tiny_settings, answer_cache=8)
    engine = engines["tiny"]
    fresh = Engine(engine.config, engine.model, engine.tokenizer, engine.device, settings.engine)
    client = create_app(settings, engines=[fresh]).test_client()
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    first, again = client.post("/v1/completions", json=body).get_json(), client.post("/v1/completions", json=body).get_json()
    assert again["choices"] == first["choices"] and again["usage"] == first["usage"]
    assert fresh.stats().answer_hits == 1
