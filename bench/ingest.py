"""Ingest benchmark: prints one JSON line of figures.

All three subscribers drain the same backlog, published once, on the same
services in the same run (the broker queues a copy for each persistent
session):
- ceiling: a bare paho MQTT 5 subscriber that only decodes JSON (auto-ack);
- ingest:  `sensor-gateway ingest` as a process (validate, batch, append to the
           minute buckets and set the summaries, Redis, then acknowledge);
- naive:   one insert_one per message, acknowledged after it, as the systems
           this replaces do (run on a slice of the backlog: it is slow).
Then latency: the simulator publishes at a steady rate to the running
ingester, and a Redis live-channel subscriber times publish → stored.
`disk_write_bytes_per_reading`: bytes the database server wrote to storage
(`write_bytes` of its /proc/<pid>/io) while the ingester drained the backlog,
per stored reading: SD cards wear by bytes written.

Usage: python bench/ingest.py [--messages 60000] [--naive-messages 3000]
       [--rate 1000] [--latency-seconds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import tomli_w

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devstack.stack import Stack  # noqa: E402
from sensor_gateway import cache, config, storage  # noqa: E402
from sensor_gateway.mqtt import make_client, session_properties  # noqa: E402

TOPIC = "sensors/#"


def persistent_subscriber(cfg, client_id: str, manual_ack: bool, on_message) -> mqtt.Client:
    c = make_client(
        cfg,
        client_id,
        cfg.ingest.mqtt_username,
        cfg.ingest.mqtt_password_file,
        manual_ack=manual_ack,
    )
    subscribed = threading.Event()
    c.on_connect = lambda cl, *a: cl.subscribe(TOPIC, qos=1)
    c.on_subscribe = lambda *a: subscribed.set()
    c.on_message = on_message
    c.connect(
        cfg.mqtt.host, cfg.mqtt.port, clean_start=False, properties=session_properties(3600, 1000)
    )
    c.loop_start()
    assert subscribed.wait(10)
    return c


def create_session(cfg, client_id: str) -> None:
    c = persistent_subscriber(cfg, client_id, False, lambda *a: None)
    c.disconnect()
    c.loop_stop()


def publish_backlog(cfg, n: int, run: str) -> None:
    """Publish n readings at QoS 1 with a C client (mosquitto_pub -l)."""
    lines = []
    ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    for i in range(1, n + 1):
        lines.append(
            json.dumps(
                {
                    "msg_id": f"{run}-{i}",
                    "sensor_id": f"s{i % 50}",
                    "value": i % 100,
                    "timestamp": ts,
                }
            )
        )
    pw = cfg.secret(cfg.simulator.mqtt_password_file)
    subprocess.run(
        [
            "mosquitto_pub",
            "-h",
            cfg.mqtt.host,
            "-p",
            str(cfg.mqtt.port),
            "-q",
            "1",
            "-M",
            "1000",
            "-u",
            cfg.simulator.mqtt_username,
            "-P",
            pw,
            "-t",
            "sensors/bench",
            "-l",
        ],
        input=("\n".join(lines) + "\n").encode(),
        check=True,
    )


def timed_drain(cfg, client_id: str, manual_ack: bool, on_message, done: threading.Event) -> float:
    """Seconds from connecting a subscriber to its backlog until ``done`` is set."""
    t0 = time.perf_counter()
    c = persistent_subscriber(cfg, client_id, manual_ack, on_message)
    assert done.wait(600), f"{client_id} did not drain its backlog"
    elapsed = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return elapsed


def drain_bare(cfg, n: int) -> float:
    got = 0
    done = threading.Event()

    def on_message(client, userdata, msg):
        nonlocal got
        json.loads(msg.payload)
        got += 1
        if got >= n:
            done.set()

    return n / timed_drain(cfg, "bench-bare", False, on_message, done)


def drain_naive(cfg, n: int) -> float:
    db = storage.connect(cfg)
    coll = db["naive_readings"]
    got = 0
    done = threading.Event()

    def on_message(client, userdata, msg):
        nonlocal got
        if got >= n:
            return
        doc = json.loads(msg.payload)
        doc["_id"] = doc.pop("msg_id")
        doc["ts"] = datetime.fromisoformat(doc.pop("timestamp"))
        coll.insert_one(doc)
        client.ack(msg.mid, msg.qos)
        got += 1
        if got >= n:
            done.set()

    return n / timed_drain(cfg, "bench-naive", True, on_message, done)


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def write_bytes(pid: int) -> int:
    """Bytes this process caused to be sent to storage (Linux /proc/<pid>/io)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes in /proc/{pid}/io")


