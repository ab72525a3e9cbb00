"""The sensor simulator: configured sensors publishing QoS 1 readings.

Each message carries a ``msg_id`` (the ingester's dedupe key) and an ISO 8601
UTC timestamp. Without ``rate`` each sensor keeps its own schedule (the status
sensor every second, the random profile at random 1–30 s intervals); with
``rate`` the sensors take turns at that many messages per second in total.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import paho.mqtt.client as mqtt

from sensor_gateway.config import Config, SensorSpec
from sensor_gateway.model import iso
from sensor_gateway.mqtt import connect_async, make_client
from sensor_gateway.notify import Notifier

log = logging.getLogger("sensor_gateway.simulator")


@dataclass
class Sensor:
    spec: SensorSpec
    rng: random.Random
    value: float = 0.0
    next_at: float = 0.0

    def __post_init__(self) -> None:
        self.value = self.spec.initial

    def sample(self) -> float | int:
        p = self.spec.profile
        if p == "status":
            return self.rng.randint(0, 6)
        if p == "random_interval":
            return self.rng.randint(1, 100)
        self.value += self.rng.uniform(-self.spec.step, self.spec.step)
        return round(self.value, 2)

    def interval(self) -> float:
        if self.spec.profile == "random_interval":
            return self.rng.uniform(1, 30)
        return self.spec.interval_s


@dataclass
class Published:
    """What the broker has acknowledged (PUBACK), by message id."""

    sent: int = 0
    acked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.done = threading.Condition(self.lock)


class Simulator:
    def __init__(self, cfg: Config, notifier: Notifier | None = None, seed: int | None = None):
        self.cfg = cfg
        self.scfg = cfg.simulator
        self.notifier = notifier or Notifier()
        rng = random.Random(seed)
        self.sensors = [
            Sensor(SensorSpec(**s), random.Random(rng.random())) for s in self.scfg.sensors
        ]
        self.run_id = uuid.uuid4().hex[:12]
        self.seq = 0
        self.stats = Published()
        self.stop_event = threading.Event()
        self.connected = threading.Event()
        self.client = make_client(
            cfg,
            self.scfg.client_id or f"sim-{self.run_id}",
            self.scfg.mqtt_username,
            self.scfg.mqtt_password_file,
        )
        self.client.max_inflight_messages_set(self.scfg.max_inflight)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("MQTT connect refused: %s", reason_code)
            return
        log.info("MQTT connected to %s:%s", self.cfg.mqtt.host, self.cfg.mqtt.port)
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self.stop_event.is_set():
            log.warning("MQTT disconnected (%s); reconnecting with backoff", reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self.stats.lock:
            self.stats.acked += 1
            self.stats.done.notify_all()

    def message(self, sensor: Sensor) -> tuple[str, bytes]:
        self.seq += 1
        spec = sensor.spec
        body: dict[str, object] = {
            "msg_id": f"{self.run_id}-{self.seq}",
            "sensor_id": spec.sensor_id,
            "value": sensor.sample(),
            "timestamp": iso(datetime.now(UTC)),
        }
        if spec.unit:
            body["unit"] = spec.unit
        topic = f"{self.scfg.topic_prefix}/{spec.kind}/{spec.sensor_id}"
        return topic, json.dumps(body, separators=(",", ":")).encode()

    def start(self, ready_timeout: float | None = None) -> bool:
        connect_async(self.client, self.cfg)
        self.client.loop_start()
        deadline = None if ready_timeout is None else time.monotonic() + ready_timeout
        while not self.connected.wait(0.5):
            if self.stop_event.is_set() or (deadline and time.monotonic() > deadline):
                return False
        return True

    def _schedule(self, rate: float | None) -> Iterator[Sensor]:
        """Yields the next sensor to publish, sleeping until it is due."""
        if rate:
            period = 1.0 / rate
            start = time.monotonic()
            i = 0
            while True:
                due = start + i * period
                delay = due - time.monotonic()
                if delay > 0 and self.stop_event.wait(delay):
                    return
                yield self.sensors[i % len(self.sensors)]
                i += 1
        now = time.monotonic()
        for s in self.sensors:
            s.next_at = now
        while True:
            s = min(self.sensors, key=lambda x: x.next_at)
            delay = s.next_at - time.monotonic()
            if delay > 0 and self.stop_event.wait(min(delay, 1.0)):
                return
            if s.next_at > time.monotonic():
                self.notifier.progress()
                continue
            s.next_at += s.interval()
            yield s

    def run(self, rate: float | None = None, count: int | None = None) -> int:
        """Publish until stopped or ``count`` messages; returns messages acknowledged."""
        for sensor in self._schedule(rate):
            if self.stop_event.is_set() or (count is not None and self.stats.sent >= count):
                break
            topic, payload = self.message(sensor)
            if not self._publish(topic, payload):
                break
            # Not connected: paho queues it and sends it after reconnecting.
            self.stats.sent += 1
            # Progress means the broker keeps acknowledging what we send.
            if self.stats.sent - self.stats.acked < self.scfg.max_inflight * 2:
                self.notifier.progress()
            if self.stats.sent % 100 == 0 or rate is None:
                self.notifier.status(
                    f"published {self.stats.sent}, acknowledged {self.stats.acked}"
                )
        return self.finish()

    def _publish(self, topic: str, payload: bytes) -> bool:
        """Hand one message to paho; while its queue is full, wait and try the same
        message again (a reading is never skipped). False if stopped meanwhile."""
        delay = 0.005
        while True:
            info = self.client.publish(topic, payload, qos=1)
            # Not connected: paho queues it and sends it after reconnecting.
            if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                return True
            log.debug("publish deferred: %s", mqtt.error_string(info.rc))
            if self.stop_event.wait(delay):
                return False
            delay = min(delay * 2, 0.5)

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for the broker to acknowledge what was sent, then disconnect."""
        self.notifier.stopping()
        deadline = time.monotonic() + timeout
        with self.stats.lock:
            while self.stats.acked < self.stats.sent and time.monotonic() < deadline:
                self.stats.done.wait(0.2)
        self.client.disconnect()
        self.client.loop_stop()
        log.info("published %d, acknowledged %d", self.stats.sent, self.stats.acked)
        return self.stats.acked

    def stop(self) -> None:
        self.stop_event.set()
