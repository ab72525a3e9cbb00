"""The payload contract (docs/ARCHITECTURE.md, "The payload contract"): what is stored,
what is rejected and why."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from sensor_gateway.payload import MAX_DEPTH, Limits, Reject, dedupe_key, parse

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
    body = {
        "sensor_id": "t-9",
        "value": 21.5,
        "unit": "°C",
        "timestamp": "2026-11-24T11:59:00.5+01:00",
        "msg_id": "abc",
    }
    doc = ok("sensors/temperature/t1", body)
    assert doc["_id"] == dedupe_key("sensors/temperature/t1", json.dumps(body).encode())
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
    assert doc["ts"] == NOW  # kept to the microsecond: buckets store µs (layout.py)
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


# -- hostile payloads: each class that once stopped the ingester ---------------------
# (float() of a huge int raised OverflowError; converting a timestamp whose offset
# crosses year 1 or 9999 to UTC raised OverflowError; deep nesting made the JSON
# decoder raise RecursionError.) Each must be a reject that names the problem.

HUGE_INT = b"1" + b"0" * 400


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"value": ' + HUGE_INT + b"}", "value is out of range: an integer of 1329 bits"),
        (b'{"value": -' + HUGE_INT + b"}", "out of range"),
        (b'{"value": 1' + b"0" * 4000 + b"}", "out of range"),
        (b'{"value": 1' + b"0" * 6000 + b"}", "not JSON"),
        (b'{"value": "1' + b"0" * 400 + b'"}', "numeric string"),
        (b'{"value": "1e400"}', "finite"),
        (b'{"status": ' + HUGE_INT + b"}", "status must be an integer 0-6, got an integer"),
        (b'{"value": 1, "timestamp": "0001-01-01T00:00:00+01:00"}', "outside years 1-9999"),
        (b'{"value": 1, "timestamp": "9999-12-31T23:59:59-01:00"}', "outside years 1-9999"),
        (b'{"value": 1, "timestamp": "0001-01-01T00:59:59+01:00"}', "outside years 1-9999"),
        (b'{"value": 1, "timestamp": "9999-12-31T23:00:00-23:59"}', "outside years 1-9999"),
        (b"[" * 16000, f"nested deeper than {MAX_DEPTH}"),
        (b'{"a":' * 2000 + b"1" + b"}" * 2000, f"nested deeper than {MAX_DEPTH}"),
        (b'{"value": 1, "unit": "\\u0000"}', "unit"),
        (rb'{"value": 1, "unit": "a\u0000"}', "control or unencodable"),
        (rb'{"value": 1, "msg_id": "a\nb"}', "control or unencodable"),
        (rb'{"value": 1, "unit": "\ud800"}', "not JSON"),
        (b'{"value": 1, "msg_id": ' + HUGE_INT + b"}", "msg_id must be a string"),
        (b'{"value": 1, "sensor_id": ' + HUGE_INT + b"}", "an integer of"),
        (b'{"value": 1, "timestamp": "' + b"9" * 5000 + b'"}', "not ISO 8601"),
    ],
)
def test_hostile_payloads_are_rejects(payload: bytes, reason: str) -> None:
    assert reason in rejected("sensors/temperature/x", payload)


def test_timestamps_at_the_edges_of_the_range_are_kept() -> None:
    first = ok("sensors/t/x", {"value": 1, "timestamp": "0001-01-01T00:00:00-01:00"})
    assert first["ts"] == datetime(1, 1, 1, 1, tzinfo=UTC)
    exact = ok("sensors/t/x", {"value": 1, "timestamp": "0001-01-01T01:00:00+01:00"})
    assert exact["ts"] == datetime(1, 1, 1, tzinfo=UTC)


def test_nesting_within_the_bound_is_decoded() -> None:
    nested = b'{"value": 1, "extra": ' + b"[" * (MAX_DEPTH - 2) + b"]" * (MAX_DEPTH - 2) + b"}"
    assert not isinstance(parse("sensors/t/x", nested, NOW), Reject)
    # Brackets inside strings are not nesting.
    assert ok("sensors/t/x", {"value": 1, "note": "[" * 100})


def test_control_characters_in_a_topic_are_a_reject() -> None:
    assert "topic has a control" in rejected("sensors/t/x\x01", b'{"value": 1}')


# -- the dedupe key (docs/ARCHITECTURE.md, "The dedupe key") -------------------------


def test_redelivery_has_the_same_key() -> None:
    body = {"sensor_id": "a", "msg_id": "1", "value": 1, "timestamp": "2026-11-24T11:00:00Z"}
    assert ok("sensors/t/a", body)["_id"] == ok("sensors/t/a", body)["_id"]


def test_two_devices_with_the_same_msg_id_keep_both() -> None:
    a = ok(
        "sensors/t",
        {"sensor_id": "a", "msg_id": "1", "value": 1, "timestamp": "2026-11-24T11:00:00Z"},
    )
    b = ok(
        "sensors/t",
        {"sensor_id": "b", "msg_id": "1", "value": 1, "timestamp": "2026-11-24T11:00:00Z"},
    )
    assert a["_id"] != b["_id"]
    # The same through the topic level rather than the payload.
    c = ok("sensors/t/a", {"msg_id": "1", "value": 1})
    d = ok("sensors/t/b", {"msg_id": "1", "value": 1})
    assert c["_id"] != d["_id"]


def test_a_restarted_counter_keeps_every_reading() -> None:
    before = ok("sensors/t/a", {"msg_id": "1", "value": 5, "timestamp": "2026-11-24T11:00:00Z"})
    after = ok("sensors/t/a", {"msg_id": "1", "value": 5, "timestamp": "2026-11-24T12:00:00Z"})
    assert before["_id"] != after["_id"]


def test_without_a_timestamp_the_packet_id_tells_a_restart_from_a_redelivery() -> None:
    payload = json.dumps({"msg_id": "1", "value": 5}).encode()
    first = parse("sensors/t/a", payload, NOW, packet_id=17)
    redelivered = parse("sensors/t/a", payload, NOW, packet_id=17)
    restarted = parse("sensors/t/a", payload, NOW, packet_id=912)
    assert first["_id"] == redelivered["_id"] != restarted["_id"]


def test_topic_identity_takes_the_sensor_from_the_topic() -> None:
    strict = Limits(topic_identity=True)
    doc = parse("sensors/t/dev-a", b'{"value": 1}', NOW, strict)
    assert doc["sensor_id"] == "dev-a"
    same = parse("sensors/t/dev-a", b'{"value": 1, "sensor_id": "dev-a"}', NOW, strict)
    assert same["sensor_id"] == "dev-a"
    other = parse("sensors/t/dev-a", b'{"value": 1, "sensor_id": "dev-b"}', NOW, strict)
    assert isinstance(other, Reject)
    assert "claims sensor_id 'dev-b' on the topic of 'dev-a'" in other.reason
    # Two-level topics (only the shared users may write them) keep the old rules.
    assert parse("sensors/t", b'{"value": 1, "sensor_id": "x"}', NOW, strict)["sensor_id"] == "x"
    # Without the option the payload wins, as the systems this replaces expect.
    assert (
        parse("sensors/t/dev-a", b'{"value": 1, "sensor_id": "dev-b"}', NOW)["sensor_id"] == "dev-b"
    )
