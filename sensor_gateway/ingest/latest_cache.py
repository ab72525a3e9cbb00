"""Redis' latest-N sets, kept by the ingester: best effort, never blocking ingestion.

While Redis is down, ingestion goes on and the sensors written meanwhile are
remembered; when Redis answers again their latest-N sets are rebuilt from
MongoDB in a thread of their own (with its own client: that read may take
long) and merged, so entries written meanwhile stay.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from pymongo.database import Database

from sensor_gateway import cache, queries, storage
from sensor_gateway.config import Config
from sensor_gateway.ingest.counters import Counters

log = logging.getLogger("sensor_gateway.ingest")

# How long to leave Redis alone after a failure, and after a failed rebuild.
RETRY_S = 2.0
REBUILD_RETRY_S = 5.0


class LatestCache:
    def __init__(self, cfg: Config, counters: Counters) -> None:
        self.cfg = cfg
        self.latest_n = cfg.ingest.latest_n
        self.counters = counters
        self.redis = cache.connect(cfg)
        self.keys = cache.Keys(cfg.redis.key_prefix, cfg.ingest.worker)
        self.ok = True
        # Sensors written while Redis was away: their latest-N is rebuilt on return.
        self.dirty: set[str] = set()
        self._dirty_lock = threading.Lock()
        self._rebuild: threading.Thread | None = None
        self._rebuild_db: Database | None = None
        self._retry_at = 0.0

    def check(self) -> None:
        """At start-up: say so if Redis is away (ingestion goes on without it)."""
        try:
            self.redis.ping()
        except Exception as exc:  # noqa: BLE001 - any Redis failure: ingest without it
            log.warning("Redis not reachable (%s); ingesting without it", exc)
            self._down()

    def store(self, new: list[dict[str, Any]]) -> None:
        """Add a written batch's new readings; an empty list only retries a rebuild."""
        now = time.monotonic()
        if not self.ok:
            self._mark_dirty(d["sensor_id"] for d in new)
            if now < self._retry_at or not self._back():
                return
        if self.dirty and now >= self._retry_at:
            self._start_rebuild()
        try:
            cache.store_latest(
                self.redis, self.keys, new, self.latest_n, counters=self.counters.as_dict()
            )
        except Exception as exc:  # noqa: BLE001 - Redis is best effort; never blocks acks
            log.warning("Redis write failed (%s); continuing without it", exc)
            self._mark_dirty(d["sensor_id"] for d in new)
            self._down()

    def _mark_dirty(self, sensor_ids: Iterable[str]) -> None:
        with self._dirty_lock:
            self.dirty.update(sensor_ids)

    def _down(self) -> None:
        self.ok = False
        self.counters.redis_errors += 1
        self._retry_at = time.monotonic() + RETRY_S

    def _back(self) -> bool:
        try:
            self.redis.ping()
        except Exception as exc:  # noqa: BLE001 - still away: try again later
            log.debug("Redis still unavailable: %s", exc)
            self._retry_at = time.monotonic() + RETRY_S
            return False
        log.info("Redis is back; rebuilding latest readings of %d sensors", len(self.dirty))
        self.ok = True
        return True

    def _start_rebuild(self) -> None:
        if self._rebuild is not None and self._rebuild.is_alive():
            return
        with self._dirty_lock:
            sensors, self.dirty = sorted(self.dirty), set()
        self._rebuild = threading.Thread(
            target=self._rebuild_latest, args=(sensors,), name="redis-rebuild", daemon=True
        )
        self._rebuild.start()

    def _rebuild_latest(self, sensors: list[str]) -> None:
        """Merge each sensor's newest N from MongoDB into Redis, off the ingest path."""
        n = self.latest_n
        try:
            if self._rebuild_db is None:
                self._rebuild_db = storage.connect(
                    self.cfg, appname="sensor-ingest-rebuild", socketTimeoutMS=600_000
                )
            for i, sensor_id in enumerate(sensors):
                docs = queries.latest_docs(self._rebuild_db, n, sensor_id=sensor_id)
                cache.merge_latest(self.redis, self.keys, sensor_id, docs, n)
                sensors[i] = ""
            cache.merge_latest(
                self.redis, self.keys, None, queries.latest_docs(self._rebuild_db, n), n
            )
            log.info("rebuilt the latest readings of %d sensors in Redis", len(sensors))
        except Exception as exc:  # noqa: BLE001 - retried after the next write
            log.warning("rebuilding latest readings in Redis failed (%s); will retry", exc)
            self._mark_dirty(s for s in sensors if s)
            self._retry_at = time.monotonic() + REBUILD_RETRY_S
