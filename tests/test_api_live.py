"""`sensor-gateway api` as a real process: gunicorn, SSE, metrics over workers, sd_notify."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import requests

from devstack.notify import NotifySocket
from devstack.stack import Stack
from tests.api_helpers import free_port, now_utc, publish_readings, series, wait_http
from tests.helpers import Gateway, wait_for


@pytest.fixture(scope="module")
def live(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    tmp = tmp_path_factory.mktemp("api-live")
    gw = Gateway(stack, tmp, uuid.uuid4().hex[:8])
    port = free_port()
    gw.set(api={"bind": f"127.0.0.1:{port}", "workers": 2, "threads": 4})
    gw.start_ingester()
    notify = NotifySocket(tmp / "notify.sock")
    proc = gw.spawn("api", env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"})
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/healthz")
    gw.notify_messages = notify.messages  # type: ignore[attr-defined]
    gw.api_proc = proc  # type: ignore[attr-defined]
    yield gw, base
    if proc.poll() is None:
        proc.terminate()
        proc.wait(20)
    gw.close()
    notify.close()


def test_api_command_runs_gunicorn_and_answers(live: tuple[Gateway, str]) -> None:
    gw, base = live
    r = requests.get(base + "/readyz", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    log = next(Path(gw.tmp).glob("api-*.log"))
    wait_for(lambda: log.read_text().count("Booting worker") >= 2, 10, what="two workers")
    assert "Using worker: gthread" in log.read_text()
    assert "Control socket" not in log.read_text()


def test_sd_notify_ready_watchdog_status(live: tuple[Gateway, str]) -> None:
    gw, _ = live
    msgs: list[str] = gw.notify_messages  # type: ignore[attr-defined]
    wait_for(lambda: any("READY=1" in m for m in msgs), 20, what="READY=1")
    # gunicorn's own READY (sent before any worker and any dependency check) is suppressed.
    assert not any("Gunicorn arbiter booted" in m for m in msgs)
    wait_for(lambda: sum("WATCHDOG=1" in m for m in msgs) >= 2, 20, what="watchdog pings")
    wait_for(
        lambda: any(m.startswith("STATUS=") and "requests answered" in m for m in msgs),
        20,
        what="STATUS with request count",
    )


def test_sse_stream_receives_live_readings(live: tuple[Gateway, str]) -> None:
    gw, base = live
    sid = f"sse-{uuid.uuid4().hex[:6]}"
    got: list[str] = []
    opened = threading.Event()

    def listen() -> None:
        with requests.get(
            base + f"/readings/stream?sensor_id={sid}&max_s=20", stream=True, timeout=30
        ) as r:
            assert r.status_code == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith(": connected"):
                    opened.set()
                if line.startswith("data: {") and sid in line:
                    got.append(line)
                    if len(got) >= 3:
                        return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert opened.wait(10)
    publish_readings(gw, series(f"other-{sid}", now_utc(), 2))  # filtered out
    publish_readings(gw, series(sid, now_utc(), 3))
    t.join(20)
    assert len(got) == 3
    assert all(f'"sensor_id":"{sid}"' in line for line in got)


def test_stream_duration_is_bounded(live: tuple[Gateway, str]) -> None:
    _, base = live
    t0 = time.monotonic()
    with requests.get(base + "/readings/stream?max_s=1", stream=True, timeout=10) as r:
        lines = list(r.iter_lines(decode_unicode=True))
    assert time.monotonic() - t0 < 5
    assert "event: end" in lines


def test_metrics_sum_over_workers(live: tuple[Gateway, str]) -> None:
    _, base = live
    # New connections each time, spread over both workers; any worker answers the sum.
    answers = [requests.get(base + "/healthz", timeout=5) for _ in range(30)]
    assert all(r.status_code == 200 for r in answers)
    text = requests.get(base + "/metrics", timeout=5).text
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith('sensor_api_requests_total{method="GET",route="/healthz",status="200"}')
    )
    assert float(line.split()[-1]) >= 30


def test_latest_with_time_filtered_range(live: tuple[Gateway, str]) -> None:
    gw, base = live
    sid = f"live-{uuid.uuid4().hex[:6]}"
    start = now_utc() - timedelta(minutes=5)
    publish_readings(gw, series(sid, start, 20))
    r = requests.get(base + f"/latestten/{sid}", timeout=5)
    assert r.headers["X-Data-Source"] == "redis"
    assert [x["value"] for x in r.json()] == [float(v) for v in range(19, 9, -1)]


def test_sigterm_stops_cleanly_with_stopping(live: tuple[Gateway, str]) -> None:
    gw, _ = live
    proc = gw.api_proc  # type: ignore[attr-defined]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    msgs: list[str] = gw.notify_messages  # type: ignore[attr-defined]
    wait_for(lambda: any("STOPPING=1" in m for m in msgs), 5, what="STOPPING=1")
