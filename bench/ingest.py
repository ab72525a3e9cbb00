"""Ingest benchmark: prints one JSON line of figures.

These subscribers drain the same backlog, published once, on the same
services in the same run (the broker queues a copy for each persistent
session):
- ceiling: a bare paho MQTT 5 subscriber that only decodes JSON (auto-ack),
           on paho's own client;
- ceiling_read_ahead: the same on the gateway's client (sensor_gateway.mqtt.Client:
           reads ahead, several packets per wake of paho's loop), which the
           ingester receives with;
- ingest:  `sensor-gateway ingest` as a process (validate, batch, append to the
           minute buckets and set the summaries, Redis, then acknowledge);
- naive:   one insert_one per message, acknowledged after it, as the systems
           this replaces do (run on a slice of the backlog: it is slow).
Then latency: the simulator publishes at a steady rate to the running
ingester, and a Redis live-channel subscriber times publish → stored.
`disk_write_bytes_per_reading`: bytes the database server wrote to storage
(`write_bytes` of its /proc/<pid>/io) while the ingester drained the backlog,
per stored reading: SD cards wear by bytes written.

Then ingest workers on a shared subscription (``$share/<group>/sensors/#``),
each configuration with a database, Redis prefix, client ids and share group
of its own, its sessions forgotten afterwards:
- workers_1 / workers_2: one worker (ingest.workers = 1), then two (workers =
  2, processes 0 and 1 started at once), each draining a backlog of
  --workers-messages published while its sessions were offline (the broker
  queues each message for one member, offline ones included); with the CPU
  each process used over the drain, in cores (CPU seconds / wall seconds);
- worker kill: two workers drain a 20,000-message backlog; worker 1 is killed
  with SIGKILL once about a third is stored, started again a second later;
  once all is stored and nothing changes for 3 s, the stored msg_ids are
  compared with the published ones (lost, duplicates).
Every wait there has a deadline; a failure is reported as ``workers_error``
next to the figures above.

Usage: python bench/ingest.py [--messages 60000] [--naive-messages 3000]
       [--rate 1000] [--latency-seconds 15] [--workers-messages (--messages)]
       [--kill-messages 20000] [--skip-workers]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import tomli_w

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devstack.notify import NotifySocket  # noqa: E402
from devstack.stack import Stack, forget_session  # noqa: E402
from sensor_gateway import cache, config, storage  # noqa: E402
from sensor_gateway.ingest.ingester import CONNECTING_STATUS  # noqa: E402
from sensor_gateway.mqtt import Client as GatewayClient  # noqa: E402
from sensor_gateway.mqtt import make_client, session_properties  # noqa: E402

TOPIC = "sensors/#"


def persistent_subscriber(
    cfg, client_id: str, manual_ack: bool, on_message, client_class=mqtt.Client
) -> mqtt.Client:
    """paho's own client unless told otherwise: the ceiling and the naive
    subscriber are what a plain paho program gets."""
    c = make_client(
        cfg,
        client_id,
        cfg.ingest.mqtt_username,
        cfg.ingest.mqtt_password_file,
        manual_ack=manual_ack,
        client_class=client_class,
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


def publish_backlog(cfg, n: int, run: str, timeout: float | None = None) -> None:
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
        timeout=timeout,
    )


def timed_drain(
    cfg, client_id: str, manual_ack: bool, on_message, done: threading.Event, **kw
) -> float:
    """Seconds from connecting a subscriber to its backlog until ``done`` is set."""
    t0 = time.perf_counter()
    c = persistent_subscriber(cfg, client_id, manual_ack, on_message, **kw)
    assert done.wait(600), f"{client_id} did not drain its backlog"
    elapsed = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return elapsed


def drain_bare(cfg, n: int, client_id: str = "bench-bare", **kw) -> float:
    got = 0
    done = threading.Event()

    def on_message(client, userdata, msg):
        nonlocal got
        json.loads(msg.payload)
        got += 1
        if got >= n:
            done.set()

    return n / timed_drain(cfg, client_id, False, on_message, done, **kw)


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


# -- ingest workers on a shared subscription ------------------------------------------


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        merge = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if merge else v
    return out


def wait_until(pred, timeout: float, what: str, interval: float = 0.05, check=None):
    """Poll ``pred`` until it is true; ``check`` raises if a process died."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if check:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent on something (all cores)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


