"""bench/gpu_check.sh: its CPU dry run end to end (slow), and how it reports what a machine lacks."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def run_script(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """bash bench/gpu_check.sh with this interpreter as PYTHON."""
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def summary_of(output: str) -> str:
    """The summary block the check prints last."""
    assert "===== GPU check summary" in output, output[-3000:]
    return output[output.index("===== GPU check summary"):]


@pytest.mark.slow
def test_cpu_dry_run_serves_two_workers_and_reports_figures(tmp_path):
    """The CPU dry run builds the model, passes the engine tests, serves from slots 0 and 1 and measures both."""
    result = run_script("--device", "cpu", "--workdir", str(tmp_path))
    summary = summary_of(result.stdout)
    assert result.returncode == 0, summary + result.stderr[-2000:]
    assert "RESULT: PASS" in summary
    tests = re.search(r"step tests ok: (\d+) passed", summary)
    assert tests and int(tests.group(1)) > 50
    workers = re.findall(r"worker slot (\d): pid (\d+), cpu bfloat16, loaded in [\d.]+ s; memory after warm-up: "
                         r"RSS (\d+) MB; after bench: RSS (\d+) MB", summary)
    assert sorted(slot for slot, *_ in workers) == ["0", "1"]
    assert len({pid for _, pid, *_ in workers}) == 2 and all(int(rss) > 50 for *_, rss in workers)
    first_token = re.search(r"first token: cold ~1000-token prompt (\d+) ms, cached 300-token prompt (\d+) ms", summary)
    decode = re.search(r"decode: batch 1 ([\d.]+) tok/s, batch 8 ([\d.]+) tok/s", summary)
    assert first_token and decode, summary
    assert all(float(value) > 0 for value in (*first_token.groups(), *decode.groups()))
    # The figures are bench's own, read from the results it wrote.
    assert (tmp_path / "bench" / "results.json").is_file()
    assert "loaded gpu-check from" in (tmp_path / "gunicorn.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="here CUDA works: the check would run for real")
def test_cuda_check_without_cuda_names_what_is_missing(tmp_path):
    """Where torch cannot use CUDA the check stops at the probe, says why, and fails naming the steps."""
    result = run_script("--workdir", str(tmp_path), timeout=120)
    summary = summary_of(result.stdout)
    assert result.returncode == 1
    cause = "is a CPU-only build" if torch.version.cuda is None else "sees no GPU"
    assert re.search(rf"step probe failed: torch \S+ (\(CUDA \S+\) )?{cause}", summary), summary
    assert "RESULT: FAIL (failed: probe; skipped: build-model, tests, server, bench)" in summary
    assert not (tmp_path / "model").exists()


def test_missing_python_is_reported_before_anything_runs(tmp_path):
    """A PYTHON that does not exist: exit 2 and a message naming it."""
    result = run_script(env={"PYTHON": str(tmp_path / "no-python")}, timeout=30)
    assert result.returncode == 2
    assert f"PYTHON={tmp_path / 'no-python'}" in result.stderr


def test_probe_names_missing_packages():
    """The probe's verdict lists every package the interpreter lacks, and the CUDA problems of a CPU-only torch."""
    found = {"python": "python 3.11", "missing": ["gunicorn", "pytest"], "triton": False, "torch": "2.13.0+cpu",
             "cuda_build": None, "cuda_available": False}
    assert gpu_check.cuda_problems(found) == [
        "torch 2.13.0+cpu is a CPU-only build (torch.version.cuda is None): install the CUDA build of the same torch "
        "version into this Python (README, 'Running it')"]
    hidden = {**found, "torch": "2.13.0+cu128", "cuda_build": "12.8"}
    assert "sees no GPU" in gpu_check.cuda_problems(hidden)[0]
    assert gpu_check.cuda_problems({**hidden, "cuda_available": True, "device_count": 1, "bf16": True}) == []


def test_workers_from_log_maps_slots_to_devices():
    """Slot (gunicorn's line), device and format (the loader's) and readiness per worker pid; other pids ignored."""
    log = ("[2026-01-01 00:00:00 +0000] [10] [INFO] worker 11 takes slot 0\n"
           "[2026-01-01 00:00:00 +0000] [10] [INFO] worker 12 takes slot 1\n"
           "[2026-01-01 00:00:05 +0000] [12] [INFO] app.engine.loader: loaded gpu-check from /tmp/a b/model on "
           "cuda:0 as bfloat16 in 3.5 s\n"
           "[2026-01-01 00:00:06 +0000] [12] [INFO] app.workers: worker slot 1 ready\n"
           "[2026-01-01 00:00:06 +0000] [99] [INFO] app.workers: worker slot 0 ready\n")
    workers = gpu_check.workers_from_log(log)
    assert sorted(workers) == [11, 12]
    assert (workers[12].slot, workers[12].device, workers[12].dtype, workers[12].load_s, workers[12].ready) == \
        (1, "cuda:0", "bfloat16", 3.5, True)
    assert (workers[11].device, workers[11].ready) == ("?", False)
    assert gpu_check.expected_device("cuda", 1, {"device_count": 1}) == "cuda:0"
    assert gpu_check.expected_device("cpu", 1, {}) == "cpu"
    assert gpu_check.expected_device("cuda", 3, {"device_count": 2}) == "cuda:1"


def test_log_warnings_lists_each_problem_once():
    """WARNING and ERROR lines of gunicorn and the app, each message once; INFO lines left out."""
    log = ("[2026-01-01 00:00:05 +0000] [12] [WARNING] app.engine.fastpath: fast decode step: compiled step failed "
           "(RuntimeError: x); running eager from now on\n"
           "[2026-01-01 00:00:05 +0000] [13] [WARNING] app.engine.fastpath: fast decode step: compiled step failed "
           "(RuntimeError: x); running eager from now on\n"
           "[2026-01-01 00:00:06 +0000] [10] [ERROR] Exception in worker process\n"
           "[2026-01-01 00:00:06 +0000] [12] [INFO] app.workers: worker slot 1 ready\n")
    assert gpu_check.log_warnings(log) == [
        "app.engine.fastpath: fast decode step: compiled step failed (RuntimeError: x); running eager from now on",
        "Exception in worker process"]
