"""``GET /readings/export?format=csv|ndjson``: every reading a filter matches, as a file.

The filters are those of ``/readings`` (the same schema fields and the same
:class:`sensor_gateway.queries.ReadingQuery`), without paging: the whole
result is streamed. The rows are read one minute bucket at a time by
``_id`` (:func:`iter_readings`), encoded :data:`BATCH` rows a chunk and
handed to the WSGI server by a generator, so the worker holds one chunk at a
time whatever the size of the export. ``sensor-gateway export`` writes the same
bytes to a file through :func:`chunks`.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec
from apiflask import APIBlueprint, Schema, fields
from apiflask.validators import OneOf
from flask import Response, stream_with_context
from marshmallow import RAISE, validates_schema
from pymongo.database import Database

from sensor_gateway import queries
from sensor_gateway.api import schemas
from sensor_gateway.api.services import services

log = logging.getLogger("sensor_gateway.api.export")

bp = APIBlueprint("export", __name__, tag="readings")

BATCH = 1000  # rows per encoded chunk
FORMATS = {"csv": "text/csv; charset=utf-8", "ndjson": "application/x-ndjson"}
CSV_COLUMNS = ("timestamp", "sensor_id", "kind", "value", "unit", "msg_id", "id")
# What /readings leaves out of a reading document (see queries.find_readings).
# A spreadsheet runs a cell starting with one of these as a formula.
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


class ExportQuery(Schema):
    """The filters of ``/readings`` (same fields and checks), plus the format."""

    format = fields.String(
        load_default="csv",
        validate=OneOf(list(FORMATS)),
        metadata={"description": "csv (with a header row) or ndjson (one reading per line)."},
    )
    sensor_id = schemas.ReadingsQuery._declared_fields["sensor_id"]
    kind = schemas.ReadingsQuery._declared_fields["kind"]
    start = schemas.ReadingsQuery._declared_fields["start"]
    end = schemas.ReadingsQuery._declared_fields["end"]
    min_value = schemas.ReadingsQuery._declared_fields["min_value"]
    max_value = schemas.ReadingsQuery._declared_fields["max_value"]
    order = schemas.ReadingsQuery._declared_fields["order"]

    @validates_schema
    def _ranges(self, data: dict[str, Any], **kw: Any) -> None:
        schemas._check_order(data, "start", "end")
        schemas._check_order(data, "min_value", "max_value")


def reading_query(data: dict[str, Any]) -> queries.ReadingQuery:
    return queries.ReadingQuery(
        sensor_id=data.get("sensor_id"),
        kind=data.get("kind"),
        start=data.get("start"),
        end=data.get("end"),
        min_value=data.get("min_value"),
        max_value=data.get("max_value"),
        order=data.get("order", "asc"),
    )


def iter_readings(
    db: Database, q: queries.ReadingQuery, time_limit_ms: int | None = None
) -> Iterator[dict[str, Any]]:
    """Every reading ``q`` matches in (time, sensor, arrival) order, as ``/readings``
    shows them, reading one bucket at a time (never a list of them all)."""
    reader = queries.Reader(db, time_limit_ms=time_limit_ms, memo=False)
    for s in queries.iter_samples(reader, q):
        yield s.public()


def _cell(text: str) -> str:
    return "'" + text if text.startswith(_FORMULA) else text


def _csv_row(r: dict[str, Any]) -> tuple[Any, ...]:
    return (
        r["timestamp"],
        _cell(r["sensor_id"]),
        _cell(r["kind"]),
        repr(float(r["value"])) if isinstance(r["value"], float) else r["value"],
        _cell(r.get("unit", "")),
        _cell(str(r.get("msg_id", ""))),
        r["id"],
    )


def chunks(rows: Iterator[dict[str, Any]], fmt: str) -> Iterator[bytes]:
    """The file's bytes, ``BATCH`` rows per chunk (a CSV starts with its header)."""
    if fmt == "ndjson":
        enc = msgspec.json.Encoder()
        buf = bytearray()
        n = 0
        for r in rows:
            enc.encode_into(r, buf, len(buf))
            buf += b"\n"
            n += 1
            if n == BATCH:
                yield bytes(buf)
                buf.clear()
                n = 0
        if buf:
            yield bytes(buf)
        return
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    n = 0
    for r in rows:
        writer.writerow(_csv_row(r))
        n += 1
        if n == BATCH:
            yield text.getvalue().encode()
            text.seek(0)
            text.truncate()
            n = 0
    yield text.getvalue().encode()


def filename(data: dict[str, Any], now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    who = data.get("sensor_id") or data.get("kind") or "all"
    return f"readings-{who}-{stamp}.{data.get('format', 'csv')}"


@bp.get("/readings/export")
@bp.input(ExportQuery, location="query", unknown=RAISE)
@bp.doc(
    summary="Every reading a filter matches, as a CSV or NDJSON file",
    description="The filters of `/readings` (`sensor_id`, `kind`, `start`/`end`, "
    "`min_value`/`max_value`, `order`), without paging: the whole result is streamed "
    "(chunked) as an attachment. CSV columns: "
    + ", ".join(f"`{c}`" for c in CSV_COLUMNS)
    + "; text cells that a spreadsheet would run as a formula start with `'`.",
    responses={
        200: {
            "description": "The file (Content-Disposition: attachment)",
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        },
        400: "A parameter is invalid (named in `detail`)",
    },
)
def export(query_data: dict[str, Any]) -> Response:
    svc = services()
    fmt = query_data["format"]
    rows = iter_readings(svc.db, reading_query(query_data))
    # The first batch is read here, so a database that is down is a 503 (errors.py),
    # not a 200 that stops short.
    first = next(rows, None)

    def body() -> Iterator[bytes]:
        def all_rows() -> Iterator[dict[str, Any]]:
            if first is not None:
                yield first
                yield from rows

        sent = 0
        try:
            for chunk in chunks(all_rows(), fmt):
                sent += len(chunk)
                yield chunk
        except Exception:
            # Headers are gone: end the response short (the chunked body is then
            # incomplete, which clients report) and say so in the log.
            log.exception("export stopped after %d bytes", sent)
            raise
        finally:
            rows.close()

    resp = Response(stream_with_context(body()), mimetype=FORMATS[fmt].split(";")[0])
    resp.headers["Content-Type"] = FORMATS[fmt]
    resp.headers["Content-Disposition"] = f'attachment; filename="{filename(query_data)}"'
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp
