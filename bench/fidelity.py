"""``python -m bench.fidelity``: how often anchored prompts (app/engine/anchor.py) get the answer the prompt as sent gets.

Both kinds of anchoring change what the model reads at the far end of a prompt whose top
moved: ``anchor_lines`` (the default) starts the moving part at a line chosen by its own content
and leaves a few far lines out, reusing the cache exactly; ``anchor_restore_tokens``
(approximate, off by default) restores up to that many far tokens of a cached prompt, so the
answer depends on what the cache held. This replays sliding editor sessions over real
standard-library code, one line typed per step, in four clients' prompt shapes (FauxPilot,
Copilot, Continue, llama.vscode), and at every step asks three engines over the same weights
for a greedy answer: the prompt as sent (no anchoring), the default settings, and restoring on.
Answers are never replayed from the answer cache.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .corpus import stdlib_files
from .editors import Doc, continue_prompt, copilot_prompt, fauxpilot_prompt, infill_fields

log = logging.getLogger("bench.fidelity")
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Step:
    """One prompt of a session: the style, where the cursor is, the text sent and the stops."""

    style: str
    file: str
    line: int
    prompt: str
    suffix: str | None
    stop: tuple[str, ...]
    expected: str  # the rest of the line as the file has it


def snippets_of(paths: list[Path], start: int = 40, size: int = 12) -> list[tuple[str, str]]:
    """(path, code) snippets of other files: Continue's context in front of its prefix."""
    return [(f"Lib/{p.name}", "".join(p.read_text(encoding="utf-8").splitlines(keepends=True)[start:start + size]))
            for p in paths]


def step_of(style: str, doc: Doc, snippets: list[tuple[str, str]], count: Callable[[str], int],
            rng: random.Random) -> tuple[str, str | None]:
    """(prompt, suffix) as the client of ``style`` sends them at ``doc``'s cursor (bench/editors.py)."""
    if style == "fauxpilot":
        return fauxpilot_prompt(doc), None
    if style == "copilot":
        prompt = copilot_prompt(doc, [], count, window=8192)
        return prompt.prefix, prompt.suffix
    if style == "llamavscode":  # /infill's input_prefix + prompt, as the server joins them
        fields = infill_fields(doc)
        return fields.input_prefix + fields.prompt, fields.input_suffix
    return continue_prompt(doc, snippets, count, rng)


def session(style: str, path: Path, first_line: int, steps: int, count: Callable[[str], int],
            rng: random.Random) -> Iterator[Step]:
    """The prompts of one developer typing line after line of ``path`` from ``first_line``, in a client's shape."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    snippets = snippets_of([p for p in stdlib_files() if p != path][:3])
    for cursor in range(first_line, min(first_line + steps, len(lines) - 1)):
        column = len(lines[cursor].rstrip("\n")) // 2  # mid-line: the developer is typing it
        doc = Doc(text, sum(len(line) for line in lines[:cursor]) + column, path.name)
        prompt, suffix = step_of(style, doc, snippets, count, rng)
        yield Step(style, path.name, cursor, prompt, suffix, ("\n",), lines[cursor][column:].rstrip("\n"))


MODES = {"sent": {"anchor_lines": 0, "anchor_restore_tokens": 0}, "anchored": {},
         "restored": {"anchor_restore_tokens": 512}}


def compare(step: Step, engines: dict, max_tokens: int) -> dict:
    """Every mode's greedy answer to one step, with its reuse and whether its prompt was changed."""
    from app.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=step.stop)
    row = {"style": step.style, "file": step.file, "line": step.line, "prompt_tail": step.prompt[-160:]}
    for mode, engine in engines.items():
        request = engine.prepare(step.prompt, params, suffix=step.suffix, request_id=f"{mode}-{step.style}-{step.line}")
        row[mode] = {"text": engine.complete(request)[0].text, "reused": request.reused,
                     "prompt_tokens": len(request.prompt_ids), "restored": bool(request.realigned)}
    sent = row["sent"]
    for mode in engines:
        row[mode]["changed"] = row[mode]["prompt_tokens"] != sent["prompt_tokens"] or row[mode]["restored"]
        row[mode]["same"] = row[mode]["text"] == sent["text"]
        row[mode]["right"] = row[mode]["text"].strip() == step.expected.strip() != ""
    return row


