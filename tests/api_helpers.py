"""Helpers of the API tests: readings with explicit times through the real pipeline."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from devstack.stack import Stack
from tests.helpers import Gateway, wait_for


def api_gateway(
    stack: Stack,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    tokens: bool = False,
    **api: Any,
) -> Iterator[Gateway]:
    """A module's gateway for API tests: its own database, a running ingester, and
    (with ``tokens``) a token file of its own."""
    g = Gateway(stack, tmp_path_factory.mktemp(name), uuid.uuid4().hex[:8])
    if tokens:
        api["tokens_file"] = str(g.tmp / "api-tokens.json")
    if api:
        g.set(api=api)
    g.start_ingester()
    yield g
    g.close()


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def publish_readings(gw: Gateway, readings: Iterable[dict[str, Any]], kind: str = "") -> list[str]:
    """Publish payloads (each with sensor_id, value, timestamp, optional kind) and wait
    until all are stored. Returns their msg_ids."""
    client = gw.raw_publisher()
    ids: list[str] = []
    try:
        infos = []
        for r in readings:
            r = dict(r)
            if isinstance(r.get("timestamp"), datetime):
                r["timestamp"] = iso(r["timestamp"])
            r.setdefault("msg_id", uuid.uuid4().hex)
            ids.append(r["msg_id"])
            topic = f"sensors/{r.pop('kind', kind or 'temperature')}"
            infos.append(client.publish(topic, json.dumps(r), qos=1))
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    want = set(ids)
    wait_for(
        lambda: want <= {r["msg_id"] for r in gw.readings()},
        30,
        0.2,
        f"{len(want)} stored readings",
    )
    return ids


def series(
    sensor_id: str, start: datetime, n: int, step_s: float = 1.0, value0: float = 0.0
) -> list[dict[str, Any]]:
    return [
        {
            "sensor_id": sensor_id,
            "value": value0 + i,
            "timestamp": start + timedelta(seconds=i * step_s),
            "msg_id": f"{sensor_id}-{i}",
        }
        for i in range(n)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> requests.Response:
    def ok() -> requests.Response | None:
        try:
            r = requests.get(url, timeout=2)
            return r if r.status_code == 200 else None
        except requests.RequestException:
            return None

    return wait_for(ok, timeout, 0.2, f"GET {url}")


def now_utc() -> datetime:
    return datetime.now(UTC)


def sleep_until_second(frac: float = 0.2) -> None:
    """Move away from a minute boundary so minute-window maths cannot straddle it."""
    now = time.time()
    if now % 60 > 55:
        time.sleep(60 - now % 60 + frac)
