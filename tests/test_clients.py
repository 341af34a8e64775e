"""Real clients against real gunicorn serving the tiny model: the openai Node SDK, GitHub Copilot's
language server and Continue's LLM adapter, installed from the npm registry on first use
(tests/clients/package.json)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.copilot_lsp import LspClient
from tests.gunicorn_server import ROOT, free_port, serving, serving_tiny_model
from tests.tiny_models import build_llama

pytestmark = pytest.mark.slow
CLIENTS = ROOT / "tests" / "clients"


@pytest.fixture(scope="session")
def node_clients():
    """tests/clients with its npm packages installed (skip where node is missing)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to drive the JavaScript clients")
    packages = json.loads((CLIENTS / "package.json").read_text())["dependencies"]
    if not all((CLIENTS / "node_modules" / name / "package.json").exists() for name in packages):
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=CLIENTS,
                       check=True, timeout=900)
    return CLIENTS


def run_node(clients: Path, script: str, *args: str) -> dict:
    """Run one of the client scripts and return the JSON object it prints last.

    Only the last line counts: some clients log lines of their own first (@continuedev/fetch does).
    """
    run = subprocess.run(["node", script, *args], cwd=clients, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """gunicorn serving the tiny model (one worker)."""
    with serving_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("clients")) as server:
        yield server


def test_openai_node_sdk(node_clients, tiny_server):
    """completions.create whole, streamed, with n and logprobs, with echo; 400 and 404 raise the SDK's errors."""
    out = run_node(node_clients, "openai_sdk.mjs", tiny_server.url)
    assert out["whole"]["object"] == "text_completion" and out["whole"]["id"].startswith("cmpl-")
    assert out["whole"]["usage"]["completion_tokens"] >= 1 and out["whole"]["text"]
    assert out["stream"]["text"] == out["whole"]["text"] and out["stream"]["chunks"] > 1
    assert [c["index"] for c in out["several"]] == [0, 1]
    assert all(c["tokens"] >= 1 and len(c["top"]) >= 1 for c in out["several"])
    assert out["echo"].startswith("def add(a, b):\n")
    assert out["bad"] == {"bad_request": True, "status": 400, "param": "temperature"}
    assert out["missing"] == {"not_found": True, "status": 404}


def test_openai_python_sdk(tiny_server):
    """The openai Python SDK: create whole and streamed, n with logprobs, echo; 400 and 404 raise its errors."""
    import openai

    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="not-needed", max_retries=0)
    prompt = "def add(a, b):\n"
    whole = client.completions.create(model="codegen", prompt=prompt, max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-") and whole.choices[0].text
    assert whole.usage.completion_tokens >= 1
    stream = client.completions.create(model="codegen", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    several = client.completions.create(model="codegen", prompt=prompt, max_tokens=4, n=2, logprobs=2,
                                        temperature=0.8, seed=1)
    assert [c.index for c in several.choices] == [0, 1]
    for choice in several.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) >= 1
        assert 1 <= len(choice.logprobs.top_logprobs[0]) <= 2
    echo = client.completions.create(model="codegen", prompt=prompt, max_tokens=2, echo=True)
    assert echo.choices[0].text.startswith(prompt)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="codegen", prompt=prompt, temperature=5)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=prompt)


COPILOT_LS = CLIENTS / "node_modules" / "@github" / "copilot-language-server" / "dist" / "language-server.js"
DOCUMENT = "def fibonacci(n):\n    \nprint(fibonacci(10))\n"


def _stop(pid: int, grace: float = 40.0) -> None:
    """Stop a gunicorn master this test started through a shell (SIGTERM, then SIGKILL)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _isolated() -> bool:
    """Whether this machine lets the test run in a network namespace of its own (unshare -n)."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-n", "true"], capture_output=True, timeout=30).returncode == 0


@dataclass(frozen=True)
class Editor:
    """How one editor plugin configures and queries the language server, given the README's settings."""

    name: str
    plugin: str  # initializationOptions.editorPluginInfo.name
    settings: Callable[[str], dict]  # answered to workspace/configuration and pushed at start
    pushes: tuple[dict, ...] = ()  # further workspace/didChangeConfiguration the plugin sends itself
    method: str = "textDocument/inlineCompletion"
    engine: str = "codegen"  # the engine the completions arrive for
    prefix: str = ""  # the path the server is served under (gunicorn's SCRIPT_NAME)
    api_key: str = ""  # the server's one API key, given to the language server as GH_COPILOT_TOKEN


