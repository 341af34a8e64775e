"""The editor-session benchmark's pure parts: each plugin's prompt rule, the typing script, the reuse figures."""
from __future__ import annotations

import json
import random

import pytest

from bench import editors
from bench.client import prompt_reuse, reply_text
from bench.editors import Doc, Ring, TypingScript
from bench.llama_server import fim_overrides
from bench.report import latest_fidelity, session_targets
from bench.sessions import summarize


def words(text: str) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def numbered(count: int, width: int = 0) -> str:
    """``count`` lines "line 0", "line 1", ... (each padded to ``width`` characters with x)."""
    return "\n".join(f"line {i}".ljust(width, "x") for i in range(count))


def doc_at_line(text: str, line: int, column: int) -> Doc:
    """The document with the cursor at (line, column)."""
    lines = text.split("\n")
    return Doc(text, sum(len(x) + 1 for x in lines[:line]) + column)


# --- typing ----------------------------------------------------------------------------------------------------


def test_typing_script_inserts_the_typed_text_before_the_untouched_rest():
    source = numbered(40)
    script = TypingScript(source, start_line=10, chars_per_step=3, steps=5)
    first, last = script.doc(0), script.doc(4)
    assert first.before == source[:source.index("line 10") + 3]
    assert last.offset == first.offset + 12
    # The cursor's line has nothing to its right, and the text after it is the same at every step.
    assert first.after.startswith("\n") and first.after == last.after
    assert last.before.endswith("line 10\nline 11")  # 5 x 3 characters typed
    assert last.after == "\n" + source[source.index("line 12"):]
    assert first.line == 10


def test_typing_script_stops_at_the_end_of_the_file():
    script = TypingScript("abc\ndef\n", start_line=1, chars_per_step=2, steps=100)
    assert script.steps == 2


# --- VSCode FauxPilot ---------------------------------------------------------------------------------------


def test_fauxpilot_sends_the_whole_file_to_the_cursor_up_to_line_150():
    text = numbered(300)
    doc = doc_at_line(text, 150, 3)
    assert editors.fauxpilot_prompt(doc) == doc.before


def test_fauxpilot_past_line_150_sends_a_fixed_head_and_the_last_119_lines():
    lines = numbered(300).split("\n")
    lines[31] = "y" * 300  # line 31 is cut at 200 characters
    text = "\n".join(lines)
    doc = doc_at_line(text, 200, 4)
    prompt = editors.fauxpilot_prompt(doc)
    head = "\n".join(lines[:31]) + "\n" + "y" * 200
    assert prompt.startswith(head + "\n")
    window = prompt[len(head) + 1:]
    assert window.split("\n") == lines[81:200] + [lines[200][:4]]
    # The head stays the same while the window slides: one line later it is still the prompt's start.
    assert editors.fauxpilot_prompt(doc_at_line(text, 201, 0)).startswith(head + "\n" + lines[82] + "\n")


def test_fauxpilot_body_is_one_line_not_streamed_without_suffix():
    body = editors.fauxpilot_body(doc_at_line(numbered(10), 5, 2))
    assert body["stop"] == ["\n"] and body["max_tokens"] == 200
    assert "suffix" not in body and "stream" not in body


# --- GitHub Copilot ---------------------------------------------------------------------------------------------


def test_copilot_limits_leave_room_for_the_answer_in_the_model_window():
    prefix, suffix = editors.copilot_limits(8192)
    assert prefix + suffix == 8192 - 500 - 5 and suffix == 1154  # 15 % of what is left, rounded up
    small_prefix, small_suffix = editors.copilot_limits(2048)
    assert small_prefix + small_suffix + 500 <= 2048


def test_copilot_suffix_starts_at_the_next_nonblank_line():
    doc = Doc("a = 1\nb = 2  # tail\n\n   c = 3\n", len("a = 1\nb = 2"))
    assert editors.copilot_suffix_text(doc) == "c = 3\n"


def test_copilot_gives_unused_prefix_budget_to_the_suffix():
    text = numbered(40)
    doc = doc_at_line(text, 10, 0)
    prompt = editors.copilot_prompt(doc, [], words, window=8192)
    assert prompt.prefix == doc.before
    assert prompt.suffix == "\n".join(text.split("\n")[11:])  # far more than 15 % of nothing: all of it
    assert prompt.context == []


