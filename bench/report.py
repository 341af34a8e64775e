"""Turning raw figures into the markdown table, the ratios, the target checks, the JSON and the plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .servers import LABELS
from .sessions import LABELS as CLIENTS

Figures = dict[str, Any]  # one system's raw results


def _num(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _get(figures: Figures, *path: Any) -> Any:
    """figures[path[0]][path[1]]..., or None where any step is missing."""
    for key in path:
        if not isinstance(figures, dict) or key not in figures or figures[key] is None:
            return None
        figures = figures[key]
    return figures


def decode_rate(figures: Figures) -> float | None:
    """A system's batch-1 decode tokens/s: the decode workload's one stream, else the cold workload's."""
    rate = _get(figures, "decode", "1", "decode_tok_s")
    return rate if rate is not None else _get(figures, "cold", "decode_tok_s")


def decode_levels(systems: dict[str, Figures]) -> list[int]:
    """The stream counts the decode workload ran at, over all systems, ascending."""
    levels = {int(k) for f in systems.values() for k in (f.get("decode") or {}) if str(k).isdigit()}
    return sorted(levels)


def streams_rate(level: Figures | None) -> str:
    """A decode level's total tok/s: first to last token, or over the wall (marked) for a server that cannot stream."""
    if not level:
        return "—"
    if level.get("decode_tok_s") is not None:
        return _num(level["decode_tok_s"], 1)
    return "—" if level.get("tok_s") is None else f"{_num(level['tok_s'], 1)} (wall)"


def spec_cell(spec: Figures | None) -> str:
    """Speculation counters as 'accepted / drafted (per step)', or — when the server has none."""
    if not spec or spec.get("steps") is None:
        return "—"
    per_step = spec.get("accepted_per_step")
    return (f"{_num(spec.get('accepted'))} / {_num(spec.get('drafted'))} "
            f"({'—' if per_step is None else f'{per_step:.2f}'} per step)")


def start_cell(figures: Figures) -> str:
    """Seconds from launch until the server answered its readiness check."""
    value = figures.get("start_s")
    if value is None:
        return "— (attached)" if figures.get("url") else "—"
    return _num(value, 1)


def roofline_share(name: str, figures: Figures, roofline: dict[str, Any]) -> float | None:
    """A system's batch-1 decode speed as a fraction of its roofline."""
    rate, limit = decode_rate(figures), _get(roofline, "roofline_tok_s", name)
    return None if rate is None or not limit else rate / limit


