"""`sensor-gateway migrate`: layout 1 (one document per reading in ``readings``,
per-minute ``rollups_minute``) into layout 2 (:mod:`sensor_gateway.layout`).

Idempotent and resumable: every old reading is written with its old `_id` as
its key, so the writer recognises one written before (an interrupted run is
simply run again); progress is kept in ``meta.migration`` so that a resumed run
skips what is done. When every reading is moved, ``readings`` and
``rollups_minute`` are renamed ``readings_v1`` and ``rollups_minute_v1`` (or
``…_v1_2`` if those exist; drop them once satisfied) and the database is
marked layout 2. Run it with the ingester stopped: the writer must be the only one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pymongo.database import Database

from sensor_gateway import layout
from sensor_gateway.writer import Writer

log = logging.getLogger("sensor_gateway.migrate")

CHUNK = 5000


def pending(db: Database) -> bool:
    meta = db[layout.META].find_one({"_id": "layout"})
    if meta is not None and meta.get("version") == layout.VERSION:
        return False
    return db[layout.FLAT_READINGS].find_one({}, {"_id": 1}) is not None


def _reading(doc: dict[str, Any]) -> dict[str, Any] | None:
    """An old reading document as the writer takes it (None if it is not one)."""
    try:
        r = {
            "sensor_id": str(doc["sensor_id"]),
            "kind": str(doc["kind"]),
            "value": float(doc["value"]),
            "ts": doc["ts"],
            "key": str(doc["_id"]),  # the same key the ingester gives it
        }
    except (KeyError, TypeError, ValueError):
        return None
    for k in ("unit", "msg_id"):
        if doc.get(k):
            r[k] = str(doc[k])
    return r


def run(db: Database, progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Move every reading; returns counts. ``progress(done, total)`` is called per chunk."""
    old = db[layout.FLAT_READINGS]
    total = old.estimated_document_count()
    state = db[layout.META].find_one({"_id": "migration"}) or {}
    done = int(state.get("done", 0))
    writer = Writer(db)
    moved = skipped = 0
    seen = 0
    chunk: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal moved, chunk
        w = writer.write(chunk)
        moved += len(w.new)
        chunk = []
        db[layout.META].update_one({"_id": "migration"}, {"$set": {"done": seen}}, upsert=True)
        if progress:
            progress(seen, total)

    # Natural order is stable while nothing writes; a resumed run skips what is
    # done, and anything seen twice is recognised by its key anyway.
    for doc in old.find({}, {"received_at": 0, "topic": 0}).batch_size(CHUNK):
        seen += 1
        if seen <= done:
            continue
        r = _reading(doc)
        if r is None:
            skipped += 1
            continue
        chunk.append(r)
        if len(chunk) >= CHUNK:
            flush()
    flush()
    names = set(db.list_collection_names())
    for name in (layout.FLAT_READINGS, layout.FLAT_ROLLUPS):
        if name in names:
            # Never over an older copy (FerretDB has no dropTarget either).
            target = next(
                t
                for i in range(1, 1000)
                if (t := f"{name}_v1" + (f"_{i}" if i > 1 else "")) not in names
            )
            db[name].rename(target)
    db[layout.META].update_one(
        {"_id": "layout"}, {"$set": {"version": layout.VERSION}}, upsert=True
    )
    db[layout.META].delete_one({"_id": "migration"})
    log.info("migrated %d readings (%d not readings, left in readings_v1)", moved, skipped)
    return {"seen": seen, "moved": moved, "skipped": skipped}
