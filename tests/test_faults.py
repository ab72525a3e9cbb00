"""Faults mid-stream, each counted: published (acked by the broker) vs stored.

Every test asserts zero lost and zero duplicated: the stored ids are exactly
the published msg_ids (``_id`` is unique, so a duplicate could only show as
an extra id or a double-counted rollup, checked where the path is exact).
"""

from __future__ import annotations

import os
import signal
import time

import psutil

from sensor_gateway import cache, storage
from tests.helpers import Gateway, wait_for


def assert_exactly_once(gw: Gateway, run_id: str, n: int, timeout: float = 120) -> None:
    gw.wait_stored(n, timeout=timeout)
    ids = {d["msg_id"] for d in gw.db.readings.find({}, {"msg_id": 1})}
    expected = {f"{run_id}-{i}" for i in range(1, n + 1)}
    lost = expected - ids
    extra = ids - expected
    print(f"published={n} stored={len(ids)} lost={len(lost)} unexpected={len(extra)}")
    assert not lost, f"{len(lost)} lost, e.g. {sorted(lost)[:5]}"
    assert not extra, f"{len(extra)} unexpected, e.g. {sorted(extra)[:5]}"


def finish_publishing(sim, thread, n: int, timeout: float = 180) -> None:
    thread.join(timeout)
    assert not thread.is_alive(), "publisher did not finish"
    assert sim.stats.acked == n, f"broker acknowledged {sim.stats.acked} of {n}"


def rollup_total(gw: Gateway) -> int:
    return sum(d["count"] for d in gw.db[storage.ROLLUPS].find({}, {"count": 1}))


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
    assert not ing.subscribed.is_set()
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
    for sensor_id in storage.sensor_ids(gw.db):
        expected = [d["_id"] for d in storage.latest_for_sensor(gw.db, sensor_id, 10)]
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
    wait_for(lambda: rollup_total(gateway) == n, 20, what="rollups count each reading once")


def test_receive_maximum_bounds_what_is_held_while_mongodb_is_down(
    private_gateway: Gateway,
) -> None:
    gw = private_gateway
    gw.set(ingest={"batch_size": 100, "inflight_batches": 2})
    ing = gw.start_ingester()
    gw.stack.mongo.stop()
    sim = gw.publish(2000, rate=4000)  # the broker acknowledges and queues them
    time.sleep(3)
    held = ing.queue.qsize() + ing.counters.received
    assert 0 < ing.queue.qsize() <= ing.receive_maximum, ing.queue.qsize()
    assert held <= ing.receive_maximum
    gw.stack.mongo.start()
    assert_exactly_once(gw, sim.run_id, 2000)
