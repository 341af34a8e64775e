"""``python -m app bench``: one engine's latency in-process (no HTTP): time to first token and decode speed,
cold and while typing. The HTTP benchmarks against peers live in ``bench/``."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from .engine import Engine, SamplingParams

SHORT_PROMPT = "# Path: fibonacci.py\ndef fibonacci(n):\n"


def long_prompt(engine: Engine, tokens: int) -> str:
    """About ``tokens`` tokens of real Python source (this project's own), ending mid-file."""
    source = "".join(p.read_text(encoding="utf-8") for p in sorted(Path(__file__).parent.rglob("*.py")))
    ids = engine.tokenizer(source, add_special_tokens=False)["input_ids"][:tokens]
    return "# Path: app/engine.py\n" + engine.decode(ids)


def timed_completion(engine: Engine, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """Run one greedy completion of exactly ``max_tokens`` tokens; return (ttft s, total s, tokens)."""
    # End-of-sequence is banned so every run decodes the same number of tokens.
    bias = tuple((token, -100.0) for token in sorted(engine.preparer.eos_ids))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias=bias)
    request = engine.prepare(prompt, params, request_id="bench")
    started = time.perf_counter()
    first = None
    for _ in engine.stream(request):
        first = first or time.perf_counter()
    end = time.perf_counter()
    return first - started, end - started, request.completion_tokens


def _report(label: str, samples: list[tuple[float, float, int]]) -> None:
    ttft = statistics.median(s[0] for s in samples)
    total = statistics.median(s[1] for s in samples)
    tokens = samples[0][2]
    rate = (tokens - 1) / max(total - ttft, 1e-9)
    print(f"{label:<44} ttft {ttft * 1000:7.0f} ms   total {total * 1000:7.0f} ms   decode {rate:6.1f} tok/s")


def run_benchmark(engine: Engine, max_tokens: int = 48, runs: int = 3) -> None:
    """Print medians over ``runs`` runs (after warm-up) for three typical completion requests."""
    engine.warmup()
    print(f"model {engine.name} on {engine.device} ({engine.scheduler.threads}), "
          f"{max_tokens}-token greedy completions, median of {runs}")
    cold = []
    for _ in range(runs):
        engine.forget()
        cold.append(timed_completion(engine, SHORT_PROMPT, max_tokens))
    _report(f"short prompt ({len(engine.preparer.encode(SHORT_PROMPT)[0])} tokens), cold", cold)

    prompt = long_prompt(engine, 1000)
    size = len(engine.preparer.encode(prompt)[0])
    cold = []
    for _ in range(runs):
        engine.forget()
        cold.append(timed_completion(engine, prompt, max_tokens))
    _report(f"long prompt ({size} tokens), cold", cold)

    typing = []
    for i in range(runs):
        # The developer typed a few more characters: the previous prompt is a prefix.
        prompt += f"x{i} = "
        typing.append(timed_completion(engine, prompt, max_tokens))
    _report("long prompt + keystrokes (prefix reused)", typing)