def _advanced(url: str) -> dict:
    return {"debug.overrideProxyUrl": url, "debug.overrideEngine": "codegen"}


EDITORS = [
    # VS Code: the README's "github.copilot.advanced" block in settings.json.
    Editor("vscode", "copilot", lambda url: {"github": {"copilot": {"advanced": _advanced(url)}}}),
    # copilot.vim: copilot#client#Settings() with the README's g:copilot_settings (the other keys are
    # what it always sends: no proxy, no enterprise URI).
    Editor("copilot.vim", "copilot.vim", lambda url: {
        "http": {"proxy": None, "proxyStrictSSL": None}, "github-enterprise": {"uri": None},
        "github": {"copilot": {"advanced": _advanced(url)}}}),
    # copilot.lua: its own defaults deep-merged with the README's server_opts_overrides.settings;
    # after start it pushes its workspace configuration too, and asks through getCompletions.
    Editor("copilot.lua", "copilot.lua", lambda url: {
        "telemetry": {"telemetryLevel": "all"}, "advanced": {"timeout": 30000},
        "github": {"copilot": {"advanced": _advanced(url)}}},
        pushes=({"github": {"copilot": {"selectedCompletionModel": ""}}, "enableAutoCompletions": True,
                 "disabledLanguages": [{"languageId": "markdown"}, {"languageId": "yaml"}]},),
        method="getCompletions"),
    # No settings at all: the token minted here points completions back at this server, and
    # Copilot's own engine name is an alias of the default model.
    Editor("environment-only", "copilot", lambda url: {}, engine="gpt-41-copilot"),
    # The same, with the server under a path prefix: the token's endpoints keep it.
    Editor("environment-only-under-a-prefix", "copilot", lambda url: {}, engine="gpt-41-copilot",
           prefix="/fauxpilot"),
    # The same against a server with an API key: the key buys the token, the token completes.
    Editor("environment-only-with-a-key", "copilot", lambda url: {}, engine="gpt-41-copilot", api_key="team-key"),
]


def _completion_request(editor: Editor, uri: str) -> tuple[dict, Callable[[Any], list[str]]]:
    """The plugin's completion request for the cursor on line 1, column 4, and how to read its texts."""
    position = {"line": 1, "character": 4}
    if editor.method == "getCompletions":
        params = {"doc": {"uri": uri, "version": 1, "position": position, "insertSpaces": True, "tabSize": 4,
                          "indentSize": 4}}
        return params, lambda result: [c["text"] for c in (result or {}).get("completions", [])]
    params = {"textDocument": {"uri": uri, "version": 1}, "position": position, "context": {"triggerKind": 2},
              "formattingOptions": {"tabSize": 4, "insertSpaces": True}}
    return params, lambda result: [i["insertText"] for i in
                                   ((result or {}).get("items", []) if isinstance(result, dict) else result or [])]


