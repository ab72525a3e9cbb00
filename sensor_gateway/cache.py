"""Redis: the latest N readings per sensor, the live channel and shared counters.

Keys (prefix ``sg:`` by default):
- ``latest:<sensor_id>``  sorted set, score = reading time (ms), member = public JSON
- ``latest``              the same across all sensors
- ``sensors``             set of sensor ids seen
- ``live``                pub/sub channel of public JSON readings
- ``ingest:counters``     hash of the ingester's counters (for /metrics);
  ``ingest:counters:<n>`` those of ingest worker n > 0
Sorted sets make a redelivered reading a no-op and keep order by time even
when readings arrive out of order.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Mapping
from typing import Any

import redis

from sensor_gateway.config import Config
from sensor_gateway.model import public


def connect(cfg: Config) -> redis.Redis:
    r = cfg.redis
    return redis.Redis.from_url(
        r.url,
        username=r.username or None,
        password=cfg.secret(r.password_file) or None,
        socket_timeout=r.timeout_s,
        socket_connect_timeout=r.timeout_s,
        decode_responses=True,
        health_check_interval=15,
    )


class Keys:
    def __init__(self, prefix: str, worker: int = 0) -> None:
        self.prefix = prefix
        self.latest_all = f"{prefix}latest"
        self.sensors = f"{prefix}sensors"
        self.live = f"{prefix}live"
        # Each ingest worker's own (ingest.worker); worker 0's is the single ingester's.
        self.counters = self.worker_counters(worker)

    def worker_counters(self, worker: int) -> str:
        base = f"{self.prefix}ingest:counters"
        return f"{base}:{worker}" if worker else base

    def latest(self, sensor_id: str) -> str:
        return f"{self.prefix}latest:{sensor_id}"


def _member(doc: dict[str, Any]) -> tuple[str, float]:
    return json.dumps(public(doc), separators=(",", ":")), doc["ts"].timestamp() * 1000


def store_latest(
    r: redis.Redis,
    keys: Keys,
    docs: list[dict[str, Any]],
    n: int,
    counters: Mapping[str, int] | None = None,
    live: bool = True,
) -> None:
    """One pipeline per batch: latest-N sets, trims, live channel, counters.

    Only a batch's newest N per sensor (and overall) can enter the sets, so the
    rest are not sent.
    """
    pipe = r.pipeline(transaction=False)
    members = [(d["sensor_id"], *_member(d)) for d in docs]
    by_sensor: dict[str, dict[str, float]] = {}
    for sensor_id, member, score in members:
        by_sensor.setdefault(sensor_id, {})[member] = score
        if live:
            pipe.publish(keys.live, member)
    newest_overall: dict[str, float] = {}
    for sensor_id, scored in by_sensor.items():
        newest = dict(heapq.nlargest(n, scored.items(), key=lambda kv: (kv[1], kv[0])))
        newest_overall.update(newest)
        pipe.zadd(keys.latest(sensor_id), newest)
        pipe.zremrangebyrank(keys.latest(sensor_id), 0, -n - 1)
    if by_sensor:
        pipe.sadd(keys.sensors, *by_sensor)
        pipe.zadd(
            keys.latest_all,
            dict(heapq.nlargest(n, newest_overall.items(), key=lambda kv: (kv[1], kv[0]))),
        )
        pipe.zremrangebyrank(keys.latest_all, 0, -n - 1)
    if counters:
        pipe.hset(keys.counters, mapping=dict(counters))
    pipe.execute()


def merge_latest(
    r: redis.Redis, keys: Keys, sensor_id: str | None, docs: list[dict[str, Any]], n: int
) -> None:
    """Add readings from MongoDB to a latest-N set, keeping the newest N: newer
    readings written meanwhile stay (the same reading is the same member)."""
    if not docs:
        return
    key = keys.latest_all if sensor_id is None else keys.latest(sensor_id)
    pipe = r.pipeline(transaction=True)
    pipe.zadd(key, dict(_member(d) for d in docs))
    pipe.zremrangebyrank(key, 0, -n - 1)
    if sensor_id is not None:
        pipe.sadd(keys.sensors, sensor_id)
    pipe.execute()


def read_latest(r: redis.Redis, keys: Keys, sensor_id: str | None, n: int) -> list[dict]:
    key = keys.latest_all if sensor_id is None else keys.latest(sensor_id)
    return [json.loads(m) for m in r.zrevrange(key, 0, n - 1)]