def db_insert_rate(cfg, batches: int = 20, size: int = 500) -> float:
    """The database alone: the storage layer's writer, batches of reading documents,
    one client (the ingester's write stage without MQTT, validation or Redis)."""
    from sensor_gateway.payload import parse
    from sensor_gateway.writer import Writer

    db = storage.connect(cfg)
    now = datetime.now(UTC)
    docs = [
        [
            parse(
                f"sensors/bench/s{i % 50}",
                json.dumps(
                    {"msg_id": f"db-{j}-{i}", "value": i, "timestamp": "2026-11-24T11:00:00Z"}
                ).encode(),
                now,
            )
            for i in range(size)
        ]
        for j in range(batches)
    ]
    storage.prepare(db, cfg)
    writer = Writer(db)
    t0 = time.perf_counter()
    for batch in docs:
        writer.write(batch)
    rate = batches * size / (time.perf_counter() - t0)
    db.client.drop_database(db.name)
    return rate


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0.0
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=60000)
    ap.add_argument("--naive-messages", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--latency-seconds", type=float, default=15)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    stack = Stack(root=root)
    stack.start()
    procs: list[subprocess.Popen] = []
    try:
        data = stack.config_dict(database="bench")
        cfg_path = root / "gateway.toml"
        cfg_path.write_text(tomli_w.dumps(data))
        cfg = config.build(data)
        env = {**os.environ, "PYTHONPATH": str(REPO)}

        def spawn(*a: str, log: str) -> subprocess.Popen:
            p = subprocess.Popen(
                [sys.executable, "-m", "sensor_gateway", "-c", str(cfg_path), *a],
                stdout=open(root / log, "wb"),  # noqa: SIM115 - the child owns it
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
            procs.append(p)
            return p

        for cid in ("bench-bare", "bench-naive", cfg.ingest.client_id):
            create_session(cfg, cid)
        run = "b" + os.urandom(3).hex()
        publish_backlog(cfg, args.messages, run)

        ceiling = drain_bare(cfg, args.messages)

        db = storage.connect(cfg)
        r = cache.connect(cfg)
        keys = cache.Keys(cfg.redis.key_prefix)
        services = {
            "mongodb": stack.mongo.proc.pid,
            "mosquitto": stack.mosquitto.proc.pid,
            "redis": stack.redis.proc.pid,
        }
        cpu0 = {k: cpu_seconds(pid) for k, pid in services.items()}
        written0 = write_bytes(stack.mongo.proc.pid)
        t0 = time.perf_counter()
        ing = spawn("ingest", log="ingest.log")
        sampler = RssSampler(ing.pid)
        sampler.start()
        while int(r.hget(keys.counters, "stored") or 0) < args.messages:
            if ing.poll() is not None:
                raise SystemExit((root / "ingest.log").read_text()[-2000:])
            time.sleep(0.05)
        drain_s = time.perf_counter() - t0
        # Summaries are written with the batch, before its acknowledgement: nothing
        # of this drain is still to be written.
        db_written = write_bytes(stack.mongo.proc.pid) - written0
        ingest_rate = args.messages / drain_s
        # Where the time goes: CPU seconds each process used while draining, as a share
        # of the wall time (2 cores here: 2.0 is the whole machine).
        cpu_share = {
            k: round((cpu_seconds(pid) - cpu0[k]) / drain_s, 2) for k, pid in services.items()
        }
        cpu_share["ingester"] = round(cpu_seconds(ing.pid) / drain_s, 2)
        stored = [r["msg_id"] for r in storage.scan_readings(db)]
        ids = {m for m in stored if m and m.startswith(f"{run}-")}
        lost = args.messages - len(ids)
        stored_docs = len(stored)

        naive = drain_naive(cfg, args.naive_messages)
        db_only = db_insert_rate(
            config.build({**data, "mongodb": {**data["mongodb"], "database": "bench_db_only"}})
        )

        # Latency at a steady rate, publish → stored (seen on the Redis live channel).
        latencies: list[float] = []
        ps = r.pubsub()
        ps.subscribe(keys.live)

        listening = threading.Event()
        listening.set()

        def listen() -> None:
            while listening.is_set():
                m = ps.get_message(timeout=0.2)
                if m is None or m["type"] != "message":
                    continue
                ts = datetime.fromisoformat(json.loads(m["data"])["timestamp"])
                latencies.append((datetime.now(UTC) - ts).total_seconds() * 1000)

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        count = int(args.rate * args.latency_seconds)
        sim = spawn("simulate", "--rate", str(args.rate), "--count", str(count), log="sim.log")
        sim.wait(args.latency_seconds * 3 + 60)
        time.sleep(1.0)
        listening.clear()
        listener.join()
        ps.close()
        sampler.running = False
        lat = sorted(latencies)

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(len(lat) * p))], 1) if lat else float("nan")

        print(
            json.dumps(
                {
                    "ingest_msgs_per_s": round(ingest_rate),
                    "ceiling_msgs_per_s": round(ceiling),
                    "naive_msgs_per_s": round(naive),
                    "ingest_vs_ceiling": round(ingest_rate / ceiling, 3),
                    "ingest_vs_naive": round(ingest_rate / naive, 1),
                    "p50_ms": pct(0.50),
                    "p99_ms": pct(0.99),
                    "latency_rate_msgs_per_s": args.rate,
                    "latency_samples": len(lat),
                    "rss_mb": round(sampler.peak, 1),
                    "lost": lost,
                    "duplicates": stored_docs - len(ids),
                    "disk_write_bytes_per_reading": round(db_written / max(1, stored_docs), 1),
                    "messages": args.messages,
                    "naive_messages": args.naive_messages,
                    "mongo_engine": stack.mongo.engine,
                    "cpu_cores_during_ingest": cpu_share,
                    # The storage layer alone, batches of 500 through its writer.
                    "db_insert_many_docs_per_s": round(db_only),
                    "ingest_vs_db_insert": round(ingest_rate / db_only, 3),
                    "latency_mean_ms": round(statistics.fmean(lat), 1) if lat else None,
                }
            )
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        stack.stop()


if __name__ == "__main__":
    main()
