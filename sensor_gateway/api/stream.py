"""``GET /readings/stream``: Server-Sent Events of live readings from Redis pub/sub.

Each stream holds one gunicorn thread, so streams are bounded three ways: a
per-process number of concurrent streams (``api.threads - 1``, leaving a
thread for other requests; over it: 503), a maximum duration (``max_s``,
after which the client's EventSource reconnects by itself), and a comment
line every few seconds, whose failed write tells us the client has gone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from apiflask import APIBlueprint, abort
from flask import Response, stream_with_context
from marshmallow import RAISE
from redis.exceptions import RedisError

from sensor_gateway import cache
from sensor_gateway.api import schemas
from sensor_gateway.api.services import services

bp = APIBlueprint("stream", __name__, tag="readings")

KEEPALIVE_S = 5.0


@bp.get("/readings/stream")
@bp.input(schemas.StreamQuery, location="query", unknown=RAISE)
@bp.doc(
    summary="Live readings as Server-Sent Events",
    description="`text/event-stream`; one `event: reading` per stored reading, its `data` "
    "the reading as JSON. Filter with `sensor_id` and `kind`. The stream ends after "
    "`max_s` seconds (EventSource reconnects); 503 when Redis is down or too many "
    "streams are open.",
    responses={
        200: {
            "description": "An event stream",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        503: "Redis down, or no stream slot free",
    },
)
def stream(query_data: dict[str, Any]) -> Response:
    svc = services()
    sensor_id, kind = query_data.get("sensor_id"), query_data.get("kind")
    max_s = query_data["max_s"]
    if not svc.stream_slots.acquire(blocking=False):
        abort(503, "no stream slot free in this worker; retry later", headers={"Retry-After": "5"})
    try:
        pubsub = svc.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(svc.keys.live)
    except RedisError as exc:
        svc.stream_slots.release()
        svc.redis_failed(exc)
        abort(
            503,
            f"dependency redis unavailable: {type(exc).__name__}",
            extra_data={"dependency": "redis"},
        )

    def wanted(data: str) -> list[dict[str, Any]]:
        try:
            readings = cache.live_readings(data)
        except ValueError:
            return []
        return [
            r
            for r in readings
            if (sensor_id is None or r.get("sensor_id") == sensor_id)
            and (kind is None or r.get("kind") == kind)
        ]

    def events() -> Iterator[str]:
        deadline = time.monotonic() + max_s
        next_beat = time.monotonic() + KEEPALIVE_S
        try:
            yield "retry: 1000\n: connected\n\n"
            while (now := time.monotonic()) < deadline:
                msg = pubsub.get_message(timeout=min(1.0, deadline - now))
                readings = wanted(msg["data"]) if msg and msg.get("type") == "message" else []
                if readings:
                    next_beat = time.monotonic() + KEEPALIVE_S
                    yield "".join(
                        f"event: reading\ndata: {json.dumps(r, separators=(',', ':'))}\n\n"
                        for r in readings
                    )
                elif time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + KEEPALIVE_S
                    yield ": keepalive\n\n"
            yield "event: end\ndata: {}\n\n"
        except RedisError:
            yield 'event: error\ndata: {"detail": "redis unavailable"}\n\n'
        finally:
            try:
                pubsub.close()
            finally:
                svc.stream_slots.release()

    resp = Response(stream_with_context(events()), mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp
