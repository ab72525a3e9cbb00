"""The receive stage: MQTT messages onto a bounded queue, unacknowledged.

paho's network thread puts each QoS 1 message on a queue, unacked. The queue
holds at most Receive Maximum (batch_size * inflight_batches) messages of at
most Maximum Packet Size bytes: MQTT 5 asks the broker for that window, and
since Mosquitto 2.0.11 overruns it once acknowledgements flow, a full queue
also blocks paho's reading while the loop consumes (TCP then holds the broker
back). So does holding ``ingest.max_held_mb`` of payload between receipt and
acknowledgement: the window bounds messages, this their bytes. Before the
loop runs nothing is acknowledged, so the window holds, and paho must stay
free to read the SUBACK the start-up awaits.

After a reconnect, a message still held from the earlier connection is
dropped when the broker redelivers it (same topic and bytes), so copies never
pile up; one the broker does not redeliver within STALE_GRACE_S (it lost it
in a crash) is written anyway, so nothing is lost either.

The acknowledgement (:meth:`Receiver.acknowledge`) is sent only after the
batch is written: see :mod:`sensor_gateway.ingest.acknowledge`.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sensor_gateway.config import Config
from sensor_gateway.ingest.counters import Counters
from sensor_gateway.logs import TracebackOnce
from sensor_gateway.mqtt import acknowledge_all, connect_async, make_client, session_properties

log = logging.getLogger("sensor_gateway.ingest")
log_unexpected = TracebackOnce(log)

# Bytes a PUBLISH may carry beyond ingest.max_payload_bytes before the broker
# stops delivering it to us (see mqtt.session_properties): 4 KiB of payload over
# the limit, so such payloads still arrive and are recorded as rejects (the
# broker's message_size_limit is max_payload_bytes + 4096), and 4 KiB of topic
# and properties.
PACKET_OVERHEAD = 8192
# How long after a reconnect a held message waits for its redelivery.
STALE_GRACE_S = 5.0


@dataclass(slots=True)
class Incoming:
    mid: int
    qos: int
    topic: str
    payload: bytes
    received: datetime
    received_mono: float
    # Which MQTT connection delivered it (see Receiver.acknowledge).
    connection: int


class Receiver:
    """The ingester's MQTT session: a persistent one, acknowledged by hand."""

    def __init__(
        self,
        cfg: Config,
        counters: Counters,
        stop_event: threading.Event,
        retire: bool = False,
    ) -> None:
        self.cfg = cfg
        # Retiring: unsubscribe, so that only what the session already holds comes.
        self.retire = retire
        self.icfg = cfg.ingest
        self.counters = counters
        self.stop_event = stop_event
        self.queue: queue.Queue[Incoming] = queue.Queue()
        # Set while the loop takes from the queue: only then may a full one block.
        self.consuming = threading.Event()
        # Set first when stopping: from then on no new message is taken.
        self.draining = threading.Event()
        self.subscribed = threading.Event()
        self.connection = 0
        # Held messages the broker did not redeliver, taken before the queue.
        self.backlog: collections.deque[Incoming] = collections.deque()
        # Messages held from an earlier connection, by (topic, payload), until the
        # broker redelivers them or STALE_GRACE_S passes. By bytes, not packet id:
        # the bytes are the message's own, the id is the broker's to assign (it kept
        # them across a graceful restart here, but nothing promises that).
        self.stale: dict[tuple[str, bytes], list[Incoming]] = {}
        self.stale_count = 0
        self._stale_until = 0.0
        self._stale_lock = threading.Lock()
        # Payload bytes held, as three totals each written by one thread only:
        # queued (paho's), dropped as stale copies (paho's), acknowledged (the
        # finisher's). Those of an earlier connection count until written.
        self.max_held_bytes = self.icfg.max_held_mb * 2**20
        self._bytes_queued = 0
        self._bytes_dropped = 0
        self._bytes_acknowledged = 0
        self.client = make_client(
            cfg,
            self.client_id,
            self.icfg.mqtt_username,
            self.icfg.mqtt_password_file,
            manual_ack=True,
            persistent=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        self.client.on_message = self._on_message

    @property
    def client_id(self) -> str:
        """Worker 0 keeps the single ingester's id, and so its session's queue."""
        i = self.icfg
        return i.client_id if i.worker == 0 else f"{i.client_id}-{i.worker}"

    @property
    def topic_filter(self) -> str:
        """Several workers share one subscription: the broker hands each message
        to one of them (MQTT 5 shared subscriptions, also served to 3.1.1 clients
        by Mosquitto)."""
        i = self.icfg
        return f"$share/{i.share_group}/{i.topic}" if i.workers > 1 else i.topic

    @property
    def other_filter(self) -> str:
        """The filter of the other mode, which a resumed session may still hold
        from before ``ingest.workers`` changed: holding both would bring every
        message once for each (the second copy a duplicate, but a wasted one)."""
        i = self.icfg
        return i.topic if i.workers > 1 else f"$share/{i.share_group}/{i.topic}"

    @property
    def held_bytes(self) -> int:
        """Payload bytes received and not yet acknowledged (or dropped)."""
        return self._bytes_queued - self._bytes_dropped - self._bytes_acknowledged

    def _full(self) -> bool:
        return self.queue.qsize() >= self.receive_maximum or self.held_bytes >= self.max_held_bytes

    @property
    def receive_maximum(self) -> int:
        return self.icfg.batch_size * self.icfg.inflight_batches

    @property
    def maximum_packet_size(self) -> int:
        return self.icfg.max_payload_bytes + PACKET_OVERHEAD

    def connect(self) -> None:
        connect_async(
            self.client,
            self.cfg,
            session_properties(
                self.icfg.session_expiry_s, self.receive_maximum, self.maximum_packet_size
            ),
        )
        self.client.loop_start()

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
        if self.retire:
            client.unsubscribe([self.topic_filter, self.other_filter])
            return
        client.subscribe(self.topic_filter, qos=1)
        if resumed:
            client.unsubscribe(self.other_filter)

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
                self._bytes_dropped += len(held.pop().payload)
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
            log.error("MQTT subscribe to %r refused: %s", self.topic_filter, reason_codes)
            return
        self.subscribed.set()

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if self.retire:
            self.subscribed.set()  # "ready": nothing new will come

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
            while self.consuming.is_set() and self._full():
                if self.draining.is_set():
                    self.counters.left_to_broker += 1
                    return
                time.sleep(0.005)
            self._bytes_queued += len(m.payload)
            self.queue.put(m)
            self.counters.held_bytes_max = max(self.counters.held_bytes_max, self.held_bytes)
        except Exception as exc:  # noqa: BLE001 - unacked, so the broker sends it again
            log_unexpected(exc, "bug: receiving a message raised")

    def acknowledge(self, batch: list[Incoming]) -> None:
        # A message from an earlier connection is not acknowledged: the broker
        # redelivers it on the resumed session (we dedupe it), and its packet id
        # may meanwhile name another message, which a stale PUBACK would drop.
        # QoS 1 at most: the subscription asks for no more.
        current = self.connection
        acknowledge_all(
            self.client, [m.mid for m in batch if m.qos > 0 and m.connection == current]
        )
        self._bytes_acknowledged += sum(len(m.payload) for m in batch)

    def disconnect(self) -> None:
        """Leave the broker once the PUBACKs queued so far are out."""
        deadline = time.monotonic() + 2.0
        while self.client.want_write() and time.monotonic() < deadline:
            time.sleep(0.01)
        props = None
        if self.retire and self.cfg.mqtt.protocol == "5":
            # The session ends with this connection: the broker forgets it.
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
        self.client.disconnect(properties=props)
        self.client.loop_stop()
