"""Faults mid-stream, each counted: published (acked by the broker) vs stored.

Every test asserts zero lost and zero duplicated: the stored msg_ids are
exactly the published ones, each stored once (a bucket holds many readings, so a
duplicate shows as a repeated msg_id), and the summaries count each reading
once (they are set from the buckets, never incremented, so a redelivered batch
heals what a crash between a bucket's write and its summaries' left behind).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import psutil

from sensor_gateway import cache, queries
from tests.helpers import Gateway, wait_for


def summary_total(gw: Gateway) -> int:
    """Readings counted by the summaries (days, hours, minutes), never the readings."""
    return queries.count_all(gw.db)


def assert_exactly_once(gw: Gateway, run_id: str, n: int, timeout: float = 120) -> None:
    gw.wait_stored(n, timeout=timeout)
    stored = Counter(r["msg_id"] for r in gw.readings())
    ids = set(stored)
    expected = {f"{run_id}-{i}" for i in range(1, n + 1)}
    lost = expected - ids
    extra = ids - expected
    doubled = {i: c for i, c in stored.items() if c > 1}
    print(
        f"published={n} stored={stored.total()} lost={len(lost)} unexpected={len(extra)} "
        f"duplicated={len(doubled)}"
    )
    assert not lost, f"{len(lost)} lost, e.g. {sorted(lost)[:5]}"
    assert not extra, f"{len(extra)} unexpected, e.g. {sorted(extra)[:5]}"
    assert not doubled, f"{len(doubled)} stored more than once, e.g. {sorted(doubled)[:5]}"
    wait_for(lambda: summary_total(gw) == n, 20, what="summaries count each reading once")


def finish_publishing(sim, thread, n: int, timeout: float = 180) -> None:
    thread.join(timeout)
    assert not thread.is_alive(), "publisher did not finish"
    assert sim.stats.acked == n, f"broker acknowledged {sim.stats.acked} of {n}"


def test_kill_9_ingester_mid_stream(gateway: Gateway) -> None:
    n = 6000
    proc = gateway.spawn_ingester()
    sim, t = gateway.publish_async(n, rate=1000)
    wait_for(lambda: gateway.stored() > 1500, 60, what="ingest under way")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = gateway.stored()
    time.sleep(1)
    gateway.spawn_ingester()
    finish_publishing(sim, t, n)
    assert at_kill < n, "the kill came after the stream ended; it proves nothing"
    assert_exactly_once(gateway, sim.run_id, n)


def test_max_held_mb_bounds_the_bytes_held_while_mongodb_is_down(
    private_gateway: Gateway,
) -> None:
    """Receive Maximum (8,000 here) bounds messages, not bytes: 400 payloads of
    15 KB fit in the window, but with ingest.max_held_mb = 1 the ingester takes
    no more than about 1 MB of them while nothing can be written; the broker
    keeps the rest, and every one is stored once when MongoDB returns."""
    gw = private_gateway
    gw.set(ingest={"batch_size": 4000, "inflight_batches": 2, "max_held_mb": 1})
    ing = gw.start_ingester()
    rx = ing.receiver
    gw.stack.mongo.stop()
    n = 400
    payloads = [
        json.dumps(
            {"msg_id": f"held-{i}", "value": i, "timestamp": "2026-11-24T11:00:00Z"}
            | {"pad": "x" * 15000}
        )
        for i in range(n)
    ]
    one = max(len(p) for p in payloads)
    pub = gw.raw_publisher()
    try:
        for body in payloads:
            info = pub.publish("sensors/t/held", body, qos=1)
        info.wait_for_publish(30)
    finally:
        pub.disconnect()
        pub.loop_stop()
    time.sleep(3)  # what the ingester would take, it has taken
    print(f"held {rx.held_bytes} bytes of {n * one}")
    # Without the budget it would hold all 400 (6 MB): the window allows 8,000.
    assert 0 < rx.held_bytes <= rx.max_held_bytes + one
    gw.stack.mongo.start()
    gw.wait_stored(n, timeout=120)
    time.sleep(2)
    msg_ids = [r.get("msg_id") for r in gw.readings()]
    assert sorted(msg_ids) == sorted(f"held-{i}" for i in range(n)), "lost or stored twice"
    wait_for(lambda: rx.held_bytes == 0, 10, what="every held byte acknowledged")
    assert rx.max_held_bytes <= ing.counters.held_bytes_max <= rx.max_held_bytes + one


def test_mongodb_down_20s_mid_stream(private_gateway: Gateway) -> None:
    gw = private_gateway
    n = 12000
    proc = gw.spawn_ingester()
    sim, t = gw.publish_async(n, rate=400)
    wait_for(lambda: gw.stored() > 500, 60, what="ingest under way")
    gw.stack.mongo.stop()
    rss = []
    ps = psutil.Process(proc.pid)
    for _ in range(20):
        time.sleep(1)
        rss.append(ps.memory_info().rss / 2**20)
    gw.stack.mongo.start()
    finish_publishing(sim, t, n)
    assert_exactly_once(gw, sim.run_id, n, timeout=180)
    assert proc.poll() is None, "the ingester died while MongoDB was down"
    # Held messages are bounded by Receive Maximum, not by the outage: RSS stays flat.
    print(f"ingester RSS during outage: min {min(rss):.1f} MB, max {max(rss):.1f} MB")
    assert max(rss) - min(rss) < 30, f"RSS grew while MongoDB was down: {rss}"


def test_mosquitto_restart_mid_stream(private_gateway: Gateway) -> None:
    gw = private_gateway
    n = 5000
    gw.spawn_ingester()
    sim, t = gw.publish_async(n, rate=800)
    wait_for(lambda: gw.stored() > 1000, 60, what="ingest under way")
    gw.stack.mosquitto.restart()
    finish_publishing(sim, t, n)
    assert_exactly_once(gw, sim.run_id, n)


def test_mosquitto_keeps_queue_while_ingester_is_away(private_gateway: Gateway) -> None:
    """More than Mosquitto's default 1000 queued messages survive a broker restart."""
    gw = private_gateway
    ing = gw.start_ingester()  # creates the persistent session
    gw.stop_ingesters()
    assert not ing.receiver.subscribed.is_set()
    sim = gw.publish(3000, rate=3000)
    gw.stack.mosquitto.restart()
    gw.start_ingester()
    assert_exactly_once(gw, sim.run_id, 3000)


