"""The ui blueprint: the model debug page (``/ui/``), the usage reports page (``/ui/reports``) and their JSON APIs.

The pages are plain HTML, CSS and JavaScript shipped in this package (no build step, nothing from
a CDN). They need no key to load; their API calls carry the key the page asks for, checked by the
completions blueprint's own check.
"""
from __future__ import annotations

from typing import Iterator

from flask import Blueprint, Response, current_app, g, jsonify, request, send_from_directory
from werkzeug.exceptions import NotFound

from ..completions import check_api_key, event_stream, finish_record, get_engines, open_request_record, read_body
from ..errors import reply_for
from ..protocol import InvalidRequestError, decode_json_body, sse_event
from ..serving import CompletionRun, EventStream, client_gone_probe, closing_iter, gather, start_completion
from .trace import DebugRequest, parse_debug_request, trace

bp = Blueprint("ui", __name__, url_prefix="/ui", static_folder="static", template_folder=None)

API_ENDPOINTS = ("ui.complete", "ui.usage")
MAX_REPORT_DAYS = 400


@bp.before_request
def _authenticate() -> None:
    open_request_record()
    if request.endpoint in API_ENDPOINTS:
        check_api_key()


@bp.after_request
def _tag(response: Response) -> Response:
    response.headers["X-Request-Id"] = g.get("request_id", "")
    if request.endpoint in API_ENDPOINTS:
        finish_record(response)
    return response


def _page(name: str) -> Response:
    response = send_from_directory(bp.static_folder, name, mimetype="text/html")
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/")
def debug_page():
    """The model debug page."""
    return _page("debug.html")


@bp.get("/reports")
def reports_page():
    """The usage reports page."""
    return _page("reports.html")


@bp.post("/api/complete")
def complete():
    """Run one client request as its route would, and answer with everything the server knows of it."""
    debug = parse_debug_request(decode_json_body(read_body(), request.mimetype or ""))
    engines = get_engines()
    name = debug.model if not debug.infill or debug.model in engines.configs else None
    engine = engines.get(name)
    run = start_completion(engine, debug.completion, current_app.config["FAUXPILOT"], g.record,
                           client_gone_probe(request.environ), engines.stopping, trace=True)
    if not debug.stream:
        gather(run)
        return jsonify(trace(run.id, engine, debug, run.requests))
    return event_stream(TraceEventStream(run, debug))


class TraceEventStream(EventStream):
    """The debug API's events: ``{"delta": {index, text}}`` as each comes, then ``{"trace": ...}``; an error
    after the status line is sent in-band (as an error envelope)."""

    def __init__(self, run: CompletionRun, debug: DebugRequest):
        self.debug = debug
        super().__init__(run)

    def _generate(self) -> Iterator[str]:
        run = self.run
        try:
            for index, delta in closing_iter(run):
                if delta.text:
                    yield sse_event({"delta": {"index": index, "text": delta.text}})
            yield sse_event({"trace": trace(run.id, run.engine, self.debug, run.requests)})
        except Exception as exc:  # the status line is gone: report in-band, keep the worker serving
            yield sse_event(reply_for(exc, run.id)[0])
        run.record.complete = True


@bp.get("/api/usage")
def usage():
    """Usage reports over the last ``days`` days (default 30)."""
    reports = current_app.extensions.get("usage")
    if reports is None:
        raise NotFound("Usage reports are off on this server (usage_reports = false).")
    raw = request.args.get("days", "30")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_REPORT_DAYS:
        raise InvalidRequestError(f"days must be a whole number from 1 to {MAX_REPORT_DAYS}.", param="days")
    return jsonify(reports.report(int(raw)))

