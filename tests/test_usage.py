"""Usage reports without HTTP: the SQLite store (many processes, restarts, bounds) and acceptance inference
on scripted editing sessions (what it gets right, and the cases it is known to get wrong)."""
from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from app.usage import (LATENCY_EDGES_MS, AcceptanceTracker, Shown, UsageLabels, UsageStore, first_line, key_label,
                       language_of, percentile, summarize, utc_day)

LABELS = UsageLabels("anonymous", "tiny", "python")
DAY = 86400.0


# -- the store ---------------------------------------------------------------------------


def _add_many(path: str, store: UsageStore | None, count: int, label: str) -> None:
    """A worker process: ``count`` requests counted into the shared database."""
    store = store or UsageStore(path)
    for number in range(count):
        store.add("2026-01-01", UsageLabels(label, "tiny", "python"),
                  {"requests": 1, "shown": number % 2, "prompt_tokens": 10, "completion_tokens": 3}, 120.0)
    store.close()


def test_concurrent_workers_lose_no_count(tmp_path):
    """Four forked workers, one store object made before the fork (each opens its own connection), count at once."""
    path = tmp_path / "usage.sqlite3"
    store = UsageStore(path)
    store.add("2026-01-01", UsageLabels("parent", "tiny", "python"), {"requests": 1})  # the parent's connection
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_add_many, args=(str(path), store, 150, f"key-{i % 2}")) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    rows = {row.labels.key: row for row in UsageStore(path).rows("2026-01-01")}
    assert set(rows) == {"parent", "key-0", "key-1"}
    for key in ("key-0", "key-1"):
        counts = rows[key].counts
        assert counts["requests"] == 300 and counts["shown"] == 150
        assert counts["prompt_tokens"] == 3000 and counts["completion_tokens"] == 900
        assert sum(rows[key].latency) == 300
    assert rows["parent"].counts["requests"] == 1
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_counts_survive_a_restart(tmp_path):
    """A new store on the same file (a restarted or reloaded server) adds to the same rows."""
    path = tmp_path / "usage.sqlite3"
    first = UsageStore(path)
    first.add("2026-01-01", LABELS, {"requests": 2, "shown": 1}, 80.0)
    first.close()
    second = UsageStore(path)
    second.add("2026-01-01", LABELS, {"requests": 1, "accepted": 1}, 400.0)
    (row,) = second.rows("2026-01-01")
    assert row.counts["requests"] == 3 and row.counts["shown"] == 1 and row.counts["accepted"] == 1
    assert sum(row.latency) == 2


def test_store_is_bounded_by_retention_and_rows(tmp_path):
    """Rows older than the retention go when a worker opens the file; beyond max_rows the oldest days go."""
    now = [1_800_000_000.0]
    path = tmp_path / "usage.sqlite3"
    store = UsageStore(path, retention_days=30, max_rows=5, clock=lambda: now[0])
    for back in range(40):
        store.add(utc_day(now[0] - back * DAY), LABELS, {"requests": 1})
    store.close()
    reopened = UsageStore(path, retention_days=30, max_rows=5, clock=lambda: now[0])
    days = [row.day for row in reopened.rows("2000-01-01")]
    assert days == sorted(utc_day(now[0] - back * DAY) for back in range(5))
    reopened.close()
    kept = UsageStore(path, retention_days=2, max_rows=100, clock=lambda: now[0])
    assert [row.day for row in kept.rows("2000-01-01")] == sorted(utc_day(now[0] - b * DAY) for b in range(3))


def test_a_broken_database_does_not_fail_the_request(tmp_path, caplog):
    """A path that cannot be a database: the count is dropped with a warning, nothing raised."""
    (tmp_path / "usage.sqlite3").write_bytes(b"this is not a database" * 100)
    store = UsageStore(tmp_path / "usage.sqlite3")
    assert store.add("2026-01-01", LABELS, {"requests": 1}) is False
    assert "usage report not written" in caplog.text


def test_percentiles_come_from_the_histogram():
    """Percentiles interpolate inside their bucket; past the last edge only the edge is known."""
    histogram = [0] * (len(LATENCY_EDGES_MS) + 1)
    histogram[2] = 10  # ten requests between 100 and 200 ms
    assert percentile(histogram, 0.5) == pytest.approx(150.0)
    assert percentile(histogram, 1.0) == pytest.approx(200.0)
    histogram[-1] = 90
    assert percentile(histogram, 0.99) == LATENCY_EDGES_MS[-1]
    assert percentile([0] * len(histogram), 0.5) is None


