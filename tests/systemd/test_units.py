"""The units inside a real systemd (a booted systemd-nspawn container).

- each unit is ``active`` only after its READY=1, which waits for its services;
- a SIGSTOPped ingester stops pinging: systemd logs a watchdog timeout, kills
  and restarts it, and a stream published meanwhile is stored, nothing lost;
- ``systemctl stop`` during a stream: clean exit 0, and nothing lost;
- ``journalctl -p warning`` has the rejected-payload warnings, not the info lines;
- STATUS= shows in ``systemctl status``.

Run with ``tests/systemd/run.sh`` (``make test-systemd``); needs root.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.systemd.nspawn import Container
from tests.systemd.provision import CREDS, VENV

pytestmark = pytest.mark.systemd

INGEST = "sensor-ingest.service"
SIMULATOR = "sensor-simulator.service"
API = "sensor-api.service"
GATEWAY_UNITS = (SIMULATOR, INGEST, API)
BACKENDS = ("mosquitto.service", "redis-server.service", "ferretdb.service")
PROBE = "/usr/local/lib/sensor-gateway-probe.py"
ENV = {"SENSOR_GATEWAY_CONFIG": "/etc/sensor-gateway/gateway.toml", "CREDENTIALS_DIRECTORY": CREDS}


class Gateway:
    """The container seen from a test: units, journal since the test began, MongoDB."""

    def __init__(self, c: Container) -> None:
        self.c = c
        self.since = ""
        self._sims = 0

    # -- units ---------------------------------------------------------------------

    def state(self, unit: str) -> str:
        return self.c.is_active(unit)

    def wait_state(self, unit: str, state: str, timeout: float = 30.0) -> None:
        self.c.wait_for(lambda: self.state(unit) == state, timeout, what=f"{unit} to be {state}")

    def prop(self, unit: str, name: str) -> str:
        return self.c.show(unit, name).get(name, "")

    def main_pid(self, unit: str) -> int:
        return int(self.prop(unit, "MainPID") or 0)

    def start(self, unit: str) -> None:
        self.c.systemctl("start", unit)

    def journal(self, unit: str, *args: str) -> str:
        """The unit's journal since the test began (messages only)."""
        return self.c.run(
            "journalctl",
            "--no-pager",
            "-u",
            unit,
            "-o",
            "cat",
            f"--since={self.since}",
            *args,
            check=False,
        ).stdout

    def mark_journal(self) -> None:
        # A time, not a cursor: journalctl 252 with --after-cursor and a -p/-u
        # filter skips the first matching entry when the cursor's own does not match.
        self.since = f"@{time.time():.6f}"

    def forget_ingest_session(self) -> None:
        """Connect once as the ingester with a clean session: the broker drops
        the queue an earlier test left in its persistent session."""
        password = self.c.run("cat", f"{CREDS}/mqtt-ingest-password").stdout.strip()
        self.c.run(
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-i",
            "sensor-ingest",
            "-u",
            "sensor-ingest",
            "-P",
            password,
            "-t",
            "stats/systemd-test",
            "-m",
            "x",
        )

    # -- data ----------------------------------------------------------------------

    def probe(self, cmd: str) -> str:
        return self.c.run(f"{VENV}/bin/python", PROBE, cmd, env=ENV).stdout

    def counts(self) -> tuple[int, int]:
        readings, rejected = self.probe("count").split()
        return int(readings), int(rejected)

    def simulate(self, count: int, rate: float) -> subprocess.Popen[str]:
        """The simulator as a plain process (not the unit): --count readings at --rate."""
        self._sims += 1
        env = {**ENV, "SENSOR_GATEWAY_SIMULATOR__CLIENT_ID": f"systemd-test-{self._sims}"}
        return self.c.popen(
            f"{VENV}/bin/sensor-gateway",
            "simulate",
            "--count",
            str(count),
            "--rate",
            str(rate),
            env=env,
        )

    def wait_published(self, sim: subprocess.Popen[str], timeout: float = 120.0) -> None:
        out, err = sim.communicate(timeout=timeout)
        assert sim.returncode == 0, f"simulator exited {sim.returncode}:\n{err[-3000:]}"

    def assert_all_stored(self, count: int, timeout: float = 90.0) -> None:
        """Exactly the ``count`` readings of one simulator run are stored: none lost."""
        self.c.wait_for(lambda: self.counts()[0] >= count, timeout, 1.0, f"{count} stored readings")
        ids = self.probe("ids").split()
        runs = {i.rsplit("-", 1)[0] for i in ids}
        seqs = sorted(int(i.rsplit("-", 1)[1]) for i in ids)
        assert len(runs) == 1, f"readings of several runs: {runs}"
        assert seqs == list(range(1, count + 1)), (
            f"{len(seqs)} stored; missing {sorted(set(range(1, count + 1)) - set(seqs))[:20]}"
        )


@pytest.fixture
def gw(container: Container, request: pytest.FixtureRequest) -> Iterator[Gateway]:
    c = container
    g = Gateway(c)
    c.systemctl("stop", *GATEWAY_UNITS, "sensor-gateway.target")
    c.systemctl("reset-failed", check=False)
    c.systemctl("unmask", "--runtime", *BACKENDS, check=False)
    c.systemctl("start", *BACKENDS)
    g.forget_ingest_session()
    g.probe("drop")
    g.mark_journal()
    yield g
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("---- journal of this test ----")
        print(
            c.run("journalctl", "--no-pager", "-o", "short-monotonic", f"--since={g.since}").stdout[
                -20000:
            ]
        )
    c.systemctl("stop", *GATEWAY_UNITS, check=False)
    c.systemctl("unmask", "--runtime", *BACKENDS, check=False)


def mask_and_stop(gw: Gateway, unit: str) -> None:
    """Stop a back end and keep the gateway's Wants= from starting it again."""
    gw.c.systemctl("mask", "--runtime", unit)
    gw.c.systemctl("stop", unit)


def unmask_and_start(gw: Gateway, unit: str) -> None:
    gw.c.systemctl("unmask", "--runtime", unit)
    gw.c.systemctl("start", unit)


# -- READY ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "backend", "waiting"),
    [
        (INGEST, "ferretdb.service", "mongodb"),
        (SIMULATOR, "mosquitto.service", ""),
        (API, "ferretdb.service", "mongodb"),
    ],
)
def test_active_only_after_ready(gw: Gateway, unit: str, backend: str, waiting: str) -> None:
    mask_and_stop(gw, backend)
    gw.c.systemctl("start", "--no-block", unit)
    gw.c.wait_for(lambda: gw.main_pid(unit), 10, what=f"{unit} to run")
    time.sleep(4)
    # Running, but not ready: its back end is down.
    assert gw.state(unit) == "activating"
    assert gw.main_pid(unit)
    if waiting:  # and says what it waits for, in the log and in `systemctl status`
        gw.c.wait_for(lambda: waiting in gw.journal(unit).lower(), 15, what=f"{waiting} named")
        gw.c.wait_for(
            lambda: f"waiting for {waiting}" in gw.prop(unit, "StatusText").lower(),
            15,
            what="STATUS= naming what it waits for",
        )
    assert gw.state(unit) == "activating"
    unmask_and_start(gw, backend)
    gw.wait_state(unit, "active", 45)
    text = gw.journal(unit)
    assert "Started " in text


# -- STATUS --------------------------------------------------------------------------


def test_status_line_in_systemctl_status(gw: Gateway) -> None:
    gw.start(INGEST)
    sim = gw.simulate(200, rate=400)
    gw.wait_published(sim)
    gw.assert_all_stored(200)
    gw.c.wait_for(
        lambda: "stored 200," in gw.prop(INGEST, "StatusText"), 10, what="STATUS= stored 200"
    )
    status = gw.c.systemctl("status", INGEST, check=False).stdout
    assert re.search(r'Status: "stored 200, rejected 0, .*lag \d+ ms', status), status


def test_simulator_unit_publishes_and_stops_cleanly(gw: Gateway) -> None:
    gw.start(INGEST)
    gw.start(SIMULATOR)
    assert gw.state(SIMULATOR) == "active"
    gw.c.wait_for(lambda: gw.counts()[0] >= 3, 20, what="simulated readings stored")
    assert "published" in gw.prop(SIMULATOR, "StatusText")
    gw.c.systemctl("stop", SIMULATOR)
    assert gw.prop(SIMULATOR, "Result") == "success"
    assert gw.prop(SIMULATOR, "ExecMainStatus") == "0"


# -- watchdog --------------------------------------------------------------------------


def test_hung_ingester_is_killed_and_restarted_nothing_lost(gw: Gateway) -> None:
    gw.start(INGEST)
    pid = gw.main_pid(INGEST)
    restarts = int(gw.prop(INGEST, "NRestarts"))
    count = 8000
    sim = gw.simulate(count, rate=250)  # about 32 s of stream
    gw.c.wait_for(lambda: gw.counts()[0] > 100, 20, what="the stream to flow")
    gw.c.run("bash", "-c", f"kill -STOP {pid}")  # no procps in the image
    # WatchdogSec=20: the last ping was at most 5 s before the stop.
    gw.c.wait_for(lambda: "Watchdog timeout" in gw.journal(INGEST), 40, 1.0, "the watchdog timeout")
    gw.c.wait_for(
        lambda: gw.main_pid(INGEST) not in (0, pid) and gw.state(INGEST) == "active",
        40,
        what="a restarted ingester",
    )
    text = gw.journal(INGEST)
    assert "Killing process" in text and "SIGABRT" in text, text
    assert int(gw.prop(INGEST, "NRestarts")) == restarts + 1
    gw.wait_published(sim)
    gw.assert_all_stored(count)


# -- stop --------------------------------------------------------------------------------


def test_stop_during_stream_loses_nothing(gw: Gateway) -> None:
    gw.start(INGEST)
    count = 4000
    sim = gw.simulate(count, rate=400)  # about 10 s
    gw.c.wait_for(lambda: gw.counts()[0] > 300, 20, what="the stream to flow")
    t0 = time.monotonic()
    gw.c.systemctl("stop", INGEST)
    stop_s = time.monotonic() - t0
    assert gw.prop(INGEST, "Result") == "success"
    assert gw.prop(INGEST, "ExecMainStatus") == "0"
    assert stop_s < 10, f"stop took {stop_s:.1f}s"
    assert "stopped after flushing" in gw.journal(INGEST)
    stored_while_down = gw.counts()[0]
    time.sleep(2)
    assert gw.counts()[0] == stored_while_down  # nobody ingests: the broker queues
    gw.start(INGEST)
    gw.wait_published(sim)
    gw.assert_all_stored(count)


# -- journald --------------------------------------------------------------------------


def test_journal_priorities(gw: Gateway) -> None:
    gw.start(INGEST)
    password = gw.c.run("cat", f"{CREDS}/mqtt-simulator-password").stdout.strip()
    garbage = ["not json", "[1,2,3]", '{"value": "NaN"}']
    for i, payload in enumerate(garbage):
        gw.c.run(
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-u",
            "sensor-simulator",
            "-P",
            password,
            "-q",
            "1",
            "-t",
            f"sensors/temperature/garbage-{i}",
            "-m",
            payload,
        )
    gw.c.wait_for(lambda: gw.counts()[1] >= len(garbage), 20, what="rejects stored")
    warnings = gw.journal(INGEST, "-p", "warning")
    assert warnings.count("rejected message on") == len(garbage), warnings
    assert "subscribed to" not in warnings and "MQTT connected" not in warnings, warnings
    info = gw.journal(INGEST, "-p", "info")
    assert "subscribed to" in info and "rejected message on" in info
    # journald took the priority from the <N> prefix, which is not in the message.
    records = [
        json.loads(line)
        for line in gw.c.run(
            "journalctl", "-u", INGEST, "-o", "json", f"--since={gw.since}"
        ).stdout.splitlines()
    ]
    prio = {r["MESSAGE"].split(": ", 1)[-1][:20]: r["PRIORITY"] for r in records}
    rejected = [p for m, p in prio.items() if m.startswith("rejected message")]
    assert rejected and set(rejected) == {"4"}, prio
    assert not any(str(r["MESSAGE"]).startswith("<") for r in records)


