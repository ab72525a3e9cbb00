"""The acknowledge stage, after the write: Redis first, then the batch's PUBACKs (one write).

It runs in a thread of its own (the finisher) so it overlaps the next
batch's write; the hand-over queue holds one batch, so a stuck finisher
stops the loop, and with it the watchdog pings. Like Telegraf's MQTT
consumer, nothing is acknowledged before the database has it.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from sensor_gateway.ingest.latest_cache import LatestCache
from sensor_gateway.ingest.receive import Incoming, Receiver
from sensor_gateway.logs import TracebackOnce

log = logging.getLogger("sensor_gateway.ingest")
log_unexpected = TracebackOnce(log)

Written = tuple[list[Incoming], list[dict[str, Any]]]


class Finisher:
    def __init__(self, latest: LatestCache, rx: Receiver) -> None:
        self.latest = latest
        self.rx = rx
        self.handed: queue.Queue[Written | None] = queue.Queue(1)
        self._thread: threading.Thread | None = None

    def finish(self, batch: list[Incoming], new: list[dict[str, Any]]) -> None:
        self.latest.store(new)
        self.rx.acknowledge(batch)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="finisher", daemon=True)
        self._thread.start()

    def hand_over(self, batch: list[Incoming], new: list[dict[str, Any]]) -> None:
        if self._thread is None or not self._thread.is_alive():
            self.finish(batch, new)
            return
        while True:
            try:
                self.handed.put((batch, new), timeout=1.0)
                return
            except queue.Full:
                # A stuck finisher stops the whole loop, so the watchdog pings stop too.
                continue

    def stop(self) -> None:
        """Finish what was handed over, then end the thread."""
        if self._thread is None:
            return
        self.handed.put(None)
        self._thread.join()
        self._thread = None

    def _loop(self) -> None:
        while True:
            try:
                item = self.handed.get(timeout=1.0)
            except queue.Empty:
                if self.latest.dirty:
                    self.latest.store([])  # Redis may be back: rebuild what it missed
                continue
            if item is None:
                return
            try:
                self.finish(*item)
            except Exception as exc:  # noqa: BLE001 - a dead finisher would stop all acks
                log_unexpected(exc, "bug: finishing a batch raised")
