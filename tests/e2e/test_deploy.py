"""End to end: deploy/ansible/site.yml turns a fresh Debian bookworm into a running gateway.

A fresh systemd-nspawn container is booted from a cached minimal debootstrap
tree (tests/systemd/nspawn.py; only systemd, python3 and ca-certificates in
it: Mosquitto, Redis, python3-venv... come from apt during the play, through a
veth pair and NAT). The playbook runs against it with Ansible's
community.docker.nsenter connection, engine ``ferretdb`` from the local binary
(.ci/build-ferretdb.sh), the package from a wheelhouse built from this
checkout. Then, in order:

- every service is active;
- readings from the simulator are in the database within 15 s, and (when the
  API exists) served through the API to ``curl`` from outside the container,
  over HTTPS (a self-signed certificate given to the role) with the bearer
  token the play generated (none: 401; ``/healthz`` open; plain HTTP: no);
- a token made and revoked on the host with ``sensor-gateway token`` works,
  then is refused, without restarting the API;
- anonymous MQTT is refused, and the ACL holds;
- no file under /etc (nor /opt, /usr/local, /var, /root, /home, /srv, /tmp,
  /boot) holds any generated secret in clear, except the gateway's own
  credential files (root:root 0600), also after files earlier versions of the
  roles left (``/etc/mosquitto/passwd.plain``, ``/etc/ferretdb/ferretdb.env``)
  were planted before the first run; Redis takes the password it only has the
  SHA-256 of;
- every unit's ``Documentation=`` names a file installed on the host;
- the page-size pre-flight (roles/page_size) leaves this x86_64 host alone
  (its ARM cases: test_page_size.py);
- ``journalctl -u sensor-ingest`` shows the daemon's own lines;
- a second run of the playbook reports ``changed=0``;
- after powering the container off and booting the same tree again, the
  services come back and the earlier readings are still there.

Run with ``tests/e2e/run.sh`` (``make e2e``): root, systemd-container,
debootstrap and iptables are needed. ``SG_KEEP_CONTAINER=1`` keeps the tree
and logs in the work folder for a post-mortem.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.ansible_run import (
    ROOTFS_PACKAGES,
    PlaybookRun,
    boot_container,
    cleaned_up,
    fresh_root,
    run_playbook,
)
from tests.e2e.conftest import NOTES, TIMINGS
from tests.systemd import nspawn
from tests.systemd.nspawn import Container, VethNet
from tests.test_api_auth import self_signed

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
NAME = "sge2e"  # matches inventory/test-container.yml
NET = VethNet(os.environ.get("SG_E2E_NET", "10.213.7.0"))
DEP_WHEELS = REPO / ".cache" / "e2e-wheelhouse"
BACKENDS = ("mosquitto", "redis-server", "ferretdb")
API_PORT = 8000
GATEWAY_UNITS = ("sensor-ingest.service", "sensor-api.service", "sensor-simulator.service")
# What must hold a secret in clear on the host: the gateway's credential files,
# handed to the services by systemd (LoadCredential=), root:root 0600 each.
CREDENTIALS = "/etc/sensor-gateway/credentials"
GATEWAY_SECRETS = (
    "mongodb-password",
    "redis-password",
    "mqtt-ingest-password",
    "mqtt-simulator-password",
    "mqtt-api-password",
)
# Where the clear-text search looks (grep -r): configuration, the package, state,
# logs and the journal, home folders, temporary files, the boot folder.
SEARCHED = ("/etc", "/opt", "/usr/local", "/var", "/root", "/home", "/srv", "/tmp", "/boot")


# Reads the database as the gateway does (its venv, its credentials).
DB_PROBE = r"""
import json, sys, pymongo
from sensor_gateway import layout
pw = open("/etc/sensor-gateway/credentials/mongodb-password").read().strip()
c = pymongo.MongoClient("mongodb://127.0.0.1:27017/?authSource=sensor_gateway",
                        username="sensor-gateway", password=pw, serverSelectionTimeoutMS=3000)
