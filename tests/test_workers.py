"""Ingest workers on a shared subscription (``$share/<group>/sensors/#``): the
broker spreads the messages, each worker writes a lane of its own, and one
worker killed with SIGKILL mid-stream loses nothing and doubles nothing: its
persistent session keeps what was in flight to it (and its share of what
arrives while it is away) until it is back (Mosquitto 2.0.11)."""

from __future__ import annotations

import os
import signal
import time

from sensor_gateway import layout, queries
from tests.helpers import Gateway, wait_for
from tests.test_faults import assert_exactly_once, finish_publishing


def _lanes_used(gw: Gateway) -> set[int]:
    return {
        layout.lane_of(d["_id"].partition("/")[0])[1]
        for d in gw.db[layout.SAMPLES].find({}, {"_id": 1})
    }


def test_two_workers_share_the_stream_and_one_killed_loses_nothing(gateway: Gateway) -> None:
    n = 8000
    gateway.set(ingest={"workers": 2})
    workers = [gateway.spawn_ingester(worker=w) for w in (0, 1)]
    sim, t = gateway.publish_async(n, rate=1000)
    wait_for(lambda: gateway.stored() > 2000, 60, what="ingest under way")
    os.kill(workers[1].pid, signal.SIGKILL)
    workers[1].wait()
    at_kill = gateway.stored()
    time.sleep(2)  # worker 0 goes on; worker 1's share waits in its session
    gateway.spawn_ingester(worker=1)
    finish_publishing(sim, t, n)
    assert at_kill < n, "the kill came after the stream ended; it proves nothing"
    assert_exactly_once(gateway, sim.run_id, n)
    assert _lanes_used(gateway) == {0, 1}, "the broker did not spread the stream"
    assert queries.Reader(gateway.db).lanes == 2


def test_a_worker_away_gets_its_share_when_back(gateway: Gateway) -> None:
    """Mosquitto issue 1747: an offline member with a persistent session still
    gets its share. Nothing is lost: it is there when the worker returns."""
    n = 3000
    gateway.set(ingest={"workers": 2})
    w0 = gateway.spawn_ingester(worker=0)
    w1 = gateway.spawn_ingester(worker=1)
    w1.send_signal(signal.SIGTERM)
    assert w1.wait(30) == 0
    sim = gateway.publish(n, rate=2000)
    time.sleep(2)
    held = gateway.stored()
    print(f"worker 1 away: {held} of {n} stored by worker 0")
    assert held < n, f"worker 0 stored all {n}: the broker skipped the absent member"
    gateway.spawn_ingester(worker=1)
    assert_exactly_once(gateway, sim.run_id, n)
    assert w0.poll() is None


def test_lowering_workers_retires_one_without_losing_its_share(gateway: Gateway) -> None:
    """From two workers to one: the worker retired (`ingest --retire`, as the
    Ansible role runs it) writes the share its session held and leaves the shared
    subscription; worker 0, restarted with workers = 1, subscribes alone and
    drops its shared subscription. Then nothing is queued for an absent worker."""
    gateway.set(ingest={"workers": 2})
    w0 = gateway.spawn_ingester(worker=0)
    w1 = gateway.spawn_ingester(worker=1)
    w1.send_signal(signal.SIGTERM)
    assert w1.wait(30) == 0
    first = gateway.publish(2000, rate=2000)
    time.sleep(1)
    assert gateway.stored() < 2000, "worker 1 had no share waiting: the test proves nothing"
    # The configuration now says one worker; worker 0 restarts with it.
    w0.send_signal(signal.SIGTERM)
    assert w0.wait(30) == 0
    gateway.set(ingest={"workers": 1})
    gateway.spawn_ingester(worker=0)
    retire = gateway.spawn("ingest", "--retire", env={"SENSOR_GATEWAY_INGEST__WORKER": "1"})
    assert retire.wait(60) == 0, retire.log_path.read_text()
    assert "retired" in retire.log_path.read_text()
    assert_exactly_once(gateway, first.run_id, 2000)
    # Worker 1's session is gone: every later message reaches worker 0.
    second = gateway.publish(1000, rate=2000)
    gateway.wait_stored(3000, timeout=60)
    time.sleep(1)
    mine = [r for r in gateway.readings() if r["msg_id"].startswith(second.run_id)]
    assert len(mine) == 1000 and len({r["msg_id"] for r in mine}) == 1000
    assert all(layout.lane_of(r["_id"].rpartition(".")[0])[1] == 0 for r in mine)
