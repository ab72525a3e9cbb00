"""Ingest workers write lanes of their own (layout.in_lane), concurrently, and
every read merges them: the answers equal those over the readings taken
together, whichever worker got which reading of a sensor, whatever the order,
with batches redelivered, at the ends of time."""

from __future__ import annotations

import random
import threading
from datetime import timedelta
from multiprocessing import Process

import pymongo

from sensor_gateway import layout, queries, retention, storage
from sensor_gateway.writer import Writer
from tests.helpers import Gateway
from tests.test_status_counts import DAY, FIRST, LAST, _reading, brute, dataset, windows

LANES = 3


def _split(rs: list[dict], rng: random.Random) -> list[list[dict]]:
    """Each reading to a random lane, each lane's share in shuffled slices."""
    shares: list[list[dict]] = [[] for _ in range(LANES)]
    for r in rs:
        shares[rng.randrange(LANES)].append(r)
    for share in shares:
        for i in range(0, len(share), 300):
            chunk = share[i : i + 300]
            rng.shuffle(chunk)
            share[i : i + 300] = chunk
    return shares


def _write_lane(db, lane: int, share: list[dict], seed: int) -> None:
    rng = random.Random(seed)
    w = Writer(db, lane=lane)
    w.register_lane()
    i = 0
    while i < len(share):
        n = rng.randrange(1, 200)
        batch = share[i : i + n]
        w.write([dict(r) for r in batch])
        if rng.random() < 0.1:  # a redelivered batch, to a writer that forgot it
            w.forget(list(w.buckets))
            assert not w.write([dict(r) for r in batch]).new
        i += n


