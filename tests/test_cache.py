"""Redis latest-N sets: a batch stored at once holds exactly what storing each
reading alone would (only the candidates are encoded); the live channel carries
a batch as one JSON array."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensor_gateway import cache
from tests.helpers import Gateway

T0 = datetime(2024, 5, 1, 12, tzinfo=UTC)
N = 10
_run = itertools.count()

# Few sensors and few distinct times: ties in score (ordered by member) are common.
readings = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 12), st.integers(-3, 3)),
    max_size=80,
)


def doc(i: int, sid: str, second: int, value: int) -> dict:
    return {
        "_id": f"{sid}|x.{i:05d}",
        "sensor_id": sid,
        "kind": "t",
        "value": float(value),
        "ts": T0 + timedelta(seconds=second),
    }


def brute(docs: list[dict]) -> list[str]:
    members = {cache._member(d) for d in docs}
    return [m for m, _ in sorted(members, key=lambda kv: (kv[1], kv[0]), reverse=True)[:N]]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(first=readings, second=readings)
def test_a_batch_keeps_the_newest_n_as_each_alone_would(gateway: Gateway, first, second) -> None:
    keys = cache.Keys(f"t{next(_run)}:")
    r = gateway.redis
    batches = [
        [doc(i, *x) for i, x in enumerate(first)],
        [doc(i + 1000, *x) for i, x in enumerate(second)],
    ]
    for batch in batches:
        cache.store_latest(r, keys, batch, N, live=False)
    everything = batches[0] + batches[1]
    for sid in ("a", "b", "c"):
        want = brute([d for d in everything if d["sensor_id"] == sid])
        assert r.zrevrange(keys.latest(sid), 0, -1) == want
    assert r.zrevrange(keys.latest_all, 0, -1) == brute(everything)


def test_the_live_channel_carries_a_batch_as_one_array(gateway: Gateway) -> None:
    keys = cache.Keys(f"t{next(_run)}:")
    ps = gateway.redis.pubsub(ignore_subscribe_messages=True)
    ps.subscribe(keys.live)
    batch = [doc(i, "a", i, i) for i in range(5)]
    cache.store_latest(gateway.redis, keys, batch, N)
    msg = None
    for _ in range(50):
        msg = ps.get_message(timeout=0.1)
        if msg:
            break
    assert msg is not None
    got = cache.live_readings(msg["data"])
    assert [g["id"] for g in got] == [d["_id"] for d in batch]
    # What an ingester of before the arrays published: one reading alone.
    assert cache.live_readings(json.dumps(got[0])) == [got[0]]
    assert cache.live_readings("42") == []
    ps.close()
