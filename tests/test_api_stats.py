"""Rolling averages on MQTT: the publisher beside the ingester and `stats --follow`."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest

from sensor_gateway.mqtt import make_client
from sensor_gateway.stats_topic import format_table
from tests.api_helpers import now_utc, publish_readings, sleep_until_second
from tests.helpers import Gateway, wait_for


def subscribe_stats(gw: Gateway) -> tuple[list[dict], object]:
    got: list[dict] = []
    ready = threading.Event()
    c = make_client(
        gw.cfg, f"stats-test-{gw.tag}", gw.cfg.api.mqtt_username, gw.cfg.api.mqtt_password_file
    )
    c.on_connect = lambda client, *a: client.subscribe(gw.cfg.ingest.stats_topic, qos=0)
    c.on_subscribe = lambda *a: ready.set()
    c.on_message = lambda client, userdata, msg: got.append(json.loads(msg.payload))
    c.connect(gw.cfg.mqtt.host, gw.cfg.mqtt.port)
    c.loop_start()
    assert ready.wait(10)
    return got, c


def spawn_ingester(gw: Gateway) -> None:
    n = len(gw.procs)
    gw.spawn("ingest")
    log = gw.tmp / f"ingest-{n}.log"
    wait_for(lambda: log.exists() and "subscribed to" in log.read_text(), 20, what="subscribed")


def test_ingest_command_publishes_averages(gateway: Gateway) -> None:
    sleep_until_second()
    topic = f"stats/averages-{gateway.tag}"
    gateway.set(ingest={"stats_interval_s": 1.0, "stats_topic": topic})
    now = now_utc()
    spawn_ingester(gateway)
    publish_readings(
        gateway,
        [
            {"sensor_id": "st-1", "value": 10.0, "timestamp": now - timedelta(seconds=3)},
            {"sensor_id": "st-1", "value": 30.0, "timestamp": now - timedelta(seconds=2)},
            {"sensor_id": "st-1", "value": 80.0, "timestamp": now - timedelta(minutes=4)},
        ],
    )
    got, client = subscribe_stats(gateway)
    try:

        def averaged() -> dict | None:
            for msg in reversed(got):
                rows = {r["sensor_id"]: r for r in msg["sensors"]}
                if rows.get("st-1", {}).get("count_5min") == 3:
                    return msg
            return None

        msg = wait_for(averaged, 20, what="averages of st-1 on MQTT")
    finally:
        client.disconnect()
        client.loop_stop()
    row = {r["sensor_id"]: r for r in msg["sensors"]}["st-1"]
    assert msg["windows"] == ["1m", "5m", "30m"]
    assert row["avg_1min"] == pytest.approx(20.0)
    assert row["avg_5min"] == pytest.approx(40.0)
    assert row["avg_30min"] == pytest.approx(40.0)
    assert row["count_1min"] == 2


def test_stats_follow_prints_a_table(gateway: Gateway) -> None:
    topic = f"stats/averages-{gateway.tag}"
    gateway.set(ingest={"stats_interval_s": 1.0, "stats_topic": topic})
    spawn_ingester(gateway)
    publish_readings(gateway, [{"sensor_id": "tbl-1", "value": 5.0, "timestamp": now_utc()}])
    proc = gateway.spawn("stats", "--follow", "--count", "2", "--timeout", "30")
    assert proc.wait(40) == 0
    out = next(gateway.tmp.glob("stats-*.log")).read_text()
    header = next(line for line in out.splitlines() if line.startswith("sensor_id"))
    assert header.split() == ["sensor_id", "kind", "avg_1min", "avg_5min", "avg_30min"]
    assert any(line.split()[:3] == ["tbl-1", "temperature", "5"] for line in out.splitlines())


def test_format_table_aligns_and_marks_empty_windows() -> None:
    text = format_table(
        {
            "windows": ["1m", "5m"],
            "sensors": [
                {"sensor_id": "a", "kind": "t", "avg_1min": 1.23456789, "avg_5min": None},
                {"sensor_id": "long-id", "kind": "t", "avg_1min": 10.0, "avg_5min": 2.0},
            ],
        }
    )
    lines = text.splitlines()
    assert lines[0].split() == ["sensor_id", "kind", "avg_1min", "avg_5min"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["a", "t", "1.23457", "-"]
    assert len({len(line) for line in lines[1:]}) == 1  # right-aligned columns
