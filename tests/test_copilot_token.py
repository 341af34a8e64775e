"""The GitHub API stand-in for Copilot clients: token and user endpoints, keyed tokens, Continue's FIM route."""
from __future__ import annotations

import time

import pytest

from app import copilot_token

PROMPT = "def add(a, b):\n"


@pytest.fixture()
def keyed(tiny_settings, engines):
    """A client of an app that requires the API key "secret"."""
    from app import create_app

    return create_app(tiny_settings.replace(api_keys=("secret",)), engines=engines.values()).test_client()


def complete(client, authorization: str) -> int:
    """Status of a small completion sent with the given Authorization."""
    return client.post("/v1/engines/codegen/completions", json={"prompt": PROMPT, "max_tokens": 1},
                       headers={"Authorization": authorization}).status_code


@pytest.mark.parametrize("path", ["/api/copilot_internal/v2/token", "/copilot_internal/v2/token"])
def test_token_endpoint_points_the_client_back_here(client, path):
    """A token with expiry and refresh times, endpoints at this server, and the header Copilot insists on."""
    response = client.get(path, headers={"Authorization": "Bearer gh-anything"})
    assert response.status_code == 200 and response.headers["X-GitHub-Request-Id"]
    body = response.get_json()
    assert body["token"].startswith("tid=") and "exp=" in body["token"]
    assert body["expires_at"] > time.time() + 60 and 0 < body["refresh_in"] < body["expires_at"] - time.time()
    assert body["endpoints"]["proxy"] == body["endpoints"]["api"] == "http://localhost"
    assert complete(client, f"Bearer {body['token']}") == 200


def test_token_endpoints_keep_the_path_prefix(client):
    """Served under a path prefix (gunicorn's SCRIPT_NAME), the token points completions under it too."""
    response = client.get("/api/copilot_internal/v2/token", base_url="http://localhost/fauxpilot")
    assert response.get_json()["endpoints"]["proxy"] == "http://localhost/fauxpilot"
    assert client.get("/api/copilot_internal/user", base_url="http://localhost/fauxpilot").get_json()[
        "endpoints"]["proxy"] == "http://localhost/fauxpilot"


FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "copilot.example.com",
             "X-Forwarded-Prefix": "/fauxpilot", "X-Forwarded-For": "10.1.2.3"}


def test_trusted_proxy_headers_name_the_public_address(tiny_settings, engines):
    """Behind a trusted reverse proxy the token names the proxy's scheme, host and prefix."""
    from app import create_app

    proxied = create_app(tiny_settings.replace(trusted_proxies=1), engines=engines.values()).test_client()
    body = proxied.get("/api/copilot_internal/v2/token", headers=FORWARDED).get_json()
    assert body["endpoints"]["proxy"] == "https://copilot.example.com/fauxpilot"
    assert "proxy-ep=copilot.example.com;" in body["token"] + ";"


def test_forwarded_headers_are_ignored_unless_proxies_are_trusted(client):
    """Without trusted_proxies a client cannot make the server hand out another address."""
    body = client.get("/api/copilot_internal/v2/token", headers=FORWARDED).get_json()
    assert body["endpoints"]["proxy"] == "http://localhost"


def test_user_endpoint(client):
    """The user record allows completions."""
    response = client.get("/api/copilot_internal/user")
    assert response.status_code == 200 and response.headers["X-GitHub-Request-Id"]
    assert response.get_json()["copilot_plan"] == "individual"


def test_keyed_server_mints_tokens_that_its_completions_accept(keyed):
    """With API keys, a key buys a token; the token completes; a forged, reused or missing one does not."""
    assert keyed.get("/api/copilot_internal/v2/token").status_code == 401
    response = keyed.get("/api/copilot_internal/v2/token", headers={"Authorization": "Bearer secret"})
    token = response.get_json()["token"]
    assert "fp=" in token and "secret" not in token
    assert complete(keyed, f"Bearer {token}") == 200
    fields = dict(part.split("=", 1) for part in token.split(";"))
    forged = token.replace(f"exp={fields['exp']}", f"exp={int(fields['exp']) + 3600}")
    assert complete(keyed, f"Bearer {forged}") == 401
    assert complete(keyed, "Bearer tid=x;exp=9999999999;sku=free;proxy-ep=y") == 401
    assert keyed.get("/api/copilot_internal/v2/token", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_tokens_expire():
    """A token is good until its expiry time and not after."""
    token, expires_at = copilot_token.mint("k", "host", now=1000.0)
    assert copilot_token.minting_key(token, ["other", "k"], now=expires_at - 1) == "k"
    assert copilot_token.minting_key(token, ["k"], now=expires_at + 1) is None
    assert copilot_token.minting_key(token, ["other"], now=expires_at - 1) is None
    assert copilot_token.minting_key("garbage", ["k"]) is None


def test_continue_fim_route(client, engines):
    """Continue's /v1/fim/completions takes prompt + suffix like /v1/completions and fills the middle."""
    body = {"model": "tiny-fim", "prompt": PROMPT, "suffix": "\nprint(add(1, 2))\n", "max_tokens": 4,
            "temperature": 0}
    fim = client.post("/v1/fim/completions", json=body)
    plain = client.post("/v1/completions", json=body)
    assert fim.status_code == 200 and fim.get_json()["choices"][0]["text"] == plain.get_json()["choices"][0]["text"]
