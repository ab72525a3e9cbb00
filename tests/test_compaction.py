"""Settled hours packed into one document per sensor (compaction.py): reads
over packed hours answer exactly as over the buckets, read far fewer
documents, page across packed and unpacked hours, and fall back to the
buckets for an hour a later reading changed."""

from __future__ import annotations

import time
from datetime import timedelta

from sensor_gateway import compaction, layout, queries, retention
from sensor_gateway.writer import Writer
from tests.helpers import Gateway, wait_for
from tests.test_lanes import _load, assert_reads_match, assert_walks_match, lanes_dataset
from tests.test_status_counts import DAY, _reading

FAR = layout.to_us(DAY + timedelta(days=30))


def _docs_read(db, **kw) -> dict[str, int]:
    r = queries.Reader(db)
    queries.find_readings(r, queries.ReadingQuery(limit=1000, **kw))
    out: dict[str, int] = {}
    for coll, _ in r._memo:
        out[coll] = out.get(coll, 0) + 1
    return out


def test_packed_hours_answer_as_the_buckets(gateway: Gateway) -> None:
    rs = lanes_dataset()
    _load(gateway, rs, 5)
    db = gateway.db
    before = _docs_read(db, sensor_id="st.a")
    # Half the hours first: pages then cross from packed hours into unpacked ones.
    middle = layout.to_us(DAY + timedelta(hours=14))
    assert compaction.compact(db, middle) > 0
    assert_reads_match(db, rs)
    assert compaction.compact(db, FAR) > 0
    assert compaction.compact(db, FAR) == 0  # resumes where it stopped
    assert_reads_match(db, rs)
    after = _docs_read(db, sensor_id="st.a")
    print(f"documents read for 1,000 readings of a sensor: {before} then {after}")
    assert after.get(layout.SAMPLES, 0) == 0 and after[layout.PACKS] >= 1
    assert sum(after.values()) * 3 < sum(before.values())


def test_a_late_reading_makes_its_hour_read_from_the_buckets(gateway: Gateway) -> None:
    rs = [
        _reading("s", DAY + timedelta(minutes=m, seconds=sec), m + sec, f"k{m}-{sec}", "t")
        for m in range(0, 120, 3)
        for sec in range(0, 60, 7)
    ]
    _load(gateway, rs, 1)
    db = gateway.db
    assert compaction.compact(db, FAR) == 2
    late = _reading("s", DAY + timedelta(minutes=5, seconds=1, microseconds=3), -1.0, "late", "t")
    Writer(db).write([dict(late)])
    rs.append(late)
    assert queries.count_all(db) == len(rs)
    assert_walks_match(db, rs, "s", ("s",))
    # A pack whose summaries and buckets disagree (a write half done) is not made.
    hid = layout.sensor_hour_id("s", layout.to_us(DAY))
    db[layout.PACKS].delete_one({"_id": hid})
    db[layout.SAMPLES].update_one(
        {"_id": layout.bucket_id("s", layout.to_us(DAY))},
        {"$push": {"t": 1, "v": 0.5, "k": "half", "ai": 0, "mi": None}},
    )
    assert not compaction.pack_hour(db, "s", layout.to_us(DAY))
    assert db[layout.PACKS].find_one({"_id": hid}) is None


def test_retention_deletes_the_packs(gateway: Gateway) -> None:
    rs = [_reading("s", DAY + timedelta(minutes=m), m, f"k{m}", "t") for m in range(0, 180, 2)]
    _load(gateway, rs, 3)
    db = gateway.db
    compaction.compact(db, FAR)
    assert db[layout.PACKS].count_documents({}) == 3
    retention.sweep_raw(db, layout.to_us(DAY + timedelta(hours=2)))
    assert [d["b"] for d in db[layout.PACKS].find()] == [layout.to_us(DAY + timedelta(hours=2))]
    # The readings left, from packs and buckets; the hour summaries (their own
    # tier) still count every reading.
    assert_walks_match(db, [r for r in rs if r["ts"] >= DAY + timedelta(hours=2)], "s", ("s",))
    assert queries.count_all(db) == len(rs)


def test_worker_0_packs_in_its_own_thread_and_other_workers_do_not(gateway: Gateway) -> None:
    rs = [_reading("s", DAY + timedelta(minutes=m), m, f"k{m}", "t") for m in range(0, 120, 2)]
    _load(gateway, rs, 4)
    db = gateway.db
    gateway.set(ingest={"workers": 2, "worker": 1})
    gateway.start_ingester()
    time.sleep(3)
    assert db[layout.PACKS].count_documents({}) == 0
    gateway.stop_ingesters()
    gateway.set(ingest={"workers": 2, "worker": 0})
    gateway.start_ingester()
    wait_for(lambda: db[layout.PACKS].count_documents({}) == 2, 30, what="worker 0 to pack")


def test_packing_crosses_a_gap_of_weeks(gateway: Gateway) -> None:
    """Days without readings are skipped a day summary at a time; the hours on
    both sides of the gap are packed."""
    later = DAY + timedelta(days=40, hours=5)
    rs = [
        _reading("s", t + timedelta(minutes=m), m, f"{t:%d}-{m}", "t")
        for t in (DAY, later)
        for m in range(3)
    ]
    _load(gateway, rs, 6)
    db = gateway.db
    assert compaction.compact(db, layout.to_us(later) + 2 * layout.US_HOUR) == 1
    assert compaction.compact(db, layout.to_us(later) + 4 * layout.US_HOUR) == 1
    assert sorted(d["b"] for d in db[layout.PACKS].find()) == [
        layout.to_us(DAY),
        layout.to_us(later),
    ]
    assert_walks_match(db, rs, "s", ("s",))