def _load(gateway: Gateway, rs: list[dict], seed: int) -> None:
    storage.prepare(gateway.db, gateway.cfg)
    shares = _split(rs, random.Random(seed))
    errors: list[BaseException] = []

    def run(lane: int) -> None:
        try:
            _write_lane(gateway.db, lane, shares[lane], seed + lane)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(lane,)) for lane in range(LANES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    queries._lanes_seen.clear()


def lanes_dataset() -> list[dict]:
    rs = dataset(random.Random(11))
    # Readings of one sensor at the same µs (each lane numbers its own arrivals).
    rs += [_reading("tie", DAY, float(v), f"tie-{v}", "temperature") for v in range(12)]
    return rs


def test_concurrent_lanes_answer_as_one(gateway: Gateway) -> None:
    rs = lanes_dataset()
    _load(gateway, rs, 5)
    assert queries.Reader(gateway.db).lanes == LANES
    assert_reads_match(gateway.db, rs)


def assert_reads_match(db, rs: list[dict]) -> None:
    """Every read path over ``db`` answers as a count over ``rs`` does."""
    assert queries.count_all(db) == len(rs)

    # Status counts, every window of the single-lane test.
    for start, end in windows(rs, random.Random(4)):
        assert queries.status_counts(db, start, end) == brute(rs, start, end, None), (start, end)
    for sid in ("st.a", "temp", "tie"):
        for start, end in random.Random(6).sample(windows(rs, random.Random(4)), 15):
            got = queries.status_counts(db, start, end, sensor_id=sid)
            assert got == brute(rs, start, end, sid), (sid, start, end)

    # Summaries of any window: count, sum, min, max per sensor.
    wrng = random.Random(8)
    for start, end in wrng.sample(windows(rs, random.Random(4)), 40):
        lo = layout.to_us(max(start or FIRST, FIRST))
        hi = layout.to_us(min(end or LAST, LAST)) + 1
        got = queries.window_summaries(queries.Reader(db), lo, hi)
        for sid in {r["sensor_id"] for r in rs}:
            vals = [
                x["value"] for x in rs if x["sensor_id"] == sid and lo <= layout.to_us(x["ts"]) < hi
            ]
            if not vals:
                assert sid not in got or not got[sid]["n"]
                continue
            s = got[sid]
            assert (s["n"], s["min"], s["max"]) == (len(vals), min(vals), max(vals)), sid
            assert abs(s["sum"] - sum(vals)) < 1e-6 * max(1.0, abs(sum(vals)))

    assert_walks_match(db, rs, "st.a", ("st-b", "tie", "temp"))


def assert_walks_match(db, rs: list[dict], value_sensor: str, latest_sensors: tuple) -> None:
    """Every reading once, in time order, through pages and cursors, both ways;
    a value range; the latest ten."""

    def walk(**kw) -> list[tuple[int, str, float]]:
        out: list[tuple[int, str, float]] = []
        cursor = None
        while True:
            q = queries.ReadingQuery(limit=97, cursor=cursor, **kw)
            page, cursor = queries.find_readings(db, q)
            out += [
                (layout.to_us(_parse(p["timestamp"])), p["sensor_id"], p["value"]) for p in page
            ]
            if cursor is None:
                return out

    want = sorted((layout.to_us(x["ts"]), x["sensor_id"], x["value"]) for x in rs)
    got = walk()
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert sorted(got) == want
    got = walk(order="desc")
    assert [g[:2] for g in got] == [w[:2] for w in reversed(want)]
    assert sorted(got) == want
    # A value range of one sensor.
    got = walk(sensor_id=value_sensor, min_value=2, max_value=4)
    assert sorted(got) == [w for w in want if w[1] == value_sensor and 2 <= w[2] <= 4]

    # Latest ten of a sensor: the ten newest by time, whichever lane holds them.
    for sid in latest_sensors:
        got = [
            (layout.to_us(_parse(p["timestamp"])), p["value"]) for p in queries.latest(db, 10, sid)
        ]
        newest = sorted(((u, v) for u, s, v in want if s == sid), reverse=True)[:10]
        assert [g[0] for g in got] == [n[0] for n in newest]
        # Equal times: which came last is known within a lane only.
        assert set(got) <= {(u, v) for u, s, v in want if s == sid}
        assert len(set(got)) == len(got) == min(10, sum(1 for w in want if w[1] == sid))


def _parse(text: str):
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_retention_deletes_every_lane(gateway: Gateway) -> None:
    rs = [
        _reading(f"s{i % 3}", DAY + timedelta(minutes=m, seconds=s), s, f"k{m}-{s}-{i}", "status")
        for m in range(0, 180, 7)
        for s in range(0, 60, 2)
        for i in range(2)
    ]
    _load(gateway, rs, 2)
    db = gateway.db
    cutoff = layout.to_us(DAY + timedelta(hours=2))
    retention.sweep_raw(db, cutoff)
    retention.sweep_summaries(db, cutoff)
    left = list(db[layout.SAMPLES].find({}, {"b": 1}))
    assert left and all(d["b"] >= cutoff for d in left)
    # Every lane's summaries of the swept hours are gone too.
    old = [d["_id"] for d in db[layout.HOURS].find({}, {"b": 1}) if d["b"] < cutoff]
    # Only the day's summaries are left (the day has hours after the cutoff).
    assert old and {layout.lane_of(i)[0] for i in old} == {layout.all_day_id(layout.to_us(DAY))}
    kept = [x for x in rs if layout.to_us(x["ts"]) >= cutoff]
    assert queries.count_all(db) == len(kept)
    assert sum(queries.status_counts(db, None, None).values()) == sum(
        brute(kept, None, None, None).values()
    )


def _register(uri: str, name: str, lane: int) -> None:
    Writer(pymongo.MongoClient(uri)[name], lane=lane).register_lane()


def test_lanes_registered_by_racing_workers_all_count(gateway: Gateway) -> None:
    """FerretDB may lose one of two racing updates of a document: the highest
    lane must still be recorded."""
    for attempt in range(10):
        name = f"{gateway.cfg.mongodb.database}_r{attempt}"
        procs = [
            Process(target=_register, args=(gateway.cfg.mongodb.uri, name, lane))
            for lane in (3, 1, 2, 0)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        queries._lanes_seen.clear()
        assert queries.known_lanes(gateway.db.client[name]) == 4
