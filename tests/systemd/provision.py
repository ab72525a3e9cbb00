"""Install sensor-gateway into a booted test container the way deploy/ansible lays it out.

- ``/opt/sensor-gateway/venv``: a venv with the package, from a wheelhouse built
  on the host (``wheelhouse()``; the container's python3 is 3.11, like ours, so
  cp311 manylinux wheels install with ``pip --no-index``);
- ``/etc/sensor-gateway/gateway.toml``: ``config/gateway.toml`` with the test
  engine's differences (FerretDB without authentication);
- ``/etc/sensor-gateway/credentials/*``: the secrets, root 0600, loaded by the
  units with ``LoadCredential=``;
- Mosquitto with the gateway's users, ACL and settings; Redis with a password;
  FerretDB (``.cache/bin/ferretdb``) as ``ferretdb.service``;
- the units from ``systemd/``, as they are.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import tomli_w

from devstack import REPO
from devstack.stack import MOSQUITTO_ACL, MQTT_USERS, find_ferretdb
from tests.systemd.nspawn import Container

HERE = Path(__file__).resolve().parent
WHEELHOUSE = REPO / ".cache" / "wheelhouse"
VENV = "/opt/sensor-gateway/venv"
ETC = "/etc/sensor-gateway"
CREDS = f"{ETC}/credentials"
UNITS = (
    "sensor-simulator.service",
    "sensor-ingest.service",
    "sensor-ingest@.service",
    "sensor-api.service",
)
TARGET = "sensor-gateway.target"


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
    )


def _build_package_wheel(dest: Path) -> Path:
    """The package's wheel from a clean copy of the working tree (an in-tree
    build would reuse setuptools' build/ folder, stale files included)."""
    for old in dest.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="sg-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        shutil.copytree(
            REPO / "sensor_gateway",
            src / "sensor_gateway",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        for name in ("setup.cfg", "pyproject.toml", "setup.py", "README.md", "MANIFEST.in"):
            if (REPO / name).exists():
                shutil.copy2(REPO / name, src / name)
        r = _pip("wheel", "--no-deps", "-q", str(src), "-w", str(dest))
        if r.returncode != 0:
            raise RuntimeError(f"building the package wheel failed:\n{r.stderr[-3000:]}")
    (wheel,) = dest.glob("sensor_gateway-*.whl")
    return wheel


def wheelhouse() -> tuple[Path, Path]:
    """(dependency wheels, the package's own wheel folder), built on the host.

    The package wheel is rebuilt from the working tree every time; dependency
    wheels are cached in ``.cache/wheelhouse`` and fetched only when missing.
    """
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    pkg = REPO / ".cache" / "wheel-pkg"
    wheel = _build_package_wheel(pkg)
    check = _pip(
        "install",
        "--dry-run",
        "--ignore-installed",
        "--no-index",
        "-q",
        "--find-links",
        str(WHEELHOUSE),
        str(wheel),
    )
    if check.returncode != 0:
        r = _pip("wheel", "-q", str(wheel), "-w", str(WHEELHOUSE))
        if r.returncode != 0:
            raise RuntimeError(f"building dependency wheels failed:\n{r.stderr[-3000:]}")
    # Only dependencies here: an old wheel of the package would shadow the new one.
    for stale in WHEELHOUSE.glob("sensor_gateway-*.whl"):
        stale.unlink()
    return WHEELHOUSE, pkg


def test_config() -> dict:
    """config/gateway.toml as installed for the test: FerretDB has no users."""
    data = tomllib.loads((REPO / "config" / "gateway.toml").read_text())
    data["mongodb"]["username"] = ""
    data["mongodb"]["timeout_ms"] = 2000
    data["mqtt"]["reconnect_max_s"] = 2.0
    data["redis"]["timeout_s"] = 1.0
    return data


