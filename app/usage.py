"""Usage reports: requests, shown and accepted completions, tokens and latency per day, key, model and language.

Counts live in SQLite (``<cache_dir>/usage.sqlite3``): every gunicorn worker opens its own
connection after fork, in WAL mode with a busy timeout, and adds to one row per (day, key label,
model, language) with a single upsert, so concurrent workers never lose a count. Latency is kept
as a fixed histogram per row, not as samples. No prompt or completion text is written, ever.

Acceptance is inferred (:class:`AcceptanceTracker`): most clients never say whether a completion
was taken, but the next prompt of the same editor session shows it. Each worker remembers, per
session and for a few minutes, a digest of where the last shown completion's prompt ended and
that completion's text; a later prompt that continues from that place with the text (or its
first line) counts it as accepted.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

from marshmallow import Schema, fields

log = logging.getLogger(__name__)

# Upper edges (ms) of the latency buckets; one more bucket holds everything slower. An editor's
# completion takes 0.1-3 s on a CPU (README, Performance), so the edges are densest there.
LATENCY_EDGES_MS = (50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 30000)
LATENCY_COLUMNS = tuple(f"latency_{i}" for i in range(len(LATENCY_EDGES_MS) + 1))
COUNT_COLUMNS = ("requests", "shown", "accepted", "accepted_whole", "prompt_tokens", "completion_tokens")
SCHEMA_VERSION = 1
PRUNE_EVERY = 1000  # writes between two prunes in one worker
BUSY_TIMEOUT_MS = 5000

ANONYMOUS = "anonymous"
UNKNOWN = "unknown"
# A language id as editors send them (VS Code's "typescriptreact", "c#", "objective-c++"); anything else is unknown.
LANGUAGE_ID = re.compile(r"[a-z0-9][a-z0-9#+._-]{0,31}")
# The path header editors put at a prompt's top: "# Path: app/x.py", "// Path: src/a.ts", "<!-- Path: a.html -->".
PATH_HEADER = re.compile(r"^\W{1,4}\s*(?:Path|File|filepath|filename):\s*(\S+)", re.IGNORECASE | re.MULTILINE)
EXTENSIONS = {
    "py": "python", "pyi": "python", "js": "javascript", "mjs": "javascript", "cjs": "javascript",
    "jsx": "javascriptreact", "ts": "typescript", "tsx": "typescriptreact", "go": "go", "rs": "rust",
    "java": "java", "kt": "kotlin", "kts": "kotlin", "scala": "scala", "c": "c", "h": "c", "cc": "cpp",
    "cpp": "cpp", "cxx": "cpp", "hpp": "cpp", "hh": "cpp", "cs": "csharp", "rb": "ruby", "php": "php",
    "swift": "swift", "m": "objective-c", "mm": "objective-cpp", "sh": "shellscript", "bash": "shellscript",
    "zsh": "shellscript", "lua": "lua", "pl": "perl", "r": "r", "jl": "julia", "dart": "dart", "ex": "elixir",
    "exs": "elixir", "erl": "erlang", "hs": "haskell", "ml": "ocaml", "clj": "clojure", "sql": "sql",
    "html": "html", "htm": "html", "css": "css", "scss": "scss", "vue": "vue", "svelte": "svelte",
    "md": "markdown", "json": "json", "yaml": "yaml", "yml": "yaml", "toml": "toml", "xml": "xml",
    "tf": "terraform", "zig": "zig", "nim": "nim", "ps1": "powershell", "vim": "vim",
}


def language_of(declared: str | None, prompt: str, path: str | None = None) -> str:
    """The request's language: the editor's language id, else the file extension of the prompt's path header."""
    if declared:
        lowered = declared.strip().lower()
        return lowered if LANGUAGE_ID.fullmatch(lowered) else UNKNOWN
    if path is None:
        header = PATH_HEADER.search(prompt[:400])
        path = header.group(1) if header else None
    if path:
        extension = path.rsplit(".", 1)[-1].lower() if "." in path else ""
        return EXTENSIONS.get(extension, UNKNOWN)
    return UNKNOWN


def key_label(key: str | None) -> str:
    """How a key is named in reports: ``key-`` and the first 8 hex digits of its SHA-256, never the key."""
    if key is None:
        return ANONYMOUS
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def utc_day(timestamp: float) -> str:
    """The UTC day of a Unix time, as ``YYYY-MM-DD``."""
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d")


