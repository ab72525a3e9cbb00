"""The MQTT stats topic: its publisher beside the ingester, and its follower.

:class:`StatsPublisher` runs beside the ingester's loop, in a thread of its
own: every ``ingest.stats_interval_s`` it computes the averages over
``ingest.stats_windows`` (:func:`sensor_gateway.averages.as_message`), so a
slow database never stalls ingestion, and publishes one JSON message,
retained, to ``ingest.stats_topic``.

:func:`follow` subscribes to that topic and prints each message as a table,
like the stats subscriber of the system this replaces.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from pymongo.database import Database

from sensor_gateway import storage
from sensor_gateway.averages import as_message, parse_windows
from sensor_gateway.config import Config
from sensor_gateway.mqtt import make_client

log = logging.getLogger(__name__)


class StatsPublisher:
    """Publishes averages every ``interval_s`` from a thread of its own, so a slow
    database never stalls ingestion."""

    def __init__(
        self,
        cfg: Config,
        db: Database,
        publish: Callable[[str, bytes], Any],
    ) -> None:
        self.topic = cfg.ingest.stats_topic
        self.interval = cfg.ingest.stats_interval_s
        self.windows = parse_windows(cfg.ingest.stats_windows)
        self.db = db
        self._publish = publish
        self._thread: threading.Thread | None = None
        self.published = 0
        self.errors = 0

    @classmethod
    def for_client(cls, cfg: Config, db: Database, client: mqtt.Client) -> StatsPublisher:
        # QoS 0, retained: a new subscriber sees the last one at once, and nothing
        # piles up in paho's queue while the broker is away.
        return cls(cfg, db, lambda topic, payload: client.publish(topic, payload, 0, retain=True))

    def start(self, stop: threading.Event) -> None:
        """Publish now and every ``interval_s`` until ``stop``, in a thread of its own."""

        def loop() -> None:
            while True:
                try:
                    self.publish_now()
                except Exception as exc:  # noqa: BLE001 - statistics never stop ingestion
                    self.errors += 1
                    log.warning("publishing statistics raised: %r", exc)
                if stop.wait(self.interval):
                    return

        self._thread = threading.Thread(target=loop, name="stats", daemon=True)
        self._thread.start()

    def publish_now(self) -> dict[str, Any] | None:
        try:
            msg = as_message(self.db, self.windows)
        except storage.DatabaseError as exc:
            self.errors += 1
            log.warning("averages not published: MongoDB unavailable (%s)", exc)
            return None
        self._publish(self.topic, json.dumps(msg, separators=(",", ":")).encode())
        self.published += 1
        return msg

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


# -- the follower --------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def format_table(msg: dict[str, Any]) -> str:
    """The averages of one message as a plain-text table (right-aligned numbers)."""
    windows = parse_windows(msg.get("windows", []))
    headers = ["sensor_id", "kind"] + [w.column for w in windows]
    rows = [
        [_fmt(r.get("sensor_id")), _fmt(r.get("kind"))] + [_fmt(r.get(w.column)) for w in windows]
        for r in msg.get("sensors", [])
    ]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(cells)
        ).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def follow(
    cfg: Config,
    out: TextIO,
    count: int | None = None,
    timeout: float | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Print each averages message as it arrives; returns how many were printed."""
    stop = stop or threading.Event()
    printed = 0
    lock = threading.Lock()
    failure: list[str] = []

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            failure.append(f"MQTT connect refused: {reason_code}")
            stop.set()
            return
        client.subscribe(cfg.ingest.stats_topic, qos=0)

    def on_message(client, userdata, msg: mqtt.MQTTMessage) -> None:
        nonlocal printed
        try:
            data = json.loads(msg.payload)
            text = format_table(data)
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("unreadable stats message on %s: %s", msg.topic, exc)
            return
        with lock:
            print(f"{data.get('timestamp', '')}\n{text}\n", file=out, flush=True)
            printed += 1
            if count is not None and printed >= count:
                stop.set()

    client = make_client(
        cfg,
        f"sensor-stats-{int(time.time() * 1000) % 10**9}",
        cfg.api.mqtt_username,
        cfg.api.mqtt_password_file,
    )
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(cfg.mqtt.host, cfg.mqtt.port, keepalive=cfg.mqtt.keepalive)
    client.loop_start()
    try:
        stop.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    if failure:
        raise ConnectionError(failure[0])
    return printed
