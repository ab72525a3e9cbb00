"""The read side of the layout (:mod:`sensor_gateway.layout`): readings in a
time or value range with keyset paging, latest readings, status counts, and
the summaries of any window (:func:`window_summaries`, which
:mod:`sensor_gateway.averages` averages). Every document is fetched by a
computed `_id`.

Cost: a query reads the documents of the window it asks for, never the
history; a :class:`Reader` counts them and stops a request that would read
more than its bound (:class:`TooCostly`, a 422 naming ``api.max_documents``),
and gives each call a server-side time limit. Filters are built here from
typed values (sensor ids checked against their pattern, aware datetimes,
finite floats), never from request dictionaries: no query operator can reach
the database from outside.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo.database import Database

from sensor_gateway import layout
from sensor_gateway.layout import US_DAY, US_HOUR, US_MINUTE, Sample

STATUSES = layout.STATUSES


class BadCursor(ValueError):
    """The ``cursor`` parameter is not one this API issued."""


class TooCostly(Exception):
    """A request would read more documents than its bound allows."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this request would read more than {limit} documents (api.max_documents); "
            "narrow it with start and end"
        )
        self.limit = limit


# Lookups of one request run on a few threads at once (pymongo's client is
# thread-safe and pools connections); FerretDB serves them on every core.
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prefetch")


