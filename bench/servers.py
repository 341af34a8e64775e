"""The compared servers: how to find the model files, start each as a subprocess, wait for it and stop it."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import nginx
from .client import get_status
from .llama_server import find_binary, fim_overrides

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("ours", "ours_nospec", "ours_w2", "ours_nginx", "naive", "llamacpp", "llamaserver")
LABELS = {"ours": "ours", "ours_nospec": "FauxPilot Lite (no speculation)", "ours_w2": "ours, 2 workers on one port",
          "ours_nginx": "ours, 2 instances behind nginx", "naive": "naive", "llamacpp": "llama.cpp",
          "llamaserver": "llama-server"}
# ours_nginx: this many instances of one worker each, on ports of their own, behind the shipped nginx site.
NGINX_INSTANCES = 2
LLAMACPP_INSTALL = "CMAKE_ARGS=\"-DGGML_NATIVE=ON\" .venv/bin/pip install 'llama-cpp-python[server]'"


class ServerStartError(RuntimeError):
    """A server process that exited or never became ready."""


@dataclass(frozen=True)
class ModelFiles:
    """The configured default model as each system reads it."""

    name: str          # our model name
    folder: Path       # the safetensors folder our loader converts the GGUF into
    gguf: Path | None  # the original GGUF file (llama.cpp's input)
    ours_dtype: str    # the weight format our server resolves on this CPU


def resolve_model() -> ModelFiles:
    """Find the configured default model's folder and GGUF file with the project's own loader."""
    import torch

    from app.engine.loader import converted_gguf, resolve_dtype, resolve_source
    from config import load_settings

    settings = load_settings()
    config = settings.models[0]
    source = resolve_source(config)
    if source.gguf_file:
        folder = converted_gguf(source, settings.cache_dir)
        gguf = Path(source.location) / source.gguf_file
    else:
        folder, gguf = Path(source.location), None
    return ModelFiles(config.name, Path(folder), gguf, resolve_dtype(config.dtype, torch.device("cpu")))


@dataclass
class Server:
    """A server under test: its base URL and, when this script started it, its process and log."""

    name: str
    url: str
    streams: bool
    extra_body: dict[str, Any] = field(default_factory=dict)
    stream_body: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    drop_fields: tuple[str, ...] = ()  # request fields this server refuses (left out of every request)
    command: list[str] = field(default_factory=list)  # how it was started (for the results)
    parts: list["Server"] = field(default_factory=list)  # the instances behind it (a proxy), stopped with it

    @property
    def metrics_urls(self) -> list[str]:
        """Where to read /metrics: each instance behind a proxy (which would pick one by its hash), else itself."""
        return [part.url for part in self.parts] or [self.url]

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log (empty when it was not started here)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def llamacpp_available() -> bool:
    """Whether llama-cpp-python (with its server) is importable in this Python."""
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("uvicorn") is not None


def model_window(folder: Path) -> int:
    """The model's context window from its config.json, as our server reads it (2048 when it names none)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 2048
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return 2048


