"""gunicorn glue: a stable slot (hence GPU) per worker, model loading in post_fork, and the worker class
(gthread with a read deadline per request and JSON error replies)."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from gunicorn import util as gunicorn_util
from gunicorn.workers.gthread import _DEFER, ThreadWorker

log = logging.getLogger(__name__)

# How long a thread waits for a new connection's first bytes before handing it back to the
# poller, where waiting costs no thread: not at all. gunicorn waits 5 s, and 200 silent
# connections then held every thread in turn and delayed other requests by about 70 s
# (0.5 s still cost 7.5 s with 12 threads).
FIRST_BYTES_WAIT = 0.0
# Seconds before gunicorn's graceful_timeout at which running streams are ended with an error
# event: enough for the request threads (they look every 50 ms) to send it and close.
STREAM_STOP_MARGIN = 2.0


def free_slot(taken: Iterable[int]) -> int:
    """The lowest slot number no live worker holds.

    gunicorn numbers workers by ``age``, which keeps growing as dead workers are
    replaced; a replacement must take over the dead worker's slot (and GPU) instead.
    """
    used = set(taken)
    slot = 0
    while slot in used:
        slot += 1
    return slot


def off_main_thread(work: Callable[[], None], notify: Callable[[], None], interval: float = 2.0) -> None:
    """Run ``work`` in a short-lived thread while this thread calls ``notify`` every ``interval`` seconds.

    Two reasons: gunicorn kills a worker whose heartbeat stops (loading a model can
    take minutes), and torch work done on the main thread leaves its OpenMP team
    behind, which halves the speed of the request threads that generate later
    (measured: 48 tokens in 0.48 s vs 1.0 s on 2 cores).
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # re-raised in the calling thread below
            failure.append(exc)

    thread = threading.Thread(target=run, name="model-load")
    thread.start()
    while thread.is_alive():
        notify()
        thread.join(interval)
    if failure:
        raise failure[0]


