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

from sensor_gateway import cache, model, storage
from sensor_gateway.payload import SENSOR_ID_RE, Reject

# DESIGN.md, "The reading contract": 1-64 characters [A-Za-z0-9_.:-], the whole
# string (``re.fullmatch``: a ``$`` would also accept a trailing newline).
IDENTIFIER = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
NOW = datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=UTC)
MAX_REASON = 1000
_TZ_AWARE = CodecOptions(tz_aware=True)
# MongoDB assigns an ObjectId to a reading stored without ``_id``.
_STAND_IN_ID = bson.ObjectId(b"fuzzfuzzfuzz")


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
    assert ts.microsecond % 1000 == 0, "ts must have millisecond precision (reads equal writes)"
    assert ts - now <= timedelta(seconds=skew_s), "a timestamp beyond the skew was kept"
    assert doc["topic"] == topic
    if "_id" in doc:
        assert isinstance(doc["_id"], str) and doc["_id"], repr(doc["_id"])
    for key in ("unit", "msg_id"):
        if key in doc:
            assert isinstance(doc[key], str) and doc[key].isprintable(), repr(doc[key])

    # Storable: BSON, and what is read back is what was written.
    back = bson.decode(bson.encode(doc), codec_options=_TZ_AWARE)
    assert back["ts"] == ts, (back["ts"], ts)
    assert back["value"] == value and back["sensor_id"] == sensor_id
    # Showable: the API's JSON (strict: no NaN/Infinity) and the Redis member.
    stored = doc if "_id" in doc else {**doc, "_id": _STAND_IN_ID}
    shown = model.public(stored)
    json.dumps(shown, allow_nan=False).encode("utf-8")
    member, score = cache._member(stored)
    member.encode("utf-8")
    assert math.isfinite(score)
    storage.fold_rollups({}, [stored])


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
    """A batch's readings fold into rollups and go to Redis together."""
    stored = [d if "_id" in d else {**d, "_id": _STAND_IN_ID} for d in readings]
    acc = storage.fold_rollups({}, stored)
    assert sum(a["count"] for a in acc.values()) == len(readings)
    for a in acc.values():
        # A sum of finite values may overflow to inf (the API shows avg null); min/max may not.
        assert math.isfinite(a["min"]) and math.isfinite(a["max"]), a
    for d in stored:
        cache._member(d)
