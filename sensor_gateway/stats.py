"""Rolling averages on MQTT: the publisher beside the ingester, and the follower.

:class:`StatsPublisher` is driven by the ingester's housekeeping
(``maybe_publish``) every ``ingest.stats_interval_s``; it computes the
averages over ``ingest.stats_windows`` from the per-minute rollups in a
thread of its own (so a slow database never stalls ingestion) and publishes
one JSON message, retained, to ``ingest.stats_topic``:

    {"timestamp": "…Z", "windows": ["1m", "5m", "30m"],
     "sensors": [{"sensor_id": "temp-1", "kind": "temperature",
                  "avg_1min": 21.3, "avg_5min": 21.1, "avg_30min": 20.9,
                  "count_1min": 60, "count_5min": 300, "count_30min": 1800}, …]}

:func:`follow` subscribes to that topic and prints each message as a table,
like the stats subscriber of the system this replaces.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from pymongo.database import Database

from sensor_gateway import queries, storage
from sensor_gateway.config import Config
from sensor_gateway.model import iso
from sensor_gateway.mqtt import make_client

log = logging.getLogger("sensor_gateway.stats")


def build_message(
    db: Database, windows: list[queries.Window], now: datetime | None = None
) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    result = queries.averages(db, windows, now=now)
    rows = []
    for sensor_id, s in result["sensors"].items():
        row: dict[str, Any] = {"sensor_id": sensor_id, "kind": s["kind"]}
        for w in windows:
            row[w.column] = s["windows"][w.label]["avg"]
        for w in windows:
            row[w.column.replace("avg_", "count_", 1)] = s["windows"][w.label]["count"]
        rows.append(row)
    return {"timestamp": iso(now), "windows": [w.label for w in windows], "sensors": rows}


class StatsPublisher:
    """Publishes averages every ``interval_s``; never blocks its caller."""

    def __init__(
        self,
        cfg: Config,
        db: Database,
        publish: Callable[[str, bytes], Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topic = cfg.ingest.stats_topic
        self.interval = cfg.ingest.stats_interval_s
        self.windows = queries.parse_windows(cfg.ingest.stats_windows)
        self.db = db
        self._publish = publish
        self._clock = clock
        self._next = 0.0
        self._thread: threading.Thread | None = None
        self.published = 0
        self.errors = 0

    @classmethod
    def for_client(cls, cfg: Config, db: Database, client: mqtt.Client) -> StatsPublisher:
        # QoS 0, retained: a new subscriber sees the last one at once, and nothing
        # piles up in paho's queue while the broker is away.
        return cls(cfg, db, lambda topic, payload: client.publish(topic, payload, 0, retain=True))

    def maybe_publish(self) -> bool:
        """Start a publication if one is due and none is running. Returns True if started."""
        now = self._clock()
        if now < self._next or (self._thread is not None and self._thread.is_alive()):
            return False
        self._next = now + self.interval
        self._thread = threading.Thread(target=self.publish_now, name="stats", daemon=True)
        self._thread.start()
        return True

    def publish_now(self) -> dict[str, Any] | None:
        try:
            msg = build_message(self.db, self.windows)
        except storage.Unavailable as exc:
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
    windows = [queries.Window(w, queries.parse_window(w)) for w in msg.get("windows", [])]
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
