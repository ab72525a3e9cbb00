"""The dashboard for people: ``/`` (every sensor), ``/sensor/<id>`` (history,
averages, status counts), ``/login`` (a same-origin session), and the local
assets of ``/docs``.

Pages are rendered on the server (Jinja) with their charts as inline SVG, so
they read without JavaScript; ``static/dashboard.js`` (no dependencies) adds
live updates from ``/readings/stream`` and ticks the ages. Every asset is
served by the gateway and ships in the wheel: nothing is fetched from
elsewhere, so the pages work on a gateway without internet.
"""

from __future__ import annotations

import importlib.util
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
from apiflask import APIBlueprint, abort
from flask import Response, current_app, redirect, render_template, request, send_from_directory

from sensor_gateway import averages, queries, tokens
from sensor_gateway.api import schemas, sensors, session
from sensor_gateway.api.latest import latest_fragments
from sensor_gateway.api.services import services

bp = APIBlueprint("dashboard", __name__, enable_openapi=False)

# A sensor whose last reading is older than this is marked stale.
STALE_S = 120
RANGES = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
BUCKETS = 240  # points of a history chart, whatever its range
AVG_WINDOWS = ("1m", "5m", "30m")
# The Swagger UI files /docs loads, from the flask-swagger-ui package (Swagger UI 5,
# which reads OpenAPI 3.1; its version follows Swagger UI's).
DOCS_ASSETS = frozenset(
    {
        "swagger-ui.css",
        "swagger-ui-bundle.js",
        "swagger-ui-standalone-preset.js",
        "favicon-32x32.png",
    }
)
SWAGGER_UI_DIST = Path(importlib.util.find_spec("flask_swagger_ui").origin).parent / "dist"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def configure_docs(app: Any) -> None:
    """Point APIFlask's Swagger UI page at the copies served here (no CDN)."""
    app.config.update(
        SWAGGER_UI_CSS="/docs/assets/swagger-ui.css",
        SWAGGER_UI_BUNDLE_JS="/docs/assets/swagger-ui-bundle.js",
        SWAGGER_UI_STANDALONE_PRESET_JS="/docs/assets/swagger-ui-standalone-preset.js",
        DOCS_FAVICON="/docs/assets/favicon-32x32.png",
        # Swagger UI would otherwise ask validator.swagger.io about the spec.
        SWAGGER_UI_CONFIG={"validatorUrl": None},
    )


def _page(html: str, status: int = 200) -> Response:
    resp = Response(html, status=status, mimetype="text/html")
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "same-origin"
    return resp


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def _fmt(v: Any) -> str:
    if not isinstance(v, int | float) or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.2f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


