"""The HTTP API against the real pipeline: native routes, compatibility routes,
validation and injection, caching, averages, status counts, metrics.

One gateway (database, Redis prefix, ingester) for the module; each test
publishes readings of its own sensors through MQTT and asks the app (Flask's
WSGI test client over the real services) about them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient

from devstack.stack import Stack
from sensor_gateway import averages
from sensor_gateway.api import create_app
from tests.api_helpers import (
    api_gateway,
    iso,
    now_utc,
    publish_readings,
    series,
    sleep_until_second,
)
from tests.helpers import Gateway, wait_for

PROBLEM = "application/problem+json"
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def gw(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    yield from api_gateway(stack, tmp_path_factory, "api", cache_ttl_s=2.0)


@pytest.fixture(scope="module")
def client(gw: Gateway) -> FlaskClient:
    return create_app(gw.cfg).test_client()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def problem_names(resp: Any, status: int, *words: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == PROBLEM
    body = resp.get_json(force=True)
    for w in words:
        assert w in body["detail"], body
    return body


# -- native readings --------------------------------------------------------------------


def test_readings_filters_and_cursor_pages(gw: Gateway, client: FlaskClient) -> None:
    sid = uid("rt")
    publish_readings(gw, series(sid, T0, 25))
    publish_readings(gw, series(uid("other"), T0, 5))
    base = f"/readings?sensor_id={sid}&start={iso(T0)}&end={iso(T0 + timedelta(seconds=20))}"

    seen: list[dict] = []
    url = base + "&limit=8"
    pages = 0
    while True:
        r = client.get(url)
        assert r.status_code == 200, r.get_data(as_text=True)
        body = r.get_json()
        seen += body["items"]
        pages += 1
        if body["next_cursor"] is None:
            break
        url = base + f"&limit=8&cursor={body['next_cursor']}"
    # [start, end): seconds 0..19, oldest first, no duplicates, three pages.
    assert pages == 3
    assert [x["value"] for x in seen] == [float(i) for i in range(20)]
    assert {x["sensor_id"] for x in seen} == {sid}
    assert seen[0] == {
        "id": seen[0]["id"],  # the dedupe key, unique across devices
        "msg_id": f"{sid}-0",
        "sensor_id": sid,
        "kind": "temperature",
        "value": 0.0,
        "timestamp": "2024-05-01T12:00:00.000Z",
    }

    # Value range, newest first.
    r = client.get(f"/readings?sensor_id={sid}&min_value=3&max_value=6.5&order=desc")
    assert [x["value"] for x in r.get_json()["items"]] == [6.0, 5.0, 4.0, 3.0]
    # A cursor of one order is refused for the other.
    r = client.get(base + "&limit=5")
    cur = r.get_json()["next_cursor"]
    problem_names(client.get(base + f"&order=desc&cursor={cur}"), 400, "cursor")
    # Kind filter.
    r = client.get(f"/readings?kind=temperature&sensor_id={sid}&limit=1000")
    assert len(r.get_json()["items"]) == 25


def test_time_parameters_with_z_offset_and_naive(gw: Gateway, client: FlaskClient) -> None:
    sid = uid("tz")
    publish_readings(gw, series(sid, T0, 10))
    variants = [
        ("2024-05-01T12:00:03Z", "2024-05-01T12:00:06Z"),
        ("2024-05-01T14:00:03+02:00", "2024-05-01T08:00:06-04:00"),
        ("2024-05-01T12:00:03", "2024-05-01T12:00:06.000"),
    ]
    for start, end in variants:
        r = client.get("/readings", query_string={"sensor_id": sid, "start": start, "end": end})
        assert r.status_code == 200, (start, r.get_data(as_text=True))
        assert [x["value"] for x in r.get_json()["items"]] == [3.0, 4.0, 5.0], start
        assert all(x["timestamp"].endswith("Z") for x in r.get_json()["items"])


def test_latest_from_redis_and_sensors(gw: Gateway, client: FlaskClient) -> None:
    sid = uid("lt")
    publish_readings(gw, series(sid, now_utc() - timedelta(seconds=30), 15))
    r = client.get(f"/sensors/{sid}/latest")
    assert r.status_code == 200
    assert r.headers["X-Data-Source"] == "redis"
    assert [x["value"] for x in r.get_json()["items"]] == [float(i) for i in range(14, 4, -1)]
    r = client.get(f"/sensors/{sid}/latest?n=3")
    assert [x["value"] for x in r.get_json()["items"]] == [14.0, 13.0, 12.0]
    # More than Redis keeps: MongoDB.
    r = client.get(f"/sensors/{sid}/latest?n=12")
    assert r.headers["X-Data-Source"] == "mongodb"
    assert len(r.get_json()["items"]) == 12

    r = client.get("/readings/latest")
    assert r.status_code == 200 and r.headers["X-Data-Source"] == "redis"
    items = r.get_json()["items"]
    assert len(items) == 10
    stamps = [x["timestamp"] for x in items]
    assert stamps == sorted(stamps, reverse=True)

    r = client.get("/sensors")
    assert r.status_code == 200
    by_id = {s["sensor_id"]: s for s in r.get_json()["items"]}
    assert by_id[sid]["last"]["value"] == 14.0

    problem_names(client.get(f"/sensors/{uid('nosuch')}/latest"), 404, "unknown sensor")
    problem_names(client.get("/sensors/bad$id/latest"), 400, "sensor_id")


# -- compatibility routes ----------------------------------------------------------------


def test_compat_fastapi_readings_and_last_10(gw: Gateway, client: FlaskClient) -> None:
    """Seed 000: /readings?Sensor_Name=&Start_Range=&End_Range=, /Last_10_readings."""
    kind = uid("kindx")
    sid = uid("cx")
    readings = [{**r, "kind": kind} for r in series(sid, now_utc() - timedelta(minutes=1), 40)]
    publish_readings(gw, readings)

    # Sensor_Name may be a kind (the old topics were per kind) or a sensor id.
    for name in (kind, sid):
        r = client.get(f"/readings?Sensor_Name={name}&Start_Range=10&End_Range=30")
        assert r.status_code == 200
        body = r.get_json()
        assert isinstance(body, list) and body != ""
        assert [x["value"] for x in body] == [float(v) for v in range(10, 31)]
        for x in body:
            assert {"sensor_id", "value", "timestamp"} <= set(x)

        r = client.get(f"/Last_10_readings?Sensor_Name={name}")
        assert r.status_code == 200
        body = r.get_json()
        assert isinstance(body, list)
        assert [x["value"] for x in body] == [float(v) for v in range(39, 29, -1)]

    problem_names(client.get(f"/Last_10_readings?Sensor_Name={uid('none')}"), 404, "unknown")
    problem_names(client.get("/Last_10_readings"), 400, "Sensor_Name")
    problem_names(client.get("/readings?Sensor_Name=x&Start_Range=abc"), 400, "Start_Range")


def test_compat_latestten_starttoenddate_alldata(gw: Gateway, client: FlaskClient) -> None:
    """Seed 001: /latestten, /latestten/{id}, /starttoenddate, /allData (paged)."""
    sid = uid("s1")
    start = datetime(2023, 8, 25, 22, 25, 2, 819000, tzinfo=UTC)
    publish_readings(gw, series(sid, start, 12, step_s=60))
    publish_readings(gw, series(uid("s1b"), now_utc() - timedelta(seconds=5), 3))

    r = client.get("/latestten")
    assert r.status_code == 200 and r.headers["X-Data-Source"] == "redis"
    assert isinstance(r.get_json(), list) and len(r.get_json()) == 10

    r = client.get(f"/latestten/{sid}")
    assert [x["value"] for x in r.get_json()] == [float(v) for v in range(11, 1, -1)]
    problem_names(client.get(f"/latestten/{uid('ghost')}"), 404, "unknown sensor")

    # The old README's example: naive ISO times with microseconds, both ends inclusive.
    q = "startDate=2023-08-25T22%3A25%3A02.819517&endDate=2023-08-25T22%3A30%3A02.819000"
    for route in ("/starttoenddate", "/startoenddate"):
        r = client.get(f"{route}?{q}")
        assert r.status_code == 200, r.get_data(as_text=True)
        assert [x["value"] for x in r.get_json()] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    problem_names(client.get("/starttoenddate?startDate=2023-08-25"), 400, "endDate")

    # /allData pages with Link / X-Next-Cursor until the end.
    total = gw.stored()
    seen: set[str] = set()
    url = "/allData?limit=400"
    while url:
        r = client.get(url)
        assert r.status_code == 200
        page = r.get_json()
        assert isinstance(page, list)
        seen |= {x["id"] for x in page}
        link = r.headers.get("Link")
        url = link.split(">")[0].lstrip("<") if link else ""
        if url:
            assert r.headers["X-Next-Cursor"] in url
    assert len(seen) >= total


def test_status_counts_get_and_post(gw: Gateway, client: FlaskClient) -> None:
    """Seeds 003/004: every status 0-6, zeros included; GET ?start&end and POST body."""
    sid = uid("status")
    t = datetime(2022, 3, 1, 0, 0, 0, tzinfo=UTC)
    statuses = [0, 1, 1, 3, 3, 3, 6, 6, 2]
    publish_readings(
        gw,
        [
            {"sensor_id": sid, "status": s, "timestamp": t + timedelta(seconds=i), "kind": "status"}
            for i, s in enumerate(statuses)
        ],
    )
    expected = {"0": 1, "1": 2, "2": 0, "3": 3, "4": 0, "5": 0, "6": 2}
    start, end = iso(t), iso(t + timedelta(seconds=7))  # inclusive: the last (2) is out

    r = client.get(f"/stats/status-counts?start={start}&end={end}&sensor_id={sid}")
    assert r.status_code == 200
    assert r.get_json() == expected
    assert list(r.get_json()) == ["0", "1", "2", "3", "4", "5", "6"]

    r = client.post(
        f"/stats/status-counts?sensor_id={sid}", json={"start_time": start, "end_time": end}
    )
    assert r.status_code == 200 and r.get_json() == expected

    # Without sensor_id: every status reading in the range (only ours there).
    r = client.get(
        "/stats/status-counts",
        query_string={"start": "2022-03-01T00:00:00", "end": "2022-03-01T01:00:00+01:00"},
    )
    # That end is 00:00 UTC, inclusive: only the first reading (status 0).
    assert r.get_json() == {**dict.fromkeys(expected, 0), "0": 1}
    r = client.post("/stats/status-counts", json={"start_time": start, "end_time": iso(t)})
    assert r.get_json() == {**dict.fromkeys(expected, 0), "0": 1}

    problem_names(
        client.post("/stats/status-counts", json={"start_time": "yesterday"}), 400, "start_time"
    )
    problem_names(client.get(f"/stats/status-counts?start={end}&end={start}"), 400, "end")


def test_averages_from_summaries(gw: Gateway, client: FlaskClient) -> None:
    sleep_until_second()
    sid = uid("avg")
    now = now_utc()
    pts = [
        (now - timedelta(seconds=5), 10.0),
        (now - timedelta(seconds=4), 20.0),
        (now - timedelta(minutes=3), 60.0),
        (now - timedelta(minutes=20), 100.0),
        (now - timedelta(minutes=40), 1000.0),
    ]
    publish_readings(
        gw,
        [{"sensor_id": sid, "value": v, "timestamp": ts, "kind": "avgkind"} for ts, v in pts],
    )
    # The summaries are set right after the buckets, in the same write.
    two_hours = averages.parse_windows(["2h"])
    wait_for(
        lambda: averages.averages(gw.db, two_hours, sensor_id=sid)["overall"]["2h"]["count"] == 5,
        10,
        what="the summaries",
    )
    r = client.get(f"/stats/averages?sensor_id={sid}")
    assert r.status_code == 200
    body = r.get_json()
    ov = body["overall"]
    assert body["windows"] == ["1m", "5m", "30m"]
    assert ov["1m"]["avg"] == pytest.approx(15.0) and ov["1m"]["count"] == 2
    assert ov["5m"]["avg"] == pytest.approx(30.0) and ov["5m"]["count"] == 3
    assert ov["30m"]["avg"] == pytest.approx(47.5) and ov["30m"]["count"] == 4
    assert ov["30m"]["min"] == 10.0 and ov["30m"]["max"] == 100.0
    assert body["sensors"][sid]["kind"] == "avgkind"

    r = client.get("/stats/averages?kind=avgkind&windows=2h,1m")
    body = r.get_json()
    assert body["windows"] == ["2h", "1m"]
    assert body["overall"]["2h"]["avg"] == pytest.approx(1190.0 / 5)

    problem_names(client.get("/stats/averages?windows=5x"), 400, "windows")
    problem_names(client.get("/stats/averages?windows=9999h"), 400, "windows")


# -- validation, injection, errors ---------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "param"),
    [
        ("/readings?sensor_id[$gt]=", "sensor_id[$gt]"),
        ("/readings?sensor_id[$ne]=x", "sensor_id[$ne]"),
        ("/readings?Sensor_Name[$regex]=.*", "Sensor_Name[$regex]"),
        ("/readings?sensor_id=$where", "sensor_id"),
        # `$` in the id pattern would also match before a final newline.
        ("/readings?sensor_id=t1%0A", "sensor_id"),
        ("/sensors/t1%0A/latest", "sensor_id"),
        ("/readings?kind=%7B%22%24ne%22%3A1%7D", "kind"),
        ("/readings?limit=0", "limit"),
        ("/readings?limit=1001", "limit"),
        ("/readings?limit=ten", "limit"),
        ("/readings?start=yesterday", "start"),
        ("/readings?start=2024-01-02T00:00:00Z&end=2024-01-01T00:00:00Z", "end"),
        ("/readings?min_value=nan", "min_value"),
        ("/readings?max_value=inf", "max_value"),
        ("/readings?cursor=not-a-cursor", "cursor"),
        ("/readings?order=sideways", "order"),
        ("/readings/latest?n=-1", "n"),
        ("/stats/status-counts?start[$gt]=0", "start[$gt]"),
        ("/allData?limit=5000", "limit"),
    ],
)
def test_bad_query_parameters_are_400_naming_them(
    client: FlaskClient, url: str, param: str
) -> None:
    problem_names(client.get(url), 400, f"'{param}'")


@pytest.mark.parametrize(
    "body",
    [
        {"start_time": {"$ne": None}},
        {"end_time": {"$gt": ""}},
        {"sensor_id": {"$ne": None}},
        {"start_time": "2024-01-01T00:00:00Z", "$where": "1"},
    ],
)
def test_operator_injection_in_json_is_400(client: FlaskClient, body: dict) -> None:
    r = client.post("/stats/status-counts", json=body)
    problem_names(r, 400)
    assert any(k in r.get_json()["detail"] for k in body)


def test_malformed_bodies_are_400(client: FlaskClient) -> None:
    problem_names(client.post("/stats/status-counts", json=[1, 2]), 400)
    r = client.post("/stats/status-counts", data="{not json", content_type="application/json")
    assert r.status_code == 400 and r.mimetype == PROBLEM


def test_unknown_route_and_method(client: FlaskClient) -> None:
    problem_names(client.get("/nope"), 404)
    assert client.delete("/readings").status_code == 405
    assert client.delete("/readings").mimetype == PROBLEM


# -- cache, health, metrics, docs ---------------------------------------------------------


def test_heavier_queries_are_cached_briefly(gw: Gateway, client: FlaskClient) -> None:
    sid = uid("cache")
    publish_readings(gw, series(sid, T0, 3))
    url = f"/readings?sensor_id={sid}"
    first = client.get(url)
    second = client.get(url)
    assert first.headers["X-Cache"] == "miss" and second.headers["X-Cache"] == "hit"
    assert first.get_json() == second.get_json()
    keys = list(gw.redis.scan_iter(f"{gw.keys.prefix}api:cache:*"))
    assert keys and 0 < gw.redis.pttl(keys[0]) <= 2000


def test_healthz_readyz(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert {k: v["ok"] for k, v in r.get_json()["checks"].items()} == {
        "mqtt": True,
        "mongodb": True,
        "redis": True,
    }


def test_metrics_requests_and_ingester_counters(gw: Gateway, client: FlaskClient) -> None:
    publish_readings(gw, series(uid("m"), T0, 2))
    client.get("/readings/latest")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'sensor_api_requests_total{method="GET",route="/readings/latest",status="200"}' in text
    assert 'sensor_api_request_duration_seconds_bucket{le="0.005",route="/readings/latest"}' in (
        text
    )
    assert "sensor_ingest_counters_up 1.0" in text
    for name in (
        "received_total",
        "stored_total",
        "rejected_total",
        "duplicates_total",
        "batch_size_max",
        "lag_ms_last",
    ):
        assert f"sensor_ingest_{name} " in text, name


def test_openapi_and_docs(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").get_json()
    for path in (
        "/readings",
        "/readings/latest",
        "/readings/stream",
        "/sensors",
        "/sensors/{sensor_id}/latest",
        "/stats/averages",
        "/stats/status-counts",
        "/healthz",
        "/readyz",
        "/metrics",
        "/Last_10_readings",
        "/latestten",
        "/latestten/{sensor_id}",
        "/starttoenddate",
        "/allData",
    ):
        assert path in spec["paths"], path
    assert set(spec["paths"]["/stats/status-counts"]) == {"get", "post"}
    params = {p["name"] for p in spec["paths"]["/readings"]["get"]["parameters"]}
    assert {"sensor_id", "kind", "start", "end", "limit", "cursor", "Sensor_Name"} <= params
    r = client.get("/docs")
    assert r.status_code == 200 and b"openapi.json" in r.data
