"""Speculative decoding from the prompt: drafts, their verification, and output equal to plain greedy decoding."""
from __future__ import annotations

import pytest

from app.engine import SamplingParams
from app.engine.loader import load_engine
from app.engine.speculative import PromptLookup, StepCosts, ngram_index, verify
from tests.test_scheduler import PROMPTS, greedy, no_eos, run_together
from tests.tiny_models import MORE_CODE, SAMPLE_CODE

# Code that repeats itself, as completions often do: drafts find what follows.
REPEATING = SAMPLE_CODE + SAMPLE_CODE[:200]
# The tiny model's (random) greedy answer to it soon repeats itself: its drafts are accepted.
COPIED = MORE_CODE + MORE_CODE[:150]


def lookup(ids, max_tokens=4):
    """A drafter over ``ids``, as the preparer builds one."""
    return PromptLookup(ids, ngram_index(ids[:-1]), max_tokens)


def test_draft_continues_the_last_earlier_occurrence_of_the_longest_ngram():
    drafter = lookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3], max_tokens=8)
    drafter.length = 3
    # "1 2 3" occurred at the start; "2 3" also later, but the longest match wins.
    assert drafter.draft() == [4, 5, 9]
    drafter.push(4)
    assert drafter.draft() == [5, 9, 2]


def test_draft_is_empty_without_a_match_and_generated_tokens_are_looked_up_too():
    drafter = lookup([10, 11, 12])
    assert drafter.draft() == []
    for token in (20, 21, 22, 20):
        drafter.push(token)
    assert drafter.draft()[:2] == [21, 22]


def test_draft_length_adapts_to_acceptance():
    drafter = lookup([1, 2, 1], max_tokens=8)
    assert drafter.length == 4
    drafter.record(4, 4)
    assert drafter.length == 6
    drafter.record(6, 6)
    drafter.record(8, 8)
    assert drafter.length == 8  # never beyond the setting
    drafter.record(8, 1)
    assert drafter.length == 2
    drafter.record(2, 0)
    assert drafter.length == 1


def test_a_sequence_whose_drafts_keep_failing_pauses_then_drafts_again():
    drafter = lookup([1, 2, 3, 1, 2], max_tokens=4)
    assert drafter.draft()
    for _ in range(5):
        drafter.record(1, 0)
    assert drafter.paused and drafter.draft() == []
    for _ in range(drafter.paused):
        drafter.push(1)
        drafter.push(2)
    assert not drafter.paused and drafter.draft()


def test_drafts_are_fed_as_far_as_they_pay_for_the_batch():
    costs = StepCosts()
    drafts, rates = [[7, 8, 9, 10]], [0.9]
    assert costs.best_width(drafts, rates) == 1  # nothing measured: a plain step first
    costs.observe(1, 1, 0.030)
    assert costs.best_width(drafts, rates) == 5  # wider steps not measured yet: tried
    for width, seconds in ((2, 0.031), (3, 0.031), (4, 0.032), (5, 0.032)):
        costs.observe(1, width, seconds)
    assert costs.best_width(drafts, rates) == 5  # one row: a wider step costs little
    assert costs.best_width(drafts, [0.01]) == 1  # drafts that are almost never accepted are not fed
    eight = [[7, 8, 9, 10]] * 2 + [[]] * 6
    for width, seconds in ((1, 0.070), (2, 0.210), (3, 0.300), (4, 0.350), (5, 0.400)):
        costs.observe(8, width, seconds)
    assert costs.best_width(eight, [0.9] * 2 + [0.0] * 6) == 1  # eight rows: three times the time for 1.8 tokens
    cheap = StepCosts()  # a machine where a second token per row costs little
    for width, seconds in ((1, 0.070), (2, 0.075), (3, 0.3), (4, 0.35), (5, 0.4)):
        cheap.observe(8, width, seconds)
    assert cheap.best_width(eight, [0.9] * 2 + [0.0] * 6) == 2


