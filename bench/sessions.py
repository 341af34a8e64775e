"""Editor sessions: four plugins' request patterns, and a plain client's, while a developer types through a file.

The typist re-types ``textwrap.py`` of the standard library from line 150, in bursts of
keystrokes (``burst`` steps ``window_s`` apart), and waits for the answer to the last
keystroke of each burst. What the client does with the other keystrokes is its own:

- **fauxpilot**: 150 ms debounce (fauxpilot.suggestionDelay), so only a burst's last keystroke
  sends; not streamed; never cancels, each request waits for the previous one.
- **copilot**: no debounce; every keystroke streams a request, and the next keystroke closes it.
- **continue**: 350 ms debounce, so only a burst's last keystroke sends; streamed.
- **llamavscode**: no debounce, one request at a time (isRequestInProgress): the first keystroke
  of a burst sends, later ones wait for it (its HTTP request is never aborted) and are dropped
  when the next keystroke comes; the last waits, then sends. After each shown completion it
  sends a speculative request for the accepted suggestion and queues context chunks; every
  ``pause_every`` answers the typist pauses ``pause_s`` s, saves (a chunk around the cursor is
  queued) and 3 s into the pause the ring update sends a warm-up request with ``n_predict: 0``
  (the plugin's 1 s ring timer acts once 3 s have passed since its last completion request began).

- **edit**: a plain OpenAI /v1/completions client re-typing UserString's r-methods in
  collections/__init__.py (they mirror methods above them, see bench/editors.py): only a burst's
  last keystroke sends, streamed, greedy, 128 tokens, no stops; for its decode speed and the
  server's speculation counters.

Every session reads the server's speculation and prefix-cache counters from /metrics before and
after (ours has them; absent counters are reported as None); a server made of several instances
(behind nginx) is read instance by instance. Each client sends the headers that name it (its key,
Copilot's session ids). With ``editors`` above 1, that many developers type at once, each from a
loopback address of its own and in a file of its own (the first in the session's file, the others
in other standard-library files), and their requests are summarized together. Awaited latency counts from the moment the client
would send (after its own debounce) to the answer, including any wait for the client's previous
request. Other clients do nothing while the typist pauses, so their sessions skip the pauses.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .client import (ABANDONED, DONE, ERROR, TIMEOUT, Outcome, cache_delta, complete, read_cache_counters,
                     read_spec_counters, spec_delta)
from .corpus import Corpus, edit_source, keystroke_source
from .editors import (EDIT_CONTEXT, EDIT_MAX_TOKENS, EDIT_SUFFIX_LINES, LLAMA_RING_IDLE_S, Doc, Ring, TypingScript,
                      continue_body, continue_prompt, copilot_body, copilot_context, copilot_headers,
                      copilot_prompt, edit_body,
                      edit_start_line, fauxpilot_body, future_fields, infill_body, infill_fields, warmup_body)
from .servers import Server
from .stats import decode_speed, median, percentile

SESSIONS = ("fauxpilot", "copilot", "continue", "llamavscode", "edit")
LABELS = {"fauxpilot": "FauxPilot", "copilot": "Copilot", "continue": "Continue", "llamavscode": "llama.vscode",
          "edit": "plain client (edit)"}
UNSUPPORTED = (404, 405, 501)  # the server has no such route, or refuses it for this model
MODEL = "codegen"
POLL_S = 0.15  # llama.vscode's DELAY_BEFORE_COMPL_REQUEST: how often a waiting keystroke looks again


@dataclass(frozen=True)
class SessionOptions:
    """How the developer types, and the knobs of the clients that depend on the model."""

    awaited: int = 24          # answers waited for (one per burst)
    chars_per_step: int = 6    # characters typed per keystroke
    burst: int = 4             # keystrokes per burst; the last one's answer is awaited
    window_s: float = 0.1      # time between keystrokes in a burst
    start_line: int = 150      # where typing starts (0-based; FauxPilot changes its prompt past line 150)
    source: str = ""           # the file typed through (default: textwrap.py of this Python)
    timeout_s: float = 60.0    # cap on each request
    pause_every: int = 6       # llama.vscode: answers between the typist's pauses
    pause_s: float = 4.0       # a pause: long enough for llama.vscode's ring update (3 s idle, 1 s timer)
    ring_files: int = 8        # llama.vscode: other files visited before the session (a chunk each in the ring)
    seed: int = 13             # for the random choices the plugins make (chunk places, snippet order)
    context_window: int = 8192  # the model's context (Copilot's budget is capped to fit it)
    edit_file: str = ""        # edit session: the file (default: collections/__init__.py of this Python)
    edit_line: int = -1        # edit session: the line typing starts at (-1: UserString.rfind's, see editors.py)
    edit_tokens: int = EDIT_MAX_TOKENS        # edit session: max_tokens of each request
    edit_context: int = EDIT_CONTEXT          # edit session: prompt budget in tokens
    edit_suffix_lines: int = EDIT_SUFFIX_LINES  # edit session: lines after the cursor sent as suffix
    editors: int = 1           # developers typing at once, each with its own client, address and file


class Session:
    """One client's requests against one server: sends them, records them, keeps background ones."""

    def __init__(self, server: Server, options: SessionOptions, headers: dict[str, str] | None = None,
                 source: str | None = None):
        self.server, self.options = server, options
        self.headers, self.source = headers or {}, source  # the client's identity, and the address it sends from
        self.records: list[dict[str, Any]] = []
        self.unsupported: str | None = None
        self.inflight: threading.Thread | None = None  # llama.vscode's one request in progress
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _body(self, path: str, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        """The body as this server gets it: greedy, its extra fields, without the fields it refuses."""
        full = {"temperature": 0, **body}
        if path != "/infill":
            full = {"model": MODEL, **full, **self.server.extra_body}
            if stream:
                full.update(self.server.stream_body)
        return {k: v for k, v in full.items() if k not in self.server.drop_fields}

    def send(self, kind: str, step: int, path: str, body: dict[str, Any], stream: bool, *, limit: float,
             abandon: bool = False, waited_s: float = 0.0, truth: str | None = None) -> Outcome:
        """Send one request and record it (thread-safe); note the first refusal of an unsupported route."""
        outcome = complete(self.server.url, self._body(path, body, stream), stream, limit=limit, abandon=abandon,
                           path=path, headers=self.headers, source=self.source)
        record = {"kind": kind, "step": step, "editor": self.source, "status": outcome.status, "http_status": outcome.http_status,
                  "ttft_ms": _ms(outcome.ttft), "latency_ms": _ms(outcome.latency), "waited_ms": _ms(waited_s),
                  "last_ms": _ms(outcome.last), "completion_tokens": outcome.completion_tokens,
                  "prompt_tokens": outcome.prompt_tokens, "cached_tokens": outcome.cached_tokens,
                  "n_predict": body.get("n_predict", body.get("max_tokens")), "error": outcome.error}
        if kind == "awaited":
            record.update(completion=outcome.text, truth=truth)
        with self._lock:
            self.records.append(record)
            if outcome.http_status in UNSUPPORTED and self.unsupported is None:
                self.unsupported = f"unsupported: {path} answered {outcome.error}"[:300]
        return outcome

    def background(self, kind: str, step: int, path: str, body: dict[str, Any], stream: bool) -> threading.Thread:
        """Send a request from a thread that nobody waits for (it is never aborted)."""
        thread = threading.Thread(target=self.send, args=(kind, step, path, body, stream),
                                  kwargs={"limit": self.options.timeout_s}, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def join(self) -> None:
        """Wait for the background requests (each is capped by the request timeout)."""
        for thread in self._threads:
            thread.join(self.options.timeout_s + 5)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _other_files(corpus: Corpus, source: Path, count: int, lines: int, rng: random.Random) -> list[tuple[str, str]]:
    """(file name, ``lines`` consecutive lines from a random place) of ``count`` other stdlib files."""
    others = [p for p in corpus.files if p.name != source.name]
    picked = []
    for path in rng.sample(others, min(count, len(others))):
        text = path.read_text(encoding="utf-8", errors="replace").split("\n")
        start = rng.randrange(max(1, len(text) - lines))
        picked.append((path.name, "\n".join(text[start:start + lines])))
    return picked


class Editor:
    """A client's request pattern; the subclasses build its requests from the document."""

    name = ""
    path = "/v1/completions"
    stream = False
    debounce_s = 0.0
    in_burst = "skip"  # what an unanswered keystroke inside a burst does: skip | abandon | serial
    uses_pauses = False  # whether the client does anything while the typist pauses (else the bench skips pauses)

    def __init__(self, corpus: Corpus, options: SessionOptions, source: Path, index: int = 0):
        self.corpus, self.options, self.source = corpus, options, source
        self.rng = random.Random(options.seed + index)
        # A generator of its own, so that the identity does not change the plugin's random choices.
        self.identity = random.Random(f"{options.seed}-identity-{index}")

    def headers(self) -> dict[str, str]:
        """The headers the client sends with every request (what names it to a proxy)."""
        return {}

    @classmethod
    def target(cls, options: SessionOptions) -> tuple[Path, int]:
        """The file typed through and the line typing starts at."""
        return (Path(options.source) if options.source else keystroke_source()), options.start_line

    def request(self, doc: Doc) -> dict[str, Any]:
        """The request body for the document at this keystroke."""
        raise NotImplementedError

    def prepare(self, session: Session) -> None:
        """Before typing starts."""

    def answered(self, session: Session, doc: Doc, step: int, outcome: Outcome) -> None:
        """After an awaited answer arrived."""

    def pause(self, session: Session, doc: Doc, step: int, seconds: float) -> None:
        """The typist pauses for ``seconds``."""
        time.sleep(seconds)


class FauxPilot(Editor):
    """Venthe/vscode-fauxpilot: head + window prompt, one line, not streamed, 150 ms debounce."""

    name, debounce_s = "fauxpilot", 0.15

    def headers(self) -> dict[str, str]:
        """Its axios mode (the default): no key at all (tests/test_client_requests.py)."""
        return {"User-Agent": "axios/1.5.0"}

    def request(self, doc: Doc) -> dict[str, Any]:
        """fauxpilot_body: the plugin's getPrompt rule."""
        return fauxpilot_body(doc)


class Copilot(Editor):
    """completions-core: budgeted prefix, suffix from the next line, extra.context, streamed, cancels."""

    name, stream, in_burst = "copilot", True, "abandon"

    def __init__(self, corpus: Corpus, options: SessionOptions, source: Path, index: int = 0):
        super().__init__(corpus, options, source, index)
        self.identity_headers = copilot_headers(self.identity)
        # Similar-file snippets of neighbouring tabs: up to 4 windows of 60 lines (chosen once per session).
        self.context = copilot_context(source.name, _other_files(corpus, source, 4, 60, self.rng))

    def headers(self) -> dict[str, str]:
        """Its session and machine ids and a token (copilot_headers)."""
        return self.identity_headers

    def request(self, doc: Doc) -> dict[str, Any]:
        """copilot_body over the budgeted prompt."""
        prompt = copilot_prompt(doc, self.context, self.corpus.count, self.options.context_window)
        return copilot_body(prompt, doc)


class Continue(Editor):
    """core/autocomplete: ~307-token prefix, shuffled commented snippets, suffix, streamed, 350 ms debounce."""

    name, stream, debounce_s = "continue", True, 0.35

    def __init__(self, corpus: Corpus, options: SessionOptions, source: Path, index: int = 0):
        super().__init__(corpus, options, source, index)
        self.key = f"sk-continue-{self.identity.getrandbits(32):08x}"  # each developer's own
        self.snippets = [(f"Lib/{name}", text) for name, text in _other_files(corpus, source, 6, 15, self.rng)]

    def headers(self) -> dict[str, str]:
        """Its configured key, as Bearer and as api-key (tests/test_client_requests.py)."""
        return {"Authorization": f"Bearer {self.key}", "api-key": self.key}

    def request(self, doc: Doc) -> dict[str, Any]:
        """continue_body with a fresh shuffle of the snippets."""
        return continue_body(*continue_prompt(doc, self.snippets, self.corpus.count, self.rng))


class LlamaVscode(Editor):
    """ggml-org/llama.vscode: /infill with a ring of extra chunks, speculative and warm-up requests."""

    name, path, in_burst, uses_pauses = "llamavscode", "/infill", "serial", True

    def __init__(self, corpus: Corpus, options: SessionOptions, source: Path, index: int = 0):
        super().__init__(corpus, options, source, index)
        self.ring = Ring()
        self.fields = None

    def request(self, doc: Doc) -> dict[str, Any]:
        """infill_body with the ring's chunks as they are now."""
        self.fields = infill_fields(doc)
        return infill_body(self.fields, list(self.ring.chunks))

    def prepare(self, session: Session) -> None:
        """Chunks from files visited before (an editor switch picks around the cursor), then one warm-up."""
        for name, text in _other_files(self.corpus, self.source, self.options.ring_files, 200, self.rng):
            lines = text.split("\n")
            self.ring.pick_around(lines, self.rng.randrange(len(lines)), name, self.rng)
        while self.ring.update():
            pass
        session.send("warm-up", -1, self.path, warmup_body(list(self.ring.chunks)), False,
                     limit=self.options.timeout_s * 5)

    def answered(self, session: Session, doc: Doc, step: int, outcome: Outcome) -> None:
        """Ask ahead for the accepted suggestion (cacheFutureSuggestion), then gather chunks near the cursor."""
        if outcome.status != DONE or self.fields is None:
            return
        future = future_fields(self.fields, outcome.text)
        if future is not None:
            session.background("speculative", step, self.path, infill_body(future, list(self.ring.chunks)), False)
        self.ring.pick_near(doc, self.rng)

    def pause(self, session: Session, doc: Doc, step: int, seconds: float) -> None:
        """The typist saves (a chunk around the cursor is queued); 3 s idle, the ring update sends a warm-up."""
        self.ring.pick_around(doc.text.split("\n"), doc.line, doc.path, self.rng)
        idle = min(seconds, LLAMA_RING_IDLE_S)
        time.sleep(idle)
        if seconds > idle and self.ring.update():  # the 1 s ring timer fires within the pause
            session.background("warm-up", step, self.path, warmup_body(list(self.ring.chunks)), False)
        time.sleep(seconds - idle)


class Edit(Editor):
    """A plain OpenAI client: the file before the cursor (cut once to a budget), a suffix, streamed, greedy.

    No debounce and nothing sent inside a burst, so every request is an awaited one and its
    decode speed is not disturbed by cancelled neighbours.
    """

    name, stream = "edit", True

    def __init__(self, corpus: Corpus, options: SessionOptions, source: Path, index: int = 0):
        super().__init__(corpus, options, source, index)
        self.start: int | None = None  # where the prompt begins, fixed at the first request
        self.key = f"sk-edit-{self.identity.getrandbits(32):08x}"

    def headers(self) -> dict[str, str]:
        """An OpenAI SDK's Bearer key."""
        return {"Authorization": f"Bearer {self.key}"}

    @classmethod
    def target(cls, options: SessionOptions) -> tuple[Path, int]:
        """UserString.rfind in collections/__init__.py unless --edit-file/--edit-line say otherwise."""
        source = Path(options.edit_file) if options.edit_file else edit_source()
        if options.edit_line >= 0:
            return source, options.edit_line
        line = edit_start_line(source.read_text(encoding="utf-8"))
        if line is None:  # another Python's file without the method: the middle of the file
            line = source.read_text(encoding="utf-8").count("\n") // 2
        return source, line

    def request(self, doc: Doc) -> dict[str, Any]:
        """edit_body from the session's fixed prompt start."""
        if self.start is None:
            self.start = self.corpus.tail_start(doc.text, doc.offset, self.options.edit_context)
        return edit_body(doc, self.start, self.options.edit_tokens, self.options.edit_suffix_lines)


EDITORS = {"fauxpilot": FauxPilot, "copilot": Copilot, "continue": Continue, "llamavscode": LlamaVscode, "edit": Edit}


def _in_burst(editor: Editor, session: Session, doc: Doc, step: int, keystroke: float) -> None:
    """A keystroke whose answer nobody waits for; then the typist's pace until the next one."""
    options = session.options
    if editor.debounce_s < options.window_s:  # a debounce longer than the gap: the next keystroke drops it
        if editor.in_burst == "abandon":
            session.send("in-burst", step, editor.path, editor.request(doc), editor.stream,
                         limit=options.window_s, abandon=True)
        elif editor.in_burst == "serial" and (session.inflight is None or not session.inflight.is_alive()):
            session.inflight = session.background("in-burst", step, editor.path, editor.request(doc), editor.stream)
    time.sleep(max(0.0, options.window_s - (time.perf_counter() - keystroke)))


def _awaited(editor: Editor, session: Session, script: TypingScript, step: int) -> Outcome:
    """The burst's last keystroke: the client's debounce, its wait for its previous request, then the answer."""
    doc = script.doc(step)
    time.sleep(editor.debounce_s)
    body = editor.request(doc)
    ready = time.perf_counter()
    if editor.in_burst == "serial":
        while session.inflight is not None and session.inflight.is_alive():
            time.sleep(POLL_S)
    truth_end = script.source.find("\n", doc.offset)
    truth = script.source[doc.offset:truth_end if truth_end >= 0 else None]  # what the typist goes on to write
    return session.send("awaited", step, editor.path, body, editor.stream, limit=session.options.timeout_s,
                        waited_s=time.perf_counter() - ready, truth=truth)


def run_session(name: str, server: Server, corpus: Corpus, options: SessionOptions) -> dict[str, Any]:
    """Type through the file as client ``name`` against ``server`` (``options.editors`` developers at once)."""
    targets = _targets(name, corpus, options)
    urls = server.metrics_urls
    counters, cache = read_spec_counters(urls), read_cache_counters(urls)
    started = time.perf_counter()
    sessions: list[Session | None] = [None] * len(targets)
    failures: list[BaseException] = []

    def type_as(index: int) -> None:
        try:
            sessions[index] = _type(name, server, corpus, options, index, *targets[index])
        except BaseException as exc:  # re-raised below, in the calling thread
            failures.append(exc)

    if len(targets) == 1:
        type_as(0)
    else:
        threads = [threading.Thread(target=type_as, args=(index,), name=f"editor-{index}")
                   for index in range(len(targets))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if failures:
        raise failures[0]
    seconds = round(time.perf_counter() - started, 1)
    records = [record for session in sessions for record in session.records]
    for record in records:  # a server that sends no token count: count the answer's text
        if record["kind"] == "awaited" and record["status"] == DONE and record["completion_tokens"] is None:
            record["completion_tokens"] = corpus.count(record["completion"]) if record["completion"] else 0
            record["tokens_counted_here"] = True
    unsupported = next((session.unsupported for session in sessions if session.unsupported), None)
    result = {"client": name, "options": asdict(options), "file": str(targets[0][0]), "start_line": targets[0][1],
              "files": [str(path) for path, _ in targets], "seconds": seconds, "status": unsupported or "ok",
              "records": records, "fidelity": None, "spec": spec_delta(counters, read_spec_counters(urls)),
              "cache": cache_delta(cache, read_cache_counters(urls))}
    return {**result, **summarize(records, options.timeout_s, EDITORS[name].stream)}


def _targets(name: str, corpus: Corpus, options: SessionOptions) -> list[tuple[Path, int]]:
    """(file, start line) of each developer: the session's own first, then other stdlib files at the same line."""
    source, start_line = EDITORS[name].target(options)
    others = [path for path in corpus.files if path.name != source.name]
    return [(source, start_line)] + [(others[k % len(others)], options.start_line)
                                     for k in range(options.editors - 1)]


def editor_address(index: int, editors: int) -> str | None:
    """The loopback address developer ``index`` sends from: the default one when alone, else 127.0.0.(11 + index)."""
    return None if editors <= 1 else f"127.0.0.{11 + index}"


def _type(name: str, server: Server, corpus: Corpus, options: SessionOptions, index: int, source: Path,
          start_line: int) -> Session:
    """One developer typing through ``source`` from ``start_line`` as client ``name``; their session's records."""
    editor = EDITORS[name](corpus, options, source, index)
    script = TypingScript(source.read_text(encoding="utf-8"), start_line, options.chars_per_step,
                          options.awaited * options.burst, source.name)
    session = Session(server, options, editor.headers(), editor_address(index, options.editors))
    editor.prepare(session)
    for burst in range(script.steps // options.burst):
        if session.unsupported:
            break
        _burst(editor, session, script, burst)
    session.join()  # not on an exception: the background threads are daemons, and the server is stopped next
    return session


def _burst(editor: Editor, session: Session, script: TypingScript, burst: int) -> None:
    """One burst of keystrokes, the awaited answer, and the pause that may follow it."""
    options = session.options
    for k in range(options.burst - 1):
        step = burst * options.burst + k
        _in_burst(editor, session, script.doc(step), step, time.perf_counter())
    step = (burst + 1) * options.burst - 1
    outcome = _awaited(editor, session, script, step)
    editor.answered(session, script.doc(step), step, outcome)
    if editor.uses_pauses and options.pause_every and (burst + 1) % options.pause_every == 0:
        editor.pause(session, script.doc(step), step, options.pause_s)


def summarize(records: list[dict[str, Any]], cap_s: float, streamed: bool) -> dict[str, Any]:
    """Awaited latency and first token, full prefills per 100 answered requests, reused prompt tokens.

    A full prefill is an answered request that reused less than half of its prompt tokens
    (warm-ups with n_predict 0 are counted apart). Timed-out awaited requests count as the cap.
    """
    awaited = [r for r in records if r["kind"] == "awaited" and r["status"] in (DONE, TIMEOUT)]
    cap = cap_s * 1000
    latency = [r["latency_ms"] + r["waited_ms"] if r["status"] == DONE else cap for r in awaited]
    ttft = [r["ttft_ms"] + r["waited_ms"] if r["status"] == DONE else cap for r in awaited] if streamed else []
    answered = [r for r in records if r["status"] == DONE and r["kind"] != "warm-up"]
    counted = [r for r in answered if r["prompt_tokens"] and r["cached_tokens"] is not None]
    full = sum(r["cached_tokens"] < r["prompt_tokens"] / 2 for r in counted)
    speeds = [decode_speed(r.get("completion_tokens"), r["ttft_ms"], r.get("last_ms"))
              for r in awaited if r["status"] == DONE] if streamed else []
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return {
        "awaited": sum(r["kind"] == "awaited" for r in records),
        "timeouts": sum(r["status"] == TIMEOUT for r in records if r["kind"] == "awaited"),
        "errors": sum(r["status"] == ERROR for r in records),
        "abandoned": sum(r["status"] == ABANDONED for r in records),
        "requests": kinds, "answered": len(answered), "counted": len(counted),
        "latency_p50_ms": percentile(latency, 50), "latency_p95_ms": percentile(latency, 95),
        "ttft_p50_ms": percentile(ttft, 50),
        "decode_tok_s": median([v for v in speeds if v is not None]),
        "completion_tokens": sum(r.get("completion_tokens") or 0 for r in awaited if r["status"] == DONE),
        "full_prefills": full, "full_prefills_per_100": 100 * full / len(counted) if counted else None,
        "prompt_tokens": sum(r["prompt_tokens"] for r in counted),
        "reused_tokens": sum(r["cached_tokens"] for r in counted),
        "warmups_answered": sum(r["status"] == DONE for r in records if r["kind"] == "warm-up"),
    }
