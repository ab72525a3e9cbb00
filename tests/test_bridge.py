"""Edge gateways bridged into a central one with Mosquitto's own bridge, on loopback.

Each edge broker's bridge is rendered from the Mosquitto role's template
(deploy/ansible/roles/mosquitto/templates/bridge.conf.j2, with the role's
defaults and a few overrides, as Ansible would render it), and the central
broker's ACL for each bridge user from the role's acl.j2. The bridge speaks
TLS, hostname checked, to the central broker's TLS listener, through a TCP
link the test can cut; a real ``sensor-gateway ingest`` stores what reaches
the central broker.

- a 30 s cut, publishing on: every reading published at the edge is stored
  once at the central gateway;
- the queue cap: past ``max_queued_messages`` the edge drops the newest;
- the queue outlives a restart of the edge broker while the link is down;
- two edges into one central gateway: every reading of both is stored, each
  edge's averages land under stats/edge/<name>/, and each bridge's state is
  on the central broker.
"""

from __future__ import annotations

import json
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import paho.mqtt.client as mqtt
import pytest

from devstack import REPO
from devstack.ports import free_port
from devstack.stack import Mosquitto, Stack
from tests.helpers import Gateway, wait_for

yaml = pytest.importorskip("yaml")

ROLE = REPO / "deploy" / "ansible" / "roles" / "mosquitto"
# The shortest keepalive Mosquitto takes: a dead link is noticed within ~2 x 5 s.
KEEPALIVE = 5
CUT_S = 30.0
RATE = 100.0  # readings per second, per edge


# -- the role's templates ------------------------------------------------------------


def _ansible_bool(value: Any) -> bool:
    """Ansible's ``bool`` filter (the templates use it; Jinja has none)."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("yes", "on", "1", "true", "y", "t")


def _render(template: str, **overrides: Any) -> str:
    """``template`` of the role, with its defaults and ``overrides``, as Ansible's
    template module renders it. Defaults that refer to other variables are
    resolved first (Ansible does it lazily), so that they are tested as well."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(ROLE / "templates"),
        trim_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["bool"] = _ansible_bool
    variables: dict[str, Any] = {
        **yaml.safe_load((ROLE / "defaults" / "main.yml").read_text()),
        "ansible_managed": "Ansible managed (test)",
        "inventory_hostname": "test-host",
        "playbook_dir": "/controller",
        **overrides,
    }

    def lookup(*args: Any, **kwargs: Any) -> str:
        # The generated password lives on the controller: the test passes its own.
        raise AssertionError(f"lookup{args} called: pass the value as an override")

    env.globals["lookup"] = lookup

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and "{{" in value:
            return env.from_string(value).render(variables)
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    # Only the bridge's defaults: the rest (the device password folder) is unused here.
    for _ in range(3):  # a default may name a default that names another
        for k in [k for k in variables if k.startswith("mosquitto_bridge_")]:
            variables[k] = resolve(variables[k])
    return env.get_template(template).render(variables)


def bridge_conf(name: str, address: str, password: str, cafile: Path) -> str:
    """The role's bridge file for an edge whose mosquitto_bridge_name is ``name``."""
    return _render(
        "bridge.conf.j2",
        mosquitto_bridge_name=name,
        mosquitto_bridge_address=address,
        mosquitto_bridge_remote_password=password,
        mosquitto_bridge_cafile=str(cafile),
        mosquitto_bridge_keepalive_interval=KEEPALIVE,
        # Mosquitto's default backoff is 5-30 s; the test has no time to spare.
        mosquitto_bridge_restart_timeout="1 2",
    )


def central_acl_rules(name: str) -> tuple[str, ...]:
    """What the role's acl.j2 grants a bridge user on the central broker."""
    acl = _render(
        "acl.j2",
        mosquitto_acl=[],
        mosquitto_device_users=[],
        mosquitto_bridge_users=[{"name": name, "password": "unused"}],
        mosquitto_bridge_remote_password="unused",
    )
    block = acl.split(f"\nuser {name}\n", 1)[1].split("\n\n", 1)[0]
    return tuple(line for line in block.splitlines() if line)


