"""Real clients against real gunicorn serving the tiny model: the openai Node SDK and GitHub Copilot's
language server, both installed from the npm registry on first use (tests/clients/package.json)."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.gunicorn_server import ROOT, Server

pytestmark = pytest.mark.slow
CLIENTS = ROOT / "tests" / "clients"


@pytest.fixture(scope="session")
def node_clients():
    """tests/clients with its npm packages installed (skip where node is missing)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to drive the JavaScript clients")
    if not (CLIENTS / "node_modules" / "openai").exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=CLIENTS,
                       check=True, timeout=900)
    return CLIENTS


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """gunicorn serving the tiny model as `tiny` (aliases codegen, copilot-codex)."""
    tmp = tmp_path_factory.mktemp("clients")
    config = tmp / "tiny.toml"
    config.write_text(f'[[models]]\nname = "tiny"\naliases = ["codegen", "copilot-codex"]\n'
                      f'source = "{tiny_model_dir}"\ndtype = "float32"\ncontext_length = 256\n')
    server = Server(tmp, {"FAUXPILOT_CONFIG": str(config), "FAUXPILOT_CACHE_DIR": str(tmp / "cache")})
    try:
        server.wait_ready(120)
        yield server
    finally:
        server.stop()


def test_openai_node_sdk(node_clients, tiny_server):
    """completions.create whole, streamed, with n and logprobs, with echo; 400 and 404 raise the SDK's errors."""
    run = subprocess.run(["node", "openai_sdk.mjs", tiny_server.url], cwd=node_clients, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["whole"]["object"] == "text_completion" and out["whole"]["id"].startswith("cmpl-")
    assert out["whole"]["usage"]["completion_tokens"] >= 1 and out["whole"]["text"]
    assert out["stream"]["text"] == out["whole"]["text"] and out["stream"]["chunks"] > 1
    assert [c["index"] for c in out["several"]] == [0, 1]
    assert all(c["tokens"] >= 1 and len(c["top"]) >= 1 for c in out["several"])
    assert out["echo"].startswith("def add(a, b):\n")
    assert out["bad"] == {"bad_request": True, "status": 400, "param": "temperature"}
    assert out["missing"] == {"not_found": True, "status": 404}
