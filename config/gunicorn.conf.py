# gunicorn configuration of the sensor-gateway API.
#
#   gunicorn -c config/gunicorn.conf.py          (what `sensor-gateway api` runs)
#
# Everything lives in the package so an installed gateway has it too: bind,
# workers, threads and HTTPS (tls_certfile/tls_keyfile) from gateway.toml ([api]),
# the refusal to serve beyond loopback without an API token, gthread workers,
# Prometheus multiprocess metrics, and the systemd READY/WATCHDOG/STATUS/STOPPING hooks.
# Override any setting below the import, e.g. `timeout = 60`.
from sensor_gateway.gunicorn_conf import *  # noqa: F403
from sensor_gateway.gunicorn_conf import (  # noqa: F401 - hooks gunicorn looks up by name
    child_exit,
    on_exit,
    on_starting,
    when_ready,
    worker_int,
)