def sparkline(values: list[float], width: int = 120, height: int = 28) -> str:
    """SVG polyline points for values, oldest first."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    step = width / max(1, len(values) - 1)
    pts = (
        f"{i * step:.1f},{height - 2 - (v - lo) / span * (height - 4):.1f}"
        for i, v in enumerate(values)
    )
    return " ".join(pts)


def _sensor_rows(now: datetime) -> list[dict[str, Any]]:
    svc = services()
    items = msgspec.json.decode(sensors.list_sensors().get_data())["items"]
    rows = []
    for item in items:
        last = item.get("last")
        frags, _ = latest_fragments(svc, item["sensor_id"], svc.cfg.ingest.latest_n)
        recent = [msgspec.json.decode(f) for f in reversed(frags)]
        values = [float(r["value"]) for r in recent if isinstance(r.get("value"), int | float)]
        row: dict[str, Any] = {"sensor_id": item["sensor_id"], "last": last, "values": values}
        if last:
            age = (now - _parse_ts(last["timestamp"])).total_seconds()
            row.update(age=_age(age), stale=age > STALE_S, value=_fmt(last["value"]))
        rows.append(row)
    return rows


@bp.get("/")
def index() -> Response:
    now = datetime.now(UTC)
    rows = _sensor_rows(now)
    return _page(
        render_template(
            "index.html",
            rows=rows,
            now=now,
            stale_s=STALE_S,
            sparkline=sparkline,
            values_json=lambda v: msgspec.json.encode(v).decode(),
            logout=_logged_in(),
        )
    )


def history(sensor_id: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """BUCKETS points of (time, avg, min, max) between start and end, folded from the
    per-minute summaries (empty buckets left out)."""
    width = (end - start).total_seconds() / BUCKETS
    acc: dict[int, list[float]] = {}
    for minute, doc in queries.minute_series(services().reader(), sensor_id, start, end):
        i = max(0, min(BUCKETS - 1, int((minute - start).total_seconds() // width)))
        a = acc.setdefault(i, [0, 0.0, math.inf, -math.inf])
        a[0] += int(doc.get("n", 0))
        a[1] += float(doc.get("sum", 0.0))
        if doc.get("min") is not None:
            a[2] = min(a[2], float(doc["min"]))
        if doc.get("max") is not None:
            a[3] = max(a[3], float(doc["max"]))
    out = []
    for i in sorted(acc):
        n, total, lo, hi = acc[i]
        if n:
            t = start + timedelta(seconds=(i + 0.5) * width)
            out.append({"t": t, "avg": total / n, "min": lo, "max": hi, "n": n})
    return out


def line_chart(points: list[dict[str, Any]], start: datetime, end: datetime) -> dict[str, Any]:
    """Geometry of an SVG line chart (viewBox 0 0 600 200, 40 px left margin)."""
    w, h, left, top, bottom = 600, 200, 44, 8, 20
    span_s = (end - start).total_seconds()
    if not points:
        return {"line": "", "band": "", "ticks": [], "empty": True}
    lo = min(p["min"] for p in points)
    hi = max(p["max"] for p in points)
    if hi == lo:
        lo, hi = lo - 1, hi + 1

    def x(t: datetime) -> float:
        return left + (t - start).total_seconds() / span_s * (w - left - 4)

    def y(v: float) -> float:
        return top + (hi - v) / (hi - lo) * (h - top - bottom)

    line = " ".join(f"{x(p['t']):.1f},{y(p['avg']):.1f}" for p in points)
    band = " ".join(
        [f"{x(p['t']):.1f},{y(p['max']):.1f}" for p in points]
        + [f"{x(p['t']):.1f},{y(p['min']):.1f}" for p in reversed(points)]
    )
    ticks = [{"y": f"{y(v):.1f}", "label": _fmt(v)} for v in (hi, (hi + lo) / 2, lo)]
    return {"line": line, "band": band, "ticks": ticks, "empty": False}


def bar_chart(counts: dict[str, int]) -> list[dict[str, Any]]:
    top = max(counts.values()) or 1
    bars = []
    for i, (status, n) in enumerate(counts.items()):
        hgt = 150 * n / top
        bars.append(
            {"status": status, "n": n, "x": 30 + i * 80, "y": f"{170 - hgt:.1f}", "h": f"{hgt:.1f}"}
        )
    return bars


@bp.get("/sensor/<sensor_id>")
def sensor(sensor_id: str) -> Response:
    try:
        schemas.sensor_id_field().deserialize(sensor_id)
    except Exception:
        abort(404, f"unknown sensor {sensor_id[:64]!r}")
    svc = services()
    rng = request.args.get("range", "24h")
    if rng not in RANGES:
        abort(400, f"query parameter 'range': one of {', '.join(RANGES)}")
    frags, _ = latest_fragments(svc, sensor_id, svc.cfg.ingest.latest_n)
    if not frags:
        abort(404, f"unknown sensor {sensor_id!r}: no readings stored for it")
    recent = [msgspec.json.decode(f) for f in frags]
    last = recent[0]
    now = datetime.now(UTC)
    start = now - timedelta(seconds=RANGES[rng])
    points = history(sensor_id, start, now)
    chart = line_chart(points, start, now)
    avgs = averages.averages(svc.reader(), averages.parse_windows(AVG_WINDOWS), sensor_id=sensor_id)
    windows = avgs["sensors"].get(sensor_id, {}).get("windows") or avgs["overall"]
    counts = None
    if last.get("kind") == "status":
        counts = queries.status_counts(svc.reader(), start, now, sensor_id=sensor_id)
    age = (now - _parse_ts(last["timestamp"])).total_seconds()
    return _page(
        render_template(
            "sensor.html",
            sensor_id=sensor_id,
            last=last,
            value=_fmt(last["value"]),
            age=_age(age),
            stale=age > STALE_S,
            stale_s=STALE_S,
            recent=recent,
            ranges=list(RANGES),
            rng=rng,
            chart=chart,
            npoints=len(points),
            start=start,
            now=now,
            windows=[(w, windows.get(w, {})) for w in AVG_WINDOWS],
            fmt=_fmt,
            counts=counts,
            bars=bar_chart(counts) if counts else [],
            logout=_logged_in(),
        )
    )


# -- the session ----------------------------------------------------------------------


def _store() -> tokens.TokenStore:
    return current_app.extensions["sensor_gateway.tokens"]


def _logged_in() -> bool:
    return session.from_request(_store().current(), request) is not None


def _next_path() -> str:
    nxt = request.values.get("next", "/")
    parts = urlsplit(nxt)
    # Only a path on this site: never another origin (//host, scheme:, \\host).
    if parts.scheme or parts.netloc or not nxt.startswith("/") or nxt.startswith(("//", "/\\")):
        return "/"
    return nxt


def _login_page(error: str | None = None, status: int = 200) -> Response:
    return _page(render_template("login.html", error=error, next=_next_path()), status)


@bp.get("/login")
def login() -> Response:
    if not tokens.enforced(services().cfg, _store().current()):
        return redirect(_next_path(), 303)
    return _login_page()


@bp.post("/login")
def login_post() -> Response:
    # A page elsewhere may not log a browser in (login CSRF). The host alone is
    # compared: behind a TLS-terminating proxy the scheme seen here differs.
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        abort(403, "login from another origin refused")
    snapshot = _store().current()
    if snapshot.error is not None:
        return _login_page("The API's token file cannot be read (see the API's log).", 503)
    token = (request.form.get("token") or "").strip()
    name = snapshot.match(token) if token else None
    if name is None:
        return _login_page("Unknown or revoked token.", 401)
    resp = redirect(_next_path(), 303)
    session.set_cookie(resp, session.make(snapshot, name), secure=request.is_secure)
    return resp


@bp.post("/logout")
def logout() -> Response:
    resp = redirect("/login", 303)
    session.clear_cookie(resp, secure=request.is_secure)
    return resp


# -- /docs without a CDN ----------------------------------------------------------------


@bp.get("/docs/assets/<name>")
def docs_asset(name: str) -> Response:
    if name not in DOCS_ASSETS:
        abort(404, "no such asset")
    return send_from_directory(SWAGGER_UI_DIST, name, max_age=86400)
