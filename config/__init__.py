"""Configuration: defaults in code, a TOML file for server and models, environment overrides.

This is the only module that reads ``os.environ``; everything else receives a
:class:`Settings` object.  Precedence, lowest first: the dataclass defaults below,
the TOML file (``config/fauxpilot.toml`` or ``$FAUXPILOT_CONFIG``), then the
``FAUXPILOT_*`` environment variables a sysadmin sets in a systemd unit.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

DEFAULT_CONFIG_FILE = Path(__file__).with_name("fauxpilot.toml")
KINDS = ("causal", "seq2seq")
BACKENDS = ("local", "openai")  # in-process weights, or an OpenAI-compatible completions server
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
DECODE_STEPS = ("auto", "fast", "compiled", "hf")
FIM_ORDERS = ("psm", "spm")
# Each repo template, the placeholders it must hold and those it may.
REPO_PLACEHOLDERS = (("name", ("{repo}",), ()), ("file", ("{path}", "{code}"), ()), ("current", (), ("{path}",)))


# Threads beyond the engines' admission: probes, 429s and requests being read never wait for generation.
SPARE_THREADS = 8


class ConfigError(ValueError):
    """A configuration file or environment value that cannot be used."""


@dataclass(frozen=True)
class FimTemplate:
    """How (prefix, suffix) become a fill-in-the-middle prompt, as the model card writes it.

    ``template`` holds ``{prefix}`` and ``{suffix}``; everything else in it is the
    model's special tokens (checked against the tokenizer at start-up), e.g.
    ``"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"``.
    """

    template: str

    @classmethod
    def from_tokens(cls, prefix: str, suffix: str, middle: str, order: str = "psm") -> "FimTemplate":
        """The common three-token layouts: PSM (prefix, suffix, middle) or SPM (suffix first)."""
        if order not in FIM_ORDERS:
            raise ConfigError(f"fim.order must be one of {FIM_ORDERS}, got {order!r}")
        if order == "spm":
            return cls(f"{prefix}{suffix}{{suffix}}{middle}{{prefix}}")
        return cls(f"{prefix}{{prefix}}{suffix}{{suffix}}{middle}")


@dataclass(frozen=True)
class RepoTemplate:
    """How other files of the repository go in front of a prompt, as the model card writes its repo-level format.

    ``name`` opens the context (``{repo}``: the repository's name), ``file`` is one other file
    (``{path}``, ``{code}``), ``current`` heads the file being edited (``{path}`` optional); the
    rest is the model's special tokens and plain text, e.g. Qwen2.5-Coder's
    ``<|repo_name|>{repo}\n``, ``<|file_sep|>{path}\n{code}\n`` and ``<|file_sep|>{path}\n``.
    """

    name: str
    file: str
    current: str


@dataclass(frozen=True)
class ModelConfig:
    """One served model, as written in the ``[[models]]`` table of the config file."""

    name: str
    source: str
    aliases: tuple[str, ...] = ()
    gguf_file: str | None = None
    revision: str | None = None
    kind: str = "causal"
    dtype: str = "auto"
    context_length: int | None = None
    fim: FimTemplate | None = None
    repo: RepoTemplate | None = None  # the card's repo-level layout for other files' code; none: as comments
    stop: tuple[str, ...] = ()
    trust_remote_code: bool = False
    max_tokens: int = 16
    decoder_prompt: bool = False  # seq2seq models whose card feeds the prompt to the decoder too (CodeT5+ 2B+)
    # Whether prompts start with the tokenizer's BOS / (seq2seq) end with its EOS; None: as its
    # tokenizer_config.json says (add_bos_token / add_eos_token), else as its encodings do.
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    # backend "openai": tokens come from an OpenAI-compatible completions server at `url` (vLLM, SGLang,
    # llama-server) under its name `upstream_model`; `source` then only gives the tokenizer (and config).
    backend: str = "local"
    url: str | None = None
    upstream_model: str | None = None
    upstream_api_key: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a client may use for this model."""
        return (self.name, *self.aliases)


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """The settings a model's engine runs with (its slice of :class:`Settings`; each default lives here)."""

    debug: bool = False  # log the model prompt, token ids, stop decisions and timings of every request
    max_batch: int = 8  # sequences decoded together per model and worker
    max_waiting: int = 8  # requests queued beyond the batch before 429
    prefix_cache: bool = True
    prefix_cache_mb: int = 512
    # A long prompt starts at its first anchor line, one in about this many lines chosen by content, so
    # prompts whose top moves as the developer types share their start (app/engine/anchor.py); 0: as sent.
    anchor_lines: int = 16
    # Approximate: far-end tokens a moved prompt may gain or lose to begin like a cached prompt (its answer
    # then depends on what the cache held; fidelity measured by `python -m bench.fidelity`); 0: never.
    anchor_restore_tokens: int = 0
    # Greedy sequences draft up to this many tokens per step from their own context (prompt-lookup
    # speculative decoding, app/engine/speculative.py); output unchanged, 0: off.
    speculative_tokens: int = 8
    # The decode step: auto (the lean step of app/engine/fastpath.py where the architecture has one,
    # compiled on GPUs), fast (eager lean step), compiled (lean step through torch.compile), hf (the model's
    # own forward: the reference).
    decode_step: str = "auto"
    token_healing: bool = True
    truncate_prompts: bool = True  # cut prompts too long for the window at their start (False: 400)
    time_budget_ms: int = 0  # decoding time after which a completion ends at its next newline (0: none)
    answer_cache: int = 64  # recent deterministic answers kept to answer an identical request again (0: none)
    torch_threads: int | None = None  # CPU threads for prompts; None: cores / workers
    decode_threads: int | None = None  # CPU threads while decoding; None: torch_threads - 1


@dataclass(frozen=True, kw_only=True)
class Settings(EngineOptions):
    """Everything the server, the workers and the engine are configured with."""

    models: tuple[ModelConfig, ...]
    bind: str = "127.0.0.1:5000"  # all interfaces only when a sysadmin says so
    workers: int = 1
    threads: int | None = None  # connections a worker serves at once; None: see connection_threads
    timeout: int = 120
    read_timeout: float = 10.0  # seconds a client has to send a request's headers and body
    device: str = "auto"
    cache_dir: Path = Path("~/.cache/fauxpilot-lite").expanduser()
    api_keys: tuple[str, ...] = ()
    api_keys_file: Path | None = None  # more keys, one per line ('#' comments), read at start-up
    max_request_bytes: int = 4 * 1024 * 1024
    max_tokens_limit: int = 4096  # a request's max_tokens above this is a 400
    max_sequences: int = 16  # prompts × max(n, best_of) above this is a 400
    request_timeout: float = 300.0  # seconds a request may run before it is stopped (0: no limit)
    trusted_proxies: int = 0  # reverse proxies in front whose X-Forwarded-For/Proto/Host/Prefix are believed
    metrics_dir: str | None = None  # prometheus-client's multiprocess folder (gunicorn.conf.py sets one)
    # Usage reports (app/usage.py): counts per day, key, model and language in <cache_dir>/usage.sqlite3,
    # never prompt text; rows older than usage_retention_days go, and the oldest beyond usage_max_rows.
    usage_reports: bool = True
    usage_retention_days: int = 400
    usage_max_rows: int = 100_000

    @property
    def connection_threads(self) -> int:
        """gunicorn threads per worker: ``threads``, or enough that the engines' 429 comes before the pool is full.

        Every model admits ``max_batch + max_waiting`` requests; beyond that a request gets an
        immediate 429, which needs a free thread to be sent. With exactly as many threads as
        admitted requests, surplus requests waited unseen in the pool's queue instead (40
        concurrent streams: no 429, answers after up to 41 s, /health timed out for ~27 s).
        """
        return self.threads or len(self.models) * (self.max_batch + self.max_waiting) + SPARE_THREADS

    @property
    def engine(self) -> EngineOptions:
        """The engine's slice of these settings."""
        return EngineOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineOptions)})

    def replace(self, **changes: Any) -> "Settings":
        """Return a copy with some settings changed (validated like the file)."""
        return _validated(dataclasses.replace(self, **changes))


