"""What a worker shares between requests: configuration, clients, cache, breaker."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from flask import current_app
from pymongo.database import Database
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sensor_gateway import cache, queries, storage
from sensor_gateway.config import Config

log = logging.getLogger("sensor_gateway.api")

# After a failed Redis call, requests go straight to MongoDB for this long.
REDIS_RETRY_S = 2.0


class Services:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # Connections are lazy: creating the clients does not need the servers up.
        self.db: Database = storage.connect(cfg, appname="sensor-api")
        self.redis: redis.Redis = cache.connect(cfg)
        self.keys = cache.Keys(cfg.redis.key_prefix)
        self.cache_prefix = f"{cfg.redis.key_prefix}api:cache:"
        self._redis_down_until = 0.0
        self._lock = threading.Lock()
        # Each serving thread's own Redis connection for the latest readings (see
        # latest_members).
        self._local = threading.local()
        max_streams = max(1, cfg.api.threads - 1)
        # SSE streams hold a worker thread each; keep one thread for everything else.
        self.stream_slots = threading.BoundedSemaphore(max_streams)

    def reader(self) -> queries.Reader:
        """Reads for one request: bounded in documents and in server time."""
        return queries.Reader(self.db, self.cfg.api.max_documents, self.cfg.api.query_time_limit_ms)

    # -- Redis with a circuit breaker ----------------------------------------------------

    def redis_usable(self) -> bool:
        return time.monotonic() >= self._redis_down_until

    def redis_failed(self, exc: Exception) -> None:
        with self._lock:
            if self.redis_usable():
                log.warning("Redis unavailable (%s); serving from MongoDB", exc)
            self._redis_down_until = time.monotonic() + REDIS_RETRY_S

    def try_redis(self, fn: Callable[[redis.Redis], Any]) -> tuple[bool, Any]:
        """(True, result) when Redis answered; (False, None) when it is down."""
        if not self.redis_usable():
            return False, None
        try:
            return True, fn(self.redis)
        except RedisError as exc:
            self.redis_failed(exc)
            return False, None

    def latest_members(self, key: str, n: int) -> tuple[bool, list[bytes]]:
        """``ZREVRANGE key 0 n-1`` as raw bytes: (True, members) when Redis answered,
        (False, []) when it is down (the breaker opens, as with :meth:`try_redis`).

        The hottest call of the API (every latest route), so it skips what the
        client adds per command (pool checkout, retry wrapper, reply decoding):
        each serving thread keeps a connection of its own, made with the client's
        settings (password, timeouts, health checks), and the members, stored as
        JSON text, go into the answer as they are. A
        connection error is retried once on a new connection, as the client does.
        """
        if not self.redis_usable():
            return False, []
        conn = getattr(self._local, "conn", None)
        if conn is None:
            pool = self.redis.connection_pool
            conn = self._local.conn = pool.connection_class(**pool.connection_kwargs)
        try:
            try:
                conn.send_command("ZREVRANGE", key, 0, n - 1)
                return True, conn.read_response(disable_decoding=True)
            except (RedisConnectionError, RedisTimeoutError):
                conn.disconnect()
                conn.send_command("ZREVRANGE", key, 0, n - 1)
                return True, conn.read_response(disable_decoding=True)
        except RedisError as exc:
            conn.disconnect()
            self.redis_failed(exc)
            return False, []

    # -- short-lived cache of heavier queries --------------------------------------------

    def cache_key(self, route: str, params: dict[str, Any]) -> str:
        raw = json.dumps([route, params], sort_keys=True, default=str, separators=(",", ":"))
        return self.cache_prefix + hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()

    def cached(
        self, route: str, params: dict[str, Any], compute: Callable[[], bytes]
    ) -> tuple[bytes, bool]:
        """(body, hit). Bodies are cached for ``api.cache_ttl_s``; Redis down → compute."""
        ttl_ms = int(self.cfg.api.cache_ttl_s * 1000)
        if ttl_ms <= 0:
            return compute(), False
        key = self.cache_key(route, params)
        ok, hit = self.try_redis(lambda r: r.get(key))
        if ok and hit is not None:
            return hit.encode() if isinstance(hit, str) else hit, True
        body = compute()
        if ok:
            self.try_redis(lambda r: r.set(key, body, px=ttl_ms))
        return body, False


def services() -> Services:
    return current_app.extensions["sensor_gateway"]
