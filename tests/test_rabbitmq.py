"""The same N-published → N-stored test with RabbitMQ's MQTT plugin as the broker.

RabbitMQ 3.10's plugin speaks MQTT 3.1.1 only, so the gateway runs with
``mqtt.protocol = "3.1.1"``: the persistent session is a durable queue and the
in-flight window is the plugin's ``mqtt.prefetch`` (set to 1000 here), not
the ingester's Receive Maximum.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import RabbitMQ, _write_secret
from sensor_gateway import queries
from tests.helpers import Gateway

pytestmark = pytest.mark.rabbitmq


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    if not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists():
        pytest.fail("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    r = RabbitMQ(root=tmp_path_factory.mktemp("rabbit"))
    r.prepare()
    r.start()
    yield r
    r.stop()
    shutil.rmtree(r.dir / "mnesia", ignore_errors=True)


def test_n_published_n_stored_once_via_rabbitmq(stack, rabbitmq: RabbitMQ, tmp_path: Path) -> None:
    secret = tmp_path / "rabbit-password"
    _write_secret(secret, rabbitmq.password)
    gw = Gateway(stack, tmp_path, "rabbit")
    gw.set(
        mqtt={"port": rabbitmq.port, "protocol": "3.1.1"},
        ingest={"mqtt_username": "gateway", "mqtt_password_file": str(secret)},
        simulator={"mqtt_username": "gateway", "mqtt_password_file": str(secret)},
    )
    try:
        ing = gw.start_ingester()
        sim = gw.publish(3000, rate=1500)
        gw.wait_stored(3000)
        ids = [r["msg_id"] for r in gw.readings()]
        assert len(ids) == 3000, "a reading stored twice"
        assert set(ids) == {f"{sim.run_id}-{i}" for i in range(1, 3001)}
        assert queries.count_all(gw.db) == 3000
        assert ing.counters.rejected == 0
        # Batches are bounded by the plugin's prefetch, yet larger than Mosquitto's 20.
        assert ing.counters.batch_size_max > 20
    finally:
        gw.stop_ingesters()
        gw.db.client.drop_database(gw.cfg.mongodb.database)