def _rows(systems: dict[str, Figures], roofline: dict[str, Any], clients: list[int]) -> list[tuple[str, Callable]]:
    """(metric label, cell function of (name, figures)) for every table row."""
    levels = decode_levels(systems)

    def key(*path: Any, digits: int = 0) -> Callable:
        return lambda name, f: _num(_get(f, *path), digits)

    def lower_bound(metric: str) -> Callable:
        def cell(name: str, f: Figures) -> str:
            text = _num(_get(f, "keystroke", metric))
            return f"≥ {text}" if _get(f, "keystroke", "timeouts") and text != "—" else text
        return cell

    def awaited(name: str, f: Figures) -> str:
        k = f.get("keystroke")
        return "—" if not k else f"{k['awaited']} ({k['timeouts']} timeouts, {k['errors']} errors)"

    def in_burst(name: str, f: Figures) -> str:
        k = f.get("keystroke")
        return "—" if not k else f"{k['done_in_window']} / {k['abandoned']}"

    def cold_ttft(name: str, f: Figures) -> str:
        text = _num(_get(f, "cold", "ttft_ms"))
        return f"{text} (= total)" if _get(f, "cold", "decode_estimated") and text != "—" else text

    def cold_decode(name: str, f: Figures) -> str:
        text = _num(_get(f, "cold", "decode_tok_s"), 1)
        return f"{text} (est.)" if _get(f, "cold", "decode_estimated") and text != "—" else text

    def roof(name: str, f: Figures) -> str:
        limit, size = _get(roofline, "roofline_tok_s", name), _get(roofline, "bytes_per_token", name)
        return "—" if not limit else f"{limit:,.0f} ({size / 1e6:,.0f} MB/token)"

    def share(name: str, f: Figures) -> str:
        value = roofline_share(name, f, roofline)
        return "—" if value is None else f"{value:.0%}"

    rows: list[tuple[str, Callable]] = [
        ("server start: ready after (s)", lambda name, f: start_cell(f)),
        ("keystroke: awaited answers", awaited),
        ("keystroke: in-burst requests done in window / abandoned", in_burst),
        ("keystroke latency p50 (ms)", lower_bound("latency_p50_ms")),
        ("keystroke latency p95 (ms)", lower_bound("latency_p95_ms")),
        ("keystroke TTFT p50 (ms)", lower_bound("ttft_p50_ms")),
        ("keystroke TTFT p95 (ms)", lower_bound("ttft_p95_ms")),
        ("cold: prompt tokens (median)", key("cold", "prompt_tokens")),
        ("cold TTFT (ms)", cold_ttft),
        ("cold total (ms)", key("cold", "total_ms")),
        ("cold decode tok/s", cold_decode),
        ("cold tok/s over total", key("cold", "total_tok_s", digits=1)),
    ]
    if levels:
        rows.append(("decode: prompt tokens (cached after the first run)", key("decode", "prompt_tokens")))
    for n in levels:
        streams = f"decode {n} stream{'s' * (n > 1)}"
        if n == 1:
            rows.append((f"{streams}: tok/s, first to last token (median)",
                         lambda name, f: f"{_num(_get(f, 'decode', '1', 'decode_tok_s'), 1)}"
                                         f"{' (est.)' if _get(f, 'decode', '1', 'decode_estimated') else ''}"))
        else:
            rows.append((f"{streams}: total tok/s, first to last token (median)",
                         lambda name, f, n=n: streams_rate(_get(f, "decode", str(n)))))
        rows += [(f"{streams}: total tok/s over the wall", key("decode", str(n), "tok_s", digits=1)),
                 (f"{streams}: TTFT (ms)", key("decode", str(n), "ttft_ms")),
                 (f"{streams}: draft tokens accepted / drafted",
                  lambda name, f, n=n: spec_cell(_get(f, "decode", str(n), "spec")))]
    for n in clients:
        rows += [
            (f"load {n} client{'s' * (n > 1)}: total tok/s", key("load", str(n), "tok_s", digits=1)),
            (f"load {n} client{'s' * (n > 1)}: latency p50 / p95 (ms)",
             lambda name, f, n=n: f"{_num(_get(f, 'load', str(n), 'latency_p50_ms'))} / "
                                  f"{_num(_get(f, 'load', str(n), 'latency_p95_ms'))}"),
            (f"load {n} client{'s' * (n > 1)}: requests / errors",
             lambda name, f, n=n: f"{_num(_get(f, 'load', str(n), 'requests'))} / "
                                  f"{_num(_get(f, 'load', str(n), 'errors'))}"),
            (f"load {n} client{'s' * (n > 1)}: draft tokens accepted / drafted",
             lambda name, f, n=n: spec_cell(_get(f, "load", str(n), "spec"))),
        ]
    rows += [("roofline tok/s (weight bytes per token)", roof),
             (f"batch-1 decode, % of roofline ({'decode' if levels else 'cold'} workload)", share)]
    return rows


