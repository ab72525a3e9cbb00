"""The Mosquitto role's broker files, proven on a real Mosquitto.

The ACL and the password file are rendered from the role's own templates
(deploy/ansible/roles/mosquitto/templates/{acl,passwd}.j2, with its
``mosquitto_pwhash`` filter and the group_vars' users and ACL), as Ansible
would render them, and loaded by a Mosquitto on loopback: per-device users
may publish under their own topic only, the shared users keep their rights,
and the broker's message_size_limit drops oversize payloads.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import jinja2
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from devstack import REPO
from devstack.stack import Mosquitto

yaml = pytest.importorskip("yaml")

ROLE = REPO / "deploy" / "ansible" / "roles" / "mosquitto"
GROUP_VARS = REPO / "deploy" / "ansible" / "group_vars" / "all.yml"
DEVICES = ["dev-a", "dev-b"]
NOT_AUTHORIZED = 0x87
PACKET_TOO_LARGE = 0x95


def _filter_module():
    spec = importlib.util.spec_from_file_location(
        "mosquitto_passwd_filter", ROLE / "filter_plugins" / "mosquitto_passwd.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass
class RoleFiles:
    """The role's templates rendered like Ansible does, with known passwords."""

    passwords: dict[str, str] = field(default_factory=dict)
    acl: str = ""
    passwd: str = ""

    @classmethod
    def render(cls, devices: list[str], hostname: str = "test-host") -> RoleFiles:
        defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
        group_vars = yaml.safe_load(GROUP_VARS.read_text())
        out = cls()
        # group_vars' users, each with a password of our own (the play generates them).
        users = [
            {"name": u["name"], "password": secrets.token_urlsafe(16)}
            for u in group_vars["mosquitto_users"]
        ]
        out.passwords.update({u["name"]: u["password"] for u in users})
        pw_dir = "/controller/secrets/test-host/mqtt-devices"

        def lookup(plugin: str, path: str, **kw) -> str:
            # ansible.builtin.password: one password per file, the same on every call.
            assert plugin == "ansible.builtin.password"
            assert kw["length"] == defaults["mosquitto_device_password_length"]
            name = path.removeprefix(pw_dir + "/")
            return out.passwords.setdefault(name, secrets.token_urlsafe(24))

        # Ansible's template module: trim_blocks on, trailing newline kept.
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(ROLE / "templates"),
            trim_blocks=True,
            keep_trailing_newline=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters.update(_filter_module().FilterModule().filters())
        env.globals["lookup"] = lookup
        variables = {
            **{k: v for k, v in defaults.items() if "{{" not in str(v)},
            "ansible_managed": "Ansible managed (test)",
            "inventory_hostname": hostname,
            "mosquitto_users": users,
            "mosquitto_acl": group_vars["mosquitto_acl"],
            "mosquitto_device_users": devices,
            "mosquitto_device_password_dir": pw_dir,
        }
        out.acl = env.get_template("acl.j2").render(variables)
        out.passwd = env.get_template("passwd.j2").render(variables)
        return out


@pytest.fixture(scope="module")
def role_files() -> RoleFiles:
    return RoleFiles.render(DEVICES)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, role_files: RoleFiles) -> Iterator[Mosquitto]:
    """A Mosquitto with the repository's broker settings and the role's ACL and passwd."""
    b = Mosquitto(root=tmp_path_factory.mktemp("broker-acl"))
    b.prepare()
    (b.dir / "acl").write_text(role_files.acl)
    (b.dir / "passwd").write_text(role_files.passwd)
    (b.dir / "passwd").chmod(0o600)
    # Debug logging, to stderr (unbuffered), so the broker's reasons show in service.log.
    conf = b.dir / "mosquitto.conf"
    conf.write_text(conf.read_text() + "log_dest none\nlog_dest stderr\nlog_type all\n")
    b.passwords = dict(role_files.passwords)
    b.start()
    yield b
    b.stop()


