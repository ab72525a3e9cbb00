"""Configuration: one TOML file, every key overridable from the environment.

Lookup order for each key: built-in default < ``gateway.toml`` <
``SENSOR_GATEWAY_<SECTION>__<KEY>``. Secrets are never values in the file:
keys ending in ``_file`` name a file (absolute, or relative to systemd's
``$CREDENTIALS_DIRECTORY`` when set, else to the config file's folder).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sensor_gateway import layout

DEFAULT_PATH = Path("/etc/sensor-gateway/gateway.toml")
# Ingest workers at most: a shared subscription's members, one lane each.
MAX_WORKERS = layout.MAX_LANES
ENV_PREFIX = "SENSOR_GATEWAY_"


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the value."""


@dataclass
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    # "5" (default) or "3.1.1" for brokers without MQTT 5 (RabbitMQ's MQTT plugin).
    # With 3.1.1 the broker sets the in-flight window, not ingest.batch_size.
    protocol: str = "5"
    # Seconds between MQTT PINGREQs; the broker drops us after 1.5x this.
    keepalive: int = 30
    tls: bool = False
    ca_file: str = ""
    # Reconnect backoff bounds, seconds.
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0


@dataclass
class MongoConfig:
    uri: str = "mongodb://127.0.0.1:27017/"
    database: str = "sensor_gateway"
    username: str = ""
    password_file: str = ""
    # How long one server call may take before it counts as "down".
    timeout_ms: int = 5000
    # FerretDB's SQLite folder (its --sqlite-url): the gateway adds there, at
    # start-up, the SQL index FerretDB 1.24 lacks for reads by `_id` (see
    # ferretdb.py). Empty: not done; a warning names each collection read slowly.
    ferretdb_sqlite_dir: str = ""
    # Write concern of every write: "majority" or a number of members (>= 1). A
    # message is acknowledged to the broker once its write is, so the write must
    # survive a failover: with "majority" no election can roll it back, with 1 an
    # election can. A standalone mongod and FerretDB (which ignores write concerns) take
    # "majority" as 1. 0 (unacknowledged) is refused: nothing would say a write failed.
    write_concern: str | int = "majority"
    # j: true, journaled (on the members write_concern counts) before acknowledged.
    journal: bool = True
    # How long the server waits for write_concern before it answers with a write
    # concern error (the batch is then held and retried); 0 means timeout_ms. Below
    # the socket timeout (2 x timeout_ms), so that the server answers first.
    wtimeout_ms: int = 0

    def check(self) -> None:
        """The write concern, and the URI's options against it (from :func:`validate`)."""
        w = self.write_concern
        if isinstance(w, str) and w.isdigit():
            w = self.write_concern = int(w)  # w: "2" would name a tag set, not 2 members
        if w == 0 and not isinstance(w, bool):
            raise ConfigError(
                "mongodb.write_concern: 0 (unacknowledged writes) is refused: the ingester "
                "acknowledges a message to the broker only once its write is acknowledged"
            )
        if w != "majority" and not (type(w) is int and w >= 1):
            raise ConfigError(
                f'mongodb.write_concern: expected "majority" or a number of members >= 1, got {w!r}'
            )
        if self.timeout_ms <= 0:
            raise ConfigError(f"mongodb.timeout_ms: must be > 0, got {self.timeout_ms}")
        if not 0 <= self.wtimeout_ms < 2 * self.timeout_ms:
            raise ConfigError(
                f"mongodb.wtimeout_ms: must be >= 0 and below the socket timeout "
                f"(2 x mongodb.timeout_ms = {2 * self.timeout_ms}), got {self.wtimeout_ms}"
            )
        self._check_uri_options()

    @property
    def wtimeout(self) -> int:
        """The write concern's wtimeout, ms: wtimeout_ms, or timeout_ms when that is 0."""
        return self.wtimeout_ms or self.timeout_ms

    def _check_uri_options(self) -> None:
        """The URI's options, validated as the driver will read them, must not undo
        what the gateway relies on; write-concern options must agree with the keys."""
        from pymongo.errors import ConfigurationError
        from pymongo.uri_parser import parse_uri, split_options

        query = self.uri.partition("?")[2]
        try:
            if self.uri.startswith("mongodb+srv://"):
                # parse_uri would look the SRV record up: the options alone, offline.
                opts: Any = split_options(query, validate=True) if query else {}
            else:
                opts = parse_uri(self.uri, validate=True)["options"]
        except (ConfigurationError, ValueError) as exc:
            # Never the URI itself in the message: it may hold a password.
            raise ConfigError(f"mongodb.uri: {_bad_uri_option(query) or exc}") from exc
        if opts.get("w") == 0:
            raise ConfigError(
                "mongodb.uri: w=0 (unacknowledged writes) is refused: the ingester "
                "acknowledges a message to the broker only once its write is acknowledged"
            )
        for option, key, want in (
            ("w", "write_concern", self.write_concern),
            ("journal", "journal", self.journal),
            ("wTimeoutMS", "wtimeout_ms", self.wtimeout),
        ):
            if option in opts and opts[option] != want:
                raise ConfigError(
                    f"mongodb.uri: {option}={opts[option]!r} contradicts "
                    f"mongodb.{key} = {want!r}; set it with mongodb.{key} alone"
                )
        # The writer reads what it wrote to decide what is new (docs/ARCHITECTURE.md,
        # "Delivery guarantee"): from a secondary, or at "majority", it could miss a
        # write that is in and append its readings twice.
        if opts.get("readPreference", "primary") != "primary":
            raise ConfigError(
                f"mongodb.uri: readPreference={opts['readPreference']} is refused: the "
                "ingester must read its own writes, from the primary"
            )
        if opts.get("readConcernLevel", "local") != "local":
            raise ConfigError(
                f"mongodb.uri: readConcernLevel={opts['readConcernLevel']} is refused: the "
                "ingester must read its own writes before they reach a majority"
            )


