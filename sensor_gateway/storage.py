"""MongoDB: connection, indexes, and the ingester's writes.

Everything here stays inside what MongoDB 4.4+ and FerretDB 1.24 both serve
(DESIGN.md, "Storage").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import bson
import pymongo
from bson.errors import BSONError
from pymongo import ASCENDING, DESCENDING, UpdateOne
from pymongo.database import Database
from pymongo.errors import (
    BulkWriteError,
    ConfigurationError,
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)
from pymongo.write_concern import WriteConcern

from sensor_gateway.config import Config

log = logging.getLogger("sensor_gateway.storage")

READINGS = "readings"
ROLLUPS = "rollups_minute"
REJECTED = "rejected"
DUPLICATE_KEY = 11000

# Any database error; :func:`classify` says what to do about one.
Unavailable = PyMongoError

# Server error codes, grouped by what the ingester does about them.
# Transient (hold the batch, retry): network, shutdown, elections, time limits.
TRANSIENT_CODES = frozenset(
    {6, 7, 50, 64, 89, 91, 112, 133, 134, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436}
)
# Permanent and global (no retry helps; a person must act): who we are, what we may do.
PERMANENT_CODES = frozenset({11, 13, 18, 8000})

TRANSIENT, PERMANENT, DOCUMENT = "transient", "permanent", "document"


class PermanentError(Exception):
    """The database refuses us as a whole (credentials, rights): stop, visibly."""


def classify(exc: BaseException) -> str:
    """``transient`` (wait and retry), ``permanent`` (stop: a person must act) or
    ``document`` (this write's documents are the problem; isolate them)."""
    if isinstance(exc, ConnectionFailure | WriteConcernError):
        return TRANSIENT
    if isinstance(exc, ConfigurationError):
        return PERMANENT
    if isinstance(exc, OperationFailure):
        code = exc.code or 0
        if code in PERMANENT_CODES:
            return PERMANENT
        if code in TRANSIENT_CODES or exc.has_error_label("RetryableWriteError"):
            return TRANSIENT
        return DOCUMENT
    if isinstance(exc, PyMongoError):
        return TRANSIENT
    # Anything else comes from encoding documents (bson errors, OverflowError, ...).
    return DOCUMENT


def connect(cfg: Config, **kwargs: Any) -> Database:
    m = cfg.mongodb
    opts: dict[str, Any] = {
        "tz_aware": True,
        "serverSelectionTimeoutMS": m.timeout_ms,
        "connectTimeoutMS": m.timeout_ms,
        "socketTimeoutMS": m.timeout_ms * 2,
        "appname": kwargs.pop("appname", "sensor-gateway"),
    }
    if m.username:
        opts["username"] = m.username
        opts["password"] = cfg.secret(m.password_file)
        # The gateway's user lives in its own database unless the URI says otherwise.
        if "authsource=" not in m.uri.lower():
            opts["authSource"] = m.database
    opts.update(kwargs)
    client: pymongo.MongoClient = pymongo.MongoClient(m.uri, **opts)
    # Journaled writes: an acknowledged MQTT message must survive a crash.
    return client.get_database(m.database, write_concern=WriteConcern(w=1, j=True))


def ping(db: Database) -> None:
    db.client.admin.command("ping")


def is_ferretdb(db: Database) -> bool:
    return "ferretdbVersion" in db.command("buildInfo")


def ensure_indexes(db: Database) -> None:
    if is_ferretdb(db):
        # FerretDB 1.24's SQLite backend pushes only `_id` equality down to SQLite:
        # queries never use secondary indexes, which still cost ~40% of insert
        # throughput (measured: 31k vs 18k docs/s). So none are made there.
        log.info("FerretDB: secondary indexes skipped (its SQLite backend does not use them)")
        return
    r = db[READINGS]
    r.create_index([("sensor_id", ASCENDING), ("ts", DESCENDING)], name="sensor_ts")
    r.create_index([("kind", ASCENDING), ("ts", DESCENDING)], name="kind_ts")
    r.create_index([("ts", DESCENDING)], name="ts")
    r.create_index([("value", ASCENDING)], name="value")
    db[ROLLUPS].create_index([("sensor_id", ASCENDING), ("minute", ASCENDING)], name="sensor_min")
    db[ROLLUPS].create_index([("kind", ASCENDING), ("minute", ASCENDING)], name="kind_min")
    db[REJECTED].create_index([("received_at", DESCENDING)], name="received_at")


def _raise_unless_document(write_error: dict[str, Any], exc: BulkWriteError) -> None:
    """A bulk write's error about one document stays with that document; any other
    (transient, permanent) is raised as the OperationFailure it stands for."""
    probe = OperationFailure(write_error.get("errmsg", ""), write_error.get("code"))
    if classify(probe) != DOCUMENT:
        raise probe from exc


def unencodable(doc: dict[str, Any]) -> str | None:
    """Why ``doc`` cannot be sent as BSON, or None if it can."""
    try:
        bson.encode(doc)
    except (BSONError, OverflowError, UnicodeError, TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class Inserted:
    new: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    # (document, reason) for each document the server (or BSON) refused.
    refused: list[tuple[dict[str, Any], str]] = field(default_factory=list)


def insert_readings(db: Database, docs: list[dict[str, Any]]) -> Inserted:
    """Insert unordered; a duplicate key is success, a refused document is reported.

    Raises for an error that is not about particular documents: a transient
    one (the caller holds the batch unacknowledged and retries) or a permanent
    one (see :func:`classify`).
    """
    out = Inserted()
    if not docs:
        return out
    try:
        db[READINGS].insert_many(docs, ordered=False)
    except BulkWriteError as exc:
        if exc.details.get("writeConcernErrors"):
            raise
        failed: dict[int, str] = {}
        for e in exc.details.get("writeErrors", []):
            code = e.get("code")
            if code == DUPLICATE_KEY:
                out.duplicates += 1
                failed[e["index"]] = ""
                continue
            _raise_unless_document(e, exc)
            failed[e["index"]] = f"MongoDB refused the reading: {e.get('errmsg', '')} (code {code})"
        for i, d in enumerate(docs):
            if i not in failed:
                out.new.append(d)
            elif failed[i]:
                out.refused.append((d, failed[i]))
        return out
    except Exception as exc:  # noqa: BLE001 - classified; re-raised unless per-document
        if classify(exc) != DOCUMENT:
            raise
        # One document cannot be encoded (or the server refused the whole write):
        # split it up so that only the documents at fault become rejects.
        return _insert_one_by_one(db, docs)
    out.new = docs
    return out


def _insert_one_by_one(db: Database, docs: list[dict[str, Any]]) -> Inserted:
    out = Inserted()
    for d in docs:
        reason = unencodable(d)
        if reason:
            out.refused.append((d, f"cannot be stored as BSON: {reason}"))
            continue
        try:
            db[READINGS].insert_one(d)
            out.new.append(d)
        except pymongo.errors.DuplicateKeyError:
            out.duplicates += 1
        except Exception as exc:  # noqa: BLE001 - classified below
            if classify(exc) != DOCUMENT:
                raise
            out.refused.append((d, f"MongoDB refused the reading: {exc}"))
    return out


def minute_of(ts: datetime) -> datetime:
    return ts.replace(second=0, microsecond=0)


RollupAcc = dict[tuple[str, datetime], dict[str, Any]]


def fold_rollups(acc: RollupAcc, docs: Iterable[dict[str, Any]]) -> RollupAcc:
    """Add readings into per-sensor, per-minute count/sum/min/max, in memory."""
    for d in docs:
        key = (d["sensor_id"], minute_of(d["ts"]))
        a = acc.get(key)
        v = d["value"]
        if a is None:
            acc[key] = {"kind": d["kind"], "count": 1, "sum": v, "min": v, "max": v}
        else:
            a["count"] += 1
            a["sum"] += v
            if v < a["min"]:
                a["min"] = v
            if v > a["max"]:
                a["max"] = v
    return acc


def write_rollups(db: Database, acc: RollupAcc) -> None:
    """Upsert folded rollups ($inc, $min, $max): one operation per sensor-minute."""
    if not acc:
        return
    ops = [
        UpdateOne(
            {"_id": f"{sensor_id}|{minute.strftime('%Y-%m-%dT%H:%M')}"},
            {
                "$inc": {"count": a["count"], "sum": a["sum"]},
                "$min": {"min": a["min"]},
                "$max": {"max": a["max"]},
                "$setOnInsert": {"sensor_id": sensor_id, "kind": a["kind"], "minute": minute},
            },
            upsert=True,
        )
        for (sensor_id, minute), a in acc.items()
    ]
    db[ROLLUPS].bulk_write(ops, ordered=False)


def rebuild_rollups(db: Database, since: datetime, chunk: int = 5000) -> int:
    """Recompute rollups from readings for every minute from ``since`` on.

    For repairs after a crash; run it with the ingester stopped, or its upserts
    in the meantime are counted twice. Returns the readings folded.
    """
    start = minute_of(since)
    db[ROLLUPS].delete_many({"minute": {"$gte": start}})
    acc: RollupAcc = {}
    n = 0
    cursor = db[READINGS].find(
        {"ts": {"$gte": start}}, {"sensor_id": 1, "kind": 1, "value": 1, "ts": 1}
    )
    for doc in cursor:
        fold_rollups(acc, (doc,))
        n += 1
        if n % chunk == 0:
            write_rollups(db, acc)
            acc = {}
    write_rollups(db, acc)
    return n


def insert_rejects(db: Database, rejects: list[dict[str, Any]]) -> list[tuple[dict, str]]:
    """Store rejects; returns those the server refused, with why (rejects are built
    to be storable, so that list is empty unless the server itself is failing).

    A duplicate key is success: insert_many gives each document its ``_id``, so a
    retried batch of rejects is recognised and stored once.
    """
    if not rejects:
        return []
    try:
        db[REJECTED].insert_many(rejects, ordered=False)
    except BulkWriteError as exc:
        if exc.details.get("writeConcernErrors"):
            raise
        unstored = []
        for e in exc.details.get("writeErrors", []):
            if e.get("code") == DUPLICATE_KEY:
                continue
            _raise_unless_document(e, exc)
            unstored.append((rejects[e["index"]], f"{e.get('errmsg', '')} (code {e.get('code')})"))
        return unstored
    return []


# Ties on ts are broken by _id, as Redis breaks score ties by member (which starts with the id).
NEWEST_FIRST = [("ts", DESCENDING), ("_id", DESCENDING)]


def latest_for_sensor(db: Database, sensor_id: str, n: int) -> list[dict[str, Any]]:
    return list(db[READINGS].find({"sensor_id": sensor_id}).sort(NEWEST_FIRST).limit(n))


def latest_overall(db: Database, n: int) -> list[dict[str, Any]]:
    return list(db[READINGS].find().sort(NEWEST_FIRST).limit(n))


def sensor_ids(db: Database) -> list[str]:
    return sorted(db[READINGS].distinct("sensor_id"))


def apply_retention(db: Database, days: int, now: datetime | None = None) -> int:
    """Delete readings, rollups and rejects older than ``days``; 0 days keeps all."""
    if days <= 0:
        return 0
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    n = db[READINGS].delete_many({"ts": {"$lt": cutoff}}).deleted_count
    db[ROLLUPS].delete_many({"minute": {"$lt": minute_of(cutoff)}})
    db[REJECTED].delete_many({"received_at": {"$lt": cutoff}})
    return n
