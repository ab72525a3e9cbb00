"""The ingester: receive → validate → batch → write → acknowledge.

One module per stage, read in that order:

- :mod:`.receive`: the MQTT session; QoS 1 messages onto a bounded queue, unacked;
- :mod:`.batch`: up to ``batch_size`` messages or ``batch_timeout_ms`` after the first;
- :mod:`.validate`: the payload contract, one message at a time; never raises;
- :mod:`.write`: into MongoDB, held and retried until it is in;
- :mod:`.acknowledge`: Redis (:mod:`.latest_cache`), then a PUBACK per message;
- :mod:`.ingester`: the stages wired together, the loop, start-up and stopping;
- :mod:`.counters`: what it has done, for `systemctl status` and Redis.
"""

from sensor_gateway.ingest.ingester import EXIT_PERMANENT, Ingester

__all__ = ["EXIT_PERMANENT", "Ingester"]
