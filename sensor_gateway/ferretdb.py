"""The one index FerretDB 1.24 (SQLite backend) lacks: reads by `_id`.

FerretDB pushes a filter of exactly ``{_id: <string>}`` down to SQLite as
``_ferretdb_sjson->'$._id' = ?``, but its own `_id` index is built on another
expression, which SQLite cannot use for that: every such read is a full
scan. An expression index on the very expression the query uses turns it into
an index search (measured: 0.5 ms instead of 400 ms on 200k documents;
``notes/ferretdb-reads.md``). FerretDB has no command for it, so it goes
straight into FerretDB's SQLite file; EXPLAIN QUERY PLAN then proves that
SQLite uses it. It is idempotent, and SQLite's locking makes it safe while
FerretDB runs. The ingester does it when it may write that folder (tests,
`make run`); under systemd, where FerretDB has a user of its own,
sensor-ingest.service runs `sensor-gateway ferretdb-index` as root once the
ingester is up (``ExecStartPost=+``), which keeps the files' owner.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("sensor_gateway.ferretdb")

# The expression FerretDB 1.24's SQLite backend filters `_id` lookups on
# (internal/backends/sqlite/query.go).
ID_EXPR = "_ferretdb_sjson->'$._id'"


def _keep_owner(path: Path, owner: os.stat_result) -> None:
    """Run as root, SQLite may have created a -wal or -shm file: give it back to
    FerretDB's user, or FerretDB could no longer open its database."""
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
            os.chown(p, owner.st_uid, owner.st_gid)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def uses_index(con: sqlite3.Connection, table: str) -> bool:
    plan = con.execute(
        f"EXPLAIN QUERY PLAN SELECT _ferretdb_sjson FROM {_quote(table)} WHERE {ID_EXPR} = ?",
        ("",),
    ).fetchall()
    return any("USING INDEX" in str(row[-1]) for row in plan)


def ensure_id_indexes(
    sqlite_dir: str, database: str, collections: Iterable[str], others_may: bool = False
) -> list[str]:
    """Index `_id` lookups of ``collections``; returns the collections whose reads
    by `_id` stay full scans (each also logged as a warning saying why).

    ``others_may``: a file this process may not write is left, with a note, to
    ``sensor-gateway ferretdb-index`` (which the unit runs as root)."""
    wanted = list(collections)
    if not sqlite_dir:
        for coll in wanted:
            log.warning(
                "FerretDB: reads by _id of collection %r scan the whole table: set "
                "mongodb.ferretdb_sqlite_dir to FerretDB's SQLite folder so the gateway "
                "can index them",
                coll,
            )
        return wanted
    path = Path(sqlite_dir) / f"{database}.sqlite"
    if others_may and not os.access(path, os.W_OK):
        # An unprivileged daemon beside FerretDB's own user: the unit's
        # `sensor-gateway ferretdb-index` (ExecStartPost=+) does it instead.
        log.info("FerretDB: %s is not ours to write; ferretdb-index indexes it", path)
        return wanted
    slow: list[str] = []
    try:
        owner = path.stat()
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30)
    except (OSError, sqlite3.Error) as exc:
        for coll in wanted:
            log.warning("FerretDB: cannot index _id of collection %r in %s: %s", coll, path, exc)
        return wanted
    try:
        tables = dict(con.execute("SELECT name, table_name FROM _ferretdb_collections"))
        for coll in wanted:
            table = tables.get(coll)
            try:
                if table is None:
                    raise sqlite3.OperationalError("FerretDB has no table for it yet")
                con.execute(
                    f"CREATE UNIQUE INDEX IF NOT EXISTS {_quote(table + '_sg_id')} "
                    f"ON {_quote(table)} ({ID_EXPR})"
                )
                con.commit()
                if not uses_index(con, table):
                    raise sqlite3.OperationalError("EXPLAIN shows no index in use")
            except sqlite3.Error as exc:
                slow.append(coll)
                log.warning(
                    "FerretDB: reads by _id of collection %r will scan the whole table (%s: %s)",
                    coll,
                    path,
                    exc,
                )
    except sqlite3.Error as exc:
        log.warning("FerretDB: cannot read %s (%s); reads by _id scan whole tables", path, exc)
        return wanted
    finally:
        con.close()
        _keep_owner(path, owner)
    if not slow:
        log.info("FerretDB: reads by _id are indexed (%s)", ", ".join(wanted))
    return slow
