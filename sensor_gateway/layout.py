"""The storage layout: which document holds what, and the `_id` of each.

Every read fetches documents by `_id`s computed from a sensor id and a time,
the one access path FerretDB 1.24 serves fast (``notes/ferretdb-reads.md``);
MongoDB serves the same lookups from its built-in `_id` index. A query's cost
grows with the window it asks for, never with the history stored.

Collections and `_id`s (``<sid>`` is a sensor id, which never holds ``|`` or ``*``):

- ``samples``  ``<sid>|YYYYMMDDHHMM``  one sensor's readings of one UTC minute, in
  parallel arrays in arrival order (the bucket pattern): ``t`` µs after the
  minute ``b`` (µs since 1970), ``v`` value, ``k`` key, ``ai`` index into ``a``
  (the distinct kind and unit), ``mi`` msg_id. A minute's readings beyond
  SEGMENT go on in ``<sid>|YYYYMMDDHHMM/1``, ``/2``… (``o``: position of the
  first; the minute's summary says how many documents, ``g``). Minutes, not hours:
  every batch rewrites the buckets it touches, so a small bucket keeps the
  bytes written per reading low (SD cards wear by bytes written).
- ``minutes``  ``*|YYYYMMDDHHMM``      every sensor's summary of one minute (``by``).
- ``hours``    ``<sid>|YYYYMMDDHH``    one sensor's summary of each minute of an hour
  (``m``; also which minutes hold readings); ``*|YYYYMMDDHH`` every sensor's
  summary of an hour (``by``) and the status counts of each of its minutes
  (``ms``); ``*|YYYYMMDD`` every sensor's summary of a day (``by``).
- ``sensors``  ``<sid>``               kinds seen, first and last hour with readings.
- ``packs``    ``<sid>|YYYYMMDDHH``    a settled hour of one sensor's readings in one
  document (``d``: one JSON string), a copy for reads (:mod:`sensor_gateway.compaction`).
- ``meta``     ``layout``, ``retention``, ``migration``, ``lane@<n>``, ``compaction``.

Ingest worker n > 0 writes the same documents with ``@<n>`` in their `_id`
(:func:`in_lane`): one writer per document; reads merge the lanes (:func:`merge`).

A summary is ``{"n", "sum", "min", "max", "kind", "st", "g"}``; ``st`` counts
each status 0–6 among readings of kind ``status``, ``g`` is how many documents
hold the minute. A minute held by several documents and holding statuses also
has ``sg``: for each document, the first and last time (µs into the minute) and
the counts of its status readings (``None`` without any), so that status counts
over part of a minute read only the document(s) the window's end falls in.
Stored packed into one string (:func:`pack`): FerretDB's cost of reading a
document grows with the values in it. Summaries are always *set* to a
value recomputed from what they summarise, never incremented, so writing one
twice (a batch retried, a reading redelivered after a crash) changes nothing:
aggregates count every reading once. ``samples`` and ``minutes`` are the raw
tier (``ingest.retention_days``); ``hours`` the summary tier
(``ingest.summary_retention_days``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

VERSION = 2

SAMPLES = "samples"
MINUTES = "minutes"
HOURS = "hours"
SENSORS = "sensors"
PACKS = "packs"
META = "meta"
REJECTED = "rejected"
# Collections read by `_id` (FerretDB needs an SQL index on each, see ferretdb.py).
BY_ID = (SAMPLES, MINUTES, HOURS, SENSORS, PACKS, META)
# The one-document-per-reading layout of version 1, read by `sensor-gateway migrate`.
FLAT_READINGS = "readings"
FLAT_ROLLUPS = "rollups_minute"

ALL = "*"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US_MINUTE = 60_000_000
US_HOUR = 60 * US_MINUTE
US_DAY = 24 * US_HOUR
STATUSES = tuple(str(s) for s in range(7))
# Readings per ``samples`` document: every write rewrites the documents it appends
# to, so a bound on their size bounds the bytes written per reading, however fast
# a sensor sends.
SEGMENT = 30
# A reading's position in the keyset order is lane * this + its position in its
# lane's minute (far more than a sensor can send in a minute).
LANE_POSITIONS = 10_000_000


# -- time ---------------------------------------------------------------------------


def to_us(dt: datetime) -> int:
    """Microseconds since 1970 (negative before), exact for years 1–9999."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    d = dt - EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def floor(us: int, unit: int) -> int:
    return us - us % unit