def test_copilot_drops_low_weight_context_then_prefix_lines_from_the_top():
    text = numbered(8000)  # 2 words a line: 16,000 tokens, over the ~6.5k budget
    doc = doc_at_line(text, 7000, 0)
    context = editors.copilot_context("textwrap.py", [("shlex.py", "def split(s):\n    return s")])
    prompt = editors.copilot_prompt(doc, context, words, window=8192)
    limit, _ = editors.copilot_limits(8192)
    assert prompt.context == []  # the context went first
    assert prompt.prefix_tokens <= limit and prompt.prefix_tokens > limit - 2
    assert doc.before.endswith(prompt.prefix) and prompt.prefix.startswith("line ")  # whole lines, top ones gone


def test_copilot_keeps_the_context_when_it_fits_and_sends_it_in_extra():
    doc = doc_at_line(numbered(50), 20, 0)
    context = editors.copilot_context("textwrap.py", [("shlex.py", "def split(s):\n    return s")])
    prompt = editors.copilot_prompt(doc, context, words, window=8192)
    body = editors.copilot_body(prompt, doc)
    assert body["extra"]["context"] == ["# Path: textwrap.py\n# Compare this snippet from shlex.py:\n"
                                        "# def split(s):\n#     return s"]
    assert body["prompt"] == doc.before and body["max_tokens"] == 500
    assert body["stop"] == ["\ndef ", "\nclass ", "\nif ", "\n\n#"]


# --- Continue -------------------------------------------------------------------------------------------------


def test_continue_prunes_whole_lines_from_the_top_counting_newlines():
    text = "a b c\nd e\nf\ng h"  # 3 + 2 + 1 + 2 words and 3 newlines = 11
    assert editors.prune_lines_from_top(text, 11, words) == text
    assert editors.prune_lines_from_top(text, 10, words) == "d e\nf\ng h"  # 11 - 3 - 1
    assert editors.prune_lines_from_top(text, 4, words) == "f\ng h"
    assert editors.prune_lines_from_top(text, 3, words) == "g h"
    assert editors.prune_lines_from_bottom(text, 7, words) == "a b c\nd e"


def test_continue_prefix_moves_a_line_at_a_time_and_snippets_are_shuffled():
    text = numbered(400)
    snippets = [(f"Lib/mod{i}.py", f"def f{i}():\n    return {i}") for i in range(5)]
    doc = doc_at_line(text, 300, 0)
    prompt, suffix = editors.continue_prompt(doc, snippets, words, random.Random(1))
    prefix = editors.prune_lines_from_top(doc.before, 1024 * 0.3, words)
    assert prompt.endswith("\n# textwrap.py\n" + prefix)
    assert len(prefix.split("\n")) < 300 and suffix.startswith("line 300\nline 301")
    assert "# Path: Lib/mod0.py\n# def f0():\n#     return 0" in prompt
    orders = {tuple(line for line in editors.continue_prompt(doc, snippets, words, random.Random(seed))[0].split("\n")
                    if line.startswith("# Path:")) for seed in range(6)}
    assert len(orders) > 1  # a different order on different requests
    later, _ = editors.continue_prompt(doc_at_line(text, 301, 0), snippets, words, random.Random(1))
    assert later.split("\n# textwrap.py\n")[1] != prefix  # its first line moved


def test_continue_sends_a_newline_when_there_is_no_suffix():
    _, suffix = editors.continue_prompt(Doc("x = 1", 5), [], words, random.Random(0))
    assert suffix == "\n"


# --- llama.vscode -----------------------------------------------------------------------------------------------


def test_infill_fields_take_256_lines_above_and_64_below():
    text = numbered(400)
    doc = doc_at_line(text, 300, 4)
    fields = editors.infill_fields(doc)
    lines = text.split("\n")
    assert fields.input_prefix == "\n".join(lines[44:300]) + "\n"
    assert fields.prompt == "line"
    assert fields.input_suffix == " 300\n" + "\n".join(lines[301:365]) + "\n"


def test_infill_prompt_of_only_indentation_is_sent_empty():
    fields = editors.infill_fields(Doc("def f():\n        \nx", len("def f():\n        ")))
    assert fields.prompt == "" and fields.n_indent == 8
    body = editors.infill_body(fields, [])
    assert body["n_indent"] == 8 and body["n_predict"] == 128 and body["cache_prompt"] is True
    assert "n_cmpl" not in body and body["samplers"] == ["top_k", "top_p", "infill"]


def test_warmup_request_generates_nothing():
    body = editors.warmup_body([{"filename": "a.py", "text": "x\n"}])
    assert body["n_predict"] == 0 and body["input_prefix"] == "" and body["prompt"] == ""
    assert body["input_extra"] == [{"filename": "a.py", "text": "x\n"}]


