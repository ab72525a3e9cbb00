"""Killed after the database write and before the PUBACKs: the broker redelivers
the whole batch, and every reading is still stored, and counted, once."""

from __future__ import annotations

from tests.helpers import Gateway, wait_for
from tests.test_faults import assert_exactly_once


def test_kill_between_write_and_acknowledgement(gateway: Gateway) -> None:
    n = 3000
    # SIGKILL right after the first batch is written (ingest.write.crash_point("written")).
    proc = gateway.spawn("ingest", env={"SENSOR_GATEWAY_CRASH_AT": "written"})
    wait_for(
        lambda: proc.poll() is not None or "subscribed to" in proc.log_path.read_text(),
        30,
        what="the ingester to subscribe",
    )
    sim = gateway.publish(n, rate=5000)
    assert proc.wait(60) == -9, proc.log_path.read_text()
    written = gateway.stored()
    print(f"stored before the kill, never acknowledged: {written}")
    assert 0 < written < n
    gateway.spawn_ingester()
    assert_exactly_once(gateway, sim.run_id, n)
