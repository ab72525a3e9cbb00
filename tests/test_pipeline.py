"""N published → N stored exactly once; Redis latest-N matches MongoDB."""

from __future__ import annotations

import math
import signal
import time
from collections import Counter
from typing import Any

import pytest

from sensor_gateway import cache, layout, queries, storage
from sensor_gateway.mqtt import connect_async, make_client, session_properties
from sensor_gateway.writer import Writer
from tests.helpers import Gateway, wait_for


def status_counts_of(readings: list[dict]) -> dict[str, int]:
    """Each status 0–6 among stored readings of kind ``status``, zeros included."""
    counts = dict.fromkeys(layout.STATUSES, 0)
    for r in readings:
        st = layout.status_of(r["kind"], r["value"])
        if st is not None:
            counts[st] += 1
    return counts


def test_n_published_n_stored_once(gateway: Gateway) -> None:
    ing = gateway.start_ingester()
    sim = gateway.publish(3000, rate=3000)
    gateway.wait_stored(3000)
    wait_for(lambda: ing.counters.stored == 3000, 10, what="counters")
    readings = gateway.readings()
    ids = [r["msg_id"] for r in readings]
    # Several readings can share a bucket: a duplicate shows as a repeated msg_id.
    assert len(ids) == len(set(ids)) == 3000, Counter(ids).most_common(3)
    assert set(ids) == {f"{sim.run_id}-{i}" for i in range(1, 3001)}
    # The summaries count each reading once.
    assert queries.count_all(gateway.db) == 3000
    assert queries.status_counts(gateway.db, None, None) == status_counts_of(readings)
    assert ing.counters.rejected == 0


def test_latest_ten_in_redis_match_mongodb(gateway: Gateway) -> None:
    gateway.start_ingester()
    gateway.publish(400, rate=2000)
    gateway.wait_stored(400)
    ing_cfg = gateway.cfg.ingest
    sensors = queries.sensor_ids(gateway.db)
    assert sensors == sorted({r["sensor_id"] for r in gateway.readings()})
    for sensor_id in sensors:
        expected = [d["_id"] for d in queries.latest_docs(gateway.db, 10, sensor_id=sensor_id)]
        assert len(expected) == 10
        wait_for(
            lambda s=sensor_id, e=expected: (
                [
                    r["id"]
                    for r in cache.read_latest(gateway.redis, gateway.keys, s, ing_cfg.latest_n)
                ]
                == e
            ),
            10,
            what=f"redis latest of {sensor_id}",
        )
    overall = [d["_id"] for d in queries.latest_docs(gateway.db, 10)]
    assert len(overall) == 10
    got = [r["id"] for r in cache.read_latest(gateway.redis, gateway.keys, None, 10)]
    assert got == overall


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_what_was_stored_is_acknowledged_to_the_broker(gateway: Gateway, protocol: str) -> None:
    """Every stored message's PUBACK reaches the broker: after a clean stop, the
    ingester's session holds nothing to deliver again (the broker redelivers
    what it holds unacknowledged; the dedupe would hide that, this would not)."""
    gateway.set(ingest={"batch_size": 70}, mqtt={"protocol": protocol})  # many batches
    proc = gateway.spawn_ingester()
    gateway.publish(3000, rate=6000)
    gateway.wait_stored(3000)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    again: list[int] = []
    c = make_client(
        gateway.cfg,
        gateway.cfg.ingest.client_id,
        gateway.cfg.ingest.mqtt_username,
        gateway.cfg.ingest.mqtt_password_file,
        manual_ack=True,
        persistent=True,
    )
    c.on_message = lambda cl, u, msg: again.append(msg.mid)
    connect_async(c, gateway.cfg, session_properties(3600, 1000))
    c.loop_start()
    try:
        wait_for(c.is_connected, 10, what="the ingester's session")
        time.sleep(3)
    finally:
        c.disconnect()
        c.loop_stop()
    assert again == []


# -- summaries heal themselves ---------------------------------------------------------


def _damage(s: dict[str, Any]) -> None:
    """A summary that counts what is not there (or misses what is)."""
    s["n"] += 1
    s["sum"] += 1.0
    s["max"] += 1.0
    for st in s.get("st") or {}:
        s["st"][st] += 1


