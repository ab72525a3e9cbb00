"""The browser's same-origin session: a signed cookie naming an API token.

A browser cannot attach a bearer header to a page load or an EventSource, so
``/login`` takes a token once (a form, never a URL) and answers with a cookie
``sgw_session=<name>.<expires>.<mac>``: HttpOnly, SameSite=Strict, Path=/,
Secure when the API serves HTTPS. ``mac`` is HMAC-SHA256 of ``name.expires``
under a key derived from a secret that lives only in the API's memory (made
by gunicorn's master before it forks the workers, which inherit it through
``$SENSOR_GATEWAY_SESSION_KEY``) and from the SHA-256 the token file keeps
for that token. So the cookie holds no token; a copy of the token file is not
enough to make one (the file keeps hashes so that a leaked copy grants
nothing); revoking the token ends every session made with it from the next
request on (its hash is gone from the file); and a restart of the API ends
them all. Sessions last :data:`LIFETIME_S`.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from flask import Request, Response

from sensor_gateway import tokens

COOKIE = "sgw_session"
LIFETIME_S = 12 * 3600
_LABEL = b"sensor-gateway dashboard session v1"


def _key(digest: str) -> bytes:
    secret = tokens.session_secret()
    return hmac.new(secret, _LABEL + bytes.fromhex(digest), hashlib.sha256).digest()


def _mac(digest: str, name: str, expires: int) -> str:
    return hmac.new(_key(digest), f"{name}.{expires}".encode(), hashlib.sha256).hexdigest()


def make(snapshot: tokens.Snapshot, name: str, now: float | None = None) -> str:
    expires = int((now if now is not None else time.time()) + LIFETIME_S)
    digest = snapshot.digests[snapshot.names.index(name)]
    return f"{name}.{expires}.{_mac(digest, name, expires)}"


def caller(snapshot: tokens.Snapshot, value: str | None, now: float | None = None) -> str | None:
    """The token name a session cookie value stands for, or None (bad, expired, revoked)."""
    if not value or len(value) > 256:
        return None
    head, _, mac = value.rpartition(".")
    name, _, expires_text = head.rpartition(".")
    if not expires_text.isdigit() or name not in snapshot.names:
        return None
    expires = int(expires_text)
    if expires < (now if now is not None else time.time()):
        return None
    digest = snapshot.digests[snapshot.names.index(name)]
    return name if hmac.compare_digest(mac, _mac(digest, name, expires)) else None


def from_request(snapshot: tokens.Snapshot, request: Request) -> str | None:
    return caller(snapshot, request.cookies.get(COOKIE))


def set_cookie(resp: Response, value: str, secure: bool) -> None:
    resp.set_cookie(
        COOKIE,
        value,
        max_age=LIFETIME_S,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=secure,
    )


def clear_cookie(resp: Response, secure: bool) -> None:
    resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict", secure=secure)
