"""Retention per tier, in a thread of its own (never on the ingest path).

- raw tier (``ingest.retention_days``): minute buckets, their hourly packs and
  every-sensor minute summaries;
- summary tier (``ingest.summary_retention_days``, 0 = forever): per-sensor and
  every-sensor hour summaries and day summaries.
Documents are deleted by their computed `_id`, an hour at a time from where
the last sweep stopped (``meta.retention``), so a sweep costs what it
deletes, never a scan of the history.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pymongo.database import Database

from sensor_gateway import layout, queries
from sensor_gateway.config import Config
from sensor_gateway.periodic import Periodic

log = logging.getLogger("sensor_gateway.retention")


def _sensors(db: Database) -> list[dict[str, Any]]:
    # One document per sensor (and ingest lane): its cost is the number of
    # sensors, not of readings.
    return list(queries.Reader(db, memo=False).sensors().values())


def _all_lanes(db: Database, ids: list[str]) -> list[str]:
    """The same documents in every ingest worker's lane (layout.in_lane)."""
    return [layout.in_lane(i, lane) for lane in range(queries.known_lanes(db)) for i in ids]


def _delete(db: Database, coll: str, ids: list[str]) -> int:
    # One delete by `_id` each: the lookup FerretDB serves from an index ($in it scans).
    return sum(db[coll].delete_one({"_id": i}).deleted_count for i in ids)


def _sweep_hours(
    db: Database,
    tier: str,
    cutoff_us: int,
    delete_hour: Callable[[int, list[dict[str, Any]]], int],
    stop: threading.Event | None,
) -> int:
    """Call ``delete_hour(hour, sensors with readings then)`` for every hour ending
    by ``cutoff_us`` from where this tier's last sweep stopped (``meta.retention``)."""
    meta = db[layout.META].find_one({"_id": "retention"}) or {}
    sensors = _sensors(db)
    if not sensors:
        return 0
    hour = meta.get(tier, min(s.get("first", cutoff_us) for s in sensors))
    end = layout.floor(cutoff_us, layout.US_HOUR)
    deleted = 0
    while hour < end and not (stop and stop.is_set()):
        present = [s for s in sensors if s.get("first", end) <= hour <= s.get("last", -1)]
        deleted += delete_hour(hour, present)
        hour += layout.US_HOUR
        db[layout.META].update_one({"_id": "retention"}, {"$set": {tier: hour}}, upsert=True)
    return deleted


def sweep_raw(db: Database, cutoff_us: int, stop: threading.Event | None = None) -> int:
    """Delete minute buckets and minute summaries of every hour ending by ``cutoff_us``."""

    def delete_hour(hour: int, sensors: list[dict[str, Any]]) -> int:
        minutes: set[str] = set()
        deleted = 0
        r = queries.Reader(db, memo=False)
        for s in sensors:
            doc = r.get(layout.HOURS, layout.sensor_hour_id(s["_id"], hour))
            present = layout.summaries(doc, "m")
            minutes.update(present)
            ids = [
                bid
                for mi, summary in present.items()
                for bid in layout.segment_ids(s["_id"], hour + int(mi) * layout.US_MINUTE, summary)
            ]
            deleted += _delete(db, layout.SAMPLES, ids)
        # The hour's packs are copies of what was just deleted.
        _delete(db, layout.PACKS, [layout.sensor_hour_id(s["_id"], hour) for s in sensors])
        _delete(
            db,
            layout.MINUTES,
            _all_lanes(db, [f"{layout.ALL}|{layout.hour_key(hour)}{mi}" for mi in minutes]),
        )
        return deleted

    return _sweep_hours(db, "raw", cutoff_us, delete_hour, stop)


def sweep_summaries(db: Database, cutoff_us: int, stop: threading.Event | None = None) -> int:
    """Delete the hour and day summaries of every hour (day) ending by ``cutoff_us``."""

    def delete_hour(hour: int, sensors: list[dict[str, Any]]) -> int:
        ids = [layout.sensor_hour_id(s["_id"], hour) for s in sensors]
        ids.append(layout.all_hour_id(hour))
        if (hour + layout.US_HOUR) % layout.US_DAY == 0:  # the day's last hour is gone
            ids.append(layout.all_day_id(hour))
        return _delete(db, layout.HOURS, _all_lanes(db, ids))

    return _sweep_hours(db, "summary", cutoff_us, delete_hour, stop)


def sweep(db: Database, cfg: Config, now: datetime | None = None, stop=None) -> dict[str, int]:
    """One sweep of every tier; returns what it deleted."""
    now_us = layout.to_us(now or datetime.now(UTC))
    out = {"buckets": 0, "summaries": 0, "rejects": 0}
    icfg = cfg.ingest
    if icfg.retention_days:
        cutoff = now_us - icfg.retention_days * layout.US_DAY
        out["buckets"] = sweep_raw(db, cutoff, stop)
        out["rejects"] = (
            db[layout.REJECTED]
            .delete_many({"received_at": {"$lt": layout.from_us(cutoff)}})
            .deleted_count
        )
    if icfg.summary_retention_days:
        out["summaries"] = sweep_summaries(
            db, now_us - icfg.summary_retention_days * layout.US_DAY, stop
        )
    return out


def sweeper(cfg: Config, stop: threading.Event) -> Periodic | None:
    """:func:`sweep` every ``ingest.retention_interval_s``, when a tier has a limit."""
    icfg = cfg.ingest
    if not (icfg.retention_days or icfg.summary_retention_days):
        return None

    def work(db: Database) -> None:
        n = sweep(db, cfg, stop=stop)
        if any(n.values()):
            log.info(
                "retention: deleted %d minute buckets, %d summaries, %d rejects",
                n["buckets"],
                n["summaries"],
                n["rejects"],
            )

    return Periodic(cfg, stop, "retention", icfg.retention_interval_s, work)
