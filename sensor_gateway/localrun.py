"""``make run``: the whole pipeline in the foreground, on loopback, data under ./var.

Starts Mosquitto, Redis and a MongoDB-wire server (see localstack), writes
``var/gateway.toml`` pointing at them, then runs the ingester, the API and the
simulator as child processes, their output prefixed by name. Ctrl-C stops all.
Ports default to the usual ones and can be changed with environment variables
(MQTT_PORT, REDIS_PORT, MONGODB_PORT, API_PORT) when those are taken.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import tomli_w

from sensor_gateway.localstack import REPO, Stack

DAEMONS = ("ingest", "api", "simulate")


def _pump(name: str, proc: subprocess.Popen) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(f"{name:>9} | {line.decode(errors='replace')}")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / "var")
    ap.add_argument("--rate", type=float, default=None, help="simulator messages per second")
    args = ap.parse_args(argv)

    env_port = lambda name, default: int(os.environ.get(name, default))  # noqa: E731
    stack = Stack(
        root=args.data.resolve(),
        ports={
            "mqtt": env_port("MQTT_PORT", 1883),
            "redis": env_port("REDIS_PORT", 6379),
            "mongodb": env_port("MONGODB_PORT", 27017),
        },
    )
    api_port = env_port("API_PORT", 8000)
    try:
        stack.start()
    except (RuntimeError, TimeoutError) as exc:
        stack.stop()
        print(
            f"could not start the local services: {exc}\n(is a port taken? set MQTT_PORT, "
            "REDIS_PORT, MONGODB_PORT; logs under var/*/service.log)",
            file=sys.stderr,
        )
        return 1
    data = stack.config_dict()
    data["api"]["bind"] = f"127.0.0.1:{api_port}"
    cfg_path = stack.root / "gateway.toml"
    cfg_path.write_text(tomli_w.dumps(data))
    print(f"services up ({stack.mongo.engine}); configuration in {cfg_path}")

    procs: dict[str, subprocess.Popen] = {}
    for name in DAEMONS:
        extra = ["--rate", str(args.rate)] if name == "simulate" and args.rate else []
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "sensor_gateway", "-c", str(cfg_path), name, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=_pump, args=(name, procs[name]), daemon=True).start()
        if name == "ingest":
            time.sleep(1.0)  # let it subscribe before readings flow
    print(
        f"API on http://127.0.0.1:{api_port}/  (try: curl http://127.0.0.1:{api_port}/readings/latest)"
        "\nCtrl-C stops everything."
    )

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stopping.set())
    try:
        while not stopping.is_set():
            for name, p in procs.items():
                if p.poll() is not None:
                    print(f"{name} exited with {p.returncode}; stopping", file=sys.stderr)
                    stopping.set()
            stopping.wait(0.5)
    except KeyboardInterrupt:
        pass
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
    stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
