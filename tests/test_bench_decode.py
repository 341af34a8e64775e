"""The decode workload's and the edit session's pure parts: speeds, /metrics counters, prompts, report rows."""
from __future__ import annotations

import pytest

from bench import editors, report
from bench.__main__ import parse_args
from bench.client import metric_sums, spec_counters, spec_delta
from bench.editors import TypingScript
from bench.servers import LABELS, LAUNCHERS, ModelFiles
from bench.sessions import Edit, SessionOptions, summarize
from bench.stats import decode_speed
from bench.workloads import _cold_summary, _rounds_summary, tagged

EXPOSITION = """# HELP fauxpilot_spec_drafted_tokens_total Draft tokens proposed.
# TYPE fauxpilot_spec_drafted_tokens_total counter
fauxpilot_spec_drafted_tokens_total{model="smollm2-135m"} 120.0
fauxpilot_spec_drafted_tokens_total{model="other, with a space"} 30.0
fauxpilot_spec_drafted_tokens_created{model="smollm2-135m"} 1.7e+09
fauxpilot_spec_accepted_tokens_total{model="smollm2-135m"} 90.0
fauxpilot_spec_steps_total{model="smollm2-135m"} 40.0
fauxpilot_requests_total{model="smollm2-135m",status="200"} 7.0
"""


class LineCorpus:
    """A stand-in for Corpus.tail_start: the prompt starts a fixed number of lines above the cursor."""

    def __init__(self, lines: int):
        self.lines = lines

    def tail_start(self, text: str, end: int, tokens: int) -> int:
        """The start of the line ``self.lines`` lines above the one holding ``end``."""
        start = end
        for _ in range(self.lines + 1):
            start = text.rfind("\n", 0, start)
            if start < 0:
                return 0
        return start + 1


# --- speeds -----------------------------------------------------------------------------------------------------


def test_decode_speed_counts_the_steps_after_the_first_token():
    assert decode_speed(128, 100.0, 1370.0) == pytest.approx(100.0)  # 127 tokens in 1.27 s
    assert decode_speed(1, 100.0, 200.0) is None
    assert decode_speed(10, 100.0, 100.0) is None and decode_speed(None, 1.0, 2.0) is None
    assert decode_speed(10, None, 2.0) is None


def test_cold_summary_ends_decode_at_the_last_token_not_at_done():
    run = {"status": "done", "prompt_tokens": 300, "ttft_ms": 50.0, "total_ms": 1400.0, "last_ms": 1320.0,
           "tokens": 128}
    assert _cold_summary([run], streams=True)["decode_tok_s"] == pytest.approx(100.0)
    older = {**run, "last_ms": None}  # a result without last-token times falls back to the total
    assert _cold_summary([older], streams=True)["decode_tok_s"] == pytest.approx(127 / 1.35)


def test_every_decode_request_gets_a_last_line_of_its_own():
    # Our server replays an identical greedy request from its answer cache: no two may be the same.
    assert tagged("def f():\n    pass\n", "1.0") == "def f():\n    pass\n# request 1.0\n"
    assert tagged("x = 1", "8.1.3") == "x = 1\n# request 8.1.3\n"
    assert len({tagged("x\n", f"8.0.{stream}") for stream in range(8)}) == 8


def test_rounds_summary_takes_medians_and_counts_failed_rounds():
    rounds = [{"errors": 0, "tok_s": 100.0, "decode_tok_s": 120.0, "ttft_ms": 30.0},
              {"errors": 1, "tok_s": 80.0, "decode_tok_s": None, "ttft_ms": 40.0},
              {"errors": 0, "tok_s": 90.0, "decode_tok_s": 110.0, "ttft_ms": 20.0}]
    s = _rounds_summary(rounds)
    assert s["runs_ok"] == 2 and s["runs_failed"] == 1
    assert s["tok_s"] == 90.0 and s["decode_tok_s"] == 115.0 and s["ttft_ms"] == 30.0


def test_session_summary_gives_the_median_decode_of_streamed_answers():
    def answer(tokens: int | None, first: float, last: float | None) -> dict:
        return {"kind": "awaited", "status": "done", "latency_ms": last or first, "ttft_ms": first, "waited_ms": 0.0,
                "last_ms": last, "completion_tokens": tokens, "prompt_tokens": None, "cached_tokens": None}

    records = [answer(65, 100, 740), answer(33, 100, 420), answer(1, 100, 100), answer(None, 100, 300)]
    s = summarize(records, cap_s=60, streamed=True)
    assert s["decode_tok_s"] == pytest.approx(100.0) and s["completion_tokens"] == 99
    assert summarize(records, cap_s=60, streamed=False)["decode_tok_s"] is None


# --- /metrics ---------------------------------------------------------------------------------------------------


def test_metric_sums_add_up_label_sets():
    sums = metric_sums(EXPOSITION + "malformed line\nbare_gauge 2\nbare_gauge{a=\"}\"} 3\n")
    assert sums["fauxpilot_spec_drafted_tokens_total"] == 150.0
    assert sums["fauxpilot_requests_total"] == 7.0 and sums["bare_gauge"] == 5.0
    assert "malformed" not in sums


def test_spec_counters_and_delta():
    before = spec_counters(EXPOSITION)
    assert before == {"drafted": 150.0, "accepted": 90.0, "steps": 40.0}
    after = {"drafted": 250.0, "accepted": 170.0, "steps": 80.0}
    delta = spec_delta(before, after)
    assert delta["drafted"] == 100 and delta["accepted"] == 80 and delta["steps"] == 40
    assert delta["accepted_per_step"] == 2.0 and delta["acceptance"] == 0.8


def test_spec_counters_absent_are_none_and_appear_from_zero():
    absent = spec_counters(None)
    assert absent == {"drafted": None, "accepted": None, "steps": None}
    assert spec_counters("fauxpilot_requests_total 3\n") == absent
    delta = spec_delta(absent, absent)
    assert delta["accepted_per_step"] is None and delta["steps"] is None
    # A labelled counter is exported only once it moved: absent before, present after counts from 0.
    grown = spec_delta(absent, {"drafted": 12.0, "accepted": 6.0, "steps": 3.0})
    assert grown["accepted"] == 6 and grown["accepted_per_step"] == 2.0
    assert spec_delta(absent, {"drafted": 0.0, "accepted": 0.0, "steps": 0.0})["accepted_per_step"] is None
    gauge = spec_counters("fauxpilot_spec_steps 4\n")  # exported without the counter suffix
    assert gauge["steps"] == 4.0


# --- the edit session -------------------------------------------------------------------------------------------


def test_edit_target_is_userstring_rfind_after_its_mirrored_siblings():
    source, line = Edit.target(SessionOptions())
    assert source.name == "__init__.py" and source.parent.name == "collections"
    lines = source.read_text(encoding="utf-8").split("\n")
    assert lines[line] == editors.EDIT_ANCHOR
    above = "\n".join(lines[:line])
    assert "    def find(self, sub, start=0, end=_sys.maxsize):" in above  # what rfind mirrors is in the prompt
    assert "class UserString" in above
    assert Edit.target(SessionOptions(edit_line=7)) == (source, 7)


def test_edit_start_line_finds_whole_lines_only():
    text = "class A:\n    def rfind(self, sub, start=0, end=_sys.maxsize):\n        pass\n"
    assert editors.edit_start_line(text) == 1
    assert editors.edit_start_line("x = '    def rfind(self, sub, start=0, end=_sys.maxsize):'\n") is None


