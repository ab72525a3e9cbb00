"""The storage layout against a real MongoDB-wire server: paging across minute,
document and hour boundaries, arrival order, microseconds, value ranges,
exactly-once aggregates, retention per tier, migration, FerretDB's `_id` index,
and what a request may cost."""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sensor_gateway import ferretdb, layout, migrate, queries, retention, storage
from sensor_gateway.writer import Writer
from tests.helpers import Gateway

T0 = datetime(2024, 3, 1, 22, 58, 30, tzinfo=UTC)


def reading(sid: str, ts: datetime, value: float, key: str, kind: str = "temperature") -> dict:
    return {"sensor_id": sid, "kind": kind, "value": float(value), "ts": ts, "_id": key}


@pytest.fixture
def db(gateway: Gateway):
    storage.prepare(gateway.db, gateway.cfg)
    return gateway.db


def page_all(db, **kw: Any) -> list[dict[str, Any]]:
    out, cursor = [], None
    while True:
        items, cursor = queries.find_readings(db, queries.ReadingQuery(cursor=cursor, **kw))
        out += items
        if cursor is None:
            return out


def dataset() -> list[dict]:
    """Two sensors over 3 minutes across an hour boundary: some seconds hold many
    readings with one timestamp (more than a document holds), in a known order."""
    rs = []
    for i in range(180):
        ts = T0 + timedelta(seconds=i, microseconds=123)
        per = 70 if i in (29, 95) else 1  # 70 readings of one timestamp: > SEGMENT
        for j in range(per):
            for sid in ("b", "a.1"):
                rs.append(reading(sid, ts, i + j / 100, f"{sid}-{i}-{j}"))
    return rs


def test_pages_cross_minute_document_and_hour_boundaries(db) -> None:
    rs = dataset()
    w = Writer(db)
    for i in range(0, len(rs), 97):  # batch edges fall anywhere
        w.write([dict(r) for r in rs[i : i + 97]])
    assert storage.count_readings(db) == len(rs)
    # Expected order: time, then sensor, then arrival.
    expected = sorted(rs, key=lambda r: (r["ts"], r["sensor_id"]))  # stable: arrival kept
    got = page_all(db, limit=53)
    assert [(g["sensor_id"], g["value"]) for g in got] == [
        (r["sensor_id"], r["value"]) for r in expected
    ]
    assert len({g["id"] for g in got}) == len(rs)
    desc = page_all(db, limit=41, order="desc")
    assert [g["id"] for g in desc] == [g["id"] for g in reversed(got)]
    # One sensor, a window with edges inside minutes: start inclusive, end exclusive.
    start, end = T0 + timedelta(seconds=29, microseconds=123), T0 + timedelta(seconds=96)
    one = page_all(db, sensor_id="a.1", start=start, end=end, limit=10)
    want = [r for r in expected if r["sensor_id"] == "a.1" and start <= r["ts"] < end]
    assert [g["value"] for g in one] == [r["value"] for r in want]
    assert len(one) == 70 + 65 + 70  # both bursts, and the seconds between
    at = end + timedelta(microseconds=123)
    incl = queries.find_readings(
        db,
        queries.ReadingQuery(sensor_id="b", start=at, end=at, end_inclusive=True, limit=1000),
    )[0]
    assert [g["value"] for g in incl] == [96.0]


def test_equal_timestamps_keep_arrival_order_and_latest_is_last_received(db) -> None:
    ts = T0 + timedelta(microseconds=5)
    values = list(range(100))
    random.Random(3).shuffle(values)
    w = Writer(db)
    for v in values:  # one at a time, as a slow sensor would send them
        w.write([reading("s", ts, v, f"k{v}")])
    latest = queries.latest(db, 10, sensor_id="s")
    assert [x["value"] for x in latest] == [float(v) for v in reversed(values[-10:])]
    assert [x["value"] for x in page_all(db, sensor_id="s", limit=7)] == [float(v) for v in values]


def test_microseconds_are_kept_and_shown(db) -> None:
    Writer(db).write(
        [
            reading("m", datetime(2024, 1, 1, 0, 0, 0, 123456, tzinfo=UTC), 1, "a"),
            reading("m", datetime(2024, 1, 1, 0, 0, 1, 500000, tzinfo=UTC), 2, "b"),
        ]
    )
    got = [x["timestamp"] for x in page_all(db, sensor_id="m", limit=10)]
    assert got == ["2024-01-01T00:00:00.123456Z", "2024-01-01T00:00:01.500Z"]


