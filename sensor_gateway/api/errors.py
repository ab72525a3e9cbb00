"""Errors as RFC 9457 ``application/problem+json``, naming the bad parameter.

- 400: bad input (validation errors from the schemas, bad cursors);
- 404: unknown sensor or route;
- 503: a dependency is down, named in ``dependency`` and in the detail;
- never a 500 for bad input: every input path goes through a schema.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import msgspec
from apiflask import APIFlask, HTTPError
from flask import Response
from pymongo.errors import ExecutionTimeout, PyMongoError
from redis.exceptions import RedisError

from sensor_gateway.queries import TooCostly

log = logging.getLogger("sensor_gateway.api")

PROBLEM = "application/problem+json"
_LOCATIONS = {
    "query": "query parameter",
    "json": "JSON body field",
    "path": "path parameter",
    "view_args": "path parameter",
}


def problem(
    status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    resp = Response(msgspec.json.encode(body), status=status, mimetype=PROBLEM)
    for k, v in (headers or {}).items():
        if k.lower() != "content-type":
            resp.headers[k] = v
    return resp


def _flatten(messages: Any) -> list[str]:
    if isinstance(messages, dict):
        out = []
        for k, v in messages.items():
            out += (
                [f"{k}: {m}" for m in _flatten(v)]
                if isinstance(v, dict)
                else [str(m) for m in (v if isinstance(v, list) else [v])]
            )
        return out
    return [str(m) for m in (messages if isinstance(messages, list) else [messages])]


def validation_detail(detail: dict[str, Any]) -> str:
    """{"query": {"limit": ["Must be…"]}} → "query parameter 'limit': Must be…"."""
    parts = []
    for location, fields in detail.items():
        where = _LOCATIONS.get(location, location)
        if not isinstance(fields, dict):
            parts.append(f"{where}: {'; '.join(_flatten(fields))}")
            continue
        for name, msgs in fields.items():
            text = "; ".join(_flatten(msgs))
            if name == "_schema":
                parts.append(f"{where.split()[0]}: {text}")
            else:
                parts.append(f"{where} {name!r}: {text}")
    return "; ".join(parts) or "bad request"


def _http_error(error: HTTPError) -> Response:
    status = error.status_code
    extra = dict(error.extra_data or {})
    if isinstance(error.detail, dict) and error.detail:
        detail = validation_detail(error.detail)
        extra.setdefault("errors", error.detail)
        if status == 422:
            status = 400
    else:
        detail = error.message or HTTPStatus(status).phrase
    return problem(status, detail, dict(error.headers or {}), **extra)


def register(app: APIFlask) -> None:
    app.error_processor(_http_error)

    app.register_error_handler(PyMongoError, lambda exc: _dependency_down("mongodb", exc))
    app.register_error_handler(ExecutionTimeout, _too_slow)
    app.register_error_handler(TooCostly, lambda exc: problem(422, str(exc), limit=exc.limit))
    app.register_error_handler(RedisError, lambda exc: _dependency_down("redis", exc))


def _too_slow(exc: ExecutionTimeout) -> Response:
    log.warning("a database call hit api.query_time_limit_ms: %s", exc)
    return problem(
        503,
        "the database did not answer within api.query_time_limit_ms; narrow the request",
        {"Retry-After": "5"},
        dependency="mongodb",
    )


def _dependency_down(name: str, exc: Exception) -> Response:
    log.warning("%s error answering a request: %s", name, exc)
    return problem(
        503,
        f"dependency {name} unavailable: {type(exc).__name__}",
        {"Retry-After": "5"},
        dependency=name,
    )
