"""Compatibility routes: the requests of the systems this gateway replaces.

They answer what their original clients expect: plain JSON arrays of
readings (each ``{"sensor_id", "value", "timestamp", …}``), newest first for
"latest" routes. ``GET /readings?Sensor_Name=&Start_Range=&End_Range=`` is
served by the native ``/readings`` route, and status-count clients use
``/stats/status-counts``, which takes both of their request shapes.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from apiflask import APIBlueprint
from flask import Response
from marshmallow import RAISE

from sensor_gateway import queries
from sensor_gateway.api import schemas
from sensor_gateway.api.latest import latest_response
from sensor_gateway.api.readings import paged
from sensor_gateway.api.sensors import _check_id
from sensor_gateway.api.services import services

bp = APIBlueprint("compat", __name__, tag="compatibility")


@bp.get("/Last_10_readings")
@bp.input(schemas.SensorNameQuery, location="query", unknown=RAISE)
@bp.output(schemas.READING_ARRAY, description="Newest first")
@bp.doc(
    summary="Compatibility: the last ten readings of a sensor (id or kind)",
    responses={404: "No such sensor or kind"},
)
def last_10_readings(query_data: dict[str, Any]) -> Response:
    return latest_response(services(), None, 10, envelope=False, name=query_data["Sensor_Name"])


@bp.get("/latestten")
@bp.output(schemas.READING_ARRAY, description="Newest first")
@bp.doc(summary="Compatibility: the latest ten readings across sensors")
def latestten() -> Response:
    return latest_response(services(), None, 10, envelope=False)


@bp.get("/latestten/<sensor_id>")
@bp.output(schemas.READING_ARRAY, description="Newest first")
@bp.doc(
    summary="Compatibility: the latest ten readings of one sensor",
    responses={404: "No such sensor"},
)
def latestten_sensor(sensor_id: str) -> Response:
    _check_id(sensor_id)
    return latest_response(services(), sensor_id, 10, envelope=False)


def _to_ms(dt: datetime) -> datetime:
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


def _start_to_end(query_data: dict[str, Any]) -> Response:
    # The system this replaces kept milliseconds (MongoDB dates): its clients send
    # microseconds and expect them compared at millisecond precision, both ends
    # inclusive. So does this route; the native ones compare microseconds.
    q = queries.ReadingQuery(
        start=_to_ms(query_data["startDate"]),
        end=_to_ms(query_data["endDate"]) + timedelta(microseconds=999),
        end_inclusive=True,
        limit=query_data["limit"],
        cursor=query_data.get("cursor"),
    )
    return paged(services(), "/starttoenddate", q, envelope=False)


@bp.get("/starttoenddate")
@bp.input(schemas.StartToEndQuery, location="query", unknown=RAISE)
@bp.output(schemas.READING_ARRAY, description="Oldest first")
@bp.doc(
    summary="Compatibility: readings between two dates",
    description="`startDate` and `endDate` both inclusive (ISO 8601, naive = UTC). At most "
    "`limit` (1000) readings; the next page is announced in `X-Next-Cursor` and `Link`.",
)
def starttoenddate(query_data: dict[str, Any]) -> Response:
    return _start_to_end(query_data)


@bp.get("/startoenddate")
@bp.input(schemas.StartToEndQuery, location="query", unknown=RAISE)
@bp.output(schemas.READING_ARRAY)
@bp.doc(
    summary="Compatibility: the misspelt /starttoenddate of the old README's example",
    deprecated=True,
)
def startoenddate(query_data: dict[str, Any]) -> Response:
    return _start_to_end(query_data)


@bp.get("/allData")
@bp.input(schemas.PageQuery, location="query", unknown=RAISE)
@bp.output(schemas.READING_ARRAY, description="Oldest first")
@bp.doc(
    summary="Compatibility: all readings, a page at a time",
    description="Pages of `limit` (≤ 1000) readings; the next page is announced in "
    "`X-Next-Cursor` and `Link`, absent on the last page.",
)
def all_data(query_data: dict[str, Any]) -> Response:
    q = queries.ReadingQuery(limit=query_data["limit"], cursor=query_data.get("cursor"))
    return paged(services(), "/allData", q, envelope=False)
