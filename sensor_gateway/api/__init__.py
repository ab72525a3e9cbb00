"""The HTTP API: an APIFlask app factory with one blueprint per concern.

``create_app()`` reads the configuration (``$SENSOR_GATEWAY_CONFIG`` or the
default path) unless given one; gunicorn runs ``sensor_gateway.api:create_app()``
(see :mod:`sensor_gateway.gunicorn_conf`). The OpenAPI document is
generated from the schemas at ``/openapi.json``, with interactive docs at ``/docs``.
"""

from __future__ import annotations

from apiflask import APIFlask

from sensor_gateway import __version__
from sensor_gateway import config as config_mod
from sensor_gateway.api import (
    auth,
    compat,
    dashboard,
    errors,
    export,
    health,
    metrics,
    readings,
    sensors,
    stats,
    stream,
)
from sensor_gateway.api.services import Services


def create_app(cfg: config_mod.Config | None = None) -> APIFlask:
    cfg = cfg if cfg is not None else config_mod.load()
    app = APIFlask(
        "sensor_gateway.api",
        title="sensor-gateway API",
        version=__version__,
        spec_path="/openapi.json",
        docs_path="/docs",
    )
    problem_schema = {
        "type": "object",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {"type": "object"},
        },
    }
    app.config.update(
        VALIDATION_ERROR_STATUS_CODE=400,
        VALIDATION_ERROR_SCHEMA=problem_schema,
        HTTP_ERROR_SCHEMA=problem_schema,
        VALIDATION_ERROR_DESCRIPTION="Bad request: a parameter is invalid",
        DESCRIPTION="Sensor readings collected over MQTT, served from Redis and MongoDB. "
        "Times are ISO 8601 (UTC in answers; naive times in requests are UTC). Errors are "
        "`application/problem+json` naming the bad parameter or the failing dependency. "
        "Beyond loopback (or once the token file exists) every route but `/healthz` needs "
        "`Authorization: Bearer <token>` (`sensor-gateway token add NAME`); `/metrics` also "
        "answers loopback clients without one.",
        JSON_SORT_KEYS=False,
        SECURITY_SCHEMES={"bearerAuth": {"type": "http", "scheme": "bearer"}},
    )
    app.extensions["sensor_gateway"] = Services(cfg)
    dashboard.configure_docs(app)  # /docs from the gateway's own copy of Swagger UI
    errors.register(app)
    metrics.register(app)  # first: its timer starts before a request can be refused
    auth.register(app, cfg)
    for bp in (
        readings.bp,
        export.bp,
        stream.bp,
        sensors.bp,
        stats.bp,
        health.bp,
        compat.bp,
        dashboard.bp,
    ):
        app.register_blueprint(bp)

    @app.spec_processor
    def _security(spec: dict) -> dict:
        # Every operation takes the bearer token; /healthz needs none.
        spec["security"] = [{"bearerAuth": []}]
        for path, item in spec.get("paths", {}).items():
            if path == "/healthz":
                for op in item.values():
                    op["security"] = []
        return spec

    return app
