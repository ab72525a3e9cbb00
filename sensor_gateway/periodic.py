"""Work that runs beside the ingest loop, never in it: every ``interval_s``, in
a thread of its own, with a database connection of its own (retention,
compaction). A failure is logged and tried again after the next interval; it
never stops ingestion."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pymongo.database import Database

from sensor_gateway import storage
from sensor_gateway.config import Config

log = logging.getLogger("sensor_gateway.periodic")


class Periodic:
    def __init__(
        self,
        cfg: Config,
        stop: threading.Event,
        name: str,
        interval_s: float,
        work: Callable[[Database], None],
    ) -> None:
        self.cfg = cfg
        self.stop = stop
        self.name = name
        self.interval_s = interval_s
        self.work = work
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self.thread.start()

    def _run(self) -> None:
        db: Database | None = None
        first = True
        while not self.stop.wait(0 if first else self.interval_s):
            first = False
            try:
                db = db or storage.connect(self.cfg, appname=f"sensor-ingest-{self.name}")
                self.work(db)
            except Exception as exc:  # noqa: BLE001 - retried next interval; never stops ingest
                log.warning("%s failed (%s); retrying in %gs", self.name, exc, self.interval_s)
