"""mongodb.uri, write_concern, journal and wtimeout_ms: what reaches the server, what
the configuration refuses, and how replica-set failover errors are classified.

Against the stack's real server (FerretDB 1.24, or mongod when one is on PATH).
FerretDB takes any write concern and waits for nobody, so these tests prove that
the gateway sends what it is configured to send and still stores every reading
once; what a replica set does with it (waiting for a majority, electing a new
primary) needs a real replica set, which the classification tests below stand in
for by running pymongo's own reply checks on the replies a replica set sends.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pymongo
import pytest
from pymongo import monitoring
from pymongo.bulk_shared import _raise_bulk_write_error
from pymongo.errors import (
    BulkWriteError,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WriteConcernError,
    WTimeoutError,
)
from pymongo.helpers_shared import _check_command_response

from devstack import REPO
from devstack.ports import free_port
from sensor_gateway import config, queries, storage
from tests.helpers import Gateway, wait_for

# -- what reaches the server --------------------------------------------------------


class Commands(monitoring.CommandListener):
    """Every command a client sends, by name, as sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.sent.append((event.command_name, dict(event.command)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_majority_write_concern_stores_every_reading_once(gateway: Gateway) -> None:
    n = 1500
    # The URI may repeat what the keys say (Atlas' URIs carry w=majority), and may
    # turn the driver's retryable writes off: the writer's exactly-once has its own keys.
    gateway.set(
        mongodb={
            "uri": gateway.stack.mongo.uri + "?w=majority&retryWrites=false&journal=true",
            "write_concern": "majority",
            "wtimeout_ms": 3000,
        }
    )
    ing = gateway.start_ingester()
    assert ing.db.write_concern.document == {"w": "majority", "j": True, "wtimeout": 3000}
    assert ing.db.read_preference == pymongo.ReadPreference.PRIMARY
    assert ing.db.client.options.retry_writes is False
    sim = gateway.publish(n, rate=1500)
    gateway.wait_stored(n)
    stored = Counter(r["msg_id"] for r in gateway.readings())
    assert stored == Counter(f"{sim.run_id}-{i}" for i in range(1, n + 1))
    wait_for(lambda: queries.count_all(gateway.db) == n, 20, what="summaries count each once")


def test_the_configured_write_concern_is_what_every_write_carries(gateway: Gateway) -> None:
    gateway.set(mongodb={"write_concern": 1, "journal": False, "wtimeout_ms": 2500})
    listener = Commands()
    db = storage.connect(gateway.cfg, event_listeners=[listener])
    try:
        storage.prepare(db, gateway.cfg)  # writes meta.layout, creates collections
        db["meta"].bulk_write([pymongo.UpdateOne({"_id": "probe"}, {"$set": {"x": 1}}, True)])
    finally:
        db.client.close()
    writes = [(name, cmd) for name, cmd in listener.sent if name in ("update", "insert")]
    assert writes, listener.sent
    for name, cmd in writes:
        assert cmd.get("writeConcern") == {"w": 1, "j": False, "wtimeout": 2500}, (name, cmd)
    # Reads at the server's default read concern, from the primary.
    finds = [cmd for name, cmd in listener.sent if name == "find"]
    assert finds and all("readConcern" not in cmd for cmd in finds)


def test_default_is_majority_journaled() -> None:
    m = config.build({}).mongodb
    assert (m.write_concern, m.journal, m.wtimeout_ms, m.wtimeout) == ("majority", True, 0, 5000)
    # wtimeout_ms 0 follows timeout_ms, so it stays below the socket timeout.
    assert config.build({"mongodb": {"timeout_ms": 500}}).mongodb.wtimeout == 500


def test_several_members_on_a_server_that_is_no_replica_set_stop_the_ingester(
    gateway: Gateway,
) -> None:
    """w: 2 on a standalone: mongod refuses every write, FerretDB waits for nobody.
    Either way the ingester must not start: exit 78 (no restart), naming the key."""
    gateway.set(mongodb={"write_concern": 2})
    with pytest.raises(storage.PermanentError, match=r"mongodb\.write_concern = 2 needs"):
        storage.prepare(gateway.db, gateway.cfg)
    p = gateway.spawn("ingest")
    assert p.wait(60) == 78
    assert "mongodb.write_concern = 2 needs a replica set" in p.log_path.read_text()


# -- what the configuration refuses ---------------------------------------------------


@pytest.mark.parametrize(
    ("mongodb", "env", "message"),
    [
        ({"write_concern": "banana"}, {}, 'mongodb.write_concern: expected "majority"'),
        ({"write_concern": 0}, {}, "mongodb.write_concern: 0 (unacknowledged writes)"),
        ({}, {"WRITE_CONCERN": "0"}, "mongodb.write_concern: 0 (unacknowledged writes)"),
        ({}, {"WRITE_CONCERN": "-1"}, "mongodb.write_concern: expected"),
        ({"write_concern": 1.5}, {}, "mongodb.write_concern: expected"),
        ({"write_concern": True}, {}, "mongodb.write_concern: expected"),
        ({"journal": "yes"}, {}, "mongodb.journal: expected true or false"),
        ({"wtimeout_ms": -1}, {}, "mongodb.wtimeout_ms: must be >= 0"),
        ({"wtimeout_ms": 10000}, {}, "below the socket timeout (2 x mongodb.timeout_ms = 10000)"),
        ({"wtimeout_ms": 5000}, {"TIMEOUT_MS": "2000"}, "(2 x mongodb.timeout_ms = 4000)"),
        ({"timeout_ms": 0}, {}, "mongodb.timeout_ms: must be > 0"),
        ({"uri": "mongodb://h/?w=0"}, {}, "mongodb.uri: w=0 (unacknowledged writes) is refused"),
        ({"uri": "mongodb+srv://rs.example/?w=0"}, {}, "mongodb.uri: w=0"),
        ({"uri": "mongodb://h/?w=1"}, {}, "mongodb.uri: w=1 contradicts mongodb.write_concern"),
        (
            {"uri": "mongodb://h/?w=majority"},
            {"WRITE_CONCERN": "2"},
            "mongodb.uri: w='majority' contradicts mongodb.write_concern = 2",
        ),
        ({"uri": "mongodb://h/?journal=false"}, {}, "contradicts mongodb.journal = True"),
        ({"uri": "mongodb://h/?wtimeoutMS=1"}, {}, "contradicts mongodb.wtimeout_ms = 5000"),
        ({"uri": "mongodb://h/?readPreference=secondary"}, {}, "readPreference=secondary is"),
        ({"uri": "mongodb://h/?readConcernLevel=majority"}, {}, "readConcernLevel=majority is"),
        ({"uri": "mongodb://h/?retryWrites=maybe"}, {}, "mongodb.uri: The value of retrywrites"),
        ({"uri": "mongodb://h/?replicaset=rs0&bogus=1"}, {}, "mongodb.uri: Unknown option: bogus"),
        ({"uri": "http://h/"}, {}, "mongodb.uri: Invalid URI scheme"),
    ],
)
def test_bad_values_are_refused_naming_the_key(
    tmp_path: Path, mongodb: dict[str, Any], env: dict[str, str], message: str
) -> None:
    import tomli_w

    p = tmp_path / "g.toml"
    p.write_text(tomli_w.dumps({"mongodb": mongodb}))
    environ = {f"SENSOR_GATEWAY_MONGODB__{k}": v for k, v in env.items()}
    with pytest.raises(config.ConfigError) as exc:
        config.load(p, environ=environ)
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("mongodb", "env", "want"),
    [
        ({"uri": "mongodb://a:1,b:2,c:3/?replicaSet=rs0&w=majority"}, {}, "majority"),
        ({"uri": "mongodb+srv://rs.example/?retryWrites=true&w=majority"}, {}, "majority"),
        ({"write_concern": "3"}, {}, 3),  # a number, not a tag set named "3"
        ({}, {"WRITE_CONCERN": "2"}, 2),
        ({}, {"WRITE_CONCERN": "majority"}, "majority"),
        ({"uri": "mongodb://h/?w=2&journal=false", "write_concern": 2, "journal": False}, {}, 2),
    ],
)
def test_good_values(
    tmp_path: Path, mongodb: dict[str, Any], env: dict[str, str], want: str | int
) -> None:
    import tomli_w

    p = tmp_path / "g.toml"
    p.write_text(tomli_w.dumps({"mongodb": mongodb}))
    environ = {f"SENSOR_GATEWAY_MONGODB__{k}": v for k, v in env.items()}
    assert config.load(p, environ=environ).mongodb.write_concern == want


def test_messages_never_show_the_uri_password() -> None:
    for query in ("w=0", "w=1", "bogus=1", "readPreference=nearest", "retryWrites=maybe"):
        with pytest.raises(config.ConfigError) as exc:
            config.build({"mongodb": {"uri": f"mongodb://gw:s3cret-pw@h1,h2/?{query}"}})
        assert "s3cret-pw" not in str(exc.value)


def test_check_config_names_the_uri_w0(tmp_path: Path) -> None:
    p = tmp_path / "g.toml"
    p.write_text('[mongodb]\nuri = "mongodb://127.0.0.1:1/?replicaSet=rs0&w=0"\n')
    r = subprocess.run(
        [sys.executable, "-m", "sensor_gateway", "-c", str(p), "check-config", "--no-secrets"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2
    assert "mongodb.uri: w=0 (unacknowledged writes) is refused" in r.stderr


# -- failover errors: transient, so the batch is held and written again ----------------
#
# Built by pymongo's own reply checks from the replies a replica set member sends
# (codes and shapes from the server's error_codes.yml and the driver specs), so each
# is the exception class, code, labels and details the writer would catch.

WIRE = 21  # MongoDB 7.0


def raised(check: Any, *args: Any, **kwargs: Any) -> BaseException:
    try:
        check(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - what pymongo raises is the point
        return exc
    raise AssertionError("pymongo raised nothing")


def reply_error(reply: dict[str, Any]) -> BaseException:
    return raised(_check_command_response, reply, WIRE, parse_write_concern_error=True)


def bulk_error(write_errors: list[dict], wces: list[dict] | None = None) -> BaseException:
    result = {
        "writeErrors": write_errors,
        "writeConcernErrors": wces or [],
        "nInserted": 0,
        "nUpserted": 0,
        "nMatched": 1,
        "nModified": 1,
        "nRemoved": 0,
        "upserted": [],
    }
    return raised(_raise_bulk_write_error, result)


def failure(code: int, name: str, msg: str, **extra: Any) -> dict[str, Any]:
    return {"ok": 0.0, "errmsg": msg, "code": code, "codeName": name, **extra}


WTIMEOUT = {
    "code": 64,
    "codeName": "WriteConcernFailed",
    "errmsg": "waiting for replication timed out",
    "errInfo": {"wtimeout": True, "writeConcern": {"w": "majority", "wtimeout": 5000}},
}


@pytest.mark.parametrize(
    ("exc", "cls", "kind"),
    [
        # The old primary answers a write after stepping down.
        (
            reply_error(failure(10107, "NotWritablePrimary", "not primary")),
            NotPrimaryError,
            storage.TRANSIENT,
        ),
        (
            reply_error(failure(189, "PrimarySteppedDown", "stepdown in progress")),
            NotPrimaryError,
            storage.TRANSIENT,
        ),
        (
            reply_error(
                failure(
                    11602,
                    "InterruptedDueToReplStateChange",
                    "operation was interrupted",
                    errorLabels=["RetryableWriteError"],
                )
            ),
            NotPrimaryError,
            storage.TRANSIENT,
        ),
        (
            reply_error(
                failure(13435, "NotPrimaryNoSecondaryOk", "not primary and secondaryOk=false")
            ),
            NotPrimaryError,
            storage.TRANSIENT,
        ),
        # MongoDB before 3.6, no code: pymongo reads the message.
        (reply_error({"ok": 0.0, "errmsg": "not master"}), NotPrimaryError, storage.TRANSIENT),
        # Applied on the primary, not replicated to a majority within wtimeout.
        (
            reply_error({"ok": 1.0, "n": 1, "nModified": 1, "writeConcernError": WTIMEOUT}),
            WTimeoutError,
            storage.TRANSIENT,
        ),
        # The primary stepped down while the write waited for the majority.
        (
            reply_error(
                {
                    "ok": 1.0,
                    "n": 1,
                    "writeConcernError": {
                        "code": 189,
                        "codeName": "PrimarySteppedDown",
                        "errmsg": "Primary stepped down while waiting for replication",
                    },
                    "errorLabels": ["RetryableWriteError"],
                }
            ),
            WriteConcernError,
            storage.TRANSIENT,
        ),
        # A bulk write (the writer's appends and summaries) whose write concern failed:
        # before, its code 65 read as "the documents are at fault".
        (bulk_error([], [WTIMEOUT]), BulkWriteError, storage.TRANSIENT),
        (
            bulk_error(
                [{"index": 0, "code": 11000, "errmsg": "E11000 duplicate key"}],
                [{"code": 91, "codeName": "ShutdownInProgress", "errmsg": "shutting down"}],
            ),
            BulkWriteError,
            storage.TRANSIENT,
        ),
        (
            bulk_error([{"index": 0, "code": 50, "errmsg": "operation exceeded time limit"}]),
            BulkWriteError,
            storage.TRANSIENT,
        ),
        # Never satisfiable by this replica set: a person must act.
        (
            reply_error(
                {
                    "ok": 1.0,
                    "writeConcernError": {
                        "code": 100,
                        "codeName": "UnsatisfiableWriteConcern",
                        "errmsg": "Not enough data-bearing nodes",
                    },
                }
            ),
            WriteConcernError,
            storage.PERMANENT,
        ),
        (
            bulk_error(
                [],
                [
                    {
                        "code": 79,
                        "codeName": "UnknownReplWriteConcern",
                        "errmsg": "unrecognized write concern mode: banana",
                    }
                ],
            ),
            BulkWriteError,
            storage.PERMANENT,
        ),
        # A server with sessions but no retryable writes: pymongo says retryWrites=false.
        (
            bulk_error(
                [
                    {
                        "index": 0,
                        "code": 20,
                        "errmsg": "Transaction numbers are only allowed on a replica set "
                        "member or mongos",
                    }
                ]
            ),
            OperationFailure,
            storage.PERMANENT,
        ),
        # Still about the documents: isolated, each refused one becomes a reject.
        (
            bulk_error([{"index": 0, "code": 11000, "errmsg": "E11000 duplicate key"}]),
            BulkWriteError,
            storage.DOCUMENT,
        ),
        (
            bulk_error([{"index": 0, "code": 2, "errmsg": "cannot $push to a non-array"}]),
            BulkWriteError,
            storage.DOCUMENT,
        ),
    ],
)
def test_failover_errors_are_classified(exc: BaseException, cls: type, kind: str) -> None:
    assert type(exc) is cls, repr(exc)
    assert storage.classify(exc) == kind, repr(exc)


def test_no_server_to_select_is_transient() -> None:
    """During an election there is no primary to select; a real client, a closed port."""
    port = free_port()
    uri = f"mongodb://127.0.0.1:{port}/?replicaSet=rs0"
    with (
        pymongo.MongoClient(uri, serverSelectionTimeoutMS=300) as c,
        pytest.raises(ServerSelectionTimeoutError) as sel,
    ):
        c.db.t.insert_one({})
    assert storage.classify(sel.value) == storage.TRANSIENT
