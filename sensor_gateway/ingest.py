"""The ingester: receive → validate → batch → write → acknowledge.

- receive: paho's network thread puts each QoS 1 message on a queue, unacked.
  The queue holds at most Receive Maximum (batch_size * inflight_batches)
  messages of at most Maximum Packet Size bytes: MQTT 5 asks the broker for
  that window, and since Mosquitto 2.0.11 overruns it once acknowledgements
  flow, a full queue also blocks paho's reading while the loop consumes (TCP
  then holds the broker back). Before the loop runs nothing is acknowledged,
  so the window holds, and paho must stay free to read the SUBACK start() awaits.
  After a reconnect, a message still held from the earlier connection is
  dropped when the broker redelivers it (same topic and bytes), so copies
  never pile up; one the broker does not redeliver within STALE_GRACE_S (it
  lost it in a crash) is written anyway, so nothing is lost either.
- validate: the payload contract (:mod:`sensor_gateway.payload`), one message
  at a time: whatever happens to one message makes it a reject, never stops
  the loop (:func:`validate_batch`).
- batch: up to ``batch_size`` messages or ``batch_timeout_ms`` after the first.
- write: readings appended to their minute buckets and every summary above
  them set (:mod:`sensor_gateway.writer`: a redelivered reading is recognised
  and stored, and counted, once; a bucket the server refuses becomes rejects),
  rejects to ``rejected``. Errors are classified (:func:`storage.classify`): transient ones hold the
  batch unacknowledged and retry; permanent ones (credentials, rights) stop
  the ingester with exit status 78, so systemd shows the unit failed.
- acknowledge: in the finisher thread, overlapping the next batch's write:
  Redis first (best effort: while Redis is down ingestion goes on and the
  latest-N sets are rebuilt when it returns), then PUBACK for every message.

Stopping (SIGTERM): take no new messages (those the broker sends meanwhile
stay unacknowledged in our session and come back next time), write and
acknowledge what is held, then disconnect.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from pymongo.database import Database

from sensor_gateway import cache, layout, queries, retention, storage
from sensor_gateway.config import Config
from sensor_gateway.logs import RateLimitedLogger, TracebackOnce
from sensor_gateway.mqtt import connect_async, make_client, session_properties
from sensor_gateway.notify import Notifier
from sensor_gateway.payload import Limits, Reject, parse
from sensor_gateway.writer import Writer

log = logging.getLogger("sensor_gateway.ingest")
log_unexpected = TracebackOnce(log)

# Exit status of a permanent database error (sysexits' EX_CONFIG); the unit's
# RestartPreventExitStatus= keeps systemd from restarting into the same wall.
EXIT_PERMANENT = 78
# Bytes a PUBLISH may carry beyond ingest.max_payload_bytes before the broker
# stops delivering it to us (see mqtt.session_properties): 4 KiB of payload over
# the limit, so such payloads still arrive and are recorded as rejects (the
# broker's message_size_limit is max_payload_bytes + 4096), and 4 KiB of topic
# and properties.
PACKET_OVERHEAD = 8192
# How long after a reconnect a held message waits for its redelivery.
STALE_GRACE_S = 5.0
# Fault injection for the tests: SENSOR_GATEWAY_CRASH_AT=written kills the
# process (SIGKILL) right after a batch is written, before its PUBACKs leave.
_CRASH_AT = os.environ.get("SENSOR_GATEWAY_CRASH_AT", "")


def crash_point(name: str) -> None:
    if name == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(slots=True)
class Incoming:
    mid: int
    qos: int
    topic: str
    payload: bytes
    received: datetime
    received_mono: float
    # Which MQTT connection delivered it (see Ingester.acknowledge).
    connection: int


@dataclass
class Validated:
    """One batch after validation: each message is one of the three."""

    readings: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    # The same reading twice in one batch (a broker redelivery).
    duplicates: int = 0


def reject_doc(m: Incoming, reason: str, keep_bytes: int) -> dict[str, Any]:
    return {
        "topic": m.topic,
        "payload": m.payload[:keep_bytes].decode("utf-8", errors="replace"),
        "payload_bytes": len(m.payload),
        "reason": reason,
        "received_at": m.received,
    }


def validate_batch(batch: list[Incoming], limits: Limits, reject_payload_bytes: int) -> Validated:
    """The validate stage; pure, and no message can make it raise."""
    out = Validated()
    seen: set[Any] = set()
    for m in batch:
        try:
            doc = parse(m.topic, m.payload, m.received, limits, m.mid)
        except Exception as exc:  # noqa: BLE001 - parse is total; this is the last guard
            log_unexpected(exc, "bug: validating a message on %r raised", m.topic)
            doc = Reject(f"internal error while validating: {type(exc).__name__}")
        if isinstance(doc, Reject):
            out.rejects.append(reject_doc(m, doc.reason, reject_payload_bytes))
        elif "_id" in doc and doc["_id"] in seen:
            out.duplicates += 1
        else:
            if "_id" in doc:
                seen.add(doc["_id"])
            out.readings.append(doc)
    return out


def refused_doc(doc: dict[str, Any], reason: str) -> dict[str, Any]:
    """A reading the database refused, kept whole as a reject."""
    return {
        "topic": doc.get("topic", ""),
        "payload": repr({k: v for k, v in doc.items() if k != "received_at"})[:16384],
        "reason": reason,
        "received_at": doc.get("received_at", datetime.now(UTC)),
    }


@dataclass
class Counters:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    batch_size_last: int = 0
    batch_size_max: int = 0
    lag_ms_last: float = 0.0
    mongo_retries: int = 0
    redis_errors: int = 0
    # Held from an earlier connection and dropped when the broker redelivered them.
    dropped_stale: int = 0
    # Held from an earlier connection and never redelivered (the broker lost them
    # in a crash): written all the same.
    kept_stale: int = 0
    # Arrived while stopping: left unacknowledged in our session for next time.
    left_to_broker: int = 0
    # Rejects the database would not store either (each logged at error).
    rejects_unstored: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def status_line(self, queued: int) -> str:
        return (
            f"stored {self.stored}, rejected {self.rejected}, duplicates {self.duplicates}, "
            f"lag {self.lag_ms_last:.0f} ms, queued {queued}"
        )


class Ingester:
    def __init__(self, cfg: Config, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.icfg = cfg.ingest
        self.notifier = notifier or Notifier()
        self.limits = Limits(
            self.icfg.max_payload_bytes, self.icfg.max_future_skew_s, self.icfg.topic_identity
        )
        self.counters = Counters()
        self.queue: queue.Queue[Incoming] = queue.Queue()
        # Set while the loop takes from the queue: only then may a full one block.
        self.consuming = threading.Event()
        # Held messages the broker did not redeliver, taken before the queue.
        self.backlog: collections.deque[Incoming] = collections.deque()
        self.stop_event = threading.Event()
        # Set first when stopping: from then on no new message is taken.
        self.draining = threading.Event()
        self.subscribed = threading.Event()
        self.connection = 0
        # Messages held from an earlier connection, by (topic, payload), until the
        # broker redelivers them or STALE_GRACE_S passes. By bytes, not packet id:
        # the bytes are the message's own, the id is the broker's to assign (it kept
        # them across a graceful restart here, but nothing promises that).
        self.stale: dict[tuple[str, bytes], list[Incoming]] = {}
        self.stale_count = 0
        self._stale_until = 0.0
        self._stale_lock = threading.Lock()
        # Why the ingester gave up (a permanent database error), if it did.
        self.fatal: str | None = None
        self.db: Database = storage.connect(cfg, appname="sensor-ingest")
        self.redis = cache.connect(cfg)
        self.keys = cache.Keys(cfg.redis.key_prefix)
        self.redis_ok = True
        # Sensors written while Redis was away: their latest-N is rebuilt on return,
        # in a thread of its own (it reads MongoDB, which may take long).
        self.redis_dirty: set[str] = set()
        self._dirty_lock = threading.Lock()
        self._rebuild: threading.Thread | None = None
        self._rebuild_db: Database | None = None
        self._redis_retry_at = 0.0
        # Nothing before this ingester accepted readings timed after now + skew.
        self.writer = Writer(
            self.db,
            fresh_after_us=layout.to_us(datetime.now(UTC))
            + int(self.icfg.max_future_skew_s * 1_000_000),
        )
        self.retention = retention.Sweeper(cfg, self.stop_event)
        # Batches written to MongoDB, waiting for Redis and their PUBACKs.
        self.finishing: queue.Queue[tuple[list[Incoming], list[dict]] | None] = queue.Queue(1)
        self._finisher: threading.Thread | None = None
        self.reject_log = RateLimitedLogger(log, self.icfg.reject_log_per_min)
        self.client = make_client(
            cfg,
            self.icfg.client_id,
            self.icfg.mqtt_username,
            self.icfg.mqtt_password_file,
            manual_ack=True,
            persistent=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.stats_publisher: Any = None  # set by the stats component when enabled

    # -- receive -----------------------------------------------------------------

    @property
    def receive_maximum(self) -> int:
        return self.icfg.batch_size * self.icfg.inflight_batches

    @property
    def maximum_packet_size(self) -> int:
        return self.icfg.max_payload_bytes + PACKET_OVERHEAD

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("MQTT connect refused: %s", reason_code)
            return
        self.connection += 1
        resumed = bool(getattr(flags, "session_present", False))
        if resumed:
            # What an earlier connection delivered and we have not taken yet should
            # come again on this resumed session; wait for it rather than hold two.
            self._set_aside_queue()
        log.info(
            "MQTT connected to %s:%s (session %s)",
            self.cfg.mqtt.host,
            self.cfg.mqtt.port,
            "resumed" if resumed else "new",
        )
        client.subscribe(self.icfg.topic, qos=1)

    def _set_aside_queue(self) -> None:
        with self._stale_lock:
            while True:
                try:
                    m = self.queue.get_nowait()
                except queue.Empty:
                    break
                self.stale.setdefault((m.topic, m.payload), []).append(m)
                self.stale_count += 1
            self._stale_until = time.monotonic() + STALE_GRACE_S

    def _redelivered(self, topic: str, payload: bytes) -> None:
        """A message arrived: if we still hold a copy from before, drop that one."""
        with self._stale_lock:
            held = self.stale.get((topic, payload))
            if held:
                held.pop()
                self.stale_count -= 1
                self.counters.dropped_stale += 1
                if not held:
                    del self.stale[(topic, payload)]

    def release_stale(self, force: bool = False) -> None:
        """After the grace period, take up what the broker did not redeliver (it
        lost those in a crash): they are written, with no acknowledgement to send."""
        if not self.stale_count or (not force and time.monotonic() < self._stale_until):
            return
        with self._stale_lock:
            kept = [m for held in self.stale.values() for m in held]
            self.stale, self.stale_count = {}, 0
        self.backlog.extend(kept)
        self.counters.kept_stale += len(kept)
        log.warning(
            "%d messages held from before the reconnect were not redelivered "
            "(the broker lost them); writing them",
            len(kept),
        )

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("MQTT subscribe to %r refused: %s", self.icfg.topic, reason_codes)
            return
        self.subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.subscribed.clear()
        if not self.stop_event.is_set():
            log.warning("MQTT disconnected (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        # Runs in paho's network thread: an exception here would end that thread.
        if self.draining.is_set():
            self.counters.left_to_broker += 1
            return
        try:
            try:
                topic = msg.topic
            except UnicodeDecodeError:  # the broker should not let such a topic through
                topic = msg._topic.decode("utf-8", errors="replace")
            if self.stale_count:
                self._redelivered(topic, msg.payload)
            m = Incoming(
                msg.mid,
                msg.qos,
                topic,
                msg.payload,
                datetime.now(UTC),
                time.monotonic(),
                self.connection,
            )
            # Full: wait here, so paho stops reading and TCP holds the broker back.
            # (Acknowledgements still leave: ack() only queues them for this thread's
            # loop, which a PUBACK does not need to wait for.)
            while self.consuming.is_set() and self.queue.qsize() >= self.receive_maximum:
                if self.draining.is_set():
                    self.counters.left_to_broker += 1
                    return
                time.sleep(0.005)
            self.queue.put(m)
        except Exception as exc:  # noqa: BLE001 - unacked, so the broker sends it again
            log_unexpected(exc, "bug: receiving a message raised")

    # -- start-up ----------------------------------------------------------------

    def wait_for_mongo(self) -> None:
        delay = 0.5
        while not self.stop_event.is_set():
            try:
                storage.ping(self.db)
                storage.prepare(self.db, self.cfg)
                return
            except storage.Unavailable as exc:
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
        try:
            self.redis.ping()
        except Exception as exc:  # noqa: BLE001 - any Redis failure: ingest without it
            log.warning("Redis not reachable (%s); ingesting without it", exc)
            self._redis_down()
        connect_async(
            self.client,
            self.cfg,
            session_properties(
                self.icfg.session_expiry_s, self.receive_maximum, self.maximum_packet_size
            ),
        )
        self.client.loop_start()
        self.notifier.status(f"waiting for the MQTT subscription to {self.icfg.topic}")
        deadline = None if ready_timeout is None else time.monotonic() + ready_timeout
        while not self.subscribed.wait(0.5):
            if self.stop_event.is_set() or (deadline and time.monotonic() > deadline):
                return False
        log.info(
            "subscribed to %r, receive maximum %d, maximum packet size %d",
            self.icfg.topic,
            self.receive_maximum,
            self.maximum_packet_size,
        )
        return True

    # -- batch -------------------------------------------------------------------

    def collect(self, idle_timeout: float = 1.0) -> list[Incoming]:
        if self.backlog:
            n = min(len(self.backlog), self.icfg.batch_size)
            return [self.backlog.popleft() for _ in range(n)]
        try:
            first = self.queue.get(timeout=idle_timeout)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.icfg.batch_timeout_ms / 1000
        while len(batch) < self.icfg.batch_size:
            remaining = deadline - time.monotonic()
            try:
                batch.append(
                    self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    # -- validate ----------------------------------------------------------------

    def validate(self, batch: list[Incoming]) -> Validated:
        v = validate_batch(batch, self.limits, self.icfg.reject_payload_bytes)
        self.counters.duplicates += v.duplicates
        for r in v.rejects:
            self.reject_log.warning("rejected message on %r: %s", r["topic"], r["reason"])
        return v

    # -- write -------------------------------------------------------------------

    def write(self, v: Validated) -> list[dict]:
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
            + self.counters.status_line(self.queue.qsize())
        )

    def write_cache(self, new: list[dict]) -> None:
        now = time.monotonic()
        if not self.redis_ok:
            self._mark_dirty(d["sensor_id"] for d in new)
            if now < self._redis_retry_at or not self._redis_back():
                return
        if self.redis_dirty and now >= self._redis_retry_at:
            self._start_rebuild()
        try:
            cache.store_latest(
                self.redis, self.keys, new, self.icfg.latest_n, counters=self.counters.as_dict()
            )
        except Exception as exc:  # noqa: BLE001 - Redis is best effort; never blocks acks
            log.warning("Redis write failed (%s); continuing without it", exc)
            self._mark_dirty(d["sensor_id"] for d in new)
            self._redis_down()

    def _mark_dirty(self, sensor_ids: Iterable[str]) -> None:
        with self._dirty_lock:
            self.redis_dirty.update(sensor_ids)

    def _redis_down(self) -> None:
        self.redis_ok = False
        self.counters.redis_errors += 1
        self._redis_retry_at = time.monotonic() + 2.0

    def _redis_back(self) -> bool:
        try:
            self.redis.ping()
        except Exception as exc:  # noqa: BLE001 - still away: try again later
            log.debug("Redis still unavailable: %s", exc)
            self._redis_retry_at = time.monotonic() + 2.0
            return False
        log.info("Redis is back; rebuilding latest readings of %d sensors", len(self.redis_dirty))
        self.redis_ok = True
        return True

    def _start_rebuild(self) -> None:
        if self._rebuild is not None and self._rebuild.is_alive():
            return
        with self._dirty_lock:
            sensors, self.redis_dirty = sorted(self.redis_dirty), set()
        self._rebuild = threading.Thread(
            target=self._rebuild_latest, args=(sensors,), name="redis-rebuild", daemon=True
        )
        self._rebuild.start()

    def _rebuild_latest(self, sensors: list[str]) -> None:
        """Merge each sensor's newest N from MongoDB into Redis, off the ingest path."""
        n = self.icfg.latest_n
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
            self._redis_retry_at = time.monotonic() + 5.0

    # -- acknowledge -------------------------------------------------------------
    # Redis and the PUBACKs run in a thread of their own (the finisher), after the
    # batch is durably in MongoDB, so they overlap the next batch's MongoDB write.

    def acknowledge(self, batch: list[Incoming]) -> None:
        # A message from an earlier connection is not acknowledged: the broker
        # redelivers it on the resumed session (we dedupe it), and its packet id
        # may meanwhile name another message, which a stale PUBACK would drop.
        current = self.connection
        for m in batch:
            if m.qos > 0 and m.connection == current:
                self.client.ack(m.mid, m.qos)

    def finish(self, batch: list[Incoming], new: list[dict]) -> None:
        self.write_cache(new)
        self.acknowledge(batch)

    def _finisher_loop(self) -> None:
        while True:
            try:
                item = self.finishing.get(timeout=1.0)
            except queue.Empty:
                if self.redis_dirty:
                    self.write_cache([])  # Redis may be back: rebuild what it missed
                continue
            if item is None:
                return
            try:
                self.finish(*item)
            except Exception as exc:  # noqa: BLE001 - a dead finisher would stop all acks
                log_unexpected(exc, "bug: finishing a batch raised")

    def _hand_to_finisher(self, batch: list[Incoming], new: list[dict]) -> None:
        if self._finisher is None or not self._finisher.is_alive():
            self.finish(batch, new)
            return
        while True:
            try:
                self.finishing.put((batch, new), timeout=1.0)
                return
            except queue.Full:
                # A stuck finisher stops the whole loop, so the watchdog pings stop too.
                continue

    # -- the loop ----------------------------------------------------------------

    def process(self, batch: list[Incoming]) -> None:
        v = self.validate(batch)
        new = self.write(v)
        self._count(batch, new, v.rejects)
        self._hand_to_finisher(batch, new)

    def _count(self, batch: list[Incoming], new: list[dict], rejects: list[dict]) -> None:
        c = self.counters
        c.received += len(batch)
        c.stored += len(new)
        c.rejected += len(rejects)
        c.batches += 1
        c.batch_size_last = len(batch)
        c.batch_size_max = max(c.batch_size_max, len(batch))
        c.lag_ms_last = (time.monotonic() - batch[0].received_mono) * 1000

    def step(self) -> int:
        """One turn of the loop: collect and process a batch. Returns its size."""
        self.release_stale()
        batch = self.collect()
        if batch:
            self.process(batch)
        self._housekeeping()
        # Progress: a batch finished, or nothing to do. A hung write never gets here.
        self.notifier.progress()
        self.notifier.status(self.counters.status_line(self.queue.qsize()))
        return len(batch)

    def _housekeeping(self) -> None:
        if self.stats_publisher is not None:
            try:
                self.stats_publisher.maybe_publish()
            except Exception as exc:  # noqa: BLE001 - statistics never stop ingestion
                log_unexpected(exc, "publishing statistics raised")

    def run(self) -> None:
        self._finisher = threading.Thread(target=self._finisher_loop, name="finisher", daemon=True)
        self._finisher.start()
        self.retention.start()
        self.consuming.set()
        try:
            while not self.stop_event.is_set():
                try:
                    self.step()
                except storage.PermanentError:
                    raise
                except storage.Unavailable:
                    break  # only raised while stopping: the batch stays unacked
        except storage.PermanentError as exc:
            self.give_up(exc)
        self.finishing.put(None)
        self._finisher.join()
        self._finisher = None
        self.shutdown()

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
        self.draining.set()
        self.notifier.stopping()
        self.release_stale(force=True)
        drained = 0
        while not self.fatal and (batch := self.collect(idle_timeout=0)):
            try:
                self.process(batch)
                drained += len(batch)
            except Exception as exc:  # noqa: BLE001 - stopping: the broker keeps the rest
                log.warning(
                    "MongoDB unavailable while stopping (%s); %d messages left "
                    "to the broker for redelivery",
                    exc,
                    len(batch) + self.queue.qsize(),
                )
                break
        # The PUBACKs must leave before the DISCONNECT.
        deadline = time.monotonic() + 2.0
        while self.client.want_write() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.client.disconnect()
        self.client.loop_stop()
        log.info(
            "stopped after flushing %d messages (%d left to the broker): %s",
            drained,
            self.counters.left_to_broker,
            self.counters.status_line(0),
        )

    def stop(self) -> None:
        # Order matters: no new message is taken from here on.
        self.draining.set()
        self.stop_event.set()
