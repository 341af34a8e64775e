"""Per-worker set-up for gunicorn: a stable slot (hence GPU) per worker, model loading in post_fork."""
from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

log = logging.getLogger(__name__)


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


def torch_threads(configured: int | None, workers: int, cores: int | None = None) -> int:
    """Intra-op threads per worker: the configured number, else the cores shared among workers."""
    if configured:
        return configured
    return max(1, (cores or os.cpu_count() or 1) // max(workers, 1))


@contextmanager
def heartbeat(notify, interval: float = 2.0) -> Iterator[None]:
    """Keep calling ``notify`` while a long step runs, so gunicorn's timeout does not kill the worker."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(interval):
            notify()

    thread = threading.Thread(target=beat, name="load-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


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
    import torch

    settings = app.config["FAUXPILOT"]
    configure_logging(settings.debug)
    torch.set_num_threads(torch_threads(settings.torch_threads, settings.workers))
    with heartbeat(notify):
        app.extensions["fauxpilot"].load_all(slot)
    log.info("worker slot %d ready (%d torch threads)", slot, torch.get_num_threads())