def _bad_uri_option(query: str) -> str | None:
    """What is wrong with one of a URI's options, naming it: pymongo's message for a
    whole URI leaves the name out."""
    from pymongo.errors import ConfigurationError
    from pymongo.uri_parser import split_options, validate_options

    if not query:
        return None
    try:
        raw = split_options(query, validate=False, normalize=False)
        for name, value in raw.items():
            validate_options({name: value})
    except (ConfigurationError, ValueError) as exc:
        return str(exc)
    return None


@dataclass
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    password_file: str = ""
    username: str = ""
    key_prefix: str = "sg:"
    timeout_s: float = 2.0


@dataclass
class IngestConfig:
    client_id: str = "sensor-ingest"
    mqtt_username: str = "sensor-ingest"
    mqtt_password_file: str = ""
    # Topic filter (without `$share/`: `workers` adds it).
    topic: str = "sensors/#"
    # Ingest workers: with more than one, each subscribes to
    # `$share/<share_group>/<topic>` and writes a lane of its own (docs/ARCHITECTURE.md,
    # "Ingest workers"). `worker` is this process's number, 0 … workers-1, set per
    # process (sensor-ingest@<n>.service sets SENSOR_GATEWAY_INGEST__WORKER=<n>).
    workers: int = 1
    worker: int = 0
    share_group: str = "sensor-ingest"
    # MQTT 5 session expiry: how long the broker keeps our queue while we are away.
    session_expiry_s: int = 7 * 24 * 3600
    # A batch fills up only while messages wait (a backlog); at live rates
    # batch_timeout_ms closes it first. Large batches matter because every write
    # costs per document touched (a bucket per sensor-minute), not per reading.
    # Draining a backlog into FerretDB, 2000 went at about 0.8x the rate of 4000
    # and 6000 at 1.3x (README, Benchmarks); the messages held grow with it
    # (their bytes are capped by max_held_mb).
    batch_size: int = 4000
    batch_timeout_ms: int = 50
    # Receive Maximum = batch_size * this: one batch being written while the
    # next arrives (their acknowledgements overlap the write after them).
    inflight_batches: int = 2
    # Bytes of payload held between receipt and acknowledgement, at most (MB):
    # Receive Maximum bounds messages, this their bytes (8000 maximum-size
    # payloads would be 196 MB). Past it, paho stops reading until a batch is
    # acknowledged, and TCP holds the broker back.
    max_held_mb: int = 64
    # Larger payloads are rejects; keep equal to the broker's message_size_limit.
    max_payload_bytes: int = 16384
    max_future_skew_s: float = 300.0
    # With per-device broker credentials (ACL `pattern write sensors/+/%u`): the
    # topic's third level is the sensor id and a payload claiming another is a reject.
    topic_identity: bool = False
    latest_n: int = 10
    # Raw payload kept with a reject, bytes.
    reject_payload_bytes: int = 1024
    # Rejects logged at warning level per minute; the rest are counted only.
    reject_log_per_min: int = 20
    # Raw readings (and per-minute summaries) are kept this many days; 0 keeps all.
    retention_days: int = 0
    # Hourly and daily summaries (averages, status counts) are kept this many days;
    # 0 keeps them forever: years of statistics fit on a Pi's disk.
    summary_retention_days: int = 0
    # How often the retention sweep runs (in its own thread, off the ingest path).
    retention_interval_s: float = 3600.0
    stats_topic: str = "stats/averages"
    stats_interval_s: float = 10.0
    stats_windows: list[str] = field(default_factory=lambda: ["1m", "5m", "30m"])


