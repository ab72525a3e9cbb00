"""The dashboard and /docs in a real browser: Playwright for Python driving Debian's
``chromium`` (installed by ``.ci/install-deps.sh``; never a downloaded browser)
against ``sensor-gateway api`` as a real gunicorn, fed by the simulator and the
ingester. The browser cannot resolve any name but 127.0.0.1, and every request
it makes is checked to stay there."""

from __future__ import annotations

import csv
import io
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from devstack.stack import Stack
from sensor_gateway import tokens
from tests.api_helpers import free_port, iso, now_utc, publish_readings, wait_http
from tests.helpers import Gateway

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")

CHROMIUM = os.environ.get("SENSOR_GATEWAY_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # Offline, as on an isolated network: no name resolves but loopback.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
SIM_SENSORS = ("temp-1", "hum-1", "status", "random-1")

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} missing: .ci/install-deps.sh installs Debian's chromium",
)


@pytest.fixture(scope="module")
def live(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    tmp = tmp_path_factory.mktemp("dash-browser")
    gw = Gateway(stack, tmp, uuid.uuid4().hex[:8])
    port = free_port()
    gw.set(
        api={
            "bind": f"127.0.0.1:{port}",
            "workers": 2,
            "threads": 8,
            "tokens_file": str(tmp / "api-tokens.json"),
        }
    )
    gw.start_ingester()
    gw.publish(40, rate=200.0)  # every simulator sensor, a few readings each
    gw.wait_stored(40)
    proc = gw.spawn("api")
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/healthz")
    yield gw, base
    proc.terminate()
    proc.wait(20)
    gw.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Watched:
    """A page whose console errors, page errors and requests are recorded."""

    def __init__(self, browser: Any, base: str, tmp: Path) -> None:
        self.context = browser.new_context(accept_downloads=True)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.base = base

    def offsite(self) -> list[str]:
        out = []
        for url in self.requests:
            parts = urlsplit(url)
            if parts.scheme in ("data", "blob", "about"):
                continue
            if parts.hostname != "127.0.0.1":
                out.append(url)
        return out

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watched(browser: Any, live: tuple[Gateway, str], tmp_path: Path) -> Iterator[Watched]:
    w = Watched(browser, live[1], tmp_path)
    yield w
    w.close()


def test_index_lists_simulator_sensors_no_errors_nothing_offsite(watched: Watched) -> None:
    page = watched.page
    page.goto(watched.base + "/")
    page.wait_for_selector("#sensors")
    page.wait_for_function("document.getElementById('live').textContent.includes('live')")
    listed = page.eval_on_selector_all(
        "#sensors tr[data-sensor]", "rs => rs.map(r => r.dataset.sensor)"
    )
    for sid in SIM_SENSORS:
        assert sid in listed, listed
    # Values and units are there, server-rendered.
    temp = page.locator('tr[data-sensor="temp-1"]')
    assert temp.locator(".unit").inner_text() == "°C"
    float(temp.locator(".value").inner_text())
    # Keyboard: the skip link comes first, then the navigation, and sensors are links.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    assert page.locator('#sensors a[href="/sensor/temp-1"]').count() == 1
    # Dark mode follows the system.
    page.emulate_media(color_scheme="dark")
    dark = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.emulate_media(color_scheme="light")
    light = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert dark != light
    # First load: page, stylesheet, script, icon (the bound: 300 KB gzipped).
    loaded = page.evaluate(
        "performance.getEntriesByType('navigation').concat(performance.getEntriesByType"
        "('resource')).filter(e => !e.name.includes('/readings/stream'))"
        ".reduce((n, e) => n + e.encodedBodySize, 0)"
    )
    assert 0 < loaded < 64 * 1024, loaded
    time.sleep(0.5)
    assert watched.errors == []
    assert watched.offsite() == []
    assert any(u.endswith("/readings/stream") for u in watched.requests)


def test_reading_published_appears_within_two_seconds(
    live: tuple[Gateway, str], watched: Watched
) -> None:
    gw, _ = live
    page = watched.page
    page.goto(watched.base + "/")
    page.wait_for_function("document.getElementById('live').textContent.includes('live')")
    value = 1000.5 + (uuid.uuid4().int % 1000)
    client = gw.raw_publisher()
    try:
        payload = {
            "sensor_id": "temp-1",
            "value": value,
            "unit": "°C",
            "timestamp": iso(now_utc()),
            "msg_id": uuid.uuid4().hex,
        }
        t0 = time.monotonic()
        client.publish("sensors/temperature", json.dumps(payload), qos=1).wait_for_publish(5)
        page.wait_for_function(
            "v => document.querySelector('tr[data-sensor=\"temp-1\"] .value').textContent === v",
            arg=repr(value),
            timeout=2000,
        )
        elapsed = time.monotonic() - t0
    finally:
        client.disconnect()
        client.loop_stop()
    assert elapsed < 2.0
    # A sensor never seen before gets a row of its own.
    new = f"new-{uuid.uuid4().hex[:4]}"
    publish_readings(gw, [{"sensor_id": new, "value": 7, "timestamp": now_utc()}])
    page.wait_for_selector(f'tr[data-sensor="{new}"] .value:text("7")', timeout=2000)
    assert watched.errors == []


def test_sensor_page_24h_chart_draws(watched: Watched) -> None:
    page = watched.page
    page.goto(watched.base + "/sensor/temp-1")
    page.wait_for_selector('.ranges a[aria-current="page"]')
    assert page.locator('.ranges a[aria-current="page"]').inner_text() == "24h"
    line = page.locator("#chart polyline.line")
    assert len(line.get_attribute("points").split()) >= 1
    box = page.locator("#chart").bounding_box()
    assert box and box["width"] > 300 and box["height"] > 80
    # The range links work from the keyboard.
    page.locator(".ranges a", has_text="1h").focus()
    page.keyboard.press("Enter")
    page.wait_for_url("**/sensor/temp-1?range=1h")
    assert page.locator('.ranges a[aria-current="page"]').inner_text() == "1h"
    # The status sensor's counts as bars.
    page.goto(watched.base + "/sensor/status")
    assert page.locator("#status-chart rect").count() == 7
    assert watched.errors == [] and watched.offsite() == []


def test_docs_render_operations_offline(watched: Watched) -> None:
    page = watched.page
    page.goto(watched.base + "/docs")
    page.wait_for_selector(".opblock", timeout=15000)
    paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent)")
    assert "/readings" in " ".join(paths) and any("/readings/export" in p for p in paths)
    assert watched.offsite() == []
    assert watched.errors == []


