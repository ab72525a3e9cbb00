"""Local services on loopback: Mosquitto, Redis, a MongoDB-wire server, RabbitMQ.

Used by the test fixtures, the benchmarks and ``make run``. Each service runs
as a child process on a 127.0.0.1 port (a free one, or a fixed one for
``make run``) with its data in a folder of ours, with the same security the
deployment has (broker users and ACLs, a Redis password), and can be stopped,
killed and started again mid-test. A service started from the main thread
dies with the process that started it (:mod:`devstack.lifetime`).

MongoDB-wire server: ``mongod`` when one is on PATH, else FerretDB 1.24 with
its SQLite backend (``$FERRETDB`` or ``.cache/bin/ferretdb``, built by
``.ci/build-ferretdb.sh``).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from devstack import REPO, lifetime
from devstack.ports import describe_taken, free_port, is_free, wait_port

# Broker users and what each may do (the deployment's ACL, see deploy/ansible).
MQTT_USERS = ("sensor-ingest", "sensor-simulator", "sensor-api")
MOSQUITTO_ACL = """\
user sensor-simulator
topic write sensors/#

user sensor-ingest
topic read sensors/#
topic read $share/+/sensors/#
topic write stats/#

user sensor-api
topic read stats/#
"""


def mosquitto_acl(device_users: tuple[str, ...] = ()) -> str:
    """The ACL, with an entry per device user (as the Ansible role writes it): a
    device, named by its sensor id, may publish under its own topic only."""
    devices = "".join(f"\nuser {d}\ntopic write sensors/+/{d}\n" for d in device_users)
    return MOSQUITTO_ACL + devices


class PortTaken(RuntimeError):
    """A service's port is held by another process: never talk to a stranger."""


@dataclass(kw_only=True)
class Service:
    """A child-process service with a fixed port and data folder across restarts."""

    name: str
    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    start_timeout: float = 30.0

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def label(self) -> str:
        """The name in messages."""
        return self.name

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write configuration once, before the first start."""

    def env(self) -> dict[str, str] | None:
        return None

    def start(self) -> None:
        # Checked first: with the port taken, our server would fail to bind while
        # the waiting below happily connected to whoever has it.
        if not is_free(self.port):
            raise PortTaken(describe_taken(self.label, self.port))
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "service.log", "ab") as log:
            self.proc = lifetime.spawn(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=self.env(),
            )
        wait_port(self.port, self.start_timeout, self.proc)

    def stop(self, timeout: float = 20.0) -> None:
        """Graceful stop (SIGTERM), as ``systemctl stop`` would."""
        if self.proc is not None:
            lifetime.end_all([self.proc], timeout)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            if not lifetime.has_exited(self.proc):
                lifetime.kill_group(self.proc.pid)
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass(kw_only=True)
class Mosquitto(Service):
    name: str = "mosquitto"
    passwords: dict[str, str] = field(default_factory=dict)
    # Devices with credentials of their own (user name = sensor id).
    device_users: tuple[str, ...] = ()
    # More users, each with its ACL lines: e.g. an edge's bridge on a central broker.
    extra_users: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Appended to mosquitto.conf as is: another listener (TLS), a bridge.
    extra_conf: str = ""

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        users = (*MQTT_USERS, *self.device_users, *self.extra_users)
        self.passwords = {u: secrets.token_urlsafe(16) for u in users}
        pwfile = self.dir / "passwd"
        pwfile.write_text("")
        for user, pw in self.passwords.items():
            subprocess.run(
                ["mosquitto_passwd", "-b", str(pwfile), user, pw], check=True, capture_output=True
            )
        pwfile.chmod(0o600)
        extra_acl = "".join(
            f"\nuser {u}\n" + "".join(f"{rule}\n" for rule in rules)
            for u, rules in self.extra_users.items()
        )
        (self.dir / "acl").write_text(mosquitto_acl(self.device_users) + extra_acl)
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            mosquitto_conf(
                port=self.port,
                data_dir=self.dir,
                password_file=self.dir / "passwd",
                acl_file=self.dir / "acl",
            )
            + (f"\n{self.extra_conf}" if self.extra_conf else "")
        )
        if self.extra_conf:
            conf.chmod(0o600)  # a bridge's remote_password may be in it

    def command(self) -> list[str]:
        return [
            shutil.which("mosquitto") or "/usr/sbin/mosquitto",
            "-c",
            str(self.dir / "mosquitto.conf"),
        ]


def mosquitto_conf(port: int, data_dir: Path, password_file: Path, acl_file: Path) -> str:
    """The broker settings the gateway relies on (see config/mosquitto/)."""
    template = (REPO / "config" / "mosquitto" / "sensor-gateway.conf").read_text()
    return (
        f"per_listener_settings false\n"
        # Run as whoever starts it (root in CI): Mosquitto would otherwise switch
        # to the `mosquitto` user, who cannot read our 0600 files.
        f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
        f"listener {port} 127.0.0.1\n"
        f"persistence_location {data_dir}/\n"
        f"password_file {password_file}\n"
        f"acl_file {acl_file}\n"
        f"log_dest stdout\n" + template
    )


@dataclass(kw_only=True)
class Redis(Service):
    name: str = "redis"
    password: str = ""

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.password = secrets.token_urlsafe(16)
        (self.dir / "redis.conf").write_text(
            f"bind 127.0.0.1\nport {self.port}\nprotected-mode yes\n"
            f"requirepass {self.password}\ndir {self.dir}\n"
            'appendonly yes\nsave ""\nmaxmemory 64mb\nmaxmemory-policy noeviction\n'
        )
        (self.dir / "redis.conf").chmod(0o600)

    def command(self) -> list[str]:
        return [
            shutil.which("redis-server") or "/usr/bin/redis-server",
            str(self.dir / "redis.conf"),
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def find_ferretdb() -> str | None:
    for cand in (
        os.environ.get("FERRETDB"),
        str(REPO / ".cache" / "bin" / "ferretdb"),
        shutil.which("ferretdb"),
    ):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


@dataclass(kw_only=True)
class MongoServer(Service):
    """``mongod`` from PATH if present, else FerretDB (SQLite backend).

    With ``auth`` = (database, user, password) the server requires that user."""

    name: str = "mongodb"
    engine: str = ""
    auth: tuple[str, str, str] | None = None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.engine})" if self.engine else self.name

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "data").mkdir(exist_ok=True)
        if shutil.which("mongod") and os.environ.get("SENSOR_GATEWAY_TEST_ENGINE") != "ferretdb":
            self.engine = "mongod"
        elif find_ferretdb():
            self.engine = "ferretdb"
        else:
            raise RuntimeError(
                "no MongoDB-wire server: put mongod on PATH or run .ci/build-ferretdb.sh"
            )

    def command(self) -> list[str]:
        data = self.dir / "data"
        if self.engine == "mongod":
            return [
                "mongod",
                "--dbpath",
                str(data),
                "--port",
                str(self.port),
                "--bind_ip",
                "127.0.0.1",
                "--quiet",
                *(["--auth"] if self.auth and (self.dir / ".user-created").exists() else []),
            ]
        auth = []
        if self.auth:
            database, user, _ = self.auth
            auth = [
                "--test-enable-new-auth",
                f"--setup-database={database}",
                f"--setup-username={user}",
            ]
        return [
            find_ferretdb() or "ferretdb",
            "--handler=sqlite",
            f"--sqlite-url=file:{self.sqlite_dir}/",
            f"--listen-addr=127.0.0.1:{self.port}",
            # No debug listener: nothing here reads it, and a port picked free can
            # be taken (by any outgoing connection) before FerretDB binds it.
            "--debug-addr=-",
            f"--state-dir={self.dir}",
            "--telemetry=disable",
            "--log-level=warn",
            *auth,
        ]

    def env(self) -> dict[str, str] | None:
        if self.auth and self.engine == "ferretdb":
            # FerretDB creates the user from this on its first start.
            return {**os.environ, "FERRETDB_SETUP_PASSWORD": self.auth[2]}
        return None

    def start(self) -> None:
        super().start()
        if self.auth and self.engine == "mongod" and not (self.dir / ".user-created").exists():
            import pymongo  # only here: the local stack itself needs no driver

            database, user, password = self.auth
            with pymongo.MongoClient(self.uri) as c:
                c[database].command("createUser", user, pwd=password, roles=["readWrite"])
            (self.dir / ".user-created").touch()
            self.restart()  # now with --auth

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    @property
    def sqlite_dir(self) -> Path:
        """FerretDB's SQLite folder (its --sqlite-url)."""
        return self.dir / "data"


@dataclass(kw_only=True)
class RabbitMQ(Service):
    """RabbitMQ with its MQTT plugin (MQTT 3.1.1 only), for the compatibility test."""

    name: str = "rabbitmq"
    amqp_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    start_timeout: float = 90.0
    password: str = ""

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.password = secrets.token_urlsafe(16)
        (self.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = {self.port}\n"
            "mqtt.allow_anonymous = false\n"
            "mqtt.prefetch = 1000\n"
            "loopback_users = none\n"
            f"default_user = gateway\ndefault_pass = {self.password}\n"
        )

    def env(self) -> dict[str, str]:
        d = self.dir
        return {
            **os.environ,
            "RABBITMQ_NODENAME": f"sgtest{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "rabbit.pid"),
            "HOME": str(d),
        }

    def command(self) -> list[str]:
        # The /usr/sbin wrapper switches to the rabbitmq user; run the real script as ourselves.
        return ["/usr/lib/rabbitmq/bin/rabbitmq-server"]


@dataclass(kw_only=True)
class Stack:
    """The three services the gateway needs, and the configuration pointing at them."""

    root: Path
    # Fixed ports (for `make run`); 0 picks free ones (tests).
    ports: dict[str, int] = field(default_factory=dict)
    # Devices with broker credentials of their own (see Mosquitto.device_users).
    device_users: tuple[str, ...] = ()
    # (database, user, password) for a MongoDB server that requires a login.
    mongo_auth: tuple[str, str, str] | None = None
    mosquitto: Mosquitto = field(init=False)
    redis: Redis = field(init=False)
    mongo: MongoServer = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.mosquitto = Mosquitto(
            root=self.root,
            port=self.ports.get("mqtt") or free_port(),
            device_users=self.device_users,
        )
        self.redis = Redis(root=self.root, port=self.ports.get("redis") or free_port())
        self.mongo = MongoServer(
            root=self.root, port=self.ports.get("mongodb") or free_port(), auth=self.mongo_auth
        )
        self.secrets_dir = self.root / "secrets"

    @property
    def services(self) -> tuple[Service, ...]:
        return (self.mosquitto, self.redis, self.mongo)

    def start(self) -> None:
        for s in self.services:
            for attempt in range(3):
                s.prepare()
                try:
                    s.start()
                    break
                except RuntimeError:
                    # A port picked free was taken before the service bound it:
                    # on a first start a fixed port is not yet promised to anyone.
                    if attempt == 2 or s.port in self.ports.values():
                        raise
                    s.port = free_port()
        self.secrets_dir.mkdir(exist_ok=True, mode=0o700)
        for user, pw in self.mosquitto.passwords.items():
            _write_secret(self.secrets_dir / f"mqtt-{user.removeprefix('sensor-')}-password", pw)
        _write_secret(self.secrets_dir / "redis-password", self.redis.password)

    def stop(self, timeout: float = 20.0, hurry: threading.Event | None = None) -> None:
        """SIGTERM to all three at once; SIGKILL to any still running after
        ``timeout`` seconds (at once when ``hurry`` is set)."""
        lifetime.end_all([s.proc for s in self.services if s.proc], timeout, hurry=hurry)
        for s in self.services:
            s.proc = None

    def config_dict(self, database: str = "sensor_gateway") -> dict:
        """A gateway.toml (as a dict) for this stack; secrets are files under root."""
        sec = self.secrets_dir
        return {
            "mqtt": {
                "host": "127.0.0.1",
                "port": self.mosquitto.port,
                "reconnect_min_s": 0.2,
                "reconnect_max_s": 2.0,
            },
            "mongodb": {
                "uri": self.mongo.uri,
                "database": database,
                "timeout_ms": 2000,
                # The gateway indexes FerretDB's tables for reads by _id (ferretdb.py).
                "ferretdb_sqlite_dir": str(self.mongo.sqlite_dir)
                if self.mongo.engine == "ferretdb"
                else "",
            },
            "redis": {
                "url": self.redis.url,
                "password_file": str(sec / "redis-password"),
                "timeout_s": 1.0,
            },
            "ingest": {"mqtt_password_file": str(sec / "mqtt-ingest-password")},
            "simulator": {"mqtt_password_file": str(sec / "mqtt-simulator-password")},
            "api": {"mqtt_password_file": str(sec / "mqtt-api-password")},
        }


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)


def forget_session(cfg, client_id: str) -> None:
    """Connect as ``client_id`` (an ingester's broker user) with a clean start and
    leave: the broker drops the session and stops queueing for it."""
    from sensor_gateway.mqtt import make_client

    ok = threading.Event()
    c = make_client(cfg, client_id, cfg.ingest.mqtt_username, cfg.ingest.mqtt_password_file)
    c.on_connect = lambda *a: ok.set()
    try:
        # MQTT 3.1.1: make_client asked for a clean session already.
        start = {"clean_start": True} if cfg.mqtt.protocol == "5" else {}
        c.connect(cfg.mqtt.host, cfg.mqtt.port, **start)
        c.loop_start()
        ok.wait(5)
        c.disconnect()
        c.loop_stop()
    except OSError:
        pass
