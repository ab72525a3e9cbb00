"""``GET /readings/export`` and ``sensor-gateway export`` against the real pipeline:
rows and header, the filters of ``/readings``, bad parameters named, access control."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from devstack import REPO
from devstack.stack import Stack
from sensor_gateway import tokens
from sensor_gateway.api import create_app, export
from tests.api_helpers import api_gateway, iso, publish_readings, series
from tests.helpers import Gateway

PROBLEM = "application/problem+json"
T0 = datetime(2024, 6, 1, 8, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def gw(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    yield from api_gateway(stack, tmp_path_factory, "export", tokens=True)


@pytest.fixture(scope="module")
def client(gw: Gateway) -> FlaskClient:
    return create_app(gw.cfg).test_client()


@pytest.fixture(scope="module")
def sid(gw: Gateway) -> str:
    s = f"ex-{uuid.uuid4().hex[:6]}"
    publish_readings(gw, series(s, T0, 30, value0=10.0))
    publish_readings(gw, series(s + "-other", T0, 4), kind="humidity")
    return s


def rows_of(resp) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(resp.get_data(as_text=True))))


def test_csv_header_rows_and_attachment(client: FlaskClient, sid: str) -> None:
    r = client.get(f"/readings/export?format=csv&sensor_id={sid}")
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.headers["Content-Type"] == "text/csv; charset=utf-8"
    cd = r.headers["Content-Disposition"]
    assert cd.startswith("attachment; filename=") and f"readings-{sid}-" in cd and ".csv" in cd
    assert r.is_streamed
    text = r.get_data(as_text=True)
    assert text.splitlines()[0] == ",".join(export.CSV_COLUMNS)
    rows = rows_of(r)
    assert len(rows) == 30
    assert [float(x["value"]) for x in rows] == [10.0 + i for i in range(30)]
    assert rows[0]["timestamp"].startswith("2024-06-01T08:00:00")
    assert {x["sensor_id"] for x in rows} == {sid}
    assert {x["kind"] for x in rows} == {"temperature"}
    assert rows[3]["msg_id"] == f"{sid}-3"
    # The same readings /readings gives, in the same order, same ids.
    page = client.get(f"/readings?sensor_id={sid}&limit=1000").get_json()["items"]
    assert [x["id"] for x in rows] == [p["id"] for p in page]
    assert [x["timestamp"] for x in rows] == [p["timestamp"] for p in page]


def test_ndjson_and_filters(client: FlaskClient, sid: str) -> None:
    start, end = iso(T0 + timedelta(seconds=5)), iso(T0 + timedelta(seconds=25))
    url = f"/readings/export?format=ndjson&sensor_id={sid}&start={start}&end={end}"
    r = client.get(url + "&min_value=20&max_value=30&order=desc")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/x-ndjson"
    assert ".ndjson" in r.headers["Content-Disposition"]
    lines = [json.loads(line) for line in r.get_data(as_text=True).splitlines()]
    # seconds 5..24 → values 15..34, then 20 ≤ value ≤ 30, newest first.
    assert [x["value"] for x in lines] == [float(v) for v in range(30, 19, -1)]
    assert set(lines[0]) >= {"id", "sensor_id", "kind", "value", "timestamp", "msg_id"}
    # kind filter
    r = client.get(f"/readings/export?format=ndjson&kind=humidity&sensor_id={sid}-other")
    assert len(r.get_data(as_text=True).splitlines()) == 4
    # nothing matches: a CSV with its header only
    r = client.get("/readings/export?sensor_id=no-such-sensor-x")
    assert r.status_code == 200
    assert r.get_data(as_text=True) == ",".join(export.CSV_COLUMNS) + "\r\n"


def test_many_batches_stream_in_chunks(gw: Gateway, client: FlaskClient) -> None:
    s = f"exbig-{uuid.uuid4().hex[:6]}"
    n = export.BATCH * 2 + 17
    publish_readings(gw, series(s, T0, n))
    r = client.get(f"/readings/export?sensor_id={s}")
    chunks = list(r.response)
    assert len(chunks) >= 3  # a chunk per batch, never the whole file at once
    assert max(len(c) for c in chunks) < 200 * export.BATCH
    rows = list(csv.DictReader(io.StringIO(b"".join(chunks).decode())))
    assert [float(x["value"]) for x in rows] == [float(i) for i in range(n)]


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("format=xml", ["'format'"]),
        ("sensor_id=a%20b", ["'sensor_id'"]),
        ("start=yesterday", ["'start'"]),
        ("min_value=nan", ["'min_value'"]),
        ("min_value=5&max_value=1", ["'max_value'"]),
        ("start=2024-01-02T00:00:00Z&end=2024-01-01T00:00:00Z", ["'end'"]),
        ("limit=5", ["'limit'"]),
        ("sensor_id[$ne]=x", ["sensor_id[$ne]"]),
        ("order=sideways", ["'order'"]),
    ],
)
def test_bad_parameters_are_400_naming_them(client: FlaskClient, query: str, names) -> None:
    r = client.get("/readings/export?" + query)
    assert r.status_code == 400, r.get_data(as_text=True)
    assert r.mimetype == PROBLEM
    detail = r.get_json(force=True)["detail"]
    for n in names:
        assert n in detail, detail


def test_formula_cells_are_quoted() -> None:
    row = {"timestamp": "t", "sensor_id": "s", "kind": "k", "value": -1.5, "unit": "=cmd()"}
    out = b"".join(export.chunks(iter([{**row, "id": "i", "msg_id": "@x"}]), "csv")).decode()
    assert out.splitlines()[1] == "t,s,k,-1.5,'=cmd(),'@x,i"


def test_access_control_applies(gw: Gateway, client: FlaskClient, sid: str) -> None:
    path = Path(gw.cfg.api.tokens_file)
    token, _ = tokens.add(path, f"exporter-{uuid.uuid4().hex[:4]}")
    try:
        r = client.get(f"/readings/export?sensor_id={sid}")
        assert r.status_code == 401 and r.mimetype == PROBLEM
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        r = client.get(
            f"/readings/export?sensor_id={sid}", headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 200 and len(rows_of(r)) == 30
    finally:
        path.unlink()


def test_cli_export_writes_the_same_file(gw: Gateway, client: FlaskClient, sid: str) -> None:
    out = gw.tmp / f"{sid}.csv"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sensor_gateway",
            "-c",
            str(gw.write_config()),
            "export",
            "--format",
            "csv",
            "--output",
            str(out),
            "--sensor-id",
            sid,
            "--start",
            iso(T0 + timedelta(seconds=10)),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "20 readings" in r.stderr  # the progress line's last word
    api = client.get(f"/readings/export?sensor_id={sid}&start={iso(T0 + timedelta(seconds=10))}")
    assert out.read_bytes() == api.get_data()
    assert not list(gw.tmp.glob(f".{sid}.csv.*")), "temporary file left behind"
    # A bad filter is named, exit 2, no file.
    bad = subprocess.run(
        [sys.executable, "-m", "sensor_gateway", "-c", str(gw.write_config()), "export"]
        + ["--output", str(gw.tmp / "bad.csv"), "--start", "nope"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert bad.returncode == 2 and "--start" in bad.stderr, bad.stderr
    assert not (gw.tmp / "bad.csv").exists()
