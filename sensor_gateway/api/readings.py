"""Readings: filtered pages with a keyset cursor, and the latest ten across sensors."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from apiflask import APIBlueprint, abort
from flask import Response, request
from marshmallow import RAISE

from sensor_gateway import queries
from sensor_gateway.api import schemas
from sensor_gateway.api.latest import fast_n, latest_response
from sensor_gateway.api.responses import json_bytes, json_response
from sensor_gateway.api.services import Services, services

bp = APIBlueprint("readings", __name__, tag="readings")


def paged(svc: Services, route: str, q: queries.ReadingQuery, envelope: bool) -> Response:
    """Run (or fetch from the short-lived cache) one page of a readings query.

    ``envelope``: ``{"items": [...], "next_cursor": ...}``; otherwise a plain
    array (compatibility routes) with the next cursor in ``X-Next-Cursor`` and
    a ``Link: <…>; rel="next"`` header.
    """
    if q.limit > svc.cfg.api.max_limit:
        abort(400, f"query parameter 'limit': at most {svc.cfg.api.max_limit}")
    try:
        q.after()  # validates the cursor before anything runs
    except queries.BadCursor as exc:
        abort(400, f"query parameter 'cursor': {exc}")

    def compute() -> bytes:
        items, next_cursor = queries.find_readings(svc.reader(), q)
        return (next_cursor or "").encode() + b"\n" + json_bytes(items)

    params = {k: v for k, v in q.__dict__.items() if v is not None}
    blob, hit = svc.cached(route, params, compute)
    cursor, _, items = blob.partition(b"\n")
    next_cursor = cursor.decode() or None
    headers = {"X-Cache": "hit" if hit else "miss"}
    if envelope:
        nc = json_bytes(next_cursor)
        return json_response(b'{"items":' + items + b',"next_cursor":' + nc + b"}", headers=headers)
    if next_cursor:
        args: dict[str, Any] = {k: v for k, v in request.args.items() if k != "cursor"}
        args["cursor"] = next_cursor
        headers["X-Next-Cursor"] = next_cursor
        headers["Link"] = f'<{request.path}?{urlencode(args)}>; rel="next"'
    return json_response(items, headers=headers)


@bp.get("/readings")
@bp.input(schemas.ReadingsQuery, location="query", unknown=RAISE)
@bp.output(schemas.ReadingPage, description="A page of readings and the cursor of the next")
@bp.doc(
    summary="Readings by sensor, kind, time range and value range",
    description="Native: `sensor_id`, `kind`, `start`/`end` (ISO 8601, naive = UTC), "
    "`min_value`/`max_value`, `limit` ≤ 1000 and `cursor` (the `next_cursor` of the "
    "previous page; `null` on the last page).\n\n"
    "Compatibility: `Sensor_Name` (a sensor id or a kind) with `Start_Range`/`End_Range` "
    "(a value range) answers a plain JSON array of readings, as the old API did; "
    "a next page is announced in `X-Next-Cursor` and `Link`.",
    responses={400: "A parameter is invalid (named in `detail`)"},
)
def list_readings(query_data: dict[str, Any]) -> Response:
    svc = services()
    compat = "Sensor_Name" in query_data
    q = queries.ReadingQuery(
        sensor_id=query_data.get("sensor_id"),
        kind=query_data.get("kind"),
        name=query_data.get("Sensor_Name"),
        start=query_data.get("start"),
        end=query_data.get("end"),
        min_value=query_data.get("min_value", query_data.get("Start_Range")),
        max_value=query_data.get("max_value", query_data.get("End_Range")),
        limit=query_data["limit"] if not compat or "limit" in request.args else 1000,
        cursor=query_data.get("cursor"),
        order=query_data["order"],
    )
    if q.min_value is not None and q.max_value is not None and q.min_value > q.max_value:
        abort(400, "query parameter 'max_value': must not be below min_value")
    return paged(svc, "/readings", q, envelope=not compat)


@bp.get("/readings/latest")
@fast_n
@bp.input(schemas.LatestQuery, location="query", unknown=RAISE)
@bp.output(schemas.ReadingList, description="Newest first")
@bp.doc(
    summary="The latest readings across all sensors (ten by default)",
    description="From Redis; from MongoDB when Redis is down. "
    "`X-Data-Source: redis|mongodb` says which.",
)
def latest_overall(query_data: dict[str, Any]) -> Response:
    return latest_response(services(), None, query_data["n"], envelope=True)