@dataclass
class SensorSpec:
    sensor_id: str
    kind: str
    profile: str = "random_walk"  # random_walk | status | random_interval
    interval_s: float = 1.0
    unit: str = ""
    initial: float = 20.0
    step: float = 0.5


def _default_sensors() -> list[dict[str, Any]]:
    return [
        {"sensor_id": "temp-1", "kind": "temperature", "unit": "°C", "initial": 21.0},
        {"sensor_id": "hum-1", "kind": "humidity", "unit": "%", "initial": 45.0},
        {"sensor_id": "status", "kind": "status", "profile": "status"},
        {"sensor_id": "random-1", "kind": "random", "profile": "random_interval"},
    ]


@dataclass
class SimulatorConfig:
    client_id: str = "sensor-simulator"
    mqtt_username: str = "sensor-simulator"
    mqtt_password_file: str = ""
    topic_prefix: str = "sensors"
    sensors: list[dict[str, Any]] = field(default_factory=_default_sensors)
    # Messages not yet acknowledged by the broker; publishing waits beyond it.
    max_inflight: int = 1000


@dataclass
class ApiConfig:
    bind: str = "127.0.0.1:8000"
    workers: int = 2
    threads: int = 4
    cache_ttl_s: float = 5.0
    max_limit: int = 1000
    # Documents one request may read: a request that would read more gets a 422
    # naming this key (narrow its start/end), never a long scan.
    max_documents: int = 5000
    # Server-side time limit of each database call the API makes (maxTimeMS); kept
    # below gunicorn's timeout so a slow call fails as a 503, not a killed worker.
    query_time_limit_ms: int = 10000
    mqtt_username: str = "sensor-api"
    mqtt_password_file: str = ""
    # Bearer tokens (their SHA-256 only), managed with `sensor-gateway token add|list|revoke`.
    # Relative to this file's folder, never $CREDENTIALS_DIRECTORY (a copy made at start
    # would keep revoked tokens alive): the API re-reads it whenever it changes.
    tokens_file: str = "api-tokens.json"
    # Tokens are required beyond loopback (and anywhere once tokens_file exists); bound
    # beyond loopback without any, the API refuses to start unless this is true (then
    # there is no access control at all).
    allow_anonymous: bool = False
    # HTTPS through gunicorn: PEM certificate (chain) and private key, both or neither.
    # Relative names resolve like the *_file secrets ($CREDENTIALS_DIRECTORY first).
    tls_certfile: str = ""
    tls_keyfile: str = ""