stored = [s for d in c.sensor_gateway[layout.SAMPLES].find() for s in layout.samples_of(d)]
stored.sort(key=lambda s: s.order_key())
ids = set(sys.argv[1:])
out = {"count": len(stored),
       "latest": [s.msg_id for s in reversed(stored[-20:])],
       "found": [s.msg_id for s in stored if s.msg_id in ids]}
print(json.dumps(out, default=str))
"""

# Without credentials the database must refuse.
DB_ANON_PROBE = r"""
import pymongo
c = pymongo.MongoClient("mongodb://127.0.0.1:27017/", serverSelectionTimeoutMS=3000)
try:
    c.sensor_gateway.samples.find_one()
    print("ALLOWED")
except pymongo.errors.OperationFailure as e:
    print("REFUSED", e.code)
"""


@dataclass
class Deployment:
    work: Path
    root: Path
    wheelhouse: Path
    secrets: Path
    tls: tuple[Path, Path]  # the API's certificate and key, on the controller
    container: Container | None = None
    boots: int = 0
    notes: dict = field(default_factory=dict)
    runs: dict[str, PlaybookRun] = field(default_factory=dict)

    @property
    def c(self) -> Container:
        assert self.container is not None, "container is not running"
        return self.container

    def boot(self) -> Container:
        t0 = time.monotonic()
        self.boots += 1
        c = boot_container(
            NAME, self.root, self.work / f"boot{self.boots}", network="veth", veth=NET, nat=True
        )
        self.container = c
        TIMINGS[f"boot #{self.boots}"] = time.monotonic() - t0
        return c

    def power_off(self) -> None:
        if self.container is not None:
            self.container.stop()
            self.container = None

    def playbook(self, label: str, *extra: str) -> tuple[str, dict[str, int]]:
        t0 = time.monotonic()
        run = run_playbook(
            self.c.leader,
            self.work,
            label,
            *extra,
            "-e",
            f"gateway_secrets_dir={self.secrets}",
            # The units and docs from the snapshot the wheel was built from, so that
            # edits to the checkout during the run do not count as changes.
            "-e",
            f"sensor_gateway_units_src={self.wheelhouse.parent / 'src' / 'systemd'}",
            "-e",
            f"sensor_gateway_docs_src={self.wheelhouse.parent / 'src'}",
            env={
                "SG_WHEELHOUSE": str(self.wheelhouse),
                "SG_FERRETDB_BINARY": str(ferretdb_binary()),
                "SG_E2E_TLS_CERT": str(self.tls[0]),
                "SG_E2E_TLS_KEY": str(self.tls[1]),
            },
        )
        TIMINGS[f"playbook ({label})"] = time.monotonic() - t0
        recap = run.recap()
        assert run.returncode == 0 and recap, f"playbook ({label}) failed:\n{run.out[-6000:]}"
        self.runs[label] = run
        return run.out, recap

    def generated_secrets(self) -> dict[str, str]:
        """Every secret the play generated on the controller, by file name
        (group_vars' passwords, the API token, the per-device broker password)."""
        found = {}
        for p in sorted(self.secrets.rglob("*")):
            if p.is_file():
                # ansible.builtin.password's file: the password, maybe " salt=..." after it.
                value = p.read_text().strip().split(" salt=")[0].split(" ident=")[0]
                found[str(p.relative_to(self.secrets))] = value
        return found

    def plant_earlier_leftovers(self) -> None:
        """Before the first run: the clear-text files earlier versions of the roles
        left on a host, with the passwords this deployment is about to use."""
        self.secrets.mkdir(parents=True, exist_ok=True)
        alphabet = string.ascii_letters + string.digits
        values = {}
        for name in ("mqtt-ingest-password", "mongodb-password"):
            values[name] = "".join(secrets.choice(alphabet) for _ in range(32))
            path = self.secrets / name
            path.write_text(values[name])
            path.chmod(0o600)
        ingest, mongodb = values["mqtt-ingest-password"], values["mongodb-password"]
        for inner, text in (
            ("/etc/mosquitto/passwd.plain", f"sensor-ingest:{ingest}\n"),
            ("/etc/ferretdb/ferretdb.env", f"FERRETDB_SETUP_PASSWORD={mongodb}\n"),
        ):
            host = self.root / inner.lstrip("/")
            host.parent.mkdir(parents=True, exist_ok=True)
            host.write_text(text)
            host.chmod(0o600)

    def db(self, *ids: str) -> dict:
        r = self.c.run("/opt/sensor-gateway/venv/bin/python", "-c", DB_PROBE, *ids, check=False)
        if r.returncode != 0:
            return {"count": 0, "latest": [], "found": [], "error": r.stderr[-500:]}
        return json.loads(r.stdout)

    @property
    def api_token(self) -> str:
        """The token the play generated for sensor_gateway_api_tokens: [e2e]."""
        return (self.secrets / "api-token-e2e").read_text().strip()

    def curl(self, path: str, token: str | None = "", scheme: str = "https") -> tuple[int, str]:
        """GET through the API from outside the container, over HTTPS checked against
        the test's certificate; ``token=None`` sends none, the default sends the play's."""
        token = self.api_token if token == "" else token
        auth = ["-H", f"Authorization: Bearer {token}"] if token is not None else []
        r = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "3",
                "--cacert",
                str(self.tls[0]),
                *auth,
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                f"{scheme}://{NET.container}:{API_PORT}{path}",
            ],
            capture_output=True,
            text=True,
        )
        body, _, code = r.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def services(self) -> list[str]:
        return [*BACKENDS, "sensor-ingest", "sensor-simulator", "sensor-api"]


