"""The ingester: the stages wired together, and its loop.

One turn of the loop (:meth:`Ingester.step`) reads top to bottom:
receive (:mod:`.receive`, paho's thread fills the queue) → batch
(:func:`.batch.collect`) → validate (:func:`.validate.validate_batch`) →
write (:class:`.write.BatchStore`) → acknowledge (:class:`.acknowledge.Finisher`:
Redis, then PUBACKs, in a thread of its own).

Scheduled work runs beside the loop, never in it: retention
(:func:`sensor_gateway.retention.sweeper`), packing settled hours for reads
(:func:`sensor_gateway.compaction.compactor`) and the stats topic
(:class:`sensor_gateway.stats_topic.StatsPublisher`), each in its own thread.

Stopping (SIGTERM): take no new messages (those the broker sends meanwhile
stay unacknowledged in our session and come back next time), write and
acknowledge what is held, then disconnect.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sensor_gateway import compaction, retention, storage
from sensor_gateway.config import Config
from sensor_gateway.ingest.acknowledge import Finisher
from sensor_gateway.ingest.batch import collect
from sensor_gateway.ingest.counters import Counters
from sensor_gateway.ingest.latest_cache import LatestCache
from sensor_gateway.ingest.receive import Incoming, Receiver
from sensor_gateway.ingest.validate import Validated, validate_batch
from sensor_gateway.ingest.write import BatchStore
from sensor_gateway.logs import RateLimitedLogger
from sensor_gateway.notify import Notifier
from sensor_gateway.payload import Limits

log = logging.getLogger("sensor_gateway.ingest")

# Exit status of a permanent database error (sysexits' EX_CONFIG); the unit's
# RestartPreventExitStatus= keeps systemd from restarting into the same wall.
EXIT_PERMANENT = 78
# The STATUS sent just before the broker connection is opened (bench/ingest.py
# times the drain from it).
CONNECTING_STATUS = "waiting for the MQTT subscription"
# A retiring worker's session has given all it held once nothing came for this long.
RETIRE_IDLE_S = 3.0


class Ingester:
    def __init__(self, cfg: Config, notifier: Notifier | None = None, retire: bool = False) -> None:
        self.cfg = cfg
        self.icfg = cfg.ingest
        self.notifier = notifier or Notifier()
        self.limits = Limits(
            self.icfg.max_payload_bytes, self.icfg.max_future_skew_s, self.icfg.topic_identity
        )
        self.counters = Counters()
        self.stop_event = threading.Event()
        # Why the ingester gave up (a permanent database error), if it did.
        self.fatal: str | None = None
        self.reject_log = RateLimitedLogger(log, self.icfg.reject_log_per_min)
        self.db = storage.connect(cfg, appname="sensor-ingest")
        # Retiring a worker: write what its session holds, then end it (cli --retire).
        self.retire = retire
        self.receiver = Receiver(cfg, self.counters, self.stop_event, retire=retire)
        self.store = BatchStore(
            cfg,
            self.db,
            self.counters,
            self.notifier,
            self.stop_event,
            self.receiver.queue.qsize,
            self.reject_log,
        )
        self.latest = LatestCache(cfg, self.counters)
        self.finisher = Finisher(self.latest, self.receiver)
        # Worker 0 alone sweeps and publishes stats: they read every lane, and
        # twice the work would change nothing.
        self.leader = self.icfg.worker == 0 and not retire
        chores = (
            (retention.sweeper(cfg, self.stop_event), compaction.compactor(cfg, self.stop_event))
            if self.leader
            else ()
        )
        self.housekeeping = [c for c in chores if c is not None]
        self.stats_publisher: Any = None  # a StatsPublisher when ingest.stats_topic is set

    # -- start-up ----------------------------------------------------------------

    def wait_for_mongo(self) -> None:
        delay = 0.5
        while not self.stop_event.is_set():
            try:
                storage.ping(self.db)
                storage.prepare(self.db, self.cfg)
                self.store.writer.register_lane()
                return
            except storage.DatabaseError as exc:
                if storage.classify(exc) == storage.PERMANENT:
                    raise storage.PermanentError(str(exc)) from exc
                log.warning("MongoDB not reachable (%s); retrying in %.1fs", exc, delay)
                # Not READY yet: `systemctl status` shows what start-up waits for.
                self.notifier.status("waiting for MongoDB")
                self.stop_event.wait(delay)
                delay = min(delay * 2, self.cfg.mqtt.reconnect_max_s)

    def start(self, ready_timeout: float | None = None) -> bool:
        """Connect everything; returns once subscribed (or False if stopped first).

        Raises storage.PermanentError when MongoDB refuses our credentials."""
        self.wait_for_mongo()
        self.latest.check()
        rx = self.receiver
        rx.connect()
        self.notifier.status(f"{CONNECTING_STATUS} to {rx.topic_filter}")
        deadline = None if ready_timeout is None else time.monotonic() + ready_timeout
        while not rx.subscribed.wait(0.5):
            if self.stop_event.is_set() or (deadline and time.monotonic() > deadline):
                return False
        log.info(
            "subscribed to %r as %r, receive maximum %d, maximum packet size %d",
            rx.topic_filter,
            rx.client_id,
            rx.receive_maximum,
            rx.maximum_packet_size,
        )
        return True

    # -- the loop ----------------------------------------------------------------

    def step(self) -> int:
        """One turn of the loop: a batch through every stage. Returns its size."""
        self.receiver.release_stale()
        batch = collect(self.receiver, self.icfg)
        if batch:
            self.process(batch)
        # Progress: a batch finished, or nothing to do. A hung write never gets here.
        self.notifier.progress()
        self.notifier.status(self.counters.status_line(self.receiver.queue.qsize()))
        return len(batch)

    def process(self, batch: list[Incoming]) -> None:
        v = self.validate(batch)
        new = self.store.write(v)
        self.counters.count_batch(
            len(batch), len(new), len(v.rejects), (time.monotonic() - batch[0].received_mono) * 1000
        )
        self.finisher.hand_over(batch, new)

    def validate(self, batch: list[Incoming]) -> Validated:
        v = validate_batch(batch, self.limits, self.icfg.reject_payload_bytes)
        self.counters.duplicates += v.duplicates
        for r in v.rejects:
            self.reject_log.warning("rejected message on %r: %s", r["topic"], r["reason"])
        return v

    def run(self) -> None:
        self.finisher.start()
        for chore in self.housekeeping:
            chore.start()
        if self.stats_publisher is not None:
            self.stats_publisher.start(self.stop_event)
        self.receiver.consuming.set()
        idle_since = time.monotonic()
        try:
            while not self.stop_event.is_set():
                try:
                    if self.step():
                        idle_since = time.monotonic()
                    elif self.retire and time.monotonic() - idle_since > RETIRE_IDLE_S:
                        log.info("retired: the session held nothing more")
                        self.stop()
                except storage.PermanentError:
                    raise
                except storage.DatabaseError:
                    break  # only raised while stopping: the batch stays unacked
        except storage.PermanentError as exc:
            self.give_up(exc)
        self.finisher.stop()
        self.shutdown()

    # -- stopping ----------------------------------------------------------------

    def give_up(self, exc: BaseException) -> None:
        """A permanent database error: say why where an operator looks, then stop."""
        self.fatal = str(exc)
        if isinstance(exc, storage.LayoutError):
            log.error("%s", exc)
            self.notifier.status(f"failed: {exc}")
            self.stop()
            return
        log.error(
            "MongoDB refuses the ingester (%s); not retrying: fix the credentials or "
            "rights (mongodb.username, mongodb.password_file) and start the service again",
            exc,
        )
        self.notifier.status(f"failed: MongoDB refuses the ingester: {exc}")
        self.stop()

    def shutdown(self) -> None:
        """Write and acknowledge what was taken, then leave the broker."""
        rx = self.receiver
        rx.draining.set()
        self.notifier.stopping()
        rx.release_stale(force=True)
        drained = 0
        while not self.fatal and (batch := collect(rx, self.icfg, idle_timeout=0)):
            try:
                self.process(batch)
                drained += len(batch)
            except Exception as exc:  # noqa: BLE001 - stopping: the broker keeps the rest
                log.warning(
                    "MongoDB unavailable while stopping (%s); %d messages left "
                    "to the broker for redelivery",
                    exc,
                    len(batch) + rx.queue.qsize(),
                )
                break
        # The PUBACKs must leave before the DISCONNECT.
        rx.disconnect()
        log.info(
            "stopped after flushing %d messages (%d left to the broker): %s",
            drained,
            self.counters.left_to_broker,
            self.counters.status_line(0),
        )

    def stop(self) -> None:
        # Order matters: no new message is taken from here on.
        self.receiver.draining.set()
        self.stop_event.set()