def _ours_command(port: int, model: ModelFiles) -> tuple[list[str], dict[str, str]]:
    return ([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            {"FAUXPILOT_BIND": f"127.0.0.1:{port}"})


def _ours_nospec_command(port: int, model: ModelFiles) -> tuple[list[str], dict[str, str]]:
    # The same server with speculative decoding off, for an on/off comparison within one run.
    argv, env = _ours_command(port, model)
    return argv, {**env, "FAUXPILOT_SPECULATIVE_TOKENS": "0"}


def _ours_w2_command(port: int, model: ModelFiles) -> tuple[list[str], dict[str, str]]:
    # Two gunicorn workers on one port: the kernel hands each new connection to either worker.
    argv, env = _ours_command(port, model)
    return argv, {**env, "FAUXPILOT_WORKERS": "2"}


def _ours_instance_command(port: int, model: ModelFiles) -> tuple[list[str], dict[str, str]]:
    # One instance of several on this machine: its share of the cores (the thread plan 2 workers would get),
    # and it believes nginx's X-Forwarded-For.
    argv, env = _ours_command(port, model)
    share = max(1, (os.cpu_count() or 1) // NGINX_INSTANCES)
    return argv, {**env, "FAUXPILOT_TORCH_THREADS": str(share), "FAUXPILOT_TRUSTED_PROXIES": "1"}


def _naive_command(port: int, model: ModelFiles) -> tuple[list[str], dict[str, str]]:
    return ([sys.executable, "-m", "bench.naive_server", "--model", str(model.folder),
             "--host", "127.0.0.1", "--port", str(port), "--threads", "2"], {})


def _llamacpp_command(port: int, model: ModelFiles) -> tuple[list[str], dict[str, str]]:
    if model.gguf is None:
        raise ServerStartError("the configured model is not a GGUF file; llama.cpp needs one")
    return ([sys.executable, "-m", "llama_cpp.server", "--model", str(model.gguf), "--model_alias", "codegen",
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "2"], {})


def _llamaserver_command(port: int, model: ModelFiles) -> tuple[list[str], dict[str, str]]:
    binary = find_binary()
    if binary is None or model.gguf is None:
        raise ServerStartError("no llama-server binary (build one: .venv/bin/python -m bench.llama_server build)"
                               if binary is None else "the configured model is not a GGUF file; llama-server needs one")
    # --cache-reuse 256 as llama.vscode recommends; our context size; 2 threads like the others; greedy by default.
    argv = [str(binary), "-m", str(model.gguf), "--host", "127.0.0.1", "--port", str(port), "-a", "codegen",
            "-c", str(model_window(model.folder)), "-t", "2", "-tb", "2", "--cache-reuse", "256", "--temp", "0",
            "--no-webui", *fim_overrides(model.folder)]
    return argv, {}


@dataclass(frozen=True)
class Launcher:
    """How to start one system and how to tell it is ready."""

    command: Callable[[int, ModelFiles], tuple[list[str], dict[str, str]]]
    ready_path: str
    streams: bool
    extra_body: dict[str, Any] = field(default_factory=dict)   # sent with every request
    stream_body: dict[str, Any] = field(default_factory=dict)  # sent with streaming requests
    drop_fields: tuple[str, ...] = ()                          # request fields it refuses


LAUNCHERS = {
    "ours": Launcher(_ours_command, "/health", streams=True,
                     stream_body={"stream_options": {"include_usage": True}}),
    "ours_nospec": Launcher(_ours_nospec_command, "/health", streams=True,
                            stream_body={"stream_options": {"include_usage": True}}),
    "ours_w2": Launcher(_ours_w2_command, "/health", streams=True,
                        stream_body={"stream_options": {"include_usage": True}}),
    "ours_instance": Launcher(_ours_instance_command, "/health", streams=True,
                              stream_body={"stream_options": {"include_usage": True}}),
    "naive": Launcher(_naive_command, "/health", streams=False),
    # llama-cpp-python's completions default to repeat_penalty 1.1; plain greedy like the others.
    "llamacpp": Launcher(_llamacpp_command, "/v1/models", streams=True, extra_body={"repeat_penalty": 1.0}),
    # llama-server's /v1/completions answers 400 "Unsupported param: suffix"; it cannot use one on that route anyway.
    "llamaserver": Launcher(_llamaserver_command, "/health", streams=True, drop_fields=("suffix",)),
}


def attach(name: str, url: str) -> Server:
    """A Server for an already-running instance at ``url`` (never stopped by this script)."""
    launcher = LAUNCHERS[name]
    if get_status(url, launcher.ready_path, timeout=10) != 200:
        raise ServerStartError(f"{url}{launcher.ready_path} does not answer 200")
    return Server(name, url.rstrip("/"), launcher.streams, dict(launcher.extra_body), dict(launcher.stream_body),
                  drop_fields=launcher.drop_fields)


def start(name: str, model: ModelFiles, ready_timeout: float = 300.0) -> Server:
    """Start system ``name`` on a free loopback port and wait until it answers; raise ServerStartError."""
    if name == "ours_nginx":
        return _start_behind_nginx(name, model, ready_timeout)
    launcher = LAUNCHERS[name]
    port = free_port()
    argv, env_changes = launcher.command(port, model)
    log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
    server = Server(name, f"http://127.0.0.1:{port}", launcher.streams, dict(launcher.extra_body),
                    dict(launcher.stream_body), log_path=Path(log.name), drop_fields=launcher.drop_fields,
                    command=argv)
    server.process = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env_changes}, stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    try:
        wait_ready(server, launcher.ready_path, ready_timeout)
    except ServerStartError as exc:
        stop(server)
        raise ServerStartError(f"{exc}; last lines of its log {server.log_path}:\n{server.log_tail()}") from None
    except BaseException:
        stop(server)
        raise
    return server


def _start_behind_nginx(name: str, model: ModelFiles, ready_timeout: float) -> Server:
    """NGINX_INSTANCES instances of ours, one after another, then the shipped nginx site in front of them."""
    binary = nginx.nginx_binary()
    if binary is None:
        raise ServerStartError("nginx is not installed (Debian: apt-get install nginx)")
    parts: list[Server] = []
    try:
        for _ in range(NGINX_INSTANCES):
            parts.append(start("ours_instance", model, ready_timeout))
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        port = free_port()
        nginx.write_config(tmp, port, [int(part.url.rsplit(":", 1)[1]) for part in parts])
        nginx.check_config(binary, tmp)
        argv = nginx.command(binary, tmp, "-g", "daemon off;")
        launcher = LAUNCHERS["ours_instance"]
        server = Server(name, f"http://127.0.0.1:{port}", launcher.streams, dict(launcher.extra_body),
                        dict(launcher.stream_body), log_path=tmp / "error.log", command=argv, parts=parts)
        with open(tmp / "nginx.out", "w") as output:
            server.process = subprocess.Popen(argv, cwd=tmp, stdout=output, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True)
        nginx.wait_listening(port, server.process)
        wait_ready(server, "/health", ready_timeout)
        return server
    except nginx.NginxError as exc:
        for part in parts:
            stop(part)
        raise ServerStartError(str(exc)) from None
    except BaseException:
        for part in parts:
            stop(part)
        raise


def wait_ready(server: Server, path: str, timeout: float) -> None:
    """Poll ``GET path`` until it answers 200; raise ServerStartError if the process dies or time runs out."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if server.process is not None and server.process.poll() is not None:
            raise ServerStartError(f"{server.name} exited with status {server.process.returncode}")
        if get_status(server.url, path) == 200:
            return
        time.sleep(0.5)
    raise ServerStartError(f"{server.name} did not answer {path} within {timeout:.0f} s")


def stop(server: Server, grace: float = 20.0) -> None:
    """Stop a server this script started (and the instances behind it): SIGTERM to its process group, then SIGKILL."""
    try:
        _stop_process(server.process, grace)
    finally:
        for part in server.parts:
            stop(part, grace)


def _stop_process(process: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM to ``process``'s group, then SIGKILL after ``grace`` s."""
    if process is None or process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)  # the group we created: the server and its workers
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group, if any outlived the leader
    except (ProcessLookupError, PermissionError):
        pass