def ferretdb_binary() -> Path:
    env = os.environ.get("SG_FERRETDB_BINARY") or os.environ.get("FERRETDB")
    p = Path(env) if env else REPO / ".cache" / "bin" / "ferretdb"
    if not p.is_file():
        subprocess.run([str(REPO / ".ci" / "build-ferretdb.sh")], check=True)
    return p


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        check=True,
        capture_output=True,
        text=True,
    )


def build_wheelhouse(dest: Path) -> Path:
    """The package's wheel from this checkout plus every dependency's wheel.

    The package is built from a copy of the source (the shared working tree
    gets no build/ folder); dependency wheels are cached in .cache/e2e-wheelhouse.
    ``async-timeout`` is added explicitly: redis needs it on Python < 3.11.3
    (the container's 3.11.2), which the host's resolver skips.
    """
    src = dest.parent / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".cache", "var", "build", "dist", "*.egg-info", "__pycache__", "tests"
        ),
    )
    if not (src / "README.md").exists():
        (src / "README.md").write_text("sensor-gateway\n")
    dest.mkdir(parents=True)
    _pip("wheel", "--no-deps", str(src), "-w", str(dest))
    (wheel,) = dest.glob("sensor_gateway-*.whl")
    DEP_WHEELS.mkdir(parents=True, exist_ok=True)
    _pip("wheel", str(wheel), "async-timeout>=4.0.3", "-w", str(DEP_WHEELS))
    for w in DEP_WHEELS.glob("*.whl"):
        if not w.name.startswith("sensor_gateway-"):
            shutil.copy2(w, dest / w.name)
    (DEP_WHEELS / wheel.name).unlink(missing_ok=True)
    return dest