def latency_bucket(milliseconds: float) -> int:
    """The histogram bucket a latency falls in."""
    for index, edge in enumerate(LATENCY_EDGES_MS):
        if milliseconds <= edge:
            return index
    return len(LATENCY_EDGES_MS)


def percentile(histogram: Sequence[int], fraction: float) -> float | None:
    """A latency percentile (ms) from bucket counts, interpolated within its bucket; None with no samples.

    Past the last edge nothing is known but the edge itself, which is returned.
    """
    total = sum(histogram)
    if not total:
        return None
    rank = fraction * total
    seen = 0
    for index, count in enumerate(histogram):
        if count and seen + count >= rank:
            if index == len(LATENCY_EDGES_MS):
                return float(LATENCY_EDGES_MS[-1])
            low = LATENCY_EDGES_MS[index - 1] if index else 0
            return low + (LATENCY_EDGES_MS[index] - low) * (rank - seen) / count
        seen += count
    return float(LATENCY_EDGES_MS[-1])


@dataclass(frozen=True)
class UsageLabels:
    """What a usage row is counted under (besides its day)."""

    key: str
    model: str
    language: str


@dataclass
class UsageRow:
    """One row's counts: a day, its labels, the counters and the latency histogram."""

    day: str
    labels: UsageLabels
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_COLUMNS, 0))
    latency: list[int] = field(default_factory=lambda: [0] * len(LATENCY_COLUMNS))


class UsageStore:
    """The usage counts in SQLite: one connection per process (opened after fork), safe for many workers."""

    def __init__(self, path: Path, retention_days: int = 400, max_rows: int = 100_000,
                 clock: Callable[[], float] = time.time):
        self.path, self.retention_days, self.max_rows, self.clock = Path(path), retention_days, max_rows, clock
        self._lock = threading.Lock()  # one connection, many request threads
        self._connection: sqlite3.Connection | None = None
        self._pid: int | None = None
        self._writes = 0

    def _connect(self) -> sqlite3.Connection:
        """This process's connection (a forked child opens its own: SQLite connections must not cross a fork)."""
        if self._connection is not None and self._pid == os.getpid():
            return self._connection
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False,
                                     isolation_level=None)
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        connection.execute("PRAGMA journal_mode = WAL")  # readers never block the workers' writes
        connection.execute("PRAGMA synchronous = NORMAL")  # WAL stays consistent; a power cut may lose the last writes
        columns = ", ".join(f"{name} INTEGER NOT NULL DEFAULT 0" for name in (*COUNT_COLUMNS, *LATENCY_COLUMNS))
        connection.execute(f"CREATE TABLE IF NOT EXISTS usage (day TEXT NOT NULL, key TEXT NOT NULL, "
                           f"model TEXT NOT NULL, language TEXT NOT NULL, {columns}, "
                           "PRIMARY KEY (day, key, model, language))")
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._connection, self._pid, self._writes = connection, os.getpid(), 0
        self._prune(connection)
        return connection

    def add(self, day: str, labels: UsageLabels, counts: dict[str, int], latency_ms: float | None = None) -> bool:
        """Add ``counts`` (and one latency sample) to a row; False when the database refused (logged, not raised)."""
        values = {name: counts.get(name, 0) for name in COUNT_COLUMNS}
        values.update(dict.fromkeys(LATENCY_COLUMNS, 0))
        if latency_ms is not None:
            values[LATENCY_COLUMNS[latency_bucket(latency_ms)]] = 1
        names = list(values)
        sql = (f"INSERT INTO usage (day, key, model, language, {', '.join(names)}) "
               f"VALUES (?, ?, ?, ?, {', '.join('?' * len(names))}) ON CONFLICT (day, key, model, language) "
               f"DO UPDATE SET {', '.join(f'{n} = {n} + excluded.{n}' for n in names)}")
        try:
            with self._lock:
                connection = self._connect()
                connection.execute(sql, (day, labels.key, labels.model, labels.language, *values.values()))
                self._writes += 1
                if self._writes % PRUNE_EVERY == 0:
                    self._prune(connection)
        except sqlite3.Error as exc:  # a full disk or a locked database must not fail a completion
            log.warning("usage report not written (%s): %s", self.path, exc)
            return False
        return True

    def rows(self, since_day: str) -> list[UsageRow]:
        """Every row from ``since_day`` on, oldest first."""
        columns = (*COUNT_COLUMNS, *LATENCY_COLUMNS)
        with self._lock:
            cursor = self._connect().execute(
                f"SELECT day, key, model, language, {', '.join(columns)} FROM usage WHERE day >= ? ORDER BY day",
                (since_day,))
            fetched = cursor.fetchall()
        rows = []
        for day, key, model, language, *numbers in fetched:
            counts = dict(zip(COUNT_COLUMNS, numbers[:len(COUNT_COLUMNS)]))
            rows.append(UsageRow(day, UsageLabels(key, model, language), counts, list(numbers[len(COUNT_COLUMNS):])))
        return rows

    def _prune(self, connection: sqlite3.Connection) -> None:
        """Drop rows past the retention, then the oldest beyond ``max_rows`` (the file stays bounded)."""
        oldest = utc_day(self.clock() - self.retention_days * 86400)
        connection.execute("DELETE FROM usage WHERE day < ?", (oldest,))
        connection.execute("DELETE FROM usage WHERE rowid IN (SELECT rowid FROM usage ORDER BY day DESC "
                           "LIMIT -1 OFFSET ?)", (self.max_rows,))

    def close(self) -> None:
        """Close this process's connection."""
        with self._lock:
            if self._connection is not None and self._pid == os.getpid():
                self._connection.close()
            self._connection = None


