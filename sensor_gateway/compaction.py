"""Settled hours packed into one document per sensor (``packs``), for reads.

At 1 Hz a sensor's hour spans about 120 ``samples`` documents, and FerretDB's
cost is per document read: a range or value query over settled hours reads
each hour's pack instead, one document holding the hour's readings in one
string (:func:`layout.pack_samples`).

A pack is a copy; the buckets stay, and stay the truth. Reads use a pack only
while it holds exactly what the hour's summaries count, minute by minute
(:func:`layout.pack_holds`): a reading written later for a packed hour makes
reads use the buckets again. Nothing about exactly-once changes: a pack is
built from buckets whose summaries agree with them, or not at all.

Ingest worker 0 packs, in a thread of its own, the hours that ended at least
``layout.PACK_SETTLE_US`` ago, from where it stopped (``meta`` ``compaction``).
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from pymongo.database import Database

from sensor_gateway import layout, queries
from sensor_gateway.config import Config
from sensor_gateway.periodic import Periodic

log = logging.getLogger("sensor_gateway.compaction")

INTERVAL_S = 300.0


def pack_hour(db: Database, sensor_id: str, hour: int) -> bool:
    """Pack one sensor's hour (every lane's readings); False when there is
    nothing to pack or its buckets and summaries disagree (a write in flight)."""
    r = queries.Reader(db)
    hid = layout.sensor_hour_id(sensor_id, hour)
    m = layout.summaries(r.get(layout.HOURS, hid), "m")
    if not m:
        return False
    ids = [
        bid
        for mi, s in m.items()
        for bid in layout.segment_ids(sensor_id, hour + int(mi) * layout.US_MINUTE, s)
    ]
    r.prefetch((layout.SAMPLES, bid) for bid in ids)
    samples = queries.minute_samples(r, ids)
    counts: dict[str, int] = {}
    for smp in samples:
        mi = layout.minute_index(smp.us)
        counts[mi] = counts.get(mi, 0) + 1
    if counts != layout.minute_counts(m):
        return False
    samples.sort(key=layout.Sample.order_key)
    doc = {
        "s": sensor_id,
        "b": hour,
        "mn": counts,
        "d": layout.pack_samples(samples, hour),
    }
    db[layout.PACKS].replace_one({"_id": hid}, doc, upsert=True)
    return True


def compact(db: Database, now_us: int, stop: threading.Event | None = None) -> int:
    """Pack every sensor's hours ended by ``now_us - PACK_SETTLE_US``, from where
    the last run stopped; returns how many packs were written."""
    meta = db[layout.META].find_one({"_id": "compaction"}) or {}
    hour = meta.get("next")
    if hour is None:  # the first run: from the first hour with readings
        sensors = queries.Reader(db, memo=False).sensors().values()
        if not sensors:
            return 0
        hour = min(s.get("first", now_us) for s in sensors)
    end = layout.floor(now_us - layout.PACK_SETTLE_US, layout.US_HOUR) - layout.US_HOUR
    packed = 0
    r = queries.Reader(db, memo=False)
    while hour <= end and not (stop and stop.is_set()):
        day = layout.floor(hour, layout.US_DAY)
        # A day's summary says which sensors have readings that day (and an hour's,
        # that hour): a month without readings costs a document a day.
        settled_day = day + layout.US_DAY <= end + layout.US_HOUR
        if settled_day and not layout.summaries(r.get(layout.HOURS, layout.all_day_id(day)), "by"):
            hour = day + layout.US_DAY
        else:
            present = layout.summaries(r.get(layout.HOURS, layout.all_hour_id(hour)), "by")
            for name in present:
                packed += pack_hour(db, layout.sensor_of(name), hour)
            hour += layout.US_HOUR
        db[layout.META].update_one({"_id": "compaction"}, {"$set": {"next": hour}}, upsert=True)
    return packed


def compactor(cfg: Config, stop: threading.Event) -> Periodic:
    """:func:`compact` every INTERVAL_S."""

    def work(db: Database) -> None:
        n = compact(db, layout.to_us(datetime.now(UTC)), stop)
        if n:
            log.info("compaction: packed %d sensor-hours", n)

    return Periodic(cfg, stop, "compaction", INTERVAL_S, work)