def minute_key(us: int) -> str:
    return _minute_key(floor(us, US_MINUTE))


@functools.lru_cache(maxsize=4096)
def _minute_key(minute_us: int) -> str:
    # Every reading's bucket id needs it; the minutes of a batch are few.
    return from_us(minute_us).strftime("%Y%m%d%H%M").zfill(12)


def hour_key(us: int) -> str:
    return minute_key(us)[:10]


def day_key(us: int) -> str:
    return minute_key(us)[:8]


# -- ids ----------------------------------------------------------------------------


def in_lane(_id: str, lane: int) -> str:
    """A document's `_id` as ingest worker ``lane`` writes it (lane 0: unchanged).

    Each worker writes documents of its own (``…@<lane>``): FerretDB 1.24 applies
    an update as read-modify-write, so two writers updating one document lose
    each other's changes (measured: half of them). Readers merge the lanes
    (:func:`merge`)."""
    return f"{_id}@{lane}" if lane else _id


# Lanes at most (``ingest.workers``): every read merges them.
MAX_LANES = 16


def lane_marker(lane: int) -> str:
    """The ``meta`` document that records lane ``lane`` (> 0) was ever written.

    One document per lane, inserted, never updated: a counter updated by racing
    workers loses updates in FerretDB (see :func:`in_lane`)."""
    return in_lane("lane", lane)


def lane_of(_id: str) -> tuple[str, int]:
    """(the `_id` in lane 0, the lane) of a summary or registry document's `_id`."""
    base, at, lane = _id.partition("@")
    return (base, int(lane)) if at else (_id, 0)


def bucket_id(sensor_id: str, us: int, segment: int = 0, lane: int = 0) -> str:
    """A sensor's minute; its readings beyond the first SEGMENT go to ``…/1``, ``…/2``."""
    base = in_lane(f"{sensor_id}|{minute_key(us)}", lane)
    return f"{base}/{segment}" if segment else base


def segments(summary: dict[str, Any] | None) -> int:
    """How many documents hold a sensor's minute (its summary's ``g``)."""
    return int((summary or {}).get("g", 1))


def segment_ids(sensor_id: str, minute_us: int, summary: dict[str, Any] | None) -> list[str]:
    """The ``samples`` documents holding a sensor's minute, in the order of the
    summary's ``sg``: each lane's segments (``lg``, set by :func:`merge`), in turn."""
    lanes = (summary or {}).get("lg") or [(0, segments(summary))]
    return [bucket_id(sensor_id, minute_us, i, lane) for lane, g in lanes for i in range(g)]


def sensor_hour_id(sensor_id: str, us: int, lane: int = 0) -> str:
    return in_lane(f"{sensor_id}|{hour_key(us)}", lane)


def minute_doc_id(us: int, lane: int = 0) -> str:
    return in_lane(f"{ALL}|{minute_key(us)}", lane)


def all_hour_id(us: int, lane: int = 0) -> str:
    return in_lane(f"{ALL}|{hour_key(us)}", lane)


def all_day_id(us: int, lane: int = 0) -> str:
    return in_lane(f"{ALL}|{day_key(us)}", lane)


def field_name(sensor_id: str) -> str:
    """A sensor id as a field name: ``.`` would be read as a path."""
    return sensor_id.replace(".", "~")


def sensor_of(name: str) -> str:
    return name.replace("~", ".")


def reading_id(bucket: str, pos: int) -> str:
    """A reading's public id: its minute and arrival position. Zero-padded, so
    that readings of one sensor with equal timestamps sort in arrival order
    wherever ids are compared as text (Redis breaks score ties that way)."""
    return f"{bucket}.{pos:05d}"


def minute_index(us: int) -> str:
    """The key of a minute inside its hour's summary: ``"00"``–``"59"``."""
    return minute_key(us)[10:]


def hour_index(us: int) -> str:
    return minute_key(us)[8:10]


# -- summaries ----------------------------------------------------------------------


# A document's status readings: first and last time (µs after the minute), counts.
SegmentStatuses = tuple[int, int, dict[str, int]]


def summary() -> dict[str, Any]:
    return {"n": 0, "sum": 0.0, "min": None, "max": None, "kind": None}