# -- acceptance ------------------------------------------------------------------------

TAIL_CHARS = 64  # the end of a prompt that must reappear right before an accepted completion
ACCEPT_WINDOW_SECONDS = 600.0  # a shown completion not taken within this is forgotten
MAX_SESSIONS = 4096  # sessions remembered per worker (least recently used dropped first)
MAX_OCCURRENCES = 32  # places a later prompt is searched at for a completion's text


@dataclass(frozen=True)
class PromptEnd:
    """Where a prompt ended, as a keyed digest of its last characters (the text itself is not kept)."""

    digest: bytes
    chars: int


@dataclass(frozen=True)
class Shown:
    """A completion the session was shown: where its prompt ended, its text(s), and the row it is counted in."""

    end: PromptEnd
    texts: tuple[str, ...]
    day: str
    labels: UsageLabels
    at: float


@dataclass(frozen=True)
class Acceptance:
    """A shown completion a later prompt continued with: whole, or its first line only."""

    shown: Shown
    whole: bool


def first_line(text: str) -> str:
    """The completion up to the end of its first line of code (leading blank lines kept), trailing space dropped."""
    stripped = text.lstrip()
    if not stripped:
        return ""
    start = len(text) - len(stripped)
    end = text.find("\n", start)
    return (text if end < 0 else text[:end]).rstrip()


class AcceptanceTracker:
    """Each editor session's last shown completion, until a later prompt of the session resolves it.

    A later prompt accepts it when, at the place the earlier prompt ended, it continues with the
    completion's text (whole) or its first line; it keeps it pending while it ends inside that text
    (the typist is typing through it, or the same prompt came again); anything else resolves it as
    not accepted. Only the newest shown completion of a session is kept.
    """

    def __init__(self, window_seconds: float = ACCEPT_WINDOW_SECONDS, max_sessions: int = MAX_SESSIONS,
                 clock: Callable[[], float] = time.monotonic):
        self.window_seconds, self.max_sessions, self.clock = window_seconds, max_sessions, clock
        self._salt = secrets.token_bytes(16)  # the digests mean nothing outside this worker
        self._pending: OrderedDict[str, Shown] = OrderedDict()
        self._lock = threading.Lock()

    def prompt_end(self, prompt: str) -> PromptEnd:
        """The digest of where ``prompt`` ends."""
        tail = prompt[-TAIL_CHARS:]
        return PromptEnd(self._digest(tail), len(tail))

    def _digest(self, text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), key=self._salt, digest_size=16).digest()

    def _ends_at(self, prompt: str, position: int, end: PromptEnd) -> bool:
        """Whether an earlier prompt with ``end`` ended at ``position`` of ``prompt``."""
        return position >= end.chars and self._digest(prompt[position - end.chars:position]) == end.digest

    def remember(self, session: str, shown: Shown) -> None:
        """The session was shown a completion (it replaces any earlier one)."""
        with self._lock:
            self._pending[session] = shown
            self._pending.move_to_end(session)
            while len(self._pending) > self.max_sessions:
                self._pending.popitem(last=False)

    def resolve(self, session: str, prompt: str) -> Acceptance | None:
        """A new prompt of the session: the acceptance it shows of the pending completion, if any."""
        with self._lock:
            shown = self._pending.pop(session, None)
        if shown is None or self.clock() - shown.at > self.window_seconds:
            return None
        verdict = self.verdict(shown, prompt)
        if verdict == "pending":
            with self._lock:
                self._pending.setdefault(session, shown)  # unless a newer one came meanwhile
            return None
        return Acceptance(shown, verdict == "whole") if verdict in ("whole", "first_line") else None

    def verdict(self, shown: Shown, prompt: str) -> str:
        """How ``prompt`` continues from where the shown completion's prompt ended.

        ``whole`` or ``first_line``: with that text; ``pending``: it ends inside the text (or where
        the earlier prompt did); ``ignored``: anything else, or the place is not found.
        """
        for text in shown.texts:
            for candidate, verdict in ((text.rstrip(), "whole"), (first_line(text), "first_line")):
                if candidate.strip() and any(self._ends_at(prompt, at, shown.end)
                                             for at in _occurrences(prompt, candidate)):
                    return verdict
        for text in shown.texts:
            for typed in range(len(text)):
                if prompt.endswith(text[:typed]) and self._ends_at(prompt, len(prompt) - typed, shown.end):
                    return "pending"
        return "ignored"


