"""Turning raw figures into the markdown table, the ratios, the target checks, the JSON and the plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .servers import LABELS

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
    """A system's batch-1 decode tokens/s from the cold workload."""
    return _get(figures, "cold", "decode_tok_s")


def roofline_share(name: str, figures: Figures, roofline: dict[str, Any]) -> float | None:
    """A system's batch-1 decode speed as a fraction of its roofline."""
    rate, limit = decode_rate(figures), _get(roofline, "roofline_tok_s", name)
    return None if rate is None or not limit else rate / limit


def _rows(systems: dict[str, Figures], roofline: dict[str, Any], clients: list[int]) -> list[tuple[str, Callable]]:
    """(metric label, cell function of (name, figures)) for every table row."""

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
    for n in clients:
        rows += [
            (f"load {n} client{'s' * (n > 1)}: total tok/s", key("load", str(n), "tok_s", digits=1)),
            (f"load {n} client{'s' * (n > 1)}: latency p50 / p95 (ms)",
             lambda name, f, n=n: f"{_num(_get(f, 'load', str(n), 'latency_p50_ms'))} / "
                                  f"{_num(_get(f, 'load', str(n), 'latency_p95_ms'))}"),
            (f"load {n} client{'s' * (n > 1)}: requests / errors",
             lambda name, f, n=n: f"{_num(_get(f, 'load', str(n), 'requests'))} / "
                                  f"{_num(_get(f, 'load', str(n), 'errors'))}"),
        ]
    rows += [("roofline tok/s (weight bytes per token)", roof), ("batch-1 decode, % of roofline", share)]
    return rows


def table(systems: dict[str, Figures], roofline: dict[str, Any], clients: list[int]) -> str:
    """The markdown table: one row per metric, one column per system."""
    names = list(systems)
    lines = ["| metric | " + " | ".join(LABELS[n] for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    status_cells = [systems[n].get("status", "ok") for n in names]
    if any(s != "ok" for s in status_cells):
        lines.append("| status | " + " | ".join(status_cells) + " |")
    for label, cell in _rows(systems, roofline, clients):
        lines.append(f"| {label} | " + " | ".join(cell(n, systems[n]) for n in names) + " |")
    return "\n".join(lines)


def _comparisons(clients: list[int]) -> list[tuple[str, tuple, bool, str]]:
    """(label, path in the figures, lower is better, unit) of the metrics compared as ratios."""
    items = [("keystroke latency p50", ("keystroke", "latency_p50_ms"), True, "ms"),
             ("keystroke latency p95", ("keystroke", "latency_p95_ms"), True, "ms"),
             ("keystroke TTFT p50", ("keystroke", "ttft_p50_ms"), True, "ms"),
             ("cold TTFT", ("cold", "ttft_ms"), True, "ms"),
             ("cold decode", ("cold", "decode_tok_s"), False, "tok/s")]
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
        for name, path, lower_better, unit in _comparisons(clients):
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


def markdown(meta: dict[str, Any], systems: dict[str, Figures], roofline: dict[str, Any],
             clients: list[int]) -> str:
    """The whole report: settings, table, roofline inputs, ratios and target checks."""
    bandwidth = roofline.get("bandwidth_gb_s", {})
    head = [f"# FauxPilot Lite benchmark — {meta['date']}", "",
            f"{meta['cpu']} ({meta['cores']} cores), model {meta['model']}; {meta['settings']}", "",
            f"Memory read bandwidth: {_num(bandwidth.get('1'), 1)} GB/s (1 thread), "
            f"{_num(bandwidth.get('2'), 1)} GB/s (2 threads); the roofline uses the best.", ""]
    return "\n".join(head) + "\n" + table(systems, roofline, clients) + "\n" + ratios(systems, clients) + \
        "\n\n### Targets\n\n" + targets(systems, roofline) + "\n"


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
