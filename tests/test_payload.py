"""The reading contract (DESIGN.md): what is stored, what is rejected and why."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from sensor_gateway.payload import Limits, Reject, parse

NOW = datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=UTC)


def ok(topic: str, body: object) -> dict:
    doc = parse(topic, json.dumps(body).encode(), NOW)
    assert not isinstance(doc, Reject), doc
    return doc


def rejected(topic: str, payload: bytes, limits: Limits | None = None) -> str:
    doc = parse(topic, payload, NOW, limits)
    assert isinstance(doc, Reject), doc
    return doc.reason


def test_full_reading() -> None:
    doc = ok(
        "sensors/temperature/t1",
        {
            "sensor_id": "t-9",
            "value": 21.5,
            "unit": "°C",
            "timestamp": "2026-11-24T11:59:00.5+01:00",
            "msg_id": "abc",
        },
    )
    assert doc["_id"] == "abc"
    assert doc["sensor_id"] == "t-9"  # the payload wins over the topic
    assert doc["kind"] == "temperature"
    assert doc["value"] == 21.5
    assert doc["ts"] == datetime(2026, 11, 24, 10, 59, 0, 500000, tzinfo=UTC)
    assert doc["unit"] == "°C"
    assert "ts_from_receipt" not in doc


def test_sensor_id_from_topic_then_kind() -> None:
    assert ok("sensors/humidity/h7", {"value": 1})["sensor_id"] == "h7"
    assert ok("sensors/status", {"status": 3})["sensor_id"] == "status"


def test_status_alias_and_numeric_string() -> None:
    assert ok("sensors/status", {"status": 6})["value"] == 6.0
    assert ok("sensors/temperature/x", {"value": " 12.5 "})["value"] == 12.5


def test_missing_timestamp_is_receipt_time_recorded_as_such() -> None:
    doc = ok("sensors/temperature/x", {"value": 1})
    assert doc["ts_from_receipt"] is True
    assert doc["ts"] == NOW.replace(microsecond=123000)
    assert "_id" not in doc  # neither msg_id nor timestamp: stored at least once


def test_dedupe_key_without_msg_id_is_stable() -> None:
    body = {"value": 1, "timestamp": "2026-11-24T11:00:00Z"}
    a = ok("sensors/t/x", body)
    b = ok("sensors/t/x", body)
    c = ok("sensors/t/y", body)
    assert a["_id"] == b["_id"] != c["_id"]


def test_naive_timestamp_is_utc() -> None:
    doc = ok("sensors/t/x", {"value": 1, "timestamp": "2026-11-24T11:00:00"})
    assert doc["ts"] == datetime(2026, 11, 24, 11, tzinfo=UTC)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"value": NaN}', "not JSON"),
        (b'{"value": 1e999}', "out of range"),
        (b'{"value": "Infinity"}', "finite"),
        (b'{"value": true}', "boolean"),
        (b'{"value": [1]}', "must be a number"),
        (b'{"value": "12a"}', "numeric string"),
        (b'{"unit": "C"}', "no 'value'"),
        (b'{"status": 7}', "status must be an integer 0-6"),
        (b'{"status": 2.5}', "status must be an integer 0-6"),
        (b'{"value": 1, "timestamp": "yesterday"}', "not ISO 8601"),
        (b'{"value": 1, "timestamp": 1700000000}', "ISO 8601 string"),
        (b'{"value": 1, "sensor_id": "a b"}', "sensor_id"),
        (b'{"value": 1, "sensor_id": ""}', "sensor_id"),
        (b'{"value": 1, "msg_id": 5}', "msg_id"),
        (b'{"value": 1, "msg_id": "' + b"x" * 65 + b'"}', "msg_id"),
        (b'{"value": 1, "kind": {"$ne": 1}}', "kind"),
    ],
)
def test_rejects_name_the_problem(payload: bytes, reason: str) -> None:
    assert reason in rejected("sensors/temperature/x", payload)


def test_status_kind_needs_a_status_value() -> None:
    assert "integer 0-6" in rejected("sensors/status", b'{"value": 9}')


def test_future_timestamp_beyond_skew() -> None:
    future = (NOW + timedelta(minutes=10)).isoformat()
    assert "in the future" in rejected(
        "sensors/t/x", json.dumps({"value": 1, "timestamp": future}).encode()
    )
    near = (NOW + timedelta(seconds=30)).isoformat()
    assert ok("sensors/t/x", {"value": 1, "timestamp": near})


def test_size_limit() -> None:
    big = json.dumps({"value": 1, "pad": "x" * 20000}).encode()
    assert "over the 16384 limit" in rejected("sensors/t/x", big)
    assert "over the 100 limit" in rejected("sensors/t/x", b" " * 101, Limits(100, 300))


def test_bad_topic_sensor_level() -> None:
    assert "not a valid sensor id" in rejected("sensors/t/a b", b'{"value": 1}')
    assert "no kind" in rejected("sensors", b'{"value": 1}')
