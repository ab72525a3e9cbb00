"""N published → N stored exactly once; Redis latest-N matches MongoDB."""

from __future__ import annotations

from sensor_gateway import cache, storage
from tests.helpers import Gateway, wait_for


def rollup_total(gw: Gateway) -> int:
    return sum(d["count"] for d in gw.db[storage.ROLLUPS].find({}, {"count": 1}))


def test_n_published_n_stored_once(gateway: Gateway) -> None:
    ing = gateway.start_ingester()
    sim = gateway.publish(3000, rate=3000)
    gateway.wait_stored(3000)
    ids = {d["msg_id"] for d in gateway.db.readings.find({}, {"msg_id": 1})}
    assert ids == {f"{sim.run_id}-{i}" for i in range(1, 3001)}
    # Rollups count each reading once.
    wait_for(lambda: rollup_total(gateway) == 3000, 10, what="rollups")
    wait_for(lambda: ing.counters.stored == 3000, 10, what="counters")
    assert ing.counters.rejected == 0


def test_latest_ten_in_redis_match_mongodb(gateway: Gateway) -> None:
    gateway.start_ingester()
    gateway.publish(400, rate=2000)
    gateway.wait_stored(400)
    ing_cfg = gateway.cfg.ingest
    for sensor_id in storage.sensor_ids(gateway.db):
        expected = [d["_id"] for d in storage.latest_for_sensor(gateway.db, sensor_id, 10)]
        wait_for(
            lambda s=sensor_id, e=expected: (
                [
                    r["id"]
                    for r in cache.read_latest(gateway.redis, gateway.keys, s, ing_cfg.latest_n)
                ]
                == e
            ),
            10,
            what=f"redis latest of {sensor_id}",
        )
    overall = [d["_id"] for d in storage.latest_overall(gateway.db, 10)]
    got = [r["id"] for r in cache.read_latest(gateway.redis, gateway.keys, None, 10)]
    assert got == overall


def test_rebuild_rollups_recomputes_from_readings(gateway: Gateway) -> None:
    gateway.start_ingester()
    gateway.publish(500, rate=2000)
    gateway.wait_stored(500)
    gateway.stop_ingesters()
    before = {d["_id"]: d for d in gateway.db[storage.ROLLUPS].find()}
    # A crash that lost rollup increments, simulated by damaging them.
    gateway.db[storage.ROLLUPS].update_many({}, {"$inc": {"count": -1}})
    proc = gateway.spawn("rebuild-rollups", "--since", "2000-01-01T00:00:00Z")
    assert proc.wait(60) == 0
    after = {d["_id"]: d for d in gateway.db[storage.ROLLUPS].find()}
    assert after.keys() == before.keys()
    for k, d in after.items():
        assert (d["count"], d["min"], d["max"]) == (
            before[k]["count"],
            before[k]["min"],
            before[k]["max"],
        )
        assert abs(d["sum"] - before[k]["sum"]) < 1e-6


def test_indexes_fit_the_engine(gateway: Gateway) -> None:
    gateway.start_ingester()
    gateway.publish(10)
    gateway.wait_stored(10)
    names = set(gateway.db[storage.READINGS].index_information())
    if storage.is_ferretdb(gateway.db):
        assert names == {"_id_"}  # unused by its SQLite backend, and costly on insert
    else:
        assert {"sensor_ts", "kind_ts", "ts", "value"} <= names
