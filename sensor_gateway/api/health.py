"""Liveness, readiness (each dependency named) and Prometheus metrics."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from apiflask import APIBlueprint
from flask import Response

from sensor_gateway import cache, storage
from sensor_gateway.api import metrics, schemas
from sensor_gateway.api.errors import problem
from sensor_gateway.api.responses import json_response
from sensor_gateway.api.services import Services, services
from sensor_gateway.config import Config
from sensor_gateway.mqtt import make_client

bp = APIBlueprint("health", __name__, tag="health")
_ids = itertools.count()


def check_mqtt(cfg: Config, timeout: float = 2.0) -> None:
    """Connect to the broker with the API's credentials and wait for CONNACK."""
    done = threading.Event()
    result: list[Any] = []

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        result.append(reason_code)
        done.set()

    client = make_client(
        cfg,
        f"sensor-api-ready-{os.getpid()}-{next(_ids)}",
        cfg.api.mqtt_username,
        cfg.api.mqtt_password_file,
    )
    client.on_connect = on_connect
    client.connect(cfg.mqtt.host, cfg.mqtt.port, keepalive=10)
    try:
        deadline = time.monotonic() + timeout
        while not done.is_set() and time.monotonic() < deadline:
            client.loop(timeout=0.05)
        if not result:
            raise TimeoutError(f"no CONNACK within {timeout:g}s")
        if result[0].is_failure:
            raise ConnectionRefusedError(f"broker refused: {result[0]}")
    finally:
        client.disconnect()
        client.loop(timeout=0.01)  # flush DISCONNECT and close the socket


def run_checks(checks: dict[str, Callable[[], Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, fn in checks.items():
        t0 = time.perf_counter()
        try:
            fn()
            out[name] = {"ok": True, "ms": round((time.perf_counter() - t0) * 1000, 2)}
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready", named
            out[name] = {
                "ok": False,
                "ms": round((time.perf_counter() - t0) * 1000, 2),
                "error": f"{type(exc).__name__}: {exc}"[:300],
            }
    return out


def service_checks(svc: Services) -> dict[str, Callable[[], Any]]:
    return {
        "mqtt": lambda: check_mqtt(svc.cfg),
        "mongodb": lambda: storage.ping(svc.db),
        "redis": lambda: svc.redis.ping(),
    }


def check_dependencies(cfg: Config) -> dict[str, dict[str, Any]]:
    """The same checks with throw-away clients (for gunicorn's master before READY=1)."""
    db = storage.connect(cfg, appname="sensor-api-ready")
    r = cache.connect(cfg)
    try:
        return run_checks(
            {
                "mqtt": lambda: check_mqtt(cfg),
                "mongodb": lambda: storage.ping(db),
                "redis": lambda: r.ping(),
            }
        )
    finally:
        db.client.close()
        r.close()


@bp.get("/healthz")
@bp.output(schemas.Health)
@bp.doc(summary="Liveness: the process answers")
def healthz() -> Response:
    return json_response({"status": "ok"})


@bp.get("/readyz")
@bp.output(schemas.Ready)
@bp.doc(
    summary="Readiness: MQTT broker, MongoDB and Redis reachable",
    description="200 when all three answer; 503 (problem+json) naming each one that does not.",
    responses={503: "A dependency is down (named in `detail` and `checks`)"},
)
def readyz() -> Response:
    checks = run_checks(service_checks(services()))
    failing = [name for name, c in checks.items() if not c["ok"]]
    if failing:
        detail = "not ready: " + "; ".join(f"{n}: {checks[n]['error']}" for n in failing)
        return problem(503, detail, dependency=failing[0], failing=failing, checks=checks)
    return json_response({"status": "ready", "checks": checks})


@bp.get("/metrics")
@bp.doc(
    summary="Prometheus metrics",
    description="Requests and latencies per route (all gunicorn workers), and the "
    "ingester's counters (received, stored, duplicates, rejected, batches, batch sizes, "
    "lag) as `sensor_ingest_*`.",
    responses={
        200: {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
def metrics_view() -> Response:
    return metrics.metrics_response(services())
