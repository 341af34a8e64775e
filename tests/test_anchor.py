"""Anchoring moved prompts on cached ones: the rewrite rule, and the engine reusing a slid window's cache."""
from __future__ import annotations

import dataclasses

import pytest

from app.engine import Engine, SamplingParams
from app.engine.anchor import anchor_offsets, anchored_start, realign, slid_seam
from tests.tiny_models import SAMPLE_CODE

HEAD = list(range(1000, 1030))  # a fixed head, like FauxPilot's first 31 lines
LINES = [list(range(i * 10, i * 10 + 10)) for i in range(300)]  # distinct 10-token "lines"


def window(first: int, last: int, head: list[int] = HEAD) -> list[int]:
    """BOS, the head, then lines first..last-1: one editor prompt."""
    return [1, *head, *sum(LINES[first:last], [])]


def test_slid_window_reuses_the_whole_cached_prompt():
    """One line in at the cursor, one out at the top: the line that left is restored, the cache covers the rest."""
    cached, new = window(10, 130), window(11, 131)
    result = realign([cached], new, budget=4000, limit=512)
    assert result is not None
    assert result.ids[:len(cached)] == tuple(cached)
    assert result.ids[len(cached):] == tuple(LINES[130])
    assert (result.reusable, result.restored, result.dropped) == (len(cached), 10, 0)
    assert result.original == tuple(new)


def test_window_that_moved_past_the_limit_is_left_as_is():
    """Beyond ``limit`` tokens of far context the client's own prompt is used (and becomes the next anchor)."""
    assert realign([window(10, 130)], window(70, 190), budget=4000, limit=512) is None
    assert realign([window(10, 130)], window(11, 131), budget=4000, limit=5) is None


def test_rewrite_that_would_not_fit_the_budget_is_left_as_is():
    """The restored lines must fit the prompt budget too."""
    cached, new = window(10, 130), window(11, 131)
    assert realign([cached], new, budget=len(new), limit=512) is None
    assert realign([cached], new, budget=len(new) + 10, limit=512) is not None


def test_an_edit_after_a_long_shared_start_is_never_undone():
    """Text changed on both sides after a long shared start is the developer's edit, not a moved window."""
    cached = window(10, 130)
    edited = [*cached[:400], *range(5000, 5005), *cached[410:], *LINES[130]]  # a line in the middle rewritten
    assert realign([cached], edited, budget=4000, limit=512) is None


def test_lines_dropped_at_the_very_start_may_swap_both_sides():
    """At the prompt's start (Continue's shuffled snippets) both sides are context: the cached start is kept."""
    snippets_a, snippets_b = list(range(7000, 7040)), list(range(7040, 7000, -1))
    cached = [*snippets_a, *sum(LINES[10:40], [])]
    new = [*snippets_b, *sum(LINES[11:41], [])]
    result = realign([cached], new, budget=4000, limit=512)
    assert result is not None and result.ids[:len(cached)] == tuple(cached)
    assert result.ids[len(cached):] == tuple(LINES[40])


def test_exact_extension_is_left_to_the_prefix_cache():
    """A prompt that extends a cached one needs no rewrite."""
    cached = window(10, 130)
    assert realign([cached], cached + LINES[130], budget=4000, limit=512) is None


def test_best_of_several_cached_prompts_is_chosen():
    """Of several candidates, the one that lets the most tokens be reused wins."""
    far, near = window(0, 60), window(10, 130)
    result = realign([far, near], window(11, 131), budget=4000, limit=512)
    assert result is not None and result.reusable == len(near)


# -- the engine ------------------------------------------------------------------------

def _session_prompts(engine) -> tuple[str, str]:
    """Two editor prompts of ~200 tokens: a fixed head, then a window of lines that slid down by one."""
    lines = (SAMPLE_CODE * 3).splitlines(keepends=True)
    head = "".join(lines[:2])

    def prompt(first: int, last: int) -> str:
        return head + "".join(lines[first:last])

    last = 3
    while len(engine.tokenizer(prompt(3, last + 1))["input_ids"]) < 200:
        last += 1
    return prompt(3, last), prompt(4, last + 1)