def test_labels():
    """Keys are named by a short hash, languages by the editor's id or the path header's extension."""
    assert key_label(None) == "anonymous"
    label = key_label("sk-secret-key")
    assert label.startswith("key-") and len(label) == 12 and "secret" not in label
    assert language_of("TypeScriptReact", "") == "typescriptreact"
    assert language_of("not a language id!", "") == "unknown"
    assert language_of(None, "# Path: app/engine.py\nimport os\n") == "python"
    assert language_of(None, "// Path: src/index.ts\n") == "typescript"
    assert language_of(None, "x = 1\n") == "unknown"
    assert language_of(None, "x = 1\n", path="lib/a.rs") == "rust"


# -- acceptance inference on scripted sessions ------------------------------------------------

FILE_TOP = "# Path: fib.py\nimport functools\n\n\n"
COMPLETION = "    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"


class Session:
    """A typist in one editor session: prompts go to the tracker, shown completions are remembered."""

    def __init__(self, tracker: AcceptanceTracker, name: str = "s1"):
        self.tracker, self.name = tracker, name
        self.accepted: list[bool] = []  # each acceptance: whole (True) or first line (False)

    def request(self, prompt: str, shown: str | None = None) -> None:
        """One completion request: its prompt resolves the last shown completion; ``shown`` is its answer."""
        acceptance = self.tracker.resolve(self.name, prompt)
        if acceptance is not None:
            self.accepted.append(acceptance.whole)
        if shown is not None:
            self.tracker.remember(self.name, Shown(self.tracker.prompt_end(prompt), (shown,), "2026-01-01", LABELS,
                                                   self.tracker.clock()))


@pytest.fixture()
def tracker():
    """A fresh acceptance tracker."""
    return AcceptanceTracker()


def test_accepted_whole(tracker):
    """Tab: the next prompt holds the whole completion where the cursor was, then more typing."""
    typist = Session(tracker)
    prompt = FILE_TOP + "def fib(n):\n"
    typist.request(prompt, COMPLETION)
    typist.request(prompt + COMPLETION + "\n\nprint(")
    assert typist.accepted == [True]


def test_accepted_first_line(tracker):
    """Accept-line: the first line is taken, the rest is typed differently."""
    typist = Session(tracker)
    prompt = FILE_TOP + "def fib(n):\n"
    typist.request(prompt, COMPLETION)
    typist.request(prompt + "    if n < 2:\n        return 1\n")
    assert typist.accepted == [False]


def test_ignored_and_typed_something_else(tracker):
    """The typist types on with other code: not accepted, and the completion is forgotten."""
    typist = Session(tracker)
    prompt = FILE_TOP + "def fib(n):\n"
    typist.request(prompt, COMPLETION)
    typist.request(prompt + "    return functools.reduce(")
    typist.request(prompt + "    return functools.reduce(" + "\n" + COMPLETION)  # too late: it was resolved
    assert typist.accepted == []


def test_typing_through_keeps_it_pending(tracker):
    """Typing the completion's first characters (no new completion shown), then Tab: accepted."""
    typist = Session(tracker)
    prompt = FILE_TOP + "def fib(n):\n"
    typist.request(prompt, COMPLETION)
    typist.request(prompt + "    if")  # cancelled or nothing shown
    typist.request(prompt)  # the same prompt again (cursor moved back and forth)
    typist.request(prompt + COMPLETION)
    assert typist.accepted == [True]


def test_abandoned_requests_do_not_count_but_resolve(tracker):
    """Requests cancelled at the next keystroke show nothing; the shown one before them is still resolved."""
    typist = Session(tracker)
    prompt = FILE_TOP + "def fib(n):\n"
    typist.request(prompt, COMPLETION)
    for typed in ("    r", "    re", "    ret"):  # each cancelled by the next keystroke: nothing shown
        typist.request(prompt + typed)
    typist.request(prompt + "    ret" + "urn fib(n)")
    assert typist.accepted == []


def test_newest_shown_completion_is_the_one_resolved(tracker):
    """Two completions shown in turn: accepting the second counts once."""
    typist = Session(tracker)
    prompt = FILE_TOP + "def fib(n):\n    "
    typist.request(prompt, "return n\n")
    typist.request(prompt + "if", " n < 2:\n        return n\n")
    typist.request(prompt + "if n < 2:\n        return n\n    ")
    assert typist.accepted == [True]


