"""The reading contract: one MQTT message in, a reading document or a reject out.

See DESIGN.md, "The reading contract". :func:`parse` never raises for bad
input; it returns a :class:`Reject` naming the problem instead.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

SENSOR_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
KIND_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
STATUS_VALUES = range(0, 7)

_decoder = msgspec.json.Decoder()


@dataclass(slots=True)
class Reject:
    reason: str


@dataclass(slots=True)
class Limits:
    max_payload_bytes: int = 16384
    max_future_skew_s: float = 300.0


DEFAULT_LIMITS = Limits()


def _number(value: Any, field: str) -> float | Reject:
    if isinstance(value, bool):
        return Reject(f"{field} must be a number, got a boolean")
    if isinstance(value, int | float):
        f = float(value)
    elif isinstance(value, str):
        try:
            f = float(value.strip())
        except ValueError:
            return Reject(f"{field} must be a number or a numeric string, got {value[:40]!r}")
    else:
        return Reject(f"{field} must be a number, got {type(value).__name__}")
    if not math.isfinite(f):
        return Reject(f"{field} must be finite, got {value!r}")
    return f


def parse_time(text: Any, field: str = "timestamp") -> datetime | Reject:
    """ISO 8601 → aware UTC datetime (naive times are taken as UTC)."""
    if not isinstance(text, str):
        return Reject(f"{field} must be an ISO 8601 string, got {type(text).__name__}")
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        return Reject(f"{field} is not ISO 8601: {text[:40]!r}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    # MongoDB dates have millisecond precision; truncate so reads equal writes.
    dt = dt.astimezone(UTC)
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


def parse(
    topic: str, payload: bytes, now: datetime, limits: Limits | None = None
) -> dict[str, Any] | Reject:
    """Validate one message. ``now`` is the time of receipt (aware, UTC)."""
    limits = limits or DEFAULT_LIMITS
    if len(payload) > limits.max_payload_bytes:
        return Reject(f"payload is {len(payload)} bytes, over the {limits.max_payload_bytes} limit")
    try:
        obj = _decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return Reject(f"not JSON: {exc}")
    if not isinstance(obj, dict):
        return Reject(f"payload must be a JSON object, got {type(obj).__name__}")

    levels = topic.split("/")
    kind = obj.get("kind", levels[1] if len(levels) > 1 else None)
    if kind is None:
        return Reject("no kind: topic has no second level and payload has no 'kind'")
    if not isinstance(kind, str) or not KIND_RE.match(kind):
        return Reject(f"kind must be 1-64 characters [A-Za-z0-9_.:-], got {kind!r}")

    if "sensor_id" in obj:
        sensor_id = obj["sensor_id"]
        if not isinstance(sensor_id, str) or not SENSOR_ID_RE.match(sensor_id):
            return Reject(f"sensor_id must be 1-64 characters [A-Za-z0-9_.:-], got {sensor_id!r}")
    elif len(levels) > 2:
        sensor_id = levels[2]
        if not SENSOR_ID_RE.match(sensor_id):
            return Reject(f"topic level sensor_id {sensor_id!r} is not a valid sensor id")
    else:
        sensor_id = kind

    if "value" in obj:
        value = _number(obj["value"], "value")
    elif "status" in obj:
        raw = obj["status"]
        if isinstance(raw, bool) or not isinstance(raw, int) or raw not in STATUS_VALUES:
            return Reject(f"status must be an integer 0-6, got {raw!r}")
        value = float(raw)
    else:
        return Reject("no 'value' (or 'status') field")
    if isinstance(value, Reject):
        return value
    if kind == "status" and (not value.is_integer() or int(value) not in STATUS_VALUES):
        return Reject(f"a status value must be an integer 0-6, got {value!r}")

    msg_id = obj.get("msg_id")
    if msg_id is not None and (not isinstance(msg_id, str) or not 0 < len(msg_id) <= 64):
        return Reject(f"msg_id must be a string of 1-64 characters, got {str(msg_id)[:80]!r}")

    unit = obj.get("unit")
    if unit is not None and (not isinstance(unit, str) or len(unit) > 32):
        return Reject(f"unit must be a string of at most 32 characters, got {str(unit)[:40]!r}")

    doc: dict[str, Any] = {"sensor_id": sensor_id, "kind": kind, "value": value, "topic": topic}
    if "timestamp" in obj and obj["timestamp"] is not None:
        ts = parse_time(obj["timestamp"])
        if isinstance(ts, Reject):
            return ts
        if ts - now > timedelta(seconds=limits.max_future_skew_s):
            return Reject(
                f"timestamp {obj['timestamp']!r} is more than {limits.max_future_skew_s:g}s "
                "in the future"
            )
        doc["ts"] = ts
    else:
        doc["ts"] = now.replace(microsecond=now.microsecond // 1000 * 1000)
        doc["ts_from_receipt"] = True
    if unit:
        doc["unit"] = unit

    # The dedupe key: a redelivered message maps to the same _id.
    if msg_id is not None:
        doc["_id"] = msg_id
    elif "ts_from_receipt" not in doc:
        doc["_id"] = hashlib.blake2b(topic.encode() + b"\0" + payload, digest_size=12).hexdigest()
    # Neither: MongoDB assigns an ObjectId; such readings are stored at least once.
    doc["received_at"] = now
    return doc