def test_verify_accepts_the_agreeing_prefix_then_the_models_own_token():
    assert verify([5, 6, 7], [5, 6, 9, 4]).tokens == [5, 6, 9]
    assert verify([5, 6, 7], [5, 6, 7, 4]).tokens == [5, 6, 7, 4]  # all taken, and the token after them
    assert verify([], [3, 1, 1]).tokens == [3]
    verdict = verify([5, 6], [8, 6, 1])
    assert verdict.tokens == [8] and verdict.positions == [0] and verdict.kept_columns == 1


@pytest.fixture(scope="module")
def plain_engine(tiny_settings):
    """The tiny model with speculation off: the reference."""
    return load_engine(tiny_settings.models[0], tiny_settings.replace(speculative_tokens=0))


class FlatCosts(StepCosts):
    """Step costs that never change with the tokens fed: every draft is fed whole, whatever the timings."""

    def observe(self, rows: int, width: int, seconds: float) -> None:
        self.seconds[rows, width] = 1.0

    def estimate(self, rows: int, width: int) -> float:
        return 1.0


@pytest.fixture(scope="module")
def spec_engine(tiny_settings):
    """The tiny model with speculation on, drafts always fed (tests must not depend on this machine's timings)."""
    engine = load_engine(tiny_settings.models[0], tiny_settings.replace(speculative_tokens=6))
    engine.scheduler.step_costs = FlatCosts()
    return engine


def outcome(results):
    """What a client sees of a request's results."""
    return [(r.index, r.text, r.finish_reason, r.completion_tokens) for r in results]


def test_speculative_greedy_equals_plain_greedy_alone_and_batched(plain_engine, spec_engine):
    """Token for token the same answers, with logprobs, stops and max_tokens, one at a time and in one batch."""
    prompts = [*PROMPTS, REPEATING, COPIED]
    def requests(engine):
        """The same mix of requests for either engine."""
        mix = [engine.prepare(p, no_eos(engine, 40, logprobs=2)) for p in prompts]
        mix.append(engine.prepare(REPEATING, greedy(40, stop=("return",))))
        mix.append(engine.prepare(SAMPLE_CODE, greedy(30), n=2))
        return mix

    expected = []
    for request in requests(plain_engine):
        plain_engine.forget()
        expected.append(plain_engine.complete(request))
    before = spec_engine.scheduler.drafts.accepted
    alone = []
    for request in requests(spec_engine):
        spec_engine.forget()
        alone.append(spec_engine.complete(request))
    spec_engine.forget()
    together = run_together(spec_engine, requests(spec_engine))
    assert spec_engine.scheduler.drafts.accepted > before  # the drafts were used, not just made
    for want, got_alone, got_together in zip(expected, alone, together):
        assert outcome(got_alone) == outcome(want)
        assert outcome(got_together) == outcome(want)
        for w, g in zip(want, got_together):
            assert [e.token for e in g.logprobs] == [e.token for e in w.logprobs]
            assert [e.offset for e in g.logprobs] == [e.offset for e in w.logprobs]
            assert [e.logprob for e in g.logprobs] == pytest.approx([e.logprob for e in w.logprobs], abs=1e-3)
            assert [[t for t, _ in e.top] for e in g.logprobs] == [[t for t, _ in e.top] for e in w.logprobs]


def test_sampled_requests_beside_drafting_ones_keep_their_seeded_output(plain_engine, spec_engine):
    """A seeded sampled request draws exactly as without speculation, even in a batch whose other rows verify drafts."""
    def requests(engine):
        """A drafting greedy request and a seeded sampled one."""
        return [engine.prepare(REPEATING, no_eos(engine, 30)),
                engine.prepare(PROMPTS[1], SamplingParams(max_tokens=20, temperature=0.9, seed=11), n=2)]

    plain_engine.forget()
    want = run_together(plain_engine, requests(plain_engine))
    spec_engine.forget()
    got = run_together(spec_engine, requests(spec_engine))
    assert [outcome(r) for r in got] == [outcome(r) for r in want]


