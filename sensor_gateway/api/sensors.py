"""Sensors and their latest readings."""

from __future__ import annotations

import json
from typing import Any

from apiflask import APIBlueprint, abort
from flask import Response
from marshmallow import RAISE

from sensor_gateway import queries
from sensor_gateway.api import schemas
from sensor_gateway.api.latest import fast_n, latest_response
from sensor_gateway.api.responses import json_response
from sensor_gateway.api.services import services
from sensor_gateway.payload import SENSOR_ID_RE

bp = APIBlueprint("sensors", __name__, tag="sensors")


@bp.get("/sensors")
@bp.output(schemas.SensorList)
@bp.doc(
    summary="Every sensor with its last reading",
    description="From Redis; from MongoDB when Redis is down (`X-Data-Source`).",
)
def list_sensors() -> Response:
    svc = services()

    def from_redis(r: Any) -> list[dict[str, Any]]:
        ids = sorted(r.smembers(svc.keys.sensors))
        pipe = r.pipeline(transaction=False)
        for sid in ids:
            pipe.zrevrange(svc.keys.latest(sid), 0, 0)
        tops = pipe.execute() if ids else []
        return [
            {"sensor_id": sid, "last": json.loads(top[0]) if top else None}
            for sid, top in zip(ids, tops, strict=True)
        ]

    ok, items = svc.try_redis(from_redis)
    source = "redis"
    if not ok or not items:
        source = "mongodb"
        items = []
        reader = svc.reader()
        for sid in queries.sensor_ids(reader):
            last = queries.latest(reader, 1, sensor_id=sid)
            items.append({"sensor_id": sid, "last": last[0] if last else None})
    return json_response({"items": items}, headers={"X-Data-Source": source})


@bp.get("/sensors/<sensor_id>/latest")
@fast_n
@bp.input(schemas.LatestQuery, location="query", unknown=RAISE)
@bp.output(schemas.ReadingList, description="Newest first")
@bp.doc(
    summary="The latest readings of one sensor (ten by default)",
    description="From Redis; from MongoDB when Redis is down or when more are asked "
    "for than Redis keeps (`X-Data-Source: redis|mongodb`). 404 for an unknown sensor.",
    responses={404: "No such sensor"},
)
def sensor_latest(sensor_id: str, query_data: dict[str, Any]) -> Response:
    _check_id(sensor_id)
    return latest_response(services(), sensor_id, query_data["n"], envelope=True)


def _check_id(sensor_id: str) -> None:
    if not SENSOR_ID_RE.fullmatch(sensor_id):
        abort(400, f"path parameter 'sensor_id': must match {schemas.ID_PATTERN}")
