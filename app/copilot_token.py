"""Local stand-ins for the GitHub API tokens the Copilot language server fetches before completing.

Copilot clients first ask GitHub for a short-lived token and then send it as the
Bearer of every completion. Pointed at this server (``GH_COPILOT_API_URL``), they get
a token minted here. When the server has API keys, the client fetches it with a key
and the token carries a keyed fingerprint, so completions can check it without state.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Iterable

LIFETIME_SECONDS = 30 * 60
REFRESH_SECONDS = 25 * 60


def _fingerprint(key: str, tid: str, expires_at: int) -> str:
    return hmac.new(key.encode(), f"{tid};{expires_at}".encode(), hashlib.sha256).hexdigest()[:32]


def mint(key: str | None, proxy_host: str, now: float | None = None) -> tuple[str, int]:
    """A Copilot-style token (``tid=…;exp=…;…``) and its expiry time; fingerprinted with ``key`` when given."""
    expires_at = int(now if now is not None else time.time()) + LIFETIME_SECONDS
    tid = f"fauxpilot-{secrets.token_hex(8)}"
    fields = [f"tid={tid}", f"exp={expires_at}", "sku=fauxpilot", f"proxy-ep={proxy_host}"]
    if key:
        fields.append(f"fp={_fingerprint(key, tid, expires_at)}")
    return ";".join(fields), expires_at


def minting_key(token: str, keys: Iterable[str], now: float | None = None) -> str | None:
    """The key of ``keys`` that ``token`` was minted with, if it was and has not expired."""
    fields = dict(part.split("=", 1) for part in token.split(";") if "=" in part)
    try:
        tid, expires_at, fingerprint = fields["tid"], int(fields["exp"]), fields["fp"]
    except (KeyError, ValueError):
        return None
    if expires_at < (now if now is not None else time.time()):
        return None
    # Every key is compared, so the time taken says nothing about which one matched.
    matches = [key for key in keys if hmac.compare_digest(fingerprint, _fingerprint(key, tid, expires_at))]
    return matches[0] if matches else None


def token_reply(token: str, expires_at: int, base_url: str) -> dict:
    """The body of ``GET /copilot_internal/v2/token``: the token and where to send completions."""
    base = base_url.rstrip("/")
    return {
        "token": token,
        "expires_at": expires_at,
        "refresh_in": REFRESH_SECONDS,
        "endpoints": {"api": base, "proxy": base, "origin-tracker": base, "telemetry": f"{base}/telemetry"},
        "sku": "fauxpilot",
        "chat_enabled": False,
        "annotations_enabled": False,
        "tracking_id": "fauxpilot-lite",
    }


def user_reply(base_url: str) -> dict:
    """The body of ``GET /copilot_internal/user``: a plan that allows completions."""
    base = base_url.rstrip("/")
    return {"login": "fauxpilot", "copilot_plan": "individual", "access_type_sku": "fauxpilot",
            "chat_enabled": False, "endpoints": {"api": base, "proxy": base, "telemetry": f"{base}/telemetry"}}
