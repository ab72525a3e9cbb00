"""The API with a dependency down: Redis → MongoDB fallback, 503s naming the dependency."""

from __future__ import annotations

from datetime import timedelta

from sensor_gateway.api import create_app
from tests.api_helpers import now_utc, publish_readings, series
from tests.helpers import Gateway, wait_for

PROBLEM = "application/problem+json"


def test_redis_down_latest_falls_back_to_mongodb(private_gateway: Gateway) -> None:
    gw = private_gateway
    gw.start_ingester()
    publish_readings(gw, series("fb-1", now_utc() - timedelta(minutes=1), 15))
    publish_readings(gw, series("fb-2", now_utc() - timedelta(minutes=2), 5))
    client = create_app(gw.cfg).test_client()

    def from_redis(url: str):
        resp = client.get(url)
        return resp if resp.headers.get("X-Data-Source") == "redis" else None

    before = {}
    for url in ("/readings/latest", "/sensors/fb-1/latest", "/latestten", "/latestten/fb-2"):
        before[url] = wait_for(lambda u=url: from_redis(u), 10, what=url).get_json()

    gw.stack.redis.stop()

    for url, expected in before.items():
        r = client.get(url)
        assert r.status_code == 200, (url, r.get_data(as_text=True))
        assert r.headers["X-Data-Source"] == "mongodb", url
        assert r.get_json() == expected, url
    r = client.get("/sensors")
    assert r.status_code == 200 and r.headers["X-Data-Source"] == "mongodb"
    assert {s["sensor_id"] for s in r.get_json()["items"]} == {"fb-1", "fb-2"}
    # Uncached queries still work without the cache.
    r = client.get("/readings?sensor_id=fb-2")
    assert r.status_code == 200 and len(r.get_json()["items"]) == 5
    assert client.get("/stats/status-counts").status_code == 200

    r = client.get("/readyz")
    assert r.status_code == 503 and r.mimetype == PROBLEM
    body = r.get_json()
    assert body["failing"] == ["redis"] and "redis" in body["detail"]
    assert body["checks"]["mongodb"]["ok"] and body["checks"]["mqtt"]["ok"]

    r = client.get("/readings/stream?max_s=1")
    assert r.status_code == 503 and r.mimetype == PROBLEM
    assert "redis" in r.get_json()["detail"]

    text = client.get("/metrics").get_data(as_text=True)
    assert "sensor_ingest_counters_up 0.0" in text

    gw.stack.redis.start()
    wait_for(
        lambda: client.get("/readings/latest").headers.get("X-Data-Source") == "redis",
        10,
        what="back on redis",
    )


def test_mongodb_down_is_503_naming_it(private_gateway: Gateway) -> None:
    gw = private_gateway
    gw.set(mongodb={"timeout_ms": 500})
    client = create_app(gw.cfg).test_client()
    gw.stack.mongo.stop()
    r = client.get("/readings?sensor_id=x")
    assert r.status_code == 503 and r.mimetype == PROBLEM
    assert r.get_json()["dependency"] == "mongodb"
    assert "mongodb" in r.get_json()["detail"]
    r = client.get("/readyz")
    assert r.status_code == 503 and r.get_json()["failing"] == ["mongodb"]
    gw.stack.mongo.start()