def status_of(kind: str, value: float) -> str | None:
    if kind == "status" and float(value).is_integer() and 0 <= value <= 6:
        return str(int(value))
    return None


def add_sample(s: dict[str, Any], kind: str, value: float) -> None:
    s["n"] += 1
    s["sum"] += value
    s["min"] = value if s["min"] is None else min(s["min"], value)
    s["max"] = value if s["max"] is None else max(s["max"], value)
    s["kind"] = kind
    st = status_of(kind, value)
    if st is not None:
        counts = s.setdefault("st", {})
        counts[st] = counts.get(st, 0) + 1


def add_summary(acc: dict[str, Any], s: dict[str, Any] | None) -> None:
    if not s or not s.get("n"):
        return
    acc["n"] += int(s["n"])
    acc["sum"] += float(s["sum"])
    for k, pick in (("min", min), ("max", max)):
        if s.get(k) is not None:
            acc[k] = s[k] if acc[k] is None else pick(acc[k], s[k])
    if s.get("kind") is not None:
        acc["kind"] = s["kind"]
    if s.get("st"):
        add_counts(acc.setdefault("st", {}), s["st"])


def add_counts(acc: dict[str, int], counts: dict[str, Any] | None, sign: int = 1) -> None:
    """Status counts added into ``acc`` (``sign=-1``: taken out)."""
    for st, c in (counts or {}).items():
        acc[st] = acc.get(st, 0) + sign * int(c)


def pack(s: dict[str, Any]) -> str:
    """A summary as one short string: FerretDB turns every stored value into BSON
    on each read, so one string costs far less to read than an object of seven.
    A minute's summary may end with its segments' status readings (``sg``)."""
    st = s.get("st")
    counts = ",".join(str(st.get(k, 0)) for k in STATUSES) if st else ""
    text = (
        f"{s['n']}|{s['sum']!r}|{s['min']!r}|{s['max']!r}|{s.get('g', 1)}|"
        f"{s.get('kind') or ''}|{counts}"
    )
    sg = s.get("sg")
    if st and sg and len(sg) > 1:
        text += "|" + ";".join(
            "" if e is None else f"{e[0]},{e[1]},{pack_counts(e[2])}" for e in sg
        )
    return text


def unpack(text: str) -> dict[str, Any]:
    n, total_, lo, hi, g, kind, counts, *rest = text.split("|")
    out: dict[str, Any] = {
        "n": int(n),
        "sum": float(total_),
        "min": float(lo) if lo != "None" else None,
        "max": float(hi) if hi != "None" else None,
        "g": int(g),
        "kind": kind or None,
    }
    if counts:
        out["st"] = unpack_counts(counts)
    if rest:
        out["sg"] = [_unpack_segment(e) for e in rest[0].split(";")]
    return out


def _unpack_segment(text: str) -> SegmentStatuses | None:
    if not text:
        return None
    first, last, counts = text.split(",", 2)
    return (int(first), int(last), unpack_counts(counts))


def pack_counts(counts: dict[str, int]) -> str:
    return ",".join(str(counts.get(k, 0)) for k in STATUSES)


def unpack_counts(text: str) -> dict[str, int]:
    return {k: int(c) for k, c in zip(STATUSES, text.split(","), strict=True) if int(c)}


def summaries(doc: dict[str, Any] | None, path: str) -> dict[str, Any]:
    """The summaries under ``path`` of a summary document, by name (a minute,
    or a sensor as a field name): ``m`` and ``by`` hold packed summaries,
    ``ms`` packed status counts."""
    packed = (doc or {}).get(path) or {}
    if (doc or {}).get(MERGED):
        return packed  # already unpacked by merge()
    if path == "ms":
        return {k: unpack_counts(v) for k, v in packed.items()}
    return {k: unpack(v) for k, v in packed.items()}


# -- lanes ---------------------------------------------------------------------------

# Marks a document merged from several lanes: its summaries are unpacked.
MERGED = "_lanes"


