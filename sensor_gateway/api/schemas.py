"""Request and response schemas: the single source of validation and of /openapi.json."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from apiflask import Schema, fields
from apiflask.validators import Length, OneOf, Range, Regexp
from marshmallow import ValidationError, validates_schema

from sensor_gateway.config import ConfigError, parse_window
from sensor_gateway.payload import SENSOR_ID_RE, Reject, parse_time

MAX_LIMIT = 1000
LATEST_DEFAULT = 10  # readings of the latest routes without ``n``
MAX_WINDOW_S = 31 * 24 * 3600
ID_PATTERN = SENSOR_ID_RE.pattern


class IsoDateTime(fields.DateTime):
    """ISO 8601 with ``Z`` or an offset; a naive time is UTC. Loads an aware UTC datetime."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        if not isinstance(value, str) or len(value) > 64:
            raise ValidationError("expected an ISO 8601 date-time string")
        try:
            dt = parse_time(value, attr or "time")
        except (ValueError, OverflowError) as exc:
            raise ValidationError(f"not a valid ISO 8601 date-time: {value[:40]!r}") from exc
        if isinstance(dt, Reject):
            raise ValidationError(f"not a valid ISO 8601 date-time: {value[:40]!r}")
        return dt


class FullMatch(Regexp):
    """A Regexp the whole value must match: its ``$`` alone also matches before a
    trailing newline. Still a Regexp, so the OpenAPI schema keeps the pattern."""

    def __call__(self, value: str) -> str:
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


def sensor_id_field(**kw: Any) -> fields.String:
    return fields.String(
        validate=[Length(1, 64), FullMatch(SENSOR_ID_RE, error="must match {regex}")], **kw
    )


def finite(**kw: Any) -> fields.Float:
    return fields.Float(allow_nan=False, **kw)


def _check_order(data: dict[str, Any], low: str, high: str) -> None:
    a, b = data.get(low), data.get(high)
    if a is not None and b is not None and a > b:
        raise ValidationError(f"must not be before/below {low}", field_name=high)


class ReadingsQuery(Schema):
    sensor_id = sensor_id_field(metadata={"description": "Only this sensor."})
    kind = sensor_id_field(metadata={"description": "Only this kind (temperature, status, …)."})
    start = IsoDateTime(metadata={"description": "From this time, inclusive (ISO 8601)."})
    end = IsoDateTime(metadata={"description": "Until this time, exclusive (ISO 8601)."})
    min_value = finite(metadata={"description": "Value at least this."})
    max_value = finite(metadata={"description": "Value at most this."})
    limit = fields.Integer(
        load_default=100,
        validate=Range(1, MAX_LIMIT),
        metadata={"description": f"Page size, at most {MAX_LIMIT}."},
    )
    cursor = fields.String(
        validate=Length(1, 512),
        metadata={"description": "`next_cursor` of the previous page."},
    )
    order = fields.String(
        load_default="asc",
        validate=OneOf(["asc", "desc"]),
        metadata={"description": "By time: asc (oldest first) or desc."},
    )
    # Compatibility parameters (the FastAPI system this replaces).
    Sensor_Name = sensor_id_field(
        metadata={
            "description": "Compatibility: a sensor id or a kind. With it the answer is a "
            "plain JSON array, as the old API gave."
        }
    )
    Start_Range = finite(metadata={"description": "Compatibility: value at least this."})
    End_Range = finite(metadata={"description": "Compatibility: value at most this."})

    @validates_schema
    def _ranges(self, data: dict[str, Any], **kw: Any) -> None:
        _check_order(data, "start", "end")
        _check_order(data, "min_value", "max_value")
        _check_order(data, "Start_Range", "End_Range")


class LatestQuery(Schema):
    n = fields.Integer(
        load_default=LATEST_DEFAULT,
        validate=Range(1, MAX_LIMIT),
        metadata={"description": "How many readings, newest first."},
    )


class AveragesQuery(Schema):
    sensor_id = sensor_id_field()
    kind = sensor_id_field()
    windows = fields.String(
        metadata={
            "description": "Comma-separated windows such as 1m,5m,30m "
            "(default: the configured ingest.stats_windows)."
        },
        validate=Length(1, 200),
    )

    @validates_schema
    def _windows(self, data: dict[str, Any], **kw: Any) -> None:
        text = data.get("windows")
        if text is None:
            return
        labels = [w.strip() for w in text.split(",")]
        if len(labels) > 10:
            raise ValidationError("at most 10 windows", field_name="windows")
        for label in labels:
            try:
                seconds = parse_window(label)
            except ConfigError as exc:
                raise ValidationError(str(exc), field_name="windows") from exc
            if seconds > MAX_WINDOW_S:
                raise ValidationError(f"window {label!r} is longer than 31 days", "windows")