def test_future_request_asks_for_the_accepted_suggestion():
    fields = editors.InfillFields("a\nb\n", "\n", "    x = ", 4)
    one = editors.future_fields(fields, "1\n\n")
    assert one.prompt == "    x = 1" and one.input_prefix == "a\nb\n"
    many = editors.future_fields(fields, "1\n    y = 2\n    z")
    assert many.input_prefix == "a\nb\n    x = 1\n    y = 2\n" and many.prompt == "    z"
    assert editors.future_fields(fields, "\n  \n") is None


def test_ring_picks_half_chunks_and_holds_sixteen():
    ring, rng = Ring(), random.Random(0)
    ring.pick(["a", "b"], "f.py", rng)  # fewer than 3 lines: not picked
    assert ring.queued == []
    lines = [f"l{i}" for i in range(200)]
    for _ in range(20):
        ring.pick(lines, "f.py", rng)
    assert len(ring.queued) == 16 and all(c["text"].count("\n") == 32 for c in ring.queued)
    while ring.update():
        pass
    assert len(ring.chunks) == 16 and not ring.update()


def test_ring_evicts_near_duplicates_on_save_and_picks_only_after_moving():
    ring, rng = Ring(), random.Random(0)
    lines = [f"l{i}" for i in range(40)]
    ring.pick_around(lines, 20, "f.py", rng)
    ring.pick_around(lines, 20, "f.py", rng)  # the same chunk again: not queued twice
    assert len(ring.queued) == 1
    doc = doc_at_line(numbered(400), 100, 0)
    ring.pick_near(doc, rng)
    queued = len(ring.queued)
    assert queued > 1 and ring.last_pick_line == 100
    ring.pick_near(doc_at_line(numbered(400), 120, 0), rng)  # moved 20 lines (not more than 32): nothing new
    assert len(ring.queued) == queued


# --- replies and figures ----------------------------------------------------------------------------------------


def test_prompt_reuse_reads_llamacpp_timings_openai_usage_and_infill_fields():
    assert prompt_reuse({"timings": {"prompt_n": 10, "cache_n": 90}}) == (100, 90)
    assert prompt_reuse({"usage": {"prompt_tokens": 50, "prompt_tokens_details": {"cached_tokens": 20}}}) == (50, 20)
    assert prompt_reuse({"tokens_evaluated": 70, "tokens_cached": 60}) == (70, 60)
    assert prompt_reuse({"usage": {"prompt_tokens": 5}}) == (5, None)
    assert reply_text({"content": "abc"}) == "abc" and reply_text({"choices": [{"text": "x"}, {"text": "y"}]}) == "xy"


def record(kind: str, prompt: int | None, cached: int | None, status: str = "done", latency: float = 100.0) -> dict:
    """A session record as Session.send makes it."""
    return {"kind": kind, "status": status, "latency_ms": latency, "ttft_ms": latency / 2, "waited_ms": 0.0,
            "prompt_tokens": prompt, "cached_tokens": cached}


def test_summary_counts_a_full_prefill_when_less_than_half_was_reused():
    records = [record("awaited", 100, 49), record("awaited", 100, 50), record("speculative", 100, 99),
               record("warm-up", 100, 0), record("in-burst", None, None, status="abandoned")]
    s = summarize(records, cap_s=60, streamed=True)
    assert s["full_prefills"] == 1 and s["counted"] == 3 and s["full_prefills_per_100"] == pytest.approx(100 / 3)
    assert s["reused_tokens"] == 198 and s["prompt_tokens"] == 300  # the warm-up is left out
    assert s["abandoned"] == 1 and s["ttft_p50_ms"] == 50.0


def test_summary_counts_timeouts_as_the_cap_and_has_no_ttft_unstreamed():
    s = summarize([record("awaited", 10, 10), record("awaited", None, None, status="timeout")], 2, streamed=False)
    assert s["latency_p95_ms"] == pytest.approx(100 + 0.95 * 1900) and s["timeouts"] == 1
    assert s["ttft_p50_ms"] is None


def test_session_targets_compare_with_llama_server():
    ours = {"status": "ok", "latency_p50_ms": 100.0, "latency_p95_ms": 300.0, "full_prefills_per_100": 4.0}
    theirs = {"status": "ok", "latency_p50_ms": 150.0}
    text = session_targets({"ours": {"sessions": {"fauxpilot": ours}},
                            "llamaserver": {"sessions": {"fauxpilot": theirs}}}, ["fauxpilot"])
    assert "[FAIL] FauxPilot: awaited p50 ≤ 0.5× llama-server's" in text
    assert "[FAIL] FauxPilot: p95 ≤ 2.5× its p50" in text
    assert "[PASS] FauxPilot: full prefills ≤ 5 per 100" in text


