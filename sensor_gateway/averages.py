"""Rolling averages: the one place they are computed.

Averages over a window are sum / count of the stored summaries from the
window's first whole minute to the end of the current one (up to the last
batch the ingester wrote); long windows read hour and day summaries
(:func:`sensor_gateway.queries.window_summaries`). The API's
``/stats/averages``, the dashboard and the MQTT stats topic
(:mod:`sensor_gateway.stats_topic`) all call :func:`averages`;
:func:`as_message` gives the topic's row shape.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.database import Database

from sensor_gateway import layout
from sensor_gateway.config import parse_window
from sensor_gateway.layout import US_MINUTE
from sensor_gateway.model import iso
from sensor_gateway.queries import Reader, as_reader, window_summaries


@dataclass(frozen=True)
class Window:
    label: str
    seconds: int

    @property
    def column(self) -> str:
        """Seed-compatible column name: 1m → avg_1min, 30s → avg_30s, 1h → avg_1h."""
        label = self.label[:-1] + "min" if self.label.endswith("m") else self.label
        return f"avg_{label}"

    @property
    def count_column(self) -> str:
        return "count_" + self.column.removeprefix("avg_")

    def since(self, now: datetime) -> datetime:
        """Start of the window: whole minutes, the current (partial) one included."""
        return (now - timedelta(seconds=self.seconds)).replace(second=0, microsecond=0)


def parse_windows(labels: Iterable[str]) -> list[Window]:
    """Raises ConfigError (a ValueError) naming the bad label."""
    out: list[Window] = []
    for label in labels:
        label = label.strip()
        w = Window(label, parse_window(label))
        if w not in out:
            out.append(w)
    return out


def _finish(acc: dict[str, Any] | None, since: datetime) -> dict[str, Any]:
    n = acc["n"] if acc else 0
    return {
        "since": iso(since),
        "count": n,
        "avg": (acc["sum"] / n) if n else None,
        "min": acc["min"] if n else None,
        "max": acc["max"] if n else None,
    }


def averages(
    db: Database | Reader,
    windows: list[Window],
    sensor_id: str | None = None,
    kind: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Averages over each window, sum / count of the summaries from the window's
    first whole minute to the end of the current one (up to the last batch the
    ingester wrote); long windows read hour and day summaries."""
    r = as_reader(db)
    now = now or datetime.now(UTC)
    end = layout.floor(layout.to_us(now), US_MINUTE) + US_MINUTE
    per_window: dict[str, dict[str, dict[str, Any]]] = {}
    for w in windows:
        got = window_summaries(r, layout.to_us(w.since(now)), end, sensor_id)
        if kind is not None:
            got = {sid: s for sid, s in got.items() if s.get("kind") == kind}
        per_window[w.label] = got
    sids = sorted({sid for got in per_window.values() for sid in got})
    return {
        "generated_at": iso(now),
        "windows": [w.label for w in windows],
        "sensor_id": sensor_id,
        "kind": kind,
        "overall": {
            w.label: _finish(layout.total(per_window[w.label].values()), w.since(now))
            for w in windows
        },
        "sensors": {
            sid: {
                "kind": next(
                    per_window[w.label][sid]["kind"] for w in windows if sid in per_window[w.label]
                ),
                "windows": {
                    w.label: _finish(per_window[w.label].get(sid), w.since(now)) for w in windows
                },
            }
            for sid in sids
        },
    }


def as_message(
    db: Database | Reader, windows: list[Window], now: datetime | None = None
) -> dict[str, Any]:
    """The averages as the stats topic publishes them, one row per sensor:

    {"timestamp": "…Z", "windows": ["1m", "5m", "30m"],
     "sensors": [{"sensor_id": "temp-1", "kind": "temperature",
                  "avg_1min": 21.3, "avg_5min": 21.1, "avg_30min": 20.9,
                  "count_1min": 60, "count_5min": 300, "count_30min": 1800}, …]}
    """
    now = now or datetime.now(UTC)
    result = averages(db, windows, now=now)
    rows = []
    for sensor_id, s in result["sensors"].items():
        row: dict[str, Any] = {"sensor_id": sensor_id, "kind": s["kind"]}
        for w in windows:
            row[w.column] = s["windows"][w.label]["avg"]
        for w in windows:
            row[w.count_column] = s["windows"][w.label]["count"]
        rows.append(row)
    return {"timestamp": iso(now), "windows": [w.label for w in windows], "sensors": rows}
