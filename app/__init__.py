"""FauxPilot Lite: an OpenAI/Copilot-compatible code completion server for Hugging Face models."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from flask import Flask, g, jsonify
from werkzeug.middleware.proxy_fix import ProxyFix

from config import Settings, load_settings


def create_app(config: Settings | Mapping[str, Any] | None = None, engines: Iterable[Any] = ()) -> Flask:
    """Assemble the app: settings (file + env, or given), the completions and ui blueprints, one error handler.

    ``config`` is either complete :class:`Settings` or overrides applied to the loaded
    ones; ``engines`` are ready engines to serve instead of loading the configured models.
    """
    from .completions import bp
    from .engine.registry import EngineRegistry
    from .metrics import Metrics
    from .ui.views import bp as ui_bp

    if isinstance(config, Settings):
        settings = config
    else:
        settings = load_settings()
        if config:
            settings = settings.replace(**config)
    app = Flask(__name__)
    app.config.update(FAUXPILOT=settings, MAX_CONTENT_LENGTH=settings.max_request_bytes)
    app.json.sort_keys = False
    app.extensions["fauxpilot"] = EngineRegistry(settings, engines)
    metrics = app.extensions["metrics"] = Metrics(settings.metrics_dir)
    if settings.usage_reports:
        app.extensions["usage"] = usage_reports(settings, metrics)
    app.register_blueprint(bp)
    app.register_blueprint(ui_bp)
    app.register_error_handler(Exception, handle_error)
    if settings.trusted_proxies:
        # Behind a reverse proxy the links this server hands out (Copilot's token endpoints) must
        # name the proxy's scheme, host and path prefix, not the loopback address it forwards to.
        hops = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_prefix=hops)
    return app


def usage_reports(settings: Settings, metrics):
    """The usage reports of ``settings`` (a database in the cache folder), counting into ``metrics`` too."""
    from .usage import AcceptanceTracker, UsageReports, UsageStore

    store = UsageStore(settings.cache_dir / "usage.sqlite3", settings.usage_retention_days, settings.usage_max_rows)

    def accepted(acceptance) -> None:
        part = "whole" if acceptance.whole else "first_line"
        metrics.completions_accepted.labels(acceptance.shown.labels.model, part).inc()

    return UsageReports(store, AcceptanceTracker(), on_accepted=accepted,
                        on_shown=lambda model: metrics.completions_shown.labels(model).inc())


def handle_error(exc: Exception):
    """Every failure leaves as an OpenAI error envelope; only real faults are 5xx, never a traceback."""
    from .errors import reply_for  # here, so gunicorn's master can import app.workers without torch

    envelope, status, headers = reply_for(exc, g.get("request_id", "-"))
    return jsonify(envelope), status, headers
