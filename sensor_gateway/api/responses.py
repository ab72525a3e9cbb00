"""JSON responses, encoded once by msgspec (bytes that a cache can hold as they are)."""

from __future__ import annotations

from typing import Any

import msgspec
from flask import Response

_encode = msgspec.json.Encoder().encode


def json_bytes(obj: Any) -> bytes:
    return _encode(obj)


def json_response(
    obj: Any | bytes, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    body = obj if isinstance(obj, bytes) else _encode(obj)
    resp = Response(body, status=status, mimetype="application/json")
    if headers:
        resp.headers.update(headers)
    return resp