@pytest.fixture(scope="module")
def dep() -> Iterator[Deployment]:
    t_all = time.monotonic()
    try:
        nspawn.require_tools()
        if not shutil.which("iptables"):
            raise nspawn.NspawnError("iptables is needed for the container's NAT")
    except nspawn.NspawnError as exc:
        pytest.fail(f"e2e cannot run here: {exc}", pytrace=False)

    t0 = time.monotonic()
    rootfs = nspawn.build_rootfs(include=ROOTFS_PACKAGES)
    TIMINGS["rootfs (cached after the first debootstrap)"] = time.monotonic() - t0

    work = Path(tempfile.mkdtemp(prefix="sg-e2e-"))
    t0 = time.monotonic()
    wheelhouse = build_wheelhouse(work / "wheelhouse")
    TIMINGS["wheelhouse"] = time.monotonic() - t0

    t0 = time.monotonic()
    root = fresh_root(rootfs, work)
    TIMINGS["fresh copy of the rootfs"] = time.monotonic() - t0

    d = Deployment(
        work=work,
        root=root,
        wheelhouse=wheelhouse,
        secrets=work / "secrets",
        tls=self_signed(work / "tls", NET.container),
    )
    print(f"\ne2e work folder: {work}")
    d.plant_earlier_leftovers()
    with cleaned_up(d, work):
        d.boot()
        _, recap = d.playbook("first run")
        d.notes["first_recap"] = recap
        d.notes["deployed_at"] = time.monotonic()
        yield d
    TIMINGS["total"] = time.monotonic() - t_all


def test_first_run_converges(dep: Deployment) -> None:
    recap = dep.notes["first_recap"]
    assert recap["failed"] == 0 and recap["unreachable"] == 0
    assert recap["changed"] > 0
    # The page-size pre-flight reads nothing on x86_64 (4 KiB pages always).
    run = dep.runs["first run"]
    assert run.task_status("page_size : Read the memory page size") == "skipping", run.out[:3000]


def test_units_documentation_is_installed(dep: Deployment) -> None:
    """Each unit's Documentation= names files (file://) the role installed."""
    seen = {}
    for unit in (*GATEWAY_UNITS, "sensor-gateway.target"):
        urls = dep.c.run("systemctl", "show", "-p", "Documentation", "--value", unit).stdout.split()
        assert urls, f"{unit} has no Documentation="
        for url in urls:
            assert url.startswith("file:///"), f"{unit}: {url} is not a file on the host"
            path = url.removeprefix("file://")
            size = dep.c.run("stat", "-c", "%s %U:%G %a", path, check=False)
            assert size.returncode == 0, f"{unit}: Documentation= {path} is not on the host"
            nbytes, owner, mode = size.stdout.split()
            assert int(nbytes) > 0 and owner == "root:root" and mode == "644", (path, size.stdout)
            seen[path] = nbytes
    NOTES.append(f"Documentation= targets on the host: {seen}")


