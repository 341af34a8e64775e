"""Stop strings, incremental detokenization and per-sequence text state, with the tiny tokenizer."""
from __future__ import annotations

import re

import pytest

from app.engine.params import Delta
from app.engine.stopping import DedentStop, IndentStop, StopCondition, find_stop, held_back
from app.engine.sequence import IncrementalDetokenizer, SequenceState

EOS = 0  # an end-of-sequence id for StopCondition on its own

# -- find_stop / held_back ------------------------------------------------------


def test_find_stop_returns_earliest_of_several():
    """The earliest occurrence of any stop string wins, whichever is listed first."""
    assert find_stop("abc\n\ndef", ("def", "\n\n")) == 3
    assert find_stop("abc\n\ndef", ("\n\n", "c")) == 2
    assert find_stop("abcabc", ("c", "b")) == 1


def test_find_stop_from_start():
    """``start`` skips earlier occurrences but still returns an index into the whole text."""
    assert find_stop("abcabc", ("c", "b"), start=2) == 2
    assert find_stop("abcabc", ("b",), start=2) == 4
    assert find_stop("abcabc", ("a",), start=4) is None


def test_find_stop_none():
    """No stops, absent stops and empty stop strings find nothing."""
    assert find_stop("abc", ()) is None
    assert find_stop("abc", ("x", "abcd")) is None
    assert find_stop("abc", ("",)) is None


@pytest.mark.parametrize(
    "text, stops, held",
    [
        ("abc\n", ("\n\n",), 1),
        ("abc", (), 0),
        ("abc\n", (), 0),
        ("abc", ("\n\n",), 0),
        ("x</s", ("</s>", "s>"), 3),  # longest partial wins ...
        ("x</s", ("s>", "</s>"), 3),  # ... whatever the order
        ("<", ("<|end|>",), 1),  # text shorter than the stop
        ("ab", ("b",), 0),  # a one-character stop is never partial
        ("abab", ("abac",), 2),
    ],
)
def test_held_back(text, stops, held):
    """held_back is the longest tail of the text that is a proper prefix of some stop."""
    assert held_back(text, stops) == held


# -- StopCondition --------------------------------------------------------------


def test_stop_condition_reasons():
    """eos ids and stop strings give "stop", max_tokens gives "length", anything else continues."""
    cond = StopCondition(frozenset({EOS, 7}), max_tokens=5, stops=("\n\n",))
    assert cond(EOS, 1, "abc") == (True, "stop", None, "eos_token", str(EOS))
    assert cond(7, 1, "abc") == (True, "stop", None, "eos_token", "7")
    assert cond(42, 2, "a\n\nb") == (True, "stop", 1, "stop_string", "\n\n")
    assert cond(42, 5, "abc") == (True, "length", None, "max_tokens", "5")
    assert cond(42, 2, "abc\n")[:3] == (False, None, None)


def test_stop_condition_names_the_rule_that_cut_first():
    """The earliest cut wins and is named: a stop string before a dedent, a dedent before a later stop string."""
    dedent = DedentStop("    ")
    cond = StopCondition(frozenset({EOS}), max_tokens=50, stops=("xx", "b"), dedent=dedent)
    assert cond(42, 3, "a = b\nreturn") == (True, "stop", 4, "stop_string", "b")
    cond = StopCondition(frozenset({EOS}), max_tokens=50, stops=("zz",), dedent=dedent)
    assert cond(42, 3, "a = 1\nreturn zz") == (True, "stop", 5, "trim_by_indentation", None)
    cond = StopCondition(frozenset({EOS}), max_tokens=50, stops=(), dedent=IndentStop(4))
    assert cond(42, 3, "a = 1\n  b")[3] == "n_indent"


def test_stop_condition_priorities_and_start():
    """A stop at the last allowed token is "stop"; stops before ``start`` are not searched."""
    cond = StopCondition(frozenset({EOS}), max_tokens=3, stops=("\n\n",))
    assert cond(EOS, 3, "abc")[:3] == (True, "stop", None)
    assert cond(42, 3, "a\n\n")[:3] == (True, "stop", 1)
    assert cond(42, 2, "a\n\nbc", start=3)[:3] == (False, None, None)


# -- IncrementalDetokenizer -----------------------------------------------------

MULTIBYTE = "héllo wörld ☃ 🙂 日本語"


