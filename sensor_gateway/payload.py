"""The reading contract: one MQTT message in, a reading document or a reject out.

:func:`parse` is total: for any topic and any byte string it returns a
document or a :class:`Reject` naming the problem, and never raises. That holds
by construction, not by a catch-all: every conversion that could fail is
checked before it is made (numbers against the float range, timestamps against
the datetime range, text against what BSON can encode), and every reason shows
input through :func:`show`, which cannot fail either. The fuzz tests
(``tests/fuzz``) hold it to that.

The dedupe key (docs/ARCHITECTURE.md, "The dedupe key"):
- the payload has a timestamp: a hash of topic and payload bytes. A broker
  redelivery or a publisher's QoS 1 re-send carries the same bytes and is
  stored once; two devices (other topic or other ``sensor_id``) or a device
  whose counter restarted (other timestamp) never share a key.
- no timestamp but a ``msg_id``: the same hash plus the MQTT packet id, which
  a broker redelivery keeps. A device that restarts its counter and repeats a
  payload byte for byte is told apart by the packet id.
- neither: no key here; the writer makes one on arrival (``~`` and random
  bytes), so a batch it retries itself is stored once, while a broker
  redelivery of such a message is stored again (at least once).
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

# Match with fullmatch(): "$" also matches before a trailing newline, so .match()
# would take "t1\n". The pattern keeps ^/$ for the API's OpenAPI schema.
SENSOR_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
KIND_RE = SENSOR_ID_RE
STATUS_VALUES = range(0, 7)
# A numeric string longer than this is not a sensor reading.
MAX_NUMBER_TEXT = 64
FLOAT_MAX = sys.float_info.max
# JSON nested deeper than this is rejected before decoding: the decoder recurses
# per level and would raise RecursionError (a reading is one flat object).
MAX_DEPTH = 32
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')

_decoder = msgspec.json.Decoder()


@dataclass(slots=True)
class Reject:
    reason: str


@dataclass(slots=True)
class Limits:
    max_payload_bytes: int = 16384
    max_future_skew_s: float = 300.0
    # Per-device credentials: the topic's third level is the sensor's identity
    # and a payload may not claim another (docs/ARCHITECTURE.md, "Device identity").
    topic_identity: bool = False


DEFAULT_LIMITS = Limits()


def show(value: Any, width: int = 40) -> str:
    """A short, safe description of untrusted input for a reject reason."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        # repr() of a huge int can raise (int max str digits); say its size instead.
        if -(10**30) < value < 10**30:
            return repr(value)
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        text = repr(value[:width])
        return text if len(value) <= width else text + "…"
    return f"a {type(value).__name__}"


def _number(value: Any, field: str) -> float | Reject:
    if isinstance(value, bool):
        return Reject(f"{field} must be a number, got a boolean")
    if isinstance(value, float):
        f = value
    elif isinstance(value, int):
        # int vs float comparison is exact in Python; float() of a larger int raises.
        if not -FLOAT_MAX <= value <= FLOAT_MAX:
            return Reject(f"{field} is out of range: {show(value)}")
        f = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text or len(text) > MAX_NUMBER_TEXT:
            return Reject(f"{field} must be a number or a numeric string, got {show(value)}")
        try:
            f = float(text)  # str → float raises only ValueError; overflow gives inf
        except ValueError:
            return Reject(f"{field} must be a number or a numeric string, got {show(value)}")
    else:
        return Reject(f"{field} must be a number, got {show(value)}")
    if not math.isfinite(f):
        return Reject(f"{field} must be finite, got {show(value)}")
    return f


def _text(value: Any, field: str, max_len: int) -> str | Reject:
    """Free text a sensor sends (unit, msg_id): printable, bounded, BSON-encodable."""
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        return Reject(f"{field} must be a string of 1-{max_len} characters, got {show(value)}")
    # Printable excludes control characters and lone surrogates (not UTF-8 encodable).
    if not value.isprintable():
        return Reject(f"{field} has a control or unencodable character: {show(value)}")
    return value


def parse_time(text: Any, field: str = "timestamp") -> datetime | Reject:
    """ISO 8601 → aware UTC datetime (naive times are taken as UTC)."""
    if not isinstance(text, str):
        return Reject(f"{field} must be an ISO 8601 string, got {show(text)}")
    if len(text) > MAX_NUMBER_TEXT:
        return Reject(f"{field} is not ISO 8601: {show(text)}")
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        return Reject(f"{field} is not ISO 8601: {show(text)}")
    offset = dt.utcoffset()
    if not offset:  # naive or UTC, as nearly every sensor sends: nothing to convert
        return dt.replace(tzinfo=UTC)
    local = dt.replace(tzinfo=None)
    # Converting to UTC overflows when the offset crosses year 1 or year 9999.
    if (offset > timedelta(0) and local - datetime.min < offset) or (
        offset < timedelta(0) and datetime.max - local < -offset
    ):
        return Reject(f"{field} {show(text)} is outside years 1-9999 in UTC")
    # Microseconds are kept: readings store time as integer µs (layout.py).
    return (local - offset).replace(tzinfo=UTC)