class Reader:
    """Fetches documents by `_id`, counting them against ``max_documents``."""

    def __init__(
        self,
        db: Database,
        max_documents: int | None = None,
        time_limit_ms: int | None = None,
        memo: bool = True,
        lanes: int | None = None,
    ) -> None:
        self.db = db
        self.max_documents = max_documents
        self.time_limit_ms = time_limit_ms
        # Keep what was read (a request reads some documents for several pieces);
        # off for streams of everything (exports), which would keep it all.
        self.memo = memo
        self.read = 0
        self._memo: dict[tuple[str, str], dict[str, Any] | None] = {}
        # Ingest workers write lanes of their own (layout.in_lane): a summary or
        # registry document is read from every lane and merged.
        self.lanes = lanes if lanes is not None else known_lanes(db)

    def _count(self, n: int = 1) -> None:
        self.read += n
        if self.max_documents is not None and self.read > self.max_documents:
            raise TooCostly(self.max_documents)

    def _find(self, coll: str, _id: str) -> dict[str, Any] | None:
        kw = {"max_time_ms": self.time_limit_ms} if self.time_limit_ms else {}
        return self.db[coll].find_one({"_id": _id}, **kw)

    def _physical(self, key: tuple[str, str]) -> list[tuple[str, str]]:
        """The documents one logical document is read from: one per lane."""
        coll, _id = key
        if self.lanes == 1 or coll not in LANED:
            return [key]
        return [(coll, layout.in_lane(_id, lane)) for lane in range(self.lanes)]

    def _fetch(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        self._count(len(keys))
        if len(keys) == 1:
            return {keys[0]: self._find(*keys[0])}
        return dict(zip(keys, _POOL.map(lambda k: self._find(*k), keys), strict=True))

    def _resolve(self, key: tuple[str, str], got: dict[tuple[str, str], Any]) -> Any:
        parts = self._physical(key)
        if len(parts) == 1:
            return got[parts[0]]
        return layout.merge(key[0], [(lane, got[p]) for lane, p in enumerate(parts)])

    def get(self, coll: str, _id: str) -> dict[str, Any] | None:
        key = (coll, _id)
        if key in self._memo:
            return self._memo[key]
        doc = self._resolve(key, self._fetch(self._physical(key)))
        if self.memo:
            self._memo[key] = doc
        return doc

    def prefetch(self, wanted: Iterable[tuple[str, str]]) -> None:
        """Fetch these (collection, `_id`) at once, in parallel: each lookup is a
        round trip whose time is mostly the server's, and a request often knows
        the next dozens it needs. What it fetched is then read by :meth:`get`."""
        if not self.memo:
            return
        logical = [k for k in dict.fromkeys(wanted) if k not in self._memo]
        physical = [p for k in logical for p in self._physical(k)]
        if len(physical) < 2:
            return
        got = self._fetch(physical)
        for k in logical:
            self._memo[k] = self._resolve(k, got)

    def sensors(self) -> dict[str, dict[str, Any]]:
        """The sensor registry: one small document per sensor (and lane)."""
        if ("", "sensors") not in self._memo:
            kw = {"max_time_ms": self.time_limit_ms} if self.time_limit_ms else {}
            by_lane: dict[str, list[tuple[int, dict[str, Any] | None]]] = {}
            for d in self.db[layout.SENSORS].find({}, **kw):
                sid, lane = layout.lane_of(d["_id"])
                by_lane.setdefault(sid, []).append((lane, d))
            docs = {sid: layout.merge(layout.SENSORS, ds) for sid, ds in by_lane.items()}
            self.read += 1
            self._memo[("", "sensors")] = docs  # type: ignore[assignment]
        return self._memo[("", "sensors")]  # type: ignore[return-value]

    def sensor(self, sensor_id: str) -> dict[str, Any] | None:
        return self.get(layout.SENSORS, str(sensor_id))


# Collections whose documents each ingest worker writes in a lane of its own.
LANED = (layout.HOURS, layout.MINUTES, layout.SENSORS)
# How long a process trusts the lane count it read: a worker records its lane
# before it takes its first message, so this bounds how long after a new
# worker's start its readings may be missing from reads.
LANES_TTL_S = 1.0
_lanes_seen: dict[tuple[int, str], tuple[float, int]] = {}


def known_lanes(db: Database) -> int:
    """How many lanes ingest workers have ever written: one more than the highest
    lane marker (:func:`layout.lane_marker`)."""
    key = (id(db.client), db.name)
    now = time.monotonic()
    seen = _lanes_seen.get(key)
    if seen is None or now - seen[0] > LANES_TTL_S:
        markers = [layout.lane_marker(n) for n in range(1, layout.MAX_LANES)]
        found = db[layout.META].find({"_id": {"$in": markers}}, {"_id": 1})
        lanes = [layout.lane_of(d["_id"])[1] for d in found]
        seen = _lanes_seen[key] = (now, max(lanes, default=0) + 1)
    return seen[1]


def as_reader(db: Database | Reader) -> Reader:
    return db if isinstance(db, Reader) else Reader(db)


def kinds_of(sensor_doc: dict[str, Any]) -> set[str]:
    return {layout.sensor_of(k) for k in sensor_doc.get("kinds") or {}}


# -- cursors -------------------------------------------------------------------------


def encode_cursor(key: tuple[int, str, int], order: str) -> str:
    """Opaque keyset position: (time in µs, sensor, arrival position) of a page's last."""
    us, sid, pos = key
    raw = json.dumps({"t": us, "s": sid, "p": pos, "d": order}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(text: str, order: str) -> tuple[int, str, int]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        obj = json.loads(raw)
        us, sid, pos, d = obj["t"], obj["s"], obj["p"], obj["d"]
        for v in (us, pos):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError("t")
        if not isinstance(sid, str):
            raise TypeError("s")
        layout.from_us(us)  # in datetime's range
    except (binascii.Error, ValueError, TypeError, KeyError, OverflowError, AttributeError) as exc:
        raise BadCursor("not a cursor issued by this API") from exc
    if d != order:
        raise BadCursor(f"cursor was issued for order={d}, not order={order}")
    return us, sid, pos


# -- readings ------------------------------------------------------------------------


@dataclass
class ReadingQuery:
    sensor_id: str | None = None
    kind: str | None = None
    # Compatibility ``Sensor_Name``: matches a sensor id or a kind.
    name: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    end_inclusive: bool = False
    min_value: float | None = None
    max_value: float | None = None
    limit: int = 100
    cursor: str | None = None
    order: str = "asc"  # by (time, sensor, arrival)

    def after(self) -> tuple[int, str, int] | None:
        """The cursor's position; raises BadCursor for one this API did not issue."""
        return decode_cursor(self.cursor, self.order) if self.cursor else None

    def matches(self, s: Sample) -> bool:
        if self.kind is not None and s.kind != self.kind:
            return False
        if self.name is not None and s.sensor_id != self.name and s.kind != self.name:
            return False
        if self.min_value is not None and s.value < self.min_value:
            return False
        return not (self.max_value is not None and s.value > self.max_value)

    def may_hold(self, summary: dict[str, Any]) -> bool:
        """Whether a minute with this summary can hold a match (its min/max overlap)."""
        if not summary or not summary.get("n"):
            return False
        lo, hi = summary.get("min"), summary.get("max")
        if self.min_value is not None and hi is not None and hi < self.min_value:
            return False
        return not (self.max_value is not None and lo is not None and lo > self.max_value)


def _sensor_set(r: Reader, q: ReadingQuery) -> dict[str, dict[str, Any]]:
    """The sensors a query can match, with their registry documents."""
    if q.sensor_id is not None:
        doc = r.sensor(q.sensor_id)
        return {q.sensor_id: doc} if doc else {}
    if q.kind is None and q.name is None:
        return r.sensors()
    out = {}
    for sid, doc in r.sensors().items():
        kinds = kinds_of(doc)
        if (q.kind is None or q.kind in kinds) and (
            q.name is None or sid == q.name or q.name in kinds
        ):
            out[sid] = doc
    return out


def _bounds(q: ReadingQuery, sensors: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """Half-open [lo, hi) in µs, clamped to the hours that hold readings."""
    first = min(d.get("first", 0) for d in sensors.values())
    last = max(d.get("last", 0) for d in sensors.values()) + US_HOUR
    lo = layout.to_us(q.start) if q.start is not None else first
    hi = last
    if q.end is not None:
        hi = layout.to_us(q.end) + (1 if q.end_inclusive else 0)
    return max(lo, first), min(hi, last)


# Minutes of buckets fetched at once while walking a range (a 1,000-reading page
# of a 1 Hz sensor spans 17).
PREFETCH_MINUTES = 8


def iter_samples(db: Database | Reader, q: ReadingQuery) -> Iterator[Sample]:
    """Every reading ``q`` matches, in its order, after its cursor, fetching
    only the hours and minutes that hold readings of the sensors asked for."""
    r = as_reader(db)
    after = q.after()
    sensors = _sensor_set(r, q)
    if not sensors:
        return
    lo, hi = _bounds(q, sensors)
    desc = q.order == "desc"
    if after is not None:
        if desc:
            hi = min(hi, after[0] + 1)
        else:
            lo = max(lo, after[0])
    if lo >= hi:
        return
    hours = range(layout.floor(lo, US_HOUR), hi, US_HOUR)
    # Minutes fetched at once: as many as a page of a 1 Hz sensor spans, at most 8.
    ahead = max(1, min(PREFETCH_MINUTES, q.limit // 60 + 1))
    packed_before = layout.to_us(datetime.now(UTC)) - layout.PACK_SETTLE_US - US_HOUR
    vmin = q.min_value if q.min_value is not None else -math.inf
    vmax = q.max_value if q.max_value is not None else math.inf

    def keep(us: int, value: float) -> bool:
        return lo <= us < hi and vmin <= value <= vmax

    for hour in reversed(hours) if desc else hours:
        present = [
            sid for sid, d in sensors.items() if d.get("first", 0) <= hour <= d.get("last", -1)
        ]
        if len(present) > 1:
            # One document says which sensors have readings in this hour.
            by = (r.get(layout.HOURS, layout.all_hour_id(hour)) or {}).get("by") or {}  # names
            present = [sid for sid in present if layout.field_name(sid) in by]
        by_minute: dict[int, list[tuple[str, list[str]]]] = {}
        # Readings of settled hours from their packs (compaction.py), by minute.
        from_packs: dict[int, list[Sample]] = {}
        ids = [layout.sensor_hour_id(sid, hour) for sid in present]
        packable = hour < packed_before
        colls = (layout.HOURS, layout.PACKS) if packable else (layout.HOURS,)
        r.prefetch((c, i) for i in ids for c in colls)
        for sid, hid in zip(present, ids, strict=True):
            m = layout.summaries(r.get(layout.HOURS, hid), "m")
            pack = r.get(layout.PACKS, hid) if packable else None
            if layout.pack_holds(pack, m):
                for s in layout.samples_of_pack(pack, keep):
                    from_packs.setdefault(layout.floor(s.us, US_MINUTE), []).append(s)
                continue
            for mi, summary in m.items():
                minute = hour + int(mi) * US_MINUTE
                if minute + US_MINUTE > lo and minute < hi and q.may_hold(summary):
                    bids = layout.segment_ids(sid, minute, summary)
                    by_minute.setdefault(minute, []).append((sid, bids))
        minutes = sorted(set(by_minute) | set(from_packs), reverse=desc)
        for i, minute in enumerate(minutes):
            if i % ahead == 0:
                r.prefetch(
                    (layout.SAMPLES, bid)
                    for m in minutes[i : i + ahead]
                    for _, bids in by_minute.get(m, ())
                    for bid in bids
                )
            found: list[Sample] = list(from_packs.get(minute, ()))
            for _, bids in by_minute.get(minute, ()):
                found.extend(s for s in minute_samples(r, bids) if lo <= s.us < hi)
            found = [s for s in found if q.matches(s)]
            found.sort(key=Sample.order_key, reverse=desc)
            for s in found:
                if after is not None:
                    k = s.order_key()
                    if (k <= after) if not desc else (k >= after):
                        continue
                yield s


def minute_samples(r: Reader, ids: list[str]) -> list[Sample]:
    """A sensor's readings of one minute, from its documents (layout.segment_ids)."""
    out: list[Sample] = []
    for bid in ids:
        doc = r.get(layout.SAMPLES, bid)
        if doc:
            out.extend(layout.samples_of(doc))
    return out


def find_readings(
    db: Database | Reader, q: ReadingQuery
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of readings in (time, sensor, arrival) order and the next page's cursor."""
    page = list(itertools.islice(iter_samples(db, q), q.limit + 1))
    next_cursor = None
    if len(page) > q.limit:
        page = page[: q.limit]
        next_cursor = encode_cursor(page[-1].order_key(), q.order)
    return [s.public() for s in page], next_cursor


def latest_samples(
    db: Database | Reader,
    n: int,
    sensor_id: str | None = None,
    kind: str | None = None,
    name: str | None = None,
) -> list[Sample]:
    q = ReadingQuery(sensor_id=sensor_id, kind=kind, name=name, order="desc", limit=n)
    return list(itertools.islice(iter_samples(db, q), n))


def latest(
    db: Database | Reader,
    n: int,
    sensor_id: str | None = None,
    kind: str | None = None,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """The newest ``n`` readings, newest first (equal times: last received first)."""
    return [s.public() for s in latest_samples(db, n, sensor_id, kind, name)]


def latest_docs(db: Database | Reader, n: int, sensor_id: str | None = None) -> list[dict]:
    """As :func:`latest`, shaped like the documents the writer hands to Redis."""
    return [s.as_doc() for s in latest_samples(db, n, sensor_id)]


def sensor_exists(db: Database | Reader, sensor_id: str) -> bool:
    return as_reader(db).sensor(sensor_id) is not None


def kind_exists(db: Database | Reader, kind: str) -> bool:
    return any(kind in kinds_of(d) for d in as_reader(db).sensors().values())


def sensor_ids(db: Database | Reader) -> list[str]:
    return sorted(as_reader(db).sensors())


# -- windows of summaries ------------------------------------------------------------


def pieces(lo: int, hi: int) -> Iterator[tuple[str, int, int]]:
    """Cut [lo, hi) into the coarsest pieces the summaries hold: ``raw`` (part of a
    minute: read its buckets), ``minute``, ``hour`` and ``day``."""
    t = lo
    while t < hi:
        for unit, name in ((US_DAY, "day"), (US_HOUR, "hour"), (US_MINUTE, "minute")):
            if t % unit == 0 and t + unit <= hi:
                yield name, t, t + unit
                t += unit
                break
        else:
            end = min(hi, layout.floor(t, US_MINUTE) + US_MINUTE)
            yield "raw", t, end
            t = end


def _summaries(r: Reader, name: str, start: int, end: int, sensor_id: str | None) -> dict:
    """{sensor_id: summary} of one piece, every sensor or one."""
    if name == "minute":
        if sensor_id is not None:
            doc = r.get(layout.HOURS, layout.sensor_hour_id(sensor_id, start)) or {}
            s = layout.summaries(doc, "m").get(layout.minute_index(start))
            return {sensor_id: s} if s else {}
        by = layout.summaries(r.get(layout.MINUTES, layout.minute_doc_id(start)), "by")
    elif name == "hour":
        if sensor_id is not None:
            doc = r.get(layout.HOURS, layout.sensor_hour_id(sensor_id, start)) or {}
            s = layout.total(layout.summaries(doc, "m").values())
            return {sensor_id: s} if s["n"] else {}
        by = layout.summaries(r.get(layout.HOURS, layout.all_hour_id(start)), "by")
    else:
        by = layout.summaries(r.get(layout.HOURS, layout.all_day_id(start)), "by")
    out = {layout.sensor_of(k): v for k, v in by.items()}
    if sensor_id is not None:
        return {sensor_id: out[sensor_id]} if sensor_id in out else {}
    return out


def _raw_summaries(r: Reader, start: int, end: int, sensor_id: str | None) -> dict:
    """{sensor_id: summary} of part of a minute, from its buckets."""
    minute = layout.floor(start, US_MINUTE)
    if sensor_id is not None:
        doc = r.get(layout.HOURS, layout.sensor_hour_id(sensor_id, minute)) or {}
        summary = layout.summaries(doc, "m").get(layout.minute_index(minute))
        sids = [(sensor_id, layout.segment_ids(sensor_id, minute, summary))] if summary else []
    else:
        by = layout.summaries(r.get(layout.MINUTES, layout.minute_doc_id(minute)), "by")
        sids = [
            (layout.sensor_of(k), layout.segment_ids(layout.sensor_of(k), minute, v))
            for k, v in by.items()
        ]
    out = {}
    r.prefetch((layout.SAMPLES, bid) for _, ids in sids for bid in ids)
    for sid, ids in sids:
        acc = layout.summary()
        for s in minute_samples(r, ids):
            if start <= s.us < end:
                layout.add_sample(acc, s.kind, s.value)
        if acc["n"]:
            out[sid] = acc
    return out


def _piece_docs(lo: int, hi: int, sensor_id: str | None) -> Iterator[tuple[str, str]]:
    """The summary documents :func:`window_summaries` reads for [lo, hi)."""
    for name, start, _ in pieces(lo, hi):
        if name == "day":
            yield layout.HOURS, layout.all_day_id(start)
        elif sensor_id is not None:
            yield layout.HOURS, layout.sensor_hour_id(sensor_id, start)
        elif name == "hour":
            yield layout.HOURS, layout.all_hour_id(start)
        else:
            yield layout.MINUTES, layout.minute_doc_id(start)


def window_summaries(
    r: Reader, lo: int, hi: int, sensor_id: str | None = None
) -> dict[str, dict[str, Any]]:
    """{sensor_id: summary} of [lo, hi), from the coarsest summaries that fit."""
    acc: dict[str, dict[str, Any]] = {}
    r.prefetch(_piece_docs(lo, hi, sensor_id))
    for name, start, end in pieces(lo, hi):
        part = (
            _raw_summaries(r, start, end, sensor_id)
            if name == "raw"
            else _summaries(r, name, start, end, sensor_id)
        )
        for sid, s in part.items():
            layout.add_summary(acc.setdefault(sid, layout.summary()), s)
    return acc


def _clamp(r: Reader, lo: int | None, hi: int | None, sensor_id: str | None) -> tuple[int, int]:
    """A window's missing ends become the first and last hour holding readings."""
    regs = [r.sensor(sensor_id)] if sensor_id is not None else list(r.sensors().values())
    regs = [d for d in regs if d]
    if not regs:
        return 0, 0
    first = min(d.get("first", 0) for d in regs)
    last = max(d.get("last", 0) for d in regs) + US_HOUR
    return max(first, lo if lo is not None else first), min(last, hi if hi is not None else last)


# -- status counts -------------------------------------------------------------------

# A window over every sensor at most this long is cut into pieces without reading
# the registry first: what it reads is bounded by its length (at most a few dozen
# summary documents), and the registry's clamp would change nothing but the
# reads of documents that are not there. Longer or open windows are clamped.
UNCLAMPED_US = 2 * US_DAY
# A day's summary stands in for most of its hours (the day's count minus those of
# the hours outside the window) only once nothing can still be writing to it:
# read in parallel, a day and an hour written by the same batch could come from
# two moments. Past days are not written to (a late reading is the exception,
# counted by whichever summary has it).
SETTLED_US = 2 * US_HOUR


def _status_total(doc: dict[str, Any] | None) -> dict[str, int]:
    """Status counts of every sensor together, from an all-sensor hour or day summary."""
    acc: dict[str, int] = {}
    for s in layout.summaries(doc, "by").values():
        layout.add_counts(acc, s.get("st"))
    return acc


def _edge_plan(
    r: Reader, start: int, end: int, sensor_id: str | None
) -> tuple[dict[str, int], list[str]]:
    """Status counts of part of a minute, [start, end): what the minute summaries
    answer, and the buckets (`_id`s) that must be read for the
    rest. A summary's ``sg`` says which of the minute's documents hold status
    readings and when: a document wholly inside counts as its summary says, one
    wholly outside not at all, and only one the window's end falls in is read.
    Without ``sg`` (one document, or a minute written before it) every document
    of a sensor that sent statuses is read."""
    minute = layout.floor(start, US_MINUTE)
    if sensor_id is not None:
        doc = r.get(layout.HOURS, layout.sensor_hour_id(sensor_id, minute))
        summary = layout.summaries(doc, "m").get(layout.minute_index(minute))
        by = [(sensor_id, summary)] if summary else []
    else:
        doc = r.get(layout.MINUTES, layout.minute_doc_id(minute))
        by = [(layout.sensor_of(k), v) for k, v in layout.summaries(doc, "by").items()]
    known: dict[str, int] = {}
    to_read: list[str] = []
    for sid, summary in by:
        if not summary.get("st"):
            continue
        ids = layout.segment_ids(sid, minute, summary)
        sg = summary.get("sg")
        if not sg or len(sg) != len(ids):
            to_read += ids
            continue
        for bid, e in zip(ids, sg, strict=True):
            if e is None:
                continue
            first, last, counts = minute + e[0], minute + e[1], e[2]
            if start <= first and last < end:
                layout.add_counts(known, counts)
            elif not (last < start or first >= end):
                to_read.append(bid)
    return known, to_read


def _edges(
    r: Reader, plan: list[tuple[str, int, int]], sensor_id: str | None
) -> list[tuple[int, int, dict[str, int], list[str]]]:
    """The part-minutes of a plan: (start, end, what their summaries answer, the
    buckets still to read), with those buckets fetched in one parallel round."""
    edges = [(s, e, *_edge_plan(r, s, e, sensor_id)) for name, s, e in plan if name == "raw"]
    r.prefetch((layout.SAMPLES, bid) for *_, todo in edges for bid in todo)
    return edges


def _edge_count(
    r: Reader, start: int, end: int, buckets: list[str], counts: dict[str, int]
) -> None:
    """Add the status readings in [start, end) of these buckets to ``counts``."""
    for bid in buckets:
        doc = r.get(layout.SAMPLES, bid)
        for smp in layout.samples_of(doc) if doc else ():
            if start <= smp.us < end:
                st = layout.status_of(smp.kind, smp.value)
                if st is not None:
                    counts[st] = counts.get(st, 0) + 1


def status_counts(
    db: Database | Reader,
    start: datetime | None,
    end: datetime | None,
    sensor_id: str | None = None,
    now_us: int | None = None,
) -> dict[str, int]:
    """Count of each status 0–6 with ``start <= ts <= end``; zeros included.

    Every sensor: whole days from the day summary, whole hours from the
    all-sensor hour summaries (or, for most of a past day, the day's summary
    minus its hours outside the window, when that reads fewer documents), whole
    minutes from the per-minute counts of the hour's summary, and the part-minutes
    at the ends from their minute summaries and the buckets the ends fall in
    (:func:`_edge_plan`). Two rounds of parallel reads: every summary, then every
    bucket.
    """
    r = as_reader(db)
    lo = layout.to_us(start) if start is not None else None
    hi = layout.to_us(end) + 1 if end is not None else None
    if sensor_id is not None:
        lo, hi = _clamp(r, lo, hi, sensor_id)
        return _sensor_status_counts(r, lo, hi, sensor_id)
    if lo is None or hi is None or hi - lo > UNCLAMPED_US:
        lo, hi = _clamp(r, lo, hi, None)
    if now_us is None:
        now_us = layout.to_us(datetime.now(UTC))
    plan = list(pieces(lo, hi))

    def hour_doc(us: int) -> tuple[str, str]:
        return layout.HOURS, layout.all_hour_id(layout.floor(us, US_HOUR))

    wanted: dict[tuple[str, str], None] = {}
    full_hours: dict[int, list[int]] = {}  # day -> its hours wholly inside the window
    for name, s, _ in plan:
        if name == "raw":
            wanted[(layout.MINUTES, layout.minute_doc_id(s))] = None
        elif name == "day":
            wanted[(layout.HOURS, layout.all_day_id(s))] = None
        elif name == "hour":
            full_hours.setdefault(layout.floor(s, US_DAY), []).append(s)
        else:
            wanted[hour_doc(s)] = None
    # day -> the hours of that day outside the window, whose counts it subtracts
    by_day: dict[int, list[int]] = {}
    for day, hours in full_hours.items():
        inside = set(hours)
        outside = [h for h in range(day, day + US_DAY, US_HOUR) if h not in inside]
        extra = [h for h in outside if hour_doc(h) not in wanted]
        if day + US_DAY + SETTLED_US <= now_us and 1 + len(extra) < len(hours):
            by_day[day] = outside
            wanted[(layout.HOURS, layout.all_day_id(day))] = None
            for h in outside:
                wanted[hour_doc(h)] = None
        else:
            for h in hours:
                wanted[hour_doc(h)] = None
    r.prefetch(wanted)
    # The part-minutes: what their summaries answer, then their buckets, of both
    # ends at once.
    edges = _edges(r, plan, None)

    counts = dict.fromkeys(STATUSES, 0)

    for name, s, _ in plan:
        if name == "minute":
            # Every sensor's status counts of a minute, inside its hour's document.
            doc = r.get(*hour_doc(s))
            layout.add_counts(counts, layout.summaries(doc, "ms").get(layout.minute_index(s)))
        elif name == "day":
            layout.add_counts(counts, _status_total(r.get(layout.HOURS, layout.all_day_id(s))))
        elif name == "hour" and layout.floor(s, US_DAY) not in by_day:
            layout.add_counts(counts, _status_total(r.get(*hour_doc(s))))
    for s, e, known, todo in edges:
        layout.add_counts(counts, known)
        _edge_count(r, s, e, todo, counts)
    for day, outside in by_day.items():
        layout.add_counts(counts, _status_total(r.get(layout.HOURS, layout.all_day_id(day))))
        for h in outside:
            layout.add_counts(counts, _status_total(r.get(*hour_doc(h))), -1)
    return counts


def _sensor_status_counts(r: Reader, lo: int, hi: int, sensor_id: str) -> dict[str, int]:
    """Status counts of one sensor in [lo, hi), from its hour summaries and buckets."""
    counts = dict.fromkeys(STATUSES, 0)
    r.prefetch(_piece_docs(lo, hi, sensor_id))
    plan = list(pieces(lo, hi))
    edges = _edges(r, plan, sensor_id)
    for name, start, end in plan:
        if name != "raw":
            for summary in _summaries(r, name, start, end, sensor_id).values():
                layout.add_counts(counts, summary.get("st"))
    for start, end, known, todo in edges:
        layout.add_counts(counts, known)
        _edge_count(r, start, end, todo, counts)
    return counts


def minute_series(
    db: Database | Reader, sensor_id: str, start: datetime, end: datetime
) -> Iterator[tuple[datetime, dict[str, Any]]]:
    """(minute, summary) of one sensor's minutes in [start, end), oldest first."""
    r = as_reader(db)
    lo, hi = layout.to_us(start), layout.to_us(end)
    for hour in range(layout.floor(lo, US_HOUR), hi, US_HOUR):
        doc = r.get(layout.HOURS, layout.sensor_hour_id(sensor_id, hour)) or {}
        for mi, s in sorted(layout.summaries(doc, "m").items()):
            minute = hour + int(mi) * US_MINUTE
            if lo <= minute + US_MINUTE and minute < hi:
                yield layout.from_us(minute), s


def count_all(db: Database | Reader) -> int:
    """Readings stored, from the summaries (days, hours, minutes: never the readings)."""
    r = as_reader(db)
    lo, hi = _clamp(r, None, None, None)
    return sum(s["n"] for s in window_summaries(r, lo, hi).values())
