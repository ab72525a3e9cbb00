"""The invariants the fuzz targets hold the parser and the batch path to.

Shared by the atheris targets (``fuzz_payload.py``, ``fuzz_batch.py``) and by
the corpus replay in ``tests/test_fuzz.py``. A failed ``assert`` here is a
crash to libFuzzer. Nothing here imports atheris.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import bson
from bson.codec_options import CodecOptions

from sensor_gateway import cache, layout, model
from sensor_gateway.payload import SENSOR_ID_RE, Reject

# docs/ARCHITECTURE.md, "The payload contract": 1-64 characters [A-Za-z0-9_.:-], the whole
# string (``re.fullmatch``: a ``$`` would also accept a trailing newline).
IDENTIFIER = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
NOW = datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=UTC)
MAX_REASON = 1000
_TZ_AWARE = CodecOptions(tz_aware=True)
# The public id the writer gives a reading: its bucket and arrival position
# (a stand-in: the bucket is of the reading's sensor and minute, position 0).
_POS = 0


def _stored(doc: dict[str, Any]) -> dict[str, Any]:
    """The reading as the writer hands it to Redis: ``_id`` is its public id."""
    bid = layout.bucket_id(doc["sensor_id"], layout.to_us(doc["ts"]))
    return {**doc, "_id": layout.reading_id(bid, _POS)}


def _bucket(doc: dict[str, Any]) -> dict[str, Any]:
    """The ``samples`` document the writer makes of this one reading (writer.py)."""
    us = layout.to_us(doc["ts"])
    base = layout.floor(us, layout.US_MINUTE)
    return {
        "_id": layout.bucket_id(doc["sensor_id"], us),
        "s": doc["sensor_id"],
        "b": base,
        "t": [us - base],
        "v": [doc["value"]],
        "k": [doc.get("_id") or "~key"],
        "ai": [0],
        "mi": [doc.get("msg_id")],
        "a": [{"k": doc["kind"], "u": doc.get("unit") or None}],
    }


def check_reading(
    doc: dict[str, Any], topic: str, now: datetime = NOW, skew_s: float = 300.0
) -> None:
    """A reading that parse() returned can be stored, cached and shown."""
    assert isinstance(doc, dict), type(doc)
    sensor_id, kind = doc["sensor_id"], doc["kind"]
    assert isinstance(sensor_id, str) and IDENTIFIER.fullmatch(sensor_id), repr(sensor_id)
    assert isinstance(kind, str) and IDENTIFIER.fullmatch(kind), repr(kind)
    assert SENSOR_ID_RE.match(sensor_id) and SENSOR_ID_RE.match(kind)
    value = doc["value"]
    assert type(value) is float and math.isfinite(value), repr(value)
    if kind == "status":
        assert value.is_integer() and 0 <= value <= 6, f"status {value!r}"
    ts = doc["ts"]
    assert isinstance(ts, datetime) and ts.utcoffset() == timedelta(0), repr(ts)
    assert 1 <= ts.year <= 9999
    # Stored as integer microseconds (layout.py): exact both ways, so reads equal writes.
    assert layout.from_us(layout.to_us(ts)) == ts, "ts does not survive the layout's time"
    assert ts - now <= timedelta(seconds=skew_s), "a timestamp beyond the skew was kept"
    assert doc["topic"] == topic
    if "_id" in doc:
        assert isinstance(doc["_id"], str) and doc["_id"], repr(doc["_id"])
    for key in ("unit", "msg_id"):
        if key in doc:
            assert isinstance(doc[key], str) and doc[key].isprintable(), repr(doc[key])

    # Storable: its bucket is BSON, and what is read back is what was written.
    bucket = bson.decode(bson.encode(_bucket(doc)), codec_options=_TZ_AWARE)
    [back] = layout.samples_of(bucket)
    assert back.ts == ts, (back.ts, ts)
    assert back.value == value and back.sensor_id == sensor_id and back.kind == kind
    assert back.unit == (doc.get("unit") or None) and back.msg_id == doc.get("msg_id")
    # Showable: the API's JSON (strict: no NaN/Infinity) and the Redis member.
    stored = _stored(doc)
    shown = model.public(stored)
    assert shown == back.public(), (shown, back.public())
    json.dumps(shown, allow_nan=False).encode("utf-8")
    member, score = cache._member(stored)
    member.encode("utf-8")
    assert math.isfinite(score)
    # Summarisable: it folds into a minute's summary.
    layout.add_sample(layout.summary(), doc["kind"], doc["value"])


def check_reject(rej: Reject) -> None:
    assert isinstance(rej, Reject), type(rej)
    assert isinstance(rej.reason, str) and rej.reason, repr(rej.reason)
    rej.reason.encode("utf-8")  # it is logged and stored
    # A reason names the problem; it does not echo the input at length.
    assert len(rej.reason) <= MAX_REASON, f"a reason of {len(rej.reason)} characters"


def check_parsed(result: Any, topic: str, now: datetime = NOW, skew_s: float = 300.0) -> None:
    if isinstance(result, Reject):
        check_reject(result)
    else:
        check_reading(result, topic, now, skew_s)


def check_reject_doc(doc: dict[str, Any]) -> None:
    """A document for the ``rejected`` collection."""
    assert isinstance(doc, dict), type(doc)
    for key in ("topic", "payload", "reason", "received_at"):
        assert key in doc, f"reject document has no {key!r}: {doc!r}"
    assert isinstance(doc["reason"], str) and 0 < len(doc["reason"]) <= MAX_REASON, doc["reason"]
    bson.encode(doc)
    doc["reason"].encode("utf-8")


def check_batch_readings(readings: list[dict[str, Any]]) -> None:
    """A batch's readings fold into summaries and go to Redis together."""
    stored = [_stored(d) for d in readings]
    # Per sensor and minute (the writer's buckets), then summed up as hours and days are.
    acc: dict[str, dict[str, Any]] = {}
    for d in stored:
        bid = layout.bucket_id(d["sensor_id"], layout.to_us(d["ts"]))
        layout.add_sample(acc.setdefault(bid, layout.summary()), d["kind"], d["value"])
    assert sum(a["n"] for a in acc.values()) == len(readings)
    assert layout.total(acc.values())["n"] == len(readings)
    for a in acc.values():
        # A sum of finite values may overflow to inf (the API shows avg null); min/max may not.
        assert math.isfinite(a["min"]) and math.isfinite(a["max"]), a
    for d in stored:
        cache._member(d)
    # The live channel carries the batch as one array, read back reading by reading.
    if stored:
        live = cache.live_readings(cache.live_message([model.public(d) for d in stored]))
        assert live == [model.public(d) for d in stored], live