def test_fim_stand_ins_only_for_a_vocabulary_without_fim_tokens(tmp_path):
    added = [{"id": i, "content": name} for i, name in enumerate(["<|endoftext|>", "<issue_start>",
                                                                   "<issue_comment>", "<issue_closed>"])]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 9}}, "added_tokens": added}))
    assert fim_overrides(tmp_path) == ["--override-kv", "tokenizer.ggml.fim_pre_token_id=int:1,"
                                       "tokenizer.ggml.fim_suf_token_id=int:2,tokenizer.ggml.fim_mid_token_id=int:3"]
    added.append({"id": 4, "content": "<fim_prefix>"})
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {}}, "added_tokens": added}))
    assert fim_overrides(tmp_path) == []


def test_latest_fidelity_reads_the_newest_file(tmp_path):
    """The default mode's agreement per style comes from the newest bench.fidelity file."""
    assert latest_fidelity(tmp_path) == {}
    (tmp_path / "fidelity-20260101-000000.json").write_text(json.dumps({"summary": {"copilot": {
        "anchored": {"same_when_changed": 0.5}}}}))
    (tmp_path / "fidelity-20260102-000000.json").write_text(json.dumps({"summary": {"copilot": {
        "anchored": {"same_when_changed": 0.9}, "restored": {"same_when_changed": 0.1}}}}))
    assert latest_fidelity(tmp_path)["styles"] == {"copilot": 0.9}


def test_cache_delta_sums_instances_and_gives_the_hit_rate():
    """Cache counters grow per instance; the total and the hit rate come from their sum."""
    from bench.client import cache_counters, cache_delta
    before = [cache_counters("fauxpilot_prefix_cache_hits{model=\"m\"} 2\nfauxpilot_prefix_cache_misses{model=\"m\"} 1\n"),
              cache_counters("fauxpilot_prefix_cache_hits{model=\"m\"} 0\nfauxpilot_prefix_cache_misses{model=\"m\"} 0\n")]
    after = [cache_counters("fauxpilot_prefix_cache_hits{model=\"m\"} 8\nfauxpilot_prefix_cache_misses{model=\"m\"} 2\n"
                            "fauxpilot_requests_total{model=\"m\",status=\"200\"} 5\n"
                            "fauxpilot_requests_total{model=\"m\",status=\"499\"} 2\n"),
             cache_counters("fauxpilot_prefix_cache_hits{model=\"m\"} 1\nfauxpilot_prefix_cache_misses{model=\"m\"} 1\n"
                            "fauxpilot_requests_total{model=\"m\",status=\"200\"} 2\n")]
    delta = cache_delta(before, after)
    assert (delta["hits"], delta["misses"], delta["requests"]) == (7, 2, 9)
    assert delta["hit_rate"] == pytest.approx(7 / 9)
    assert [part["requests"] for part in delta["per_instance"]] == [7, 2]
    none = cache_delta([cache_counters(None)], [cache_counters("other_metric 1\n")])
    assert none["hits"] is None and none["hit_rate"] is None


def test_copilot_headers_name_one_session_per_seed():
    """A developer's Copilot ids stay the same through the session and differ between developers."""
    first, again = editors.copilot_headers(random.Random("a")), editors.copilot_headers(random.Random("a"))
    other = editors.copilot_headers(random.Random("b"))
    assert first == again and first["VScode-SessionId"] != other["VScode-SessionId"]
    assert len(first["VScode-MachineId"]) == 64 and first["Authorization"].startswith("Bearer tid=")


def test_nginx_site_changes_only_the_listen_port_and_the_servers():
    """The bench's and the tests' nginx runs the shipped site with one server line per instance."""
    from bench.nginx import SITE, site_config
    text = site_config(8123, [6001, 6002])
    assert "listen 127.0.0.1:8123;" in text and "listen 80;" not in text
    assert "    server 127.0.0.1:6001 max_fails=1 fail_timeout=10s;\n    server 127.0.0.1:6002 max_fails=1" in text
    shipped = SITE.read_text()
    kept = [line for line in shipped.splitlines() if "listen 80;" not in line and "server 127.0.0.1:5000" not in line]
    assert all(line in text.splitlines() for line in kept)