def _greedy(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def _engine_with(engine, **changes) -> Engine:
    """The tiny model under other engine options."""
    return Engine(engine.config, engine.model, engine.tokenizer, engine.device,
                  dataclasses.replace(engine.options, **{"speculative_tokens": 0, **changes}))


@pytest.fixture()
def restoring(engine):
    """The tiny model restoring moved prompts onto cached ones (the approximate setting)."""
    return _engine_with(engine, anchor_restore_tokens=512)


def test_engine_reuses_the_cache_of_a_slid_window(restoring):
    """The second prompt of a sliding session is restored onto the first and reuses its whole prefill."""
    first, second = _session_prompts(restoring)
    restoring.complete(restoring.prepare(first, _greedy()))
    request = restoring.prepare(second, _greedy())
    assert request.realigned is not None and request.realigned.restored > 0
    restoring.complete(request)
    assert request.reused >= len(request.prompt_ids) - 2 * restoring.runner.small_block
    assert request.reused > len(request.prompt_ids) // 2


def test_default_never_restores(engine):
    """By default (anchor_restore_tokens 0) a slid window runs as sent and is computed again."""
    first, second = _session_prompts(engine)
    engine.forget()
    engine.complete(engine.prepare(first, _greedy()))
    request = engine.prepare(second, _greedy())
    assert request.realigned is None
    sent = tuple(engine.tokenizer(second)["input_ids"])
    assert request.prompt_ids == sent[:len(request.prompt_ids)] and len(request.prompt_ids) >= len(sent) - 1  # healing
    engine.complete(request)
    assert request.reused < len(request.prompt_ids) // 2


def test_restored_answer_is_the_answer_to_its_own_prompt(engine):
    """Reuse stays exact: the restored prompt's answer equals a cold run of the same text with no cache."""
    restoring = _engine_with(engine, token_healing=False, anchor_restore_tokens=512)
    exact = _engine_with(engine, token_healing=False, prefix_cache=False)
    first, second = _session_prompts(engine)
    restoring.complete(restoring.prepare(first, _greedy()))
    restored = restoring.prepare(second, _greedy(16))
    warm = restoring.complete(restored)[0]
    assert restored.realigned is not None and restored.reused > 0
    cold_request = exact.prepare(engine.decode(restored.prompt_ids), _greedy(16))
    assert cold_request.prompt_ids == restored.prompt_ids  # whole lines: the text tokenizes back the same
    cold = exact.complete(cold_request)[0]
    assert cold_request.reused == 0
    assert (warm.text, warm.cumulative_logprob) == (cold.text, cold.cumulative_logprob)


def test_a_prompt_cut_to_the_window_is_cut_deeper_by_the_slack(engine, restoring):
    """With restoring on, prompts too long for the window leave room for their next versions to restore."""
    exact = _engine_with(engine, anchor_lines=0)
    long_prompt = SAMPLE_CODE * 8
    budget = engine.preparer.prompt_budget(16, truncate=True)
    slack = min(restoring.options.anchor_restore_tokens, budget // 8)
    with_slack = _engine_with(restoring, anchor_lines=0).prepare(long_prompt, _greedy(16))
    without = exact.prepare(long_prompt, _greedy(16))
    healed = 1 if without.healing else 0
    assert len(without.prompt_ids) + healed == budget
    assert len(with_slack.prompt_ids) + healed == budget - slack


# -- exact anchoring: the prompt starts at a line chosen by its content -----------------------

CODE_LINES = [f"    value_{i} = compute_{i % 7}(value_{i - 1}, {i})\n" for i in range(1, 400)]


def test_anchored_start_stays_put_while_the_cut_moves_down():
    """As the client's cut moves down line by line, the anchored start stays on one line, then jumps to the next."""
    starts = []
    for first in range(100, 140):
        text = "".join(CODE_LINES[first:first + 150])
        kept = anchored_start(text, 16)
        assert text.endswith(kept) and len(kept) < len(text) or kept == text
        starts.append(CODE_LINES.index(kept.splitlines(keepends=True)[0]))
    changes = sum(1 for a, b in zip(starts, starts[1:]) if a != b)
    assert all(first <= start < first + 64 for first, start in zip(range(100, 140), starts))
    assert changes <= 8  # ~40 lines moved / 16: a cold prefill every ~16 lines, not every line


def test_anchored_start_leaves_short_prompts_and_disabled_setting_alone():
    """Short prompts are cheap to compute again; period 0 is the prompt as sent."""
    short = "".join(CODE_LINES[:90])
    long = "".join(CODE_LINES[:200])
    assert anchored_start(short, 16) == short
    assert anchored_start(long, 0) == long
    assert anchor_offsets(long, 16) and all(long[o - 1] == "\n" for o in anchor_offsets(long, 16) if o)


def _long_prompt(typed: str = "") -> str:
    """An editor prefix of 80 code lines (longer than the tiny window) and what the developer typed after it."""
    return "".join(CODE_LINES[100:180]) + "    result = " + typed


def test_engine_cuts_a_long_prompt_at_an_anchor_line_and_reuses_it(engine):
    """A prompt cut to the window at an anchor line keeps its start while the developer types: its cache is reused.

    Cut token by token instead, the start moves with every keystroke and nothing is reused.
    """
    anchoring = _engine_with(engine, anchor_lines=2)
    exact = _engine_with(engine, anchor_lines=0)
    for server in (anchoring, exact):
        server.complete(server.prepare(_long_prompt(), _greedy()))
    anchored, plain = (server.prepare(_long_prompt("comp"), _greedy()) for server in (anchoring, exact))
    anchoring.complete(anchored), exact.complete(plain)
    first_line = anchoring.decode(anchored.prompt_ids).splitlines(keepends=True)[0]
    assert first_line in CODE_LINES  # a whole line
    assert anchored.truncated and plain.truncated
    assert anchored.reused > len(anchored.prompt_ids) // 2
    assert plain.reused == 0


def test_anchored_answer_is_the_cold_answer(engine):
    """Exact: an anchored request answered from a warm cache equals the same request with no cache."""
    anchoring = _engine_with(engine, anchor_lines=2)
    anchoring.complete(anchoring.prepare(_long_prompt(), _greedy()))
    warm_request = anchoring.prepare(_long_prompt("comp"), _greedy(16))
    warm = anchoring.complete(warm_request)[0]
    fresh = _engine_with(engine, anchor_lines=2)  # its cache is empty
    cold_request = fresh.prepare(_long_prompt("comp"), _greedy(16))
    assert cold_request.prompt_ids == warm_request.prompt_ids
    cold = fresh.complete(cold_request)[0]
    assert warm_request.reused > 0 and cold_request.reused == 0
    assert (warm.text, warm.cumulative_logprob) == (cold.text, cold.cumulative_logprob)


def _fauxpilot_prompt(top: int) -> str:
    """FauxPilot's shape past line 150: a fixed head, a newline, then a window of lines whose top is ``top``."""
    head = "import os\nimport sys\n\nCONSTANT_VALUE = compute_all(os, sys)  # head"
    return head + "\n" + "".join(CODE_LINES[top:top + 100]) + "    result = "


def test_window_under_a_fixed_head_starts_at_an_anchor_line(engine):
    """FauxPilot: once a slid window is seen under the same head, the window starts at an anchor line and stays."""
    wide = Engine(dataclasses.replace(engine.config, context_length=4096), engine.model, engine.tokenizer,
                  engine.device, dataclasses.replace(engine.options, anchor_lines=4))
    first = wide.prepare(_fauxpilot_prompt(100), _greedy(4))
    assert engine.decode(first.prompt_ids).startswith(_fauxpilot_prompt(100)[:60])  # nothing cached: as sent
    wide.complete(first)
    requests = []
    for top in (101, 102):  # CODE_LINES[102] is the first anchor line (period 4) at or below both tops
        request = wide.prepare(_fauxpilot_prompt(top), _greedy(4))
        wide.complete(request)
        requests.append(request)
    texts = [engine.decode(r.prompt_ids) for r in requests]
    head = _fauxpilot_prompt(0).split("\n    value_")[0] + "\n"
    assert all(text.startswith(head + CODE_LINES[102]) for text in texts)  # the window starts at the anchor line
    assert requests[1].reused >= len(requests[1].prompt_ids) - 64  # and stays there: the cache covers it


def test_slid_seam_is_the_end_of_the_shared_head_and_never_an_edit():
    """The seam is found for a window that slid under a head, not for lines the developer rewrote."""
    head = list(range(1000, 1040))  # at least min_head (32) tokens
    cached = window(10, 130, head)
    assert slid_seam([cached], window(11, 131, head)) == 1 + len(head)
    edited = [*cached[:400], *range(5000, 5005), *cached[410:], *LINES[130]]
    assert slid_seam([cached], edited) is None
    assert slid_seam([cached], window(11, 131, head=[])) == 1  # a window cut from the top: the seam is its start
    assert slid_seam([cached], window(11, 131, head), min_head=64) is None
    assert slid_seam([window(0, 120, [])], window(0, 121, [])) is None  # a start that stays put: never cut


def test_prefix_cut_from_the_top_is_anchored_once_it_moves_and_never_before(engine):
    """Copilot's shape: a prefix whose top stays put runs as sent; once its top moves, it starts at an anchor line."""
    wide = Engine(dataclasses.replace(engine.config, context_length=4096), engine.model, engine.tokenizer,
                  engine.device, dataclasses.replace(engine.options, anchor_lines=4))

    def prefix(top: int, typed: str = "") -> str:
        return "".join(CODE_LINES[top:top + 100]) + "    result = " + typed

    def sent(top: int, typed: str = "") -> str:
        request = wide.prepare(prefix(top, typed), _greedy(4), suffix="\n    return result\n")
        wide.complete(request)
        return engine.decode(request.prompt_ids)

    assert sent(100).startswith(CODE_LINES[100])
    assert sent(100, "comp").startswith(CODE_LINES[100])  # the top stayed put: nothing cut
    assert sent(101, "compute").startswith(CODE_LINES[102])  # moved: the first anchor line at or below its top
