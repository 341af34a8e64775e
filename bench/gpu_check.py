"""``python -m bench.gpu_check``: one timed check of the CUDA path, for a machine lent with a GPU (bench/gpu_check.sh).

Steps, each under its share of one overall deadline: probe the Python environment (nothing is installed; what is
missing is reported), build a random-weights Llama locally, run the engine and scheduler tests on the device,
serve that model from two gunicorn workers, run ``python -m bench --quick`` against them, read each worker's
device and memory, stop the server and print one summary. ``--device cpu`` runs the same steps on the CPU with a
tiny model (the dry run that proves the plumbing where no GPU is lent).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The tests whose engines are the shared tiny engines of tests/conftest.py, which FAUXPILOT_TEST_DEVICE moves.
ENGINE_TESTS = ("tests/test_scheduler.py", "tests/test_generation.py", "tests/test_speculative.py",
                "tests/test_answers.py", "tests/test_healing.py")
# Import names of what the steps need (requirements.txt and pytest from requirements-dev.txt).
REQUIRED_MODULES = ("torch", "transformers", "safetensors", "tokenizers", "flask", "gunicorn", "marshmallow",
                    "prometheus_client", "apispec", "pytest")
MODEL_NAME = "gpu-check"
# Seconds kept back from the deadline for stopping the server and printing the summary.
RESERVE_S = 25.0
# Each step's own cap in seconds (the overall deadline may leave less).
STEP_CAPS = {"probe": 90, "build-model": 150, "tests": 150, "server": 180, "bench": 300}
# The model per device: SmolLM2-135M's tensors on a GPU (the default model's work per token); a 2-layer one on CPUs.
SHAPES = {"cuda": "smollm2-135m", "cpu": "tiny"}
# Bench workloads per device: all four on a GPU; on a CPU the two the summary reads, to stay within a minute.
WORKLOADS = {"cuda": "keystroke,cold,decode,load", "cpu": "cold,decode"}


# -- steps ------------------------------------------------------------------------------

@dataclass
class Step:
    """One step's outcome: ok, failed (with why) or skipped, and how long it took."""

    name: str
    status: str = "skipped"
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether the step ran and passed."""
        return self.status == "ok"

    def line(self) -> str:
        """One line for the summary."""
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.name} {self.status}{detail} ({self.seconds:.0f} s)"


@dataclass
class Clock:
    """The overall deadline, shared out to the steps."""

    budget_s: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        """Seconds a step may still take, the reserve for teardown excluded."""
        return self.budget_s - RESERVE_S - (time.monotonic() - self.started)

    def cap(self, step: str) -> float:
        """The timeout of ``step``: its own cap or what is left, whichever is less."""
        return min(STEP_CAPS[step], self.left())


def run_logged(argv: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Run ``argv`` in its own process group with output to ``log``; (exit status or None on timeout, output)."""
    with open(log, "w") as out:
        process = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **(env or {})}, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code: int | None = process.wait(max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            stop_group(process)
            code = None
    return code, log.read_text(errors="replace")


def stop_group(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the process group this script started, SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(text: str, lines: int = 15) -> str:
    """The last lines of a log, indented, for a failure's detail."""
    return "\n" + "\n".join("      " + line for line in text.strip().splitlines()[-lines:])


# -- probe: what this Python has ------------------------------------------------------------

def probe() -> dict[str, Any]:
    """What this interpreter can import and which devices torch sees (runs in a child of the check)."""
    import importlib.util
    import platform

    found: dict[str, Any] = {"python": f"{sys.executable} {platform.python_version()}",
                             "missing": [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None],
                             "triton": importlib.util.find_spec("triton") is not None}
    if "torch" in found["missing"]:
        return found
    import torch

    found.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if found["cuda_available"]:
        count = torch.cuda.device_count()
        found.update(device_count=count, devices=[torch.cuda.get_device_name(i) for i in range(count)],
                     bf16=torch.cuda.is_bf16_supported())
    return found


def cuda_problems(found: dict[str, Any]) -> list[str]:
    """Why this Python cannot run the model on CUDA (empty: it can)."""
    if "torch" not in found:
        return []  # reported with the other missing packages
    if not found.get("cuda_build"):
        return [f"torch {found['torch']} is a CPU-only build (torch.version.cuda is None): install the CUDA build "
                "of the same torch version into this Python (README, 'Running it')"]
    if not found.get("cuda_available"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return [f"torch {found['torch']} (CUDA {found['cuda_build']}) sees no GPU: torch.cuda.is_available() is "
                f"False (driver missing or too old, or CUDA_VISIBLE_DEVICES={visible!r} hides every GPU)"]
    if not found.get("bf16"):
        return ["the GPU does not support bfloat16 (torch.cuda.is_bf16_supported() is False)"]
    return []


def step_probe(python: str, device: str, clock: Clock, work: Path) -> tuple[Step, dict[str, Any]]:
    """Probe ``python`` in a child process; fail with everything missing, named."""
    step, started = Step("probe"), time.monotonic()
    code, output = run_logged([python, "-m", "bench.gpu_check", "--probe"], work / "probe.log", clock.cap("probe"))
    step.seconds = time.monotonic() - started
    found: dict[str, Any] = {}
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if code == 0 and lines:
        found = json.loads(lines[-1])
    else:
        step.status, step.detail = "failed", f"the probe did not finish (exit {code}){tail(output)}"
        return step, found
    problems = []
    if found["missing"]:
        problems.append(f"not importable in {python}: {', '.join(found['missing'])} (install requirements.txt and "
                        "requirements-dev.txt into it where there is a network; this check installs nothing)")
    if device == "cuda":
        problems += cuda_problems(found)
    step.status, step.detail = ("failed", "; ".join(problems)) if problems else ("ok", "")
    return step, found


def environment_line(found: dict[str, Any]) -> str:
    """The interpreter, torch and GPUs, for the summary."""
    parts = [found.get("python", "?")]
    if "torch" in found:
        parts.append(f"torch {found['torch']} (CUDA build: {found.get('cuda_build') or 'none'})")
        if found.get("cuda_available"):
            parts.append(f"{found['device_count']} GPU(s): {', '.join(found['devices'])}")
        # On a GPU the decode step is compiled (torch.compile), whose GPU kernels triton generates.
        parts.append("triton: " + ("yes" if found.get("triton") else "no"))
    parts.append(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}")
    return "; ".join(parts)


# -- the model --------------------------------------------------------------------------------

def build_model(folder: Path, shape_name: str) -> dict[str, Any]:
    """Build and save the check's model (runs in a child of the check); its description."""
    import sysconfig

    import torch
    from safetensors import safe_open

    from tests.tiny_models import SMOLLM2_135M_SHAPE, TINY_SHAPE, build_llama, build_tokenizer

    started = time.monotonic()
    if shape_name == "smollm2-135m":
        # SmolLM2's vocabulary size needs ~12 MB of text: the standard library's own source (about 3 s to learn).
        texts, size = [], 0
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
            size += len(texts[-1])
            if size > 12_000_000:
                break
        tokenizer, shape = build_tokenizer(49152, texts), SMOLLM2_135M_SHAPE
    else:
        # The tests' tiny model with a window long enough for the bench's 1000-token prompts.
        tokenizer, shape = build_tokenizer(), {**TINY_SHAPE, "max_position_embeddings": 2048}
    build_llama(folder, tokenizer=tokenizer, shape=shape, dtype=torch.bfloat16)
    config = json.loads((folder / "config.json").read_text())
    parameters = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as tensors:
            parameters += sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())
    return {"shape": shape_name, "vocab": config["vocab_size"], "layers": config["num_hidden_layers"],
            "hidden": config["hidden_size"], "parameters": parameters, "seconds": round(time.monotonic() - started, 1)}


def step_build(python: str, shape: str, clock: Clock, work: Path) -> tuple[Step, dict[str, Any]]:
    """Build the model in a child process."""
    step, started = Step("build-model"), time.monotonic()
    code, output = run_logged([python, "-m", "bench.gpu_check", "--build-model", str(work / "model"),
                               "--shape", shape], work / "build-model.log", clock.cap("build-model"))
    step.seconds = time.monotonic() - started
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        step.status, step.detail = "failed", f"exit {code}{tail(output)}"
        return step, {}
    step.status = "ok"
    return step, json.loads(lines[-1])


def model_line(model: dict[str, Any]) -> str:
    """What was served, for the summary."""
    if not model:
        return "not built"
    return (f"random-weights Llama ({model['shape']} shape): {model['parameters'] / 1e6:.1f}M parameters, "
            f"{model['layers']} layers x {model['hidden']}, vocab {model['vocab']}, served as bfloat16 "
            f"(built in {model['seconds']} s)")


# -- tests -----------------------------------------------------------------------------------

def step_tests(python: str, device: str, clock: Clock, work: Path) -> Step:
    """The engine and scheduler tests with the shared tiny engines on ``device``."""
    step, started = Step("tests"), time.monotonic()
    timeout = clock.cap("tests")
    # -v: when the step times out, the tail of its log names the test that was running.
    code, output = run_logged([python, "-m", "pytest", "-v", "-m", "not slow", "-p", "no:cacheprovider",
                               *ENGINE_TESTS], work / "tests.log", timeout, {"FAUXPILOT_TEST_DEVICE": device})
    step.seconds = time.monotonic() - started
    counts = re.findall(r"^=*\s*(\d+ (?:passed|failed|error).*?) in [\d.]+s", output, re.M)
    outcome = counts[-1] if counts else "no pytest summary"
    if code == 0:
        step.status, step.detail = "ok", outcome
    elif code is None:
        step.status, step.detail = "failed", f"timed out after {timeout:.0f} s{tail(output)}"
    else:
        step.status, step.detail = "failed", f"{outcome} (exit {code}){tail(output, 25)}"
    return step


# -- the server ---------------------------------------------------------------------------------

@dataclass
class WorkerInfo:
    """One gunicorn worker as its log lines describe it."""

    pid: int
    slot: int
    device: str = "?"
    dtype: str = "?"
    load_s: float | None = None
    ready: bool = False


def workers_from_log(text: str) -> dict[int, WorkerInfo]:
    """Slot, device, weight format and readiness per worker pid, from gunicorn's and the app's log lines."""
    workers = {int(pid): WorkerInfo(int(pid), int(slot))
               for pid, slot in re.findall(r"worker (\d+) takes slot (\d+)", text)}
    pattern = rf"\[(\d+)\] \[INFO\] app\.engine\.loader: loaded {MODEL_NAME} from .+? on (\S+) as (\S+) in ([\d.]+) s"
    for pid, device, dtype, seconds in re.findall(pattern, text):
        if int(pid) in workers:
            workers[int(pid)].device, workers[int(pid)].dtype, workers[int(pid)].load_s = device, dtype, float(seconds)
    for pid in re.findall(r"\[(\d+)\] \[INFO\] app\.workers: worker slot \d+ ready", text):
        if int(pid) in workers:
            workers[int(pid)].ready = True
    return workers


def log_warnings(text: str, limit: int = 5) -> list[str]:
    """The distinct WARNING and ERROR messages of the server's log (the compiled decode step's fallback among them)."""
    messages = re.findall(r"\[\d+\] \[(?:WARNING|ERROR|CRITICAL)\] (.+)", text)
    return list(dict.fromkeys(messages))[:limit]


def expected_device(device: str, slot: int, found: dict[str, Any]) -> str:
    """The device pick_device gives ``slot`` (GPU slot mod count), from the GPUs the probe saw."""
    return f"cuda:{slot % found['device_count']}" if device == "cuda" else "cpu"


@dataclass
class Server:
    """The gunicorn under test: its process, address and log."""

    process: subprocess.Popen
    url: str
    log: Path
    env: dict[str, str]

    def log_text(self) -> str:
        """Everything it logged so far."""
        return self.log.read_text(errors="replace")

    def live_workers(self) -> dict[int, WorkerInfo]:
        """Workers from the log that still run (a replaced worker's lines stay in the log)."""
        return {pid: w for pid, w in workers_from_log(self.log_text()).items() if Path(f"/proc/{pid}").exists()}


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    import socket

    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


def start_server(python: str, device: str, workers: int, work: Path, speculation: bool) -> Server:
    """gunicorn from the project's gunicorn.conf.py serving the built model, configured as a sysadmin would."""
    config = work / "models.toml"
    config.write_text(f'[[models]]\nname = "{MODEL_NAME}"\naliases = ["codegen"]\nsource = "{work / "model"}"\n'
                      'dtype = "bfloat16"\n')
    for folder in ("metrics", "run"):
        (work / folder).mkdir(exist_ok=True)
    port = free_port()
    env = {"FAUXPILOT_CONFIG": str(config), "FAUXPILOT_DEVICE": device, "FAUXPILOT_WORKERS": str(workers),
           "FAUXPILOT_BIND": f"127.0.0.1:{port}", "FAUXPILOT_CACHE_DIR": str(work / "cache"),
           "PROMETHEUS_MULTIPROC_DIR": str(work / "metrics"), "FAUXPILOT_RUN_DIR": str(work / "run")}
    if not speculation:
        # Random weights 30 layers deep answer with a short loop of tokens (seen: "\n      \n" over and over),
        # which drafts from the prompt would predict almost always: decode figures would show that, not the model.
        env["FAUXPILOT_SPECULATIVE_TOKENS"] = "0"
    log = work / "gunicorn.log"
    with open(log, "w") as out:
        process = subprocess.Popen([python, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"], cwd=REPO,
                                   env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return Server(process, f"http://127.0.0.1:{port}", log, env)


def step_server(server: Server, workers: int, device: str, found: dict[str, Any], clock: Clock) -> Step:
    """Wait until every worker has loaded and warmed the model, then check each worker's device and format."""
    step, started = Step("server"), time.monotonic()
    deadline = started + clock.cap("server")
    ready: dict[int, WorkerInfo] = {}
    while time.monotonic() < deadline and server.process.poll() is None:
        ready = {pid: w for pid, w in server.live_workers().items() if w.ready}
        if len(ready) >= workers:
            break
        time.sleep(0.5)
    step.seconds = time.monotonic() - started
    if len(ready) < workers:
        why = "gunicorn exited" if server.process.poll() is not None else f"not ready in {deadline - started:.0f} s"
        step.status, step.detail = "failed", f"{why}: {len(ready)} of {workers} workers ready{tail(server.log_text())}"
        return step
    wrong = [f"slot {w.slot} got {w.device} {w.dtype}, expected {expected_device(device, w.slot, found)} bfloat16"
             for w in ready.values()
             if (w.device, w.dtype) != (expected_device(device, w.slot, found), "bfloat16")]
    slots = sorted(w.slot for w in ready.values())
    if slots != list(range(workers)):
        wrong.append(f"slots {slots}, expected 0..{workers - 1}")
    step.status, step.detail = ("failed", "; ".join(wrong)) if wrong else ("ok", f"{workers} workers ready")
    return step


# -- memory per worker ------------------------------------------------------------------------------

def resident_mb(pid: int) -> float | None:
    """A process's resident memory in MB (VmRSS), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def gpu_memory_by_pid() -> tuple[dict[int, float], str]:
    """MiB of GPU memory per process from nvidia-smi, and a note when it cannot say."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {}, f"nvidia-smi unavailable ({exc})"
    usage: dict[int, float] = {}
    for line in result.stdout.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip().isdigit() and used.strip().replace(".", "", 1).isdigit():
            usage[int(pid)] = float(used)
    return usage, "" if result.returncode == 0 else f"nvidia-smi exited {result.returncode}: {result.stderr.strip()}"


def gpu_total_used() -> str:
    """Each GPU's used memory as nvidia-smi reports it (the fallback when processes are not listed by pid)."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return "; ".join(f"GPU {line.strip()}" for line in result.stdout.splitlines() if line.strip()) or "unknown"


def memory_snapshot(workers: dict[int, WorkerInfo], device: str) -> dict[int, str]:
    """Per worker pid: its resident memory, and its GPU memory on CUDA."""
    gpu, note = gpu_memory_by_pid() if device == "cuda" else ({}, "")
    snapshot = {}
    for pid in workers:
        rss = resident_mb(pid)
        parts = [f"RSS {rss:.0f} MB" if rss is not None else "RSS gone"]
        if device == "cuda":
            parts.insert(0, f"GPU {gpu[pid]:.0f} MiB" if pid in gpu else
                         f"GPU ? ({note or 'nvidia-smi lists no process of this pid'}; all: {gpu_total_used()})")
        snapshot[pid] = ", ".join(parts)
    return snapshot


# -- bench ---------------------------------------------------------------------------------------

def step_bench(python: str, server: Server, workloads: str, clock: Clock, work: Path) -> tuple[Step, dict[str, Any]]:
    """``python -m bench --quick`` against the running server; the figures the summary shows."""
    step, started = Step("bench"), time.monotonic()
    timeout = clock.cap("bench")
    out = work / "bench"
    (out / "results.json").unlink(missing_ok=True)  # a reused work folder's old figures are not this run's
    code, output = run_logged([python, "-m", "bench", "--quick", "--systems", "ours", "--url-ours", server.url,
                               "--workloads", workloads, "--out", str(out)], work / "bench.log", timeout,
                              {"FAUXPILOT_CONFIG": server.env["FAUXPILOT_CONFIG"],
                               "FAUXPILOT_CACHE_DIR": server.env["FAUXPILOT_CACHE_DIR"]})
    step.seconds = time.monotonic() - started
    try:  # results written just before a timeout still give their figures
        ours = json.loads((out / "results.json").read_text())["systems"]["ours"]
    except (OSError, ValueError, KeyError) as exc:
        ours, missing = {}, f"no results ({exc})"
    else:
        missing = ""
    figures = bench_figures(ours)
    absent = [name for name in ("cold_ttft_ms", "decode_1_tok_s", "decode_8_tok_s") if figures.get(name) is None]
    if code is None:
        step.status, step.detail = "failed", f"timed out after {timeout:.0f} s{tail(output)}"
    elif code != 0 or missing or ours.get("status") != "ok" or absent:
        step.status = "failed"
        step.detail = (f"exit {code}, {missing or 'status ' + repr(ours.get('status'))}, figures missing: "
                       f"{', '.join(absent) or 'none'}{tail(output)}")
    else:
        step.status = "ok"
    return step, figures


def bench_figures(ours: dict[str, Any]) -> dict[str, Any]:
    """The summary's figures from bench's results for our server."""
    decode = ours.get("decode", {})
    keystroke = ours.get("keystroke", {})

    def level(clients: str, key: str):
        return decode.get(clients, {}).get(key)

    return {"cold_ttft_ms": ours.get("cold", {}).get("ttft_ms"), "keystroke_ttft_ms": keystroke.get("ttft_p50_ms"),
            "keystroke_p50_ms": keystroke.get("latency_p50_ms"),
            "decode_1_tok_s": level("1", "decode_tok_s"), "decode_8_tok_s": level("8", "decode_tok_s"),
            "decode_1_ttft_ms": level("1", "ttft_ms"),
            "spec_1": (level("1", "spec") or {}).get("accepted_per_step"),
            "spec_8": (level("8", "spec") or {}).get("accepted_per_step"),
            "load": {clients: result.get("tok_s") for clients, result in ours.get("load", {}).items()}}


# -- the summary ------------------------------------------------------------------------------------

def figure(value: float | None, unit: str, digits: int = 0) -> str:
    """A figure with its unit, or a dash when it was not measured."""
    return "—" if value is None else f"{value:.{digits}f} {unit}"


def figure_lines(figures: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The bench's figures for the summary: first-token latency, decode at batch 1 and 8, load."""
    lines = [f"first token: cold ~1000-token prompt {figure(figures.get('cold_ttft_ms'), 'ms')}, cached 300-token "
             f"prompt {figure(figures.get('decode_1_ttft_ms'), 'ms')}"
             + (f", keystroke p50 {figure(figures['keystroke_ttft_ms'], 'ms')} (answer p50 "
                f"{figure(figures.get('keystroke_p50_ms'), 'ms')})" if figures.get("keystroke_ttft_ms") else "")]
    decode = (f"decode: batch 1 {figure(figures.get('decode_1_tok_s'), 'tok/s', 1)}, batch 8 "
              f"{figure(figures.get('decode_8_tok_s'), 'tok/s', 1)} (8 streams over {args.workers} workers)")
    if args.speculation:
        decode += (f"; accepted draft tokens per step {figure(figures.get('spec_1'), '', 2).strip()} (1 stream), "
                   f"{figure(figures.get('spec_8'), '', 2).strip()} (8)")
    lines.append(decode)
    if figures.get("load"):
        lines.append("load, 300-token prompts for 48 tokens: " + ", ".join(
            f"{clients} clients {figure(tok_s, 'tok/s', 1)}" for clients, tok_s in figures["load"].items()))
    return lines


def summary(args: argparse.Namespace, steps: list[Step], found: dict[str, Any], model: dict[str, Any],
            workers: dict[int, WorkerInfo], memory: dict[str, dict[int, str]], figures: dict[str, Any],
            warnings: list[str] | None, work: Path) -> str:
    """The one summary block printed at the end."""
    failed = [s.name for s in steps if s.status == "failed"]
    skipped = [s.name for s in steps if s.status == "skipped"]
    speculation = "on" if args.speculation else "off"
    lines = [f"===== GPU check summary: device {args.device}, {args.workers} gunicorn workers, speculative decoding "
             f"{speculation} =====",
             f"environment: {environment_line(found)}",
             f"model: {model_line(model)}"]
    for w in sorted(workers.values(), key=lambda w: w.slot):
        load = f", loaded in {w.load_s:.1f} s" if w.load_s is not None else ""
        mem = "; ".join(f"{when}: {snap[w.pid]}" for when, snap in memory.items() if w.pid in snap)
        lines.append(f"worker slot {w.slot}: pid {w.pid}, {w.device} {w.dtype}{load}; memory {mem or '—'}")
    if not workers:
        lines.append("workers: none ready")
    lines += figure_lines(figures, args)
    if warnings is not None:
        lines += [f"server log: {message}" for message in warnings] or ["server log: no warnings or errors"]
    lines += [f"step {s.line()}" for s in steps]
    lines.append(f"logs: {work}")
    if failed or skipped:
        lines.append(f"RESULT: FAIL (failed: {', '.join(failed) or 'none'}; skipped: {', '.join(skipped) or 'none'})")
    else:
        lines.append("RESULT: PASS")
    return "\n".join(lines)


# -- the check ------------------------------------------------------------------------------------------

def run_check(args: argparse.Namespace) -> int:
    """All steps in order, each only when what it needs is there; the summary; 0 when every step passed."""
    clock = Clock(args.budget)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    python = args.python
    steps = [Step(name) for name in ("probe", "build-model", "tests", "server", "bench")]
    found: dict[str, Any] = {}
    model: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    workers: dict[int, WorkerInfo] = {}
    memory: dict[str, dict[int, str]] = {}
    server: Server | None = None

    def report(step: Step) -> Step:
        print(f"-- {step.line()}", flush=True)
        return step

    print(f"GPU check on {args.device}: python {python}, work folder {work}, budget {args.budget:.0f} s", flush=True)
    try:
        steps[0], found = step_probe(python, args.device, clock, work)
        report(steps[0])
        if steps[0].ok:
            steps[1], model = step_build(python, args.shape, clock, work)
            report(steps[1])
            steps[2] = report(step_tests(python, args.device, clock, work))
        if steps[1].ok:
            server = start_server(python, args.device, args.workers, work, args.speculation)
            steps[3] = report(step_server(server, args.workers, args.device, found, clock))
            workers = server.live_workers()
            memory["after warm-up"] = memory_snapshot(workers, args.device)
        if steps[3].ok:
            steps[4], figures = step_bench(python, server, args.workloads, clock, work)
            report(steps[4])
            memory["after bench"] = memory_snapshot(workers, args.device)
    finally:
        if server is not None:
            stop_group(server.process)
    warnings = log_warnings(server.log_text()) if server is not None else None
    print("\n" + summary(args, steps, found, model, workers, memory, figures, warnings, work), flush=True)
    return 0 if all(s.ok for s in steps) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; --device defaults to $FAUXPILOT_CHECK_DEVICE, else cuda."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--device", choices=("cuda", "cpu"), default=os.environ.get("FAUXPILOT_CHECK_DEVICE") or "cuda",
        help="cuda: the check; cpu: the same steps on the CPU with a tiny model (default $FAUXPILOT_CHECK_DEVICE "
             "or cuda)")
    add("--python", default=sys.executable, help="the interpreter every step runs (default: this one)")
    add("--workers", type=int, default=2, help="gunicorn workers (default %(default)s)")
    add("--budget", type=float, default=450.0, help="seconds for the whole check (default %(default)s)")
    add("--shape", choices=("smollm2-135m", "tiny"), help="the model built (default: smollm2-135m on cuda, tiny on cpu)")
    add("--workloads", help="bench workloads (default: all four on cuda, cold,decode on cpu)")
    add("--speculation", action="store_true",
        help="keep the server's speculative decoding on (off by default: random weights repeat themselves, so "
             "drafts would be accepted far more often than on real code)")
    add("--workdir", help="folder for the model, logs and results (default: a new temporary folder)")
    add("--probe", action="store_true", help=argparse.SUPPRESS)
    add("--build-model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shape = args.shape or SHAPES[args.device]
    args.workloads = args.workloads or WORKLOADS[args.device]
    return args


def main(argv: list[str] | None = None) -> int:
    """The check, or one of its child steps (--probe, --build-model)."""
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return 0
    if args.build_model:
        print(json.dumps(build_model(args.build_model, args.shape)))
        return 0
    # SIGTERM unwinds like Ctrl-C, so the server this check started is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
