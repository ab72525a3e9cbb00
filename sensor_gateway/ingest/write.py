"""The write stage: a validated batch into MongoDB, held and retried until it is in.

Readings are appended to their minute buckets and every summary above them
set (:mod:`sensor_gateway.writer`: a redelivered reading is recognised and
stored, and counted, once; a bucket the server refuses becomes rejects), and
rejects go to ``rejected``. Errors are classified (:func:`storage.classify`):
transient ones hold the batch unacknowledged and retry; permanent ones
(credentials, rights, the old layout) raise :class:`storage.PermanentError`,
which stops the ingester with exit status 78.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pymongo.database import Database

from sensor_gateway import layout, storage
from sensor_gateway.config import Config
from sensor_gateway.ingest.counters import Counters
from sensor_gateway.ingest.validate import Validated, refused_doc
from sensor_gateway.logs import RateLimitedLogger, TracebackOnce
from sensor_gateway.notify import Notifier
from sensor_gateway.writer import Writer

log = logging.getLogger("sensor_gateway.ingest")
log_unexpected = TracebackOnce(log)

# Fault injection for the tests: SENSOR_GATEWAY_CRASH_AT=written kills the
# process (SIGKILL) right after a batch is written, before its PUBACKs leave.
_CRASH_AT = os.environ.get("SENSOR_GATEWAY_CRASH_AT", "")


def crash_point(name: str) -> None:
    if name == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)


class BatchStore:
    """Writes each batch until the database accepts it; returns the new readings."""

    def __init__(
        self,
        cfg: Config,
        db: Database,
        counters: Counters,
        notifier: Notifier,
        stop_event: threading.Event,
        queued: Callable[[], int],
        reject_log: RateLimitedLogger,
    ) -> None:
        self.db = db
        self.counters = counters
        self.notifier = notifier
        self.stop_event = stop_event
        self.queued = queued
        self.reject_log = reject_log
        # Nothing before this ingester accepted readings timed after now + skew.
        self.writer = Writer(
            db,
            fresh_after_us=layout.to_us(datetime.now(UTC))
            + int(cfg.ingest.max_future_skew_s * 1_000_000),
            lane=cfg.ingest.worker,
        )

    def write(self, v: Validated) -> list[dict[str, Any]]:
        """Store until MongoDB accepts; returns the readings that were new.

        Raises storage.PermanentError when no retry can help, and the last
        transient error when stopping while MongoDB is down (the batch then stays
        unacknowledged and the broker redelivers it to our session later).
        """
        delay = 0.2
        written = None
        while True:
            try:
                if written is None:
                    written = self.writer.write(v.readings)
                    self.counters.duplicates += written.duplicates
                    for doc, reason in written.refused:
                        self.reject_log.warning("reading refused on %r: %s", doc["topic"], reason)
                        v.rejects.append(refused_doc(doc, reason))
                crash_point("written")
                for doc, reason in storage.insert_rejects(self.db, v.rejects):
                    self.counters.rejects_unstored += 1
                    log.error("reject not stored (%s): %r", reason, doc)
                return written.new
            except Exception as exc:  # noqa: BLE001 - classified right here
                kind = storage.classify(exc)
                if kind == storage.PERMANENT:
                    raise storage.PermanentError(f"{type(exc).__name__}: {exc}") from exc
                if kind == storage.DOCUMENT:
                    # Documents at fault are isolated inside the storage calls; a
                    # whole write failing here is the server failing: hold and retry.
                    log_unexpected(exc, "MongoDB write failed unexpectedly; holding the batch")
                self._hold(exc, len(v.readings) + len(v.rejects))
                if self.stop_event.wait(delay):
                    raise
                delay = min(delay * 2, 5.0)

    def _hold(self, exc: BaseException, held: int) -> None:
        self.counters.mongo_retries += 1
        if self.counters.mongo_retries % 10 == 1:
            log.warning(
                "MongoDB write failed (%s); batch of %d held unacknowledged, retrying",
                exc,
                held,
            )
        # Still alive, waiting on the database: the watchdog keeps quiet.
        self.notifier.progress()
        self.notifier.status(
            f"MongoDB unavailable, holding {held} messages; "
            + self.counters.status_line(self.queued())
        )
