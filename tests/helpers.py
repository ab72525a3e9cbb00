"""Test helpers: one gateway instance (config, daemons, clients) on a Stack."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import tomli_w

from devstack import REPO
from devstack.stack import Stack, forget_session
from sensor_gateway import cache, config, storage
from sensor_gateway.ingest import Ingester
from sensor_gateway.mqtt import make_client
from sensor_gateway.simulator import Simulator


def wait_for(
    pred: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class Gateway:
    """A gateway's worth of configuration and daemons, isolated by a tag."""

    def __init__(self, stack: Stack, tmp: Path, tag: str) -> None:
        self.stack = stack
        self.tmp = tmp
        self.tag = tag
        self.data = deep_merge(
            stack.config_dict(database=f"t_{tag}"),
            {
                "redis": {"key_prefix": f"t{tag}:"},
                "ingest": {"client_id": f"ingest-{tag}"},
                "simulator": {"client_id": f"sim-{tag}"},
            },
        )
        self.ingesters: list[tuple[Ingester, threading.Thread]] = []
        self.procs: list[subprocess.Popen] = []
        self._cfg: config.Config | None = None
        self._db = None
        self._redis = None

    # -- configuration -----------------------------------------------------------

    def set(self, **sections: dict[str, Any]) -> None:
        self.data = deep_merge(self.data, sections)
        self._cfg = None

    @property
    def cfg(self) -> config.Config:
        if self._cfg is None:
            self._cfg = config.build(copy.deepcopy(self.data))
        return self._cfg

    def write_config(self) -> Path:
        path = self.tmp / f"gateway-{self.tag}.toml"
        path.write_text(tomli_w.dumps(self.data))
        return path

    # -- clients -------------------------------------------------------------------

    @property
    def db(self):
        if self._db is None:
            self._db = storage.connect(self.cfg)
        return self._db

    @property
    def redis(self):
        if self._redis is None:
            self._redis = cache.connect(self.cfg)
        return self._redis

    @property
    def keys(self) -> cache.Keys:
        return cache.Keys(self.cfg.redis.key_prefix)

    def readings(self, query: dict | None = None) -> list[dict]:
        """Every stored reading (a full scan of the buckets) whose fields equal ``query``'s:
        ``{"_id", "sensor_id", "kind", "value", "ts", "unit", "msg_id"}`` each."""
        q = query or {}
        return [
            r for r in storage.scan_readings(self.db) if all(r.get(k) == v for k, v in q.items())
        ]

    def stored(self, query: dict | None = None) -> int:
        return len(self.readings(query)) if query else storage.count_readings(self.db)

    def wait_stored(self, n: int, timeout: float = 60.0, query: dict | None = None) -> int:
        wait_for(lambda: self.stored(query) >= n, timeout, 0.2, f"{n} stored readings")
        return self.stored(query)

    # -- daemons -------------------------------------------------------------------

    def start_ingester(self) -> Ingester:
        ing = Ingester(self.cfg)
        assert ing.start(ready_timeout=30), "ingester did not subscribe"
        t = threading.Thread(target=ing.run, name=f"ingest-{self.tag}", daemon=True)
        t.start()
        self.ingesters.append((ing, t))
        return ing

    def stop_ingesters(self) -> None:
        for ing, t in self.ingesters:
            ing.stop()
            t.join(30)
        self.ingesters.clear()

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Run ``sensor-gateway <args>`` as a real process with this configuration;
        ``env`` adds to its environment (e.g. a NOTIFY_SOCKET)."""
        path = self.write_config()
        log_path = self.tmp / f"{args[0]}-{len(self.procs)}.log"
        log = open(log_path, "wb")  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        p = subprocess.Popen(
            [sys.executable, "-m", "sensor_gateway", "-c", str(path), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        p.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def spawn_ingester(self, timeout: float = 30.0, worker: int = 0) -> subprocess.Popen:
        """Start ``sensor-gateway ingest`` (as ingest worker ``worker``, the way
        sensor-ingest@.service does) and wait until it has subscribed."""
        p = self.spawn("ingest", env={"SENSOR_GATEWAY_INGEST__WORKER": str(worker)})
        wait_for(
            lambda: p.poll() is not None or "subscribed to" in p.log_path.read_text(),
            timeout,
            what="the ingester to subscribe",
        )
        assert p.poll() is None, p.log_path.read_text()
        return p

    def simulator(self, **overrides: Any) -> Simulator:
        if overrides:
            self.set(simulator=overrides)
        sim = Simulator(self.cfg, seed=1)
        assert sim.start(ready_timeout=30), "simulator did not connect"
        return sim

    def publish(self, count: int, rate: float | None = 2000.0) -> Simulator:
        """Publish ``count`` readings through the simulator; returns it once all are acked."""
        sim = self.simulator()
        acked = sim.run(rate=rate, count=count)
        assert acked == count, f"broker acknowledged {acked} of {count}"
        return sim

    def publish_async(self, count: int, rate: float) -> tuple[Simulator, threading.Thread]:
        sim = self.simulator()
        t = threading.Thread(target=sim.run, args=(rate, count), daemon=True)
        t.start()
        return sim, t

    def raw_publisher(self) -> mqtt.Client:
        """A plain MQTT client with the simulator's credentials, for arbitrary payloads."""
        c = make_client(
            self.cfg,
            f"raw-{self.tag}-{time.monotonic_ns()}",
            self.cfg.simulator.mqtt_username,
            self.cfg.simulator.mqtt_password_file,
        )
        c.connect(self.cfg.mqtt.host, self.cfg.mqtt.port)
        c.loop_start()
        return c

    # -- teardown ------------------------------------------------------------------

    def forget_session(self) -> None:
        """Remove the ingesters' persistent sessions so the broker stops queueing for them."""
        base = self.cfg.ingest.client_id
        for w in range(self.cfg.ingest.workers):
            forget_session(self.cfg, f"{base}-{w}" if w else base)

    def close(self) -> None:
        self.stop_ingesters()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.stack.mosquitto.proc is not None:
            self.forget_session()
        try:
            if self.stack.mongo.proc is not None:
                self.db.client.drop_database(self.cfg.mongodb.database)
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass
