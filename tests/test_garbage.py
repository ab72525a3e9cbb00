"""Garbage through the real pipeline: every message is stored or rejected with a
reason, counted, and the ingester keeps running."""

from __future__ import annotations

import json
import logging
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensor_gateway import storage
from tests.helpers import Gateway, wait_for

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)
# Objects that look like readings, with each field sometimes wrong.
reading_like = st.fixed_dictionaries(
    {},
    optional={
        "sensor_id": st.one_of(
            st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True), json_values
        ),
        "value": st.one_of(
            st.floats(allow_nan=False, allow_infinity=False),
            st.integers(-1000, 1000),
            st.sampled_from(["1.5", "abc", "NaN", ""]),
            json_values,
        ),
        "status": st.one_of(st.integers(-2, 9), json_values),
        "timestamp": st.one_of(
            st.datetimes().map(lambda d: d.isoformat()),
            st.sampled_from(["2026-01-01T00:00:00Z", "not a time", ""]),
            json_values,
        ),
        "unit": json_values,
        "kind": st.one_of(st.sampled_from(["temperature", "status"]), json_values),
    },
)
payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    reading_like.map(lambda v: json.dumps(v).encode()),
)


class Pipeline:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.ing = gw.start_ingester()
        self.pub = gw.raw_publisher()
        self.sent = 0

    def send(self, batch: list[bytes]) -> None:
        infos = []
        for p in batch:
            self.sent += 1
            # A topic per message: identical payloads are distinct readings here.
            infos.append(self.pub.publish(f"sensors/fuzz/m{self.sent}", p, qos=1))
        for info in infos:
            info.wait_for_publish(10)
        wait_for(
            lambda: self.ing.counters.received >= self.sent,
            30,
            0.05,
            what=f"{self.sent} messages received",
        )


@pytest.fixture(scope="module")
def pipeline(stack, tmp_path_factory):
    gw = Gateway(stack, tmp_path_factory.mktemp("fuzz"), "fuzz")
    yield Pipeline(gw)
    gw.close()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(payloads, min_size=1, max_size=25))
def test_random_payloads_are_stored_or_rejected(pipeline: Pipeline, batch: list[bytes]) -> None:
    pipeline.send(batch)
    c = pipeline.ing.counters
    db = pipeline.gw.db
    readings = list(storage.scan_readings(db))
    stored = len(readings)
    rejects = db[storage.REJECTED].count_documents({})
    assert pipeline.ing.stop_event.is_set() is False
    # Every message has exactly one outcome, and the counters agree with the database.
    assert c.received == pipeline.sent
    assert stored + rejects == pipeline.sent, (stored, rejects, pipeline.sent)
    assert (c.stored, c.rejected) == (stored, rejects)
    for r in db[storage.REJECTED].find({"reason": {"$exists": False}}):
        pytest.fail(f"reject without a reason: {r}")
    assert stored == storage.count_readings(db)
    for r in readings:
        assert isinstance(r["value"], float) and math.isfinite(r["value"])


def test_rejects_are_recorded_counted_and_logged(gateway: Gateway, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="sensor_gateway.ingest")
    # The broker refuses payloads over its message_size_limit (16 KiB) at publish
    # time; the ingester's own limit, set lower here, is the check behind it.
    gateway.set(ingest={"max_payload_bytes": 8192})
    ing = gateway.start_ingester()
    pub = gateway.raw_publisher()
    bad = [b"{oops", b'{"value": "warm"}', b'{"status": 9}', b"x" * 10000]
    for p in bad:
        pub.publish("sensors/temperature/t1", p, qos=1).wait_for_publish(10)
    pub.publish("sensors/temperature/t1", b'{"value": 20.5}', qos=1).wait_for_publish(10)
    wait_for(lambda: ing.counters.received == 5, 20, what="5 messages")
    rows = list(gateway.db[storage.REJECTED].find().sort("received_at", 1))
    assert [r["topic"] for r in rows] == ["sensors/temperature/t1"] * 4
    reasons = [r["reason"] for r in rows]
    assert reasons[0].startswith("not JSON")
    assert "numeric string" in reasons[1]
    assert "status must be an integer 0-6" in reasons[2] or "0-6" in reasons[2]
    assert "over the 8192 limit" in reasons[3]
    assert len(rows[3]["payload"]) == gateway.cfg.ingest.reject_payload_bytes  # truncated
    assert rows[3]["payload_bytes"] == 10000
    assert gateway.stored() == 1
    assert ing.counters.rejected == 4
    warnings = [r for r in caplog.records if "rejected message" in r.getMessage()]
    assert len(warnings) == 4