def _sensor_id(obj: dict[str, Any], levels: list[str], kind: str, limits: Limits) -> str | Reject:
    claimed = obj.get("sensor_id")
    if "sensor_id" in obj and (not isinstance(claimed, str) or not SENSOR_ID_RE.fullmatch(claimed)):
        return Reject(f"sensor_id must be 1-64 characters [A-Za-z0-9_.:-], got {show(claimed)}")
    if len(levels) > 2:
        from_topic = levels[2]
        if not SENSOR_ID_RE.fullmatch(from_topic):
            return Reject(f"topic level sensor_id {show(from_topic)} is not a valid sensor id")
        if limits.topic_identity:
            # The broker's ACL let this publisher write under this topic only.
            if claimed is not None and claimed != from_topic:
                return Reject(
                    f"payload claims sensor_id {claimed!r} on the topic of {from_topic!r}"
                )
            return from_topic
    if claimed is not None:
        return claimed
    return levels[2] if len(levels) > 2 else kind


def _value(obj: dict[str, Any], kind: str) -> float | Reject:
    if "value" in obj:
        value = _number(obj["value"], "value")
    elif "status" in obj:
        raw = obj["status"]
        if isinstance(raw, bool) or not isinstance(raw, int) or raw not in STATUS_VALUES:
            return Reject(f"status must be an integer 0-6, got {show(raw)}")
        value = float(raw)
    else:
        return Reject("no 'value' (or 'status') field")
    if isinstance(value, Reject):
        return value
    if kind == "status" and (not value.is_integer() or int(value) not in STATUS_VALUES):
        return Reject(f"a status value must be an integer 0-6, got {value!r}")
    return value


def too_deep(payload: bytes) -> bool:
    """Whether JSON brackets nest deeper than MAX_DEPTH (strings ignored)."""
    if payload.count(b"[") + payload.count(b"{") <= MAX_DEPTH:
        return False  # the common case, at C speed
    depth = 0
    for ch in _STRINGS.sub(b"", payload):
        if ch in b"[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif ch in b"]}":
            depth -= 1
    return False


def _not_utf8(payload: bytes) -> str | None:
    """Why ``payload`` is not UTF-8 (JSON's encoding, RFC 8259), or None if it is."""
    if payload.isascii():
        return None  # the common case, at C speed
    try:
        payload.decode("utf-8")  # strict: also refuses encoded surrogates and overlongs
    except UnicodeDecodeError as exc:
        return f"{exc.reason} at byte {exc.start}"
    return None


def dedupe_key(topic: str, payload: bytes, packet_id: int | None = None) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(topic.encode("utf-8", "surrogatepass"))
    h.update(b"\0")
    h.update(payload)
    if packet_id is not None:
        h.update(b"\0%d" % packet_id)
    return h.hexdigest()


def parse(
    topic: str,
    payload: bytes,
    now: datetime,
    limits: Limits | None = None,
    packet_id: int = 0,
) -> dict[str, Any] | Reject:
    """Validate one message. ``now`` is the time of receipt (aware, UTC);
    ``packet_id`` is the MQTT packet identifier it arrived with."""
    limits = limits or DEFAULT_LIMITS
    if len(payload) > limits.max_payload_bytes:
        return Reject(f"payload is {len(payload)} bytes, over the {limits.max_payload_bytes} limit")
    if not topic.isprintable():
        return Reject(f"topic has a control or unencodable character: {show(topic)}")
    if too_deep(payload):
        return Reject(f"JSON nested deeper than {MAX_DEPTH} levels")
    if (bad_utf8 := _not_utf8(payload)) is not None:
        # msgspec raises UnicodeDecodeError (not DecodeError) for such bytes in a string.
        return Reject(f"not JSON: payload is not UTF-8 ({bad_utf8})")
    try:
        obj = _decoder.decode(payload)
    except msgspec.DecodeError as exc:  # ValidationError (numbers out of range) is one too
        return Reject(f"not JSON: {exc}")
    if not isinstance(obj, dict):
        return Reject(f"payload must be a JSON object, got {show(obj)}")

    levels = topic.split("/")
    kind = obj.get("kind", levels[1] if len(levels) > 1 else None)
    if kind is None:
        return Reject("no kind: topic has no second level and payload has no 'kind'")
    if not isinstance(kind, str) or not KIND_RE.fullmatch(kind):
        return Reject(f"kind must be 1-64 characters [A-Za-z0-9_.:-], got {show(kind)}")

    sensor_id = _sensor_id(obj, levels, kind, limits)
    if isinstance(sensor_id, Reject):
        return sensor_id
    value = _value(obj, kind)
    if isinstance(value, Reject):
        return value

    msg_id = obj.get("msg_id")
    if msg_id is not None and isinstance(msg_id := _text(msg_id, "msg_id", 64), Reject):
        return msg_id
    unit = obj.get("unit")
    if unit is not None and unit != "" and isinstance(unit := _text(unit, "unit", 32), Reject):
        return unit

    doc: dict[str, Any] = {"sensor_id": sensor_id, "kind": kind, "value": value, "topic": topic}
    if obj.get("timestamp") is not None:
        ts = parse_time(obj["timestamp"])
        if isinstance(ts, Reject):
            return ts
        if ts - now > timedelta(seconds=limits.max_future_skew_s):
            return Reject(
                f"timestamp {show(obj['timestamp'])} is more than "
                f"{limits.max_future_skew_s:g}s in the future"
            )
        doc["ts"] = ts
        doc["_id"] = dedupe_key(topic, payload)
    else:
        doc["ts"] = now
        doc["ts_from_receipt"] = True
        if msg_id is not None:
            doc["_id"] = dedupe_key(topic, payload, packet_id)
    if unit:
        doc["unit"] = unit
    if msg_id is not None:
        doc["msg_id"] = msg_id
    doc["received_at"] = now
    return doc