# -- TLS, the link, the brokers ----------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path  # the central broker's, for 127.0.0.1
    key: Path
    other_name: Path  # signed by ca, for central.example only (same key)
    other_ca: Path  # a CA that signed neither


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA and the central broker's certificate for 127.0.0.1 (the bridge checks the
    name), one for another name, and a CA of no use to the bridge."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make the test's certificates (apt install openssl)"
    d = tmp_path_factory.mktemp("certs")

    def run(args: str) -> None:
        subprocess.run([openssl, *args.split()], cwd=d, check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        key = f"-keyout {ca}.key -out {ca}.crt"
        run(f"req -x509 -days 2 -newkey rsa:2048 -nodes -subj /CN={ca} {key}")
    run("req -newkey rsa:2048 -nodes -subj /CN=central -keyout server.key -out server.csr")
    for name, san in (("server", "IP:127.0.0.1"), ("other-name", "DNS:central.example")):
        (d / f"{name}.cnf").write_text(f"subjectAltName={san}\n")
        run(
            "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2"
            f" -extfile {name}.cnf -out {name}.crt"
        )
    return Certs(
        ca=d / "ca.crt",
        cert=d / "server.crt",
        key=d / "server.key",
        other_name=d / "other-name.crt",
        other_ca=d / "other-ca.crt",
    )


class Link:
    """The network between an edge and the central broker: a TCP relay on
    loopback that the test can cut.

    ``cut()`` is a partition: nothing crosses any connection, open or new, and
    neither end is told (each finds out by its keepalive); ``restore()`` lets
    the bytes through again. ``cut(refuse=True)`` is a link that fails loudly
    instead: open connections are reset and new ones refused."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.connections: list[float] = []  # when each was opened (time.monotonic())
        self._stalled = threading.Event()
        self._refusing = threading.Event()
        self._closed = threading.Event()
        self._listening = threading.Event()
        # Connections opened before this count are reset (each by its own pump).
        self._reset_below = 0
        self._thread = threading.Thread(target=self._serve, name="link", daemon=True)
        self._thread.start()
        assert self._listening.wait(5), "the link did not listen"

    def cut(self, refuse: bool = False) -> None:
        if refuse:
            self._refusing.set()
            self._reset_below = len(self.connections)
        else:
            self._stalled.set()

    def restore(self) -> None:
        self._refusing.clear()
        self._stalled.clear()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)

    def _serve(self) -> None:
        listener: socket.socket | None = None
        while not self._closed.is_set():
            # Refusing: nothing listens, so a connect fails at once (ECONNREFUSED).
            if self._refusing.is_set():
                if listener is not None:
                    listener.close()
                    listener = None
                time.sleep(0.05)
                continue
            if listener is None:
                listener = socket.socket()
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", self.port))
                listener.listen(16)
                listener.settimeout(0.05)
                self._listening.set()
            try:
                a, _ = listener.accept()
            except TimeoutError:
                continue
            n = len(self.connections)
            self.connections.append(time.monotonic())
            try:
                b = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _reset(a)
                continue
            threading.Thread(target=self._pump, args=(n, a, b), daemon=True).start()
        if listener is not None:
            listener.close()

    def _pump(self, n: int, a: socket.socket, b: socket.socket) -> None:
        other = {a: b, b: a}
        try:
            while not self._closed.is_set() and n >= self._reset_below:
                if self._stalled.is_set():
                    # Read nothing, send nothing: the senders' buffers fill, as
                    # on a link whose packets are lost.
                    time.sleep(0.05)
                    continue
                ready, _, _ = select.select([a, b], [], [], 0.05)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    other[s].sendall(data)
        except OSError:
            pass
        finally:
            _reset(a)
            _reset(b)


def _reset(s: socket.socket) -> None:
    """Close with a RST, as a failing link does, rather than an orderly FIN."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    except OSError:
        pass


@dataclass
class Central:
    """The central gateway: broker (plain listener for its own daemons, TLS for
    the bridges), Redis, MongoDB-wire server, and its ingester."""

    stack: Stack
    gateway: Gateway
    tls_port: int

    def tls_address(self) -> str:
        return f"127.0.0.1:{self.tls_port}"


@pytest.fixture
def start_central(tmp_path: Path, certs: Certs) -> Iterator[Callable[..., Central]]:
    made: list[Central] = []

    def start(*bridges: str, cert: Path | None = None) -> Central:
        """A central gateway that lets the edges named ``bridges`` in; its TLS
        listener shows ``cert`` (default: the one for 127.0.0.1)."""
        tls_port = free_port()
        stack = Stack(root=tmp_path / "central")
        m = stack.mosquitto
        m.extra_users = {name: central_acl_rules(name) for name in bridges}
        # The test's own eyes: the bridges' state and what they deliver.
        m.extra_users["monitor"] = (
            "topic read $SYS/broker/connection/#",
            "topic read stats/#",
            "topic read sensors/#",
        )
        # As the role writes the TLS listener (mosquitto.conf.j2, mosquitto_tls_enabled).
        m.extra_conf = (
            f"listener {tls_port} 127.0.0.1\ncertfile {cert or certs.cert}\nkeyfile {certs.key}\n"
            "tls_version tlsv1.2\nrequire_certificate false\n"
        )
        stack.start()
        gw = Gateway(stack, tmp_path, uuid.uuid4().hex[:8])
        c = Central(stack=stack, gateway=gw, tls_port=tls_port)
        made.append(c)
        gw.spawn_ingester()
        return c

    yield start
    for c in made:
        c.gateway.close()
        for svc in c.stack.services:
            svc.kill()


@pytest.fixture
def start_edge(tmp_path: Path, certs: Certs) -> Iterator[Callable[..., Mosquitto]]:
    made: list[Mosquitto] = []

    def start(
        name: str,
        central: Central,
        address: str,
        extra_conf: str = "",
        cafile: Path | None = None,
    ) -> Mosquitto:
        """An edge broker (the gateway's own settings) bridged to ``address``
        by the role's bridge file, its mosquitto_bridge_name ``name``."""
        password = central.stack.mosquitto.passwords[name]
        edge = Mosquitto(
            root=tmp_path / "edges",
            name=name,
            extra_users={"monitor": ("topic read $SYS/broker/connection/#",)},
            extra_conf=extra_conf + bridge_conf(name, address, password, cafile or certs.ca),
        )
        edge.prepare()
        # Debug log to stderr (unbuffered): the bridge's connects, drops and TLS
        # errors, for the assertions and a failure's story.
        conf = edge.dir / "mosquitto.conf"
        conf.write_text(conf.read_text() + "\nlog_dest none\nlog_dest stderr\nlog_type all\n")
        edge.start()
        made.append(edge)
        return edge

    yield start
    for edge in made:
        edge.kill()


# -- clients ------------------------------------------------------------------------------


class Publisher:
    """A sensor at the edge: QoS 1 readings with unique msg_ids, in bursts or at
    ``rate`` per second in a thread of its own, counting the edge's PUBACKs."""

    def __init__(self, edge: Mosquitto, sensor_id: str) -> None:
        self.sensor_id = sensor_id
        self.sent: list[str] = []
        self.acked = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{sensor_id}", protocol=mqtt.MQTTv311
        )
        self.c.username_pw_set("sensor-simulator", edge.passwords["sensor-simulator"])
        self.c.on_publish = self._on_publish
        self.c.connect("127.0.0.1", edge.port)
        self.c.loop_start()

    def _on_publish(self, *_: Any) -> None:
        with self._lock:
            self.acked += 1

    def publish(self, n: int = 1) -> list[str]:
        """Publish ``n`` readings; their msg_ids."""
        ids = []
        for _ in range(n):
            i = len(self.sent)
            msg_id = f"{self.sensor_id}-{i}"
            body = {
                "sensor_id": self.sensor_id,
                "value": i % 40,
                "unit": "°C",
                "timestamp": datetime.now(UTC).isoformat(),
                "msg_id": msg_id,
            }
            self.c.publish(f"sensors/temperature/{self.sensor_id}", json.dumps(body), qos=1)
            self.sent.append(msg_id)
            ids.append(msg_id)
        return ids

    def start(self, rate: float) -> None:
        def run() -> None:
            t0 = time.monotonic()
            while not self._stop.is_set():
                self.publish()
                # Paced against the clock, so the rate holds whatever a publish costs.
                delay = t0 + len(self.sent) / rate - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)

        self._thread = threading.Thread(target=run, name=f"pub-{self.sensor_id}", daemon=True)
        self._thread.start()

    def wait_acked(self) -> None:
        wait_for(lambda: self.acked == len(self.sent), 30, what="the edge's PUBACKs")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.wait_acked()

    def close(self) -> None:
        self._stop.set()
        self.c.disconnect()
        self.c.loop_stop()


