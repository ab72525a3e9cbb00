"""sensor-gateway: MQTT sensor readings into MongoDB and Redis, served over HTTP."""

__version__ = "0.1.0"