def _occurrences(text: str, part: str) -> Iterable[int]:
    """Start indices of ``part`` in ``text``, the last first (at most MAX_OCCURRENCES)."""
    end = len(text)
    for _ in range(MAX_OCCURRENCES):
        found = text.rfind(part, 0, end)
        if found < 0:
            return
        yield found
        end = found + len(part) - 1


# -- the app's side ----------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """Aggregated figures of some rows."""

    requests: int
    shown: int
    accepted: int
    accepted_whole: int
    prompt_tokens: int
    completion_tokens: int
    latency: tuple[int, ...]

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted over shown (None when nothing was shown)."""
        return self.accepted / self.shown if self.shown else None

    def as_dict(self) -> dict:
        """The figures as the reports API sends them."""
        return {"requests": self.requests, "shown": self.shown, "accepted": self.accepted,
                "accepted_whole": self.accepted_whole, "acceptance_rate": self.acceptance_rate,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "latency_ms": {"p50": percentile(self.latency, 0.5), "p90": percentile(self.latency, 0.9),
                               "p99": percentile(self.latency, 0.99)}}


def summarize(rows: Iterable[UsageRow]) -> Report:
    """The rows' counts added up."""
    counts = dict.fromkeys(COUNT_COLUMNS, 0)
    latency = [0] * len(LATENCY_COLUMNS)
    for row in rows:
        for name in COUNT_COLUMNS:
            counts[name] += row.counts[name]
        latency = [a + b for a, b in zip(latency, row.latency)]
    return Report(**counts, latency=tuple(latency))


def grouped(rows: Sequence[UsageRow], label: Callable[[UsageRow], str]) -> list[tuple[str, Report]]:
    """The rows summarized per label, the most requested first."""
    groups: dict[str, list[UsageRow]] = {}
    for row in rows:
        groups.setdefault(label(row), []).append(row)
    reports = [(name, summarize(members)) for name, members in groups.items()]
    return sorted(reports, key=lambda item: (-item[1].requests, item[0]))


