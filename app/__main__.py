"""Command line: debug the model without the server.

    python -m app complete "def fibonacci(n):" --max-tokens 48 --debug
    python -m app models
    python -m app prepare          # convert/download every configured model now
    python -m app prepare --verify # ... and hash every byte of the converted copies
    python -m app bench            # time to first token and tokens/s on this machine
"""
from __future__ import annotations

import argparse
import logging
import sys

from config import ConfigError, ModelConfig, Settings, load_settings

log = logging.getLogger("app.cli")


def _engine(settings: Settings, name: str | None):
    from app.engine.registry import EngineRegistry

    return EngineRegistry(settings).get(name)


def cmd_complete(args: argparse.Namespace, settings: Settings) -> int:
    """Print the completion of a prompt (streamed as it is generated with --stream)."""
    from app.engine import SamplingParams

    engine = _engine(settings, args.model)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            stop=tuple(args.stop), seed=args.seed)
    request = engine.prepare(args.prompt, params, suffix=args.suffix, n=args.n, echo=args.echo, request_id="cli")
    if args.stream:
        for delta in engine.stream(request):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for result in engine.complete(request):
        if args.n > 1:
            print(f"--- choice {result.index} ({result.finish_reason}, {result.completion_tokens} tokens)")
        print(result.text)
    return 0


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    """List the configured models and their names."""
    for model in settings.models:
        fim = "fim" if model.fim else "no fim"
        print(f"{model.name}\t{model.source}\t{model.kind}\t{fim}\taliases: {', '.join(model.aliases) or '-'}")
    return 0


def cmd_prepare(args: argparse.Namespace, settings: Settings) -> int:
    """Load every configured model once (converting GGUF files into the cache); --verify hashes every byte."""
    if not args.verify:
        for model in settings.models:
            _engine(settings, model.name)
        return 0
    statuses = [_verify(settings, model) for model in settings.models]
    if "failed" in statuses:
        return 1
    # Repaired damage still exits non-zero, so a cron job or deploy script notices a failing disk.
    return 3 if "re-converted" in statuses else 0


def _verify(settings: Settings, model: ModelConfig) -> str:
    """Check every byte of (or convert) one model's copy, load it, print ok / converted / re-converted / failed."""
    from app.engine.loader import ModelLoadError, load_engine, prepare_copy, resolve_source

    try:
        source = resolve_source(model)
        status, where = "ok", f"{source.location} (not a converted GGUF: nothing to hash)"
        if source.gguf_file:
            folder, status = prepare_copy(source, settings.cache_dir, full=True)
            where = str(folder)
        load_engine(model, settings)  # the copy must also load, as a worker would load it
    except ModelLoadError as exc:
        print(f"{model.name}\tfailed\t{exc}")
        return "failed"
    print(f"{model.name}\t{status}\t{where}")
    return status


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    """Measure latency and throughput of the configured model."""
    from app.latency import run_benchmark

    run_benchmark(_engine(settings, args.model), max_tokens=args.max_tokens, runs=args.runs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m app`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="override the configured device (cpu, cuda, cuda:1)")
    parser.add_argument("--debug", action="store_true", help="log the model prompt, token ids, stops, timings")
    sub = parser.add_subparsers(dest="command", required=True)

    complete = sub.add_parser("complete", help="complete a prompt")
    complete.add_argument("prompt")
    complete.add_argument("--suffix", help="text after the cursor (fill-in-the-middle)")
    complete.add_argument("--model", help="model name or alias (default: the first configured)")
    complete.add_argument("--max-tokens", type=int, default=48)
    complete.add_argument("--temperature", type=float, default=0.0)
    complete.add_argument("--top-p", type=float, default=1.0)
    complete.add_argument("--n", type=int, default=1)
    complete.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    complete.add_argument("--seed", type=int)
    complete.add_argument("--echo", action="store_true")
    complete.add_argument("--stream", action="store_true", help="print text as it is generated")
    complete.set_defaults(func=cmd_complete)

    sub.add_parser("models", help="list configured models").set_defaults(func=cmd_models)
    prepare = sub.add_parser("prepare", help="load/convert every configured model")
    prepare.add_argument("--verify", action="store_true",
                         help="hash every byte of each converted copy, re-converting damaged ones; print one line "
                              "per model; exit 1 if a model failed, 3 if a copy was damaged and re-converted")
    prepare.set_defaults(func=cmd_prepare)

    bench = sub.add_parser("bench", help="time to first token and tokens/s")
    bench.add_argument("--model")
    bench.add_argument("--max-tokens", type=int, default=48)
    bench.add_argument("--runs", type=int, default=3)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m app``."""
    from app.workers import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(args.debug)
    try:
        settings = load_settings()
        changes = {"debug": args.debug or settings.debug}
        if args.device:
            changes["device"] = args.device
        settings = settings.replace(**changes)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    from app.engine.errors import EngineError

    try:
        return args.func(args, settings)
    except EngineError as exc:
        log.error("%s", exc.message)
        return 1


if __name__ == "__main__":
    sys.exit(main())