def test_tokenizer_splits_characters_across_tokens(engine):
    """Precondition: the tiny tokenizer spreads some character's bytes over several tokens."""
    ids = engine.tokenizer(MULTIBYTE)["input_ids"]
    assert any("\ufffd" in engine.decode([i]) for i in ids)
    assert engine.decode(ids) == MULTIBYTE


@pytest.mark.parametrize("context", ["", "print('x')\n", "s = '☃"])
def test_detokenizer_emits_whole_characters(engine, context):
    """Token-by-token deltas never hold half a character and add up to exactly the text."""
    context_ids = engine.tokenizer(context)["input_ids"] if context else []
    detok = IncrementalDetokenizer(engine.decode, context_ids)
    deltas = [detok.add(i) for i in engine.tokenizer(MULTIBYTE)["input_ids"]]
    deltas.append(detok.flush())
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == MULTIBYTE
    assert "" in deltas[:-1]  # some token only completed part of a character


def test_detokenizer_flush_releases_incomplete_bytes(engine):
    """flush() gives out what is still waiting when no more tokens will come."""
    # byte-level tokens: "a", then the first byte of "é" (0xC3, written "Ã") on its own
    ids = engine.tokenizer.convert_tokens_to_ids(["a", "Ã"])
    detok = IncrementalDetokenizer(engine.decode)
    assert [detok.add(i) for i in ids] == ["a", ""]  # a lone lead byte is not sent
    assert detok.flush() == "\ufffd"


# -- SequenceState --------------------------------------------------------------


def make_state(engine, stops=(), max_tokens=100, token_text=None, offset_base=0) -> SequenceState:
    """A SequenceState over the tiny tokenizer."""
    detok = IncrementalDetokenizer(engine.decode)
    stop = StopCondition(engine.preparer.eos_ids, max_tokens, tuple(stops))
    return SequenceState(0, detok, stop, token_text, offset_base)


def feed(state: SequenceState, ids) -> list[Delta]:
    """Push ids until the sequence finishes; return the deltas it produced."""
    deltas = []
    for step, token_id in enumerate(ids):
        delta = state.push(token_id, -0.1 * (step + 1), ((token_id, -0.05),))
        if delta is not None:
            deltas.append(delta)
        if state.finished:
            break
    return deltas


def ids_of(engine, *pieces: str) -> list[int]:
    """Token ids of each piece encoded apart, concatenated (so tokens break between pieces)."""
    return [i for piece in pieces for i in engine.tokenizer(piece)["input_ids"]]