def _summaries(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [*layout.summaries(doc, "m").values(), *layout.summaries(doc, "by").values()]


def _assert_same_summaries(after: dict[str, dict], before: dict[str, dict]) -> None:
    assert after.keys() == before.keys()
    for _id, doc in after.items():
        old = before[_id]
        assert doc.get("ms") == old.get("ms"), _id
        for path in ("m", "by"):
            new_s, old_s = layout.summaries(doc, path), layout.summaries(old, path)
            assert new_s.keys() == old_s.keys(), (_id, path)
            for name, s in new_s.items():
                o = old_s[name]
                assert {k: v for k, v in s.items() if k != "sum"} == {
                    k: v for k, v in o.items() if k != "sum"
                }, (_id, path, name)
                assert s["sum"] == pytest.approx(o["sum"], rel=1e-12), (_id, path, name)


def test_summaries_heal_when_readings_are_written_again(gateway: Gateway) -> None:
    """A crash between a bucket's append and its summaries' update leaves them
    wrong; the broker redelivers the batch, and writing it again (none of its
    readings new) sets every summary above those buckets to its recomputed value."""
    gateway.start_ingester()
    gateway.publish(500, rate=2000)
    gateway.wait_stored(500)
    gateway.stop_ingesters()
    db = gateway.db
    assert queries.count_all(db) == 500
    statuses = queries.status_counts(db, None, None)
    assert statuses == status_counts_of(gateway.readings()) and sum(statuses.values()) > 0
    before = {c: {d["_id"]: d for d in db[c].find()} for c in (layout.HOURS, layout.MINUTES)}

    # Damage every summary: minutes of each sensor-hour, every sensor's minute,
    # hour and day, and the status counts of each minute.
    for coll in (layout.HOURS, layout.MINUTES):
        for doc in db[coll].find():
            for path in ("m", "by"):
                for name, s in layout.summaries(doc, path).items():
                    _damage(s)
                    doc[path][name] = layout.pack(s)
            for minute, counts in layout.summaries(doc, "ms").items():
                doc["ms"][minute] = layout.pack_counts({st: c + 1 for st, c in counts.items()})
            db[coll].replace_one({"_id": doc["_id"]}, doc)
    assert queries.count_all(db) != 500
    assert queries.status_counts(db, None, None) != statuses

    # The same readings, with the same keys, as a redelivery brings them again.
    redelivered = []
    for bucket in db[layout.SAMPLES].find():
        for smp, key in zip(layout.samples_of(bucket), bucket["k"], strict=True):
            redelivered.append(
                {**smp.as_doc(), "_id": key, "topic": f"sensors/{smp.kind}/{smp.sensor_id}"}
            )
    assert len(redelivered) == 500
    out = Writer(db).write(redelivered)
    assert out.new == [] and out.refused == [] and out.duplicates == 500
    assert gateway.stored() == 500

    after = {c: {d["_id"]: d for d in db[c].find()} for c in (layout.HOURS, layout.MINUTES)}
    for coll in (layout.HOURS, layout.MINUTES):
        _assert_same_summaries(after[coll], before[coll])
    assert queries.count_all(db) == 500
    assert queries.status_counts(db, None, None) == statuses
    for doc in after[layout.HOURS].values():
        for s in _summaries(doc):
            assert math.isfinite(s["sum"])


def test_indexes_fit_the_engine(gateway: Gateway) -> None:
    gateway.start_ingester()
    gateway.publish(10)
    gateway.wait_stored(10)
    # Every read is by a computed `_id` (layout.py): no secondary index on the
    # buckets, on either engine (on FerretDB's SQLite backend one would also cost
    # inserts and never be used).
    assert set(gateway.db[layout.SAMPLES].index_information()) == {"_id_"}
    for coll in layout.BY_ID:
        assert set(gateway.db[coll].index_information()) <= {"_id_"}, coll
    if storage.is_ferretdb(gateway.db):
        # prepare() creates each collection read by `_id` (for its SQL index).
        assert set(layout.BY_ID) <= set(gateway.db.list_collection_names())