class Client:
    """A paho client that records PUBACK reason codes, messages and disconnects."""

    def __init__(
        self, broker: Mosquitto, user: str, password: str | None = None, *, v5: bool = True
    ) -> None:
        self.client_id = f"acl-{user}-{time.monotonic_ns()}"
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        self.c.username_pw_set(user, broker.passwords[user] if password is None else password)
        self.pubacks: dict[int, ReasonCode] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.suback: list[ReasonCode] = []
        self.connack: ReasonCode | None = None
        self.disconnects: list[str] = []
        self.cond = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_publish = self._on_publish
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_disconnect = self._on_disconnect
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        self.wait(lambda: self.connack is not None or self.disconnects, "CONNACK")

    def _notify(self, f) -> None:
        with self.cond:
            f()
            self.cond.notify_all()

    def _on_connect(self, _c, _u, _flags, rc, _props) -> None:
        self._notify(lambda: setattr(self, "connack", rc))

    def _on_publish(self, _c, _u, mid, rc, _props) -> None:
        self._notify(lambda: self.pubacks.__setitem__(mid, rc))

    def _on_message(self, _c, _u, msg) -> None:
        self._notify(lambda: self.messages.append((msg.topic, msg.payload)))

    def _on_subscribe(self, _c, _u, _mid, rcs, _props) -> None:
        self._notify(lambda: self.suback.extend(rcs))

    def _on_disconnect(self, _c, _u, _flags, rc, _props) -> None:
        self._notify(lambda: self.disconnects.append(str(rc)))

    def wait(self, pred, what: str, timeout: float = 10.0):
        with self.cond:
            if not self.cond.wait_for(pred, timeout):
                raise AssertionError(f"timed out waiting for {what}")

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """QoS 1; the PUBACK's reason code (always 0 for MQTT 3.1.1)."""
        mid = self.c.publish(topic, payload, qos=1).mid
        self.wait(lambda: mid in self.pubacks or self.disconnects, f"PUBACK of {topic}")
        return self.pubacks.get(mid)

    def subscribe(self, topic: str) -> None:
        self.c.subscribe(topic, qos=1)
        self.wait(lambda: self.suback, f"SUBACK of {topic}")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def ingest(broker: Mosquitto) -> Iterator[Client]:
    """The ingester's user, subscribed to everything it may read."""
    sub = Client(broker, "sensor-ingest")
    sub.subscribe("sensors/#")
    assert not sub.suback[0].is_failure
    yield sub
    sub.close()


def reading(sensor_id: str) -> bytes:
    return json.dumps(
        {"sensor_id": sensor_id, "value": 1.0, "msg_id": secrets.token_hex(8)}
    ).encode()


def received(sub: Client, payload: bytes, settle: float = 1.0) -> bool:
    """Whether the subscriber got this payload (waits for it at most ``settle`` s)."""
    try:
        sub.wait(lambda: any(p == payload for _, p in sub.messages), "message", settle)
    except AssertionError:
        return False
    return True


def test_role_files_are_hashed_and_stable(role_files: RoleFiles) -> None:
    lines = [ln for ln in role_files.passwd.splitlines() if ln and not ln.startswith("#")]
    assert {ln.split(":", 1)[0] for ln in lines} == set(role_files.passwords)
    for ln in lines:
        assert ln.split(":", 1)[1].startswith("$7$101$")
    for pw in role_files.passwords.values():
        assert pw not in role_files.passwd, "a clear-text password in the password file"
    # Same passwords, same file: the role's template task is idempotent.
    pwhash = _filter_module().mosquitto_pwhash
    assert pwhash("pw", "a@h") == pwhash("pw", "a@h") != pwhash("pw", "b@h")
    assert "user dev-a\ntopic write sensors/+/dev-a\n" in role_files.acl


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_device_publishes_only_under_its_own_topic(
    broker: Mosquitto, ingest: Client, v5: bool
) -> None:
    dev = Client(broker, "dev-a", v5=v5)
    try:
        own = reading("dev-a")
        assert not dev.publish("sensors/temperature/dev-a", own).is_failure
        assert received(ingest, own, settle=10)

        # As device B: refused. MQTT 5 is told so (PUBACK 0x87 Not authorized);
        # MQTT 3.1.1 gets a plain PUBACK. Either way nothing is delivered.
        spoof = reading("dev-b")
        rc = dev.publish("sensors/temperature/dev-b", spoof)
        if v5:
            assert rc.value == NOT_AUTHORIZED, rc
        else:
            assert rc.value == 0, rc
        # Nor elsewhere outside its own topic.
        for topic in ("sensors/temperature", "sensors/dev-a", "sensors/x/dev-a/y", "stats/x"):
            rc = dev.publish(topic, spoof)
            assert rc.value == (NOT_AUTHORIZED if v5 else 0), (topic, rc)
        # The connection survives a refusal and the device goes on publishing.
        again = reading("dev-a")
        assert not dev.publish("sensors/humidity/dev-a", again).is_failure
        assert received(ingest, again, settle=10)
        assert not received(ingest, spoof, settle=0.5)
        assert dev.disconnects == []
    finally:
        dev.close()