@pytest.mark.parametrize("editor", EDITORS, ids=[e.name for e in EDITORS])
def test_copilot_language_server_completes_from_our_server(node_clients, tmp_path, editor):
    """The official Copilot language server, with no GitHub account, signs in and completes code from here.

    Each editor plugin hands the README's settings to the language server in its own shape. The
    server and the language server share a private network namespace (where the machine allows
    one), so the telemetry hosts the language server tries are unreachable; its GitHub API is
    this server (GH_COPILOT_API_URL / GH_COPILOT_SERVER_URL), which mints its token.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}{editor.prefix}"
    server_log, pid_file = tmp_path / "gunicorn.log", tmp_path / "gunicorn.pid"
    isolated = _isolated()
    script = (
        f"{'ip link set lo up; ' if isolated else ''}cd {ROOT} && "
        f"SCRIPT_NAME={editor.prefix} FAUXPILOT_API_KEYS={editor.api_key} FAUXPILOT_BIND=127.0.0.1:{port} "
        f"{sys.executable} -m gunicorn -c gunicorn.conf.py wsgi:app "
        f"> {server_log} 2>&1 & echo $! > {pid_file}; "
        f"for i in $(seq 600); do grep -q 'worker slot 0 ready' {server_log} && break; sleep 0.5; done; "
        f"exec node {COPILOT_LS} --stdio"
    )
    command = ["unshare", "-n", "sh", "-c", script] if isolated else ["sh", "-c", script]
    settings = editor.settings(url)
    env = {**os.environ, "GH_COPILOT_API_URL": f"{url}/api", "GH_COPILOT_SERVER_URL": url,
           "GH_COPILOT_TOKEN": editor.api_key or "no-github-account"}
    client = LspClient(command, env, tmp_path, settings, tmp_path / "language-server.log")
    try:
        client.request("initialize", {
            "processId": os.getpid(), "rootUri": None, "capabilities": {"workspace": {"configuration": True}},
            "initializationOptions": {"editorInfo": {"name": "fauxpilot-tests", "version": "1.0"},
                                      "editorPluginInfo": {"name": editor.plugin, "version": "1.0"}},
        }, timeout=360)
        client.notify("initialized", {})
        client.notify("workspace/didChangeConfiguration", {"settings": settings})
        for push in editor.pushes:
            client.notify("workspace/didChangeConfiguration", {"settings": push})
        status = client.request("checkStatus", {}, timeout=60)
        uri = (tmp_path / "fibonacci.py").as_uri()
        client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                                "text": DOCUMENT}})
        params, texts_of = _completion_request(editor, uri)
        texts = texts_of(client.request(editor.method, params, timeout=120))
    finally:
        client.close()
        if pid_file.exists():
            _stop(int(pid_file.read_text()))
    log = server_log.read_text()
    assert status.get("status") == "OK" and status.get("user"), status  # plugins show suggestions only then
    assert texts, f"no completion; language server said: {client.messages[-5:]}"
    assert texts[0].startswith("    ") and texts[0].strip()
    assert f"POST {editor.prefix}/v1/engines/{editor.engine}/completions status=200" in log


def test_langchain_openai_llm(tiny_server, monkeypatch):
    """LangChain's completions LLM (langchain_openai.OpenAI, over the openai Python SDK) against gunicorn.

    invoke sends a one-prompt list, batch and generate one request with a list of prompts (LangChain
    slices choices by prompt, n at a time), stream a plain-string prompt with stream: true. 400 and 404
    reach the caller as the SDK's errors. max_tokens=-1 is left alone: LangChain would count the prompt
    with tiktoken, which downloads its encodings and knows no context size for our model names.
    """
    langchain_openai = pytest.importorskip(
        "langchain_openai", reason="langchain-openai (requirements-dev.txt) is needed to drive LangChain's OpenAI LLM")
    import openai

    for tracing in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
        monkeypatch.delenv(tracing, raising=False)  # no run uploads to LangSmith
    settings = {"base_url": f"{tiny_server.url}/v1", "api_key": "sk-langchain", "model": "tiny", "max_tokens": 16,
                "temperature": 0, "max_retries": 0}
    llm = langchain_openai.OpenAI(**settings)
    prompts = ["def add(a, b):\n", "class Stack:\n"]

    first, second = llm.invoke(prompts[0]), llm.invoke(prompts[1])
    assert first and second and first != second  # distinct, so the order checks below mean something
    assert llm.invoke(prompts[0]) == first  # temperature 0 is deterministic

    assert llm.batch(prompts) == [first, second]

    chunks = list(llm.stream(prompts[0]))
    assert len(chunks) > 1 and "".join(chunks) == first

    # logprobs turn token healing off (README), so these texts are compared with single logprobs calls.
    result = llm.generate(prompts, logprobs=2)
    singles = [llm.generate([prompt], logprobs=2).generations[0][0].text for prompt in prompts]
    assert singles[0] != singles[1]
    assert [[g.text for g in generations] for generations in result.generations] == [[singles[0]], [singles[1]]]
    for prompt, (generation,) in zip(prompts, result.generations):
        info = generation.generation_info
        assert info["finish_reason"] in ("length", "stop")
        logprobs = info["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) >= 1
        assert all(1 <= len(top) <= 2 for top in logprobs["top_logprobs"])
        assert logprobs["text_offset"][0] == len(prompt)
    usage = result.llm_output["token_usage"]
    assert usage["completion_tokens"] >= 2 and usage["prompt_tokens"] >= 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    # n choices per prompt, prompt by prompt: greedy, so each prompt's choices are its invoke text.
    several = langchain_openai.OpenAI(**settings, n=2).generate(prompts)
    assert [[g.text for g in generations] for generations in several.generations] == [[first] * 2, [second] * 2]

    with pytest.raises(openai.BadRequestError) as bad:
        langchain_openai.OpenAI(**{**settings, "temperature": 5}).invoke(prompts[0])
    assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        langchain_openai.OpenAI(**{**settings, "model": "no-such-model"}).invoke(prompts[0])
    assert missing.value.status_code == 404 and missing.value.body["code"] == "model_not_found"



@pytest.fixture(scope="module")
def fim_server(tmp_path_factory):
    """gunicorn serving a tiny model as `tiny-fim` with its FIM template (tiny_server's model has none).

    Its weights are seed 1's: seed 0's model opens every FIM completion with "\n\n", one of the stops
    Continue always sends, and completes the same whatever the suffix.
    """
    tmp = tmp_path_factory.mktemp("continue")
    model_dir = build_llama(tmp / "tiny-llama", seed=1)
    with serving(tmp, f'name = "tiny-fim"\nsource = "{model_dir}"\ndtype = "float32"\ncontext_length = 256\n'
                      'fim = "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"\n') as server:
        yield server


def test_continue_openai_adapters(node_clients, fim_server):
    """Continue's own adapter (@continuedev/openai-adapters 1.37.0, provider "openai") completes from gunicorn.

    Both autocomplete requests, with the stop list Continue sends (12 strings): prefix + suffix streamed
    to /v1/fim/completions (fimStream), whose chunks Continue reads as choices[0].delta.content, and the
    FIM tokens in the prompt streamed to /v1/completions (completionStream), read as choices[0].text.
    An unknown model is a 404 on both.
    """
    out = run_node(node_clients, "continue_adapters.mjs", fim_server.url, "tiny-fim")
    fim, in_prompt, other = out["fim"], out["fim_in_prompt"], out["fim_other_suffix"]
    # What Continue shows: text in delta.content, the same text as the OpenAI-style choices[].text.
    assert fim["text"] and fim["chunks"] > 1, out
    assert fim["text"] == fim["plain_text"] and other["text"] == other["plain_text"]
    assert in_prompt["text"] and in_prompt["chunks"] > 1, out
    # The suffix reaches the model: the FIM route completes as the FIM template does, and another
    # suffix gives another completion.
    assert fim["text"] == in_prompt["text"] != other["text"]
    stops = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>", "\n\n", "/src/", "```")
    assert not any(stop in text for stop in stops for text in (fim["text"], in_prompt["text"], other["text"]))
    missing = json.loads(out["fim_missing"]["message"])  # fimStream throws the body, without the status
    assert missing["error"]["code"] == "model_not_found"
    assert out["complete_missing"] == {"status": 404, "name": "NotFoundError"}
    # The request log: the FIM route's prompt was the template's tokens, suffix included.
    prompt_tokens = {}
    for line in fim_server.log_path.read_text().splitlines():
        found = re.search(r"POST (/v1/\S+) status=200 model=tiny-fim prompt_tokens=(\d+)", line)
        if found:
            prompt_tokens.setdefault(found[1], []).append(int(found[2]))
    assert prompt_tokens["/v1/fim/completions"][0] == prompt_tokens["/v1/completions"][0], prompt_tokens


def test_vscode_fauxpilot_plugin(node_clients, tiny_server):
    """The VSCode FauxPilot extension's requests, made with the libraries it pins, complete from gunicorn.

    Its "openai" mode (openai 4.3.1, Bearer token), its "axios" mode (axios 1.5.0, no
    Authorization at all) and its 1.1.7 releases (openai 3.3.0), each on the default
    settings' URL and body; it reads choices[0].text and asks for one line (stop "\\n").
    """
    out = run_node(node_clients, "fauxpilot_plugin.mjs", f"{tiny_server.url}/v1/engines", "codegen", "dummy")
    assert set(out) == {"openai", "axios", "openai_v3"}
    for mode, result in out.items():
        assert "error" not in result, (mode, result)
        assert isinstance(result["text"], str) and "\n" not in result["text"], (mode, result)
        assert result["finish"] in ("stop", "length"), (mode, result)
