"""The latest routes' short path (latest.fast_n, Services.latest_members) answers
exactly what the schema's path answers: the same items for the usual query
strings, the same 400s naming the parameter for anything else, and it survives
a dropped Redis connection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from sensor_gateway import cache
from sensor_gateway.api import create_app
from sensor_gateway.api.errors import PROBLEM
from tests.helpers import Gateway

T0 = datetime(2024, 5, 1, 12, tzinfo=UTC)


@pytest.fixture
def client(gateway: Gateway):
    keys = cache.Keys(gateway.cfg.redis.key_prefix)
    docs = [
        {
            "_id": f"{sid}|202405011200.{i:05d}",
            "sensor_id": sid,
            "kind": "temperature",
            "value": i + 0.5,
            "ts": T0 + timedelta(seconds=i, microseconds=7),
            "unit": "°C",
            "msg_id": f"m{i}" if i % 2 else None,
        }
        for i in range(15)
        for sid in ("la-1", "la.2")
    ]
    cache.store_latest(gateway.redis, keys, docs, gateway.cfg.ingest.latest_n, live=False)
    return create_app(gateway.cfg).test_client()


def items(resp) -> list[dict]:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.headers["X-Data-Source"] == "redis"
    assert resp.mimetype == "application/json"
    return msgspec.json.decode(resp.get_data())["items"]


@pytest.mark.parametrize("route", ["/readings/latest", "/sensors/la.2/latest"])
def test_usual_query_strings(client, route: str) -> None:
    ten = items(client.get(route))
    assert len(ten) == 10
    assert [r["timestamp"] for r in ten] == sorted((r["timestamp"] for r in ten), reverse=True)
    assert ten[0]["timestamp"] == "2024-05-01T12:00:14.000007Z"
    assert all(r["unit"] == "°C" for r in ten)
    assert all(("msg_id" in r) == (int(r["value"]) % 2 == 1) for r in ten)
    if route.startswith("/sensors"):
        assert {r["sensor_id"] for r in ten} == {"la.2"}
    assert items(client.get(route + "?n=3")) == ten[:3]
    assert items(client.get(route + "?n=10")) == ten
    assert items(client.get(route + "?")) == ten
    # Spellings the short path leaves to the schema, which accepts them too.
    assert items(client.get(route + "?n=03")) == ten[:3]
    assert items(client.get(route + "?n=%33")) == ten[:3]
    # More than Redis keeps: from MongoDB (nothing stored there in this test).
    resp = client.get(route + "?n=1000")
    assert resp.status_code in (200, 404) and resp.headers.get("X-Data-Source") != "redis"


@pytest.mark.parametrize("route", ["/readings/latest", "/sensors/la-1/latest"])
@pytest.mark.parametrize(
    ("qs", "name"),
    [
        ("n=0", "n"),
        ("n=1001", "n"),
        ("n=9999", "n"),
        ("n=-1", "n"),
        ("n=", "n"),
        ("n=ten", "n"),
        ("n=1.5", "n"),
        ("n=5&x=1", "x"),
        ("N=5", "N"),
        ("sensor_id=la-1", "sensor_id"),
        ("n[$gt]=1", "n[$gt]"),
    ],
)
def test_anything_else_gets_the_schemas_400(client, route: str, qs: str, name: str) -> None:
    resp = client.get(f"{route}?{qs}")
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert resp.mimetype == PROBLEM
    assert f"query parameter {name!r}" in resp.get_json()["detail"]


def test_compat_routes_and_a_dropped_connection(gateway: Gateway, client) -> None:
    ten = items(client.get("/readings/latest"))
    resp = client.get("/latestten")
    assert resp.status_code == 200 and msgspec.json.decode(resp.get_data()) == ten
    resp = client.get("/latestten/la-1")
    assert resp.status_code == 200
    assert {r["sensor_id"] for r in msgspec.json.decode(resp.get_data())} == {"la-1"}
    # Redis drops every client connection (a restart, an idle timeout): the next
    # request still answers from Redis, on a new connection.
    gateway.redis.client_kill_filter(_type="normal", skipme=True)
    assert items(client.get("/readings/latest")) == ten
    assert items(client.get("/sensors/la-1/latest?n=2"))[0]["sensor_id"] == "la-1"


def test_the_openapi_document_still_describes_n(client) -> None:
    spec = client.get("/openapi.json").get_json()
    for path in ("/readings/latest", "/sensors/{sensor_id}/latest"):
        params = {p["name"]: p for p in spec["paths"][path]["get"]["parameters"]}
        assert params["n"]["in"] == "query"
        assert params["n"]["schema"]["maximum"] == 1000
        assert params["n"]["schema"]["minimum"] == 1
