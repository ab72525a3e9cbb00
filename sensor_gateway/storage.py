"""MongoDB: connection, error classification, start-up checks, rejects.

The layout of readings is in :mod:`sensor_gateway.layout`, its writes in
:mod:`sensor_gateway.writer`, its reads in :mod:`sensor_gateway.queries`.
Everything stays inside what MongoDB 4.4+ and FerretDB 1.24 both serve
(docs/ARCHITECTURE.md, "Storage layout").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import pymongo
from pymongo import DESCENDING, ReadPreference
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

from sensor_gateway import ferretdb, layout
from sensor_gateway.config import Config

log = logging.getLogger("sensor_gateway.storage")

REJECTED = layout.REJECTED
DUPLICATE_KEY = 11000

# Any database error, down or refused alike; :func:`classify` says which and what to do.
DatabaseError = PyMongoError

# Server error codes, grouped by what the ingester does about them.
# Transient (hold the batch, retry): network, shutdown, elections (a replica set's
# "not primary" and "stepped down": 189, 10058, 10107, 11602, 13435, 13436), time
# limits, and a write concern not met in time (64).
TRANSIENT_CODES = frozenset(
    {
        6, 7, 50, 64, 89, 91, 112, 133, 134, 189, 262, 9001,
        10058, 10107, 11600, 11602, 13435, 13436,
    }
)  # fmt: skip
# Permanent and global (no retry helps; a person must act): who we are, what we may
# do (11, 13, 18, 8000), and a write concern this replica set can never satisfy: an
# unknown mode (79), more members than it has (100).
PERMANENT_CODES = frozenset({11, 13, 18, 8000, 79, 100})

TRANSIENT, PERMANENT, DOCUMENT = "transient", "permanent", "document"


class PermanentError(Exception):
    """The database refuses us as a whole (credentials, rights): stop, visibly."""


class LayoutError(PermanentError):
    """The database holds readings in a layout this version does not read."""


def classify(exc: BaseException) -> str:
    """``transient`` (wait and retry), ``permanent`` (stop: a person must act) or
    ``document`` (this write's documents are the problem; isolate them)."""
    # ConnectionFailure includes pymongo's NotPrimaryError, raised for a "not primary"
    # reply during an election, and ServerSelectionTimeoutError while there is none.
    if isinstance(exc, ConnectionFailure):
        return TRANSIENT
    if isinstance(exc, ConfigurationError):
        return PERMANENT
    if isinstance(exc, BulkWriteError):
        return _classify_bulk(exc)
    if isinstance(exc, WriteConcernError):
        # The write is in on the primary, not yet acknowledged as configured: held and
        # retried (the retry finds it there, see writer.py), unless it never can be.
        return PERMANENT if exc.code in PERMANENT_CODES else TRANSIENT
    if isinstance(exc, OperationFailure):
        code = exc.code or 0
        if code in PERMANENT_CODES or _no_retryable_writes(exc):
            return PERMANENT
        if code in TRANSIENT_CODES or exc.has_error_label("RetryableWriteError"):
            return TRANSIENT
        return DOCUMENT
    if isinstance(exc, PyMongoError):
        return TRANSIENT
    # Anything else comes from encoding documents (bson errors, OverflowError, ...).
    return DOCUMENT


def _classify_bulk(exc: BulkWriteError) -> str:
    """A bulk write's errors: a write concern error is about the whole command (its
    writes are in on the primary but not acknowledged as configured), and so is a
    write error that is not about its document (a time limit, an election)."""
    wces = exc.details.get("writeConcernErrors") or []
    if wces:
        return PERMANENT if any(e.get("code") in PERMANENT_CODES for e in wces) else TRANSIENT
    kinds = {classify(error_of(e)) for e in exc.details.get("writeErrors") or []}
    for kind in (PERMANENT, TRANSIENT):
        if kind in kinds:
            return kind
    return DOCUMENT


def _no_retryable_writes(exc: OperationFailure) -> bool:
    """A server that takes sessions but not retryable writes (code 20, "Transaction
    numbers are only allowed on a replica set member or mongos"; pymongo's rewording
    says to add retryWrites=false to the URI): every write fails alike."""
    text = str(exc)
    return exc.code == 20 and ("Transaction numbers" in text or "retryable writes" in text)


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
    # An acknowledged MQTT message must survive a crash (journal) and a failover
    # (write_concern "majority"; see config.MongoConfig). Reads go to the primary at
    # the server's default read concern ("local"): the writer decides what is new
    # from what it reads, so it must see its own writes, including one whose write
    # concern timed out; the config refuses a URI that says otherwise.
    return client.get_database(
        m.database,
        write_concern=WriteConcern(w=m.write_concern, j=m.journal, wtimeout=m.wtimeout),
        read_preference=ReadPreference.PRIMARY,
    )


def ping(db: Database) -> None:
    db.client.admin.command("ping")


def is_ferretdb(db: Database) -> bool:
    return "ferretdbVersion" in db.command("buildInfo")


def check_write_concern(db: Database, cfg: Config) -> None:
    """A write concern of several members needs a replica set: a standalone mongod
    refuses every such write (a refusal that would look like one about documents),
    and FerretDB accepts it without waiting for anyone. "majority" fits both."""
    w = cfg.mongodb.write_concern
    if not (isinstance(w, int) and w > 1):
        return
    hello = db.client.admin.command("hello")
    # A mongos ("isdbgrid") hands the write concern on to its shards' replica sets.
    if "setName" not in hello and hello.get("msg") != "isdbgrid":
        raise PermanentError(
            f"mongodb.write_concern = {w} needs a replica set of {w} members or more; "
            'the server is not a replica set member (use "majority" or 1)'
        )


def ensure_indexes(db: Database) -> None:
    """Readings are fetched by `_id` only (see layout.py); rejects by time."""
    db[REJECTED].create_index([("received_at", DESCENDING)], name="received_at")


def check_layout(db: Database) -> None:
    """Refuse a database written by the one-document-per-reading layout (version 1)
    until `sensor-gateway migrate` has moved it; mark a new database as ours."""
    meta = db[layout.META].find_one({"_id": "layout"})
    if meta is not None:
        if meta.get("version") != layout.VERSION:
            raise LayoutError(
                f"the database {db.name!r} has storage layout {meta.get('version')}; "
                f"this sensor-gateway reads layout {layout.VERSION} only"
            )
        return
    if db[layout.FLAT_READINGS].find_one({}, {"_id": 1}) is not None:
        raise LayoutError(
            f"the database {db.name!r} holds readings in the old one-document-per-reading "
            "layout; stop sensor-ingest and run `sensor-gateway migrate` to move them "
            f"into layout {layout.VERSION}"
        )
    db[layout.META].update_one(
        {"_id": "layout"}, {"$setOnInsert": {"version": layout.VERSION}}, upsert=True
    )


def prepare(db: Database, cfg: Config) -> None:
    """At start-up: the layout is ours, rejects are indexed, and on FerretDB every
    collection read by `_id` has the SQL index that makes such reads fast."""
    check_write_concern(db, cfg)
    check_layout(db)
    ensure_indexes(db)
    if is_ferretdb(db):
        # The index goes on FerretDB's table of each collection, so they must exist.
        have = set(db.list_collection_names())
        for coll in layout.BY_ID:
            if coll not in have:
                db.create_collection(coll)
        ferretdb.ensure_id_indexes(
            cfg.mongodb.ferretdb_sqlite_dir, db.name, layout.BY_ID, others_may=True
        )


def error_of(write_error: dict[str, Any]) -> OperationFailure:
    """One error of a bulk write, as the OperationFailure it stands for."""
    return OperationFailure(write_error.get("errmsg", ""), write_error.get("code"))


def _raise_unless_document(write_error: dict[str, Any], exc: BulkWriteError) -> None:
    """A bulk write's error about one document stays with that document; any other
    (transient, permanent) is raised as the OperationFailure it stands for."""
    probe = error_of(write_error)
    if classify(probe) != DOCUMENT:
        raise probe from exc


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


def scan_readings(db: Database) -> Iterable[dict[str, Any]]:
    """Every stored reading, bucket by bucket: a full scan, for the counts of
    tests, benchmarks and the soak; nothing in the gateway's daemons calls it."""
    for doc in db[layout.SAMPLES].find():
        for smp in layout.samples_of(doc):
            yield smp.as_doc()


def count_readings(db: Database) -> int:
    return sum(len(d.get("t") or ()) for d in db[layout.SAMPLES].find({}, {"t": 1}))