def test_value_ranges_by_sensor_and_by_kind(db) -> None:
    w = Writer(db)
    rs = [reading("t1", T0 + timedelta(seconds=i), i % 50, f"t1-{i}") for i in range(600)]
    rs += [
        reading("h1", T0 + timedelta(seconds=i), i % 50, f"h1-{i}", "humidity") for i in range(600)
    ]
    w.write(rs)
    got = page_all(db, name="t1", min_value=10, max_value=12.5, limit=100)
    assert {g["value"] for g in got} == {10.0, 11.0, 12.0} and len(got) == 36
    by_kind = page_all(db, name="humidity", min_value=49, max_value=49, limit=100)
    assert {g["sensor_id"] for g in by_kind} == {"h1"} and len(by_kind) == 12
    # Minutes whose min/max cannot match are never read.
    r = queries.Reader(db)
    assert page_all(r, name="t1", min_value=1000, limit=10) == []
    assert not any(coll == layout.SAMPLES for coll, _ in r._memo)


def test_a_redelivered_batch_is_stored_and_counted_once(db) -> None:
    rs = [
        reading("st", T0 + timedelta(seconds=i, microseconds=1), i % 7, f"st-{i}", "status")
        for i in range(500)
    ]
    Writer(db).write([dict(r) for r in rs])
    before = (queries.count_all(db), queries.status_counts(db, None, None))
    # A crash between a bucket's write and its summaries', then the broker's redelivery:
    # damage a summary, and write the same readings again with a writer that knows nothing.
    hid = layout.sensor_hour_id("st", layout.to_us(T0))
    wrong = layout.pack({**layout.summary(), "n": 1, "sum": 1.0, "min": 0.0, "max": 9.0})
    db[layout.HOURS].update_one({"_id": hid}, {"$set": {"m.58": wrong}})
    mid = layout.minute_doc_id(layout.to_us(T0))
    db[layout.MINUTES].update_one({"_id": mid}, {"$set": {"by.st": wrong}})
    out = Writer(db).write([dict(r) for r in rs])
    assert (len(out.new), out.duplicates) == (0, 500)
    assert (queries.count_all(db), queries.status_counts(db, None, None)) == before
    assert sum(before[1].values()) == 500
    assert layout.summaries(db[layout.HOURS].find_one({"_id": hid}), "m")["58"]["n"] == 30


def test_a_redelivered_reading_timed_on_arrival_heals_its_minute(db) -> None:
    """No timestamp, a msg_id: the redelivery gets a later receipt time, so another
    minute; the writer finds the first copy by key and sets that minute's summaries
    again, as for a redelivered reading with a timestamp."""
    first = T0 + timedelta(seconds=5)
    rs = [
        {**reading("rc", first, 3.0, f"rc-{i}"), "ts_from_receipt": True, "msg_id": str(i)}
        for i in range(3)
    ]
    Writer(db).write([dict(r) for r in rs])
    hid = layout.sensor_hour_id("rc", layout.to_us(T0))
    mid = layout.minute_doc_id(layout.to_us(T0))
    wrong = layout.pack({**layout.summary(), "n": 1, "sum": 1.0, "min": 0.0, "max": 9.0})
    db[layout.HOURS].update_one({"_id": hid}, {"$set": {"m.58": wrong}})
    db[layout.MINUTES].update_one({"_id": mid}, {"$set": {"by.rc": wrong}})
    later = first + timedelta(minutes=2)  # the redelivery's receipt time
    out = Writer(db).write([{**r, "ts": later} for r in rs])
    assert (len(out.new), out.duplicates) == (0, 3)
    assert layout.summaries(db[layout.HOURS].find_one({"_id": hid}), "m")["58"]["n"] == 3
    assert layout.summaries(db[layout.MINUTES].find_one({"_id": mid}), "by")["rc"]["n"] == 3
    assert queries.count_all(db) == 3
    assert db[layout.SAMPLES].find_one({"_id": layout.bucket_id("rc", layout.to_us(later))}) is None


def test_retention_per_tier(gateway: Gateway, db) -> None:
    day = datetime(2024, 1, 1, tzinfo=UTC)
    w = Writer(db)
    w.write([reading("r", day + timedelta(hours=h), h, f"r-{h}") for h in range(72)])
    assert storage.count_readings(db) == 72
    gateway.set(ingest={"retention_days": 1, "summary_retention_days": 2})
    now = day + timedelta(days=3)
    out = retention.sweep(db, gateway.cfg, now=now)
    # Raw: only the last day's 24 hours remain; summaries: the last two days.
    assert storage.count_readings(db) == 24
    assert out["buckets"] == 48
    assert queries.count_all(db) == 48
    hours = {d["_id"] for d in db[layout.HOURS].find({}, {"_id": 1})}
    assert layout.all_day_id(layout.to_us(day)) not in hours
    assert layout.all_day_id(layout.to_us(day + timedelta(days=1))) in hours
    # A second sweep has nothing left to do, and a sweep resumes where it stopped.
    assert retention.sweep(db, gateway.cfg, now=now) == {"buckets": 0, "summaries": 0, "rejects": 0}
    gateway.set(ingest={"retention_days": 1, "summary_retention_days": 0})
    retention.sweep(db, gateway.cfg, now=now + timedelta(days=1))
    assert storage.count_readings(db) == 0
    assert queries.count_all(db) == 48  # summaries kept forever now