def test_streamed_deltas_may_carry_several_tokens_and_add_up_to_the_answer(spec_engine):
    request = spec_engine.prepare(COPIED, no_eos(spec_engine, 40, logprobs=1))
    spec_engine.forget()
    deltas = list(spec_engine.stream(request))
    assert "".join(d.text for d in deltas) == request.results()[0].text
    assert sum(len(d.logprobs) for d in deltas) == 40
    assert deltas[-1].finish_reason == "length"
    assert request.draft_stats.accepted > 0
    assert any(len(d.logprobs) > 1 for d in deltas)


def test_penalties_and_sampling_do_not_speculate(spec_engine):
    penalised = spec_engine.prepare(REPEATING, greedy(10, presence_penalty=0.5))
    sampled = spec_engine.prepare(REPEATING, SamplingParams(max_tokens=10, temperature=0.7, seed=1))
    assert penalised.drafters is None and sampled.drafters is None
    assert spec_engine.prepare(REPEATING, greedy(10)).drafters is not None


def test_the_lean_decode_step_answers_as_the_models_own_forward(tiny_settings, spec_engine):
    """decode_step = "hf" (transformers' forward, the reference) and the default lean step agree, drafts and all."""
    reference = load_engine(tiny_settings.models[0], tiny_settings.replace(speculative_tokens=6, decode_step="hf"))
    reference.scheduler.step_costs = FlatCosts()
    assert reference.runner.batch.fast is None and spec_engine.runner.batch.fast is not None
    def requests(engine):
        """Greedy, drafting, with logprobs, several at once."""
        return [engine.prepare(p, no_eos(engine, 30, logprobs=1)) for p in (COPIED, REPEATING, PROMPTS[1])]

    reference.forget()
    want = run_together(reference, requests(reference))
    spec_engine.forget()
    got = run_together(spec_engine, requests(spec_engine))
    assert [outcome(r) for r in got] == [outcome(r) for r in want]


def test_a_lone_sequence_keeps_no_rejected_columns(spec_engine, monkeypatch):
    """Columns of drafts that no row accepted are cut off: a lone sequence's cache is plain decoding's."""
    batch = spec_engine.runner.batch
    lengths = []
    real_accept = batch.accept

    def accept(columns, width):
        real_accept(columns, width)
        lengths.append((batch.mask.shape[1], int(batch.mask.sum()), batch.cache.layers[0].keys.shape[2]))

    monkeypatch.setattr(batch, "accept", accept)
    spec_engine.forget()
    spec_engine.complete(spec_engine.prepare(REPEATING, no_eos(spec_engine, 30)))
    assert lengths
    assert all(columns == visible == keys for columns, visible, keys in lengths)


def real_code_prompts(count: int) -> list[str]:
    """Prompts cut from standard-library files just after a function's first line, with 60 lines above."""
    import difflib
    import inspect
    import textwrap

    prompts = []
    for module in (textwrap, difflib):
        lines = inspect.getsource(module).splitlines(keepends=True)
        starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("def ") and i > 60]
        prompts += ["".join(lines[i - 60:i + 1]) for i in starts[::max(1, len(starts) // count)][:count // 2]]
    return prompts


@pytest.mark.slow
def test_real_default_model_speculative_greedy_equals_plain_greedy():
    """The default model, in its int8 format, answers real code prompts token for token alike with speculation
    on and off (int8 rounding turns any change of computation order into another answer: this checks the order)."""
    from config import load_settings

    settings = load_settings({}).replace(answer_cache=0)
    plain = load_engine(settings.models[0], settings.replace(speculative_tokens=0))
    spec = load_engine(settings.models[0], settings.replace(speculative_tokens=8))
    spec.scheduler.step_costs = FlatCosts()
    for prompt in real_code_prompts(6):
        want = plain.complete(plain.prepare(prompt, no_eos(plain, 48)))
        got = spec.complete(spec.prepare(prompt, no_eos(spec, 48)))
        assert outcome(got) == outcome(want)
    assert spec.scheduler.drafts.accepted > 0
