"""Screenshots of the dashboard for the README, taken with Playwright and Debian's chromium.

    .venv/bin/python docs/screenshot.py        # writes docs/dashboard.png and docs/sensor.png

Starts the local services, writes a day of history for the simulator's
sensors (through the payload contract and the storage layer's writer, as
the ingester stores them), runs the ingester and the simulator for a few seconds so that the
latest readings are live, then `sensor-gateway api`, and photographs ``/``
and ``/sensor/temp-1`` at 1200x760.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devstack.ports import free_port, wait_port  # noqa: E402
from devstack.stack import Stack  # noqa: E402
from sensor_gateway import config, storage  # noqa: E402
from sensor_gateway.model import iso  # noqa: E402
from sensor_gateway.payload import Limits, Reject, parse  # noqa: E402
from sensor_gateway.writer import Writer  # noqa: E402

CHROMIUM = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def history(cfg: config.Config, hours: int = 24, step_s: int = 60) -> None:
    """A day of readings, through the payload contract and the storage layer's
    writer (as the ingester stores them), summaries included."""
    rng = random.Random(3)
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(hours=hours)
    docs = []
    for i in range(hours * 3600 // step_s):
        ts = start + timedelta(seconds=i * step_s)
        day = math.sin(2 * math.pi * (ts.hour * 60 + ts.minute) / 1440)
        for sid, kind, unit, value in (
            ("temp-1", "temperature", "°C", 21 + 3 * day + rng.gauss(0, 0.3)),
            ("hum-1", "humidity", "%", 45 - 8 * day + rng.gauss(0, 1)),
            ("status", "status", "", float(min(6, int(abs(rng.gauss(0, 2)))))),
            ("random-1", "random", "", float(rng.randint(1, 100))),
        ):
            body = {"sensor_id": sid, "value": round(value, 2), "timestamp": iso(ts)}
            if unit:
                body["unit"] = unit
            doc = parse(f"sensors/{kind}", json.dumps(body).encode(), ts, Limits(), 0)
            assert not isinstance(doc, Reject), doc
            docs.append(doc)
    db = storage.connect(cfg)
    storage.prepare(db, cfg)
    out = Writer(db).write(docs)
    assert not out.refused, out.refused[:1]


def main() -> None:
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="sg-shot-"))
    stack = Stack(root=root / "stack")
    stack.start()
    procs: list[subprocess.Popen] = []
    try:
        port = free_port()
        data = stack.config_dict(database="shot")
        data["api"].update({"bind": f"127.0.0.1:{port}"})
        data["mongodb"]["timeout_ms"] = 600_000
        cfg_path = root / "gateway.toml"
        cfg_path.write_text(tomli_w.dumps(data))
        cfg = config.build(data)
        history(cfg)
        env = {**os.environ, "PYTHONPATH": str(REPO)}

        def cmd(*args: str) -> list[str]:
            return [sys.executable, "-m", "sensor_gateway", "-c", str(cfg_path), *args]

        log = open(root / "daemons.log", "wb")  # noqa: SIM115
        for args in (("ingest",), ("api",)):
            procs.append(subprocess.Popen(cmd(*args), env=env, stdout=log, stderr=log))
        wait_port(port, 60, procs[-1])
        time.sleep(2)
        procs.append(subprocess.Popen(cmd("simulate"), env=env, stdout=log, stderr=log))
        time.sleep(12)
        base = f"http://127.0.0.1:{port}"
        out = REPO / "docs"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM)
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('live').textContent.includes('live')")
            time.sleep(3)  # a few live updates
            page.screenshot(path=str(out / "dashboard.png"))
            page.goto(base + "/sensor/temp-1?range=24h")
            page.wait_for_selector("#chart polyline.line")
            page.screenshot(path=str(out / "sensor.png"), full_page=False)
            browser.close()
        print(f"wrote {out / 'dashboard.png'} and {out / 'sensor.png'}")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)
        stack.stop()


if __name__ == "__main__":
    main()
