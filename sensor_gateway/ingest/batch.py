"""The batch stage: up to ``ingest.batch_size`` messages, or what arrived within
``ingest.batch_timeout_ms`` of the first. Messages the broker lost in a crash
(:meth:`Receiver.release_stale`) come first."""

from __future__ import annotations

import queue
import time

from sensor_gateway.config import IngestConfig
from sensor_gateway.ingest.receive import Incoming, Receiver


def collect(rx: Receiver, icfg: IngestConfig, idle_timeout: float = 1.0) -> list[Incoming]:
    if rx.backlog:
        n = min(len(rx.backlog), icfg.batch_size)
        return [rx.backlog.popleft() for _ in range(n)]
    try:
        first = rx.queue.get(timeout=idle_timeout)
    except queue.Empty:
        return []
    batch = [first]
    deadline = time.monotonic() + icfg.batch_timeout_ms / 1000
    while len(batch) < icfg.batch_size:
        remaining = deadline - time.monotonic()
        try:
            m = rx.queue.get(timeout=remaining) if remaining > 0 else rx.queue.get_nowait()
            batch.append(m)
        except queue.Empty:
            break
    return batch
