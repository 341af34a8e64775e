"""The systemd units, their environment file and the nginx site in deploy/."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import nginx
from config import ENV_OVERRIDES, load_settings

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "fauxpilot-lite.service"
TEMPLATE = ROOT / "deploy" / "fauxpilot-lite@.service"
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


def verify(unit_file: Path, tmp_path: Path, instance: str | None = None) -> None:
    """`systemd-analyze verify` accepts ``unit_file`` (paths pointed at this checkout) without a warning.

    A template is checked as one of its instances (``name@instance.service``): on its own,
    systemd-analyze would fill ``%i`` with a stand-in.
    """
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    gunicorn = Path(sys.executable).parent / "gunicorn"
    if not gunicorn.exists():
        pytest.skip(f"no gunicorn next to {sys.executable}")
    text = unit_file.read_text().replace("/opt/fauxpilot-lite/.venv/bin/gunicorn", str(gunicorn))
    text = text.replace("WorkingDirectory=/opt/fauxpilot-lite", f"WorkingDirectory={ROOT}")
    unit = tmp_path / unit_file.name
    unit.write_text(text)
    target = str(unit) if instance is None else f"{unit}:{unit_file.name.replace('@.', f'@{instance}.')}"
    result = subprocess.run(["systemd-analyze", "verify", target], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_unit_verifies(tmp_path):
    """`systemd-analyze verify` accepts the unit without a warning."""
    verify(UNIT, tmp_path)


def test_template_verifies(tmp_path):
    """`systemd-analyze verify` accepts an instance of the per-GPU template without a warning."""
    verify(TEMPLATE, tmp_path, instance="1")


def unit_lines(path: Path, instance: str | None = None) -> list[str]:
    """The unit's lines, ``%i`` replaced by ``instance`` as systemd does."""
    text = path.read_text()
    return (text.replace("%i", instance) if instance is not None else text).splitlines()


def instance_environment(instance: str, env_file_text: str) -> dict[str, str]:
    """The environment of instance ``instance`` as systemd builds it: Environment= lines, then the env files.

    Variables from EnvironmentFile= override Environment= ones whatever their order
    (systemd.exec); the instance's own file is absent here.
    """
    values = {}
    for line in unit_lines(TEMPLATE, instance):
        if line.startswith("Environment="):
            name, _, value = line.removeprefix("Environment=").partition("=")
            values[name] = value
    return {**values, **env_file_values(env_file_text)}


@pytest.mark.parametrize("instance", ["0", "1", "3"])
def test_template_gives_each_instance_its_gpu_port_and_one_worker(instance):
    """Instance N: GPU N only, port 500N, one worker, nginx's headers believed; the shared env file changes none."""
    environ = instance_environment(instance, ENV_FILE.read_text())
    assert environ["CUDA_VISIBLE_DEVICES"] == instance
    settings = load_settings(environ)
    assert settings.bind == f"127.0.0.1:500{instance}"
    assert settings.workers == 1 and settings.trusted_proxies == 1
    lines = unit_lines(TEMPLATE, instance)
    assert "EnvironmentFile=-/etc/fauxpilot-lite/fauxpilot-lite.env" in lines
    assert f"EnvironmentFile=-/etc/fauxpilot-lite/instance-{instance}.env" in lines
    assert "ExecStart=/opt/fauxpilot-lite/.venv/bin/gunicorn -c gunicorn.conf.py wsgi:app" in lines


def test_shared_env_file_setting_the_port_would_override_every_instance():
    """Why the shared file must leave FAUXPILOT_BIND unset: set there, every instance would take that port."""
    environ = instance_environment("1", ENV_FILE.read_text() + "\nFAUXPILOT_BIND=127.0.0.1:5000\n")
    assert load_settings(environ).bind == "127.0.0.1:5000"


def test_template_has_the_units_hardening():
    """The template is confined exactly as the single unit is (same [Service] hardening lines)."""
    def hardening(lines: list[str]) -> list[str]:
        start = lines.index("NoNewPrivileges=yes")
        return lines[start:lines.index("[Install]")]
    assert hardening(unit_lines(TEMPLATE)) == hardening(unit_lines(UNIT))


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


def test_nginx_site_passes_nginx_t(tmp_path):
    """`nginx -t` accepts the shipped site as written, and with two instances in its upstream."""
    binary = nginx.nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx; .ci/run installs it)")
    as_shipped = tmp_path / "as-shipped"
    as_shipped.mkdir()
    nginx.write_config(as_shipped, 8080, [5000])
    (as_shipped / "fauxpilot-lite.conf").write_text(nginx.SITE.read_text())  # `listen 80` and all, unchanged
    nginx.check_config(binary, as_shipped)
    two = tmp_path / "two-instances"
    two.mkdir()
    nginx.write_config(two, 8080, [5000, 5001])
    servers = [m.group(0).strip() for m in nginx.SERVER_LINE.finditer((two / "fauxpilot-lite.conf").read_text())]
    assert servers == [f"server 127.0.0.1:{port} max_fails=1 fail_timeout=10s;" for port in (5000, 5001)], servers
    nginx.check_config(binary, two)


def test_nginx_check_fails_on_a_broken_site(tmp_path):
    """The `nginx -t` check above can fail: a site with a directive nginx does not know is refused."""
    binary = nginx.nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed")
    nginx.write_config(tmp_path, 8080, [5000])
    site = tmp_path / "fauxpilot-lite.conf"
    site.write_text(site.read_text().replace("hash $fauxpilot_editor consistent;", "hash_by_magic on;"))
    with pytest.raises(nginx.NginxError, match="hash_by_magic"):
        nginx.check_config(binary, tmp_path)
