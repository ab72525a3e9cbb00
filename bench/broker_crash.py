"""Broker crash benchmark: what a kill -9 of Mosquitto loses, and what persistence writes.

    .venv/bin/python bench/broker_crash.py [--rate 500] [--kills 3] [--min-s 12] [--max-s 23]
        [--settings interval_10,interval_1,changes_100,...] [--parallel 2] [--seed N]
        [--dir /var/tmp]

For each persistence setting a real Mosquitto (devstack.stack's
``Mosquitto``, configured by config/mosquitto/sensor-gateway.conf with the
setting under test appended) runs on a free loopback port, with its store on
disk (``--dir``, default /var/tmp: not a tmpfs). Two scenarios run side by
side, each on its own broker:

- ``offline``: the ingester's persistent session (MQTT 5, clean start off,
  session expiry 1 h) exists but its client is away, so every message queues:
  a MongoDB outage, or the ingester stopped.
- ``online``: a subscriber like the ingester is connected (manual
  acknowledgement of what it holds every 50 ms, as a batch would be): the
  steady state.

A publisher sends QoS 1 readings at ``--rate`` msg/s and counts the PUBACKed
ones; at a random moment (uniform in [min-s, max-s] seconds after the broker
started: past a first save period, then over one more) the broker is
killed with SIGKILL, restarted on the same store, and publishing goes on, for
``--kills`` crashes. At the end the subscriber drains its session and
``lost`` = acknowledged to the publisher − received, per crash. For
``online``, ``lost_if_held_dropped`` counts what the subscriber had received
but not yet acknowledged at the crash as lost (a client that drops its
unacknowledged messages on disconnect, expecting a redelivery that a crashed
broker cannot make), ``lost`` counts it as kept.

Write cost: ``write_bytes`` of /proc/<broker pid>/io (bytes the broker sent
to the disk) between start and kill, per minute; the broker's log goes to a
tmpfs (on a host it goes to journald), so this is the store alone. With it the
number of saves ("Saving in-memory database" log lines) and the size of
mosquitto.db at the kill. Mosquitto rewrites the whole store at every save
(write and fsync mosquitto.db.new, then rename it over mosquitto.db), so in
``offline`` the bytes per save grow with the backlog (``store_bytes_per_msg``).

Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devstack.stack import Mosquitto  # noqa: E402

# Candidate settings: lines appended to the broker configuration (the last
# occurrence of a Mosquitto option wins).
SETTINGS: dict[str, str] = {
    "interval_10": "autosave_on_changes false\nautosave_interval 10\n",
    "interval_5": "autosave_on_changes false\nautosave_interval 5\n",
    "interval_1": "autosave_on_changes false\nautosave_interval 1\n",
    "changes_1": "autosave_on_changes true\nautosave_interval 1\n",
    "changes_100": "autosave_on_changes true\nautosave_interval 100\n",
    "changes_1000": "autosave_on_changes true\nautosave_interval 1000\n",
}
# changes_1 (a save per message) is left out by default: it rewrites the whole
# store for every message, some GB per minute, and cannot keep up with 500 msg/s.
DEFAULT_SETTINGS = "interval_10,interval_5,interval_1,changes_100,changes_1000"

TOPIC = "sensors/temperature/bench-1"
SUB_ID = "bench-ingest"
SAVE_LINE = b"Saving in-memory database"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def payload(seq: int) -> bytes:
    # The shape and size of a simulator reading (about 130 bytes).
    return json.dumps(
        {
            "sensor_id": "bench-1",
            "kind": "temperature",
            "value": round(20 + (seq % 100) / 10, 1),
            "unit": "°C",
            "timestamp": "2024-01-01T00:00:00.000000+00:00",
            "msg_id": f"bench-1:{seq}",
            "seq": seq,
        }
    ).encode()


def seq_of(body: bytes) -> int:
    return json.loads(body)["seq"]


def client(broker: Mosquitto, user: str, client_id: str, *, manual_ack: bool = False):
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    c.username_pw_set(user, broker.passwords[user])
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    return c


def session_props() -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = 1000
    return props


def connect(c: mqtt.Client, broker: Mosquitto, clean_start: bool, timeout: float = 10.0) -> None:
    up = threading.Event()
    c.on_connect = lambda *a: up.set()
    c.connect("127.0.0.1", broker.port, keepalive=30, clean_start=clean_start,
              properties=session_props())  # fmt: skip
    c.loop_start()
    if not up.wait(timeout):
        raise TimeoutError("no CONNACK")


class Publisher:
    """QoS 1 at a steady rate; ``acked`` holds the sequence numbers PUBACKed with success."""

    def __init__(self, broker: Mosquitto, rate: float, first_seq: int, name: str) -> None:
        self.c = client(broker, "sensor-simulator", f"bench-pub-{name}")
        self.rate = rate
        self.seq = first_seq
        self.sent: list[tuple[int, mqtt.MQTTMessageInfo]] = []
        self.refused = 0
        self.c.on_publish = self._on_publish
        self.stop_flag = threading.Event()
        connect(self.c, broker, clean_start=True)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_publish(self, _c, _u, _mid, reason_code, _props) -> None:
        if reason_code.is_failure:
            self.refused += 1

    def _run(self) -> None:
        t0 = time.monotonic()
        n = 0
        while not self.stop_flag.is_set():
            due = t0 + n / self.rate
            now = time.monotonic()
            if due > now:
                time.sleep(min(due - now, 0.05))
                continue
            if not self.c.is_connected():
                return
            info = self.c.publish(TOPIC, payload(self.seq), qos=1)
            self.sent.append((self.seq, info))
            self.seq += 1
            n += 1

    def stop(self) -> set[int]:
        self.stop_flag.set()
        self.thread.join()
        self.c.loop_stop()
        # (A publish made as the broker died failed outright: rc is not success.)
        return {
            seq
            for seq, info in self.sent
            if info.rc == mqtt.MQTT_ERR_SUCCESS and info.is_published()
        }


class Subscriber:
    """The ingester's persistent session. Online it acknowledges what it holds every 50 ms."""

    def __init__(self, broker: Mosquitto, manual_ack: bool, subscribe: bool = False) -> None:
        self.c = client(broker, "sensor-ingest", SUB_ID, manual_ack=manual_ack)
        self.manual_ack = manual_ack
        self.delivered: set[int] = set()
        self.committed: set[int] = set()
        self.count = 0
        self.held: list[tuple[int, int]] = []
        self.lock = threading.Lock()
        self.last_msg = time.monotonic()
        self.c.on_message = self._on_message
        self.stop_flag = threading.Event()
        subscribed = threading.Event()
        self.c.on_subscribe = lambda *a: subscribed.set()
        # Clean start off even for the first connection, as the ingester does:
        # Mosquitto 2.0.11 saves a session to its store only if the client's
        # last CONNECT had clean start off (a session begun with clean start
        # on and an expiry interval lives in memory only).
        connect(self.c, broker, clean_start=False)
        if subscribe:
            self.c.subscribe(TOPIC.rsplit("/", 2)[0] + "/#", qos=1)
            if not subscribed.wait(10):
                raise TimeoutError("no SUBACK")
        self.thread = threading.Thread(target=self._acker, daemon=True)
        self.thread.start()

    def _on_message(self, _c, _u, msg: mqtt.MQTTMessage) -> None:
        seq = seq_of(msg.payload)
        with self.lock:
            self.last_msg = time.monotonic()
            self.count += 1
            self.delivered.add(seq)
            if self.manual_ack:
                self.held.append((seq, msg.mid))
            else:
                self.committed.add(seq)

    def _acker(self) -> None:
        while not self.stop_flag.wait(0.05):
            with self.lock:
                held, self.held = self.held, []
            for seq, mid in held:
                if self.c.ack(mid, 1) != mqtt.MQTT_ERR_SUCCESS:
                    break
                self.committed.add(seq)

    def drain(self, idle_s: float = 3.0, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if time.monotonic() - self.last_msg > idle_s and not self.held:
                    return
            time.sleep(0.1)
        raise TimeoutError("subscriber still receiving")

    def close(self) -> None:
        """Stop; what is held and not acknowledged is given up (not committed)."""
        self.stop_flag.set()
        self.thread.join()
        self.c.disconnect()
        self.c.loop_stop()


def write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/<pid>/io")


@dataclass
class Scenario:
    setting: str
    scenario: str
    root: Path
    log_dir: Path
    args: argparse.Namespace
    rng: random.Random
    result: dict = field(default_factory=dict)

    def make_broker(self) -> Mosquitto:
        b = Mosquitto(root=self.root, name=f"mosquitto-{self.setting}-{self.scenario}")
        b.prepare()
        conf = b.dir / "mosquitto.conf"
        # The log on a tmpfs, flushed per line (stdout is block-buffered and a
        # kill -9 would lose its tail), so that write_bytes counts the store only.
        self.log_file = self.log_dir / f"{b.name}.log"
        conf.write_text(
            conf.read_text()
            + f"log_dest none\nlog_dest file {self.log_file}\n"
            + "\n# bench/broker_crash.py: the setting under test\n"
            + SETTINGS[self.setting]
        )
        return b

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # reported in the JSON, the other runs go on
            self.result = {"error": f"{type(e).__name__}: {e}"}
            log(f"{self.setting}/{self.scenario}: {self.result['error']}")

    def _run(self) -> None:
        a = self.args
        online = self.scenario == "online"
        b = self.make_broker()
        # The session exists and is on disk before anything is measured (a
        # graceful stop saves the store): the steady state of a deployed host.
        b.start()
        Subscriber(b, manual_ack=True, subscribe=True).close()
        b.stop()

        crashes = []
        acked_by_crash: list[set[int]] = []
        seq = 0
        delivered: set[int] = set()
        committed: set[int] = set()
        deliveries = 0
        for k in range(a.kills):
            b.start()
            sub = Subscriber(b, manual_ack=True) if online else None
            logf = self.log_file
            pid = b.proc.pid
            log0, wb0, t0 = logf.stat().st_size, write_bytes(pid), time.monotonic()
            pub = Publisher(b, a.rate, seq, f"{self.setting}-{self.scenario}")
            time.sleep(self.rng.uniform(a.min_s, a.max_s))
            wb1, t1 = write_bytes(pid), time.monotonic()
            db = b.dir / "mosquitto.db"
            db_size = db.stat().st_size if db.exists() else 0
            b.kill()
            acked = pub.stop()
            seq = pub.seq
            if sub is not None:
                sub.close()
                with sub.lock:
                    delivered |= sub.delivered
                    committed |= sub.committed
                    deliveries += sub.count
            with logf.open("rb") as f:
                f.seek(log0)
                new_log = f.read()
            dt = t1 - t0
            db_written = wb1 - wb0
            crashes.append(
                {
                    "at_s": round(dt, 2),
                    "acked": len(acked),
                    "refused": pub.refused,
                    "saves": new_log.count(SAVE_LINE),
                    "db_bytes": db_size,
                    "written_bytes": db_written,
                    "written_bytes_per_min": round(db_written * 60 / dt),
                }
            )
            acked_by_crash.append(acked)
            log(f"{self.setting}/{self.scenario} crash {k + 1}: {crashes[-1]}")

        # Restart on the store and drain the session.
        b.start()
        sub = Subscriber(b, manual_ack=False)
        sub.drain()
        sub.close()
        b.stop()
        delivered |= sub.delivered
        committed |= sub.committed
        deliveries += sub.count
        in_store = 0
        for c, acked in zip(crashes, acked_by_crash, strict=True):
            c["lost"] = len(acked - delivered)
            if online:
                c["lost_if_held_dropped"] = len(acked - committed)
            else:
                # What the store at the crash held: everything queued and not lost.
                in_store += c["acked"] - c["lost"]
                c["store_bytes_per_msg"] = round(c["db_bytes"] / in_store) if in_store else None
        lost = [c["lost"] for c in crashes]
        minutes = sum(c["at_s"] for c in crashes) / 60
        written = sum(c["written_bytes"] for c in crashes)
        saves = sum(c["saves"] for c in crashes)
        self.result = {
            "lost_max": max(lost),
            "lost_mean": round(statistics.mean(lost), 1),
            **(
                {"lost_if_held_dropped_max": max(c["lost_if_held_dropped"] for c in crashes)}
                if online
                else {}
            ),
            # Deliveries of a message received before (a store older than an
            # acknowledgement brings it back): harmless, the ingester dedupes.
            "redelivered": deliveries - len(delivered),
            "saves_per_min": round(saves / minutes, 1),
            "written_bytes_per_min": round(written / minutes),
            "bytes_per_save": round(written / saves) if saves else 0,
            "crashes": crashes,
        }
        log(f"{self.setting}/{self.scenario}: {json.dumps(self.result)}")


def mosquitto_version() -> str:
    out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=500.0, help="messages per second")
    ap.add_argument("--kills", type=int, default=3, help="crashes per setting and scenario")
    # After a first save period (interval 10 saves every 11 s), over one more.
    ap.add_argument("--min-s", type=float, default=12.0, help="earliest crash after start")
    ap.add_argument("--max-s", type=float, default=23.0, help="latest crash after start")
    ap.add_argument("--parallel", type=int, default=2, help="settings measured at once")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"of {', '.join(SETTINGS)}")
    ap.add_argument("--scenarios", default="offline,online")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dir", default="/var/tmp", help="parent of the brokers' stores (a disk)")
    ap.add_argument("--keep", action="store_true", help="keep the brokers' folders")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(2**32)
    names = [s for s in a.settings.split(",") if s]
    if unknown := [s for s in names if s not in SETTINGS]:
        ap.error(f"unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    if not shutil.which("mosquitto") and not Path("/usr/sbin/mosquitto").exists():
        sys.exit("mosquitto is not installed (apt-get install mosquitto)")

    root = Path(tempfile.mkdtemp(prefix="sg-broker-crash-", dir=a.dir))
    log_dir = Path(tempfile.mkdtemp(prefix="sg-broker-crash-", dir="/dev/shm"))
    rng = random.Random(seed)
    started = time.monotonic()
    results: dict[str, dict] = {}
    try:
        # Each scenario of each setting has its own broker; --parallel settings
        # (all their scenarios) run side by side.
        runs = [
            Scenario(name, sc, root, log_dir, a, random.Random(rng.randrange(2**32)))
            for name in names
            for sc in a.scenarios.split(",")
            if sc
        ]
        per_group = max(1, a.parallel) * len([sc for sc in a.scenarios.split(",") if sc])
        for i in range(0, len(runs), per_group):
            threads = [threading.Thread(target=r.run) for r in runs[i : i + per_group]]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for r in runs:
            results.setdefault(r.setting, {})[r.scenario] = r.result
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(log_dir, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "broker_crash",
                "mosquitto": mosquitto_version(),
                "rate_msg_s": a.rate,
                "kills_per_setting": a.kills,
                "crash_window_s": [a.min_s, a.max_s],
                "seed": seed,
                "payload_bytes": len(payload(123456)),
                "duration_s": round(time.monotonic() - started),
                "settings": {k: SETTINGS[k].strip().replace("\n", "; ") for k in names},
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