class UsageReports:
    """Counts completion requests into the store, infers acceptance, and answers the reports API."""

    def __init__(self, store: UsageStore, tracker: AcceptanceTracker, on_accepted: Callable[[Acceptance], None],
                 on_shown: Callable[[str], None], clock: Callable[[], float] = time.time):
        self.store, self.tracker, self.clock = store, tracker, clock
        self.on_accepted, self.on_shown = on_accepted, on_shown

    def begin(self, session: str, labels: UsageLabels, prompt: str) -> "Counting":
        """A completion request starts: resolve the session's pending completion; count this one when it ends."""
        acceptance = self.tracker.resolve(session, prompt)
        if acceptance is not None:
            whole = int(acceptance.whole)
            self.store.add(acceptance.shown.day, acceptance.shown.labels, {"accepted": 1, "accepted_whole": whole})
            self.on_accepted(acceptance)
        return Counting(self, session, labels, self.tracker.prompt_end(prompt))

    def report(self, days: int) -> dict:
        """The reports API's body: totals, per day, and per key, model and language, over the last ``days`` days."""
        now = self.clock()
        since = utc_day(now - (days - 1) * 86400)
        rows = self.store.rows(since)
        start = datetime.strptime(since, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        every_day = [(start + timedelta(days=i)).strftime("%Y-%m-%d") for i in range(days)]
        per_day = dict(grouped(rows, lambda row: row.day))
        empty = summarize(())
        return _REPORT.dump({
            "since": since, "until": utc_day(now), "latency_buckets_ms": list(LATENCY_EDGES_MS),
            "totals": summarize(rows).as_dict(),
            "days": [{"day": day, **per_day.get(day, empty).as_dict()} for day in every_day],
            "keys": [{"key": name, **report.as_dict()} for name, report in grouped(rows, lambda r: r.labels.key)],
            "models": [{"model": name, **report.as_dict()}
                       for name, report in grouped(rows, lambda r: r.labels.model)],
            "languages": [{"language": name, **report.as_dict()}
                          for name, report in grouped(rows, lambda r: r.labels.language)],
        })


class LatencySchema(Schema):
    """Latency percentiles in ms, interpolated from the rows' histograms (null: no requests)."""

    p50 = fields.Float(allow_none=True, required=True)
    p90 = fields.Float(allow_none=True, required=True)
    p99 = fields.Float(allow_none=True, required=True)


class FiguresSchema(Schema):
    """The figures of a group of requests."""

    requests = fields.Integer(required=True, metadata={"description": "completion requests (any outcome)"})
    shown = fields.Integer(required=True, metadata={
        "description": "answered whole (status 200, not cancelled) with some non-blank text"})
    accepted = fields.Integer(required=True, metadata={
        "description": "shown completions a later prompt of the same session continued with (inferred), whole or "
                       "their first line; counted on the day and labels of the completion"})
    accepted_whole = fields.Integer(required=True)
    acceptance_rate = fields.Float(allow_none=True, required=True, metadata={"description": "accepted / shown"})
    prompt_tokens = fields.Integer(required=True)
    completion_tokens = fields.Integer(required=True)
    latency_ms = fields.Nested(LatencySchema, required=True)


class DayFiguresSchema(FiguresSchema):
    """The figures of one day."""

    day = fields.String(required=True, metadata={"description": "UTC day, YYYY-MM-DD"})


class KeyFiguresSchema(FiguresSchema):
    """The figures of one key."""

    key = fields.String(required=True, metadata={
        "description": "`anonymous` (no keys configured) or `key-` + the first 8 hex digits of the key's SHA-256"})


class ModelFiguresSchema(FiguresSchema):
    """The figures of one model."""

    model = fields.String(required=True)


class LanguageFiguresSchema(FiguresSchema):
    """The figures of one language."""

    language = fields.String(required=True, metadata={
        "description": "the editor's language id, else from the prompt's path header, else `unknown`"})


class UsageReportSchema(Schema):
    """``GET /ui/api/usage``: the figures of the last ``days`` days."""

    since = fields.String(required=True)
    until = fields.String(required=True)
    latency_buckets_ms = fields.List(fields.Integer(), required=True, metadata={
        "description": "upper edges of the latency histogram's buckets (one more holds anything slower)"})
    totals = fields.Nested(FiguresSchema, required=True)
    days = fields.List(fields.Nested(DayFiguresSchema), required=True, metadata={"description": "every day, oldest first"})
    keys = fields.List(fields.Nested(KeyFiguresSchema), required=True, metadata={"description": "most requests first"})
    models = fields.List(fields.Nested(ModelFiguresSchema), required=True)
    languages = fields.List(fields.Nested(LanguageFiguresSchema), required=True)


_REPORT = UsageReportSchema()


@dataclass
class Counting:
    """One completion request being counted: written once, when it ends."""

    reports: UsageReports
    session: str
    labels: UsageLabels
    prompt_end: PromptEnd

    def finish(self, status: int, complete: bool, usage: tuple[int, int], latency_ms: float,
               texts: Sequence[str]) -> None:
        """Count the request; a completion answered whole (not cancelled) with some text is shown."""
        now = self.reports.clock()
        shown = status == 200 and complete and any(text.strip() for text in texts)
        day = utc_day(now)
        self.reports.store.add(day, self.labels, {"requests": 1, "shown": int(shown), "prompt_tokens": usage[0],
                                                  "completion_tokens": usage[1]}, latency_ms)
        if shown:
            self.reports.on_shown(self.labels.model)
            tracker = self.reports.tracker
            tracker.remember(self.session, Shown(self.prompt_end, tuple(texts), day, self.labels, tracker.clock()))
