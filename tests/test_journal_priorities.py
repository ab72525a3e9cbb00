"""Under journald ($JOURNAL_STREAM names stderr) every line carries a priority
prefix, so `journalctl -p warning` filters; elsewhere lines stay plain."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from devstack import REPO
from devstack.ports import free_port
from tests.helpers import Gateway, wait_for

PREFIXED = re.compile(r"^<[0-7]>")


def run_with_stderr_file(gw: Gateway, log: Path, journal: bool, *args: str) -> subprocess.Popen:
    cfg = gw.write_config()
    f = open(log, "wb")  # noqa: SIM115 - the child owns it
    st = os.fstat(f.fileno())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JOURNAL_STREAM", None)
    if journal:
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    return subprocess.Popen(
        [sys.executable, "-m", "sensor_gateway", "-c", str(cfg), *args],
        stdout=f,
        stderr=f,
        env=env,
        cwd=REPO,
    )


def test_ingester_lines_carry_priorities_under_journald(gateway: Gateway, tmp_path: Path) -> None:
    log = tmp_path / "journal.log"
    p = run_with_stderr_file(gateway, log, True, "ingest")
    wait_for(lambda: "subscribed to" in log.read_text(), 30, what="the ingester to subscribe")
    pub = gateway.raw_publisher()
    pub.publish("sensors/temperature/t1", b"garbage", qos=1).wait_for_publish(10)
    wait_for(lambda: "rejected message" in log.read_text(), 30, what="the reject warning")
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    assert all(PREFIXED.match(ln) for ln in lines), lines
    assert any(ln.startswith("<4>") and "rejected message" in ln for ln in lines)
    assert any(ln.startswith("<6>") and "subscribed to" in ln for ln in lines)


def test_plain_lines_outside_journald(gateway: Gateway, tmp_path: Path) -> None:
    log = tmp_path / "plain.log"
    p = run_with_stderr_file(gateway, log, False, "ingest")
    wait_for(lambda: "subscribed to" in log.read_text(), 30, what="the ingester to subscribe")
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    assert not any(PREFIXED.match(ln) for ln in log.read_text().splitlines())


def test_gunicorn_lines_carry_priorities_under_journald(gateway: Gateway, tmp_path: Path) -> None:
    gateway.set(api={"bind": f"127.0.0.1:{free_port()}", "workers": 1})
    log = tmp_path / "api.log"
    p = run_with_stderr_file(gateway, log, True, "api")
    wait_for(lambda: "Booting worker" in log.read_text(), 60, what="gunicorn to boot a worker")
    p.send_signal(signal.SIGTERM)
    p.wait(30)
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    booting = [ln for ln in lines if "Booting worker" in ln]
    assert booting and all(ln.startswith("<6>") for ln in booting), booting
    assert all(PREFIXED.match(ln) for ln in lines), [ln for ln in lines if not PREFIXED.match(ln)]
