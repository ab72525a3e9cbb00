"""The dashboard's pages, its session and /docs' local assets, over the real services
(Flask's WSGI client; the browser tests are in test_dashboard_browser.py)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from devstack.stack import Stack
from sensor_gateway import tokens
from sensor_gateway.api import create_app, session
from tests.api_helpers import api_gateway, now_utc, publish_readings, series
from tests.helpers import Gateway

OUTSIDE = "192.0.2.10"


@pytest.fixture(scope="module")
def gw(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    yield from api_gateway(stack, tmp_path_factory, "dash", tokens=True)


@pytest.fixture(scope="module")
def client(gw: Gateway) -> FlaskClient:
    return create_app(gw.cfg).test_client()


@pytest.fixture(scope="module")
def sensors(gw: Gateway) -> dict[str, str]:
    now = now_utc()
    t = f"dt-{uuid.uuid4().hex[:4]}"
    old = f"do-{uuid.uuid4().hex[:4]}"
    st = f"ds-{uuid.uuid4().hex[:4]}"
    rows = series(t, now - timedelta(minutes=30), 30, step_s=60, value0=20.0)
    for r in rows:
        r["unit"] = "°C"
    publish_readings(gw, rows)
    publish_readings(gw, series(old, now - timedelta(hours=3), 3))
    status = [
        {"sensor_id": st, "value": v, "timestamp": now - timedelta(seconds=60 - i)}
        for i, v in enumerate([0, 1, 1, 3, 3, 3, 6])
    ]
    publish_readings(gw, status, kind="status")
    return {"temp": t, "old": old, "status": st}


def test_index_lists_sensors_without_javascript(client: FlaskClient, sensors) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    html = r.get_data(as_text=True)
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    for sid in sensors.values():
        assert f'data-sensor="{sid}"' in html
        assert f'href="/sensor/{sid}"' in html
    row = re.search(rf'<tr data-sensor="{sensors["temp"]}".*?</tr>', html, re.S).group(0)
    assert ">49<" in row and "°C" in row and 'class=""' in row  # latest value, unit, fresh
    old = re.search(rf'<tr data-sensor="{sensors["old"]}".*?</tr>', html, re.S).group(0)
    assert 'class="stale"' in old and "stale</span>" in old
    assert re.search(r'<polyline points="[\d., ]+"', row), "sparkline drawn on the server"
    # Nothing from elsewhere: every src/href is a path on this site.
    for url in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert url.startswith(("/", "#", "?")), url


def test_sensor_page_chart_averages_and_status_bars(client: FlaskClient, sensors) -> None:
    r = client.get(f"/sensor/{sensors['temp']}?range=1h")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    m = re.search(r'<polyline class="line" points="([^"]+)"', html)
    assert m and len(m.group(1).split()) >= 20, "a point per minute of the last hour"
    assert 'aria-current="page">1h<' in html
    for w in ("1m", "5m", "30m"):
        assert f'<th scope="row">{w}</th>' in html
    assert 'id="status-chart"' not in html
    html = client.get(f"/sensor/{sensors['status']}").get_data(as_text=True)
    bars = dict(re.findall(r"<title>status (\d): (\d+)</title>", html))
    assert bars == {"0": "1", "1": "2", "2": "0", "3": "3", "4": "0", "5": "0", "6": "1"}
    assert client.get("/sensor/no-such-sensor").status_code == 404
    assert client.get(f"/sensor/{sensors['temp']}?range=2y").status_code == 400


def test_docs_are_served_locally(client: FlaskClient) -> None:
    html = client.get("/docs").get_data(as_text=True)
    assert "cdn." not in html
    for url in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert url.startswith("/"), url
    for name in ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js"):
        assert f"/docs/assets/{name}" in html
        r = client.get(f"/docs/assets/{name}")
        assert r.status_code == 200 and len(r.data) > 1000
    assert client.get("/docs/assets/index.html").status_code == 404
    assert client.get("/docs/assets/..%2Fsetup.py").status_code == 404


def test_login_session_cookie_and_revocation(gw: Gateway, client: FlaskClient, sensors) -> None:
    path = Path(gw.cfg.api.tokens_file)
    token, _ = tokens.add(path, "browser")
    try:
        c = create_app(gw.cfg).test_client()
        # A page redirects to the login form; the API answers 401.
        r = c.get("/sensor/x?range=1h")
        assert r.status_code == 303
        assert r.headers["Location"] == "/login?next=/sensor/x%3Frange%3D1h"
        assert c.get("/readings/latest").status_code == 401
        assert c.get("/docs").status_code == 303
        # Assets and the form are open.
        assert c.get("/static/dashboard.js").status_code == 200
        assert c.get("/login").status_code == 200
        # A wrong token: 401, no cookie.
        r = c.post("/login", data={"token": token + "x"})
        assert r.status_code == 401 and "Set-Cookie" not in r.headers
        # Another origin may not log a browser in.
        r = c.post("/login", data={"token": token}, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403
        # The right one: a session cookie, HttpOnly, SameSite=Strict, without the token.
        r = c.post("/login", data={"token": token, "next": "//evil.example/"})
        assert r.status_code == 303 and r.headers["Location"] == "/"
        cookie = r.headers["Set-Cookie"]
        assert cookie.startswith(session.COOKIE + "=browser.")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert token not in cookie and tokens.hash_token(token) not in cookie
        # The session opens pages, the API and the stream's route, also from afar.
        assert c.get("/").status_code == 200
        assert c.get("/readings/latest", environ_base={"REMOTE_ADDR": OUTSIDE}).status_code == 200
        assert c.get("/readings/export?sensor_id=x").status_code == 200
        # A forged or altered cookie is refused.
        value = c.get_cookie(session.COOKIE).value
        forged = FlaskClient(c.application)
        name, exp, mac = value.split(".")
        forged.set_cookie(session.COOKIE, f"{name}.{int(exp) + 3600}.{mac}")
        assert forged.get("/readings/latest").status_code == 401
        # Revoking the token ends the session from the next request.
        tokens.revoke(path, "browser")
        assert c.get("/readings/latest").status_code == 401
        assert c.get("/").status_code == 303
        # Logging out clears the cookie.
        r = c.post("/logout")
        assert r.status_code == 303 and session.COOKIE + "=;" in r.headers["Set-Cookie"]
    finally:
        path.unlink(missing_ok=True)


def test_session_expires() -> None:
    snap = tokens.Snapshot(names=("a",), digests=(tokens.hash_token("t" * 40),), exists=True)
    value = session.make(snap, "a", now=1000.0)
    assert session.caller(snap, value, now=1000.0 + 60) == "a"
    assert session.caller(snap, value, now=1000.0 + session.LIFETIME_S + 1) is None
    other = tokens.Snapshot(names=("a",), digests=(tokens.hash_token("u" * 40),), exists=True)
    assert session.caller(other, value, now=1000.0) is None  # same name, another token
    for bad in ("", "a", "a.b.c", "a.1.", ".1.x", "x" * 300):
        assert session.caller(snap, bad) is None


def test_a_copy_of_the_token_file_cannot_make_a_session() -> None:
    """The file keeps hashes so that a leaked copy grants nothing: a cookie signed
    with what the file holds alone (its SHA-256) is refused."""
    import hashlib
    import hmac

    digest = tokens.hash_token("t" * 40)
    snap = tokens.Snapshot(names=("a",), digests=(digest,), exists=True)
    expires = 10**10
    key = hmac.new(bytes.fromhex(digest), session._LABEL, hashlib.sha256).digest()
    mac = hmac.new(key, f"a.{expires}".encode(), hashlib.sha256).hexdigest()
    assert session.caller(snap, f"a.{expires}.{mac}") is None
    # What the API itself makes is accepted.
    assert session.caller(snap, session.make(snap, "a")) == "a"