def test_redis_down_mid_stream(gateway: Gateway, private_stack) -> None:
    # A private Redis we can stop, on the shared broker and database.
    gw = gateway
    gw.set(
        redis={
            "url": private_stack.redis.url,
            "password_file": str(private_stack.secrets_dir / "redis-password"),
        }
    )
    n = 4000
    ing = gw.start_ingester()
    sim, t = gw.publish_async(n, rate=800)
    wait_for(lambda: gw.stored() > 500, 60, what="ingest under way")
    private_stack.redis.stop()
    stored_at_stop = gw.stored()
    wait_for(lambda: gw.stored() > stored_at_stop + 1000, 60, what="storing without Redis")
    private_stack.redis.start()
    finish_publishing(sim, t, n)
    assert_exactly_once(gw, sim.run_id, n)
    assert ing.counters.redis_errors >= 1
    # Latest ten rebuilt from MongoDB once Redis is back.
    for sensor_id in queries.sensor_ids(gw.db):
        expected = [d["_id"] for d in queries.latest_docs(gw.db, 10, sensor_id=sensor_id)]
        wait_for(
            lambda s=sensor_id, e=expected: (
                [r["id"] for r in cache.read_latest(gw.redis, gw.keys, s, 10)] == e
            ),
            20,
            what=f"latest ten of {sensor_id} rebuilt",
        )


def test_sigterm_flushes_and_acks(gateway: Gateway) -> None:
    """A clean stop mid-stream (systemctl stop) loses nothing and exits 0."""
    n = 4000
    proc = gateway.spawn_ingester()
    sim, t = gateway.publish_async(n, rate=1000)
    wait_for(lambda: gateway.stored() > 800, 60, what="ingest under way")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    gateway.spawn_ingester()
    finish_publishing(sim, t, n)
    assert_exactly_once(gateway, sim.run_id, n)


def test_receive_maximum_bounds_what_is_held_while_mongodb_is_down(
    private_gateway: Gateway,
) -> None:
    gw = private_gateway
    gw.set(ingest={"batch_size": 100, "inflight_batches": 2})
    ing = gw.start_ingester()
    gw.stack.mongo.stop()
    sim = gw.publish(2000, rate=4000)  # the broker acknowledges and queues them
    time.sleep(3)
    held = ing.receiver.queue.qsize() + ing.counters.received
    assert 0 < ing.receiver.queue.qsize() <= ing.receiver.receive_maximum, (
        ing.receiver.queue.qsize()
    )
    assert held <= ing.receiver.receive_maximum
    gw.stack.mongo.start()
    assert_exactly_once(gw, sim.run_id, 2000)
