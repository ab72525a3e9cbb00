"""The write side of the layout (:mod:`sensor_gateway.layout`): a batch of
readings appended to their minute buckets exactly once, and every summary
above them set to its recomputed value.

Exactly once, without transactions (FerretDB has none):
- every reading carries a key (its dedupe key, or one made up when it arrives,
  so a retried batch is still recognised); a bucket lists the keys it holds,
  and a reading whose key is already in its bucket is not appended again;
- one bucket's append is one single-document update (a segment the batch opens:
  one insert), which both engines apply atomically: after a crash a bucket holds
  a batch's readings wholly or not at all;
- summaries are *set* to values recomputed from the buckets, so writing them
  again heals whatever a crash between two writes left behind, and a
  redelivered batch writes them again even when none of its readings is new.
The writer knows what it wrote (a bounded cache of the buckets and summaries
it touches) and reads a document by `_id` only the first time it needs it;
after any failed write it forgets what the write touched and reads it again.
This needs one writer per lane at a time: each ingest worker writes documents
of its own (``lane``, see :func:`layout.in_lane`), which readers merge; see
docs/ARCHITECTURE.md, "Delivery guarantee" and "Ingest workers".
"""

from __future__ import annotations

import collections
import contextlib
import secrets
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pymongo import InsertOne, UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

from sensor_gateway import layout
from sensor_gateway.layout import MinuteState

# How far back a redelivered reading without its own timestamp is recognised.
RECEIPT_LOOKBACK_US = 15 * layout.US_MINUTE
# FerretDB 1.24 (SQLite) holds one pooled SQLite connection per update of an existing
# document until the whole command ends: a command updating 100 existing documents
# exhausts its pool of 100 and hangs the server for every client (a batch touching
# 100 sensors does), and well before that they slow each other down (measured: 40
# updates take 4.5 ms each, 10-20 cost what one does). So each command carries at
# most this many updates.
MAX_UPDATES_PER_COMMAND = 16


def _write_errors(exc: BaseException) -> list[dict[str, Any]]:
    return (exc.details.get("writeErrors") or []) if isinstance(exc, BulkWriteError) else []


def _why(exc: BaseException) -> str:
    if isinstance(exc, BulkWriteError):
        errs = _write_errors(exc) or [{}]
        return f"{errs[0].get('errmsg', exc)} (code {errs[0].get('code')})"
    return f"{type(exc).__name__}: {exc}"


def new_key() -> str:
    """The key of a reading that has no dedupe key of its own (see payload.py)."""
    return "~" + secrets.token_hex(12)


# The buckets' append runs here while the summaries are written.
_WRITE_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="append")