def test_no_clear_text_secret_on_the_host(dep: Deployment) -> None:
    """No generated secret is in clear in any file, but the credentials that must be."""
    generated = dep.generated_secrets()
    assert set(GATEWAY_SECRETS) <= set(generated), generated.keys()
    assert any(k.startswith("api-token-") for k in generated)
    assert any(k.startswith("mqtt-devices/") for k in generated)
    # The leftovers planted before the first run are gone.
    for leftover in ("/etc/mosquitto/passwd.plain", "/etc/ferretdb/ferretdb.env"):
        assert dep.c.run("test", "-e", leftover, check=False).returncode != 0, leftover
    # FerretDB's first-start setup file has served and is gone too.
    assert dep.c.run("test", "-e", "/etc/ferretdb/setup.env", check=False).returncode != 0

    allowed = {f"{CREDENTIALS}/{name}": name for name in GATEWAY_SECRETS}
    assert all(generated.values())
    patterns = "".join(f"{value}\n" for value in generated.values())
    r = dep.c.run("grep", "-rlF", "-f", "-", *SEARCHED, input=patterns, check=False, timeout=300)
    assert r.returncode in (0, 1), r.stderr[-2000:]
    holders: dict[str, list[str]] = {}
    for path in r.stdout.splitlines():
        content = dep.c.host_path(path).read_bytes()
        holders[path] = [n for n, v in generated.items() if v.encode() in content]
    unexpected = {p: names for p, names in holders.items() if allowed.get(p) not in names}
    assert not unexpected, f"secrets in clear on the host: {unexpected}"
    # Each credential holds its own secret, root only.
    for path, name in allowed.items():
        assert holders.get(path) == [name], (path, holders.get(path))
        assert dep.c.run("stat", "-c", "%U:%G %a", path).stdout.split() == ["root:root", "600"]
    assert dep.c.run("stat", "-c", "%U:%G %a", CREDENTIALS).stdout.split() == ["root:root", "700"]
    NOTES.append(
        f"clear-text search: {len(generated)} secrets over {' '.join(SEARCHED)}; "
        f"found only in {len(allowed)} credential files (root:root 0600)"
    )

    # The broker's file holds hashes; Redis only the password's SHA-256, and takes it.
    passwd = dep.c.run("cat", "/etc/mosquitto/passwd").stdout
    assert re.search(r"^sensor-ingest:\$7\$\d+\$", passwd, re.M), passwd
    redis_conf = dep.c.run("cat", "/etc/redis/redis.conf").stdout
    assert not re.search(r"^\s*requirepass\b", redis_conf, re.M), redis_conf
    assert re.search(r"^user default on #[0-9a-f]{64} ", redis_conf, re.M), redis_conf
    cli = ("redis-cli", "--no-auth-warning")
    pw = generated["redis-password"]
    assert dep.c.run(*cli, "-a", pw, "ping").stdout.strip() == "PONG"
    assert "NOAUTH" in dep.c.run(*cli, "ping", check=False).stdout
    wrong = dep.c.run(*cli, "-a", "wrong-" + pw, "ping", check=False)
    assert "WRONGPASS" in wrong.stdout + wrong.stderr, wrong
    # ... and the gateway authenticates with it: the ingester keeps its keys there.
    keys = dep.c.run(*cli, "-a", pw, "--scan", "--pattern", "sg:*").stdout.split()
    assert keys, "the gateway wrote nothing to Redis"


def test_every_service_active(dep: Deployment) -> None:
    states = {u: dep.c.is_active(u) for u in dep.services()}
    states["sensor-gateway.target"] = dep.c.is_active("sensor-gateway.target")
    assert all(s == "active" for s in states.values()), states
    # Loopback only: nothing but the API (and sshd-less container) on other addresses.
    listening = dep.c.run("ss", "-Hltn", check=False).stdout
    public = [
        line.split()[3]
        for line in listening.splitlines()
        if line.split()[3].rsplit(":", 1)[0] not in ("127.0.0.1", "[::1]", "::1")
    ]
    allowed = {f"0.0.0.0:{API_PORT}"}
    assert set(public) <= allowed, f"listening beyond loopback: {public}"


def test_readings_within_15s(dep: Deployment) -> None:
    t0 = dep.notes["deployed_at"]
    deadline = t0 + 15
    got: dict = {}
    while time.monotonic() < deadline:
        got = dep.db()
        if got["count"] > 0:
            break
        time.sleep(0.5)
    TIMINGS["first reading in the database after the play"] = time.monotonic() - t0
    assert got.get("count", 0) > 0, f"no readings in the database 15 s after the play: {got}"
    body = ""
    while time.monotonic() < deadline:
        code, body = dep.curl("/readings?sensor_id=temp-1&limit=5")
        if code == 200 and '"temp-1"' in body:
            break
        time.sleep(0.5)
    TIMINGS["first reading through the API (curl) after the play"] = time.monotonic() - t0
    assert '"temp-1"' in body, f"API gave no temp-1 readings within 15 s: {body[:500]}"


