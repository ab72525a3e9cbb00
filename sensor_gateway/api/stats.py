"""Statistics: rolling averages and status counts, from the stored summaries."""

from __future__ import annotations

from typing import Any

from apiflask import APIBlueprint
from flask import Response
from marshmallow import RAISE

from sensor_gateway import averages as avg
from sensor_gateway import queries
from sensor_gateway.api import schemas
from sensor_gateway.api.responses import json_bytes, json_response
from sensor_gateway.api.services import services

bp = APIBlueprint("stats", __name__, tag="stats")


@bp.get("/stats/averages")
@bp.input(schemas.AveragesQuery, location="query", unknown=RAISE)
@bp.output(schemas.Averages)
@bp.doc(
    summary="Rolling averages over time windows (default 1m, 5m, 30m)",
    description="sum / count over the summaries from `now - window` rounded down to the "
    "minute to the end of the current minute (included up to the last batch the ingester "
    "wrote); long windows read hour and day summaries. `overall` is over every sensor "
    "matching the filters, `sensors` per sensor.",
)
def averages(query_data: dict[str, Any]) -> Response:
    svc = services()
    labels = (
        query_data["windows"].split(",")
        if "windows" in query_data
        else svc.cfg.ingest.stats_windows
    )
    windows = avg.parse_windows(labels)
    sensor_id, kind = query_data.get("sensor_id"), query_data.get("kind")
    body, hit = svc.cached(
        "/stats/averages",
        {"w": [w.label for w in windows], "s": sensor_id, "k": kind},
        lambda: json_bytes(avg.averages(svc.reader(), windows, sensor_id, kind)),
    )
    return json_response(body, headers={"X-Cache": "hit" if hit else "miss"})


def _counts(data: dict[str, Any]) -> Response:
    svc = services()
    start = data.get("start", data.get("start_time"))
    end = data.get("end", data.get("end_time"))
    sensor_id = data.get("sensor_id")
    body, hit = svc.cached(
        "/stats/status-counts",
        {"s": start, "e": end, "id": sensor_id},
        lambda: json_bytes(queries.status_counts(svc.reader(), start, end, sensor_id)),
    )
    return json_response(body, headers={"X-Cache": "hit" if hit else "miss"})


_COUNTS_DOC = (
    "Count of readings of kind `status` with each status 0–6 in `[start, end]` "
    "(both inclusive, ISO 8601, naive = UTC); every status is present, zeros included. "
    "Computed from day, hour and minute summaries, and the readings of the partial "
    "minutes at either end."
)


@bp.get("/stats/status-counts")
@bp.input(schemas.StatusCountsQuery, location="query", unknown=RAISE)
@bp.output(schemas.StatusCounts)
@bp.doc(summary="Status counts (query parameters start, end)", description=_COUNTS_DOC)
def status_counts_get(query_data: dict[str, Any]) -> Response:
    return _counts(query_data)


@bp.post("/stats/status-counts")
@bp.input(schemas.StatusCountsQuery, location="query", unknown=RAISE, arg_name="query_data")
@bp.input(schemas.StatusCountsBody, location="json", unknown=RAISE)
@bp.output(schemas.StatusCounts)
@bp.doc(
    summary='Status counts (JSON body {"start_time", "end_time"})',
    description=_COUNTS_DOC,
)
def status_counts_post(query_data: dict[str, Any], json_data: dict[str, Any]) -> Response:
    return _counts({**query_data, **json_data})
