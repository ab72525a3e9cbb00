"""The validate stage: each message becomes a reading or a reject, never an exception.

The payload contract itself is :mod:`sensor_gateway.payload`; this stage applies
it to a batch, drops a reading that comes twice in one batch (a broker
redelivery), and shapes rejects for the ``rejected`` collection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sensor_gateway.ingest.receive import Incoming
from sensor_gateway.logs import TracebackOnce
from sensor_gateway.payload import Limits, Reject, parse

log = logging.getLogger("sensor_gateway.ingest")
log_unexpected = TracebackOnce(log)


@dataclass
class Validated:
    """One batch after validation: each message is one of the three."""

    readings: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    # The same reading twice in one batch (a broker redelivery).
    duplicates: int = 0


def reject_doc(m: Incoming, reason: str, keep_bytes: int) -> dict[str, Any]:
    return {
        "topic": m.topic,
        "payload": m.payload[:keep_bytes].decode("utf-8", errors="replace"),
        "payload_bytes": len(m.payload),
        "reason": reason,
        "received_at": m.received,
    }


def refused_doc(doc: dict[str, Any], reason: str) -> dict[str, Any]:
    """A reading the database refused, kept whole as a reject."""
    return {
        "topic": doc.get("topic", ""),
        "payload": repr({k: v for k, v in doc.items() if k != "received_at"})[:16384],
        "reason": reason,
        "received_at": doc.get("received_at", datetime.now(UTC)),
    }


def validate_batch(batch: list[Incoming], limits: Limits, reject_payload_bytes: int) -> Validated:
    """Pure, and no message can make it raise."""
    out = Validated()
    seen: set[Any] = set()
    for m in batch:
        try:
            doc = parse(m.topic, m.payload, m.received, limits, m.mid)
        except Exception as exc:  # noqa: BLE001 - parse is total; this is the last guard
            log_unexpected(exc, "bug: validating a message on %r raised", m.topic)
            doc = Reject(f"internal error while validating: {type(exc).__name__}")
        if isinstance(doc, Reject):
            out.rejects.append(reject_doc(m, doc.reason, reject_payload_bytes))
        elif "_id" in doc and doc["_id"] in seen:
            out.duplicates += 1
        else:
            if "_id" in doc:
                seen.add(doc["_id"])
            out.readings.append(doc)
    return out