def summarize(rows: list[dict], modes: list[str]) -> dict:
    """Per style and mode: prompts changed, the share of answers equal to the prompt-as-sent answer, reuse."""
    summary: dict = {}
    for style in sorted({r["style"] for r in rows}):
        mine = [r for r in rows if r["style"] == style]
        for mode in modes:
            answers = [r[mode] for r in mine]
            changed = [a for a in answers if a["changed"]]
            summary.setdefault(style, {})[mode] = {
                "prompts": len(answers), "changed": len(changed),
                "same_when_changed": round(sum(a["same"] for a in changed) / len(changed), 4) if changed else None,
                "same_all": round(sum(a["same"] for a in answers) / len(answers), 4),
                "right": round(sum(a["right"] for a in answers) / len(answers), 4),
                "reused_share": round(sum(a["reused"] for a in answers)
                                      / max(1, sum(a["prompt_tokens"] for a in answers)), 3),
            }
    return summary


def load_engines() -> dict:
    """The default model under each mode's settings, all over the same loaded weights."""
    from app.engine import Engine
    from app.engine.loader import load_engine
    from config import load_settings

    settings = load_settings().replace(answer_cache=0)
    default = load_engine(settings.models[0], settings)
    engines = {}
    for mode, changes in MODES.items():
        options = dataclasses.replace(default.options, **changes)
        engines[mode] = Engine(default.config, default.model, default.tokenizer, default.device, options)
    return engines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.splitlines()[0])
    parser.add_argument("--styles", default="fauxpilot,copilot,continue,llamavscode")
    parser.add_argument("--steps", type=int, default=70, help="lines typed per style (default %(default)s)")
    parser.add_argument("--files", type=int, default=2, help="stdlib files the steps are spread over")
    parser.add_argument("--first-line", type=int, default=200,
                        help="where typing starts; a client's window moves only past its size (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--examples", type=int, default=5, help="differing answers to print")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return parser.parse_args(argv)


def report(rows: list[dict], summary: dict, examples: int, seconds: float) -> None:
    """Print the rates per style and mode, and a few answers that differ from the prompt-as-sent answer."""
    print(f"\nanchoring fidelity: {len(rows)} prompts, {seconds:.0f} s; 'same' = equal to the answer to the prompt "
          "as sent; 'line right' = the answer is the rest of the line as the file has it")
    print(f"{'style':<10} {'mode':<9} {'prompts':>7} {'changed':>7} {'same (changed)':>14} {'same (all)':>10} "
          f"{'reused':>7} {'line right':>10}")
    for style, modes in summary.items():
        for mode, s in modes.items():
            rate = "—" if s["same_when_changed"] is None else f"{100 * s['same_when_changed']:.1f}%"
            print(f"{style:<10} {mode:<9} {s['prompts']:>7} {s['changed']:>7} {rate:>14} {100 * s['same_all']:>9.1f}% "
                  f"{100 * s['reused_share']:>6.0f}% {100 * s['right']:>9.1f}%")
    for mode in ("anchored", "restored"):
        for row in [r for r in rows if not r[mode]["same"]][:examples]:
            print(f"\n-- {mode}, {row['style']} {row['file']}:{row['line']}: prompt ends {row['prompt_tail'][-60:]!r}"
                  f"\n   {mode}: {row[mode]['text']!r}\n   as sent:  {row['sent']['text']!r}")


def main(argv: list[str] | None = None) -> None:
    """Run the sessions, print the rates and differing examples, save the rows as JSON."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    engines = load_engines()
    engines["sent"].warmup()
    tokenizer = engines["sent"].tokenizer
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    long_enough = args.first_line + args.steps + 70
    files = [p for p in stdlib_files() if len(p.read_text(encoding="utf-8").splitlines()) > long_enough][:args.files]
    rng, rows, started = random.Random(7), [], time.perf_counter()
    for style in args.styles.split(","):
        for path in files:
            for engine in engines.values():
                engine.forget()  # a new session
            for step in session(style, path, args.first_line, args.steps // len(files), count, rng):
                rows.append(compare(step, engines, args.max_tokens))
    summary = summarize(rows, list(engines))
    report(rows, summary, args.examples, time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"fidelity-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