def configure_logging(debug: bool) -> None:
    """Send the app's log records to stderr, as gunicorn does its own."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
                                           "%Y-%m-%d %H:%M:%S %z"))
    logger = logging.getLogger("app")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


def prepare_worker(app, slot: int, notify) -> None:
    """Load and warm every served model of ``app`` onto the device of ``slot`` (runs in the worker)."""
    settings = app.config["FAUXPILOT"]
    configure_logging(settings.debug)
    off_main_thread(lambda: app.extensions["fauxpilot"].load_all(slot), notify)
    log.info("worker slot %d ready", slot)


# -- the worker class ---------------------------------------------------------------

class ReadDeadlines:
    """One watchdog thread that cuts off clients too slow to send their request.

    A connection being read holds one of the worker's threads; a client that sends its
    headers a byte every few seconds held it for as long as it liked (16 such clients
    stopped a worker). At its deadline the socket's read side is shut, so the blocked
    read returns and gunicorn closes the connection (or the view answers 408 mid-body).
    """

    def __init__(self) -> None:
        self._armed: dict[int, tuple[float, socket.socket]] = {}
        self._expired: set[int] = set()
        self._lock = threading.Condition()
        self._next_token = 0
        threading.Thread(target=self._watch, name="read-deadlines", daemon=True).start()

    def arm(self, sock: socket.socket, seconds: float) -> int:
        """Cut ``sock``'s reading off ``seconds`` from now unless disarmed first; returns the token."""
        with self._lock:
            self._next_token += 1
            self._armed[self._next_token] = (time.monotonic() + seconds, sock)
            self._lock.notify()
            return self._next_token

    def disarm(self, token: int) -> bool:
        """Cancel a deadline; return whether it had already expired."""
        with self._lock:
            self._armed.pop(token, None)
            expired = token in self._expired
            self._expired.discard(token)
            return expired

    def _watch(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                for token, (deadline, sock) in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[token]
                        self._expired.add(token)
                        _shut_reading(sock)
                soonest = min((deadline for deadline, _ in self._armed.values()), default=now + 60)
                self._lock.wait(max(soonest - now, 0.01))


def _shut_reading(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:  # already closed by the client or the worker
        pass


_reading = threading.local()  # the read deadline of the request this thread is reading


def request_read() -> bool:
    """Called once a request's body is read: stop its read deadline; return whether it had expired."""
    token, deadlines = getattr(_reading, "token", None), getattr(_reading, "deadlines", None)
    _reading.token = None
    return bool(token and deadlines and deadlines.disarm(token))


class Generations:
    """Reload hand-over, in a folder the master and its workers share.

    gunicorn's reload (HUP) forks new workers and stops the old ones at once, before the new
    ones have loaded their models: nothing answered for ~37 s with the default model. Here
    the master numbers each reload (a generation), every worker marks itself ready once its
    models are loaded and warm, and an old worker asked to stop goes on serving until the
    new generation has as many ready workers as configured.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def current(self) -> int:
        """The newest generation (0 before any reload)."""
        try:
            return int((self.folder / "generation").read_text())
        except (OSError, ValueError):
            return 0

    def advance(self) -> int:
        """Start a new generation (the master, on reload); return its number."""
        generation = self.current() + 1
        (self.folder / "generation").write_text(str(generation))
        return generation

    def mark_ready(self, pid: int, generation: int) -> None:
        """Worker ``pid`` of ``generation`` serves from now on."""
        (self.folder / f"ready-{pid}").write_text(str(generation))

    def forget(self, pid: int) -> None:
        """Worker ``pid`` is gone."""
        (self.folder / f"ready-{pid}").unlink(missing_ok=True)

    def ready(self, generation: int) -> int:
        """How many workers of ``generation`` or newer are ready."""
        count = 0
        for marker in self.folder.glob("ready-*"):
            try:
                count += int(marker.read_text()) >= generation
            except (OSError, ValueError):  # a marker being written or removed right now
                pass
        return count


class Worker(ThreadWorker):
    """gunicorn's gthread worker with a deadline on reading each request, JSON error replies, and a
    reload hand-over: it stops only once its replacements are ready."""

    read_timeout = 10.0  # post_fork sets the configured values
    generation = 0
    generations: Generations | None = None
    _handing_over = False

    def init_process(self) -> None:
        """Start the read-deadline watchdog, then run as gthread does."""
        self.read_deadlines = ReadDeadlines()
        # gunicorn answers requests it cannot parse (431, 414, bad chunking) itself, as HTML;
        # clients of this API expect OpenAI's JSON envelope.
        gunicorn_util.write_error = write_json_error
        super().init_process()

    def handle(self, conn):
        """Serve one request of ``conn``, reading it under the deadline."""
        if not conn.initialized and not conn.data_ready and not conn.wait_for_data(FIRST_BYTES_WAIT):
            return _DEFER
        _reading.deadlines = self.read_deadlines
        _reading.token = self.read_deadlines.arm(conn.sock, self.read_timeout)
        try:
            return super().handle(conn)
        finally:
            request_read()

    def handle_exit(self, sig, frame) -> None:
        """Stop gracefully; when a reload replaces this worker, first wait until the new workers serve."""
        newest = self.generations.current() if self.generations else 0
        if newest <= self.generation:
            self._stop(sig, frame)
        elif not self._handing_over:  # the master repeats its SIGTERM while this worker lingers
            self._handing_over = True
            threading.Thread(target=self._hand_over, args=(newest, sig, frame), name="hand-over",
                             daemon=True).start()

    def _hand_over(self, newest: int, sig, frame) -> None:
        """Serve on until the newest generation is ready (at most the worker timeout), then stop."""
        deadline = time.monotonic() + max(self.cfg.timeout, 60)
        while self.generations.ready(newest) < self.cfg.workers and time.monotonic() < deadline:
            time.sleep(0.2)
        log.info("worker %d hands over to generation %d (%d ready)", self.pid, newest,
                 self.generations.ready(newest))
        self._stop(sig, frame)

    def set_accept_enabled(self, enabled: bool) -> None:
        """As gthread does; when stopping, also close this worker's copy of the listening sockets.

        gthread closes them only after its last request: a client connecting meanwhile was
        queued on a socket nobody accepted from, and hung. Once the master and every worker have
        closed theirs, it is refused at once and can retry elsewhere (during a reload the new
        workers hold the socket open and accept).
        """
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()

    def _stop(self, sig, frame) -> None:
        """Stop accepting; streams still running just before the grace period ends get an error event.

        gunicorn kills the worker at ``graceful_timeout``: a stream cut there looked like a
        network fault to its client. Ending it a little earlier sends the error and [DONE].
        """
        if self.alive:
            delay = max(self.cfg.graceful_timeout - STREAM_STOP_MARGIN, 0.0)
            stopping = self.wsgi.extensions["fauxpilot"].stopping
            timer = threading.Timer(delay, stopping.set)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)


def write_json_error(sock: socket.socket, status: int, reason: str, message: str) -> None:
    """gunicorn's own error reply (before the app ran) as an OpenAI error envelope."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = json.dumps({"error": {"message": message or reason, "type": kind, "param": None,
                                 "code": reason.lower().replace(" ", "_")}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    gunicorn_util.write_nonblock(sock, head + body)
