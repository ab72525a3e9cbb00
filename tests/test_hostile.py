"""Nothing stops ingestion, nothing is silently dropped, nobody writes as another.

Each class of payload that once stopped the ingester goes through the real
daemon; MongoDB errors are classified (a refused document becomes a reject, a
wrong password stops the unit visibly); SIGTERM with a deep backlog stops in
time and loses nothing; devices that reuse ids keep every reading; a device
with its own credentials cannot publish as another.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from bson import ObjectId

from devstack.stack import Stack
from sensor_gateway import layout, queries, storage
from sensor_gateway.ingest import EXIT_PERMANENT, Ingester
from sensor_gateway.ingest.receive import PACKET_OVERHEAD, Incoming
from sensor_gateway.ingest.validate import Validated
from sensor_gateway.mqtt import make_client
from sensor_gateway.writer import Writer
from tests.helpers import Gateway, wait_for

HUGE = "1" + "0" * 400
# (payload, what the reject's reason says): each of these once stopped the
# ingester (an exception in the loop, the message never acknowledged, the same
# crash at every restart) or could have.
HOSTILE: list[tuple[bytes, str]] = [
    (b'{"value": ' + HUGE.encode() + b"}", "out of range"),
    (b'{"status": ' + HUGE.encode() + b"}", "status must be an integer"),
    (b'{"value": 1, "timestamp": "0001-01-01T00:00:00+01:00"}', "outside years 1-9999"),
    (b'{"value": 1, "timestamp": "9999-12-31T23:59:59-01:00"}', "outside years 1-9999"),
    (b"[" * 10000, "nested deeper"),
    (b'{"value": 1, "unit": "\xff\xfe"}', "not UTF-8"),
    (rb'{"value": 1, "unit": "\ud800"}', "not JSON"),
    (rb'{"value": 1, "msg_id": "a\u0000b"}', "control"),
    (b'{"value": 1, "sensor_id": "t1\\n"}', "sensor_id"),
    (b'{"value": "' + HUGE.encode() + b'"}', "numeric string"),
]


def publish_raw(gw: Gateway, items: list[tuple[str, bytes]]) -> None:
    pub = gw.raw_publisher()
    try:
        for topic, payload in items:
            pub.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        pub.disconnect()
        pub.loop_stop()


def test_hostile_payloads_are_rejects_and_the_real_daemon_keeps_running(gateway: Gateway) -> None:
    proc = gateway.spawn_ingester()
    items: list[tuple[str, bytes]] = []
    for i, (payload, _) in enumerate(HOSTILE):
        items.append(("sensors/temperature/t1", payload))
        good = {"msg_id": f"good-{i}", "value": i, "timestamp": "2026-11-24T11:00:00Z"}
        items.append(("sensors/temperature/t1", json.dumps(good).encode()))
    publish_raw(gateway, items)
    gateway.wait_stored(len(HOSTILE), timeout=30)
    wait_for(
        lambda: gateway.db[storage.REJECTED].count_documents({}) >= len(HOSTILE),
        30,
        what="every hostile message recorded as a reject",
    )
    assert proc.poll() is None, proc.log_path.read_text()
    reasons = [r["reason"] for r in gateway.db[storage.REJECTED].find().sort("received_at", 1)]
    assert len(reasons) == len(HOSTILE)
    for (payload, expected), reason in zip(HOSTILE, reasons, strict=True):
        assert expected in reason, (payload[:60], reason)
    assert sorted(r["msg_id"] for r in gateway.readings()) == sorted(
        f"good-{i}" for i in range(len(HOSTILE))
    )
    # Every one was acknowledged: a restart gets none of them again.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    proc = gateway.spawn_ingester()
    time.sleep(2)
    assert gateway.db[storage.REJECTED].count_documents({}) == len(HOSTILE)
    assert gateway.stored() == len(HOSTILE)
    assert "Traceback" not in proc.log_path.read_text()


# -- MongoDB errors, classified -------------------------------------------------------


def _incoming(topic: str, payload: bytes) -> Incoming:
    now = datetime.now(UTC)
    return Incoming(1, 1, topic, payload, now, time.monotonic(), 1)


TS = datetime(2026, 11, 24, 11, 0, 0, tzinfo=UTC)


def _reading(key: str, sensor_id: str = "s", value: object = 1.0) -> dict:
    """A reading as payload.parse makes it (``_id``: its dedupe key)."""
    return {
        "_id": key,
        "sensor_id": sensor_id,
        "kind": "k",
        "value": value,
        "ts": TS,
        "topic": f"sensors/k/{sensor_id}",
    }


def _write_within(ing: Ingester, v: Validated, seconds: float = 15.0) -> list[dict]:
    """The write stage (BatchStore.write), stopped after ``seconds`` (it retries what it holds until
    stopped, and then raises the last error)."""
    timer = threading.Timer(seconds, ing.stop_event.set)
    timer.start()
    try:
        return ing.store.write(v)
    finally:
        timer.cancel()


def test_a_bucket_the_server_refuses_becomes_rejects(gateway: Gateway) -> None:
    db = gateway.db
    us = layout.to_us(TS)
    # A bucket whose arrays are not arrays: every engine refuses to append to it.
    db[layout.SAMPLES].insert_one(
        {
            "_id": layout.bucket_id("bad", us),
            "s": "bad",
            "b": layout.floor(us, layout.US_MINUTE),
            **dict.fromkeys(("t", "v", "k", "ai", "mi"), ""),
        }
    )
    bucket = layout.bucket_id("s", us)
    good = [_reading(f"g{i}") for i in range(3)]
    refused_by_server = _reading("r0", "bad")
    out = Writer(db).write([good[0], refused_by_server, good[1]])
    assert [d["_id"] for d in out.new] == [layout.reading_id(bucket, p) for p in (0, 1)]
    assert [d is refused_by_server for d, _ in out.refused] == [True]
    assert "MongoDB refused the reading's bucket" in out.refused[0][1]
    out = Writer(db).write([_reading("r1", "bad"), good[2]])
    assert [d["_id"] for d in out.new] == [layout.reading_id(bucket, 2)]
    assert [d["_id"] for d, _ in out.refused] == ["r1"]
    assert gateway.stored() == 3
    assert queries.count_all(db) == 3  # what was refused is not counted either

    # Through the ingester's write stage: the refused reading is kept as a reject.
    ing = Ingester(gateway.cfg)
    v = Validated(readings=[_reading("r2", "bad"), _reading("g9")])
    new = _write_within(ing, v)
    assert [d["_id"] for d in new] == [layout.reading_id(bucket, 3)]
    rejected = list(db[storage.REJECTED].find())
    assert len(rejected) == 1 and "MongoDB refused the reading" in rejected[0]["reason"]


def test_a_reading_bson_cannot_encode_becomes_a_reject(gateway: Gateway) -> None:
    db = gateway.db
    bucket = layout.bucket_id("s", layout.to_us(TS))
    # Refusals are per bucket (layout.py): the unencodable reading is another sensor's.
    refused_by_bson = _reading("b1", "b", value=2**70)
    out = Writer(db).write([refused_by_bson, _reading("g0")])
    assert [d["_id"] for d in out.new] == [layout.reading_id(bucket, 0)]
    assert [d is refused_by_bson for d, _ in out.refused] == [True]
    # The reason names the cause (the old store said "cannot be stored as BSON: ...").
    assert "can only handle up to 8-byte ints" in out.refused[0][1]
    assert gateway.stored() == 1

    # Through the ingester's write stage: kept as a reject, the batch's others stored.
    ing = Ingester(gateway.cfg)
    v = Validated(readings=[_reading("b2", "b", value=2**70), _reading("g9")])
    new = _write_within(ing, v)
    assert [d["_id"] for d in new] == [layout.reading_id(bucket, 1)]
    rejected = list(db[storage.REJECTED].find())
    assert len(rejected) == 1 and "8-byte ints" in rejected[0]["reason"]


def test_a_segment_written_behind_the_writers_back_is_not_overwritten(gateway: Gateway) -> None:
    """A minute's new segments are inserted; if one exists already (what the writer
    knew is stale: another writer of its lane), the insert fails, the batch is
    held, and the retry reads the minute again: every reading stored once."""
    db = gateway.db
    seg = layout.SEGMENT
    stale, other = Writer(db), Writer(db)
    stale.write([_reading(f"a{i}") for i in range(seg)])  # segment 0, full
    other.write([_reading(f"a{i}") for i in range(seg)])  # reads it: all duplicates
    other.write([_reading(f"b{i}") for i in range(seg)])  # opens segment 1
    batch = [_reading(f"c{i}") for i in range(seg)]  # the stale writer opens segment 1 too
    with pytest.raises(Exception) as held:
        stale.write([dict(r) for r in batch])
    assert storage.classify(held.value) != storage.PERMANENT
    out = stale.write([dict(r) for r in batch])
    assert len(out.new) == seg and not out.refused
    keys = [k for d in db[layout.SAMPLES].find() for k in d["k"]]
    assert sorted(keys) == sorted([f"{x}{i}" for x in "abc" for i in range(seg)])
    assert queries.count_all(db) == 3 * seg


def test_a_retried_batch_of_rejects_is_stored_once(gateway: Gateway) -> None:
    rejects = [{"topic": "t", "payload": "x", "reason": "r", "received_at": datetime.now(UTC)}]
    assert storage.insert_rejects(gateway.db, rejects) == []
    # insert_many gave it an _id; a retry after a lost answer sends the same one.
    assert isinstance(rejects[0]["_id"], ObjectId)
    assert storage.insert_rejects(gateway.db, rejects) == []
    assert gateway.db[storage.REJECTED].count_documents({}) == 1


@pytest.fixture
def auth_stack(tmp_path: Path):
    s = Stack(root=tmp_path / "stack", mongo_auth=("gw", "gateway", "right-password"))
    s.start()
    yield s
    for svc in (s.mosquitto, s.redis, s.mongo):
        svc.kill()


def _auth_gateway(stack: Stack, tmp_path: Path, password: str) -> Gateway:
    gw = Gateway(stack, tmp_path, uuid.uuid4().hex[:8])
    secret = tmp_path / f"mongo-password-{gw.tag}"
    secret.write_text(password)
    gw.set(mongodb={"database": "gw", "username": "gateway", "password_file": str(secret)})
    return gw


def test_wrong_mongodb_password_fails_visibly(auth_stack: Stack, tmp_path: Path) -> None:
    wrong = _auth_gateway(auth_stack, tmp_path, "wrong-password")
    started = time.monotonic()
    proc = wrong.spawn("ingest")
    try:
        code = proc.wait(60)
    except Exception:
        proc.kill()
        raise
    log = proc.log_path.read_text()
    print(f"exit {code} after {time.monotonic() - started:.1f}s")
    assert code == EXIT_PERMANENT, log
    assert "MongoDB refuses the ingester" in log and "not retrying" in log
    assert "ERROR" in log

    # The same stack with the right password ingests: it was the password.
    right = _auth_gateway(auth_stack, tmp_path, "right-password")
    try:
        right.spawn_ingester()
        right.publish(20)
        right.wait_stored(20, timeout=30)
    finally:
        right.close()


def test_permanent_error_while_running_stops_the_ingester(
    auth_stack: Stack, tmp_path: Path
) -> None:
    """A permanent error on a write (rights withdrawn, password rotated) is not retried."""
    gw = _auth_gateway(auth_stack, tmp_path, "right-password")
    ing = gw.start_ingester()
    gw.publish(10)
    gw.wait_stored(10, timeout=30)
    # The driver authenticates each new connection: make the next ones fail.
    ing.db.client.close()
    ing.db = storage.connect(
        _auth_gateway(auth_stack, tmp_path, "rotated-password").cfg, appname="t"
    )
    # The write stage and its writer append through the same connection.
    ing.store.db = ing.store.writer.db = ing.db
    gw.publish(5)
    thread = gw.ingesters[0][1]
    thread.join(30)
    assert not thread.is_alive(), "the ingester kept retrying a permanent error"
    assert ing.fatal and "Authentication" in ing.fatal
    gw.ingesters.clear()


# -- stopping ------------------------------------------------------------------------


def test_sigterm_with_100k_queued_stops_in_time_and_loses_nothing(gateway: Gateway) -> None:
    n = 100_000
    # Counting 100k documents on FerretDB under write load takes seconds.
    gateway.set(mongodb={"timeout_ms": 30_000})
    # A first run creates the ingester's persistent session; the broker then
    # queues for it while it is away.
    proc = gateway.spawn_ingester()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    sim = gateway.publish(n, rate=40_000)
    proc = gateway.spawn_ingester()
    wait_for(lambda: gateway.stored() > 5000, 60, what="the backlog to start draining")
    asked = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)  # the unit's TimeoutStopSec
    took = time.monotonic() - asked
    stored_at_stop = gateway.stored()
    print(f"stopped in {took:.2f}s with {stored_at_stop} of {n} stored")
    assert code == 0, proc.log_path.read_text()
    assert stored_at_stop < n, "the backlog was gone before the stop: nothing tested"
    log = proc.log_path.read_text()
    assert "left to the broker" in log
    # The rest is still the broker's: a new run stores it, each reading once.
    gateway.spawn_ingester()
    gateway.wait_stored(n, timeout=240)
    ids = [r["msg_id"] for r in gateway.readings()]
    assert len(ids) == n
    assert set(ids) == {f"{sim.run_id}-{i}" for i in range(1, n + 1)}


# -- memory bounded across reconnects ------------------------------------------------


def test_messages_of_an_earlier_connection_do_not_pile_up(private_gateway: Gateway) -> None:
    gw = private_gateway
    gw.set(ingest={"batch_size": 100, "inflight_batches": 2})
    ing = gw.start_ingester()
    assert ing.receiver.maximum_packet_size == gw.cfg.ingest.max_payload_bytes + PACKET_OVERHEAD
    gw.stack.mongo.stop()  # the ingester holds a batch, the broker queues the rest
    sim = gw.publish(3000, rate=5000)
    highest = 0
    for _ in range(3):
        time.sleep(2)
        gw.stack.mosquitto.restart()
        wait_for(ing.receiver.subscribed.is_set, 30, what="the ingester to resubscribe")
        time.sleep(1)
        held = ing.receiver.queue.qsize() + ing.receiver.stale_count
        highest = max(highest, held)
        # This connection's window, plus at most what the last one left unredelivered.
        assert held <= 2 * ing.receiver.receive_maximum, held
    assert ing.counters.dropped_stale > 0
    print(f"dropped_stale={ing.counters.dropped_stale} highest queue={highest}")
    gw.stack.mongo.start()
    gw.wait_stored(3000, timeout=120)
    ids = [r["msg_id"] for r in gw.readings()]
    assert sorted(ids) == sorted(f"{sim.run_id}-{i}" for i in range(1, 3001))


# -- the dedupe key through the pipeline ---------------------------------------------


def test_redelivery_once_reused_ids_every_time(gateway: Gateway) -> None:
    gateway.start_ingester()
    ts1, ts2 = "2026-11-24T11:00:00Z", "2026-11-24T12:00:00Z"
    a1 = json.dumps({"sensor_id": "a", "msg_id": "1", "value": 5, "timestamp": ts1}).encode()
    b1 = json.dumps({"sensor_id": "b", "msg_id": "1", "value": 5, "timestamp": ts1}).encode()
    a1_after_reboot = json.dumps(
        {"sensor_id": "a", "msg_id": "1", "value": 5, "timestamp": ts2}
    ).encode()
    publish_raw(
        gateway,
        [
            ("sensors/temperature", a1),
            ("sensors/temperature", a1),  # a publisher's re-send: the same reading
            ("sensors/temperature", b1),  # another device, the same msg_id
            ("sensors/temperature", a1_after_reboot),  # the counter restarted
            # No clock, counter restarted, same value: told apart by the packet id.
            ("sensors/status/c", b'{"msg_id": "1", "status": 3}'),
            ("sensors/status/c", b'{"msg_id": "1", "status": 3}'),
        ],
    )
    gateway.wait_stored(5, timeout=20)
    time.sleep(1)
    rows = sorted((r["sensor_id"], r["msg_id"], r["ts"].isoformat()) for r in gateway.readings())
    assert len(rows) == 5, rows
    assert [r[0] for r in rows] == ["a", "a", "b", "c", "c"]


# -- device identity -----------------------------------------------------------------


@pytest.fixture
def device_stack(tmp_path: Path):
    s = Stack(root=tmp_path / "stack", device_users=("dev-a", "dev-b"))
    s.start()
    yield s
    for svc in (s.mosquitto, s.redis, s.mongo):
        svc.kill()


def _device_client(gw: Gateway, user: str) -> mqtt.Client:
    c = make_client(
        gw.cfg, f"{user}-{gw.tag}", user, str(gw.stack.secrets_dir / f"mqtt-{user}-password")
    )
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect(gw.cfg.mqtt.host, gw.cfg.mqtt.port)
    c.loop_start()
    assert connected.wait(10)
    return c


def test_a_device_cannot_publish_as_another(device_stack: Stack, tmp_path: Path) -> None:
    gw = Gateway(device_stack, tmp_path, uuid.uuid4().hex[:8])
    gw.set(ingest={"topic_identity": True})
    try:
        gw.start_ingester()
        dev_a = _device_client(gw, "dev-a")
        codes: dict[int, object] = {}
        dev_a.on_publish = lambda c, u, mid, rc, props: codes.__setitem__(mid, rc)
        own = dev_a.publish("sensors/temperature/dev-a", b'{"value": 1}', qos=1)
        other_topic = dev_a.publish("sensors/temperature/dev-b", b'{"value": 2}', qos=1)
        claims_other = dev_a.publish(
            "sensors/temperature/dev-a", b'{"value": 3, "sensor_id": "dev-b"}', qos=1
        )
        for info in (own, other_topic, claims_other):
            info.wait_for_publish(10)
        # The broker refuses the write under another device's topic.
        assert codes[other_topic.mid].is_failure, codes[other_topic.mid]
        assert str(codes[other_topic.mid]) == "Not authorized"
        gw.wait_stored(1, timeout=20)
        wait_for(lambda: gw.db[storage.REJECTED].count_documents({}) == 1, 20, what="reject")
        time.sleep(1)
        assert [(r["sensor_id"], r["value"]) for r in gw.readings()] == [("dev-a", 1.0)]
        reject = gw.db[storage.REJECTED].find_one()
        assert "claims sensor_id 'dev-b' on the topic of 'dev-a'" in reject["reason"]
        dev_a.disconnect()
        dev_a.loop_stop()
        # The shared simulator user and its topics keep working.
        gw.publish(40)
        gw.wait_stored(41, timeout=30)
    finally:
        gw.close()


def test_messages_held_when_the_broker_is_killed_are_not_lost(private_gateway: Gateway) -> None:
    """A broker killed with -9 comes back with its last save: a resumed session,
    but none of what it sent us since. What we hold must then be written anyway
    (dropping it, trusting a redelivery, would lose it)."""
    gw = private_gateway
    conf = gw.stack.mosquitto.dir / "mosquitto.conf"
    # No periodic save: the store holds exactly what the graceful stop below wrote.
    conf.write_text(
        re.sub(r"(?m)^autosave_interval .*$", "autosave_interval 3600", conf.read_text())
    )
    gw.set(ingest={"batch_size": 100, "inflight_batches": 2})
    ing = gw.start_ingester()
    gw.stack.mosquitto.restart()  # graceful: our session is saved, with no messages
    wait_for(ing.receiver.subscribed.is_set, 30, what="the ingester to resubscribe")
    gw.stack.mongo.stop()
    sim = gw.simulator()
    sim.run(rate=5000, count=1000)
    wait_for(lambda: ing.receiver.queue.qsize() >= 50, 20, what="the ingester to hold messages")
    time.sleep(0.5)
    held = {json.loads(m.payload)["msg_id"] for m in list(ing.receiver.queue.queue)}
    gw.stack.mosquitto.kill()
    gw.stack.mosquitto.start()
    wait_for(ing.receiver.subscribed.is_set, 30, what="the ingester to resubscribe")
    # Set aside, waiting for a redelivery that will not come.
    wait_for(lambda: ing.receiver.stale_count > 0, 20, what="held messages set aside")
    time.sleep(1)
    assert ing.counters.dropped_stale == 0
    gw.stack.mongo.start()

    def stored_ids() -> set[str]:
        return {r["msg_id"] for r in gw.readings()}

    wait_for(lambda: held <= stored_ids(), 60, what="the held messages stored")
    time.sleep(1)
    stored = stored_ids()
    assert ing.counters.kept_stale > 0
    print(f"held {len(held)}, kept_stale {ing.counters.kept_stale}, stored {len(stored)}")
    assert held <= stored, f"lost {len(held - stored)} of {len(held)} held"
    assert len(stored) == gw.stored(), "a reading stored twice"


def test_memory_stays_bounded_draining_a_backlog_of_large_payloads(gateway: Gateway) -> None:
    """Mosquitto 2.0.11 overruns an MQTT 5 Receive Maximum once the window has
    filled (each PUBACK lets several more through), so the ingester's own queue is
    bounded too: draining 75 MB of 15 KB payloads, its memory stays flat."""
    import psutil

    gateway.set(ingest={"batch_size": 50, "inflight_batches": 2})
    proc = gateway.spawn_ingester()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    n, pad = 5000, "x" * 15000
    pub = gateway.raw_publisher()
    try:
        for i in range(n):
            body = {"msg_id": f"big-{i}", "value": i, "timestamp": "2026-11-24T11:00:00Z"}
            info = pub.publish("sensors/t/big", json.dumps({**body, "pad": pad}), qos=1)
            if i % 500 == 499:
                info.wait_for_publish(30)
        info.wait_for_publish(30)
    finally:
        pub.disconnect()
        pub.loop_stop()
    proc = gateway.spawn_ingester()
    p = psutil.Process(proc.pid)
    base = p.memory_info().rss
    peak = base
    while gateway.stored() < n and proc.poll() is None:
        peak = max(peak, p.memory_info().rss)
        time.sleep(0.05)
    gateway.wait_stored(n, timeout=120)
    grew_mb = (peak - base) / 2**20
    print(f"RSS {base / 2**20:.1f} MB at start, peak {peak / 2**20:.1f} MB (+{grew_mb:.1f})")
    # 100 messages in flight of 15 KB are 1.5 MB; the backlog is 75 MB.
    assert grew_mb < 30, f"ingester grew {grew_mb:.1f} MB draining the backlog"
