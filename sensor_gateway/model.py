"""How a stored reading is shown outside: JSON-ready, ISO 8601 UTC times."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def iso(dt: datetime) -> str:
    """UTC ISO 8601 with a ``Z``: milliseconds, or microseconds when the time has them
    (the precision a sensor sent is kept; clients of millisecond times see no change)."""
    # Naive is UTC (as pymongo returns it unless tz_aware); an aware UTC time
    # needs no conversion, which costs more than the formatting.
    if dt.tzinfo is not None and dt.utcoffset():
        dt = dt.astimezone(UTC)
    spec = "milliseconds" if dt.microsecond % 1000 == 0 else "microseconds"
    return dt.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """A reading document as the API and the live channel show it."""
    out: dict[str, Any] = {
        "id": str(doc["_id"]),
        "sensor_id": doc["sensor_id"],
        "kind": doc["kind"],
        "value": doc["value"],
        "timestamp": iso(doc["ts"]),
    }
    if doc.get("unit"):
        out["unit"] = doc["unit"]
    # The device's own id for it; not unique across devices (``id`` is).
    if doc.get("msg_id"):
        out["msg_id"] = doc["msg_id"]
    return out