def test_export_downloads_csv(live: tuple[Gateway, str], watched: Watched) -> None:
    gw, _ = live
    page = watched.page
    page.goto(watched.base + "/sensor/hum-1")
    with page.expect_download() as info:
        page.get_by_text("Download this sensor's readings (CSV)").click()
    download = info.value
    assert download.suggested_filename.startswith("readings-hum-1-")
    assert download.suggested_filename.endswith(".csv")
    rows = list(csv.DictReader(io.StringIO(Path(download.path()).read_text())))
    stored = gw.stored({"sensor_id": "hum-1"})
    assert len(rows) == stored > 0
    assert {r["sensor_id"] for r in rows} == {"hum-1"} and {r["unit"] for r in rows} == {"%"}
    assert watched.offsite() == []


def test_login_session_opens_page_and_live_stream(
    live: tuple[Gateway, str], watched: Watched
) -> None:
    gw, base = live
    path = Path(gw.cfg.api.tokens_file)
    token, _ = tokens.add(path, f"b-{uuid.uuid4().hex[:4]}")
    try:
        page = watched.page
        page.goto(base + "/sensor/temp-1")
        assert page.url.startswith(base + "/login?next=")
        page.fill("#token", token)
        page.keyboard.press("Enter")
        page.wait_for_url(base + "/sensor/temp-1")
        cookie = next(c for c in watched.context.cookies() if c["name"] == "sgw_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert token not in page.url and token not in cookie["value"]
        assert page.evaluate("document.cookie") == ""
        page.wait_for_function("document.getElementById('live').textContent.includes('live')")
        # The stream works with the session: a new reading shows up.
        publish_readings(gw, [{"sensor_id": "temp-1", "value": 4321, "timestamp": now_utc()}])
        page.wait_for_selector("#latest .value:text('4321')", timeout=2000)
        assert watched.offsite() == []
    finally:
        path.unlink(missing_ok=True)