def _as_tuple(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{what} must be a string or a list of strings, got {value!r}")


def model_from_mapping(raw: Mapping[str, Any]) -> ModelConfig:
    """Build a :class:`ModelConfig` from one ``[[models]]`` table."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(raw) - known
    name = raw.get("name", "<unnamed>")
    if unknown:
        raise ConfigError(f"model {name!r}: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
    for key in ("name", "source"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"model {name!r}: {key!r} is required and must be a non-empty string")
    values = dict(raw)
    values["aliases"] = _as_tuple(raw.get("aliases"), f"model {name!r}: aliases")
    values["stop"] = _as_tuple(raw.get("stop"), f"model {name!r}: stop")
    values["fim"] = _fim(raw.get("fim"), name)
    values["repo"] = _repo(raw.get("repo"), name)
    return ModelConfig(**values)


def _repo(raw: Any, name: str) -> RepoTemplate | None:
    """``repo = { name = "<repo>{repo}", file = "<sep>{path}\\n{code}", current = "<sep>{path}\\n" }``."""
    if raw is None:
        return None
    keys = [key for key, _, _ in REPO_PLACEHOLDERS]
    if not isinstance(raw, Mapping) or set(raw) != set(keys) or not all(isinstance(raw[k], str) for k in keys):
        raise ConfigError(f"model {name!r}: repo must be a table of the template strings {keys}")
    for key, required, optional in REPO_PLACEHOLDERS:
        found = re.findall(r"\{\w+\}", raw[key])
        if sorted(set(found)) != sorted(found) or not set(required) <= set(found) <= {*required, *optional}:
            rule = f"must contain {' and '.join(required)}" if required else f"may contain {' '.join(optional)}"
            raise ConfigError(f"model {name!r}: repo.{key} {rule} (once, and no other placeholder), got {raw[key]!r}")
    return RepoTemplate(**{key: raw[key] for key in keys})


def _fim(raw: Any, name: str) -> FimTemplate | None:
    """``fim = "<pre>{prefix}<suf>{suffix}<mid>"``, ``{ template = ... }`` or ``{ prefix, suffix, middle, order }``."""
    if raw is None:
        return None
    if isinstance(raw, str):
        return FimTemplate(raw)
    if isinstance(raw, Mapping) and set(raw) == {"template"}:
        return FimTemplate(str(raw["template"]))
    if isinstance(raw, Mapping) and {"prefix", "suffix", "middle"} <= set(raw) <= {"prefix", "suffix", "middle", "order"}:
        try:
            return FimTemplate.from_tokens(**raw)
        except ConfigError as exc:
            raise ConfigError(f"model {name!r}: {exc}") from None
    raise ConfigError(f"model {name!r}: fim must be a template string with {{prefix}} and {{suffix}}, "
                      "or a table of prefix, suffix, middle (and order) token strings")


def _validated(settings: Settings) -> Settings:
    if not settings.models:
        raise ConfigError("no models configured: add at least one [[models]] entry")
    seen: dict[str, str] = {}
    for model in settings.models:
        if model.kind not in KINDS:
            raise ConfigError(f"model {model.name!r}: kind must be one of {KINDS}, got {model.kind!r}")
        if model.dtype not in DTYPES:
            raise ConfigError(f"model {model.name!r}: dtype must be one of {DTYPES}, got {model.dtype!r}")
        if model.fim is not None and any(model.fim.template.count(p) != 1 for p in ("{prefix}", "{suffix}")):
            raise ConfigError(f"model {model.name!r}: the fim template must contain {{prefix}} and {{suffix}} once each")
        if model.max_tokens < 0:
            raise ConfigError(f"model {model.name!r}: max_tokens must be >= 0")
        for key in ("add_bos_token", "add_eos_token"):
            if getattr(model, key) not in (None, True, False):
                raise ConfigError(f"model {model.name!r}: {key} must be true or false")
        if model.backend not in BACKENDS:
            raise ConfigError(f"model {model.name!r}: backend must be one of {BACKENDS}, got {model.backend!r}")
        if model.backend == "openai":
            if not isinstance(model.url, str) or not re.match(r"https?://[^/\s]+", model.url):
                raise ConfigError(f"model {model.name!r}: backend \"openai\" needs url = \"http://host:port/v1\" "
                                  f"(the upstream server's OpenAI API root), got {model.url!r}")
            if model.kind != "causal":
                raise ConfigError(f"model {model.name!r}: only causal models can be served by an upstream engine")
        elif model.url is not None or model.upstream_model is not None:
            raise ConfigError(f"model {model.name!r}: url and upstream_model need backend = \"openai\"")
        if model.add_eos_token and model.kind == "causal":
            raise ConfigError(f"model {model.name!r}: add_eos_token = true would end every prompt of a causal "
                              "model, which it reads as the end of the text (only seq2seq encoders take it)")
        for alias in model.names:
            if alias in seen:
                raise ConfigError(f"name {alias!r} is used by both {seen[alias]!r} and {model.name!r}")
            seen[alias] = model.name
    if settings.threads is not None and settings.threads < 1:
        raise ConfigError("threads must be at least 1")
    if settings.read_timeout <= 0:
        raise ConfigError("read_timeout must be more than 0")
    for key in ("workers", "max_batch", "max_tokens_limit", "max_sequences", "max_request_bytes",
                "usage_retention_days", "usage_max_rows"):
        if getattr(settings, key) < 1:
            raise ConfigError(f"{key} must be at least 1")
    if settings.decode_step not in DECODE_STEPS:
        raise ConfigError(f"decode_step must be one of {', '.join(DECODE_STEPS)}, not {settings.decode_step!r}")
    for key in ("max_waiting", "prefix_cache_mb", "request_timeout", "trusted_proxies", "time_budget_ms", "answer_cache",
                "anchor_lines", "anchor_restore_tokens", "speculative_tokens"):
        if getattr(settings, key) < 0:
            raise ConfigError(f"{key} must be at least 0")
    return settings


def _env_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"expected a boolean, got {value!r}")


def _env_int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"expected an integer, got {value!r}") from None


def _env_float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"expected a number, got {value!r}") from None


def _env_path(value: str) -> Path:
    return Path(value).expanduser()


def _env_keys(value: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in value.split(",") if k.strip())


# How a variable's text becomes a value, by the setting's type.
_PARSERS = {bool: _env_bool, int: _env_int, float: _env_float, str: str, Path: _env_path, tuple[str, ...]: _env_keys}
# Settings a variable cannot set (FAUXPILOT_MODEL changes the first model apart), and names kept from elsewhere.
_NOT_FROM_ENV = {"models"}
_ENV_NAMES = {"metrics_dir": "PROMETHEUS_MULTIPROC_DIR"}


def _env_parser(kind: Any):
    """The parser of a setting's type; an optional setting given an empty value is None."""
    if typing.get_origin(kind) is types.UnionType:
        inner = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        parse = _PARSERS[inner]
        return lambda value: parse(value) if value.strip() else None
    return _PARSERS[kind]


def _env_overrides() -> dict[str, tuple[str, Any]]:
    """Environment variable -> (setting, parser), for every setting: ``FAUXPILOT_<NAME>``."""
    hints = typing.get_type_hints(Settings)
    return {_ENV_NAMES.get(f.name, f"FAUXPILOT_{f.name.upper()}"): (f.name, _env_parser(hints[f.name]))
            for f in dataclasses.fields(Settings) if f.name not in _NOT_FROM_ENV}


ENV_OVERRIDES = _env_overrides()


def settings_from_mapping(raw: Mapping[str, Any]) -> Settings:
    """Build validated settings from a parsed config file (``[server]`` and ``[[models]]``)."""
    unknown_top = set(raw) - {"server", "models"}
    if unknown_top:
        raise ConfigError(f"unknown top-level tables {sorted(unknown_top)}: expected [server] and [[models]]")
    server = dict(raw.get("server", {}))
    known = {f.name for f in dataclasses.fields(Settings)} - {"models"}
    unknown = set(server) - known
    if unknown:
        raise ConfigError(f"[server]: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
    for key in ("cache_dir", "api_keys_file"):
        if key in server:
            server[key] = Path(server[key]).expanduser()
    if "api_keys" in server:
        server["api_keys"] = _as_tuple(server["api_keys"], "[server] api_keys")
    models = tuple(model_from_mapping(m) for m in raw.get("models", ()))
    return _validated(Settings(models=models, **server))


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the config file named by ``$FAUXPILOT_CONFIG`` (or the default) and apply env overrides."""
    environ = os.environ if environ is None else environ
    path = Path(environ.get("FAUXPILOT_CONFIG") or DEFAULT_CONFIG_FILE)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    settings = settings_from_mapping(raw)
    changes: dict[str, Any] = {}
    for var, (name, parse) in ENV_OVERRIDES.items():
        if var in environ:
            try:
                changes[name] = parse(environ[var])
            except ConfigError as exc:
                raise ConfigError(f"{var}: {exc}") from None
    if environ.get("FAUXPILOT_MODEL"):
        # A sysadmin's one-line model switch: keep the first entry's names, change what it loads.
        first = settings.models[0]
        source = environ["FAUXPILOT_MODEL"]
        gguf = None
        if source.endswith(".gguf"):
            source, gguf = str(Path(source).parent), Path(source).name
        swapped = dataclasses.replace(first, source=source, gguf_file=gguf, fim=None, repo=None, stop=())
        changes["models"] = (swapped, *settings.models[1:])
    settings = settings.replace(**changes) if changes else settings
    return with_key_file(settings)


def with_key_file(settings: Settings) -> Settings:
    """Settings whose ``api_keys`` include those of ``api_keys_file`` (one per line, '#' starts a comment)."""
    if settings.api_keys_file is None:
        return settings
    try:
        text = settings.api_keys_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read api_keys_file {settings.api_keys_file}: {exc}") from exc
    keys = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return settings.replace(api_keys=tuple(dict.fromkeys([*settings.api_keys, *filter(None, keys)])),
                            api_keys_file=None)
