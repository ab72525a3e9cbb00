"""The read side: readings by filter with keyset paging, status counts, averages.

Every filter is built here from typed values (strings checked against the
sensor-id pattern, aware datetimes, finite floats), never from request
dictionaries, so no query operator can reach MongoDB from outside.

Only what MongoDB 4.4+ and FerretDB 1.24 both serve is used (DESIGN.md,
"Storage"): find/sort/limit, and aggregate with ``$match`` + ``$group``
(``$sum``). Averages add up the per-minute rollups in Python, which avoids
``$avg`` and stays correct on FerretDB.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING
from pymongo.database import Database

from sensor_gateway import storage
from sensor_gateway.config import parse_window
from sensor_gateway.model import iso, public

STATUSES = tuple(str(s) for s in range(7))


class BadCursor(ValueError):
    """The ``cursor`` parameter is not one this API issued."""


# -- cursors -------------------------------------------------------------------------


def encode_cursor(ts: datetime, _id: Any, order: str) -> str:
    """Opaque keyset position: the (ts, _id) of the last reading of a page."""
    ident: Any = {"o": str(_id)} if isinstance(_id, ObjectId) else _id
    raw = json.dumps(
        {"t": int(ts.timestamp() * 1000), "i": ident, "d": order}, separators=(",", ":")
    )
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(text: str, order: str) -> tuple[datetime, Any]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        obj = json.loads(raw)
        ms, ident, d = obj["t"], obj["i"], obj["d"]
        if not isinstance(ms, int) or isinstance(ms, bool):
            raise TypeError("t")
        if isinstance(ident, dict):
            ident = ObjectId(ident["o"])
        elif not isinstance(ident, str):
            raise TypeError("i")
        ts = datetime.fromtimestamp(ms / 1000, UTC)
    except (binascii.Error, ValueError, TypeError, KeyError, OverflowError, OSError) as exc:
        raise BadCursor("not a cursor issued by this API") from exc
    if d != order:
        raise BadCursor(f"cursor was issued for order={d}, not order={order}")
    return ts, ident


# -- readings ------------------------------------------------------------------------


@dataclass
class ReadingQuery:
    sensor_id: str | None = None
    kind: str | None = None
    # Compatibility ``Sensor_Name``: matches a sensor id or a kind.
    name: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    end_inclusive: bool = False
    min_value: float | None = None
    max_value: float | None = None
    limit: int = 100
    cursor: str | None = None
    order: str = "asc"  # by (ts, _id)

    def filter(self) -> dict[str, Any]:
        f: dict[str, Any] = {}
        if self.sensor_id is not None:
            f["sensor_id"] = str(self.sensor_id)
        if self.kind is not None:
            f["kind"] = str(self.kind)
        if self.name is not None:
            f["$or"] = [{"sensor_id": str(self.name)}, {"kind": str(self.name)}]
        ts: dict[str, Any] = {}
        if self.start is not None:
            ts["$gte"] = self.start
        if self.end is not None:
            ts["$lte" if self.end_inclusive else "$lt"] = self.end
        if ts:
            f["ts"] = ts
        value: dict[str, Any] = {}
        if self.min_value is not None:
            value["$gte"] = float(self.min_value)
        if self.max_value is not None:
            value["$lte"] = float(self.max_value)
        if value:
            f["value"] = value
        if self.cursor:
            after_ts, after_id = decode_cursor(self.cursor, self.order)
            op = "$gt" if self.order == "asc" else "$lt"
            keyset = {"$or": [{"ts": {op: after_ts}}, {"ts": after_ts, "_id": {op: after_id}}]}
            f = {"$and": [f, keyset]} if f else keyset
        return f


def find_readings(db: Database, q: ReadingQuery) -> tuple[list[dict[str, Any]], str | None]:
    """One page of readings in (ts, _id) order and the cursor of the next page."""
    direction = ASCENDING if q.order == "asc" else DESCENDING
    docs = list(
        db[storage.READINGS]
        .find(q.filter(), {"received_at": 0, "topic": 0, "ts_from_receipt": 0})
        .sort([("ts", direction), ("_id", direction)])
        .limit(q.limit + 1)
    )
    next_cursor = None
    if len(docs) > q.limit:
        docs = docs[: q.limit]
        last = docs[-1]
        next_cursor = encode_cursor(last["ts"], last["_id"], q.order)
    return [public(d) for d in docs], next_cursor


def latest(
    db: Database, n: int, sensor_id: str | None = None, kind: str | None = None
) -> list[dict[str, Any]]:
    f: dict[str, Any] = {}
    if sensor_id is not None:
        f["sensor_id"] = str(sensor_id)
    if kind is not None:
        f["kind"] = str(kind)
    cur = db[storage.READINGS].find(f).sort([("ts", DESCENDING), ("_id", DESCENDING)]).limit(n)
    return [public(d) for d in cur]


def sensor_exists(db: Database, sensor_id: str) -> bool:
    return db[storage.READINGS].find_one({"sensor_id": str(sensor_id)}, {"_id": 1}) is not None


def kind_exists(db: Database, kind: str) -> bool:
    return db[storage.READINGS].find_one({"kind": str(kind)}, {"_id": 1}) is not None


# -- status counts -------------------------------------------------------------------


def status_counts(
    db: Database,
    start: datetime | None,
    end: datetime | None,
    sensor_id: str | None = None,
) -> dict[str, int]:
    """Count of each status 0–6 with ``start <= ts <= end``; zeros included."""
    match: dict[str, Any] = {"kind": "status"}
    if sensor_id is not None:
        match["sensor_id"] = str(sensor_id)
    ts: dict[str, Any] = {}
    if start is not None:
        ts["$gte"] = start
    if end is not None:
        ts["$lte"] = end
    if ts:
        match["ts"] = ts
    counts = dict.fromkeys(STATUSES, 0)
    pipeline = [{"$match": match}, {"$group": {"_id": "$value", "n": {"$sum": 1}}}]
    for row in db[storage.READINGS].aggregate(pipeline):
        v = row["_id"]
        if isinstance(v, int | float) and float(v).is_integer() and str(int(v)) in counts:
            counts[str(int(v))] += int(row["n"])
    return counts


# -- rolling averages ----------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    label: str
    seconds: int

    @property
    def column(self) -> str:
        """Seed-compatible column name: 1m → avg_1min, 30s → avg_30s, 1h → avg_1h."""
        label = self.label[:-1] + "min" if self.label.endswith("m") else self.label
        return f"avg_{label}"

    def since(self, now: datetime) -> datetime:
        """Start of the window: whole minutes, the current (partial) one included."""
        return storage.minute_of(now - timedelta(seconds=self.seconds))


def parse_windows(labels: Iterable[str]) -> list[Window]:
    """Raises ConfigError (a ValueError) naming the bad label."""
    out: list[Window] = []
    for label in labels:
        label = label.strip()
        w = Window(label, parse_window(label))
        if w not in out:
            out.append(w)
    return out


def _empty() -> dict[str, Any]:
    return {"count": 0, "sum": 0.0, "min": None, "max": None}


def _fold(acc: dict[str, Any], doc: dict[str, Any]) -> None:
    acc["count"] += int(doc.get("count", 0))
    acc["sum"] += float(doc.get("sum", 0.0))
    for k, pick in (("min", min), ("max", max)):
        v = doc.get(k)
        if v is not None:
            acc[k] = v if acc[k] is None else pick(acc[k], v)


def _finish(acc: dict[str, Any], since: datetime) -> dict[str, Any]:
    n = acc["count"]
    return {
        "since": iso(since),
        "count": n,
        "avg": (acc["sum"] / n) if n else None,
        "min": acc["min"],
        "max": acc["max"],
    }


def averages(
    db: Database,
    windows: list[Window],
    sensor_id: str | None = None,
    kind: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Averages over each window from ``rollups_minute``: sum(sum) / sum(count).

    The ingester upserts the current minute's rollup with every batch, so the
    current minute is included up to the last stored batch.
    """
    now = now or datetime.now(UTC)
    since = {w.label: w.since(now) for w in windows}
    f: dict[str, Any] = {"minute": {"$gte": min(since.values())}}
    if sensor_id is not None:
        f["sensor_id"] = str(sensor_id)
    if kind is not None:
        f["kind"] = str(kind)
    overall = {w.label: _empty() for w in windows}
    per_sensor: dict[str, dict[str, Any]] = {}
    projection = {"sensor_id": 1, "kind": 1, "minute": 1, "count": 1, "sum": 1, "min": 1, "max": 1}
    for doc in db[storage.ROLLUPS].find(f, projection):
        minute = doc["minute"]
        if minute.tzinfo is None:
            minute = minute.replace(tzinfo=UTC)
        s = per_sensor.setdefault(
            doc["sensor_id"],
            {"kind": doc.get("kind"), "acc": {w.label: _empty() for w in windows}},
        )
        for w in windows:
            if minute >= since[w.label]:
                _fold(overall[w.label], doc)
                _fold(s["acc"][w.label], doc)
    return {
        "generated_at": iso(now),
        "windows": [w.label for w in windows],
        "sensor_id": sensor_id,
        "kind": kind,
        "overall": {w.label: _finish(overall[w.label], since[w.label]) for w in windows},
        "sensors": {
            sid: {
                "kind": s["kind"],
                "windows": {w.label: _finish(s["acc"][w.label], since[w.label]) for w in windows},
            }
            for sid, s in sorted(per_sensor.items())
        },
    }