_START = "Start of the range, inclusive (ISO 8601)."
_END = "End of the range, inclusive (ISO 8601)."


class StatusCountsQuery(Schema):
    start = IsoDateTime(metadata={"description": _START})
    end = IsoDateTime(metadata={"description": _END})
    start_time = IsoDateTime(metadata={"description": "Alias of start."})
    end_time = IsoDateTime(metadata={"description": "Alias of end."})
    sensor_id = sensor_id_field(metadata={"description": "Only this status sensor."})

    @validates_schema
    def _range(self, data: dict[str, Any], **kw: Any) -> None:
        start = data.get("start", data.get("start_time"))
        end = data.get("end", data.get("end_time"))
        if start is not None and end is not None and start > end:
            raise ValidationError("must not be before the start", field_name="end")


class StatusCountsBody(StatusCountsQuery):
    """``{"start_time": …, "end_time": …}`` as the old clients post it."""


class StreamQuery(Schema):
    sensor_id = sensor_id_field()
    kind = sensor_id_field()
    max_s = fields.Integer(
        load_default=300,
        validate=Range(1, 3600),
        metadata={"description": "End the stream after this many seconds (clients reconnect)."},
    )


class PageQuery(Schema):
    limit = fields.Integer(load_default=MAX_LIMIT, validate=Range(1, MAX_LIMIT))
    cursor = fields.String(validate=Length(1, 512))


class StartToEndQuery(PageQuery):
    startDate = IsoDateTime(  # noqa: N815 - the old API's parameter name
        required=True, metadata={"description": "From this time, inclusive."}
    )
    endDate = IsoDateTime(  # noqa: N815
        required=True, metadata={"description": "Until this time, inclusive."}
    )

    @validates_schema
    def _range(self, data: dict[str, Any], **kw: Any) -> None:
        _check_order(data, "startDate", "endDate")


class SensorNameQuery(Schema):
    Sensor_Name = sensor_id_field(  # noqa: N815
        required=True, metadata={"description": "A sensor id or a kind."}
    )


# -- responses (documentation; the views write JSON themselves) ----------------------


class Reading(Schema):
    id = fields.String(required=True)
    sensor_id = fields.String(required=True)
    kind = fields.String(required=True)
    value = fields.Float(required=True)
    timestamp = fields.String(required=True, metadata={"format": "date-time"})
    unit = fields.String()


class ReadingPage(Schema):
    items = fields.List(fields.Nested(Reading), required=True)
    next_cursor = fields.String(allow_none=True, required=True)


class ReadingList(Schema):
    items = fields.List(fields.Nested(Reading), required=True)


class SensorOut(Schema):
    sensor_id = fields.String(required=True)
    last = fields.Nested(Reading, allow_none=True)


class SensorList(Schema):
    items = fields.List(fields.Nested(SensorOut), required=True)


class WindowStats(Schema):
    since = fields.String(metadata={"format": "date-time"})
    count = fields.Integer()
    avg = fields.Float(allow_none=True)
    min = fields.Float(allow_none=True)
    max = fields.Float(allow_none=True)


class SensorAverages(Schema):
    kind = fields.String(allow_none=True)
    windows = fields.Dict(keys=fields.String(), values=fields.Nested(WindowStats))


class Averages(Schema):
    generated_at = fields.String(metadata={"format": "date-time"})
    windows = fields.List(fields.String())
    sensor_id = fields.String(allow_none=True)
    kind = fields.String(allow_none=True)
    overall = fields.Dict(keys=fields.String(), values=fields.Nested(WindowStats))
    sensors = fields.Dict(keys=fields.String(), values=fields.Nested(SensorAverages))


class StatusCounts(Schema):
    class Meta:
        ordered = True

    _0 = fields.Integer(data_key="0", required=True)
    _1 = fields.Integer(data_key="1", required=True)
    _2 = fields.Integer(data_key="2", required=True)
    _3 = fields.Integer(data_key="3", required=True)
    _4 = fields.Integer(data_key="4", required=True)
    _5 = fields.Integer(data_key="5", required=True)
    _6 = fields.Integer(data_key="6", required=True)


class Check(Schema):
    ok = fields.Boolean()
    ms = fields.Float()
    error = fields.String()


class Ready(Schema):
    status = fields.String()
    checks = fields.Dict(keys=fields.String(), values=fields.Nested(Check))


class Health(Schema):
    status = fields.String()


# One instance, so the spec holds one array-of-readings schema.
READING_ARRAY = Reading(many=True)
