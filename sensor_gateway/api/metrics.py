"""Prometheus metrics: requests per route, latencies, and the ingester's counters.

Under gunicorn (several worker processes) ``gunicorn_conf`` sets
``PROMETHEUS_MULTIPROC_DIR`` before any worker imports prometheus_client, so
every worker writes its samples to files there and ``/metrics`` answers the
sum over all workers whichever worker serves it. Without it (the dev server,
tests) the metrics are the process's own.

The ingester's counters are read from its Redis hash at scrape time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from redis.exceptions import RedisError

from sensor_gateway.api.services import Services

REQUESTS = Counter(
    "sensor_api_requests",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "sensor_api_request_duration_seconds",
    "Time to produce a response, by route template.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Counters of sensor_gateway.ingest.Counters; the others are gauges.
INGEST_COUNTERS = (
    "received",
    "stored",
    "duplicates",
    "rejected",
    "batches",
    "mongo_retries",
    "redis_errors",
)
INGEST_GAUGES = {
    "batch_size_last": "Size of the last batch written.",
    "batch_size_max": "Largest batch written since the ingester started.",
    "lag_ms_last": "Milliseconds from receipt to acknowledgement, last batch.",
    "held_bytes_max": "Most payload bytes held unacknowledged since the ingester started.",
}


class IngestCollector:
    def __init__(self, services: Services) -> None:
        self.services = services

    def _read(self, r: Any) -> dict[str, float]:
        """Every ingest worker's counters: counters added, gauges the largest."""
        keys = self.services.keys
        workers = self.services.cfg.ingest.workers
        out: dict[str, float] = {}
        for w in range(workers):
            for name, raw in r.hgetall(keys.worker_counters(w)).items():
                v, seen = float(raw), out.get(name)
                out[name] = (
                    v if seen is None else max(seen, v) if name in INGEST_GAUGES else seen + v
                )
        return out

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "sensor_ingest_counters_up", "1 if the ingester's counters could be read from Redis."
        )
        ok, values = self.services.try_redis(self._read)
        if not ok:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for name in INGEST_COUNTERS:
            if name in values:
                c = CounterMetricFamily(f"sensor_ingest_{name}", f"Ingester: {name} (total).")
                c.add_metric([], float(values[name]))
                yield c
        for name, doc in INGEST_GAUGES.items():
            if name in values:
                gm = GaugeMetricFamily(f"sensor_ingest_{name}", doc)
                gm.add_metric([], float(values[name]))
                yield gm


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def exposition(services: Services) -> bytes:
    if multiprocess():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        api = generate_latest(registry)
    else:
        api = generate_latest(REGISTRY)
    ingest = CollectorRegistry()
    ingest.register(IngestCollector(services))  # type: ignore[arg-type]
    try:
        return api + generate_latest(ingest)
    except RedisError:  # pragma: no cover - try_redis already catches
        return api


# Label values come from bounded sets only, never from what a client sent: the
# matched rule's template (e.g. /sensors/<sensor_id>/latest, not the path), a
# known method or "other", a status code.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def labels() -> tuple[str, str]:
    """(route, method) label values for the current request."""
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    method = request.method if request.method in METHODS else "other"
    return route, method


def register(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        g.t0 = time.perf_counter()

    @app.after_request
    def _observe(resp: Response) -> Response:
        t0 = g.pop("t0", None)
        route, method = labels()
        status = resp.status_code if 100 <= resp.status_code <= 599 else 0
        REQUESTS.labels(route, method, str(status)).inc()
        if t0 is not None:
            LATENCY.labels(route).observe(time.perf_counter() - t0)
        return resp


def metrics_response(services: Services) -> Response:
    return Response(exposition(services), mimetype=CONTENT_TYPE_LATEST.split(";")[0])