class _Lru(collections.OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.evicted = False

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
            self.evicted = True


@dataclass
class Written:
    new: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    # (reading, reason) for each reading the server refused (with its bucket).
    refused: list[tuple[dict[str, Any], str]] = field(default_factory=list)


class Writer:
    """Appends readings (``payload.parse`` documents) to the layout.

    ``fresh_after_us``: documents of times after this cannot exist yet (nothing
    else writes, and nothing before this writer could have accepted readings
    that far ahead), so a cache miss there needs no read. ``assume_empty`` says
    the same of every time (bulk loads into a new database).
    """

    def __init__(
        self,
        db: Database,
        fresh_after_us: int | None = None,
        assume_empty: bool = False,
        cache_size: int = 4096,
        lane: int = 0,
    ) -> None:
        self.db = db
        self.lane = lane
        self.fresh_after_us = fresh_after_us
        self.assume_empty = assume_empty
        self.buckets: _Lru = _Lru(cache_size)  # minute bucket id -> MinuteState
        # id -> {name: summary}: minutes of a sensor-hour; sensors of a minute,
        # of an hour (all sensors) and hours of a day (per sensor, from hour docs).
        self.summaries: _Lru = _Lru(cache_size)
        self.registered: _Lru = _Lru(cache_size)  # (sensor, hour, kind) already in `sensors`

    def register_lane(self) -> None:
        """Record this writer's lane before its first write, so that readers merge
        it (:func:`layout.lane_marker`)."""
        if self.lane:
            with contextlib.suppress(DuplicateKeyError):
                self.db[layout.META].insert_one({"_id": layout.lane_marker(self.lane)})

    # -- what is there ---------------------------------------------------------------

    def _fresh(self, start_us: int) -> bool:
        if self.buckets.evicted or self.summaries.evicted:
            # What it wrote may have left the cache: from now on it reads.
            self.assume_empty, self.fresh_after_us = False, None
        return self.assume_empty or (
            self.fresh_after_us is not None and start_us > self.fresh_after_us
        )

    def _bucket(self, bid: str, start_us: int) -> MinuteState:
        st = self.buckets.get(bid)
        if st is None:
            st = MinuteState.of([] if self._fresh(start_us) else self._read_minute(bid))
            self.buckets.put(bid, st)
        return st

    def _read_minute(self, bid: str) -> list[dict[str, Any]]:
        """A minute's documents, until one is missing (the summary's count may lag)."""
        docs: list[dict[str, Any]] = []
        while doc := self.db[layout.SAMPLES].find_one(
            {"_id": f"{bid}/{len(docs)}" if docs else bid}
        ):
            docs.append(doc)
        return docs

    def _summary_doc(self, coll: str, sid: str, start_us: int, path: str) -> dict[str, Any]:
        """The summaries under ``path`` (``m`` or ``by``) of one summary document."""
        got = self.summaries.get(sid)
        if got is None:
            doc = None if self._fresh(start_us) else self.db[coll].find_one({"_id": sid})
            got = layout.summaries(doc, path)
            self.summaries.put(sid, got)
        return got

    def _day_hours(self, sensor_field: str, day_us: int) -> dict[str, Any]:
        """Hour summaries of one sensor over one day, from the all-sensor hour docs."""
        out: dict[str, Any] = {}
        for h in range(24):
            hour_us = day_us + h * layout.US_HOUR
            hid = layout.all_hour_id(hour_us, self.lane)
            s = self._summary_doc(layout.HOURS, hid, hour_us, "by")
            if sensor_field in s:
                out[layout.hour_index(hour_us)] = s[sensor_field]
        return out

    # -- the write -------------------------------------------------------------------

    def write(self, readings: Iterable[dict[str, Any]]) -> Written:
        """Append new readings; return them (with ``_id`` set to their public id).

        Raises for an error not about particular buckets (the caller holds the
        batch and retries: nothing is lost, nothing doubled).
        """
        groups: dict[str, list[dict[str, Any]]] = {}
        try:
            for r in readings:
                us = layout.to_us(r["ts"])
                r["_us"] = us
                r.setdefault("key", r.get("_id") or new_key())
                if r.get("ts_from_receipt") and (seen := self._seen_recently(r)) is not None:
                    # Goes to the minute that holds it: a duplicate there, and that
                    # minute's summaries are set again (the crash may have come
                    # between its bucket's write and theirs).
                    r["_us"] = seen
                    us = seen
                groups.setdefault(layout.bucket_id(r["sensor_id"], us, 0, self.lane), []).append(r)
            return self._write(groups)
        except BaseException:
            self.forget(groups)
            raise

    def _seen_recently(self, r: dict[str, Any]) -> int | None:
        """A reading timed on arrival gets a new time when the broker redelivers
        it, so its bucket may differ: look for its key in the sensor's buckets of
        the last RECEIPT_LOOKBACK_US (a crash and restart take less). Returns the
        start of the minute holding it."""
        if r["key"].startswith("~"):
            return None  # a key made up on arrival is never seen again
        end = layout.floor(r["_us"], layout.US_MINUTE)
        start = end - RECEIPT_LOOKBACK_US
        for minute in range(end, start - 1, -layout.US_MINUTE):
            bid = layout.bucket_id(r["sensor_id"], minute, 0, self.lane)
            if r["key"] in self._bucket(bid, minute).keys:
                return minute
        return None

    def forget(self, ids: Iterable[str]) -> None:
        """Drop what the cache knows of these buckets and every summary above them."""
        for bid in ids:
            self.buckets.pop(bid, None)
        # Summaries are shared between buckets: forget them all, they are re-read.
        self.summaries.clear()
        self.registered.clear()

    def _write(self, groups: dict[str, list[dict[str, Any]]]) -> Written:
        out = Written()
        sample_ops: list[InsertOne | UpdateOne] = []
        op_bucket: list[str] = []
        appended: dict[str, list[dict[str, Any]]] = {}
        new_state: dict[str, MinuteState] = {}
        for bid, rs in groups.items():
            sid = rs[0]["sensor_id"]
            base = layout.floor(rs[0]["_us"], layout.US_MINUTE)
            st = self._bucket(bid, base).copy()
            existing = st.segments
            # The documents this batch appends to: segment -> what to push, and
            # its (kind, unit) list (``a``) if that grows.
            pushes: dict[int, dict[str, Any]] = {}
            new: list[dict[str, Any]] = []
            for r in rs:
                if r["key"] in st.keys:
                    out.duplicates += 1
                    continue
                if st.segments == 0 or st.last_n >= layout.SEGMENT:
                    st.open_segment()
                seg = pushes.setdefault(
                    st.segments - 1,
                    {
                        "fields": {"t": [], "v": [], "k": [], "ai": [], "mi": []},
                        "attrs": st.last_attrs,
                        "grew": False,
                        "offset": st.n - st.last_n,
                    },
                )
                attr = (r["kind"], r.get("unit") or None)
                if attr not in seg["attrs"]:
                    seg["attrs"].append(attr)
                    seg["grew"] = True
                push = seg["fields"]
                st.keys.add(r["key"])
                push["t"].append(r["_us"] - base)
                push["v"].append(r["value"])
                push["k"].append(r["key"])
                push["ai"].append(seg["attrs"].index(attr))
                push["mi"].append(r.get("msg_id"))
                st.count(r["kind"], r["value"], r["_us"] - base)
                r["_pos"] = st.n
                r["_bucket"] = bid
                st.n += 1
                st.last_n += 1
                new.append(r)
            st.finish()
            new_state[bid] = st
            for i, seg in pushes.items():
                _id = layout.bucket_id(sid, base, i, self.lane)
                # Objects, not pairs: FerretDB stores no arrays inside arrays.
                attrs = [{"k": k, "u": u} for k, u in seg["attrs"]]
                head = {"s": sid, "b": base, "o": seg["offset"]}
                if i >= existing:
                    # A segment this batch opens is inserted: one transaction for all
                    # of them, where FerretDB gives each update one of its own.
                    sample_ops.append(InsertOne({"_id": _id, **head, **seg["fields"], "a": attrs}))
                else:
                    update: dict[str, Any] = {
                        "$push": {f: {"$each": vals} for f, vals in seg["fields"].items()},
                        "$setOnInsert": head,
                    }
                    if seg["grew"]:
                        update["$set"] = {"a": attrs}
                    sample_ops.append(UpdateOne({"_id": _id}, update, upsert=True))
                op_bucket.append(bid)
            if new:
                appended[bid] = new

        # Buckets and summaries go to the server at once: summaries are set, not
        # incremented, so whichever lands first, a retry or the redelivery after a
        # crash sets them right again.
        appending = _WRITE_POOL.submit(self._bulk, layout.SAMPLES, sample_ops, op_bucket)
        try:
            self._write_summaries(groups, new_state)
        finally:
            refused_buckets = appending.result()
        if refused_buckets:
            for bid, reason in refused_buckets.items():
                for r in appended.pop(bid, ()):
                    out.refused.append((r, reason))
                # Summarise again what the bucket really holds, without the refused.
                new_state[bid] = MinuteState.of(self._read_minute(bid))
                self.buckets.put(bid, new_state[bid])
            self._write_summaries(groups, new_state)
        for bid, st in new_state.items():
            self.buckets.put(bid, st)
        for rs in appended.values():
            for r in rs:
                r["_id"] = layout.reading_id(r["_bucket"], r["_pos"])
                out.new.append(r)
        return out

    def _applied(self, coll: str, op: InsertOne | UpdateOne) -> bool:
        """Whether an append (or a segment's insert) is in: its first key is there."""
        if isinstance(op, InsertOne):
            _filter, keys = {"_id": op._doc["_id"]}, op._doc["k"]
        else:
            _filter, keys = op._filter, op._doc["$push"]["k"]["$each"]
        doc = self.db[coll].find_one(_filter, {"k": 1})
        return bool(doc) and isinstance(doc.get("k"), list) and keys[0] in doc["k"]

    def _bulk(
        self, coll: str, ops: list[InsertOne | UpdateOne], names: list[str]
    ) -> dict[str, str]:
        """Run ops unordered (updates a few per command, inserts all in one);
        returns {name: reason} for documents the server (or BSON) refused. Any
        other error is raised."""
        from sensor_gateway.storage import DOCUMENT, DUPLICATE_KEY, classify

        named = list(zip(ops, names, strict=True))
        updates = [x for x in named if isinstance(x[0], UpdateOne)]
        inserts = [x for x in named if isinstance(x[0], InsertOne)]
        chunks = [
            updates[i : i + MAX_UPDATES_PER_COMMAND]
            for i in range(0, len(updates), MAX_UPDATES_PER_COMMAND)
        ]
        refused: dict[str, str] = {}
        for chunk in [*chunks, inserts] if inserts else chunks:
            try:
                self.db[coll].bulk_write([op for op, _ in chunk], ordered=False)
            except Exception as exc:
                if classify(exc) != DOCUMENT:
                    raise
                # Which document? FerretDB's bulk replies name the wrong one (and
                # skip the rest), so each is tried alone, unless it went through:
                # an append carries its readings' keys, found in the document.
                for op, name in chunk:
                    if self._applied(coll, op):
                        continue
                    try:
                        self.db[coll].bulk_write([op], ordered=False)
                    except Exception as one:  # noqa: BLE001 - classified right here
                        codes = {e.get("code") for e in _write_errors(one)}
                        if classify(one) != DOCUMENT or DUPLICATE_KEY in codes:
                            # A segment that exists without these readings: what this
                            # writer knew is stale; the batch is held, read again, retried.
                            raise
                        refused[name] = f"MongoDB refused the reading's bucket: {_why(one)}"
        return refused

    def _write_summaries(
        self, groups: dict[str, list[dict[str, Any]]], states: dict[str, MinuteState]
    ) -> None:
        hour_ops: dict[str, dict[str, Any]] = {}
        minute_ops: dict[str, dict[str, Any]] = {}
        sensor_ops: dict[str, dict[str, Any]] = {}

        def op(ops: dict[str, dict[str, Any]], _id: str, start_us: int) -> dict[str, Any]:
            return ops.setdefault(_id, {"$set": {}, "$setOnInsert": {"b": start_us}})

        touched_hours: dict[tuple[str, int], None] = {}
        register: list[tuple[str, int, str]] = []
        for bid, st in states.items():
            rs = groups[bid]
            sid = rs[0]["sensor_id"]
            fname = layout.field_name(sid)
            minute = layout.floor(rs[0]["_us"], layout.US_MINUTE)
            hour = layout.floor(minute, layout.US_HOUR)
            mi = layout.minute_index(minute)
            s = {k: v for k, v in st.summary.items() if v is not None or k != "kind"}
            # The sensor's hour: this minute's summary.
            shid = layout.sensor_hour_id(sid, hour, self.lane)
            minutes = self._summary_doc(layout.HOURS, shid, hour, "m")
            minutes[mi] = s
            o = op(hour_ops, shid, hour)
            o["$set"][f"m.{mi}"] = layout.pack(s)
            o["$setOnInsert"]["s"] = sid
            # Every sensor's minute.
            mid = layout.minute_doc_id(minute, self.lane)
            self._summary_doc(layout.MINUTES, mid, minute, "by")[fname] = s
            op(minute_ops, mid, minute)["$set"][f"by.{fname}"] = layout.pack(s)
            touched_hours[(sid, hour)] = None
            for kind in {r["kind"] for r in rs}:
                if (sid, hour, kind) in self.registered:
                    continue
                register.append((sid, hour, kind))
                so = sensor_ops.setdefault(
                    layout.in_lane(sid, self.lane), {"$set": {}, "$min": {}, "$max": {}}
                )
                so["$set"][f"kinds.{layout.field_name(kind)}"] = True
                so["$min"]["first"] = min(so["$min"].get("first", hour), hour)
                so["$max"]["last"] = max(so["$max"].get("last", hour), hour)
        # Every sensor's hour and day, from the sensor-hour summaries above.
        for sid, hour in touched_hours:
            fname = layout.field_name(sid)
            minutes = self.summaries[layout.sensor_hour_id(sid, hour, self.lane)]
            hid = layout.all_hour_id(hour, self.lane)
            hs = self._summary_doc(layout.HOURS, hid, hour, "by")
            hs[fname] = layout.total(minutes.values())
            o = op(hour_ops, hid, hour)
            o["$set"][f"by.{fname}"] = layout.pack(hs[fname])
            day = layout.floor(hour, layout.US_DAY)
            hours = self._day_hours(fname, day)
            day_op = op(hour_ops, layout.all_day_id(day, self.lane), day)
            day_op["$set"][f"by.{fname}"] = layout.pack(layout.total(hours.values()))
        # Status counts of each minute over all sensors, inside the all-sensor hour.
        for mid in minute_ops:
            minute = int(minute_ops[mid]["$setOnInsert"]["b"])
            per_sensor = self.summaries[mid]
            counts = layout.total(per_sensor.values()).get("st")
            if counts:
                hid = layout.all_hour_id(layout.floor(minute, layout.US_HOUR), self.lane)
                op(hour_ops, hid, layout.floor(minute, layout.US_HOUR))["$set"][
                    f"ms.{layout.minute_index(minute)}"
                ] = layout.pack_counts(counts)
        self._bulk_updates(layout.HOURS, hour_ops)
        self._bulk_updates(layout.MINUTES, minute_ops)
        self._bulk_updates(layout.SENSORS, sensor_ops)
        for item in register:
            self.registered.put(item, True)

    def _bulk_updates(self, coll: str, ops: dict[str, dict[str, Any]]) -> None:
        if not ops:
            return
        updates = [
            UpdateOne({"_id": _id}, {k: v for k, v in u.items() if v}, upsert=True)
            for _id, u in ops.items()
        ]
        for at in range(0, len(updates), MAX_UPDATES_PER_COMMAND):
            chunk = updates[at : at + MAX_UPDATES_PER_COMMAND]
            try:
                self.db[coll].bulk_write(chunk, ordered=False)
            except KeyError:
                # pymongo cannot read FerretDB's reply to a bulk with a write error
                # (no nModified); one at a time, the error itself is raised.
                for op in chunk:
                    self.db[coll].bulk_write([op], ordered=False)
