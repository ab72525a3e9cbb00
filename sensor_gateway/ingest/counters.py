"""What the ingester has done so far: shown in `systemctl status`, kept in Redis."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Counters:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    batch_size_last: int = 0
    batch_size_max: int = 0
    lag_ms_last: float = 0.0
    # Most payload bytes held between receipt and acknowledgement (ingest.max_held_mb).
    held_bytes_max: int = 0
    mongo_retries: int = 0
    redis_errors: int = 0
    # Held from an earlier connection and dropped when the broker redelivered them.
    dropped_stale: int = 0
    # Held from an earlier connection and never redelivered (the broker lost them
    # in a crash): written all the same.
    kept_stale: int = 0
    # Arrived while stopping: left unacknowledged in our session for next time.
    left_to_broker: int = 0
    # Rejects the database would not store either (each logged at error).
    rejects_unstored: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def count_batch(self, received: int, stored: int, rejected: int, lag_ms: float) -> None:
        self.received += received
        self.stored += stored
        self.rejected += rejected
        self.batches += 1
        self.batch_size_last = received
        self.batch_size_max = max(self.batch_size_max, received)
        self.lag_ms_last = lag_ms

    def status_line(self, queued: int) -> str:
        return (
            f"stored {self.stored}, rejected {self.rejected}, duplicates {self.duplicates}, "
            f"lag {self.lag_ms_last:.0f} ms, queued {queued}"
        )
