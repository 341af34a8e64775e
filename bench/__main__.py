"""``python -m bench``: start each server, replay the same workloads against it, print and save the comparison."""
from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

from . import report, roofline
from .corpus import Corpus
from .llama_server import BUILD_HINT, find_binary
from .servers import (LABELS, LLAMACPP_INSTALL, REPO, SYSTEMS, ModelFiles, Server, ServerStartError, attach,
                      llamacpp_available, model_window, resolve_model, start, stop)
from .editors import EDIT_CONTEXT, EDIT_MAX_TOKENS, EDIT_SUFFIX_LINES
from .sessions import SESSIONS, Edit, SessionOptions, run_session
from .client import read_spec_counters, spec_delta
from .workloads import KeystrokeOptions, PromptFeed, cold, decode, drain, keystroke, load, warm_up

WORKLOADS = ("keystroke", "cold", "decode", "load")

DEFAULTS = {"awaited": 24, "awaited_naive": 8, "load_seconds": 30.0, "clients": "1,4,8", "cold_runs": 3,
            "load_prompts": 240, "bandwidth_mb": 512, "session_awaited": 24, "decode_runs": 3}
QUICK = {"awaited": 3, "awaited_naive": 1, "load_seconds": 5.0, "clients": "1,8", "cold_runs": 1,
         "load_prompts": 40, "bandwidth_mb": 256, "session_awaited": 4, "decode_runs": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --quick fills in small values for options not given."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    add = parser.add_argument
    add("--systems", help=f"comma-separated, from: {','.join(SYSTEMS)} (default: ours,naive,llamacpp; with "
                          "--sessions: ours,llamaserver)")
    add("--sessions", default="", help=f"editor-session workloads to run, from: {','.join(SESSIONS)} (or 'all')")
    add("--workloads", help=f"the older workloads to run, from: {','.join(WORKLOADS)} (default: all of them "
                            "without --sessions, none with it)")
    add("--session-awaited", type=int, help="awaited answers per editor session (default 24)")
    add("--session-line", type=int, default=150, help="line (0-based) the sessions start typing at (default 150)")
    add("--session-file", default="", help="file the sessions type through (default: textwrap.py of this Python)")
    add("--pause-every", type=int, default=6, help="llama.vscode: awaited answers between pauses (default 6)")
    add("--pause-s", type=float, default=4.0, help="llama.vscode: seconds of a pause (default 4)")
    add("--ring-files", type=int, default=8, help="llama.vscode: files visited before, a ring chunk each (default 8)")
    add("--seed", type=int, default=13, help="seed of the plugins' random choices (default 13)")
    add("--editors", type=int, default=1,
        help="developers typing at once in each session, each from its own address and file (default 1)")
    add("--llama-server", help="llama-server binary (default: $LLAMA_SERVER_BIN, the one "
                               "`python -m bench.llama_server build` made, or one on PATH)")
    add("--awaited", type=int, help="awaited keystroke answers per system (default 24)")
    add("--awaited-naive", type=int, help="awaited answers for the naive server, which cannot cancel (default 8)")
    add("--chars-per-step", type=int, default=6, help="characters typed per keystroke step (default %(default)s)")
    add("--burst", type=int, default=4, help="steps per typing burst; the last is awaited (default %(default)s)")
    add("--window-ms", type=float, default=100.0,
        help="ms between steps in a burst; an unfinished request is then cancelled (default %(default)s)")
    add("--context-tokens", type=int, default=1500, help="keystroke prompt size in tokens (default %(default)s)")
    add("--context-slack", type=int, default=0,
        help="when the keystroke prompt outgrows --context-tokens, drop this many tokens more, so its first "
             "line (and a server's cached prefix) stays put longer (default %(default)s)")
    add("--max-tokens", type=int, default=48, help="tokens generated per request (default %(default)s)")
    add("--timeout", type=float, default=60.0, help="cap in seconds on each awaited request (default %(default)s)")
    add("--cold-runs", type=int, help="measured cold prompts, after one warm-up (default 3)")
    add("--cold-tokens", type=int, default=1000, help="cold prompt size in tokens (default %(default)s)")
    add("--load-seconds", type=float, help="seconds per concurrency level (default 30)")
    add("--clients", help="concurrency levels of the load workload (default 1,4,8)")
    add("--load-tokens", type=int, default=300, help="load prompt size in tokens (default %(default)s)")
    add("--decode-clients", default="1,8", help="concurrent streams of the decode workload (default %(default)s)")
    add("--decode-runs", type=int, help="measured decode runs (rounds) per level, after one warm-up (default 3)")
    add("--decode-tokens", type=int, default=128, help="tokens per decode request (default %(default)s)")
    add("--decode-prompt-tokens", type=int, default=300,
        help="size of the decode workload's fixed prompt in tokens (default %(default)s)")
    add("--edit-tokens", type=int, default=EDIT_MAX_TOKENS,
        help="edit session: max_tokens of each request (default %(default)s)")
    add("--edit-context", type=int, default=EDIT_CONTEXT,
        help="edit session: prompt budget in tokens, cut once at a line (default %(default)s)")
    add("--edit-suffix-lines", type=int, default=EDIT_SUFFIX_LINES,
        help="edit session: lines after the cursor sent as suffix, 0 for none (default %(default)s)")
    add("--edit-file", default="", help="edit session: file typed through (default: collections/__init__.py)")
    add("--edit-line", type=int, default=-1,
        help="edit session: line (0-based) typing starts at (default: UserString.rfind's)")
    add("--load-prompts", type=int, help=argparse.SUPPRESS)
    add("--bandwidth-mb", type=int, help=argparse.SUPPRESS)
    add("--ready-timeout", type=float, default=300.0, help="seconds a server may take to start (default %(default)s)")
    add("--out", type=Path, default=REPO / "bench" / "results", help="output directory (default %(default)s)")
    add("--quick", action="store_true", help="tiny settings for a smoke run (a few minutes)")
    add("--url-ours", help="use this already-running server as 'ours' instead of starting one")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sessions = _names(parser, "sessions", "all" if args.sessions == "all" else args.sessions, SESSIONS)
    args.workloads = _names(parser, "workloads", ",".join(WORKLOADS) if args.workloads is None and not args.sessions
                            else args.workloads or "", WORKLOADS)
    default_systems = "ours,llamaserver" if args.sessions else "ours,naive,llamacpp"
    args.systems = _names(parser, "systems", args.systems or default_systems, SYSTEMS)
    args.clients = [int(c) for c in str(args.clients).split(",") if c.strip()]
    args.decode_clients = [int(c) for c in str(args.decode_clients).split(",") if c.strip()]
    if args.llama_server:
        os.environ["LLAMA_SERVER_BIN"] = str(Path(args.llama_server).resolve())  # read by bench.llama_server
    return args


def _names(parser: argparse.ArgumentParser, option: str, value: str, known: tuple[str, ...]) -> list[str]:
    """A comma-separated choice ('all' for every one), checked against ``known``."""
    names = list(known) if value.strip() == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = set(names) - set(known)
    if unknown:
        parser.error(f"unknown {option} {sorted(unknown)}; choose from {', '.join(known)}")
    return names


def _r(value: float | None, digits: int = 0) -> str:
    """A figure for the progress lines."""
    return "—" if value is None else f"{value:.{digits}f}"


def machine() -> dict[str, Any]:
    """CPU model, core count and the project's git revision (read-only)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        revision = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                                  text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        revision = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "git": revision, "python": platform.python_version()}


def make_prompts(corpus: Corpus, args: argparse.Namespace) -> dict[str, list[str]]:
    """The prompts every system gets: warm-up, and cold (one per run plus a warm-up) and the load pool when asked."""
    prompts = {"warm": corpus.prompts(2, 300, offset=0.85)}
    if "cold" in args.workloads:
        prompts["cold"] = corpus.prompts(args.cold_runs + 1, args.cold_tokens, offset=0.3, reverse=True)
    if "load" in args.workloads:
        prompts["load"] = corpus.prompts(args.load_prompts, args.load_tokens, offset=0.1)
    if "decode" in args.workloads:
        prompts["decode"] = corpus.prompts(1, args.decode_prompt_tokens, offset=0.55)
    return prompts


def _unavailable(name: str) -> str | None:
    """Why system ``name`` cannot run here (printed, and its column marked skipped); None when it can."""
    if name == "llamacpp" and not llamacpp_available():
        return (f"llama-cpp-python is not installed in this Python. Install it with\n   {LLAMACPP_INSTALL}\n"
                "   (builds llama.cpp from source: several minutes)")
    if name == "llamaserver" and find_binary() is None:
        return f"no llama-server binary. Build one (about 8 minutes on 2 cores) with\n   {BUILD_HINT}"
    return None


def run_system(name: str, model: ModelFiles, corpus: Corpus, prompts: dict[str, list[str]],
               banned: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Start one system, run warm-up, the chosen workloads and sessions on it, stop it; return its figures."""
    label = LABELS[name]
    reason = _unavailable(name)
    if reason:
        print(f"\n== {label}: skipped: {reason}", flush=True)
        return {"status": "skipped (not installed)"}
    print(f"\n== {label}: starting", flush=True)
    started = time.perf_counter()
    try:
        server = attach(name, args.url_ours) if name == "ours" and args.url_ours else \
            start(name, model, args.ready_timeout)
    except ServerStartError as exc:
        print(f"== {label}: failed to start, column skipped: {exc}", flush=True)
        return {"status": "failed to start"}
    ready_s = time.perf_counter() - started
    # An attached server was started elsewhere: its start time is unknown.
    figures: dict[str, Any] = {"status": "ok", "url": server.url, "log": str(server.log_path or ""),
                               "command": server.command, "start_s": None if server.process is None
                               else round(ready_s, 2)}
    try:
        print(f"   ready at {server.url} after {ready_s:.1f} s; warming up", flush=True)
        warm_up(server, prompts["warm"], args.timeout)
        for part in server.parts:  # through a proxy the warm-up reached one instance: warm each one
            warm_up(part, prompts["warm"], args.timeout)
        run_workloads(server, corpus, prompts, banned, args, figures)
        run_sessions(server, corpus, model, args, figures)
    except Exception as exc:  # keep what was measured; the other systems still run
        figures["status"] = f"error: {exc}"
        print(f"== {label}: workload failed: {exc}", flush=True)
        traceback.print_exc()
        print(server.log_tail(), flush=True)
    finally:
        stop(server)
    print(f"== {label}: done in {time.perf_counter() - started:.0f} s", flush=True)
    return figures


def run_workloads(server: Server, corpus: Corpus, prompts: dict[str, list[str]], banned: list[int],
                  args: argparse.Namespace, figures: dict[str, Any]) -> None:
    """The keystroke, cold, decode and load workloads that were asked for, into ``figures``."""
    if "keystroke" in args.workloads:
        options = KeystrokeOptions(awaited=args.awaited if server.name != "naive" else args.awaited_naive,
                                   chars_per_step=args.chars_per_step, burst=args.burst,
                                   window_s=args.window_ms / 1000, context_tokens=args.context_tokens,
                                   context_slack=args.context_slack,
                                   max_tokens=args.max_tokens, timeout_s=args.timeout)
        print(f"   keystroke session: {options.awaited} bursts of {options.burst} steps", flush=True)
        figures["keystroke"] = k = keystroke(server, corpus, options)
        print(f"   -> latency p50 {_r(k['latency_p50_ms'])} ms, p95 {_r(k['latency_p95_ms'])} ms, "
              f"TTFT p50 {_r(k['ttft_p50_ms'])} ms; timeouts {k['timeouts']}, errors {k['errors']}", flush=True)
        drain(server)
    if "cold" in args.workloads:
        print(f"   cold prompts: {len(prompts['cold']) - 1} runs after 1 warm-up", flush=True)
        figures["cold"] = c = cold(server, prompts["cold"], corpus, args.max_tokens, banned, args.timeout * 5)
        print(f"   -> TTFT {_r(c['ttft_ms'])} ms, total {_r(c['total_ms'])} ms, "
              f"decode {_r(c['decode_tok_s'], 1)} tok/s", flush=True)
    if "decode" in args.workloads:
        print(f"   decode: {args.decode_tokens} tokens on a {args.decode_prompt_tokens}-token prompt, streams "
              f"{','.join(map(str, args.decode_clients))}, {args.decode_runs} runs after 1 warm-up", flush=True)
        figures["decode"] = d = decode(server, prompts["decode"][0], corpus, args.decode_clients, args.decode_runs,
                                       args.decode_tokens, banned, args.timeout * 5)
        for clients in args.decode_clients:
            level = d[str(clients)]
            print(f"   -> {clients} stream{'s' * (clients > 1)}: decode {_r(level['decode_tok_s'], 1)} tok/s, "
                  f"over the wall {_r(level['tok_s'], 1)} tok/s, TTFT {_r(level['ttft_ms'])} ms; accepted draft "
                  f"tokens per step {_r(level['spec']['accepted_per_step'], 2)}", flush=True)
    if "load" in args.workloads:
        figures["load"] = {}
        feed = PromptFeed(prompts["load"])
        for clients in args.clients:
            print(f"   load: {clients} client{'s' * (clients > 1)} for {args.load_seconds:g} s", flush=True)
            before = read_spec_counters(server.url)
            figures["load"][str(clients)] = result = load(server, feed, clients, args.load_seconds,
                                                          args.max_tokens, banned, args.timeout * 5)
            result["spec"] = spec_delta(before, read_spec_counters(server.url))
            print(f"   -> {result['tok_s']:.1f} tok/s, {result['requests']} requests, "
                  f"p95 {_r(result['latency_p95_ms'])} ms, errors {result['errors']}", flush=True)


def session_options(args: argparse.Namespace, model: ModelFiles) -> SessionOptions:
    """The editor sessions' settings from the command line."""
    return SessionOptions(awaited=args.session_awaited, chars_per_step=args.chars_per_step, burst=args.burst,
                          window_s=args.window_ms / 1000, start_line=args.session_line, source=args.session_file,
                          timeout_s=args.timeout, pause_every=args.pause_every, pause_s=args.pause_s,
                          ring_files=args.ring_files, seed=args.seed, context_window=model_window(model.folder),
                          edit_file=args.edit_file, edit_line=args.edit_line, edit_tokens=args.edit_tokens,
                          edit_context=args.edit_context, edit_suffix_lines=args.edit_suffix_lines,
                          editors=args.editors)


def run_sessions(server: Server, corpus: Corpus, model: ModelFiles, args: argparse.Namespace,
                 figures: dict[str, Any]) -> None:
    """Each editor session that was asked for, one after another, into figures["sessions"]."""
    if not args.sessions:
        return
    figures["sessions"] = {}
    options = session_options(args, model)
    for client in args.sessions:
        print(f"   editor session {client}: {options.awaited} bursts of {options.burst} keystrokes"
              f"{f', {options.editors} editors at once' if options.editors > 1 else ''}", flush=True)
        figures["sessions"][client] = s = run_session(client, server, corpus, options)
        if s["status"] != "ok":
            print(f"   -> {s['status']}", flush=True)
            continue
        print(f"   -> awaited p50 {_r(s['latency_p50_ms'])} ms, p95 {_r(s['latency_p95_ms'])} ms, first token p50 "
              f"{_r(s['ttft_p50_ms'])} ms; full prefills {s['full_prefills']} of {s['counted']} counted; reused "
              f"{s['reused_tokens']} of {s['prompt_tokens']} prompt tokens; requests {s['requests']}; "
              f"timeouts {s['timeouts']}, errors {s['errors']} ({s['seconds']:.0f} s)", flush=True)
        cache = s["cache"]
        if cache["hits"] is not None:
            spread = ", ".join(str(part["requests"]) for part in cache["per_instance"])
            print(f"      prefix cache: {cache['hits']} hits, {cache['misses']} misses (hit rate "
                  f"{_r(100 * cache['hit_rate'] if cache['hit_rate'] is not None else None)} %); requests per "
                  f"instance {spread}", flush=True)
        if s["decode_tok_s"] is not None or s["spec"]["steps"] is not None:
            spec = s["spec"]
            print(f"      decode p50 {_r(s['decode_tok_s'], 1)} tok/s; draft tokens accepted {_r(spec['accepted'])} "
                  f"of {_r(spec['drafted'])} in {_r(spec['steps'])} steps", flush=True)
        for part in server.parts or [server]:
            drain(part)


def settings_line(args: argparse.Namespace) -> str:
    """The settings of this run, for the report's head."""
    parts = []
    if "keystroke" in args.workloads:
        parts.append(f"keystroke: {args.awaited} awaited (naive {args.awaited_naive}), {args.chars_per_step} "
                     f"chars/step, bursts of {args.burst}, {args.window_ms:g} ms window, {args.context_tokens}-token "
                     f"context (slack {args.context_slack})")
    if "cold" in args.workloads:
        parts.append(f"cold: {args.cold_runs} runs of {args.cold_tokens} tokens")
    if "decode" in args.workloads:
        parts.append(f"decode: {args.decode_runs} runs of {args.decode_tokens} tokens on one "
                     f"{args.decode_prompt_tokens}-token prompt, streams {','.join(map(str, args.decode_clients))}")
    if "load" in args.workloads:
        parts.append(f"load: {args.load_seconds:g} s per level, {args.load_tokens}-token prompts")
    if set(args.workloads) & {"keystroke", "cold", "load"}:  # decode has its own --decode-tokens
        parts.append(f"{args.max_tokens} new tokens")
    if args.sessions:
        parts.append(f"editor sessions ({', '.join(args.sessions)}): {args.editors} editor(s) at once, "
                     f"{args.session_awaited} awaited answers each, "
                     f"bursts of {args.burst} keystrokes of {args.chars_per_step} chars {args.window_ms:g} ms apart, "
                     f"from line {args.session_line} (edit: its own file and line); request cap {args.timeout:g} s")
    if "edit" in args.sessions:
        source, line = Edit.target(SessionOptions(edit_file=args.edit_file, edit_line=args.edit_line))
        parts.append(f"edit: re-types {source.parent.name}/{source.name} from line {line}, {args.edit_tokens} "
                     f"tokens, {args.edit_context}-token prompt budget, {args.edit_suffix_lines} suffix lines")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 0 when at least one system produced figures."""
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers this run started are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args.out.mkdir(parents=True, exist_ok=True)
    print("resolving the model (the first run converts the GGUF, ~20 s)...", flush=True)
    model = resolve_model()
    corpus = Corpus(model.folder)
    banned = corpus.eos_ids()
    prompts = make_prompts(corpus, args)
    print(f"model {model.name}: {model.folder}\nGGUF: {model.gguf}\nours runs it as {model.ours_dtype}; "
          f"EOS ids banned in cold/load: {banned}", flush=True)
    roof = measure_roofline(model, args) if args.workloads else {}

    systems = {name: run_system(name, model, corpus, prompts, banned, args) for name in args.systems}

    fidelity = report.latest_fidelity(args.out)
    report.attach_fidelity(systems, fidelity)
    meta = {"date": datetime.now().strftime("%Y-%m-%d %H:%M"), **machine(), "model": model.name,
            "settings": settings_line(args), "args": {k: str(v) for k, v in vars(args).items()},
            "workloads": args.workloads, "sessions": args.sessions, "fidelity_file": fidelity.get("file")}
    text = report.markdown(meta, systems, roof, args.clients)
    print("\n" + text)
    report.save(args.out, text, {"meta": meta, "roofline": roof, "systems": systems,
                                 "model": {k: str(v) for k, v in vars(model).items()}})
    written = f"{args.out / 'results.md'} and {args.out / 'results.json'}"
    png = args.out / "keystroke_latency.png"
    if "keystroke" in args.workloads and report.plot(systems, png, args.window_ms):
        written = f"{args.out / 'results.md'}, {args.out / 'results.json'} and {png}"
    print(f"wrote {written}")
    return 0 if any(s.get("status") == "ok" for s in systems.values()) else 1


def measure_roofline(model: ModelFiles, args: argparse.Namespace) -> dict[str, Any]:
    """Memory bandwidth and weight bytes per token (only the older workloads use them)."""
    print("measuring memory bandwidth and weight bytes per token...", flush=True)
    roof = roofline.measure(model, args.bandwidth_mb)
    sizes = ", ".join(f"{LABELS[n]} {roof['bytes_per_token'][n] / 1e6:.0f} MB"
                      for n in LABELS if roof["bytes_per_token"].get(n))
    print(f"   bandwidth {_r(roof['bandwidth_gb_s']['1'], 1)} GB/s (1 thread), "
          f"{_r(roof['bandwidth_gb_s']['2'], 1)} GB/s (2 threads); weights read per token: {sizes}", flush=True)
    return roof


if __name__ == "__main__":
    sys.exit(main())