def install_venv(c: Container) -> None:
    """Make the venv and install the package from the host's wheelhouse, offline.

    A dependency the host's resolver skipped (markers on the exact Python
    version: the container's 3.11.2 needs ``async-timeout`` where ours does
    not) is fetched into the wheelhouse on the host and the install retried.
    """
    deps, pkg = wheelhouse()
    c.run("python3", "-m", "venv", VENV)
    for _ in range(5):
        c.run("rm", "-rf", "/root/wheels")
        c.copy_in(deps, "/root/wheels/deps")
        c.copy_in(pkg, "/root/wheels/pkg")
        r = c.run(
            f"{VENV}/bin/pip",
            "install",
            "-q",
            "--no-index",
            "--disable-pip-version-check",
            "--find-links",
            "/root/wheels/deps",
            "--find-links",
            "/root/wheels/pkg",
            "sensor-gateway",
            timeout=300,
            check=False,
        )
        if r.returncode == 0:
            c.run("rm", "-rf", "/root/wheels")
            return
        m = re.search(r"No matching distribution found for ([^;\s]+)", r.stderr)
        if not m:
            break
        fetched = _pip("wheel", "-q", "--no-deps", m.group(1), "-w", str(deps))
        if fetched.returncode != 0:
            break
    raise RuntimeError(f"installing the package in the container failed:\n{r.stderr[-3000:]}")


def install_gateway(c: Container) -> dict[str, str]:
    """Everything but the venv (see :func:`install_venv`); returns the passwords."""
    ferretdb = find_ferretdb()
    if not ferretdb:
        raise RuntimeError("no FerretDB binary: run .ci/build-ferretdb.sh")
    c.copy_in(ferretdb, "/usr/local/bin/ferretdb")
    # Under /usr/local/lib (not /etc) so that `systemctl mask --runtime` can hide it.
    c.copy_in(HERE / "ferretdb.service", "/usr/local/lib/systemd/system/ferretdb.service")
    c.copy_in(HERE / "probe.py", "/usr/local/lib/sensor-gateway-probe.py")

    passwords = {u: secrets.token_urlsafe(16) for u in MQTT_USERS}
    passwords["redis"] = secrets.token_urlsafe(16)

    # Configuration and credentials.
    c.put_file(f"{ETC}/gateway.toml", tomli_w.dumps(test_config()), mode=0o644)
    c.run("install", "-d", "-m", "0700", CREDS)
    for user in MQTT_USERS:
        name = f"mqtt-{user.removeprefix('sensor-')}-password"
        c.put_file(f"{CREDS}/{name}", passwords[user], mode=0o600)
    c.put_file(f"{CREDS}/redis-password", passwords["redis"], mode=0o600)
    c.put_file(f"{CREDS}/mongodb-password", "", mode=0o600)

    # Mosquitto: the gateway's users, ACL and queueing settings.
    template = (REPO / "config" / "mosquitto" / "sensor-gateway.conf").read_text()
    c.put_file(
        "/etc/mosquitto/conf.d/sensor-gateway.conf",
        "listener 1883 127.0.0.1\n"
        "password_file /etc/mosquitto/passwd\n"
        "acl_file /etc/mosquitto/acl\n" + template.replace("persistence true\n", ""),
    )
    c.put_file("/etc/mosquitto/acl", MOSQUITTO_ACL, mode=0o640, owner="root:mosquitto")
    c.put_file("/etc/mosquitto/passwd", "", mode=0o640, owner="root:mosquitto")
    for user in MQTT_USERS:
        c.run("mosquitto_passwd", "-b", "/etc/mosquitto/passwd", user, passwords[user])
    c.run("chown", "root:mosquitto", "/etc/mosquitto/passwd")
    c.run("chmod", "0640", "/etc/mosquitto/passwd")

    # Redis: a password.
    c.sh(f"echo 'requirepass {passwords['redis']}' >> /etc/redis/redis.conf")

    # The units, as they are.
    for unit in (*UNITS, TARGET):
        c.copy_in(REPO / "systemd" / unit, f"/etc/systemd/system/{unit}")
    c.systemctl("daemon-reload")
    return passwords


def start_backends(c: Container) -> None:
    c.systemctl("start", "mosquitto.service", "redis-server.service", "ferretdb.service")
    c.wait_for(
        lambda: (
            c.run("bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/27017", check=False).returncode == 0
        ),
        30,
        what="FerretDB on 27017",
    )
