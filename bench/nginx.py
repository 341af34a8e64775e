"""The shipped nginx site (deploy/nginx/fauxpilot-lite.conf) run by the current user on free ports.

The bench puts it in front of several instances of the server; tests/test_nginx.py and
tests/test_affinity.py run it the same way. Only the `listen` line and the upstream's
`server` lines change: everything else is the file as a sysadmin installs it.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SITE = REPO / "deploy" / "nginx" / "fauxpilot-lite.conf"
LISTEN = "listen 80;"
# The upstream's active `server` lines (an instance each), with their parameters and comment.
SERVER_LINE = re.compile(r"^(\s*)server 127\.0\.0\.1:\d+( [^;#]*)?;.*$", re.MULTILINE)

MAIN_CONFIG = """\
{user}worker_processes 1;
pid {tmp}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/fauxpilot-lite.conf;
}}
"""


class NginxError(RuntimeError):
    """nginx is missing, refused the configuration, or did not start listening."""


def nginx_binary() -> str | None:
    """The nginx executable (Debian puts it in /usr/sbin, which a user's PATH may lack)."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def site_config(listen_port: int, upstream_ports: list[int]) -> str:
    """The shipped site with only its listen port and its upstream servers changed."""
    text = SITE.read_text()
    if text.count(LISTEN) != 1:
        raise NginxError(f"{SITE.name} should contain {LISTEN!r} exactly once")
    text = text.replace(LISTEN, f"listen 127.0.0.1:{listen_port};")
    servers = list(SERVER_LINE.finditer(text))
    if len(servers) != 1:
        raise NginxError(f"{SITE.name} should have exactly one active upstream server line, found {len(servers)}")
    indent, parameters = servers[0].group(1), servers[0].group(2) or ""
    lines = "\n".join(f"{indent}server 127.0.0.1:{port}{parameters};" for port in upstream_ports)
    return text[:servers[0].start()] + lines + text[servers[0].end():]


def write_config(tmp: Path, listen_port: int, upstream_ports: list[int]) -> Path:
    """The main config and the site in ``tmp`` (every file nginx writes stays there); the main config's path."""
    (tmp / "fauxpilot-lite.conf").write_text(site_config(listen_port, upstream_ports))
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would run as nobody
    main = tmp / "nginx.conf"
    main.write_text(MAIN_CONFIG.format(user=user, tmp=tmp))
    return main


def command(binary: str, tmp: Path, *extra: str) -> list[str]:
    """nginx's command line for the config in ``tmp`` (``-t`` to test it, nothing to run it in the foreground)."""
    return [binary, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf"), *extra]


def check_config(binary: str, tmp: Path) -> None:
    """``nginx -t`` on the config in ``tmp``; raise NginxError with its output when it refuses it."""
    result = subprocess.run(command(binary, tmp, "-t"), capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NginxError(f"nginx -t failed:\n{result.stdout}{result.stderr}")


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Wait until something accepts connections on ``port``; raise NginxError if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NginxError(f"nginx exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise NginxError(f"nginx did not listen on port {port} within {timeout:g} s")