def test_api_requires_the_token(dep: Deployment) -> None:
    code, body = dep.curl("/readings/latest", token=None)
    assert code == 401 and "bearer token" in body, (code, body)
    assert dep.curl("/readings/latest", token="sgw_" + "x" * 43)[0] == 401
    assert dep.curl("/healthz", token=None)[0] == 200
    assert dep.curl("/readings/latest")[0] == 200
    # Hashes only, readable by the service's group alone.
    path = "/etc/sensor-gateway/api-tokens.json"
    assert dep.c.run("stat", "-c", "%U:%G %a", path).stdout.split() == [
        "root:sensor-gateway",
        "640",
    ]
    assert dep.api_token not in dep.c.run("cat", path).stdout
    # A token made on the host works at once; revoked, it is refused at once.
    cli = ("/opt/sensor-gateway/venv/bin/sensor-gateway", "-c", "/etc/sensor-gateway/gateway.toml")
    token = dep.c.run(*cli, "token", "add", "e2e-probe").stdout.strip()
    assert dep.curl("/sensors", token=token)[0] == 200
    dep.c.run(*cli, "token", "revoke", "e2e-probe")
    assert dep.curl("/sensors", token=token)[0] == 401
    assert dep.c.run("stat", "-c", "%U:%G %a", path).stdout.split() == [
        "root:sensor-gateway",
        "640",
    ]
    assert dep.c.is_active("sensor-api") == "active"
    # HTTPS only, from credentials systemd hands to sensor-api alone.
    assert dep.curl("/healthz", token=None, scheme="http")[0] != 200
    drop_in = dep.c.run("cat", "/etc/systemd/system/sensor-api.service.d/tls.conf").stdout
    assert "LoadCredential=api-tls-key:" in drop_in
    key = "/etc/sensor-gateway/credentials/api-tls-key"
    assert dep.c.run("stat", "-c", "%U:%G %a", key).stdout.split() == ["root:root", "600"]


def test_anonymous_mqtt_refused_and_acl_holds(dep: Deployment) -> None:
    anon = dep.c.run(
        "mosquitto_pub", "-h", "127.0.0.1", "-t", "sensors/anon", "-m", "{}", "-q", "1", check=False
    )
    assert anon.returncode != 0 and "not authori" in anon.stderr, anon
    wrong = dep.c.run(
        "mosquitto_pub",
        *("-h", "127.0.0.1", "-u", "sensor-simulator", "-P", "wrong-password"),
        *("-t", "sensors/anon", "-m", "{}", "-q", "1"),
        check=False,
    )
    assert wrong.returncode != 0 and "not authori" in wrong.stderr, wrong
    # The API's broker user may not publish readings: the broker drops it.
    probe_id = f"acl-probe-{time.time_ns()}"
    payload = json.dumps({"sensor_id": "acl-probe", "value": 1, "msg_id": probe_id})
    api_pw = dep.c.run("cat", "/etc/sensor-gateway/credentials/mqtt-api-password").stdout
    dep.c.run(
        "mosquitto_pub",
        *("-h", "127.0.0.1", "-u", "sensor-api", "-P", api_pw.strip(), "-V", "mqttv311"),
        *("-t", "sensors/temperature/acl-probe", "-m", payload, "-q", "1"),
    )
    time.sleep(3)
    assert dep.db(probe_id)["found"] == [], "a reading published by sensor-api was stored"
    # FerretDB refuses clients without credentials.
    anon_db = dep.c.run("/opt/sensor-gateway/venv/bin/python", "-c", DB_ANON_PROBE).stdout
    assert anon_db.startswith("REFUSED"), anon_db


def test_journal_has_the_daemons_lines(dep: Deployment) -> None:
    out = dep.c.run("journalctl", "--no-pager", "-u", "sensor-ingest", "-o", "json").stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    own = [e for e in entries if e.get("_PID") != "1" and e.get("_COMM") != "systemd"]
    assert own, "journalctl -u sensor-ingest shows only systemd's own lines"
    dep.notes["journal_sample"] = [e.get("MESSAGE") for e in own[:5]]
    NOTES.append("journalctl -u sensor-ingest, the daemon's first lines:")
    NOTES.extend(f"    {msg}" for msg in dep.notes["journal_sample"])


