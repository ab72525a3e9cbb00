"""The newest readings, from Redis when it has them, else MongoDB: shared by the
native routes, the compatibility routes and the dashboard.

These are the API's most frequent requests, so their common path is kept
short: Redis' members (JSON texts) go into the answer as bytes, unchanged, and
:func:`fast_n` reads the usual query strings without the schema machinery."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

from apiflask import abort
from flask import Response, request

from sensor_gateway import queries
from sensor_gateway.api import schemas
from sensor_gateway.api.responses import json_bytes, json_response
from sensor_gateway.api.services import Services


def latest_fragments(
    svc: Services, sensor_id: str | None, n: int, name: str | None = None
) -> tuple[list[bytes], str]:
    """The newest ``n`` readings as JSON texts (bytes), and where they came from.

    Redis holds the newest ``ingest.latest_n`` per sensor and across sensors;
    an empty set there (or Redis down, or more asked for than it keeps) reads
    MongoDB instead. ``name`` (compatibility ``Sensor_Name``) may be a sensor
    id or a kind; a kind is served from MongoDB.
    """
    lookup = sensor_id if name is None else name
    if n <= svc.cfg.ingest.latest_n:
        key = svc.keys.latest_all if lookup is None else svc.keys.latest(lookup)
        ok, members = svc.latest_members(key, n)
        if ok and members:
            return members, "redis"
    if name is not None:
        docs = queries.latest(svc.reader(), n, name=name)
    else:
        docs = queries.latest(svc.reader(), n, sensor_id=sensor_id)
    return [json_bytes(d) for d in docs], "mongodb"


def latest_response(
    svc: Services,
    sensor_id: str | None,
    n: int,
    envelope: bool,
    name: str | None = None,
) -> Response:
    frags, source = latest_fragments(svc, sensor_id, n, name)
    wanted = name if name is not None else sensor_id
    if not frags and wanted is not None:
        abort(404, f"unknown sensor {wanted!r}: no readings stored for it")
    items = b",".join(frags)
    body = b'{"items":[' + items + b"]}" if envelope else b"[" + items + b"]"
    return json_response(body, headers={"X-Data-Source": source})


# ``n=`` alone with a value the schema accepts as it stands (1–1000, no sign, no
# leading zero); every other query string goes through schemas.LatestQuery.
_FAST_N = re.compile(r"n=([1-9][0-9]{0,3})")


def fast_n(view: Callable[..., Any]) -> Callable[..., Any]:
    """Above ``@bp.input(schemas.LatestQuery, …)``: a request with no query string,
    or only ``n=<1–1000>``, calls the view itself with ``query_data`` made here;
    anything else (other parameters, other spellings, bad values) takes the
    schema's path and its 400s. The OpenAPI document is the schema's."""
    inner = inspect.unwrap(view)  # the view as written: it returns a Response

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        qs = request.environ.get("QUERY_STRING")
        if not qs:
            n = schemas.LATEST_DEFAULT
        elif (m := _FAST_N.fullmatch(qs)) is not None and int(m[1]) <= schemas.MAX_LIMIT:
            n = int(m[1])
        else:
            return view(*args, **kwargs)
        kwargs["query_data"] = {"n": n}
        return inner(*args, **kwargs)

    return wrapper
