"""Status counts over any window are exact: they equal a count over the raw
readings at microsecond precision, whatever the window's ends cut (a minute, a
bucket's segment, an hour, a day), however the summaries are combined (days,
day minus hours, hours, minutes, part-minutes), and at the ends of time."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from sensor_gateway import layout, queries, storage
from sensor_gateway.api import create_app
from sensor_gateway.writer import Writer
from tests.helpers import Gateway

DAY = datetime(2024, 2, 29, tzinfo=UTC)  # a past day, wholly inside the data
FIRST = DAY - timedelta(hours=2)
LAST = DAY + timedelta(days=1, hours=3)
# Minutes with a reading every second and bursts (several segments, out of order).
DENSE = [DAY + timedelta(hours=h, minutes=m) for h, m in ((0, 0), (5, 17), (23, 59))] + [
    FIRST,
    LAST - timedelta(minutes=1),
]
STATUS_SENSORS = ("st.a", "st-b", "st-c")
MIN_DT, MAX_DT = datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999999, UTC)


def _reading(sid: str, ts: datetime, value: float, key: str, kind: str) -> dict:
    return {"sensor_id": sid, "kind": kind, "value": float(value), "ts": ts, "_id": key}


def dataset(rng: random.Random) -> list[dict]:
    rs: list[dict] = []
    t = FIRST
    i = 0
    while t < LAST:  # every sensor, every 4 minutes and some µs
        for sid in STATUS_SENSORS:
            rs.append(
                _reading(sid, t + timedelta(microseconds=i % 997), i % 7, f"{sid}-{i}", "status")
            )
        rs.append(_reading("temp", t, 20.5, f"temp-{i}", "temperature"))
        t += timedelta(minutes=4, seconds=rng.randrange(60))
        i += 1
    for m in DENSE:
        for sec in range(60):
            for sid in STATUS_SENSORS:
                per = 3 if sec in (10, 31) else 1  # bursts: a minute of ~66 readings
                for j in range(per):
                    us = sec * 1_000_000 + rng.randrange(1_000_000)
                    value = rng.choice([0, 1, 2, 3, 4, 5, 6, 6, 7, 2.5])  # 7, 2.5: no status
                    key = f"{sid}-{m:%H%M}-{sec}-{j}"
                    rs.append(_reading(sid, m + timedelta(microseconds=us), value, key, "status"))
            rs.append(
                _reading("temp", m + timedelta(seconds=sec), 3, f"t-{m:%H%M}-{sec}", "temperature")
            )
    return rs


def brute(rs: list[dict], start: datetime | None, end: datetime | None, sid: str | None) -> dict:
    counts = dict.fromkeys(queries.STATUSES, 0)
    for r in rs:
        if sid is not None and r["sensor_id"] != sid:
            continue
        if (start is None or r["ts"] >= start) and (end is None or r["ts"] <= end):
            st = layout.status_of(r["kind"], r["value"])
            if st is not None:
                counts[st] += 1
    return counts


@pytest.fixture
def loaded(gateway: Gateway) -> list[dict]:
    storage.prepare(gateway.db, gateway.cfg)
    rng = random.Random(9)
    rs = dataset(rng)
    # Arrival order is not time order: batches of shuffled slices.
    order = list(rs)
    for i in range(0, len(order), 250):
        chunk = order[i : i + 250]
        rng.shuffle(chunk)
        order[i : i + 250] = chunk
    w = Writer(gateway.db)
    for i in range(0, len(order), 211):
        w.write([dict(r) for r in order[i : i + 211]])
    return rs


def windows(rs: list[dict], rng: random.Random) -> list[tuple[datetime | None, datetime | None]]:
    times = sorted(r["ts"] for r in rs)
    us = timedelta(microseconds=1)
    out: list[tuple[datetime | None, datetime | None]] = [
        (None, None),
        (MIN_DT, MAX_DT),
        (MIN_DT, DAY),
        (DAY, MAX_DT),
        (None, DAY + timedelta(hours=5, minutes=17, seconds=30)),
        (DAY + timedelta(hours=5, minutes=17, seconds=30), None),
        (DAY, DAY + timedelta(days=1)),  # a whole day, both ends inclusive
        (DAY, DAY + timedelta(days=1) - us),
        (DAY + timedelta(hours=1), DAY + timedelta(hours=23)),  # most of a day: day − hours
        (DAY + timedelta(hours=1, seconds=1), DAY + timedelta(hours=22, minutes=59, seconds=59)),
        (FIRST - timedelta(days=400), LAST + timedelta(days=400)),
        (times[0], times[0]),
        (times[-1], times[-1]),
        (times[0] - us, times[0] - us),
        (times[-1] + us, MAX_DT),
    ]
    for m in DENSE:  # ends inside a minute, inside a segment, at a reading, next to one
        inside = [t for t in times if m <= t < m + timedelta(minutes=1)]
        for _ in range(6):
            a, b = sorted(rng.sample(inside, 2))
            out += [(a, b), (a + us, b - us), (a, a), (m, b), (a, m + timedelta(minutes=1))]
            out.append((a, a + timedelta(hours=24, microseconds=rng.randrange(10**6))))
            out.append((a - timedelta(hours=23, minutes=rng.randrange(60)), b))
    for _ in range(60):  # anywhere, any length up to 3 days
        a = rng.choice(times) + timedelta(microseconds=rng.randrange(-5, 5))
        b = a + timedelta(seconds=rng.randrange(3 * 86400), microseconds=rng.randrange(10**6))
        out.append((a, b))
    return out


def test_status_counts_equal_a_count_of_the_raw_readings(gateway: Gateway, loaded) -> None:
    rs = loaded
    rng = random.Random(4)
    for start, end in windows(rs, rng):
        want = brute(rs, start, end, None)
        assert queries.status_counts(gateway.db, start, end) == want, (start, end)
        # With the day summaries not yet settled (no day minus hours): the same.
        now_us = layout.to_us(DAY + timedelta(hours=12))
        got = queries.status_counts(gateway.db, start, end, now_us=now_us)
        assert got == want, (start, end, "unsettled")
    for sid in (*STATUS_SENSORS, "temp", "nope"):
        for start, end in rng.sample(windows(rs, rng), 25):
            got = queries.status_counts(gateway.db, start, end, sensor_id=sid)
            assert got == brute(rs, start, end, sid), (sid, start, end)
    assert sum(brute(rs, None, None, None).values()) > 1000


def test_most_of_a_past_day_reads_its_day_summary(gateway: Gateway, loaded) -> None:
    start, end = DAY + timedelta(hours=1, seconds=1), DAY + timedelta(hours=23, seconds=1)
    r = queries.Reader(gateway.db)
    assert queries.status_counts(r, start, end) == brute(loaded, start, end, None)
    got = {_id for coll, _id in r._memo if coll == layout.HOURS}
    assert layout.all_day_id(layout.to_us(DAY)) in got
    # The day, the hours holding the ends and the one hour before: not 21 hours.
    assert len(got) <= 5, sorted(got)


def test_the_api_counts_at_the_ends_of_time(gateway: Gateway, loaded) -> None:
    client = create_app(gateway.cfg).test_client()
    total = brute(loaded, None, None, None)
    for start, end in (
        ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"),
        ("0001-01-01T00:00:00", None),
        (None, "9999-12-31T23:59:59.999999+00:00"),
    ):
        q = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
        resp = client.get("/stats/status-counts", query_string=q)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert resp.get_json() == total
    edge = DENSE[1] + timedelta(seconds=30, microseconds=500_000)
    resp = client.get(
        "/stats/status-counts",
        query_string={"start": "0001-01-01T00:00:00Z", "end": edge.isoformat()},
    )
    assert resp.get_json() == brute(loaded, None, edge, None)


def test_an_end_inside_a_minute_reads_only_the_documents_it_falls_in(gateway: Gateway) -> None:
    """At 1 Hz a minute's 60 readings fill two documents; an end inside the minute
    reads the one holding its time, and a minute written before the summaries
    said which document holds what (no ``sg``) is still counted exactly."""
    storage.prepare(gateway.db, gateway.cfg)
    sids = [f"s{i}" for i in range(4)]
    rs = [
        _reading(
            sid,
            DAY + timedelta(seconds=s, microseconds=250_000),
            (s + i) % 7,
            f"{sid}{s}",
            "status",
        )
        for s in range(180)
        for i, sid in enumerate(sids)
    ]
    rs += [_reading("t", DAY + timedelta(seconds=s), 1, f"t{s}", "temperature") for s in range(180)]
    w = Writer(gateway.db)
    for i in range(0, len(rs), 40):
        w.write([dict(r) for r in rs[i : i + 40]])
    for start, end in (
        (DAY + timedelta(seconds=10), DAY + timedelta(seconds=100)),
        (
            DAY + timedelta(seconds=45, microseconds=1),
            DAY + timedelta(seconds=150, microseconds=250_000),
        ),
        (
            DAY + timedelta(seconds=29, microseconds=250_001),
            DAY + timedelta(seconds=90, microseconds=250_000),
        ),
    ):
        r = queries.Reader(gateway.db)
        assert queries.status_counts(r, start, end) == brute(rs, start, end, None)
        buckets = [_id for coll, _id in r._memo if coll == layout.SAMPLES]
        assert len(buckets) <= 2 * len(sids), buckets  # one per sensor at each end
        for sid in sids[:2]:
            r = queries.Reader(gateway.db)
            assert queries.status_counts(r, start, end, sid) == brute(rs, start, end, sid)
            assert len([c for c, _ in r._memo if c == layout.SAMPLES]) <= 2
    # The same minutes as an older writer left them: every document is read.
    for coll, path in ((layout.MINUTES, "by"), (layout.HOURS, "m")):
        for doc in gateway.db[coll].find():
            packed = {}
            for name, s in layout.summaries(doc, path).items():
                assert s.get("sg") is None or len(s["sg"]) == s["g"]
                s.pop("sg", None)
                packed[f"{path}.{name}"] = layout.pack(s)
            if packed:
                gateway.db[coll].update_one({"_id": doc["_id"]}, {"$set": packed})
    start, end = DAY + timedelta(seconds=45), DAY + timedelta(seconds=150)
    r = queries.Reader(gateway.db)
    assert queries.status_counts(r, start, end) == brute(rs, start, end, None)
    assert len([c for c, _ in r._memo if c == layout.SAMPLES]) == 4 * len(sids)
