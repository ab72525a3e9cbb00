"""The unit files, checked without a running systemd: hardening score and syntax.

``systemd-analyze security --offline=yes`` must rate each service's exposure
at 2.0 or less, and ``systemd-analyze verify`` must have nothing to say about
any unit. The behaviour inside a real systemd is tests/systemd's job.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT_DIR = REPO / "systemd"
SERVICES = (
    "sensor-simulator.service",
    "sensor-ingest.service",
    "sensor-ingest@.service",
    "sensor-api.service",
)
UNITS = (*SERVICES, "sensor-gateway.target")
MAX_EXPOSURE = 2.0
EXEC = "/opt/sensor-gateway/venv/bin/sensor-gateway"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def exposure(unit: Path) -> float:
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, f"no exposure level in:\n{r.stdout}\n{r.stderr}"
    return float(m.group(1))


@pytest.mark.parametrize("unit", SERVICES)
def test_exposure_at_most_2(unit: str) -> None:
    score = exposure(UNIT_DIR / unit)
    assert score <= MAX_EXPOSURE, f"{unit}: exposure {score} > {MAX_EXPOSURE}"


def verify(root: Path, units: list[str]) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` in a root holding the units, the host's unit
    library (for sysinit.target and friends) and a stand-in for the executable."""
    (root / "usr/lib/systemd").mkdir(parents=True, exist_ok=True)
    host_units = next(
        (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
        None,
    )
    if host_units is None:
        pytest.fail("no systemd unit library on this host (apt-get install systemd)")
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    exe = root / EXEC.lstrip("/")
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", *units],
        capture_output=True,
        text=True,
        cwd=root / "etc/systemd/system",
    )


def _install(root: Path, files: dict[str, str]) -> None:
    d = root / "etc/systemd/system"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


def test_verify_clean(tmp_path: Path) -> None:
    _install(tmp_path, {u: (UNIT_DIR / u).read_text() for u in UNITS})
    r = verify(tmp_path, list(UNITS))
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), (
        f"systemd-analyze verify:\n{r.stdout}{r.stderr}"
    )


def test_verify_would_notice_a_mistake(tmp_path: Path) -> None:
    """The check above is not vacuous: a typo in a unit is reported."""
    text = (UNIT_DIR / "sensor-ingest.service").read_text()
    _install(tmp_path, {"sensor-ingest.service": text.replace("WatchdogSec=", "WatchDogSec=")})
    r = verify(tmp_path, ["sensor-ingest.service"])
    assert "WatchDogSec" in r.stderr


def test_units_follow_the_conventions() -> None:
    """What deploy/ansible relies on (documented at the top of each unit)."""
    for unit in SERVICES:
        text = (UNIT_DIR / unit).read_text()
        assert f"ExecStart={EXEC} " in text, unit
        assert "Environment=SENSOR_GATEWAY_CONFIG=/etc/sensor-gateway/gateway.toml" in text, unit
        assert "Type=notify" in text and "WatchdogSec=" in text, unit
        assert "Restart=on-failure" in text and "PartOf=sensor-gateway.target" in text, unit
        for m in re.finditer(r"^LoadCredential=([^:\n]+):(\S+)$", text, re.M):
            assert m.group(2) == f"/etc/sensor-gateway/credentials/{m.group(1)}", unit


def test_the_worker_template_is_the_ingester_but_for_its_number() -> None:
    """sensor-ingest@.service is sensor-ingest.service (worker 0) but for the
    worker number and the FerretDB indexing worker 0 does: no hardening line
    may drift between them."""

    def body(name: str) -> list[str]:
        lines = (UNIT_DIR / name).read_text().splitlines()
        start = lines.index("[Unit]")
        return [ln for ln in lines[start:] if not ln.startswith("#")]

    single, template = body("sensor-ingest.service"), body("sensor-ingest@.service")
    only_single = [ln for ln in single if ln not in template]
    only_template = [ln for ln in template if ln not in single]
    assert only_single == [
        "Description=sensor-gateway ingester (MQTT to MongoDB and Redis)",
        f"ExecStartPost=-+{EXEC} ferretdb-index",
    ]
    assert only_template == [
        "Description=sensor-gateway ingest worker %i (MQTT to MongoDB and Redis)",
        "Environment=SENSOR_GATEWAY_INGEST__WORKER=%i",
    ]
