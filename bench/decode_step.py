"""``python -m bench.decode_step``: CPU ms and aten ops per decode step, HF's forward against FastDecoder.step.

Loads the default model as the server does (int8 on the CPU), one torch thread,
a fixed-length context of random ids, and times one step at each batch size (rows)
and number of new tokens (q), the cache kept at the same length between steps.  The
machine may be shared: compare columns within one run.  ``--weights`` picks the loader's
int8 (default), torch.ao's dynamic int8 Linears, or float32 (which adds a column for
the torch.compile'd FastDecoder).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Callable

import torch
from torch.profiler import profile
from transformers import DynamicCache

from app.engine.fastpath import FastDecoder

log = logging.getLogger("bench.decode_step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1000, help="cached tokens per row")
    parser.add_argument("--rows", default="1,4,8", help="batch sizes")
    parser.add_argument("--q", default="1,5", help="new tokens per row per step")
    parser.add_argument("--steps", type=int, default=8, help="timed rounds per cell (median reported)")
    parser.add_argument("--masked", action="store_true", help="add a column: FastDecoder.step given an all-True mask")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", choices=("int8", "ao-int8", "float32"), default="int8",
                        help="the loader's int8, torch.ao quantize_dynamic int8, or float32 (+ a compiled column)")
    return parser.parse_args(argv)


def load_model(weights: str):
    """The configured default model on the CPU, loaded through the server's loader."""
    from transformers.utils import logging as hf_logging

    from app.engine.loader import load_pretrained
    from config import load_settings

    hf_logging.disable_progress_bar()
    settings = load_settings()
    model, _ = load_pretrained(settings.models[0], settings.cache_dir, torch.device("cpu"),
                               "float32" if weights == "ao-int8" else weights)
    if weights == "ao-int8":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    return model


def prefill(model, context: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) [1, kv_heads, context, head_dim] of random ids, computed by HF."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


def timed(steps: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, int]]:
    """{name: (median CPU ms per call, top-level aten ops in one call)}, the steps called in turn each round.

    CPU time of this thread, not wall time, and interleaved rounds: on a shared machine
    the wall clock also counts the time other processes hold the core, and load that
    comes and goes would favour whichever variant ran in a quiet moment.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(rounds + 2):
        for name, step in steps.items():
            started = time.thread_time()
            step()
            if round_ >= 2:  # two warm-up rounds
                times[name].append((time.thread_time() - started) * 1e3)
    result = {}
    for name, step in steps.items():
        with profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        result[name] = (statistics.median(times[name]), top_level_ops(prof.events()))
    return result


def top_level_ops(events) -> int:
    """Operator calls not made from inside another operator (each is one dispatch from Python)."""
    is_op = lambda name: name.startswith(("aten::", "quantized::"))  # noqa: E731
    count = 0
    for event in events:
        parent = event.cpu_parent
        while parent is not None and not is_op(parent.name):
            parent = parent.cpu_parent
        count += parent is None and is_op(event.name)
    return count


def hf_step(model, prefix, rows: int, q: int) -> Callable[[], object]:
    """One HF forward of q tokens per row on a DynamicCache cropped back to its length afterwards."""
    from app.engine.kvcache import cache_from_tensors

    cache = cache_from_tensors([(k.expand(rows, -1, -1, -1).clone(), v.expand(rows, -1, -1, -1).clone())
                                for k, v in prefix])
    context = prefix[0][0].shape[2]
    ids = torch.randint(0, model.config.vocab_size, (rows, q))
    positions = torch.arange(context, context + q).expand(rows, q)

    def step():
        logits = model(ids, position_ids=positions, cache=cache, use_cache=True).logits
        cache.crop(-q)
        return logits
    return step


def fast_step(decoder: FastDecoder, prefix, rows: int, q: int, vocab: int,
              masked: bool = False) -> Callable[[], object]:
    """One FastDecoder.step of q tokens per row into buffers holding the prefix (rewritten in place each time)."""
    context = prefix[0][0].shape[2]
    layers = []
    for keys, values in prefix:
        shape = (rows, keys.shape[1], context + q, keys.shape[3])
        k, v = torch.empty(shape), torch.empty(shape)
        k[:, :, :context], v[:, :, :context] = keys, values
        layers.append((k, v))
    ids = torch.randint(0, vocab, (rows, q))
    positions = torch.arange(context, context + q).expand(rows, q)
    mask = torch.ones(rows, context + q, dtype=torch.bool) if masked else None
    return lambda: decoder.step(ids, positions, layers, mask)


def compiled_step(model, prefix, rows: int, q: int, vocab: int) -> tuple[Callable[[], object], float]:
    """The torch.compile'd FastDecoder's step (float Linears) and the seconds its first call took."""
    step = fast_step(FastDecoder.for_model(model, compile=True), prefix, rows, q, vocab)
    started = time.perf_counter()
    step()
    return step, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    """Print the ms/step and ops/step table."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    model = load_model(args.weights)
    compiled = args.weights == "float32"
    vocab = model.config.vocab_size
    with torch.inference_mode():
        log.info("prefilling %d random tokens through HF", args.context)
        prefix = prefill(model, args.context)
        torch.set_num_threads(args.threads)
        fused, unfused = FastDecoder.for_model(model), FastDecoder.for_model(model, fuse=False)
        columns = ["HF", "fast", "unfused"] + (["masked"] if args.masked else []) + (["compiled"] if compiled else [])
        print(f"{type(model).__name__}, {args.weights} ({', '.join(fused.kinds)} Linears), context {args.context}, "
              f"{args.threads} thread(s), fused q/k/v: {fused.fused}; CPU ms per step (top-level ops per step)")
        print(f"{'rows':>4} {'q':>2} | " + " | ".join(f"{name:>14}" for name in columns))
        for rows in map(int, args.rows.split(",")):
            for q in map(int, args.q.split(",")):
                steps = {"HF": hf_step(model, prefix, rows, q), "fast": fast_step(fused, prefix, rows, q, vocab),
                         "unfused": fast_step(unfused, prefix, rows, q, vocab)}
                if args.masked:
                    steps["masked"] = fast_step(fused, prefix, rows, q, vocab, masked=True)
                note = ""
                if compiled:
                    steps["compiled"], seconds = compiled_step(model, prefix, rows, q, vocab)
                    note = f"  (first compiled call {seconds:.0f} s)"
                cells = timed(steps, args.steps)
                print(f"{rows:>4} {q:>2} | " + " | ".join(f"{ms:7.2f} ({ops:4d})" for ms, ops in cells.values())
                      + note, flush=True)


if __name__ == "__main__":
    main()