# -- API and target ------------------------------------------------------------------


def http_get(gw: Gateway, path: str) -> tuple[int, str]:
    r = gw.c.run(
        "curl", "-s", "-m", "5", "-w", "\n%{http_code}", f"http://127.0.0.1:8000{path}", check=False
    )
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def test_api_serves_healthz_once_active(gw: Gateway) -> None:
    gw.start(API)  # returns once READY=1: /healthz answered and the back ends did
    assert gw.state(API) == "active"
    code, body = http_get(gw, "/healthz")
    assert code == 200, body
    code, body = http_get(gw, "/readyz")
    assert code == 200, body
    assert "serving on" in gw.prop(API, "StatusText")
    # Nothing in the sandbox trips gunicorn up (e.g. its control socket under ~).
    assert "[ERROR]" not in gw.journal(API), gw.journal(API)
    # The watchdog keeps being fed: still the same process well past WatchdogSec/2.
    pid = gw.main_pid(API)
    time.sleep(12)
    assert gw.state(API) == "active" and gw.main_pid(API) == pid
    gw.c.systemctl("stop", API)
    assert gw.prop(API, "Result") == "success"


def test_target_starts_and_stops_the_gateway(gw: Gateway) -> None:
    gw.c.systemctl("start", "sensor-gateway.target")
    assert gw.state(INGEST) == "active" and gw.state(API) == "active"
    assert gw.state(SIMULATOR) == "inactive"  # only when enabled
    # PartOf=: stopping the target stops them (jobs systemctl does not wait for).
    gw.c.systemctl("stop", "sensor-gateway.target")
    gw.wait_state(API, "inactive")
    gw.wait_state(INGEST, "inactive")
    assert gw.prop(API, "Result") == "success" and gw.prop(INGEST, "Result") == "success"


# -- a permanent database error ------------------------------------------------------

AUTH_PORT = 27099
WRONG_DROPIN = "/etc/systemd/system/sensor-ingest.service.d/wrong-password.conf"


