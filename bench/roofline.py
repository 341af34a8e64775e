"""The decode roofline: memory read bandwidth and the weight bytes each system reads per generated token.

Generating one token at batch 1 reads every weight used once, so tokens/s can at
best be bandwidth / bytes-per-token.
"""
from __future__ import annotations

import gc
import time
from typing import Any

import torch

from .servers import ModelFiles


def memory_bandwidth(threads: int, megabytes: int = 512, repeats: int = 7) -> float:
    """Read bandwidth in GB/s: best of ``repeats`` sums of a ``megabytes`` float32 tensor on ``threads`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
        data.sum()  # fault the pages in and warm the thread pool
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            data.sum()
            best = min(best, time.perf_counter() - started)
        return data.numel() * data.element_size() / best / 1e9
    finally:
        del data
        torch.set_num_threads(previous)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of parameters one decode step reads: whole matrices, but one row of an embedding table.

    A tied lm_head is a Linear sharing the embedding's matrix, so it counts in full
    there; an int8 Linear counts 1 byte per weight plus its per-channel scales and
    zero points (4 bytes each).
    """
    from app.engine.int8 import Int8Linear

    total = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):
            total += module.weight_bytes()
        elif isinstance(module, torch.nn.Embedding):
            total += module.embedding_dim * module.weight.element_size()
        else:
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


def bytes_per_token(model_files: ModelFiles) -> dict[str, Any]:
    """Weight bytes per token for ours (its resolved format), naive (float32) and llama.cpp (the GGUF file)."""
    from app.engine.loader import load_pretrained, quantize_int8
    from config import load_settings

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # keep the benchmark's output readable
    except ImportError:
        pass
    settings = load_settings()
    model, _ = load_pretrained(settings.models[0], settings.cache_dir, torch.device("cpu"), "float32")
    result: dict[str, Any] = {
        "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "naive": weight_bytes_per_token(model),
        "ours_format": model_files.ours_dtype,
    }
    if model_files.ours_dtype == "int8":
        model = quantize_int8(model)
    elif model_files.ours_dtype != "float32":
        model = model.to(getattr(torch, model_files.ours_dtype))
    result["ours"] = weight_bytes_per_token(model)
    result["ours_nospec"] = result["ours"]  # the same server and weights, speculation off
    result["llamacpp"] = model_files.gguf.stat().st_size if model_files.gguf else None
    result["llamaserver"] = result["llamacpp"]  # the same GGUF file, read by llama.cpp's own server
    del model
    gc.collect()
    return result


def measure(model_files: ModelFiles, bandwidth_mb: int = 512) -> dict[str, Any]:
    """Bandwidth with 1 and 2 threads, bytes per token, and the roofline tok/s of each system."""
    bandwidth = {threads: memory_bandwidth(threads, bandwidth_mb) for threads in (1, 2)}
    best = max(bandwidth.values())
    per_token = bytes_per_token(model_files)
    roofline = {name: best * 1e9 / per_token[name]
                for name in ("ours", "ours_nospec", "naive", "llamacpp", "llamaserver") if per_token.get(name)}
    return {"bandwidth_gb_s": {str(k): v for k, v in bandwidth.items()}, "bandwidth_best_gb_s": best,
            "bytes_per_token": per_token, "roofline_tok_s": roofline}