class WorkerSet:
    """`sensor-gateway ingest` processes of one configuration: workers = n, with a
    database, a Redis prefix, client ids and a share group of its own."""

    def __init__(self, root: Path, base: dict, tag: str, workers: int, env: dict) -> None:
        self.root = root
        self.tag = tag
        self.workers = workers
        self.env = env
        self.data = deep_merge(
            base,
            {
                "mongodb": {"database": f"bench_{tag}"},
                "redis": {"key_prefix": f"bench-{tag}:"},
                "ingest": {
                    "client_id": f"bench-ingest-{tag}",
                    "workers": workers,
                    "share_group": f"bench-{tag}",
                },
            },
        )
        self.path = root / f"gateway-{tag}.toml"
        self.path.write_text(tomli_w.dumps(self.data))
        self.cfg = config.build(copy.deepcopy(self.data))
        self.keys = cache.Keys(self.cfg.redis.key_prefix)
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}
        self.spawned = 0

    def client_ids(self) -> list[str]:
        base = self.cfg.ingest.client_id
        return [f"{base}-{w}" if w else base for w in range(self.workers)]

    def spawn(self, w: int) -> subprocess.Popen:
        self.spawned += 1
        log = self.root / f"ingest-{self.tag}-w{w}-{self.spawned}.log"
        p = subprocess.Popen(
            [sys.executable, "-m", "sensor_gateway", "-c", str(self.path), "ingest"],
            stdout=open(log, "wb"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            env={**self.env, "SENSOR_GATEWAY_INGEST__WORKER": str(w)},
            cwd=REPO,
        )
        self.procs[w], self.logs[w] = p, log
        return p

    def check_alive(self) -> None:
        for w, p in self.procs.items():
            if p.poll() is not None:
                tail = self.logs[w].read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{self.tag} worker {w} exited ({p.returncode}):\n{tail}")

    def wait_subscribed(self, timeout: float = 60) -> None:
        for w in self.procs:
            wait_until(
                lambda w=w: "subscribed to" in self.logs[w].read_text(errors="replace"),
                timeout,
                f"{self.tag} worker {w} to subscribe",
                interval=0.1,
                check=self.check_alive,
            )

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to all at once, as systemctl stop would; each must exit 0."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for w, p in self.procs.items():
            rc = p.wait(timeout)
            if rc != 0:
                raise RuntimeError(f"{self.tag} worker {w} exited {rc} on SIGTERM")
        self.procs.clear()

    def create_sessions(self) -> None:
        """Start every worker once (its persistent session and its member of the
        shared subscription), then stop them: what is published next waits there."""
        for w in range(self.workers):
            self.spawn(w)
        self.wait_subscribed()
        self.stop()

    def stored_counter(self, r) -> int:
        """The workers' own count of readings stored (Redis, one hash per worker,
        written with each batch). Counted from 0 by each process."""
        return sum(
            int(r.hget(self.keys.worker_counters(w), "stored") or 0) for w in range(self.workers)
        )

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs.clear()
        for cid in self.client_ids():
            forget_session(self.cfg, cid)
        try:
            db = storage.connect(self.cfg)
            db.client.drop_database(db.name)
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


def stored_ids(db, run: str) -> Counter:
    return Counter(
        m for m in (d.get("msg_id") for d in storage.scan_readings(db)) if m and m.startswith(run)
    )


def drain_workers(ws: WorkerSet, services: dict[str, int], n: int, timeout: float) -> dict:
    """Workers draining a backlog of n published while their sessions were offline:
    msgs/s from starting them (all at once) until their counters reach n, and the
    cores each process used meanwhile."""
    ws.create_sessions()
    run = f"{ws.tag}{os.urandom(3).hex()}"
    publish_backlog(ws.cfg, n, run, timeout=timeout)
    r = cache.connect(ws.cfg)
    cpu0 = {k: cpu_seconds(pid) for k, pid in services.items()}
    me0 = cpu_seconds(os.getpid())
    busy0 = busy_cpu_seconds()
    t0 = time.perf_counter()
    for w in range(ws.workers):
        ws.spawn(w)
    wait_until(
        lambda: ws.stored_counter(r) >= n, timeout, f"{ws.tag}: {n} stored", check=ws.check_alive
    )
    wall = time.perf_counter() - t0
    busy = busy_cpu_seconds() - busy0
    secs = {f"ingest{w}": cpu_seconds(p.pid) for w, p in ws.procs.items()}
    for k, pid in services.items():
        secs[k] = cpu_seconds(pid) - cpu0[k]
    secs["bench"] = cpu_seconds(os.getpid()) - me0
    # The whole machine, and what of it none of the above used (anything else
    # running meanwhile, the kernel's share of loopback traffic).
    secs["others"] = busy - sum(secs.values())
    secs["machine"] = busy
    cores = {k: round(v / wall, 2) for k, v in secs.items()}
    ws.stop()
    ids = stored_ids(storage.connect(ws.cfg), f"{run}-")
    return {
        "msgs_per_s": n / wall,
        "cpu": cores,
        "lost": n - len(ids),
        "duplicates": ids.total() - len(ids),
    }


def worker_kill(ws: WorkerSet, n: int, timeout: float, settle_s: float = 3.0) -> dict:
    """Two workers drain a backlog of n; worker 1 is killed with SIGKILL once about
    a third is stored and started again a second later. Lost and doubled msg_ids
    once everything is stored and nothing changed for settle_s."""
    ws.create_sessions()
    run = f"{ws.tag}{os.urandom(3).hex()}"
    publish_backlog(ws.cfg, n, run, timeout=timeout)
    db = storage.connect(ws.cfg)
    r = cache.connect(ws.cfg)
    for w in range(ws.workers):
        ws.spawn(w)
    # The counters (cheap to poll, unlike a scan of the readings, which would load
    # the database) move a batch at a time: the kill comes at a third or a bit after.
    wait_until(
        lambda: ws.stored_counter(r) >= n // 3,
        timeout,
        f"{ws.tag}: a third stored",
        interval=0.02,
        check=ws.check_alive,
    )
    victim = ws.procs[1]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(30)
    del ws.procs[1]
    at_kill = storage.count_readings(db)
    # What worker 1 had stored of its share (about n / workers) when killed.
    w1_at_kill = int(r.hget(ws.keys.worker_counters(1), "stored") or 0)
    time.sleep(1.0)
    ws.spawn(1)
    # Not raising when n is never reached: what is missing is the answer (lost).
    deadline = time.monotonic() + timeout
    count = storage.count_readings(db)
    while count < n and time.monotonic() < deadline:
        ws.check_alive()
        time.sleep(0.2)
        count = storage.count_readings(db)
    stable_since = time.monotonic()
    while time.monotonic() - stable_since < settle_s and time.monotonic() < deadline + 30:
        time.sleep(0.5)
        now = storage.count_readings(db)
        if now != count:
            count, stable_since = now, time.monotonic()
    ws.check_alive()
    # What the restarted worker 1 received again and found already stored: the
    # broker redelivered what was in flight to it at the kill.
    deduplicated = int(r.hget(ws.keys.worker_counters(1), "duplicates") or 0)
    ws.stop()
    ids = stored_ids(db, f"{run}-")
    expected = {f"{run}-{i}" for i in range(1, n + 1)}
    return {
        "lost": len(expected - set(ids)),
        "duplicates": ids.total() - len(ids),
        "unexpected": len(set(ids) - expected),
        "stored_at_kill": at_kill,
        "worker1_stored_at_kill": w1_at_kill,
        "deduplicated": deduplicated,
    }


def run_workers(root: Path, base: dict, env: dict, stack: Stack, args) -> dict:
    """The workers figures; any failure is reported, not raised (the figures of
    the single ingester stand on their own)."""
    services = {
        stack.mongo.engine or "mongodb": stack.mongo.proc.pid,
        "mosquitto": stack.mosquitto.proc.pid,
        "redis": stack.redis.proc.pid,
    }
    out: dict = {"cpu_count": psutil.cpu_count()}
    timeout = max(120.0, args.workers_messages / 100)
    try:
        results = {}
        for tag, workers in (("w1", 1), ("w2", 2)):
            ws = WorkerSet(root, base, tag, workers, env)
            try:
                results[tag] = drain_workers(ws, services, args.workers_messages, timeout)
            finally:
                ws.close()
        w1, w2 = results["w1"]["msgs_per_s"], results["w2"]["msgs_per_s"]
        out |= {
            "workers_1_msgs_per_s": round(w1),
            "workers_2_msgs_per_s": round(w2),
            "workers_2_ratio": round(w2 / w1, 3),
            "workers_cpu": {tag: res["cpu"] for tag, res in results.items()},
            "workers_drain_lost_duplicates": {
                tag: [res["lost"], res["duplicates"]] for tag, res in results.items()
            },
            "workers_messages": args.workers_messages,
        }
        ws = WorkerSet(root, base, "wk", 2, env)
        try:
            kill = worker_kill(ws, args.kill_messages, max(120.0, args.kill_messages / 100))
        finally:
            ws.close()
        out |= {
            "worker_kill_lost": kill["lost"],
            "worker_kill_duplicates": kill["duplicates"],
            "worker_kill_unexpected": kill["unexpected"],
            "worker_kill_stored_at_kill": kill["stored_at_kill"],
            "worker_kill_worker1_stored_at_kill": kill["worker1_stored_at_kill"],
            "worker_kill_restarted_deduplicated": kill["deduplicated"],
            "worker_kill_messages": args.kill_messages,
        }
    except Exception as exc:  # noqa: BLE001 - reported in the JSON line, traceback on stderr
        traceback.print_exc()
        out["workers_error"] = f"{type(exc).__name__}: {exc}"[:500]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=60000)
    ap.add_argument("--naive-messages", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--latency-seconds", type=float, default=15)
    ap.add_argument("--workers-messages", type=int, default=0, help="default: --messages")
    ap.add_argument("--kill-messages", type=int, default=20000)
    ap.add_argument("--skip-workers", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the services' folder and logs")
    args = ap.parse_args()
    args.workers_messages = args.workers_messages or args.messages

    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    stack = Stack(root=root)
    stack.start()
    procs: list[subprocess.Popen] = []
    finished = False
    try:
        data = stack.config_dict(database="bench")
        cfg_path = root / "gateway.toml"
        cfg_path.write_text(tomli_w.dumps(data))
        cfg = config.build(data)
        env = {**os.environ, "PYTHONPATH": str(REPO)}

        def spawn(*a: str, log: str, extra_env: dict | None = None) -> subprocess.Popen:
            p = subprocess.Popen(
                [sys.executable, "-m", "sensor_gateway", "-c", str(cfg_path), *a],
                stdout=open(root / log, "wb"),  # noqa: SIM115 - the child owns it
                stderr=subprocess.STDOUT,
                env={**env, **(extra_env or {})},
                cwd=REPO,
            )
            procs.append(p)
            return p

        sessions = ("bench-bare", "bench-bare-read-ahead", "bench-naive", cfg.ingest.client_id)
        for cid in sessions:
            create_session(cfg, cid)
        run = "b" + os.urandom(3).hex()
        publish_backlog(cfg, args.messages, run)

        ceiling = drain_bare(cfg, args.messages)
        # The same bare subscriber on the gateway's own client (sensor_gateway.mqtt:
        # reads ahead, several packets per wake), which the ingester receives with.
        ceiling_read_ahead = drain_bare(
            cfg, args.messages, "bench-bare-read-ahead", client_class=GatewayClient
        )

        db = storage.connect(cfg)
        r = cache.connect(cfg)
        keys = cache.Keys(cfg.redis.key_prefix)
        services = {
            "mongodb": stack.mongo.proc.pid,
            "mosquitto": stack.mosquitto.proc.pid,
            "redis": stack.redis.proc.pid,
        }
        # The drain is timed from the moment the ingester opens its broker
        # connection, as the bare subscriber's is from its connect: interpreter
        # start-up, imports and database checks are not ingest. Its sd_notify
        # STATUS turns to "waiting for the MQTT subscription" just before.
        notify = NotifySocket(root / "notify.sock")
        spawned = time.perf_counter()
        ing = spawn("ingest", log="ingest.log", extra_env={"NOTIFY_SOCKET": notify.path})
        sampler = RssSampler(ing.pid)
        sampler.start()
        t0 = notify.first(f"STATUS={CONNECTING_STATUS}", 120)
        notify.close()
        if t0 is None:
            raise SystemExit("the ingester never began connecting to the broker")
        cpu0 = {k: cpu_seconds(pid) for k, pid in services.items()}
        ing_cpu0 = cpu_seconds(ing.pid)
        written0 = write_bytes(stack.mongo.proc.pid)
        while int(r.hget(keys.counters, "stored") or 0) < args.messages:
            if ing.poll() is not None:
                raise SystemExit((root / "ingest.log").read_text()[-2000:])
            time.sleep(0.01)
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
        cpu_share["ingester"] = round((cpu_seconds(ing.pid) - ing_cpu0) / drain_s, 2)
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
                now = datetime.now(UTC)
                for reading in cache.live_readings(m["data"]):
                    ts = datetime.fromisoformat(reading["timestamp"])
                    latencies.append((now - ts).total_seconds() * 1000)

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

        workers: dict = {}
        if not args.skip_workers:
            # Nothing else may take the broker's messages or the CPU: the ingester
            # leaves, and the sessions above are forgotten (they would queue a copy).
            ing.terminate()
            try:
                ing.wait(30)
            except subprocess.TimeoutExpired:
                ing.kill()
                ing.wait()
            for cid in sessions:
                forget_session(cfg, cid)
            workers = run_workers(root, data, env, stack, args)

        print(
            json.dumps(
                {
                    "ingest_msgs_per_s": round(ingest_rate),
                    # Process start to its broker connection (not in the rate).
                    "ingest_startup_s": round(t0 - spawned, 2),
                    "ceiling_msgs_per_s": round(ceiling),
                    "naive_msgs_per_s": round(naive),
                    "ingest_vs_ceiling": round(ingest_rate / ceiling, 3),
                    "ceiling_read_ahead_msgs_per_s": round(ceiling_read_ahead),
                    "ingest_vs_read_ahead_ceiling": round(ingest_rate / ceiling_read_ahead, 3),
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
                    **workers,
                }
            )
        )
        finished = True
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        stack.stop()
        # A failed run keeps its logs for a look; a finished one tidies up.
        if finished and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"services' folder and logs kept in {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
