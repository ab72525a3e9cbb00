"""Redis: the latest N readings per sensor, the live channel and shared counters.

Keys (prefix ``sg:`` by default):
- ``latest:<sensor_id>``  sorted set, score = reading time (ms), member = public JSON
- ``latest``              the same across all sensors
- ``sensors``             set of sensor ids seen
- ``live``                pub/sub channel: a JSON array of public readings per
  batch written
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

import msgspec
import redis

from sensor_gateway.config import Config
from sensor_gateway.model import public

_live_encoder = msgspec.json.Encoder()
# json.dumps(..., separators=...) builds an encoder per call; members must stay
# byte-identical to what earlier versions wrote, so json's own, made once.
_member_encoder = json.JSONEncoder(separators=(",", ":"))


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


def _score(doc: dict[str, Any]) -> float:
    return doc["ts"].timestamp() * 1000


def _encode_member(shown: dict[str, Any]) -> str:
    return _member_encoder.encode(shown)


def _member(doc: dict[str, Any]) -> tuple[str, float]:
    return _encode_member(public(doc)), _score(doc)


def _newest(readings: list[tuple[float, dict[str, Any]]], n: int) -> dict[str, float]:
    """The newest n of readings ((score, public form) pairs) as members: by time,
    then member (as Redis orders equal scores). Only those that can be among
    them are encoded."""
    if len(readings) > n:
        least = heapq.nlargest(n, (score for score, _ in readings))[-1]
        readings = [r for r in readings if r[0] >= least]
    members = {_encode_member(shown): score for score, shown in readings}
    return dict(heapq.nlargest(n, members.items(), key=lambda kv: (kv[1], kv[0])))


def live_message(shown: list[dict[str, Any]]) -> bytes:
    """A batch's new readings (their public forms) on the live channel: one
    message, a JSON array (a PUBLISH per reading cost the ingester more than
    the rest of Redis)."""
    return _live_encoder.encode(shown)


def live_readings(message: str | bytes) -> list[dict[str, Any]]:
    """The readings of a live channel message (one reading alone: an ingester of
    before the arrays, during an upgrade). Raises ValueError if it is not JSON."""
    data = json.loads(message)
    if isinstance(data, dict):
        return [data]
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


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
    # Each reading's public form is made once, for the live channel and the sets.
    shown = [public(d) for d in docs]
    if live and docs:
        pipe.publish(keys.live, live_message(shown))
    by_sensor: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for d, pub in zip(docs, shown, strict=True):
        by_sensor.setdefault(d["sensor_id"], []).append((_score(d), pub))
    newest_overall: dict[str, float] = {}
    for sensor_id, readings in by_sensor.items():
        newest = _newest(readings, n)
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