def test_edit_body_is_the_text_from_a_fixed_start_with_a_suffix():
    source = "\n".join(f"line {i}" for i in range(100))
    script = TypingScript(source, start_line=50, chars_per_step=4, steps=8)
    first, later = script.doc(0), script.doc(7)
    start = source.index("line 40")
    body = editors.edit_body(first, start, max_tokens=64, suffix_lines=3)
    assert body["prompt"] == source[start:first.offset] and body["max_tokens"] == 64
    assert body["suffix"] == "\n" + "\n".join(f"line {i}" for i in range(55, 58))  # after the typed region
    assert "stop" not in body and "temperature" not in body  # the session adds greedy; no stops
    assert editors.edit_body(later, start)["prompt"].startswith("line 40\n")  # the start stays put
    assert "suffix" not in editors.edit_body(first, start, suffix_lines=0)


def test_edit_session_cuts_the_prompt_once_and_keeps_its_start():
    source = "\n".join(f"line {i}" for i in range(100))
    options = SessionOptions(edit_tokens=96, edit_suffix_lines=0)
    edit = Edit(LineCorpus(5), options, source=None)  # type: ignore[arg-type]
    script = TypingScript(source, start_line=50, chars_per_step=6, steps=12)
    first = edit.request(script.doc(0))
    later = edit.request(script.doc(11))  # two lines further down: a fresh cut would start lower
    assert first["prompt"].startswith("line 45\n") and later["prompt"].startswith("line 45\n")
    assert later["prompt"] == script.doc(11).text[edit.start:script.doc(11).offset]
    assert first["max_tokens"] == 96 and Edit.stream and Edit.in_burst == "skip" and Edit.debounce_s == 0


# --- systems and options ----------------------------------------------------------------------------------------


def test_ours_nospec_starts_ours_with_speculation_off(tmp_path):
    model = ModelFiles("m", tmp_path, None, "int8")
    argv, env = LAUNCHERS["ours"].command(5000, model)
    argv_off, env_off = LAUNCHERS["ours_nospec"].command(5000, model)
    assert argv_off == argv and env_off == {**env, "FAUXPILOT_SPECULATIVE_TOKENS": "0"}
    assert LAUNCHERS["ours_nospec"].stream_body == LAUNCHERS["ours"].stream_body
    assert LABELS["ours_nospec"] == "FauxPilot Lite (no speculation)"


def test_options_for_the_decode_comparison():
    args = parse_args(["--workloads", "cold,decode,load", "--clients", "1,8", "--systems",
                       "ours,ours_nospec,llamaserver", "--sessions", "edit", "--quick"])
    assert args.workloads == ["cold", "decode", "load"] and args.sessions == ["edit"]
    assert args.systems == ["ours", "ours_nospec", "llamaserver"]
    assert args.decode_clients == [1, 8] and args.decode_runs == 1 and args.decode_tokens == 128
    assert parse_args([]).workloads == ["keystroke", "cold", "decode", "load"]
    assert "edit" in parse_args(["--sessions", "all"]).sessions


# --- report -----------------------------------------------------------------------------------------------------


def figures(start: float | None, one: float, eight: float, spec: dict | None = None) -> dict:
    """One system's figures as __main__ gathers them (cold, decode at 1 and 8 streams, load at 8)."""
    spec = spec or {"drafted": None, "accepted": None, "steps": None, "accepted_per_step": None}
    return {"status": "ok", "url": "http://x", "start_s": start, "cold": {"ttft_ms": 250.0, "decode_tok_s": one - 5},
            "decode": {"prompt_tokens": 300, "1": {"decode_tok_s": one, "tok_s": one - 10, "ttft_ms": 20.0,
                                                   "spec": spec},
                       "8": {"decode_tok_s": eight, "tok_s": eight - 20, "ttft_ms": 60.0, "spec": spec}},
            "load": {"8": {"tok_s": 150.0, "latency_p50_ms": 1.0, "latency_p95_ms": 2.0, "requests": 3, "errors": 0,
                           "spec": spec}}}


