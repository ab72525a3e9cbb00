"""gunicorn settings and hooks for the API: the one gunicorn configuration.

Outside the ``api`` package on purpose: importing it must not import
prometheus_client before ``PROMETHEUS_MULTIPROC_DIR`` is set below.

Settings come from the gateway configuration (``$SENSOR_GATEWAY_CONFIG`` or
/etc/sensor-gateway/gateway.toml): ``api.bind``, ``api.workers``,
``api.threads``, and HTTPS from ``api.tls_certfile``/``api.tls_keyfile``
(gunicorn's ``certfile``/``keyfile``); the worker class is ``gthread`` (SSE
streams hold a thread, never a whole worker).

Access control is checked before anything starts (:func:`tokens.check_startup`):
bound beyond loopback with no API token and without ``api.allow_anonymous``,
gunicorn exits with status 2 and a message naming the keys.

systemd (``Type=notify``, ``NotifyAccess=main``): gunicorn ≥ 20 sends its own
``READY=1`` as soon as it has bound the socket — before any worker runs and
whatever the state of MongoDB, Redis and the broker. We take
``$NOTIFY_SOCKET`` away from it in ``on_starting`` and notify ourselves from
a thread of the master started in ``when_ready``:

- ``READY=1`` once ``GET /healthz`` answers through the bound address (a
  worker is serving) and MQTT, MongoDB and Redis all answered;
- ``WATCHDOG=1`` only while ``GET /healthz`` answers;
- ``STATUS=`` with the number of requests served (summed over the workers
  from the Prometheus multiprocess files);
- ``STOPPING=1`` as soon as the master starts stopping.

``PROMETHEUS_MULTIPROC_DIR`` is set here, before any worker imports
prometheus_client, so ``/metrics`` sums every worker (see api/metrics.py).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import shutil
import socket
import ssl
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from gunicorn.glogging import Logger as _GunicornLogger

from sensor_gateway import config as _config
from sensor_gateway import logs as _logs
from sensor_gateway import tokens as _tokens
from sensor_gateway.notify import Notifier

try:
    _cfg = _config.load()
    # Dashboard sessions are signed with a secret every worker shares: made here,
    # in the master, and inherited through the environment at fork.
    _tokens.session_secret()
    _access = _tokens.check_startup(_cfg)
except _config.ConfigError as _exc:
    # gunicorn would print a traceback for an exception: say it in one line.
    print(f"sensor-gateway: configuration error: {_exc}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None

wsgi_app = "sensor_gateway.api:create_app()"
bind = [_cfg.api.bind]
# HTTPS when both are set (gunicorn loads them for every new connection).
certfile = str(_cfg.credential_path(_cfg.api.tls_certfile)) if _cfg.api.tls_certfile else None
keyfile = str(_cfg.credential_path(_cfg.api.tls_keyfile)) if _cfg.api.tls_keyfile else None
workers = _cfg.api.workers
threads = _cfg.api.threads
worker_class = "gthread"
# gthread workers heartbeat from their main loop, so a long request is not a timeout.
timeout = 30
graceful_timeout = 10
keepalive = 5
proc_name = "sensor-api"
# gunicorn ≥ 24's control socket lives in $HOME/.gunicorn: unwritable under a hardened
# unit and shared between instances. Nothing here uses it.
control_socket_disable = True
loglevel = _cfg.log.level
errorlog = "-"
accesslog = None


class JournalLogger(_GunicornLogger):
    """gunicorn's own lines get journald priority prefixes too, under systemd, so
    ``journalctl -u sensor-api -p warning`` shows its warnings and errors."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        if _logs.under_journald():
            for handler in self.error_log.handlers:
                handler.setFormatter(_logs.JournalFormatter())


logger_class = JournalLogger

log = logging.getLogger("sensor_gateway.api.gunicorn")

_own_metrics_dir = False
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        _metrics_dir = Path(runtime) / "metrics"
        _metrics_dir.mkdir(parents=True, exist_ok=True)
    else:
        _metrics_dir = Path(tempfile.mkdtemp(prefix="sensor-api-metrics-"))
        _own_metrics_dir = True
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)


class _State:
    notifier: Notifier | None = None
    stopping = threading.Event()
    thread: threading.Thread | None = None


def _metrics_dir_path() -> Path:
    return Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])


