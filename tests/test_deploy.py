"""The systemd unit and its environment file in deploy/."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from config import ENV_OVERRIDES, load_settings

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "fauxpilot-lite.service"
ENV_FILE = ROOT / "deploy" / "fauxpilot-lite.env"


def env_file_values(text: str, commented_too: bool = False) -> dict[str, str]:
    """NAME=value lines of an EnvironmentFile (with ``commented_too``, also the '#NAME=value' examples)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if commented_too and line.startswith("#FAUXPILOT_"):
            line = line[1:]
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def test_unit_verifies(tmp_path):
    """`systemd-analyze verify` accepts the unit (paths pointed at this checkout) without a warning."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    gunicorn = Path(sys.executable).parent / "gunicorn"
    if not gunicorn.exists():
        pytest.skip(f"no gunicorn next to {sys.executable}")
    text = UNIT.read_text().replace("/opt/fauxpilot-lite/.venv/bin/gunicorn", str(gunicorn))
    text = text.replace("WorkingDirectory=/opt/fauxpilot-lite", f"WorkingDirectory={ROOT}")
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_unit_runs_gunicorn_and_reloads_with_hup():
    """The unit starts the README's command, reloads by HUP and restarts on failure."""
    lines = UNIT.read_text().splitlines()
    assert "ExecStart=/opt/fauxpilot-lite/.venv/bin/gunicorn -c gunicorn.conf.py wsgi:app" in lines
    assert "ExecReload=/bin/kill -s HUP $MAINPID" in lines
    assert "Restart=on-failure" in lines and "User=fauxpilot" in lines
    assert "EnvironmentFile=-/etc/fauxpilot-lite/fauxpilot-lite.env" in lines


def test_env_file_names_real_settings():
    """Every variable the example sets or shows is one the server reads, and the set ones load."""
    known = set(ENV_OVERRIDES) | {"FAUXPILOT_CONFIG", "FAUXPILOT_MODEL", "HF_HOME"}
    shown = env_file_values(ENV_FILE.read_text(), commented_too=True)
    assert set(shown) <= known, set(shown) - known
    active = env_file_values(ENV_FILE.read_text())
    settings = load_settings(active)
    assert settings.bind == "127.0.0.1:5000"
    assert str(settings.cache_dir) == "/var/cache/fauxpilot-lite"