def test_device_reads_nothing(broker: Mosquitto) -> None:
    """Mosquitto 2.0 grants the SUBSCRIBE and checks read access per message."""
    dev = Client(broker, "dev-a")
    sim = Client(broker, "sensor-simulator")
    try:
        dev.subscribe("sensors/#")
        body = reading("dev-b")
        assert not sim.publish("sensors/temperature/dev-b", body).is_failure
        assert not received(dev, body, settle=1.0)
    finally:
        dev.close()
        sim.close()


def test_device_credentials_are_its_own(broker: Mosquitto, role_files: RoleFiles) -> None:
    # Device B's password does not log in as device A, nor does an unknown device.
    for user, password in (("dev-a", role_files.passwords["dev-b"]), ("dev-c", "whatever")):
        c = Client(broker, user, password)
        try:
            assert c.connack is None or c.connack.is_failure, (user, c.connack)
        finally:
            c.close()
    ok = Client(broker, "dev-b")
    try:
        assert ok.connack is not None and not ok.connack.is_failure
    finally:
        ok.close()


def test_shared_simulator_user_keeps_every_sensor_topic(broker: Mosquitto, ingest: Client) -> None:
    sim = Client(broker, "sensor-simulator")
    try:
        for topic in ("sensors/temperature/dev-b", "sensors/status", "sensors/humidity/hum-1"):
            body = reading(topic)
            assert not sim.publish(topic, body).is_failure
            assert received(ingest, body, settle=10), topic
    finally:
        sim.close()


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_oversize_payload_is_dropped_by_the_broker(
    broker: Mosquitto, ingest: Client, v5: bool
) -> None:
    """message_size_limit (config/mosquitto/sensor-gateway.conf: ingest.max_payload_bytes
    + 4096, so payloads just over the gateway's limit still reach it as rejects)."""
    limit = 16384 + 4096
    sim = Client(broker, "sensor-simulator", v5=v5)
    try:
        fits = b"x" * limit
        assert not sim.publish("sensors/temperature/big", fits).is_failure
        assert received(ingest, fits, settle=10)
        over = b"y" * (limit + 1)
        mid = sim.c.publish("sensors/temperature/big", over, qos=1).mid
        sim.wait(lambda: mid in sim.pubacks or sim.disconnects, "PUBACK or disconnect")
        rc = sim.pubacks.get(mid)
        if v5:
            # Mosquitto answers PUBACK 0x95 "Packet too large", which MQTT 5 does
            # not allow in a PUBACK: paho-mqtt takes it for a protocol error and
            # closes the connection (and would send the message again on reconnect).
            assert rc is None and sim.disconnects == ["Protocol error"], (rc, sim.disconnects)
        else:
            # MQTT 3.1.1: a plain PUBACK, as if it had been accepted; the
            # connection goes on.
            assert rc is not None and rc.value == 0, rc
            after = reading("big")
            assert not sim.publish("sensors/temperature/big", after).is_failure
            assert received(ingest, after, settle=10)
            assert sim.disconnects == []
        assert not received(ingest, over, settle=1.0)
    finally:
        sim.close()
    log = (broker.dir / "service.log").read_text()
    # Logged at debug level only: not in the journal with the role's log types.
    assert f"Dropped too large PUBLISH from {sim.client_id} (d0, q1, r0, m{mid}," in log
    assert f"Sending PUBACK to {sim.client_id} (m{mid}, rc{PACKET_TOO_LARGE})" in log