def test_wrong_mongodb_password_fails_the_unit_visibly(gw: Gateway) -> None:
    """MongoDB refusing the ingester's credentials is no outage to wait out: the
    unit ends `failed` (exit 78, not restarted) within 60 s and says why."""
    c = gw.c
    # A FerretDB that requires a login, beside the test's own.
    c.run(
        "systemd-run",
        "--unit=ferretdb-auth",
        "-p",
        "StateDirectory=ferretdb-auth",
        "-E",
        "FERRETDB_SETUP_PASSWORD=right-password",
        "/usr/local/bin/ferretdb",
        "--handler=sqlite",
        "--sqlite-url=file:/var/lib/ferretdb-auth/",
        "--state-dir=/var/lib/ferretdb-auth",
        f"--listen-addr=127.0.0.1:{AUTH_PORT}",
        "--debug-addr=127.0.0.1:27098",
        "--telemetry=disable",
        "--test-enable-new-auth",
        "--setup-database=sensor_gateway",
        "--setup-username=gateway",
    )
    c.put_file("/etc/sensor-gateway/wrong-mongodb-password", "wrong-password\n", mode=0o600)
    c.put_file(
        WRONG_DROPIN,
        "[Service]\n"
        f"Environment=SENSOR_GATEWAY_MONGODB__URI=mongodb://127.0.0.1:{AUTH_PORT}/\n"
        "Environment=SENSOR_GATEWAY_MONGODB__USERNAME=gateway\n"
        "Environment=SENSOR_GATEWAY_MONGODB__PASSWORD_FILE=wrong-mongodb-password\n"
        "LoadCredential=wrong-mongodb-password:/etc/sensor-gateway/wrong-mongodb-password\n",
    )
    try:
        c.systemctl("daemon-reload")
        restarts = int(gw.prop(INGEST, "NRestarts"))
        started = time.monotonic()
        c.systemctl("start", "--no-block", INGEST)
        c.wait_for(lambda: gw.state(INGEST) == "failed", 60, 0.5, "sensor-ingest to fail")
        took = time.monotonic() - started
        print(f"sensor-ingest failed {took:.1f}s after start")
        props = c.show(INGEST, "Result", "ExecMainStatus", "NRestarts")
        assert props["Result"] == "exit-code", props
        assert props["ExecMainStatus"] == "78", props
        assert int(props["NRestarts"]) == restarts, "systemd restarted into the same error"
        status = c.systemctl("status", "--no-pager", "-l", INGEST, check=False).stdout
        assert "MongoDB refuses the ingester" in status, status
        assert "MongoDB refuses the ingester" in gw.journal(INGEST, "-p", "err")
    finally:
        c.run("rm", "-f", WRONG_DROPIN)
        c.systemctl("daemon-reload")
        c.systemctl("reset-failed", INGEST, check=False)
        c.systemctl("stop", "ferretdb-auth", check=False)
    # Back on the right configuration it runs.
    gw.start(INGEST)
    gw.wait_state(INGEST, "active")


# -- ingest workers ------------------------------------------------------------------

WORKER = "sensor-ingest@1.service"
WORKERS_DROPINS = (
    "/etc/systemd/system/sensor-ingest.service.d/workers.conf",
    "/etc/systemd/system/sensor-ingest@.service.d/workers.conf",
)


def test_a_worker_unit_shares_the_stream_and_is_restarted_after_kill_9(gw: Gateway) -> None:
    """sensor-ingest (worker 0) and sensor-ingest@1 on one shared subscription:
    both READY, both write; worker 1 killed with SIGKILL mid-stream is
    restarted by systemd, and every reading is stored exactly once."""
    for path in WORKERS_DROPINS:
        gw.c.put_file(path, "[Service]\nEnvironment=SENSOR_GATEWAY_INGEST__WORKERS=2\n")
    gw.c.systemctl("daemon-reload")
    try:
        gw.start(INGEST)
        gw.start(WORKER)
        assert gw.state(INGEST) == "active" and gw.state(WORKER) == "active"
        assert "subscribed to '$share/sensor-ingest/sensors/#'" in gw.journal(WORKER)
        first = gw.main_pid(WORKER)
        sim = gw.simulate(6000, 500)
        gw.c.wait_for(lambda: gw.counts()[0] > 1500, 60, 0.5, "ingest under way")
        gw.c.systemctl("kill", "--signal=KILL", WORKER)
        gw.c.wait_for(
            lambda: gw.state(WORKER) == "active" and gw.main_pid(WORKER) not in (0, first),
            30,
            what="systemd to restart worker 1",
        )
        gw.wait_published(sim)
        gw.assert_all_stored(6000)
        assert int(gw.prop(WORKER, "NRestarts")) == 1
        lanes = gw.probe("lanes").split()
        assert lanes == ["0", "1"], lanes
    finally:
        gw.c.systemctl("stop", WORKER, check=False)
        gw.c.run("rm", "-f", *WORKERS_DROPINS)
        gw.c.systemctl("daemon-reload")
        gw.c.run(  # worker 1's session: gone, so no later test's messages wait in it
            "sh",
            "-c",
            f"mosquitto_pub -h 127.0.0.1 -i sensor-ingest-1 -u sensor-ingest "
            f'-P "$(cat {CREDS}/mqtt-ingest-password)" -t stats/systemd-test -m x',
        )