def test_window_trimmed_prompt_still_found(tracker):
    """The client cut the prompt's start to its budget: the place is found by the text before the cursor."""
    typist = Session(tracker)
    top = "x = 0\n" * 300
    prompt = top + "def fib(n):\n"
    typist.request(prompt, COMPLETION)
    typist.request((prompt + COMPLETION + "\n")[-1000:])
    assert typist.accepted == [True]


def test_sessions_are_separate(tracker):
    """Another session's next prompt says nothing about this session's completion."""
    alice, bob = Session(tracker, "alice"), Session(tracker, "bob")
    prompt = FILE_TOP + "def fib(n):\n"
    alice.request(prompt, COMPLETION)
    bob.request(prompt + COMPLETION)
    alice.request(prompt + COMPLETION)
    assert bob.accepted == [] and alice.accepted == [True]


def test_pending_completions_expire():
    """A completion taken after the window is not counted (nor kept)."""
    now = [0.0]
    typist = Session(AcceptanceTracker(window_seconds=600, clock=lambda: now[0]))
    prompt = FILE_TOP + "def fib(n):\n"
    typist.request(prompt, COMPLETION)
    now[0] = 601.0
    typist.request(prompt + COMPLETION)
    assert typist.accepted == []


def test_sessions_are_bounded():
    """Past max_sessions the least recently used session's completion is dropped."""
    tracker = AcceptanceTracker(max_sessions=2)
    typists = [Session(tracker, f"s{i}") for i in range(3)]
    for typist in typists:
        typist.request("def f():\n", "    return 1\n")
    for typist in typists:
        typist.request("def f():\n    return 1\n")
    assert [t.accepted for t in typists] == [[], [True], [True]]


# Known errors, asserted so that a change in them is noticed (README: "How exact is 'accepted'").

def test_known_false_positive_typed_by_hand(tracker):
    """The typist ignored the ghost text but typed the very same code: counted as accepted."""
    typist = Session(tracker)
    prompt = FILE_TOP + "x = "
    typist.request(prompt, "1\n")
    typist.request(prompt + "1\n")
    assert typist.accepted == [True]


def test_known_false_negative_edited_before_the_next_request(tracker):
    """Accepted, then its first line changed before the next request was sent: not counted."""
    typist = Session(tracker)
    prompt = FILE_TOP + "def fib(n):\n"
    typist.request(prompt, COMPLETION)
    typist.request(prompt + COMPLETION.replace("n < 2", "n <= 1"))
    assert typist.accepted == []


def test_whitespace_only_completions_are_never_judged(tracker):
    """A completion of blank lines cannot be told from the typist's own Enter: never counted as accepted."""
    typist = Session(tracker)
    prompt = FILE_TOP + "def fib(n):\n    return n\n"
    typist.request(prompt, "\n\n")
    typist.request(prompt + "\n\nprint(fib(3))")
    assert typist.accepted == []


def test_known_false_negative_first_word_only(tracker):
    """Accept-word takes less than the first line: not counted."""
    typist = Session(tracker)
    prompt = FILE_TOP + "def fib(n):\n"
    typist.request(prompt, COMPLETION)
    typist.request(prompt + "    if x")
    assert typist.accepted == []


def test_first_line():
    """The first line of code, leading blank lines kept, trailing space dropped; nothing for blank text."""
    assert first_line("    a = 1\n    b = 2\n") == "    a = 1"
    assert first_line("\n\n    a = 1\n") == "\n\n    a = 1"
    assert first_line(" \n ") == ""


def test_summarize_adds_rows(tmp_path):
    """Figures of several rows are their sums; the rate is accepted over shown."""
    store = UsageStore(tmp_path / "u.sqlite3")
    store.add("2026-01-01", LABELS, {"requests": 3, "shown": 2, "accepted": 1}, 100.0)
    store.add("2026-01-02", UsageLabels("key-1", "tiny", "go"), {"requests": 1, "shown": 1}, 3000.0)
    report = summarize(store.rows("2026-01-01"))
    assert (report.requests, report.shown, report.accepted) == (4, 3, 1)
    assert report.acceptance_rate == pytest.approx(1 / 3)
    assert sum(report.latency) == 2