class Watcher:
    """A subscriber (the ``monitor`` user): the last payload of each topic, and
    how many copies of each reading (by msg_id) the broker delivered."""

    def __init__(self, broker: Mosquitto, *topics: str) -> None:
        self.last: dict[str, bytes] = {}
        self.copies: Counter[str] = Counter()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4()}")
        self.c.username_pw_set("monitor", broker.passwords["monitor"])
        self.c.on_message = self._on_message
        self.c.on_connect = lambda c, *_: [c.subscribe(t, qos=1) for t in topics]
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: Any, m: mqtt.MQTTMessage) -> None:
        self.last[m.topic] = m.payload
        if m.topic.startswith("sensors/"):
            self.copies[json.loads(m.payload)["msg_id"]] += 1

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def stored_ids(central: Central, sensor_id: str) -> list[str]:
    """The msg_id of every reading of ``sensor_id`` in the central database, copies included."""
    return [r["msg_id"] for r in central.gateway.readings({"sensor_id": sensor_id})]


def publish_retained(broker: Mosquitto, user: str, topic: str, payload: bytes) -> None:
    """One retained QoS 0 message, as the ingester publishes its averages."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"once-{uuid.uuid4()}")
    c.username_pw_set(user, broker.passwords[user])
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    c.publish(topic, payload, qos=0, retain=True).wait_for_publish(10)
    c.disconnect()
    c.loop_stop()


def report(name: str, **figures: Any) -> None:
    """One JSON line of measured figures (shown with pytest -s or on failure)."""
    print(json.dumps({"test": name, **figures}))


# -- tests ---------------------------------------------------------------------------------


def test_a_30_s_link_cut_loses_nothing(
    start_central: Callable[..., Central], start_edge: Callable[..., Mosquitto]
) -> None:
    central = start_central("edge-a")
    watch = Watcher(central.stack.mosquitto, "sensors/#")
    link = Link(central.tls_port)
    edge = start_edge("edge-a", central, f"127.0.0.1:{link.port}")
    sensor = "edge-a-t1"
    pub = Publisher(edge, sensor)

    def stored() -> set[str]:
        return set(stored_ids(central, sensor))

    try:
        pub.start(RATE)
        wait_for(stored, 30, 0.2, "a reading at the central gateway")
        time.sleep(3)

        link.cut()
        t_cut = time.monotonic()
        sent_at_cut = len(pub.sent)
        # By now what crossed before the cut is written; from here on nothing may cross.
        time.sleep(5)
        stored_early = len(stored())
        time.sleep(CUT_S - 5)
        stored_late = len(stored())
        backlog = pub.sent[:]
        link.restore()
        t_restore = time.monotonic()

        # Publishing goes on while the edge catches up.
        wait_for(lambda: stored() >= set(backlog), 60, 0.2, "the backlog at the central gateway")
        t_caught_up = time.monotonic()
        time.sleep(max(0.0, t_restore + 5 - time.monotonic()))
        pub.stop()
        wait_for(lambda: stored() >= set(pub.sent), 30, 0.2, "every reading at the central gateway")
        time.sleep(2)  # a late copy would show now
        ids = stored_ids(central, sensor)
    finally:
        pub.close()
        watch.close()
        link.close()

    retries = [t - t_cut for t in link.connections if t_cut < t < t_restore]
    lost = set(pub.sent) - set(ids)
    report(
        "link_cut",
        cut_s=round(t_restore - t_cut, 1),
        published=len(pub.sent),
        acked_by_edge=pub.acked,
        published_during_cut=len(backlog) - sent_at_cut,
        stored=len(ids),
        lost=len(lost),
        duplicates=len(ids) - len(set(ids)),
        # Sent again by the bridge (its PUBACK lost with the link): the ingester stores them once.
        central_broker_copies=sum(n - 1 for n in watch.copies.values()),
        first_retry_after_cut_s=round(retries[0], 1) if retries else None,
        retries_during_cut=len(retries),
        backlog_stored_after_restore_s=round(t_caught_up - t_restore, 1),
    )
    assert stored_late == stored_early, "readings crossed the cut link"
    assert retries, "the edge's bridge never noticed the dead link"
    assert len(backlog) - sent_at_cut >= 0.9 * RATE * CUT_S
    assert pub.acked == len(pub.sent)
    assert not lost, f"{len(lost)} readings lost, e.g. {sorted(lost)[:5]}"
    assert len(ids) == len(set(ids)), "a reading stored twice"
    assert set(ids) == set(pub.sent)


def test_past_the_queue_cap_the_edge_drops_the_newest(
    start_central: Callable[..., Central], start_edge: Callable[..., Mosquitto]
) -> None:
    """max_queued_messages (global in Mosquitto 2.0, the bridge's session
    included): with the link down the edge queues that many for the bridge and
    drops every newer one, and says so in its log."""
    cap = 100
    central = start_central("edge-q")
    link = Link(central.tls_port)
    edge = start_edge(
        "edge-q", central, f"127.0.0.1:{link.port}", extra_conf=f"max_queued_messages {cap}\n"
    )
    state = Watcher(edge, "$SYS/broker/connection/#")

    def bridge_up() -> bytes | None:
        return state.last.get("$SYS/broker/connection/edge-q/state")

    sensor = "edge-q-t1"
    pub = Publisher(edge, sensor)
    try:
        first = pub.publish()
        wait_for(lambda: stored_ids(central, sensor) == first, 30, 0.2, "the first reading")

        link.cut(refuse=True)
        # The bridge has no connection (and none pending): the cap is exact.
        wait_for(lambda: bridge_up() == b"0", 10, what="the bridge to go down")
        burst = pub.publish(3 * cap)
        pub.wait_acked()
        link.restore()
        wait_for(lambda: bridge_up() == b"1", 15, what="the bridge to come back")
        # Forwarded in order, so once this one is stored the queue has been sent.
        last = pub.publish()
        wait_for(lambda: last[0] in stored_ids(central, sensor), 30, 0.2, "the last reading")
        time.sleep(1)
        ids = stored_ids(central, sensor)
    finally:
        pub.close()
        state.close()
        link.close()

    dropped = set(burst) - set(ids)
    forwarded = len(set(burst) & set(ids))
    report("queue_cap", cap=cap, burst=len(burst), forwarded=forwarded, dropped=len(dropped))
    assert sorted(ids) == sorted(first + burst[:cap] + last), "not the oldest kept"
    assert dropped == set(burst[cap:])
    log = (edge.dir / "service.log").read_text()
    assert "Outgoing messages are being dropped for client local.edge-q." in log


def test_the_queue_outlives_an_edge_restart(
    start_central: Callable[..., Central], start_edge: Callable[..., Mosquitto]
) -> None:
    """The bridge's queue is in the edge broker's store: a restart (a reboot,
    an upgrade) while the link is down loses none of it."""
    central = start_central("edge-r")
    link = Link(central.tls_port)
    edge = start_edge("edge-r", central, f"127.0.0.1:{link.port}")
    sensor = "edge-r-t1"
    pub = Publisher(edge, sensor)
    try:
        first = pub.publish()
        wait_for(lambda: stored_ids(central, sensor) == first, 30, 0.2, "the first reading")
        link.cut(refuse=True)
        pub.publish(500)
        pub.wait_acked()
        edge.stop()  # SIGTERM: Mosquitto saves its store
        edge.start()
        link.restore()
        wait_for(
            lambda: set(stored_ids(central, sensor)) >= set(pub.sent),
            30,
            0.2,
            "the queued readings at the central gateway",
        )
        time.sleep(1)
        ids = stored_ids(central, sensor)
    finally:
        pub.close()
        link.close()
    assert sorted(ids) == sorted(pub.sent)


def test_two_edges_into_one_central_gateway(
    start_central: Callable[..., Central], start_edge: Callable[..., Mosquitto]
) -> None:
    names = ("edge-b", "edge-c")
    central = start_central(*names)
    watch = Watcher(central.stack.mosquitto, "$SYS/broker/connection/#", "stats/#")
    edges = {n: start_edge(n, central, central.tls_address()) for n in names}
    pubs = {n: Publisher(e, f"{n}-t1") for n, e in edges.items()}
    try:
        for p in pubs.values():
            p.start(2 * RATE)
        time.sleep(5)
        for p in pubs.values():
            p.stop()
        for n, p in pubs.items():
            wait_for(
                lambda p=p: len(set(stored_ids(central, p.sensor_id))) >= len(p.sent),
                30,
                0.2,
                f"{n}'s readings",
            )
        # Each edge's averages, as its ingester publishes them (retained, QoS 0).
        for n, e in edges.items():
            publish_retained(e, "sensor-ingest", "stats/averages", f'{{"edge":"{n}"}}'.encode())
        for n in names:
            topic = f"stats/edge/{n}/averages"
            wait_for(lambda t=topic: t in watch.last, 10, what=topic)
        stored = {n: stored_ids(central, p.sensor_id) for n, p in pubs.items()}
    finally:
        for p in pubs.values():
            p.close()
        watch.close()

    report("two_edges", **{n: len(ids) for n, ids in stored.items()})
    for n, p in pubs.items():
        assert sorted(stored[n]) == sorted(p.sent), n
        assert watch.last[f"stats/edge/{n}/averages"] == f'{{"edge":"{n}"}}'.encode()
        # The role's central ACL lets each bridge publish its own state.
        assert watch.last[f"$SYS/broker/connection/{n}/state"] == b"1", n
    # The central gateway's own stats/averages is not an edge's.
    assert b'"edge"' not in watch.last.get("stats/averages", b"")


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("other-name", "Error: host name verification failed."),
        ("other-ca", "certificate verify failed"),
    ],
)
def test_the_bridge_checks_the_central_broker_certificate(
    start_central: Callable[..., Central],
    start_edge: Callable[..., Mosquitto],
    certs: Certs,
    case: str,
    error: str,
) -> None:
    """bridge_cafile and bridge_insecure false: a central broker whose certificate
    is for another name, or from another CA, gets no connection and no reading."""
    if case == "other-name":
        central = start_central("edge-t", cert=certs.other_name)
        edge = start_edge("edge-t", central, central.tls_address())
    else:
        central = start_central("edge-t")
        edge = start_edge("edge-t", central, central.tls_address(), cafile=certs.other_ca)
    pub = Publisher(edge, "edge-t-t1")
    try:
        pub.publish()
        pub.wait_acked()
        log = edge.dir / "service.log"
        wait_for(lambda: error in log.read_text(), 15, what=error)
    finally:
        pub.close()
    assert "Received CONNACK on connection" not in log.read_text()
    assert stored_ids(central, "edge-t-t1") == []


def test_the_daemons_publish_and_ingest_over_tls(start_central, certs: Certs) -> None:
    """The gateway's MQTT client reads ahead (sensor_gateway.mqtt.ReadAheadSocket),
    over TLS too, where paho asks the socket what it holds: readings big enough
    to span TLS records among small ones are each stored once."""
    central = start_central()
    gw = central.gateway
    for p in gw.procs:
        p.terminate()
        p.wait(20)
    gw.set(mqtt={"port": central.tls_port, "tls": True, "ca_file": str(certs.ca)})
    gw.spawn_ingester()
    pub = gw.raw_publisher()
    now = datetime.now(UTC).isoformat()
    big = [
        json.dumps(
            {"msg_id": f"big-{i}", "value": i, "timestamp": now, "pad": "x" * (12000 + 997 * i)}
        )
        for i in range(4)
    ]
    infos = [pub.publish(f"sensors/temperature/big{i}", b, qos=1) for i, b in enumerate(big)]
    sim = gw.publish(3000, rate=5000)
    for info in infos:
        info.wait_for_publish(10)
    pub.disconnect()
    pub.loop_stop()
    gw.wait_stored(3004)
    ids = Counter(r["msg_id"] for r in gw.readings())
    assert ids.total() == 3004 and max(ids.values()) == 1
    assert {f"{sim.run_id}-{i}" for i in range(1, 3001)} | {f"big-{i}" for i in range(4)} == set(
        ids
    )