def test_stop_spanning_two_tokens_is_never_emitted(engine):
    """A "\\n\\n" stop made of two "\\n" tokens never leaks, and the text is cut before it."""
    head = ids_of(engine, "x = 1\n")
    ids = head + ids_of(engine, "\ny = 2\n")
    assert [engine.decode([i]) for i in ids[len(head) - 1:len(head) + 1]] == ["\n", "\n"]
    state = make_state(engine, stops=("\n\n",))
    deltas = feed(state, ids)
    assert not any("\n" in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == "x = 1"
    assert state.text == "x = 1"
    assert state.finish_reason == "stop" and deltas[-1].finish_reason == "stop"
    assert state.generated == len(head) + 1  # stopped at the second "\n"
    assert state.result().text == "x = 1"


def test_stop_arriving_over_several_pushes(engine):
    """A multi-token stop is held back piece by piece and cut when it completes."""
    ids = ids_of(engine, "x = 1\ny", " = 2\n", "z")
    state = make_state(engine, stops=(" = 2\n",))
    deltas = feed(state, ids)
    for delta in deltas:
        assert not any(delta.text.endswith(" = 2\n"[:k]) for k in range(1, 6)), delta
    assert "".join(d.text for d in deltas) == "x = 1\ny"
    assert state.text == "x = 1\ny" and state.finish_reason == "stop"


def test_stop_inside_one_token_cuts_the_token(engine):
    """A stop inside a single token's text cuts that token's text too."""
    # a token like "\n\n" or "\n\n   " (blank lines are common in the training code)
    blank = min((i for i in range(engine.preparer.vocab_size) if engine.decode([i]).startswith("\n\n")),
                key=lambda i: -len(engine.decode([i])))
    ids = ids_of(engine, "return n") + [blank] + ids_of(engine, "class")
    state = make_state(engine, stops=("\n\n",))
    deltas = feed(state, ids)
    assert "".join(d.text for d in deltas) == "return n"
    assert state.text == "return n" and state.finish_reason == "stop"
    assert state.generated == len(ids) - len(ids_of(engine, "class"))


def test_held_back_text_that_is_no_stop_is_emitted_later(engine):
    """A held "\\n" is sent with the next token once it cannot become "\\n\\n"."""
    text = "x = 1\ny = 2"
    ids = ids_of(engine, text)
    state = make_state(engine, stops=("\n\n",), max_tokens=len(ids))
    deltas, newlines = [], 0
    for token_id in ids:
        delta = state.push(token_id, -0.1)
        deltas.append(delta)
        if engine.decode([token_id]) == "\n":
            newlines += 1
            assert delta is None or "\n" not in delta.text  # held back for now
    assert newlines == 1
    assert "".join(d.text for d in deltas if d is not None) == text
    assert state.finish_reason == "length"


def test_max_tokens_gives_length(engine):
    """The sequence ends after max_tokens tokens with finish_reason "length"."""
    ids = ids_of(engine, "x = 1\ny = 2")
    state = make_state(engine, max_tokens=3)
    deltas = feed(state, ids)
    assert state.generated == 3
    assert state.text == engine.decode(ids[:3])
    assert state.finish_reason == "length" and deltas[-1].finish_reason == "length"


def test_max_tokens_flushes_partial_stop(engine):
    """Text held back as a possible stop is released when the length limit ends the sequence."""
    ids = ids_of(engine, "x = 1\n")
    state = make_state(engine, stops=("\n\n",), max_tokens=len(ids))
    deltas = feed(state, ids)
    assert "".join(d.text for d in deltas) == "x = 1\n"
    assert state.finish_reason == "length"


def test_eos_gives_stop_without_its_text(engine):
    """An eos id ends the sequence with "stop"; no eos text enters the output."""
    eos = engine.tokenizer.eos_token_id
    assert eos in engine.preparer.eos_ids
    head = ids_of(engine, "x = 1")
    ids = head + [eos] + ids_of(engine, "y")
    state = make_state(engine)
    deltas = feed(state, ids)
    assert state.generated == len(head) + 1  # stopped at eos
    assert state.text == "x = 1"
    assert "".join(d.text for d in deltas) == "x = 1"
    assert state.finish_reason == "stop"
    result = state.result(prefix="P:")
    assert result.text == "P:x = 1" and result.completion_tokens == len(head) + 1


def test_logprob_offsets_follow_token_text(engine):
    """Each logprob entry's offset is offset_base plus where its token's text starts."""
    text = "x = 1\ny = 2"
    ids = ids_of(engine, text)
    base = 100
    state = make_state(engine, max_tokens=len(ids), token_text=engine.preparer.token_text, offset_base=base)
    deltas = feed(state, ids)
    entries = state.logprobs
    assert [e.token for e in entries] == [engine.preparer.token_text(i) for i in ids]
    assert "".join(e.token for e in entries) == text
    position = 0
    for entry in entries:
        assert entry.offset == base + position
        assert text[entry.offset - base:].startswith(entry.token)
        position += len(entry.token)
    assert [e for d in deltas for e in d.logprobs] == entries  # every entry is streamed once
    assert entries[0].top == ((engine.preparer.token_text(ids[0]), -0.05),)
    assert state.result().logprobs == entries


def test_logprob_entries_after_stop_cut_are_dropped(engine):
    """Tokens that start at or after a stop's cut lose their logprob entries."""
    text = "x = 1\ny = 2\nz"
    ids = ids_of(engine, text)
    state = make_state(engine, stops=(" = 2",), token_text=engine.preparer.token_text, offset_base=10)
    deltas = feed(state, ids)
    assert state.text == "x = 1\ny"
    kept = [e.token for e in state.logprobs]
    before_cut = [engine.preparer.token_text(i) for i in ids_of(engine, "x = 1\n", "y")]
    assert kept == before_cut  # the stop's " =" and " 2" tokens are dropped
    assert all(e.offset - 10 < len(state.text) for e in state.logprobs)
    assert [e for d in deltas for e in d.logprobs] == state.logprobs


# -- trim_by_indentation -----------------------------------------------------------------

FUNCTION_BODY = "    if n < 2:\n        return n\n\n    return f(n - 1)\n  \n\nprint(f(3))\n"


@pytest.mark.parametrize("lead, text, expected", [
    ("", FUNCTION_BODY, "    if n < 2:\n        return n\n\n    return f(n - 1)"),
    ("    ", "if n < 2:\n        return n\nprint(1)", "if n < 2:\n        return n"),
    ("", "\tx = 1\n\ty = 2\nz = 3", "\tx = 1\n\ty = 2"),
    (None, "a, b)\nprint(x)\n    more()\n", None),  # mid-line: the next line sets the block
    (None, "a, b)\n    x = 1\ny = 2", "a, b)\n    x = 1"),
    ("", "    x = 1\n\n    \n", None),  # blank lines never stop
    ("", "def g():\n    return 1\n", None),  # deeper lines never stop
])
def test_dedent_stop_finds_the_end_of_the_block(lead, text, expected):
    """The cut falls before the first line indented less than the block, trailing blank lines dropped."""
    from app.engine.stopping import DedentStop

    cut = DedentStop(lead).find(text)
    assert (None if cut is None else text[:cut]) == expected


def test_dedent_stop_streams_what_it_returns(engine):
    """Fed token by token, trimming by indentation sends exactly the text it ends with, never the dedented line."""
    from app.engine.stopping import DedentStop

    detok = IncrementalDetokenizer(engine.decode)
    state = SequenceState(0, detok, StopCondition(engine.preparer.eos_ids, 200, (), DedentStop("")))
    deltas = feed(state, ids_of(engine, *re.findall(r"\s|\S+", FUNCTION_BODY)))  # many small tokens
    assert state.finish_reason == "stop"
    assert state.text == "    if n < 2:\n        return n\n\n    return f(n - 1)"
    assert "".join(d.text for d in deltas) == state.text


# -- TimeBudget ------------------------------------------------------------------


def test_time_budget_ends_at_the_next_newline_after_it_passes():
    """Before the budget nothing ends; after it, the first newline of the newest text ends the line (kept)."""
    from app.engine.stopping import TimeBudget

    now = [0.0]
    budget = TimeBudget(1.0, clock=lambda: now[0])
    assert budget.cut("def f(") is None  # the clock starts at the first token
    now[0] = 0.5
    assert budget.cut("def f(x):\n") is None  # a newline inside the budget does not count
    now[0] = 1.5
    assert budget.cut("def f(x):\n    return") is None  # past the budget, but no newline yet
    assert budget.cut("def f(x):\n    return x\n    # more") == len("def f(x):\n    return x\n")


def test_stop_condition_with_time_budget_reports_length_and_the_cut():
    """A budget-ended line is a "length" finish with the text cut after its newline; other stops come first."""
    from app.engine.stopping import TimeBudget

    now = [0.0]
    cond = StopCondition(frozenset({EOS}), max_tokens=50, stops=("\n\n",), budget=TimeBudget(1.0, lambda: now[0]))
    assert cond(42, 1, "x = 1")[:3] == (False, None, None)
    now[0] = 2.0
    assert cond(42, 2, "x = 1\ny") == (True, "length", len("x = 1\n"), "time_budget", "1000 ms")
    assert cond(EOS, 3, "x")[:3] == (True, "stop", None)


def test_engine_time_budget_stops_a_completion_early(engine):
    """With a 1 ms budget, a completion of newlines ends soon after it passes; without one it runs to max_tokens."""
    from app.engine import SamplingParams

    newline = engine.tokenizer.convert_tokens_to_ids("Ċ")  # byte-level BPE's "\n"
    bias = ((newline, 100.0),)
    budgeted = engine.complete(engine.prepare("x = 1", SamplingParams(
        max_tokens=50, temperature=0.0, logit_bias=bias, time_budget_ms=1)))[0]
    assert budgeted.finish_reason == "length" and 1 < budgeted.completion_tokens < 50
    assert budgeted.text == "\n" * budgeted.completion_tokens
    unbounded = engine.complete(engine.prepare("x = 1", SamplingParams(max_tokens=50, temperature=0.0,
                                                                       logit_bias=bias)))[0]
    assert unbounded.completion_tokens == 50
