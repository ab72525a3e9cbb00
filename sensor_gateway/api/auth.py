"""Access control: bearer tokens (``Authorization: Bearer <token>``).

The rule (see :mod:`sensor_gateway.tokens` for the token file):

- ``/healthz`` is always open (systemd's watchdog and load balancers use it);
- when access control is on, every other route needs a valid token, and
  ``/metrics`` also answers a client on a loopback address without one
  (a local Prometheus); the client address is the socket's peer
  (``REMOTE_ADDR``), never a header such as ``X-Forwarded-For``;
- access control is on when ``api.bind`` is beyond loopback, or once the
  token file exists, even with every token revoked (so a reverse proxy on the
  same host cannot make every request look local, and revoking the last token
  does not open the API), unless ``api.allow_anonymous``;
- bound to loopback with no token file, everything is open to local clients.

A missing, malformed, unknown or revoked token is a 401
``application/problem+json`` whose ``detail`` names the problem, with
``WWW-Authenticate: Bearer realm="sensor-gateway"`` (RFC 6750; with
``error="invalid_token"`` when a token was sent). An unreadable token file
fails closed: 503 for every request that would need a token.

The browser dashboard uses a same-origin session, since a browser cannot
attach a bearer header to a page load or an EventSource: :func:`authenticate`
takes a signed session cookie (:mod:`sensor_gateway.api.session`, made by
``/login``) as one more way to name the caller, checked before the bearer
header. A page (``PAGE_ENDPOINTS``) refused for want of credentials redirects
to ``/login`` instead of answering 401.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

from flask import Flask, Response, g, redirect, request

from sensor_gateway import tokens
from sensor_gateway.api import session
from sensor_gateway.api.errors import problem
from sensor_gateway.config import Config
from sensor_gateway.logs import RateLimitedLogger

log = logging.getLogger("sensor_gateway.api.auth")
_denied_log = RateLimitedLogger(log, per_minute=20)
_store_log = RateLimitedLogger(log, per_minute=2)

REALM = "sensor-gateway"
# Endpoints (blueprint.view names) that never need a token.
OPEN_ENDPOINTS = frozenset(
    {
        "health.healthz",
        # The dashboard's login and logout, and its public assets (CSS, JS, Swagger UI).
        "dashboard.login",
        "dashboard.login_post",
        "dashboard.logout",
        "dashboard.docs_asset",
        "static",
    }
)
# Pages for people: without credentials they redirect to /login rather than 401.
PAGE_ENDPOINTS = frozenset({"dashboard.index", "dashboard.sensor", "openapi.docs"})
# Endpoints a loopback client may call without a token.
LOOPBACK_ENDPOINTS = frozenset({"health.metrics_view"})


class Denied(Exception):
    """Why a request's credentials are refused (the 401's detail), and the RFC 6750
    error code for ``WWW-Authenticate`` (none when no credentials were sent)."""

    def __init__(self, detail: str, error: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.error = error

    def response(self) -> Response:
        challenge = f'Bearer realm="{REALM}"'
        if self.error:
            challenge += f', error="{self.error}"'
        return problem(401, self.detail, {"WWW-Authenticate": challenge})


def authenticate(snapshot: tokens.Snapshot) -> str:
    """The name of the token the request carries; raises Denied otherwise."""
    name = session.from_request(snapshot, request)
    if name is not None:
        return name
    header = request.headers.get("Authorization")
    if header is None:
        raise Denied(
            "authentication required: send a bearer token "
            "(header 'Authorization: Bearer <token>'; see `sensor-gateway token add`)"
        )
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials or " " in credentials:
        raise Denied("malformed Authorization header: expected 'Bearer <token>'", "invalid_request")
    name = snapshot.match(credentials)
    if name is None:
        raise Denied("invalid bearer token: unknown or revoked", "invalid_token")
    return name


def register(app: Flask, cfg: Config) -> None:
    store = tokens.TokenStore(tokens.tokens_path(cfg))
    app.extensions["sensor_gateway.tokens"] = store

    @app.before_request
    def _check_access() -> Response | None:
        g.api_client = None
        if request.endpoint in OPEN_ENDPOINTS:
            return None
        snapshot = store.current()
        if not tokens.enforced(cfg, snapshot):
            return None
        if request.endpoint in LOOPBACK_ENDPOINTS and tokens.address_is_loopback(
            request.remote_addr
        ):
            return None
        if snapshot.error is not None:
            _store_log.warning("refusing requests: API token file unusable: %s", snapshot.error)
            return problem(
                503,
                "access control unavailable: the API's token file cannot be read "
                "(see the API's log)",
                {"Retry-After": "30"},
            )
        try:
            g.api_client = authenticate(snapshot)
        except Denied as denied:
            _denied_log.warning(
                "401 for %s %s from %s: %s",
                request.method,
                request.url_rule.rule if request.url_rule is not None else "<unmatched>",
                request.remote_addr,
                denied.detail,
            )
            if request.endpoint in PAGE_ENDPOINTS and request.method == "GET":
                return redirect("/login?next=" + quote(request.full_path.rstrip("?")), 303)
            return denied.response()
        return None