def requests_served() -> int:
    """Requests answered by all workers, from the multiprocess metric files."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    reg = CollectorRegistry()
    MultiProcessCollector(reg)
    total = 0.0
    for metric in reg.collect():
        if metric.name == "sensor_api_requests":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return int(total)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


# With HTTPS the master's probe thread calls OpenSSL, which takes global locks
# inside its calls. A worker forked while the thread is inside one inherits the
# lock held forever, and its first TLS handshake hangs. So the probe holds
# _tls_lock around all its TLS work, and every fork of this process waits for it.
_tls_lock = threading.Lock()
_tls_client: ssl.SSLContext | None = None
if certfile:
    os.register_at_fork(
        before=_tls_lock.acquire,
        after_in_parent=_tls_lock.release,
        after_in_child=_tls_lock.release,
    )


def _connection(address: str, timeout: float) -> http.client.HTTPConnection:
    global _tls_client
    if address.startswith("unix:"):
        return _UnixHTTPConnection(address[5:], timeout)
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if certfile:
        if _tls_client is None:
            # Our own server through the address it bound: no name or chain to check.
            _tls_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            _tls_client.check_hostname = False
            _tls_client.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(
            host, int(port or 8000), timeout=timeout, context=_tls_client
        )
    return http.client.HTTPConnection(host, int(port or 8000), timeout=timeout)


def healthz_ok(address: str, timeout: float = 2.0) -> bool:
    with _tls_lock if certfile else contextlib.nullcontext():
        conn = _connection(address, timeout)
        try:
            conn.request("GET", "/healthz", headers={"User-Agent": "sensor-api-watchdog"})
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()


def _supervise(address: str, notifier: Notifier) -> None:
    """READY once serving and connected; then WATCHDOG while /healthz answers."""
    from sensor_gateway.api.health import check_dependencies  # imported in when_ready

    delay = 0.2
    while not _State.stopping.is_set():
        if healthz_ok(address):
            checks = check_dependencies(_cfg)
            failing = [f"{n}: {c.get('error')}" for n, c in checks.items() if not c["ok"]]
            if not failing:
                break
            log.warning("not ready yet: %s", "; ".join(failing))
            notifier.status("waiting for " + ", ".join(n.split(":")[0] for n in failing))
        if _State.stopping.wait(delay):
            return
        delay = min(delay * 2, 5.0)
    log.info("serving on %s; MQTT, MongoDB and Redis reachable", address)
    notifier.ready(f"serving on {address}")
    interval = notifier.watchdog_interval / 2 if notifier.watchdog_interval else 5.0
    while not _State.stopping.wait(max(0.5, min(interval, 5.0))):
        if healthz_ok(address):
            notifier.progress()
            with contextlib.suppress(Exception):
                notifier.status(f"serving on {address}; {requests_served()} requests answered")
        else:
            log.warning("GET /healthz on %s failed; withholding the watchdog ping", address)


# -- hooks ---------------------------------------------------------------------------


def on_starting(server: Any) -> None:
    _logs.setup(_cfg.log.level)
    log.info("API access: %s", _access)
    for f in _metrics_dir_path().glob("*.db"):
        f.unlink()
    # Ours from now on; gunicorn's own READY=1 (sent at bind) becomes a no-op.
    _State.notifier = Notifier()
    os.environ.pop("NOTIFY_SOCKET", None)

    original_stop = server.stop

    def stop(graceful: bool = True) -> None:
        if not _State.stopping.is_set():
            _State.stopping.set()
            if _State.notifier is not None:
                _State.notifier.stopping()
        original_stop(graceful)

    server.stop = stop


def when_ready(server: Any) -> None:
    assert _State.notifier is not None
    # The supervising thread runs while this process forks workers. A fork copies
    # any lock another thread holds, and a module being imported by that thread
    # stays locked forever in the child. So everything the thread uses is imported
    # (and a first check run, which also imports what the clients import lazily)
    # here, in the main thread, before it starts and before any worker is forked.
    from sensor_gateway.api.health import check_dependencies

    checks = check_dependencies(_cfg)
    failing = [f"{n}: {c.get('error')}" for n, c in checks.items() if not c["ok"]]
    if failing:
        log.warning("dependencies not reachable yet: %s", "; ".join(failing))
    requests_served()
    address = server.cfg.bind[0] if server.cfg.bind else _cfg.api.bind
    _State.thread = threading.Thread(
        target=_supervise, args=(address, _State.notifier), name="sd-notify", daemon=True
    )
    _State.thread.start()


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    _State.stopping.set()
    if _State.notifier is not None:
        _State.notifier.stopping()
    if _own_metrics_dir:
        shutil.rmtree(_metrics_dir_path(), ignore_errors=True)


def worker_int(worker: Any) -> None:
    worker.log.info("worker %s interrupted; finishing", worker.pid)