@dataclass
class LogConfig:
    level: str = "info"


@dataclass
class Config:
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    mongodb: MongoConfig = field(default_factory=MongoConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Folder the file was read from; relative secret paths resolve against it.
    base_dir: Path = field(default=Path("."), repr=False)

    def credential_path(self, name: str) -> Path:
        """Where a ``*_file`` key points: absolute, else ``$CREDENTIALS_DIRECTORY``
        when it holds that name, else the configuration file's folder."""
        p = Path(name)
        if p.is_absolute():
            return p
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir and (Path(cred_dir) / p).exists():
            return Path(cred_dir) / p
        return self.base_dir / p

    def secret(self, path: str) -> str:
        """Read a secret file named by a ``*_file`` key; empty path → empty secret."""
        if not path:
            return ""
        p = self.credential_path(path)
        try:
            return p.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {p}: {exc.strerror}") from exc


SECTIONS: dict[str, type] = {
    f.name: f.type if isinstance(f.type, type) else globals()[f.type]  # type: ignore[misc]
    for f in dataclasses.fields(Config)
    if f.name != "base_dir"
}

_DURATION = re.compile(r"^(\d+)(s|m|h)$")


def parse_window(text: str) -> int:
    """'5m' → 300 seconds; names the bad text otherwise."""
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise ConfigError(f"bad window {text!r}: expected e.g. 30s, 5m, 1h")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def _coerce(section: str, key: str, value: Any, hint: Any) -> Any:
    name = f"{section}.{key}"
    origin = typing.get_origin(hint)
    if origin in (list,):
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if isinstance(hint, types.UnionType):
        return value
    return value


def _parse_env_value(raw: str) -> Any:
    """Environment values are TOML literals when they parse as one, else strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(environ: typing.Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX) :]:
            continue
        section, key = name[len(ENV_PREFIX) :].lower().split("__", 1)
        if section not in SECTIONS:
            raise ConfigError(f"{name}: unknown section {section!r}")
        out.setdefault(section, {})[key] = _parse_env_value(raw)
    return out


def build(data: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    """Validate a dict shaped like gateway.toml into a Config."""
    sections: dict[str, Any] = {}
    for section, value in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}] (known: {', '.join(SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(f"[{section}] must be a table, got {value!r}")
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, v in value.items():
            if key not in hints:
                raise ConfigError(
                    f"{section}.{key}: unknown key (known: {', '.join(sorted(hints))})"
                )
            kwargs[key] = _coerce(section, key, v, hints[key])
        sections[section] = cls(**kwargs)
    cfg = Config(**sections, base_dir=base_dir)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    def positive(name: str, v: float) -> None:
        if v <= 0:
            raise ConfigError(f"{name}: must be > 0, got {v!r}")

    cfg.mongodb.check()

    for name, port in (("mqtt.port", cfg.mqtt.port),):
        if not 0 < port < 65536:
            raise ConfigError(f"{name}: not a TCP port: {port!r}")
    if cfg.mqtt.protocol not in ("5", "3.1.1"):
        raise ConfigError(f'mqtt.protocol: expected "5" or "3.1.1", got {cfg.mqtt.protocol!r}')
    positive("ingest.batch_size", cfg.ingest.batch_size)
    positive("ingest.batch_timeout_ms", cfg.ingest.batch_timeout_ms)
    positive("ingest.inflight_batches", cfg.ingest.inflight_batches)
    positive("ingest.max_held_mb", cfg.ingest.max_held_mb)
    positive("ingest.max_payload_bytes", cfg.ingest.max_payload_bytes)
    positive("ingest.latest_n", cfg.ingest.latest_n)
    positive("ingest.stats_interval_s", cfg.ingest.stats_interval_s)
    positive("ingest.retention_interval_s", cfg.ingest.retention_interval_s)
    positive("api.max_documents", cfg.api.max_documents)
    positive("api.query_time_limit_ms", cfg.api.query_time_limit_ms)
    positive("api.workers", cfg.api.workers)
    positive("api.threads", cfg.api.threads)
    if not 0 < cfg.api.max_limit <= 1000:
        raise ConfigError(f"api.max_limit: must be 1-1000, got {cfg.api.max_limit}")
    if cfg.api.cache_ttl_s < 0:
        raise ConfigError(f"api.cache_ttl_s: must be >= 0, got {cfg.api.cache_ttl_s}")
    if not cfg.api.tokens_file:
        raise ConfigError("api.tokens_file: must name a file (it need not exist yet)")
    if bool(cfg.api.tls_certfile) != bool(cfg.api.tls_keyfile):
        raise ConfigError("api.tls_certfile, api.tls_keyfile: set both (HTTPS) or neither")
    if not 1 <= cfg.ingest.workers <= MAX_WORKERS:
        raise ConfigError(f"ingest.workers: must be 1-{MAX_WORKERS}, got {cfg.ingest.workers}")
    if not 0 <= cfg.ingest.worker < cfg.ingest.workers:
        raise ConfigError(
            f"ingest.worker: must be 0-{cfg.ingest.workers - 1} "
            f"(ingest.workers is {cfg.ingest.workers}), got {cfg.ingest.worker}"
        )
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", cfg.ingest.share_group):
        raise ConfigError(
            f"ingest.share_group: 1-64 of [A-Za-z0-9_.-], got {cfg.ingest.share_group!r}"
        )
    if cfg.ingest.topic.startswith("$share/"):
        raise ConfigError(
            f"ingest.topic: give the filter without $share/ (ingest.workers adds it), "
            f"got {cfg.ingest.topic!r}"
        )
    if cfg.ingest.batch_size * cfg.ingest.inflight_batches > 65535:
        raise ConfigError(
            "ingest.batch_size * ingest.inflight_batches: exceeds MQTT's Receive Maximum 65535"
        )
    for name in ("retention_days", "summary_retention_days"):
        if getattr(cfg.ingest, name) < 0:
            raise ConfigError(f"ingest.{name}: must be >= 0, got {getattr(cfg.ingest, name)}")
    if 0 < cfg.ingest.summary_retention_days < cfg.ingest.retention_days or (
        cfg.ingest.summary_retention_days and not cfg.ingest.retention_days
    ):
        raise ConfigError(
            "ingest.summary_retention_days: must be 0 (forever) or >= ingest.retention_days"
        )
    for w in cfg.ingest.stats_windows:
        parse_window(w)
    if cfg.log.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log.level: expected debug|info|warning|error, got {cfg.log.level!r}")
    for i, s in enumerate(cfg.simulator.sensors):
        try:
            spec = SensorSpec(**s)
        except TypeError as exc:
            raise ConfigError(f"simulator.sensors[{i}]: {exc}") from exc
        if spec.profile not in ("random_walk", "status", "random_interval"):
            raise ConfigError(
                f"simulator.sensors[{i}].profile: expected random_walk|status|random_interval,"
                f" got {spec.profile!r}"
            )
        if spec.interval_s <= 0:
            raise ConfigError(f"simulator.sensors[{i}].interval_s: must be > 0")


def load(path: str | Path | None = None, environ: typing.Mapping[str, str] | None = None) -> Config:
    """Load the file (if any) and apply environment overrides.

    ``path=None`` reads ``$SENSOR_GATEWAY_CONFIG`` or the default path, and a
    missing default file is not an error (built-in defaults apply).
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None or "SENSOR_GATEWAY_CONFIG" in environ
    p = Path(path or environ.get("SENSOR_GATEWAY_CONFIG") or DEFAULT_PATH)
    data: dict[str, Any] = {}
    if p.exists():
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    elif explicit:
        raise ConfigError(f"{p}: no such configuration file")
    for section, values in _env_overrides(environ).items():
        data.setdefault(section, {}).update(values)
    return build(data, base_dir=p.parent.resolve())
