"""gunicorn settings for FauxPilot Lite: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Values come from config/fauxpilot.toml and FAUXPILOT_* environment variables;
gunicorn's own command-line flags still override them.
"""
import os
import tempfile

from config import load_settings

# Metrics: each worker writes its values to files in this folder and /metrics sums them
# (prometheus-client's multiprocess mode). It must be set before any worker imports the app.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="fauxpilot-metrics-"))
# Reload hand-over: the master numbers reloads and workers mark themselves ready here (app/workers.py).
# Kept in the environment because gunicorn re-reads this file on every reload.
os.environ.setdefault("FAUXPILOT_RUN_DIR", tempfile.mkdtemp(prefix="fauxpilot-run-"))

_settings = load_settings()

# Server socket
bind = _settings.bind

# Worker processes: each holds its own copy of the models; gthread lets one worker
# keep several connections (queued requests, long streams) open at once.
workers = _settings.workers
# gunicorn's gthread worker, with a deadline on reading each request (app/workers.py).
worker_class = "app.workers.Worker"
threads = _settings.connection_threads
# The models load after fork, in each worker: never touch CUDA in the master.
preload_app = False

# Timeouts: `timeout` is how long a worker may stop heart-beating (gthread keeps
# beating while streams run); keepalive suits editors that send request after request.
timeout = _settings.timeout
graceful_timeout = 30
keepalive = 75

# Control socket (gunicorn >= 25): its default path is shared by every gunicorn of
# the same user, so a second server (tests, a dev copy) would take it over; the
# service is managed by signals (systemctl reload sends HUP) instead.
control_socket_disable = True

# Logging: to stderr for journald. The app writes one line per request itself (with the
# request id, model and token counts), so gunicorn's access log would only repeat it.
accesslog = None
errorlog = "-"
loglevel = "debug" if _settings.debug else "info"


# Server hooks

def pre_fork(server, worker):
    """Give the new worker the lowest slot no live worker holds (stable across restarts) and its generation."""
    from app.workers import Generations, free_slot

    worker.slot = free_slot(w.slot for w in server.WORKERS.values())
    worker.generations = Generations(os.environ["FAUXPILOT_RUN_DIR"])
    worker.generation = worker.generations.current()


def on_reload(server):
    """A reload (HUP) starts a new generation: old workers serve until it is ready."""
    from app.workers import Generations

    generation = Generations(os.environ["FAUXPILOT_RUN_DIR"]).advance()
    server.log.info("reload: starting worker generation %d", generation)


def on_starting(server):
    """Start the metrics from zero: drop files a previous run left in the metrics folder."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for name in os.listdir(folder):
        if name.endswith(".db"):
            os.remove(os.path.join(folder, name))


def child_exit(server, worker):
    """Retire a dead worker's live gauges (its counters still count) and its readiness."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
    if getattr(worker, "generations", None) is not None:
        worker.generations.forget(worker.pid)


def post_fork(server, worker):
    """Load the configured models onto this worker's GPU (or the CPU) before it serves."""
    from app.workers import prepare_worker
    from wsgi import app

    server.log.info("worker %s takes slot %d", worker.pid, worker.slot)
    worker.read_timeout = _settings.read_timeout
    prepare_worker(app, worker.slot, worker.tmp.notify)
    worker.generations.mark_ready(worker.pid, worker.generation)