def flat_docs(n: int) -> list[dict]:
    return [
        {
            "_id": f"old{i}",
            "sensor_id": f"s{i % 3}",
            "kind": "status" if i % 3 == 0 else "temperature",
            "value": float(i % 7),
            "unit": "°C",
            "msg_id": f"m{i}",
            "ts": datetime(2023, 5, 1, tzinfo=UTC) + timedelta(seconds=i // 3),
            "received_at": datetime(2023, 5, 1, tzinfo=UTC),
            "topic": "sensors/x",
        }
        for i in range(n)
    ]


def test_old_layout_is_refused_then_migrated_idempotently(gateway: Gateway) -> None:
    db = gateway.db
    db[layout.FLAT_READINGS].insert_many(flat_docs(12_000))
    db[layout.FLAT_ROLLUPS].insert_one({"_id": "x"})
    with pytest.raises(storage.LayoutError, match="sensor-gateway migrate"):
        storage.check_layout(db)
    # Interrupted after the first chunk...
    calls = []

    def stop_after_one(done: int, total: int) -> None:
        calls.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        migrate.run(db, stop_after_one)
    assert storage.count_readings(db) == migrate.CHUNK
    # ...then run again through the CLI, as an operator would.
    proc = gateway.spawn("migrate")
    assert proc.wait(300) == 0, proc.log_path.read_text()
    assert "moved" in proc.log_path.read_text()
    stored = gateway.readings()
    assert len(stored) == 12_000
    assert {r["msg_id"] for r in stored} == {f"m{i}" for i in range(12_000)}
    assert queries.count_all(db) == 12_000
    counts = queries.status_counts(db, None, None)
    assert sum(counts.values()) == 4000
    storage.check_layout(db)  # accepted now
    names = set(db.list_collection_names())
    assert {"readings_v1", "rollups_minute_v1"} <= names and "readings" not in names
    again = gateway.spawn("migrate")
    assert again.wait(60) == 0
    assert "nothing to migrate" in again.log_path.read_text()


def test_ferretdb_id_lookups_use_an_index(gateway: Gateway, db, caplog) -> None:
    if not storage.is_ferretdb(db):
        # MongoDB serves them from its own `_id` index: its plan must not scan.
        for coll in layout.BY_ID:
            plan = db[coll].find({"_id": "x"}).explain()["queryPlanner"]["winningPlan"]
            assert "COLLSCAN" not in str(plan), (coll, plan)
        return
    import sqlite3

    path = f"{gateway.cfg.mongodb.ferretdb_sqlite_dir}/{db.name}.sqlite"
    con = sqlite3.connect(path)
    tables = dict(con.execute("SELECT name, table_name FROM _ferretdb_collections"))
    for coll in layout.BY_ID:
        assert ferretdb.uses_index(con, tables[coll]), coll
    con.close()
    # Without the folder (or with one it cannot use) it says which collection is slow.
    caplog.set_level(logging.WARNING, "sensor_gateway.ferretdb")
    assert ferretdb.ensure_id_indexes("", db.name, ["samples"]) == ["samples"]
    assert ferretdb.ensure_id_indexes("/nonexistent", db.name, ["hours"]) == ["hours"]
    assert "'samples'" in caplog.text and "'hours'" in caplog.text


def test_cost_is_bounded_and_unknown_sensors_cost_one_read(db) -> None:
    Writer(db).write([reading("c", T0 + timedelta(minutes=m), m, f"c{m}") for m in range(600)])
    r = queries.Reader(db, max_documents=50)
    with pytest.raises(queries.TooCostly, match="api.max_documents"):
        queries.find_readings(r, queries.ReadingQuery(sensor_id="c", limit=1000))
    r = queries.Reader(db)
    assert queries.latest(r, 10, sensor_id="nope") == []
    assert r.read == 1
    r = queries.Reader(db)
    assert queries.find_readings(r, queries.ReadingQuery(sensor_id="c", limit=5))[0]
    # The registry, two hour documents (and a look for each one's pack: these hours
    # are settled) and one minute each: the page, not 600 minutes.
    assert r.read <= 11


def test_daemons_refuse_the_old_layout_naming_the_command(gateway: Gateway) -> None:
    gateway.db[layout.FLAT_READINGS].insert_many(flat_docs(3))
    for cmd in ("ingest", "api"):
        proc = gateway.spawn(cmd)
        assert proc.wait(60) == 78, proc.log_path.read_text()
        assert "sensor-gateway migrate" in proc.log_path.read_text()