ROOF = {"roofline_tok_s": {"ours": 200.0, "ours_nospec": 200.0, "llamaserver": 400.0},
        "bytes_per_token": {"ours": 1e8, "ours_nospec": 1e8, "llamaserver": 5e7}, "bandwidth_gb_s": {}}


def test_headline_shows_start_ttft_decode_roofline_and_streams_per_system():
    spec = {"drafted": 100, "accepted": 80, "steps": 40, "accepted_per_step": 2.0}
    systems = {"ours": figures(12.34, 150.0, 400.0, spec), "llamaserver": figures(1.0, 100.0, 300.0),
               "naive": {"status": "skipped (not installed)"}}
    text = report.headline(systems, ROOF, [1, 8])
    lines = text.split("\n")
    assert "8 streams total tok/s (decode)" in lines[0] and "8 clients total tok/s (load)" in lines[0]
    assert lines[2] == "| ours | 12.3 | 250 | 150.0 | 75% | 400.0 | 150.0 | 2.00 |"
    assert lines[3] == "| llama-server | 1.0 | 250 | 100.0 | 25% | 300.0 | 150.0 | — |"
    assert lines[4] == "| naive | — | — | — | — | — | — | — |"


def test_table_has_decode_rows_and_prefers_the_decode_workload_for_the_roofline():
    spec = {"drafted": 100, "accepted": 80, "steps": 40, "accepted_per_step": 2.0}
    systems = {"ours": figures(None, 150.0, 400.0, spec), "ours_nospec": figures(3.0, 90.0, 250.0)}
    text = report.table(systems, ROOF, [8])
    assert "| metric | ours | FauxPilot Lite (no speculation) |" in text
    assert "| server start: ready after (s) | — (attached) | 3.0 |" in text
    assert "| decode 1 stream: tok/s, first to last token (median) | 150.0 | 90.0 |" in text
    assert "| decode 8 streams: total tok/s, first to last token (median) | 400.0 | 250.0 |" in text
    assert "| decode 8 streams: draft tokens accepted / drafted | 80 / 100 (2.00 per step) | — |" in text
    assert "| batch-1 decode, % of roofline (decode workload) | 75% | 45% |" in text
    ratios = report.ratios(systems, [8])
    assert "decode 8 streams: ours 400.0 tok/s / FauxPilot Lite (no speculation) 250.0 tok/s = 1.60×" in ratios


def test_streams_rate_falls_back_to_the_wall_for_a_server_that_cannot_stream():
    assert report.streams_rate({"decode_tok_s": None, "tok_s": 12.0}) == "12.0 (wall)"
    assert report.streams_rate(None) == "—"


def test_sessions_table_shows_start_decode_and_draft_rows():
    session = {"status": "ok", "latency_p50_ms": 900.0, "latency_p95_ms": 1500.0, "ttft_p50_ms": 80.0,
               "decode_tok_s": 140.0, "full_prefills_per_100": 0.0, "full_prefills": 0, "counted": 4,
               "prompt_tokens": 8000, "reused_tokens": 7900, "requests": {"awaited": 4},
               "spec": {"drafted": 300, "accepted": 240, "steps": 60, "accepted_per_step": 4.0}}
    absent = {**session, "decode_tok_s": 60.0, "spec": {"drafted": None, "accepted": None, "steps": None,
                                                        "accepted_per_step": None}}
    systems = {"ours": {"start_s": 10.0, "sessions": {"edit": session}},
               "llamaserver": {"start_s": 0.8, "sessions": {"edit": absent}}}
    text = report.sessions_table(systems, ["edit"])
    assert "| (server) | ready after (s) | 10.0 | 0.8 |" in text
    assert "| plain client (edit) | decode tok/s p50 (first to last token) | 140.0 | 60.0 |" in text
    assert "| plain client (edit) | draft tokens accepted / drafted | 240 / 300 (4.00 per step) | — |" in text
