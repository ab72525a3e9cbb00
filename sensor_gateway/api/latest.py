"""The newest readings, from Redis when it has them, else MongoDB: shared by the
native routes, the compatibility routes and the dashboard."""

from __future__ import annotations

from apiflask import abort
from flask import Response

from sensor_gateway import queries
from sensor_gateway.api.responses import json_bytes, json_response
from sensor_gateway.api.services import Services


def latest_fragments(
    svc: Services, sensor_id: str | None, n: int, name: str | None = None
) -> tuple[list[str], str]:
    """The newest ``n`` readings as JSON texts, and where they came from.

    Redis holds the newest ``ingest.latest_n`` per sensor and across sensors;
    an empty set there (or Redis down, or more asked for than it keeps) reads
    MongoDB instead. ``name`` (compatibility ``Sensor_Name``) may be a sensor
    id or a kind; a kind is served from MongoDB.
    """
    lookup = sensor_id if name is None else name
    if n <= svc.cfg.ingest.latest_n:
        key = svc.keys.latest_all if lookup is None else svc.keys.latest(lookup)
        ok, members = svc.try_redis(lambda r: r.zrevrange(key, 0, n - 1))
        if ok and members:
            return members, "redis"
    if name is not None:
        docs = queries.latest(svc.reader(), n, name=name)
    else:
        docs = queries.latest(svc.reader(), n, sensor_id=sensor_id)
    return [json_bytes(d).decode() for d in docs], "mongodb"


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
    items = "[" + ",".join(frags) + "]"
    body = '{"items":' + items + "}" if envelope else items
    return json_response(body.encode(), headers={"X-Data-Source": source})