def headline(systems: dict[str, Figures], roofline: dict[str, Any], clients: list[int]) -> str:
    """Markdown: one row per system with its start, cold TTFT, batch-1 decode, roofline share and N-stream totals."""
    levels = [n for n in decode_levels(systems) if n > 1]
    many = max(levels) if levels else None
    loaded = max((n for n in clients if n > 1), default=None)
    head = ["system", "ready after (s)", "cold TTFT (ms)", "batch-1 decode tok/s", "% of roofline"]
    if many:
        head.append(f"{many} streams total tok/s (decode)")
    if loaded:
        head.append(f"{loaded} clients total tok/s (load)")
    head.append("accepted draft tokens per step (batch 1)")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, f in systems.items():
        share = roofline_share(name, f, roofline)
        spec = _get(f, "decode", "1", "spec") or {}
        cells = [LABELS[name], start_cell(f), _num(_get(f, "cold", "ttft_ms")), _num(decode_rate(f), 1),
                 "—" if share is None else f"{share:.0%}"]
        if many:
            cells.append(streams_rate(_get(f, "decode", str(many))))
        if loaded:
            cells.append(_num(_get(f, "load", str(loaded), "tok_s"), 1))
        per_step = spec.get("accepted_per_step")
        cells.append("—" if per_step is None else f"{per_step:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(systems: dict[str, Figures], roofline: dict[str, Any], clients: list[int]) -> str:
    """The markdown table: one row per metric, one column per system."""
    names = list(systems)
    lines = ["| metric | " + " | ".join(LABELS[n] for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    status_cells = [systems[n].get("status", "ok") for n in names]
    if any(s != "ok" for s in status_cells):
        lines.append("| status | " + " | ".join(status_cells) + " |")
    for label, cell in _rows(systems, roofline, clients):
        cells = [cell(n, systems[n]) for n in names]
        if any(c.replace("—", "").replace("/", "").strip() for c in cells):  # workloads that did not run: left out
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _comparisons(clients: list[int], levels: list[int] = ()) -> list[tuple[str, tuple, bool, str]]:
    """(label, path in the figures, lower is better, unit) of the metrics compared as ratios."""
    items = [("start time", ("start_s",), True, "s"),
             ("keystroke latency p50", ("keystroke", "latency_p50_ms"), True, "ms"),
             ("keystroke latency p95", ("keystroke", "latency_p95_ms"), True, "ms"),
             ("keystroke TTFT p50", ("keystroke", "ttft_p50_ms"), True, "ms"),
             ("cold TTFT", ("cold", "ttft_ms"), True, "ms"),
             ("cold decode", ("cold", "decode_tok_s"), False, "tok/s")]
    for n in levels:
        items.append((f"decode {n} stream{'s' * (n > 1)}", ("decode", str(n), "decode_tok_s"), False, "tok/s"))
    for n in clients:
        level = f"load {n} client{'s' * (n > 1)}"
        items.append((f"{level} throughput", ("load", str(n), "tok_s"), False, "tok/s"))
        items.append((f"{level} latency p95", ("load", str(n), "latency_p95_ms"), True, "ms"))
    return items


def ratios(systems: dict[str, Figures], clients: list[int]) -> str:
    """Lines 'other / ours = N× faster' (or 'ours / other' for throughput) for each other system."""
    ours = systems.get("ours")
    if not ours:
        return ""
    out = []
    for other in (n for n in systems if n != "ours"):
        label = LABELS[other]
        out.append(f"\n### ours vs {label} (above 1× = ours better)\n")
        for name, path, lower_better, unit in _comparisons(clients, decode_levels(systems)):
            a, b = _get(ours, *path), _get(systems[other], *path)
            if not a or not b:
                out.append(f"- {name}: n/a")
                continue
            digits = 0 if unit == "ms" else 1
            if lower_better:
                ratio = b / a
                out.append(f"- {name}: {label} {_num(b, digits)} {unit} / ours {_num(a, digits)} {unit} = "
                           f"{ratio:.2f}× ({'ours faster' if ratio >= 1 else 'ours slower'})")
            else:
                ratio = a / b
                out.append(f"- {name}: ours {_num(a, digits)} {unit} / {label} {_num(b, digits)} {unit} = "
                           f"{ratio:.2f}× ({'ours more' if ratio >= 1 else 'ours less'})")
    return "\n".join(out)


def targets(systems: dict[str, Figures], roofline: dict[str, Any]) -> str:
    """The issue's targets, each as a PASS/FAIL/n/a line with the measured values."""
    ours = systems.get("ours") or {}
    lines = []

    def check(ok: bool | None, text: str) -> None:
        lines.append(f"- [{'n/a' if ok is None else 'PASS' if ok else 'FAIL'}] {text}")

    mine = _get(ours, "keystroke", "latency_p50_ms")
    llama = _get(systems.get("llamacpp") or {}, "keystroke", "latency_p50_ms")
    check(None if mine is None or llama is None else mine <= llama,
          f"keystroke p50 ≤ llama.cpp's: ours {_num(mine)} ms, llama.cpp {_num(llama)} ms")
    naive = _get(systems.get("naive") or {}, "keystroke", "latency_p50_ms")
    speedup = naive / mine if mine and naive else None
    check(None if speedup is None else speedup >= 6,
          f"keystroke p50 ≥ 6× better than naive: naive {_num(naive)} ms / ours {_num(mine)} ms = "
          f"{'—' if speedup is None else f'{speedup:.1f}×'}")
    one, eight = _get(ours, "load", "1", "tok_s"), _get(ours, "load", "8", "tok_s")
    scale = eight / one if one and eight else None
    check(None if scale is None else scale >= 3,
          f"8 clients total tok/s ≥ 3× one client's (ours): {_num(eight, 1)} / {_num(one, 1)} tok/s = "
          f"{'—' if scale is None else f'{scale:.2f}×'}")
    share = roofline_share("ours", ours, roofline)
    check(None if share is None else share >= 0.5,
          f"ours batch-1 decode ≥ 50% of roofline: {_num(decode_rate(ours), 1)} tok/s of "
          f"{_num(_get(roofline, 'roofline_tok_s', 'ours'), 0)} = {'—' if share is None else f'{share:.0%}'}")
    return "\n".join(lines)


DECODE_NOTES = ("Decode tok/s counts from the first streamed token to the last: (tokens − 1) ÷ (last − first), "
                "the median of runs; N streams: all streams' tokens − 1 over the first token of any stream to the "
                "last of any (\"wall\": from the first send to the last answer, for a server that cannot stream). "
                "Greedy, EOS banned, so every answer has all its tokens. The roofline is one read of the weights per "
                "token; speculative decoding checks several tokens per read, so ours can pass 100 %. Draft tokens: "
                "our server's /metrics counters (`fauxpilot_spec_*`) over the level, warm-up included; — where a "
                "server has none.")


def markdown(meta: dict[str, Any], systems: dict[str, Figures], roofline: dict[str, Any],
             clients: list[int]) -> str:
    """The whole report: settings, then the older workloads' table, ratios and targets, then the sessions'."""
    head = [f"# FauxPilot Lite benchmark — {meta['date']}", "",
            f"{meta['cpu']} ({meta['cores']} cores), model {meta['model']}; {meta['settings']}", ""]
    parts = ["\n".join(head)]
    if meta.get("workloads", True):
        bandwidth = roofline.get("bandwidth_gb_s", {})
        parts.append(f"Memory read bandwidth: {_num(bandwidth.get('1'), 1)} GB/s (1 thread), "
                     f"{_num(bandwidth.get('2'), 1)} GB/s (2 threads); the roofline uses the best.\n\n"
                     + headline(systems, roofline, clients) + "\n\n" + DECODE_NOTES + "\n\n"
                     + table(systems, roofline, clients) + "\n" + ratios(systems, clients)
                     + "\n\n### Targets\n\n" + targets(systems, roofline) + "\n")
    if meta.get("sessions"):
        parts.append(sessions_section(systems, meta["sessions"]))
    return "\n".join(parts)


def _session_cell(metric: str, s: Figures | None) -> str:
    """One cell of the sessions table for one system's session figures."""
    if not s:
        return "—"
    if s.get("status", "ok") != "ok":  # e.g. "unsupported: /infill answered HTTP 404: ..."
        return str(s["status"])[:70] if metric == "latency" else "—"
    if metric == "latency":
        bound = "≥ " if s.get("timeouts") else ""
        return f"{bound}{_num(s.get('latency_p50_ms'))} / {bound}{_num(s.get('latency_p95_ms'))}"
    if metric == "ttft":
        return "— (not streamed)" if s.get("ttft_p50_ms") is None else _num(s["ttft_p50_ms"])
    if metric == "decode":
        return _num(s.get("decode_tok_s"), 1)
    if metric == "spec":
        return spec_cell(s.get("spec"))
    if metric == "full":
        per100 = s.get("full_prefills_per_100")
        return "— (no token counts)" if per100 is None else f"{per100:.1f} ({s['full_prefills']} of {s['counted']})"
    if metric == "cache":
        cache = s.get("cache") or {}
        if cache.get("hit_rate") is None:
            return "—"
        return f"{cache['hit_rate']:.0%} ({cache['hits']} of {cache['hits'] + cache['misses']})"
    if metric == "spread":
        parts = (s.get("cache") or {}).get("per_instance") or []
        if not parts or any(part.get("requests") is None for part in parts):
            return "—"
        return " / ".join(str(part["requests"]) for part in parts)
    if metric == "reused":
        if not s.get("prompt_tokens"):
            return "—"
        return f"{s['reused_tokens']:,} of {s['prompt_tokens']:,} ({s['reused_tokens'] / s['prompt_tokens']:.0%})"
    if metric == "requests":
        kinds = ", ".join(f"{k} {n}" for k, n in (s.get("requests") or {}).items())
        return (f"{kinds}; abandoned {s.get('abandoned', 0)}, timeouts {s.get('timeouts', 0)}, "
                f"errors {s.get('errors', 0)}")
    value = s.get("fidelity")
    return "—" if not isinstance(value, (int, float)) else f"{value:.1%}"


SESSION_ROWS = (("awaited latency p50 / p95 (ms)", "latency"), ("first token p50 (ms)", "ttft"),
                ("decode tok/s p50 (first to last token)", "decode"),
                ("draft tokens accepted / drafted", "spec"),
                ("full prefills per 100 requests", "full"), ("prefix-cache hit rate (/metrics)", "cache"),
                ("requests per instance (/metrics)", "spread"), ("reused prompt tokens", "reused"),
                ("requests", "requests"), ("fidelity", "fidelity"))


def sessions_table(systems: dict[str, Figures], clients: list[str]) -> str:
    """Markdown: a block of rows per client, one column per system."""
    names = list(systems)
    lines = ["| client | metric | " + " | ".join(LABELS[n] for n in names) + " |",
             "|---|---|" + "---:|" * len(names),
             "| (server) | ready after (s) | " + " | ".join(start_cell(systems[n]) for n in names) + " |"]
    for client in clients:
        for label, metric in SESSION_ROWS:
            cells = [_session_cell(metric, _get(systems[n], "sessions", client)) for n in names]
            lines.append(f"| {CLIENTS[client]} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def session_targets(systems: dict[str, Figures], clients: list[str]) -> str:
    """The issue's session targets for ours, each a PASS/FAIL/n/a line with the values."""
    lines = []
    for client in clients:
        mine = _get(systems.get("ours") or {}, "sessions", client) or {}
        theirs = _get(systems.get("llamaserver") or {}, "sessions", client) or {}
        p50, p95 = (mine.get("latency_p50_ms"), mine.get("latency_p95_ms")) if _ok(mine) else (None, None)
        other = theirs.get("latency_p50_ms") if _ok(theirs) else None
        name = CLIENTS[client]
        lines.append(_check(None if p50 is None or other is None else p50 <= 0.5 * other,
                            f"{name}: awaited p50 ≤ 0.5× llama-server's: ours {_num(p50)} ms, "
                            f"llama-server {_num(other)} ms"))
        lines.append(_check(None if p50 is None or p95 is None else p95 <= 2.5 * p50,
                            f"{name}: p95 ≤ 2.5× its p50: {_num(p95)} ms vs {_num(p50)} ms"))
        if client in ("fauxpilot", "llamavscode"):
            per100 = mine.get("full_prefills_per_100") if _ok(mine) else None
            lines.append(_check(None if per100 is None else per100 <= 5,
                                f"{name}: full prefills ≤ 5 per 100 requests: "
                                f"{'—' if per100 is None else f'{per100:.1f}'}"))
    return "\n".join(lines)


def _ok(session: Figures) -> bool:
    return session.get("status") == "ok"


def _check(ok: bool | None, text: str) -> str:
    return f"- [{'n/a' if ok is None else 'PASS' if ok else 'FAIL'}] {text}"


def sessions_section(systems: dict[str, Figures], clients: list[str]) -> str:
    """The editor sessions: table, definitions, targets."""
    notes = ("A full prefill is an answered request that reused less than half of its prompt tokens (the "
             "server's own count: `timings.cache_n`, `usage.prompt_tokens_details.cached_tokens` or /infill's "
             "`tokens_cached`); llama.vscode's warm-ups (`n_predict: 0`) are left out of it. Prefix-cache hit rate: "
             "the growth of `fauxpilot_prefix_cache_hits` ÷ (hits + `fauxpilot_prefix_cache_misses`) over the "
             "session, summed over the workers and, behind nginx, over the instances (each read directly); requests "
             "per instance: the growth of `fauxpilot_requests_total` on each (cancelled ones included). Awaited latency "
             "counts from when the client would send (after its own debounce), including any wait for its previous "
             "request; timed-out answers count as the cap (≥). Fidelity: with the default anchoring, the share of "
             "answers to prompts it changed that equal the answer to the prompt as sent, from the newest "
             "`python -m bench.fidelity` results, if any (ours only; its reuse is exact, so a warm answer is "
             "always the cold one). llama-server gets "
             "Copilot's and Continue's requests without `suffix` (its /v1/completions refuses one) and ignores "
             "`extra.context`, so its prompts there are shorter; for /infill it is started with FIM stand-in tokens "
             "when the model has none (see bench/README.md). Decode tok/s (streamed clients): per awaited answer "
             "(completion tokens − 1) ÷ (last token − first token), the median. Draft tokens: our server's "
             "`fauxpilot_spec_*` counters read from /metrics before and after the session, per step = accepted ÷ "
             "row-steps that carried a draft; — where the server has none. The edit session is a plain "
             "/v1/completions client re-typing UserString's r-methods in collections/__init__.py, which mirror "
             "methods above them.")
    return ("## Editor sessions\n\n" + sessions_table(systems, clients) + "\n\n" + notes
            + "\n\n### Session targets\n\n" + session_targets(systems, clients) + "\n")


def latest_fidelity(out: Path) -> dict[str, Any]:
    """Per client style, the default mode's agreement with the prompt as sent, from the newest fidelity-*.json."""
    files = sorted(out.glob("fidelity-*.json"))
    if not files:
        return {}
    try:
        summary = json.loads(files[-1].read_text(encoding="utf-8")).get("summary") or {}
    except (OSError, ValueError):
        return {}
    styles = {style: (modes.get("anchored") or {}).get("same_when_changed")
              for style, modes in summary.items() if isinstance(modes, dict)}
    return {"file": str(files[-1]), "styles": styles}


def attach_fidelity(systems: dict[str, Figures], fidelity: dict[str, Any]) -> None:
    """Put the fidelity figures (they measure our anchoring engine) into ours' session results."""
    for client, session in (_get(systems.get("ours") or {}, "sessions") or {}).items():
        value = (fidelity.get("styles") or {}).get(client)
        session["fidelity"] = value if isinstance(value, (int, float)) else None


def plot(systems: dict[str, Figures], path: Path, window_ms: float) -> bool:
    """Save latency per keystroke step (answered requests only), one line per system; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(10, 5))
    for name, figures in systems.items():
        steps = [s for s in _get(figures, "keystroke", "steps") or [] if s["latency_ms"] is not None]
        if not steps:
            continue
        line, = axes.plot([s["step"] for s in steps], [s["latency_ms"] for s in steps], linewidth=1,
                          label=LABELS[name])
        awaited = [s for s in steps if s["awaited"]]
        axes.plot([s["step"] for s in awaited], [s["latency_ms"] for s in awaited], "o", markersize=4,
                  color=line.get_color())
    axes.axhline(window_ms, linestyle="--", color="grey", linewidth=0.8, label=f"cancel window ({window_ms:g} ms)")
    axes.set_yscale("log")
    axes.set_xlabel("keystroke step (dots: awaited answers at the end of a burst)")
    axes.set_ylabel("latency to the complete answer (ms)")
    axes.set_title("Keystroke session: latency per step (cancelled requests omitted)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def save(out: Path, report: str, raw: dict[str, Any]) -> None:
    """Write results.md and results.json into ``out``."""
    (out / "results.md").write_text(report, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(raw, indent=2, default=str), encoding="utf-8")