def merge_summaries(parts: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """One summary of a minute (or more) from each lane's: counted together, with
    each lane's document count (``lg``), and the per-document statuses (``sg``)
    in the same order when every lane's are known."""
    acc = total(s for _, s in parts)
    acc["lg"] = [(lane, segments(s)) for lane, s in parts]
    acc["g"] = sum(g for _, g in acc["lg"])
    sg: list[SegmentStatuses | None] = []
    for _, s in parts:
        if s.get("sg") and len(s["sg"]) == segments(s):
            sg.extend(s["sg"])
        elif not s.get("st"):
            sg.extend([None] * segments(s))
        else:
            return acc  # a lane's statuses are in one document, times unknown: read it
    if any(sg) and len(sg) > 1:
        acc["sg"] = sg
    return acc


def merge(coll: str, docs: list[tuple[int, dict[str, Any] | None]]) -> dict[str, Any] | None:
    """One document from the same document of every lane (see :func:`in_lane`)."""
    found = [(lane, d) for lane, d in docs if d]
    if not found:
        return None
    if len(found) == 1 and found[0][0] == 0:
        return found[0][1]
    first = found[0][1]
    out: dict[str, Any] = {**first, "_id": lane_of(first["_id"])[0], MERGED: True}
    if coll == SENSORS:
        out["kinds"] = {k: v for _, d in found for k, v in (d.get("kinds") or {}).items()}
        for key, pick in (("first", min), ("last", max)):
            vals = [d[key] for _, d in found if key in d]
            if vals:
                out[key] = pick(vals)
        return out
    for path in ("m", "by"):
        parts: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for lane, d in found:
            for name, v in summaries(d, path).items():
                parts.setdefault(name, []).append((lane, v))
        out[path] = {name: merge_summaries(p) for name, p in parts.items()}
    counts: dict[str, dict[str, int]] = {}
    for _, d in found:
        for mi, c in summaries(d, "ms").items():
            add_counts(counts.setdefault(mi, {}), c)
    out["ms"] = counts
    return out


def total(summaries: Any) -> dict[str, Any]:
    acc = summary()
    for s in summaries:
        add_summary(acc, s)
    return acc


# -- buckets ------------------------------------------------------------------------


@dataclass
class Sample:
    """One reading inside a bucket, as the read side sees it."""

    sensor_id: str
    us: int
    pos: int
    value: float
    kind: str
    unit: str | None
    msg_id: str | None
    bucket: str
    lane: int = 0

    @property
    def ts(self) -> datetime:
        return from_us(self.us)

    def order_key(self) -> tuple[int, str, int]:
        """Readings sort by time, then sensor, then arrival (within a worker's
        lane; lanes in turn: which of two workers received first is unknown)."""
        return (self.us, self.sensor_id, self.lane * LANE_POSITIONS + self.pos)

    def as_doc(self) -> dict[str, Any]:
        """Shaped like the documents the writer returns (what Redis and the API show)."""
        return {
            "_id": reading_id(self.bucket, self.pos),
            "sensor_id": self.sensor_id,
            "kind": self.kind,
            "value": self.value,
            "ts": self.ts,
            "unit": self.unit,
            "msg_id": self.msg_id,
        }

    def public(self) -> dict[str, Any]:
        from sensor_gateway.model import public

        return public(self.as_doc())


def samples_of(doc: dict[str, Any]) -> list[Sample]:
    """The readings of a ``samples`` document, in arrival order."""
    sid, base, offset = doc["s"], doc["b"], doc.get("o", 0)
    bucket = doc["_id"].partition("/")[0]
    lane = lane_of(bucket)[1]
    attrs = [(a.get("k"), a.get("u")) for a in doc.get("a") or ()]
    mids = doc.get("mi") or []
    out = []
    for i, (t, v, ai) in enumerate(zip(doc["t"], doc["v"], doc["ai"], strict=False)):
        kind, unit = attrs[ai]
        mid = mids[i] if i < len(mids) else None
        out.append(Sample(sid, base + t, offset + i, v, kind, unit, mid, bucket, lane))
    return out


@dataclass
class MinuteState:
    """What the writer must know of a sensor's minute to append to it exactly once."""

    keys: set[str] = field(default_factory=set)
    n: int = 0  # readings in the minute
    last_n: int = 0  # readings in its last document
    # The distinct (kind, unit) of the last document's readings (``a``).
    last_attrs: list[tuple[str, str | None]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=summary)
    # One entry per document: its status readings' first and last offsets and
    # counts (``sg``), None while it has none.
    seg: list[list[Any] | None] = field(default_factory=list)

    @property
    def segments(self) -> int:
        """How many documents hold the minute."""
        return len(self.seg)

    @classmethod
    def of(cls, docs: list[dict[str, Any]]) -> MinuteState:
        st = cls()
        for doc in docs:
            st.open_segment()
            st.keys.update(doc.get("k") or ())
            for smp in samples_of(doc):
                st.count(smp.kind, smp.value, smp.us - doc["b"])
            st.last_n = len(doc.get("t") or ())
            st.n += st.last_n
            st.last_attrs = [(a.get("k"), a.get("u")) for a in doc.get("a") or ()]
        st.finish()
        return st

    def open_segment(self) -> None:
        """The readings that follow go to a new document."""
        self.seg.append(None)
        self.last_n, self.last_attrs = 0, []

    def count(self, kind: str, value: float, offset_us: int) -> None:
        """A reading of the last document, in the summary and its ``sg`` entry."""
        add_sample(self.summary, kind, value)
        status = status_of(kind, value)
        if status is None:
            return
        e = self.seg[-1]
        if e is None:
            e = self.seg[-1] = [offset_us, offset_us, {}]
        e[0], e[1] = min(e[0], offset_us), max(e[1], offset_us)
        e[2][status] = e[2].get(status, 0) + 1

    def finish(self) -> None:
        """Set the summary's document count (``g``) and per-document statuses (``sg``)."""
        self.summary["g"] = max(self.segments, 1)
        self.summary.pop("sg", None)
        if len(self.seg) > 1 and any(self.seg):
            self.summary["sg"] = [None if e is None else (e[0], e[1], dict(e[2])) for e in self.seg]

    def copy(self) -> MinuteState:
        s = dict(self.summary)
        if "st" in s:
            s["st"] = dict(s["st"])
        seg = [None if e is None else [e[0], e[1], dict(e[2])] for e in self.seg]
        return MinuteState(set(self.keys), self.n, self.last_n, list(self.last_attrs), s, seg)


# -- packs ----------------------------------------------------------------------------

# An hour is packed once it ended this long ago (late readings are rare by then;
# one that comes anyway makes reads use the buckets again, see pack_holds).
PACK_SETTLE_US = 2 * US_HOUR


def pack_samples(samples: list[Sample], hour_us: int) -> str:
    """A sensor's readings of one hour as one string (FerretDB reads one value
    far faster than the ~120 documents the hour's buckets are at 1 Hz)."""
    attrs: dict[tuple[str, str | None], int] = {}
    t, v, a, m, p = [], [], [], [], []
    for smp in samples:
        t.append(smp.us - hour_us)
        v.append(smp.value)
        a.append(attrs.setdefault((smp.kind, smp.unit), len(attrs)))
        m.append(smp.msg_id)
        p.append(smp.lane * LANE_POSITIONS + smp.pos)
    data = {"t": t, "v": v, "a": a, "at": [list(k) for k in attrs], "m": m, "p": p}
    return json.dumps(data, separators=(",", ":"))


def samples_of_pack(
    doc: dict[str, Any], keep: Callable[[int, float], bool] | None = None
) -> list[Sample]:
    """A pack's readings, those ``keep(µs, value)`` accepts (a page of a value
    range keeps a few of the hour's thousands: only those are made Samples)."""
    sid, hour = doc["s"], doc["b"]
    d = json.loads(doc["d"])
    attrs = [(k, u) for k, u in d["at"]]
    out = []
    for t, v, ai, mid, lp in zip(d["t"], d["v"], d["a"], d["m"], d["p"], strict=True):
        us = hour + t
        if keep is not None and not keep(us, v):
            continue
        lane, pos = divmod(lp, LANE_POSITIONS)
        kind, unit = attrs[ai]
        out.append(Sample(sid, us, pos, v, kind, unit, mid, bucket_id(sid, us, 0, lane), lane))
    return out


def minute_counts(summaries_m: dict[str, Any]) -> dict[str, int]:
    """Readings per minute of a sensor's hour (``m`` summaries)."""
    return {mi: int(s["n"]) for mi, s in summaries_m.items() if s and s.get("n")}


def pack_holds(pack: dict[str, Any] | None, summaries_m: dict[str, Any]) -> bool:
    """Whether a pack holds exactly what the hour's summaries count, minute by
    minute: a reading written after the pack makes its minute's count differ."""
    return bool(pack) and pack.get("mn") == minute_counts(summaries_m)
