"""``sensor-gateway``: one command, a subcommand per daemon or tool.

The daemons are thin: parse arguments, load configuration, set up logging and
signals, then hand over to library code (ingest, simulator, api).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from sensor_gateway import config as config_mod
from sensor_gateway import logs
from sensor_gateway.notify import Notifier

log = logging.getLogger("sensor_gateway")


def _load(args: argparse.Namespace, environ: dict[str, str] | None = None) -> config_mod.Config:
    cfg = config_mod.load(args.config, environ)
    logs.setup(args.log_level or cfg.log.level)
    return cfg


def _on_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: Any) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    # Secrets must be readable by whoever runs this (the service user).
    for section, key in (
        ("mongodb", "password_file"),
        ("redis", "password_file"),
        ("ingest", "mqtt_password_file"),
        ("simulator", "mqtt_password_file"),
        ("api", "mqtt_password_file"),
    ):
        path = getattr(getattr(cfg, section), key)
        if path and args.secrets:
            try:
                cfg.secret(path)
            except config_mod.ConfigError as exc:
                raise config_mod.ConfigError(f"{section}.{key}: {exc}") from exc
    # The API's access policy: it would refuse to start beyond loopback without a token.
    from sensor_gateway import tokens

    access = tokens.check_startup(cfg, read_files=args.secrets)
    print(f"API access: {access}")
    print("configuration OK")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from sensor_gateway.ingest import Ingester

    environ = None
    if args.retire:
        # A retired worker's number is past ingest.workers once that was lowered; it
        # leaves both forms of the filter whatever the count (Receiver.retire).
        worker = os.environ.get(f"{config_mod.ENV_PREFIX}INGEST__WORKER", "0")
        if worker.isdigit():
            environ = {
                **os.environ,
                f"{config_mod.ENV_PREFIX}INGEST__WORKERS": str(int(worker) + 1),
            }
    cfg = _load(args, environ)
    notifier = Notifier()
    ingester = Ingester(cfg, notifier, retire=args.retire)
    if cfg.ingest.stats_topic and ingester.leader:
        from sensor_gateway.stats_topic import StatsPublisher

        ingester.stats_publisher = StatsPublisher.for_client(
            cfg, ingester.db, ingester.receiver.client
        )
    _on_signals(ingester.stop)
    from sensor_gateway.ingest import EXIT_PERMANENT
    from sensor_gateway.storage import PermanentError

    try:
        started = ingester.start()
    except PermanentError as exc:
        ingester.give_up(exc)
        return EXIT_PERMANENT
    if not started:
        ingester.shutdown()
        return 0
    # READY only now: MongoDB answered, Redis was tried, the subscription is acknowledged.
    notifier.ready(ingester.counters.status_line(0))
    ingester.run()
    # A permanent database error: a non-zero exit that the unit does not restart.
    return EXIT_PERMANENT if ingester.fatal else 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from sensor_gateway.simulator import Simulator

    cfg = _load(args)
    notifier = Notifier()
    sim = Simulator(cfg, notifier, seed=args.seed)
    _on_signals(sim.stop)
    if not sim.start():
        sim.finish(timeout=0)
        return 0
    notifier.ready("connected")
    acked = sim.run(rate=args.rate, count=args.count)
    if args.count is not None and acked < args.count:
        log.error("only %d of %d messages were acknowledged by the broker", acked, args.count)
        return 1
    return 0


GUNICORN_CONFIG = "python:sensor_gateway.gunicorn_conf"


def cmd_api(args: argparse.Namespace) -> int:
    from sensor_gateway import storage, tokens

    cfg = _load(args)  # a bad configuration stops here, with the key named
    # So does an API that would serve beyond loopback without any token
    # (gunicorn's configuration checks it again, for gunicorn run directly).
    tokens.check_startup(cfg)
    # And a database in the old layout, with the command that moves it.
    try:
        storage.check_layout(storage.connect(cfg, appname="sensor-api-check"))
    except storage.LayoutError as exc:
        print(f"sensor-gateway api: {exc}", file=sys.stderr)
        return 78
    except storage.DatabaseError:
        pass  # the API starts anyway and answers 503 until MongoDB is back
    if args.dev:
        from sensor_gateway.api import create_app

        host, _, port = cfg.api.bind.rpartition(":")
        tls = None
        if cfg.api.tls_certfile:
            tls = (
                str(cfg.credential_path(cfg.api.tls_certfile)),
                str(cfg.credential_path(cfg.api.tls_keyfile)),
            )
        create_app(cfg).run(
            host=host.strip("[]") or "127.0.0.1", port=int(port), threaded=True, ssl_context=tls
        )
        return 0
    env = dict(os.environ)
    if args.config:
        env["SENSOR_GATEWAY_CONFIG"] = os.path.abspath(args.config)
    if args.log_level:
        env["SENSOR_GATEWAY_LOG__LEVEL"] = f'"{args.log_level}"'
    argv = [sys.executable, "-m", "gunicorn", "-c", args.gunicorn_config]
    sys.stdout.flush()
    sys.stderr.flush()
    # exec: gunicorn's master keeps our PID (systemd's MainPID, Type=notify).
    os.execve(sys.executable, argv, env)
    return 1  # not reached


def cmd_stats(args: argparse.Namespace) -> int:
    from sensor_gateway.stats_topic import follow

    cfg = _load(args)
    stop = threading.Event()
    _on_signals(stop.set)
    count = args.count if args.count is not None else (None if args.follow else 1)
    timeout = args.timeout
    if timeout is None and not args.follow:
        timeout = 2 * cfg.ingest.stats_interval_s + 5
    printed = follow(cfg, sys.stdout, count=count, timeout=timeout, stop=stop)
    return 0 if printed or args.follow else 1


class Progress:
    """A progress line on stderr: a bar on a terminal, a line every 5 s otherwise."""

    def __init__(self, verb: str, total: int | None) -> None:
        import time

        self.verb, self.total, self.n = verb, total, 0
        self.tty = sys.stderr.isatty()
        self._clock = time.monotonic
        self.t0 = self.last = self._clock()

    def update(self, n: int) -> None:
        self.n = n
        now = self._clock()
        if now - self.last >= (0.2 if self.tty else 5.0):
            self.last = now
            self.show()

    def show(self, done: bool = False) -> None:
        n, total = self.n, self.total
        rate = n / max(self._clock() - self.t0, 1e-6)
        pct = f" {min(100.0, 100.0 * n / total):5.1f}%" if total else ""
        line = f"{self.verb}{pct} {n:,} readings ({rate:,.0f}/s)"
        if self.tty:
            width = 30
            filled = int(width * min(1.0, n / total)) if total else 0
            bar = f"[{'#' * filled}{'.' * (width - filled)}] " if total else ""
            print(f"\r{bar}{line}", end="\n" if done else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def cmd_ferretdb_index(args: argparse.Namespace) -> int:
    from sensor_gateway import ferretdb, layout

    cfg = _load(args)
    folder = cfg.mongodb.ferretdb_sqlite_dir
    if not folder:
        print("mongodb.ferretdb_sqlite_dir is not set: nothing to index (MongoDB, or not ours)")
        return 0
    slow = ferretdb.ensure_id_indexes(folder, cfg.mongodb.database, layout.BY_ID)
    for coll in layout.BY_ID:
        state = "NOT indexed: reads by _id scan the table" if coll in slow else "indexed"
        print(f"{coll}: {state}")
    return 1 if slow else 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from sensor_gateway import migrate, storage

    cfg = _load(args)
    db = storage.connect(cfg, appname="sensor-gateway-migrate", socketTimeoutMS=600_000)
    if not migrate.pending(db):
        storage.check_layout(db)
        print(f"nothing to migrate: the database {db.name!r} is in the current layout")
        return 0
    bar = Progress("migrated", None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done)

    counts = migrate.run(db, progress)
    bar.show(done=True)
    storage.prepare(db, cfg)
    print(
        f"moved {counts['moved']:,} readings into the current layout "
        f"({counts['seen'] - counts['moved'] - counts['skipped']:,} already there, "
        f"{counts['skipped']:,} unreadable left in readings_v1); the old collections are "
        "now readings_v1 and rollups_minute_v1: drop them once satisfied"
    )
    return 0


# -- sensor-gateway token add|list|revoke (API bearer tokens) ----------------------------


def cmd_token(args: argparse.Namespace) -> int:
    """Manage the API's bearer tokens in api.tokens_file (hashes only)."""
    from sensor_gateway import tokens

    cfg = config_mod.load(args.config)
    path = tokens.tokens_path(cfg)
    try:
        if args.token_command == "add":
            if args.stdin:
                given = sys.stdin.readline().strip()
                _, changed = tokens.add(path, args.name, given)
                print(f"token {args.name!r} {'stored' if changed else 'unchanged'} in {path}")
                return 0
            token, _ = tokens.add(path, args.name)
            print(token)
            print(
                f"token {args.name!r} stored in {path} (its SHA-256 only): this is the only "
                f"time it is shown. Send it as 'Authorization: Bearer <token>'.",
                file=sys.stderr,
            )
            return 0
        if args.token_command == "list":
            found = tokens.read_tokens(path)
            if not found:
                print(f"no API tokens in {path}", file=sys.stderr)
                return 0
            width = max(4, *(len(t.name) for t in found))
            print(f"{'NAME':<{width}}  CREATED")
            for t in found:
                print(f"{t.name:<{width}}  {t.created}")
            return 0
        if tokens.revoke(path, args.name):
            print(f"token {args.name!r} revoked; the API refuses it from its next request")
            return 0
        if args.missing_ok:
            print(f"no token named {args.name!r} in {path}: nothing to revoke")
            return 0
        print(f"sensor-gateway: no token named {args.name!r} in {path}", file=sys.stderr)
        return 1
    except tokens.TokenError as exc:
        print(f"sensor-gateway: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"sensor-gateway: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1


def _add_token_parser(sub: Any) -> None:
    s = sub.add_parser(
        "token",
        help="manage the API's bearer tokens (add prints a new token once; list; revoke)",
        description="Bearer tokens for the HTTP API, kept as SHA-256 hashes in api.tokens_file. "
        "A revoked token is refused from the API's next request, without a restart.",
    )
    s.set_defaults(func=cmd_token)
    tsub = s.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tsub.add_parser("add", help="create a token named NAME and print it (once)")
    t.add_argument("name", metavar="NAME", help="who or what uses it, e.g. grafana")
    t.add_argument(
        "--stdin",
        action="store_true",
        help="store the token read from stdin (one line, >= 32 characters) instead of "
        "making one; idempotent: 'unchanged' when NAME already has it",
    )
    t = tsub.add_parser("list", help="names and creation times (never the tokens)")
    t = tsub.add_parser("revoke", help="delete the token named NAME")
    t.add_argument("name", metavar="NAME")
    t.add_argument("--missing-ok", action="store_true", help="exit 0 when there is no such token")


# -- sensor-gateway export (readings to a CSV or NDJSON file) ------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    """What ``GET /readings/export`` sends, written to a file (atomically) or stdout,
    straight from the database, with a progress line on stderr."""
    import tempfile
    from pathlib import Path

    from marshmallow import ValidationError

    from sensor_gateway import queries, storage
    from sensor_gateway.api import export

    cfg = config_mod.load(args.config)
    given = {
        "format": args.format,
        "sensor_id": args.sensor_id,
        "kind": args.kind,
        "start": args.start,
        "end": args.end,
        "min_value": args.min_value,
        "max_value": args.max_value,
        "order": args.order,
    }
    try:
        data = export.ExportQuery().load({k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        bad = "; ".join(
            f"--{k.replace('_', '-')}: {' '.join(map(str, v))}"
            for k, v in exc.normalized_messages().items()
        )
        print(f"sensor-gateway export: {bad}", file=sys.stderr)
        return 2
    q = export.reading_query(data)
    db = storage.connect(cfg, appname="sensor-gateway-export")
    total = None
    if not any(given[k] is not None for k in given if k not in ("format", "order")):
        total = queries.count_all(queries.Reader(db))
    bar = Progress("exported", total)

    def counted() -> Any:
        for row in export.iter_readings(db, q):
            yield row
            bar.update(bar.n + 1)

    out_path = None if args.output == "-" else Path(args.output)
    if out_path is None:
        for chunk in export.chunks(counted(), data["format"]):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        bar.show(done=True)
        return 0
    fd, tmp = tempfile.mkstemp(dir=out_path.parent or ".", prefix=f".{out_path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in export.chunks(counted(), data["format"]):
                f.write(chunk)
        os.replace(tmp, out_path)
    except BaseException:
        os.unlink(tmp)
        raise
    bar.show(done=True)
    return 0


def _add_export_parser(sub: Any) -> None:
    s = sub.add_parser(
        "export",
        help="write readings to a CSV or NDJSON file (what GET /readings/export sends)",
        description="Every reading the filters match (those of GET /readings), streamed "
        "from the database to FILE, with a progress line on stderr.",
    )
    s.add_argument("--format", choices=["csv", "ndjson"], default="csv")
    s.add_argument(
        "--output", "-o", required=True, metavar="FILE", help="the file, or - for stdout"
    )
    s.add_argument("--sensor-id", default=None)
    s.add_argument("--kind", default=None)
    s.add_argument("--start", default=None, help="ISO 8601, inclusive")
    s.add_argument("--end", default=None, help="ISO 8601, exclusive")
    s.add_argument("--min-value", default=None)
    s.add_argument("--max-value", default=None)
    s.add_argument("--order", choices=["asc", "desc"], default=None)
    s.set_defaults(func=cmd_export)


def _positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a number above zero, or an error naming the value."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sensor-gateway",
        description="Sensor readings over MQTT into MongoDB and Redis, served over HTTP.",
    )
    p.add_argument(
        "-c",
        "--config",
        default=None,
        help=f"configuration file (default: $SENSOR_GATEWAY_CONFIG or {config_mod.DEFAULT_PATH})",
    )
    p.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="overrides log.level",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("check-config", help="validate the configuration and name any bad key")
    s.add_argument(
        "--no-secrets",
        dest="secrets",
        action="store_false",
        help="do not try to read the secret files",
    )
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("ingest", help="run the ingester (MQTT → MongoDB + Redis)")
    s.add_argument(
        "--retire",
        action="store_true",
        help="retire this ingest worker (SENSOR_GATEWAY_INGEST__WORKER, its service "
        "stopped): leave the shared subscription, write what its session still holds, "
        "then end the session; exits once nothing came for a few seconds",
    )
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser(
        "ferretdb-index",
        help="index FerretDB's SQLite tables for reads by _id, checked with EXPLAIN "
        "(run by sensor-ingest.service as root; needs mongodb.ferretdb_sqlite_dir)",
    )
    s.set_defaults(func=cmd_ferretdb_index)

    s = sub.add_parser(
        "migrate",
        help="move readings of the old one-document-per-reading layout into the current "
        "one (idempotent, resumable; sensor-ingest stopped)",
    )
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("simulate", help="run the sensor simulator (publishes readings)")
    s.add_argument(
        "--rate",
        type=_positive(float),
        default=None,
        help="messages per second in total (default: each sensor's own schedule)",
    )
    s.add_argument("--count", type=_positive(int), default=None, help="stop after N messages")
    s.add_argument("--seed", type=int, default=None, help="random seed for repeatable values")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("api", help="run the HTTP API under gunicorn")
    s.add_argument("--dev", action="store_true", help="run Flask's development server instead")
    s.add_argument(
        "--gunicorn-config",
        default=GUNICORN_CONFIG,
        help="gunicorn configuration (default: the packaged sensor_gateway.gunicorn_conf, "
        "which takes its settings from gateway.toml [api])",
    )
    s.set_defaults(func=cmd_api)

    s = sub.add_parser("stats", help="print the rolling averages published on MQTT")
    s.add_argument("--follow", action="store_true", help="keep printing each message as it arrives")
    s.add_argument("--count", type=int, default=None, help="stop after N messages")
    s.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    s.set_defaults(func=cmd_stats)

    _add_token_parser(sub)
    _add_export_parser(sub)

    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except config_mod.ConfigError as exc:
        print(f"sensor-gateway: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