def test_ferretdb_reads_by_id_are_indexed(dep: Deployment) -> None:
    """sensor-ingest.service's ExecStartPost (sensor-gateway ferretdb-index, as root)
    indexed every collection read by _id, checked with EXPLAIN, files' owner kept."""
    from sensor_gateway import layout

    out = dep.c.run("journalctl", "--no-pager", "-u", "sensor-ingest", "-o", "cat").stdout
    for coll in layout.BY_ID:
        assert f"{coll}: indexed" in out, out[-3000:]
    owners = dep.c.run(
        "stat", "-c", "%U", "/var/lib/private/ferretdb/data/sensor_gateway.sqlite"
    ).stdout.split()
    assert owners and owners[0] != "root", owners
    NOTES.append(f"FerretDB _id index: {', '.join(layout.BY_ID)} indexed (EXPLAIN checked)")


def test_second_run_changes_nothing(dep: Deployment) -> None:
    _, recap = dep.playbook("second run")
    NOTES.append(f"second playbook run: {recap}")
    changed = dep.runs["second run"].changed_tasks()
    assert recap["changed"] == 0, f"second run changed {recap['changed']} task(s): {changed}"


def test_the_workers_knob_starts_a_worker_and_retires_it(dep: Deployment) -> None:
    """sensor_gateway_ingest_workers: 2 starts sensor-ingest@1 beside worker 0 on
    one shared subscription; back to 1, the role stops it and retires it
    (`sensor-gateway ingest --retire`), so no message waits in its session."""
    c = dep.c
    dep.playbook("workers 2", "-e", "sensor_gateway_ingest_workers=2")
    assert c.is_active("sensor-ingest@1.service") == "active"
    assert c.is_active("sensor-ingest.service") == "active"
    c.wait_for(
        lambda: (
            "as 'sensor-ingest-1'"
            in c.run("journalctl", "--no-pager", "-u", "sensor-ingest@1", "-o", "cat").stdout
        ),
        timeout=30,
        interval=0.5,
        what="worker 1 subscribed",
    )
    count = dep.db()["count"]
    c.wait_for(lambda: dep.db()["count"] > count, 30, 0.5, "readings with two workers")
    dep.playbook("workers 1", "-e", "sensor_gateway_ingest_workers=1")
    assert c.is_active("sensor-ingest@1.service") == "inactive"
    retired = c.run("journalctl", "--no-pager", "-o", "cat", "--since=-5min").stdout
    assert "retired: the session held nothing more" in retired
    count = dep.db()["count"]
    c.wait_for(lambda: dep.db()["count"] > count, 30, 0.5, "readings with one worker again")


def test_reboot_keeps_services_and_readings(dep: Deployment) -> None:
    before = dep.db()
    assert before["count"] > 0
    kept = before["latest"][:10]
    t0 = time.monotonic()
    dep.power_off()
    TIMINGS["power off"] = time.monotonic() - t0
    c = dep.boot()
    t0 = time.monotonic()
    c.wait_for(
        lambda: all(c.is_active(u) == "active" for u in dep.services()),
        timeout=90,
        interval=0.5,
        what="every service active after the reboot",
    )
    TIMINGS["services active after boot #2"] = time.monotonic() - t0
    after = dep.db(*kept)
    assert sorted(after["found"]) == sorted(kept), "readings from before the reboot are missing"
    c.wait_for(
        lambda: dep.db()["count"] > after["count"],
        timeout=30,
        interval=0.5,
        what="new readings after the reboot",
    )
    c.wait_for(
        lambda: dep.curl("/readings?sensor_id=temp-1&limit=5")[0] == 200,
        timeout=30,
        interval=0.5,
        what="the API after the reboot",
    )
